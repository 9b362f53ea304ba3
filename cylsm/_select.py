"""Which implementation backs the public API: decided once, at import.

``CYLSM_NO_EXTENSIONS`` (any non-empty value) forces the pure-Python backend; otherwise the
compiled kernels are used when they import, and the Python backend when they do not.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

COMPILED_NAMES = ("compiled",)
_MODULES = {"compiled": "cylsm._kernels", "python": "cylsm._python"}


def load(name: str) -> ModuleType:
    """The kernel module of backend ``name`` ("compiled" or "python"); ImportError if absent."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown cylsm backend {name!r}; expected one of {sorted(_MODULES)}") from None
    return importlib.import_module(module)


def choose() -> ModuleType:
    if os.environ.get("CYLSM_NO_EXTENSIONS"):
        return load("python")
    try:
        return load("compiled")
    except ImportError:
        return load("python")
