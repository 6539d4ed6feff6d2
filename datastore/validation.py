"""Checks on caller-supplied arrays. Each raises InvalidArgument naming the bad value.

All checks run before a store changes anything, so a rejected request leaves
every row as it was.
"""

from __future__ import annotations

import numpy as np

from datastore.errors import InvalidArgument

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
TOKEN_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
INT32_MAX = np.iinfo(np.int32).max


def _as_array(array, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise InvalidArgument(f"{what} must be a numpy array, got {type(array).__name__}")
    return array


def check_vectors(array, width: int, what: str, width_name: str = "dim") -> np.ndarray:
    """float16/float32 [N, width], N >= 1, finite -> float32 [N, width], C-contiguous."""
    array = _as_array(array, what)
    if array.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"{what} have dtype {array.dtype}; expected float32 or float16")
    if array.ndim != 2:
        raise InvalidArgument(f"{what} must be 2-D [N, {width_name}], got shape {list(array.shape)}")
    if array.shape[0] == 0:
        raise InvalidArgument(f"{what} is an empty batch")
    if array.shape[1] != width:
        raise InvalidArgument(
            f"{what} have width {array.shape[1]} but the namespace's {width_name} is {width}"
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        bad_row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise InvalidArgument(f"{what} contain NaN or Inf (first at row {bad_row})")
    return array


def check_tokens(tokens, rows: int) -> np.ndarray:
    """int32/int64 [rows] in [0, 2^31) -> int32 [rows]."""
    tokens = _as_array(tokens, "tokens")
    if tokens.dtype not in TOKEN_DTYPES:
        raise InvalidArgument(f"tokens have dtype {tokens.dtype}; expected int32 or int64")
    if tokens.ndim != 1:
        raise InvalidArgument(f"tokens must be 1-D [N], got shape {list(tokens.shape)}")
    if tokens.shape[0] != rows:
        raise InvalidArgument(f"keys and tokens have different lengths: {rows} keys, {tokens.shape[0]} tokens")
    if rows and (tokens.min() < 0 or tokens.max() > INT32_MAX):
        raise InvalidArgument("tokens must lie in [0, 2^31)")
    return tokens.astype(np.int32, copy=False)


def check_weights(weights, rows: int) -> np.ndarray:
    """float [rows], finite and > 0 -> float32 [rows]."""
    weights = _as_array(weights, "weights")
    if weights.dtype not in FLOAT_DTYPES:
        raise InvalidArgument(f"weights have dtype {weights.dtype}; expected float32 or float16")
    if weights.shape != (rows,):
        raise InvalidArgument(f"weights must have shape [{rows}], got {list(weights.shape)}")
    weights = weights.astype(np.float32, copy=False)
    if not np.isfinite(weights).all() or (weights <= 0).any():
        raise InvalidArgument("weights must be finite and > 0")
    return weights


def check_values(values, rows: int, value_dim: int) -> np.ndarray:
    """float [rows, value_dim], finite -> float32."""
    if value_dim == 0:
        raise InvalidArgument("values were given but the namespace has value_dim 0")
    values = check_vectors(values, value_dim, "values", "value_dim")
    if values.shape[0] != rows:
        raise InvalidArgument(f"keys and values have different lengths: {rows} keys, {values.shape[0]} values")
    return values


def check_ids(ids) -> np.ndarray:
    """int [N], N >= 1 -> int64 [N]."""
    ids = _as_array(ids, "ids")
    if ids.dtype.kind not in "iu":
        raise InvalidArgument(f"ids have dtype {ids.dtype}; expected int64")
    if ids.ndim != 1:
        raise InvalidArgument(f"ids must be 1-D [N], got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise InvalidArgument("ids is an empty batch")
    return ids.astype(np.int64, copy=False)


def check_k(k, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgument(f"k must be an integer, got {k!r}")
    if not 1 <= k <= max_k:
        raise InvalidArgument(f"k must be in [1, {max_k}] (the namespace's max_k), got {k}")
    return int(k)


def check_source(source) -> str:
    if not isinstance(source, str):
        raise InvalidArgument(f"source must be a string, got {type(source).__name__}")
    if len(source) > 256:
        raise InvalidArgument(f"source tag has {len(source)} characters; at most 256 are allowed")
    return source
