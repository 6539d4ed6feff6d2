"""Lazy attributes for the package faces (``monim``, ``monim.model_client``).

The base install is the gRPC client; the MoNIM layer needs torch, ``attach_monim`` transformers,
the in-process store and the server ray, faiss and pyarrow. A face names everything, but imports a
part only when it is first used, so ``from monim import MemoryClient`` loads no torch, and a part
whose extra is missing raises an ImportError that says which extra to install.
"""

from __future__ import annotations

import importlib


def lazy_attributes(face: str, table: dict[str, tuple[str, str | None]]):
    """A module ``__getattr__`` (PEP 562) for ``face``.

    table: attribute -> (module that defines it, the extra it needs or None for the base install).
    """

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {face!r} has no attribute {name!r}")
        module_name, extra = table[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = (error.name or "").split(".")[0]
            if extra is None or missing in ("", "monim"):
                raise
            raise ImportError(f"{face}.{name} needs {missing!r}, which is not installed: "
                              f"pip install 'monim-store[{extra}]'", name=error.name) from error
        return getattr(module, name)

    return __getattr__
