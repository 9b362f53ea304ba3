"""The pure-NumPy backend: the same kernels as ``src/_kernels.pxi``, with the same signatures.

This module is the readable statement of the algorithms.  Every kernel takes C-contiguous
arrays laid out as (outer, n, inner) and reduces over axis 1; ``cylsm._api`` has validated and
normalised everything before.  float32 is computed in float64 (as the compiled kernels do);
float64 and longdouble are computed in their own precision.

For a line x with maximum M (NaN ignored), let t be the sum of exp(x_i - M) over every element
but the first maximal one (which contributes exactly 1).  Then

    logsumexp(x)   = M + log1p(t)              (log1p keeps results near 0 accurate)
    log_softmax(x) = (x - M) - log1p(t)        (accurate for the largest element too)
    softmax(x)     = exp(x - M) / (1 + t)

Lines whose maximum is +-inf (or that hold only NaN and -inf) take L = NaN if they contain a
NaN, else 0, and S = NaN: the same formulas then give the special values of SPEC section 3.
"""
from __future__ import annotations

from typing import Any

import numpy as np

NAME = "python"


OPS = {"log_softmax": 0, "softmax": 1, "logsumexp": 2, "logsumexp_backward": 3,
       "log_softmax_backward": 4, "softmax_backward": 5}


def fast(op: int, x: np.ndarray, all_axes: bool = False, out: np.ndarray | None = None,
         g: np.ndarray | None = None, axis: int = -1) -> None:
    """The compiled backends' shortcut for the common call; this backend always declines."""
    return None


def openmp_enabled() -> bool:
    return False


def max_threads() -> int:
    return 1


def empty(shape: Any, dtype: Any) -> np.ndarray:
    """A new array for a result (the compiled backends reuse the memory of large ones)."""
    return np.empty(shape, dtype)


def _compute(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if a.dtype == np.float32 else a


def _two_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a - b and its rounding error: a - b == d + lo exactly (Knuth's TwoSum)."""
    d = a - b
    bb = d - a
    return d, (a - (d - bb)) - (b + bb)


def _exp_diff(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """exp(a - b), or exp((a - b) - c), with the differences formed exactly: the rounding of
    a - b alone would cost up to |a - b|/2 ulp of the result."""
    d, lo = _two_diff(a, b)
    if c is not None:
        d, lo2 = _two_diff(d, c)
        lo = lo + lo2
    e = np.exp(d)
    lo = np.where(np.isfinite(lo), lo, 0)
    result: np.ndarray = np.where(lo == 0, e, e + e * lo)
    return result


_WIDE = np.longdouble if np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant else None


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 1, keepdims: pairwise, each addition's rounding error (TwoSum) carried
    along, so that the result is as good as in twice the precision, whatever NumPy's own
    summation does (NumPy 1.25 summed 254 equal terms 4.8 ulp off in log_softmax).  Where the
    plain sum is inf or NaN, that is the result."""
    s, c = _sum_parts(a)
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(s), s + c, s)


def _sum_parts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """_sum's plain pairwise sum and its carried rounding errors, apart."""
    s = np.moveaxis(a, 1, -1)
    if s.shape[-1] == 0:
        zero = np.zeros(a.shape[:1] + (1,) + a.shape[2:], a.dtype)
        return zero, zero
    c = np.zeros_like(s)
    with np.errstate(all="ignore"):
        while s.shape[-1] > 1:
            if s.shape[-1] % 2:
                pad = [(0, 0)] * (s.ndim - 1) + [(0, 1)]
                s, c = np.pad(s, pad), np.pad(c, pad)
            h1, h2 = s[..., 0::2], s[..., 1::2]
            s = h1 + h2
            bb = s - h1
            c = (c[..., 0::2] + c[..., 1::2]) + ((h1 - (s - bb)) + (h2 - bb))
    return s[..., 0][:, None, :], c[..., 0][:, None, :]


def _two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a * b and its rounding error, a * b == h + e exactly (Dekker: a and b split in halves of
    26 bits, whose products are exact; NumPy does not fuse multiply-adds).  float64 only; e is
    NaN for |a| or |b| >= 2^996."""
    h = a * b
    ca, cb = 134217729.0 * a, 134217729.0 * b       # 2^27 + 1
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return h, ((ah * bh - h) + ah * bl + al * bh) + al * bl


def _dot2(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(a * b) over axis 1 (keepdims) in twice the precision, as the compiled kernels'
    dot2_add: the rounded sum and what it leaves out; where that is not finite, the plain sum
    and 0 (float64 softmax_backward: p * (g - sum) where g is close to the sum)."""
    h, e = _two_prod(a, b)
    s, c = _sum_parts(h)
    c = c + _sum(e)
    d = s + c
    ok = np.isfinite(c)
    return np.where(ok, d, s), np.where(ok & np.isfinite(d), c - (d - s), 0)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """M, L, S of each line, with keepdims shape (outer, 1, inner), and t: the sum of
    exp(x - M) over all but one maximal element (L = log1p(t) where M is finite)."""
    with np.errstate(all="ignore"):
        M = np.fmax.reduce(x, axis=1, keepdims=True)
        finite = np.isfinite(M)
        e = _exp_diff(x, np.where(finite, M, 0))
        first_max = np.argmax(x == M, axis=1)[:, None, :]
        np.put_along_axis(e, first_max, 0, axis=1)
        t = _sum(e)
        has_nan = np.isnan(x).any(axis=1, keepdims=True)
        L = np.where(finite, np.log1p(t), np.where(has_nan, np.nan, 0))
        S = np.where(finite, 1 + t, np.nan)
    return M, L, S, t


def _masked(x: np.ndarray, where: np.ndarray | None) -> np.ndarray:
    """x with -inf at the entries the mask leaves out (exp(-inf) takes no part in a sum)."""
    return x if where is None else np.where(where != 0, x, -np.inf)


def _put(out: np.ndarray, res: np.ndarray, where: np.ndarray | None, fill: float) -> None:
    """out = res, and fill where the mask leaves an entry out."""
    np.copyto(out, res if where is None else np.where(where != 0, res, fill), casting="unsafe")


def log_softmax(x: np.ndarray, out: np.ndarray, where: np.ndarray | None = None) -> None:
    xc = _masked(_compute(x), where)
    M, L, _, _ = _stats(xc)
    with np.errstate(all="ignore"):
        _put(out, (xc - M) - L, where, -np.inf)


def softmax(x: np.ndarray, out: np.ndarray, where: np.ndarray | None = None) -> None:
    xc = _masked(_compute(x), where)
    M, _, S, _ = _stats(xc)
    with np.errstate(all="ignore"):
        _put(out, _exp_diff(xc, M) / S, where, 0.0)


def logsumexp(x: np.ndarray, out: np.ndarray, where: np.ndarray | None = None) -> None:
    M, L, _, t = _stats(_masked(_compute(x), where))
    with np.errstate(all="ignore"):
        r = M + L
        if M.dtype == np.float64 and _WIDE is not None:
            # M + log1p(t) rounded once: where M < 0 < L cancel, the rounding of L alone can
            # cost more than SPEC's 1 eps for |result| < 1 (the compiled kernels carry L in
            # two doubles).  Without a wider long double (Windows, Apple arm64) it stays M + L.
            wide = M.astype(_WIDE) + np.log1p(t.astype(_WIDE))
            r = np.where(np.isfinite(r), wide.astype(np.float64), r)
        np.copyto(out, r[:, 0, :], casting="unsafe")


def logsumexp_backward(g: np.ndarray, x: np.ndarray, out: np.ndarray,
                       where: np.ndarray | None = None) -> None:
    xc = _masked(_compute(x), where)
    M, L, _, _ = _stats(xc)
    gg = _compute(g)[:, None, :]
    dead = M == -np.inf                      # logsumexp is -inf: the gradient is exactly 0
    with np.errstate(all="ignore"):
        gg = np.where(dead, 0, gg)
        M = np.where(dead, 0, M)
        _put(out, gg * _exp_diff(xc, M, L), where, 0.0)


def log_softmax_backward(g: np.ndarray, y: np.ndarray, out: np.ndarray,
                         where: np.ndarray | None = None) -> None:
    gc, yc = _compute(g), _compute(y)
    with np.errstate(all="ignore"):
        G = _sum(gc if where is None else np.where(where != 0, gc, 0))
        res = gc - np.exp(yc) * G
        _put(out, res, where, 0.0)


def softmax_backward(g: np.ndarray, p: np.ndarray, out: np.ndarray,
                     where: np.ndarray | None = None) -> None:
    gc, pc = _compute(g), _compute(p)
    with np.errstate(all="ignore"):
        gm, pm = (gc, pc) if where is None else (np.where(where != 0, gc, 0),
                                                 np.where(where != 0, pc, 0))
        if g.dtype == np.float64:       # (float32's products are exact in float64)
            D, Dl = _dot2(gm, pm)
            res = pc * ((gc - D) - Dl)
        else:
            res = pc * (gc - _sum(gm * pm))
        _put(out, res, where, 0.0)


def _weighted_parts(x: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M: max of x over the entries with b != 0 (-inf if none, NaN if one of them is NaN);
    mw: the sum of the weights of the maximal entries; rest: sum of b exp(x - M) over the others
    (0 when M is not finite).  As scipy, all maximal entries are taken out of the sum."""
    with np.errstate(all="ignore"):
        active = b != 0
        xa = np.where(active, x, -np.inf)
        M = np.fmax.reduce(xa, axis=1, keepdims=True)
        M = np.where(np.isnan(xa).any(axis=1, keepdims=True), np.nan, M)
        is_max = active & (xa == M)
        mw = _sum(np.where(is_max, b, 0))
        finite = np.isfinite(M)
        terms = b * _exp_diff(xa, np.where(finite, M, 0))
        rest = _sum(np.where(active & ~is_max & finite, terms, 0))
    return M, mw, rest


def _weights(x: np.ndarray, b: np.ndarray | None, where: np.ndarray | None) -> np.ndarray:
    """The weights of the compiled kernels' b (None: 1) and mask (None: all; 0 masks out)."""
    bc = np.ones_like(x) if b is None else np.broadcast_to(_compute(b), x.shape)
    return bc if where is None else np.where(where != 0, bc, 0)


def logsumexp_weighted(
    x: np.ndarray, b: np.ndarray | None, out: np.ndarray, sign: np.ndarray | None = None,
    where: np.ndarray | None = None,
) -> None:
    xc = _compute(x)
    M, mw, rest = _weighted_parts(xc, _weights(xc, b, where))
    with np.errstate(all="ignore"):
        r = rest / np.where(mw != 0, mw, 1)
        sg = np.where(mw != 0, np.sign(1 + r) * np.sign(mw), np.sign(rest))
        r = np.where(r < -1, -r - 2, r)
        res = np.where(mw != 0, (np.log1p(r) + np.log(np.abs(mw))) + M, np.log(np.abs(rest)) + M)
        # Lines whose maximum is not finite.
        inf_ok = (mw != 0) & ~np.isnan(mw)
        res = np.where(M == np.inf, np.where(inf_ok, np.inf, np.nan), res)
        sg = np.where(M == np.inf, np.where(inf_ok, np.sign(mw), np.nan), sg)
        res = np.where(M == -np.inf, -np.inf, res)
        sg = np.where(M == -np.inf, 0, sg)
        res = np.where(np.isnan(M), np.nan, res)
        sg = np.where(np.isnan(M), np.nan, sg)
        if sign is None:
            res = np.where(sg < 0, np.nan, res)
        else:
            np.copyto(sign, sg[:, 0, :], casting="unsafe")
        np.copyto(out, res[:, 0, :], casting="unsafe")


def logsumexp_backward_weighted(
    g: np.ndarray, x: np.ndarray, b: np.ndarray | None, out: np.ndarray,
    where: np.ndarray | None = None,
) -> None:
    xc = _compute(x)
    bc = _weights(xc, b, where)
    M, mw, rest = _weighted_parts(xc, bc)
    with np.errstate(all="ignore"):
        total = mw + rest
        dead = ~np.isnan(M) & ((M == -np.inf) | (total == 0))    # a NaN line stays NaN
        M = np.where(M == np.inf, np.nan, M)
        scale = np.where(dead, 0, _compute(g)[:, None, :] / np.where(dead, 1, total))
        grad = scale * bc * _exp_diff(xc, np.where(dead, 0, M))
        np.copyto(out, np.where(bc == 0, 0, grad), casting="unsafe")
