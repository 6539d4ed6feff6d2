"""Small text utilities for the examples, tests and demo: byte-level tokens and tiny GPT-2s.

Bytes need no tokenizer download: token = byte value (0-255), 256 = end of text.
"""

from __future__ import annotations

import pathlib

import torch

VOCAB_SIZE = 257
END_OF_TEXT = 256


def encode(text: str) -> torch.Tensor:
    """int64 [len(utf-8 bytes)]."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


def read_texts(paths) -> str:
    """The concatenated text of files (or of every *.txt/*.md/*.py under folders)."""
    parts = []
    for path in map(pathlib.Path, paths):
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".py")) if path.is_dir() else [path]
        parts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return "\n".join(parts)


def windows(tokens: torch.Tensor, length: int, stride: int | None = None) -> torch.Tensor:
    """[W, length] consecutive windows of a token stream (stride defaults to length)."""
    stride = stride or length
    if tokens.numel() < length:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {length}")
    starts = range(0, tokens.numel() - length + 1, stride)
    return torch.stack([tokens[s:s + length] for s in starts])


def random_batches(tokens: torch.Tensor, batch: int, length: int, steps: int, seed: int = 0):
    """Yields `steps` batches [batch, length] of windows at random offsets."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - length, (batch,), generator=generator)
        yield torch.stack([tokens[s:s + length] for s in starts.tolist()])


def tiny_gpt2(n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 256, seed: int = 0):
    """A small byte-level GPT-2 built from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT,
                        pad_token_id=END_OF_TEXT, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


@torch.no_grad()
def perplexity(model, windows_: torch.Tensor, batch: int = 16) -> float:
    """exp(mean next-token loss) over windows [W, length]."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows_.shape[0], batch):
        chunk = windows_[start:start + batch]
        loss = model(chunk, labels=chunk).loss
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += float(loss) * n
        count += n
    return float(torch.exp(torch.tensor(total / count)))
