"""Backward functions: the analytic formulas of SPEC section 1 (in long double), central finite
differences of the forward functions, accuracy when |logsumexp| is large, -inf rows, layouts,
out=, and an optional torch autograd oracle."""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from _reference import (
    assert_lse_backward_close,
    ulp_err,
    LD,
    assert_ulp_close,
    eps,
    max_ulp,
    no_warnings,
    ref_log_softmax,
    ref_log_softmax_backward,
    ref_logsumexp_backward,
    ref_softmax,
    ref_softmax_backward,
    ref_softmax_backward_rows,
    norm_axes,
    reduced_shape,
)

INF = np.inf
NAN = np.nan
DTYPES = [np.float32, np.float64]


def rng(seed):
    return np.random.default_rng(seed)


def data(shape, dtype=np.float64, seed=0, scale=2.0):
    return (rng(seed).standard_normal(shape) * scale).astype(dtype)


def check_log_softmax_backward(dx, g, y, axis, dtype, where=None, k=8):
    """|dx - ref| <= k eps (|g_i| + exp(y_i) sum |g|): the rounding of the formula's terms."""
    axes = norm_axes(np.ndim(y), axis)
    ref = ref_log_softmax_backward(g, y, axis=axis, where=where)
    gl = np.abs(np.asarray(g).astype(LD))
    if where is not None:
        gl = np.where(where, gl, 0)
    with np.errstate(all="ignore"):
        scale = gl + np.exp(np.asarray(y).astype(LD)) * np.sum(gl, axis=axes, keepdims=True)
    assert dx.shape == ref.shape
    bad = ~(np.abs(dx.astype(LD) - ref) <= k * eps(dtype) * scale)
    assert not bad.any(), (dx[bad][:4], ref[bad][:4])


def check_softmax_backward(dx, g, p, axis, dtype, k=8):
    axes = norm_axes(np.ndim(p), axis)
    ref = ref_softmax_backward(g, p, axis=axis)
    gl = np.asarray(g).astype(LD)
    pl = np.asarray(p).astype(LD)
    scale = pl * (np.abs(gl) + np.sum(np.abs(gl * pl), axis=axes, keepdims=True))
    assert dx.shape == ref.shape
    bad = ~(np.abs(dx.astype(LD) - ref) <= k * eps(dtype) * scale)
    assert not bad.any(), (dx[bad][:4], ref[bad][:4])


AXES = [-1, 0, 1, (0, 2), (2, 0), None, ()]


# ------------------------------------------------------------------------------------------
# analytic formulas


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_log_softmax_backward_formula(lsm, dtype, axis):
    x = data((3, 4, 5), dtype, seed=1)
    g = data((3, 4, 5), dtype, seed=2)
    y = lsm.log_softmax(x, axis=axis)
    gb, yb = g.copy(), y.copy()
    dx = lsm.log_softmax_backward(g, y, axis=axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_array_equal(g, gb)
    assert_array_equal(y, yb)
    check_log_softmax_backward(dx, g, y, axis, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_softmax_backward_formula(lsm, dtype, axis):
    x = data((3, 4, 5), dtype, seed=3)
    g = data((3, 4, 5), dtype, seed=4)
    p = lsm.softmax(x, axis=axis)
    gb, pb = g.copy(), p.copy()
    dx = lsm.softmax_backward(g, p, axis=axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_array_equal(g, gb)
    assert_array_equal(p, pb)
    check_softmax_backward(dx, g, p, axis, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_backward_formula(lsm, dtype, axis, keepdims):
    x = data((3, 4, 5), dtype, seed=5)
    gshape = reduced_shape(x.shape, axis, keepdims)
    g = data(gshape, dtype, seed=6)
    xb = x.copy()
    dx = lsm.logsumexp_backward(g, x, axis=axis, keepdims=keepdims)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_array_equal(x, xb)
    assert_lse_backward_close(dx, g, x, axis=axis, keepdims=keepdims)


def test_logsumexp_backward_defaults(lsm):
    x = data((4, 6), seed=7)
    # axis=None, keepdims=False: a scalar upstream gradient
    dx = lsm.logsumexp_backward(2.5, x)
    assert_lse_backward_close(dx, 2.5, x)
    dx0 = lsm.logsumexp_backward(np.float64(2.5), x)
    assert_array_equal(dx0, dx)
    # the weights of a full reduction sum to 1
    np.testing.assert_allclose(np.sum(lsm.logsumexp_backward(1.0, x)), 1.0, rtol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_backward_with_b(lsm, dtype, keepdims):
    x = data((4, 6), dtype, seed=8)
    b = (rng(8).random((4, 6)) * 2).astype(dtype)
    b[1, 2] = 0
    g = data((4, 1) if keepdims else (4,), dtype, seed=9)
    dx = lsm.logsumexp_backward(g, x, axis=1, keepdims=keepdims, b=b)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_lse_backward_close(dx, g, x, axis=1, keepdims=keepdims, b=b)
    assert dx[1, 2] == 0
    # broadcast b
    bb = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 0.25], dtype)
    dx = lsm.logsumexp_backward(g, x, axis=1, keepdims=keepdims, b=bb)
    assert_lse_backward_close(dx, g, x, axis=1, keepdims=keepdims, b=bb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_of_forward_consistency(lsm, dtype):
    # d/dx logsumexp = softmax; log_softmax_backward(g, y) with g = one-hot is e_k - softmax
    x = data((5, 8), dtype, seed=10)
    dx = lsm.logsumexp_backward(np.ones(5, dtype), x, axis=1)
    p = lsm.softmax(x)
    assert_ulp_close(dx, p, dtype, 8, rel_extra=2 * eps(dtype) * np.abs(np.log(p.astype(np.float64))))
    g = np.zeros((5, 8), dtype)
    g[:, 3] = 1
    d = lsm.log_softmax_backward(g, lsm.log_softmax(x))
    e = -p.copy()
    e[:, 3] += 1
    np.testing.assert_allclose(d, e, rtol=16 * eps(dtype), atol=4 * eps(dtype))


# ------------------------------------------------------------------------------------------
# finite differences of the forward functions (float64, small arrays)


def numeric_grad(f, x, h=1e-6):
    gx = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp = x.copy()
        xm = x.copy()
        xp[i] += h
        xm[i] -= h
        gx[i] = (f(xp) - f(xm)) / (2 * h)
    return gx


@pytest.mark.parametrize("axis", [-1, 0, None, (0, 1)], ids=str)
def test_finite_differences_log_softmax(lsm, axis):
    x = data((3, 4), seed=11, scale=1.0)
    w = data((3, 4), seed=12)
    num = numeric_grad(lambda z: np.sum(w * lsm.log_softmax(z, axis=axis)), x)
    ana = lsm.log_softmax_backward(w, lsm.log_softmax(x, axis=axis), axis=axis)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", [-1, 0, None, (1, 0)], ids=str)
def test_finite_differences_softmax(lsm, axis):
    x = data((3, 4), seed=13, scale=1.0)
    w = data((3, 4), seed=14)
    num = numeric_grad(lambda z: np.sum(w * lsm.softmax(z, axis=axis)), x)
    ana = lsm.softmax_backward(w, lsm.softmax(x, axis=axis), axis=axis)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", [-1, 0, None, (0, 1)], ids=str)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("with_b", [False, True])
def test_finite_differences_logsumexp(lsm, axis, keepdims, with_b):
    x = data((3, 4), seed=15, scale=1.0)
    b = rng(16).random((3, 4)) + 0.1 if with_b else None
    w = data(reduced_shape(x.shape, axis, keepdims), seed=17)
    num = numeric_grad(
        lambda z: np.sum(w * lsm.logsumexp(z, axis=axis, keepdims=keepdims, b=b)), x)
    ana = lsm.logsumexp_backward(w, x, axis=axis, keepdims=keepdims, b=b)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)


def test_finite_differences_where(lsm):
    x = data((3, 5), seed=18, scale=1.0)
    w = data((3, 5), seed=19)
    m = rng(19).random((3, 5)) < 0.6
    m[:, 0] = True
    num = numeric_grad(lambda z: np.sum(np.where(m, w * lsm.log_softmax(z, where=m), 0)), x)
    ana = lsm.log_softmax_backward(w, lsm.log_softmax(x, where=m), where=m)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)
    num = numeric_grad(lambda z: np.sum(w * lsm.softmax(z, where=m)), x)
    ana = lsm.softmax_backward(w, lsm.softmax(x, where=m), where=m)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)
    g = data((3,), seed=20)
    num = numeric_grad(lambda z: np.sum(g * lsm.logsumexp(z, axis=1, where=m)), x)
    ana = lsm.logsumexp_backward(g, x, axis=1, where=m)
    np.testing.assert_allclose(ana, num, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------
# accuracy when |logsumexp| is large


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e6, -1e6, 3e4, 1e12])
@pytest.mark.parametrize("axis", [1, 0])
def test_logsumexp_backward_large_offset(lsm, dtype, offset, axis):
    if dtype == np.float32 and abs(offset) > 1e6:
        offset = np.sign(offset) * 1e6
    small = data((4, 50), np.float64, seed=21, scale=1.0)
    x = (offset + small).astype(dtype)
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    g = np.ones(4, dtype)
    dx = lsm.logsumexp_backward(g, x, axis=axis)
    # reference: x - max is exact, the rest in the higher precision; a few ulp plus the
    # inherent |x - lse|/2 ulp of rounding x - lse (torch's formula is off by |lse| ulps)
    assert_lse_backward_close(dx, g, x, axis=axis)
    # torch's formula exp(x - lse(x)) would be |lse| * eps relative off here
    np.testing.assert_allclose(np.sum(dx.astype(np.float64), axis=axis), 1.0, rtol=200 * eps(dtype))


def test_logsumexp_backward_large_offset_full_reduction(lsm):
    x = 1e6 + data((1000,), seed=22, scale=0.5)
    dx = lsm.logsumexp_backward(1.0, x)
    assert_lse_backward_close(dx, 1.0, x)
    ref = ref_logsumexp_backward(1.0, x, hp=LD)
    t = np.abs(np.log(ref.astype(np.float64)))
    assert np.all(ulp_err(dx, ref, np.float64) <= 4 + t)
    assert max_ulp(dx, ref, np.float64) <= 64  # exp(x - lse) with lse rounded: ~1e6 ulps off


@pytest.mark.parametrize("n", [300, 5000])
def test_logsumexp_backward_float_factor(lsm, n):
    """float32 rows whose exps are kept multiply them by g / sum in float (times_factor: a
    fused multiply-add with the factor's two float parts) where the factor is 0 or within
    2^-100..2^126, and in double elsewhere: gradients of 1, tiny (the factor below float's
    range: a float factor would make every output 0), subnormal, huge and 0 side by side, each
    row alone the same bits as in the batch."""
    x = (rng(n).standard_normal((5, n)) * 3).astype(np.float32)
    g = np.array([1.0, 1e-30, 1e-42, 3e38, 0.0], np.float32)
    dx = lsm.logsumexp_backward(g, x, axis=1)
    assert_lse_backward_close(dx, g, x, axis=1)
    for i in range(5):
        assert_array_equal(lsm.logsumexp_backward(g[i], x[i]), dx[i], err_msg=f"row {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2, 32, 300, 5000])
@pytest.mark.parametrize("axis", [1, 0])
def test_logsumexp_backward_underflow_keeps_the_gradients_sign(lsm, dtype, n, axis):
    """An exp that underflows to 0 gives g * 0: -0 where g < 0, on every kernel (short rows,
    rows, columns) as in NumPy: float32's fused product once made +0 of it on some rows."""
    x = np.zeros((3, n), dtype)
    x[:, 1] = -2000.0
    g = np.array([-2.0, 3.0, -0.5], dtype)
    if axis == 0:
        x = np.ascontiguousarray(x.T)
    dx = lsm.logsumexp_backward(g, x, axis=axis)
    tiny = dx[:, 1] if axis == 1 else dx[1, :]
    assert_array_equal(tiny, [0.0, 0.0, 0.0])
    assert_array_equal(np.signbit(tiny), np.signbit(g))


# ------------------------------------------------------------------------------------------
# -inf rows, +inf rows, empty


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_backward_minus_inf_row_is_zero(lsm, dtype, keepdims):
    x = np.array([[-INF, -INF, -INF], [1.0, 2.0, -INF], [-INF, 0.5, -INF]], dtype)
    g = np.array([[3.0], [1.0], [2.0]], dtype)
    g = g if keepdims else g[:, 0]
    with no_warnings():
        dx = lsm.logsumexp_backward(g, x, axis=1, keepdims=keepdims)
        dxc = lsm.logsumexp_backward(g.T if keepdims else g, np.ascontiguousarray(x.T), axis=0,
                                     keepdims=keepdims)
    assert_array_equal(dx[0], [0, 0, 0])
    assert np.all(np.isfinite(dx))
    assert dx[1, 2] == 0 and dx[2, 0] == 0 and dx[2, 2] == 0
    assert dx[2, 1] == 2.0
    p = np.exp(np.array([1.0, 2.0])) / np.sum(np.exp(np.array([1.0, 2.0])))
    np.testing.assert_allclose(dx[1, :2], p, rtol=4 * eps(dtype))
    assert_ulp_close(dxc.T, dx, dtype, 4)
    # fully masked row, and a lone all -inf vector
    with no_warnings():
        dm = lsm.logsumexp_backward(g, np.ones((3, 3), dtype), axis=1, keepdims=keepdims,
                                    where=np.array([[False] * 3, [True] * 3, [False] * 3]))
        d1 = lsm.logsumexp_backward(5.0, np.full(4, -INF, dtype))
    assert_array_equal(dm[0], [0, 0, 0])
    assert_array_equal(dm[2], [0, 0, 0])
    np.testing.assert_allclose(dm[1], np.full(3, 1 / 3), rtol=4 * eps(dtype))
    assert_array_equal(d1, np.zeros(4, dtype))


def test_logsumexp_backward_plus_inf_literal(lsm):
    # design decision: grad * exp(x - lse) literally: exp(inf - inf) = NaN, exp(1 - inf) = 0
    with no_warnings():
        dx = lsm.logsumexp_backward(np.array([1.0, 2.0]), np.array([[INF, 1.0], [0.0, 0.0]]), axis=1)
    assert np.isnan(dx[0, 0])
    assert dx[0, 1] == 0
    assert_array_equal(dx[1], [1.0, 1.0])


def test_backward_empty(lsm):
    x = np.zeros((3, 0))
    assert lsm.log_softmax_backward(x, x).shape == (3, 0)
    assert lsm.softmax_backward(x, x, axis=0).shape == (3, 0)
    dx = lsm.logsumexp_backward(np.ones(3), x, axis=1)
    assert dx.shape == (3, 0)
    dx = lsm.logsumexp_backward(np.ones(0), np.zeros((0, 4)), axis=1)
    assert dx.shape == (0, 4)


def test_backward_log_softmax_minus_inf_entries(lsm):
    # y = -inf (a masked or impossible class) gives exp(y) = 0: the gradient is grad there
    x = np.array([[-INF, 1.0, 2.0]])
    y = lsm.log_softmax(x)
    g = np.array([[0.5, 1.0, -2.0]])
    with no_warnings():
        dx = lsm.log_softmax_backward(g, y)
        dp = lsm.softmax_backward(g, lsm.softmax(x))
    assert dx[0, 0] == 0.5
    check_log_softmax_backward(dx, g, y, -1, np.float64)
    assert dp[0, 0] == 0


# ------------------------------------------------------------------------------------------
# layouts, read-only, out=


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", ["log_softmax_backward", "softmax_backward"])
@pytest.mark.parametrize("layout", ["fortran", "strided", "negative", "readonly", "transposed"])
@pytest.mark.parametrize("axis", [0, -1])
def test_backward_layouts(lsm, name, layout, axis):
    x = data((6, 8), seed=23)
    g = data((6, 8), seed=24)
    fwd = lsm.log_softmax if name == "log_softmax_backward" else lsm.softmax
    y = fwd(x, axis=axis)
    expect = getattr(lsm, name)(g, y, axis=axis)

    def make(a):
        if layout == "fortran":
            return np.asfortranarray(a)
        if layout == "strided":
            big = np.zeros((12, 24))
            big[::2, ::3] = a
            return big[::2, ::3]
        if layout == "negative":
            return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
        if layout == "readonly":
            return _readonly(a.copy())
        return np.ascontiguousarray(a.T).T

    g2, y2 = make(g), make(y)
    gb, yb = g2.copy(), y2.copy()
    res = getattr(lsm, name)(g2, y2, axis=axis)
    assert_array_equal(g2, gb)
    assert_array_equal(y2, yb)
    if name == "log_softmax_backward":
        check_log_softmax_backward(res, g, y, axis, np.float64)
    else:
        check_softmax_backward(res, g, y, axis, np.float64)
    np.testing.assert_allclose(res, expect, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("layout", ["fortran", "negative", "readonly"])
def test_logsumexp_backward_layouts(lsm, layout):
    x = data((6, 8), seed=25)
    g = data((6,), seed=26)
    xx = {"fortran": np.asfortranarray(x), "negative": np.ascontiguousarray(x[::-1, ::-1])[::-1, ::-1],
          "readonly": _readonly(x.copy())}[layout]
    xb = xx.copy()
    dx = lsm.logsumexp_backward(g, xx, axis=1)
    assert_array_equal(xx, xb)
    assert_lse_backward_close(dx, g, x, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_out(lsm, dtype):
    x = data((4, 5), dtype, seed=27)
    g = data((4, 5), dtype, seed=28)
    y = lsm.log_softmax(x)
    p = lsm.softmax(x)
    out = np.empty((4, 5), dtype)
    assert lsm.log_softmax_backward(g, y, out=out) is out
    assert_array_equal(out, lsm.log_softmax_backward(g, y))
    out = np.empty((4, 5), dtype, order="F")
    assert lsm.softmax_backward(g, p, out=out) is out
    check_softmax_backward(out, g, p, -1, dtype)
    out = np.empty((4, 5), dtype)
    gl = g[:, 0].copy()
    assert lsm.logsumexp_backward(gl, x, axis=1, out=out) is out
    assert_array_equal(out, lsm.logsumexp_backward(gl, x, axis=1))


@pytest.mark.parametrize("which", ["grad", "y"])
def test_backward_out_in_place(lsm, which):
    x = data((4, 5), seed=29)
    g = data((4, 5), seed=30)
    y = lsm.log_softmax(x)
    p = lsm.softmax(x)
    e1 = lsm.log_softmax_backward(g, y)
    e2 = lsm.softmax_backward(g, p)
    g1, y1 = g.copy(), y.copy()
    target = g1 if which == "grad" else y1
    assert lsm.log_softmax_backward(g1, y1, out=target) is target
    check_log_softmax_backward(target, g, y, -1, np.float64)
    np.testing.assert_allclose(target, e1, rtol=1e-13, atol=1e-15)
    g2, p2 = g.copy(), p.copy()
    target = g2 if which == "grad" else p2
    assert lsm.softmax_backward(g2, p2, out=target) is target
    check_softmax_backward(target, g, p, -1, np.float64)
    np.testing.assert_allclose(target, e2, rtol=1e-13, atol=1e-15)


def float_grad_lines(lsm, n):
    """Six lines of n (g, y) for log_softmax_backward's float path, one of each kind: a normal
    one, y > 0 (twice, once beyond the scaled exp's range), sums of g below 2^-62, above 2^36
    and exactly 0, and exps of 0, flushed to 0 and subnormal."""
    r = rng(n)
    x = (r.standard_normal((6, n)) * 4).astype(np.float32)
    y = lsm.log_softmax(x)
    g = r.standard_normal((6, n)).astype(np.float32)
    y[1, n // 2] = 3.0              # not a log_softmax: exp(y) > 1
    y[1, 0] = 50.0                  # beyond the scaled float exp's range
    g[2] *= np.float32(1e-25)       # |sum| below 2^-62
    g[3] *= np.float32(1e12)        # |sum| above 2^36
    g[4, :] = 0.0
    g[4, :2] = [1.5, -1.5]          # sum exactly 0
    y[5, :3] = [-np.inf, -200.0, -104.0]    # exps of 0, flushed to 0 and subnormal
    return g, y


@pytest.mark.parametrize("n", [32, 300, 140_000])
def test_log_softmax_backward_float_rows(lsm, n):
    """float32 log_softmax_backward runs in float where a row allows it (no y > 0, the
    gradient's row sum 0 or within 2^-62..2^36; with a fused multiply-add) and in double
    elsewhere, decided row by row (and per superblock of a long row): rows of each kind side
    by side, short and long.  Each is within the formula's rounding, is bitwise the same alone
    as in the batch, and in place (out=grad, out=y: the y are checked before they are
    overwritten) as not."""
    g, y = float_grad_lines(lsm, n)
    dx = lsm.log_softmax_backward(g, y)
    check_log_softmax_backward(dx, g, y, -1, np.float32, k=2)
    for i in range(6):
        assert_array_equal(lsm.log_softmax_backward(g[i], y[i]), dx[i], err_msg=f"row {i}")
    for which in ("grad", "y"):
        g1, y1 = g.copy(), y.copy()
        target = g1 if which == "grad" else y1
        assert lsm.log_softmax_backward(g1, y1, out=target) is target
        assert_array_equal(target, dx, err_msg=f"out={which}")


@pytest.mark.parametrize("n", [32, 300, 140_000])
def test_log_softmax_backward_float_cols(lsm, n):
    """As test_log_softmax_backward_float_rows over axis 0: the column kernel decides column
    by column, so that each column is bitwise the same next to columns of any kind (here: next
    to a copy of itself) and in place as not."""
    g, y = (a.T.copy() for a in float_grad_lines(lsm, n))
    dx = lsm.log_softmax_backward(g, y, axis=0)
    check_log_softmax_backward(dx, g, y, 0, np.float32, k=2)
    for j in range(6):
        pair = lsm.log_softmax_backward(g[:, [j, j]], y[:, [j, j]], axis=0)
        assert_array_equal(pair, dx[:, [j, j]], err_msg=f"column {j}")
    for which in ("grad", "y"):
        g1, y1 = g.copy(), y.copy()
        target = g1 if which == "grad" else y1
        assert lsm.log_softmax_backward(g1, y1, axis=0, out=target) is target
        assert_array_equal(target, dx, err_msg=f"out={which}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 300, 8196), (3, 200, 1030), (1, 500, 1024), (2, 100, 37)],
                         ids=lambda s: "x".join(map(str, s)))
def test_backward_column_blocks(lsm, shape, dtype):
    """The backward column kernels walk blocks of up to 4096 columns (back_width: 8196 in
    three or four blocks, 1030 in one or two, 1024 float32 at two threads in panels of 64):
    the result is the oracle's within rounding, bitwise the same at one and two threads, and
    (but float64 log_softmax_backward) each column's the same as that column's next to a copy
    of itself."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    r = rng(sum(shape))
    x = (r.standard_normal(shape) * 3).astype(dtype)
    g = r.standard_normal(shape).astype(dtype)
    cols = sorted({0, 1, 63, 64, shape[2] // 2, shape[2] - 1} & set(range(shape[2])))
    for name, check, forward in (("softmax_backward", check_softmax_backward, lsm.softmax),
                                 ("log_softmax_backward", check_log_softmax_backward,
                                  lsm.log_softmax)):
        f = getattr(lsm, name)
        q = forward(x, axis=1)
        with threadpoolctl.threadpool_limits(1):
            one = f(g, q, axis=1)
        with threadpoolctl.threadpool_limits(2):
            two = f(g, q, axis=1)
        check(one, g, q, 1, dtype)
        assert_array_equal(two, one, err_msg=f"{name}: two threads")
        for j in cols if dtype == np.float32 or name == "softmax_backward" else ():
            # (a pair: a single column is a row, for the row kernels; float64
            # log_softmax_backward's columns differ in the last bit with the panel's width, as
            # they did before the blocks)
            pair = f(g[:, :, [j, j]], q[:, :, [j, j]], axis=1)
            assert_array_equal(pair, one[:, :, [j, j]], err_msg=f"{name}: column {j}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2100, 1024), (8200, 257), (1, 2_200_000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_softmax_backward_streamed(lsm, shape, dtype):
    """softmax_backward writes outputs of 8 MiB or more (rows; rows of 257, whose starts are
    not vector-aligned; a long row the threads share) by streaming stores, into a separate out
    only (streamed_output): the result is bitwise the in-place one (not streamed), at one and
    two threads, also into an out shifted off the vector boundary, and within rounding of the
    oracle."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    r = rng(shape[1])
    x = (r.standard_normal(shape) * 3).astype(dtype)
    g = r.standard_normal(shape).astype(dtype)
    p = lsm.softmax(x)
    in_place = g.copy()
    lsm.softmax_backward(in_place, p, out=in_place)
    rows = sorted({0, shape[0] // 2, shape[0] - 1})
    check_softmax_backward(in_place[rows], g[rows], p[rows], -1, dtype)
    for threads in (1, 2):
        with threadpoolctl.threadpool_limits(threads):
            dx = lsm.softmax_backward(g, p)
            space = np.empty(g.size + 1, dtype)
            shifted = space[1:].reshape(shape)      # 4 or 8 bytes past an aligned start
            assert lsm.softmax_backward(g, p, out=shifted) is shifted
        assert_array_equal(dx, in_place, err_msg=f"{threads} thread(s)")
        assert_array_equal(shifted, in_place, err_msg=f"{threads} thread(s), shifted out")


def softmax_grad_lines(lsm, n):
    """Four lines of n (g, p) for float32 softmax_backward: a normal one, one whose sum(g * p)
    is beyond float's range (1.5 FLT_MAX: p is not a softmax there; a float formula would give
    -inf, the double one gives the finite -0.375 FLT_MAX), one with p of 0 and tiny outputs,
    and one of huge gradients."""
    r = rng(n + 1)
    x = (r.standard_normal((4, n)) * 4).astype(np.float32)
    p = lsm.softmax(x)
    g = r.standard_normal((4, n)).astype(np.float32)
    fmax = np.finfo(np.float32).max
    p[1] = np.float32(1.5 / n)
    g[1] = fmax
    p[2, : n // 2] = 0.0
    p[2, n // 2:] = np.float32(1e-30)
    g[3] *= np.float32(1e37)
    return g, p


@pytest.mark.parametrize("n", [32, 300, 140_000])
def test_softmax_backward_float_lines(lsm, n):
    """float32 softmax_backward over lines of each kind side by side, as rows and as columns.
    It is formed in float, p * ((g - Mh) - Ml) with the sum M split in two floats, where
    |M| < 2^100, and in double elsewhere (line 1), decided line by line.  Each line is within
    the formula's rounding (the normal line within 2.5 ulp of each result: three roundings),
    is bitwise the same alone (a column: next to a copy of itself) as in the batch, and in
    place as not."""
    g, p = softmax_grad_lines(lsm, n)
    for axis in (-1, 0):
        ga, pa = (g, p) if axis == -1 else (g.T.copy(), p.T.copy())
        dx = lsm.softmax_backward(ga, pa, axis=axis)
        check_softmax_backward(dx, ga, pa, axis, np.float32, k=2)
        assert np.isfinite(dx).all()
        normal = (slice(None), 0) if axis == 0 else 0
        ref = ref_softmax_backward(ga, pa, axis=axis)[normal]
        assert max_ulp(dx[normal], ref, np.float32) <= 2.5
        for i in range(4):
            if axis == -1:
                alone = lsm.softmax_backward(ga[i], pa[i])
                assert_array_equal(alone, dx[i], err_msg=f"row {i}")
            else:
                pair = lsm.softmax_backward(ga[:, [i, i]], pa[:, [i, i]], axis=0)
                assert_array_equal(pair, dx[:, [i, i]], err_msg=f"column {i}")
        for which in ("grad", "p"):
            g1, p1 = ga.copy(), pa.copy()
            target = g1 if which == "grad" else p1
            assert lsm.softmax_backward(g1, p1, axis=axis, out=target) is target
            assert_array_equal(target, dx, err_msg=f"axis={axis} out={which}")


@pytest.mark.parametrize("n", [10, 1000, 100_000])
def test_softmax_backward_float64_in_ulps(lsm, n):
    """float64 softmax_backward within 2.5 ulp of every result (rows, columns, and under a
    mask): its sum(g * p) is formed in twice the precision (dot2_add), so that g close to the
    sum costs nothing.  With the sum in double, some of 64000 random results were 10^4 ulp off
    (torch and jax: 10^3 to 10^6); a few g are set to the sum here, so that the cancellation is
    certain.  The reference's sums are exact (ref_softmax_backward_rows)."""
    rows = max(1, 64_000 // n)
    r = rng(n + 5)
    x = r.standard_normal((rows, n)) * 3
    g = r.standard_normal((rows, n))
    p = lsm.softmax(x)
    sums = np.sum(g * p, axis=1)
    g[:, 3 % n] = sums                  # g_i - sum about an ulp of the sum: all cancellation
    g[:, 7 % n] = np.nextafter(sums, np.inf)
    ref = ref_softmax_backward_rows(g, p)
    for name, dx in (("rows", lsm.softmax_backward(g, p)),
                     ("columns", lsm.softmax_backward(g.T.copy(), p.T.copy(), axis=0).T)):
        assert max_ulp(dx, ref, np.float64) <= 2.5, name
    w = r.random((rows, n)) < 0.8
    dx = lsm.softmax_backward(g, p, where=w)
    gm, pm = np.where(w, g, 0.0), np.where(w, p, 0.0)
    assert max_ulp(dx[w], ref_softmax_backward_rows(gm, pm)[w], np.float64) <= 2.5, "where="
    assert np.all(dx[~w] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_cancellation(lsm, dtype):
    """Two p near 1/2: their g and sum(g * p) nearly cancel, and p * (g - sum) is small.  The
    double formula is off by about 2^-53 of the terms' size p * (|g| + sum|g * p|) there; a
    float formula (p*g - p*sum in one fused multiply-add, or torch's) by about 2^-24 of it,
    which tools/valgrind_cases.py in CI found against the Python backend."""
    r = rng(17)
    x = (r.standard_normal(1000) * 3).astype(dtype)
    x[:2] = 40                          # two p of about 1/2
    g = r.standard_normal(1000).astype(dtype)
    g[:2] = [1.0, 1.0 + 3 * 2.0**-23]   # sum(g * p) about 1 + 1.5 * 2^-23: not a float
    p = lsm.softmax(x)
    dx = lsm.softmax_backward(g, p)
    ref = ref_softmax_backward(g, p)
    pl, gl = p.astype(LD), g.astype(LD)
    scale = pl[:2] * (np.abs(gl[:2]) + np.sum(np.abs(gl * pl)))
    assert np.all(np.abs(ref[:2]) < 1e-5 * scale)       # the cancellation is there
    assert np.all(np.abs(dx[:2].astype(LD) - ref[:2]) <= 1e-12 * scale)


def test_backward_out_partial_overlap(lsm):
    buf = data((5, 9), seed=31)
    g = buf[:, :8]
    y = lsm.log_softmax(data((5, 8), seed=32))
    expect = lsm.log_softmax_backward(g.copy(), y)
    out = buf[:, 1:]
    assert lsm.log_softmax_backward(g, y, out=out) is out
    np.testing.assert_allclose(out, expect, rtol=1e-13, atol=1e-15)
    # logsumexp_backward writing over its own input
    x = data((5, 8), seed=33)
    gl = data((5,), seed=34)
    expect = lsm.logsumexp_backward(gl, x.copy(), axis=1)
    assert lsm.logsumexp_backward(gl, x, axis=1, out=x) is x
    assert_ulp_close(x, expect, np.float64, 2)
    # ... and writing over its upstream gradient (the buffers start at the same address, or
    # not): the rows read late must still see the gradient as given
    x = data((5, 8), seed=35)
    for start in (0, 3):
        buf = data((48,), seed=36)
        gl = buf[start:start + 5]
        expect = lsm.logsumexp_backward(gl.copy(), x, axis=-1)
        out = buf[:40].reshape(5, 8)
        assert lsm.logsumexp_backward(gl, x, axis=-1, out=out) is out
        assert_ulp_close(out, expect, np.float64, 2)


def test_backward_array_likes(lsm):
    y = [[np.log(0.25), np.log(0.75)]]
    dx = lsm.log_softmax_backward([[1.0, 2.0]], y)
    assert dx.dtype == np.float64
    np.testing.assert_allclose(dx, [[1.0 - 0.25 * 3, 2.0 - 0.75 * 3]], rtol=1e-15)
    dp = lsm.softmax_backward([1.0, 2.0], [0.25, 0.75])
    np.testing.assert_allclose(dp, [0.25 * (1 - 1.75), 0.75 * (2 - 1.75)], rtol=1e-15)
    dl = lsm.logsumexp_backward(1.0, [0.0, 0.0])
    np.testing.assert_allclose(dl, [0.5, 0.5], rtol=1e-15)


# ------------------------------------------------------------------------------------------
# torch autograd as an independent oracle (only if torch is installed)


def test_torch_oracle(lsm):
    torch = pytest.importorskip("torch")
    x = data((4, 7), seed=35)
    g = data((4, 7), seed=36)
    gl = data((4,), seed=37)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.log_softmax(t, dim=1).backward(torch.tensor(g))
    np.testing.assert_allclose(lsm.log_softmax_backward(g, lsm.log_softmax(x)), t.grad.numpy(),
                               rtol=1e-12, atol=1e-14)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.softmax(t, dim=0).backward(torch.tensor(g))
    np.testing.assert_allclose(lsm.softmax_backward(g, lsm.softmax(x, axis=0), axis=0),
                               t.grad.numpy(), rtol=1e-12, atol=1e-14)
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.logsumexp(t, dim=1).backward(torch.tensor(gl))
    np.testing.assert_allclose(lsm.logsumexp_backward(gl, x, axis=1), t.grad.numpy(),
                               rtol=1e-12, atol=1e-14)


def test_references_are_sane():
    # the references used above agree with plain float64 formulas on easy data
    x = data((3, 6), seed=38)
    y = ref_log_softmax(x)
    np.testing.assert_allclose(y, x - np.log(np.sum(np.exp(x), -1, keepdims=True)), rtol=1e-14)
    np.testing.assert_allclose(ref_softmax(x), np.exp(x) / np.sum(np.exp(x), -1, keepdims=True),
                               rtol=1e-14)


def test_weighted_logsumexp_backward_nan_row(lsm):
    # logsumexp is NaN, so is every gradient entry with b != 0, as without b (the Python
    # backend gave 0 at the finite entries: its NaN line has mw = rest = 0 and counted as dead)
    with no_warnings():
        dx = lsm.logsumexp_backward(np.ones(2), np.array([[NAN, 1.0], [NAN, 1.0]]), axis=1,
                                    b=np.array([[0.5, 0.5], [1.0, 0.0]]))
        plain = lsm.logsumexp_backward(1.0, np.array([NAN, 1.0]))
    assert np.isnan(dx[0]).all()
    assert np.isnan(dx[1, 0]) and dx[1, 1] == 0
    assert np.isnan(plain).all()


def test_regression_subnormal_exp_factor_float32(lsm):
    """Found by test_hypothesis: float32 log_softmax_backward took exp(y) in float, so an exp
    below 2^-126 was rounded to the subnormal grid before the product with sum(grad) (here
    exp(-102) * 5, two spacings off).  exp(y) is now a double, the product rounded once."""
    x = np.array([[0, 0, 0], [0, 9246, 9348]], np.float32)
    g = np.array([[1, 1, 1], [1, 0, 1]], np.float32)
    y = lsm.log_softmax(x, axis=None)
    dx = lsm.log_softmax_backward(g, y, axis=None)
    ref = ref_log_softmax_backward(g, y, axis=None)
    spacing = float(np.finfo(np.float32).smallest_subnormal)
    assert np.all(np.abs(dx.astype(LD) - ref) <= 4 * eps(np.float32) * np.abs(ref) + spacing)


@pytest.mark.parametrize("n", [4, 3000])
@pytest.mark.parametrize("axis", [-1, 0])
def test_regression_kept_exps_below_float_normal(lsm, n, axis):
    """float32 logsumexp_backward keeps the exps of its sum pass (rows and columns up to 8 MB)
    and multiplies them by grad / sum.  They were kept rounded to float, so an exp below 2^-126
    was rounded to the subnormal grid first, and a large grad brought that out: 1.7% off at
    exp(-100) with grad 1e30.  They are kept scaled now (never subnormal)."""
    row = np.full(n, -200.0, np.float32)
    row[:3] = [0.0, -100.0, -95.5]
    x = row[:, None].repeat(3, axis=1) if axis == 0 else row[None, :].repeat(3, axis=0)
    g = np.array([1e30, 1.0, -3e20], np.float32)
    dx = lsm.logsumexp_backward(g, x, axis=axis)
    assert_lse_backward_close(dx, g, x, axis=axis)


def test_regression_exp_factor_beyond_float_range(lsm):
    """exp(y) above float's range times a zero sum(grad) is 0, as in float64 (it was inf * 0,
    NaN, in float32)."""
    for dtype in (np.float32, np.float64):
        g = np.array([[1.0, -1.0]], dtype)
        y = np.array([[100.0, 0.0]], dtype)
        with no_warnings():
            assert_array_equal(lsm.log_softmax_backward(g, y), g)

