"""Read endpoints in Ray shard actors (workers/read_endpoint.py, ShardSideRuntime in
workers/runtime.py): a stream that goes to a shard's own process answers as the front end's calls
do, over every shard's rows; when that shard's process is killed, the step goes to the front end
(which waits for Ray to restart the shard) and the stream later finds the restarted shard's new
endpoint. Against deployments of their own on the session's Ray.
"""

from __future__ import annotations

import os
import signal
import uuid

import numpy as np

from monim import MemoryClient

DIM, VALUE_DIM, ROWS = 16, 8, 500


def _fill(client) -> None:
    rng = np.random.default_rng(0)
    client.create_namespace("mem", dim=DIM, value_dim=VALUE_DIM)
    client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 50,
               values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))


def _queries(seed: int, batch: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


def _endpoint_of(ray, deployment: str, shard: int) -> str:
    """The target of the endpoint running in that shard actor's process, asked of the process itself."""
    actor = ray.get_actor(f"{deployment}-shard-{shard}", namespace="monim")
    return ray.get(actor.__ray_call__.remote(lambda s: s.read_endpoint.target if s.read_endpoint else ""))


def test_a_stream_to_a_shards_endpoint_answers_as_the_calls_do(ray_joined):
    from monim.workers.embedded import EmbeddedStore

    deployment = f"endpoints-{uuid.uuid4().hex[:8]}"
    with EmbeddedStore(shards=2, ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment) as store, \
            MemoryClient(store.address, timeout_s=60) as client:
        _fill(client)
        with client.decode() as stream:
            for step in range(10):
                queries, k = _queries(step), 1 + step % 8
                found, expected = stream.search("mem", queries, k, return_weights=True), client.search("mem", queries, k)
                np.testing.assert_array_equal(found.ids, expected.ids)
                np.testing.assert_allclose(found.distances, expected.distances, rtol=1e-6)
                read, expected = stream.retrieve("mem", queries, k, 2.0), client.retrieve("mem", queries, k, 2.0)
                np.testing.assert_array_equal(read.ids, expected.ids)
                np.testing.assert_allclose(read.memory, expected.memory, rtol=1e-5, atol=1e-6)
            endpoints = [_endpoint_of(ray_joined, deployment, shard) for shard in range(2)]
            assert stream.target in endpoints and store.address not in endpoints
            assert sorted(client._store.read_endpoints()) == sorted(endpoints)
            ids = stream.search("mem", _queries(50, 30), 10).ids
            assert {int(i) % 2 for i in ids.ravel()} == {0, 1}  # both shards' rows, from one endpoint


def test_a_killed_shard_sends_the_step_to_the_front_end_then_its_new_endpoint_serves(ray_joined, tmp_path):
    from monim.workers.embedded import EmbeddedStore

    deployment = f"endpoint-kill-{uuid.uuid4().hex[:8]}"
    store = EmbeddedStore(shards=1, ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment,
                          data_dir=str(tmp_path), fsync="never")
    try:
        with MemoryClient(store.address, timeout_s=120) as client, client.decode() as stream:
            _fill(client)
            expected = client.search("mem", _queries(1), 5)
            stream.search("mem", _queries(1), 5)
            first = stream.target
            assert first == _endpoint_of(ray_joined, deployment, 0)
            shard = ray_joined.get_actor(f"{deployment}-shard-0", namespace="monim")
            os.kill(ray_joined.get(shard.ping.remote())["pid"], signal.SIGKILL)  # Ray restarts it from its log
            np.testing.assert_array_equal(stream.search("mem", _queries(1), 5).ids, expected.ids)
            assert stream.target == store.address
            client._store.read_routing.forget()  # the retry wait over: the client asks again
            stream._stream.close()
            stream._stream = None  # the next step opens a stream: the front end starts the new endpoint
            np.testing.assert_array_equal(stream.search("mem", _queries(1), 5).ids, expected.ids)
            assert stream.target == _endpoint_of(ray_joined, deployment, 0) != first
    finally:
        store.server.stop(1).wait()
        store.runtime.destroy()
