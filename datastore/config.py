"""Typed, validated configuration of one namespace."""

from __future__ import annotations

import dataclasses
import re

from datastore.errors import InvalidArgument
from datastore.optimizers import OptimizerConfig

METRICS = ("l2", "ip")
INDEXES = ("flat",)
KEY_DTYPES = ("float32", "float16")
MAX_NAME_CHARS = 128
MAX_K_LIMIT = 4096
MAX_DIM = 65536

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def validate_namespace_name(name: str) -> str:
    """Returns ``name`` or raises InvalidArgument naming what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument("namespace name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"namespace name has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed")
    if "/" in name or "\\" in name:
        raise InvalidArgument(f"namespace name {name!r} contains a path separator")
    if name in (".", "..") or not _NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"namespace name {name!r} may use only letters, digits, '_', '-' and '.', and may not be '.' or '..'"
        )
    return name


@dataclasses.dataclass(frozen=True)
class NamespaceConfig:
    """What a namespace stores and how it is searched.

    name: letters, digits, ``_ - .``; at most 128 characters.
    dim: width of keys and queries.
    metric: ``l2`` (squared Euclidean) or ``ip`` (inner product; reported as
        the negative inner product so that smaller is nearer for both).
    index: ``flat`` (exact).
    value_dim: width of the learnable value vectors; 0 for none.
    max_k: the largest k a search may ask for.
    key_dtype: storage dtype of keys on GPU shards (CPU shards keep float32,
        which faiss needs).
    optimizer: the server-side sparse optimizer of the value rows.
    """

    name: str
    dim: int
    metric: str = "l2"
    index: str = "flat"
    value_dim: int = 0
    max_k: int = 1024
    key_dtype: str = "float32"
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        validate_namespace_name(self.name)
        if isinstance(self.optimizer, dict):
            object.__setattr__(self, "optimizer", OptimizerConfig.from_dict(self.optimizer))
        if not isinstance(self.optimizer, OptimizerConfig):
            raise InvalidArgument(f"optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}")
        for field in ("dim", "value_dim", "max_k"):
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NamespaceConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"unknown namespace option(s): {', '.join(unknown)}")
        return cls(**data)
