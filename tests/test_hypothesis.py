"""Property tests: random shapes (with 0- and 1-length dimensions), axes, strides (steps,
negative steps, transposes) and values, special values included.  The backend under test (the
``lsm`` fixture) is compared element by element with the pure-Python backend, and both with
scipy.special on finite data.  (With only the Python backend available, the first comparison is
the Python backend against itself, and the scipy comparison still runs.)"""
from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cylsm
from cylsm import _api, _select
from _reference import (
    LD,
    assert_ulp_close,
    eps,
    quiet,
    reduced_shape,
    same_special,
    scipy_ref,
)

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

FORWARD = ["log_softmax", "softmax", "logsumexp"]


@contextlib.contextmanager
def python_backend():
    saved = _api._K
    _api._K = _select.load("python")
    try:
        yield
    finally:
        _api._K = saved


def both(lsm, name, *args, **kw):
    """(result of the backend under test, result of the Python backend)."""
    a = getattr(lsm, name)(*args, **kw)
    with python_backend():
        b = getattr(cylsm, name)(*args, **kw)
    return a, b


# ------------------------------------------------------------------------------------------
# strategies


def finite_elements(dtype):
    lim = 1e4 if dtype == np.float32 else 1e6
    return st.one_of(
        st.floats(-30, 30, width=32 if dtype == np.float32 else 64),
        st.floats(-lim, lim, width=32 if dtype == np.float32 else 64),
    )


def special_elements(dtype):
    fi = np.finfo(dtype)
    return st.one_of(
        finite_elements(dtype),
        st.sampled_from([np.inf, -np.inf, np.nan, 0.0, -0.0, float(fi.max), -float(fi.max),
                         float(fi.smallest_subnormal), float(fi.tiny)]),
        st.floats(width=32 if dtype == np.float32 else 64),
    )


@st.composite
def strided_arrays(draw, finite=True, max_dims=3):
    """An array of random shape, viewed through random steps (negative included) and a random
    transpose; returns (view, dtype)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    ndim = draw(st.integers(0, max_dims))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    steps = [draw(st.sampled_from([1, 1, 2, -1, -2, 3])) for _ in range(ndim)]
    base_shape = tuple(s * abs(k) for s, k in zip(shape, steps))
    elements = finite_elements(dtype) if finite else special_elements(dtype)
    base = draw(hnp.arrays(dtype, base_shape, elements=elements))
    view = base[tuple(slice(None, None, k) for k in steps)] if ndim else base
    if ndim > 1 and draw(st.booleans()):
        view = view.transpose(draw(st.permutations(range(ndim))))
    if draw(st.booleans()):
        view.flags.writeable = False
    return view, dtype


@st.composite
def axes_for(draw, ndim):
    if ndim == 0:
        return draw(st.sampled_from([None, 0, -1, ()]))
    kind = draw(st.sampled_from(["int", "tuple", "none"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    picked = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    return tuple(a - ndim if draw(st.booleans()) else a for a in picked)


def scipy_axis(x, axis):
    return None if np.ndim(x) == 0 else axis


# ------------------------------------------------------------------------------------------
# comparisons


def signed_sums_agree(results, x, b, axis, dtype):
    """logsumexp(..., return_sign=True) results [(v, s), ...] against a long double
    reference.  With negative weights log|s| is ill-conditioned near cancellation, and signs
    agree only where the sum does not nearly cancel: compare the signed sums s * exp(v - m)
    of each line (m: its largest x with b != 0) at the scale of its terms.  Non-finite lines
    must equal the last result's.  (scipy is no reference here: it returns NaN for b == 0
    where exp(x) overflows.)"""
    xl = np.asarray(x).astype(LD)
    bl = np.broadcast_to(np.asarray(b).astype(LD), np.broadcast_shapes(xl.shape, np.shape(b)))
    xl = np.broadcast_to(xl, bl.shape)
    ax = None if xl.ndim == 0 else axis
    with quiet():
        live = bl != 0
        mk = np.max(np.where(live, xl, -np.inf), axis=ax, keepdims=True, initial=-np.inf)
        mk = np.where(np.isfinite(mk), mk, 0)
        terms = np.where(live, bl * np.exp(xl - mk), 0)
        mag = np.sum(np.abs(terms), axis=ax)
        tr = np.sum(terms, axis=ax)
        m = np.reshape(mk, np.shape(tr))
        for v, s in results:
            v, s = np.reshape(v, np.shape(tr)), np.reshape(s, np.shape(tr))   # keepdims
            t = np.asarray(s, LD) * np.exp(np.asarray(v, LD) - m)
            vl = np.asarray(v, LD)
            # v is known to a few eps of |v|: exp(v - m) to a factor exp(+-that), which is
            # no longer 1 + that once |v| * eps nears 1 (x = 2**55: v's ulp in float64 is 8)
            dv = np.minimum(4 * eps(dtype) * np.maximum(1, np.abs(vl)), 1000)
            amp = np.where(np.isfinite(vl), np.expm1(dv) * np.abs(tr), 0)
            tol = 64 * eps(dtype) * mag + amp
            fin = np.isfinite(tr) & np.isfinite(mag)     # inf/NaN rows: compared between backends
            assert np.all((np.abs(t - tr) <= tol)[fin])
            same_special(v, np.reshape(results[-1][0], np.shape(tr)))
            same_special(s, np.reshape(results[-1][1], np.shape(tr)))
            sv = np.asarray(s)
            assert set(np.unique(sv[~np.isnan(sv)])) <= {-1, 0, 1}


def compare_backends(name, a, b, dtype):
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype == dtype
    assert a.shape == b.shape
    same_special(a, b)
    e = eps(dtype)
    if name == "logsumexp":
        # both are within eps * max(1, |r|) of the truth
        with np.errstate(all="ignore"):
            assert_ulp_close(a, b, dtype, 2, abs_extra=3 * e * np.maximum(1, np.abs(a.astype(np.float64))))
    elif name == "log_softmax":
        assert_ulp_close(a, b, dtype, 8)
    else:
        with np.errstate(all="ignore"):
            logp = np.abs(np.log(np.where(a > 0, a, 1).astype(np.float64)))
        assert_ulp_close(a, b, dtype, 8, rel_extra=2 * e * logp)


def compare_scipy(name, res, x, axis, keepdims, dtype):
    kw = {"keepdims": keepdims} if name == "logsumexp" else {}
    ref = np.asarray(scipy_ref(name, x, axis=scipy_axis(x, axis), **kw))
    res = np.asarray(res)
    if np.ndim(x) == 0:
        ref = ref.reshape(res.shape)  # scipy gives shape (1,) for a 0-d input with keepdims
    assert res.shape == ref.shape
    e = eps(dtype)
    if name == "softmax":
        with np.errstate(all="ignore"):
            logp = np.abs(np.log(np.where(ref > 0, ref, 1)))
        assert_ulp_close(res, ref, dtype, 8, rel_extra=e * (2 * logp + 2))
    else:
        # scipy (float64, or float64 arithmetic on float32 data) is off by a few
        # eps * (|result| + 1) at most; so may we be
        same_special(res, ref.astype(res.dtype))
        fin = np.isfinite(ref)
        diff = np.abs(res.astype(LD)[fin] - ref.astype(LD)[fin])
        assert np.all(diff <= 8 * e * (np.abs(ref.astype(LD)[fin]) + 1))


# ------------------------------------------------------------------------------------------
# forward


@SETTINGS
@given(data=st.data(), name=st.sampled_from(FORWARD), keepdims=st.booleans())
def test_forward_finite(lsm, data, name, keepdims):
    x, dtype = data.draw(strided_arrays(finite=True))
    axis = data.draw(axes_for(x.ndim))
    before = x.copy()
    kw = {"axis": axis}
    if name == "logsumexp":
        kw["keepdims"] = keepdims
    a, b = both(lsm, name, x, **kw)
    np.testing.assert_array_equal(x, before)
    expect_shape = reduced_shape(x.shape, axis, keepdims) if name == "logsumexp" else x.shape
    assert np.shape(a) == expect_shape
    compare_backends(name, a, b, dtype)
    if np.ndim(a) == 0 and not keepdims:
        assert type(a) is dtype and type(b) is dtype
    if x.size:  # scipy refuses empty reductions
        compare_scipy(name, a, x, axis, keepdims, dtype)
        compare_scipy(name, b, x, axis, keepdims, dtype)


def _norm(axis, ndim):
    if axis is None:
        return set(range(ndim))
    if isinstance(axis, int):
        return {axis % ndim}
    return {a % ndim for a in axis}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(FORWARD))
def test_forward_special_values(lsm, data, name):
    x, dtype = data.draw(strided_arrays(finite=False))
    axis = data.draw(axes_for(x.ndim))
    before = x.copy()
    a, b = both(lsm, name, x, axis=axis)
    np.testing.assert_array_equal(x, before)
    compare_backends(name, a, b, dtype)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(["log_softmax", "softmax"]))
def test_forward_out_matches(lsm, data, name):
    x, dtype = data.draw(strided_arrays(finite=False, max_dims=2))
    axis = data.draw(axes_for(x.ndim))
    expect = getattr(lsm, name)(x, axis=axis)
    out = np.empty(x.shape, dtype, order=data.draw(st.sampled_from(["C", "F"])))
    assert getattr(lsm, name)(x, axis=axis, out=out) is out
    compare_backends(name, out, expect, dtype)
    if x.flags.writeable:
        y = x.copy()
        assert getattr(lsm, name)(y, axis=axis, out=y) is y
        compare_backends(name, y, expect, dtype)


@SETTINGS
@given(data=st.data())
def test_where_backends(lsm, data):
    x, dtype = data.draw(strided_arrays(finite=False, max_dims=2))
    axis = data.draw(axes_for(x.ndim))
    w = data.draw(hnp.arrays(np.bool_, x.shape))
    for name in FORWARD:
        a, b = both(lsm, name, x, axis=axis, where=w)
        compare_backends(name, a, b, dtype)
        if name != "logsumexp":
            fill = -np.inf if name == "log_softmax" else 0
            assert np.all(np.asarray(a)[~w] == fill)


@SETTINGS
@given(data=st.data())
def test_b_and_sign_backends(lsm, data):
    x, dtype = data.draw(strided_arrays(finite=True, max_dims=2))
    axis = data.draw(axes_for(x.ndim))
    b = data.draw(hnp.arrays(dtype, x.shape, elements=st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.0, 3.0])))
    va, sa = lsm.logsumexp(x, axis=axis, b=b, return_sign=True)
    with python_backend():
        vb, sb = cylsm.logsumexp(x, axis=axis, b=b, return_sign=True)
    assert np.asarray(sa).dtype == np.asarray(va).dtype == dtype
    signed_sums_agree([(va, sa), (vb, sb)], x, b, axis, dtype)


def test_sign_where_v_has_no_fraction(lsm):
    """63 equal x = 2**55, b = -1 once: v = x + log(62), whose float64 ulp (8) is larger than
    log(62) itself (found by tools/fuzz.py, seed 115117840: the check, not the kernels)."""
    x = np.full(63, 2.0**55, np.float32)
    b = np.ones(63)
    b[0] = -1
    va, sa = lsm.logsumexp(x, b=b, return_sign=True)
    assert (va, sa) == (2.0**55 + 8, 1.0)
    signed_sums_agree([(va, sa)], x.astype(np.float64), b, None, np.dtype(np.float64))


# ------------------------------------------------------------------------------------------
# backward


@SETTINGS
@given(data=st.data(), keepdims=st.booleans())
def test_backward_backends(lsm, data, keepdims):
    x, dtype = data.draw(strided_arrays(finite=True))
    axis = data.draw(axes_for(x.ndim))
    g = data.draw(hnp.arrays(dtype, x.shape, elements=st.floats(-10, 10, width=32)))
    e = eps(dtype)
    y = lsm.log_softmax(x, axis=axis)
    p = lsm.softmax(x, axis=axis)
    axes = tuple(sorted(_norm(axis, x.ndim))) if x.ndim else ()

    a, b = both(lsm, "log_softmax_backward", g, y, axis=axis)
    gl = np.abs(g.astype(LD))
    scale = gl + np.exp(np.asarray(y, LD)) * np.sum(gl, axis=axes, keepdims=True)
    # the rounding of a result into the subnormal range costs one spacing there, whatever scale
    floor = float(np.finfo(dtype).smallest_subnormal)
    assert np.all(np.abs(np.asarray(a, LD) - np.asarray(b, LD)) <= 16 * e * scale + floor)

    a, b = both(lsm, "softmax_backward", g, p, axis=axis)
    pl = np.asarray(p, LD)
    scale = pl * (gl + np.sum(gl * pl, axis=axes, keepdims=True))
    assert np.all(np.abs(np.asarray(a, LD) - np.asarray(b, LD)) <= 16 * e * scale + floor)

    gr = data.draw(hnp.arrays(dtype, reduced_shape(x.shape, axis, keepdims),
                              elements=st.floats(-10, 10, width=32)))
    a, b = both(lsm, "logsumexp_backward", gr, x, axis=axis, keepdims=keepdims)
    assert np.shape(a) == x.shape
    # |a - b| within a few ulp of the weights plus the |x - lse| floor of each
    with quiet():
        wts = np.asarray(lsm.logsumexp_backward(np.ones_like(gr), x, axis=axis, keepdims=keepdims),
                         np.float64)
        grow = np.abs(gr if keepdims else np.expand_dims(gr, axes)).astype(np.float64)
        t = np.abs(np.log(np.where(wts > 0, wts, 1)))
        tol = grow * wts * e * (8 + 2 * t) + 8 * grow * float(np.finfo(dtype).smallest_subnormal)
    assert np.all(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= tol)
