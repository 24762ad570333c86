"""Registry of compilation backends and their named targets.

A backend is a module exposing ``compile(qgraph, target=..., **options)``, ``load(path)`` and
``TARGETS`` (name -> target description). Backends are imported lazily so that importing
``backends`` never pulls in a heavy compiler stack.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Backend name -> module path. Adding a backend = one entry here and one folder.
BACKENDS = {"tvm": "ptqpasses_backends.tvm"}


def get_backend(name: str = "tvm") -> ModuleType:
    """Import and return the backend module called ``name``."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def named_targets(backend: str = "tvm") -> list[str]:
    """The target names ``backend`` accepts (e.g. ``host``, ``x86-avx512-vnni``)."""
    return sorted(get_backend(backend).TARGETS)
