"""The client side of monim-store: MemoryClient (gRPC or in-process), the MoNIM layer and
its attachment to Hugging Face causal LMs.

MemoryClient needs only the base install; the layer needs ``monim-store[torch]`` and
``attach_monim`` ``monim-store[hf]``: each is imported on first use (see monim/_lazy.py).
"""

from monim._lazy import lazy_attributes

_LAZY = {
    "MemoryClient": ("monim.model_client.client", None),
    "NamespaceDescription": ("monim.model_client.client", None),
    "MoNIMLayer": ("monim.model_client.layer", "torch"),
    "RetrieveFunction": ("monim.model_client.layer", "torch"),
    "attach_monim": ("monim.model_client.hf", "hf"),
    "MonimHandle": ("monim.model_client.hf", "hf"),
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__all__ = list(_LAZY)
