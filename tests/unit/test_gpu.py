"""The CUDA path (torch kernel, rows on the GPU): same answers as the CPU oracle. Skipped without a GPU."""

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig, NeighborStore, flat_index, gpu_select, transfer
from monim.model_client.local_store import LocalMemory

from tests.conftest import assert_same_neighbours, brute_force
from tests.unit.test_flat_index import (
    assert_float32_search_over_rounded_keys,
    assert_same_entries_below,
    check_torch_kernel_on_rows_in_order_of_distance,
    fp16_store_data,
    rows_in_order_of_distance,
)
from tests.unit.test_learnable_memory import DIM, TEMPERATURE, VALUE_DIM, K, N, dense_reference, make_data

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("block_bytes", [None, 4 * 300 * 2048])  # one chunk; 2048-row chunks (filtered)
def test_cuda_search_matches_brute_force(metric, block_bytes, monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((20_000, 64)).astype(np.float32)
    queries = rng.standard_normal((300, 64)).astype(np.float32)
    store = NeighborStore(NamespaceConfig("g", dim=64, metric=metric, key_dtype="float32"), device="cuda")
    assert store.backend == "torch" and store.rows.keys.dtype == torch.float32
    ids = store.add(keys, np.arange(20_000))
    result = store.search(queries, 50)
    oracle_d, oracle_rows = brute_force(queries, keys, 50, metric)
    assert_same_neighbours(result.ids, result.distances, oracle_d, ids[oracle_rows], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_keys_are_float16_by_default_on_cuda_and_find_the_float32_neighbours(metric):
    """The default key_dtype ("auto") stores float16 keys on a GPU shard; on data without near-ties
    the neighbours are those of a float32 brute force, and the distances are float32 ones over the
    rounded keys (the final k are re-ranked in float32)."""
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((20_000, 128)).astype(np.float32)
    queries = rng.standard_normal((512, 128)).astype(np.float32)
    store = NeighborStore(NamespaceConfig("g", dim=128, metric=metric), device="cuda")
    assert store.config.key_dtype == "auto" and store.rows.keys.dtype == torch.float16
    ids = store.add(keys, np.arange(20_000))
    result = store.search(queries, 32)
    oracle_d, oracle_rows = brute_force(queries, keys, 32, metric)
    # Same neighbours up to near-ties (within what float16 keys move a score: about sqrt(dim) x
    # 2^-12 = 0.003 here; tolerance 0.02), the k-th's too: the float32 distances of the ids found,
    # sorted, are the float32 brute force's.
    position = {int(i): row for row, i in enumerate(ids)}
    found = keys[np.vectorize(position.get)(result.ids)]
    exact = ((queries[:, None, :] - found) ** 2).sum(-1) if metric == "l2" else -(queries[:, None, :] * found).sum(-1)
    np.testing.assert_allclose(np.sort(exact, axis=1), oracle_d, rtol=1e-4, atol=0.02)
    print(f"{metric}: {(result.ids != ids[oracle_rows]).mean():.2%} of neighbours differ from the float32 "
          "brute force's, all at near-ties")
    rounded_d, _ = brute_force(queries, keys.astype(np.float16).astype(np.float32), 32, metric)
    np.testing.assert_allclose(result.distances, rounded_d, rtol=1e-4, atol=1e-3)


def test_float16_keys_on_cuda_find_the_same_neighbours_mostly():
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((20_000, 64)).astype(np.float32)
    queries = keys[:200] + 0.01 * rng.standard_normal((200, 64)).astype(np.float32)
    store = NeighborStore(NamespaceConfig("g", dim=64, key_dtype="float16"), device="cuda")
    store.add(keys, np.arange(20_000))
    assert (store.search(queries, 1).ids[:, 0] == np.arange(200)).mean() > 0.99


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 100, 1024])
@pytest.mark.parametrize("block_bytes", [None, 4 * 256 * 4096])  # one chunk; 4096-row chunks
def test_fp16_keys_on_cuda_give_fp32_distances_at_large_norms(metric, k, block_bytes, monkeypatch):
    # A float16 store answers as float32 search over its rounded keys would, for key norms up to 500
    # (where float16 scores overflow): same neighbours up to ties, distances within 1e-5.
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    keys, queries = fp16_store_data(np.random.default_rng(2), stored=20_000, dim=768, batch=256)
    store = NeighborStore(NamespaceConfig("g", dim=768, metric=metric, key_dtype="float16"), device="cuda")
    assert store.backend == "torch" and store.rows.keys.dtype == torch.float16
    ids = store.add(keys, np.arange(20_000))
    result = store.search(queries, k)
    order = np.argsort(ids)
    rows = order[np.searchsorted(ids, result.ids, sorter=order)]
    assert (ids[rows] == result.ids).all()
    error = assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, result.distances, metric)
    print(f"{metric} k={k} block_bytes={block_bytes}: max relative distance error {error:.3g}; "
          f"float32 matmul output for float16: {flat_index._takes_out_dtype.get('cuda')}")


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 200])
def test_cuda_kernel_when_every_chunk_holds_better_rows(metric, k, monkeypatch):
    """The one-pass filter of later chunks (datastore/gpu_select.py) overflows its capacity on every
    chunk when rows come nearest last; the chunk's top-k is taken instead, and answers stay exact."""
    check_torch_kernel_on_rows_in_order_of_distance("cuda", metric, k, monkeypatch)


@pytest.mark.parametrize("batch", [32, 40, 64, 300])  # the tile of B <= 32; one tile of queries or several
@pytest.mark.parametrize("dim", [768, 100])  # dims a multiple of the tile's and not
@pytest.mark.parametrize("clamp", [False, True])
def test_screen_kernel_passes_the_entries_the_filter_pass_does(batch, dim, clamp):
    """gpu_select.screen_below (matmul and filter in one kernel) against a float32 matmul of the same
    float16 operands and below_threshold over its score block: the same entries below each query's
    threshold, their distances equal to float32 rounding."""
    generator = torch.Generator(device="cuda").manual_seed(7)
    stored, start, end = 9000, 1000, 8500
    keys = torch.randn(stored, dim, generator=generator, device="cuda").half()
    queries = torch.randn(batch, dim, generator=generator, device="cuda").half()
    row_mul = -2.0 * torch.rand(batch, generator=generator, device="cuda") - 0.5
    row_add = torch.randn(batch, generator=generator, device="cuda")
    col_add = (keys.float() ** 2).sum(1)
    scores = queries.float() @ keys[start:end].float().T
    distances = scores * row_mul[:, None] + row_add[:, None] + col_add[None, start:end]
    threshold = torch.quantile(distances, 0.02, dim=1)  # about 150 entries per query pass
    capacity = 400
    screened_d, screened_i, counts = gpu_select.screen_below(queries, keys, row_mul, row_add, col_add, clamp,
                                                             threshold, start, end, capacity)
    filtered = gpu_select.below_threshold(scores, row_mul, row_add, col_add, clamp, threshold, start, capacity)
    assert filtered is not None and int(counts.max()) <= capacity
    assert (torch.isfinite(screened_d).sum(dim=1) == counts).all()  # +inf past each query's count
    assert_same_entries_below((screened_d, screened_i), filtered, threshold)
    # Past capacity: the counts say so (the entries past it are dropped; the caller scans again).
    _, _, small_counts = gpu_select.screen_below(queries, keys, row_mul, row_add, col_add, clamp, threshold,
                                                 start, end, 10)
    assert (small_counts == counts).all() and int(small_counts.max()) > 10


@pytest.mark.parametrize("l2", [True, False])
def test_query_scaling_kernel_scales_as_the_torch_operations(l2, monkeypatch):
    """The compiled kernel (fast log2 and exp2) gives the torch operations' power-of-two scales."""
    generator = torch.Generator(device="cuda").manual_seed(8)
    queries = torch.randn(300, 768, generator=generator, device="cuda")
    queries *= torch.logspace(-3, 2.7, 300, device="cuda")[:, None] / queries.norm(dim=1, keepdim=True)
    queries[7] = 0.0
    for key_squared in (torch.tensor(0.25, device="cuda"), torch.tensor(3.0e5, device="cuda")):
        got = gpu_select.scaled_queries(queries, key_squared, l2, flat_index._SCREEN_SCORE_BOUND)
        monkeypatch.setattr(gpu_select, "available", lambda tensor: False)
        want = flat_index._scaled_queries(queries, key_squared, l2)
        monkeypatch.undo()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 100, 1024])
@pytest.mark.parametrize("sampled", [False, True])  # chunks doubling; a sample's threshold, one pass
def test_screened_search_answers_as_the_unscreened_one(metric, k, sampled, monkeypatch):
    """float16 keys at LM norms, a batch the screen serves, several chunks or one sampled pass: the
    screened scan's answers are float32 search over the rounded keys, as the unscreened scan's are,
    and the two agree."""
    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 256 * 4096)  # 4096-row score blocks
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", 2048)  # then 2048, 4096, 8192, ... rows screened
    if sampled:  # every 8th row (k=1), 13th (k=100) or 29th (k=1024) sampled
        monkeypatch.setattr(flat_index, "SAMPLE_MIN_ROWS", 1024)
        monkeypatch.setattr(flat_index, "SAMPLE_RANK", 16)
    else:
        monkeypatch.setattr(flat_index, "SAMPLE_MIN_STEP", 1 << 62)
    keys, queries = fp16_store_data(np.random.default_rng(3), stored=30_000, dim=768, batch=60)
    k_t = torch.from_numpy(keys).to("cuda").half()
    norms = (k_t.float() ** 2).sum(1)
    q_t = torch.from_numpy(queries).to("cuda")
    assert gpu_select.screens(k_t, q_t.shape[0])
    chunked = []
    real_scan = flat_index._chunked_topk
    monkeypatch.setattr(flat_index, "_chunked_topk", lambda *args, **kwargs: chunked.append(1) or
                        real_scan(*args, **kwargs))
    distances, rows = flat_index.torch_search(q_t, k_t, norms, k, metric)
    assert (chunked == []) == sampled
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric)
    monkeypatch.setattr(gpu_select, "SCREEN_MIN_BATCH", 1 << 62)
    unscreened_d, unscreened_rows = flat_index.torch_search(q_t, k_t, norms, k, metric)
    np.testing.assert_allclose(distances, unscreened_d, rtol=1e-6)
    for query in range(len(queries)):  # the same rows, but for the order and choice among equal distances
        nearer = distances[query] < distances[query, -1]
        assert set(rows[query, nearer]) == set(unscreened_rows[query, unscreened_d[query] < unscreened_d[query, -1]])
    assert (rows == unscreened_rows).mean() > 0.99


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 200])
def test_screened_search_when_every_chunk_holds_better_rows(metric, k, monkeypatch):
    """Rows stored nearest last: every screened chunk passes more entries than its capacity, and the
    chunk takes a top-k block by block instead; the answers stay float32 search over the rounded keys."""
    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 40 * 1000)  # 1024-row blocks at B=40
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", 64)
    keys, queries = rows_in_order_of_distance(metric)
    k_t = torch.from_numpy(keys).to("cuda").half()
    assert gpu_select.screens(k_t, queries.shape[0])
    distances, rows = flat_index.torch_search(torch.from_numpy(queries).to("cuda"), k_t, (k_t.float() ** 2).sum(1),
                                              k, metric)
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric, rtol=1e-4)


@pytest.mark.parametrize("rows", [10, 300_000])  # under and over transfer.PINNED_MIN_BYTES
def test_arrays_go_to_the_gpu_and_back_unchanged(rows):
    """transfer.to_device / to_host: large arrays through pinned memory, the copy to the GPU queued;
    read-only and non-contiguous arrays too, and the source may change right after the call."""
    def made():
        return np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)

    read_only = made()
    read_only.flags.writeable = False
    for array in (made(), read_only, made()[:, ::2]):
        on_gpu = transfer.to_device(array, "cuda")
        expected = array.copy()
        if array.flags.writeable:
            array[...] = -1  # the caller's buffer, reused at once
        assert on_gpu.is_cuda
        np.testing.assert_array_equal(transfer.to_host(on_gpu), expected)


def test_copies_to_the_host_on_the_side_stream_see_the_work_queued_before_and_not_after():
    """transfer.to_host_later: the copies start after the current stream's queued work (a long matmul
    writing the tensor), while work queued after them (overwriting it) does not reach the copy."""
    a = torch.randn(4096, 4096, device="cuda")
    out = torch.empty(4096, 4096, device="cuda")
    torch.matmul(a, a, out=out)
    small = out[:3, :5].clone()
    wait = transfer.to_host_later({"big": out, "small": small, "none": None, "host": np.ones(2)})
    before = out.clone()  # on the current stream, after the matmul
    torch.cuda.current_stream().wait_stream(transfer._copy_streams[out.device])  # as a later write must
    out.fill_(-1.0)
    host = wait()
    expected = before.cpu().numpy()
    np.testing.assert_array_equal(host["big"], expected)
    np.testing.assert_array_equal(host["small"], expected[:3, :5])
    assert host["none"] is None and host["host"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_retrieve_and_backward_match_autograd(metric):
    """The in-process store (the router over one shard) with its rows on the GPU."""
    keys, values, weights, queries, grad_memory = make_data(seed=4)
    memory = LocalMemory(device="cuda")
    memory.create_namespace(NamespaceConfig("g", dim=DIM, metric=metric, value_dim=VALUE_DIM, key_dtype="float32",
                                            optimizer={"name": "sgd", "lr": 0.1}))  # the reference is float32
    assert memory.runtime.shards[0].device == "cuda"
    memory.add("g", keys, np.arange(N), values=values, weights=weights)
    result = memory.retrieve("g", queries, K, TEMPERATURE)
    ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids, metric,
                                                       TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory, ref_m, atol=1e-5)
    grad_queries, grad_temperature = memory.retrieve_backward("g", queries, result.ids, result.alpha,
                                                              result.distances, grad_memory, TEMPERATURE)
    np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(memory.get("g", np.arange(N)).values, values - 0.1 * ref_gv, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_lone_shard_forward_and_kept_backward_match_autograd(metric, monkeypatch):
    """A training batch's forward run whole on the lone GPU shard (NeighborStore.forward) and its backward
    by handle from the alpha and distances kept there: the dense reference's memory, gradients and step."""
    from monim.workers import router as router_module

    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)  # the value sums as for a large batch
    keys, values, weights, queries, grad_memory = make_data(seed=4)
    memory = LocalMemory(device="cuda")
    memory.create_namespace(NamespaceConfig("g", dim=DIM, metric=metric, value_dim=VALUE_DIM, key_dtype="float32",
                                            optimizer={"name": "sgd", "lr": 0.1}))
    memory.add("g", keys, np.arange(N), values=values, weights=weights)
    result = memory.retrieve("g", queries, K, TEMPERATURE, keep_state=True)
    assert memory.runtime.shards[0].stores["g"].kept_rows.bytes > 0  # rows, alpha, distances kept on the GPU
    ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids, metric,
                                                       TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory, ref_m, atol=1e-5)
    grad_queries, grad_temperature = memory.retrieve_backward("g", None, None, None, None, grad_memory, TEMPERATURE,
                                                              handle=result.handle)
    np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(memory.get("g", np.arange(N)).values, values - 0.1 * ref_gv, atol=1e-5)


@pytest.mark.parametrize("index", ["ivf_flat", "ivf_pq"])
def test_cuda_ivf_store_trains_and_reranks_with_its_gpu_keys(index):
    """A CUDA store of an ivf namespace: training and adds read its (float16) keys from the GPU, the
    faiss index answers, rerank computes exact distances on the GPU (docs/INDEXES.md, "GPU")."""
    pytest.importorskip("faiss")  # the GPU machine's image has no faiss unless its wheel is carried
    from tests.unit.test_ivf_index import exact_ids, mixture, recall

    keys, queries = mixture(20_000, 64, 50, seed=30), mixture(200, 64, 50, seed=31)
    options = dict(pq_m=64) if index == "ivf_pq" else {}
    store = NeighborStore(NamespaceConfig("g", dim=64, index=index, nlist=64, train_min_rows=10_000,
                                          key_dtype="float32", **options), device="cuda")
    store.add(keys, np.zeros(len(keys), np.int32))
    assert store.wait_for_index(300) and store.stats()["index_state"] == "trained"
    found = store.search(queries, 10, nprobe=32, rerank=100)
    assert recall(found.ids, exact_ids(keys, queries, 10)) >= 0.99
    np.testing.assert_allclose(found.distances, ((keys[found.ids] - queries[:, None, :]) ** 2).sum(axis=2),
                               rtol=1e-4, atol=1e-3)


def test_cuda_hnsw_store_builds_its_graph_from_its_gpu_keys_and_answers_its_tail():
    """A CUDA store of an hnsw namespace with float16 keys: the build and the tail copy the keys from
    the GPU (rounded to float16, as stored), the graph on the CPU answers, and the distances are those
    of the stored (rounded) keys (docs/INDEXES.md, "hnsw")."""
    pytest.importorskip("faiss")
    from tests.unit.test_ivf_index import exact_ids, mixture, recall

    keys, queries = mixture(20_000, 64, 50, seed=32), mixture(200, 64, 50, seed=33)
    stored = keys.astype(np.float16).astype(np.float32)
    store = NeighborStore(NamespaceConfig("h", dim=64, index="hnsw", train_min_rows=10_000), device="cuda")
    store.add(keys[:15_000], np.zeros(15_000, np.int32))
    assert store.wait_for_index(300) and store.stats()["index_state"] == "trained"
    store.add(keys[15_000:], np.zeros(5_000, np.int32))  # into the built graph's tail first
    found = store.search(queries, 10, ef=256)
    assert recall(found.ids, exact_ids(stored, queries, 10)) >= 0.99
    np.testing.assert_allclose(found.distances, ((stored[found.ids] - queries[:, None, :]) ** 2).sum(axis=2),
                               rtol=1e-4, atol=1e-3)
    assert store.wait_for_index(300) and store.stats()["index_unindexed"] == 0
    store.close()
