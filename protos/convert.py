"""The one module that converts between proto messages and numpy / dataclasses.

Used by both sides of the wire: the servicer (workers/servicer.py) and the
client (model_client/client.py). Tensors travel as raw little-endian bytes
with a dtype name and a shape.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from monim.protos import framing
from monim.protos import memory_pb2 as pb
from monim.protos.config import INDEXES, KEY_DTYPES, METRICS, OPTIMIZERS, NamespaceConfig, OptimizerConfig
from monim.protos.errors import InvalidArgument
from monim.protos.framing import WIRE_DTYPES, wire_array
from monim.protos.results import AddResult, RetrieveResult, Rows, SearchResult

# numpy's limit is 64; no tensor of the API has more than 3.
MAX_TENSOR_DIMS = 32
# A message carries less than 2 GiB, so only an empty tensor (a dimension 0) can have a larger shape.
MAX_TENSOR_SPAN_BYTES = 2**31


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


def tensor_from_proto(tensor: pb.Tensor, what: str, writable: bool = True, data=None) -> np.ndarray:
    """Tensor -> numpy array, checking dtype, shape and byte count; ``what`` names it in errors.
    writable=False: a read-only array over the message's bytes, one copy fewer (the server's
    requests: the router and the shards only read them, as they read Ray's read-only arrays).
    data: the Tensor's bytes where they were left out of the message (protos/framing.parsed)."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{what} has unknown dtype {_quoted(tensor.dtype)}; "
                              f"expected one of {', '.join(WIRE_DTYPES)}")
    if len(tensor.shape) > MAX_TENSOR_DIMS:
        raise InvalidArgument(f"{what} has {len(tensor.shape)} dimensions; at most {MAX_TENSOR_DIMS} are allowed")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{what} has a negative dimension in shape {list(shape)}")
    if data is None:
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


def optional_tensor(message, field: str, what: str | None = None, writable: bool = True, payloads=None):
    """The field's array (see tensor_from_proto for ``writable``), or None when the message does not
    carry it. payloads: the data of the message's Tensor fields, where framing.parsed left them out."""
    if not message.HasField(field):
        return None
    return tensor_from_proto(getattr(message, field), what or field, writable, (payloads or {}).get(field))


def _tensor(message, field: str, payloads) -> np.ndarray:
    """A required Tensor field of an answer, as a writable array (the caller's to keep)."""
    return tensor_from_proto(getattr(message, field), field, True, (payloads or {}).get(field))


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


# An answer with tensors is sent framed (protos/framing.py: one copy of each tensor's bytes); the
# client reads it with framing.parsed and passes the payloads it left out to the *_from_proto below.
_SEARCHED = ("ids", "distances", "tokens", "keys", "values", "weights")


def search_result_to_wire(result: SearchResult) -> bytes:
    return framing.serialized(pb.SearchResponse(generation=result.generation),
                              {name: getattr(result, name) for name in _SEARCHED})


# An answer sent in parts (SearchParts, RetrieveParts) keeps each message at most about this size.
ANSWER_PART_BYTES = 4 << 20


def _row_parts(columns: dict, part_bytes: int):
    """Slices of the batch's rows (the first dimension of every column present) of at most part_bytes
    a part (at least one row a part, and one part for an empty batch)."""
    present = [array for array in columns.values() if array is not None]
    rows = present[0].shape[0] if present else 0
    row_bytes = sum(array.nbytes // max(1, array.shape[0]) for array in present)
    per_part = max(1, part_bytes // max(1, row_bytes))
    for start in range(0, max(rows, 1), per_part):
        yield slice(start, start + per_part)


def _parts_to_wire(message, columns: dict, part_bytes: int):
    for part in _row_parts(columns, part_bytes):
        yield framing.serialized(message, {name: None if a is None else a[part] for name, a in columns.items()})


def search_result_parts_to_wire(result: SearchResult, part_bytes: int | None = None):
    """The answer as SearchResponse messages of consecutive rows, each at most part_bytes (default
    ANSWER_PART_BYTES): SearchParts' stream."""
    return _parts_to_wire(pb.SearchResponse(generation=result.generation),
                          {name: getattr(result, name) for name in _SEARCHED}, part_bytes or ANSWER_PART_BYTES)


def search_result_from_parts(parts) -> SearchResult:
    """SearchParts' answer, its (message, payloads) parts joined in order."""
    return joined_search_results([search_result_from_proto(*part) for part in parts])


def joined_search_results(found: list[SearchResult]) -> SearchResult:
    """The answers of consecutive query rows (the parts of one answer, or a split batch's calls) as one,
    in order; the last one's generation."""
    return found[0] if len(found) == 1 else dataclasses.replace(found[-1], **{
        name: None if getattr(found[0], name) is None else np.concatenate([getattr(f, name) for f in found])
        for name in _SEARCHED})


def search_result_from_proto(response: pb.SearchResponse, payloads: dict | None = None) -> SearchResult:
    return SearchResult(
        ids=_tensor(response, "ids", payloads),
        distances=_tensor(response, "distances", payloads),
        tokens=_tensor(response, "tokens", payloads),
        keys=optional_tensor(response, "keys", payloads=payloads),
        values=optional_tensor(response, "values", payloads=payloads),
        weights=optional_tensor(response, "weights", payloads=payloads),
        generation=response.generation,
    )


def rows_to_wire(rows: Rows) -> bytes:
    response = pb.GetResponse(sources=list(rows.sources))
    for name, array in (rows.optimizer_state or {}).items():  # a map of Tensors: through the message
        fill_tensor(response.optimizer_state[name], array)
    return framing.serialized(response, {name: getattr(rows, name)
                                         for name in ("ids", "keys", "tokens", "weights", "values")})


def rows_from_proto(response: pb.GetResponse, payloads: dict | None = None) -> Rows:
    return Rows(
        ids=_tensor(response, "ids", payloads),
        keys=_tensor(response, "keys", payloads),
        tokens=_tensor(response, "tokens", payloads),
        values=optional_tensor(response, "values", payloads=payloads),
        weights=_tensor(response, "weights", payloads),
        sources=list(response.sources),
        optimizer_state={name: tensor_from_proto(t, name) for name, t in response.optimizer_state.items()} or None,
    )


def add_result_to_wire(result: AddResult) -> bytes:
    return framing.serialized(pb.AddResponse(generation=result.generation),
                              {name: getattr(result, name) for name in ("ids", "admitted", "merged")})


def add_result_from_proto(response: pb.AddResponse, payloads: dict | None = None) -> AddResult:
    return AddResult(ids=_tensor(response, "ids", payloads), admitted=_tensor(response, "admitted", payloads),
                     merged=_tensor(response, "merged", payloads), generation=response.generation)


_RETRIEVED = ("memory", "ids", "alpha", "distances", "tokens", "weights")


def retrieve_result_to_wire(result: RetrieveResult) -> bytes:
    return framing.serialized(pb.RetrieveResponse(generation=result.generation, handle=result.handle),
                              {name: getattr(result, name) for name in _RETRIEVED})


def retrieve_result_parts_to_wire(result: RetrieveResult, part_bytes: int | None = None):
    """The answer as RetrieveResponse messages of consecutive rows (RetrieveParts' stream), as
    search_result_parts_to_wire; each carries the generation and the handle."""
    return _parts_to_wire(pb.RetrieveResponse(generation=result.generation, handle=result.handle),
                          {name: getattr(result, name) for name in _RETRIEVED}, part_bytes or ANSWER_PART_BYTES)


def retrieve_result_from_parts(parts, queries, temperature: float) -> RetrieveResult:
    """RetrieveParts' answer, its (message, payloads) parts joined in order."""
    return joined_retrieve_results([retrieve_result_from_proto(response, queries, temperature, payloads)
                                    for response, payloads in parts])


def joined_retrieve_results(found: list[RetrieveResult]) -> RetrieveResult:
    """As joined_search_results, for Retrieve: the first one's queries, temperature and handle."""
    return found[0] if len(found) == 1 else dataclasses.replace(found[0], **{
        name: np.concatenate([getattr(f, name) for f in found]) for name in _RETRIEVED})


def retrieve_result_from_proto(response: pb.RetrieveResponse, queries, temperature: float,
                               payloads: dict | None = None) -> RetrieveResult:
    """The reply, with the caller's own queries and temperature kept for the backward."""
    return RetrieveResult(**{name: _tensor(response, name, payloads) for name in _RETRIEVED},
                          queries=queries, temperature=temperature, generation=response.generation,
                          handle=response.handle)
