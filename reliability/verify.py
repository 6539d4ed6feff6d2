"""The end of a run: what the service stores against what the clients' models say it must.

For each namespace: every acknowledged row (the model's live rows, by served id) is read back with
Get and its optimizer state. A row NOT_FOUND is missing; a row whose keys, tokens, weights, values
(to 1e-5), source tag, optimizer moments or step count differ is differing (a step, a merge's weight
increment or the row itself lost, or applied twice); DescribeNamespace's row count past the rows
found is extra (a deleted row back, or a row added twice). Each of them is an acknowledged write
lost.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from reliability.compare import row_differences

GET_CHUNK = 4096
DESCRIBE_WAIT_S = 180.0
_MISSING_IDS = re.compile(r"has no entries with ids \[([-0-9, ]*)\](?: and (\d+) more)?")


@dataclasses.dataclass
class NamespaceCheck:
    name: str
    expected_rows: int
    stored_rows: int = 0    # DescribeNamespace
    missing: int = 0
    differing: int = 0
    extra: int = 0
    index: str = "flat"     # the namespace's index, and each shard's index state for an ivf or hnsw one
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.missing + self.differing + self.extra


def _stored(client, name: str, ids: np.ndarray) -> tuple[list, list[int]]:
    """(Rows of the stored ones among ids, in order; the ids not stored). A NOT_FOUND naming every
    missing id (10 at most are named) leaves them out; one naming only some splits the ids in two."""
    from monim.protos.errors import NotFound

    if not ids.size:
        return [], []
    try:
        return [client.get(name, ids, return_optimizer_state=True)], []
    except NotFound as error:
        named = _MISSING_IDS.search(error.message)
        if named is None:
            raise
        missing = [int(i) for i in named.group(1).split(",") if i.strip()]
        if named.group(2) is None:
            rest = ids[~np.isin(ids, missing)]
            rows, more = _stored(client, name, rest)
            return rows, missing + more
        half = ids.size // 2
        first, first_missing = _stored(client, name, ids[:half])
        second, second_missing = _stored(client, name, ids[half:])
        return first + second, first_missing + second_missing


def _describe(client, name: str):
    """DescribeNamespace once every shard serves (a shard still recovering counts no rows)."""
    deadline = time.monotonic() + DESCRIBE_WAIT_S
    while True:
        found = client.describe_namespace(name)
        if all(s.get("state", "serving") == "serving" for s in found.shards) or time.monotonic() > deadline:
            return found
        time.sleep(1.0)


def check_namespace(client, name: str, expected: dict) -> NamespaceCheck:
    """client: a MemoryClient of the service; expected: NamespaceTwin.expected()."""
    from monim.protos.results import Rows

    check = NamespaceCheck(name, expected["rows"])
    description = _describe(client, name)
    check.stored_rows = description.rows
    if description.config.index != "flat":
        check.index = f"{description.config.index}: " + ", ".join(
            f"{s['index_state']} ({s['index_trainings']} builds)" for s in description.shards)
    served_ids = expected["served_ids"]
    found_ids, found_rows = [], []
    for start in range(0, served_ids.size, GET_CHUNK):
        rows, missing = _stored(client, name, served_ids[start:start + GET_CHUNK])
        found_rows += rows
        check.missing += len(missing)
        if missing and len(check.problems) < 5:
            check.problems.append(f"{name}: acknowledged rows not stored, served ids {sorted(missing)[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''}")
        found_ids += [r.ids for r in rows]
    present = np.isin(served_ids, np.concatenate(found_ids)) if found_ids else np.zeros(served_ids.size, bool)
    if found_rows:
        got = Rows(ids=np.concatenate([r.ids for r in found_rows]),
                   keys=np.concatenate([r.keys for r in found_rows]),
                   tokens=np.concatenate([r.tokens for r in found_rows]),
                   values=None if found_rows[0].values is None else np.concatenate([r.values for r in found_rows]),
                   weights=np.concatenate([r.weights for r in found_rows]),
                   sources=[s for r in found_rows for s in r.sources],
                   optimizer_state={key: np.concatenate([r.optimizer_state[key] for r in found_rows])
                                    for key in found_rows[0].optimizer_state})
        want = Rows(ids=served_ids[present], keys=expected["keys"][present], tokens=expected["tokens"][present],
                    values=None if expected["values"] is None else expected["values"][present],
                    weights=expected["weights"][present],
                    sources=[s for s, p in zip(expected["sources"], present) if p],
                    optimizer_state={key: column[present] for key, column in expected["optimizer_state"].items()})
        differ, problems = row_differences(f"{name} (final)", got, want)
        check.differing = int(differ.sum())
        check.problems += problems[:5]
    check.extra = max(0, check.stored_rows - int(present.sum()))
    if check.extra:
        shards = len(description.shards)
        want_per_shard = np.bincount(served_ids[present] % shards, minlength=shards).tolist() if shards else []
        check.problems.append(f"{name}: {check.stored_rows} rows stored (per shard "
                              f"{[s['rows'] for s in description.shards]}), {int(present.sum())} acknowledged "
                              f"(per shard {want_per_shard})")
    return check
