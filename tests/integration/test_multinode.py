"""Multi-node (issue 11, item 8): shards spread over simulated nodes through placement groups, and
a node's death fails over (tests/integration/multinode_scenario.py runs it, in a process of its own
with its own Ray temp dir, so that this cluster is never the session's Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.integration.conftest import ROOT

SCENARIO_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    # A short folder of its own: Ray's socket paths must stay under 108 characters.
    ray_tmp = tempfile.mkdtemp(prefix="monim-mn-", dir="/tmp")
    data_dir = tmp_path_factory.mktemp("multinode-data")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_DISABLE_USAGE_STATS="1")
    process = subprocess.Popen([sys.executable, "-m", "tests.integration.multinode_scenario", str(data_dir)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the scenario and the Ray nodes it started
        out, err = process.communicate()
        pytest.fail(f"the multi-node scenario ran past {SCENARIO_TIMEOUT_S} s:\n{err[-3000:]}")
    assert process.returncode == 0, f"the multi-node scenario failed:\n{err[-5000:]}"
    return json.loads(out.strip().splitlines()[-1])


def test_spread_puts_the_shards_on_distinct_nodes(seen):
    spread = seen["spread"]
    assert spread["actors"] == spread["bundles"], "each shard runs in its placement group's bundle"
    assert len(set(spread["actors"].values())) == 2
    assert set(spread["actors"].values()) <= set(seen["nodes"]), "never on the head (no CPUs)"
    assert seen["exact_before"] is True, seen["exact_before"]


def test_strict_pack_puts_them_on_one_node(seen):
    packed = seen["strict_pack"]
    assert packed["actors"] == packed["bundles"] and len(set(packed["actors"].values())) == 1
    assert seen["packed_groups_left"] == [], "a stopped ephemeral deployment gives its bundles back"


def test_strict_spread_beyond_the_nodes_is_refused_and_leaves_nothing(seen):
    message = seen["strict_spread_4"]
    assert message.startswith("the Ray cluster has no room for shards 0-3 placed strict_spread"), message
    assert "add nodes" in message
    assert seen["toomany_left"] == []


def test_a_dead_node_fails_over_with_every_row(seen):
    before, after = seen["spread"]["actors"], seen["after"]["actors"]
    assert before["0"] == seen["victim"] and after["0"] != seen["victim"]
    assert after["0"] in seen["nodes"] and after == seen["after"]["bundles"]
    assert after["1"] == before["1"], "the other shard stays where it was"
    assert seen["exact_after"] is True, seen["exact_after"]
    assert seen["rows_after"] == 3000 and seen["rows_after_add"] == 3010


def test_a_reshard_reserves_and_gives_back_a_group(seen):
    assert seen["groups_at_3"] == ["spread-shards-0-2", "spread-shards-2-3"]
    assert seen["groups_at_2"] == ["spread-shards-0-2"]
    assert seen["exact_at_3"] is True and seen["exact_at_2"] is True, (seen["exact_at_3"], seen["exact_at_2"])


def test_a_reshard_the_cluster_has_no_room_for_is_refused_before_anything_moves(seen):
    assert seen["reshard_8"].startswith("the Ray cluster has no room for shards 2-7 placed spread"), seen["reshard_8"]
    assert seen["groups_after_8"] == ["spread-shards-0-2"] and seen["shards_after_8"] == 2
    assert seen["exact_after_8"] is True, seen["exact_after_8"]
