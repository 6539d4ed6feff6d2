"""datastore/transfer.py on the CPU: which host arrays go to a device from where they lie (the copies
themselves need a GPU: tests/unit/test_gpu_tensor_path.py)."""

from __future__ import annotations

import gc

import numpy as np
import torch
from monim.datastore import transfer


def test_only_host_bytes_memory_is_copied_to_a_device_from_where_it_lies(monkeypatch):
    """transfer._in_pinned_block (to_device's direct path; the copy itself needs a GPU:
    test_gpu_tensor_path.py): an array in memory host_bytes handed out (a request's, read-only) is seen
    as a view of that block's tensor, at its offset, with its dtype and shape; any other array over a
    tensor (an answer of to_host's, which its owner may write as soon as a call returns) is not; the
    block is forgotten with its last array."""
    monkeypatch.setattr(torch, "empty", lambda size, dtype, pin_memory: torch.zeros(size, dtype=dtype))  # no GPU here
    block = transfer.host_bytes(2 << 20)
    block[:] = np.arange(block.size) % 251
    block.flags.writeable = False
    array = np.frombuffer(block, np.float32)[1024:].reshape(-1, 256)  # as tensor_from_proto reads a request
    view = transfer._in_pinned_block(array, transfer.source_tensor(array))
    assert view is not None and view.dtype == torch.float32 and tuple(view.shape) == array.shape
    assert view.data_ptr() == array.ctypes.data
    np.testing.assert_array_equal(view.numpy(), array)
    other = torch.zeros(2 << 20, dtype=torch.uint8).numpy()  # over a tensor, not host_bytes'
    assert transfer._in_pinned_block(other, transfer.source_tensor(other)) is None
    plain = np.zeros(2 << 20, np.uint8)  # numpy's own memory (no base: the first GPU run raised on it)
    assert transfer._in_pinned_block(plain, transfer.source_tensor(plain)) is None
    assert transfer.host_bytes(1024).base is None  # small: numpy's memory
    del block, array, view
    gc.collect()
    assert len(transfer._host_blocks) == 0
