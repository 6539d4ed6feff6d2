"""Large tensors through shared memory between a client and a server of one host
(protos/shared_memory.py, model_client/shared_memory.py): the same answers as through messages, a
server that cannot use the regions gets messages, bad references are INVALID_ARGUMENT and change
nothing, a forward's kept state never points into a region the client writes again, and a closed
client leaves no file behind. A real gRPC server in this process (no Ray)."""

import concurrent.futures
import gc
import os
import time

import numpy as np
import pytest
from monim.model_client import host_socket
from monim.model_client.errors import DeadlineExceeded, InvalidArgument
from monim.protos import framing, shared_memory
from monim.protos import memory_pb2 as pb
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

from monim import MemoryClient

pytestmark = pytest.mark.skipif(not shared_memory.enabled(), reason="no /dev/shm on this machine")

ROWS, DIM, VALUE_DIM, K = 4096, 128, 64, 32  # keys 2 MiB, values 1 MiB: both through a region


@pytest.fixture
def server():
    runtime = LocalRuntime(1)
    frontend, port = start_server(Router(runtime), port=0)
    yield f"127.0.0.1:{port}"
    frontend.stop(0)
    runtime.shutdown()


def made(client, rng, name="ns"):
    client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, max_k=K, optimizer="adam", lr=0.01)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    client.add(name, keys, np.arange(ROWS), values=values)
    return keys


def test_calls_through_shared_memory_answer_as_calls_through_messages(server):
    rng = np.random.default_rng(3)
    with MemoryClient(server) as shared, MemoryClient(server, shared_memory=False) as plain:
        keys = made(shared, rng)  # the Add's keys and values through a region
        assert shared._store.shared._usable == {server: True} and len(shared_memory.server_regions()) >= 1
        np.testing.assert_array_equal(plain.get("ns", np.arange(ROWS)).keys, keys)
        queries = keys[rng.integers(0, ROWS, 2048)] + 0.01
        before = shared._store.shared.bytes_placed
        found, expected = shared.search("ns", queries, K), plain.search("ns", queries, K)
        for name in ("ids", "distances", "tokens"):
            np.testing.assert_array_equal(getattr(found, name), getattr(expected, name))
        assert found.ids.flags.writeable
        placed = shared._store.shared.bytes_placed
        got = shared.get("ns", np.arange(ROWS))
        np.testing.assert_array_equal(got.keys, keys)
        np.testing.assert_array_equal(got.values, plain.get("ns", np.arange(ROWS)).values)
        assert shared._store.shared.bytes_placed >= placed + keys.nbytes  # the rows' keys came through the region
        grad = rng.standard_normal((2048, VALUE_DIM)).astype(np.float32)
        r1 = shared.retrieve("ns", queries, K, 0.5, keep_state=True)
        r2 = plain.retrieve("ns", queries, K, 0.5, keep_state=True)
        np.testing.assert_array_equal(r1.memory, r2.memory)
        g1, g2 = (c.retrieve_backward("ns", r, grad, step_values=False) for c, r in ((shared, r1), (plain, r2)))
        np.testing.assert_array_equal(g1[0], g2[0])
        assert g1[1] == g2[1]
        assert shared._store.shared.bytes_placed > before  # answers came through the region
        assert plain._store.shared is None


def test_a_server_that_cannot_use_the_regions_gets_messages(server, monkeypatch):
    monkeypatch.setattr(shared_memory, "enabled", lambda: False)  # the server's side only
    rng = np.random.default_rng(4)
    with MemoryClient(server) as client:
        keys = made(client, rng)
        assert client._store.shared._usable == {server: False}
        found = client.search("ns", keys[:2048], K)
        np.testing.assert_array_equal(found.ids[:, 0], np.arange(2048))
        assert client._store.shared.bytes_placed == 0


def _raw_add(client, target, data):
    return client._store._framed(target, "Add")(data, timeout=10)


def test_a_request_naming_a_region_it_may_not_use_is_invalid_and_changes_nothing(server):
    import grpc

    rng = np.random.default_rng(5)
    with MemoryClient(server) as client:
        made(client, rng)
        request = pb.AddRequest(namespace="ns")
        keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
        region = shared_memory.Region.create(4 << 20)
        try:
            data = framing.serialized(request, dict(keys=keys, tokens=np.arange(ROWS)),
                                      shared_memory.Placer(region, 0, region.size))
        finally:
            region.close()  # removed before the server opens it
        outside = b"../../etc/passwd".ljust(len(region.name), b"x")  # the same length: the message stays valid
        bad = {"cannot be opened here": data,
               "not a shared memory region's name": data.replace(region.name.encode(), outside)}
        for why, message in bad.items():
            with pytest.raises(grpc.RpcError) as error:
                _raw_add(client, server, message)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in error.value.details()
        region = shared_memory.Region.create(1 << 20)  # too small for the 2 MiB it is said to hold
        try:
            tensor = pb.Tensor(dtype="float32", shape=[ROWS, DIM], shared=pb.SharedBytes(region=region.name, offset=0))
            message = framing.serialized(pb.AddRequest(namespace="ns", keys=tensor), dict(tokens=np.arange(ROWS)))
            with pytest.raises(grpc.RpcError) as error:
                _raw_add(client, server, message)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in error.value.details()
        finally:
            region.close()
        assert client.describe_namespace("ns").rows == ROWS  # nothing stored


def test_an_answer_region_the_server_cannot_use_is_invalid(server):
    import grpc

    with MemoryClient(server) as client:
        made(client, np.random.default_rng(6))
        call = client._store._framed(server, "Search")
        data = framing.serialized(pb.SearchRequest(namespace="ns", k=K), dict(queries=np.zeros((1, DIM), np.float32)))
        for value, why in (("monim-1-" + "0" * 32 + ":0:100", "cannot be opened"), ("nonsense", "must be")):
            with pytest.raises(grpc.RpcError) as error:
                call(data, timeout=10, metadata=((shared_memory.ANSWER_REGION_KEY, value),))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in error.value.details()


def test_a_kept_forward_never_points_into_a_region_the_client_writes_again(server):
    """The server copies a request's bytes out of the region: a Retrieve's kept queries stay its
    own while the client's next calls write the same region."""
    rng = np.random.default_rng(7)
    with MemoryClient(server) as client:
        keys = made(client, rng)
        queries = keys[rng.integers(0, ROWS, 4096)] + 0.01  # 2 MiB of queries: through a region
        grad = rng.standard_normal((4096, VALUE_DIM)).astype(np.float32)
        result = client.retrieve("ns", queries, K, 1.0, keep_state=True)
        assert result.handle
        for _ in range(3):  # the same region, written with other queries
            client.search("ns", rng.standard_normal((4096, DIM)).astype(np.float32), K)
        by_handle = client.retrieve_backward("ns", result, grad, step_values=False)
        result.handle = ""
        by_arrays = client.retrieve_backward("ns", result, grad, step_values=False)
        np.testing.assert_array_equal(by_handle[0], by_arrays[0])


def test_calls_at_once_each_hold_a_region_and_a_closed_client_leaves_no_file(server):
    rng = np.random.default_rng(8)
    client = MemoryClient(server)
    keys = made(client, rng)
    batches = [keys[rng.integers(0, ROWS, 2048)] + 0.01 for _ in range(8)]
    with MemoryClient(server, shared_memory=False) as plain:
        expected = [plain.search("ns", q, K).ids for q in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda q: client.search("ns", q, K).ids, batches))
    for f, e in zip(found, expected):
        np.testing.assert_array_equal(f, e)
    mine = [os.path.join(shared_memory.SHARED_MEMORY_DIR, name) for name in client._store.shared._regions]
    assert len(mine) >= 2 and all(os.path.exists(path) for path in mine)  # several calls held regions at once
    client.close()
    assert not any(os.path.exists(path) for path in mine)


def _big_namespace(client, rng):
    client.create_namespace("big", dim=DIM, max_k=1024)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    client.add("big", keys, np.arange(ROWS))
    return keys


def _lent_regions(client) -> set:
    return set(client._store.shared._lent)


def test_a_large_answer_lies_in_its_region_until_its_arrays_go(server):
    """An answer that fills a good part of its call's region is not copied out of it: its arrays lie in
    the region, which no other call gets until they are gone, and the calls meanwhile answer right."""
    rng = np.random.default_rng(12)
    with MemoryClient(server) as client, MemoryClient(server, shared_memory=False) as plain:
        keys = _big_namespace(client, rng)
        batches = [keys[rng.integers(0, ROWS, 600)] + 0.01 for _ in range(4)]  # 600 x 1024 x 16 B = 9.8 MB
        expected = [plain.search("big", q, 1024) for q in batches]
        first = client.search("big", batches[0], 1024)
        lent = _lent_regions(client)
        assert len(lent) == 1 and first.ids.flags.writeable
        mapping = client._store.shared._regions[next(iter(lent))].mapping
        assert np.shares_memory(first.ids, np.frombuffer(mapping, np.uint8))
        for _ in range(2):  # their own regions (the lent one is not free): first's arrays stay as they were
            for q, e in zip(batches[1:], expected[1:]):
                np.testing.assert_array_equal(client.search("big", q, 1024).ids, e.ids)
        for name in ("ids", "distances", "tokens"):
            np.testing.assert_array_equal(getattr(first, name), getattr(expected[0], name))
        assert _lent_regions(client) == lent
        ids = first.ids[:5]  # a view keeps the region lent, as the whole answer does
        del first
        gc.collect()
        assert _lent_regions(client) == lent
        del ids
        gc.collect()
        assert not _lent_regions(client) and client._store.shared.lent_bytes == 0
        assert lent <= {region.name for region in client._store.shared._free}  # back in the pool


def test_a_client_of_small_calls_keeps_no_region(server):
    """Regions (32 MiB of the host's shared memory each) are made for large calls only: a client that
    searches a few queries at a time keeps none (its probe's page is removed once asked)."""
    rng = np.random.default_rng(15)
    with MemoryClient(server, shared_memory=False) as writer:
        keys = _big_namespace(writer, rng)
    with MemoryClient(server) as client:
        for batch in (1, 16, 64):
            client.search("big", keys[:batch] + 0.01, 32)
        assert client._store.shared._regions == {} and client._store.shared._usable == {server: True}


def test_threads_keeping_and_dropping_lent_answers_each_read_their_own(server):
    """Four threads at once, each searching large batches through one client: some answers are kept
    (their regions stay lent), the rest dropped at once (their regions serve the next calls). Every
    answer kept still reads as the search it came from once all are done: no region was handed to a
    call while an array lay in it."""
    rng = np.random.default_rng(16)
    with MemoryClient(server) as client, MemoryClient(server, shared_memory=False) as plain:
        keys = _big_namespace(client, rng)
        batches = [keys[rng.integers(0, ROWS, 600)] + 0.01 for _ in range(6)]
        expected = [plain.search("big", q, 1024).ids for q in batches]

        def work(thread: int) -> list:
            kept = []
            for round_ in range(6):
                which = (thread + round_) % len(batches)
                found = client.search("big", batches[which], 1024)
                if round_ % 2 == 0:
                    kept.append((which, found))
                else:
                    np.testing.assert_array_equal(found.ids, expected[which])
            return kept

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            kept = [pair for answer in pool.map(work, range(4)) for pair in answer]
        assert client._store.shared.lent_bytes > 0
        for which, found in kept:
            np.testing.assert_array_equal(found.ids, expected[which])
        del kept, found
        gc.collect()
        assert client._store.shared.lent_bytes == 0


def test_answers_kept_past_half_the_budget_are_copied_out_of_their_regions(server):
    rng = np.random.default_rng(13)
    with MemoryClient(server) as client, MemoryClient(server, shared_memory=False) as plain:
        keys = _big_namespace(client, rng)
        client._store.shared.budget = 96 << 20  # one 32 MiB region lent at most
        batches = [keys[rng.integers(0, ROWS, 600)] + 0.01 for _ in range(4)]
        kept = [client.search("big", q, 1024) for q in batches]
        assert client._store.shared.lent_bytes <= client._store.shared.budget // 2
        assert len(_lent_regions(client)) == 1
        assert sum(region.size for region in client._store.shared._regions.values()) <= 96 << 20
        for found, q in zip(kept, batches):
            np.testing.assert_array_equal(found.ids, plain.search("big", q, 1024).ids)


def test_a_closed_client_leaves_lent_answers_readable_and_no_file(server):
    rng = np.random.default_rng(14)
    client = MemoryClient(server)
    keys = _big_namespace(client, rng)
    queries = keys[rng.integers(0, ROWS, 600)] + 0.01
    found = client.search("big", queries, 1024)
    files = [os.path.join(shared_memory.SHARED_MEMORY_DIR, name) for name in client._store.shared._regions]
    client.close()
    assert not any(os.path.exists(path) for path in files)
    with MemoryClient(server, shared_memory=False) as plain:
        np.testing.assert_array_equal(found.ids, plain.search("big", queries, 1024).ids)
    found.distances[0, 0] = -1.0  # still the caller's memory


@pytest.mark.parametrize("over_socket", [True, False])
def test_a_call_its_server_may_still_answer_leaves_its_region_to_no_other_call(monkeypatch, over_socket):
    """A call that ended on the client's side before its server answered (its deadline) may still have
    its answer written into its region by the server: that region is never handed to a later call (it is
    removed, as a closed client's are), so the late answer overwrites nothing another call reads."""
    monkeypatch.setattr(host_socket, "_DEADLINE_MARGIN_S", 0.2)
    runtime = LocalRuntime(1)
    router = Router(runtime)
    frontend, port = start_server(router, port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}", retries=0) as client:
            if not over_socket:
                client._store.forget_host_socket(client._store.target)
            rng = np.random.default_rng(11)
            keys = made(client, rng)
            queries = keys[rng.integers(0, ROWS, 2048)] + 0.01  # 1 MiB of queries and of answer: a region
            expected = client.search("ns", queries, K)
            search = router.search

            def slow_search(*args, **kwargs):
                time.sleep(1.5)
                return search(*args, **kwargs)

            monkeypatch.setattr(router, "search", slow_search)
            client._store.timeout_s = 0.3
            regions = set(client._store.shared._regions)
            with pytest.raises(DeadlineExceeded):
                client.search("ns", queries, K)
            monkeypatch.setattr(router, "search", search)
            client._store.timeout_s = 60.0
            gone = regions - set(client._store.shared._regions)
            assert len(gone) == 1  # the region of the call that timed out
            assert not os.path.exists(os.path.join(shared_memory.SHARED_MEMORY_DIR, gone.pop()))
            found = [client.search("ns", queries, K) for _ in range(3)]
            time.sleep(2.0)  # the late call's answer is written meanwhile
            for result in found:
                np.testing.assert_array_equal(result.ids, expected.ids)
                np.testing.assert_array_equal(result.distances, expected.distances)
    finally:
        frontend.stop(0)
        runtime.shutdown()


def test_a_region_name_must_be_one_of_the_clients():
    for name in ("../x", "monim-1-abc", "/dev/shm/monim-1-" + "0" * 32, "monim-1-" + "0" * 32 + "/.."):
        with pytest.raises(InvalidArgument, match="not a shared memory region's name"):
            shared_memory.Region.open(name)


def test_the_regions_of_a_client_that_died_are_removed_by_the_next_one(server):
    import subprocess
    import sys

    from monim.model_client import shared_memory as client_shared_memory

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now
    orphan = os.path.join(shared_memory.SHARED_MEMORY_DIR, f"monim-{gone.pid}-{'ab' * 16}")
    alive = os.path.join(shared_memory.SHARED_MEMORY_DIR, f"monim-1-{'cd' * 16}")  # pid 1 lives
    for path in (orphan, alive):
        with open(path, "wb") as f:
            f.write(b"x")
    client_shared_memory._orphans_done.discard(os.getpid())
    try:
        with MemoryClient(server) as client:
            made(client, np.random.default_rng(9))  # its first large call makes a region
        assert not os.path.exists(orphan) and os.path.exists(alive)
    finally:
        for path in (orphan, alive):
            if os.path.exists(path):
                os.unlink(path)


def test_a_client_dropped_without_close_leaves_no_file(server):
    import gc

    client = MemoryClient(server)
    made(client, np.random.default_rng(10))
    mine = [os.path.join(shared_memory.SHARED_MEMORY_DIR, name) for name in client._store.shared._regions]
    assert mine and all(os.path.exists(path) for path in mine)
    del client
    gc.collect()
    assert not any(os.path.exists(path) for path in mine)


def test_a_client_killed_while_it_holds_regions_leaves_files_the_next_client_removes(server):
    """A client process killed (SIGKILL, by its pid) cannot remove its regions; the next client of
    the user on the host does, at its first region."""
    import signal
    import subprocess
    import sys

    from monim.model_client import shared_memory as client_shared_memory

    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from monim.model_client.shared_memory import SharedMemory\n"
        "pool = SharedMemory()\n"
        "regions = [pool.acquire(1 << 20) for _ in range(2)]\n"
        "print(' '.join(r.name for r in regions), flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        names = child.stdout.readline().split()
        paths = [os.path.join(shared_memory.SHARED_MEMORY_DIR, name) for name in names]
        assert len(paths) == 2 and all(os.path.exists(path) for path in paths)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert all(os.path.exists(path) for path in paths)  # killed: nothing removed them
    client_shared_memory._orphans_done.discard(os.getpid())
    with MemoryClient(server) as client:
        made(client, np.random.default_rng(11))  # its first large call makes a region
    assert not any(os.path.exists(path) for path in paths)


def test_a_server_copies_request_tensors_into_the_memory_it_is_given(server, monkeypatch):
    """copy_requests_into (a server of GPU shards gives pinned memory): every tensor a request names in a
    region is copied into memory of the allocator's, read-only there, and the calls answer as without."""
    given = []

    def allocate(size):
        given.append(np.full(size, 0xAB, np.uint8))
        return given[-1]

    rng = np.random.default_rng(11)
    with MemoryClient(server, shared_memory=False) as plain:
        keys = made(plain, rng)
        queries = keys[rng.integers(0, ROWS, 2048)] + 0.01  # 1 MiB: through a region
        expected = plain.search("ns", queries, K)
    monkeypatch.setattr(shared_memory, "_request_memory", None)  # restored after the test
    shared_memory.copy_requests_into(allocate)
    with MemoryClient(server) as shared:
        found = shared.search("ns", queries, K)
    np.testing.assert_array_equal(found.ids, expected.ids)
    np.testing.assert_array_equal(found.distances, expected.distances)
    assert [a.size for a in given] == [queries.nbytes]
    assert not given[0].flags.writeable
    np.testing.assert_array_equal(given[0].view(np.float32).reshape(queries.shape), queries)
