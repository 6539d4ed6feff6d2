"""The experiment's tables and plot: a table after each day of a seed, the summary over seeds
(mean and spread), and the per-day perplexity of every arm (matplotlib)."""

from __future__ import annotations

import pathlib

import numpy as np
from monim.model_client.continual.config import ARMS


def format_day(index: int, results: dict, seed: int | None = None) -> str:
    """One seed's table after day index (results: run_continual's, so far)."""
    arms = results["arms"]
    frozen_new = arms["frozen"]["new_day_ppl"][index]
    memory = results["memory"]
    label = "" if seed is None else f"seed {seed}, "
    lines = [f"\n{label}day {index} ({results['days'][index]}) after {results['timing_s'][index]:.0f} s | memory rows: "
             + ", ".join(f"{arm} {memory[arm]['rows'][index]:,} (admitted {memory[arm]['admission_rate'][index]:.0%}, "
                         f"store {memory[arm]['store_ms_per_step'][index]:.0f} ms/step)" for arm in memory)]
    which = "day 0 held-out" if index == 0 else f"held-out of days 1..{index}"
    lines.append(f"  {'arm':<18} {'ppl: ' + which:>28} {'vs frozen':>10} {'day-0 ppl':>10} {'day-0 change':>13}")
    for arm in ARMS:
        new, day0 = arms[arm]["new_day_ppl"][index], arms[arm]["day0_ppl"][index]
        change = day0 / arms[arm]["day0_ppl"][0] - 1
        lines.append(f"  {arm:<18} {new:>28.2f} {new / frozen_new:>10.2f} {day0:>10.2f} {change:>+12.1%}")
    return "\n".join(lines)


def _pm(spread: dict, form: str) -> str:
    return f"{format(spread['mean'], form)} ± {format(spread['std'], form)}"


def summary(results: dict) -> str:
    """The acceptance figures over seeds (aggregate()'s results): per arm, new-day and day-0
    perplexity after the last day, new-day perplexity against frozen's, and day-0 change since day 0,
    each as mean ± std over the seeds."""
    seeds = results["seeds"]
    last = len(results["days"]) - 1
    spread = "mean ± std over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"seed {seeds[0]}"
    lines = [f"\nsummary after {last} new day(s) ({spread}):",
             f"  {'arm':<18} {'new-day ppl':>15} {'vs frozen':>13} {'day-0 ppl':>15} {'day-0 change':>17}"]
    for arm in ARMS:
        figures = results["summary"][arm]
        change = figures["day0_change"]
        lines.append(f"  {arm:<18} {_pm(figures['new_day_ppl'], '.2f'):>15} {_pm(figures['new_day_vs_frozen'], '.3f'):>13} "
                     f"{_pm(figures['day0_ppl'], '.2f'):>15} "
                     f"{format(change['mean'], '+.1%') + ' ± ' + format(change['std'], '.1%'):>17}")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    """Three panels: new-day and day-0 held-out perplexity per day for every arm (the mean over seeds,
    with a band of ± one std when there are several), and memory rows per day."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = np.arange(len(results["days"]))
    several = len(results["seeds"]) > 1
    figure, (new_ax, old_ax, rows_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in ARMS:
        record = results["arms"][arm]
        for ax, name in ((new_ax, "new_day_ppl"), (old_ax, "day0_ppl")):
            mean = np.asarray(record[name])
            line, = ax.plot(days, mean, marker="o", label=arm)
            if several:
                std = np.asarray(record[f"{name}_std"])
                ax.fill_between(days, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
    for arm, memory in results["memory"].items():
        rows_ax.plot(days, memory["rows"], marker="o", label=arm)
    band = f" (mean ± std, {len(results['seeds'])} seeds)" if several else ""
    new_ax.set(title="held-out perplexity, new days (day 0 at 0)" + band, xlabel="day", ylabel="perplexity")
    old_ax.set(title="day-0 held-out perplexity (forgetting)" + band, xlabel="day")
    rows_ax.set(title="memory rows", xlabel="day")
    for ax in (new_ax, old_ax, rows_ax):
        ax.set_xticks(days)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
