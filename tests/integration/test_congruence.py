"""Congruence: one sequence of operations against the in-process store and the gRPC service
(2 shard actors) gives the same answers, errors included."""

from __future__ import annotations

import numpy as np
from monim.model_client import MemoryClient
from monim.model_client.errors import MemoryStoreError


def script(client: MemoryClient, namespace: str) -> list:
    """Runs a fixed mix of operations; returns what a user would observe, in order."""
    rng = np.random.default_rng(5)
    seen = []

    def observe(label, call):
        try:
            value = call()
        except MemoryStoreError as error:
            value = ("error", error.code, error.message.replace(namespace, "<ns>"))
        seen.append((label, value))
        return value

    observe("create", lambda: dict(client.create_namespace(namespace, dim=24, metric="ip", value_dim=5,
                                                           max_k=64).to_dict(), generation="(random)"))
    keys = rng.standard_normal((3000, 24)).astype(np.float32)
    values = rng.standard_normal((3000, 5)).astype(np.float32)
    ids_a = observe("add day-1", lambda: client.add(namespace, keys[:2000], np.arange(2000) % 313,
                                                    values=values[:2000], source="day-1"))
    observe("add day-2", lambda: client.add(namespace, keys[2000:], np.arange(1000), values=values[2000:],
                                            weights=np.full(1000, 3.0, np.float32), source="day-2"))
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    observe("search", lambda: client.search(namespace, queries, 50, return_keys=True, return_values=True,
                                            return_weights=True))
    observe("get", lambda: client.get(namespace, np.array([2999, 0, 1500, 7])))
    observe("delete ids", lambda: client.delete(namespace, ids=ids_a[::3]))
    observe("delete source", lambda: client.delete(namespace, source="day-2"))
    observe("search after deletes", lambda: client.search(namespace, queries, 64))
    observe("get deleted", lambda: client.get(namespace, ids_a[:4]))
    observe("bad k", lambda: client.search(namespace, queries, 65))
    observe("describe", lambda: (client.describe_namespace(namespace).rows,
                                 client.describe_namespace(namespace).next_id))
    observe("list", lambda: [c.name for c in client.list_namespaces() if c.name == namespace])
    observe("add after deletes", lambda: client.add(namespace, keys[:3], np.arange(3)))
    observe("tiny store search", lambda: client.search(namespace, queries[:2], 64).ids.shape)
    observe("drop", lambda: client.drop_namespace(namespace))
    observe("search dropped", lambda: client.search(namespace, queries, 5))
    return seen


def assert_same(local, remote, label):
    if isinstance(local, np.ndarray):
        assert local.dtype == remote.dtype and local.shape == remote.shape, label
        if local.dtype.kind == "f":
            np.testing.assert_allclose(local, remote, rtol=1e-5, atol=1e-5, err_msg=label)
        else:
            np.testing.assert_array_equal(local, remote, err_msg=label)
    elif hasattr(local, "__dataclass_fields__"):
        for field in set(local.__dataclass_fields__) - {"generation"}:  # random per incarnation
            assert_same(getattr(local, field), getattr(remote, field), f"{label}.{field}")
    else:
        assert local == remote, label


def test_in_process_and_service_agree(remote_client, namespace_name):
    local = script(MemoryClient(":memory:"), namespace_name)
    remote = script(remote_client, namespace_name)
    assert [label for label, _ in local] == [label for label, _ in remote]
    for (label, a), (_, b) in zip(local, remote):
        assert_same(a, b, label)
