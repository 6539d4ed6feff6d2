"""monim-store: a distributed, learnable nearest-neighbour memory for language models (MoNIM).

The public face. What the base install (the gRPC client: grpcio, protobuf, numpy) gives:

    from monim import MemoryClient, NamespaceConfig, InvalidArgument, ...

and, with an extra installed (each imported on first use; without the extra, an ImportError
names it):

    monim.MoNIMLayer, monim.RetrieveFunction   monim-store[torch]
    monim.attach_monim, monim.MonimHandle      monim-store[hf]
    monim.EmbeddedStore, monim.NeighborStore   monim-store[server]
    MemoryClient(":memory:")                   monim-store[server] (the in-process store)

Subpackages: ``monim.protos`` (the wire contract and the types both sides share),
``monim.datastore`` (the store in one process), ``monim.workers`` (Ray shards, router, gRPC
server, the ``monim`` command), ``monim.model_client`` (client, layer, Hugging Face attach, demo).
"""

from importlib import metadata as _metadata

from monim._lazy import lazy_attributes
from monim.protos.config import NamespaceConfig, OptimizerConfig
from monim.protos.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    IdsNotFound,
    InternalError,
    InvalidArgument,
    MemoryStoreError,
    NamespaceNotFound,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ShardUnavailable,
    StepAnswerLost,
    Unauthenticated,
    Unavailable,
)
from monim.protos.results import AddResult, RetrieveResult, Rows, SearchResult

try:
    __version__ = _metadata.version("monim-store")
except _metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "MemoryClient": ("monim.model_client.client", None),
    "NamespaceDescription": ("monim.model_client.client", None),
    "MoNIMLayer": ("monim.model_client.layer", "torch"),
    "RetrieveFunction": ("monim.model_client.layer", "torch"),
    "attach_monim": ("monim.model_client.hf", "hf"),
    "MonimHandle": ("monim.model_client.hf", "hf"),
    "EmbeddedStore": ("monim.workers.embedded", "server"),
    "NeighborStore": ("monim.datastore.store", "server"),
}
__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "Aborted", "AddResult", "AlreadyExists", "DeadlineExceeded", "FailedPrecondition", "IdsNotFound",
    "InternalError", "InvalidArgument", "MemoryStoreError", "NamespaceConfig", "NamespaceNotFound",
    "NotFound", "OptimizerConfig", "PermissionDenied", "ResourceExhausted", "RetrieveResult", "Rows",
    "SearchResult", "ShardUnavailable", "StepAnswerLost", "Unauthenticated", "Unavailable", "__version__", *_LAZY,
]


def __dir__():
    return sorted(__all__)
