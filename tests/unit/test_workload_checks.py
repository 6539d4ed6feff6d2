"""The reliability workload's checks of an answer (reliability/workload.py), on answers made up here.

Seen in CI (the reliability profile, seed 15): at the moment a shard came back from its SIGSTOP and
the slow-disk fault began, DescribeNamespace answered both shards "recovering" with 0 rows each (as
documented: a shard that does not answer within DESCRIBE_WAIT_S is named, with no rows), and the
workload reported a wrong answer ("describe c1-keys: 0 rows (per shard [0, 0]), the model has
4539"): its check compared the total with its model without looking at the shards' states.
"""

from __future__ import annotations

import logging
import types

import pytest

from reliability.workload import Client, ClientReport


def _client_answering(description) -> Client:
    client = Client.__new__(Client)  # no front ends: the call is answered here
    client.report = ClientReport(0)
    client.plan = types.SimpleNamespace(index=1)
    client.log = logging.getLogger("test-workload-checks")
    client.call = lambda kind, function, write, expect=(): (description, 0)
    return client


def _described(*shards: tuple[str, int]):
    rows = [{"shard": i, "state": state, "rows": count} for i, (state, count) in enumerate(shards)]
    return types.SimpleNamespace(rows=sum(s["rows"] for s in rows), shards=rows)


_TWIN = types.SimpleNamespace(spec=types.SimpleNamespace(name="c1-keys"), rows=lambda: 4539)


@pytest.mark.parametrize("shards", [
    [("serving", 2270), ("serving", 2269)],
    [("recovering", 0), ("recovering", 0)],       # the CI case: both shards slow to answer
    [("serving", 2270), ("unavailable", 0)],
    [("recovering", 0), ("serving", 4539)],       # after a shrink one shard may hold every row
])
def test_a_describe_answered_as_documented_is_not_a_wrong_answer(shards):
    client = _client_answering(_described(*shards))
    client.describe(_TWIN)
    assert client.report.wrong == 0, client.report.wrong_details
    partial = [state for state, _ in shards if state != "serving"]
    assert sum(client.report.refusals.values()) == (1 if partial else 0)


@pytest.mark.parametrize("shards, why", [
    ([("serving", 2270), ("serving", 2268)], "4538 rows"),          # a row lost
    ([("serving", 2270), ("serving", 2270)], "4540 rows"),          # a row too many
    ([("serving", 4540), ("recovering", 0)], "more than the model"),  # the shards that answered hold too many
    ([("serving", 2270), ("stuck", 0)], "state 'stuck'"),           # not a documented state
])
def test_a_describe_that_contradicts_the_model_is_a_wrong_answer(shards, why):
    client = _client_answering(_described(*shards))
    client.describe(_TWIN)
    assert client.report.wrong == 1
    assert why in client.report.wrong_details[0][1]


def test_a_total_that_is_not_the_sum_of_its_shards_is_a_wrong_answer():
    described = _described(("serving", 2270), ("recovering", 0))
    described.rows = 4539  # the total must count only the shards that answered
    client = _client_answering(described)
    client.describe(_TWIN)
    assert client.report.wrong == 1
    assert "per shard" in client.report.wrong_details[0][1]


@pytest.mark.parametrize("answered, failed_attempts, wrong", [
    (3, 0, 0),
    (3, 2, 0),   # retried after a lost answer: the same count
    (2, 1, 1),   # a retry that counts fewer: a wrong answer since deletes count every row across a reshard
    (4, 1, 1),
])
def test_a_retried_delete_must_count_what_the_model_deleted(answered, failed_attempts, wrong):
    """A retried Delete answers every row it deleted, wherever a reshard took them (docs/OPERATIONS.md,
    "Reshard"; fixed for deletes by ids and by source on 2026-12-07): the workload no longer lets a
    retried delete count fewer, as it still does for a retried step."""
    import numpy as np

    client = _client_answering(None)
    client.call = lambda kind, function, write, expect=(): (answered, failed_attempts)
    client.rng = np.random.default_rng(0)
    client.model = types.SimpleNamespace(delete=lambda name, ids=None, source=None: 3)
    twin = types.SimpleNamespace(spec=types.SimpleNamespace(name="c1-keys"), live=np.arange(10),
                                 gone=np.zeros(0, np.int64), to_served=lambda ids: ids, deleted=lambda ids: None)
    client.delete(twin, rows=3)
    assert client.report.wrong == wrong, client.report.wrong_details
