"""Hypothesis strategies for hostile field values: namespace names, strings, numbers and tensors.

A tensor travels as ``Tensor{dtype, shape, data}`` (little-endian, C order). ``encoded`` writes any
numpy array that way without checks (so a test can send dtypes the client refuses to send);
``bad_encoding`` draws one defect of the encoding or the shape of a valid field value. Every
defect drawn here is a caller's mistake the server must answer with INVALID_ARGUMENT.

Which names are valid follows docs/API.md, not the server's code: letters, digits, ``_ - .``,
1 to 128 characters, not ``.`` or ``..``.
"""

from __future__ import annotations

import math
import re

import numpy as np
from hypothesis import strategies as st
from monim.protos import memory_pb2 as pb

WIRE_DTYPES = ("float32", "float16", "int32", "int64", "bool")
FLOATS = ("float32", "float16")
INTS = ("int32", "int64")
_VALID_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
INT64_MAX = 2**63 - 1

# Names docs/API.md accepts, but that test_namespace_name_with_a_trailing_newline_is_invalid shows
# the server accepting though they are not (validate_namespace_name's `$` matches before a final
# "\n"). They are left out of the generated cases until that test passes.
def _accepted_by_the_known_bug(name: str) -> bool:
    return name.endswith("\n") and _VALID_NAME.fullmatch(name[:-1]) is not None and name[:-1] not in (".", "..")


def is_valid_name(name: str) -> bool:
    """docs/API.md's rule for namespace names."""
    return _VALID_NAME.fullmatch(name) is not None and name not in (".", "..")


# ----- strings -----------------------------------------------------------------------------------
_ODD_NAMES = ["", ".", "..", "...", "../fuzz-values", "fuzz-values/..", "a/b", "a\\b", "/etc/passwd", "C:\\x", "~",
              " fuzz-values", "fuzz-values ", "fuzz-values\t", "fuzz\nvalues", "a\0b", "\0", "é", "名前", "ns-💥",
              "fuzz-values\u202e", "\u200bfuzz-values", "fuzz‐values", "ｆｕｚｚ", "%2e%2e", "$(id)", "'; DROP", "*",
              "a" * 129, "a" * 10_000, "é" * 64, "\ud7ff" * 3]
odd_names = st.one_of(
    st.sampled_from(_ODD_NAMES),
    st.text(min_size=0, max_size=40),
    st.text(alphabet="./\\-_a", min_size=1, max_size=12),
    st.integers(129, 10_000).map(lambda n: "n" * n),
).filter(lambda name: not is_valid_name(name) and not _accepted_by_the_known_bug(name))


def unknown_names(taken) -> st.SearchStrategy[str]:
    """Valid names that no namespace has."""
    return st.one_of(st.sampled_from(["fuzz-values-2", "FUZZ-VALUES", "fuzz_plain", "-", "_", "...", "a" * 128]),
                     st.from_regex(_VALID_NAME, fullmatch=True)).filter(
        lambda name: is_valid_name(name) and name not in taken)


hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\0", "..", "../..", "/", "é", "💥", "\u202e", "null", "None", "%s%n", "a" * 10_000]),
    st.integers(0, 5000).map(lambda n: "x" * n),
)


def long_text(min_chars: int) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(min_chars, min_chars + 64), st.sampled_from([10_000, 100_000])).map(lambda n: "s" * n)


# ----- numbers -----------------------------------------------------------------------------------
def int_range(bits: int, signed: bool) -> st.SearchStrategy[int]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if signed else 2]))


def bad_positive_floats() -> st.SearchStrategy[float]:
    """Not a finite number > 0."""
    return st.one_of(st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, -1e-300]),
                     st.floats(max_value=0.0), st.floats(allow_nan=True).filter(lambda x: not math.isfinite(x)))


non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


# ----- tensors -----------------------------------------------------------------------------------
def encoded(array: np.ndarray, dtype: str | None = None, shape=None, data: bytes | None = None) -> pb.Tensor:
    """The array as a Tensor, little-endian, with any of dtype / shape / data replaced."""
    array = np.asarray(array)
    raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return pb.Tensor(dtype=array.dtype.name if dtype is None else dtype,
                     shape=list(array.shape) if shape is None else list(shape), data=raw if data is None else data)


def floats_array(draw, shape, dtype: str = "float32", scale: float = 1.0) -> np.ndarray:
    seed = draw(st.integers(0, 2**32 - 1))
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def with_non_finite(draw, array: np.ndarray) -> np.ndarray:
    """A float array with NaN or +-Inf somewhere."""
    array = array.astype(array.dtype, copy=True)
    flat = array.reshape(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(non_finite)
    return array


_UNKNOWN_DTYPES = st.one_of(
    st.sampled_from(["float64", "FLOAT32", "float32 ", " int64", "uint8", "int8", "uint64", "complex64", "<f4",
                     "f4", "half", "bfloat16", "object", "str", "", "\0", "float32\0", "flöat32", "d" * 10_000]),
    st.text(max_size=12),
).filter(lambda name: name not in WIRE_DTYPES)

ENCODING_DEFECTS = ("unknown dtype", "bytes do not match the shape", "negative dimension", "huge dimension",
                    "shape whose size overflows int64", "empty, with a huge dimension", "too many dimensions",
                    "wrong rank", "wrong dtype")


def bad_encoding(draw, array: np.ndarray, accepted_dtypes) -> tuple[pb.Tensor, str]:
    """One defect of the encoding or shape of ``array`` (a valid value of its field, >= 1 element):
    (the tensor, what is wrong). Every one is INVALID_ARGUMENT."""
    defect = draw(st.sampled_from(ENCODING_DEFECTS))
    shape = list(array.shape)
    if defect == "unknown dtype":
        return encoded(array, dtype=draw(_UNKNOWN_DTYPES)), defect
    if defect == "bytes do not match the shape":
        raw = encoded(array).data
        change = draw(st.integers(1, max(1, len(raw))))
        if draw(st.booleans()) and change <= len(raw):
            raw = raw[:len(raw) - change]
        else:
            raw = raw + draw(st.binary(min_size=change, max_size=change))
        return encoded(array, data=raw), defect
    if defect == "negative dimension":
        shape = shape or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.integers(-(2**63), -1))
        return encoded(array, shape=shape), defect
    if defect == "huge dimension":
        shape = shape or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.one_of(st.integers(2**31, INT64_MAX),
                                                                     st.sampled_from([INT64_MAX, 2**62, 2**32])))
        return encoded(array, shape=shape), defect
    if defect == "shape whose size overflows int64":
        # The product of these wraps to 0 modulo 2^64, the size of the empty data sent with it.
        shape = draw(st.sampled_from([[2**32, 2**32], [2**62, 4], [2**16] * 4, [4, 2**62], [2**33, 2**31],
                                      [2**32, 2**32, 1], [1, 2**63 - 2**62, 4]]))
        return encoded(array, shape=shape, data=b""), defect
    if defect == "empty, with a huge dimension":  # no bytes are needed, but no array can have the shape
        shape = [0] + [draw(st.integers(2**31, INT64_MAX)) for _ in range(max(1, len(shape) - 1))]
        return encoded(array, shape=draw(st.permutations(shape)), data=b""), defect
    if defect == "too many dimensions":
        ndim = draw(st.integers(33, 100))
        return encoded(array, shape=shape + [1] * (ndim - len(shape))), defect
    if defect == "wrong rank":
        if array.ndim == 1:
            reshaped = array.reshape(draw(st.sampled_from([(1, -1), (-1, 1), (1, 1, -1)])))
        elif array.ndim == 2:
            reshaped = array.reshape(draw(st.sampled_from([(-1,), (1, *array.shape), (*array.shape, 1)])))
        else:
            reshaped = array.reshape(-1)
        if array.size == 1 and draw(st.booleans()):
            reshaped = array.reshape(())  # a 0-d tensor
        return encoded(reshaped), defect
    wrong = [d for d in WIRE_DTYPES if d not in accepted_dtypes]
    dtype = draw(st.sampled_from(wrong))
    cast = (array != 0) if dtype == "bool" else np.nan_to_num(array).astype(dtype)
    return encoded(cast), defect


def random_tensor(draw) -> pb.Tensor:
    """Anything: a consistent tensor of random dtype, shape and contents, or garbage."""
    if draw(st.booleans()):
        return pb.Tensor(dtype=draw(st.one_of(st.sampled_from(WIRE_DTYPES), _UNKNOWN_DTYPES)),
                         shape=draw(st.lists(int_range(64, True), max_size=4)), data=draw(st.binary(max_size=64)))
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    size = int(np.prod(shape, dtype=np.int64))
    if dtype in FLOATS:
        elements = st.floats(width=16 if dtype == "float16" else 32, allow_nan=True, allow_infinity=True)
    elif dtype == "bool":
        elements = st.booleans()
    else:
        elements = int_range(32 if dtype == "int32" else 64, True)
    values = draw(st.lists(elements, min_size=size, max_size=size))
    return encoded(np.array(values, dtype=dtype).reshape(shape))
