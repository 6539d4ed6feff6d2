"""The neighbour store in one process: row store, exact search, learnable-memory arithmetic, optimizers.

Importable and testable without Ray, gRPC or a GPU. The types it shares with the client (config,
results, errors, input validation) live in the contract, ``monim.protos``; they are re-exported here.
"""

from monim.datastore.store import NeighborStore
from monim.protos.config import NamespaceConfig, validate_namespace_name
from monim.protos.results import Rows, SearchResult

__all__ = ["NamespaceConfig", "NeighborStore", "Rows", "SearchResult", "validate_namespace_name"]
