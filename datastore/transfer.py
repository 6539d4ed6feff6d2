"""Arrays between the host and a store's device.

A training step's arrays are large (B x k ids, alpha and distances at B=4096, k=1024: 48 MB; a
backward's partial sums 50 MB), and copies between pageable host memory and a GPU run at a fraction
of the bus: the driver stages them through a pinned buffer of its own, piece by piece. These copies go
through pinned memory that torch's caching host allocator keeps for reuse (on an H200 host a
backward's partials took 51 ms to the host through pageable memory).
"""

from __future__ import annotations

import threading
import warnings
import weakref

import numpy as np
import torch
from monim.protos.copies import copy_rows

# Smaller copies go as they are: a pinned buffer's set-up costs more than it saves.
PINNED_MIN_BYTES = 1 << 20

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}  # to_host_later's, one a device
_copy_streams_lock = threading.Lock()
# host_bytes' pinned tensors by id, while an array over one lives (tensors compare by value: no WeakSet)
_host_blocks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def source_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array that is only read from. Arrays replayed from the log or handed over by
    Ray are read-only views, which torch.from_numpy warns about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def host_bytes(size: int) -> np.ndarray:
    """size bytes of host memory (uint8) for data bound for a GPU: from PINNED_MIN_BYTES, pinned memory of
    torch's caching host allocator, which to_device copies from directly (and which is not reused before
    a copy queued from it ends); smaller, numpy's memory."""
    if size < PINNED_MIN_BYTES:
        return np.empty(size, np.uint8)
    array = torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()
    _host_blocks[id(array.base)] = array.base  # the tensor numpy keeps as the array's base
    return array


def _in_pinned_block(array: np.ndarray, tensor: torch.Tensor) -> torch.Tensor | None:
    """tensor (over array's memory) as a view of the pinned tensor of host_bytes the array lies in, whose
    storage torch's host allocator knows: a copy queued from it keeps the block from reuse until it ends
    (a tensor made from the array's pointer would not). None when the array lies in no such tensor
    (another pinned array, an answer of to_host's say, is staged as before: its owner may write it as
    soon as the call returns, while a queued copy would still read it; host_bytes' are a request's,
    which nothing writes after it is copied in)."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if base is None or _host_blocks.get(id(base)) is not base or not tensor.is_contiguous():
        return None
    start = tensor.data_ptr() - base.data_ptr()  # (host_bytes' tensors are 1-D uint8)
    return base[start:start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """The array (only read from) as a tensor on device: on a GPU, large arrays through pinned memory
    (the copy to the GPU is queued, not waited for; the buffer is not reused before it ends), copied
    straight from where they are when they lie in it already (host_bytes: a request's tensors on a
    server of GPU shards). A tensor (the in-process store's device path) goes there as torch moves it:
    not at all where it is."""
    if torch.is_tensor(array):
        return array.to(device)
    tensor = source_tensor(array)
    if torch.device(device).type != "cuda" or tensor.nbytes < PINNED_MIN_BYTES:
        return tensor.to(device)
    pinned = _in_pinned_block(array, tensor)
    if pinned is not None:
        return pinned.to(device, non_blocking=True)
    staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    # Into pinned memory on the copy threads (protos/copies.py), not torch's: a shard actor runs torch on
    # one thread, and there 25 MB of a training step's queries and gradients took ~5 ms to stage.
    copy_rows(staged.numpy(), np.asarray(array))
    return staged.to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy copy of the tensor; from a GPU through pinned memory when large (the answers of a large
    search, 4096 x 1024 ids and distances, 50 MB: several times faster than pageable memory)."""
    if not tensor.is_cuda:
        return tensor.numpy()
    if tensor.nbytes < PINNED_MIN_BYTES:
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host.numpy()


def to_host_all(tensors: dict) -> dict:
    """{name: numpy copy} of tensors on one device, waiting for the device once: from a GPU, each is
    queued into pinned memory and the stream synchronized after the last (a decoding step's answer is
    five small tensors: one wait instead of five). None stays None; numpy arrays stay as they are."""
    on_gpu = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_cuda}
    host = {}
    for name, tensor in on_gpu.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host[name].copy_(tensor, non_blocking=True)
    if on_gpu:
        torch.cuda.current_stream(next(iter(on_gpu.values())).device).synchronize()
    return {name: host[name].numpy() if name in host else t.numpy() if isinstance(t, torch.Tensor) else t
            for name, t in tensors.items()}


def to_host_later(tensors: dict):
    """to_host_all's copies queued on a side stream of the tensors' device, after the work queued so far
    on the current one, which goes on meanwhile (the device's copy engines run beside its kernels: a
    lone shard's forward computes alpha and the value sums while the search's answer goes to the host).
    Returns a function that waits for the copies and answers as to_host_all does."""
    on_gpu = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_cuda}
    if not on_gpu:
        return lambda: to_host_all(tensors)
    device = next(iter(on_gpu.values())).device
    with _copy_streams_lock:
        side = _copy_streams.get(device)
        if side is None:
            side = _copy_streams[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    host = {}
    with torch.cuda.stream(side):
        for name, tensor in on_gpu.items():
            tensor.record_stream(side)  # not reused by the allocator before the copy ends
            host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host[name].copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(side)

    def wait() -> dict:
        copied.synchronize()
        return {name: host[name].numpy() if name in host else t.numpy() if isinstance(t, torch.Tensor) else t
                for name, t in tensors.items()}
    return wait
