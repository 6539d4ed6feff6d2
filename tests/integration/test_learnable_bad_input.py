"""Bad input to the learnable-memory operations gets its status and a message naming the problem,
and changes nothing.

Each case runs against the gRPC service (router + 2 shard actors) and the in-process store. The
namespace uses Adam and has already taken one optimizer step, so its optimizer state is not the
initial one; afterwards every row's values, weights, keys, Adam moments and the step count (of
each shard, read through ids that live on that shard only), the row count, next_id and a search
and retrieve answer are exactly as before, and the service still answers a valid retrieve.
"""

from __future__ import annotations

import contextlib
import dataclasses

import grpc
import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client.errors import InvalidArgument, NotFound
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc

DIM, VALUE_DIM, ROWS, MAX_K, K, LR = 8, 3, 50, 16, 4, 0.05
QUERIES = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
BATCH = len(QUERIES)
STATE_COLUMNS = ("exp_avg", "exp_avg_sq")


@pytest.fixture(params=["remote", "in-process"])
def client(request):
    if request.param == "remote":
        return request.getfixturevalue("remote_client")
    return MemoryClient(":memory:")


@pytest.fixture
def learnable(client, namespace_name):
    """An Adam namespace of ROWS rows (ids 0..ROWS-1) after one optimizer step on ids 0..29."""
    rng = np.random.default_rng(11)
    client.create_namespace(namespace_name, dim=DIM, value_dim=VALUE_DIM, max_k=MAX_K, optimizer="adam", lr=LR)
    try:
        client.add(namespace_name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
                   values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32),
                   weights=rng.uniform(0.5, 2.0, ROWS).astype(np.float32), source="seed")
        stepped = np.arange(30)
        assert client.apply_gradients(namespace_name, stepped,
                                      rng.standard_normal((30, VALUE_DIM)).astype(np.float32)) == 30
        state = client.get(namespace_name, np.arange(ROWS), return_optimizer_state=True).optimizer_state
        assert state["step"].tolist() == [1] * 30 + [0] * (ROWS - 30)  # steps are counted per row
        assert sorted(set(state) - {"step"}) == sorted(STATE_COLUMNS)
        assert (state["exp_avg_sq"][stepped] > 0).any(axis=1).all() and (state["exp_avg"][30:] == 0).all()
        yield namespace_name
    finally:
        client.drop_namespace(namespace_name)


@pytest.fixture
def plain(client, namespace_name):
    """A namespace with value_dim 0 (no value vectors), beside the learnable one."""
    name = namespace_name + "-plain"
    client.create_namespace(name, dim=DIM, max_k=MAX_K)
    try:
        client.add(name, np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS))
        yield name
    finally:
        client.drop_namespace(name)


def _arrays(prefix: str, **arrays) -> dict:
    return {f"{prefix}{name}": None if a is None else (a.dtype.str, a.shape, a.tobytes()) for name, a in arrays.items()}


def snapshot(client, namespace, ids=None) -> dict:
    """Everything stored in the namespace (ids: the ids it holds, 0..ROWS-1 by default)."""
    ids = np.arange(ROWS) if ids is None else np.sort(np.asarray(ids, np.int64))
    description = client.describe_namespace(namespace)
    value_dim = description.config.value_dim
    rows = client.get(namespace, ids, return_optimizer_state=True)
    state = dict(rows.optimizer_state or {})
    out = {"rows": description.rows, "next_id": description.next_id, "sources": tuple(rows.sources),
           "state columns": tuple(sorted(state)), "step": state.pop("step").tolist()}
    out.update(_arrays("", keys=rows.keys, values=rows.values, weights=rows.weights, tokens=rows.tokens))
    out.update(_arrays("state ", **state))
    found = client.search(namespace, QUERIES, k=MAX_K, return_values=value_dim > 0, return_weights=True)
    out.update(_arrays("search ", ids=found.ids, distances=found.distances, values=found.values,
                       weights=found.weights))
    if value_dim:
        result = client.retrieve(namespace, QUERIES, k=K, temperature=0.5)
        out.update(_arrays("retrieve ", memory=result.memory, ids=result.ids, alpha=result.alpha))
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    changed = [name for name in before if before[name] != after.get(name)]
    assert not changed, f"the rejected call changed: {changed}"


def assert_serves(client, namespace) -> None:
    """A valid retrieve still answers, with the shapes and numbers it should have."""
    result = client.retrieve(namespace, QUERIES, k=K, temperature=1.0)
    assert result.memory.shape == (len(QUERIES), VALUE_DIM) and np.isfinite(result.memory).all()
    assert result.ids.shape == (len(QUERIES), K) and (result.ids >= 0).all()
    np.testing.assert_allclose(result.alpha.sum(axis=1), 1.0, atol=1e-5)


def expect_rejected(client, namespaces, error_type, status, fragment, call, ids=None):
    """namespaces: the namespace(s) whose contents must not change; the first is the learnable one."""
    namespaces = [namespaces] if isinstance(namespaces, str) else list(namespaces)
    before = [snapshot(client, ns, ids if i == 0 else None) for i, ns in enumerate(namespaces)]
    with pytest.raises(error_type) as caught:
        call()
    assert fragment in caught.value.message, caught.value.message
    if client.remote:
        assert getattr(caught.value, "status_code", None) == status, "raised by the client, not the service"
    for ns, was in zip(namespaces, before):
        assert_unchanged(was, snapshot(client, ns, ids if ns == namespaces[0] else None))
    assert_serves(client, namespaces[0])
    return caught.value


# ----- ApplyGradients ----------------------------------------------------------------------------
def _grads(n, width=VALUE_DIM, fill=None):
    grads = np.random.default_rng(n).standard_normal((n, width)).astype(np.float32)
    if fill is not None:
        grads[-1, 0] = fill
    return grads


UNKNOWN_IDS = {
    # ids, the ids the message must name
    "unknown on both shards, among known": (np.array([3, 977, 50, 4, 8]), "[50, 977]"),
    "unknown on one shard only": (np.array([2, 4, 6, 51, 1]), "[51]"),
    "unknown id only": (np.array([1000]), "[1000]"),
    "negative id among known": (np.array([0, 1, -3]), "[-3]"),
    "known id repeated, unknown last": (np.array([5, 5, 7, ROWS]), f"[{ROWS}]"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_IDS))
def test_apply_gradients_with_unknown_ids_is_not_found(client, learnable, case):
    ids, named = UNKNOWN_IDS[case]
    expect_rejected(client, learnable, NotFound, "NOT_FOUND", f"namespace {learnable!r} has no entries with ids {named}",
                    lambda: client.apply_gradients(learnable, ids, _grads(len(ids))))


BAD_GRADIENTS = {
    "grads too wide": (lambda: (np.arange(3), _grads(3, VALUE_DIM + 1)),
                       f"grads have width {VALUE_DIM + 1} but the namespace's value_dim is {VALUE_DIM}"),
    "grads too narrow": (lambda: (np.arange(3), _grads(3, VALUE_DIM - 1)),
                         f"grads have width {VALUE_DIM - 1} but the namespace's value_dim is {VALUE_DIM}"),
    "nan grad": (lambda: (np.arange(3), _grads(3, fill=np.nan)), "grads contain NaN or Inf (first at row 2)"),
    "inf grad": (lambda: (np.arange(3), _grads(3, fill=np.inf)), "grads contain NaN or Inf (first at row 2)"),
    "-inf grad": (lambda: (np.arange(3), _grads(3, fill=-np.inf)), "grads contain NaN or Inf"),
    "more ids than grads": (lambda: (np.arange(3), _grads(2)), "ids and grads have different lengths: 3 ids, 2 grads"),
    "more grads than ids": (lambda: (np.arange(2), _grads(3)), "ids and grads have different lengths: 2 ids, 3 grads"),
    "empty batch": (lambda: (np.arange(0), np.zeros((0, VALUE_DIM), np.float32)), "ids is an empty batch"),
    "empty grads": (lambda: (np.arange(2), np.zeros((0, VALUE_DIM), np.float32)), "grads is an empty batch"),
}


@pytest.mark.parametrize("case", list(BAD_GRADIENTS))
def test_apply_gradients_with_bad_grads_is_invalid(client, learnable, case):
    build, fragment = BAD_GRADIENTS[case]
    ids, grads = build()
    expect_rejected(client, learnable, InvalidArgument, "INVALID_ARGUMENT", fragment,
                    lambda: client.apply_gradients(learnable, ids, grads))


# ----- Retrieve backward -------------------------------------------------------------------------
def _grad_memory(width=VALUE_DIM, rows=BATCH):
    return np.random.default_rng(7).standard_normal((rows, width)).astype(np.float32)


def _nan_at_row_1():
    grad = _grad_memory()
    grad[1, 2] = np.nan
    return grad


def _with(result, **changes):
    return dataclasses.replace(result, **changes)


def _tampered_ids(result):
    ids = result.ids.copy()
    ids[0, 0] = -5
    return ids


BAD_BACKWARDS = {
    # (the forward's result -> the result sent back, grad_memory), message fragment
    "alpha with a column too few": (lambda r: (_with(r, alpha=r.alpha[:, :-1].copy()), _grad_memory()),
                                    f"alpha must be float32 with the shape of ids [{len(QUERIES)}, {K}], "
                                    f"got float32 [{len(QUERIES)}, {K - 1}]"),
    "alpha with a row too many": (lambda r: (_with(r, alpha=np.vstack([r.alpha, r.alpha[:1]])), _grad_memory()),
                                  f"alpha must be float32 with the shape of ids [{len(QUERIES)}, {K}], "
                                  f"got float32 [{len(QUERIES) + 1}, {K}]"),
    "alpha flattened": (lambda r: (_with(r, alpha=r.alpha.reshape(-1).copy()), _grad_memory()),
                        "alpha must be float32 with the shape of ids"),
    "grad_memory too wide": (lambda r: (r, _grad_memory(VALUE_DIM + 1)),
                             f"grad_memory have width {VALUE_DIM + 1} but the namespace's value_dim is {VALUE_DIM}"),
    "grad_memory too narrow": (lambda r: (r, _grad_memory(VALUE_DIM - 1)),
                               f"grad_memory have width {VALUE_DIM - 1} but the namespace's value_dim is {VALUE_DIM}"),
    "grad_memory rows differ from queries": (lambda r: (r, _grad_memory(rows=len(QUERIES) - 1)),
                                             f"grad_memory has {len(QUERIES) - 1} rows but there are "
                                             f"{len(QUERIES)} queries"),
    "nan in grad_memory": (lambda r: (r, _nan_at_row_1()), "grad_memory contain NaN or Inf (first at row 1)"),
    "temperature zero": (lambda r: (_with(r, temperature=0.0), _grad_memory()),
                         "temperature must be finite and > 0, got 0.0"),
    "temperature negative": (lambda r: (_with(r, temperature=-0.5), _grad_memory()),
                             "temperature must be finite and > 0, got -0.5"),
    "ids tampered to -5": (lambda r: (_with(r, ids=_tampered_ids(r)), _grad_memory()),
                           "ids must be >= 0, or -1 for an empty slot"),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARDS))
def test_retrieve_backward_with_bad_input_is_invalid(client, learnable, case):
    build, fragment = BAD_BACKWARDS[case]
    result = client.retrieve(learnable, QUERIES, k=K, temperature=0.5)
    sent, grad_memory = build(result)
    expect_rejected(client, learnable, InvalidArgument, "INVALID_ARGUMENT", fragment,
                    lambda: client.retrieve_backward(learnable, sent, grad_memory))


def test_retrieve_backward_after_its_ids_were_deleted_is_not_found(client, learnable):
    result = client.retrieve(learnable, QUERIES, k=K, temperature=0.5)
    # One id from each shard's half where possible, all of them in the forward's top-k.
    slots = np.unique(result.ids)
    gone = np.unique(np.concatenate([slots[slots % 2 == 0][:1], slots[slots % 2 == 1][:1], result.ids[-1, :1]]))
    assert client.delete(learnable, ids=gone) == gone.size
    kept = np.setdiff1d(np.arange(ROWS), gone)
    named = "[" + ", ".join(str(i) for i in gone.tolist()) + "]"
    expect_rejected(client, learnable, NotFound, "NOT_FOUND", f"namespace {learnable!r} has no entries with ids {named}",
                    lambda: client.retrieve_backward(learnable, result, _grad_memory()), ids=kept)


def test_valid_retrieve_backward_still_steps_afterwards(client, learnable):
    """The checks above would pass vacuously if nothing could change the rows: a valid backward does."""
    before = snapshot(client, learnable)
    result = client.retrieve(learnable, QUERIES, k=K, temperature=0.5)
    client.retrieve_backward(learnable, result, _grad_memory())
    after = snapshot(client, learnable)
    stepped = np.zeros(ROWS, np.int64)
    stepped[np.unique(result.ids)] = 1
    assert after["step"] == (np.array(before["step"]) + stepped).tolist()
    assert after["values"] != before["values"] and after["state exp_avg"] != before["state exp_avg"]


# ----- Retrieve ------------------------------------------------------------------------------------
def test_retrieve_on_a_namespace_without_values_is_invalid(client, learnable, plain):
    expect_rejected(client, [learnable, plain], InvalidArgument, "INVALID_ARGUMENT",
                    "Retrieve needs value vectors but the namespace has value_dim 0",
                    lambda: client.retrieve(plain, QUERIES, k=K))


BAD_RETRIEVES = {
    "temperature zero": (lambda c, ns: c.retrieve(ns, QUERIES, k=K, temperature=0.0),
                         "temperature must be finite and > 0, got 0.0"),
    "temperature negative": (lambda c, ns: c.retrieve(ns, QUERIES, k=K, temperature=-2.0),
                             "temperature must be finite and > 0, got -2.0"),
    "k above max_k": (lambda c, ns: c.retrieve(ns, QUERIES, k=MAX_K + 1),
                      f"k must be in [1, {MAX_K}] (the namespace's max_k), got {MAX_K + 1}"),
}


@pytest.mark.parametrize("case", list(BAD_RETRIEVES))
def test_retrieve_with_bad_input_is_invalid(client, learnable, case):
    call, fragment = BAD_RETRIEVES[case]
    expect_rejected(client, learnable, InvalidArgument, "INVALID_ARGUMENT", fragment, lambda: call(client, learnable))


# ----- Add with admission ------------------------------------------------------------------------
NEW_KEYS = np.random.default_rng(9).standard_normal((2, DIM)).astype(np.float32)
BAD_ADDS = {
    "nan logp": (dict(logp=np.array([-3.0, np.nan], np.float32)), "logp must be log-probabilities: not NaN and <= 0"),
    "logp too long": (dict(logp=np.full(3, -3.0, np.float32)), "logp must be float32 [2], got float32 [3]"),
    "logp too short": (dict(logp=np.full(1, -3.0, np.float32)), "logp must be float32 [2], got float32 [1]"),
    "negative merge_eps": (dict(merge_eps=-0.1), "merge_eps must be >= 0, got -0.1"),
    "negative merge_eps with logp": (dict(logp=np.full(2, -3.0, np.float32), merge_eps=-1.0),
                                     "merge_eps must be >= 0, got -1.0"),
}


@pytest.mark.parametrize("case", list(BAD_ADDS))
def test_add_with_bad_admission_input_is_invalid(client, learnable, case):
    options, fragment = BAD_ADDS[case]
    expect_rejected(client, learnable, InvalidArgument, "INVALID_ARGUMENT", fragment,
                    lambda: client.add(learnable, NEW_KEYS, np.arange(2), values=np.ones((2, VALUE_DIM), np.float32),
                                       **options))


# ----- CreateNamespace with a bad optimizer ------------------------------------------------------
BAD_OPTIMIZERS = {
    "unknown optimizer": (dict(optimizer="rmsprop"), dict(name="rmsprop"),
                          "unknown optimizer 'rmsprop'; choose one of sgd, adagrad, adam"),
    "lr zero": (dict(optimizer="adam", lr=0.0), dict(name="adam", lr=0.0), "lr must be > 0, got 0.0"),
    "lr negative": (dict(optimizer="sgd", lr=-0.5), dict(name="sgd", lr=-0.5), "lr must be > 0, got -0.5"),
}


def _names(client):
    return [c.name for c in client.list_namespaces()]


@pytest.mark.parametrize("case", list(BAD_OPTIMIZERS))
def test_create_namespace_with_a_bad_optimizer_is_invalid(client, learnable, case):
    options, _, fragment = BAD_OPTIMIZERS[case]
    name = learnable + "-bad-optimizer"
    names = _names(client)
    before = snapshot(client, learnable)
    with pytest.raises(InvalidArgument) as caught:  # raised by the client before any request is sent
        client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, **options)
    assert fragment in caught.value.message, caught.value.message
    assert _names(client) == names and name not in _names(client)
    with pytest.raises(NotFound):
        client.describe_namespace(name)
    assert_unchanged(before, snapshot(client, learnable))
    assert_serves(client, learnable)


@pytest.mark.parametrize("case", list(BAD_OPTIMIZERS))
def test_create_namespace_with_a_bad_optimizer_on_the_wire(server_address, remote_client, namespace_name, case):
    _, optimizer, fragment = BAD_OPTIMIZERS[case]
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=VALUE_DIM, max_k=MAX_K, optimizer="adam", lr=LR)
    try:
        rng = np.random.default_rng(4)
        remote_client.add(namespace_name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
                          values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
        remote_client.apply_gradients(namespace_name, np.arange(ROWS), _grads(ROWS))
        name = namespace_name + "-wire"
        names = _names(remote_client)
        before = snapshot(remote_client, namespace_name)
        request = pb.CreateNamespaceRequest(config=pb.NamespaceConfig(
            name=name, dim=DIM, value_dim=VALUE_DIM, optimizer=pb.OptimizerConfig(**optimizer)))
        with contextlib.closing(grpc.insecure_channel(server_address)) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.MemoryServiceStub(channel).CreateNamespace(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (caught.value.code(), caught.value.details())
        assert fragment in caught.value.details(), caught.value.details()
        assert _names(remote_client) == names and name not in _names(remote_client)
        with pytest.raises(NotFound):
            remote_client.describe_namespace(name)
        assert_unchanged(before, snapshot(remote_client, namespace_name))
        assert_serves(remote_client, namespace_name)
    finally:
        remote_client.drop_namespace(namespace_name)


def test_service_keeps_serving_after_every_bad_learnable_request(remote_client, namespace_name):
    """All the bad calls back to back on one namespace; the step count and the values never move."""
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=VALUE_DIM, max_k=MAX_K, optimizer="adam", lr=LR)
    try:
        rng = np.random.default_rng(6)
        remote_client.add(namespace_name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
                          values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
        remote_client.apply_gradients(namespace_name, np.arange(10), _grads(10))
        before = snapshot(remote_client, namespace_name)
        result = remote_client.retrieve(namespace_name, QUERIES, k=K, temperature=0.5)
        for ids, _ in UNKNOWN_IDS.values():
            with pytest.raises(NotFound):
                remote_client.apply_gradients(namespace_name, ids, _grads(len(ids)))
        for build, _ in BAD_GRADIENTS.values():
            with pytest.raises(InvalidArgument):
                remote_client.apply_gradients(namespace_name, *build())
        for build, _ in BAD_BACKWARDS.values():
            with pytest.raises(InvalidArgument):
                remote_client.retrieve_backward(namespace_name, *build(result))
        for call, _ in BAD_RETRIEVES.values():
            with pytest.raises(InvalidArgument):
                call(remote_client, namespace_name)
        for options, _ in BAD_ADDS.values():
            with pytest.raises(InvalidArgument):
                remote_client.add(namespace_name, NEW_KEYS, np.arange(2), **options)
        assert_unchanged(before, snapshot(remote_client, namespace_name))
        assert_serves(remote_client, namespace_name)
    finally:
        remote_client.drop_namespace(namespace_name)
