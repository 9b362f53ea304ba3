"""Benchmarks of cylsm against the implementations a user would otherwise pick.

``python -m cylsm`` runs a short version; this module holds the timing method and the peers.
Method: every candidate is checked against a float64 reference first, then all candidates are
timed interleaved in rounds (the machine may be shared and noisy) and the best time is kept;
only ratios measured in the same run are compared.
"""
from __future__ import annotations

import importlib
import time
from typing import Any, Callable, Dict, List

import numpy as np


Candidate = Callable[[], object]


def _optional(module: str) -> Any:
    """An optional peer package, or None when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _numpy_log_softmax(x: np.ndarray) -> Any:
    """The textbook max-shift formula."""
    m = x.max(axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def _numpy_softmax(x: np.ndarray) -> Any:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _numpy_logsumexp(x: np.ndarray) -> Any:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def _cylsm_logsumexp(x: np.ndarray) -> Any:
    import cylsm

    return cylsm.logsumexp(x, axis=-1)


def peers(op: str, x: np.ndarray) -> Dict[str, Candidate]:
    """The available implementations of ``op`` over the last axis of ``x``, cylsm first."""
    import cylsm

    ops: Dict[str, Callable[[np.ndarray], Any]] = {
        "log_softmax": cylsm.log_softmax, "softmax": cylsm.softmax, "logsumexp": _cylsm_logsumexp,
    }
    textbooks: Dict[str, Callable[[np.ndarray], Any]] = {
        "log_softmax": _numpy_log_softmax, "softmax": _numpy_softmax, "logsumexp": _numpy_logsumexp,
    }
    ours, textbook = ops[op], textbooks[op]
    found: Dict[str, Candidate] = {"cylsm": lambda: ours(x), "numpy": lambda: textbook(x)}
    sp = _optional("scipy.special")
    if sp is not None:
        f = getattr(sp, op)
        found["scipy"] = lambda: f(x, axis=-1)
    torch = _optional("torch")
    if torch is not None:
        t = torch.from_numpy(x)
        tf = getattr(torch, op)
        found["torch"] = lambda: tf(t, -1)
    jax = _optional("jax")
    if jax is not None:
        jax.config.update("jax_enable_x64", True)
        jnn = importlib.import_module("jax.nn")
        jf = jax.jit(lambda a: getattr(jnn, op)(a, axis=-1))
        xj = jax.numpy.asarray(x)
        jf(xj).block_until_ready()            # compile outside the timing
        found["jax"] = lambda: jf(xj).block_until_ready()
    return found


def time_interleaved(cands: Dict[str, Candidate], rounds: int = 7,
                     min_time: float = 0.01) -> Dict[str, float]:
    """Best seconds per call of each candidate, timed in interleaved rounds."""
    reps: Dict[str, int] = {}
    for name, f in cands.items():          # warm up, and pick repetitions per round
        f()
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, int(min_time / dt))
    best = {name: float("inf") for name in cands}
    for _ in range(rounds):
        for name, f in cands.items():
            n = reps[name]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


def short_benchmark(print_fn: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """A few shapes and ops against the installed peers; returns the rows it printed."""
    rng = np.random.default_rng(0)
    rows = []
    shapes = [(1, 10), (4096, 1024), (512, 32000)]
    print_fn(f"{'op':<12} {'dtype':<8} {'shape':<14} " + "time per call (best), ratio to cylsm")
    for dtype in (np.float32, np.float64):
        for shape in shapes:
            x = rng.standard_normal(shape).astype(dtype)
            for op in ("log_softmax", "softmax", "logsumexp"):
                cands = peers(op, x)
                ref = np.asarray(cands["numpy"](), dtype=np.float64)
                for name, f in cands.items():
                    got = np.asarray(f(), dtype=np.float64)
                    tol = 1e-5 if dtype == np.float32 else 1e-12
                    if not np.allclose(got, ref, rtol=tol, atol=tol):
                        raise AssertionError(f"{name} {op} {shape} disagrees with the reference")
                best = time_interleaved(cands, rounds=5)
                ours = best["cylsm"]
                cells = "  ".join(
                    f"{n} {_fmt(t)}" + ("" if n == "cylsm" else f" ({t / ours:.1f}x)")
                    for n, t in best.items()
                )
                print_fn(f"{op:<12} {np.dtype(dtype).name:<8} {str(shape):<14} {cells}")
                rows.append({"op": op, "dtype": np.dtype(dtype).name, "shape": shape, **best})
    return rows


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    return f"{seconds * 1e3:.2f}ms"


__all__ = ["peers", "short_benchmark", "time_interleaved"]
