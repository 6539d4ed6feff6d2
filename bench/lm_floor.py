"""The least a memory outside the LM's process can cost a generating LM: the floor under the GPT-2 cell.

A memory layer in the LM's process on the same GPU adds its kernels to every token. A memory in
another process (a shard) adds, besides its kernels, the hand-over: the query's bytes to that process
and m's back, and the GPU switching from one process's context to the other's and back (a GPU
time-slices the contexts of two processes; their kernels do not run side by side without MPS).
This module measures that floor with no monim code at all: a helper process holds keys and values of
the same shapes on the GPU and answers each query with the bare read (a float16 matrix-vector product
over the keys, a top-k, softmax, the weighted sum of the k value rows) over a pipe, and a hook on the
LM's last feed-forward block sends it every position's hidden state and adds the answer (gated), as
attach_monim's layer does. The same read run in the LM's own process is the in-process floor.

    with ReadInAnotherProcess(rows, dim, value_dim) as reader:
        with reading(model, reader):   # or reading(model, BareRead(...)) in this process
            model.generate(...)
"""

from __future__ import annotations

import contextlib
import multiprocessing

import numpy as np
import torch

SEED = 7


class BareRead:
    """The read's kernels over random float16 keys and float32 values on device: m of each query."""

    def __init__(self, rows: int, dim: int, value_dim: int, k: int = 32, device: str = "cuda"):
        generator = torch.Generator(device=device).manual_seed(SEED)
        self.keys = torch.randn(rows, dim, device=device, generator=generator, dtype=torch.float16)
        self.values = torch.randn(rows, value_dim, device=device, generator=generator)
        self.k = k

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        scores = (queries.to(self.keys.dtype) @ self.keys.T).float()
        top, index = scores.topk(self.k, dim=1)
        alpha = torch.softmax(top, dim=1)
        return torch.einsum("bk,bkd->bd", alpha, self.values[index])


def _serve(connection, rows: int, dim: int, value_dim: int, k: int, device: str) -> None:
    read = BareRead(rows, dim, value_dim, k, device)
    connection.send_bytes(b"ready")
    while True:
        message = connection.recv_bytes()
        if not message:
            return
        queries = torch.from_numpy(np.frombuffer(message, np.float32).reshape(-1, dim).copy()).to(device)
        connection.send_bytes(read(queries).cpu().numpy().tobytes())


class ReadInAnotherProcess:
    """BareRead in a helper process (spawned: a CUDA context of its own), called over a pipe."""

    def __init__(self, rows: int, dim: int, value_dim: int, k: int = 32, device: str = "cuda"):
        self.dim, self.value_dim = dim, value_dim
        context = multiprocessing.get_context("spawn")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, rows, dim, value_dim, k, device), daemon=True)
        self._process.start()
        if self._connection.recv_bytes() != b"ready":
            raise RuntimeError("the read's helper process did not start")

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        self._connection.send_bytes(queries.float().cpu().numpy().tobytes())
        answer = np.frombuffer(self._connection.recv_bytes(), np.float32).reshape(-1, self.value_dim)
        return torch.from_numpy(answer.copy()).to(queries.device)

    def close(self) -> None:
        self._connection.send_bytes(b"")
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def reading(model, read, gate: float = 0.05):
    """A hook on a GPT-2 model's last MLP that adds gate * read(hidden states) to its output."""
    def hook(module, args, out):
        hidden = args[0]
        memory = read(hidden.reshape(-1, hidden.shape[-1]))
        return out + gate * memory.reshape(*hidden.shape[:-1], -1).to(out.dtype)

    handle = model.transformer.h[-1].mlp.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
