"""SeMem admission (log p < delta) and near-duplicate merge, on one shard and across shards."""

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime


def add_fn(shards):
    router = Router(LocalRuntime(shards))
    router.create_namespace(NamespaceConfig("adm", dim=4, value_dim=2))
    return ((lambda *a, **kw: router.add("adm", *a, **kw)), (lambda ids: router.get("adm", ids)),
            (lambda: router.describe_namespace("adm")["rows"]))


@pytest.mark.parametrize("shards", [1, 2])
def test_only_hard_tokens_are_stored(shards):
    add, get, count = add_fn(shards)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((100, 4)).astype(np.float32)
    logp = -rng.uniform(0, 4, 100).astype(np.float32)
    logp[:3] = [-1.5, -1.4999, -1.5001]
    result = add(keys, np.arange(100), logp=logp)
    expected = logp < -1.5
    np.testing.assert_array_equal(result.admitted, expected)
    assert count() == expected.sum()
    assert (result.ids[~expected] == -1).all() and (result.ids[expected] >= 0).all()
    np.testing.assert_array_equal(get(result.ids[expected]).keys, keys[expected])
    custom = add(keys[:10], np.arange(10), logp=np.full(10, -0.5, np.float32), admit_below=0.0)
    assert custom.admitted.all()


@pytest.mark.parametrize("shards", [1, 2])
def test_near_duplicates_merge_into_weights(shards):
    add, get, count = add_fn(shards)
    base = np.eye(4, dtype=np.float32)
    first = add(base, np.array([10, 11, 12, 13])).ids
    near = base + 0.01
    tokens = np.array([10, 99, 12, 12])  # row 1: other token; row 3: nearest entry has another token
    result = add(near, tokens, merge_eps=0.01)
    assert result.merged.tolist() == [True, False, True, False]
    assert result.ids[0] == first[0] and result.ids[2] == first[2]
    assert count() == 6
    np.testing.assert_array_equal(get(first).weights, [2, 1, 2, 1])
    again = add(np.stack([near[0], near[0]]), np.array([10, 10]), merge_eps=0.01)
    assert again.merged.all()
    assert get(first[:1]).weights.tolist() == [4.0]
    far = add(base[:1] + 1.0, np.array([10]), merge_eps=0.01)
    assert not far.merged.any() and count() == 7
