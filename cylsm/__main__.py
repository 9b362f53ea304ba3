"""python -m cylsm: configuration, a self-check of the active backend, and a short benchmark.

Exit status 0 when the self-check passes, 1 when it does not.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from . import _api, _config, _python
from .bench import short_benchmark


def _cases() -> list[tuple[str, np.ndarray, int | None]]:
    rng = np.random.default_rng(12345)
    inf, nan = np.inf, np.nan
    cases: list[tuple[str, np.ndarray, int | None]] = []
    for dtype in (np.float32, np.float64):
        cases += [
            ("random rows", rng.standard_normal((37, 301)).astype(dtype), -1),
            ("random columns", rng.standard_normal((301, 37)).astype(dtype), 0),
            ("one long row", (rng.standard_normal((1, 100_003)) * 30).astype(dtype), -1),
            ("special rows", np.array(
                [[-inf, -inf, -inf, -inf], [1, nan, 2, 3], [1, inf, 2, inf], [1, -inf, 2, 3],
                 [3e38, 3e38, -inf, -inf], [0, -40, -inf, -inf]], dtype), -1),
        ]
    return cases


def self_check(verbose: bool = True) -> bool:
    """Compare the active backend with the pure-Python one on random and special inputs."""
    active = _api._K
    if active is _python:
        print("self-check: the Python backend is active; nothing to compare against.")
        return True
    ok = True
    for name, x, axis in _cases():
        for fn in ("log_softmax", "softmax", "logsumexp", "log_softmax_backward"):
            results = []
            for kernels in (active, _python):
                _api._K = kernels
                try:
                    if fn == "logsumexp":
                        results.append(np.asarray(_api.logsumexp(x, axis=axis)))
                    elif fn == "log_softmax_backward":
                        y = _api.log_softmax(x, axis=axis)
                        g = (1.5 + np.cos(np.arange(x.size))).reshape(x.shape).astype(x.dtype)
                        results.append(_api.log_softmax_backward(g, y, axis=axis))
                    else:
                        results.append(getattr(_api, fn)(x, axis=axis))
                finally:
                    _api._K = active
            a, b = results
            tol = 8 * np.finfo(x.dtype).eps
            scale = float(np.max(np.abs(b), initial=1.0, where=np.isfinite(b)))
            good = a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True)
            ok &= good
            if verbose or not good:
                print(f"  {'ok  ' if good else 'FAIL'} {fn:<22} {x.dtype.name:<8} {name}")
    print(f"self-check: {'passed' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cylsm", description=__doc__)
    parser.add_argument("--no-bench", action="store_true", help="skip the short benchmark")
    args = parser.parse_args(argv)
    print("== configuration")
    _config.show_config()
    print("\n== self-check (active backend against the pure-Python backend)")
    ok = self_check(verbose=False)
    if not args.no_bench:
        print("\n== short benchmark (best of interleaved rounds; ratio = peer time / cylsm time)")
        short_benchmark()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
