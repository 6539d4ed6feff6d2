"""The experiment's settings, its arms and the tokenizers it reads text with."""

from __future__ import annotations

import dataclasses

import torch
from monim.protos.errors import InvalidArgument

# Order matters twice: it is the order of the printed tables and plot legends, and a follower arm
# (monim_fixed_values) comes before its leader (monim) so that it steps before the leader's rows of
# the same batch reach the store (arms.py, "Lockstep").
ARMS = ("frozen", "knnlm", "monim", "monim_fixed_values", "finetune")
MEMORY_ARMS = ("knnlm", "monim_fixed_values", "monim")

@dataclasses.dataclass
class ContinualConfig:
    length: int = 128          # tokens per training / evaluation window
    batch: int = 16
    day0_steps: int = 2000     # LM training on day 0 (0 for a pretrained --model)
    day0_lr: float = 3e-3
    finetune_lr: float = 3e-3
    finetune_epochs: int = 4   # passes of the finetune arm over each new day's text
    # Passes of the monim arms over each day's text (admission in the first). One: in a later pass the
    # admitted positions find their own entries at distance 0, and T and the gate learn to trust
    # self-matches that held-out text never has (docs/LEARNING.md).
    epochs: int = 1
    k: int = 32
    # The memory arms memorize the tokens whose log p < admit_below (with the memory in). -0.8: more entries
    # help every memory arm (knnlm and the fixed values most); above about -0.75 the fixed values catch up
    # with the learned ones (docs/LEARNING.md, "Second round", "Third round").
    admit_below: float = -0.8
    # knnlm's threshold (None: admit_below). kNN-LM stores every token; a memory of hard tokens only
    # gives its p_kNN a skewed view of what follows a context (docs/LEARNING.md).
    knnlm_admit_below: float | None = None
    temperature: float = 0.0   # initial T of the memory arms; 0: hidden size / 8 (distances are squared L2)
    knn_lambda: float = 0.25   # initial lambda of the kNN-LM mixture (learned while reading)
    monim_gate: float = 1.0
    monim_value_lr: float = 1e-2  # Adam on the store's value rows (3e-3 learned too little in one pass; 3e-2 forgot)
    monim_layer_lr: float = 3e-2
    mix_knn: bool = True       # the monim arms also mix p_kNN of the same neighbours (values and tokens at once)
    # lambda (knnlm) / the gate (monim arms): "fixed" (one learned scalar) or "adaptive" (meta-k, per position)
    knnlm_combiner: str = "fixed"
    monim_combiner: str = "adaptive"
    memory_day_tokens: int = 48_000  # the memory arms read at most this much of a day (day 0's is larger)
    eval_batch: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("length", "batch", "epochs", "k", "eval_batch", "memory_day_tokens"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.day0_steps < 0 or self.finetune_epochs < 0:
            raise InvalidArgument("day0_steps and finetune_epochs must be >= 0")
        for name in ("knnlm_combiner", "monim_combiner"):
            if getattr(self, name) not in ("fixed", "adaptive"):
                raise InvalidArgument(f"{name} must be 'fixed' or 'adaptive', got {getattr(self, name)!r}")


class ByteTokenizer:
    vocab_size = 257

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)
