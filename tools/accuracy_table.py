"""Accuracy of cylsm and its peers in ulps, against the references of the test suite.

    python tools/accuracy_table.py            # markdown table on stdout

References: float64 for float32 inputs, 80-bit long double for float64 inputs (tests/_reference.py).
log_softmax and softmax_backward: the worst relative error over every element, in ulps (the largest
log_softmax element included); logsumexp: the worst |error| in units of eps * max(1, |result|) (the
SPEC bound is 1). softmax_backward takes every candidate the same p (cylsm.softmax of the data) and
gradient (standard normal); scipy has none; its float64 reference sums exactly (long double's sum
is not exact enough where some g is close to sum(g * p)).
Peers are measured when installed: scipy.special, torch (CPU), jax (jit, x64).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _reference import (  # noqa: E402
    lse_err, ref_log_softmax, ref_logsumexp, ref_softmax_backward, ref_softmax_backward_rows,
    ulp_err)

import cylsm  # noqa: E402


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def data(kind: str, rows: int, n: int, dtype, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    if kind == "normal":
        x = g.standard_normal((rows, n)) * 3
    else:  # "peaked": one clear maximum, the rest about 40 below it (the largest output ~ -1e-17)
        x = g.standard_normal((rows, n)) * 2 - 39.3
        idx = g.integers(0, n, rows)
        x[np.arange(rows), idx] = 0.7 + g.random(rows) * 0.01
    return x.astype(dtype)


def peers() -> dict:
    """Each candidate's (log_softmax, logsumexp, softmax_backward or None), over the last axis."""
    found = {"cylsm": (cylsm.log_softmax, lambda x: cylsm.logsumexp(x, axis=-1),
                       cylsm.softmax_backward)}
    sp = optional("scipy.special")
    if sp is not None:
        found["scipy"] = (lambda x: sp.log_softmax(x, axis=-1), lambda x: sp.logsumexp(x, axis=-1),
                          None)
    torch = optional("torch")
    if torch is not None:
        found["torch"] = (lambda x: torch.log_softmax(torch.from_numpy(x), -1).numpy(),
                          lambda x: torch.logsumexp(torch.from_numpy(x), -1).numpy(),
                          lambda g, p: torch._softmax_backward_data(
                              torch.from_numpy(g), torch.from_numpy(p), -1,
                              torch.from_numpy(p).dtype).numpy())
    jax = optional("jax")
    if jax is not None:
        jax.config.update("jax_enable_x64", True)
        jnn = importlib.import_module("jax.nn")
        ls = jax.jit(lambda a: jnn.log_softmax(a, axis=-1))
        lse = jax.jit(lambda a: jnn.logsumexp(a, axis=-1))
        jnp = importlib.import_module("jax.numpy")
        # jax.nn.softmax's derivative rule, y * (g - sum(y * g)), at the same p
        sm_bwd = jax.jit(lambda g, p: p * (g - jnp.sum(g * p, axis=-1, keepdims=True)))
        found["jax"] = (lambda x: np.asarray(ls(x)), lambda x: np.asarray(lse(x)),
                        lambda g, p: np.asarray(sm_bwd(g, p)))
    return found


def main() -> None:
    cands = peers()
    names = list(cands)
    print("| function | dtype | data | n | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for fn in ("log_softmax", "logsumexp", "softmax_backward"):
        for dtype in (np.float32, np.float64):
            for kind in ("normal", "peaked") if fn != "softmax_backward" else ("normal",):
                for n in (10, 1000, 1_000_000):
                    rows = 1 if n == 1_000_000 else 64
                    x = data(kind, rows, n, dtype, seed=n + len(kind))
                    if fn == "log_softmax":
                        ref = ref_log_softmax(x, axis=-1)
                        errs = [float(ulp_err(cands[k][0](x), ref, dtype).max()) for k in names]
                    elif fn == "logsumexp":
                        ref = ref_logsumexp(x, axis=-1)
                        errs = [float(lse_err(cands[k][1](x), ref, dtype).max()) for k in names]
                    else:
                        p = cylsm.softmax(x)
                        g = np.random.default_rng(n).standard_normal(x.shape).astype(dtype)
                        ref = (ref_softmax_backward_rows(g, p) if dtype == np.float64 else
                               ref_softmax_backward(g, p))
                        errs = [float(ulp_err(cands[k][2](g, p), ref, dtype).max())
                                if cands[k][2] is not None else None for k in names]
                    cells = " | ".join("-" if e is None else f"{e:.3g}" for e in errs)
                    print(f"| {fn} | {np.dtype(dtype).name} | {kind} | {n:,} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
