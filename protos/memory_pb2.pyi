from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared: SharedBytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared: _Optional[_Union[SharedBytes, _Mapping]] = ...) -> None: ...

class SharedBytes(_message.Message):
    __slots__ = ("region", "offset")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "lr", "momentum", "beta1", "beta2", "eps", "lr_decay", "initial_accumulator_value", "max_grad_norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    beta1: float
    beta2: float
    eps: float
    lr_decay: float
    initial_accumulator_value: float
    max_grad_norm: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., lr_decay: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class NamespaceConfig(_message.Message):
    __slots__ = ("name", "dim", "metric", "index", "value_dim", "max_k", "key_dtype", "optimizer", "generation", "nlist", "pq_m", "train_min_rows", "hnsw_m", "ef_construction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    KEY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NLIST_FIELD_NUMBER: _ClassVar[int]
    PQ_M_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    HNSW_M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    metric: str
    index: str
    value_dim: int
    max_k: int
    key_dtype: str
    optimizer: OptimizerConfig
    generation: int
    nlist: int
    pq_m: int
    train_min_rows: int
    hnsw_m: int
    ef_construction: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., index: _Optional[str] = ..., value_dim: _Optional[int] = ..., max_k: _Optional[int] = ..., key_dtype: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., generation: _Optional[int] = ..., nlist: _Optional[int] = ..., pq_m: _Optional[int] = ..., train_min_rows: _Optional[int] = ..., hnsw_m: _Optional[int] = ..., ef_construction: _Optional[int] = ...) -> None: ...

class CreateNamespaceRequest(_message.Message):
    __slots__ = ("config", "request_id")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    config: NamespaceConfig
    request_id: str
    def __init__(self, config: _Optional[_Union[NamespaceConfig, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateNamespaceResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: NamespaceConfig
    def __init__(self, config: _Optional[_Union[NamespaceConfig, _Mapping]] = ...) -> None: ...

class ListNamespacesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNamespacesResponse(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceConfig]
    def __init__(self, namespaces: _Optional[_Iterable[_Union[NamespaceConfig, _Mapping]]] = ...) -> None: ...

class DescribeNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard", "rows", "device", "backend", "state", "memory_used_bytes", "memory_budget_bytes", "index_state", "index_trainings", "index_tombstones", "index_drift", "index_unindexed")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_STATE_FIELD_NUMBER: _ClassVar[int]
    INDEX_TRAININGS_FIELD_NUMBER: _ClassVar[int]
    INDEX_TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    INDEX_DRIFT_FIELD_NUMBER: _ClassVar[int]
    INDEX_UNINDEXED_FIELD_NUMBER: _ClassVar[int]
    shard: int
    rows: int
    device: str
    backend: str
    state: str
    memory_used_bytes: int
    memory_budget_bytes: int
    index_state: str
    index_trainings: int
    index_tombstones: int
    index_drift: float
    index_unindexed: int
    def __init__(self, shard: _Optional[int] = ..., rows: _Optional[int] = ..., device: _Optional[str] = ..., backend: _Optional[str] = ..., state: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., index_state: _Optional[str] = ..., index_trainings: _Optional[int] = ..., index_tombstones: _Optional[int] = ..., index_drift: _Optional[float] = ..., index_unindexed: _Optional[int] = ...) -> None: ...

class DescribeNamespaceResponse(_message.Message):
    __slots__ = ("config", "rows", "shards", "next_id")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ID_FIELD_NUMBER: _ClassVar[int]
    config: NamespaceConfig
    rows: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    next_id: int
    def __init__(self, config: _Optional[_Union[NamespaceConfig, _Mapping]] = ..., rows: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., next_id: _Optional[int] = ...) -> None: ...

class DropNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    def __init__(self, namespace: _Optional[str] = ...) -> None: ...

class DropNamespaceResponse(_message.Message):
    __slots__ = ("rows_dropped",)
    ROWS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    rows_dropped: int
    def __init__(self, rows_dropped: _Optional[int] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("namespace", "keys", "tokens", "values", "weights", "source", "logp", "admit_below", "merge_eps", "request_id", "generation")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOGP_FIELD_NUMBER: _ClassVar[int]
    ADMIT_BELOW_FIELD_NUMBER: _ClassVar[int]
    MERGE_EPS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    keys: Tensor
    tokens: Tensor
    values: Tensor
    weights: Tensor
    source: str
    logp: Tensor
    admit_below: float
    merge_eps: float
    request_id: str
    generation: int
    def __init__(self, namespace: _Optional[str] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., source: _Optional[str] = ..., logp: _Optional[_Union[Tensor, _Mapping]] = ..., admit_below: _Optional[float] = ..., merge_eps: _Optional[float] = ..., request_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("ids", "admitted", "merged", "generation")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    admitted: Tensor
    merged: Tensor
    generation: int
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., admitted: _Optional[_Union[Tensor, _Mapping]] = ..., merged: _Optional[_Union[Tensor, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("namespace", "queries", "k", "return_keys", "return_values", "return_weights", "generation", "nprobe", "rerank", "ef")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RETURN_KEYS_FIELD_NUMBER: _ClassVar[int]
    RETURN_VALUES_FIELD_NUMBER: _ClassVar[int]
    RETURN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    queries: Tensor
    k: int
    return_keys: bool
    return_values: bool
    return_weights: bool
    generation: int
    nprobe: int
    rerank: int
    ef: int
    def __init__(self, namespace: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., return_keys: _Optional[bool] = ..., return_values: _Optional[bool] = ..., return_weights: _Optional[bool] = ..., generation: _Optional[int] = ..., nprobe: _Optional[int] = ..., rerank: _Optional[int] = ..., ef: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("ids", "distances", "tokens", "keys", "values", "weights", "generation")
    IDS_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    distances: Tensor
    tokens: Tensor
    keys: Tensor
    values: Tensor
    weights: Tensor
    generation: int
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., distances: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace", "ids", "return_optimizer_state", "generation")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    ids: Tensor
    return_optimizer_state: bool
    generation: int
    def __init__(self, namespace: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., return_optimizer_state: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("ids", "keys", "tokens", "values", "weights", "sources", "optimizer_state")
    class OptimizerStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    keys: Tensor
    tokens: Tensor
    values: Tensor
    weights: Tensor
    sources: _containers.RepeatedScalarFieldContainer[str]
    optimizer_state: _containers.MessageMap[str, Tensor]
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., sources: _Optional[_Iterable[str]] = ..., optimizer_state: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace", "ids", "source", "request_id", "generation")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    ids: Tensor
    source: str
    request_id: str
    generation: int
    def __init__(self, namespace: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., source: _Optional[str] = ..., request_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("namespace", "queries", "k", "temperature", "generation", "keep_state", "nprobe", "rerank", "ef", "memory_only")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KEEP_STATE_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    EF_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ONLY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    queries: Tensor
    k: int
    temperature: float
    generation: int
    keep_state: bool
    nprobe: int
    rerank: int
    ef: int
    memory_only: bool
    def __init__(self, namespace: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., temperature: _Optional[float] = ..., generation: _Optional[int] = ..., keep_state: _Optional[bool] = ..., nprobe: _Optional[int] = ..., rerank: _Optional[int] = ..., ef: _Optional[int] = ..., memory_only: _Optional[bool] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("memory", "ids", "alpha", "distances", "tokens", "weights", "generation", "handle")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    memory: Tensor
    ids: Tensor
    alpha: Tensor
    distances: Tensor
    tokens: Tensor
    weights: Tensor
    generation: int
    handle: str
    def __init__(self, memory: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., alpha: _Optional[_Union[Tensor, _Mapping]] = ..., distances: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., generation: _Optional[int] = ..., handle: _Optional[str] = ...) -> None: ...

class RetrieveBackwardRequest(_message.Message):
    __slots__ = ("namespace", "queries", "ids", "alpha", "distances", "grad_memory", "temperature", "generation", "step_id", "part", "defer_step", "handle", "row_offset")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DISTANCES_FIELD_NUMBER: _ClassVar[int]
    GRAD_MEMORY_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    DEFER_STEP_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    queries: Tensor
    ids: Tensor
    alpha: Tensor
    distances: Tensor
    grad_memory: Tensor
    temperature: float
    generation: int
    step_id: str
    part: int
    defer_step: bool
    handle: str
    row_offset: int
    def __init__(self, namespace: _Optional[str] = ..., queries: _Optional[_Union[Tensor, _Mapping]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., alpha: _Optional[_Union[Tensor, _Mapping]] = ..., distances: _Optional[_Union[Tensor, _Mapping]] = ..., grad_memory: _Optional[_Union[Tensor, _Mapping]] = ..., temperature: _Optional[float] = ..., generation: _Optional[int] = ..., step_id: _Optional[str] = ..., part: _Optional[int] = ..., defer_step: _Optional[bool] = ..., handle: _Optional[str] = ..., row_offset: _Optional[int] = ...) -> None: ...

class RetrieveBackwardResponse(_message.Message):
    __slots__ = ("grad_queries", "grad_temperature")
    GRAD_QUERIES_FIELD_NUMBER: _ClassVar[int]
    GRAD_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    grad_queries: Tensor
    grad_temperature: float
    def __init__(self, grad_queries: _Optional[_Union[Tensor, _Mapping]] = ..., grad_temperature: _Optional[float] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("namespace", "ids", "grads", "request_id", "generation", "step_id", "part", "defer_step")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    DEFER_STEP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    ids: Tensor
    grads: Tensor
    request_id: str
    generation: int
    step_id: str
    part: int
    defer_step: bool
    def __init__(self, namespace: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., request_id: _Optional[str] = ..., generation: _Optional[int] = ..., step_id: _Optional[str] = ..., part: _Optional[int] = ..., defer_step: _Optional[bool] = ...) -> None: ...

class ApplyGradientsResponse(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("namespace", "step_id", "generation")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    step_id: str
    generation: int
    def __init__(self, namespace: _Optional[str] = ..., step_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class CommitStepResponse(_message.Message):
    __slots__ = ("rows_updated",)
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    def __init__(self, rows_updated: _Optional[int] = ...) -> None: ...

class AbortStepResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("location", "namespace")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    location: str
    namespace: str
    def __init__(self, location: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("location", "created_at", "shards", "rows", "bytes")
    class RowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    location: str
    created_at: str
    shards: int
    rows: _containers.ScalarMap[str, int]
    bytes: int
    def __init__(self, location: _Optional[str] = ..., created_at: _Optional[str] = ..., shards: _Optional[int] = ..., rows: _Optional[_Mapping[str, int]] = ..., bytes: _Optional[int] = ...) -> None: ...

class CreateSnapshotResponse(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: SnapshotInfo
    def __init__(self, snapshot: _Optional[_Union[SnapshotInfo, _Mapping]] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSnapshotsResponse(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class RestoreSnapshotRequest(_message.Message):
    __slots__ = ("location", "namespace")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    location: str
    namespace: str
    def __init__(self, location: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class RestoreSnapshotResponse(_message.Message):
    __slots__ = ("rows",)
    class RowsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.ScalarMap[str, int]
    def __init__(self, rows: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DecodeStep(_message.Message):
    __slots__ = ("search", "retrieve")
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    search: SearchRequest
    retrieve: RetrieveRequest
    def __init__(self, search: _Optional[_Union[SearchRequest, _Mapping]] = ..., retrieve: _Optional[_Union[RetrieveRequest, _Mapping]] = ...) -> None: ...

class DecodeStepResult(_message.Message):
    __slots__ = ("search", "retrieve", "code", "message")
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    search: SearchResponse
    retrieve: RetrieveResponse
    code: int
    message: str
    def __init__(self, search: _Optional[_Union[SearchResponse, _Mapping]] = ..., retrieve: _Optional[_Union[RetrieveResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ProbeSharedMemoryRequest(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: str
    def __init__(self, region: _Optional[str] = ...) -> None: ...

class ProbeSharedMemoryResponse(_message.Message):
    __slots__ = ("host_socket",)
    HOST_SOCKET_FIELD_NUMBER: _ClassVar[int]
    host_socket: str
    def __init__(self, host_socket: _Optional[str] = ...) -> None: ...

class ReadEndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadEndpointsResponse(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, targets: _Optional[_Iterable[str]] = ...) -> None: ...

class ReshardRequest(_message.Message):
    __slots__ = ("shards", "batch_rows")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    shards: int
    batch_rows: int
    def __init__(self, shards: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class ReshardProgress(_message.Message):
    __slots__ = ("source_shards", "target_shards", "namespaces_done", "namespaces", "namespace", "ids_done", "ids", "rows_moved", "done")
    SOURCE_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_SHARDS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_DONE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IDS_DONE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROWS_MOVED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    source_shards: int
    target_shards: int
    namespaces_done: int
    namespaces: int
    namespace: str
    ids_done: int
    ids: int
    rows_moved: int
    done: bool
    def __init__(self, source_shards: _Optional[int] = ..., target_shards: _Optional[int] = ..., namespaces_done: _Optional[int] = ..., namespaces: _Optional[int] = ..., namespace: _Optional[str] = ..., ids_done: _Optional[int] = ..., ids: _Optional[int] = ..., rows_moved: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
