"""Property test: two clients, each on its own front end of one 3-shard deployment, interleave
Add / Delete / Search / Retrieve / RetrieveBackward / ApplyGradients / Get as hypothesis chooses.
Every answer, and the rows at the end, must equal a sequential model of the calls that were
acknowledged (SGD, so the model's value updates are exact sums)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from monim.model_client import MemoryClient
from monim.protos.errors import NotFound

from tests.conftest import assert_same_neighbours, brute_force
from tests.unit.test_learnable_memory import dense_reference

DIM, VALUE_DIM, MAX_K, LR = 4, 2, 16, 0.5
SOURCES = ("", "a", "b")
seeds = st.integers(0, 2**32 - 1)
which = st.sampled_from([0, 1])


class TwoClients(RuleBasedStateMachine):
    clients: list = []

    @initialize()
    def create(self):
        self.name = f"p-{uuid.uuid4().hex[:10]}"
        self.clients[0].create_namespace(self.name, dim=DIM, value_dim=VALUE_DIM, max_k=MAX_K, optimizer="sgd", lr=LR)
        self.model: dict[int, dict] = {}

    def teardown(self):
        if hasattr(self, "name"):
            self.clients[1].drop_namespace(self.name)

    # ----- helpers -------------------------------------------------------------------------------
    def stored_ids(self) -> np.ndarray:
        return np.array(sorted(self.model), np.int64)

    def column(self, ids, field) -> np.ndarray:
        return np.stack([self.model[i][field] for i in ids.tolist()])

    def sgd(self, ids, grads):
        summed = {}
        for entry, grad in zip(ids.tolist(), grads.astype(np.float64)):
            summed[entry] = summed.get(entry, 0) + grad
        for entry, grad in summed.items():
            self.model[entry]["value"] = self.model[entry]["value"] - LR * grad

    # ----- rules ----------------------------------------------------------------------------------
    @rule(client=which, n=st.integers(1, 8), source=st.sampled_from(SOURCES), seed=seeds)
    def add(self, client, n, source, seed):
        rng = np.random.default_rng(seed)
        keys = rng.standard_normal((n, DIM)).astype(np.float32)
        values = rng.standard_normal((n, VALUE_DIM)).astype(np.float32)
        tokens = rng.integers(0, 50, n)
        ids = self.clients[client].add(self.name, keys, tokens, values=values, source=source)
        assert np.unique(ids).size == n and not set(ids.tolist()) & set(self.model)
        for entry, key, token, value in zip(ids.tolist(), keys, tokens.tolist(), values):
            self.model[entry] = {"key": key, "token": token, "value": value.astype(np.float64), "weight": 1.0,
                                 "source": source}

    @rule(client=which, seed=seeds, unknown=st.integers(0, 2))
    def delete_ids(self, client, seed, unknown):
        rng = np.random.default_rng(seed)
        stored = self.stored_ids()
        chosen = rng.choice(stored, min(len(stored), int(rng.integers(0, 4))), replace=False) if len(stored) else []
        ids = np.concatenate([np.asarray(chosen, np.int64), 10**9 + np.arange(unknown)])
        if ids.size == 0:
            return
        assert self.clients[client].delete(self.name, ids=ids) == len(chosen)
        for entry in np.asarray(chosen).tolist():
            del self.model[entry]

    @rule(client=which, source=st.sampled_from(SOURCES))
    def delete_source(self, client, source):
        tagged = [entry for entry, row in self.model.items() if row["source"] == source]
        assert self.clients[client].delete(self.name, source=source) == len(tagged)
        for entry in tagged:
            del self.model[entry]

    @rule(client=which, seed=seeds, k=st.integers(1, MAX_K))
    def search(self, client, seed, k):
        queries = np.random.default_rng(seed).standard_normal((3, DIM)).astype(np.float32)
        found = self.clients[client].search(self.name, queries, k)
        stored = self.stored_ids()
        hits = min(k, len(stored))
        assert (found.ids[:, hits:] == -1).all()
        if hits:
            distances, rows = brute_force(queries, self.column(stored, "key"), hits, "l2")
            assert_same_neighbours(found.ids[:, :hits], found.distances[:, :hits], distances, stored[rows])

    @rule(client=which, other=which, seed=seeds, k=st.integers(1, MAX_K),
          temperature=st.sampled_from([0.5, 1.0, 3.0]))
    def retrieve_and_backward(self, client, other, seed, k, temperature):
        """Forward through one client, backward through the other (front ends share the step)."""
        rng = np.random.default_rng(seed)
        queries = rng.standard_normal((3, DIM)).astype(np.float32)
        result = self.clients[client].retrieve(self.name, queries, k, temperature)
        present = result.ids >= 0
        assert present.sum(1).tolist() == [min(k, len(self.model))] * 3
        if not present.any():
            return
        values = np.zeros(result.ids.shape + (VALUE_DIM,))
        values[present] = self.column(result.ids[present], "value")
        np.testing.assert_allclose(result.memory, (result.alpha[..., None] * values).sum(1), atol=1e-4)
        grad_memory = rng.standard_normal((3, VALUE_DIM)).astype(np.float32)
        grad_queries, _ = self.clients[other].retrieve_backward(self.name, result, grad_memory)
        if present.all():  # the dense reference needs k real neighbours per query
            stored = self.stored_ids()
            positions = np.searchsorted(stored, result.ids)
            _, _, reference, _, value_grads = dense_reference(
                queries, self.column(stored, "key"), self.column(stored, "value").astype(np.float32),
                np.ones(len(stored), np.float32), positions, "l2", temperature, grad_memory)
            np.testing.assert_allclose(grad_queries, reference, rtol=1e-3, atol=1e-3)
        slots = result.ids[present]
        grads = (result.alpha[..., None] * grad_memory[:, None, :])[present]
        self.sgd(slots, grads)

    @rule(client=which, seed=seeds)
    def apply_gradients(self, client, seed):
        stored = self.stored_ids()
        if not len(stored):
            return
        rng = np.random.default_rng(seed)
        ids = rng.choice(stored, int(rng.integers(1, 6)))  # repeats sum
        grads = rng.standard_normal((ids.size, VALUE_DIM)).astype(np.float32)
        assert self.clients[client].apply_gradients(self.name, ids, grads) == np.unique(ids).size
        self.sgd(ids, grads)

    @rule(client=which, seed=seeds)
    def apply_gradients_to_a_missing_row_changes_nothing(self, client, seed):
        stored = self.stored_ids()
        ids = np.concatenate([stored[:3], [10**9]]).astype(np.int64)
        with pytest.raises(NotFound):
            self.clients[client].apply_gradients(self.name, ids, np.ones((ids.size, VALUE_DIM), np.float32))
        # (the invariant below finds any row that moved)

    @invariant()
    def rows_match_the_model(self):
        if not hasattr(self, "name"):
            return
        client = self.clients[len(self.model) % 2]
        assert client.describe_namespace(self.name).rows == len(self.model)
        stored = self.stored_ids()
        if not len(stored):
            return
        rows = client.get(self.name, stored)
        np.testing.assert_array_equal(rows.keys, self.column(stored, "key"))
        np.testing.assert_array_equal(rows.tokens, self.column(stored, "token"))
        np.testing.assert_allclose(rows.values, self.column(stored, "value"), atol=1e-4)
        assert rows.sources == [self.model[i]["source"] for i in stored.tolist()]


def test_two_clients_agree_with_a_sequential_model(three_shard_front_ends):
    with MemoryClient(three_shard_front_ends[0]) as first, MemoryClient(three_shard_front_ends[1]) as second:
        TwoClients.clients = [first, second]
        run_state_machine_as_test(TwoClients, settings=settings(
            max_examples=12, stateful_step_count=20, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
