"""Generated hostile requests for every RPC of MemoryService, each with the status codes it may get.

``CASES[rpc](world)`` is a hypothesis strategy of ``Case``s: a valid request aimed at the seeded
data (tests/reliability/local_deployment.py), with one to three defects put in, each from the
RPC's list and on a different field. A defect is a caller's mistake with the status code
docs/API.md gives it (a wrong dtype or shape, NaN/Inf, k out of range, an unknown or deleted id,
an odd or unknown namespace, a stale generation, ...), or a harmless twist that must change
nothing (an unknown id given to Delete, a request id every shard has applied already, an unknown
field). The answer must carry one of the codes of the defects put in, or OK when all were harmless;
either way nothing stored may change. (Random field values and raw bytes: hostile_wire.py.)
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
from hypothesis import strategies as st
from monim.protos import config as config_options
from monim.protos import memory_pb2 as pb

from tests.reliability import hostile_values as hv
from tests.reliability.local_deployment import World

OK, INVALID, NOT_FOUND, EXISTS = "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS"
PRECONDITION, ABORTED, EXHAUSTED = "FAILED_PRECONDITION", "ABORTED", "RESOURCE_EXHAUSTED"
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
RPCS = tuple(method.name for method in SERVICE.methods)
REQUEST_TYPES = {method.name: getattr(pb, method.input_type.name) for method in SERVICE.methods}
# Step ids the generated RetrieveBackward, ApplyGradients, CommitStep and AbortStep share, so that
# a step one request left (or failed to leave) on the shards meets the requests after it. The
# "staged" ones may hold valid deferred parts; CommitStep names them only on another namespace.
STEP_IDS = tuple(f"fuzz-step-{i}" for i in range(4))
STAGED_STEP_IDS = tuple(f"fuzz-staged-{i}" for i in range(2))


@dataclasses.dataclass(frozen=True)
class Case:
    """request: the message sent; defects: what was put in it; expected: the codes it may get."""

    rpc: str
    request: object
    defects: tuple[str, ...]
    expected: frozenset[str]


class Draft:
    """A request being built: its fields (None: unset), and the defects put in with their codes
    (None for a harmless one). base: the valid request's fields, which every defect starts from (a
    field another defect replaced may be a Tensor of any shape, or unset)."""

    def __init__(self, rpc: str, **fields):
        self.rpc, self.fields, self.defects = rpc, fields, []
        self.base = dict(fields)

    def put(self, defect: str, code: str | tuple[str, ...] | None, **fields) -> None:
        self.defects.append((defect, code))
        self.fields.update(fields)

    def case(self, draw) -> Case:
        request = REQUEST_TYPES[self.rpc]()
        for name, value in self.fields.items():
            if value is None:
                continue
            if isinstance(value, np.ndarray):
                value = hv.encoded(value)
            if isinstance(value, (pb.Tensor, pb.NamespaceConfig, pb.OptimizerConfig)):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        if draw(st.integers(0, 9)) == 0:
            request.MergeFromString(draw(unknown_fields()))
            self.defects.append(("unknown field", None))
        codes = frozenset(c for _, code in self.defects if code is not None
                          for c in ((code,) if isinstance(code, str) else code))
        return Case(self.rpc, request, tuple(name for name, _ in self.defects), codes or frozenset({OK}))


def unknown_fields() -> st.SearchStrategy[bytes]:
    """A field number no request uses (>= 100), as a varint, a length-delimited or a fixed64 field."""
    def field(number, kind, payload):
        key = _varint(number << 3 | kind)
        if kind == 0:
            return key + _varint(payload)
        if kind == 2:
            return key + _varint(len(payload)) + payload
        return key + payload

    return st.builds(lambda number, kind, data: field(number, kind, {0: len(data), 1: data[:8].ljust(8, b"\0"),
                                                                      2: data}[kind]),
                     st.integers(100, 2**29 - 1), st.sampled_from([0, 1, 2]), st.binary(max_size=16))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _defects(draw, table: dict, lowest: int = 1):
    """1-3 distinct entries of the RPC's defect table (name -> apply(draw, draft, ns, world)), one per field group."""
    names = draw(st.lists(st.sampled_from(sorted(table)), min_size=lowest, max_size=3, unique_by=lambda n: table[n][0]))
    return [(name, table[name][1]) for name in names]


# ----- defects shared by the data calls ----------------------------------------------------------
def _odd_namespace(draw, d, ns, world):
    d.put("odd namespace name", INVALID, namespace=draw(hv.odd_names))


def _unknown_namespace(draw, d, ns, world):
    d.put("unknown namespace", NOT_FOUND, namespace=draw(hv.unknown_names({n.name for n in world.namespaces})))


def _stale_generation(draw, d, ns, world):
    generation = draw(st.integers(1, 2**64 - 1).filter(lambda g: g not in {n.generation for n in world.namespaces}))
    d.put("generation of another incarnation", PRECONDITION, generation=generation)


def _no_values_namespace(draw, d, ns, world):
    d.put("namespace without values", INVALID, namespace=world.plain.name,
          generation=draw(st.sampled_from([0, world.plain.generation])))


def _long_request_id(draw, d, ns, world):
    d.put("request id over 128 characters", INVALID, request_id=draw(hv.long_text(129)))


NAMESPACE_DEFECTS = {"odd namespace": ("namespace", _odd_namespace),
                     "unknown namespace": ("namespace", _unknown_namespace),
                     "stale generation": ("generation", _stale_generation)}


def _vectors_defect(field: str, width_of, rows_of=None, optional: bool = False):
    """Defects of a float [N, width] field: encoding, width, empty batch, NaN/Inf, rows, missing
    (unless the field is optional)."""

    def apply(draw, d, ns, world):
        array = d.base[field]
        kinds = ["encoding", "width", "empty", "non-finite"] + ["rows"] * bool(rows_of) + ["missing"] * (not optional)
        kind = draw(st.sampled_from(kinds))
        if kind == "encoding":
            tensor, what = hv.bad_encoding(draw, array, hv.FLOATS)
            d.put(f"{field}: {what}", INVALID, **{field: tensor})
        elif kind == "width":
            width = draw(st.integers(0, 20).filter(lambda w: w != width_of(ns)))
            d.put(f"{field}: width {width}", INVALID, **{field: hv.floats_array(draw, (array.shape[0], width))})
        elif kind == "empty":
            d.put(f"{field}: empty batch", INVALID, **{field: array[:0]})
        elif kind == "non-finite":
            d.put(f"{field}: NaN or Inf", INVALID, **{field: hv.with_non_finite(draw, array)})
        elif kind == "rows":
            rows = draw(st.integers(1, 6).filter(lambda r: r != rows_of(d)))
            d.put(f"{field}: {rows} rows", INVALID, **{field: hv.floats_array(draw, (rows, array.shape[1]))})
        else:
            d.put(f"{field}: missing", INVALID, **{field: None})

    return field, apply


def _encoding_defect(field: str, accepted, optional: bool = False):
    def apply(draw, d, ns, world):
        if not optional and draw(st.integers(0, 4)) == 0:
            d.put(f"{field}: missing", INVALID, **{field: None})
            return
        tensor, what = hv.bad_encoding(draw, d.base[field], accepted)
        d.put(f"{field}: {what}", INVALID, **{field: tensor})

    return field, apply


def _bad_k(draw, d, ns, world):
    k = draw(st.one_of(st.integers(-(2**31), 0), st.integers(ns.max_k + 1, 2**31 - 1),
                       st.sampled_from([0, -1, ns.max_k + 1, 2**31 - 1, -(2**31)])))
    d.put(f"k = {k}", INVALID, k=k)


def _index_options_on_flat(draw, d, ns, world):
    """nprobe / rerank (ivf) or ef (hnsw) (the world's namespaces are flat: any but 0 is refused)."""
    field = draw(st.sampled_from(["nprobe", "rerank", "ef"]))
    value = draw(st.one_of(st.integers(-(2**31), -1), st.integers(1, 2**31 - 1)))
    d.put(f"{field} = {value} on a flat namespace", INVALID, **{field: value})


def _bad_temperature(draw, d, ns, world):
    d.put("temperature not finite and > 0", INVALID, temperature=draw(hv.bad_positive_floats()))


def _unknown_ids(ns, count: int, negative: bool = True):
    """Ids the namespace does not hold: deleted, at or past next_id, or negative."""
    choices = [st.sampled_from(ns.deleted_ids), st.integers(ns.next_id, hv.INT64_MAX)]
    if negative:
        choices.append(st.integers(-(2**63), -1))
    return st.lists(st.one_of(*choices), min_size=1, max_size=count)


def _stored_ids(draw, ns, count: int) -> np.ndarray:
    return np.array(draw(st.lists(st.sampled_from(ns.stored_ids), min_size=count, max_size=count)), np.int64)


def _with_ids_among(draw, ids: np.ndarray, extra) -> np.ndarray:
    """ids with the extra ids put in at random places (duplicates of both kept)."""
    merged = np.concatenate([ids, np.array(extra, np.int64)])
    return merged[np.array(draw(st.permutations(range(merged.size))), np.int64)]


# ----- per RPC -------------------------------------------------------------------------------------
def _config(draw) -> pb.NamespaceConfig:
    optimizer = pb.OptimizerConfig(name=draw(st.sampled_from(["", "sgd", "adagrad", "adam"])),
                                   lr=draw(st.floats(1e-4, 1.0)))
    return pb.NamespaceConfig(name=f"fuzz-new-{uuid.UUID(int=draw(st.integers(0, 2**128 - 1))).hex[:12]}",
                              dim=draw(st.integers(1, 64)), value_dim=draw(st.integers(0, 16)),
                              max_k=draw(st.integers(0, 64)), metric=draw(st.sampled_from(["", "l2", "ip"])),
                              index=draw(st.sampled_from(["", "flat"])),
                              key_dtype=draw(st.sampled_from(["", "float32", "float16"])), optimizer=optimizer)


def _config_defect(draw, d, ns, world):
    config = pb.NamespaceConfig()
    config.CopyFrom(d.fields["config"])
    field = draw(st.sampled_from(["name", "taken name", "dim", "value_dim", "max_k", "metric", "index", "key_dtype",
                                  "optimizer", "lr", "momentum", "beta1", "beta2", "eps", "lr_decay",
                                  "initial_accumulator_value", "max_grad_norm", "nlist", "pq_m", "train_min_rows",
                                  "hnsw_m", "ef_construction", "hnsw options"]))
    code = INVALID
    if field == "name":
        config.name = draw(hv.odd_names)
    elif field == "taken name":
        config.name, code = draw(st.sampled_from([n.name for n in world.namespaces])), EXISTS
    elif field == "dim":
        config.dim = draw(st.one_of(st.integers(-(2**31), 0), st.integers(65537, 2**31 - 1)))
    elif field == "value_dim":
        config.value_dim = draw(st.one_of(st.integers(-(2**31), -1), st.integers(65537, 2**31 - 1)))
    elif field == "max_k":  # 0 is "unset": the default
        config.max_k = draw(st.one_of(st.integers(-(2**31), -1), st.integers(4097, 2**31 - 1)))
    elif field in ("nlist", "pq_m", "train_min_rows", "hnsw_m", "ef_construction"):
        # ivf and hnsw options: on a flat config, any but 0 is refused
        limit = 2**63 - 1 if field == "train_min_rows" else 2**31 - 1
        setattr(config, field, draw(st.one_of(st.integers(-limit, -1), st.integers(1, limit))))
        config.index = draw(st.sampled_from(["", "flat"]))
    elif field == "hnsw options":  # on an hnsw config: an option out of its range, or an ivf one
        config.index = "hnsw"
        option = draw(st.sampled_from(["hnsw_m", "ef_construction", "train_min_rows", "nlist", "pq_m"]))
        limit = 2**63 - 1 if option == "train_min_rows" else 2**31 - 1
        bad = [st.integers(-limit, -1)]
        if option in ("nlist", "pq_m"):  # ivf options: any but 0 is refused
            bad.append(st.integers(1, limit))
        else:
            low, high = {"hnsw_m": (config_options.MIN_HNSW_M, config_options.MAX_HNSW_M),
                         "ef_construction": (1, config_options.MAX_EF_CONSTRUCTION),
                         "train_min_rows": (1, config_options.MAX_TRAIN_MIN_ROWS)}[option]
            bad += [st.integers(high + 1, limit)] + ([st.integers(1, low - 1)] if low > 1 else [])
        setattr(config, option, draw(st.one_of(*bad)))
    elif field in ("metric", "index", "key_dtype"):
        known = {"metric": config_options.METRICS, "index": config_options.INDEXES,
                 "key_dtype": config_options.KEY_DTYPES}[field]
        setattr(config, field, draw(hv.hostile_text.filter(lambda s: s and s not in known)))
    elif field == "optimizer":
        config.optimizer.name = draw(hv.hostile_text.filter(lambda s: s and s not in config_options.OPTIMIZERS))
    elif field == "lr":
        config.optimizer.lr = draw(hv.bad_positive_floats())
    elif field in ("momentum", "beta1", "beta2"):
        setattr(config.optimizer, field, draw(st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0),
                                                       hv.non_finite)))
    else:
        setattr(config.optimizer, field, draw(st.one_of(st.floats(max_value=-1e-300), hv.non_finite)))
    d.put(f"config.{field}", code, config=config)


def _create_retry(draw, d, ns, world):
    """The request id that created a seeded namespace, with its name: answers that namespace's config."""
    d.put("retry of the request that created the namespace", None, config=pb.NamespaceConfig(name=ns.name, dim=3),
          request_id=world.request_id(ns.name, "CreateNamespace"))


@st.composite
def create_namespace_cases(draw, world: World) -> Case:
    ns = draw(st.sampled_from(world.namespaces))
    d = Draft("CreateNamespace", config=_config(draw), request_id=draw(st.sampled_from(["", uuid.uuid4().hex])))
    if draw(st.integers(0, 7)) == 0:
        _create_retry(draw, d, ns, world)
        return d.case(draw)
    table = {"config": ("config", _config_defect), "request id": ("request_id", _long_request_id)}
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


@st.composite
def namespace_only_cases(draw, world: World, rpc: str) -> Case:
    """DescribeNamespace and DropNamespace: an odd name or one no namespace has (never a seeded one)."""
    d = Draft(rpc)
    (_odd_namespace if draw(st.booleans()) else _unknown_namespace)(draw, d, None, world)
    return d.case(draw)


@st.composite
def no_field_cases(draw, world: World, rpc: str) -> Case:
    """ListNamespaces, ListSnapshots and ReadEndpoints have no fields: unknown ones, which must be ignored."""
    request = REQUEST_TYPES[rpc]()
    request.MergeFromString(b"".join(draw(st.lists(unknown_fields(), min_size=1, max_size=3))))
    return Case(rpc, request, ("unknown fields",), frozenset({OK}))


@st.composite
def probe_shared_memory_cases(draw, world: World) -> Case:
    """ProbeSharedMemory naming no region this server can use (the fuzzing client made none): a name of
    another form (paths among them), or one of the form no file has. FAILED_PRECONDITION either way."""
    well_formed_missing = st.builds(lambda pid, digits: f"monim-{pid}-{digits}", st.integers(1, 10**9),
                                    st.text("0123456789abcdef", min_size=32, max_size=32))
    region = draw(st.one_of(hv.odd_names, st.sampled_from(["", "../../etc/passwd", "/dev/shm/x", "monim-1-zz"]),
                            well_formed_missing))
    request = REQUEST_TYPES["ProbeSharedMemory"](region=region)
    defects = ("a region this server cannot use",)
    if draw(st.booleans()):
        request.MergeFromString(draw(unknown_fields()))
        defects += ("unknown field",)
    return Case("ProbeSharedMemory", request, defects, frozenset({PRECONDITION}))


def _add_values_defect(draw, d, ns, world):
    rows = d.base["keys"].shape[0]
    if ns.value_dim == 0:
        d.put("values on a namespace without value_dim", INVALID, values=hv.floats_array(draw, (rows, 4)))
        return
    d.base["values"] = hv.floats_array(draw, (rows, ns.value_dim))
    _vectors_defect("values", lambda n: n.value_dim, lambda dr: dr.base["keys"].shape[0], optional=True)[1](
        draw, d, ns, world)


def _tokens_defect(draw, d, ns, world):
    tokens = d.base["tokens"]
    kind = draw(st.sampled_from(["encoding", "range", "length"]))
    if kind == "encoding":
        _encoding_defect("tokens", hv.INTS)[1](draw, d, ns, world)
    elif kind == "range":
        bad = tokens.astype(np.int64)
        bad[draw(st.integers(0, bad.size - 1))] = draw(st.one_of(st.integers(-(2**63), -1), st.integers(2**31, 2**63 - 1)))
        d.put("token outside [0, 2^31)", INVALID, tokens=bad)
    else:
        d.put("tokens of another length", INVALID,
              tokens=np.arange(draw(st.integers(0, 8).filter(lambda n: n != tokens.size))))


def _weights_defect(draw, d, ns, world):
    rows = d.base["keys"].shape[0]
    kind = draw(st.sampled_from(["encoding", "not positive", "non-finite", "length"]))
    weights = np.ones(rows, np.float32)
    if kind == "encoding":
        tensor, what = hv.bad_encoding(draw, weights, hv.FLOATS)
        d.put(f"weights: {what}", INVALID, weights=tensor)
    elif kind == "not positive":
        weights[draw(st.integers(0, rows - 1))] = draw(st.one_of(st.floats(max_value=0.0, width=32),
                                                                 st.just(-np.inf)))
        d.put("weight <= 0", INVALID, weights=weights)
    elif kind == "non-finite":
        d.put("weights: NaN or Inf", INVALID, weights=hv.with_non_finite(draw, weights))
    else:
        d.put("weights of another length", INVALID, weights=np.ones(draw(st.integers(0, 8).filter(lambda n: n != rows)),
                                                                 np.float32))


def _logp_defect(draw, d, ns, world):
    rows = d.base["keys"].shape[0]
    kind = draw(st.sampled_from(["nothing admitted", "encoding", "NaN", "positive", "length"]))
    logp = -np.abs(hv.floats_array(draw, rows)) - 2
    if kind == "nothing admitted":  # a no-op: every row's logp is at or above admit_below
        d.put("logp admits no row", None, logp=np.zeros(rows, np.float32), admit_below=-1.5)
    elif kind == "encoding":
        tensor, what = hv.bad_encoding(draw, logp, hv.FLOATS)
        d.put(f"logp: {what}", INVALID, logp=tensor)
    elif kind == "NaN":
        logp[draw(st.integers(0, rows - 1))] = np.nan
        d.put("logp NaN", INVALID, logp=logp)
    elif kind == "positive":
        logp[draw(st.integers(0, rows - 1))] = draw(st.floats(2.0**-10, 2.0**100, width=32))
        d.put("logp > 0", INVALID, logp=logp)
    else:
        d.put("logp of another length", INVALID, logp=np.full(draw(st.integers(0, 8).filter(lambda n: n != rows)), -3.0,
                                                               np.float32))


def _admission_numbers_defect(draw, d, ns, world):
    if draw(st.booleans()):
        d.put("admit_below not finite", INVALID, admit_below=draw(hv.non_finite))
    else:
        d.put("merge_eps < 0 or not finite", INVALID,
              merge_eps=draw(st.one_of(st.floats(max_value=-1e-300), hv.non_finite)))


def _reused_add_id(draw, d, ns, world):
    """An Add with the request id of a seeding Add of this namespace: the seeded rows are not added again;
    a batch of another size is a mistake."""
    request_id = world.request_id(ns.name, "Add") if ns is world.plain else draw(
        st.sampled_from([r for n, m, r in world.applied_requests if n == ns.name and m == "Add"]))
    seeded_rows = 200 if ns is world.plain else 160
    rows = d.base["keys"].shape[0]
    if draw(st.booleans()):
        rows = seeded_rows
        d.fields.update(keys=hv.floats_array(draw, (rows, ns.dim)), tokens=np.arange(rows),
                        values=None if d.fields.get("values") is None else hv.floats_array(draw, (rows, ns.value_dim)),
                        weights=None, logp=None)
        d.put("request id of an Add every shard applied", None, request_id=request_id)
    else:
        d.put(f"request id of an Add of {seeded_rows} rows, with {rows}", INVALID, request_id=request_id)


@st.composite
def add_cases(draw, world: World) -> Case:
    ns = draw(st.sampled_from(world.namespaces))
    rows = draw(st.integers(1, 5))
    d = Draft("Add", namespace=ns.name, keys=hv.floats_array(draw, (rows, ns.dim), draw(st.sampled_from(hv.FLOATS))),
              tokens=np.arange(rows, dtype=draw(st.sampled_from(hv.INTS))) * 7,
              values=hv.floats_array(draw, (rows, ns.value_dim)) if ns.value_dim and draw(st.booleans()) else None,
              weights=np.ones(rows, np.float32) * 2 if draw(st.booleans()) else None,
              source=draw(st.text(max_size=20)), request_id=uuid.uuid4().hex,
              generation=draw(st.sampled_from([0, ns.generation])))
    table = dict(NAMESPACE_DEFECTS)
    table.update({"keys": _vectors_defect("keys", lambda n: n.dim), "tokens": ("tokens", _tokens_defect),
                  "values": ("values", _add_values_defect), "weights": ("weights", _weights_defect),
                  "logp": ("logp", _logp_defect), "admission": ("admission", _admission_numbers_defect),
                  "source": ("source", lambda dr, d, n, w: d.put("source over 256 characters", INVALID,
                                                                  source=dr(hv.long_text(257)))),
                  "request id": ("request_id", _long_request_id), "reused request id": ("request_id", _reused_add_id)})
    chosen = _defects(draw, table)
    if any(name == "reused request id" for name, _ in chosen):  # a no-op whose batch is not touched again
        chosen = [(name, apply) for name, apply in chosen if name in NAMESPACE_DEFECTS or name == "reused request id"]
    for _, apply in chosen:
        apply(draw, d, ns, world)
    return d.case(draw)


def _queries(draw, ns):
    return hv.floats_array(draw, (draw(st.integers(1, 3)), ns.dim), draw(st.sampled_from(hv.FLOATS)))


@st.composite
def search_cases(draw, world: World) -> Case:
    ns = draw(st.sampled_from(world.namespaces))
    d = Draft("Search", namespace=ns.name, queries=_queries(draw, ns), k=draw(st.integers(1, ns.max_k)),
              return_keys=draw(st.booleans()), return_values=bool(ns.value_dim) and draw(st.booleans()),
              return_weights=draw(st.booleans()), generation=draw(st.sampled_from([0, ns.generation])))
    table = dict(NAMESPACE_DEFECTS)
    table.update({"queries": _vectors_defect("queries", lambda n: n.dim), "k": ("k", _bad_k),
                  "index options": ("nprobe", _index_options_on_flat)})
    if ns.value_dim == 0:
        table["values"] = ("return_values", lambda dr, d, n, w: d.put("values of a namespace without them", INVALID,
                                                                      return_values=True))
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


def _get_ids_defect(draw, d, ns, world):
    kind = draw(st.sampled_from(["unknown", "unknown", "encoding", "empty"]))
    if kind == "unknown":
        d.put("unknown or deleted ids", NOT_FOUND, ids=_with_ids_among(draw, d.base["ids"], draw(_unknown_ids(ns, 4))))
    elif kind == "encoding":
        _encoding_defect("ids", hv.INTS)[1](draw, d, ns, world)
    else:
        d.put("ids: empty batch", INVALID, ids=np.zeros(0, np.int64))


@st.composite
def get_cases(draw, world: World) -> Case:
    ns = draw(st.sampled_from(world.namespaces))
    ids = _stored_ids(draw, ns, draw(st.integers(1, 6)))  # duplicates included
    d = Draft("Get", namespace=ns.name, ids=ids.astype(draw(st.sampled_from(hv.INTS))),
              return_optimizer_state=draw(st.booleans()), generation=draw(st.sampled_from([0, ns.generation])))
    table = dict(NAMESPACE_DEFECTS)
    table["ids"] = ("ids", _get_ids_defect)
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


def _delete_target(draw, d, ns, world):
    kind = draw(st.sampled_from(["unknown ids", "unknown source", "reused request id", "neither", "both",
                                 "encoding", "empty", "long source"]))
    if kind == "unknown ids":
        d.put("only unknown or deleted ids (ignored)", None, ids=np.array(draw(_unknown_ids(ns, 5)), np.int64))
    elif kind == "unknown source":
        tag = draw(st.one_of(st.just(""), st.text(max_size=20)).filter(lambda s: s not in ns.sources))
        d.put("a source tag no row has", None, source=tag)
    elif kind == "reused request id":
        d.put("request id of a Delete every shard applied", None, ids=_stored_ids(draw, ns, 4),
              request_id=world.request_id(ns.name, "Delete"))
    elif kind == "neither":
        d.put("neither ids nor source", INVALID)
    elif kind == "both":
        d.put("both ids and source", INVALID, ids=_stored_ids(draw, ns, 2), source=ns.sources[0])
    elif kind == "encoding":
        tensor, what = hv.bad_encoding(draw, _stored_ids(draw, ns, 3), hv.INTS)
        d.put(f"ids: {what}", INVALID, ids=tensor)
    elif kind == "empty":
        d.put("ids: empty batch", INVALID, ids=np.zeros(0, np.int64))
    else:
        d.put("source over 256 characters", INVALID, source=draw(hv.long_text(257)))


@st.composite
def delete_cases(draw, world: World) -> Case:
    ns = draw(st.sampled_from(world.namespaces))
    d = Draft("Delete", namespace=ns.name, request_id=uuid.uuid4().hex, generation=draw(st.sampled_from([0, ns.generation])))
    _delete_target(draw, d, ns, world)
    if d.defects[0][1] is None or draw(st.booleans()):  # the target alone may be harmless: add a real defect
        table = dict(NAMESPACE_DEFECTS)
        table["request id"] = ("request_id", _long_request_id)
        if d.fields.get("request_id", "").startswith("seed-"):
            del table["request id"]
        for _, apply in _defects(draw, table, lowest=0):
            apply(draw, d, ns, world)
    return d.case(draw)


@st.composite
def retrieve_cases(draw, world: World) -> Case:
    ns = world.values
    d = Draft("Retrieve", namespace=ns.name, queries=_queries(draw, ns), k=draw(st.integers(1, ns.max_k)),
              temperature=draw(st.floats(0.05, 10.0)), generation=draw(st.sampled_from([0, ns.generation])),
              keep_state=draw(st.booleans()))
    table = dict(NAMESPACE_DEFECTS)
    table.update({"queries": _vectors_defect("queries", lambda n: n.dim), "k": ("k", _bad_k),
                  "temperature": ("temperature", _bad_temperature),
                  "no values": ("namespace", _no_values_namespace),
                  "index options": ("nprobe", _index_options_on_flat)})
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


def _slots_defect(draw, d, ns, world):
    """ids / alpha / distances of the forward, [B, k] each."""
    ids, alpha, distances = d.base["ids"], d.base["alpha"], d.base["distances"]
    b, k = ids.shape
    kind = draw(st.sampled_from(["unknown id", "unknown id", "id < -1", "alpha at an empty slot", "alpha outside [0, 1]",
                                 "alpha NaN", "distance not finite", "alpha shape", "distances shape", "ids rows",
                                 "ids encoding", "alpha encoding", "distances encoding", "missing"]))
    held = np.argwhere(ids >= 0)
    at = tuple(held[draw(st.integers(0, len(held) - 1))])  # a slot holding a row
    ids, alpha, distances = ids.copy(), alpha.copy(), distances.copy()
    code = INVALID
    if kind == "unknown id":
        ids[at], code = draw(_unknown_ids(ns, 1, negative=False))[0], NOT_FOUND
    elif kind == "id < -1":
        ids[at] = draw(st.integers(-(2**63), -2))
    elif kind == "alpha at an empty slot":
        ids[at], alpha[at] = -1, draw(st.floats(2.0**-10, 1.0, width=32))
    elif kind == "alpha outside [0, 1]":
        alpha[at] = draw(st.one_of(st.floats(max_value=-(2.0**-10), width=32), st.floats(min_value=1 + 2.0**-7, width=32)))
    elif kind == "alpha NaN":
        alpha[at] = draw(hv.non_finite)
    elif kind == "distance not finite":
        distances[at] = draw(hv.non_finite)
    elif kind == "alpha shape":
        alpha = np.full((b, k + draw(st.sampled_from([-1, 1]))), 0.1, np.float32) if k > 1 else alpha.reshape(-1)
    elif kind == "distances shape":
        distances = np.ones((b + 1, k), np.float32)
    elif kind == "ids rows":
        ids = np.concatenate([ids, ids[:1]])
    elif kind == "missing":
        field = draw(st.sampled_from(["ids", "alpha", "distances"]))
        d.put(f"{field}: missing", INVALID, **{field: None})
        return
    else:
        field = kind.split()[0]
        array = {"ids": ids, "alpha": alpha, "distances": distances}[field]
        tensor, what = hv.bad_encoding(draw, array, hv.INTS if field == "ids" else hv.FLOATS)
        d.put(f"{field}: {what}", INVALID, **{field: tensor})
        return
    d.put(kind, code, ids=ids, alpha=alpha, distances=distances)


def _handle_defect(draw, d, ns, world):
    """The forward's handle (Retrieve with keep_state; the seeded one may have expired: then it is unknown)."""
    arrays = dict(queries=None, ids=None, alpha=None, distances=None)  # a backward by handle sends none of them
    kind = draw(st.sampled_from(["unknown", "with the arrays", "long", "of another namespace", "rows outside"]))
    if kind == "unknown":
        d.put("unknown handle", PRECONDITION, handle=uuid.uuid4().hex, **arrays)
    elif kind == "with the arrays":
        d.put("a handle and the forward's arrays", INVALID, handle=world.handle)
    elif kind == "long":
        d.put("handle over 128 characters", INVALID, handle=draw(hv.long_text(129)), **arrays)
    elif kind == "of another namespace":
        d.put("the handle of another namespace's forward", PRECONDITION, handle=world.handle,
              namespace=world.plain.name, generation=0, **arrays)
    else:
        d.put("grad_memory rows outside the kept forward", (INVALID, PRECONDITION), handle=world.handle,
              row_offset=draw(st.integers(world.handle_rows, 2**32 - 1)), **arrays)


def _grad_memory_defect(draw, d, ns, world):
    _vectors_defect("grad_memory", lambda n: n.value_dim, lambda dr: dr.base["queries"].shape[0])[1](draw, d, ns, world)


@st.composite
def retrieve_backward_cases(draw, world: World) -> Case:
    ns = world.values
    b, k = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ids = _stored_ids(draw, ns, b * k).reshape(b, k)
    alpha = np.full((b, k), 1.0 / k, np.float32)
    if k > 1 and draw(st.booleans()):  # an empty slot, as a forward over a small namespace gives
        ids[:, -1], alpha[:, -1] = -1, 0.0
    d = Draft("RetrieveBackward", namespace=ns.name, queries=_queries(draw, ns)[:1].repeat(b, 0), ids=ids, alpha=alpha,
              distances=np.abs(hv.floats_array(draw, (b, k))), grad_memory=hv.floats_array(draw, (b, ns.value_dim)),
              temperature=draw(st.floats(0.1, 5.0)), generation=draw(st.sampled_from([0, ns.generation])),
              step_id=draw(st.sampled_from(STEP_IDS)), part=draw(st.integers(0, 3)), defer_step=draw(st.booleans()))
    if draw(st.integers(0, 5)) == 0:  # a valid part of a deferred step: it waits on the shards, nothing changes
        d.put("valid deferred part", None, step_id=draw(st.sampled_from(STAGED_STEP_IDS)), defer_step=True,
              generation=ns.generation)
        return d.case(draw)
    table = dict(NAMESPACE_DEFECTS)
    table.update({"queries": _vectors_defect("queries", lambda n: n.dim, lambda dr: dr.base["ids"].shape[0]),
                  "slots": ("slots", _slots_defect), "grad_memory": ("grad_memory", _grad_memory_defect),
                  "temperature": ("temperature", _bad_temperature), "handle": ("handle", _handle_defect),
                  "step id": ("step_id", lambda dr, d, n, w: d.put("step id over 128 characters", INVALID,
                                                                    step_id=dr(hv.long_text(129)))),
                  "no values": ("namespace", _no_values_namespace)})
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


def _gradient_ids_defect(draw, d, ns, world):
    kind = draw(st.sampled_from(["unknown", "unknown", "encoding", "empty", "length"]))
    ids = d.base["ids"].copy()
    if kind == "unknown":
        unknown = draw(_unknown_ids(ns, ids.size))
        ids[draw(st.permutations(range(ids.size)))[:len(unknown)]] = unknown
        d.put("unknown or deleted ids", NOT_FOUND, ids=ids)
    elif kind == "encoding":
        _encoding_defect("ids", hv.INTS)[1](draw, d, ns, world)
    elif kind == "empty":
        d.put("ids: empty batch", INVALID, ids=np.zeros(0, np.int64))
    else:
        d.put("ids and grads of different lengths", INVALID,
              ids=_stored_ids(draw, ns, draw(st.integers(1, 6).filter(lambda n: n != ids.size))))


def _reused_step_id(draw, d, ns, world):
    d.put("request id of a step every shard committed", None, request_id=world.request_id(ns.name, "ApplyGradients"),
          defer_step=False, step_id="")


def _gradient_step_defect(draw, d, ns, world):
    if draw(st.booleans()):
        d.put("deferred part without a step id", INVALID, defer_step=True, step_id="")
    else:
        d.put("step id over 128 characters", INVALID, defer_step=True, step_id=draw(hv.long_text(129)))


@st.composite
def apply_gradients_cases(draw, world: World) -> Case:
    """Whole steps and deferred parts (step_id, part, defer_step) of one; a valid deferred part
    ("fuzz-staged-*") waits on the shards and changes nothing."""
    ns = world.values
    rows = draw(st.integers(1, 5))
    d = Draft("ApplyGradients", namespace=ns.name, ids=_stored_ids(draw, ns, rows),
              grads=hv.floats_array(draw, (rows, ns.value_dim)), generation=draw(st.sampled_from([0, ns.generation])),
              request_id=draw(st.sampled_from(STEP_IDS + (uuid.uuid4().hex,))), defer_step=draw(st.booleans()),
              step_id=draw(st.sampled_from(STEP_IDS)), part=draw(st.integers(0, 3)))
    if draw(st.integers(0, 7)) == 0:
        _reused_step_id(draw, d, ns, world)
        return d.case(draw)
    if draw(st.integers(0, 7)) == 0:
        d.put("valid deferred part", None, step_id=draw(st.sampled_from(STAGED_STEP_IDS)), defer_step=True)
        return d.case(draw)
    table = dict(NAMESPACE_DEFECTS)
    table.update({"ids": ("ids", _gradient_ids_defect), "request id": ("request_id", _long_request_id),
                  "grads": _vectors_defect("grads", lambda n: n.value_dim), "step": ("step_id", _gradient_step_defect),
                  "no values": ("namespace", _no_values_namespace)})
    for _, apply in _defects(draw, table):
        apply(draw, d, ns, world)
    return d.case(draw)


@st.composite
def step_cases(draw, world: World, rpc: str) -> Case:
    """CommitStep / AbortStep. Committing a step no part reached is ABORTED; aborting one is harmless.
    A step a valid deferred part may have left ("fuzz-staged-*") is only named on the other namespace."""
    ns = draw(st.sampled_from(world.namespaces))
    step_ids = STEP_IDS + (STAGED_STEP_IDS if ns is world.plain or rpc == "AbortStep" else ())
    d = Draft(rpc, namespace=ns.name, generation=draw(st.sampled_from([0, ns.generation])))
    kind = draw(st.sampled_from(["pool", "pool", "pool", "random", "committed", "empty", "long"]))
    if kind in ("pool", "random"):
        step_id = draw(st.sampled_from(step_ids)) if kind == "pool" else uuid.uuid4().hex
        d.put("a step with no staged parts", ABORTED if rpc == "CommitStep" else None, step_id=step_id)
    elif kind == "committed":  # answers its first result again, stepping nothing
        d.put("a step every shard committed", None, step_id=world.request_id(world.values.name, "ApplyGradients"),
              namespace=world.values.name, generation=draw(st.sampled_from([0, world.values.generation])))
    elif kind == "empty":
        d.put("no step id", INVALID, step_id="")
    else:
        d.put("step id over 128 characters", INVALID, step_id=draw(hv.long_text(129)))
    if draw(st.integers(0, 3)) == 0:  # rarely: most cases must reach the shards, where the steps are
        for _, apply in _defects(draw, NAMESPACE_DEFECTS):
            apply(draw, d, ns, world)
    return d.case(draw)


_BAD_LOCATIONS = ["..", "../x", "a/../../x", "./..", "/", "/etc", "/tmp/elsewhere", "file:///etc",
                  "file:///", "s3://bucket/x", "gs://bucket/x", "hdfs://host:1/x", "a\0b", "\\..\\x", "C:\\x",
                  "x/../..", "seed-snapshot/../../x"]


def _location(draw, world, kind: str) -> tuple[str, str | None]:
    """(location, the code it gets by itself; None where it names a usable folder)."""
    if kind == "outside":
        return draw(st.one_of(st.sampled_from(_BAD_LOCATIONS), st.integers(1, 5).map(lambda n: "../" * n + "x"))), INVALID
    if kind == "empty":
        return "", INVALID
    if kind == "long":
        return draw(st.integers(256, 10_000).map(lambda n: "l" * n)), INVALID
    if kind == "not a snapshot":  # folders and files inside a snapshot, and folders that do not exist
        return draw(st.sampled_from([f"{world.snapshot}/shard-0", f"{world.snapshot}/shard-1/manifest.json",
                                     f"{world.snapshot}/shard-0/{world.values.name}.parquet", "no-such-snapshot",
                                     "no/such/snapshot"])), PRECONDITION
    if kind == "taken":  # a snapshot is written to a new folder only
        return world.snapshot, PRECONDITION
    return f"fuzz-snapshot-{uuid.uuid4().hex}", None  # new every time, so that a replayed example writes anew


@st.composite
def create_snapshot_cases(draw, world: World) -> Case:
    """Locations outside the root or unusable, or an odd or unknown namespace; a valid one writes a
    snapshot, which changes nothing stored."""
    kind = draw(st.sampled_from(["outside", "outside", "empty", "long", "taken", "new"]))
    location, code = _location(draw, world, kind)
    d = Draft("CreateSnapshot", location=location, namespace=draw(st.sampled_from(["", world.plain.name])))
    d.put(f"location {kind}", code)
    namespace = draw(st.sampled_from(["fine", "odd", "unknown"]))
    if namespace == "odd":
        _odd_namespace(draw, d, None, world)
        d.defects[-1] = (d.defects[-1][0], INVALID if d.fields["namespace"] else None)  # "" is every namespace
    elif namespace == "unknown":
        _unknown_namespace(draw, d, None, world)
    return d.case(draw)


@st.composite
def restore_snapshot_cases(draw, world: World) -> Case:
    kind = draw(st.sampled_from(["outside", "empty", "long", "not a snapshot", "existing"]))
    if kind == "existing":
        location, code = world.snapshot, EXISTS  # its namespaces exist here
    else:
        location, code = _location(draw, world, kind)
    d = Draft("RestoreSnapshot", location=location, namespace=draw(st.sampled_from(["", world.values.name])))
    d.put(f"location {kind}", code)
    if draw(st.booleans()):  # a namespace the snapshot does not hold (an odd name is one)
        name = draw(st.one_of(hv.odd_names.filter(bool), hv.unknown_names({n.name for n in world.namespaces})))
        # An odd name is one no snapshot holds: NOT_FOUND, or INVALID_ARGUMENT if the name is checked first.
        d.put("namespace not in the snapshot", NOT_FOUND if hv.is_valid_name(name) else (NOT_FOUND, INVALID),
              namespace=name)
    return d.case(draw)


@st.composite
def decode_cases(draw, world: World) -> Case:
    """A stream of one step: a Search or a Retrieve case as its step (the codes are the step's);
    sometimes a Retrieve asking to keep its state, which a decode stream refuses."""
    inner = draw(st.one_of(search_cases(world), retrieve_cases(world)))
    kind = "search" if inner.rpc == "Search" else "retrieve"
    expected, defects = inner.expected, inner.defects
    if kind == "retrieve" and inner.request.keep_state:
        defects, expected = defects + ("keep_state in a decode stream",), expected - {OK} | {INVALID}
    return Case("Decode", pb.DecodeStep(**{kind: inner.request}), defects, frozenset(expected))


@st.composite
def reshard_cases(draw, world: World) -> Case:
    """A shard count under 1 or over 4096, or a negative batch size; a valid request names the
    deployment's own count, which moves nothing (tests/integration/test_reshard_service.py moves rows)."""
    d = Draft("Reshard", shards=world.shards, batch_rows=draw(st.sampled_from([0, 1, 16384, 2**40])))
    for _, apply in _defects(draw, RESHARD_DEFECTS, lowest=0):
        apply(draw, d, None, world)
    return d.case(draw)


RESHARD_DEFECTS = {
    "no shards": ("shards", lambda draw, d, ns, world: d.put(
        "shards under 1", INVALID, shards=draw(st.one_of(st.just(0), st.integers(-2**31, -1))))),
    "too many shards": ("shards", lambda draw, d, ns, world: d.put(
        "over 4096 shards", INVALID, shards=draw(st.integers(4097, 2**31 - 1)))),
    "negative batch": ("batch_rows", lambda draw, d, ns, world: d.put(
        "negative batch_rows", INVALID, batch_rows=draw(st.integers(-2**63, -1)))),
}


def answered_in_parts(cases, rpc: str):
    """The cases of Search or Retrieve sent as rpc (SearchParts, RetrieveParts: the same request, its
    answer in parts): the same codes."""
    return lambda world: cases(world).map(lambda case: dataclasses.replace(case, rpc=rpc))


CASES = {
    "CreateNamespace": create_namespace_cases,
    "ListNamespaces": lambda world: no_field_cases(world, "ListNamespaces"),
    "DescribeNamespace": lambda world: namespace_only_cases(world, "DescribeNamespace"),
    "DropNamespace": lambda world: namespace_only_cases(world, "DropNamespace"),
    "Add": add_cases,
    "Search": search_cases,
    "Get": get_cases,
    "Delete": delete_cases,
    "Retrieve": retrieve_cases,
    "RetrieveBackward": retrieve_backward_cases,
    "ApplyGradients": apply_gradients_cases,
    "CommitStep": lambda world: step_cases(world, "CommitStep"),
    "AbortStep": lambda world: step_cases(world, "AbortStep"),
    "CreateSnapshot": create_snapshot_cases,
    "ListSnapshots": lambda world: no_field_cases(world, "ListSnapshots"),
    "RestoreSnapshot": restore_snapshot_cases,
    "Decode": decode_cases,
    "Reshard": reshard_cases,
    "ReadEndpoints": lambda world: no_field_cases(world, "ReadEndpoints"),
    "SearchParts": answered_in_parts(search_cases, "SearchParts"),
    "RetrieveParts": answered_in_parts(retrieve_cases, "RetrieveParts"),
    "ProbeSharedMemory": probe_shared_memory_cases,
}
