"""One client process of the workload: a random mix of calls on namespaces only it uses, each answer
checked at once against its exact model (reliability/twin.py), every write retried with its request
id until it is acknowledged.

Each client owns two namespaces: ``c<i>-values`` (learnable: l2, value_dim 8, Adam) and ``c<i>-keys``
(inner product, keys only; an ivf_flat index for odd i unless ``--no-indexed``, searched with every list
probed, so that its answers are exact and its index is checked through every fault). Since no one else writes them, the
model (the in-process store fed the same acknowledged calls) is exactly what the service must answer:

- Add (request id; some batches with logp, so admission drops rows; some with near-duplicates of
  stored rows and merge_eps, so rows merge into them): the same rows admitted and merged, merged
  rows into the same entries, new rows new ids.
- Search (k past the row count at times; keys, values, weights at times; as a step of a Decode
  stream at times, which goes to a shard's own read endpoint: docs/API.md), Retrieve (a handle kept
  at the front end at times): neighbours as the model's up to ties, then per slot tokens, keys,
  values, weights, alpha; memory where a query's neighbours are the same.
- RetrieveBackward of the served forward (the model steps the same rows with the same alpha) and
  ApplyGradients (repeated ids at times): rows updated, dL/dq, then a Get of the stepped rows with
  their optimizer state: values after the step equal the model's to 1e-5, step counts exactly.
- Get (with deleted ids at times: NOT_FOUND naming exactly those), Delete by ids (deleted ids in the
  batch at times) or by source tag: the count; DescribeNamespace: the row count; CreateSnapshot of a
  namespace: the rows it holds.

MemoryClient is made with ``retries=0``: the loop here does what its retry does (the same request,
so a write carries the same request id; backoff) and more: every failed attempt is counted by status
code, the client fails over to the other front end after each failure (and back to the first one
after FAIL_BACK_S, so that every front-end kill meets every client), and it knows whether a call was
retried (a step retried after a partial commit computes dL/dq from the values after it on some shards:
docs/API.md; so dL/dq is compared only for steps answered at the first attempt). A call that is not
answered within its deadline (writes: WRITE_DEADLINE_S) is unresolved: the run fails, and a write's
namespace is left alone from then on (its model may be one write off).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import time
import traceback
import uuid

import numpy as np

from reliability.compare import column_problems, neighbour_problems, rows_problems, same_slots
from reliability.twin import UNKNOWN, NamespaceSpec, NamespaceTwin

RETRIED_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")
WRITE_DEADLINE_S = 300.0
READ_DEADLINE_S = 180.0
FAIL_BACK_S = 20.0
SOURCES = ("", "tag-a", "tag-b", "tag-c", "tag-d")
# Share of each call in the mix (Retrieve and ApplyGradients fall back to Search on a namespace without values).
MIX = {"add": 0.25, "search": 0.14, "decode": 0.06, "get": 0.12, "retrieve": 0.14, "apply_gradients": 0.08, "delete": 0.12,
       "describe": 0.05, "create_snapshot": 0.01}
_MISSING_IDS = re.compile(r"has no entries with ids \[([-0-9, ]*)\]")


@dataclasses.dataclass
class ClientPlan:
    index: int
    addresses: list[str]
    seed: int
    call_timeout_s: float
    log_path: str
    end_by: float              # time.time() at which the client stops, whatever happens
    max_rows: int = 20_000     # per namespace: past it, deletes take over
    initial_rows: int = 256
    indexed: bool = True       # the odd clients' keys namespaces are ivf_flat (run.py --no-indexed: flat)

    def namespaces(self) -> list[NamespaceSpec]:
        # Unless --no-indexed, every other client's keys namespace is ivf_flat (a small nlist, trained early on
        # each shard, again after each restart and reshard): its index follows every fault's writes.
        indexed = dict(index="ivf_flat", nlist=8, train_min_rows=200) if self.indexed and self.index % 2 else {}
        return [NamespaceSpec(f"c{self.index}-values", dim=16, value_dim=8, optimizer="adam", lr=0.05),
                NamespaceSpec(f"c{self.index}-keys", dim=12, metric="ip", **indexed)]


@dataclasses.dataclass
class ClientReport:
    """What a client sends the driver when it stops."""

    index: int
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)     # answered, by type
    retried: collections.Counter = dataclasses.field(default_factory=collections.Counter)   # answered after a retry
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)    # (type, code) of failed attempts
    refusals: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (type, code) asked for
    failovers: int = 0
    wrong: int = 0
    wrong_details: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (time.time(), line)
    unresolved: list[str] = dataclasses.field(default_factory=list)
    expected: dict = dataclasses.field(default_factory=dict)   # namespace -> NamespaceTwin.expected()
    in_doubt: list[str] = dataclasses.field(default_factory=list)
    crash: str = ""


class Unresolved(Exception):
    """A call that got no answer within its deadline."""


def _count_as_documented(count: int, want: int, failed_attempts: int) -> bool:
    """A step's count: the model's. A retry of one whose rows a reshard moved meanwhile counts the rows
    of the shards that still hold some of them: fewer, never more (docs/OPERATIONS.md, "Reshard"); what
    it changed is checked row by row all the same. (A delete's count is always the model's.)"""
    return count == want or (failed_attempts > 0 and 0 <= count < want)


class Abandoned(Exception):
    """A read given up because the workload is stopping (not a failure)."""


def status_code(error) -> str:
    return getattr(error, "status_code", None) or getattr(error, "code", "UNKNOWN")


class Client:
    """The workload of one process; ``run`` until ``stop`` is set (or plan.end_by)."""

    def __init__(self, plan: ClientPlan, stop, log: logging.Logger):
        from monim.model_client import MemoryClient

        self.plan = plan
        self.stop = stop
        self.log = log
        self.rng = np.random.default_rng([plan.seed, plan.index])
        self.clients = [MemoryClient(address, timeout_s=plan.call_timeout_s, retries=0) for address in plan.addresses]
        self.current = 0
        self.failed_over_at = 0.0
        self.model = MemoryClient(":memory:")
        self.report = ClientReport(plan.index)
        self.twins: list[NamespaceTwin] = []
        self.snapshots = 0
        self.streams = {}  # a front end's client -> its open decode stream (model_client/decode.py)

    # ----- calls: retried, failed over, counted ----------------------------------------------------
    def call(self, kind: str, function, write: bool, expect: tuple[str, ...] = ()):
        """function(client) on the current front end until it answers; returns (answer, failed attempts).
        Raises the error of a code that is not retried (counted under ``refusals`` if in ``expect``),
        Unresolved past the call's deadline, or Abandoned for a read that fails once the workload stops."""
        from monim.protos.errors import MemoryStoreError

        started = time.monotonic()
        deadline = started + (WRITE_DEADLINE_S if write else READ_DEADLINE_S)
        failed = 0
        while True:
            if self.current != 0 and time.monotonic() - self.failed_over_at > FAIL_BACK_S:
                self.current = 0  # back to the first front end
            try:
                answer = function(self.clients[self.current])
            except MemoryStoreError as error:
                code = status_code(error)
                if code in expect:
                    self.report.refusals[(kind, code)] += 1
                    raise
                self.report.errors[(kind, code)] += 1
                if code not in RETRIED_CODES:
                    raise
                failed += 1
                if failed == 1 or failed % 20 == 0:
                    self.log.info("%s: %s on %s (attempt %d): %s", kind, code, self.plan.addresses[self.current],
                                  failed, error.message[:300])
                if not write and self.stop.is_set():
                    raise Abandoned(kind) from None
                if time.monotonic() > deadline or time.time() > self.plan.end_by:
                    raise Unresolved(f"{kind} not answered after {failed} attempts in {time.monotonic() - started:.0f} s "
                                     f"(last: {code} {error.message[:200]})") from None
                self.current = 1 - self.current
                self.failed_over_at = time.monotonic()
                self.report.failovers += 1
                time.sleep(min(2.0, 0.05 * 2 ** min(failed, 6)) * (0.5 + self.rng.random()))
                continue
            self.report.calls[kind] += 1
            if failed:
                self.report.retried[kind] += 1
            return answer, failed

    def wrong(self, problems: list[str]) -> None:
        if not problems:
            return
        self.report.wrong += 1
        for line in problems:
            self.log.error("WRONG ANSWER: %s", line)
            if len(self.report.wrong_details) < 50:
                self.report.wrong_details.append((time.time(), f"client {self.plan.index}: {line}"))

    def unexpected(self, kind: str, error) -> None:
        self.wrong([f"{kind}: unexpected {status_code(error)}: {getattr(error, 'message', error)}"])

    # ----- set-up -----------------------------------------------------------------------------------
    def create(self) -> None:
        """Creates the namespaces (a create retried after it landed meets ALREADY_EXISTS: then the
        namespace must be the one asked for) and fills each with initial rows."""
        from monim.protos.errors import AlreadyExists

        for spec in self.plan.namespaces():
            try:
                self.call("create_namespace", lambda c, s=spec: c.create_namespace(s.name, **s.create_options()),
                          write=True, expect=("ALREADY_EXISTS",))
            except AlreadyExists:
                found, _ = self.call("describe", lambda c, s=spec: c.describe_namespace(s.name), write=False)
                if (found.config.dim, found.config.value_dim, found.rows) != (spec.dim, spec.value_dim, 0):
                    raise
            self.model.create_namespace(spec.name, **spec.create_options())
            self.twins.append(NamespaceTwin(spec, self.model))
        for twin in self.twins:
            for _ in range(self.plan.initial_rows // 32):
                self.add(twin, rows=32, plain=True)

    # ----- the operations ----------------------------------------------------------------------------
    def _queries(self, twin: NamespaceTwin, batch: int) -> np.ndarray:
        """Half near stored keys, half anywhere."""
        queries = self.rng.standard_normal((batch, twin.spec.dim)).astype(np.float32)
        live = twin.live
        if live.size:
            near = self.rng.random(batch) < 0.5
            picks = self.rng.choice(live, batch)
            queries[near] = twin.keys.array[picks[near]] + 0.1 * queries[near]
        return queries

    @staticmethod
    def _distance_of(twin: NamespaceTwin, queries: np.ndarray):
        """(query index, model id) -> the query's distance to that row if the model holds it, else None."""

        def distance(query: int, model_id: int) -> float | None:
            if not 0 <= model_id < twin.next_model_id or not twin.alive.array[model_id]:
                return None
            q, key = queries[query].astype(np.float64), twin.keys.array[model_id].astype(np.float64)
            return float(((q - key) ** 2).sum()) if twin.spec.metric == "l2" else float(-(q @ key))

        return distance

    def add(self, twin: NamespaceTwin, rows: int | None = None, plain: bool = False) -> None:
        spec, rng = twin.spec, self.rng
        n = rows or int(rng.integers(1, 49))
        keys = rng.standard_normal((n, spec.dim)).astype(np.float32)
        tokens = rng.integers(0, 5000, n)
        values = rng.standard_normal((n, spec.value_dim)).astype(np.float32) if spec.value_dim else None
        weights = None if plain or rng.random() < 0.5 else rng.uniform(0.5, 2.0, n).astype(np.float32)
        source = str(rng.choice(SOURCES))
        logp = None if plain or rng.random() < 0.7 else -rng.uniform(0.0, 3.0, n).astype(np.float32)
        merge_eps = 0.0
        live = twin.live
        if not plain and spec.metric == "l2" and live.size and rng.random() < 0.25:
            duplicates = min(n, int(rng.integers(1, 5)))
            picks = rng.choice(live, duplicates)
            keys[:duplicates] = twin.keys.array[picks] + rng.normal(0, 1e-3, (duplicates, spec.dim)).astype(np.float32)
            tokens[:duplicates] = twin.tokens.array[picks]
            merge_eps = 0.01  # squared l2: the duplicates are ~1.6e-5 away, other rows ~2 * dim
        request_id = uuid.uuid4().hex
        served, _ = self.call("add", lambda c: c.add(spec.name, keys, tokens, values, weights, source, logp,
                                                     merge_eps=merge_eps, details=True, request_id=request_id),
                              write=True)
        modelled = self.model.add(spec.name, keys, tokens, values, weights, source, logp, merge_eps=merge_eps,
                                  details=True)
        self.wrong(twin.added(served, modelled, keys, tokens, source))

    def search(self, twin: NamespaceTwin, kind: str = "search") -> None:
        """kind "decode": the search is a step of the client's Decode stream to that front end's deployment."""
        spec, rng = twin.spec, self.rng
        batch = int(rng.integers(1, 9))
        k = int(rng.integers(1, min(spec.max_k, twin.rows() + 8) + 1))
        queries = self._queries(twin, batch)
        flags = dict(return_keys=bool(rng.random() < 0.3), return_values=bool(spec.value_dim and rng.random() < 0.3),
                     return_weights=bool(rng.random() < 0.3), **spec.search_options())
        if kind == "decode":
            served, _ = self.call(kind, lambda c: self._stream(c).search(spec.name, queries, k, **flags), write=False)
        else:
            served, _ = self.call(kind, lambda c: c.search(spec.name, queries, k, **flags), write=False)
        modelled = self.model.search(spec.name, queries, k, **flags)
        ids = twin.to_model(served.ids)
        problems = neighbour_problems(kind, ids, served.distances, modelled.ids, modelled.distances,
                                      self._distance_of(twin, queries))
        if ids.shape == modelled.ids.shape:
            same = same_slots(ids, modelled.ids)
            problems += column_problems(f"{kind} tokens", served.tokens, modelled.tokens, same, 0.0)
            for name, atol in (("keys", 0.0), ("values", 1e-5), ("weights", 1e-6)):
                problems += column_problems(f"{kind} {name}", getattr(served, name), getattr(modelled, name), same, atol)
        self.wrong(problems)

    def decode(self, twin: NamespaceTwin) -> None:
        self.search(twin, kind="decode")

    def _stream(self, client):
        stream = self.streams.get(id(client))
        if stream is None:
            stream = self.streams[id(client)] = client.decode()
        return stream

    def get(self, twin: NamespaceTwin) -> None:
        from monim.protos.errors import NotFound

        spec, rng = twin.spec, self.rng
        live, gone = twin.live, twin.gone
        if not live.size:
            return
        picks = rng.choice(live, min(live.size, int(rng.integers(1, 33))), replace=False)
        with_state = bool(spec.value_dim and rng.random() < 0.5)
        if gone.size and rng.random() < 0.25:
            missing = rng.choice(gone, min(gone.size, int(rng.integers(1, 3))), replace=False)
            asked = twin.to_served(np.concatenate([picks, missing]))
            try:
                self.call("get", lambda c: c.get(spec.name, asked, with_state), write=False, expect=("NOT_FOUND",))
            except NotFound as error:
                named = _MISSING_IDS.search(error.message)
                found = sorted(int(i) for i in named.group(1).split(",") if i.strip()) if named else None
                want = sorted(twin.to_served(missing).tolist())
                if found != want:
                    self.wrong([f"get: NOT_FOUND names ids {found}, the deleted ones asked for are {want}"])
                return
            self.wrong([f"get: deleted ids {twin.to_served(missing).tolist()} were answered"])
            return
        served, _ = self.call("get", lambda c: c.get(spec.name, twin.to_served(picks), with_state), write=False)
        self.wrong(rows_problems("get", served, self.model.get(spec.name, picks, with_state)))

    def check_rows(self, what: str, twin: NamespaceTwin, model_ids: np.ndarray) -> None:
        """Reads the rows back with their optimizer state: values after a step, step counts."""
        model_ids = np.unique(model_ids[model_ids >= 0])
        if model_ids.size:
            served, _ = self.call("get", lambda c: c.get(twin.spec.name, twin.to_served(model_ids), True), write=False)
            self.wrong(rows_problems(what, served, self.model.get(twin.spec.name, model_ids, True)))

    def retrieve(self, twin: NamespaceTwin) -> None:
        from monim.protos.errors import StepAnswerLost
        from monim.protos.results import RetrieveResult

        spec, rng = twin.spec, self.rng
        if not spec.value_dim or not twin.rows():
            return self.search(twin)
        batch, k = int(rng.integers(1, 7)), int(rng.integers(1, min(32, twin.rows()) + 1))
        temperature = float(rng.uniform(0.5, 2.0))
        queries = self._queries(twin, batch)
        keep_state = bool(rng.random() < 0.5)
        served, _ = self.call("retrieve", lambda c: c.retrieve(spec.name, queries, k, temperature,
                                                                keep_state=keep_state), write=False)
        modelled = self.model.retrieve(spec.name, queries, k, temperature)
        ids = twin.to_model(served.ids)
        problems = neighbour_problems("retrieve", ids, served.distances, modelled.ids, modelled.distances,
                                      self._distance_of(twin, queries))
        same = (ids == modelled.ids).all(axis=1)
        problems += column_problems("retrieve alpha", served.alpha, modelled.alpha,
                                    np.broadcast_to(same[:, None], ids.shape), 1e-4, 1e-4)
        problems += column_problems("retrieve memory", served.memory[:, None], modelled.memory[:, None], same[:, None],
                                    1e-4, 1e-4)
        self.wrong(problems)
        if (ids == UNKNOWN).any():
            return  # the service named rows the model does not have: nothing to step on the model's side
        grad_memory = (0.5 * rng.standard_normal((batch, spec.value_dim))).astype(np.float32)
        step_id = uuid.uuid4().hex
        try:
            (grad_queries, grad_temperature), failed = self.call(
                "retrieve_backward", lambda c: c.retrieve_backward(spec.name, served, grad_memory, step_id=step_id),
                write=True, expect=("FAILED_PRECONDITION",))
        except StepAnswerLost:  # documented: a retry after the committing shard restarted; the rows stepped once
            failed = True
        as_served = RetrieveResult(memory=served.memory, ids=ids, alpha=served.alpha, distances=served.distances,
                                   tokens=served.tokens, weights=served.weights, queries=queries, temperature=temperature)
        want_queries, want_temperature = self.model.retrieve_backward(spec.name, as_served, grad_memory)
        if not failed:
            problems = column_problems("retrieve_backward dL/dq", grad_queries[:, None], want_queries[:, None],
                                       np.ones((batch, 1), bool), 1e-3, 1e-3)
            if not np.isclose(grad_temperature, want_temperature, rtol=1e-3, atol=1e-3):
                problems.append(f"retrieve_backward dL/dT: served {grad_temperature!r}, model {want_temperature!r}")
            self.wrong(problems)
        self.check_rows("values after retrieve_backward", twin, ids.reshape(-1))

    def apply_gradients(self, twin: NamespaceTwin) -> None:
        spec, rng = twin.spec, self.rng
        live = twin.live
        if not spec.value_dim or not live.size:
            return self.search(twin)
        picks = rng.choice(live, int(rng.integers(1, 33)))  # with repeats: their gradients sum
        grads = (0.5 * rng.standard_normal((picks.size, spec.value_dim))).astype(np.float32)
        request_id = uuid.uuid4().hex
        updated, failed = self.call("apply_gradients", lambda c: c.apply_gradients(spec.name, twin.to_served(picks),
                                                                                    grads, request_id=request_id),
                                    write=True)
        want = self.model.apply_gradients(spec.name, picks, grads)
        if not _count_as_documented(updated, want, failed):
            self.wrong([f"apply_gradients: {updated} rows updated, the model {want}"])
        self.check_rows("values after apply_gradients", twin, picks)

    def delete(self, twin: NamespaceTwin, rows: int | None = None) -> None:
        spec, rng = twin.spec, self.rng
        live, gone = twin.live, twin.gone
        request_id = uuid.uuid4().hex
        if rows is None and rng.random() < 0.01:  # rare: it erases a fifth of the rows, and the traces of a bug with them
            source = str(rng.choice(SOURCES))
            count, failed = self.call("delete", lambda c: c.delete(spec.name, source=source, request_id=request_id),
                                      write=True)
            want = self.model.delete(spec.name, source=source)
            twin.deleted_source(source)
        else:
            if not live.size:
                return
            picks = rng.choice(live, min(live.size, rows or int(rng.integers(1, 9))), replace=False)
            if gone.size and rng.random() < 0.2:
                picks = np.concatenate([picks, rng.choice(gone, 1)])
            count, failed = self.call("delete", lambda c: c.delete(spec.name, twin.to_served(picks),
                                                                    request_id=request_id), write=True)
            want = self.model.delete(spec.name, picks)
            twin.deleted(picks)
        if count != want:  # retried or not, across a reshard too (docs/OPERATIONS.md, "Reshard")
            retried = f" (after {failed} failed attempts)" if failed else ""
            self.wrong([f"delete: {count} rows deleted, the model {want}{retried}"])

    def describe(self, twin: NamespaceTwin) -> None:
        """The rows must be the model's when every shard answered ("serving"). A shard that did not
        answer within the router's DESCRIBE_WAIT_S is named "recovering" or "unavailable" with no rows
        (docs/API.md, DescribeNamespace): then the total counts the shards that answered, never more
        than the model holds (a documented partial answer, counted with the refusals)."""
        found, _ = self.call("describe", lambda c: c.describe_namespace(twin.spec.name), write=False)
        name, want = twin.spec.name, twin.rows()
        per_shard = [s["rows"] for s in found.shards]
        states = [s["state"] for s in found.shards]
        seen = f"{found.rows} rows (per shard {per_shard}, states {states})"
        silent = [state for state in states if state != "serving"]
        if any(state not in ("recovering", "unavailable") for state in silent):
            self.wrong([f"describe {name}: {seen}: a shard in state {silent[0]!r}, not a documented state"])
        elif found.rows != sum(per_shard):
            self.wrong([f"describe {name}: {seen}: the total is not the sum of the rows per shard"])
        elif not silent and found.rows != want:
            self.wrong([f"describe {name}: {seen}, the model has {want}"])
        elif silent and found.rows > want:
            self.wrong([f"describe {name}: {seen}: the shards that answered hold more than the model has ({want})"])
        elif silent:
            self.report.refusals[("describe", f"a shard {silent[0]}")] += 1

    def create_snapshot(self, twin: NamespaceTwin) -> None:
        """Once, not retried (it writes files, not rows); the rows it took must be the model's. During a
        reshard it must be refused, FAILED_PRECONDITION naming the reshard (docs/OPERATIONS.md)."""
        from monim.protos.errors import MemoryStoreError

        self.snapshots += 1
        location = f"client-{self.plan.index}-{self.snapshots}"
        client = self.clients[self.current]
        try:
            info = client.create_snapshot(location, twin.spec.name)
        except MemoryStoreError as error:
            if status_code(error) == "FAILED_PRECONDITION" and "reshard" in getattr(error, "message", ""):
                self.report.refusals[("create_snapshot", "FAILED_PRECONDITION")] += 1  # documented: waits for it
                return
            self.report.errors[("create_snapshot", status_code(error))] += 1
            if status_code(error) not in RETRIED_CODES:
                self.unexpected("create_snapshot", error)
            return
        self.report.calls["create_snapshot"] += 1
        if info["rows"].get(twin.spec.name) != twin.rows():
            self.wrong([f"create_snapshot {location}: {info['rows']} rows, the model has {twin.rows()}"])

    # ----- the loop ----------------------------------------------------------------------------------
    def step(self) -> None:
        from monim.protos.errors import MemoryStoreError

        usable = [t for t in self.twins if t.spec.name not in self.report.in_doubt]
        if not usable:
            time.sleep(0.5)
            return
        twin = usable[int(self.rng.integers(len(usable)))]
        kind = str(self.rng.choice(list(MIX), p=np.array(list(MIX.values())) / sum(MIX.values())))
        if twin.rows() > self.plan.max_rows:
            kind = "delete"
        try:
            if kind == "delete" and twin.rows() > self.plan.max_rows:
                self.delete(twin, rows=64)
            else:
                getattr(self, kind)(twin)
        except Unresolved as error:
            self.report.unresolved.append(f"client {self.plan.index}, {twin.spec.name}: {error}")
            self.log.error("UNRESOLVED: %s", error)
            if kind in ("add", "delete", "apply_gradients", "retrieve"):
                self.report.in_doubt.append(twin.spec.name)  # a write may or may not have landed
        except Abandoned:
            pass
        except MemoryStoreError as error:
            self.unexpected(kind, error)

    def run(self, ready) -> ClientReport:
        self.create()
        ready()
        while not self.stop.is_set() and time.time() < self.plan.end_by:
            if os.getppid() == 1:
                raise RuntimeError("the driver is gone")
            self.step()
        for twin in self.twins:
            if twin.spec.name not in self.report.in_doubt:
                self.report.expected[twin.spec.name] = twin.expected()
        return self.report


def client_main(plan: ClientPlan, stop, messages) -> None:
    """The process's entry point (multiprocessing, spawn): ("ready", index) once its namespaces are
    filled, then ("report", ClientReport) when it stops (crash: the traceback, if it failed)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the model is small; leave the cores to the service
    logging.basicConfig(filename=plan.log_path, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger(f"client-{plan.index}")
    client = None
    try:
        client = Client(plan, stop, log)
        report = client.run(lambda: messages.put(("ready", plan.index)))
    except BaseException:  # noqa: BLE001 - reported to the driver, which fails the run
        log.exception("client %d failed", plan.index)
        report = client.report if client is not None else ClientReport(plan.index)
        report.crash = traceback.format_exc()
    messages.put(("report", report))
