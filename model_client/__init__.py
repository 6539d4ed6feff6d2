"""The client side of monim-store: MemoryClient (gRPC or in-process) and, later, the MoNIM layer."""

from model_client.client import MemoryClient, NamespaceDescription

__all__ = ["MemoryClient", "NamespaceDescription"]
