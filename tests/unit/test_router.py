"""Router over in-process shards (LocalRuntime): placement, merge, get/delete routing, failures."""

import numpy as np
import pytest
from monim.datastore import NamespaceConfig, NeighborStore, SearchResult
from monim.protos.errors import AlreadyExists, IdsNotFound, InvalidArgument, NamespaceNotFound, ShardUnavailable
from monim.workers.merge import merge_topk
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

from tests.conftest import assert_same_neighbours, brute_force


@pytest.fixture
def router():
    runtime = LocalRuntime(3)
    yield Router(runtime)
    runtime.shutdown()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sharded_search_equals_single_store(rng, router, metric):
    config = NamespaceConfig("ns", dim=12, metric=metric, value_dim=3)
    router.create_namespace(config)
    single = NeighborStore(config)
    keys = rng.standard_normal((2000, 12)).astype(np.float32)
    values = rng.standard_normal((2000, 3)).astype(np.float32)
    ids = router.add("ns", keys, np.arange(2000), values=values).ids
    np.testing.assert_array_equal(ids, single.add(keys, np.arange(2000), values=values))
    queries = rng.standard_normal((50, 12)).astype(np.float32)
    sharded = router.search("ns", queries, 30, return_keys=True, return_values=True, return_weights=True)
    oracle_d, oracle_rows = brute_force(queries, keys, 30, metric)
    assert_same_neighbours(sharded.ids, sharded.distances, oracle_d, oracle_rows)
    np.testing.assert_array_equal(sharded.values, values[sharded.ids])
    np.testing.assert_array_equal(sharded.keys, keys[sharded.ids])
    assert (sharded.weights == 1).all()


def test_rows_spread_evenly_by_id(router):
    router.create_namespace(NamespaceConfig("ns", dim=4))
    router.add("ns", np.ones((10, 4), np.float32), np.arange(10))
    router.add("ns", np.ones((5, 4), np.float32), np.arange(5))
    description = router.describe_namespace("ns")
    assert [s["rows"] for s in description["shards"]] == [5, 5, 5]
    assert description["rows"] == 15 and description["next_id"] == 15


def test_get_reassembles_order_and_names_all_missing_ids(router):
    router.create_namespace(NamespaceConfig("ns", dim=4))
    keys = np.arange(40, dtype=np.float32).reshape(10, 4)
    router.add("ns", keys, np.arange(10), source="s")
    rows = router.get("ns", np.array([9, 0, 4, 5]))
    np.testing.assert_array_equal(rows.keys, keys[[9, 0, 4, 5]])
    assert rows.tokens.tolist() == [9, 0, 4, 5] and rows.sources == ["s"] * 4
    with pytest.raises(IdsNotFound) as error:
        router.get("ns", np.array([1, 11, 12, -3]))
    assert error.value.missing_ids == [-3, 11, 12]


def test_delete_by_ids_and_source(router):
    router.create_namespace(NamespaceConfig("ns", dim=4))
    router.add("ns", np.ones((6, 4), np.float32), np.arange(6), source="a")
    router.add("ns", np.ones((3, 4), np.float32), np.arange(3), source="b")
    assert router.delete("ns", ids=np.array([0, 1, 100, -1])) == 2
    assert router.delete("ns", source="b") == 3
    assert router.describe_namespace("ns")["rows"] == 4


def test_namespace_lifecycle(router):
    router.create_namespace(NamespaceConfig("a", dim=4))
    with pytest.raises(AlreadyExists):
        router.create_namespace(NamespaceConfig("a", dim=8))
    assert [c.name for c in router.list_namespaces()] == ["a"]
    router.add("a", np.ones((4, 4), np.float32), np.arange(4))
    assert router.drop_namespace("a") == 4
    with pytest.raises(NamespaceNotFound):
        router.search("a", np.ones((1, 4), np.float32), 1)
    with pytest.raises(NamespaceNotFound):
        router.drop_namespace("a")


def test_bad_add_reaches_no_shard(router):
    router.create_namespace(NamespaceConfig("ns", dim=4))
    with pytest.raises(InvalidArgument, match="NaN"):
        router.add("ns", np.array([[1, 2, 3, 4], [np.nan, 0, 0, 0]], np.float32), np.arange(2))
    description = router.describe_namespace("ns")
    assert description["rows"] == 0 and description["next_id"] == 0


def test_dead_shard_is_unavailable_and_others_keep_serving(router):
    router.create_namespace(NamespaceConfig("ns", dim=4))
    router.add("ns", np.eye(4, dtype=np.float32), np.arange(4))
    router.runtime.kill_shard(1)
    with pytest.raises(ShardUnavailable, match="shard 1"):
        router.search("ns", np.ones((1, 4), np.float32), 2)
    assert router.get("ns", np.array([0, 3])).tokens.tolist() == [0, 3]  # shards 0 and 0 (ids 0, 3 % 3)


def test_merge_topk_keeps_nearest_across_shards():
    a = SearchResult(ids=np.array([[1, 3, -1]]), distances=np.array([[0.1, 0.5, np.inf]], np.float32),
                     tokens=np.array([[10, 30, -1]], np.int32))
    b = SearchResult(ids=np.array([[2, 4, 6]]), distances=np.array([[0.2, 0.3, 0.9]], np.float32),
                     tokens=np.array([[20, 40, 60]], np.int32))
    merged = merge_topk([a, b], 3)
    assert merged.ids.tolist() == [[1, 2, 4]] and merged.tokens.tolist() == [[10, 20, 40]]
    np.testing.assert_allclose(merged.distances, [[0.1, 0.2, 0.3]])


def test_a_status_message_is_cut_to_what_a_header_carries():
    from monim.protos.errors import InvalidArgument
    from monim.workers.status import MAX_STATUS_MESSAGE_CHARS, status_of

    code, message = status_of(InvalidArgument("bad source tag " + "x" * 20_000))
    assert code.name == "INVALID_ARGUMENT" and len(message) < MAX_STATUS_MESSAGE_CHARS + 50
    assert message.startswith("bad source tag xxx") and message.endswith("(20015 characters in all)")
