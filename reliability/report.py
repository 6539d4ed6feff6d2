"""The run's tables, on the terminal (rich) and as the section of docs/RELIABILITY.md between MARKERS.

Tables: calls by type (answered, answered after a retry, failed attempts), failed attempts by status
code, faults and their recovery times, the final state of every namespace; then the lines
``acknowledged writes lost: N`` and ``wrong answers: N``, which must both be 0.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import platform
import subprocess
import sys

BEGIN = "<!-- reliability.run: begin (written by python -m reliability.run --report; edit above or below) -->"
END = "<!-- reliability.run: end -->"
SECTION_TITLE = "## Load and faults"


@dataclasses.dataclass
class RunResult:
    command: str
    started: str                       # UTC, ISO 8601
    workload_s: float
    elapsed_s: float
    clients: int
    faults_enabled: list[str]
    machine: dict
    calls: collections.Counter         # type -> answered
    retried: collections.Counter       # type -> answered after a failed attempt
    errors: collections.Counter        # (type, code) -> failed attempts
    refusals: collections.Counter      # (type, code) -> refusals the workload asked for
    failovers: int
    faults: list                       # faults.FaultRecord
    checks: list                       # verify.NamespaceCheck
    wrong: int
    wrong_details: list[str]           # the first ones, "at <s into the workload> s: client <i>: ..."
    unresolved: list[str]
    failures: list[str]                # anything else that fails the run (a client that crashed, ...)
    server_errors: list[str] = dataclasses.field(default_factory=list)  # last lines of tracebacks the servers logged

    @property
    def lost(self) -> int:
        return sum(check.lost for check in self.checks)

    @property
    def unrecovered(self) -> list:
        return [fault for fault in self.faults if not fault.recovered]

    @property
    def passed(self) -> bool:
        return not (self.lost or self.wrong or self.unrecovered or self.unresolved or self.failures) and \
            bool(self.checks)

    def summary_lines(self) -> list[str]:
        recoveries = [f.recovery_s for f in self.faults if f.recovered]
        missing = sum(c.missing for c in self.checks)
        differing = sum(c.differing for c in self.checks)
        extra = sum(c.extra for c in self.checks)
        rows = sum(c.expected_rows for c in self.checks)
        return [
            f"acknowledged writes lost: {self.lost}  (rows checked: {rows:,} in {len(self.checks)} namespaces; "
            f"missing {missing}, differing {differing}, extra {extra})",
            f"wrong answers: {self.wrong}",
            f"faults: {len(self.faults)} injected, {len(self.faults) - len(self.unrecovered)} recovered"
            + (f" (recovery {min(recoveries):.1f} to {max(recoveries):.1f} s)" if recoveries else ""),
            f"unresolved calls: {len(self.unresolved)}",
            f"errors the servers logged with a traceback: {len(self.server_errors)}"
            + "".join(f"\n  {count} x {line}" for line, count in _distinct(self.server_errors)),
        ] + [f"failure: {line}" for line in self.failures]


def _distinct(lines: list[str], shown: int = 5) -> list[tuple[str, int]]:
    """The most frequent lines, with numbers and paths replaced by ... so that the same error counts once."""
    import re

    counts = collections.Counter(re.sub(r"(/[^ ]*|\d+)", "...", line)[:200] for line in lines)
    return counts.most_common(shown)


def machine() -> dict:
    """What the figures depend on: CPU, cores, memory, OS, Python, Ray, the commit."""
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as file:
            memory_gib = int(next(line for line in file if line.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "?"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "os": platform.platform(),
            "python": platform.python_version(), "ray": ray_version, "commit": commit}


def machine_line(info: dict) -> str:
    memory = f"{info['memory_gib']:.0f} GiB" if info.get("memory_gib") else "? GiB"
    return (f"{info['cores']} cores ({info['cpu']}), {memory}, {info['os']}, Python {info['python']}, "
            f"Ray {info['ray']}, commit {info['commit']}")


def _tables(result: RunResult) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table."""
    codes_by_type = collections.defaultdict(collections.Counter)
    for (kind, code), count in result.errors.items():
        codes_by_type[kind][code] += count
    kinds = sorted(set(result.calls) | set(codes_by_type), key=lambda k: -result.calls[k])
    calls = [[kind, f"{result.calls[kind]:,}", f"{result.retried[kind]:,}",
              ", ".join(f"{code} {n:,}" for code, n in codes_by_type[kind].most_common()) or "-"] for kind in kinds]
    calls.append(["all", f"{sum(result.calls.values()):,}", f"{sum(result.retried.values()):,}",
                  f"{sum(result.errors.values()):,} (fail-overs {result.failovers:,})"])
    by_code = collections.Counter()
    for (_, code), count in result.errors.items():
        by_code[code] += count
    asked = collections.Counter()
    for (kind, code), count in result.refusals.items():
        why = {"NOT_FOUND": "of deleted ids", "FAILED_PRECONDITION": "during a reshard"}.get(code, "")
        asked[f"{code} ({kind} {why})" if why else f"{code} ({kind})"] += count
    codes = [[code, f"{count:,}", "failed attempts (retried)"] for code, count in by_code.most_common()]
    codes += [[code, f"{count:,}", "asked for, answered as it must"] for code, count in asked.most_common()]
    faults = [[str(i + 1), f"{f.at_s:.0f}", f.kind, f.target,
               f"{f.recovery_s:.1f}" if f.recovered else "NOT RECOVERED", f.note] for i, f in enumerate(result.faults)]
    checks = [[c.name, f"{c.expected_rows:,}", f"{c.stored_rows:,}", str(c.missing), str(c.differing), str(c.extra),
               c.index] for c in result.checks]
    return [("Calls by type", ["call", "answered", "after a retry", "failed attempts"], calls),
            ("Status codes", ["code", "count", ""], codes or [["-", "0", "no call failed"]]),
            ("Faults", ["#", "at (s)", "fault", "target", "recovery (s)", "note"], faults or [["-"] * 6]),
            ("Final state", ["namespace", "acknowledged rows", "stored rows", "missing", "differing", "extra", "index"],
             checks)]


def print_report(result: RunResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    console.print(f"[bold]monim reliability run[/bold]: {result.command}")
    console.print(f"{result.started}, {result.workload_s:.0f} s of workload ({result.elapsed_s:.0f} s in all), "
                  f"{result.clients} clients; {machine_line(result.machine)}")
    for title, header, rows in _tables(result):
        table = Table(title=title, title_justify="left")
        for name in header:
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in result.wrong_details[:20] + result.unresolved[:20]:
        console.print(line, style="red", markup=False)
    for check in result.checks:
        for line in check.problems:
            console.print(line, style="red", markup=False)
    for line in result.summary_lines():
        console.print(line, style="bold green" if result.passed else "bold red", markup=False)


def markdown(result: RunResult) -> str:
    def escaped(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = [f"Latest run: `{result.command}`, {result.started}, {result.workload_s:.0f} s of workload with "
             f"{result.clients} client processes ({result.elapsed_s:.0f} s in all, start and check included), on "
             f"{machine_line(result.machine)}.", ""]
    for title, header, rows in _tables(result):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(escaped(cell) for cell in row) + " |" for row in rows]
        lines.append("")
    lines += ["```", *result.summary_lines(), "```"]
    if result.wrong_details or result.unresolved:
        lines += ["", f"The first wrong answers and unresolved calls (of {result.wrong} and {len(result.unresolved)}):", ""]
        lines += [f"- {escaped(line[:400])}" for line in result.wrong_details[:8] + result.unresolved[:4]]
    lines += ["", f"Result: {'passed' if result.passed else 'FAILED'} (exit code {0 if result.passed else 1})."]
    return "\n".join(lines)


def write_section(path: str, result: RunResult) -> None:
    """Replaces the text between BEGIN and END in path (adds the section at the end if it has none)."""
    text = open(path).read() if os.path.exists(path) else "# Reliability\n"
    block = f"{BEGIN}\n{markdown(result)}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n{block}\n"
    with open(path, "w") as file:
        file.write(text)
    print(f"wrote the run's tables to {path}", file=sys.stderr)
