"""``monim demo``: continual learning on an embedded store, day by day, with five arms.

Runs through the store's gRPC service (an embedded 2-shard store unless --address names one).
Prints a table after each day of each seed and a summary over the seeds (mean ± std), and writes
``OUT/results.json`` (every number, per seed and aggregated) and ``OUT/perplexity.png``
(per-day perplexity of every arm, a band of ± one std with several seeds; memory size over days).
See model_client/continual/ for the experiment.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import time

import torch
from monim.model_client.client import MemoryClient
from monim.model_client.continual import ByteTokenizer, ContinualConfig, HFTokenizer, format_day, plot, run_seeds, summary
from monim.model_client.corpus import folder_days, stdlib_days
from monim.model_client.text_data import tiny_gpt2
from monim.protos.errors import InvalidArgument

# Sizes of the default run (minutes on 2 CPU cores) and of --quick (seconds, for CI).
DEFAULT = dict(days=3, train_chars=48_000, held_out_chars=8_000, day0_train_chars=300_000,
               model=dict(n_embd=96, n_layer=3, n_head=4),
               config=ContinualConfig(day0_steps=2000, finetune_lr=3e-3, finetune_epochs=4))
QUICK = dict(days=1, train_chars=6_000, held_out_chars=2_000, day0_train_chars=6_000,
             model=dict(n_embd=32, n_layer=1, n_head=2),
             config=ContinualConfig(length=64, batch=8, day0_steps=30, epochs=1, k=8))


def load_model(path: str | None, sizes: dict):
    """(make_model, tokenizer): make_model(seed) gives a fresh LM for a seed: a byte-level GPT-2 from a
    config initialized with that seed, or a copy of a local Hugging Face causal LM (loaded once here)."""
    if path is None:
        return (lambda seed: tiny_gpt2(n_positions=512, seed=seed, **sizes)), ByteTokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not pathlib.Path(path).exists():
        raise InvalidArgument(f"--model {path}: no such file or folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidArgument(
            f"--model {path}: not a local Hugging Face causal LM with a tokenizer ({first_line})") from None
    return (lambda seed: copy.deepcopy(model)), HFTokenizer(tokenizer)


@dataclasses.dataclass
class DemoInputs:
    days: list
    make_model: object  # seed -> a fresh LM
    tokenizer: object
    config: ContinualConfig
    description: str
    seeds: int = 1


def prepare_inputs(corpus: str | None = None, model: str | None = None, days: int | None = None,
                   quick: bool = False, seeds: int = 1) -> DemoInputs:
    """Reads the corpus and loads the model, before any store starts: a bad --corpus, --model or
    --seeds fails here with InvalidArgument saying what to fix."""
    if seeds < 1:
        raise InvalidArgument(f"--seeds must be at least 1, got {seeds}")
    sizes = QUICK if quick else DEFAULT
    days = days if days is not None else sizes["days"]
    if corpus is None:
        day_texts = stdlib_days(days, sizes["train_chars"], sizes["held_out_chars"], sizes["day0_train_chars"])
    else:
        day_texts = folder_days(corpus, days, sizes["train_chars"], sizes["held_out_chars"], sizes["day0_train_chars"])
    make_model, tokenizer = load_model(model, sizes["model"])
    config = sizes["config"] if model is None else dataclasses.replace(sizes["config"], day0_steps=0)
    description = (f"{len(day_texts) - 1} new day(s) of {corpus or 'the standard library' + chr(39) + 's docstrings'}; "
                   f"model {model or 'byte-level GPT-2 ' + str(sizes['model'])}")
    return DemoInputs(day_texts, make_model, tokenizer, config, description, seeds)


def run_demo(address: str, shards: int, inputs: DemoInputs, out: str = "demo-out", progress: bool = True,
             threads: int = 1) -> dict:
    """Runs the continual-learning demo (inputs.seeds seeds) through the store's service at ``address``
    (shards: how many were started here, 0 for a running server); returns the results.
    threads: torch's intra-op threads here while it runs (0: leave torch's setting). One by default:
    the default model is small, and on a busy 2-core machine two threads spin at their barriers
    (docs/LEARNING.md, "Timing")."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_demo(address, shards, inputs, out, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(address: str, shards: int, inputs: DemoInputs, out: str, progress: bool) -> dict:
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = f"{inputs.seeds} seed(s)"
    print(f"monim demo: continual learning over {inputs.description}, {seeds}; store at {address} "
          f"({shards} shard(s) started here)" if shards else f"monim demo: continual learning over "
          f"{inputs.description}, {seeds}; store at {address}", flush=True)
    started = time.perf_counter()
    with MemoryClient(address, timeout_s=600) as client:
        results = run_seeds(client, inputs.days, inputs.make_model, inputs.tokenizer, inputs.config, seeds=inputs.seeds,
                            progress=progress,
                            on_day=lambda seed, index, r: print(format_day(index, r, seed=seed), flush=True))
        # Where the arms' memory lived: the service, and how many shards hold each namespace.
        results["store"] = {"address": address, "shards": len(client.describe_namespace("demo-monim").shards)}
    results["total_s"] = time.perf_counter() - started
    print(summary(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "perplexity.png")
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'perplexity.png'} ({results['total_s']:.0f} s)")
    return results
