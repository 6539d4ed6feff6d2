"""protos/copies.py: the copies of a large call's bytes are exact at every size and split, refuse a
length mismatch, and let another Python thread run while they copy."""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np
import pytest
from monim.protos import copies


@pytest.fixture
def four_threads(monkeypatch):
    """Slices on four threads from 1 MiB up, whatever this machine's cores."""
    monkeypatch.setattr(copies, "COPY_THREADS", 4)
    monkeypatch.setattr(copies, "PARALLEL_BYTES", 1 << 20)


@pytest.mark.parametrize("size", [0, 1, 4095, 1 << 20, (1 << 20) + 4097, (5 << 20) + 3])
def test_copy_bytes_is_exact_into_a_mapping_whether_split_or_not(size, four_threads):
    source = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    mapping = mmap.mmap(-1, max(size, 1))
    target = memoryview(mapping)[:size]
    copies.copy_bytes(target, memoryview(source))
    assert bytes(target) == source.tobytes()
    target.release()
    mapping.close()


def test_copy_rows_copies_contiguous_and_strided_arrays(four_threads):
    column = np.zeros((1000, 768), np.float32)
    rows = np.random.default_rng(0).standard_normal((600, 768), dtype=np.float32)
    copies.copy_rows(column[200:800], rows)  # 1.8 MB: split
    np.testing.assert_array_equal(column[200:800], rows)
    assert not column[:200].any() and not column[800:].any()
    strided = np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2]
    into = np.zeros((4, 3), np.int64)
    copies.copy_rows(into, strided)
    np.testing.assert_array_equal(into, strided)


def test_copied_bytes_is_a_read_only_copy_that_outlives_its_source(four_threads):
    mapping = mmap.mmap(-1, 3 << 20)
    view = memoryview(mapping)
    view[:] = bytes(range(256)) * (3 << 12)
    out = copies.copied_bytes(view)
    view[:4] = b"\xff\xff\xff\xff"  # the client writes its region again
    assert out[:4].tolist() == [0, 1, 2, 3] and out.size == 3 << 20
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0] = 1
    view.release()
    mapping.close()


def test_a_length_mismatch_is_refused_and_nothing_is_written():
    target = bytearray(8)
    with pytest.raises(ValueError, match="a copy of 9 bytes into 8"):
        copies.copy_bytes(target, b"123456789")
    assert target == bytearray(8)


def test_another_thread_runs_while_a_large_copy_copies():
    """A memoryview slice assignment holds the GIL for the whole copy; copy_bytes does not. A thread
    starts a large copy; this thread, woken as it starts, counts its own Python steps until the copy is
    done. The interpreter's switch interval is made long, so the GIL changes hands only where a thread
    lets it go: a copy that holds it leaves this thread no step at all before it is done."""
    size = 64 << 20
    source = np.ones(size, np.uint8)
    target = np.empty(size, np.uint8)
    copies.copy_bytes(target, source)  # pages touched

    def steps_during(copy) -> int:
        started, done = threading.Event(), threading.Event()

        def run():
            started.set()
            copy()
            done.set()
        thread = threading.Thread(target=run)
        thread.start()
        started.wait()
        steps = 0
        while not done.is_set():
            steps += 1
        thread.join()
        return steps

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    try:
        held = steps_during(lambda: memoryview(target).__setitem__(slice(None), memoryview(source)))
        released = steps_during(lambda: copies.copy_bytes(target, source))
    finally:
        sys.setswitchinterval(interval)
    assert held == 0 and released > 0, (held, released)


def test_a_large_answer_tensor_is_a_writable_copy_of_its_bytes(four_threads):
    """convert.tensor_from_proto's copy of a caller's answer (a backward's dL/dq) goes through copy_rows."""
    from monim.protos import convert
    from monim.protos import memory_pb2 as pb

    grad_queries = np.random.default_rng(1).standard_normal((1024, 768), dtype=np.float32)  # 3 MB
    data = bytearray(grad_queries.tobytes())
    head = pb.Tensor(dtype="float32", shape=grad_queries.shape)
    answer = convert.tensor_from_proto(head, "grad_queries", data=memoryview(data))
    data[:4] = b"\x00\x00\xc0\x7f"  # the received buffer is reused
    np.testing.assert_array_equal(answer, grad_queries)
    answer[0, 0] = 1.0  # the caller's to write
    read_only = convert.tensor_from_proto(head, "grad_queries", writable=False, data=bytes(data))
    assert not read_only.flags.writeable and np.isnan(read_only[0, 0])


@pytest.mark.parametrize("bad_at", [0, 300_000, 524_287, 1_048_575])
def test_the_finite_check_in_slices_finds_a_nan_or_inf_in_any_slice(four_threads, bad_at):
    from monim.protos.validation import all_finite

    array = np.ones((1024, 1024), np.float32)  # 4 MB: four slices
    assert all_finite(array)
    for bad in (np.nan, np.inf, -np.inf):
        array.reshape(-1)[bad_at] = bad
        assert not all_finite(array)
        array.reshape(-1)[bad_at] = 1.0
    huge = np.full((1024, 1024), np.finfo(np.float16).max, np.float16)  # each slice's sum overflows
    assert all_finite(huge) and all_finite(huge[:, ::2])  # the exact check tells; strided: one sum
