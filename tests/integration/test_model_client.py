"""The MoNIM layer on a tiny GPT-2 against the gRPC service (2 shard actors)."""

from __future__ import annotations

import copy
import pydoc

import numpy as np
import pytest
import torch
from monim.model_client import attach_monim
from monim.model_client.examples.train import train
from monim.model_client.text_data import decode, encode, perplexity, random_batches, tiny_gpt2, windows
from torch import nn

DIM = 64


class DenseMemoryFFN(nn.Module):
    """The reference: the same formula with every entry's value as an nn.Parameter, exact top-k in torch."""

    def __init__(self, ffn, keys, values, weights, k, temperature, gate):
        super().__init__()
        self.ffn, self.k = ffn, k
        self.register_buffer("keys", torch.tensor(keys))
        self.register_buffer("log_weights", torch.log(torch.tensor(weights)))
        self.values = nn.Parameter(torch.tensor(values))
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(temperature))))
        self.gate = nn.Parameter(torch.tensor(gate))

    def forward(self, x):
        q = x.reshape(-1, x.shape[-1])
        distances = ((q[:, None, :] - self.keys[None]) ** 2).sum(-1)
        top = torch.topk(distances, self.k, dim=1, largest=False).indices
        d = torch.gather(distances, 1, top)
        alpha = torch.softmax(-d / self.log_temperature.exp() + self.log_weights[top], dim=1)
        m = (alpha[:, :, None] * self.values[top]).sum(1).reshape(*x.shape[:-1], -1)
        return self.ffn(x) + self.gate * m


def test_gradients_equal_a_dense_reference(remote_client, namespace_name):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((400, DIM)).astype(np.float32)
    values = (0.5 * rng.standard_normal((400, DIM))).astype(np.float32)
    weights = rng.uniform(1, 3, 400).astype(np.float32)
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=DIM, optimizer="sgd", lr=1.0)
    try:
        remote_client.add(namespace_name, keys, np.arange(400), values=values, weights=weights)
        model = tiny_gpt2(seed=1)
        reference = copy.deepcopy(model)
        dense = DenseMemoryFFN(reference.transformer.h[-1].mlp, keys, values, weights, k=8, temperature=40.0, gate=0.5)
        reference.transformer.h[-1].mlp = dense
        handle = attach_monim(model, remote_client, namespace_name, k=8, temperature=40.0, gate=0.5)
        ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        reference(ids, labels=ids).loss.backward()
        checked = 0
        reference_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if name.startswith("monim."):
                continue
            ref = reference_params[name]  # the wrapped FFN is `mlp.ffn` in both models
            torch.testing.assert_close(param.grad, ref.grad, atol=1e-4, rtol=1e-4, msg=name)
            checked += 1
        assert checked == len(list(reference.parameters())) - 3  # all but the reference's memory parameters
        torch.testing.assert_close(model.monim.gate.grad, dense.gate.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.monim.log_temperature.grad, dense.log_temperature.grad, atol=1e-4, rtol=1e-4)
        # SGD with lr 1 on the store: the change of each value row is minus its gradient.
        stored = remote_client.get(namespace_name, np.arange(400)).values
        value_grads = dense.values.grad.numpy()
        np.testing.assert_allclose(values - stored, value_grads, atol=1e-4)
        touched = np.abs(value_grads).sum(1) > 0
        assert 0 < touched.sum() < 400
        handle.detach()
    finally:
        remote_client.drop_namespace(namespace_name)


def stdlib_text(modules) -> str:
    return "\n".join(pydoc.render_doc(m, renderer=pydoc.plaintext) for m in modules)


@pytest.fixture(scope="module")
def trained_model():
    """A tiny byte-level GPT-2 trained briefly on standard-library docstrings (no memory)."""
    model = tiny_gpt2(seed=0)
    tokens = encode(stdlib_text(["json", "textwrap", "string"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for inputs in random_batches(tokens, 16, 64, 250):
        loss = model(inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_training_with_memory_in_the_loop(remote_client, namespace_name):
    model = tiny_gpt2(seed=2)
    tokens = encode(stdlib_text(["json", "textwrap"]))
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=DIM, optimizer="adam", lr=1e-3)
    try:
        seed_ids = remote_client.add(namespace_name, np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32),
                                     np.arange(64), values=np.zeros((64, DIM), np.float32))
        result = train(model, remote_client, namespace_name, tokens, steps=200, batch=8, length=64, k=8,
                       progress=False)
        first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
        assert last < 0.75 * first, (first, last)
        assert result.memory_rows[-1][1] > result.memory_rows[0][1] > 64  # grows through admission
        assert result.stats["rows_queued"] == 0 and result.stats["rows_sent"] == result.memory_rows[-1][1] - 64
        rows = remote_client.get(namespace_name, seed_ids)
        assert np.abs(rows.values).sum() > 0  # the store's value rows were trained
        assert result.stats["store"]["retrieve_backward"]["calls"] == 200
    finally:
        remote_client.drop_namespace(namespace_name)


@pytest.mark.slow
@pytest.mark.parametrize("mode, gate", [("knnlm", 0.05), ("monim", 4.0)])
def test_reading_a_passage_once_lowers_its_perplexity(remote_client, namespace_name, trained_model, mode, gate):
    passage = windows(encode(stdlib_text(["shlex"]))[:4096], 128)
    without = perplexity(trained_model, passage)
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=DIM)
    try:
        handle = attach_monim(trained_model, remote_client, namespace_name, k=16, mode=mode, gate=gate,
                              temperature=1.0)
        handle.admission(True)
        with torch.no_grad():
            for start in range(0, passage.shape[0], 16):
                chunk = passage[start:start + 16]
                trained_model(chunk, labels=chunk)
        handle.flush()
        handle.admission(False)
        admitted = handle.stats()["tokens_admitted"]
        with_memory = perplexity(trained_model, passage)
        handle.detach()
        print(f"{mode}: perplexity {without:.2f} -> {with_memory:.2f} ({with_memory / without:.2%}), "
              f"{admitted} tokens memorized")
        assert remote_client.describe_namespace(namespace_name).rows == admitted > 0
        assert with_memory <= 0.7 * without
    finally:
        remote_client.drop_namespace(namespace_name)


def test_generate_sends_one_query_per_sequence_per_step(remote_client, namespace_name, trained_model):
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=DIM)
    try:
        remote_client.add(namespace_name, np.random.default_rng(0).standard_normal((500, DIM)).astype(np.float32),
                          np.arange(500) % 256, values=np.zeros((500, DIM), np.float32))
        handle = attach_monim(trained_model, remote_client, namespace_name, k=16)
        handle.admission(True)
        prompts = torch.stack([encode("The json module ")[:16]] * 3)
        with torch.no_grad():
            out = trained_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12,
                                         do_sample=False, pad_token_id=256)
        handle.flush()
        stats = handle.stats()
        assert handle.layer.decoding is not None  # generate()'s token steps read on one Decode stream
        handle.detach()
        assert handle.layer.decoding is None
        texts = [decode(row[16:]) for row in out]
        retrieve = stats["store"]["retrieve"]
        print(f"generated {texts!r}; store p50 {retrieve['p50_ms']:.2f} ms per token step")
        assert out.shape == (3, 28) and all(len(t) > 0 for t in texts)
        assert retrieve["calls"] == 12  # the prompt, then one call per new token
        assert retrieve["max_rows"] == 3 * 16 and retrieve["median_rows"] == 3  # one query per sequence
        assert stats["tokens_seen"] == 3 * 11  # each generated token after the first was judged
    finally:
        remote_client.drop_namespace(namespace_name)
