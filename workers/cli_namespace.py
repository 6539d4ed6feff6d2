"""``monim namespace create|list|describe|drop``: the admin work on namespaces, over gRPC.

    monim namespace create NAME --dim D [--metric l2|ip] [--value-dim V] [--key-dtype float32|float16]
                           [--max-k K] [--optimizer sgd|adagrad|adam] [--lr LR] [--beta1 B ...]
    monim namespace list [--json]
    monim namespace describe NAME [--json]
    monim namespace drop NAME [--yes]

Each takes --address, --timeout-s, --token (or $MONIM_TOKEN) and --tls-ca/--tls-cert/--tls-key.
create and drop need an admin token on a server with --auth-file. drop asks for the namespace's
name on a terminal unless --yes is given, and refuses without --yes when stdin is not a terminal.
Errors print one line and exit with code 2; a drop not confirmed exits with code 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from monim.protos.config import INDEXES, KEY_DTYPES, METRICS, OPTIMIZERS, NamespaceConfig, OptimizerConfig
from monim.workers.cli_client import add_connection_options, connect, console

# OptimizerConfig's options beyond name and lr, each a --flag; left out, the optimizer's default holds.
_OPTIMIZER_OPTIONS = tuple(f.name for f in dataclasses.fields(OptimizerConfig) if f.name not in ("name", "lr"))


def _default(cls, name: str):
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def add_namespace_command(commands) -> None:
    namespace = commands.add_parser("namespace", help="create, list, describe or drop namespaces of a running server")
    actions = namespace.add_subparsers(dest="action", required=True)

    create = actions.add_parser("create", help="create a namespace (admin)")
    create.add_argument("name")
    create.add_argument("--dim", type=int, required=True, help="width of keys and queries")
    create.add_argument("--metric", choices=METRICS, default=_default(NamespaceConfig, "metric"),
                        help="l2: squared Euclidean; ip: inner product (default l2)")
    create.add_argument("--index", choices=INDEXES, default=_default(NamespaceConfig, "index"))
    create.add_argument("--value-dim", type=int, default=_default(NamespaceConfig, "value_dim"),
                        help="width of the learnable value rows (default 0: none)")
    create.add_argument("--max-k", type=int, default=_default(NamespaceConfig, "max_k"),
                        help="the largest k a search may ask for (default 1024)")
    create.add_argument("--key-dtype", choices=KEY_DTYPES, default=_default(NamespaceConfig, "key_dtype"),
                        help="storage dtype of keys on GPU shards (CPU shards keep float32)")
    create.add_argument("--optimizer", choices=OPTIMIZERS, default=_default(OptimizerConfig, "name"),
                        help="the value rows' optimizer (default sgd)")
    create.add_argument("--lr", type=float, default=_default(OptimizerConfig, "lr"), help="its learning rate")
    create.add_argument("--nlist", type=int, default=0, help="ivf indexes: inverted lists (0: 1024; docs/INDEXES.md)")
    create.add_argument("--pq-m", type=int, default=0, help="ivf_pq: bytes per code, divides dim (0: the default)")
    create.add_argument("--train-min-rows", type=int, default=0,
                        help="ivf indexes and hnsw: rows a shard holds before it trains its index or builds its "
                             "graph (0: ivf 64 x nlist, hnsw 10000)")
    create.add_argument("--hnsw-m", type=int, default=0, help="hnsw: the graph's degree M, in [2, 512] (0: 32)")
    create.add_argument("--ef-construction", type=int, default=0,
                        help="hnsw: the build's beam width, in [1, 4096] (0: 64)")
    for option in _OPTIMIZER_OPTIONS:
        create.add_argument(f"--{option.replace('_', '-')}", type=float, default=None,
                            help=f"optimizer option {option} (datastore/optimizers.py; default: the optimizer's)")

    listing = actions.add_parser("list", help="the namespaces (those the token may see) and their configs")
    describe = actions.add_parser("describe", help="a namespace's config, rows, and rows and state per shard")
    describe.add_argument("name")
    drop = actions.add_parser("drop", help="drop a namespace and every row in it (admin; cannot be undone)")
    drop.add_argument("name")
    drop.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for action, timeout_s in ((create, 60.0), (listing, 10.0), (describe, 10.0), (drop, 600.0)):
        add_connection_options(action, timeout_s)
        action.set_defaults(run=run_namespace)
    for action in (listing, describe):
        action.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def _config_line(config: NamespaceConfig) -> str:
    optimizer = config.optimizer
    index = config.index
    if config.nlist:
        index += f" (nlist {config.nlist}{f', pq_m {config.pq_m}' if config.pq_m else ''}, " \
                 f"trains at {config.train_min_rows:,} rows a shard)"
    elif config.hnsw_m:
        index += f" (hnsw_m {config.hnsw_m}, ef_construction {config.ef_construction}, " \
                 f"builds at {config.train_min_rows:,} rows a shard)"
    return (f"dim {config.dim}, {config.metric}, {index}, value_dim {config.value_dim}, max_k {config.max_k}, "
            f"keys {config.key_dtype}, optimizer {optimizer.name} (lr {optimizer.lr:g})")


def _create(client, args) -> int:
    options = {name: getattr(args, name) for name in _OPTIMIZER_OPTIONS if getattr(args, name) is not None}
    config = client.create_namespace(args.name, dim=args.dim, metric=args.metric, index=args.index,
                                     value_dim=args.value_dim, max_k=args.max_k, key_dtype=args.key_dtype,
                                     optimizer=args.optimizer, lr=args.lr, nlist=args.nlist, pq_m=args.pq_m,
                                     train_min_rows=args.train_min_rows, hnsw_m=args.hnsw_m,
                                     ef_construction=args.ef_construction, **options)
    print(f"created {config.name}: {_config_line(config)}")
    return 0


def _list(client, args) -> int:
    configs = client.list_namespaces()
    if args.json:
        print(json.dumps([config.to_dict() for config in configs], indent=2))
        return 0
    if not configs:
        print(f"{args.address}: no namespaces")
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{args.address}: {len(configs)} namespace(s)"), title_justify="left")
    for column in ("name", "dim", "metric", "index", "value_dim", "max_k", "keys", "optimizer"):
        table.add_column(column, justify="right" if column in ("dim", "value_dim", "max_k") else "left")
    for config in configs:
        table.add_row(config.name, str(config.dim), config.metric, config.index, str(config.value_dim),
                      str(config.max_k), config.key_dtype, f"{config.optimizer.name} (lr {config.optimizer.lr:g})")
    console().print(table)
    return 0


def _describe(client, args) -> int:
    described = client.describe_namespace(args.name)
    if args.json:
        print(json.dumps({"config": described.config.to_dict(), "rows": described.rows, "next_id": described.next_id,
                          "shards": described.shards}, indent=2))
        return 0
    from rich.table import Table

    out = console()
    out.print(f"{described.config.name}: {_config_line(described.config)}", markup=False)
    out.print(f"{described.rows:,} rows; next id {described.next_id}", markup=False)
    table = Table()
    for column in ("shard", "rows", "device", "backend", "state", "index"):
        table.add_column(column, justify="right" if column in ("shard", "rows") else "left")
    for shard in described.shards:
        index = shard.get("index_state") or "-"
        if shard.get("index_trainings"):
            index += f" ({shard['index_trainings']} builds, {shard.get('index_tombstones', 0):,} tombstones"
            index += f", {shard['index_unindexed']:,} waiting for the graph)" if shard.get("index_unindexed") else ")"
        table.add_row(str(shard["shard"]), f"{shard['rows']:,}", shard["device"] or "-", shard["backend"] or "-",
                      shard["state"], index)
    out.print(table)
    return 0


def _confirmed(client, name: str) -> bool:
    """Asks on the terminal; True when the operator typed the namespace's name."""
    rows = client.describe_namespace(name).rows  # NotFound before asking about a namespace that is not there
    try:
        typed = input(f"Drop namespace {name!r} and its {rows:,} rows? This cannot be undone. "
                      "Type its name to confirm: ")
    except (EOFError, KeyboardInterrupt):
        print()
        return False
    return typed.strip() == name


def _drop(client, args) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"monim namespace drop: not dropping {args.name!r}: pass --yes (stdin is not a terminal to "
                  "confirm on)", file=sys.stderr)
            return 2
        if not _confirmed(client, args.name):
            print(f"not dropped: {args.name!r} was not typed", file=sys.stderr)
            return 1
    rows = client.drop_namespace(args.name)
    print(f"dropped {args.name}: {rows:,} rows")
    return 0


_ACTIONS = {"create": _create, "list": _list, "describe": _describe, "drop": _drop}


def run_namespace(args) -> int:
    from monim.model_client.errors import MemoryStoreError

    try:
        # The client retries create with its request id (it lands once) and never retries drop.
        with connect(args, timeout_s=args.timeout_s) as client:
            return _ACTIONS[args.action](client, args)
    except MemoryStoreError as error:
        print(f"monim namespace {args.action}: {error.message}", file=sys.stderr)
        return 2
