"""The one module that converts between proto messages and numpy / dataclasses.

Used by both sides of the wire: the servicer (workers/servicer.py) and the
client (model_client/client.py). Tensors travel as raw little-endian bytes
with a dtype name and a shape.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
from monim.protos import framing
from monim.protos import memory_pb2 as pb
from monim.protos.config import INDEXES, KEY_DTYPES, METRICS, OPTIMIZERS, NamespaceConfig, OptimizerConfig
from monim.protos.copies import copy_rows
from monim.protos.errors import FailedPrecondition, InternalError, InvalidArgument
from monim.protos.framing import WIRE_DTYPES, wire_array
from monim.protos.results import RETRIEVED, AddResult, RetrieveResult, Rows, SearchResult

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
    data: the Tensor's bytes where they were left out of the message (protos/framing.parsed); a writable
    uint8 array is memory lent to the answer, whose array is then made over it, not copied."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{what} has unknown dtype {_quoted(tensor.dtype)}; "
                              f"expected one of {', '.join(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)  # Python ints (a decoding step parses one small tensor: no generators here)
    if len(shape) > MAX_TENSOR_DIMS:
        raise InvalidArgument(f"{what} has {len(shape)} dimensions; at most {MAX_TENSOR_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise InvalidArgument(f"{what} has a negative dimension in shape {list(shape)}")
    if data is None:
        data = tensor.data  # read once: every read of a bytes field makes a new copy of it
    # Python integers: a product in int64 wraps (shape [2^32, 2^32] would "need" 0 bytes).
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise InvalidArgument(
            f"{what} carries {len(data)} bytes but shape {list(shape)} of {tensor.dtype} needs {expected}"
        )
    # An empty tensor with a dimension too large for numpy to shape (any tensor that large is refused).
    # (Without a dimension 0 the span is the bytes counted above.)
    if (expected or math.prod(max(s, 1) for s in shape) * dtype.itemsize) > MAX_TENSOR_SPAN_BYTES:
        raise InvalidArgument(f"{what} would span more than {MAX_TENSOR_SPAN_BYTES} bytes: a dimension too large "
                              f"in shape {list(shape)}")
    native = _NATIVE[dtype]
    if writable and native == dtype and isinstance(data, np.ndarray) and data.flags.writeable:
        return data.view(dtype).reshape(shape)  # memory lent to this answer (a client's shared memory region)
    # An array over ``bytes`` is read-only; a caller's answer (user code may write to it) is copied.
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if writable and native == dtype:  # large ones on several threads (a backward's dL/dq: 12.6 MB at B=4096)
        copy = np.empty(shape, native)
        copy_rows(copy, array)
        return copy
    return array.astype(native, copy=writable)


_NATIVE = {dtype: dtype.newbyteorder("=") for dtype in WIRE_DTYPES.values()}


def optional_tensor(message, field: str, what: str | None = None, writable: bool = True, payloads=None):
    """The field's array (see tensor_from_proto for ``writable``), or None when the message does not
    carry it. payloads: the data of the message's Tensor fields, where framing.parsed left them out."""
    if not message.HasField(field):
        return None
    return tensor_from_proto(getattr(message, field), what or field, writable, (payloads or {}).get(field))


def _tensor(message, field: str, payloads, writable: bool = True) -> np.ndarray:
    """A required Tensor field of an answer, as a writable array (the caller's to keep), or with
    writable=False a read-only view of the received bytes."""
    return tensor_from_proto(getattr(message, field), field, writable, (payloads or {}).get(field))


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
                 "train_min_rows", "hnsw_m", "ef_construction"):
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


def search_result_from_parts(parts, into: BatchAnswer | None = None, start: int = 0) -> SearchResult:
    """SearchParts' answer (or Search's: one part): its (message, payloads) parts, in order, each copied
    once into the rows of ``into`` from ``start`` on (a BatchAnswer of their own rows when None)."""
    if into is None and len(parts) == 1:  # one answer of its own: each array copied once, as it is read
        return search_result_from_proto(*parts[0])
    return _placed([search_result_from_proto(*part, writable=False) for part in parts], into, start, _SEARCHED)


class BatchAnswer:
    """The arrays of one batch's answer, filled by the answers of its row ranges as they come (the parts
    of one call, the calls of a split batch: in any order, from any thread). Each answer's bytes are
    copied once, from the received message into their rows of the batch's arrays, which the caller
    keeps (writable); nothing is joined at the end."""

    def __init__(self, rows: int):
        self.rows = rows
        self.columns: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def put(self, start: int, columns: dict) -> None:
        """Copies each array of ``columns`` (name -> [n, ...], or None: not in this answer) into rows
        [start, start + n) of the batch's array of that name (made at the first answer that has it)."""
        for name, array in columns.items():
            if array is None:
                continue
            with self._lock:
                column = self.columns.get(name)
                if column is None:
                    column = self.columns[name] = np.empty((self.rows, *array.shape[1:]), array.dtype)
            end = start + array.shape[0]
            if column.shape[1:] != array.shape[1:] or column.dtype != array.dtype or end > self.rows:
                raise InternalError(f"an answer's {name} of shape {list(array.shape)} ({array.dtype}) at row {start} "
                                    f"does not fit the batch's {list(column.shape)} ({column.dtype})")
            copy_rows(column[start:end], array)

    def rows_of(self, name: str, start: int, end: int) -> np.ndarray | None:
        column = self.columns.get(name)
        return None if column is None else column[start:end]


def _placed(found: list, into: BatchAnswer | None, start: int, names: tuple[str, ...]):
    """The answers of consecutive rows (read-only views of the received bytes), copied into ``into``
    from row ``start`` on; the first one's other fields (generation, handle)."""
    rows = [getattr(f, names[0]).shape[0] for f in found]  # (a Retrieve's memory, with or without neighbours)
    into = into or BatchAnswer(sum(rows))
    row = start
    for f, n in zip(found, rows):
        into.put(row, {name: getattr(f, name) for name in names})
        row += n
    return dataclasses.replace(found[0], **{name: into.rows_of(name, start, row) for name in names})


def batch_result(into: BatchAnswer, found: list, namespace: str):
    """The answer of a Search or a Retrieve whose batch was split into calls (consecutive rows, in
    order; their SearchResults or RetrieveResults) that filled ``into``. FailedPrecondition if the
    namespace was re-created between them (ids of two incarnations)."""
    call, names = ("Search", _SEARCHED) if isinstance(found[0], SearchResult) else ("Retrieve", RETRIEVED)
    if len({f.generation for f in found}) > 1:
        raise FailedPrecondition(f"namespace {namespace!r} was re-created during this {call}; retry it")
    return dataclasses.replace(found[0], **{name: into.rows_of(name, 0, into.rows) for name in names})


def search_result_from_proto(response: pb.SearchResponse, payloads: dict | None = None,
                             writable: bool = True) -> SearchResult:
    """writable=False: the arrays are read-only views of the received bytes (to be copied once, by a
    BatchAnswer); else the caller's own copies."""
    return SearchResult(
        ids=_tensor(response, "ids", payloads, writable),
        distances=_tensor(response, "distances", payloads, writable),
        tokens=_tensor(response, "tokens", payloads, writable),
        keys=optional_tensor(response, "keys", writable=writable, payloads=payloads),
        values=optional_tensor(response, "values", writable=writable, payloads=payloads),
        weights=optional_tensor(response, "weights", writable=writable, payloads=payloads),
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


def retrieve_result_to_wire(result: RetrieveResult) -> bytes:
    return framing.serialized(pb.RetrieveResponse(generation=result.generation, handle=result.handle),
                              {name: getattr(result, name) for name in RETRIEVED})


def retrieve_result_parts_to_wire(result: RetrieveResult, part_bytes: int | None = None):
    """The answer as RetrieveResponse messages of consecutive rows (RetrieveParts' stream), as
    search_result_parts_to_wire; each carries the generation and the handle."""
    return _parts_to_wire(pb.RetrieveResponse(generation=result.generation, handle=result.handle),
                          {name: getattr(result, name) for name in RETRIEVED}, part_bytes or ANSWER_PART_BYTES)


def retrieve_result_from_parts(parts, queries, temperature: float, into: BatchAnswer | None = None,
                               start: int = 0) -> RetrieveResult:
    """RetrieveParts' answer (or Retrieve's, one part): as search_result_from_parts; the caller's
    queries and temperature kept for the backward."""
    if into is None and len(parts) == 1:  # as search_result_from_parts
        return retrieve_result_from_proto(*parts[0][:1], queries, temperature, parts[0][1])
    return _placed([retrieve_result_from_proto(response, queries, temperature, payloads, writable=False)
                    for response, payloads in parts], into, start, RETRIEVED)


def retrieve_result_from_proto(response: pb.RetrieveResponse, queries, temperature: float,
                               payloads: dict | None = None, writable: bool = True) -> RetrieveResult:
    """The reply, with the caller's own queries and temperature kept for the backward (writable: as in
    search_result_from_proto)."""
    memory, *neighbours = RETRIEVED  # the neighbours: absent from the answer of a Retrieve with memory_only
    return RetrieveResult(memory=_tensor(response, memory, payloads, writable),
                          **{name: optional_tensor(response, name, writable=writable, payloads=payloads)
                             for name in neighbours},
                          queries=queries, temperature=temperature, generation=response.generation,
                          handle=response.handle)
