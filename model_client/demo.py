"""``monim demo``: continual learning on an embedded store, day by day, with four arms.

Prints a table after each day, and writes ``OUT/results.json`` (every number) and
``OUT/perplexity.png`` (perplexity over days per arm; memory size over days).
See model_client/continual.py for the experiment.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from monim.model_client.client import MemoryClient
from monim.model_client.continual import ARMS, ByteTokenizer, ContinualConfig, HFTokenizer, run_continual
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
    """(model, tokenizer): a local Hugging Face causal LM, or a byte-level GPT-2 from a config."""
    if path is None:
        return tiny_gpt2(n_positions=512, **sizes), ByteTokenizer()
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
    return model, HFTokenizer(tokenizer)


def format_day(index: int, results: dict) -> str:
    arms = results["arms"]
    frozen_new, frozen_day0 = arms["frozen"]["new_day_ppl"][index], arms["frozen"]["day0_ppl"][index]
    memory = results["memory"]
    lines = [f"\nday {index} ({results['days'][index]}) after {results['timing_s'][index]:.0f} s | memory rows: "
             + ", ".join(f"{arm} {memory[arm]['rows'][index]:,} (admitted {memory[arm]['admission_rate'][index]:.0%}, "
                         f"store {memory[arm]['store_ms_per_step'][index]:.0f} ms/step)" for arm in memory)]
    which = "day 0 held-out" if index == 0 else f"held-out of days 1..{index}"
    lines.append(f"  {'arm':<9} {'ppl: ' + which:>28} {'vs frozen':>10} {'day-0 ppl':>10} {'day-0 change':>13}")
    for arm in ARMS:
        new, day0 = arms[arm]["new_day_ppl"][index], arms[arm]["day0_ppl"][index]
        change = day0 / arms[arm]["day0_ppl"][0] - 1
        lines.append(f"  {arm:<9} {new:>28.2f} {new / frozen_new:>10.2f} {day0:>10.2f} {change:>+12.1%}")
    del frozen_day0
    return "\n".join(lines)


def summary(results: dict) -> str:
    """The acceptance figures: new-day perplexity against frozen, and day-0 forgetting, per arm."""
    arms, last = results["arms"], len(results["days"]) - 1
    lines = [f"\nsummary after {last} new day(s):"]
    for arm in ARMS:
        ratio = arms[arm]["new_day_ppl"][last] / arms["frozen"]["new_day_ppl"][last]
        rise = arms[arm]["day0_ppl"][last] / arms[arm]["day0_ppl"][0] - 1
        lines.append(f"  {arm:<9} new-day perplexity {ratio:.2f}x frozen's; day-0 perplexity {rise:+.1%} since day 0")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = list(range(len(results["days"])))
    figure, (new_ax, old_ax, rows_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm in ARMS:
        new_ax.plot(days, results["arms"][arm]["new_day_ppl"], marker="o", label=arm)
        old_ax.plot(days, results["arms"][arm]["day0_ppl"], marker="o", label=arm)
    for arm, memory in results["memory"].items():
        rows_ax.plot(days, memory["rows"], marker="o", label=arm)
    new_ax.set(title="held-out perplexity, new days (day 0 at 0)", xlabel="day", ylabel="perplexity")
    old_ax.set(title="day-0 held-out perplexity (forgetting)", xlabel="day")
    rows_ax.set(title="memory rows", xlabel="day")
    for ax in (new_ax, old_ax, rows_ax):
        ax.set_xticks(days)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclasses.dataclass
class DemoInputs:
    days: list
    model: object
    tokenizer: object
    config: ContinualConfig
    description: str


def prepare_inputs(corpus: str | None = None, model: str | None = None, days: int | None = None,
                   quick: bool = False) -> DemoInputs:
    """Reads the corpus and loads the model, before any store starts: a bad --corpus or --model
    fails here with InvalidArgument saying what to fix."""
    sizes = QUICK if quick else DEFAULT
    days = days if days is not None else sizes["days"]
    if corpus is None:
        day_texts = stdlib_days(days, sizes["train_chars"], sizes["held_out_chars"], sizes["day0_train_chars"])
    else:
        day_texts = folder_days(corpus, days, sizes["train_chars"], sizes["held_out_chars"], sizes["day0_train_chars"])
    lm, tokenizer = load_model(model, sizes["model"])
    config = sizes["config"] if model is None else dataclasses.replace(sizes["config"], day0_steps=0)
    description = (f"{len(day_texts) - 1} new day(s) of {corpus or 'the standard library' + chr(39) + 's docstrings'}; "
                   f"model {model or 'byte-level GPT-2 ' + str(sizes['model'])}")
    return DemoInputs(day_texts, lm, tokenizer, config, description)


def run_demo(address: str, shards: int, inputs: DemoInputs, out: str = "demo-out", progress: bool = True) -> dict:
    """Runs the continual-learning demo against the store at ``address``; returns the results."""
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"monim demo: continual learning over {inputs.description}; store at {address} "
          f"({shards} shard(s) started here)" if shards else f"monim demo: continual learning over "
          f"{inputs.description}; store at {address}", flush=True)
    started = time.perf_counter()
    with MemoryClient(address, timeout_s=600) as client:
        results = run_continual(client, inputs.days, inputs.model, inputs.tokenizer, inputs.config,
                                progress=progress, on_day=lambda index, r: print(format_day(index, r), flush=True))
    results["total_s"] = time.perf_counter() - started
    print(summary(results))
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "perplexity.png")
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'perplexity.png'} ({results['total_s']:.0f} s)")
    return results
