"""One run of the experiment (a seed), several seeds, and their mean and spread."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time

import numpy as np
import torch
from monim.model_client.continual.arms import MemoryArm, learn_day, perplexity, train_lm
from monim.model_client.continual.config import ARMS, MEMORY_ARMS, ContinualConfig
from monim.model_client.corpus import Day
from monim.model_client.text_data import windows

MEMORY_FIGURES = ("rows", "admission_rate", "store_ms_per_step", "temperature", "lambda", "gate")


def _observer(observe, arm: str, purpose: str, day_index: int):
    """observe(arm, purpose, day_index, inputs) bound to an arm, a purpose and a day: f(inputs), or None."""
    if observe is None:
        return None
    return lambda inputs: observe(arm, purpose, day_index, inputs)


def held_out_record(days: list[Day], held_out_tokens: list[torch.Tensor], length: int) -> list[dict]:
    """What every arm is scored on, per day: windows, tokens and a digest of the windows."""
    out = []
    for day, tokens in zip(days, held_out_tokens):
        data = windows(tokens, length)
        out.append({"day": day.name, "windows": int(data.shape[0]), "tokens": int(data.numel()),
                    "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()})
    return out


def run_continual(client, days: list[Day], base_model, tokenizer, config: ContinualConfig, progress: bool = True,
                  on_day=None, observe=None) -> dict:
    """Runs every arm over the days with one seed (config.seed); returns the results dict: days, config,
    held_out, arms {arm: new_day_ppl, day0_ppl [per day], ppl_by_day [per day: per held-out day]},
    memory {memory arm: rows, admission_rate, ... [per day]}, timing_s [per day].
    base_model is trained on day 0 in place (when config.day0_steps). on_day(index, results) after
    each day. observe(arm, purpose, day_index, inputs int64 [batch, length]) sees every batch any
    model is trained on ("train"), memorizes from ("memorize") or is scored on ("eval"); arm "base"
    is the day-0 training of the LM every arm starts from."""
    torch.manual_seed(config.seed)
    train_tokens = [tokenizer.encode(d.train) for d in days]
    held_out_tokens = [tokenizer.encode(d.held_out) for d in days]
    hidden = int(getattr(base_model.config, "hidden_size", None) or base_model.config.n_embd)
    started = time.perf_counter()
    if config.day0_steps:
        train_lm(base_model, train_tokens[0], config.day0_steps, config.batch, config.length, config.day0_lr,
                 config.seed, f"day 0: training the LM on {days[0].name}", progress,
                 observe=_observer(observe, "base", "train", 0))
    base_model.eval()
    for param in base_model.parameters():
        param.requires_grad_(False)
    finetuned = copy.deepcopy(base_model)
    for param in finetuned.parameters():
        param.requires_grad_(True)
    fixed = MemoryArm("monim_fixed_values", base_model, client, "monim", config, hidden, fixed_values=True)
    memory = {"knnlm": MemoryArm("knnlm", base_model, client, "knnlm", config, hidden),
              "monim_fixed_values": fixed,
              "monim": MemoryArm("monim", base_model, client, "monim", config, hidden, mirror_to=(fixed.namespace,))}
    fixed.follow(memory["monim"])
    models = {"frozen": base_model, "finetune": finetuned, **{arm: memory[arm].model for arm in memory}}
    results = {"days": [d.name for d in days], "config": dataclasses.asdict(config),
               "held_out": held_out_record(days, held_out_tokens, config.length),
               "arms": {arm: {"new_day_ppl": [], "day0_ppl": [], "ppl_by_day": []} for arm in ARMS},
               "memory": {arm: {name: [] for name in MEMORY_FIGURES} for arm in MEMORY_ARMS},
               "timing_s": []}
    try:
        for index, day in enumerate(days):
            figures = learn_day([memory[arm] for arm in MEMORY_ARMS], index, day,
                                train_tokens[index][-config.memory_day_tokens:], progress, observe)
            for arm, day_figures in figures.items():
                day_figures["rows"] = day_figures.pop("memory_rows")
                for name in MEMORY_FIGURES:
                    results["memory"][arm][name].append(day_figures[name])
            if index > 0:
                steps = config.finetune_epochs * max(1, train_tokens[index].numel() // (config.batch * config.length))
                train_lm(finetuned, train_tokens[index], steps, config.batch, config.length, config.finetune_lr,
                         config.seed + index, f"finetune on {day.name}", progress,
                         observe=_observer(observe, "finetune", "train", index))
            for arm in ARMS:
                ppl = [perplexity(models[arm], held_out_tokens[d], config.length, config.eval_batch,
                                  observe=_observer(observe, arm, "eval", d)) for d in range(index + 1)]
                record = results["arms"][arm]
                record["ppl_by_day"].append(ppl)
                record["day0_ppl"].append(ppl[0])
                record["new_day_ppl"].append(float(np.mean(ppl[1:])) if index else ppl[0])
            results["timing_s"].append(time.perf_counter() - started)
            if on_day is not None:
                on_day(index, results)
    finally:
        for learner in memory.values():
            learner.close()
    return results


def _std(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over seeds (axis 0); 0 with one seed."""
    return values.std(axis=0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1:])


def _spread(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(_std(values)), "per_seed": values.tolist()}


def aggregate(runs: list[dict]) -> dict:
    """Several seeds' results -> one results dict. arms[arm]: new_day_ppl, day0_ppl, ppl_by_day as one
    run's (the mean over seeds, per day), *_std beside them (sample std over seeds; 0 with one seed),
    and per_seed {new_day_ppl, day0_ppl, ppl_by_day: one entry a seed}. summary[arm]: after the last
    day, mean/std/per_seed of new_day_ppl, day0_ppl, new_day_vs_frozen (ratio to the frozen arm's
    new-day perplexity, per seed) and day0_change (day-0 perplexity's change since day 0).
    memory: the seeds' mean per day; runs: each seed's memory figures and timing."""
    first = runs[0]
    for run in runs[1:]:
        if run["days"] != first["days"] or run["held_out"] != first["held_out"]:
            raise ValueError("the seeds' runs were scored on different held-out text")
    last = len(first["days"]) - 1
    arms, summary = {}, {}
    for arm in ARMS:
        per_seed = {name: [run["arms"][arm][name] for run in runs] for name in ("new_day_ppl", "day0_ppl", "ppl_by_day")}
        record = {}
        for name in ("new_day_ppl", "day0_ppl"):
            values = np.asarray(per_seed[name], dtype=np.float64)
            record[name], record[f"{name}_std"] = values.mean(axis=0).tolist(), _std(values).tolist()
        record["ppl_by_day"] = [np.mean([np.asarray(run[index]) for run in per_seed["ppl_by_day"]], axis=0).tolist()
                                for index in range(last + 1)]
        record["per_seed"] = per_seed
        arms[arm] = record
        summary[arm] = {
            "new_day_ppl": _spread([run[last] for run in per_seed["new_day_ppl"]]),
            "day0_ppl": _spread([run[last] for run in per_seed["day0_ppl"]]),
            "new_day_vs_frozen": _spread([run["arms"][arm]["new_day_ppl"][last] / run["arms"]["frozen"]["new_day_ppl"][last]
                                          for run in runs]),
            "day0_change": _spread([run["arms"][arm]["day0_ppl"][last] / run["arms"][arm]["day0_ppl"][0] - 1
                                    for run in runs]),
        }
    memory = {arm: {name: np.mean([run["memory"][arm][name] for run in runs], axis=0).tolist() for name in MEMORY_FIGURES}
              for arm in MEMORY_ARMS}
    config = dict(first["config"])
    config.pop("seed")
    return {"days": first["days"], "config": config, "seeds": [run["config"]["seed"] for run in runs],
            "held_out": first["held_out"], "arms": arms, "summary": summary, "memory": memory,
            "runs": [{"seed": run["config"]["seed"], "memory": run["memory"], "timing_s": run["timing_s"]}
                     for run in runs]}


def run_seeds(client, days: list[Day], make_model, tokenizer, config: ContinualConfig, seeds: int = 1,
              progress: bool = True, on_day=None, observe=None) -> dict:
    """run_continual with seeds config.seed, config.seed + 1, ...: each seed builds its LM with
    make_model(seed) (a fresh one: day 0 trains it in place) and reads the days in its own orders.
    on_day(seed, index, results of that seed so far); observe as in run_continual, with the seed
    first. Returns aggregate() of the runs."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    runs = []
    for number in range(seeds):
        seed_config = dataclasses.replace(config, seed=config.seed + number)
        seed = seed_config.seed
        runs.append(run_continual(
            client, days, make_model(seed), tokenizer, seed_config, progress=progress,
            on_day=None if on_day is None else (lambda index, results, seed=seed: on_day(seed, index, results)),
            observe=None if observe is None else (lambda *args, seed=seed: observe(seed, *args))))
    return aggregate(runs)
