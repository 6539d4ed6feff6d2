"""The ``monim`` command.

    monim serve [--config FILE] [--host H] [--port P] [--shards N] [--ray-address ADDR]
                [--data-dir DIR | --ephemeral] [--auth-file FILE] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
                [--metrics-port P [--metrics-host H]] [--grace-s S]
    monim status [--address HOST:PORT] [--metrics URL] [--json] [--watch [S]] [--token T] [--tls-ca PEM ...]
    monim namespace create NAME --dim D ... | list | describe NAME | drop NAME [--yes]  [--address HOST:PORT]
                    [--token T] [--tls-ca PEM ...]
    monim snapshot create --out NAME | list | restore --from NAME  [--address HOST:PORT] [--namespace NS]
                   [--token T] [--tls-ca PEM ...]
    monim demo [--shards N]

serve's settings may also come from MONIM_<FLAG> variables and a TOML file (workers/serve_config.py);
status and namespace are workers/cli_status.py and workers/cli_namespace.py. ``demo`` reaches
model_client by lazy import; everything else is workers'.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from monim.workers.cli_client import add_connection_options, connect
from monim.workers.cli_namespace import add_namespace_command
from monim.workers.cli_reshard import add_reshard_command
from monim.workers.cli_status import add_status_command
from monim.workers.serve_config import CONFIG_ENV, defer_defaults, parse_size, resolve

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_security(args) -> tuple[list[str], list[str]]:
    """Reads and checks the auth file and the TLS files, before torch or Ray is imported
    (InvalidArgument names the file and the problem). Returns (lines to print, warnings)."""
    from monim.workers.auth import AuthPolicy, loose_permissions
    from monim.workers.tls import ServerTls

    tls = ServerTls.load(args.tls_cert, args.tls_key, args.tls_client_ca)
    policy = AuthPolicy.load(args.auth_file) if args.auth_file is not None else None
    lines, warnings = [], []
    if tls is not None:
        lines.append(f"monim: TLS with {args.tls_cert}"
                     + (f"; clients need a certificate signed by {args.tls_client_ca}" if tls.mutual else ""))
    if policy is not None:
        lines.append(f"monim: auth: {len(policy.tokens)} token(s) from {args.auth_file} "
                     f"({', '.join(t.name for t in policy.tokens)})")
        warnings.append(loose_permissions(args.auth_file))
        if tls is None and args.host not in _LOOPBACK_HOSTS:
            warnings.append(f"--auth-file without TLS on {args.host}: tokens cross the network in plain text "
                            "(add --tls-cert and --tls-key)")
    return lines, [w for w in warnings if w]


def parse_serve_args(argv: list[str], environ=os.environ) -> tuple[argparse.Namespace, list[str]]:
    """``monim serve`` argv (without "serve") -> (every setting, from flags, MONIM_* variables, the
    config file or defaults; lines saying where they came from). InvalidArgument names a bad one."""
    args = build_parser().parse_args(["serve", *argv])
    return args, resolve(args, args.serve_options, environ)


def _serve(args) -> int:
    from monim.protos.errors import InvalidArgument

    try:
        sources = resolve(args, args.serve_options)  # every check of the settings, before torch or Ray
        lines, warnings = _check_security(args)
    except InvalidArgument as error:
        print(f"monim serve: {error.message}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"monim serve: warning: {warning}", file=sys.stderr)
    for line in [f"monim: {source}" for source in sources] + lines:
        print(line, flush=True)
    from monim.workers.embedded import EmbeddedStore  # torch, Ray: after every check of the flags
    data_dir = None if args.ephemeral else args.data_dir if "://" in args.data_dir else os.path.abspath(args.data_dir)
    if data_dir is None:
        print("monim: --ephemeral: everything is kept in memory only and is lost when the server stops",
              flush=True)
    else:
        print(f"monim: data dir {data_dir} (fsync {args.fsync}, a snapshot every {args.snapshot_every} "
              "log records per shard)", flush=True)
    store = EmbeddedStore(shards=args.shards, host=args.host, port=args.port, ray_address=args.ray_address,
                          num_cpus=args.num_cpus, shard_cpus=args.shard_cpus, placement=args.placement,
                          deployment=args.deployment,
                          data_dir=data_dir, fsync=args.fsync, snapshot_every=args.snapshot_every,
                          shard_memory_budget=None if args.shard_memory_budget is None
                          else parse_size(args.shard_memory_budget),
                          snapshot_root=args.snapshot_root, auth_file=args.auth_file, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, metrics_port=args.metrics_port,
                          metrics_host=args.metrics_host, read_endpoints=not args.no_read_endpoints)
    print(f"monim: {store.runtime.auth_line}", flush=True)
    if args.ray_address is None:
        print(f"monim: started a local Ray at {store.runtime.ray_address} (another front end of this deployment: "
              f"monim serve --ray-address {store.runtime.ray_address} --deployment {args.deployment})", flush=True)
    print(f"monim: serving {store.runtime.num_shards} shard(s) on {store.address}", flush=True)
    if store.metrics_port is not None:
        print(f"monim: Prometheus metrics at http://{args.metrics_host or args.host}:{store.metrics_port}/metrics",
              flush=True)
    _serve_until_signal(store, args.grace_s)
    return 0


def _serve_until_signal(store, grace_s: float) -> None:
    """Serves until SIGTERM or SIGINT, then drains (workers/frontend.py: health NOT_SERVING, new
    calls refused, calls in flight finish for up to grace_s) and shuts down, closing the shards' logs
    where this front end owns them. A second signal cuts the drain short."""
    import threading

    signals: list[int] = []
    requested = threading.Event()

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:  # stop now; not in the handler itself, which may interrupt the drain's locks
            threading.Thread(target=store.server.stop, args=(0,), daemon=True).start()
        requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not requested.wait(1.0):
        pass
    print(f"monim: {signal.Signals(signals[0]).name}: draining ({store.server.gate.in_flight} call(s) in flight, "
          f"up to {grace_s:g} s; health answers NOT_SERVING, new calls are refused)", flush=True)
    store.stop(grace_s)
    print("monim: stopped", flush=True)


def _with_spinner(label: str, call):
    """Runs call() while a progress line shows the elapsed time (the RPC reports only at its end)."""
    import threading

    try:
        from tqdm import tqdm
    except ImportError:  # the thin client: no bar, just the answer
        return call()
    done = threading.Event()
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = error
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    with tqdm(desc=label, bar_format="{desc}: {elapsed}", file=sys.stderr) as bar:
        while not done.wait(0.2):
            bar.refresh()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _snapshot(args) -> int:
    from monim.model_client.errors import MemoryStoreError

    try:
        with connect(args, timeout_s=args.timeout_s) as client:
            if args.action == "create":
                info = _with_spinner(f"snapshot to {args.out}",
                                     lambda: client.create_snapshot(args.out, args.namespace or ""))
                rows = ", ".join(f"{name}: {count:,}" for name, count in info["rows"].items())
                print(f"{info['location']}: {info['shards']} shard(s), {info['bytes']:,} bytes; rows {rows or 'none'}")
            elif args.action == "restore":
                restored = _with_spinner(f"restore from {args.source}",
                                         lambda: client.restore_snapshot(args.source, args.namespace or ""))
                for name, count in restored.items():
                    print(f"restored {name}: {count:,} rows")
            else:
                for info in client.list_snapshots():
                    print(f"{info['location']}  {info['created_at']}  {info['shards']} shard(s)  "
                          f"{sum(info['rows'].values()):,} rows  {info['bytes']:,} bytes")
    except MemoryStoreError as error:
        print(f"monim snapshot {args.action}: {error.message}", file=sys.stderr)
        return 2
    return 0


def _demo(args) -> int:
    """Errors a user can fix (bad --corpus or --model, a store that does not answer) print one
    line and exit with code 2, without a traceback. Inputs are checked before a store starts."""
    from monim.model_client.demo import prepare_inputs, run_demo  # lazy: the one place the CLI reaches the client side
    from monim.protos.errors import MemoryStoreError

    try:
        inputs = prepare_inputs(corpus=args.corpus, model=args.model, days=args.days, quick=args.quick,
                                seeds=args.seeds)
        if args.address:
            from monim.model_client import MemoryClient

            with MemoryClient(args.address, timeout_s=10, retries=0) as client:
                client.list_namespaces()  # fails fast when nothing answers
            run_demo(args.address, 0, inputs, out=args.out, progress=not args.no_progress, threads=args.threads)
        else:
            import tempfile

            from monim.workers.embedded import EmbeddedStore

            # A durable store, as `monim serve` runs it, on a data dir that goes with the demo.
            with tempfile.TemporaryDirectory(prefix="monim-demo-") as data_dir, \
                    EmbeddedStore(shards=args.shards, num_cpus=max(2, args.shards), data_dir=data_dir,
                                  fsync="never") as store:
                run_demo(store.address, store.runtime.num_shards, inputs, out=args.out, progress=not args.no_progress,
                         threads=args.threads)
    except MemoryStoreError as error:
        where = f" (store {args.address})" if args.address else ""
        print(f"monim demo: {error.message}{where}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monim", description="monim-store: a learnable nearest-neighbour memory")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a deployment over gRPC",
                                description="Every flag may also be set by MONIM_<FLAG> (MONIM_DATA_DIR for "
                                            "--data-dir) or a key of --config's TOML file (data-dir = ...); the "
                                            "command line wins, then the environment, then the file "
                                            "(docs/OPERATIONS.md, 'Config file').")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help=f"a TOML file of serve flags, one key per flag (default: ${CONFIG_ENV}, if set)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--shards", type=int, default=2, help="shard actors to create (default 2)")
    serve.add_argument("--ray-address", default=None,
                       help="join a running Ray cluster ('auto'); default: start a local Ray")
    serve.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    serve.add_argument("--shard-cpus", type=float, default=1.0, help="logical CPUs per shard actor")
    serve.add_argument("--placement", default="spread",
                       help="how new shards spread over the Ray nodes: spread (default: as many nodes as can take "
                            "them), strict_spread (one node each, or no start), pack, strict_pack (docs/OPERATIONS.md, "
                            "'Multi-node')")
    serve.add_argument("--deployment", default="monim", help="actor name prefix (front ends that share it share shards)")
    serve.add_argument("--data-dir", default="./monim-data",
                       help="where the registry, each shard's write-ahead log and snapshots are kept: a folder, or a "
                            "URI pyarrow.fs opens (s3://bucket/prefix, gs://..., file://...) (default ./monim-data)")
    serve.add_argument("--ephemeral", action="store_true", help="keep nothing on disk (everything is lost at exit)")
    serve.add_argument("--fsync", default="always",
                       help="always: fsync the log before acknowledging a write, one fsync shared by the writes that "
                            "arrive during the last (default); batch_ms=N: the same, and the fsync waits up to N ms "
                            "for writers still writing their records; never: acknowledged once written, the OS "
                            "flushes when it likes")
    serve.add_argument("--snapshot-every", type=int, default=10_000,
                       help="log records per shard between automatic snapshots (0: none)")
    serve.add_argument("--shard-memory-budget", default=None,
                       help="bytes each shard's rows may take (e.g. 8GiB); an Add past it is refused "
                            "(default: 90%% of a shard's GPU, or 80%% of host memory over the shards)")
    serve.add_argument("--snapshot-root", default=None,
                       help="where snapshot create/restore may write and read (folder or URI; default DATA_DIR/snapshots)")
    serve.add_argument("--auth-file", default=None,
                       help="TOML file of [[token]] tables (name, secret, read, write, admin); every call then "
                            "needs a token (docs/OPERATIONS.md, 'Securing a server')")
    serve.add_argument("--tls-cert", default=None, help="PEM file of the server's certificate chain (serve TLS)")
    serve.add_argument("--tls-key", default=None, help="PEM file of the server's private key (unencrypted)")
    serve.add_argument("--tls-client-ca", default=None,
                       help="PEM file of the CA that signs client certificates (mutual TLS: clients must present one)")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port; default: none)")
    serve.add_argument("--metrics-host", default=None, help="address the metrics endpoint listens on (default --host)")
    serve.add_argument("--no-read-endpoints", action="store_true",
                       help="serve decode streams on this front end only, not on the shards' own endpoints "
                            "(extra ports on the shards' nodes; docs/API.md, 'Read endpoints')")
    serve.add_argument("--grace-s", type=float, default=30.0,
                       help="on SIGTERM or SIGINT, how long calls in flight may take to finish (default 30)")
    serve.set_defaults(run=_serve, serve_options=defer_defaults(serve))

    add_status_command(commands)
    add_namespace_command(commands)
    add_reshard_command(commands)

    snap = commands.add_parser("snapshot", help="create, list or restore snapshots of a running server")
    actions = snap.add_subparsers(dest="action", required=True)
    for name, text in (("create", "snapshot every namespace (or one) under the server's snapshot root"),
                       ("list", "the snapshots under the server's snapshot root"),
                       ("restore", "restore a snapshot into the server's deployment (any shard count)")):
        action = actions.add_parser(name, help=text)
        add_connection_options(action, timeout_s=3600.0)
        if name != "list":
            action.add_argument("--namespace", default=None, help="only this namespace")
        if name == "create":
            action.add_argument("--out", required=True, help="a name under the snapshot root, or a path/URI inside it")
        if name == "restore":
            action.add_argument("--from", dest="source", required=True, help="the snapshot's name or path/URI")
        action.set_defaults(run=_snapshot)

    demo = commands.add_parser("demo", help="continual learning, day by day, on an embedded local store")
    demo.add_argument("--shards", type=int, default=2)
    demo.add_argument("--out", default="demo-out", help="folder for results.json and perplexity.png")
    demo.add_argument("--corpus", default=None, help="your text: one sub-folder per day (default: the stdlib)")
    demo.add_argument("--model", default=None, help="a local Hugging Face causal LM (default: a byte-level GPT-2)")
    demo.add_argument("--days", type=int, default=None, help="new days after day 0 (default 3)")
    demo.add_argument("--address", default=None, help="use a running server instead of an embedded store")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    demo.add_argument("--seeds", type=int, default=1,
                      help="runs with seeds 0..N-1; the summary and plot show mean and std (default 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch threads of the demo's model (default 1: fastest on a busy 2-core machine; 0: torch's)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.shards < 1:  # serve checks its own (workers/serve_config.py)
        print("monim: --shards must be at least 1", file=sys.stderr)
        return 2
    if args.command == "demo" and args.threads < 0:
        print("monim demo: --threads must be at least 0", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
