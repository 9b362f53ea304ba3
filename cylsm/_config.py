"""show_config(): what this installation of cylsm is running on."""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np

from . import _api, _select
from ._version import __version__


def config() -> dict[str, Any]:
    """The facts show_config() prints, as a dict."""
    K = _api._K
    info: dict[str, Any] = {
        "cylsm": __version__,
        "backend": "python" if K.NAME == "python" else "compiled",
        "kernels": K.__name__,
        "CYLSM_NO_EXTENSIONS": os.environ.get("CYLSM_NO_EXTENSIONS", ""),
        "CYLSM_CPU": os.environ.get("CYLSM_CPU", ""),
        "cpu levels available": ", ".join(n.split("-", 1)[1] for n in _select.COMPILED_NAMES)
        or "none",
        "openmp": K.openmp_enabled(),
        "threads": K.max_threads(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if K.NAME != "python":
        info.update(K.build_info())
        cache = K.buffer_cache()
        info["buffer cache"] = (
            f"keeps freed outputs of {cache['min'] >> 20} MiB or more for reuse, up to "
            f"{cache['limit'] / 2**20:g} MiB (CYLSM_BUFFER_CACHE_MB); holds {cache['count']} "
            f"({cache['held'] / 2**20:.1f} MiB)")
    else:
        try:
            _select.load("compiled")
            info["compiled"] = "importable (not in use)"
        except ImportError as exc:
            info["compiled"] = f"not importable: {exc}"
    return info


def show_config() -> None:
    """Print the backend, OpenMP on/off and thread count, compiler and library versions."""
    info = config()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
