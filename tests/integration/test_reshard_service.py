"""Online resharding of a Ray deployment over gRPC (issue 11, acceptance 4): 2 -> 4 -> 3 shards while one
client adds and another searches, through two front ends of one deployment on the session's Ray."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.protos.errors import FailedPrecondition, InvalidArgument

DIM, K = 16, 8


@pytest.fixture
def two_front_ends(ray_joined, tmp_path):
    """A durable deployment of 2 shards (its own actors, on the session's Ray) and two front ends."""
    from monim.workers.embedded import EmbeddedStore

    deployment = f"reshard-{uuid.uuid4().hex[:8]}"
    options = dict(ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment, data_dir=str(tmp_path),
                   snapshot_every=500)
    first = EmbeddedStore(shards=2, **options)
    second = EmbeddedStore(shards=2, **options)
    try:
        yield first, second, deployment, tmp_path
    finally:
        second.server.stop(1).wait()
        first.server.stop(1).wait()
        first.runtime.destroy()


def test_resharding_2_4_3_under_load_fails_no_call_loses_no_row_and_every_search_is_exact(two_front_ends):
    """Every search answer is the brute force over the rows acknowledged before it started, except
    that a row whose Add was in flight may take a place it is nearer for (checked once its Add is
    acknowledged: its id, its distance); no call fails; at the end every acknowledged row is there,
    once, on its owner id % 3, and shard 3 is gone with its folder."""
    first, second, deployment, data_dir = two_front_ends
    rng = np.random.default_rng(0)
    writer = MemoryClient(first.address, timeout_s=120, retries=0)   # a failed call fails the test
    reader = MemoryClient(second.address, timeout_s=120, retries=0)
    admin = MemoryClient(first.address, timeout_s=120)
    admin.create_namespace("ns", dim=DIM)
    lock, stop, errors = threading.Lock(), threading.Event(), []
    acked_keys = [rng.standard_normal((1500, DIM)).astype(np.float32)]
    acked_ids = [writer.add("ns", acked_keys[0], np.arange(1500))]
    answers = []  # (rows acknowledged before the search, queries, ids, distances)

    def adds():
        local = np.random.default_rng(1)
        while not stop.is_set():
            keys = local.standard_normal((20, DIM)).astype(np.float32)
            ids = writer.add("ns", keys, np.arange(20))
            with lock:
                acked_keys.append(keys)
                acked_ids.append(ids)

    def searches():
        local = np.random.default_rng(2)
        while not stop.is_set():
            with lock:
                before = sum(ids.size for ids in acked_ids)
            queries = local.standard_normal((4, DIM)).astype(np.float32)
            found = reader.search("ns", queries, K)
            answers.append((before, queries, found.ids, found.distances))

    def run(target):
        try:
            target()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=run, args=(target,)) for target in (adds, searches)]
    for thread in threads:
        thread.start()
    progress = {}
    try:
        for shards in (4, 3):
            progress[shards] = list(admin.reshard(shards, batch_rows=128))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert [p["done"] for p in progress[3]][-1] and progress[3][-1]["target"] == 3
    assert progress[4][-1]["rows_moved"] > 0 and progress[3][-1]["rows_moved"] > 0
    keys, ids = np.concatenate(acked_keys), np.concatenate(acked_ids)
    assert ids.size > 1500 and len(answers) > 10  # the load ran during the moves

    # every search: exact over what was acknowledged before it
    position = {int(i): n for n, i in enumerate(ids)}
    for before, queries, found_ids, found_distances in answers:
        for row in range(queries.shape[0]):
            got = found_ids[row]
            assert (got >= 0).all() and np.unique(got).size == K
            at = np.array([position[int(i)] for i in got])  # KeyError: an id never acknowledged
            assert np.allclose(found_distances[row], ((keys[at] - queries[row]) ** 2).sum(-1), atol=1e-3)
            distances = ((keys[:before] - queries[row]) ** 2).sum(-1)
            nearest = np.sort(distances)[:K]
            late = at >= before  # rows whose Add was in flight when the search started
            assert np.allclose(np.sort(found_distances[row][~late]), nearest[: (~late).sum()], atol=1e-3)

    # no lost row, each once, on its owner
    described = admin.describe_namespace("ns")
    assert described.rows == ids.size and [s["shard"] for s in described.shards] == [0, 1, 2]
    rows = admin.get("ns", ids)
    assert np.array_equal(rows.keys, keys)
    queries = rng.standard_normal((5, DIM)).astype(np.float32)
    exact = np.argsort(((keys[None] - queries[:, None]) ** 2).sum(-1), axis=1)[:, :K]
    assert np.array_equal(reader.search("ns", queries, K).ids, ids[exact])
    import ray

    for shard in range(3):
        held = ray.get(ray.get_actor(f"{deployment}-shard-{shard}", namespace="monim").metrics.remote())
        assert held["namespaces"]["ns"]["rows"] == (ids % 3 == shard).sum()
    with pytest.raises(ValueError):
        ray.get_actor(f"{deployment}-shard-3", namespace="monim")
    assert sorted(p.name for p in data_dir.glob("shard-*")) == ["shard-0", "shard-1", "shard-2"]

    # bad requests: a clear status, nothing changed
    with pytest.raises(InvalidArgument, match="at least one shard, got 0"):
        list(admin.reshard(0))
    assert admin.describe_namespace("ns").rows == ids.size and len(admin.describe_namespace("ns").shards) == 3
    for client in (writer, reader, admin):
        client.close()


def test_a_front_end_idle_through_a_shrink_and_a_grow_back_reaches_the_new_shard(two_front_ends):
    """2 -> 1 -> 2 through the first front end while the second makes no call: the second still holds a
    handle of the shard actor the shrink killed, and the grow made a new actor under its name. Its calls
    must reach the new one (they failed with 'shard 1 is unavailable: ActorDiedError' until its restart,
    in the reliability run's reshard fault)."""
    first, second, _, _ = two_front_ends
    keys = np.random.default_rng(4).standard_normal((200, DIM)).astype(np.float32)
    with MemoryClient(first.address, timeout_s=120) as admin, \
            MemoryClient(second.address, timeout_s=60, retries=0, read_endpoints=False) as idle:
        admin.create_namespace("back", dim=DIM)
        ids = admin.add("back", keys, np.arange(200))
        assert idle.search("back", keys[:1], 1).ids[0, 0] == ids[0]  # its handles of both shards
        for shards in (1, 2):
            assert list(admin.reshard(shards, 64))[-1]["done"]
        np.testing.assert_array_equal(idle.get("back", ids).keys, keys)
        np.testing.assert_array_equal(idle.search("back", keys, 1).ids[:, 0], ids)
        assert [shard["rows"] > 0 for shard in idle.describe_namespace("back").shards] == [True, True]


def test_a_snapshot_waits_for_a_reshard_in_progress(two_front_ends):
    first, _, _, _ = two_front_ends
    with MemoryClient(first.address, timeout_s=60) as admin:
        admin.create_namespace("ns", dim=DIM)
        admin.add("ns", np.ones((300, DIM), np.float32), np.arange(300))
        from monim.workers.reshard import Resharder

        moving = Resharder(first.router).run(3, 50)  # the driver, stopped between its steps
        next(moving), next(moving)  # begun: a batch moved
        with pytest.raises(FailedPrecondition, match="waits for the reshard from 2 to 3 shards"):
            admin.create_snapshot("during")
        assert admin.list_snapshots() == []
        assert list(moving)[-1].done
        assert admin.create_snapshot("after")["shards"] == 3


def test_monim_reshard_moves_refuses_bad_counts_and_non_admin_tokens(tmp_path, capsys, monkeypatch):
    """The CLI against a secured in-process server: an admin token reshards 2 -> 3 (exit 0, the rows
    moved); --shards 0 and a token without admin each print one line and exit 2, changing nothing."""
    from monim.workers.auth import AuthPolicy
    from monim.workers.cli import main
    from monim.workers.router import Router
    from monim.workers.runtime import LocalRuntime
    from monim.workers.server import start_server

    monkeypatch.delenv("MONIM_TOKEN", raising=False)
    auth = tmp_path / "auth.toml"
    auth.write_text('[[token]]\nname = "ops"\nsecret = "ops-3c9f1e7a"\nread = ["*"]\nwrite = ["*"]\nadmin = true\n\n'
                    '[[token]]\nname = "trainer"\nsecret = "trainer-8d2b6f0c"\nread = ["*"]\nwrite = ["*"]\n')
    auth.chmod(0o600)
    runtime = LocalRuntime(2, data_dir=str(tmp_path / "data"), fsync="never")
    server, port = start_server(Router(runtime), port=0, auth=AuthPolicy.load(str(auth)))
    address = f"127.0.0.1:{port}"
    try:
        with MemoryClient(address, token="ops-3c9f1e7a") as ops:
            ops.create_namespace("ns", dim=DIM)
            ids = ops.add("ns", np.random.default_rng(0).standard_normal((500, DIM)).astype(np.float32), np.arange(500))

            def shards():
                return [s["rows"] for s in ops.describe_namespace("ns").shards]

            for args, message in ((["--shards", "0", "--token", "ops-3c9f1e7a"],
                                   "a deployment needs at least one shard, got 0"),
                                  (["--shards", "3", "--token", "trainer-8d2b6f0c"],
                                   "token 'trainer' may not call Reshard: it needs admin")):
                code = main(["reshard", "--address", address, "--no-progress", *args])
                err = capsys.readouterr().err
                assert code == 2 and err.strip() == f"monim reshard: {message}", err
                assert shards() == [250, 250]
            code = main(["reshard", "--address", address, "--shards", "3", "--batch-rows", "100", "--no-progress",
                         "--token", "ops-3c9f1e7a"])
            out, err = capsys.readouterr()
            assert code == 0 and out.strip().startswith("3 shards; ") and "moving ns" in err
            assert shards() == [167, 167, 166] and len(ops.get("ns", ids)) == 500
    finally:
        server.stop(0).wait()
        runtime.shutdown()
