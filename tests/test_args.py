"""SPEC section 2: bad arguments and their exceptions for every public function (inputs left
unchanged), plus the ``where=``, ``b=`` and ``return_sign=`` arguments."""
from __future__ import annotations

import re

import numpy as np
import pytest
from numpy.exceptions import AxisError
from numpy.testing import assert_allclose, assert_array_equal

import cylsm

from _reference import (
    assert_lse_backward_close,
    assert_lse_close,
    assert_ulp_close,
    eps,
    misaligned,
    no_warnings,
    quiet,
    ref_log_softmax,
    ref_log_softmax_backward,
    ref_logsumexp,
    ref_softmax,
    ref_softmax_backward,
    same_special,
)

INF = np.inf
NAN = np.nan
FORWARD = ["log_softmax", "softmax", "logsumexp"]
BACKWARD = ["log_softmax_backward", "softmax_backward", "logsumexp_backward"]
ALL = FORWARD + BACKWARD


def data(shape, dtype=np.float64, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 2).astype(dtype)


def invoke(lsm, name, x, axis="default", **kw):
    """Call ``name`` with ``x`` as its data input; backward functions get a matching valid
    upstream gradient (float, of x's result dtype where x is numeric)."""
    f = getattr(lsm, name)
    akw = {} if axis == "default" else {"axis": axis}
    if name in FORWARD:
        return f(x, **akw, **kw)
    g = kw.pop("grad", None)
    if g is None:
        xd = np.asarray(x).dtype
        gdtype = xd if xd.kind == "f" else np.float64
        if name == "logsumexp_backward":
            try:
                shape = np.sum(np.zeros(np.shape(x)), **akw, keepdims=kw.get("keepdims", False)).shape
            except (ValueError, IndexError):  # bad axis: any grad will do
                shape = ()
        else:
            shape = np.shape(x)
        g = np.ones(shape, gdtype)
    return f(g, x, **akw, **kw)


def out_shape(name, x, axis="default", keepdims=False):
    x = np.asarray(x)
    if name == "logsumexp":
        akw = {} if axis == "default" else {"axis": axis}
        return np.shape(np.sum(x, **akw, keepdims=keepdims))
    return x.shape


# ------------------------------------------------------------------------------------------
# axis errors


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [2, -3, 5, (0, 2), (-3,), (1, 7)], ids=str)
def test_axis_out_of_range(lsm, name, axis):
    x = data((3, 4))
    before = x.copy()
    with pytest.raises(AxisError):
        invoke(lsm, name, x, axis=axis)
    assert_array_equal(x, before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [1, -2, (0, 1)], ids=str)
def test_axis_out_of_range_0d(lsm, name, axis):
    x = np.array(1.5)
    with pytest.raises(AxisError):
        invoke(lsm, name, x, axis=axis)
    assert x == 1.5


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [(0, 0), (1, -1), (0, 1, 0), (-2, 0)], ids=str)
def test_axis_repeated(lsm, name, axis):
    x = data((3, 4))
    before = x.copy()
    with pytest.raises(ValueError):
        invoke(lsm, name, x, axis=axis)
    assert_array_equal(x, before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [0, -1, None])
def test_axis_0d_ok(lsm, name, axis):
    x = np.array(1.5)
    r = invoke(lsm, name, x, axis=axis)
    assert np.shape(r) == ()
    expect = {"log_softmax": 0.0, "softmax": 1.0, "logsumexp": 1.5,
              "log_softmax_backward": 1.0 - np.exp(1.5) * 1.0,  # grad - exp(y) * sum(grad)
              "softmax_backward": 1.5 * (1.0 - 1.5),  # p * (grad - grad * p)
              "logsumexp_backward": 1.0}[name]
    np.testing.assert_allclose(r, expect, rtol=1e-15)


# ------------------------------------------------------------------------------------------
# dtype errors


def bad_arrays():
    return {
        "complex128": np.array([1 + 1j, 2.0]),
        "complex64": np.array([1 + 1j, 2.0], np.complex64),
        "object": np.array([1.0, 2.0], dtype=object),
        "str": np.array(["a", "b"]),
        "datetime64": np.array(["2020-01-01", "2021-01-01"], dtype="datetime64[D]"),
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", list(bad_arrays()))
def test_unsupported_dtype(lsm, name, kind):
    x = bad_arrays()[kind]
    before = x.copy()
    with pytest.raises(TypeError) as info:
        invoke(lsm, name, x, axis=-1)
    msg = str(info.value)
    names = {
        "complex128": ["complex128"],
        "complex64": ["complex64"],
        "object": ["object", "O"],
        "str": ["<U1", "U1", "str"],
        "datetime64": ["datetime64"],
    }[kind]
    assert any(n in msg for n in names), msg
    assert "float" in msg, msg  # says what is supported
    assert_array_equal(x, before)


@pytest.mark.parametrize("name", ["log_softmax_backward", "softmax_backward"])
def test_unsupported_grad_dtype(lsm, name):
    y = lsm.log_softmax(data((2, 3)))
    g = np.ones((2, 3), complex)
    with pytest.raises(TypeError, match="complex"):
        getattr(lsm, name)(g, y)
    assert_array_equal(g, np.ones((2, 3)))
    with pytest.raises(TypeError):
        getattr(lsm, name)(np.ones((2, 3)), y.astype(object))


def test_unsupported_logsumexp_backward_grad_dtype(lsm):
    x = data((2, 3))
    with pytest.raises(TypeError, match="complex"):
        lsm.logsumexp_backward(np.ones(2, complex), x, axis=1)
    with pytest.raises(TypeError):
        lsm.logsumexp_backward(np.ones(2), x.astype(complex), axis=1)


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool, np.complex128, object, "U3",
                                   "datetime64[s]", np.uint8], ids=str)
def test_dtype_argument_not_float(lsm, name, dtype):
    x = data((2, 3))
    before = x.copy()
    with pytest.raises(TypeError):
        invoke(lsm, name, x, dtype=dtype)
    assert_array_equal(x, before)


# ------------------------------------------------------------------------------------------
# out= errors


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", ALL)
def test_out_not_an_array(lsm, name):
    x = data((2, 3))
    shape = out_shape(name, x)
    for bad in ([[0.0] * 3] * 2, 0.0, (1.0, 2.0), memoryview(np.zeros(shape).ravel())):
        with pytest.raises(TypeError):
            invoke(lsm, name, x, out=bad)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [0, -1], ids=str)
def test_out_wrong_shape(lsm, name, axis):
    x = data((3, 4))
    before = x.copy()
    shape = out_shape(name, x, axis)
    bad_shapes = [shape + (1,), shape[::-1] if len(shape) > 1 else (shape[0] + 1,), (1,) + shape,
                  (12,), ()]
    for s in bad_shapes:
        if s == shape:
            continue
        out = np.zeros(s)
        with pytest.raises(ValueError):
            invoke(lsm, name, x, axis=axis, out=out)
        assert np.all(out == 0)
    assert_array_equal(x, before)


def test_out_keepdims_shape(lsm):
    x = data((3, 4))
    with pytest.raises(ValueError):
        lsm.logsumexp(x, axis=1, out=np.zeros((3, 1)))
    with pytest.raises(ValueError):
        lsm.logsumexp(x, axis=1, keepdims=True, out=np.zeros(3))
    with pytest.raises(ValueError):
        lsm.logsumexp(x, out=np.zeros(1))
    with pytest.raises(ValueError):
        lsm.logsumexp(x, keepdims=True, out=np.zeros(()))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("xdtype,odtype", [(np.float64, np.float32), (np.float32, np.float64),
                                           (np.float64, np.int64), (np.float64, np.complex128),
                                           (np.float64, np.longdouble), (np.int32, np.int32),
                                           (np.float32, np.float16),
                                           (np.float64, "M8[s]")], ids=str)
def test_out_wrong_dtype(lsm, name, xdtype, odtype):
    """Refused with a message naming both dtypes (a datetime64 out once reached the buffer
    shortcut, which raised NumPy's "cannot include dtype 'M' in a buffer")."""
    x = (data((3, 4)) * 3).astype(xdtype)
    before = x.copy()
    out = np.zeros(out_shape(name, x), odtype)
    with pytest.raises(ValueError, match=re.escape(f"out has dtype {out.dtype}; the result")):
        invoke(lsm, name, x, out=out)
    assert_array_equal(out, np.zeros_like(out))
    assert_array_equal(x, before)


@pytest.mark.parametrize("name", ALL)
def test_out_readonly(lsm, name):
    x = data((3, 4))
    out = _readonly(np.zeros(out_shape(name, x)))
    with pytest.raises(ValueError):
        invoke(lsm, name, x, out=out)
    assert np.all(out == 0)
    # a read-only view of a writable buffer is refused too
    buf = np.zeros(out_shape(name, x))
    view = buf.view()
    view.flags.writeable = False
    with pytest.raises(ValueError):
        invoke(lsm, name, x, out=view)
    assert np.all(buf == 0)


def test_out_dtype_for_cast_inputs(lsm):
    # ints are computed in float64: an int out is refused, a float64 out accepted
    x = np.arange(6).reshape(2, 3)
    with pytest.raises(ValueError):
        lsm.log_softmax(x, out=np.zeros((2, 3), np.float32))
    out = np.zeros((2, 3))
    assert lsm.log_softmax(x, out=out) is out
    # float16 results are float16
    h = np.ones((2, 3), np.float16)
    with pytest.raises(ValueError):
        lsm.softmax(h, out=np.zeros((2, 3), np.float32))
    # with dtype=, out must have that dtype
    with pytest.raises(ValueError):
        lsm.softmax(np.ones((2, 3)), dtype=np.float32, out=np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------
# shape mismatch in the backward functions


@pytest.mark.parametrize("name", ["log_softmax_backward", "softmax_backward"])
@pytest.mark.parametrize("gshape,yshape", [((3, 4), (3, 5)), ((4,), (3, 5)), ((2, 3, 4), (3, 2)),
                                           ((5, 3), (3, 5))], ids=str)
def test_backward_shape_mismatch(lsm, name, gshape, yshape):
    g = data(gshape, seed=1)
    y = lsm.log_softmax(data(yshape, seed=2))
    if name == "softmax_backward":
        y = np.exp(y)
    gb, yb = g.copy(), y.copy()
    with pytest.raises(ValueError) as info:
        getattr(lsm, name)(g, y)
    msg = str(info.value)
    assert str(gshape) in msg and str(yshape) in msg, msg
    assert_array_equal(g, gb)
    assert_array_equal(y, yb)


@pytest.mark.parametrize(
    "xshape,axis,keepdims,gshape",
    [
        ((3, 4), 1, False, (4,)),
        ((3, 4), 1, False, (3, 1)),  # keepdims shape given without keepdims
        ((3, 4), 1, True, (3,)),  # plain shape given with keepdims
        ((3, 4), None, False, (1,)),
        ((3, 4), None, True, ()),
        ((3, 4), 0, False, (3,)),
        ((2, 3, 4), (0, 2), False, (2,)),
        ((2, 3, 4), (0, 2), True, (1, 3)),
    ],
    ids=str,
)
def test_logsumexp_backward_shape_mismatch(lsm, xshape, axis, keepdims, gshape):
    x = data(xshape)
    g = np.ones(gshape)
    xb = x.copy()
    with pytest.raises(ValueError) as info:
        lsm.logsumexp_backward(g, x, axis=axis, keepdims=keepdims)
    msg = str(info.value)
    expect = np.sum(x, axis=axis, keepdims=keepdims).shape
    assert str(gshape) in msg and str(expect) in msg, msg
    assert_array_equal(x, xb)
    assert np.all(g == 1)


# ------------------------------------------------------------------------------------------
# where=


def test_where_must_be_boolean(lsm):
    x = data((2, 3))
    for name in ALL:
        for bad in (np.array([1, 0, 1]), np.array([1.0, 0.0, 1.0]), [1, 0, 1]):
            with pytest.raises(TypeError):
                invoke(lsm, name, x, where=bad)


@pytest.mark.parametrize("name", ALL)
def test_where_not_broadcastable(lsm, name):
    x = data((2, 3))
    before = x.copy()
    with pytest.raises(ValueError):
        invoke(lsm, name, x, where=np.ones(2, bool))
    with pytest.raises(ValueError):
        invoke(lsm, name, x, where=np.ones((2, 3, 2), bool))
    assert_array_equal(x, before)


def masked_case(dtype=np.float64, seed=3):
    x = data((5, 7), dtype, seed=seed)
    w = np.random.default_rng(seed).random((5, 7)) < 0.6
    w[0] = False  # a fully masked row
    w[1] = True  # a full row
    w[2] = False
    w[2, 3] = True  # a single kept entry
    return x, w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("garbage", [None, NAN, INF, 1e30], ids=str)
def test_where_forward(lsm, dtype, garbage):
    x, w = masked_case(dtype)
    if garbage is not None:
        x[~w] = garbage  # masked entries take no part, whatever they hold
    before = x.copy()
    with no_warnings():
        y = lsm.log_softmax(x, where=w)
        p = lsm.softmax(x, where=w)
        r = lsm.logsumexp(x, axis=1, where=w)
        rk = lsm.logsumexp(x, axis=-1, keepdims=True, where=w)
    assert_array_equal(x, before)
    assert not np.isnan(y).any() and not np.isnan(p).any() and not np.isnan(r).any()
    assert np.all(y[~w] == -INF)
    assert np.all(p[~w] == 0)
    assert_array_equal(y[0], np.full(7, -INF))
    assert_array_equal(p[0], np.zeros(7))
    assert r[0] == -INF
    assert y[2, 3] == 0 and p[2, 3] == 1 and r[2] == x[2, 3]
    xs = np.where(w, x, 0)
    assert_ulp_close(y, ref_log_softmax(xs, where=w), dtype, 4)
    logp = np.abs(np.log(np.where(p > 0, p, 1).astype(np.float64)))
    assert_ulp_close(p, ref_softmax(xs, where=w), dtype, 4, rel_extra=eps(dtype) * logp)
    assert_lse_close(r, ref_logsumexp(xs, axis=1, where=w), dtype)
    assert_array_equal(rk[:, 0], r)
    # the unmasked full row agrees with the unmasked computation
    assert_ulp_close(y[1], lsm.log_softmax(x[1]), dtype, 8)


def test_where_broadcast(lsm):
    x = data((4, 6), seed=4)
    w = np.array([True, False, True, True, False, True])
    y = lsm.log_softmax(x, where=w)
    full = np.broadcast_to(w, x.shape)
    assert_ulp_close(y, lsm.log_softmax(x, where=full), np.float64, 8)
    assert np.all(y[:, ~w] == -INF)
    np.testing.assert_allclose(y[:, w], lsm.log_softmax(x[:, w]), rtol=4 * eps(np.float64))
    r = lsm.logsumexp(x, axis=1, where=w)
    np.testing.assert_allclose(r, lsm.logsumexp(x[:, w], axis=1), rtol=4 * eps(np.float64))
    # a column mask reduced over axis 0
    wc = np.array([[True], [False], [True], [True]])
    p = lsm.softmax(x, axis=0, where=wc)
    assert np.all(p[1] == 0)
    np.testing.assert_allclose(p[[0, 2, 3]], lsm.softmax(x[[0, 2, 3]], axis=0),
                               rtol=8 * eps(np.float64))
    # a scalar mask
    assert_ulp_close(lsm.softmax(x, where=np.True_), lsm.softmax(x), np.float64, 8)
    assert np.all(lsm.log_softmax(x, where=np.False_) == -INF)
    assert lsm.logsumexp(x, where=False) == -INF


@pytest.mark.parametrize("axis", [0, None, (0, 2)], ids=str)
def test_where_axes(lsm, axis):
    x = data((3, 4, 5), seed=5)
    w = np.random.default_rng(5).random((3, 4, 5)) < 0.5
    y = lsm.log_softmax(x, axis=axis, where=w)
    assert np.all(y[~w] == -INF)
    assert_ulp_close(y, ref_log_softmax(x, axis=axis, where=w), np.float64, 4)
    r = lsm.logsumexp(x, axis=axis, where=w)
    assert_lse_close(r, ref_logsumexp(x, axis=axis, where=w), np.float64)
    p = lsm.softmax(x, axis=axis, where=w)
    assert np.all(p[~w] == 0)
    with quiet():
        np.testing.assert_allclose(p, ref_softmax(x, axis=axis, where=w), rtol=16 * eps(np.float64))


def test_where_specials_in_kept_entries(lsm):
    x = np.array([[INF, 1.0, NAN], [-INF, -INF, 5.0], [NAN, 2.0, 3.0]])
    w = np.array([[True, True, False], [True, True, False], [False, True, True]])
    with no_warnings():
        r = lsm.logsumexp(x, axis=1, where=w)
        y = lsm.log_softmax(x, where=w)
        p = lsm.softmax(x, where=w)
    # row 0: +inf kept, NaN masked; row 1: all kept are -inf; row 2: NaN masked
    same_special(r, [INF, -INF, 3.0])
    assert_lse_close(r[2], ref_logsumexp(np.array([2.0, 3.0])), np.float64)
    same_special(y[0], [NAN, -INF, -INF])
    same_special(p[0], [NAN, NAN, 0.0])
    same_special(y[1], [NAN, NAN, -INF])
    same_special(p[1], [NAN, NAN, 0.0])
    assert y[2, 0] == -INF and p[2, 0] == 0
    assert_ulp_close(y[2, 1:], ref_log_softmax(np.array([2.0, 3.0])), np.float64, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("garbage", [None, NAN, 1e30], ids=str)
def test_where_backward(lsm, dtype, garbage):
    x, w = masked_case(dtype, seed=6)
    g = data(x.shape, dtype, seed=7)
    y = lsm.log_softmax(x, where=w)
    p = lsm.softmax(x, where=w)
    if garbage is not None:
        g[~w] = garbage
        y = y.copy()
        y[~w] = garbage
        p = p.copy()
        p[~w] = garbage
    gb, yb, pb = g.copy(), y.copy(), p.copy()
    with no_warnings():
        dy = lsm.log_softmax_backward(g, y, where=w)
        dp = lsm.softmax_backward(g, p, where=w)
    assert_array_equal(g, gb)
    assert_array_equal(y, yb)
    assert_array_equal(p, pb)
    assert np.all(dy[~w] == 0) and np.all(dp[~w] == 0)
    assert not np.isnan(dy).any() and not np.isnan(dp).any()
    assert_array_equal(dy[0], np.zeros(7))
    assert_array_equal(dp[0], np.zeros(7))
    # single kept entry: grad - 1 * grad = 0, p = 1: 1 * (grad - grad) = 0
    assert dy[2, 3] == 0 and dp[2, 3] == 0
    e = eps(dtype)
    ref = ref_log_softmax_backward(g, y, where=w)
    scale = np.abs(np.where(w, g, 0)) + np.exp(np.where(w, y, -INF)) * np.sum(
        np.abs(np.where(w, g, 0)), axis=-1, keepdims=True)
    assert np.all(np.abs(dy - ref) <= 8 * e * scale)
    ref = ref_softmax_backward(g, p, where=w)
    gw, pw = np.where(w, g, 0), np.where(w, p, 0)
    scale = pw * (np.abs(gw) + np.sum(np.abs(gw * pw), axis=-1, keepdims=True))
    assert np.all(np.abs(dp - ref) <= 8 * e * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [16, 37, 600, 1300])
@pytest.mark.parametrize("layout", ["full", "row-broadcast", "col-broadcast", "strided", "axis0"])
def test_where_long_rows(lsm, dtype, n, layout):
    """where= on rows long enough for the kernels' vector loops (and their chunks of 512), with
    masks of every kind of stride (the kernels read them as views): full, one row broadcast to
    all, one value per row broadcast along it, a strided slice, and along axis 0.  NaN, inf
    and 1e30 in the masked entries of x, g, y and p must change nothing."""
    rng = np.random.default_rng(n)
    R = 6
    x = data((R, n), dtype, seed=n)
    w = {"full": rng.random((R, n)) < 0.7, "row-broadcast": rng.random((1, n)) < 0.7,
         "col-broadcast": np.array([[True], [False], [True], [True], [False], [True]]),
         "strided": (rng.random((R, 2 * n)) < 0.7)[:, ::2], "axis0": rng.random((R, n)) < 0.7}[layout]
    if layout in ("full", "strided", "axis0"):
        w[0] = False                                    # a fully masked row
        w[1, 5] = True
    wf = np.broadcast_to(w, x.shape)
    g = data((R, n), dtype, seed=n + 1)
    junk = np.array([NAN, INF, dtype(1e30), -INF], dtype)
    xg = x.copy()
    xg[~wf] = junk[np.arange((~wf).sum()) % 4]
    axis = 0 if layout == "axis0" else -1
    T = (lambda a: a.T) if layout == "axis0" else (lambda a: a)
    with no_warnings():
        y = T(lsm.log_softmax(T(xg), axis=axis, where=T(w)))
        p = T(lsm.softmax(T(xg), axis=axis, where=T(w)))
    assert np.all(y[~wf] == -INF) and np.all(p[~wf] == 0)
    assert_ulp_close(y[wf], ref_log_softmax(x, where=wf)[wf], dtype, 4)
    with quiet():
        np.testing.assert_allclose(p, ref_softmax(x, where=wf), rtol=16 * eps(dtype), atol=0)
    gg, yg, pg = g.copy(), y.copy(), p.copy()
    gg[~wf] = junk[np.arange((~wf).sum()) % 4]
    yg[~wf] = junk[np.arange((~wf).sum()) % 4]
    pg[~wf] = junk[np.arange((~wf).sum()) % 4]
    e = eps(dtype)
    for name, q, qg in (("log_softmax_backward", y, yg), ("softmax_backward", p, pg)):
        f = getattr(lsm, name)
        with no_warnings():
            d = T(f(T(gg), T(qg), axis=axis, where=T(w)))
            inplace = T(gg).copy()
            f(inplace, T(qg), axis=axis, where=T(w), out=inplace)      # out=grad
        assert_array_equal(T(inplace), d)
        assert np.all(d[~wf] == 0) and not np.isnan(d).any()
        gw = np.where(wf, g, 0)
        if name == "log_softmax_backward":
            ref = ref_log_softmax_backward(g, y, where=wf)
            scale = np.abs(gw) + np.exp(np.where(wf, y, -INF)) * np.sum(np.abs(gw), axis=-1,
                                                                           keepdims=True)
        else:
            ref = ref_softmax_backward(g, p, where=wf)
            pw = np.where(wf, p, 0)
            scale = pw * (np.abs(gw) + np.sum(np.abs(gw * pw), axis=-1, keepdims=True))
        assert np.all(np.abs(d - ref) <= 4 * e * scale), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("strided", [False, True], ids=["mask", "strided-mask"])
def test_where_forward_special_lines(lsm, dtype, axis, strided):
    """log_softmax and softmax with where= on lines whose max is not finite, among ordinary
    ones: a kept NaN, a kept +inf, kept entries that are all -inf, nothing kept; and a line
    that keeps entries only near its end.  Rows of 300001 (one row is cut into parts for the
    threads: a NaN in the first part decides the masked entries of the last), and along axis 0
    150 columns (blocks of 64) of 40.  Kept entries follow SPEC section 3 as if the masked
    ones were not there, masked ones are -inf / 0 exactly, and out=x gives the same."""
    L, n = (6, 300001) if axis == -1 else (150, 40)
    rng = np.random.default_rng(L)
    x = data((L, n), dtype, seed=n)
    w = rng.random((L, 2 * n) if strided else (L, n)) < 0.7
    w = w[:, ::2] if strided else w
    kinds = np.arange(6)
    if axis == 0:       # one special column per block of 64 at most: a block's NaN column
        kinds = np.zeros(L, int)            # must not hide an empty one in another block
        kinds[[10, 20, 70, 130, 140]] = [1, 2, 3, 5, 4]
    for i in range(L):
        if kinds[i] == 1:                       # a kept NaN, near the start
            x[i, 5], w[i, 5] = NAN, True
        elif kinds[i] == 2:                     # a kept +inf, near the end
            x[i, n - 3], w[i, n - 3] = INF, True
        elif kinds[i] == 3:                     # every kept entry is -inf
            w[i] = False
            x[i, ::7], w[i, ::7] = -INF, True
        elif kinds[i] == 4:                     # entries kept only in the last eighth
            w[i, :n - n // 8] = False
        elif kinds[i] == 5:                     # nothing kept
            w[i] = False
    junk = np.array([NAN, INF, dtype(1e30), -INF], dtype)
    xg = x.copy()
    xg[~w] = junk[np.arange((~w).sum()) % 4]
    T = (lambda a: a) if axis == -1 else (lambda a: np.ascontiguousarray(a.T))
    Tw = (lambda a: a) if axis == -1 else (lambda a: a.T)
    plain = kinds % 4 == 0                      # kinds 0 and 4: a finite max
    for name, fill in (("log_softmax", -INF), ("softmax", 0.0)):
        f = getattr(lsm, name)
        with no_warnings():
            r = T(f(T(xg), axis=axis, where=Tw(w)))
            inplace = T(xg).copy()
            f(inplace, axis=axis, where=Tw(w), out=inplace)
        assert_array_equal(T(inplace), r)
        assert np.all(r[~w] == fill), name
        ref = (ref_log_softmax if name == "log_softmax" else ref_softmax)(x[plain], where=w[plain])
        kept = w[plain]
        if name == "log_softmax":
            assert_ulp_close(r[plain][kept], ref[kept], dtype, 4)
        else:
            with quiet():
                np.testing.assert_allclose(r[plain][kept], ref[kept], rtol=16 * eps(dtype), atol=0)
        for i in np.flatnonzero(~plain):
            k = r[i][w[i]]
            if name == "log_softmax" and kinds[i] == 2:     # +inf -> NaN, the rest -inf
                same_special(k, np.where(x[i][w[i]] == INF, NAN, -INF))
            else:
                assert np.isnan(k).all(), (name, kinds[i])


@pytest.mark.parametrize("keepdims", [False, True])
def test_where_logsumexp_backward(lsm, keepdims):
    x, w = masked_case(np.float64, seed=8)
    x[~w] = NAN
    g = data((5, 1) if keepdims else (5,), seed=9)
    with no_warnings():
        dx = lsm.logsumexp_backward(g, x, axis=1, keepdims=keepdims, where=w)
    assert dx.shape == x.shape
    assert not np.isnan(dx).any()
    assert np.all(dx[~w] == 0)
    assert_array_equal(dx[0], np.zeros(7))
    gk = g if keepdims else g[:, None]
    assert dx[2, 3] == gk[2, 0]  # a single kept entry has weight exactly 1
    assert_lse_backward_close(dx, g, x, axis=1, keepdims=keepdims, where=w)
    # masked entries take no part: the same as dropping them
    kept = w[4]
    alone = lsm.logsumexp_backward(gk[4, 0], x[4][kept])
    assert_lse_backward_close(dx[4][kept], gk[4, 0], x[4][kept])
    assert_ulp_close(dx[4][kept], alone, np.float64, 8,
                     rel_extra=2 * eps(np.float64) * np.abs(np.log(np.abs(alone / gk[4, 0]))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [7, 37, 300, 1500])
@pytest.mark.parametrize("strided", [False, True], ids=["mask", "strided-mask"])
def test_where_logsumexp_lines(lsm, dtype, n, strided):
    """logsumexp and logsumexp_backward with where= on rows shorter than a superblock
    (logsumexp masks groups of rows into a buffer per thread, or one row at a time when it is
    longer than a group; the backward masks into its result, in tasks of 131072 elements),
    enough rows for several tasks and both threads.  The special lines of
    test_where_forward_special_lines in the first 16 rows (the first task), junk in the masked
    entries of x, gradients of both signs, -0, +0, inf and NaN in later tasks.  Both must give
    what the unmasked functions give on x with -inf at the masked entries (the same kernels:
    the same bits), exactly +0 at the masked entries of the gradient, and out=x the same."""
    R = max(48, 5 * 131072 // (2 * n))
    rng = np.random.default_rng(n)
    x = data((R, n), dtype, seed=n)
    w = rng.random((R, 2 * n) if strided else (R, n)) < 0.7
    w = w[:, ::2] if strided else w
    kinds = np.where(np.arange(R) < 16, np.arange(R) % 8, 0)
    for i in range(R):
        if kinds[i] == 1:                       # a kept NaN
            x[i, n // 2], w[i, n // 2] = NAN, True
        elif kinds[i] == 2:                     # a kept +inf
            x[i, n - 1], w[i, n - 1] = INF, True
        elif kinds[i] == 3:                     # every kept entry is -inf
            w[i] = False
            x[i, ::3], w[i, ::3] = -INF, True
        elif kinds[i] == 5:                     # nothing kept
            w[i] = False
    junk = np.array([NAN, INF, dtype(1e30), -INF], dtype)
    xg = x.copy()
    xg[~w] = junk[np.arange((~w).sum()) % 4]
    xm = np.where(w, x, -INF).astype(dtype)
    g = data((R,), dtype, seed=n + 1)
    g = np.abs(g)
    g[R // 3::7] *= -1                              # later tasks: every kind of gradient
    g[R // 2 + np.arange(6)] = [-0.0, 0.0, INF, NAN, -INF, NAN]
    g[70::64] = NAN                                 # (columns: one in each block of 64)
    with no_warnings():
        r = lsm.logsumexp(xg, axis=1, where=w)
        r2, sign = lsm.logsumexp(xg, axis=1, where=w, return_sign=True)
        dx = lsm.logsumexp_backward(g, xg, axis=1, where=w)
        inplace = xg.copy()
        lsm.logsumexp_backward(g, inplace, axis=1, where=w, out=inplace)
        r_plain = lsm.logsumexp(xm, axis=1)
        dx_plain = lsm.logsumexp_backward(g, xm, axis=1)
    assert_array_equal(r, r_plain)
    assert_array_equal(r2, r)
    assert_array_equal(inplace, dx)
    assert_array_equal(dx[w], dx_plain[w])
    assert np.all(dx[~w] == 0) and not np.signbit(dx[~w]).any()
    plain = ~np.isin(kinds, [1, 2, 3, 5])
    assert_lse_close(r[plain], ref_logsumexp(x[plain], axis=1, where=w[plain]), dtype)
    same_special(r[~plain], np.select([kinds[~plain] == 1, kinds[~plain] == 2], [NAN, INF], -INF))
    same_special(sign, np.select([kinds == 1, np.isin(kinds, [3, 5])], [NAN, 0.0], 1.0))
    ok = plain & np.isfinite(g)
    assert_lse_backward_close(dx[ok], g[ok], x[ok], axis=1, where=w[ok])
    # the same lines as columns (the backward masks blocks of 64 columns; -0 and NaN
    # gradients in several blocks)
    xt, xmt = np.ascontiguousarray(xg.T), np.ascontiguousarray(xm.T)
    with no_warnings():
        dxt = lsm.logsumexp_backward(g, xt, axis=0, where=w.T)
        dxt_plain = lsm.logsumexp_backward(g, xmt, axis=0)
    assert_array_equal(dxt[w.T], dxt_plain[w.T])
    assert np.all(dxt[~w.T] == 0) and not np.signbit(dxt[~w.T]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_where_logsumexp_backward_out_is_grad(lsm, dtype):
    """out=grad with rows of one element: the result is grad's own buffer, which the masked
    kernel must not overwrite before it reads grad (it masks x into its result first)."""
    x = data((5, 1), dtype, seed=11)
    w = np.array([[True], [False], [True], [True], [False]])
    g = data((5, 1), dtype, seed=12)
    want = lsm.logsumexp_backward(g, x, axis=1, keepdims=True, where=w)
    assert_array_equal(want, np.where(w, g, 0))     # exp(x - x) = 1 where kept
    got = lsm.logsumexp_backward(g, x, axis=1, keepdims=True, where=w, out=g)
    assert got is g
    assert_array_equal(g, want)


# ------------------------------------------------------------------------------------------
# b= and return_sign=


def scipy_lse(x, **kw):
    from scipy.special import logsumexp

    with quiet():
        return logsumexp(x, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 1)], ids=str)
def test_b_positive(lsm, dtype, axis):
    x = data((4, 6), dtype, seed=10)
    b = (np.random.default_rng(10).random((4, 6)) * 3).astype(dtype)
    xb, bb = x.copy(), b.copy()
    r = lsm.logsumexp(x, axis=axis, b=b)
    assert np.asarray(r).dtype == dtype
    assert_array_equal(x, xb)
    assert_array_equal(b, bb)
    ref = scipy_lse(x.astype(np.float64), axis=axis, b=b.astype(np.float64))
    np.testing.assert_allclose(r, ref, rtol=4 * eps(dtype), atol=4 * eps(dtype))
    if axis is None:
        assert type(r) is dtype


def test_b_broadcast(lsm):
    x = data((3, 5), seed=11)
    b = np.array([1.0, 2.0, 0.5, 0.0, 3.0])
    for axis in (None, 0, 1):
        for keepdims in (False, True):
            r = lsm.logsumexp(x, axis=axis, b=b, keepdims=keepdims)
            ref = scipy_lse(x, axis=axis, b=b, keepdims=keepdims)
            assert np.shape(r) == np.shape(ref)
            np.testing.assert_allclose(r, ref, rtol=4 * eps(np.float64))
    # b of shape (3, 1) and a scalar b
    bc = np.array([[1.0], [2.0], [0.25]])
    np.testing.assert_allclose(lsm.logsumexp(x, axis=1, b=bc), scipy_lse(x, axis=1, b=bc), rtol=4 * eps(np.float64))
    np.testing.assert_allclose(lsm.logsumexp(x, axis=0, b=2.0), scipy_lse(x, axis=0, b=2.0), rtol=4 * eps(np.float64))
    np.testing.assert_allclose(lsm.logsumexp(x, b=[[2.0]]), scipy_lse(x, b=[[2.0]]), rtol=4 * eps(np.float64))


def test_b_broadcast_enlarges_x(lsm):
    # "b broadcasts jointly with x, as in scipy": the result takes the joint shape
    x = np.array([0.5, 1.0, -2.0])
    b = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    r = lsm.logsumexp(x, axis=-1, b=b)
    ref = scipy_lse(x, axis=-1, b=b)
    assert np.shape(r) == np.shape(ref) == (2,)
    np.testing.assert_allclose(r, ref, rtol=4 * eps(np.float64))


def test_b_not_broadcastable(lsm):
    x = data((3, 5))
    with pytest.raises(ValueError):
        lsm.logsumexp(x, b=np.ones(4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("special", [INF, -INF, NAN], ids=str)
def test_b_zero_excludes(lsm, dtype, special):
    x = np.array([[1.0, special, 2.0], [special, special, 0.5]], dtype)
    b = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 2.0]], dtype)
    with no_warnings():
        r = lsm.logsumexp(x, axis=1, b=b)
        v, s = lsm.logsumexp(x, axis=1, b=b, return_sign=True)
    ref = scipy_lse(x.astype(np.float64), axis=1, b=b.astype(np.float64))
    assert np.all(np.isfinite(r))
    np.testing.assert_allclose(r, ref, rtol=4 * eps(dtype))
    np.testing.assert_allclose(r, [np.logaddexp(1.0, 2.0), 0.5 + np.log(2.0)], rtol=4 * eps(dtype))
    assert_array_equal(v, r)
    assert_array_equal(s, [1, 1])
    # all weights zero: an empty sum, even over inf/NaN entries (SPEC: b == 0 entries are
    # excluded even where x is inf or NaN; scipy 1.17 returns NaN here when x has a NaN/inf)
    with no_warnings():
        z = lsm.logsumexp(x, axis=1, b=np.zeros_like(x))
    assert_array_equal(z, [-INF, -INF])


def test_b_all_zero_finite(lsm):
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    with no_warnings():
        z = lsm.logsumexp(x, axis=1, b=np.zeros_like(x))
        v, s = lsm.logsumexp(x, axis=1, b=np.zeros_like(x), return_sign=True)
    assert_array_equal(z, scipy_lse(x, axis=1, b=np.zeros_like(x)))
    assert_array_equal(z, [-INF, -INF])
    assert_array_equal(v, [-INF, -INF])
    assert_array_equal(s, [0, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_b_negative_without_sign_is_nan(lsm, dtype):
    x = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]], dtype)
    b = np.array([[1.0, -1.0], [1.0, -1.0], [2.0, -1.0]], dtype)
    with no_warnings():
        r = lsm.logsumexp(x, axis=1, b=b)
    ref = scipy_lse(x.astype(np.float64), axis=1, b=b.astype(np.float64))
    assert np.isnan(r[0])  # negative sum
    assert np.isnan(ref[0])
    # a positive sum with a negative weight: same as scipy, log(2e - e) = 1 ... for row 2
    np.testing.assert_allclose(r[1:], ref[1:], rtol=4 * eps(dtype))
    np.testing.assert_allclose(r[2], 1.0, rtol=4 * eps(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [None, 0, 1], ids=str)
def test_return_sign(lsm, dtype, axis):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 5)).astype(dtype)
    b = rng.standard_normal((6, 5)).astype(dtype)
    with no_warnings():
        res = lsm.logsumexp(x, axis=axis, b=b, return_sign=True)
    assert isinstance(res, tuple) and len(res) == 2
    v, s = res
    rv, rs = scipy_lse(x.astype(np.float64), axis=axis, b=b.astype(np.float64), return_sign=True)
    assert np.asarray(v).dtype == dtype
    assert np.asarray(s).dtype == dtype
    assert np.shape(v) == np.shape(s) == np.shape(rv)
    assert_array_equal(s, rs)
    assert set(np.unique(s)) <= {-1.0, 0.0, 1.0}
    # compare the signed sums, at the scale of the terms (near-cancellation makes log|s|
    # ill-conditioned)
    x64, b64 = x.astype(np.float64), b.astype(np.float64)
    mag = np.sum(np.abs(b64) * np.exp(x64), axis=axis)
    diff = np.abs(s * np.exp(v.astype(np.float64)) - rs * np.exp(rv))
    assert np.all(diff <= 16 * eps(dtype) * mag)
    if axis is None:
        assert type(v) is dtype and type(s) is dtype


def test_return_sign_without_b(lsm):
    x = data((3, 4), np.float32)
    v, s = lsm.logsumexp(x, axis=1, return_sign=True)
    assert_array_equal(v, lsm.logsumexp(x, axis=1))
    assert_array_equal(s, np.ones(3, np.float32))
    assert s.dtype == np.float32
    v, s = lsm.logsumexp(np.full(3, -INF), return_sign=True)
    assert v == -INF and s == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_cancellation(lsm, dtype):
    x = np.array([[1.0, 1.0], [3.0, 3.0], [0.5, 2.0]], dtype)
    b = np.array([[1.0, -1.0], [-2.0, 2.0], [1.0, -1.0]], dtype)
    with no_warnings():
        v, s = lsm.logsumexp(x, axis=1, b=b, return_sign=True)
        plain = lsm.logsumexp(x, axis=1, b=b)
    assert_array_equal(v[:2], [-INF, -INF])
    assert_array_equal(s[:2], [0, 0])
    assert s[2] == -1
    rv, rs = scipy_lse(x.astype(np.float64), axis=1, b=b.astype(np.float64), return_sign=True)
    assert_array_equal(s, rs)
    np.testing.assert_allclose(v, rv, rtol=4 * eps(dtype))
    # without return_sign: log(0) = -inf as scipy, and NaN for the negative sum
    assert_array_equal(plain[:2], [-INF, -INF])
    assert np.isnan(plain[2])
    assert_array_equal(plain[:2], scipy_lse(x[:2].astype(np.float64), axis=1,
                                            b=b[:2].astype(np.float64)))


def weighted_oracle(x, w):
    """log|sum w exp(x)| over axis 1 and its sign, in long double, by SPEC section 2: entries of
    weight 0 take no part, even where x is inf or NaN."""
    xl, wl = x.astype(np.longdouble), w.astype(np.longdouble)
    take = wl != 0
    with np.errstate(all="ignore"):
        xm = np.where(take, xl, -INF)
        M = np.max(xm, axis=1, initial=-INF)
        top = take & (xl == M[:, None])
        mw = np.sum(np.where(top, wl, 0), axis=1)
        fin = np.isfinite(M)
        rest = np.sum(np.where(take & ~top & fin[:, None], wl * np.exp(xm - np.where(fin, M, 0)[:, None]), 0), axis=1)
        s = mw + rest
        v = np.where(fin, np.log(np.abs(s)) + M, M)
        sg = np.where(fin, np.sign(s), 0.0)
        v = np.where(M == INF, np.where(mw != 0, INF, NAN), v)
        sg = np.where(M == INF, np.where(mw != 0, np.sign(mw), NAN), sg)
        sg = np.where(np.isnan(M), NAN, sg)
    return v, sg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [16, 37, 512, 1300])
@pytest.mark.parametrize("kind", ["b", "b-broadcast", "b-column", "where", "where-strided", "b-where"])
def test_weighted_long_rows(lsm, dtype, n, kind):
    """b= and where= on rows long enough for the kernels' vector loops (and their chunks of
    512), along the last axis and along axis 0, with the special rows of SPEC section 2 among
    ordinary ones; against a long-double oracle, and the gradient against the reference.
    The weights and the mask come in every layout the kernels read: contiguous, one row for
    all (n,), one weight per row (R, 1) (stride 0 along the row), and a mask that is a strided
    view."""
    rng = np.random.default_rng(n)
    R = 9
    x = (2 * rng.standard_normal((R, n))).astype(dtype)
    b = rng.uniform(0.5, 2.0, (R, n)).astype(dtype)
    m = rng.random((R, n)) < 0.8
    if kind == "where-strided":
        m = (rng.random((R, 2 * n)) < 0.8)[:, ::2]      # a view: stride 2 along the row
    x[1, 3], x[1, 5], x[1, n - 1] = INF, NAN, -INF      # row 1: specials of weight 0
    b[1, 3] = b[1, 5] = 0
    m[1, 3] = m[1, 5] = False
    m[2] = False                                        # row 2: nothing taken
    b[2] = 0
    x[3, 7] = NAN                                       # row 3: a NaN taken
    x[4, 2] = x[4, 9] = INF                             # row 4: +inf taken
    b[5, ::2] *= -1                                     # row 5: weights of both signs
    x[6] = dtype(1.5)                                   # row 6: exact cancellation
    b[6] = 1
    b[6, 1::2] = -1
    b[6, n - 1] = 0 if n % 2 else b[6, n - 1]
    x[7, ::5] = x[7].max()                              # row 7: many maxima
    for r in (3, 4, 6):
        m[r] = True
    if kind == "b-broadcast":
        b = b[0]                                        # (n,): one row of weights for all
        x[[1, 2]] = x[0]                                # (the special rows need their own b)
    elif kind == "b-column":
        b = b[:, :1]                                    # (R, 1): one weight per row, a view
        x[1] = x[0]                                     # (row 1's specials need their own b)
    kw = ({"b": b} if kind.startswith("b") and "where" not in kind else
          {"where": m} if kind.startswith("where") else {"b": b, "where": m})
    assert kind != "where-strided" or not m.flags.c_contiguous
    weights = np.broadcast_to(b, x.shape) if "b" in kw else np.ones(x.shape)
    weights = np.where(m, weights, 0) if "where" in kw else weights
    rv, rs = weighted_oracle(x, weights)
    for axis, xx, kk in ((1, x, kw), (0, x.T, {k: v[:, None] if v.ndim == 1 else v.T for k, v in kw.items()})):
        with no_warnings():
            v, s = lsm.logsumexp(xx, axis=axis, return_sign=True, **kk)
            plain = lsm.logsumexp(xx, axis=axis, **kk)
        assert v.dtype == s.dtype == dtype
        assert_array_equal(s, rs.astype(dtype))
        same_special(v, rv.astype(dtype))
        assert_array_equal(np.isnan(plain), np.isnan(rv) | (rs < 0))
        assert_array_equal(plain[rs >= 0], v[rs >= 0])
        pos = np.isfinite(rv) & (rs > 0) & (np.arange(R) != 5)
        assert_lse_close(v[pos], rv[pos], dtype, bound=2.0)
        # the row of mixed signs: its signed sum at the scale of its terms
        mag = np.sum(np.abs(weights[5]) * np.exp(x[5].astype(np.float64)))
        assert abs(s[5] * np.exp(np.float64(v[5])) - rs[5] * np.exp(np.float64(rv[5]))) <= 16 * eps(dtype) * mag
        # the gradient, on the rows whose sum is positive and finite (and the empty row)
        g = np.arange(1, R + 1, dtype=dtype)
        with no_warnings():
            dx = lsm.logsumexp_backward(g, xx, axis=axis, **kk)
        rows = [0, 1, 2, 7]
        dxr = dx if axis == 1 else dx.T
        bsel = kw.get("b")
        bsel = None if bsel is None else np.broadcast_to(bsel, x.shape)[rows]
        msel = None if "where" not in kw else m[rows]
        assert_lse_backward_close(dxr[rows], g[rows], x[rows], axis=1, b=bsel, where=msel)
        assert_array_equal(dxr[weights == 0], 0)
        assert np.isnan(dxr[3][weights[3] != 0]).all()


@pytest.mark.parametrize("n, axis", [(3, 1), (600, 1), (3, 0), (600, 0)])
def test_weighted_signed_cancellation_float32(lsm, n, axis):
    """Weights of both signs whose sum nearly cancels: the sum's rounding is magnified by the
    cancellation, so float32 data must still get its exps in double (a float exp's 2^-24,
    times a cancellation of 1000, missed this by 100x)."""
    rng = np.random.default_rng(n + axis)
    x = (3 * rng.standard_normal((400, n))).astype(np.float32)
    b = (rng.random((400, n)) - 0.3).astype(np.float32)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    partial = np.sum(b[:200, :-1] * e[:200, :-1], axis=1)       # rows 0..199: the last weight
    b[:200, -1] = -partial / e[:200, -1] * (1 - 1e-3)           # cancels all but 1e-3 of it
    xx, bb = (x, b) if axis == 1 else (x.T.copy(), b.T.copy())
    with no_warnings():
        v, s = lsm.logsumexp(xx, axis=axis, b=bb, return_sign=True)
        d = lsm.logsumexp_backward(np.ones(400, np.float32), xx, axis=axis, b=bb)
    d = d if axis == 1 else d.T
    xl, bl = x.astype(np.longdouble), b.astype(np.longdouble)
    M = xl.max(axis=1, keepdims=True)
    terms = bl * np.exp(xl - M)
    S = terms.sum(axis=1, keepdims=True)
    ref = terms / S
    cond = np.abs(terms).sum(axis=1) / np.abs(S[:, 0])
    assert cond.max() > 100                             # some rows do cancel
    assert_array_equal(s, np.sign(S[:, 0]).astype(np.float32))
    ok = np.abs(d - ref) <= 4 * eps(np.float32) * np.abs(ref) + 1e-30
    assert ok.all(), f"{(~ok).sum()} gradient entries off, worst row cancels {cond.max():.0f}x"
    lv = np.log(np.abs(S[:, 0])) + M[:, 0]
    assert_lse_close(v, lv, np.float32, bound=2.0)


def test_where_b_no_input_sized_temporary(backends, monkeypatch):
    """A broadcast b and a mask reach the compiled kernels as views: a call allocates its
    result and O(1) scratch, never an array of x's size (b= and where= of every function).
    (The Python backend is the readable statement of the algorithms: it makes temporaries.)"""
    import tracemalloc

    from cylsm import _api

    compiled = [(name, k) for name, k in backends if name != "python"]
    if not compiled:
        pytest.skip("no compiled kernels in this run (CYLSM_NO_EXTENSIONS)")
    x = data((2048, 1000))              # 16 MB
    b = np.random.default_rng(3).random(1000)
    m = np.random.default_rng(4).random((2048, 1000)) < 0.5
    g = np.ones(2048)
    out = np.empty_like(x)
    calls = [lambda: cylsm.logsumexp(x, axis=1, b=b), lambda: cylsm.logsumexp(x, axis=1, where=m),
             lambda: cylsm.logsumexp(x, axis=1, b=b, where=m[:1]),
             lambda: cylsm.logsumexp(x.T, axis=0, b=b[:, None], return_sign=True),
             lambda: cylsm.logsumexp_backward(g, x, axis=1, b=b, where=m, out=out),
             lambda: cylsm.log_softmax(x, where=m, out=out),
             lambda: cylsm.softmax(x.T, axis=0, where=m.T, out=out.T),
             lambda: cylsm.log_softmax_backward(x, x, where=m, out=out),
             lambda: cylsm.softmax_backward(x.T, x.T, axis=0, where=m[:1].T, out=out.T)]
    for name, kernels in compiled:
        monkeypatch.setattr(_api, "_K", kernels)
        for k, call in enumerate(calls):
            call()
            tracemalloc.start()
            try:
                call()
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < x.nbytes // 64, f"{name}, call {k}: {peak} bytes for a {x.nbytes}-byte x"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_misaligned_arrays_reach_the_kernels_aligned(backends, monkeypatch, dtype):
    """x, out, b and grad one byte off their alignment (still C-contiguous, so NumPy would
    hand them over as they are): every kernel is given aligned arrays (its loads assume
    alignment; UBSan reports the rest), and the results are those of aligned inputs."""
    from cylsm import _api

    rng = np.random.default_rng(5)
    x = data((6, 40), dtype, seed=5)
    b = rng.random(40).astype(dtype)
    w = rng.random((6, 40)) < 0.7
    g = data((6, 40), dtype, seed=6)
    g1 = data(6, dtype, seed=7)
    y = cylsm.log_softmax(x, where=w)
    p = cylsm.softmax(x, where=w)

    def calls(m):
        """Every kind of call, with m applied to the arrays that may be misaligned."""
        return [
            lambda: cylsm.log_softmax(m(x)), lambda: cylsm.log_softmax(m(x), where=w),
            lambda: cylsm.softmax(m(x), axis=0, where=w), lambda: cylsm.softmax(x, out=m(x.copy())),
            lambda: cylsm.logsumexp(m(x), axis=1), lambda: cylsm.logsumexp(m(x), axis=1, b=m(b)),
            lambda: cylsm.logsumexp(m(x), axis=0, b=m(b), where=w, return_sign=True),
            lambda: cylsm.log_softmax_backward(m(g), m(y), where=w, out=m(g.copy())),
            lambda: cylsm.softmax_backward(m(g), m(p), axis=0),
            lambda: cylsm.logsumexp_backward(m(g1), m(x), axis=1),
            lambda: cylsm.logsumexp_backward(m(g1), m(x), axis=1, b=m(b), where=w),
        ]

    def in_place(mx):
        cylsm.log_softmax(mx, where=w, out=mx)
        return mx

    seen = []
    for name, kernels in backends:
        monkeypatch.setattr(_api, "_K", kernels)
        expected = [c() for c in calls(lambda a: a)] + [in_place(x.copy())]
        for fname in ["log_softmax", "softmax", "logsumexp", "logsumexp_weighted",
                      "log_softmax_backward", "softmax_backward", "logsumexp_backward",
                      "logsumexp_backward_weighted"]:
            def spy(*args, _f=getattr(kernels, fname), _name=fname, **kw):
                for k, a in enumerate(list(args) + list(kw.values())):
                    if isinstance(a, np.ndarray):
                        assert a.flags.aligned, f"{name}.{_name}: argument {k} is misaligned"
                seen.append(_name)
                return _f(*args, **kw)
            monkeypatch.setattr(kernels, fname, spy)
        got = [c() for c in calls(misaligned)] + [in_place(misaligned(x))]
        for k, (e, r) in enumerate(zip(expected, got)):
            for ee, rr in zip(e if isinstance(e, tuple) else (e,), r if isinstance(r, tuple) else (r,)):
                assert_array_equal(rr, ee, err_msg=f"{name}, call {k}")
        monkeypatch.undo()
    assert seen                     # the spies were called (the general path, not the shortcut)


def test_return_sign_scalar_cancellation(lsm):
    v, s = lsm.logsumexp([2.0, 2.0], b=[1.0, -1.0], return_sign=True)
    assert v == -INF and s == 0
    assert type(v) is np.float64 and type(s) is np.float64


def test_return_sign_with_out(lsm):
    x = data((4, 5), seed=13)
    b = data((4, 5), seed=14)
    out = np.empty(4)
    v, s = lsm.logsumexp(x, axis=1, b=b, return_sign=True, out=out)
    assert v is out
    assert not np.shares_memory(s, out)
    rv, rs = lsm.logsumexp(x, axis=1, b=b, return_sign=True)
    assert_array_equal(out, rv)
    assert_array_equal(s, rs)


@pytest.mark.parametrize("special", [INF, NAN], ids=str)
def test_return_sign_specials(lsm, special):
    x = np.array([[special, 1.0], [1.0, 2.0]])
    b = np.array([[1.0, 1.0], [0.0, -1.0]])
    with no_warnings():
        v, s = lsm.logsumexp(x, axis=1, b=b, return_sign=True)
    rv, rs = scipy_lse(x, axis=1, b=b, return_sign=True)
    same_special(v[0], rv[0])
    assert v[1] == 2.0 and s[1] == -1
    if special == INF:
        assert s[0] == 1


def test_b_with_float16(lsm):
    x = np.array([1.0, 2.0, 3.0], np.float16)
    b = np.array([1.0, 0.5, 2.0], np.float16)
    r = lsm.logsumexp(x, b=b)
    assert type(r) is np.float16
    assert r == np.float16(lsm.logsumexp(x.astype(np.float32), b=b.astype(np.float32)))


def test_return_sign_of_a_result_far_below_zero(lsm):
    # exp(-999.7) underflows: the sign must still be +1, not derived from exp(result)
    for b in (None, [1.0, 1.0]):
        v, s = lsm.logsumexp([-1000.0, -1001.0], b=b, return_sign=True)
        assert s == 1.0
        assert v == pytest.approx(-1000.0 + np.log1p(np.exp(-1.0)), rel=1e-15)


def test_python_scalars_take_the_arrays_dtype(lsm):
    """A Python float, int or bool grad or b is a "weak" scalar (NEP 50): it leaves a float32
    result float32, as ``x * 2.0`` and scipy 1.17's ``logsumexp(x, b=2.0)`` do (older scipy
    releases return float64 there); a NumPy scalar or 0-d array is not
    (test_result_dtype_by_dtype_not_value)."""
    x = np.array([0.5, -1.0, 2.0], np.float32)
    for w in (2.0, 2, True):
        assert np.asarray(lsm.logsumexp(x, b=w)).dtype == np.float32
        assert lsm.logsumexp_backward(w, x).dtype == np.float32
        assert lsm.logsumexp_backward(w, x, b=w).dtype == np.float32
        assert lsm.log_softmax_backward(w, np.float32(-0.5)).dtype == np.float32
        assert lsm.softmax_backward(w, np.float32(1.0)).dtype == np.float32
    assert_allclose(lsm.logsumexp_backward(1.0, x), lsm.softmax(x, axis=None), rtol=1e-6)
    assert lsm.logsumexp_backward(np.float64(1.0), x).dtype == np.float64
    assert lsm.logsumexp_backward(1.0, [0.0, 1.0]).dtype == np.float64    # a list is an array


def test_result_dtype_by_dtype_not_value(lsm):
    """Promotion goes by dtype alone, as in NumPy 2 (NEP 50), under every supported NumPy:
    NumPy 1.25's value-based casting let a 0-d float64 b leave a float32 x's result float32
    (the fuzzer found it in the NumPy 1.25 leg)."""
    for x in (np.array(0.5, np.float32), np.ones(3, np.float32)):
        v, s = lsm.logsumexp(x, b=np.array(2.0), return_sign=True)
        assert np.asarray(v).dtype == np.asarray(s).dtype == np.float64
        assert lsm.logsumexp_backward(np.array(1.0, np.float32), x, b=np.array(2.0)).dtype \
            == np.float64
