"""Where a large Add and ApplyGradients spend their time through the service, against the same
call on the in-process store, in one run on the same data.

Through the service a call passes the client (encoding), gRPC, the front end's servicer and router,
the Ray call to the shard actor (its arguments put in Ray's object store), and the shard's method.
This bench times each stage: the front end's stages by wrapping its methods in this process (the
bench runs the embedded deployment), the shard's inside the actor (``__ray_call__`` wraps its
methods and its store's there; on a GPU each timed stage ends with a synchronize). Per stage it
prints the milliseconds per call (summed over the call's chunks and parts).

    python -m bench.service_breakdown                      # CPU, 100,000 rows of 768 + 768 values
    python -m bench.service_breakdown --device cuda        # a GPU shard against the in-process GPU store
    python -m bench.service_breakdown --pipelines 2:8,4:8,2:32     # the client's chunks: depth:MiB each

With --pipelines, the service's calls are timed once per setting of the client's pipeline (chunks
in flight : chunk size in MiB; the stages are printed for the first setting).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import sys
import threading
import time

import numpy as np
import torch

NAMESPACE = "breakdown"  # the loaded rows the ApplyGradients steps
ADD_NAMESPACE = "breakdown-add"  # made again before each series of timed Adds: each series grows it alike
# The shard's methods and its store's, timed inside the actor.
SHARD_STAGES = ("add", "stage_gradients", "commit_step", "_write", "_apply", "_joined_gradients", "_check_owned")
STORE_STAGES = ("add", "step", "check_stored")


class Stages:
    """Seconds per labelled stage, from wrapped callables (thread-safe)."""

    def __init__(self, sync=None):
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.lock = threading.Lock()
        self.sync = sync

    def wrap(self, owner, name: str, label: str, labeller=None):
        real = getattr(owner, name)

        @functools.wraps(real)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if self.sync is not None:
                    self.sync()
                with self.lock:
                    self.times[labeller(args) if labeller else label].append(time.perf_counter() - started)

        setattr(owner, name, timed)

    def take(self) -> dict[str, tuple[int, float]]:
        with self.lock:
            out = {label: (len(times), sum(times)) for label, times in self.times.items()}
            self.times.clear()
        return out


def _install_in_actor(shard):
    """Runs inside the shard actor: wraps its stages; the Stages object lives on the shard."""
    sync = torch.cuda.synchronize if shard.device.startswith("cuda") else None
    stages = Stages(sync)
    for name in SHARD_STAGES:
        stages.wrap(shard, name, f"shard.{name}")
    from monim.datastore.store import NeighborStore

    for name in STORE_STAGES:  # on the class: the Add namespace's store is made again for each series
        stages.wrap(NeighborStore, name, f"store.{name}")
    shard._breakdown = stages
    return f"{shard.device}, torch threads {torch.get_num_threads()}, pid {os.getpid()}"


def _take_in_actor(shard):
    return shard._breakdown.take()


def _ray_label(args) -> str:
    calls = args[1]  # (self, calls, ...)
    methods = sorted({call[2][1] if call[1] == "placed" else call[1] for call in calls})
    return "ray call: " + "+".join(methods)


def timed_calls(call, repeats: int, after_warm_up=None) -> list[float]:
    call()  # warm-up
    if after_warm_up is not None:
        after_warm_up()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.service_breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows stored before the timed calls")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--value-dim", type=int, default=768)
    p.add_argument("--add-rows", type=int, default=65_536, help="rows per timed Add (keys and values)")
    p.add_argument("--apply-rows", type=int, default=65_536, help="rows per timed ApplyGradients (Adam)")
    p.add_argument("--device", default="cpu", help="the in-process store's device; the shard takes a GPU if any")
    p.add_argument("--shard-cpus", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--pipelines", default="", help="client pipeline settings, depth:chunk_MiB, comma-separated "
                                                  "(default: the client's own)")
    args = p.parse_args(argv)

    import ray
    from monim.model_client import MemoryClient
    from monim.model_client import client as client_module

    pipelines = [tuple(int(x) for x in item.split(":")) for item in args.pipelines.split(",") if item] or \
        [(client_module.PIPELINE_DEPTH, client_module.CHUNK_BYTES >> 20)]
    from monim.workers import runtime as runtime_module
    from monim.workers import servicer as servicer_module
    from monim.workers.embedded import EmbeddedStore

    print(f"# python -m bench.service_breakdown {' '.join(sys.argv[1:] if argv is None else argv)}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"# {args.rows:,} rows of {args.dim} + values {args.value_dim}; {gpu}; {os.cpu_count()} CPUs, "
          f"{platform.machine()}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    values = 0.02 * rng.standard_normal((args.rows, args.value_dim), dtype=np.float32)
    tokens = rng.integers(0, 50_000, args.rows)
    add_n, apply_n = min(args.add_rows, args.rows), args.apply_rows
    apply_ids = rng.integers(0, args.rows, apply_n)
    apply_grads = rng.standard_normal((apply_n, args.value_dim), dtype=np.float32)

    front = Stages()
    front.wrap(runtime_module.RayRuntime, "_call_shards_once", "", labeller=_ray_label)
    for method in ("Add", "ApplyGradients", "CommitStep"):
        front.wrap(servicer_module.MemoryServicer, method, f"servicer.{method}")

    def create(client, name):
        client.create_namespace(name, dim=args.dim, value_dim=args.value_dim, max_k=32, optimizer="adam", lr=1e-3)

    def load(client):
        create(client, NAMESPACE)
        for start in range(0, args.rows, 32_768):
            part = slice(start, start + 32_768)
            client.add(NAMESPACE, keys[part], tokens[part], values=values[part])

    def add_series(client):
        """The Add to time, into ADD_NAMESPACE made afresh now."""
        if any(config.name == ADD_NAMESPACE for config in client.list_namespaces()):
            client.drop_namespace(ADD_NAMESPACE)
        create(client, ADD_NAMESPACE)
        return lambda: client.add(ADD_NAMESPACE, keys[:add_n], tokens[:add_n], values=values[:add_n])

    results = {}
    with MemoryClient(":memory:", device=args.device) as local:
        load(local)
        results["in-process", "add"] = timed_calls(add_series(local), args.repeats)
        results["in-process", "apply"] = timed_calls(
            lambda: local.apply_gradients(NAMESPACE, apply_ids, apply_grads), args.repeats)
    with EmbeddedStore(shards=1, num_cpus=max(2, int(args.shard_cpus) + 1), shard_cpus=args.shard_cpus) as service, \
            MemoryClient(service.address, timeout_s=600) as remote:
        load(remote)
        actor = service.runtime.shards[0]
        print(f"# shard actor: {ray.get(actor.__ray_call__.remote(_install_in_actor))}")
        # An untimed series of Adds first: the shard's first ones take fresh memory from the OS (page
        # faults), which every later series reuses; timed first, the first setting's Add ran 1.8x slower
        # than the same setting timed again after the others (2-core VM).
        timed_calls(add_series(remote), args.repeats)
        for setting, (depth, chunk_mib), op in [(setting, pipeline, op) for setting, pipeline in enumerate(pipelines)
                                                for op in ("add", "apply")]:
            client_module.PIPELINE_DEPTH, client_module.CHUNK_BYTES = depth, chunk_mib << 20
            call = add_series(remote) if op == "add" else \
                functools.partial(remote.apply_gradients, NAMESPACE, apply_ids, apply_grads)

            def forget():  # the warm-up's stages
                front.take()
                ray.get(actor.__ray_call__.remote(_take_in_actor))

            times = results["service", op] = timed_calls(call, args.repeats, forget)
            stages = {**front.take(), **ray.get(actor.__ray_call__.remote(_take_in_actor))}
            calls = args.repeats
            local_ms = 1e3 * float(np.median(results["in-process", op]))
            service_ms = 1e3 * float(np.median(times))
            rows = add_n if op == "add" else apply_n
            what = f"Add of {rows:,} rows (keys + values)" if op == "add" else f"ApplyGradients (Adam) of {rows:,} rows"
            print(f"\n{what}: in-process {local_ms:,.0f} ms ({rows / local_ms * 1e3:,.0f} rows/s), "
                  f"service {service_ms:,.0f} ms ({rows / service_ms * 1e3:,.0f} rows/s) = "
                  f"{local_ms / service_ms:.2f}x in-process; client chunks of {chunk_mib} MiB, {depth} in flight")
            if setting:
                continue
            print("  (a stage's time is summed over the call's chunks, which may be in flight at once)")
            for label, (count, total) in sorted(stages.items(), key=lambda item: -item[1][1]):
                print(f"  {label:40s} {total / calls * 1e3:9,.1f} ms per call ({count / calls:.0f} per call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
