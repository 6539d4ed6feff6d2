"""The one module that converts between proto messages and numpy / dataclasses.

Used by both sides of the wire: the servicer (workers/servicer.py) and the
client (model_client/client.py). Tensors travel as raw little-endian bytes
with a dtype name and a shape.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from monim.protos import memory_pb2 as pb
from monim.protos.config import INDEXES, KEY_DTYPES, METRICS, OPTIMIZERS, NamespaceConfig, OptimizerConfig
from monim.protos.errors import InvalidArgument
from monim.protos.results import AddResult, RetrieveResult, Rows, SearchResult

WIRE_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("bool"),
}
# numpy's limit is 64; no tensor of the API has more than 3.
MAX_TENSOR_DIMS = 32
# A message carries less than 2 GiB, so only an empty tensor (a dimension 0) can have a larger shape.
MAX_TENSOR_SPAN_BYTES = 2**31


def wire_array(array) -> tuple[str, np.ndarray]:
    """(dtype name, numpy array in the wire's byte order) of what a Tensor carries: a torch tensor
    comes to the host, float64 goes as float32 (not necessarily contiguous: tobytes() and
    protos/framing.py each make one C-order copy). INVALID_ARGUMENT for a dtype that cannot travel."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise InvalidArgument(f"dtype {name} cannot travel; use one of {', '.join(WIRE_DTYPES)}")
    # astype only copies for a big-endian array.
    return name, array.astype(WIRE_DTYPES[name], copy=False)


def fill_tensor(target: pb.Tensor, array) -> pb.Tensor:
    """Writes a numpy array or torch tensor into the Tensor message ``target`` in place (float64 is
    sent as float32); returns ``target``.

    Filling the parent message's own field costs one copy of the data into the message (after the
    one into ``bytes``, which protobuf requires); building a Tensor and assigning it with
    CopyFrom or a constructor argument would copy the data once more. A request the client sends
    goes through protos/framing.py instead, which copies each tensor's bytes once.
    """
    name, array = wire_array(array)
    target.dtype = name
    del target.shape[:]
    target.shape.extend(array.shape)
    target.data = array.tobytes()  # C order whatever the layout
    return target


def tensor_to_proto(array) -> pb.Tensor:
    """numpy array or torch tensor -> a new Tensor (float64 is sent as float32). To set a field of
    a message, prefer fill_tensor(message.field, array): it saves a copy."""
    return fill_tensor(pb.Tensor(), array)


def _quoted(text: str, limit: int = 64) -> str:
    """repr of caller-supplied text for an error message, cut to ``limit`` characters (a status
    message travels in a header, which a long one would overflow)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def tensor_from_proto(tensor: pb.Tensor, what: str, writable: bool = True) -> np.ndarray:
    """Tensor -> numpy array, checking dtype, shape and byte count; ``what`` names it in errors.
    writable=False: a read-only array over the message's bytes, one copy fewer (the server's
    requests: the router and the shards only read them, as they read Ray's read-only arrays)."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{what} has unknown dtype {_quoted(tensor.dtype)}; "
                              f"expected one of {', '.join(WIRE_DTYPES)}")
    if len(tensor.shape) > MAX_TENSOR_DIMS:
        raise InvalidArgument(f"{what} has {len(tensor.shape)} dimensions; at most {MAX_TENSOR_DIMS} are allowed")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{what} has a negative dimension in shape {list(shape)}")
    data = tensor.data  # read once: every read of a bytes field makes a new copy of it
    # Python integers: a product in int64 wraps (shape [2^32, 2^32] would "need" 0 bytes).
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise InvalidArgument(
            f"{what} carries {len(data)} bytes but shape {list(shape)} of {tensor.dtype} needs {expected}"
        )
    if math.prod(max(s, 1) for s in shape) * dtype.itemsize > MAX_TENSOR_SPAN_BYTES:  # empty, but numpy cannot shape it
        raise InvalidArgument(f"{what} is empty but has a dimension too large in shape {list(shape)}")
    # An array over ``bytes`` is read-only; a caller's answer (user code may write to it) is copied.
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=writable)


def optional_tensor(message, field: str, what: str | None = None, writable: bool = True):
    """The field's array (see tensor_from_proto for ``writable``), or None when the message does not carry it."""
    if not message.HasField(field):
        return None
    return tensor_from_proto(getattr(message, field), what or field, writable)


def config_to_proto(config: NamespaceConfig) -> pb.NamespaceConfig:
    fields = config.to_dict()
    optimizer = pb.OptimizerConfig(**fields.pop("optimizer"))
    return pb.NamespaceConfig(**fields, optimizer=optimizer)


def _known_option(value: str, what: str, choices) -> str:
    """An option name as given; a long unknown one is refused here, before a message would quote it whole."""
    if len(value) > 64:
        raise InvalidArgument(f"unknown {what} {_quoted(value)}; choose one of {', '.join(choices)}")
    return value


def _optimizer_from_proto(message: pb.OptimizerConfig) -> OptimizerConfig:
    fields = {"name": _known_option(message.name, "optimizer", OPTIMIZERS)} if message.name else {}
    for field in dataclasses.fields(OptimizerConfig):
        if field.name != "name" and message.HasField(field.name):
            fields[field.name] = getattr(message, field.name)
    return OptimizerConfig(**fields)


def config_from_proto(message: pb.NamespaceConfig) -> NamespaceConfig:
    """Unset fields take the dataclass defaults."""
    fields = {"name": message.name, "dim": message.dim}
    for name in ("metric", "index", "key_dtype", "value_dim", "max_k", "generation", "nlist", "pq_m",
                 "train_min_rows"):
        if getattr(message, name):
            fields[name] = getattr(message, name)
    for name, choices in (("metric", METRICS), ("index", INDEXES), ("key_dtype", KEY_DTYPES)):
        if name in fields:
            _known_option(fields[name], name, choices)
    if message.HasField("optimizer"):
        fields["optimizer"] = _optimizer_from_proto(message.optimizer)
    return NamespaceConfig(**fields)


def search_result_to_proto(result: SearchResult) -> pb.SearchResponse:
    response = pb.SearchResponse()
    for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
        array = getattr(result, name)
        if array is not None:
            fill_tensor(getattr(response, name), array)
    response.generation = result.generation
    return response


def search_result_from_proto(response: pb.SearchResponse) -> SearchResult:
    return SearchResult(
        ids=tensor_from_proto(response.ids, "ids"),
        distances=tensor_from_proto(response.distances, "distances"),
        tokens=tensor_from_proto(response.tokens, "tokens"),
        keys=optional_tensor(response, "keys"),
        values=optional_tensor(response, "values"),
        weights=optional_tensor(response, "weights"),
        generation=response.generation,
    )


def rows_to_proto(rows: Rows) -> pb.GetResponse:
    response = pb.GetResponse(sources=list(rows.sources))
    for name in ("ids", "keys", "tokens", "weights"):
        fill_tensor(getattr(response, name), getattr(rows, name))
    if rows.values is not None:
        fill_tensor(response.values, rows.values)
    for name, array in (rows.optimizer_state or {}).items():
        fill_tensor(response.optimizer_state[name], array)
    return response


def rows_from_proto(response: pb.GetResponse) -> Rows:
    return Rows(
        ids=tensor_from_proto(response.ids, "ids"),
        keys=tensor_from_proto(response.keys, "keys"),
        tokens=tensor_from_proto(response.tokens, "tokens"),
        values=optional_tensor(response, "values"),
        weights=tensor_from_proto(response.weights, "weights"),
        sources=list(response.sources),
        optimizer_state={name: tensor_from_proto(t, name) for name, t in response.optimizer_state.items()} or None,
    )


def add_result_to_proto(result: AddResult) -> pb.AddResponse:
    response = pb.AddResponse()
    for name in ("ids", "admitted", "merged"):
        fill_tensor(getattr(response, name), getattr(result, name))
    response.generation = result.generation
    return response


def add_result_from_proto(response: pb.AddResponse) -> AddResult:
    return AddResult(ids=tensor_from_proto(response.ids, "ids"),
                     admitted=tensor_from_proto(response.admitted, "admitted"),
                     merged=tensor_from_proto(response.merged, "merged"), generation=response.generation)


_RETRIEVED = ("memory", "ids", "alpha", "distances", "tokens", "weights")


def retrieve_result_to_proto(result: RetrieveResult) -> pb.RetrieveResponse:
    response = pb.RetrieveResponse()
    for name in _RETRIEVED:
        fill_tensor(getattr(response, name), getattr(result, name))
    response.generation = result.generation
    response.handle = result.handle
    return response


def retrieve_result_from_proto(response: pb.RetrieveResponse, queries, temperature: float) -> RetrieveResult:
    """The reply, with the caller's own queries and temperature kept for the backward."""
    return RetrieveResult(**{name: tensor_from_proto(getattr(response, name), name) for name in _RETRIEVED},
                          queries=queries, temperature=temperature, generation=response.generation,
                          handle=response.handle)
