"""Checks on caller-supplied arrays. Each raises InvalidArgument naming the bad value.

All checks run before a store changes anything, so a rejected request leaves
every row as it was.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
from monim.protos.copies import in_slices
from monim.protos.errors import InvalidArgument

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
TOKEN_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
INT32_MAX = np.iinfo(np.int32).max


def _as_array(array, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise InvalidArgument(f"{what} must be a numpy array, got {type(array).__name__}")
    return array


SMALL_ARRAY_ELEMENTS = 1 << 16
_FLOAT32 = np.dtype(np.float32)


def all_finite(array: np.ndarray) -> bool:
    """Every element finite. One pass without a temporary: NaN and Inf make any sum non-finite, so a
    finite sum proves it (twice as fast as isfinite().all() on 200 MB, which writes a mask first); a
    non-finite sum may also be an overflow of finite values, which the exact check then tells apart.
    Small arrays (a decoding step's query) take the plain check: errstate's set-up costs more there."""
    if array.size <= SMALL_ARRAY_ELEMENTS:
        return bool(np.isfinite(array).all())
    if array.flags.c_contiguous:  # on several threads when large (a B=4096 step's queries and gradients: 25 MB)
        flat = array.reshape(-1)
        sums = in_slices(lambda start, end: _quiet_sum(flat[start:end]), flat.size, flat.itemsize)
    else:
        sums = [_quiet_sum(array)]
    return all(np.isfinite(total) for total in sums) or bool(np.isfinite(array).all())


def _quiet_sum(array: np.ndarray):
    with np.errstate(over="ignore", invalid="ignore"):  # numpy's error state is each thread's own
        return np.add.reduce(array, axis=None)


def check_vectors(array, width: int, what: str, width_name: str = "dim") -> np.ndarray:
    """float16/float32 [N, width], N >= 1, finite -> float32 [N, width], C-contiguous."""
    array = _as_array(array, what)
    # (the dtype's name only where it is not float32: str(dtype) costs microseconds a call)
    _check_vector_shape("float32" if array.dtype == _FLOAT32 else str(array.dtype), array.shape, width, what,
                        width_name)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not all_finite(array):
        bad_row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise InvalidArgument(f"{what} contain NaN or Inf (first at row {bad_row})")
    return array


def _check_vector_shape(dtype: str, shape: tuple, width: int, what: str, width_name: str) -> None:
    """check_vectors' checks of dtype (its name) and shape, for numpy arrays and tensors alike."""
    if dtype not in ("float32", "float16"):
        raise InvalidArgument(f"{what} have dtype {dtype}; expected float32 or float16")
    if len(shape) != 2:
        raise InvalidArgument(f"{what} must be 2-D [N, {width_name}], got shape {list(shape)}")
    if shape[0] == 0:
        raise InvalidArgument(f"{what} is an empty batch")
    if shape[1] != width:
        raise InvalidArgument(f"{what} have width {shape[1]} but the namespace's {width_name} is {width}")


def is_tensor(array) -> bool:
    """A torch tensor (told apart without importing torch: the thin client has none)."""
    return type(array).__module__.startswith("torch") and hasattr(array, "is_cuda")


def check_vector_tensor(tensor, width: int, what: str, width_name: str = "dim"):
    """check_vectors for a torch tensor (the in-process store's device path: nothing goes to the host
    but one flag, the finite check's): float16/float32 [N, width], N >= 1, finite -> float32, contiguous,
    on the tensor's device. The same errors as check_vectors."""
    _check_vector_shape(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), width, what, width_name)
    tensor = tensor.detach().float().contiguous()
    finite = tensor.isfinite().all(dim=1)
    if not bool(finite.all()):
        bad_row = int((~finite).nonzero()[0, 0])
        raise InvalidArgument(f"{what} contain NaN or Inf (first at row {bad_row})")
    return tensor


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


MAX_RERANK = 16384
DEFAULT_NPROBE = 32
DEFAULT_EF = 64
MAX_EF = 32768


def check_search_options(index: str, nlist: int, k: int, nprobe, rerank, ef=0) -> tuple[int, int, int]:
    """nprobe, rerank and ef of a search of a namespace with index ``index`` (and ``nlist`` lists) for
    k neighbours -> (nprobe, rerank, ef) with the defaults filled in. An option of an index the
    namespace does not have must be 0 (asking is a mistake worth hearing of): all three on a flat
    namespace; ef on an ivf one, where nprobe is in [0, nlist] (0: min(32, nlist)) and rerank 0 (off)
    or in [k, 16384]; nprobe and rerank on an hnsw one, where ef is 0 (max(64, k)) or in [k, 32768]."""
    for name, value in (("nprobe", nprobe), ("rerank", rerank), ("ef", ef)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InvalidArgument(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise InvalidArgument(f"{name} must be >= 0 (0: the default), got {value}")
    nprobe, rerank, ef = int(nprobe), int(rerank), int(ef)
    if index == "flat":
        if nprobe or rerank or ef:
            raise InvalidArgument(f"nprobe and rerank apply to ivf indexes, ef to hnsw indexes; namespace index is "
                                  f"flat (exact): leave them 0, got nprobe {nprobe}, rerank {rerank}, ef {ef}")
        return 0, 0, 0
    if index == "hnsw":
        if nprobe or rerank:
            raise InvalidArgument(f"nprobe and rerank apply to ivf indexes; namespace index is hnsw (use ef for "
                                  f"recall): leave them 0, got nprobe {nprobe}, rerank {rerank}")
        if ef and not k <= ef <= MAX_EF:
            raise InvalidArgument(f"ef must be 0 (the default) or in [k, {MAX_EF}] = [{k}, {MAX_EF}], got {ef}")
        return 0, 0, ef or max(DEFAULT_EF, k)
    if ef:
        raise InvalidArgument(f"ef applies to hnsw indexes; namespace index is {index}: leave it 0, got ef {ef}")
    if nprobe > nlist:
        raise InvalidArgument(f"nprobe must be in [0, {nlist}] (the namespace's nlist), got {nprobe}")
    if rerank and not k <= rerank <= MAX_RERANK:
        raise InvalidArgument(f"rerank must be 0 (off) or in [k, {MAX_RERANK}] = [{k}, {MAX_RERANK}], got {rerank}")
    return nprobe or min(DEFAULT_NPROBE, nlist), rerank, 0


def check_source(source) -> str:
    if not isinstance(source, str):
        raise InvalidArgument(f"source must be a string, got {type(source).__name__}")
    if len(source) > 256:
        raise InvalidArgument(f"source tag has {len(source)} characters; at most 256 are allowed")
    return source


MAX_LOCATION_CHARS = 1024
MAX_PATH_PART_BYTES = 255  # a file name's limit on common filesystems


def check_snapshot_location(location) -> str:
    """A snapshot location as given (a name, path or URI; whether it is inside the snapshot root is
    workers/snapshots.py's to say): at most 1024 characters, each '/'-separated part at most 255
    bytes in UTF-8, no NUL."""
    if not isinstance(location, str) or not location:
        raise InvalidArgument("a snapshot location is missing")
    if len(location) > MAX_LOCATION_CHARS:
        raise InvalidArgument(f"snapshot location has {len(location)} characters; at most {MAX_LOCATION_CHARS} "
                              "are allowed")
    if "\0" in location:
        raise InvalidArgument("snapshot location contains a NUL character")
    longest = max(len(part.encode()) for part in location.split("/"))
    if longest > MAX_PATH_PART_BYTES:
        raise InvalidArgument(f"snapshot location has a part of {longest} bytes; at most {MAX_PATH_PART_BYTES} "
                              "are allowed")
    return location


def new_request_id() -> str:
    """A fresh request or step id (the client makes one per call; the router, for calls without one)."""
    return uuid.uuid4().hex


def check_step_id(step_id) -> str:
    """A request or step id: a string of at most 128 characters ("" when none was given)."""
    if not isinstance(step_id, str):
        raise InvalidArgument(f"request and step ids must be strings, got {type(step_id).__name__}")
    if len(step_id) > 128:
        raise InvalidArgument(f"request/step id has {len(step_id)} characters; at most 128 are allowed")
    return step_id


def part_id(request_id: str, part: int) -> str:
    """The request id of part ``part`` of a call split in parts: "<id>/<part>", or where that would
    pass 128 characters, a SHA-256 of the id in its place (the same for every retry of the call)."""
    whole = f"{request_id}/{part}"
    if len(whole) <= 128:
        return whole
    return f"sha256:{hashlib.sha256(request_id.encode()).hexdigest()}/{part}"


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise InvalidArgument(f"temperature must be a number, got {temperature!r}")
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise InvalidArgument(f"temperature must be finite and > 0, got {temperature}")
    return temperature


def check_value_namespace(value_dim: int, operation: str) -> None:
    if value_dim == 0:
        raise InvalidArgument(f"{operation} needs value vectors but the namespace has value_dim 0")


def check_slots(ids, alpha, distances, batch: int):
    """The forward's ids int64 [B, k], alpha float [B, k] and distances float [B, k], checked together.

    alpha must be finite, in [0, 1], and 0 where id is -1; distances finite where id >= 0.
    Returns (ids int64, alpha float32, distances float32 with 0 in missing slots).
    """
    ids = _as_array(ids, "ids")
    if ids.dtype.kind not in "iu" or ids.ndim != 2:
        raise InvalidArgument(f"ids must be int64 [B, k], got {ids.dtype} {list(ids.shape)}")
    if ids.shape[0] != batch:
        raise InvalidArgument(f"ids have {ids.shape[0]} rows but there are {batch} queries")
    ids = ids.astype(np.int64, copy=False)
    if (ids < -1).any():
        raise InvalidArgument("ids must be >= 0, or -1 for an empty slot")
    alpha = _as_array(alpha, "alpha")
    if alpha.dtype not in FLOAT_DTYPES or alpha.shape != ids.shape:
        raise InvalidArgument(
            f"alpha must be float32 with the shape of ids {list(ids.shape)}, got {alpha.dtype} {list(alpha.shape)}")
    alpha = alpha.astype(np.float32, copy=False)
    if not np.isfinite(alpha).all() or (alpha < 0).any() or (alpha > 1 + 1e-5).any():
        raise InvalidArgument("alpha must be finite and in [0, 1]")
    if (alpha[ids < 0] != 0).any():
        raise InvalidArgument("alpha must be 0 where id is -1")
    distances = _as_array(distances, "distances")
    if distances.dtype not in FLOAT_DTYPES or distances.shape != ids.shape:
        raise InvalidArgument(f"distances must be float32 with the shape of ids {list(ids.shape)}, "
                              f"got {distances.dtype} {list(distances.shape)}")
    distances = np.where(ids >= 0, distances, 0).astype(np.float32)
    if not np.isfinite(distances).all():
        raise InvalidArgument("distances must be finite where id >= 0")
    return ids, alpha, distances


def check_logp(logp, rows: int) -> np.ndarray:
    """Log-probabilities float [rows]: not NaN, <= 0 (rounding aside); -inf allowed."""
    logp = _as_array(logp, "logp")
    if logp.dtype not in FLOAT_DTYPES or logp.shape != (rows,):
        raise InvalidArgument(f"logp must be float32 [{rows}], got {logp.dtype} {list(logp.shape)}")
    logp = logp.astype(np.float32, copy=False)
    if np.isnan(logp).any() or (logp > 1e-4).any():
        raise InvalidArgument("logp must be log-probabilities: not NaN and <= 0")
    return logp


def check_threshold(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_backward_request(config, queries, ids, alpha, distances, grad_memory, temperature):
    """Checks a Retrieve backward whole; returns the cleaned arrays and temperature."""
    check_value_namespace(config.value_dim, "a retrieve backward")
    queries = check_vectors(queries, config.dim, "queries")
    ids, alpha, distances = check_slots(ids, alpha, distances, queries.shape[0])
    return queries, ids, alpha, distances, check_grad_memory(config, grad_memory, queries.shape[0]), \
        check_temperature(temperature)


def check_grad_memory(config, grad_memory, batch: int):
    """grad_memory float [batch, value_dim], finite -> float32 (a torch tensor stays one: check_vector_tensor)."""
    check = check_vector_tensor if is_tensor(grad_memory) else check_vectors
    grad_memory = check(grad_memory, config.value_dim, "grad_memory", "value_dim")
    if grad_memory.shape[0] != batch:
        raise InvalidArgument(f"grad_memory has {grad_memory.shape[0]} rows but there are {batch} queries")
    return grad_memory


def check_gradients(ids, grads, value_dim: int):
    """ids int [N] and grads float [N, value_dim], finite -> (int64, float32)."""
    check_value_namespace(value_dim, "applying gradients")
    ids = check_ids(ids)
    grads = check_vectors(grads, value_dim, "grads", "value_dim")
    if grads.shape[0] != ids.shape[0]:
        raise InvalidArgument(f"ids and grads have different lengths: {ids.shape[0]} ids, {grads.shape[0]} grads")
    return ids, grads


def check_admission(logp, admit_below, merge_eps, rows: int):
    """-> (logp float32 [rows] or None, admit_below, merge_eps >= 0)."""
    if logp is not None:
        logp = check_logp(logp, rows)
    admit_below = check_threshold(admit_below, "admit_below")
    merge_eps = check_threshold(merge_eps, "merge_eps")
    if merge_eps < 0:
        raise InvalidArgument(f"merge_eps must be >= 0, got {merge_eps}")
    return logp, admit_below, merge_eps
