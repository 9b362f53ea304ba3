"""A typed use of every public name; ``mypy --strict`` must accept it (see test_runtime.py)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

import cylsm


def train_step(logits: npt.NDArray[np.float32], labels: npt.NDArray[np.intp]) -> float:
    y = cylsm.log_softmax(logits, axis=-1)
    loss = -float(np.take_along_axis(y, labels[:, None], axis=-1).mean())
    grad = np.zeros_like(y)
    np.put_along_axis(grad, labels[:, None], -1.0 / len(labels), axis=-1)
    dx = cylsm.log_softmax_backward(grad, y, axis=-1)
    p = cylsm.softmax(logits, axis=-1, where=np.ones(logits.shape, dtype=bool))
    dp = cylsm.softmax_backward(np.ones_like(p), p)
    lse = cylsm.logsumexp(logits, axis=1, keepdims=True, dtype=np.float64)
    value, sign = cylsm.logsumexp(logits, axis=None, b=np.ones(logits.shape[-1]), return_sign=True)
    dl = cylsm.logsumexp_backward(np.ones(lse.shape), logits, axis=1, keepdims=True)
    out = np.empty_like(logits)
    cylsm.log_softmax(logits, out=out)
    assert cylsm.backend in ("compiled", "python")
    cylsm.show_config()
    return loss + float(np.sum(dx) + np.sum(dp) + np.sum(dl) + value * sign) + len(cylsm.__version__)
