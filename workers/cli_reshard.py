"""``monim reshard --address A --shards N``: moves a running deployment to N shards, with a progress bar.

Reads and writes go on meanwhile (docs/OPERATIONS.md, "Reshard"). Ctrl-C (or the deadline,
--timeout-s, default none) stops the move at the step it reached; the same command resumes it.
Needs an admin token on a server with --auth-file. Errors print one line and exit with code 2;
an interrupted move exits with code 130 and says how to resume it.
"""

from __future__ import annotations

import sys

from monim.workers.cli_client import add_client_options, connect, console


def add_reshard_command(commands) -> None:
    from monim.workers.cli_client import DEFAULT_ADDRESS

    reshard = commands.add_parser("reshard", help="move a running deployment to a new shard count (admin)",
                                  description=__doc__.split("\n\n", 1)[1])
    reshard.add_argument("--address", default=DEFAULT_ADDRESS, help=f"the server (default {DEFAULT_ADDRESS})")
    reshard.add_argument("--shards", type=int, required=True, help="the new shard count")
    reshard.add_argument("--batch-rows", type=int, default=0,
                         help="rows moved per step, at most: writes to them wait while they are copied "
                              "(default: the server's, 16384)")
    reshard.add_argument("--timeout-s", type=float, default=None, help="stop the move after this long (default: none)")
    reshard.add_argument("--no-progress", action="store_true", help="one line per namespace instead of a bar")
    add_client_options(reshard)
    reshard.set_defaults(run=_reshard)


def _description(progress: dict) -> str:
    if progress["done"]:
        return f"{progress['target']} shards"
    if not progress["namespace"]:
        return f"{progress['source']} -> {progress['target']} shards"
    return (f"{progress['source']} -> {progress['target']} shards: {progress['namespace']} "
            f"({progress['namespaces_done'] + 1}/{progress['namespaces']})")


def _reshard(args) -> int:
    from monim.model_client.errors import MemoryStoreError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = console(sys.stderr)
    last = None
    try:
        with connect(args, timeout_s=args.timeout_s or 60.0) as client, \
                Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("ids  {task.fields[rows]:,} rows moved"), TimeElapsedColumn(),
                         console=out, disable=args.no_progress) as bar:
            task = bar.add_task("starting", total=None, rows=0)
            namespace = None
            for last in client.reshard(args.shards, args.batch_rows, timeout_s=args.timeout_s):
                if args.no_progress and last["namespace"] != namespace and last["namespace"]:
                    print(f"moving {last['namespace']} ({last['ids']:,} ids)", file=sys.stderr, flush=True)
                namespace = last["namespace"]
                bar.update(task, description=_description(last), completed=last["ids_done"],
                           total=last["ids"] or None, rows=last["rows_moved"])
    except KeyboardInterrupt:
        print(f"monim reshard: interrupted; the deployment stays as it was at the last step, reads and writes go "
              f"on; run 'monim reshard --shards {args.shards}' again to resume", file=sys.stderr)
        return 130
    except MemoryStoreError as error:
        print(f"monim reshard: {error.message}", file=sys.stderr)
        return 2
    if last is None or not last["done"]:
        print(f"monim reshard: the move stopped before its end; run 'monim reshard --shards {args.shards}' again "
              "to resume it", file=sys.stderr)
        return 2
    print(f"{last['target']} shards; {last['rows_moved']:,} rows moved")
    return 0
