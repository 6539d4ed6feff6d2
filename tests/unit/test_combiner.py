"""The memory's combiners: MoNIM mode with the kNN-LM mixture too (mix_knn), and the adaptive
combiner (meta-k) that gives lambda / the gate per position."""

import numpy as np
import pytest
import torch
from monim.model_client import MemoryClient, attach_monim
from monim.model_client.layer import AdaptiveCombiner
from monim.model_client.text_data import tiny_gpt2
from monim.protos.errors import InvalidArgument

DIM = 64


@pytest.fixture
def client():
    c = MemoryClient(":memory:")
    c.create_namespace("mem", dim=DIM, value_dim=DIM, optimizer="sgd", lr=0.1)
    rng = np.random.default_rng(0)
    c.add("mem", rng.standard_normal((300, DIM)).astype(np.float32), rng.integers(0, 257, 300),
          values=rng.standard_normal((300, DIM)).astype(np.float32))
    return c


def _model():
    model = tiny_gpt2(DIM, 2, 4, seed=1)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def test_neighbour_features_count_distinct_tokens_among_the_present_neighbours():
    ids = torch.tensor([[4, 5, 6, 7], [1, 2, -1, -1], [-1, -1, -1, -1], [9, 8, 7, 6]])
    tokens = torch.tensor([[3, 3, 3, 3], [0, 5, -1, -1], [-1, -1, -1, -1], [1, 2, 1, 0]])
    distances = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.5, 7.0, 0.0, 0.0], [0.0] * 4, [1.0] * 4])
    features = AdaptiveCombiner.neighbour_features(distances, ids, tokens)
    assert features.shape == (4, 4 + 2)
    np.testing.assert_allclose(features[:, :4], torch.log1p(distances) * (ids >= 0))
    np.testing.assert_allclose(features[:, 4], [1.0, 0.5, 0.0, 1.0])           # present fraction
    np.testing.assert_allclose(features[:, 5], [1 / 4, 2 / 4, 0.0, 3 / 4])     # distinct tokens / k


def test_lm_features_are_entropy_and_max_probability():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]])
    features = AdaptiveCombiner.lm_features(logits)
    np.testing.assert_allclose(features[0], [np.log(4), 0.25], rtol=1e-6)
    assert features[1, 0] < 1e-6 and features[1, 1] > 0.9999


def test_unknown_combiner_is_refused(client):
    with pytest.raises(InvalidArgument, match="unknown combiner 'meta'"):
        attach_monim(_model(), client, "mem", k=4, combiner="meta")


@pytest.mark.parametrize("mode", ["knnlm", "monim"])
def test_a_fresh_adaptive_combiner_gives_the_fixed_combiners_output(client, mode):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for combiner in ("fixed", "adaptive"):
        model = _model()
        handle = attach_monim(model, client, "mem", k=8, mode=mode, gate=0.7, knn_lambda=0.3, combiner=combiner)
        outputs[combiner] = model(ids).logits
        handle.detach()
    torch.testing.assert_close(outputs["adaptive"], outputs["fixed"], rtol=1e-5, atol=1e-5)


def test_monim_mode_with_the_mixture_and_no_gate_is_knnlm_mode(client):
    """mix_knn builds p_kNN from the Retrieve's neighbours with alpha computed as kNN-LM mode does."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs = {}
    for mode in ("knnlm", "monim"):
        model = _model()
        handle = attach_monim(model, client, "mem", k=8, mode=mode, gate=0.0, knn_lambda=0.4, temperature=30.0,
                              mix_knn=True)
        outputs[mode] = torch.log_softmax(model(ids).logits, -1)
        handle.detach()
    torch.testing.assert_close(outputs["monim"], outputs["knnlm"], rtol=1e-5, atol=1e-5)
    plain = torch.log_softmax(_model()(ids).logits, -1)
    assert (outputs["monim"] - plain).abs().max() > 1e-2  # the mixture did change the distribution


def test_the_adaptive_gate_reads_the_lms_distribution_without_the_memory(client, monkeypatch):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    without_memory = _model()(ids).logits
    seen = []
    original = AdaptiveCombiner.lm_features
    monkeypatch.setattr(AdaptiveCombiner, "lm_features", staticmethod(lambda logits: seen.append(logits) or
                                                                       original(logits)))
    model = _model()
    handle = attach_monim(model, client, "mem", k=8, mode="monim", gate=1.0, combiner="adaptive")
    with_memory = model(ids).logits
    handle.detach()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], without_memory, rtol=1e-5, atol=1e-5)
    assert (with_memory - without_memory).abs().max() > 1e-2


@pytest.mark.parametrize("mode, mix_knn", [("knnlm", False), ("monim", False), ("monim", True)])
def test_the_adaptive_combiner_trains_with_the_model(client, mode, mix_knn):
    """Its parameters take gradients from the LM loss, and a few steps lower the loss; the value rows step
    in MoNIM mode (the adaptive gate multiplies m, so the memory's backward still runs)."""
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    model = _model()
    handle = attach_monim(model, client, "mem", k=8, mode=mode, gate=0.5, combiner="adaptive", learn_lambda=True,
                          mix_knn=mix_knn)
    combiner = model.monim.combiner
    optimizer = torch.optim.Adam(combiner.parameters(), lr=0.05)
    before = client.get("mem", np.arange(300)).values
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in combiner.parameters())
        assert combiner.net[2].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(loss.detach()))
    handle.detach()
    assert losses[-1] < losses[0]
    moved = np.abs(client.get("mem", np.arange(300)).values - before).max()
    assert (moved > 0) == (mode == "monim")
