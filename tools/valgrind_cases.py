"""The focused subset run under valgrind memcheck by tools/valgrind.sh.

Every loop shape of the kernels, on the compiled levels named on the command line, compared
with the Python backend: short rows (transposed tiles, a partial last tile), rows with partial
lane groups, one long row shared by the threads (superblocks), column blocks with a partial
last block, softmax's kept exps, the shortcut with and without ``out=``, in place, the backward
kernels, weights (``b=``, ``return_sign``), masks, special values, empty and 0-d inputs.  Small
enough for memcheck (each call is ~50x slower there); an uninitialised or out-of-bounds read is
reported by memcheck, a wrong result by the comparison.

    python tools/valgrind_cases.py [--under-valgrind] baseline v3
"""
from __future__ import annotations

import sys

import numpy as np

import cylsm
from cylsm import _api, _select

SUPER = 131072


def inputs(shape: tuple[int, ...], dtype: type, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(rng.standard_normal(shape) * 3).astype(dtype)
    if x.size > 8:
        flat = x.reshape(-1)
        flat[1] = -np.inf
        flat[-2] = x.dtype.type(40)
    return x


def close(a: object, b: object, dtype: type, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    finite = np.abs(b[np.isfinite(b)])
    atol = rtol * float(finite.max()) if finite.size else 0.0   # cancellation in gradients
    if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        bad = ~np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        raise AssertionError(f"{what}: {int(bad.sum())} entries differ from the Python backend")


def calls(x: np.ndarray, axis: int, rng: np.random.Generator) -> dict[str, object]:
    """Every function on x over axis (forward, backward, weighted, masked, out=, in place)."""
    lsm = cylsm
    res: dict[str, object] = {}
    y = res["log_softmax"] = lsm.log_softmax(x, axis=axis)
    p = res["softmax"] = lsm.softmax(x, axis=axis)
    r = res["logsumexp"] = lsm.logsumexp(x, axis=axis)
    res["logsumexp all"] = lsm.logsumexp(x)
    g = rng.standard_normal(x.shape).astype(x.dtype)
    res["log_softmax_backward"] = lsm.log_softmax_backward(g, y, axis=axis)
    res["softmax_backward"] = lsm.softmax_backward(g, p, axis=axis)
    gr = np.ones_like(np.asarray(r))
    res["logsumexp_backward"] = lsm.logsumexp_backward(gr, x, axis=axis)
    b = (rng.random(x.shape) - 0.3).astype(x.dtype)
    res["logsumexp b"] = lsm.logsumexp(x, axis=axis, b=b, return_sign=True)
    res["logsumexp_backward b"] = lsm.logsumexp_backward(gr, x, axis=axis, b=b)
    mask = rng.random(x.shape) > 0.2
    res["softmax where"] = lsm.softmax(x, axis=axis, where=mask)
    out = np.empty_like(x)
    res["log_softmax out"] = lsm.log_softmax(x, axis=axis, out=out).copy()
    inplace = x.copy()
    lsm.softmax(inplace, axis=axis, out=inplace)
    res["softmax in place"] = inplace
    return res


def check_under_valgrind() -> None:
    """valgrind hides AVX-512 from CPUID: neither NumPy nor cylsm may use it here."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:   # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    avx512 = [k for k, v in features.items() if v and k.startswith("AVX512")]
    print(f"NumPy AVX-512 features: {avx512 or 'none'}; cylsm levels: {_select.COMPILED_NAMES}")
    assert not avx512 and "compiled-v4" not in _select.COMPILED_NAMES


def main(levels: list[str]) -> int:
    if "--under-valgrind" in levels:
        levels.remove("--under-valgrind")
        check_under_valgrind()
    shapes = [
        ((3, 5), -1), ((37, 100), -1), ((16, 255), -1),          # short rows: tiles, partial
        ((5, 256), -1), ((7, 1000), -1), ((3, 2053), -1),        # rows, partial lane groups
        ((1, 2 * SUPER + 37), -1),                               # one row, superblocks
        ((2, 9000), -1),                                         # softmax: kept exps
        ((300, 70), 0), ((50, 3, 130), 1),                       # columns: JB blocks, partial
        ((1,), -1), ((), -1), ((4, 0), -1), ((0, 3), 0),         # 1 element, 0-d, empty
    ]
    specials = [np.array([[-np.inf, -np.inf], [np.nan, 1.0], [np.inf, 0.0], [np.inf, np.inf],
                          [3e38, 3e38]])]
    checked = 0
    for level in levels:
        kernels = _select.load(f"compiled-{level}")
        for dtype in (np.float32, np.float64):
            for shape, axis in shapes:
                rng = np.random.default_rng(len(shape) + sum(shape))
                x = inputs(shape, dtype, rng)
                if x.ndim == 0 and axis == -1:
                    axis = 0
                _api._K = kernels
                ours = calls(x, axis if x.ndim else None, np.random.default_rng(1))
                _api._K = _select.load("python")
                ref = calls(x, axis if x.ndim else None, np.random.default_rng(1))
                for k in ours:
                    close(ours[k], ref[k], dtype, f"{level} {dtype.__name__} {shape} {k}")
                    checked += 1
            for s in specials:
                x = s.astype(dtype)
                _api._K = kernels
                ours = calls(x, -1, np.random.default_rng(2))
                _api._K = _select.load("python")
                ref = calls(x, -1, np.random.default_rng(2))
                for k in ours:
                    close(ours[k], ref[k], dtype, f"{level} {dtype.__name__} specials {k}")
                    checked += 1
        print(f"compiled-{level}: threads {kernels.max_threads()}, OK")
    print(f"{checked} results compared with the Python backend")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["baseline"]))
