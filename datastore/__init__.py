"""The neighbour store in one process: config, validation, row store, exact search, errors.

Importable and testable without Ray, gRPC or a GPU.
"""

from datastore.config import NamespaceConfig, validate_namespace_name
from datastore.results import Rows, SearchResult
from datastore.store import NeighborStore

__all__ = ["NamespaceConfig", "NeighborStore", "Rows", "SearchResult", "validate_namespace_name"]
