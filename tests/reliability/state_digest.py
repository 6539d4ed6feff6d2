"""What a deployment stores, read through the public gRPC API only, and hashed.

``state_digest(stub)`` reads every namespace (ListNamespaces), its description
(DescribeNamespace: config, row count, next id, rows and state of every shard)
and every stored row (Get over the ids [0, next_id) in chunks, with the optimizer
state: ids, keys, tokens, values, weights, source tags, optimizer moments and
per-row step counts), and hashes each namespace. Two digests are equal exactly
when nothing a caller can read back has changed, so a test asserts "the refused
request changed nothing" with ``assert state_digest(stub) == before``.

Ids that are not stored (deleted rows, ids a restarted registry skipped) are
found from Get's NOT_FOUND, which names the missing ids ("... has no entries with
ids [3, 977] and 5 more"): they are left out and the Get is repeated until it
answers; a chunk of ids none of which is stored is skipped, and the reading stops
once it has found as many rows as DescribeNamespace counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import grpc
import numpy as np
from monim.protos import convert
from monim.protos import memory_pb2 as pb

# Ids per Get: far below any message limit for the small stores these tests build.
GET_CHUNK_IDS = 4096
_MISSING_IDS = re.compile(r"has no entries with ids \[([-0-9, ]*)\](?: and (\d+) more)?")


@dataclasses.dataclass(frozen=True)
class StateDigest:
    """namespaces: name -> SHA-256 of its config, shards and stored rows; next_ids: name -> the next id
    it will give (a restarted registry skips ahead to its reserved mark, so it is kept apart);
    rows: name -> stored rows."""

    namespaces: dict[str, str]
    next_ids: dict[str, int]
    rows: dict[str, int]

    def __eq__(self, other) -> bool:
        return isinstance(other, StateDigest) and (self.namespaces, self.next_ids) == (other.namespaces, other.next_ids)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.namespaces.items())), tuple(sorted(self.next_ids.items()))))

    def changes(self, after: "StateDigest") -> str:
        """A line naming what differs from ``after`` (for assertion messages)."""
        gone = sorted(set(self.namespaces) - set(after.namespaces))
        new = sorted(set(after.namespaces) - set(self.namespaces))
        changed = sorted(name for name in set(self.namespaces) & set(after.namespaces)
                         if self.namespaces[name] != after.namespaces[name])
        rows = {name: (self.rows[name], after.rows[name]) for name in changed}
        next_ids = {name: (self.next_ids[name], after.next_ids[name]) for name in set(self.next_ids) & set(after.next_ids)
                    if self.next_ids[name] != after.next_ids[name]}
        return (f"namespaces dropped: {gone}, created: {new}, rows changed (rows before, after): {rows}, "
                f"next ids moved: {next_ids}")


def _present_rows(stub, namespace: str, generation: int, next_id: int, rows: int,
                  timeout_s: float) -> list[pb.GetResponse]:
    """GetResponses holding every stored row (in id order) among [0, next_id), until ``rows`` are found;
    the ids NOT_FOUND names are left out, and a chunk with none stored is skipped."""
    answers, found = [], 0
    for start in range(0, next_id, GET_CHUNK_IDS):
        if found >= rows:
            break
        chunk = np.arange(start, min(start + GET_CHUNK_IDS, next_id), dtype=np.int64)
        while chunk.size:
            request = pb.GetRequest(namespace=namespace, return_optimizer_state=True, generation=generation)
            convert.fill_tensor(request.ids, chunk)
            try:
                answers.append(stub.Get(request, timeout=timeout_s))
                found += chunk.size
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                named = _MISSING_IDS.search(error.details() or "")
                if named is None:
                    raise AssertionError(f"Get answered NOT_FOUND without naming the ids: {error.details()}") from None
                missing = {int(i) for i in named.group(1).split(",") if i.strip()}
                if len(missing) + int(named.group(2) or 0) == chunk.size:
                    break  # none of the chunk is stored
                chunk = chunk[~np.isin(chunk, list(missing))]
    return answers


def namespace_digest(stub, name: str, timeout_s: float = 30.0) -> tuple[str, int, int]:
    """(SHA-256 of the namespace's description but next_id and of its rows, next_id, stored rows)."""
    description = stub.DescribeNamespace(pb.DescribeNamespaceRequest(namespace=name), timeout=timeout_s)
    next_id = description.next_id
    description.next_id = 0
    digest = hashlib.sha256(description.SerializeToString(deterministic=True))
    rows = 0
    for answer in _present_rows(stub, name, description.config.generation, next_id, description.rows, timeout_s):
        digest.update(answer.SerializeToString(deterministic=True))
        rows += answer.ids.shape[0]
    if rows != description.rows:
        raise AssertionError(f"namespace {name!r}: DescribeNamespace counts {description.rows} rows, "
                             f"Get over [0, {next_id}) finds {rows}")
    return digest.hexdigest(), next_id, rows


def state_digest(stub, timeout_s: float = 30.0) -> StateDigest:
    """The digest of every namespace the deployment holds; stub: a MemoryServiceStub."""
    listed = stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=timeout_s).namespaces
    namespaces, next_ids, rows = {}, {}, {}
    for config in listed:
        namespaces[config.name], next_ids[config.name], rows[config.name] = namespace_digest(stub, config.name,
                                                                                            timeout_s)
    return StateDigest(namespaces, next_ids, rows)
