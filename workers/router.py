"""Router: one front end's view of the deployment; scatters requests to shards and gathers.

Placement: entry ``id`` lives on shard ``id % num_shards``. Ids come from the
registry in blocks, so an Add's rows spread evenly over the shards.
The router validates a whole request against the namespace's config before
any shard sees it, so a bad request changes nothing anywhere.

What a caller can rely on (docs/API.md says it per status code):
- Every request names the namespace's generation; shards refuse another
  incarnation's requests, so a stale config cache (this front end's, after
  another one re-created the namespace) is re-read and the call retried, and
  an old RetrieveResult is refused (FAILED_PRECONDITION), never applied to new rows.
- Writes carry a request id that every shard applies at most once, so a
  write that failed part-way (UNAVAILABLE, DEADLINE_EXCEEDED) is retried as a
  whole with the same id and lands exactly once.
- Optimizer steps are two-phase: every shard checks its rows and stages the
  gradients; only when all have, the step is committed. A step that fails
  before the commit (NOT_FOUND: a row was deleted since the forward) changes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import logging
import secrets
import threading
import time

import numpy as np
import torch
from monim.datastore import admission, memory_ops
from monim.datastore.transfer import to_device, to_host_all, to_host_later
from monim.protos import validation
from monim.protos.config import NamespaceConfig, validate_namespace_name
from monim.protos.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    IdsNotFound,
    InvalidArgument,
    MemoryStoreError,
    NamespaceChanged,
    NamespaceNotFound,
    ShardUnavailable,
    StepAnswerLost,
    Unavailable,
)
from monim.protos.results import MISSING_ID, RETRIEVED, AddResult, RetrieveResult, Rows, SearchResult
from monim.workers.forwards import ForwardStates
from monim.workers.merge import merge_topk
from monim.workers.placement import Placement, PlacementChanged

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
# A Retrieve whose rows are deleted between its search and its value sum searches again, this often.
RETRIEVE_ATTEMPTS = 3
# A Retrieve whose neighbours' value rows take at most this many bytes (B * k * value_dim * 4) reads
# them with the search, in one round to the shards (a decoding step: B=1, k=32 is 96 KiB); a larger
# one sums alpha_i v_i on the shards, in a second round (B=4096, k=1024 would move 12 GiB).
ONE_ROUND_VALUE_BYTES = 8 << 20
# DescribeNamespace waits for the shards until its deadline less DESCRIBE_MARGIN_S (at least
# DESCRIBE_WAIT_S where the deadline allows), then names those that did not answer as recovering.
DESCRIBE_WAIT_S = 2.0
DESCRIBE_MARGIN_S = 0.5
# A call refused for a placement change (a reshard's batch) waits this long, doubling up to the max,
# before it reads the placement again and sends what was refused.
PLACEMENT_WAIT_S, PLACEMENT_WAIT_MAX_S = 0.005, 0.2
# After waiting this long, the call pushes the registry's placement to the shards itself (_catch_up).
PLACEMENT_CATCH_UP_S = 1.0
# The absolute time.monotonic() by which the current call must answer (the gRPC deadline).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("monim_deadline", default=None)


def _joined_shares(pending: list) -> list:
    """Refused shares of the same part as one (their positions together, in order)."""
    joined: dict = {}
    for method, ids, make_args, positions in pending:
        key = id(make_args)
        if key in joined:
            joined[key][3] = np.concatenate([joined[key][3], positions])
        else:
            joined[key] = [method, ids, make_args, positions]
    return [(method, ids, make_args, np.sort(positions)) for method, ids, make_args, positions in joined.values()]


def _rows(array: np.ndarray | None, positions: np.ndarray) -> np.ndarray | None:
    """array[positions] for increasing positions: a view when they are one run (every row of a batch
    for one shard, or one shard's run of new ids), else a copy. A 65,536 x 768 Add with values is
    400 MB: each copy saved is tens of milliseconds of the front end's time."""
    if array is None:
        return None
    if positions.size and positions[-1] - positions[0] + 1 == positions.size:
        return array[positions[0]:positions[-1] + 1]
    return array[positions]


def _reread_config_if_recreated(method):
    """This front end's cached config may be of a dropped incarnation (another front end dropped
    and re-created the namespace). Shards then refuse the call (NamespaceChanged) before changing
    anything, or the request fails validation against the old config (InvalidArgument): if the
    registry now has another generation, the call runs once more with it. A caller that named a
    generation gets the refusal."""

    @functools.wraps(method)
    def wrapper(self, namespace, *args, **kwargs):
        cached = self._configs.get(namespace)
        try:
            return method(self, namespace, *args, **kwargs)
        except (NamespaceChanged, InvalidArgument):
            if kwargs.get("generation") or cached is None:
                raise
            self._configs.pop(namespace, None)
            if self.config(namespace).generation == cached.generation:
                raise
            return method(self, namespace, *args, **kwargs)

    return wrapper


class Router:
    """runtime: a RayRuntime or LocalRuntime (see workers/runtime.py)."""

    def __init__(self, runtime, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.runtime = runtime
        self._placement_lock = threading.RLock()  # threads that read the registry at different moments
        self.placement = Placement.from_dict(runtime.call_registry("get_placement"))
        self._ensure_shards(self.placement)
        self.timeout_s = timeout_s
        self._configs: dict[str, NamespaceConfig] = {}
        self.forwards = ForwardStates()  # Retrieve states kept for their backward (workers/forwards.py)
        self.snapshots = None  # workers/snapshots.py Snapshots, where the front end has a snapshot root

    @staticmethod
    @contextlib.contextmanager
    def deadline(seconds: float | None):
        """Shard calls made inside answer within ``seconds`` (None: the router's timeout)."""
        token = _deadline.set(None if seconds is None else time.monotonic() + seconds)
        try:
            yield
        finally:
            _deadline.reset(token)

    def _timeout(self) -> float:
        deadline = _deadline.get()
        if deadline is None:
            return self.timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the call's deadline passed before the shards were asked")
        return min(self.timeout_s, left)

    @property
    def num_shards(self) -> int:
        """Shard actors the placement uses (during a reshard: the source's and the target's)."""
        return self.placement.actors

    def _ensure_shards(self, placement: Placement) -> None:
        """The runtime has a handle for every shard the placement uses (a reshard adds and removes them)."""
        if self.runtime.num_shards < placement.actors:
            self.runtime.ensure_shards(placement.actors)
        elif self.runtime.num_shards > placement.actors and hasattr(self.runtime, "forget_shards"):
            self.runtime.forget_shards(placement.actors)

    def adopt_placement(self, placement: Placement) -> Placement:
        """Takes placement, unless this router has a newer one: threads (and the reshard driver) read the
        registry at different moments, and one that read it before a shrink finished must neither bring
        the older placement back nor start the shards the shrink retired again. The runtime then has a
        handle for every shard of the placement the router has, which is returned."""
        with self._placement_lock:
            if placement.version >= self.placement.version:
                self.placement = placement
            current = self.placement
            self._ensure_shards(current)
        return current

    def refresh_placement(self) -> Placement:
        """Reads the placement from the registry (a shard refused a call routed with ours); adopt_placement."""
        return self.adopt_placement(Placement.from_dict(self.runtime.call_registry("get_placement")))

    def _wait_for_placement(self, waited: float) -> float:
        """After a PlacementChanged: a short sleep (the reshard driver is pushing the placement to the
        shards, or copying the batch the call touches), then the registry's placement. DEADLINE_EXCEEDED
        if the call's deadline (or the router's timeout) passes first."""
        wait = min(PLACEMENT_WAIT_MAX_S, max(PLACEMENT_WAIT_S, waited))
        if wait >= self._timeout():
            raise DeadlineExceeded("rows this call needs are being moved by a reshard, and the call's deadline "
                                   "passed while it waited")
        time.sleep(wait)
        placement = self.refresh_placement()
        if waited >= PLACEMENT_CATCH_UP_S:
            self._catch_up(placement)
        return waited + wait

    def _catch_up(self, placement: Placement) -> None:
        """A shard still refuses after PLACEMENT_CATCH_UP_S: the reshard's driver may have stopped between
        a step in the registry and its push to the shards. The registry's placement is pushed to every
        shard (a shard ignores one older than its own; a step pushed twice is the same step), and a batch
        frozen by a driver that stopped reporting is thawed first (registry.thaw_batch)."""
        move = placement.move
        if move is not None and move.frozen_end > move.cursor:
            placement = self.adopt_placement(Placement.from_dict(self.runtime.call_registry("thaw_batch", time.time())))
        self.push_placement(placement)

    def push_placement(self, placement: Placement) -> None:
        """Every shard of the placement takes it. During a grow the source's shards first, then the new
        ones (which take no write before: Shard._check_owned)."""
        move = placement.move
        first = move.source if move is not None and move.target > move.source else placement.actors
        for shards in (range(0, first), range(first, placement.actors)):
            if shards:
                self._call([(shard, "set_placement", (placement.to_dict(),)) for shard in shards])

    def _round(self, make_calls, on_retry=None, within_s=None) -> list:
        """One round of calls that must all be answered at one placement: make_calls(placement) ->
        [(shard, method, args)], each run on the shard only if it is at that placement's version
        (Shard.placed). Sent again, whole, after a placement change (on_retry() first).
        within_s: see _call; each call's result or error, a late one DeadlineExceeded (a call that
        met the placement change or a retired shard still sends the round again)."""
        waited = 0.0
        while True:
            placement = self.placement
            calls = [(shard, "placed", (placement.version, method, *args))
                     for shard, method, args in make_calls(placement)]
            try:
                if within_s is None:
                    return self._call(calls)
                outcomes = self._call(calls, within_s=within_s)
                moved = [o for o in outcomes if isinstance(o, PlacementChanged)
                         or (isinstance(o, ShardUnavailable) and self._retired(o.shard))]
                if moved:
                    raise moved[0]
                return outcomes
            except (PlacementChanged, ShardUnavailable) as error:
                if isinstance(error, ShardUnavailable) and not self._retired(error.shard):
                    raise
                if on_retry is not None:
                    on_retry()
                waited = self._wait_for_placement(waited)

    def _retired(self, shard: int) -> bool:
        """The shard was removed by a shrink (the call was routed with the placement before it)."""
        return shard >= self.refresh_placement().actors

    def _all_shards(self, method: str, *args) -> list:
        return self._round(lambda placement: [(s, method, args) for s in range(placement.actors)])

    def _routed_writes(self, namespace: str, parts) -> list:
        """Writes of rows by id: parts = [(method, ids int64 [N], args(positions) -> tuple)]; each part's
        ids go to their owners. A shard that refuses its share (PlacementChanged: a reshard moved or is
        copying those rows) applied none of it; only that share is routed again and sent, so a write
        lands once (the refused shares of a part go together, one call per owner; a shard that applied
        another share of the request before applies the rows it has not: Shard._not_applied). A share
        sent to a shard a shrink retired (its actor gone: this front end routed with the placement
        before) is routed again the same way, while the other shares' answers count: sent again, a
        share a shard applied would answer only the rows it had not. Returns the shards' results."""
        pending = [(method, ids, make_args, np.arange(ids.shape[0])) for method, ids, make_args in parts]
        results, waited = [], 0.0
        while pending:
            calls, shares = [], []
            for method, ids, make_args, positions in _joined_shares(pending):
                for shard, sub in self._route_ids(ids[positions], namespace):
                    calls.append((shard, method, make_args(positions[sub])))
                    shares.append((method, ids, make_args, positions[sub]))
            try:
                outcomes = self._call(calls, each=True)
            except ShardUnavailable as error:  # past the runtime's list of shards: nothing was sent
                if not self._retired(error.shard):
                    raise
                waited = self._wait_for_placement(waited)
                continue
            retired = {shard for shard in {o.shard for o in outcomes if isinstance(o, ShardUnavailable)}
                       if self._retired(shard)}
            refused = [isinstance(o, PlacementChanged) or (isinstance(o, ShardUnavailable) and o.shard in retired)
                       for o in outcomes]
            errors = [o for o, again in zip(outcomes, refused) if isinstance(o, Exception) and not again]
            if errors:
                raise errors[0]
            results += [o for o, again in zip(outcomes, refused) if not again]
            pending = [share for share, again in zip(shares, refused) if again]
            if pending:
                waited = self._wait_for_placement(waited)
        return results

    def _call(self, calls, each: bool = False, within_s=None) -> list:
        """Scatter/gather; a namespace another front end dropped leaves this one's cache too.
        each: a list with each call's result or error (a deadline still raises), instead of raising
        the first error. within_s(left) -> seconds (left: the call's time): each shard is waited for
        that long and a late one is a DeadlineExceeded in its place (implies each)."""
        try:
            if within_s is not None:
                outcomes = self.runtime.call_shards(calls, within_s(self._timeout()), partial=True)
            elif each:
                outcomes = self.runtime.call_shards(calls, self._timeout(), each=True)
            else:
                return self.runtime.call_shards(calls, self._timeout())
            for outcome in outcomes:
                if isinstance(outcome, (NamespaceNotFound, NamespaceChanged)):
                    raise outcome
            return outcomes
        except (NamespaceNotFound, NamespaceChanged) as error:
            self._configs.pop(error.namespace, None)
            raise

    def _undo(self, method: str, *args) -> None:
        """Best effort after a failure (the original error is what the caller gets)."""
        try:
            self._all_shards(method, *args)
        except Exception:  # noqa: BLE001 - logged; staged state also expires on the shards
            log.warning("could not %s on every shard", method, exc_info=True)

    def config(self, namespace: str, generation: int = 0) -> NamespaceConfig:
        """The namespace's config, from this front end's cache or the registry. With a generation,
        FAILED_PRECONDITION if the namespace is now another incarnation."""
        validate_namespace_name(namespace)
        config = self._configs.get(namespace)
        if config is None or (generation and config.generation != generation):
            config = self._configs[namespace] = NamespaceConfig.from_dict(
                self.runtime.call_registry("config", namespace))
        if generation and config.generation != generation:
            raise NamespaceChanged(namespace, generation, config.generation)
        return config

    # ----- namespaces ----------------------------------------------------------
    def create_namespace(self, config: NamespaceConfig, request_id: str = "") -> NamespaceConfig:
        """Stages: register (ALREADY_EXISTS if taken; the registry picks a new generation); create on
        every shard. On failure, only this generation is undone: a shard that already holds the name
        (another incarnation, with its rows) is never touched."""
        request_id = validation.check_step_id(request_id)
        created = NamespaceConfig.from_dict(self.runtime.call_registry("create", config.to_dict(), request_id))
        try:
            self._all_shards("create_namespace", created.to_dict())
        except MemoryStoreError:
            self._undo("drop_namespace", created.name, created.generation)
            try:
                self.runtime.call_registry("drop", created.name, created.generation)
            except MemoryStoreError:
                log.warning("could not unregister %r after a failed create", created.name, exc_info=True)
            raise
        self._configs[created.name] = created
        return created

    def list_namespaces(self) -> list[NamespaceConfig]:
        return [NamespaceConfig.from_dict(c) for c in self.runtime.call_registry("list")]

    def describe_namespace(self, namespace: str) -> dict:
        """Config, rows, next id, and per shard its rows and state: "serving", or, for a shard that
        does not answer in time, "recovering" (a durable deployment, where Ray restarts it and it
        replays its log) or "unavailable", with 0 rows; the total counts the shards that answered.
        One round at one placement (asked again after a reshard's change), each shard given the
        call's time less DESCRIBE_MARGIN_S (at least DESCRIBE_WAIT_S where the deadline allows): a
        stuck shard is named while the others' rows count, within the call's deadline."""
        config = self.config(namespace)
        silent = "recovering" if getattr(self.runtime, "restarts", False) else "unavailable"
        answers = self._round(lambda placement: [(shard, "stats", (namespace, config.generation))
                                                 for shard in range(placement.actors)],
                              within_s=lambda left: max(min(DESCRIBE_WAIT_S, left), left - DESCRIBE_MARGIN_S))
        shards = []
        for shard, answer in enumerate(answers):
            if isinstance(answer, (Unavailable, DeadlineExceeded)):
                shards.append({"shard": shard, "rows": 0, "device": "", "backend": "", "state": silent})
            elif isinstance(answer, Exception):
                raise answer
            else:
                shards.append(dict(answer, state="serving"))
        return {
            "config": config,
            "rows": sum(s["rows"] for s in shards),
            "shards": shards,
            "next_id": self.runtime.call_registry("next_id", namespace),
        }

    def shard_metrics(self, shard: int, wait_s: float = DESCRIBE_WAIT_S) -> dict:
        """Shard.metrics() of one shard with its "state": "serving" ("failed" once its log could not be
        made durable: it refuses writes until it restarts), or, when it does not answer within wait_s,
        "recovering" or "unavailable" as in describe_namespace. For health and metrics (workers/frontend.py)."""
        try:
            found = self.runtime.call_shards([(shard, "metrics", ())], wait_s)[0]
        except (Unavailable, DeadlineExceeded):
            state = "recovering" if getattr(self.runtime, "restarts", False) else "unavailable"
            return {"shard": shard, "state": state}
        return dict(found, state="failed" if found.get("wal_failed") else "serving")

    def drop_namespace(self, namespace: str) -> int:
        """Stages: unregister (NOT_FOUND if absent); drop that generation on every shard; returns rows dropped."""
        validate_namespace_name(namespace)
        dropped = NamespaceConfig.from_dict(self.runtime.call_registry("drop", namespace))
        self._configs.pop(namespace, None)
        return sum(self._all_shards("drop_namespace", namespace, dropped.generation))

    # ----- data ------------------------------------------------------------------
    @_reread_config_if_recreated
    def add(self, namespace: str, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None,
            weights: np.ndarray | None = None, source: str = "", logp: np.ndarray | None = None,
            admit_below: float = admission.DEFAULT_ADMIT_BELOW, merge_eps: float = 0.0, *, request_id: str = "",
            generation: int = 0) -> AddResult:
        """Stages: validate the batch; keep the admitted rows (logp < admit_below); with merge_eps,
        search all shards for same-token near-duplicates; the registry records the plan under the
        request id (which rows merge where, and an id block for the rest: a retry gets the same
        plan); one round to the shards grows the merged entries' weights and adds the new rows
        (routed by id % S), each shard applying the request id once.
        Returns AddResult (ids int64 [N] in row order, -1 where not admitted)."""
        config = self.config(namespace, generation)
        keys = validation.check_vectors(keys, config.dim, "keys")
        n = keys.shape[0]
        tokens = validation.check_tokens(tokens, n)
        if values is not None:
            values = validation.check_values(values, n, config.value_dim)
        if weights is not None:
            weights = validation.check_weights(weights, n)
        source = validation.check_source(source)
        logp, admit_below, merge_eps = validation.check_admission(logp, admit_below, merge_eps, n)
        # On the registry and the shards a request id is scoped to this incarnation of the namespace:
        # the same id sent to another namespace is another request.
        caller_id = validation.check_step_id(request_id) or validation.new_request_id()
        request_id = self._step_key(config, caller_id)
        admitted = np.ones(n, bool) if logp is None else admission.admitted_mask(logp, admit_below)
        ids = np.full(n, MISSING_ID, np.int64)
        merged = np.zeros(n, bool)
        chosen = np.flatnonzero(admitted)
        if chosen.size:
            targets = np.full(chosen.size, MISSING_ID, np.int64)
            if merge_eps > 0:
                neighbours = self._search(config, keys[chosen], min(admission.MERGE_CANDIDATES, config.max_k))
                targets = admission.merge_targets(neighbours, tokens[chosen], merge_eps)
            targets, start, planned_at = self.runtime.call_registry("plan_add", namespace, config.generation,
                                                                    request_id, targets)
            if self.placement.version < planned_at:  # its ids may be past a move's mark (registry.plan_add)
                self.refresh_placement()
            if targets.size != chosen.size:  # the registry answered the plan of an earlier Add with this id
                raise InvalidArgument(f"request id {caller_id!r} is that of an Add of {targets.size} admitted rows; "
                                      f"this one has {chosen.size} (a retry must send the same batch)")
            new = chosen[targets < 0]
            new_ids = np.arange(start, start + new.size, dtype=np.int64)
            new_keys, new_tokens, new_values, new_weights = (_rows(a, new) for a in (keys, tokens, values, weights))
            parts = [("add", new_ids, lambda p: (namespace, config.generation, request_id, _rows(new_ids, p),
                                                 _rows(new_keys, p), _rows(new_tokens, p), _rows(new_values, p),
                                                 _rows(new_weights, p), source))]
            if (targets >= 0).any():
                target_ids, counts = admission.weight_increments(targets)
                parts.append(("increment_weights", target_ids,
                              lambda p: (namespace, config.generation, request_id, target_ids[p], counts[p])))
            adds = [(shard, "check_room", (namespace, config.generation, request_id, int(positions.size)))
                    for shard, positions in self._route_ids(new_ids, namespace)]
            if len(adds) > 1:  # a shard without room refuses before any other takes its part
                self._call(adds)
            self._routed_writes(namespace, parts)
            merged[chosen[targets >= 0]] = True
            ids[chosen[targets >= 0]] = targets[targets >= 0]
            ids[new] = new_ids
        return AddResult(ids=ids, admitted=admitted, merged=merged, generation=config.generation)

    @_reread_config_if_recreated
    def search(self, namespace: str, queries: np.ndarray, k: int, return_keys: bool = False,
               return_values: bool = False, return_weights: bool = False, *, generation: int = 0,
               nprobe: int = 0, rerank: int = 0, ef: int = 0) -> SearchResult:
        """Stages: validate; send the queries to every shard at once; merge the per-shard top-k.
        nprobe, rerank: ivf namespaces only; ef: hnsw namespaces only (validation.check_search_options);
        each shard answers exactly until its index is built (docs/INDEXES.md)."""
        return self._search(self.config(namespace, generation), queries, k, return_keys, return_values,
                            return_weights, nprobe, rerank, ef)

    def _search(self, config: NamespaceConfig, queries, k, return_keys=False, return_values=False,
                return_weights=False, nprobe=0, rerank=0, ef=0, keep_rows: str = "") -> SearchResult:
        if validation.is_tensor(queries):  # the device path (MemoryClient.search's as_tensors), as retrieve's
            if queries.device.type == "cpu" or not self.placement.alone:
                return self._search_on_host(config, queries, k, return_keys, return_values, return_weights, nprobe,
                                            rerank, ef)
            return self._search_on_device(config, queries, k, return_keys, return_values, return_weights, nprobe,
                                          rerank, ef)
        queries = validation.check_vectors(queries, config.dim, "queries")
        k = validation.check_k(k, config.max_k)
        nprobe, rerank, ef = validation.check_search_options(config.index, config.nlist, k, nprobe, rerank, ef)
        if return_values and not config.value_dim:
            raise InvalidArgument("values were asked for but the namespace has value_dim 0")
        results = self._all_shards("search", config.name, config.generation, queries, k, return_keys,
                                   return_values, return_weights, nprobe, rerank, ef, keep_rows)
        merged = merge_topk(results, k)
        merged.generation = config.generation
        return merged

    def _search_on_device(self, config, queries, k, return_keys, return_values, return_weights, nprobe, rerank,
                          ef) -> SearchResult:
        """A tensor's search at the lone shard, on its device (the store checks the queries there)."""
        k = validation.check_k(k, config.max_k)
        nprobe, rerank, ef = validation.check_search_options(config.index, config.nlist, k, nprobe, rerank, ef)
        if return_values and not config.value_dim:
            raise InvalidArgument("values were asked for but the namespace has value_dim 0")
        results = self._all_shards("search", config.name, config.generation, queries, k, return_keys, return_values,
                                   return_weights, nprobe, rerank, ef, "")
        if len(results) != 1:  # a reshard began meanwhile: the host's way
            return self._search_on_host(config, queries, k, return_keys, return_values, return_weights, nprobe,
                                        rerank, ef)
        results[0].generation = config.generation
        return results[0]

    def _search_on_host(self, config, queries, *options) -> SearchResult:
        """A tensor's search by the host's way (as _retrieve_on_host), its answer as tensors on its device."""
        return self._search(config, queries.detach().cpu().numpy(), *options).to_tensors(queries.device)

    # ----- learnable memory ----------------------------------------------------------
    @_reread_config_if_recreated
    def retrieve(self, namespace: str, queries: np.ndarray, k: int, temperature: float = 1.0, *,
                 generation: int = 0, keep_state: bool = False, nprobe: int = 0, rerank: int = 0,
                 ef: int = 0, memory_only: bool = False) -> RetrieveResult:
        """The MoNIM forward, exact across shards. Stages: validate; every shard searches its top-k
        (ids, distances, weights); merge to the global top-k; alpha = softmax(-d/T + log w) here;
        then m = sum alpha_i v_i: from the value rows the search brought along (one round, when they
        take at most ONE_ROUND_VALUE_BYTES), else every shard sums alpha_i v_i over its own ids and
        the partial sums are added. If a row went between those two rounds (a shard answers
        NOT_FOUND), the forward starts again: m is never a sum with a neighbour silently missing.
        On one shard (no reshard under way), a batch past ONE_ROUND_VALUE_BYTES runs the whole forward
        there in one call, on the shard's device (NeighborStore.forward), and with keep_state its rows,
        alpha and distances stay there for the backward (NeighborStore.kept_rows).
        keep_state: the queries, ids, alpha, distances and temperature stay here under
        result.handle, for a backward that sends only grad_memory.
        nprobe, rerank, ef: as in search (an ivf or hnsw namespace's search; its distances enter alpha).
        queries a torch tensor (the in-process store's device path: MemoryClient.retrieve's as_tensors):
        the result's arrays are tensors on the shard's device; with one shard nothing goes through the
        host (the forward runs there whole, and its state for a backward stays there).
        A batch of numpy queries past ONE_ROUND_VALUE_BYTES whose lone shard is in this process on a GPU
        (the in-process store; a shard's read endpoint) takes that device path too (_retrieve_here).
        memory_only: the result carries memory (and its handle) only; ids, alpha, distances, tokens and
        weights are None (a MoNIM layer's step needs no more: the backward goes by the handle)."""
        config = self.config(namespace, generation)
        validation.check_value_namespace(config.value_dim, "Retrieve")
        temperature = validation.check_temperature(temperature)
        on_device = validation.is_tensor(queries)  # (its queries checked where they go: the store, on its device)
        options = dict(keep_state=keep_state, nprobe=nprobe, rerank=rerank, ef=ef, memory_only=memory_only)
        if on_device and (queries.device.type == "cpu" or not self.placement.alone):
            return self._retrieve_on_host(namespace, config, queries, k, temperature, **options)
        if not on_device:
            queries = validation.check_vectors(queries, config.dim, "queries")
        validation.check_search_options(config.index, config.nlist, validation.check_k(k, config.max_k), nprobe,
                                        rerank, ef)
        one_round = not on_device and queries.shape[0] * k * config.value_dim * 4 <= ONE_ROUND_VALUE_BYTES
        device = None if on_device or one_round else self._lone_shard_device()
        if device is not None:
            return self._retrieve_here(namespace, config, queries, k, temperature, device, **options)
        for _ in range(RETRIEVE_ATTEMPTS):
            # One shard's answer is the whole answer: a training batch's forward runs there whole, on its
            # device, and for a backward its rows (alpha, distances) stay there under a name (kept_rows).
            alone = self.placement.alone
            kept_rows = secrets.token_hex(8) if alone and keep_state else ""
            if alone and (on_device or not one_round):
                answers = self._all_shards("forward", namespace, config.generation, queries, k, temperature, kept_rows,
                                           nprobe, rerank, ef)
                if len(answers) == 1:  # (else a reshard began meanwhile: the general way below)
                    found, alpha, memory = answers[0]
                    found.generation = config.generation
                    return self._retrieved(namespace, config, queries, found, alpha, memory, temperature,
                                           keep_state, kept_rows, memory_only)
            if on_device:  # a reshard began meanwhile
                return self._retrieve_on_host(namespace, config, queries, k, temperature, **options)
            found = self._search(config, queries, k, return_values=one_round, return_weights=True, nprobe=nprobe,
                                 rerank=rerank, ef=ef, keep_rows=kept_rows)
            alpha = memory_ops.attention(found.distances, found.weights, found.ids, temperature)
            if one_round:  # the values came with the neighbours, from the same hold of each shard's lock
                memory = memory_ops.weighted_rows(alpha, found.values)
                found.values = None
            else:
                try:
                    memory = sum(self._round(functools.partial(self._value_sum_calls, namespace, config.generation,
                                                               found.ids, alpha, kept_rows)))
                except IdsNotFound:
                    continue
            return self._retrieved(namespace, config, queries, found, alpha, memory, temperature, keep_state,
                                   kept_rows, memory_only)
        raise Aborted(f"rows of namespace {namespace!r} were deleted during each of {RETRIEVE_ATTEMPTS} "
                      "attempts of this Retrieve; retry it")

    def _retrieve_on_host(self, namespace, config, queries, k, temperature, **options):
        """retrieve of a tensor by the host's way, its answer then as tensors on the tensor's device: a tensor
        on the host is a numpy array already (and there the host's way is the faster at small batches); on
        several shards the answers meet on the host anyway."""
        result = self.retrieve(namespace, queries.detach().cpu().numpy(), k, temperature, generation=config.generation,
                               **options)
        return result.to_tensors(queries.device, queries)

    def _lone_shard_device(self) -> torch.device | None:
        """The GPU of the namespace's one shard where this process holds it (runtime.local_device), else None."""
        if not self.placement.alone:
            return None
        device = self.runtime.local_device(0)
        return device if device is not None and device.type == "cuda" else None

    def _retrieve_here(self, namespace, config, queries, k, temperature, device, **options):
        """retrieve of a numpy batch at this process's lone GPU shard by the device path: the queries go
        to the GPU once, and with keep_state the forward's state stays there (a backward by its handle
        then moves only grad_memory in and dL/dq out); what the caller gets back (the memory, and the
        neighbours unless memory_only) is copied to the host."""
        result = self.retrieve(namespace, to_device(queries, device), k, temperature, generation=config.generation,
                               **options)
        return dataclasses.replace(result, **to_host_all({name: getattr(result, name) for name in RETRIEVED}),
                                   queries=queries)

    def _retrieved(self, namespace, config, queries, found, alpha, memory, temperature, keep_state, kept_rows,
                   memory_only=False):
        handle = self.forwards.keep(namespace, config.generation, queries, found.ids, alpha, found.distances,
                                    temperature, kept_rows) if keep_state else ""
        neighbours = {} if memory_only else dict(ids=found.ids, alpha=alpha, distances=found.distances,
                                                  tokens=found.tokens, weights=found.weights)
        return RetrieveResult(memory=memory, **neighbours, queries=queries, temperature=temperature,
                              generation=config.generation, handle=handle)

    @staticmethod
    def _value_sum_calls(namespace, generation, ids, alpha, kept_rows, placement) -> list:
        """Every shard sums over the ids it holds (the others masked to -1)."""
        kept = (kept_rows, 0) if kept_rows else None  # used by a shard only while alone (Shard._kept)
        return [(shard, "value_sum", (namespace, generation, placement.mask(namespace, ids, shard), alpha, kept))
                for shard in range(placement.actors)]

    @_reread_config_if_recreated
    def retrieve_backward(self, namespace: str, queries, ids, alpha, distances, grad_memory, temperature: float, *,
                          generation: int = 0, step_id: str = "", part: int = 0, defer_step: bool = False,
                          handle: str = "", row_offset: int = 0) -> tuple[np.ndarray, float]:
        """The MoNIM backward. Stages: validate; every shard checks that its rows of ids are still
        stored and computes its partial sums (NOT_FOUND from any: nothing is stepped anywhere); then
        the value gradients are committed as one optimizer step (with defer_step, they wait under
        step_id for commit_step: a step sent in parts); add the partials and finish dL/dq and dL/dT.
        A deferred part that a shard refuses (NOT_FOUND, FAILED_PRECONDITION) drops the whole step on
        every shard, so that its commit steps nothing anywhere (ABORTED) rather than the shards that
        had taken the part; after UNAVAILABLE or DEADLINE_EXCEEDED the parts stay, for a retry of the part.
        generation: the forward's (0: the current incarnation).
        handle: a kept forward (retrieve's keep_state): queries, ids, alpha, distances, temperature
        and generation come from it (pass None for them), and grad_memory is its rows
        [row_offset, row_offset + B); FAILED_PRECONDITION if the handle is unknown or expired. A step
        (not deferred) of its whole batch releases the state and keeps its answer for a repeat of the
        same step id (workers/forwards.py).
        Returns (grad_queries float32 [B, dim], grad_temperature).
        grad_memory a torch tensor (the in-process store's device path): grad_queries is one too, on the
        shard's device; a forward kept there (its queries a tensor) is finished there, nothing through the host."""
        device = grad_memory.device if validation.is_tensor(grad_memory) else None
        whole = False  # a step of a kept forward's whole batch: its state goes after it, its answer is kept
        if handle:  # the forward's state is this router's own, checked when it was made: only grad_memory is new
            done = None if defer_step else self.forwards.answered(handle, step_id, namespace)
            if done is not None:  # the same step again (its answer was lost on the way): stepped once already
                return done
            queries, ids, alpha, distances, temperature, generation, kept_rows = self._kept_forward(
                namespace, handle, row_offset, grad_memory, queries, ids, alpha, distances)
            whole = not defer_step and row_offset == 0 and self.forwards.batch_of(handle) == queries.shape[0]
            config = self.config(namespace, generation)
            grad_memory = validation.check_grad_memory(config, grad_memory, queries.shape[0])
            if validation.is_tensor(queries) != (device is not None):  # one side on a device: both on the state's
                grad_memory = grad_memory.cpu().numpy() if device is not None else to_device(grad_memory,
                                                                                              queries.device)
        else:
            if device is not None:  # the arrays of a forward that kept no state: checked and used on the host
                queries, ids, alpha, distances, grad_memory = (
                    array.cpu().numpy() if validation.is_tensor(array) else array
                    for array in (queries, ids, alpha, distances, grad_memory))
            config = self.config(namespace, generation)
            queries, ids, alpha, distances, grad_memory, temperature = validation.check_backward_request(
                config, queries, ids, alpha, distances, grad_memory, temperature)
            kept_rows = ""
        step = self._step_key(config, validation.check_step_id(step_id) or validation.new_request_id())
        # A lone shard finishes the backward on its device (finish): the round's one answer is then
        # (grad_queries, grad_temperature), else each shard's partial sums.
        try:
            answers = self._round(
                lambda placement: [(shard, "backward_part", (namespace, config.generation, step, part, queries,
                                                             placement.mask(namespace, ids, shard), alpha, distances,
                                                             grad_memory,
                                                             (kept_rows, row_offset) if kept_rows else None,
                                                             (config.metric, temperature) if placement.alone else None))
                                   for shard in range(placement.actors)],
                on_retry=self._moved_during_step(config, step, defer_step))
        except StepAnswerLost:
            # The step was committed on a shard that no longer has its first answer: finish it on any shard
            # that lost its parts before committing them (they were staged again by this round), then say so.
            if not defer_step:
                self._commit(config, step)
            raise
        except MemoryStoreError as error:
            if not defer_step or not isinstance(error, (Unavailable, DeadlineExceeded)):
                self._undo("abort_step", namespace, config.generation, step)
            raise
        if not isinstance(answers[0], memory_ops.BackwardPartials):
            grad_queries, grad_temperature = answers[0]
        else:
            grad_queries, grad_temperature = memory_ops.combine_backward(sum(answers[1:], answers[0]), queries,
                                                                         config.metric, temperature)
        # A lone GPU shard's dL/dq (12.6 MB at B=4096) goes to the host on a side stream while the step is
        # committed: the optimizer's kernels run beside the copy, not before it; and the commit is queued behind
        # the backward's sums before anything waits for them (grad_temperature below), so that the device is
        # not idle while the host stages and commits the step.
        copied = to_host_later({"grad_queries": grad_queries}) if device is None and torch.is_tensor(grad_queries) \
            else None
        if not defer_step:
            self._commit(config, step)
        grad_temperature = float(grad_temperature)  # (a lone GPU shard's is a tensor, read once the commit is queued)
        if device is not None:
            answer = torch.as_tensor(grad_queries).to(device), grad_temperature
        else:
            answer = copied()["grad_queries"] if copied is not None else grad_queries, grad_temperature
        if whole:
            # Its state goes now, not when the table needs room (a device path's holds the GPU's memory: a B=4096,
            # k=1024 forward's 80 MB); the answer stays for a repeat of the step (a retry after a lost answer).
            self.forwards.release(handle, step_id, answer)
        return answer

    def _kept_forward(self, namespace, handle, row_offset, grad_memory, *sent):
        """(queries, ids, alpha, distances, temperature, generation, kept_rows) of rows [row_offset,
        row_offset + B) of the forward kept under handle, B being grad_memory's rows; kept_rows: the name of
        the search's rows kept at its one shard (NeighborStore.kept_rows), or ""."""
        if any(array is not None and np.asarray(array).size for array in sent):
            raise InvalidArgument("a backward that names a handle sends only grad_memory: the forward's queries, "
                                  "ids, alpha and distances come from the handle")
        state = self.forwards.get(validation.check_step_id(handle), namespace)
        rows = np.shape(grad_memory)[0] if np.ndim(grad_memory) >= 1 else 0
        if isinstance(row_offset, bool) or not isinstance(row_offset, (int, np.integer)) or row_offset < 0 \
                or row_offset + rows > state.ids.shape[0]:
            raise InvalidArgument(f"grad_memory rows [{row_offset}, {row_offset + rows}) are not rows of the "
                                  f"forward's batch of {state.ids.shape[0]}")
        part = slice(row_offset, row_offset + rows)
        return (state.queries[part], state.ids[part], state.alpha[part], state.distances[part], state.temperature,
                state.generation, state.rows_token)

    @staticmethod
    def _step_key(config: NamespaceConfig, step_id: str) -> str:
        """The name a step (a caller's step or request id) has on the shards: one per namespace
        incarnation, so that a step staged for one namespace is never committed or aborted by a
        request naming another (namespace names hold no ':')."""
        return f"{config.name}:{config.generation}:{step_id}"

    def _moved_during_step(self, config: NamespaceConfig, step: str, defer_step: bool):
        """What a step's staging round does when a reshard refuses it: a step sent whole is dropped on
        every shard and staged again under the new placement; a part of a deferred step cannot be (the
        parts staged before it were routed by the old one): the whole step is dropped, ABORTED."""
        def retry():
            self._undo("abort_step", config.name, config.generation, step)
            if defer_step:
                raise Aborted("a reshard moved rows of this step while its parts were being staged: nothing was "
                              "stepped; send the whole step again")
        return retry

    def _commit(self, config: NamespaceConfig, step: str, staged_on=None) -> int:
        """Commits the step (its _step_key) on every shard; staged_on: the shards that were sent parts
        (None: all), which answer ABORTED if their parts are gone (a restart), rather than stepping nothing.
        On several shards a first round (Shard.prepare_step) asks each whether it still holds the parts it
        was sent and keeps them from eviction: a shard that dropped some (idle while it needed room, or
        for 10 minutes) makes the step ABORTED on every shard before any steps. Its answers also say how
        many shards the parts were sent to: a grow's shards past that (the parts were all staged before
        the grow began) hold none and are not told to expect any."""
        try:
            sent_to = 0  # the shards of the placements the step's parts were routed with (0: not known)
            if self.placement.actors > 1:  # one shard's own commit checks its parts under its lock
                sent_to = max(self._round(lambda placement: [(shard, "prepare_step", (config.name, config.generation,
                                                                                      step))
                                                             for shard in range(placement.actors)]))
            return sum(self._round(lambda placement: [
                (shard, "commit_step", (config.name, config.generation, step,
                                        (staged_on is None or shard in staged_on) and (not sent_to or shard < sent_to)))
                for shard in range(placement.actors)]))
        except Aborted:
            # A shard lost its parts (a restart). If another had committed already, the step is not
            # "nothing": UNAVAILABLE, so that the caller retries the same step id, which stages the
            # lost parts again and commits them (the committed shards answer their first count).
            done = self._call([(shard, "step_committed", (step,)) for shard in range(self.num_shards)])
            if any(done):
                raise Unavailable(f"the step was committed on shard(s) {[s for s, d in enumerate(done) if d]} while "
                                  "another shard had lost its parts (a restart, or dropped before the commit); send it "
                                  "again with the same step id to finish it (rows already stepped are not stepped "
                                  "again)") from None
            self._undo("abort_step", config.name, config.generation, step)  # what the other shards hold goes
            raise

    @_reread_config_if_recreated
    def commit_step(self, namespace: str, step_id: str, *, generation: int = 0) -> int:
        """Applies the value gradients the parts of step_id staged, as one optimizer step; returns
        the rows updated. Committing again answers the same."""
        config = self.config(namespace, generation)
        if not validation.check_step_id(step_id):
            raise InvalidArgument("step_id is missing")
        return self._commit(config, self._step_key(config, step_id))

    @_reread_config_if_recreated
    def abort_step(self, namespace: str, step_id: str, *, generation: int = 0) -> None:
        """Drops what the parts of step_id staged (nothing is stepped)."""
        config = self.config(namespace, generation)
        if not validation.check_step_id(step_id):
            raise InvalidArgument("step_id is missing")
        self._all_shards("abort_step", namespace, config.generation, self._step_key(config, step_id))

    @_reread_config_if_recreated
    def apply_gradients(self, namespace: str, ids, grads, *, request_id: str = "", generation: int = 0,
                        step_id: str = "", part: int = 0, defer_step: bool = False) -> int:
        """One optimizer step with value gradients grads [N, value_dim] for ids [N]. Stages: validate;
        the owning shards check their ids are stored and stage the gradients (NOT_FOUND from any:
        nothing changes); commit. Returns the rows updated.
        defer_step: this is part ``part`` of the step ``step_id``, sent in parts: every shard stages
        its share (maybe none) and waits for commit_step (returns 0); a part that a shard refuses
        drops the whole step everywhere, as in retrieve_backward."""
        config = self.config(namespace, generation)
        ids, grads = validation.check_gradients(ids, grads, config.value_dim)
        step_id, request_id = validation.check_step_id(step_id), validation.check_step_id(request_id)
        if defer_step and not step_id:
            raise InvalidArgument("a deferred step (defer_step) needs its step_id")
        step = self._step_key(config, step_id if defer_step else request_id or validation.new_request_id())
        if (ids < 0).any():
            if defer_step:
                self._undo("abort_step", namespace, config.generation, step)
            raise IdsNotFound(namespace, ids[ids < 0])
        none = np.empty(0, np.int64)
        staged_on = []

        def calls(placement):
            routes = dict(self._route_ids(ids, namespace, placement))
            staged_on[:] = range(placement.actors) if defer_step else sorted(routes)
            # Each shard's part is checked before any commits (all or nothing across shards), unless one
            # shard takes the whole step (a deferred step's parts are staged on every shard): its
            # commit's own check is all or nothing (one pass less).
            check_step = len(staged_on) > 1
            return [(shard, "stage_gradients", (namespace, config.generation, step, part,
                                                _rows(ids, routes.get(shard, none)), _rows(grads, routes.get(shard, none)),
                                                check_step))
                    for shard in staged_on]

        try:
            self._round(calls, on_retry=self._moved_during_step(config, step, defer_step))
        except MemoryStoreError as error:
            if not defer_step or not isinstance(error, (Unavailable, DeadlineExceeded)):
                self._undo("abort_step", namespace, config.generation, step)
            raise
        if defer_step:
            return 0
        return self._commit(config, step, staged_on=list(staged_on))

    def _route_ids(self, ids: np.ndarray, namespace: str, placement: Placement | None = None):
        """Yields (shard, positions in ids) for the shards that own some of the ids."""
        placement = placement or self.placement
        owner = placement.owners(namespace, ids)
        for shard in range(placement.actors):
            positions = np.flatnonzero(owner == shard)
            if positions.size:
                yield shard, positions

    @_reread_config_if_recreated
    def get(self, namespace: str, ids: np.ndarray, return_optimizer_state: bool = False, *,
            generation: int = 0) -> Rows:
        """Stages: route ids to their shards; fetch; NOT_FOUND naming every missing id; reassemble in order."""
        config = self.config(namespace, generation)
        ids = validation.check_ids(ids)
        routes = []

        def calls(placement):
            routes[:] = self._route_ids(ids, namespace, placement)
            return [(shard, "get_present", (namespace, config.generation, ids[positions], return_optimizer_state))
                    for shard, positions in routes]

        answers = self._round(calls)
        missing = np.concatenate([m for _, m in answers] + [ids[ids < 0]])
        if missing.size:
            raise IdsNotFound(namespace, np.unique(missing))
        n = ids.shape[0]
        out = Rows(ids=ids.copy(), keys=np.empty((n, config.dim), np.float32), tokens=np.empty(n, np.int32),
                   values=np.empty((n, config.value_dim), np.float32) if config.value_dim else None,
                   weights=np.empty(n, np.float32), sources=[""] * n)
        for (_, positions), (rows, _) in zip(routes, answers):
            out.keys[positions] = rows.keys
            out.tokens[positions] = rows.tokens
            out.weights[positions] = rows.weights
            if out.values is not None:
                out.values[positions] = rows.values
            for position, source in zip(positions.tolist(), rows.sources):
                out.sources[position] = source
        if return_optimizer_state:
            out.optimizer_state = self._gather_state(routes, answers, n)
        return out

    @staticmethod
    def _gather_state(routes, answers, n: int) -> dict:
        """Per-row state columns ([n] step counts, [n, value_dim] moments) in the order asked."""
        state = {}
        for (_, positions), (rows, _) in zip(routes, answers):
            for name, array in rows.optimizer_state.items():
                state.setdefault(name, np.empty((n,) + array.shape[1:], array.dtype))[positions] = array
        return state

    @_reread_config_if_recreated
    def delete(self, namespace: str, ids: np.ndarray | None = None, source: str | None = None, *,
               request_id: str = "", generation: int = 0) -> int:
        """Deletes by ids (routed to their shards; unknown ids ignored) or by source (every shard;
        "" is the tag of untagged rows). Returns how many rows went."""
        config = self.config(namespace, generation)
        if (ids is None) == (source is None):
            raise InvalidArgument("delete needs either ids or a source tag, not both")
        request_id = self._step_key(config, validation.check_step_id(request_id) or validation.new_request_id())
        if source is not None:
            return sum(self._all_shards("delete", namespace, config.generation, request_id, None,
                                        validation.check_source(source)))
        ids = validation.check_ids(ids)
        ids = ids[ids >= 0]
        # Each shard gets its share of the ids; the digest of them all tells a share of this request
        # from another request that reuses its id (Shard._digests: that one answers the first count).
        digest = hashlib.blake2b(np.ascontiguousarray(ids).tobytes(), digest_size=8).hexdigest()
        return sum(self._routed_writes(namespace, [
            ("delete", ids, lambda p: (namespace, config.generation, request_id, ids[p], None, digest))]))

    # ----- snapshots (admin; workers/snapshots.py) ---------------------------------------------
    def _snapshot_root(self):
        if self.snapshots is None:
            raise FailedPrecondition("this deployment has no snapshot root (serve it with --data-dir or "
                                     "--snapshot-root)")
        return self.snapshots

    def _snapshot_location(self, location) -> str:
        """The caller's location, checked before anything opens it: a name or path of sane length
        (validation.check_snapshot_location), and a URI only under the root's own URI, without a query.
        Snapshots.locate resolves a URI before it finds it outside the root, and resolving one (s3://,
        gs://, a query's endpoint_override) connects to the host it names: a caller must not make
        the server reach hosts of its choosing."""
        location = validation.check_snapshot_location(location)
        if "://" in location:
            root = self.snapshots.root if "://" in self.snapshots.root else f"file://{self.snapshots.root_path}"
            root = root.split("?", 1)[0].rstrip("/")
            if "?" in location or (location.rstrip("/") != root and not location.startswith(root + "/")):
                raise InvalidArgument(f"snapshot location {location!r} is outside the snapshot root "
                                      f"{self.snapshots.root!r}")
        return location

    def _refuse_during_reshard(self, what: str) -> None:
        """FAILED_PRECONDITION while a reshard is under way (a snapshot would hold the batch being
        copied twice, and a restore would place rows by a placement about to change)."""
        if self.refresh_placement().move is not None:
            move = self.placement.move
            raise FailedPrecondition(f"{what} waits for the reshard from {move.source} to {move.target} shards "
                                     f"in progress to finish (monim reshard --shards {move.target} resumes one "
                                     "that was interrupted)")

    # ----- reshard (admin; workers/reshard.py) -------------------------------------------------
    def reshard(self, shards, batch_rows: int = 0):
        """Moves every namespace to ``shards`` shards (or resumes the move to it that was
        interrupted); an iterator of ReshardProgress, one per step. Closing it stops the move."""
        from monim.workers.placement import check_shard_count
        from monim.workers.reshard import Resharder

        shards = check_shard_count(shards)
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, np.integer)) or batch_rows < 0:
            raise InvalidArgument(f"batch_rows must be a non-negative integer, got {batch_rows!r}")
        return Resharder(self).run(shards, int(batch_rows))

    def create_snapshot(self, location: str, namespace: str = "") -> dict:
        """Every namespace (or one) to a snapshot at location, under the snapshot root; returns its info."""
        snapshots = self._snapshot_root()
        self._refuse_during_reshard("a snapshot")
        return snapshots.create(self._snapshot_location(location), namespace)

    def list_snapshots(self) -> list[dict]:
        return self._snapshot_root().list()

    def restore_snapshot(self, location: str, namespace: str = "") -> dict[str, int]:
        """Restores a snapshot (every namespace in it, or one) into this deployment; returns rows per namespace."""
        snapshots = self._snapshot_root()
        self._refuse_during_reshard("a restore")
        return snapshots.restore(self._snapshot_location(location), namespace)
