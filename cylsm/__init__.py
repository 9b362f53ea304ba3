"""cylsm: fast, exact log_softmax, softmax and logsumexp (forward and backward) for NumPy arrays.

The implementation is chosen once, at import: the compiled kernels when they import, the
pure-NumPy backend otherwise or when the environment variable ``CYLSM_NO_EXTENSIONS`` is set.
``cylsm.backend`` says which one is active; ``cylsm.show_config()`` prints the details.
"""
from __future__ import annotations

from ._api import (
    log_softmax,
    log_softmax_backward,
    logsumexp,
    logsumexp_backward,
    softmax,
    softmax_backward,
)
from ._api import _K
from ._config import show_config
from ._version import __version__

backend: str = "python" if _K.NAME == "python" else "compiled"

__all__ = [
    "__version__",
    "backend",
    "log_softmax",
    "log_softmax_backward",
    "logsumexp",
    "logsumexp_backward",
    "show_config",
    "softmax",
    "softmax_backward",
]
