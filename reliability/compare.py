"""A served answer against the model's: each function returns the problems it finds, as lines
(empty: the answers agree). Ids on both sides are the model's (the caller maps served ids first).

Neighbours follow tests/conftest.py's ``assert_same_neighbours``: distances agree to rtol/atol
1e-4, and ids agree except where the model's own answer has a near-tie at that rank (the served
side adds two shards' float32 distances computed on other row blocks, so a tie may break the
other way). Rows: keys and tokens exactly, weights to 1e-6, values and optimizer moments to 1e-5,
per-row step counts exactly, source tags exactly.
"""

from __future__ import annotations

import numpy as np

RTOL = ATOL = 1e-4
VALUE_ATOL = 1e-5
WEIGHT_TOL = 1e-6


def short(array) -> str:
    """A value or the first 6 entries of an array on one line (problem lines stay one line each)."""
    flat = np.asarray(array).reshape(-1)
    text = np.array2string(flat[:6], precision=5, separator=", ", max_line_width=10**6)
    return text[:-1] + ", ...]" if flat.size > 6 else text


def _first(mask: np.ndarray) -> tuple:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def tie_mask(distances: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> np.ndarray:
    """bool [B, k]: slots whose distance nearly equals a neighbouring rank's (where the order may differ)."""
    with np.errstate(invalid="ignore"):
        gaps = np.abs(np.diff(distances, axis=1))
        tie = np.zeros(distances.shape, bool)
        tie[:, 1:] |= gaps < atol + rtol * np.abs(distances[:, 1:])
        tie[:, :-1] |= gaps < atol + rtol * np.abs(distances[:, :-1])
    return tie


def neighbour_problems(what: str, ids, distances, want_ids, want_distances, distance_of=None) -> list[str]:
    """ids int64 [B, k] (served, as model ids; -1 empty slots), distances float32 [B, k], against the model's.

    distance_of(query, model id): the query's distance to that row if the model holds it (else None).
    With it, a served row other than the model's at a rank is also accepted when it is a row the model
    holds, at the distance served, and that distance is the model's at that rank: a tie with a row
    just past the model's k-th, which the model's own distances cannot show."""
    if ids.shape != want_ids.shape or distances.shape != want_distances.shape:
        return [f"{what}: shapes {ids.shape} / {distances.shape}, the model's {want_ids.shape} / {want_distances.shape}"]
    problems = []
    close = np.isclose(distances, want_distances, rtol=RTOL, atol=ATOL)
    if not close.all():
        at = _first(~close)
        problems.append(f"{what}: {int((~close).sum())} distances differ, first at (query, rank) {at}: served "
                        f"{short(distances[at])}, model {short(want_distances[at])}; {_ranks(ids, want_ids, at)}")
    wrong = (ids != want_ids) & ~tie_mask(want_distances)
    if wrong.any() and distance_of is not None:
        for query, rank in np.argwhere(wrong).tolist():
            row = int(ids[query, rank])
            true = distance_of(query, row) if row >= 0 and list(ids[query]).count(row) == 1 else None
            if true is not None and np.isclose(true, distances[query, rank], rtol=RTOL, atol=ATOL) and \
                    np.isclose(true, want_distances[query, rank], rtol=RTOL, atol=ATOL):
                wrong[query, rank] = False
    if wrong.any():
        at = _first(wrong)
        problems.append(f"{what}: {int(wrong.sum())} neighbours differ (not at a tie), first at (query, rank) {at}; "
                        f"{_ranks(ids, want_ids, at)}")
    return problems


def _ranks(ids, want_ids, at: tuple) -> str:
    """The ids of both sides at the ranks around ``at`` (query, rank): enough to see what differs."""
    query, rank = at
    start = max(0, rank - 3)
    return (f"ids at ranks {start}-{min(rank + 3, ids.shape[1] - 1)} (-2: unknown to the model): served "
            f"{ids[query, start:rank + 4].tolist()}, model {want_ids[query, start:rank + 4].tolist()}")


def same_slots(ids, want_ids) -> np.ndarray:
    """bool [B, k]: slots where both sides name the same row (where per-slot columns must agree)."""
    return (ids == want_ids) & (want_ids >= 0)


def column_problems(what: str, got, want, mask, atol: float, rtol: float = 0.0) -> list[str]:
    """got, want [B, k, ...]; compared at the slots of mask [B, k]."""
    if got is None or want is None:
        return [] if got is None and want is None else [f"{what}: served {got is not None}, model {want is not None}"]
    got, want = np.asarray(got)[mask], np.asarray(want)[mask]
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol)
    if bad.any():
        at = _first(bad)
        return [f"{what}: {int(bad.sum())} entries differ, first served {short(got[at[:1]])}, model {short(want[at[:1]])}"]
    return []


def row_differences(what: str, got, want) -> tuple[np.ndarray, list[str]]:
    """Rows (monim.protos.results.Rows) of the same ids in the same order: (bool [N], rows that differ in
    anything; the problems, a line per column)."""
    if len(got) != len(want):
        return np.ones(max(len(got), len(want)), bool), [f"{what}: {len(got)} rows served, the model has {len(want)}"]
    differ = np.zeros(len(want), bool)
    problems = []
    columns = [(name, getattr(got, name), getattr(want, name), tolerance)
               for name, tolerance in (("keys", 0.0), ("tokens", 0.0), ("weights", WEIGHT_TOL), ("values", VALUE_ATOL))]
    if got.optimizer_state is not None and want.optimizer_state is not None:
        columns += [(f"optimizer {name}", got.optimizer_state.get(name), column, 0.0 if name == "step" else VALUE_ATOL)
                    for name, column in want.optimizer_state.items()]
    for name, a, b, tolerance in columns:
        if a is None or b is None:
            if (a is None) != (b is None):
                differ[:] = True
                problems.append(f"{what}: {name} served {a is not None}, model {b is not None}")
            continue
        bad = ~np.isclose(a, b, rtol=tolerance, atol=tolerance)
        if bad.ndim > 1:
            bad = bad.any(axis=tuple(range(1, bad.ndim)))
        if bad.any():
            differ |= bad
            row = int(np.argmax(bad))
            problems.append(f"{what}: {name} of {int(bad.sum())} rows differ, first served id {int(got.ids[row])}: "
                            f"{short(a[row])} against the model's {short(b[row])}")
    tags = np.array([a != b for a, b in zip(got.sources, want.sources)], bool)
    if tags.any():
        differ |= tags
        row = int(np.argmax(tags))
        problems.append(f"{what}: source tags of {int(tags.sum())} rows differ, first served id {int(got.ids[row])}: "
                        f"{got.sources[row]!r} against {want.sources[row]!r}")
    return differ, problems


def rows_problems(what: str, got, want) -> list[str]:
    return row_differences(what, got, want)[1]
