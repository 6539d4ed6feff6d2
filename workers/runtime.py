"""With workers/shard_groups.py (where the shards run), the only module that calls ``ray.*``.

``RayRuntime`` starts or joins Ray, creates (or finds) the named registry and
shard actors, and scatters calls to them. ``LocalRuntime`` has the same
interface over plain in-process objects, so the router and servicer are
unit-tested without Ray (the Ray Serve pattern).

Interface used by the router:
    num_shards: int
    call_registry(method, *args) -> result
    call_shards(calls, timeout_s) -> list of results, calls = [(shard, method, args)]
    shutdown()
and by the front end's probe (workers/frontend.py):
    shard_host(shard, timeout_s) -> where the shard's process runs and its memory (workers/machine.py)
Errors: a MemoryStoreError raised in an actor is re-raised as itself; a dead
actor becomes ShardUnavailable(shard); a timeout becomes DeadlineExceeded, and
the calls that have not started yet are cancelled. Any other error is logged
here with the shard's traceback (the front end's log is where operators look;
the actors' own output reaches it too, through Ray's log_to_driver).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
import sys
import threading
import time

import numpy as np
import torch
from monim.protos.errors import DeadlineExceeded, IdsNotFound, MemoryStoreError, ShardUnavailable, Unavailable
from monim.workers.machine import host_report
from monim.workers.read_endpoint import ensure_endpoint, is_loopback
from monim.workers.registry import NamespaceRegistry
from monim.workers.router import Router
from monim.workers.shard import DEFAULT_SNAPSHOT_EVERY, Shard
from monim.workers.shard_groups import DEFAULT_STRATEGY, DEFAULT_WAIT_S, ShardGroups, check_strategy

log = logging.getLogger(__name__)

# How long a registry call waits for the registry, restarts included.
REGISTRY_WAIT_S = 60.0
# How often a call waits for a restarting shard before sending again.
RESTART_POLL_S = 0.5
# Calls a shard actor takes at once: the shard serializes them on its lock, except that writers
# waiting for the disk let the others in (group commit; workers/shard.py).
SHARD_CALLS_AT_ONCE = 16
# Calls the registry actor takes at once: its writes one at a time, its reads beside them (registry.py).
REGISTRY_CALLS_AT_ONCE = 8
# Arrays above this many bytes are put in Ray's object store once and passed by
# reference, instead of being serialized into every shard's call.
_PUT_THRESHOLD_BYTES = 1 << 16
# How long ReadEndpoints waits for the shards to name (or start) their read endpoints.
ENDPOINT_WAIT_S = 10.0
# How long a stopping front end waits for its shards to finish a background snapshot and close their logs.
CLOSE_TIMEOUT_S = 60.0


# Ray's token auth (docs/OPERATIONS.md, "Ray's own ports"): Ray reads these when it is imported.
RAY_AUTH_MODE = "RAY_AUTH_MODE"
RAY_TOKEN_AUTH_SINCE = (2, 52)


def ray_token_source(environ=os.environ) -> str | None:
    """Where Ray would take its token from, as Ray looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token), or None when there is none yet."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return environ["RAY_AUTH_TOKEN_PATH"]
    default = pathlib.Path(environ.get("HOME") or pathlib.Path.home()) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def prepare_ray_auth(address: str | None, environ=os.environ) -> str | None:
    """Chooses Ray's token auth before Ray is imported; returns the mode it set, or None.

    A RAY_AUTH_MODE the operator set stands. Otherwise: a local Ray this process starts (address
    None) gets RAY_AUTH_MODE=token (Ray makes ~/.ray/auth_token if there is none), and joining with
    address "auto" gets it when a token is at hand. That is what Ray 2.59+ does by default, made
    explicit, so that Ray does not warn about it on every start and older Rays (2.52+) do it too.
    Any other address is left alone: whether that cluster uses a token is its nodes' choice. Once
    Ray is imported the choice is Ray's (it reads the variable then), and nothing is changed."""
    if environ.get(RAY_AUTH_MODE) or "ray" in sys.modules:
        return None
    if address is None or (address == "auto" and ray_token_source(environ) is not None):
        environ[RAY_AUTH_MODE] = "token"
        return "token"
    return None


def ray_auth_line(address: str | None, ray_version: str, started: bool, environ=os.environ) -> str:
    """One line for the operator, once Ray is up: whether Ray's own ports want a token, and what to do.
    started: this process started that Ray (else it joined one, at address if given)."""
    version = tuple(int(part) for part in ray_version.split(".")[:2] if part.isdigit())
    if version < RAY_TOKEN_AUTH_SINCE:
        return (f"Ray {ray_version} has no token auth (Ray 2.52+): any process that reaches Ray's ports may run "
                "code on its nodes; keep them on a private network")
    mode = environ.get(RAY_AUTH_MODE, "disabled").lower()
    where = "the local Ray this process started" if started else \
        f"the Ray cluster at {address}" if address else "the Ray cluster this process joined"
    if mode == "token":
        return (f"Ray token auth on ({RAY_AUTH_MODE}=token): {where} takes calls only with the token from "
                f"{ray_token_source(environ) or 'RAY_AUTH_TOKEN'}")
    if started:
        return (f"Ray token auth off ({RAY_AUTH_MODE}={mode}): any process that reaches this machine's Ray ports "
                f"may run code as this user; unset {RAY_AUTH_MODE} to turn it on")
    return (f"Ray token auth off on {where}: any process that reaches its ports may run code on its nodes; "
            f"to secure it, start every node and front end with {RAY_AUTH_MODE}=token and one token "
            "(docs/OPERATIONS.md, \"Ray's own ports\")")


def _host_of_actor(shard) -> dict:
    """Runs in a shard actor's process (Ray's __ray_call__): its host report and Ray node id."""
    import ray

    return dict(host_report(shard.device), node_id=ray.get_runtime_context().get_node_id())


def _read_endpoint_of_actor(shard, deployment: str, restarts: bool, options) -> str:
    """Runs in a shard actor's process (Ray's __ray_call__): its read endpoint's target, the endpoint
    started first if it is not up (a router over ShardSideRuntime; workers/read_endpoint.py)."""
    import ray

    host = options.host if is_loopback(options.host) else ray.util.get_node_ip_address()
    return ensure_endpoint(shard, lambda: Router(ShardSideRuntime(ray, deployment, shard, restarts)), host, options)


def _outcomes(results: list, each: bool) -> list:
    """results (each call's result or error, in call order) as call_shards answers them: with each,
    the list itself (a dead shard's ShardUnavailable too: the other calls' results stand, and the caller
    sends that shard's share again where it belongs: Router._routed_writes); else the results, or the
    round's error raised."""
    if each:
        return results
    errors = [result for result in results if isinstance(result, Exception)]
    if errors:
        raise _combined(errors)
    return results


def _combined(errors: list[Exception]) -> Exception:
    """The error of a round: NOT_FOUND from several shards names every missing id; else the first."""
    if len(errors) > 1 and all(isinstance(e, IdsNotFound) for e in errors) and \
            len({e.namespace for e in errors}) == 1:
        return IdsNotFound(errors[0].namespace, [i for e in errors for i in e.missing_ids])
    return errors[0]


def _logged(shard: int, method: str, function, args):
    """Runs one shard call; an error that is not the caller's (not a MemoryStoreError) is logged
    with its traceback before it travels on."""
    try:
        return function(*args)
    except MemoryStoreError:
        raise
    except Exception:
        log.exception("shard %d failed in %s", shard, method)
        raise


class LocalRuntime:
    """Shards and registry as in-process objects; calls run on a thread pool, one thread per shard."""

    def __init__(self, num_shards: int, device: str = "cpu", data_dir: str | None = None, fsync: str = "always",
                 snapshot_every: int = DEFAULT_SNAPSHOT_EVERY, memory_budget: int | None = None):
        self.registry = NamespaceRegistry(num_shards, data_dir)
        self._shards_lock = threading.RLock()  # the list of shards: concurrent calls may each find a grow
        self._shard_args = (device, data_dir, fsync, snapshot_every, memory_budget)
        self.data_dir = data_dir
        self.num_shards = num_shards = self.registry.call("shard_count")
        self.shards: list[Shard | None] = [Shard(i, num_shards, *self._shard_args) for i in range(num_shards)]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_shards, thread_name_prefix="shard")

    def ensure_shards(self, count: int, placement: dict | None = None) -> None:
        """Shards up to ``count`` (a reshard's new ones: empty, or recovered from their folders), new ones
        at ``placement``."""
        with self._shards_lock:
            while len(self.shards) < count:
                self.shards.append(Shard(len(self.shards), count, *self._shard_args, placement=placement))
            if count > self.num_shards:  # the new pool first: a submit that finds the old one shut finds this
                old, self._pool = self._pool, concurrent.futures.ThreadPoolExecutor(max_workers=count,
                                                                                    thread_name_prefix="shard")
                old.shutdown(wait=False)
            self.num_shards = max(self.num_shards, count)

    def retire_shards(self, count: int) -> None:
        """After a shrink: the shards from ``count`` on stop (their rows are all elsewhere)."""
        with self._shards_lock:
            for shard in self.shards[count:]:
                if shard is not None:
                    shard.close()
            self.forget_shards(count)

    def forget_shards(self, count: int) -> None:
        """The shards from ``count`` on that a shrink retired (closed) go. One that is not closed stays:
        a grow starts its new shards before the registry names them, and a router that reads the
        placement meanwhile must not drop them (workers/reshard.py)."""
        with self._shards_lock:
            while len(self.shards) > count and self.shards[-1] is not None and self.shards[-1].closed:
                self.shards.pop()
            self.num_shards = len(self.shards)

    def _submit(self, *call) -> concurrent.futures.Future:
        """The call on the shards' thread pool, the one there is now: a grow replaces it (shut down, so
        a submit to it that lost the race raises and goes to its successor)."""
        while True:
            pool = self._pool
            try:
                return pool.submit(*call)
            except RuntimeError:
                if pool is self._pool:
                    raise

    def call_registry(self, method: str, *args):
        return self.registry.call(method, *args)  # writes one at a time; reads wait for none (registry.py)

    def call_shards(self, calls, timeout_s: float | None = None, each: bool = False, partial: bool = False) -> list:
        shards = list(self.shards)  # a reshard's retire may shorten the list meanwhile
        if any(shard >= len(shards) for shard, _, _ in calls):
            raise ShardUnavailable(next(s for s, _, _ in calls if s >= len(shards)), "retired by a reshard")
        if len(calls) == 1:  # one shard (the in-process store): no thread hop
            shard, method, args = calls[0]
            target = shards[shard]
            if target is None:
                raise ShardUnavailable(shard, "killed")
            if not each:
                return [_logged(shard, method, getattr(target, method), args)]
            try:
                return [_logged(shard, method, getattr(target, method), args)]
            except Exception as error:  # noqa: BLE001 - answered as the call's outcome
                return _outcomes([error], each)
        futures = []
        for shard, method, args in calls:
            target = shards[shard]
            if target is None:
                futures.append((shard, None))
            else:
                futures.append((shard, self._submit(_logged, shard, method, getattr(target, method), args)))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = []
        for shard, future in futures:
            try:
                if future is None:
                    raise ShardUnavailable(shard, "killed")
                results.append(future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                late = DeadlineExceeded(f"shard {shard} did not answer within {timeout_s} s")
                if partial:
                    results.append(late)
                    continue
                for _, other in futures:
                    if other is not None:
                        other.cancel()
                raise late from None
            except Exception as error:  # noqa: BLE001 - raised once all have answered
                results.append(error)
        return _outcomes(results, each or partial)

    def local_device(self, shard: int):
        """The torch device of ``shard``, which this process holds (its calls pass and answer tensors
        there), or None where it is gone."""
        shards = self.shards
        target = shards[shard] if shard < len(shards) else None
        return None if target is None else torch.device(target.device)

    def shard_host(self, shard: int, timeout_s: float | None = None) -> dict:
        """workers/machine.py's report for the shard (this process's, which holds every shard)."""
        target = self.shards[shard]
        if target is None:
            raise ShardUnavailable(shard, "killed")
        return dict(host_report(target.device), node_id="")

    def read_endpoints(self, options, timeout_s: float | None = None) -> list[str]:
        """Each shard's read endpoint (workers/read_endpoint.py), started where it is not up yet: in
        this process, a router over this runtime."""
        return [ensure_endpoint(shard, lambda: Router(self), options.host, options)
                for shard in self.shards if shard is not None]

    def kill_shard(self, shard: int) -> None:
        """For tests: the shard stops answering, as a dead actor would."""
        self.shards[shard] = None

    def shutdown(self) -> None:
        """Closes the shards' logs and releases the data dir."""
        self._pool.shutdown(wait=False)
        for shard in self.shards:
            if shard is not None:
                shard.close()
        self.registry.close()


class RayRuntime:
    """Registry and shard actors on a local or remote Ray cluster.

    num_shards: shards to create when the deployment does not exist yet; a
        front end that joins an existing deployment takes its shard count.
    address: None starts a local Ray instance (``num_cpus`` logical CPUs);
        "auto" or "ray://..." joins a running cluster.
    shard_cpus: logical CPUs each shard actor holds (its faiss thread count).
    use_gpus: "auto" gives each shard one GPU when the cluster has one per
        shard; True requires it; False keeps shards on CPU.
    deployment: prefix of the actor names, so several deployments can share
        one cluster and several front ends can share one deployment.
    data_dir: the deployment's data folder (None: in memory only). With one, the
        registry and shard actors belong to the deployment, not to this front end
        (detached), and Ray restarts a shard that dies; it recovers from its
        snapshot and log, and calls that need it wait for it (up to their deadline).
    fsync, snapshot_every, memory_budget (bytes per shard, None: its default): see workers/shard.py.
    placement: how the shards' placement groups spread over the nodes (workers/shard_groups.py);
    placement_wait_s: how long new shards wait for the cluster to have room for them.
    """

    def __init__(self, num_shards: int, address: str | None = None, num_cpus: int | None = None,
                 shard_cpus: float = 1.0, use_gpus: bool | str = "auto", deployment: str = "monim",
                 data_dir: str | None = None, fsync: str = "always", snapshot_every: int = DEFAULT_SNAPSHOT_EVERY,
                 memory_budget: int | None = None, placement: str = DEFAULT_STRATEGY,
                 placement_wait_s: float = DEFAULT_WAIT_S):
        check_strategy(placement)
        prepare_ray_auth(address)  # before `import ray`, which reads RAY_AUTH_MODE
        import ray

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            init_args = dict(namespace="monim", include_dashboard=False, ignore_reinit_error=True,
                             logging_level=logging.WARNING, log_to_driver=True)
            if address is None:
                init_args["num_cpus"] = num_cpus if num_cpus is not None else max(2, int(num_shards * shard_cpus))
            else:
                init_args["address"] = address
            ray.init(**init_args)
            self._owns_ray = address is None
        self.ray_address = ray.get_runtime_context().gcs_address  # what another front end joins
        # What `monim serve` prints about Ray's own ports.
        self.auth_line = ray_auth_line(address, ray.__version__, started=self._owns_ray)
        self.deployment = deployment
        registry_name = f"{deployment}-registry"
        self._created_actors = not self._actor_exists(registry_name)
        self.restarts = data_dir is not None
        lifetime = dict(lifetime="detached", max_restarts=-1, max_task_retries=0) if self.restarts else {}
        self.registry = ray.remote(NamespaceRegistry).options(
            name=registry_name, get_if_exists=True, num_cpus=0, max_concurrency=REGISTRY_CALLS_AT_ONCE, **lifetime
        ).remote(num_shards, data_dir)
        self.num_shards = ray.get(self.registry.call.remote("shard_count"))
        if use_gpus == "auto":
            use_gpus = ray.cluster_resources().get("GPU", 0) >= self.num_shards
        device = "cuda" if use_gpus else "cpu"
        self._shard_options = dict(num_cpus=shard_cpus, num_gpus=1 if use_gpus else 0,
                                   max_concurrency=SHARD_CALLS_AT_ONCE, **lifetime)
        self.groups = ShardGroups(ray, deployment, placement, {"CPU": shard_cpus, "GPU": 1 if use_gpus else 0},
                                  detached=self.restarts, wait_s=placement_wait_s)
        self._shard_args = (device, data_dir, fsync, snapshot_every, memory_budget)
        self.data_dir = data_dir
        self.shards = []
        self._shards_lock = threading.RLock()  # the list of handles: concurrent calls may each find a grow
        try:
            self.ensure_shards(self.num_shards)
        except Exception:  # no room for the shards, say: nothing this front end made stays
            if self._created_actors:
                self.destroy()
            if self._owns_ray:
                ray.shutdown()
            raise

    def _shard_actor(self, index: int, count: int, scheduling, placement: dict | None = None):
        return self._ray.remote(Shard).options(name=f"{self.deployment}-shard-{index}", get_if_exists=True,
                                               scheduling_strategy=scheduling,
                                               **self._shard_options).remote(index, count, *self._shard_args,
                                                                             placement=placement)

    def ensure_shards(self, count: int, placement: dict | None = None) -> None:
        """Shard actors up to ``count``: this deployment's named ones where they exist (another front end,
        or a reshard, made them), else new ones (empty, or recovered from their folders of the data dir),
        in their placement group's bundles (workers/shard_groups.py). One call at a time: concurrent
        calls that each find a grow would append a shard's handle twice (tests/unit/test_runtime_shards.py)."""
        with self._shards_lock:
            new = range(len(self.shards), count)
            missing = [i for i in new if not self._actor_exists(f"{self.deployment}-shard-{i}")]
            scheduling = self.groups.scheduling(missing) if missing else {}
            self.shards += [self._shard_actor(i, count, scheduling.get(i, "DEFAULT"), placement) for i in new]
            self.num_shards = max(self.num_shards, count)
            if new:
                self.call_shards([(i, "ping", ()) for i in new], timeout_s=300)

    def retire_shards(self, count: int) -> None:
        """After a shrink: the shard actors from ``count`` on are closed and killed (their rows are all
        on the others)."""
        with self._shards_lock:
            shard = count
            while shard < len(self.shards) or self._actor_exists(f"{self.deployment}-shard-{shard}"):
                actor = self.shards[shard] if shard < len(self.shards) else \
                    self._ray.get_actor(f"{self.deployment}-shard-{shard}")
                try:
                    self._ray.get(actor.close.remote(), timeout=CLOSE_TIMEOUT_S)
                except Exception as error:  # noqa: BLE001 - a dead shard has nothing to flush
                    log.warning("retired shard %d could not close its log: %s", shard, self._unwrap(error, shard))
                self._ray.kill(actor, no_restart=True)
                shard += 1
            del self.shards[count:]
            self.num_shards = count
            self.groups.release_from(count)

    def forget_shards(self, count: int) -> None:
        """Another front end retired the shards from ``count`` on: the handles of those whose actors are
        gone go. A live one stays: a grow starts its new shard actors before the registry names them,
        and a router of the front end driving it that reads the placement meanwhile must not drop them."""
        with self._shards_lock:
            while len(self.shards) > count and \
                    not self._actor_exists(f"{self.deployment}-shard-{len(self.shards) - 1}"):
                self.shards.pop()
            self.num_shards = len(self.shards)

    def _actor_exists(self, name: str) -> bool:
        try:
            self._ray.get_actor(name)
            return True
        except ValueError:
            return False

    def _rebound(self, shard: int) -> bool:
        """The actor of the shard's name is another than this runtime's handle (a shrink killed the
        one it knew and a grow since started a new one under its name, while this front end made no
        call that would have let it see the shard go): the handle is replaced. True if it was."""
        try:
            current = self._ray.get_actor(f"{self.deployment}-shard-{shard}")
        except ValueError:
            return False
        with self._shards_lock:  # a retire may shorten the list meanwhile
            if shard >= len(self.shards) or current == self.shards[shard]:
                return False
            log.info("shard %d: a new actor holds its name (a reshard replaced it); calling that one", shard)
            self.shards[shard] = current
            return True

    def _retired(self, shard: int) -> bool:
        """A shard a shrink removed (its actor killed for good: its name is free), not one restarting."""
        return shard >= len(self.shards) or not self._actor_exists(f"{self.deployment}-shard-{shard}")

    def _unwrap(self, error: Exception, shard: int | None):
        ray = self._ray
        if isinstance(error, ray.exceptions.RayTaskError):
            cause = getattr(error, "cause", None)
            if isinstance(cause, MemoryStoreError):
                return cause
            where = "the namespace registry" if shard is None else f"shard {shard}"
            log.error("%s failed:\n%s", where, error)  # str(RayTaskError) carries the actor's traceback
            return error
        if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            if shard is None:
                return Unavailable(f"the namespace registry is unavailable: {error}")
            return ShardUnavailable(shard, type(error).__name__)
        return error

    def call_registry(self, method: str, *args):
        """With restarts, a call that met a dead or restarting registry is sent again until it answers
        (within REGISTRY_WAIT_S), as shard calls are: its calls are reads, or writes that a request id
        makes safe to repeat (a repeated drop answers NOT_FOUND, the namespace being gone)."""
        deadline = time.monotonic() + REGISTRY_WAIT_S
        while True:
            try:
                return self._ray.get(self.registry.call.remote(method, *args),
                                     timeout=max(0.0, deadline - time.monotonic()))
            except self._ray.exceptions.GetTimeoutError:
                raise DeadlineExceeded(f"the namespace registry did not answer within {REGISTRY_WAIT_S:g} s") from None
            except Exception as error:  # noqa: BLE001 - unwrapped and re-raised
                unwrapped = self._unwrap(error, None)
                if not (self.restarts and isinstance(unwrapped, Unavailable)) or \
                        deadline - time.monotonic() < RESTART_POLL_S:
                    raise unwrapped from None
                time.sleep(RESTART_POLL_S)

    def _share_large_args(self, args, shared: dict):
        out = []
        for arg in args:
            if isinstance(arg, np.ndarray) and arg.nbytes > _PUT_THRESHOLD_BYTES:
                ref = shared.get(id(arg))
                if ref is None:
                    ref = shared[id(arg)] = self._ray.put(arg)
                out.append(ref)
            else:
                out.append(arg)
        return out

    def call_shards(self, calls, timeout_s: float | None = None, each: bool = False, partial: bool = False) -> list:
        """Scatters the calls at once, then gathers all their results in call order. The calls that
        met a dead shard are sent again, and only those (the others' results stand: a write another
        shard applied is not asked twice), to a new actor under the shard's name at once, and with
        restarts to a restarting one (every shard call is safe to repeat: reads, and writes with their
        request ids) until it answers or the time is up; a retired shard's stay ShardUnavailable.
        each: each call's result or error, in call order (see _outcomes). partial (implies each): a
        call not answered within timeout_s is a DeadlineExceeded in its place, not the round's error
        (DescribeNamespace: the shards that answered count)."""
        each = each or partial
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results = self._call_shards_once(calls, timeout_s, partial)
        while True:
            dead = {result.shard for result in results if isinstance(result, ShardUnavailable)}
            rebound = {shard for shard in dead if self._rebound(shard)}
            restarting = {shard for shard in dead - rebound if self.restarts and not self._retired(shard)}
            left = None if deadline is None else deadline - time.monotonic()
            if not rebound and (not restarting or (left is not None and left < RESTART_POLL_S)):
                return _outcomes(results, each)
            if not rebound:
                time.sleep(RESTART_POLL_S)
                timeout_s = None if deadline is None else deadline - time.monotonic()
            again = [i for i, result in enumerate(results)
                     if isinstance(result, ShardUnavailable) and result.shard in rebound | restarting]
            try:
                answers = self._call_shards_once([calls[i] for i in again], timeout_s, partial)
            except ShardUnavailable:  # retired meanwhile (nothing of this resend went): as the first answers
                return _outcomes(results, each)
            for i, answer in zip(again, answers):
                results[i] = answer

    def _call_shards_once(self, calls, timeout_s: float | None, partial: bool = False) -> list:
        """Each call's result or error, in call order; ShardUnavailable raised if a call names a shard
        past this runtime's list (retired: nothing is sent)."""
        return self._gather(calls, self._scatter(calls), timeout_s, partial)

    def _scatter(self, calls) -> list:
        """The calls sent to their shard actors at once: their futures, in call order."""
        shards = list(self.shards)  # a reshard's retire may shorten the list meanwhile
        beyond = [shard for shard, _, _ in calls if shard >= len(shards)]
        if beyond:
            raise ShardUnavailable(beyond[0], "retired by a reshard")
        shared: dict = {}
        return [getattr(shards[shard], method).remote(*self._share_large_args(args, shared))
                for shard, method, args in calls]

    def _gather(self, calls, futures: list, timeout_s: float | None, partial: bool = False) -> list:
        """Each call's result or (unwrapped) error, in call order; DeadlineExceeded if any is late
        (the late ones are cancelled), raised, or with partial in the late calls' places."""
        ray = self._ray
        ready, _ = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        late = [i for i, f in enumerate(futures) if f not in ready]
        for i in late:  # calls still queued never start; a running one finishes (writes carry request ids)
            ray.cancel(futures[i])
        if late and not partial:
            raise DeadlineExceeded(f"shard(s) {[calls[i][0] for i in late]} did not answer within {timeout_s} s")
        results = []
        for i, ((shard, _, _), future) in enumerate(zip(calls, futures)):
            if i in late:
                results.append(DeadlineExceeded(f"shard {shard} did not answer within {timeout_s} s"))
                continue
            try:
                results.append(ray.get(future))
            except Exception as error:  # noqa: BLE001 - unwrapped and re-raised by the caller
                results.append(self._unwrap(error, shard))
        return results

    def read_endpoints(self, options, timeout_s: float = ENDPOINT_WAIT_S) -> list[str]:
        """Each shard's read endpoint (workers/read_endpoint.py), started where it is not up yet,
        in shard order; a shard that does not answer within timeout_s (restarting, say) is left out."""
        futures = [actor.__ray_call__.remote(_read_endpoint_of_actor, self.deployment, self.restarts, options)
                   for actor in self.shards]
        ready, _ = self._ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        targets = []
        for shard, future in enumerate(futures):
            if future not in ready:
                self._ray.cancel(future)
                continue
            try:
                targets.append(self._ray.get(future))
            except Exception as error:  # noqa: BLE001 - that shard's steps go through the front end
                log.warning("shard %d: no read endpoint: %s", shard, self._unwrap(error, shard))
        return targets

    def local_device(self, shard: int):
        """None: the shard actors answer from their own processes (see ShardSideRuntime)."""
        return None

    def shard_host(self, shard: int, timeout_s: float | None = None) -> dict:
        """workers/machine.py's report from the shard actor's own process, with its Ray node id."""
        future = self.shards[shard].__ray_call__.remote(_host_of_actor)
        try:
            return self._ray.get(future, timeout=timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(future)
            raise DeadlineExceeded(f"shard {shard} did not report its host within {timeout_s} s") from None
        except Exception as error:  # noqa: BLE001 - unwrapped and re-raised
            raise self._unwrap(error, shard) from None

    def kill_shard(self, shard: int) -> None:
        """For tests and drills: kills one shard actor without restart."""
        self._ray.kill(self.shards[shard], no_restart=True)

    def destroy(self) -> None:
        """Kills the deployment's actors, durable or not, and gives back their placement groups (its
        data dir stays): for tests and for tearing a deployment down."""
        for actor in [*self.shards, self.registry]:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                log.debug("actor already gone", exc_info=True)
        self.groups.release_from(0)

    def _close_shards(self) -> None:
        closing = [shard.close.remote() for shard in self.shards]
        ready, _ = self._ray.wait(closing, num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
        for shard, future in enumerate(closing):
            try:
                if future in ready:
                    self._ray.get(future)
                else:
                    log.warning("shard %d did not close its log within %s s", shard, CLOSE_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - a dead shard has nothing to flush
                log.warning("shard %d could not close its log: %s", shard, self._unwrap(error, shard))

    def shutdown(self) -> None:
        """Kills the actors this front end created unless they belong to a durable deployment
        (they outlive front ends), and Ray itself if it started it. A durable deployment on a Ray this
        front end started ends with it: its shards first finish a background snapshot and close (sync)
        their logs."""
        if self._owns_ray and self.restarts:
            self._close_shards()
        if self._created_actors and not self.restarts:
            self.destroy()
        if self._owns_ray:
            self._ray.shutdown()


class ShardSideRuntime(RayRuntime):
    """The runtime of the router inside a shard actor's process (its read endpoint): the deployment's
    registry and shard actors found by name, and the shard of this process called directly, in the
    calling thread, while the others answer through Ray (sent first, so that they work meanwhile).
    It creates, retires and kills nothing: the front ends do."""

    def __init__(self, ray, deployment: str, local_shard: Shard, restarts: bool):  # no super(): it joins, never creates
        self._ray = ray
        self._owns_ray = False
        self._created_actors = False
        self.deployment = deployment
        self.restarts = restarts
        self.local = local_shard
        self.registry = ray.get_actor(f"{deployment}-registry")
        self.shards = []
        self.num_shards = 0
        self._shards_lock = threading.RLock()  # its concurrent calls (reads and writes) may each find a grow

    def ensure_shards(self, count: int, placement: dict | None = None) -> None:
        """Handles of the named shard actors up to count (a reshard's new ones, once a front end made them)."""
        with self._shards_lock:
            while len(self.shards) < count:
                index = len(self.shards)
                try:
                    self.shards.append(self._ray.get_actor(f"{self.deployment}-shard-{index}"))
                except ValueError:
                    raise ShardUnavailable(index, "no such shard actor (yet)") from None
            self.num_shards = max(self.num_shards, count)

    def local_device(self, shard: int):
        """The torch device of this process's shard, if it is ``shard``, else None (another actor's)."""
        return torch.device(self.local.device) if shard == self.local.shard_index else None

    def _call_shards_once(self, calls, timeout_s: float | None, partial: bool = False) -> list:
        here = self.local.shard_index
        elsewhere = [call for call in calls if call[0] != here]
        futures = self._scatter(elsewhere) if elsewhere else []
        local_results = []
        for shard, method, args in calls:
            if shard == here:
                try:
                    local_results.append(_logged(shard, method, getattr(self.local, method), args))
                except Exception as error:  # noqa: BLE001 - answered as the call's outcome
                    local_results.append(error)
        remote_results = iter(self._gather(elsewhere, futures, timeout_s, partial) if elsewhere else [])
        local_iter = iter(local_results)
        return [next(local_iter) if shard == here else next(remote_results) for shard, _, _ in calls]

    def retire_shards(self, count: int) -> None:
        raise NotImplementedError("a shard's read endpoint retires no shards")

    def destroy(self) -> None:
        raise NotImplementedError("a shard's read endpoint destroys nothing")

    def shutdown(self) -> None:
        """Nothing: the actors and Ray belong to the deployment."""
