"""The settings of ``monim serve``: flags, ``MONIM_<FLAG>`` environment variables, a TOML config file.

Every serve flag may be set three more ways than its default. Highest first:

1. the command line (``--data-dir /srv/monim``);
2. the environment: ``MONIM_`` and the flag's name in capitals with '_' for '-'
   (``MONIM_DATA_DIR=/srv/monim``; ``--ephemeral``: ``MONIM_EPHEMERAL=1``; an empty value is unset);
3. the config file of ``--config FILE`` (or ``MONIM_CONFIG=FILE``): TOML, one key per flag, named
   as the flag without its dashes, with '-' or '_' (``data-dir = "/srv/monim"``,
   ``ephemeral = true``). Relative paths in the file (data-dir, snapshot-root, auth-file, tls-*)
   are relative to the file's folder.

A key the file does not know, a value of the wrong type (``port = "50051"``) or out of range
(``port = 70000``, ``fsync = "sometimes"``), from any of the three, raises InvalidArgument naming
the flag, the variable, or the file and key. This module imports only the standard library and
the contract (monim.protos), so a bad setting is refused before torch or Ray is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re

from monim.protos.errors import InvalidArgument
from monim.workers.server_files import read_toml
from monim.workers.shard_groups import STRATEGIES

ENV_PREFIX = "MONIM_"
CONFIG_ENV = "MONIM_CONFIG"
# Flags whose relative paths in a config file are taken from the file's folder (URIs are left as they are).
PATH_KEYS = ("data_dir", "snapshot_root", "auth_file", "tls_cert", "tls_key", "tls_client_ca")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PORT = "is not a port (0 to 65535; 0: a free one)"


def fsync_policy_ok(policy: str) -> bool:
    """The grammar of datastore/wal.py's parse_fsync (always | batch_ms=N with N > 0 | never), without
    importing the datastore package (which imports torch). tests/unit/test_serve_config.py holds the two
    to the same answers."""
    if policy in ("always", "never"):
        return True
    if not policy.startswith("batch_ms="):
        return False
    try:
        return float(policy.split("=", 1)[1]) > 0
    except ValueError:
        return False


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int | None:
    """"8GiB", "512 MB", "1000000" -> bytes (positive); None if it is not such a size."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        return None
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    return size if size > 0 else None


def format_size(count: float) -> str:
    """Bytes as people read them: "512 bytes", "1.5 GiB" (parse_size reads it back)."""
    if count < 1024:
        return f"{int(count):,} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"


# dest -> (what a good value satisfies, what the message says of a bad one); applied whatever the source.
_CHECKS = {
    "port": (lambda v: 0 <= v <= 65535, _PORT),
    "metrics_port": (lambda v: 0 <= v <= 65535, _PORT),
    "shards": (lambda v: v >= 1, "must be at least 1"),
    "num_cpus": (lambda v: v >= 1, "must be at least 1"),
    "shard_cpus": (lambda v: math.isfinite(v) and v >= 0, "must be 0 or more CPUs"),
    "placement": (lambda v: v in STRATEGIES, f"is not a placement ({', '.join(STRATEGIES)})"),
    "snapshot_every": (lambda v: v >= 0, "must be 0 (no automatic snapshots) or more log records"),
    "grace_s": (lambda v: math.isfinite(v) and v >= 0, "must be 0 or more seconds"),
    "fsync": (fsync_policy_ok, "is not an fsync policy (always, batch_ms=N with N > 0, or never)"),
    "shard_memory_budget": (lambda v: parse_size(v) is not None,
                            "is not a size (bytes, or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB)"),
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One serve flag: its argparse dest, its flag (``--data-dir``), its type and default."""

    dest: str
    flag: str
    kind: type
    default: object

    @property
    def key(self) -> str:
        return self.flag[2:]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def defer_defaults(parser: argparse.ArgumentParser) -> dict[str, Option]:
    """The serve parser's flags (all but --help and --config), as {dest: Option}. Their argparse
    defaults become SUPPRESS, so that what the parser returns holds only the flags given on the
    command line; ``resolve`` fills in the rest."""
    options = {}
    for action in parser._actions:  # argparse keeps its actions here; there is no public accessor
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        kind = bool if action.nargs == 0 else (action.type or str)
        flag = max(action.option_strings, key=len)
        options[action.dest] = Option(action.dest, flag, kind, action.default)
        action.default = argparse.SUPPRESS
    return options


def _shown(value) -> str:
    """A value as TOML would write it, or what it is when that says more."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a value came from: "flag", "env" (with the variable's text) or "file" (with its path, key
    and the value as written)."""

    kind: str
    text: str = ""
    path: str = ""
    key: str = ""

    def name(self, option: Option, value) -> str:
        if self.kind == "env":
            return f"{option.env}={self.text}"
        if self.kind == "file":
            return f"{self.path}: {self.key} = {self.text}"
        shown = f"{value:g}" if isinstance(value, float) else json.dumps(value) if value == "" else str(value)
        return f"{option.flag} {shown}"


def _typed(option: Option, value, where: str):
    """A TOML value of the option's type (an integer is a number too), else InvalidArgument."""
    kind = option.kind
    if isinstance(value, bool):
        good = kind is bool
    elif kind is float:
        good = isinstance(value, (int, float))
        value = float(value) if good else value
    else:
        good = isinstance(value, kind)
    if not good:
        raise InvalidArgument(f"{where} must be {_KIND_NAMES[kind]}, got {_shown(value)}")
    return value


def load_config(path: str, options: dict[str, Option]) -> dict[str, tuple[object, _Source]]:
    """Reads and checks a config file: {dest: (value, source)}. InvalidArgument names the file and
    the first problem: unreadable, not TOML, an unknown key, one flag under two spellings, a wrong type."""
    data = read_toml(path, "config file")
    by_key = {spelling: option for option in options.values() for spelling in (option.key, option.dest)}
    folder = os.path.dirname(os.path.abspath(path))
    found: dict[str, tuple[object, _Source]] = {}
    for key, value in data.items():
        option = by_key.get(key)
        if option is None:
            close = difflib.get_close_matches(key, [o.key for o in options.values()], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else \
                f"; the keys are serve's flags: {', '.join(o.key for o in options.values())}"
            raise InvalidArgument(f"{path}: unknown key {key!r}{hint}")
        if option.dest in found:
            raise InvalidArgument(f"{path}: {found[option.dest][1].key} and {key} are the same setting; keep one")
        written = _shown(value)
        value = _typed(option, value, f"{path}: {key}")
        if option.dest in PATH_KEYS and value and "://" not in value and not os.path.isabs(value):
            value = os.path.join(folder, value)
        found[option.dest] = (value, _Source("file", text=written, path=path, key=key))
    return found


def read_env(options: dict[str, Option], environ) -> dict[str, tuple[object, _Source]]:
    """The MONIM_<FLAG> variables that are set and not empty: {dest: (value, source)}."""
    found = {}
    for option in options.values():
        text = environ.get(option.env, "")
        if not text:
            continue
        where = f"{option.env}={text}"
        if option.kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise InvalidArgument(f"{where} must be true or false (1/0, yes/no, on/off)")
            value = text.lower() in _TRUE
        elif option.kind in (int, float):
            try:
                value = option.kind(text)
            except ValueError:
                raise InvalidArgument(f"{where} must be {_KIND_NAMES[option.kind]}") from None
        else:
            value = text
        found[option.dest] = (value, _Source("env", text=text))
    return found


def resolve(args: argparse.Namespace, options: dict[str, Option], environ=os.environ) -> list[str]:
    """Fills in every serve flag of ``args`` (as the serve parser with ``defer_defaults`` returned it)
    from the command line, else the environment, else the config file, else its default; checks
    every value. Returns what to tell the operator about where settings came from (lines; none when
    everything came from flags and defaults). InvalidArgument names the bad setting and its source."""
    config_path = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    from_file = load_config(config_path, options) if config_path else {}
    from_env = read_env(options, environ)
    sources: dict[str, _Source] = {}
    for dest, option in options.items():
        if hasattr(args, dest):
            sources[dest] = _Source("flag")
        elif dest in from_env:
            value, sources[dest] = from_env[dest]
            setattr(args, dest, value)
        elif dest in from_file:
            value, sources[dest] = from_file[dest]
            setattr(args, dest, value)
        else:
            setattr(args, dest, option.default)
            continue
        value = getattr(args, dest)
        if option.kind is str and value is not None and not value.strip():
            raise InvalidArgument(f"{sources[dest].name(option, value)} must not be empty")
        check = _CHECKS.get(dest)
        if check is not None and value is not None and not check[0](value):
            raise InvalidArgument(f"{sources[dest].name(option, value)} {check[1]}")
    args.config = config_path
    lines = []
    if config_path:
        keys = [s.key for s in sources.values() if s.kind == "file"]
        lines.append(f"config {config_path}: {', '.join(keys) or 'each of its settings is overridden'} "
                     "(flags and MONIM_* variables override it)")
    variables = [options[dest].env for dest, s in sources.items() if s.kind == "env"]
    if variables:
        lines.append(f"from the environment: {', '.join(variables)}")
    return lines
