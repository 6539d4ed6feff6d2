"""What `monim serve` does about Ray's token auth (workers/runtime.py), without starting Ray."""

from __future__ import annotations

import sys

import pytest
from monim.workers.runtime import prepare_ray_auth, ray_auth_line, ray_token_source


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in `monim serve`, before Ray is imported
    return tmp_path


def token_file(home):
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("t0ken")
    return str(home / ".ray" / "auth_token")


def test_the_local_ray_gets_token_auth_unless_the_operator_chose(home):
    environ = {"HOME": str(home)}
    assert prepare_ray_auth(None, environ) == "token" and environ["RAY_AUTH_MODE"] == "token"
    environ = {"HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    assert prepare_ray_auth(None, environ) is None and environ["RAY_AUTH_MODE"] == "disabled"


def test_a_joined_cluster_is_left_as_its_nodes_run_it(home):
    environ = {"HOME": str(home)}
    assert prepare_ray_auth("auto", environ) is None and "RAY_AUTH_MODE" not in environ  # no token at hand
    assert prepare_ray_auth("10.0.0.5:6379", environ) is None and "RAY_AUTH_MODE" not in environ
    path = token_file(home)
    assert ray_token_source(environ) == path
    assert prepare_ray_auth("10.0.0.5:6379", environ) is None and "RAY_AUTH_MODE" not in environ
    assert prepare_ray_auth("auto", environ) == "token" and environ["RAY_AUTH_MODE"] == "token"  # as Ray would


def test_nothing_is_changed_once_ray_is_imported(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", object())
    environ = {"HOME": str(home)}
    assert prepare_ray_auth(None, environ) is None and "RAY_AUTH_MODE" not in environ


def test_the_line_says_what_it_means_and_what_to_do(home):
    path = token_file(home)
    on = ray_auth_line(None, "2.60.0", started=True, environ={"HOME": str(home), "RAY_AUTH_MODE": "token"})
    assert on.startswith("Ray token auth on") and path in on and "local Ray" in on
    from_env = ray_auth_line("auto", "2.60.0", started=False,
                             environ={"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})
    assert "$RAY_AUTH_TOKEN" in from_env and "x" not in from_env.replace("RAY_AUTH_TOKEN", "").replace("auto", "")
    off_local = ray_auth_line(None, "2.60.0", started=True, environ={"RAY_AUTH_MODE": "disabled"})
    assert off_local.startswith("Ray token auth off") and "unset RAY_AUTH_MODE" in off_local
    off_joined = ray_auth_line("auto", "2.60.0", started=False, environ={})
    assert "cluster at auto" in off_joined and "RAY_AUTH_MODE=token" in off_joined and "OPERATIONS" in off_joined
    assert "no token auth" in ray_auth_line(None, "2.40.0", started=True, environ={"RAY_AUTH_MODE": "token"})
