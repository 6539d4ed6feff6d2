"""The benches' stand-ins for a deployment: the one-process service (a shard and its router in a server
process of their own) answers as the in-process store does, and the out-of-process bare read answers
what the same read in this process does. On the CPU, small."""

import os
import time

import numpy as np
import pytest
import torch
from monim.datastore import slot_kernels
from monim.model_client import MemoryClient

from bench import call_split_bench
from bench.lm_floor import BareRead, ReadInAnotherProcess, reading
from bench.one_process_service import OneProcessService

# The slot kernels' bench on the CPU: in Triton's interpreter (tests/conftest.py sets it where Triton is).
needs_interpreter = pytest.mark.skipif(slot_kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs Triton's interpreter on the CPU")


def test_the_one_process_service_answers_as_the_in_process_store():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((500, 16)).astype(np.float32)
    values = rng.standard_normal((500, 8)).astype(np.float32)
    queries = keys[:20] + 0.01
    with OneProcessService("cpu") as service, MemoryClient(service.address) as remote, \
            MemoryClient(":memory:") as local:
        for client in (remote, local):
            client.create_namespace("n", dim=16, value_dim=8)
            client.add("n", keys, np.arange(500), values=values)
        np.testing.assert_array_equal(remote.search("n", queries, 5).ids, local.search("n", queries, 5).ids)
        np.testing.assert_allclose(remote.retrieve("n", queries, 5, memory_only=True).memory,
                                   local.retrieve("n", queries, 5).memory, atol=1e-6)
        process = service._process
    assert process.poll() == 0  # it stopped when the bench closed it


def test_the_one_process_service_records_its_calls_timeline():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((200, 16)).astype(np.float32)
    with OneProcessService("cpu", timeline=True) as service, MemoryClient(service.address) as remote:
        remote.create_namespace("n", dim=16)
        remote.add("n", keys, np.arange(200))
        service.timeline()
        started = time.perf_counter()
        for _ in range(5):
            remote.search("n", keys[:3], 4)
        ended = time.perf_counter()
        calls = service.timeline(5, since=started)  # (an Add's, recorded late, left out)
        assert service.timeline() == []  # read once
        served, stages = call_split_bench.service_calls(service, lambda: remote.search("n", keys[:3], 4), 7)
    assert len(calls) == 5
    for received, entered, left, sent in calls:  # in order, on this process's clock
        assert started < received <= entered <= left <= sent < ended
    assert len(stages) == len(call_split_bench.STAGES) and min(stages) >= 0
    assert 0 < sum(stages) / 1e3 < 5 * served


def test_the_bare_read_in_another_process_answers_as_here():
    here = BareRead(1000, 16, 8, k=4, device="cpu")
    queries = torch.randn(3, 16)
    with ReadInAnotherProcess(1000, 16, 8, k=4, device="cpu") as there:
        torch.testing.assert_close(there(queries), here(queries), atol=1e-4, rtol=1e-4)


def test_reading_adds_the_gated_read_to_the_last_mlp():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        bare = model(tokens).logits
        with reading(model, lambda hidden: torch.zeros(hidden.shape[0], 16)):
            unchanged = model(tokens).logits
        with reading(model, BareRead(100, 16, 16, k=4, device="cpu")):
            read = model(tokens).logits
        again = model(tokens).logits
    torch.testing.assert_close(unchanged, bare)
    assert not torch.allclose(read, bare)
    torch.testing.assert_close(again, bare)  # the hook is gone


@needs_interpreter
def test_the_slot_kernels_bench_times_each_kernel_beside_its_torch_path(capsys):
    """Small, on the CPU in Triton's interpreter (tests/conftest.py sets it): every cell and every tile runs."""
    from bench import slot_kernels_bench

    rows = slot_kernels_bench.search_shaped_rows(6, 40, 300, "cpu")
    assert ((rows[:, 1:] != rows[:, :-1]) | (rows[:, 1:] < 0)).all()  # distinct within a query
    results = slot_kernels_bench.main(["--device", "cpu", "--rows", "300", "--batch", "6", "--k", "40", "--dim", "24",
                                       "--value-dim", "20", "--repeats", "1", "--sweep"])
    assert [r["what"] for r in results[:2]] == ["value_sum", "slot_sums (dots + sums)"]
    assert len(results) == 2 + sum(len(tiles) for tiles in slot_kernels_bench.SWEEPS.values())
    assert all(r["kernel_ms"] > 0 for r in results)
    assert "distinct rows" in capsys.readouterr().out


@needs_interpreter
def test_the_slot_kernels_bench_sweeps_the_kernels_named_and_refuses_others(capsys):
    from bench import slot_kernels_bench

    small = ["--device", "cpu", "--rows", "200", "--batch", "4", "--k", "24", "--dim", "16", "--value-dim", "12",
             "--repeats", "1", "--sweep"]
    results = slot_kernels_bench.main(small + ["--sweep-kernels", "sums"])
    assert {r["what"] for r in results[2:]} == {"sums tiles"}
    assert len(results) == 2 + len(slot_kernels_bench.SWEEPS["sums"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        slot_kernels_bench.main(small + ["--sweep-kernels", "dots"])
    assert "no kernel ['dots']" in capsys.readouterr().err


def test_gpu_search_bench_refuses_a_setting_it_cannot_compare(capsys):
    from monim.datastore import flat_index, gpu_select

    from bench import gpu_search_bench

    assert gpu_search_bench._setting("SCREEN_MAX_BATCH=128") == (gpu_select, "SCREEN_MAX_BATCH", 128,
                                                                 "SCREEN_MAX_BATCH=128")
    assert gpu_search_bench._setting("flat_index.SAMPLE_RANK=64")[:3] == (flat_index, "SAMPLE_RANK", 64)
    for bad, why in (("NO_SUCH=1", "gpu_select has no setting 'NO_SUCH'"),
                     ("flat_index.SCREEN_MAX_BATCH=1", "flat_index has no setting 'SCREEN_MAX_BATCH'"),
                     ("torch.SAMPLE_RANK=1", "torch has no setting"),
                     ("SCREEN_MAX_BATCH=many", "not a Python literal")):
        with pytest.raises(SystemExit):
            gpu_search_bench.main(["--compare-setting", bad])
        assert why in capsys.readouterr().err


def test_the_socket_round_trip_bench_times_every_way_of_waiting():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench.socket_round_trip_bench", "--calls", "10"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 16 and {(row[2], row[3]) for row in rows} == {(c, s) for c in ("block", "spin")
                                                                          for s in ("block", "spin")}
    assert all(float(row[4]) > 0 for row in rows)


def test_the_apply_gradients_bench_times_each_size_both_ways():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench.apply_gradients_bench", "--rows", "500", "--dim", "16",
                          "--sizes", "64,256", "--calls", "10"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    rows = [line.split("|") for line in out.splitlines()[3:]]
    assert [row[0].strip() for row in rows] == ["64", "256"]
    assert all(float(t) > 0 for row in rows for t in row[1].split())
