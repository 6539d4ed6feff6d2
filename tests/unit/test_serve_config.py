"""monim serve's settings: a TOML config file, MONIM_* variables and flags, their precedence, and
bad values refused at start (exit 2, one line naming the key, neither torch nor Ray imported)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from monim.protos.errors import InvalidArgument
from monim.workers.cli import parse_serve_args
from monim.workers.serve_config import fsync_policy_ok

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Every serve flag with a value that is not its default: (flag, TOML value, the value in args).
EVERY_FLAG = [
    ("--host", '"0.0.0.0"', "0.0.0.0"),
    ("--port", "50999", 50999),
    ("--shards", "3", 3),
    ("--ray-address", '"auto"', "auto"),
    ("--num-cpus", "6", 6),
    ("--shard-cpus", "0.5", 0.5),
    ("--placement", '"strict_spread"', "strict_spread"),
    ("--deployment", '"memory-a"', "memory-a"),
    ("--data-dir", '"/srv/monim"', "/srv/monim"),
    ("--ephemeral", "true", True),
    ("--fsync", '"batch_ms=5"', "batch_ms=5"),
    ("--snapshot-every", "500", 500),
    ("--snapshot-root", '"s3://bucket/snapshots"', "s3://bucket/snapshots"),
    ("--shard-memory-budget", '"8GiB"', "8GiB"),
    ("--auth-file", '"/etc/monim/auth.toml"', "/etc/monim/auth.toml"),
    ("--tls-cert", '"/etc/monim/server.pem"', "/etc/monim/server.pem"),
    ("--tls-key", '"/etc/monim/server.key"', "/etc/monim/server.key"),
    ("--tls-client-ca", '"/etc/monim/clients.pem"', "/etc/monim/clients.pem"),
    ("--metrics-port", "9464", 9464),
    ("--metrics-host", '"10.0.0.5"', "10.0.0.5"),
    ("--no-read-endpoints", "true", True),
    ("--grace-s", "12.5", 12.5),
]


def settings(args) -> dict:
    """What the server is started with: every setting but the parser's own entries."""
    return {k: v for k, v in vars(args).items() if k not in ("run", "serve_options", "config", "command")}


def write(tmp_path, text: str, name: str = "monim.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_flag_has_a_key_and_a_file_gives_what_the_flags_give(tmp_path):
    flags = [part for flag, _, value in EVERY_FLAG for part in ([flag] if value is True else [flag, str(value)])]
    from_flags, _ = parse_serve_args(flags, environ={})
    config = write(tmp_path, "".join(f"{flag[2:]} = {toml}\n" for flag, toml, _ in EVERY_FLAG))
    from_file, lines = parse_serve_args(["--config", config], environ={})
    assert settings(from_file) == settings(from_flags)
    assert settings(from_file) == {flag[2:].replace("-", "_"): value for flag, _, value in EVERY_FLAG}
    defaults, _ = parse_serve_args([], environ={})
    assert all(settings(defaults)[key] != value for key, value in settings(from_file).items()), \
        "a value in EVERY_FLAG is the flag's default: the test would not see it missed"
    assert lines and config in lines[0] and "grace-s" in lines[0]


def test_the_command_line_beats_the_environment_which_beats_the_file(tmp_path):
    config = write(tmp_path, 'port = 50001\nshards = 4\nfsync = "never"\ndeployment = "from-file"\n')
    environ = {"MONIM_PORT": "50002", "MONIM_SHARDS": "5", "MONIM_EPHEMERAL": "yes"}
    args, lines = parse_serve_args(["--config", config, "--port", "50003"], environ=environ)
    assert (args.port, args.shards, args.fsync, args.deployment, args.ephemeral) == (50003, 5, "never", "from-file", True)
    assert args.host == "127.0.0.1" and args.grace_s == 30.0  # untouched: the defaults
    assert any("MONIM_SHARDS" in line and "MONIM_EPHEMERAL" in line for line in lines)
    # MONIM_CONFIG names the file when --config does not; an empty variable is unset.
    args, _ = parse_serve_args([], environ={"MONIM_CONFIG": config, "MONIM_PORT": ""})
    assert (args.port, args.shards, args.config) == (50001, 4, config)


def test_keys_take_either_spelling_and_relative_paths_follow_the_file(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = write(folder, 'data_dir = "data"\nauth-file = "auth.toml"\nsnapshot-root = "gs://b/s"\n'
                           'tls_cert = "/abs/server.pem"\nmetrics_port = 0\n')
    args, _ = parse_serve_args(["--config", config], environ={})
    assert args.data_dir == str(folder / "data") and args.auth_file == str(folder / "auth.toml")
    assert args.snapshot_root == "gs://b/s" and args.tls_cert == "/abs/server.pem" and args.metrics_port == 0


@pytest.mark.parametrize("text, message", [
    ("prot = 50051\n", "monim.toml: unknown key 'prot' (did you mean 'port'?)"),
    ("[serve]\nport = 1\n", "monim.toml: unknown key 'serve'; the keys are serve's flags: host, port"),
    ('port = "50051"\n', 'monim.toml: port must be an integer, got "50051"'),
    ("shards = 2.5\n", "monim.toml: shards must be an integer, got 2.5"),
    ("ephemeral = 1\n", "monim.toml: ephemeral must be true or false, got 1"),
    ("grace_s = true\n", "monim.toml: grace_s must be a number, got true"),
    ("port = 70000\n", "monim.toml: port = 70000 is not a port (0 to 65535; 0: a free one)"),
    ("shards = 0\n", "monim.toml: shards = 0 must be at least 1"),
    ("grace-s = -1\n", "monim.toml: grace-s = -1 must be 0 or more seconds"),
    ('fsync = "sometimes"\n', 'monim.toml: fsync = "sometimes" is not an fsync policy'),
    ('host = ""\n', 'monim.toml: host = "" must not be empty'),
    ('data-dir = "a"\ndata_dir = "b"\n', "monim.toml: data-dir and data_dir are the same setting"),
    ("port = [\n", "not valid TOML"),
])
def test_bad_config_files_name_the_key(tmp_path, text, message):
    with pytest.raises(InvalidArgument) as raised:
        parse_serve_args(["--config", write(tmp_path, text)], environ={})
    assert message in raised.value.message


@pytest.mark.parametrize("environ, flags, message", [
    ({"MONIM_PORT": "abc"}, [], "MONIM_PORT=abc must be an integer"),
    ({"MONIM_EPHEMERAL": "maybe"}, [], "MONIM_EPHEMERAL=maybe must be true or false"),
    ({"MONIM_METRICS_PORT": "99999"}, [], "MONIM_METRICS_PORT=99999 is not a port"),
    ({"MONIM_FSYNC": "batch_ms=0"}, [], "MONIM_FSYNC=batch_ms=0 is not an fsync policy"),
    ({}, ["--shards", "0"], "--shards 0 must be at least 1"),
    ({}, ["--shard-cpus", "nan"], "--shard-cpus nan must be 0 or more CPUs"),
    ({"MONIM_PLACEMENT": "SPREAD"}, [], "MONIM_PLACEMENT=SPREAD is not a placement (spread, strict_spread, pack, "
                                        "strict_pack)"),
    ({}, ["--config", "/no/such/monim.toml"], "config file /no/such/monim.toml: no such file"),
])
def test_bad_variables_and_flags_name_themselves(environ, flags, message):
    with pytest.raises(InvalidArgument) as raised:
        parse_serve_args(flags, environ=environ)
    assert message in raised.value.message


def test_the_fsync_check_agrees_with_the_log():
    from monim.datastore.wal import parse_fsync

    for policy in ("always", "never", "batch_ms=5", "batch_ms=0.5", "batch_ms=0", "batch_ms=-1", "batch_ms=x",
                   "batch_ms=", "batch_ms=nan", "batch_ms=inf", "sometimes", "", "Always", "batch_ms=1e3"):
        try:
            parse_fsync(policy)
            accepted = True
        except InvalidArgument:
            accepted = False
        assert fsync_policy_ok(policy) == accepted, policy


# ----- at start, through the command ---------------------------------------------------------------
SERVE_AND_REPORT = """
import json, sys
from monim.workers.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "heavy": [m for m in ("torch", "ray", "pyarrow", "faiss") if m in sys.modules]}))
"""


@pytest.mark.parametrize("text, key", [
    ("prot = 50051\n", "'prot'"),
    ('port = "50051"\n', "port must be an integer"),
    ("metrics-port = 70000\n", "metrics-port = 70000"),
    ('fsync = "sometimes"\n', 'fsync = "sometimes"'),
])
def test_serve_refuses_a_bad_config_file_before_anything_starts(tmp_path, text, key):
    config = write(tmp_path, text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONIM_")}
    done = subprocess.run([sys.executable, "-c", SERVE_AND_REPORT, "serve", "--config", config, "--ephemeral"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 2, "heavy": []}, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"monim serve: {config}: ")
    assert key in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "monim.workers.cli", "serve", "--config", config], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and key in done.stderr


def test_a_shard_memory_budget_is_a_size_and_a_bad_one_is_refused_naming_the_key(tmp_path):
    from monim.workers.serve_config import parse_size

    assert [parse_size(text) for text in ("8GiB", "512 MB", "1000000", "1.5KiB")] == [8 << 30, 512 * 10**6, 10**6, 1536]
    assert [parse_size(text) for text in ("0", "x", "-1GiB", "8 parsecs")] == [None] * 4
    config = write(tmp_path, 'shard-memory-budget = "lots"\n')
    result = subprocess.run([sys.executable, "-m", "monim.workers.cli", "serve", "--config", config],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "shard-memory-budget" in result.stderr and "is not a size" in result.stderr
