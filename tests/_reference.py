"""Shared helpers for the cylsm tests: high-precision references and ulp measurements.

The references work on rows: the reduced axes are moved to the end and flattened, every row is
shifted by its maximum (exact for float64 data in long double, and for float32 data in float64),
and the sum is split into the maximum's own term (1) plus the rest, so that results near zero are
formed with ``log1p`` and stay accurate to the reference precision.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

LD = np.longdouble
INF = np.inf
NAN = np.nan

FLOATS = (np.float32, np.float64)


def higher(dtype: Any) -> type:
    """Reference precision for results of ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float16), np.dtype(np.float32)):
        return np.float64
    return LD


def eps(dtype: Any) -> float:
    return float(np.finfo(dtype).eps)


def result_dtype(dtype: Any) -> np.dtype:
    """The dtype cylsm returns for an input of ``dtype`` (SPEC section 2)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype
    return np.dtype(np.float64)


# --------------------------------------------------------------------------------------------
# axis handling


def norm_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    """Normalise ``axis`` (None, int or tuple) to a sorted tuple of non-negative axes."""
    if ndim == 0:
        return ()
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    return tuple(sorted(int(a) % ndim for a in axis))


def to_rows(a: np.ndarray, axis: Any) -> tuple[np.ndarray, tuple[Any, ...]]:
    """View ``a`` as (rows, n) with the reduced axes last; also return what undoes it."""
    a = np.asarray(a)
    axes = norm_axes(a.ndim, axis)
    keep = [i for i in range(a.ndim) if i not in axes]
    order = keep + list(axes)
    t = np.transpose(a, order)
    nrows = math.prod(a.shape[i] for i in keep)
    n = math.prod(a.shape[i] for i in axes)
    info = (a.shape, keep, tuple(axes), order)
    return np.ascontiguousarray(t).reshape(nrows, n), info


def from_rows(r: np.ndarray, info: tuple[Any, ...]) -> np.ndarray:
    """Undo ``to_rows`` for an elementwise result of shape (rows, n)."""
    shape, keep, axes, order = info
    t = r.reshape([shape[i] for i in keep] + [shape[i] for i in axes])
    return np.transpose(t, np.argsort(order))


def reduced_shape(shape: Sequence[int], axis: Any, keepdims: bool) -> tuple[int, ...]:
    axes = norm_axes(len(shape), axis)
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


# --------------------------------------------------------------------------------------------
# row kernels in high precision (finite values and -inf; masked entries excluded)


def _row_parts(r: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (d, rest, m): d = x - max (masked -> -inf), rest = sum of exp(d) without the
    maximum's own term, m = row maximum (-inf for rows with nothing to take)."""
    if mask is not None:
        r = np.where(mask, r, -INF)
    with np.errstate(all="ignore"):
        m = np.max(r, axis=1, initial=-INF)
        shift = np.where(np.isfinite(m), m, 0)
        d = r - shift[:, None]
        e = np.exp(d)
        if r.shape[1]:
            k = np.argmax(r, axis=1)
            e[np.arange(r.shape[0]), k] = 0
        rest = np.sum(e, axis=1)
    return d, rest, m


def _rows(x: Any, axis: Any, where: Any, hp: Any) -> tuple[np.ndarray, Any, Any, Any]:
    """x in the precision hp (default: the one above its result dtype) as rows, the layout
    info to undo it, the mask as rows (None without a mask) and x as an array."""
    x = np.asarray(x)
    hp = hp or higher(result_dtype(x.dtype))
    rows, info = to_rows(x.astype(hp), axis)
    mrows = None
    if where is not None:
        mrows, _ = to_rows(np.broadcast_to(where, x.shape), axis)
    return rows, info, mrows, x


def ref_logsumexp(x: Any, axis: Any = None, keepdims: bool = False, where: Any = None,
                  hp: Any = None) -> np.ndarray:
    """logsumexp in the higher precision ``hp`` (finite and -inf entries only)."""
    rows, info, mrows, x = _rows(x, axis, where, hp)
    _, rest, m = _row_parts(rows, mrows)
    with np.errstate(all="ignore"):
        res = np.where(np.isfinite(m), m + np.log1p(rest), m)
    return res.reshape(reduced_shape(x.shape, axis, keepdims))


def ref_log_softmax(x: Any, axis: Any = -1, where: Any = None, hp: Any = None) -> np.ndarray:
    rows, info, mrows, x = _rows(x, axis, where, hp)
    d, rest, m = _row_parts(rows, mrows)
    with np.errstate(all="ignore"):
        y = d - np.log1p(rest)[:, None]
    y = np.where(np.isfinite(m)[:, None], y, -INF)
    if mrows is not None:
        y = np.where(mrows, y, -INF)
    return from_rows(y, info)


def ref_softmax(x: Any, axis: Any = -1, where: Any = None, hp: Any = None) -> np.ndarray:
    rows, info, mrows, x = _rows(x, axis, where, hp)
    d, rest, m = _row_parts(rows, mrows)
    with np.errstate(all="ignore"):
        p = np.exp(d) / (1 + rest)[:, None]
    p = np.where(np.isfinite(m)[:, None], p, 0)
    if mrows is not None:
        p = np.where(mrows, p, 0)
    return from_rows(p, info)


# backward references (formulas of SPEC section 1, in high precision)


def ref_log_softmax_backward(grad: Any, y: Any, axis: Any = -1, where: Any = None,
                             hp: Any = LD) -> np.ndarray:
    g = np.asarray(grad).astype(hp)
    y = np.asarray(y).astype(hp)
    axes = norm_axes(y.ndim, axis)
    if where is None:
        where = np.ones(y.shape, bool)
    w = np.broadcast_to(where, y.shape)
    g = np.where(w, g, 0)
    s = np.sum(g, axis=axes, keepdims=True)
    with np.errstate(all="ignore"):
        r = g - np.exp(y) * s
    return np.where(w, r, 0)


def ref_softmax_backward(grad: Any, p: Any, axis: Any = -1, where: Any = None,
                         hp: Any = LD) -> np.ndarray:
    g = np.asarray(grad).astype(hp)
    p = np.asarray(p).astype(hp)
    axes = norm_axes(p.ndim, axis)
    if where is None:
        where = np.ones(p.shape, bool)
    w = np.broadcast_to(where, p.shape)
    g = np.where(w, g, 0)
    pm = np.where(w, p, 0)
    s = np.sum(g * pm, axis=axes, keepdims=True)
    return np.where(w, pm * (g - s), 0)


def ref_softmax_backward_rows(grad: np.ndarray, p: np.ndarray) -> np.ndarray:
    """softmax_backward of float64 rows (the last axis of 2-D arrays), in long double, with
    each row's sum(g * p) exact: long double's own sum is off by about 2^-64 of the terms, as
    much as an ulp of p * (g - sum) where g is within 2^-11 of the sum, so it cannot tell
    whether float64 results are within a few ulps there.  Each product is split exactly
    (Dekker) and math.fsum gives the sum rounded and its remainder."""
    assert grad.dtype == p.dtype == np.float64 and grad.ndim == 2
    out = np.empty(grad.shape, LD)
    split = 134217729.0     # 2^27 + 1
    for r in range(grad.shape[0]):
        a, b = p[r], grad[r]
        h = a * b
        ca, cb = split * a, split * b
        ah, bh = ca - (ca - a), cb - (cb - b)
        al, bl = a - ah, b - bh
        terms = np.concatenate([h, ((ah * bh - h) + ah * bl + al * bh) + al * bl])
        hi = math.fsum(terms)
        lo = math.fsum(np.append(terms, -hi))
        out[r] = a.astype(LD) * ((b.astype(LD) - LD(hi)) - LD(lo))
    return out


def ref_logsumexp_backward(grad: Any, x: Any, axis: Any = None, keepdims: bool = False,
                           b: Any = None, where: Any = None, hp: Any = None) -> np.ndarray:
    """grad * b * exp(x - lse), with x - lse formed as (x - max) - log(sum) in ``hp``."""
    x = np.asarray(x)
    hp = hp or higher(result_dtype(x.dtype))
    xh = x.astype(hp)
    bh = np.ones(x.shape, hp) if b is None else np.broadcast_to(np.asarray(b).astype(hp), x.shape)
    w = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    axes = norm_axes(x.ndim, axis)
    take = w & (bh != 0)
    with np.errstate(all="ignore"):
        xm = np.where(take, xh, -INF)
        m = np.max(xm, axis=axes, keepdims=True, initial=-INF)
        shift = np.where(np.isfinite(m), m, 0)
        s = np.sum(np.where(take, bh * np.exp(xm - shift), 0), axis=axes, keepdims=True)
        ex = np.exp((xm - shift) - np.log(s))
    g = np.asarray(grad).astype(hp)
    if not keepdims:
        g = np.expand_dims(g, axes)
    r = np.where(take, g * bh * ex, 0)
    r = np.where(np.isfinite(m), r, 0)
    return r


# --------------------------------------------------------------------------------------------
# measurements


def misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` one byte past an aligned address (a view into a byte buffer)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    m = np.ndarray(a.shape, a.dtype, buffer=raw, offset=1)
    m[...] = a
    assert not m.flags.aligned and m.flags.c_contiguous
    return m


def ulp_err(computed: Any, ref: Any, dtype: Any) -> np.ndarray:
    """|computed - ref| in ulps of ``dtype`` at the reference value.

    Equal values (including equal infinities) count 0; a NaN on either side, or infinities that
    differ, count as infinitely wrong.
    """
    dtype = np.dtype(dtype)
    hp = higher(dtype)
    c = np.asarray(computed).astype(hp)
    r = np.asarray(ref).astype(hp)
    with np.errstate(all="ignore"):
        sp = np.spacing(np.abs(r.astype(dtype))).astype(hp)
        e = np.abs(c - r) / sp
    e = np.where(c == r, 0, e)
    e = np.where(np.isnan(c) | np.isnan(r), INF, e)
    return np.asarray(e, dtype=np.float64)


def max_ulp(computed: Any, ref: Any, dtype: Any) -> float:
    e = ulp_err(computed, ref, dtype)
    return float(e.max()) if e.size else 0.0


def same_special(a: Any, b: Any) -> None:
    """NaNs at the same places, infinities equal (sign included)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ia = np.isinf(a)
    np.testing.assert_array_equal(ia, np.isinf(b))
    np.testing.assert_array_equal(a[ia], b[ia])


def assert_ulp_close(a: Any, b: Any, dtype: Any, ulps: float, rel_extra: Any = 0.0,
                     abs_extra: Any = 0.0) -> None:
    """Finite entries agree within ``ulps`` spacings of the larger magnitude (plus ``rel_extra``
    times that magnitude and ``abs_extra``); non-finite entries agree exactly."""
    dtype = np.dtype(dtype)
    hp = higher(dtype)
    a = np.asarray(a)
    b = np.asarray(b)
    same_special(a, b)
    fin = np.isfinite(a) & np.isfinite(b)
    ah = a.astype(hp)
    bh = b.astype(hp)
    with np.errstate(all="ignore"):
        big = np.maximum(np.abs(ah), np.abs(bh))
        tol = ulps * np.spacing(big.astype(dtype)).astype(hp) + np.asarray(rel_extra) * big + abs_extra
        diff = np.abs(ah - bh)
        bad = fin & ~(diff <= tol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        detail = [(tuple(i), a[tuple(i)], b[tuple(i)]) for i in idx]
        raise AssertionError(f"{int(bad.sum())} of {a.size} entries differ beyond tolerance: {detail}")


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Fail if anything inside emits a warning, under NumPy's default error state."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with np.errstate(divide="warn", over="warn", under="ignore", invalid="warn"):
            yield
    assert not caught, [str(w.message) for w in caught]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """For reference computations (scipy warns on special values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def scipy_ref(name: str, x: Any, **kw: Any) -> Any:
    """scipy.special.<name> evaluated on the float64 (or long double) version of ``x``."""
    import scipy.special

    x = np.asarray(x)
    xd = x.astype(LD if x.dtype == LD else np.float64)
    with quiet():
        return getattr(scipy.special, name)(xd, **kw)


def lse_err(computed: Any, ref: Any, dtype: Any) -> np.ndarray:
    """logsumexp error in units of eps(dtype) * max(1, |ref|) (the bound of SPEC section 4)."""
    dtype = np.dtype(dtype)
    hp = higher(dtype)
    c = np.asarray(computed).astype(hp)
    r = np.asarray(ref).astype(hp)
    with np.errstate(all="ignore"):
        e = np.abs(c - r) / (eps(dtype) * np.maximum(1, np.abs(r)))
    e = np.where(c == r, 0, e)
    e = np.where(np.isnan(c) | np.isnan(r), INF, e)
    return np.asarray(e, dtype=np.float64)


def assert_lse_close(computed: Any, ref: Any, dtype: Any, bound: float = 1.0) -> None:
    """Within ``bound`` * eps * max(1, |ref|); non-finite values must match exactly."""
    same_special(computed, np.asarray(ref).astype(np.asarray(computed).dtype))
    e = lse_err(computed, ref, dtype)
    fin = np.isfinite(np.asarray(ref).astype(np.float64))
    worst = float(e[fin].max()) if fin.any() else 0.0
    assert worst <= bound, f"logsumexp error {worst:.3g} eps*max(1,|r|) > {bound}"


def assert_lse_backward_close(dx: Any, grad: Any, x: Any, axis: Any = None, keepdims: bool = False,
                              b: Any = None, where: Any = None, ulps: float = 4) -> None:
    """logsumexp_backward against the reference, allowing the inherent floor of the formula:
    rounding x_i - lse costs up to |x_i - lse| / 2 ulp of exp(x_i - lse) (as in softmax)."""
    dx = np.asarray(dx)
    x = np.asarray(x)
    dtype = dx.dtype
    ref = ref_logsumexp_backward(grad, x, axis=axis, keepdims=keepdims, b=b, where=where)
    ones = np.ones(reduced_shape(x.shape, axis, keepdims))
    w1 = ref_logsumexp_backward(ones, x, axis=axis, keepdims=keepdims, b=b, where=where)
    bb = np.ones(x.shape) if b is None else np.broadcast_to(np.asarray(b, np.float64), x.shape)
    with np.errstate(all="ignore"):
        t = np.where((w1 != 0) & (bb != 0), np.abs(np.log(np.abs(w1 / bb))), 0)
    assert_ulp_close(dx, ref, dtype, ulps, rel_extra=eps(dtype) * t)
