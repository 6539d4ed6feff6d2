"""Typed, validated configuration of a namespace and of its value optimizer, and admission defaults.

Shared by the client and the server (the contract): imports nothing but the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import re

from monim.protos.errors import InvalidArgument

# SeMem admission: a row is memorized when log p(token) < this (datastore/admission.py).
DEFAULT_ADMIT_BELOW = -1.5

METRICS = ("l2", "ip")
INDEXES = ("flat", "ivf_flat", "ivf_pq", "hnsw")
IVF_INDEXES = ("ivf_flat", "ivf_pq")
HNSW_INDEXES = ("hnsw",)
MAX_NLIST = 1 << 20
MAX_TRAIN_MIN_ROWS = 1 << 40
DEFAULT_NLIST = 1024
PQ_TRAIN_ROWS = 256  # faiss's PQ trains 256 centroids per sub-quantizer: it needs at least that many rows
DEFAULT_HNSW_M = 32  # hnsw: the graph's degree M (faiss IndexHNSWFlat)
MIN_HNSW_M, MAX_HNSW_M = 2, 512
DEFAULT_EF_CONSTRUCTION = 64  # hnsw: the build's beam width (faiss efConstruction)
MAX_EF_CONSTRUCTION = 4096
DEFAULT_HNSW_TRAIN_MIN_ROWS = 10_000  # hnsw: rows a shard holds before it builds its graph
KEY_DTYPES = ("auto", "float32", "float16")
MAX_NAME_CHARS = 128
MAX_K_LIMIT = 4096
MAX_DIM = 65536

FLOAT32_MAX = 3.4028234663852886e38  # the rows are float32: an option past this overflows them
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def validate_namespace_name(name: str) -> str:
    """Returns ``name`` or raises InvalidArgument naming what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("namespace name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"namespace name has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed")
    if "/" in name or "\\" in name:
        raise InvalidArgument(f"namespace name {name!r} contains a path separator")
    if name in (".", "..") or not _NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"namespace name {name!r} may use only letters, digits, '_', '-' and '.', and may not be '.' or '..'"
        )
    return name


OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """name: sgd | adagrad | adam; lr > 0. momentum: sgd. lr_decay, initial_accumulator_value: adagrad.
    beta1, beta2: adam. eps: adagrad (default 1e-10) and adam (default 1e-8). max_grad_norm: 0 = off."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 0.0
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    max_grad_norm: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "name" and (not isinstance(value, (int, float)) or not math.isfinite(value)
                                         or abs(value) > FLOAT32_MAX):
                raise InvalidArgument(f"optimizer option {field.name} must be a finite float32 number, got {value!r}")
        if self.lr <= 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum must be in [0, 1), got {self.momentum}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise InvalidArgument(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.eps < 0 or self.lr_decay < 0 or self.initial_accumulator_value < 0 or self.max_grad_norm < 0:
            raise InvalidArgument("eps, lr_decay, initial_accumulator_value and max_grad_norm must be >= 0")
        if self.eps == 0:
            object.__setattr__(self, "eps", {"adagrad": 1e-10, "adam": 1e-8}.get(self.name, 0.0))

    def state_columns(self) -> dict[str, float]:
        """Per-row state columns [N, value_dim] and their initial values."""
        if self.name == "sgd":
            return {"momentum_buffer": 0.0} if self.momentum else {}
        if self.name == "adagrad":
            return {"sum": float(self.initial_accumulator_value)}
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @classmethod
    def from_dict(cls, data: dict | None) -> "OptimizerConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidArgument(f"unknown optimizer option(s): {', '.join(unknown)}")
        return cls(**data)



def default_pq_m(dim: int) -> int:
    """The largest divisor of dim that is at most dim / 2 and at most 64 (1 when dim is 1): 64-byte
    codes for wide keys, as the paper's PQ64, and at least two dimensions per sub-quantizer."""
    return max([m for m in range(1, min(64, max(1, dim // 2)) + 1) if dim % m == 0])


# Each index option and the indexes it applies to (0 on any other).
_INDEX_OPTIONS = {"nlist": IVF_INDEXES, "pq_m": ("ivf_pq",), "train_min_rows": IVF_INDEXES + HNSW_INDEXES,
                  "hnsw_m": HNSW_INDEXES, "ef_construction": HNSW_INDEXES}


def _either(names) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclasses.dataclass(frozen=True)
class NamespaceConfig:
    """What a namespace stores and how it is searched.

    name: letters, digits, ``_ - .``; at most 128 characters.
    dim: width of keys and queries.
    metric: ``l2`` (squared Euclidean) or ``ip`` (inner product; reported as
        the negative inner product so that smaller is nearer for both).
    index: ``flat`` (exact), ``ivf_flat``, ``ivf_pq`` or ``hnsw`` (faiss; approximate once trained or
        built; docs/INDEXES.md).
    value_dim: width of the learnable value vectors; 0 for none.
    max_k: the largest k a search may ask for.
    key_dtype: storage dtype of keys on GPU shards: ``auto`` (the default) is float16 there
        (half the memory and bandwidth; distances accumulate in float32 and the final k are
        re-ranked in float32), ``float32`` on request. CPU shards keep float32, which faiss needs.
    optimizer: the server-side sparse optimizer of the value rows.
    nlist: ivf indexes: the number of inverted lists (k-means centroids); 0 takes 1024.
    pq_m: ivf_pq: sub-quantizers (bytes per code); must divide dim; 0 takes the largest divisor
        of dim that is at most dim / 2 and at most 64.
    train_min_rows: ivf indexes and hnsw: rows a shard holds before it trains its index (ivf) or
        builds its graph (hnsw); it searches exactly until then. ivf: 0 takes 64 x nlist; at least
        nlist (and 256 for ivf_pq). hnsw: 0 takes 10,000; at least 1.
    hnsw_m: hnsw: the graph's degree M (links per node); 0 takes 32; in [2, 512].
    ef_construction: hnsw: the build's beam width (candidates kept while a node is linked in);
        0 takes 64; in [1, 4096].
    generation: which incarnation of the name this is, set by the store when
        the namespace is created (0 before); a namespace dropped and created
        again gets a new one, and requests that carry an old one are refused.
    """

    name: str
    dim: int
    metric: str = "l2"
    index: str = "flat"
    value_dim: int = 0
    max_k: int = 1024
    key_dtype: str = "auto"
    optimizer: OptimizerConfig = OptimizerConfig()
    generation: int = 0
    nlist: int = 0
    pq_m: int = 0
    train_min_rows: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0

    def __post_init__(self):
        validate_namespace_name(self.name)
        if isinstance(self.optimizer, dict):
            object.__setattr__(self, "optimizer", OptimizerConfig.from_dict(self.optimizer))
        if not isinstance(self.optimizer, OptimizerConfig):
            raise InvalidArgument(f"optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}")
        for field in ("dim", "value_dim", "max_k", "generation", "nlist", "pq_m", "train_min_rows", "hnsw_m",
                      "ef_construction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"{field} must be an integer, got {value!r}")
        if not 1 <= self.dim <= MAX_DIM:
            raise InvalidArgument(f"dim must be in [1, {MAX_DIM}], got {self.dim}")
        if not 0 <= self.value_dim <= MAX_DIM:
            raise InvalidArgument(f"value_dim must be in [0, {MAX_DIM}], got {self.value_dim}")
        if not 1 <= self.max_k <= MAX_K_LIMIT:
            raise InvalidArgument(f"max_k must be in [1, {MAX_K_LIMIT}], got {self.max_k}")
        if self.metric not in METRICS:
            raise InvalidArgument(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.index not in INDEXES:
            raise InvalidArgument(f"unknown index {self.index!r}; choose one of {', '.join(INDEXES)}")
        if self.key_dtype not in KEY_DTYPES:
            raise InvalidArgument(f"unknown key_dtype {self.key_dtype!r}; choose one of {', '.join(KEY_DTYPES)}")
        self._check_index_options()

    def _check_index_options(self) -> None:
        """nlist, pq_m, train_min_rows (ivf indexes), hnsw_m, ef_construction, train_min_rows (hnsw): in
        range for an index they apply to (0 takes the default, written back so that the stored config
        says what is used), 0 for the others."""
        given = {name: getattr(self, name) for name in _INDEX_OPTIONS}
        for name, value in given.items():
            if value and self.index not in _INDEX_OPTIONS[name]:
                raise InvalidArgument(f"{name} applies to index {_either(_INDEX_OPTIONS[name])}, not {self.index!r}; "
                                      f"leave it 0")
            if value < 0:
                raise InvalidArgument(f"{name} must be >= 0 (0: the default), got {value}")
        if self.index in HNSW_INDEXES:
            self._check_hnsw_options()
            return
        if self.index not in IVF_INDEXES:
            return
        nlist = self.nlist or DEFAULT_NLIST
        if not 1 <= nlist <= MAX_NLIST:
            raise InvalidArgument(f"nlist must be in [1, {MAX_NLIST}], got {nlist}")
        object.__setattr__(self, "nlist", nlist)
        if self.index == "ivf_pq":
            pq_m = self.pq_m or default_pq_m(self.dim)
            if pq_m > self.dim or self.dim % pq_m:
                raise InvalidArgument(f"pq_m must divide dim ({self.dim}), got {pq_m}")
            object.__setattr__(self, "pq_m", pq_m)
        least = max(nlist, PQ_TRAIN_ROWS) if self.index == "ivf_pq" else nlist
        train_min_rows = self.train_min_rows or max(least, 64 * nlist)
        if not least <= train_min_rows <= MAX_TRAIN_MIN_ROWS:
            raise InvalidArgument(f"train_min_rows must be in [{least}, {MAX_TRAIN_MIN_ROWS}] for {self.index} "
                                  f"with nlist {nlist} (k-means needs a row per list"
                                  f"{' and the PQ 256' if self.index == 'ivf_pq' else ''}), got {train_min_rows}")
        object.__setattr__(self, "train_min_rows", train_min_rows)

    def _check_hnsw_options(self) -> None:
        hnsw_m = self.hnsw_m or DEFAULT_HNSW_M
        if not MIN_HNSW_M <= hnsw_m <= MAX_HNSW_M:
            raise InvalidArgument(f"hnsw_m must be in [{MIN_HNSW_M}, {MAX_HNSW_M}], got {hnsw_m}")
        ef_construction = self.ef_construction or DEFAULT_EF_CONSTRUCTION
        if not 1 <= ef_construction <= MAX_EF_CONSTRUCTION:
            raise InvalidArgument(f"ef_construction must be in [1, {MAX_EF_CONSTRUCTION}], got {ef_construction}")
        train_min_rows = self.train_min_rows or DEFAULT_HNSW_TRAIN_MIN_ROWS
        if not 1 <= train_min_rows <= MAX_TRAIN_MIN_ROWS:
            raise InvalidArgument(f"train_min_rows must be in [1, {MAX_TRAIN_MIN_ROWS}] for hnsw, got {train_min_rows}")
        object.__setattr__(self, "hnsw_m", hnsw_m)
        object.__setattr__(self, "ef_construction", ef_construction)
        object.__setattr__(self, "train_min_rows", train_min_rows)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NamespaceConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"unknown namespace option(s): {', '.join(unknown)}")
        return cls(**data)
