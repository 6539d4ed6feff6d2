"""A front end with metrics serves Decode steps and counts them (a bug found with the decode
endpoints: a step's answer is framed bytes, and the metrics' observer read ``result.code`` from it,
so with ``--metrics-port`` every successful step broke the stream with an AttributeError)."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from monim.protos.errors import InvalidArgument
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from prometheus_client.parser import text_string_to_metric_families

from monim import MemoryClient

DIM = 8


def test_a_front_end_with_metrics_answers_and_counts_decode_steps():
    runtime = LocalRuntime(1)
    server, port = start_server(Router(runtime), port=0, metrics_port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}", retries=0) as client:
            rng = np.random.default_rng(0)
            client.create_namespace("mem", dim=DIM)
            client.add("mem", rng.standard_normal((30, DIM)).astype(np.float32), np.arange(30))
            queries = rng.standard_normal((2, DIM)).astype(np.float32)
            with client.decode() as stream:
                for _ in range(3):
                    np.testing.assert_array_equal(stream.search("mem", queries, 4).ids,
                                                  client.search("mem", queries, 4).ids)
                with pytest.raises(InvalidArgument):
                    stream.search("mem", queries, 0)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        decode_steps = {sample.labels["code"]: sample.value for family in text_string_to_metric_families(text)
                        for sample in family.samples
                        if sample.name == "monim_requests_total" and sample.labels["method"] == "Decode"}
        assert decode_steps == {"OK": 3, "INVALID_ARGUMENT": 1}
    finally:
        server.stop(0)
        runtime.shutdown()
