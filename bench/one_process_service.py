"""A one-shard service without Ray: the router and its one shard in a server process of their own.

A client of a one-shard deployment sends its reads, training steps and the layer's writes to the
shard's read endpoint (workers/read_endpoint.py): a gRPC server (and host socket) in the shard
actor's process whose router calls that shard directly. This process is the same shape: a server
(``start_server``) over ``Router(LocalRuntime(1, device))``, in a process apart from the client's,
so a call crosses a process boundary, the wire (or the host's shared memory and socket) and the
servicer, as an endpoint's does, and no Ray. The benches use it where Ray is not installed (the GPU
machine takes it in a second call: docs/DEVELOPMENT.md); what it leaves out is the front end's
hop to the shard actor, which the calls above do not take.

    with OneProcessService("cuda") as service:
        client = MemoryClient(service.address)

    python -m bench.one_process_service --device cuda     # serves until stdin closes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


class OneProcessService:
    """cpus: the threads its torch and faiss get (OMP_NUM_THREADS), as Ray gives a shard actor of that
    many CPUs (monim serve --shard-cpus, default 1)."""

    def __init__(self, device: str = "cpu", cpus: int = 1, metrics: bool = False):
        self._process = subprocess.Popen([sys.executable, "-m", "bench.one_process_service", "--device", device]
                                         + ["--metrics"] * metrics,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=dict(os.environ, OMP_NUM_THREADS=str(cpus)))
        line = self._process.stdout.readline().strip()
        if not line.startswith("serving "):
            self._process.kill()
            raise RuntimeError(f"the one-process service did not start (it said {line!r})")
        self.address = line.split()[1]
        # metrics: the server's Prometheus text (its per-method call durations: ``server_seconds``)
        self.metrics_url = f"http://127.0.0.1:{line.split()[2]}/metrics" if metrics else None

    def server_seconds(self, method: str) -> tuple[float, int]:
        """(seconds, calls) the server has spent answering `method` (its monim_request_duration_seconds:
        from a call's arrival at the servicer's interceptors to its answer), for a service started with
        metrics: the difference of two readings is a cell's time inside the server."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=10) as answer:
            text = answer.read().decode()
        found = {}
        for family in text_string_to_metric_families(text):
            if family.name == "monim_request_duration_seconds":
                for sample in family.samples:
                    if sample.labels.get("method") == method and sample.name.endswith(("_sum", "_count")):
                        found[sample.name.rpartition("_")[2]] = sample.value
        return found.get("sum", 0.0), int(found.get("count", 0))

    @property
    def pid(self) -> int:
        """The server process's pid (a profiler's target)."""
        return self._process.pid

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.one_process_service", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--metrics", action="store_true",
                        help="serve Prometheus text on a free port (named after the address)")
    args = parser.parse_args(argv)
    from monim.workers.router import Router
    from monim.workers.runtime import LocalRuntime
    from monim.workers.server import start_server

    runtime = LocalRuntime(1, device=args.device)
    server, port = start_server(Router(runtime), port=0, metrics_port=0 if args.metrics else None)
    print(f"serving 127.0.0.1:{port}" + (f" {server.metrics_port}" if args.metrics else ""), flush=True)
    sys.stdin.read()  # until the parent closes it (or exits)
    server.stop(0)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
