"""Shared helpers: random data and the numpy brute-force oracle."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Without a GPU, Triton's kernels (datastore/gpu_select.py) run in its interpreter, on CPU tensors
# (tests/unit/test_gpu_kernels_interpreted.py); triton.jit reads this when a kernel is defined, so it
# is set before anything imports them.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Ray's token auth on, as `monim serve` turns it on for the local Ray it starts (workers/runtime.py,
# prepare_ray_auth), and set before anything imports Ray, which reads it then: the integration tests
# join the session server's Ray by its address, and Ray sends its token only in this mode.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def brute_force(queries: np.ndarray, keys: np.ndarray, k: int, metric: str):
    """Exact top-k by numpy in float64: (distances [B, k], rows [B, k]); ip distance = -inner product."""
    q, x = queries.astype(np.float64), keys.astype(np.float64)
    if metric == "l2":
        distances = (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None, :]
    else:
        distances = -(q @ x.T)
    rows = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, rows, axis=1), rows


def assert_same_neighbours(ids, distances, oracle_distances, oracle_ids, rtol=1e-4, atol=1e-4):
    """Same ids as the oracle, except where the oracle itself has a near-tie at that rank."""
    np.testing.assert_allclose(distances, oracle_distances, rtol=rtol, atol=atol)
    mismatch = ids != oracle_ids
    if mismatch.any():
        # A mismatch is acceptable only at a tie: the k-th distances are (nearly) equal.
        gaps = np.abs(np.diff(oracle_distances, axis=1))
        tie = np.zeros_like(mismatch)
        tie[:, 1:] |= gaps < atol + rtol * np.abs(oracle_distances[:, 1:])
        tie[:, :-1] |= gaps < atol + rtol * np.abs(oracle_distances[:, :-1])
        assert not (mismatch & ~tie).any(), f"{int((mismatch & ~tie).sum())} neighbours differ from the oracle"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
