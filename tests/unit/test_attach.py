"""attach_monim: checks at attach time, in-process store, hooks in and out, and a store that goes away."""

import numpy as np
import pytest
import torch
from monim.model_client import MemoryClient, attach_monim
from monim.model_client.text_data import tiny_gpt2
from monim.protos.errors import InvalidArgument, NotFound, Unavailable
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server


@pytest.fixture
def client():
    c = MemoryClient(":memory:")
    c.create_namespace("mem", dim=64, value_dim=64, optimizer="sgd", lr=0.1)
    c.create_namespace("keys-only", dim=64, value_dim=0)
    c.create_namespace("narrow", dim=32, value_dim=32)
    c.create_namespace("odd-values", dim=64, value_dim=16)
    return c


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(namespace="narrow"), InvalidArgument, "hidden size is 64 but namespace 'narrow' has dim 32"),
    (dict(namespace="mem", layer_index=2), InvalidArgument, "layer_index 2 is out of range for a model with 2 blocks"),
    (dict(namespace="mem", layer_index=-3), InvalidArgument, "out of range"),
    (dict(namespace="keys-only"), InvalidArgument, "has no value vectors (value_dim 0)"),
    (dict(namespace="odd-values"), InvalidArgument, "has value_dim 16"),
    (dict(namespace="mem", mode="knn"), InvalidArgument, "unknown mode 'knn'"),
    (dict(namespace="mem", k=5000), InvalidArgument, "k must be in [1, 1024]"),
    (dict(namespace="absent"), NotFound, "namespace 'absent' does not exist"),
])
def test_bad_attachments_fail_before_any_step(client, kwargs, error, fragment):
    model = tiny_gpt2()
    original = model.transformer.h[-1].mlp
    with pytest.raises(error) as caught:
        attach_monim(model, client, **kwargs)
    assert fragment in str(caught.value)
    assert model.transformer.h[-1].mlp is original and not hasattr(model, "monim")


def test_knnlm_mode_works_without_values(client):
    model = tiny_gpt2()
    handle = attach_monim(model, client, "keys-only", k=4, mode="knnlm")
    ids = torch.randint(0, 256, (2, 16))
    assert torch.isfinite(model(ids, labels=ids).loss)
    handle.detach()


def test_detach_restores_the_model(client):
    model = tiny_gpt2()
    ids = torch.randint(0, 256, (2, 16))
    before = model(ids).logits
    handle = attach_monim(model, client, "mem", k=4, gate=1.0)
    client.add("mem", np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32), np.arange(50),
               values=np.ones((50, 64), np.float32))
    assert not torch.allclose(model(ids).logits, before)
    handle.detach()
    assert torch.allclose(model(ids).logits, before)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_padding_positions_do_not_query_the_store(client):
    model = tiny_gpt2()
    handle = attach_monim(model, client, "mem", k=4)
    ids = torch.randint(0, 256, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.int64)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    model(ids, attention_mask=mask)
    assert handle.stats()["store"]["retrieve"]["max_rows"] == 10 + 6 + 2
    handle.detach()


def test_store_that_goes_away_mid_training_raises_after_retries():
    runtime = LocalRuntime(2)
    server, port = start_server(Router(runtime), port=0)
    client = MemoryClient(f"127.0.0.1:{port}", timeout_s=2, retries=2, backoff_s=0.05)
    client.create_namespace("mem", dim=64, value_dim=64)
    model = tiny_gpt2()
    handle = attach_monim(model, client, "mem", k=4)
    ids = torch.randint(0, 256, (2, 12))
    model(ids, labels=ids).loss.backward()  # a healthy step
    server.stop(0).wait()
    with pytest.raises(Unavailable):
        model(ids, labels=ids)
    handle.sender.close()
    runtime.shutdown()
