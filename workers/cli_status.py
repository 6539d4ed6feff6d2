"""``monim status``: a table per namespace, one row per shard, from a running server.

    monim status [--address HOST:PORT] [--metrics URL ...] [--json] [--watch [SECONDS]]
                 [--token T] [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]

What comes from where:
- the gRPC API (ListNamespaces, DescribeNamespace): each namespace's config and rows, and per shard
  its rows, device and state;
- the front end's Prometheus endpoint, when --metrics names it (``monim serve --metrics-port``;
  workers/metrics.py): per shard its node, the bytes the namespace's columns hold, the host and
  GPU memory its process uses and what is free there, its last snapshot's age and log size (and
  "failed" when its log failed), and where its read endpoint listens with the Decode streams open
  on it; per namespace its data calls per second and their p99 latency
  over the last minute. Without --metrics these show "-". With several front ends, give each
  one's URL: requests/s are summed, and the p99 is the largest of theirs.

``--json`` prints the same as one JSON object (``--watch`` with ``--json``: one object a line);
``--watch`` redraws every SECONDS (default 2) until Ctrl-C. A server that does not answer, or
refuses the token, is one line on stderr and exit code 2 (under --watch, a line in the view).
"""

from __future__ import annotations

import collections
import datetime
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from monim.workers.cli_client import add_connection_options, connect, console

WATCH_S = 2.0
SHARD_FIELDS = ("shard", "node", "node_id", "device", "rows", "bytes", "host_memory_used_bytes",
                "host_memory_free_bytes", "gpu_memory_used_bytes", "gpu_memory_free_bytes", "state",
                "snapshot_age_s", "wal_bytes", "endpoint", "endpoint_streams")
COLUMNS = ("shard", "node", "device", "rows", "bytes", "host used / free", "GPU used / free", "req/s (1 min)",
           "p99 (1 min)", "state", "last snapshot", "read endpoint (streams)")


def add_status_command(commands) -> None:
    status = commands.add_parser("status", help="a table per namespace and shard of a running server")
    add_connection_options(status, timeout_s=10.0)
    status.add_argument("--metrics", action="append", default=[], metavar="URL",
                        help="the server's metrics endpoint (monim serve --metrics-port), e.g. "
                             "http://HOST:9464/metrics; repeat it for each front end (default: none, and node, "
                             "memory, requests/s, p99 and last snapshot show '-')")
    status.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    status.add_argument("--watch", type=float, nargs="?", const=WATCH_S, default=None, metavar="SECONDS",
                        help=f"redraw every SECONDS (default {WATCH_S:g}) until Ctrl-C")
    status.set_defaults(run=run_status)


# ----- the metrics endpoint ---------------------------------------------------------------------
def metrics_url(text: str) -> str:
    """HOST:PORT, http://HOST:PORT or a full URL -> the URL of the metrics page."""
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    return parts._replace(path=parts.path if parts.path not in ("", "/") else "/metrics").geturl()


def scrape(url: str, timeout_s: float) -> dict:
    """One scrape of a front end's metrics -> {"shards": {shard: {field: value}}, "namespaces":
    {name: {"bytes": {shard: bytes}, "requests_per_s": x, "p99_latency_s": y}}} (fields it lacks are absent).
    OSError (URLError included) when it does not answer; ValueError when the page is not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        text = answer.read().decode("utf-8", errors="replace")
    shards: dict[int, dict] = collections.defaultdict(dict)
    namespaces: dict[str, dict] = collections.defaultdict(lambda: {"bytes": {}})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            shard = int(labels["shard"]) if "shard" in labels else None
            if name == "monim_shard_info":
                shards[shard].update(node=labels["node"], node_id=labels["node_id"], device=labels["device"])
            elif name in ("monim_shard_memory_used_bytes", "monim_shard_memory_free_bytes"):
                shards[shard][f"{labels['memory']}_memory_{name.split('_')[-2]}_bytes"] = int(value)
            elif name == "monim_shard_state" and value == 1:
                shards[shard]["state"] = labels["state"]
            elif name == "monim_snapshot_age_seconds":
                shards[shard]["snapshot_age_s"] = value
            elif name == "monim_wal_bytes":
                shards[shard]["wal_bytes"] = int(value)
            elif name == "monim_read_endpoint_info":
                shards[shard]["endpoint"] = labels["target"]
            elif name == "monim_read_endpoint_streams":
                shards[shard]["endpoint_streams"] = int(value)
            elif name == "monim_namespace_bytes":
                namespaces[labels["namespace"]]["bytes"][shard] = int(value)
            elif name == "monim_namespace_requests_per_second":
                namespaces[labels["namespace"]]["requests_per_s"] = value
            elif name == "monim_namespace_request_p99_seconds":
                namespaces[labels["namespace"]]["p99_latency_s"] = value
            elif name == "monim_read_endpoint_namespace_requests_per_second":
                namespaces[labels["namespace"]]["endpoint_requests_per_s"] = value
            elif name == "monim_read_endpoint_namespace_request_p99_seconds":
                namespaces[labels["namespace"]]["endpoint_p99_latency_s"] = value
    return {"shards": dict(shards), "namespaces": dict(namespaces)}


def _merged(scrapes: list[dict]) -> dict:
    """Several front ends' scrapes as one: shard figures and bytes from the first that has them
    (every front end reads the same shards), requests/s summed, the largest p99; the reads the shards'
    read endpoints answered (every front end reports the same) added once, from the first scrape."""
    shards: dict[int, dict] = collections.defaultdict(dict)
    namespaces: dict[str, dict] = collections.defaultdict(lambda: {"bytes": {}, "requests_per_s": 0.0})
    for one in scrapes:
        for shard, fields in one["shards"].items():
            for key, value in fields.items():
                shards[shard].setdefault(key, value)
        for name, fields in one["namespaces"].items():
            merged = namespaces[name]
            for shard, value in fields["bytes"].items():
                merged["bytes"].setdefault(shard, value)
            merged["requests_per_s"] += fields.get("requests_per_s", 0.0)
            if "p99_latency_s" in fields:
                merged["p99_latency_s"] = max(merged.get("p99_latency_s", 0.0), fields["p99_latency_s"])
            for key in ("endpoint_requests_per_s", "endpoint_p99_latency_s"):
                if key in fields:
                    merged.setdefault(key, fields[key])
    for merged in namespaces.values():
        merged["requests_per_s"] += merged.pop("endpoint_requests_per_s", 0.0)
        if "endpoint_p99_latency_s" in merged:
            merged["p99_latency_s"] = max(merged.get("p99_latency_s", 0.0), merged.pop("endpoint_p99_latency_s"))
    return {"shards": shards, "namespaces": namespaces}


# ----- the report ---------------------------------------------------------------------------------
def collect(client, address: str, urls: list[str], timeout_s: float) -> dict:
    """The report ``--json`` prints: {"address", "time", "metrics" (the URLs asked), "metrics_errors"
    ({url: why} for those that did not answer), "namespaces": [{"name", "config", "rows", "next_id",
    "requests_per_s", "p99_latency_s", "shards": [{SHARD_FIELDS}]}]}. A figure nobody reported is None.
    MemoryStoreError when the server does not answer or refuses."""
    from monim.model_client.errors import NotFound

    scrapes, errors = [], {}
    for url in urls:
        try:
            scrapes.append(scrape(url, timeout_s))
        except (OSError, ValueError) as error:
            errors[url] = str(getattr(error, "reason", None) or error)
    metrics = _merged(scrapes) if scrapes else None
    namespaces = []
    for config in client.list_namespaces():
        try:
            described = client.describe_namespace(config.name)
        except NotFound:  # dropped since the list
            continue
        found = metrics["namespaces"].get(config.name, {"bytes": {}}) if metrics else {"bytes": {}}
        shards = []
        for stats in described.shards:
            index = stats["shard"]
            probed = metrics["shards"].get(index, {}) if metrics else {}
            shard = dict.fromkeys(SHARD_FIELDS)
            shard.update({key: value for key, value in probed.items() if key in SHARD_FIELDS})
            shard.update(shard=index, rows=stats["rows"], device=stats["device"] or probed.get("device"),
                         bytes=found["bytes"].get(index),
                         state="failed" if probed.get("state") == "failed" else stats["state"])
            shards.append(shard)
        namespaces.append({
            "name": config.name, "config": config.to_dict(), "rows": described.rows, "next_id": described.next_id,
            "requests_per_s": found.get("requests_per_s", 0.0) if metrics else None,
            "p99_latency_s": found.get("p99_latency_s"), "shards": shards})
    return {"address": address, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": list(urls), "metrics_errors": errors, "namespaces": namespaces}


# ----- the tables ---------------------------------------------------------------------------------
def _bytes(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024


def _pair(used, free) -> str:
    return "-" if used is None and free is None else f"{_bytes(used)} / {_bytes(free)}"


def _age(seconds, scraped: bool) -> str:
    if seconds is None:
        return "never" if scraped else "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _latency(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _endpoint(shard: dict) -> str:
    """Where clients reach the shard's read endpoint, and its open Decode streams; "-" while none runs."""
    if shard["endpoint"] is None:
        return "-"
    return f"{shard['endpoint']} ({shard['endpoint_streams'] or 0})"


def _nodes(shards: list[dict]) -> dict[int, str]:
    """The node column: the host name, and the start of the Ray node id where one host name stands
    for several nodes (simulated nodes on one machine)."""
    ids_by_name = collections.defaultdict(set)
    for shard in shards:
        ids_by_name[shard["node"]].add(shard["node_id"])
    names = {}
    for shard in shards:
        name = shard["node"]
        if name is None:
            names[shard["shard"]] = "-"
        elif len(ids_by_name[name]) > 1 and shard["node_id"]:
            names[shard["shard"]] = f"{name} ({shard['node_id'][:8]})"
        else:
            names[shard["shard"]] = name
    return names


def namespace_table(namespace: dict, scraped: bool):
    """A rich Table: one row per shard, then the namespace's totals and its requests/s and p99."""
    from rich.table import Table

    config = namespace["config"]
    title = (f"[bold]{namespace['name']}[/bold]: dim {config['dim']}, {config['metric']}, {config['index']}, "
             f"value_dim {config['value_dim']}, keys {config['key_dtype']}, optimizer {config['optimizer']['name']}")
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right" if column in ("shard", "rows", "bytes", "req/s (1 min)",
                                                               "p99 (1 min)") else "left")
    nodes = _nodes(namespace["shards"])
    for shard in namespace["shards"]:
        state = shard["state"] if shard["state"] == "serving" else f"[bold red]{shard['state']}[/bold red]"
        table.add_row(str(shard["shard"]), nodes[shard["shard"]], shard["device"] or "-", f"{shard['rows']:,}",
                      _bytes(shard["bytes"]),
                      _pair(shard["host_memory_used_bytes"], shard["host_memory_free_bytes"]),
                      _pair(shard["gpu_memory_used_bytes"], shard["gpu_memory_free_bytes"]),
                      "", "", state, _age(shard["snapshot_age_s"], scraped), _endpoint(shard))
    table.add_section()
    serving = sum(shard["state"] == "serving" for shard in namespace["shards"])
    sizes = [shard["bytes"] for shard in namespace["shards"]]
    rate = namespace["requests_per_s"]
    table.add_row("all", "", "", f"{namespace['rows']:,}", _bytes(None if None in sizes else sum(sizes)), "", "",
                  "-" if rate is None else f"{rate:,.1f}", _latency(namespace["p99_latency_s"]),
                  "serving" if serving == len(namespace["shards"]) else f"{serving}/{len(namespace['shards'])} serving",
                  "", "")
    return table


def render(report: dict):
    """The whole view: a header line and a table per namespace (a rich renderable)."""
    from rich.console import Group
    from rich.text import Text

    namespaces = report["namespaces"]
    shards = max((len(n["shards"]) for n in namespaces), default=0)
    header = f"{report['address']}: {len(namespaces)} namespace(s)" + (f", {shards} shard(s)" if shards else "")
    answered = [url for url in report["metrics"] if url not in report["metrics_errors"]]
    if answered:
        header += f"; metrics from {', '.join(answered)}"
    elif not report["metrics"]:
        header += "; node, memory, requests/s, p99 and last snapshot need --metrics URL"
    parts = [Text(f"{header}  ({report['time']})")]
    parts += [Text(f"metrics {url}: {why}", style="red") for url, why in report["metrics_errors"].items()]
    parts += [namespace_table(namespace, bool(answered)) for namespace in namespaces]
    return Group(*parts)


# ----- the command --------------------------------------------------------------------------------
def _watch(args, client, urls, out) -> int:
    """Redraws until Ctrl-C: in place on a terminal (rich.live), else one view (or JSON line) after another."""
    from monim.model_client.errors import MemoryStoreError
    from rich.live import Live
    from rich.text import Text

    def view():
        try:
            report = collect(client, args.address, urls, args.timeout_s)
        except MemoryStoreError as error:
            return None, Text(f"{args.address}: {error.message}  (retrying every {args.watch:g} s)", style="red")
        return report, render(report)

    try:
        if args.json or not out.file.isatty():
            while True:
                report, shown = view()
                if args.json:
                    print(json.dumps(report if report is not None else {"address": args.address, "error": shown.plain}),
                          flush=True)
                else:
                    out.print(shown)
                    out.print()
                    out.file.flush()
                time.sleep(args.watch)
        with Live(view()[1], console=out, auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(view()[1], refresh=True)
    except KeyboardInterrupt:
        return 0


def run_status(args) -> int:
    from monim.model_client.errors import MemoryStoreError

    if args.watch is not None and not args.watch > 0:
        print(f"monim status: --watch {args.watch:g} must be more than 0 seconds", file=sys.stderr)
        return 2
    urls = [metrics_url(url) for url in args.metrics]
    out = console()
    try:
        with connect(args, timeout_s=args.timeout_s, retries=0) as client:
            if args.watch is not None:
                return _watch(args, client, urls, out)
            report = collect(client, args.address, urls, args.timeout_s)
    except MemoryStoreError as error:
        print(f"monim status: {args.address}: {error.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        out.print(render(report))  # a metrics endpoint that did not answer is a red line in it
    return 0
