"""The client side of monim-store: MemoryClient (gRPC or in-process), the MoNIM layer and
its attachment to Hugging Face causal LMs."""

from model_client.client import MemoryClient, NamespaceDescription
from model_client.hf import MonimHandle, attach_monim
from model_client.layer import MoNIMLayer, RetrieveFunction

__all__ = ["MemoryClient", "MoNIMLayer", "MonimHandle", "NamespaceDescription", "RetrieveFunction", "attach_monim"]
