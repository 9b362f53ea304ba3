"""Which implementation backs the public API: decided once, at import.

``CYLSM_NO_EXTENSIONS`` (any non-empty value) forces the pure-Python backend.  Otherwise the
compiled kernels are used when they import, and the Python backend when they do not.  The
kernels exist once per CPU level (the same source built with different -march flags); the best
level this CPU supports is taken, and ``CYLSM_CPU`` (``baseline``, ``v3`` or ``v4``) caps it.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

LEVELS = {"baseline": 0, "v3": 3, "v4": 4}     # module suffix -> cpu_level() value


def _importable_levels() -> list[str]:
    """The compiled levels that import and that this CPU can run, best first."""
    try:
        base = importlib.import_module("cylsm._kernels_baseline")
    except ImportError:
        return []
    supported = base.cpu_level()
    found = []
    for level, rank in sorted(LEVELS.items(), key=lambda kv: -kv[1]):
        if rank <= supported:
            try:
                importlib.import_module(f"cylsm._kernels_{level}")
            except ImportError:
                continue
            found.append(level)
    return found


COMPILED_NAMES = tuple(f"compiled-{level}" for level in _importable_levels())


def load(name: str) -> ModuleType:
    """The kernel module of backend ``name``: "python", "compiled" (the best level allowed) or
    "compiled-<level>"; ImportError when it cannot be used here."""
    if name == "python":
        return importlib.import_module("cylsm._python")
    if name == "compiled":
        allowed = [f"compiled-{lv}" for lv in _allowed_levels()]
        if not allowed:
            raise ImportError(
                "cylsm's compiled kernels are not available (not built, or no level this CPU "
                f"can run within CYLSM_CPU={os.environ.get('CYLSM_CPU', '')!r})"
            )
        return load(allowed[0])
    level = name[len("compiled-"):] if name.startswith("compiled-") else None
    if level not in LEVELS:
        raise ValueError(
            f"unknown cylsm backend {name!r}; expected 'python', 'compiled' or one of "
            f"{[f'compiled-{lv}' for lv in LEVELS]}"
        )
    if name not in COMPILED_NAMES:
        raise ImportError(f"cylsm backend {name!r} is not built or this CPU cannot run it")
    return importlib.import_module(f"cylsm._kernels_{level}")


def _allowed_levels() -> list[str]:
    cap = os.environ.get("CYLSM_CPU", "").strip().lower()
    if cap and cap not in LEVELS:
        raise ValueError(f"CYLSM_CPU={cap!r} is not a CPU level; expected one of {list(LEVELS)}")
    return [n.split("-", 1)[1] for n in COMPILED_NAMES if not cap or LEVELS[n.split("-", 1)[1]] <= LEVELS[cap]]


def choose() -> ModuleType:
    if os.environ.get("CYLSM_NO_EXTENSIONS"):
        return load("python")
    try:
        return load("compiled")
    except ImportError:
        return load("python")
