"""Fast experiments on how the memory learns: the memory arms only, on an in-process store, from a
cached day-0 LM (docs/LEARNING.md's sweep rows come from here).

    python -m monim.model_client.continual.sweep --seed 0 --set epochs=1 --set k=32 --tag one-pass
    python -m monim.model_client.continual.sweep --arms monim_fixed_values,monim --set monim_combiner=fixed

The demo's default corpus, model and ContinualConfig, with ``--set name=value`` overrides (JSON values,
bare words as strings). The day-0 LM of a seed is trained once (as run_continual does) and cached under
``--cache``; the frozen LM is scored once. The memory arms read the days in lockstep (arms.py) on
``MemoryClient(":memory:")`` (the service's router on one in-process shard: the same arithmetic as the
demo's 2 shards, without the network), and are scored on day 0's held-out text after day 0 and on
every held-out day after the last. One JSON line per run goes to stdout and ``--out``:
arms {arm: new-day PPL, its ratio to frozen's, day-0 PPL and its change since day 0, the learned
T / lambda / gate, rows, admission}, frozen, seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np
import torch
from monim.model_client.client import MemoryClient
from monim.model_client.continual.arms import MemoryArm, learn_day, perplexity, train_lm
from monim.model_client.continual.config import MEMORY_ARMS, ByteTokenizer
from monim.model_client.corpus import stdlib_days
from monim.model_client.demo import DEFAULT
from monim.model_client.text_data import tiny_gpt2

FIGURES = ("admission_rate", "memory_rows", "temperature", "lambda", "gate")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def day0_model(seed: int, days, config, cache: pathlib.Path):
    """The demo's byte-level GPT-2 after day 0 for this seed, trained once and cached."""
    model = tiny_gpt2(n_positions=512, seed=seed, **DEFAULT["model"])
    path = cache / f"day0-lm-seed{seed}-steps{config.day0_steps}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        torch.manual_seed(seed)
        train_lm(model, ByteTokenizer().encode(days[0].train), config.day0_steps, config.batch, config.length,
                 config.day0_lr, seed, "day 0", True)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def sweep(config, arm_names: list[str], cache: pathlib.Path) -> dict:
    days = stdlib_days(DEFAULT["days"], DEFAULT["train_chars"], DEFAULT["held_out_chars"], DEFAULT["day0_train_chars"])
    tokenizer = ByteTokenizer()
    train = [tokenizer.encode(d.train) for d in days]
    held_out = [tokenizer.encode(d.held_out) for d in days]
    base = day0_model(config.seed, days, config, cache)
    torch.manual_seed(config.seed)
    hidden = base.config.n_embd
    client = MemoryClient(":memory:")
    arms = {}
    if "monim_fixed_values" in arm_names:
        arms["monim_fixed_values"] = MemoryArm("monim_fixed_values", base, client, "monim", config, hidden,
                                               fixed_values=True)
    if "knnlm" in arm_names:
        arms["knnlm"] = MemoryArm("knnlm", base, client, "knnlm", config, hidden)
    if "monim" in arm_names:
        mirror = (arms["monim_fixed_values"].namespace,) if "monim_fixed_values" in arms else ()
        arms["monim"] = MemoryArm("monim", base, client, "monim", config, hidden, mirror_to=mirror)
        if mirror:
            arms["monim_fixed_values"].follow(arms["monim"])
    order = [name for name in MEMORY_ARMS if name in arms]

    def new_day_ppl(model):
        return float(np.mean([perplexity(model, held_out[d], config.length, config.eval_batch)
                              for d in range(1, len(days))]))

    started = time.perf_counter()
    frozen = {"new": new_day_ppl(base), "day0": perplexity(base, held_out[0], config.length, config.eval_batch)}
    day0_after_day0, figures = {}, {}
    try:
        for index, day in enumerate(days):
            figures = learn_day([arms[name] for name in order], index, day, train[index][-config.memory_day_tokens:],
                                False)
            if index == 0:
                day0_after_day0 = {name: perplexity(arms[name].model, held_out[0], config.length, config.eval_batch)
                                   for name in order}
        out = {}
        for name in order:
            new = new_day_ppl(arms[name].model)
            day0 = perplexity(arms[name].model, held_out[0], config.length, config.eval_batch)
            out[name] = {"new_day_ppl": new, "vs_frozen": new / frozen["new"], "day0_ppl": day0,
                         "day0_change": day0 / day0_after_day0[name] - 1,
                         **{f: figures[name][f] for f in FIGURES}}
    finally:
        for arm in arms.values():
            arm.close()
    return {"arms": out, "frozen": frozen, "seconds": time.perf_counter() - started}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a ContinualConfig field (repeatable)")
    parser.add_argument("--arms", default=",".join(MEMORY_ARMS))
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core box)")
    parser.add_argument("--cache", default=".sweep-cache", help="folder for the day-0 LMs")
    parser.add_argument("--out", default="sweep-results.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    config = dataclasses.replace(DEFAULT["config"], seed=args.seed, **{k: _value(v) for k, v in overrides.items()})
    arm_names = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = set(arm_names) - set(MEMORY_ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {MEMORY_ARMS}")
    result = {"tag": args.tag, "seed": args.seed, "set": overrides, **sweep(config, arm_names, pathlib.Path(args.cache))}
    line = json.dumps(result)
    print(line)
    with open(args.out, "a") as out:
        out.write(line + "\n")


if __name__ == "__main__":
    main()
