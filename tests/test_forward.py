"""Forward values of log_softmax, softmax and logsumexp against scipy.special and a
high-precision reference: dtypes, axes, keepdims, layouts, out=, array-likes, scalars."""
from __future__ import annotations

import array

import numpy as np
import pytest
import scipy.special
from numpy.testing import assert_allclose, assert_array_equal

from _reference import (
    assert_lse_backward_close,
    assert_lse_close,
    LD,
    assert_ulp_close,
    eps,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    reduced_shape,
    same_special,
    scipy_ref,
)

FORWARD = ["log_softmax", "softmax", "logsumexp"]
ELEMENTWISE = ["log_softmax", "softmax"]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def data(shape, dtype=np.float64, seed=0, scale=3.0):
    return (rng(seed).standard_normal(shape) * scale).astype(dtype)


def call(lsm, name, x, axis="default", **kw):
    f = getattr(lsm, name)
    if axis == "default":
        return f(x, **kw)
    return f(x, axis=axis, **kw)


def expected(name, x, axis="default", keepdims=False):
    """scipy's value, computed in float64 (long double for long double input)."""
    if axis == "default":
        axis = None if name == "logsumexp" else -1
    kw = {"keepdims": keepdims} if name == "logsumexp" else {}
    return scipy_ref(name, x, axis=axis, **kw)


def check_close(name, res, x, axis="default", keepdims=False, dtype=None):
    """Compare with scipy (tolerances in the result dtype's eps) and the exact reference."""
    dtype = np.dtype(dtype or res.dtype)
    e = eps(dtype)
    ref = np.asarray(expected(name, x, axis, keepdims))
    res = np.asarray(res)
    assert res.shape == ref.shape
    if name == "softmax":
        # inherent floor of |x_i - max|/2 ulp; allow it twice plus a few ulps
        logp = np.abs(np.log(np.where(ref > 0, ref, 1)))
        assert_ulp_close(res, ref, dtype, 8, rel_extra=e * (logp + 1))
    else:
        # scipy's own error is a few eps * (|result| + 1); compare at that scale
        diff = np.abs(res.astype(LD) - ref.astype(LD))
        bad = ~(diff <= 8 * e * (np.abs(ref.astype(LD)) + 1))
        assert not bad.any(), (res[bad][:5], ref[bad][:5])


def consistent(name, a, b):
    """Two results of one function on the same data: within the spec's accuracy of each other."""
    a = np.asarray(a)
    dtype = a.dtype
    e = eps(dtype)
    if name == "softmax":
        logp = np.abs(np.log(np.where(a > 0, a, 1).astype(np.float64)))
        assert_ulp_close(a, b, dtype, 8, rel_extra=e * logp)
    elif name == "log_softmax":
        assert_ulp_close(a, b, dtype, 8)
    else:
        assert_ulp_close(a, b, dtype, 2, abs_extra=2 * e * np.maximum(1, np.abs(a.astype(np.float64))))


# ------------------------------------------------------------------------------------------
# basic values and dtypes


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (100,), (3, 5), (4, 1), (1, 6), (2, 3, 4)])
def test_matches_scipy(lsm, name, dtype, shape):
    x = data(shape, dtype, seed=len(shape) * 10 + shape[-1])
    res = call(lsm, name, x)
    assert isinstance(res, (np.ndarray, np.generic))
    assert res.dtype == dtype
    check_close(name, res, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_high_precision_reference(lsm, dtype):
    x = data((6, 33), dtype, seed=3, scale=10)
    assert_ulp_close(lsm.log_softmax(x), ref_log_softmax(x), dtype, 4)
    assert_lse_close(lsm.logsumexp(x, axis=1), ref_logsumexp(x, axis=1), dtype)
    p = lsm.softmax(x)
    r = ref_softmax(x)
    assert_ulp_close(p, r, dtype, 4, rel_extra=eps(dtype) * np.abs(np.log(r.astype(np.float64))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["max in second", "first all -inf", "first underflows",
                                  "first subnormal", "nan", "inf"])
def test_softmax_rows_of_two_superblocks(lsm, case, dtype):
    """softmax rows of up to 8 MB keep the exps of their sum pass, each superblock (131072
    elements) relative to its own maximum, and rescale them: the maximum in the second
    superblock, a first superblock of -inf (nothing stored there), one whose terms underflow
    or give subnormal results, and NaN / inf rows that fall back to the plain path."""
    n = 200_000
    x = data((2, n), dtype, seed=11, scale=3)
    x[:, 150_000] = 20.0
    low = 0 if dtype == np.float32 else 1      # shifts to underflow and to subnormal terms
    if case == "first all -inf":
        x[:, :131072] = -np.inf
    elif case == "first underflows":
        x[:, :131072] -= (300.0, 800.0)[low]
    elif case == "first subnormal":
        x[:, :131072] -= (100.0, 720.0)[low]
    elif case == "nan":
        x[1, 5] = np.nan
    elif case == "inf":
        x[1, 5] = np.inf
    p = lsm.softmax(x)
    rows = 1 if case in ("nan", "inf") else 2       # row 1 is then special: scipy's values
    if rows == 1:
        with np.errstate(all="ignore"):
            assert_array_equal(p[1], scipy.special.softmax(x[1].astype(np.float64)))
    r = ref_softmax(x[:rows])
    log_r = np.log(np.maximum(r.astype(np.float64), 1e-300))
    assert_ulp_close(p[:rows], r, dtype, 4, rel_extra=eps(dtype) * np.abs(log_r))
    assert_array_equal(lsm.softmax(x, out=np.full_like(x, np.nan)), p)
    # logsumexp_backward is g times the softmax and keeps its exps the same way
    g = np.array([1.5, -0.25], dtype)
    d = lsm.logsumexp_backward(g, x, axis=-1, out=np.full_like(x, np.nan))
    assert_lse_backward_close(d[:rows], g[:rows], x[:rows], axis=-1)
    if rows == 1:       # g * exp(x - logsumexp(x)): NaN where x is inf or NaN, else 0
        x1 = x[1].astype(np.float64)
        with np.errstate(all="ignore"):
            same_special(d[1], g[1] * np.exp(x1 - scipy.special.logsumexp(x1)))


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize(
    "dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint64, np.bool_]
)
def test_integer_and_bool_give_float64(lsm, name, dtype):
    if dtype is np.bool_:
        x = np.array([[True, False, True], [False, False, True]])
    else:
        info = np.iinfo(dtype)
        x = np.array([[0, 1, 5], [info.max, info.max, info.max - 1]], dtype=dtype)
    res = call(lsm, name, x, axis=1) if name == "logsumexp" else call(lsm, name, x)
    assert res.dtype == np.float64
    ref = call(lsm, name, x.astype(np.float64), axis=1) if name == "logsumexp" else call(
        lsm, name, x.astype(np.float64))
    assert_array_equal(res, ref)


def test_uint8_no_wraparound(lsm):
    r = lsm.logsumexp(np.array([255, 255], np.uint8))
    assert type(r) is np.float64
    assert r == 255 + np.log(2)
    y = lsm.log_softmax(np.array([255, 0], np.uint8))
    np.testing.assert_allclose(y, [-np.log1p(np.exp(-255.0)), -255.0], rtol=1e-15)
    p = lsm.softmax(np.array([255, 255, 1], np.uint8))
    np.testing.assert_allclose(p, scipy_ref("softmax", np.array([255.0, 255.0, 1.0])), rtol=1e-15)


def test_int64_large_values(lsm):
    x = np.array([2**40, 2**40 - 1], np.int64)
    r = lsm.logsumexp(x)
    np.testing.assert_allclose(r, 2.0**40 + np.log1p(np.exp(-1.0)), rtol=1e-15)


@pytest.mark.parametrize("name", FORWARD)
def test_float16_computed_in_float32(lsm, name):
    x = data((5, 9), np.float16, seed=1)
    res = call(lsm, name, x, axis=-1)
    assert res.dtype == np.float16
    ref = call(lsm, name, x.astype(np.float32), axis=-1).astype(np.float16)
    assert_array_equal(res, ref)
    assert_ulp_close(res, expected(name, x, -1), np.float16, 1)


def test_float16_scalar_result(lsm):
    r = lsm.logsumexp(np.array([1, 2, 3], np.float16))
    assert type(r) is np.float16
    assert r == np.float16(scipy_ref("logsumexp", np.array([1.0, 2.0, 3.0])))


def test_float16_huge(lsm):
    # 60000 + log 2 is below float16's max (65504): no overflow through float32 computing
    r = lsm.logsumexp(np.array([60000, 60000], np.float16))
    assert r == np.float16(60000)
    y = lsm.log_softmax(np.array([60000, 60000], np.float16))
    assert_array_equal(y, np.float16([-np.log(2), -np.log(2)]))


@pytest.mark.parametrize("name", FORWARD)
def test_longdouble(lsm, name):
    x = (data((3, 8), np.float64, seed=2) + 1e-3).astype(LD) + LD(2) ** -60
    res = call(lsm, name, x, axis=-1)
    assert res.dtype == LD
    ref = {"log_softmax": ref_log_softmax, "softmax": ref_softmax}.get(name)
    ref = ref(x, axis=-1) if ref else ref_logsumexp(x, axis=-1)
    # far below float64's eps: the computation is not done in float64
    e = eps(LD)
    np.testing.assert_allclose(res, ref, rtol=64 * e, atol=64 * e)


def test_longdouble_near_zero(lsm):
    x = np.array([0, -40], LD)
    r = lsm.logsumexp(x)
    assert type(r) is LD
    ref = np.log1p(np.exp(LD(-40)))
    assert abs(r - ref) <= 4 * np.spacing(ref)
    y = lsm.log_softmax(x)
    assert abs(y[0] + ref) <= 4 * np.spacing(ref)


# ------------------------------------------------------------------------------------------
# axes and keepdims

AXES = [0, 1, 2, -1, -2, -3, (0,), (0, 2), (2, 0), (0, 1), (1, 2), (-1, 0), (0, 1, 2), None, ()]


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axes(lsm, name, axis, dtype):
    x = data((3, 4, 5), dtype, seed=7)
    res = call(lsm, name, x, axis=axis)
    assert res.dtype == dtype
    if name == "logsumexp":
        assert res.shape == reduced_shape(x.shape, axis, False)
    else:
        assert res.shape == x.shape
    check_close(name, res, x, axis)


@pytest.mark.parametrize("axis", AXES, ids=str)
def test_logsumexp_keepdims(lsm, axis):
    x = data((3, 4, 5), np.float64, seed=8)
    res = lsm.logsumexp(x, axis=axis, keepdims=True)
    assert isinstance(res, np.ndarray)
    assert res.shape == reduced_shape(x.shape, axis, True)
    assert res.shape == np.sum(x, axis=axis, keepdims=True).shape
    check_close("logsumexp", res, x, axis, keepdims=True)
    plain = lsm.logsumexp(x, axis=axis)
    assert_array_equal(np.reshape(res, np.shape(plain)), plain)


def test_empty_axis_tuple_is_identity(lsm):
    x = data((2, 3), np.float64, seed=9)
    assert_array_equal(lsm.logsumexp(x, axis=()), x)
    assert_array_equal(lsm.log_softmax(x, axis=()), np.zeros_like(x))
    assert_array_equal(lsm.softmax(x, axis=()), np.ones_like(x))


def test_default_axes(lsm):
    x = data((3, 4), np.float64, seed=10)
    # log_softmax/softmax default to the last axis, logsumexp to all axes
    assert_array_equal(lsm.log_softmax(x), lsm.log_softmax(x, axis=-1))
    assert_array_equal(lsm.softmax(x), lsm.softmax(x, axis=-1))
    r = lsm.logsumexp(x)
    assert np.ndim(r) == 0
    assert r == lsm.logsumexp(x, axis=None)
    assert r == lsm.logsumexp(x, axis=(0, 1))


def test_numpy_integer_axis(lsm):
    x = data((3, 4), np.float64, seed=11)
    assert_array_equal(lsm.log_softmax(x, axis=np.int64(0)), lsm.log_softmax(x, axis=0))
    assert_array_equal(lsm.logsumexp(x, axis=np.intp(1)), lsm.logsumexp(x, axis=1))


# ------------------------------------------------------------------------------------------
# 0-d, empty, scalars


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_zero_d(lsm, dtype, axis):
    x = np.array(3.25, dtype)
    r = lsm.logsumexp(x, axis=axis)
    assert type(r) is dtype
    assert r == dtype(3.25)
    y = lsm.log_softmax(x, axis=axis)
    assert type(y) is dtype
    assert y == 0
    p = lsm.softmax(x, axis=axis)
    assert type(p) is dtype
    assert p == 1
    k = lsm.logsumexp(x, axis=axis, keepdims=True)
    assert np.shape(k) == ()
    assert k == dtype(3.25)


def test_numpy_scalar_inputs(lsm):
    assert type(lsm.logsumexp(np.float32(2.5))) is np.float32
    assert type(lsm.log_softmax(np.float32(2.5))) is np.float32
    assert type(lsm.softmax(np.float64(2.5))) is np.float64
    assert lsm.softmax(np.float64(2.5)) == 1.0


@pytest.mark.parametrize("value", [3, 3.5, True, -7])
def test_python_scalars(lsm, value):
    r = lsm.logsumexp(value)
    assert type(r) is np.float64
    assert r == float(value)
    y = lsm.log_softmax(value)
    assert type(y) is np.float64
    assert y == 0.0
    p = lsm.softmax(value)
    assert type(p) is np.float64
    assert p == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_full_reduction_scalar_types(lsm, dtype):
    x = data((3, 4), dtype, seed=12)
    for axis in (None, (0, 1), (1, 0), (-1, -2)):
        r = lsm.logsumexp(x, axis=axis)
        assert type(r) is dtype, (axis, type(r))
    r1 = lsm.logsumexp(x[0])
    assert type(r1) is dtype
    # a partial reduction stays an array
    assert isinstance(lsm.logsumexp(x, axis=0), np.ndarray)
    k = lsm.logsumexp(x, keepdims=True)
    assert isinstance(k, np.ndarray) and k.shape == (1, 1)
    # an elementwise result of a 1-element array stays an array
    y = lsm.log_softmax(x[:1, :1])
    assert isinstance(y, np.ndarray) and y.shape == (1, 1)


def test_empty_arrays(lsm):
    for dtype in (np.float32, np.float64):
        e = np.zeros((0,), dtype)
        r = lsm.logsumexp(e)
        assert type(r) is dtype and r == -np.inf
        y = lsm.log_softmax(e)
        assert isinstance(y, np.ndarray) and y.shape == (0,) and y.dtype == dtype
        p = lsm.softmax(e)
        assert p.shape == (0,) and p.dtype == dtype
    e = np.zeros((3, 0))
    assert_array_equal(lsm.logsumexp(e, axis=1), np.full(3, -np.inf))
    assert lsm.logsumexp(e, axis=0).shape == (0,)
    assert lsm.logsumexp(e, axis=0, keepdims=True).shape == (1, 0)
    assert_array_equal(lsm.logsumexp(e, axis=1, keepdims=True), np.full((3, 1), -np.inf))
    assert lsm.logsumexp(e) == -np.inf
    assert lsm.log_softmax(e, axis=0).shape == (3, 0)
    assert lsm.softmax(e, axis=1).shape == (3, 0)
    e = np.zeros((0, 4), np.float32)
    assert_array_equal(lsm.logsumexp(e, axis=0), np.full(4, -np.inf, np.float32))
    assert lsm.logsumexp(e, axis=1).shape == (0,)
    assert lsm.log_softmax(e).shape == (0, 4)
    assert lsm.softmax(e, axis=0).shape == (0, 4)


# ------------------------------------------------------------------------------------------
# array-likes


def test_lists(lsm):
    x = [[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]]
    a = np.array(x)
    assert_array_equal(lsm.log_softmax(x), lsm.log_softmax(a))
    assert_array_equal(lsm.softmax(x, axis=0), lsm.softmax(a, axis=0))
    assert lsm.logsumexp(x) == lsm.logsumexp(a)
    assert lsm.logsumexp([1, 2, 3]) == lsm.logsumexp(np.array([1.0, 2.0, 3.0]))
    assert lsm.log_softmax([1, 2]).dtype == np.float64
    check_close("log_softmax", lsm.log_softmax(x), a)


def test_buffer_protocol(lsm):
    d = array.array("d", [1.0, 2.0, 4.0])
    r = lsm.log_softmax(d)
    assert r.dtype == np.float64
    assert_array_equal(r, lsm.log_softmax(np.array([1.0, 2.0, 4.0])))
    f = array.array("f", [1.0, 2.0, 4.0])
    assert lsm.logsumexp(f).dtype == np.float32
    assert lsm.logsumexp(memoryview(f)) == lsm.logsumexp(np.array([1, 2, 4], np.float32))


def test_tuple_input(lsm):
    assert_array_equal(lsm.softmax((0.0, 0.0)), [0.5, 0.5])


# ------------------------------------------------------------------------------------------
# layouts: non-contiguous, negative strides, Fortran order, read-only; inputs never modified


def layouts(dtype):
    base = data((8, 10), dtype, seed=13)
    return {
        "c": base.copy(),
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "step": base[::2, ::3],
        "negative": base[::-1, ::-2],
        "negative_both": base[::-3, ::-1],
        "column_view": base[:, 3],
        "readonly": _readonly(base.copy()),
        "readonly_strided": _readonly(base[1::2, ::-1]),
        "broadcast": np.broadcast_to(base[0], (4, 10)),
    }


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, -1, None, (0, 1)], ids=str)
@pytest.mark.parametrize(
    "layout",
    ["c", "fortran", "transposed", "step", "negative", "negative_both", "column_view", "readonly",
     "readonly_strided", "broadcast"],
)
def test_layouts(lsm, name, dtype, axis, layout):
    x = layouts(dtype)[layout]
    if x.ndim == 1 and axis == (0, 1):
        axis = (0,)
    before = x.copy()
    res = call(lsm, name, x, axis=axis)
    assert_array_equal(x, before)
    assert res.dtype == dtype
    # same result as on a contiguous copy (another kernel may sum in another order)
    consistent(name, res, call(lsm, name, np.ascontiguousarray(x), axis=axis))
    check_close(name, res, x, axis)


def test_large_strides_3d(lsm):
    base = data((6, 7, 9), np.float64, seed=14)
    x = base[::-2, 1::3, ::-4]
    before = x.copy()
    for axis in (0, 1, 2, (0, 2), None):
        r = lsm.logsumexp(x, axis=axis)
        consistent("logsumexp", r, lsm.logsumexp(np.ascontiguousarray(x), axis=axis))
        check_close("logsumexp", r, x, axis)
        y = lsm.log_softmax(x, axis=axis)
        consistent("log_softmax", y, lsm.log_softmax(x.copy(), axis=axis))
        check_close("log_softmax", y, x, axis)
    assert_array_equal(x, before)


# ------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_elementwise(lsm, name, dtype):
    x = data((4, 6), dtype, seed=15)
    expect = call(lsm, name, x)
    out = np.full(x.shape, np.nan, dtype)
    res = call(lsm, name, x, out=out)
    assert res is out
    assert_array_equal(out, expect)


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("axis", [0, 1, None])
def test_out_other_memory_order(lsm, name, axis):
    x = data((5, 7), np.float64, seed=16)
    expect = call(lsm, name, x, axis=axis)
    out = np.empty((5, 7), order="F")
    assert call(lsm, name, x, axis=axis, out=out) is out
    consistent(name, out, expect)
    # and a non-contiguous out
    big = np.zeros((10, 14))
    out2 = big[::2, ::-2]
    assert call(lsm, name, x, axis=axis, out=out2) is out2
    consistent(name, out2, expect)
    assert np.all(big[1::2] == 0) and np.all(big[:, ::2] == 0)  # nothing written outside out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_softmax_rows_of_every_length(lsm, dtype):
    """Rows of 1 to 40 elements and a few longer (every remainder of 16, 8 and 4 lanes, short
    tiles and the row kernel): in place, into out= and allocating give the same bits, match
    (x - M) - log1p(sum exp(x - M) - 1) formed in float64 (float32 data; float64 data within 4 ulp
    of a long double reference), and nothing past the rows of out is written (the vector
    kernels store their last lanes under masks)."""
    wide = np.longdouble if dtype == np.float64 else np.float64
    for n in [*range(1, 41), 100, 255, 257, 1000, 1031]:
        x = data((5, n), dtype, seed=n)
        xw = x.astype(wide)
        m = xw.max(axis=1, keepdims=True)
        t = np.where(xw == m, 0, np.exp(xw - m)).sum(axis=1, keepdims=True)
        ref = (xw - m) - np.log1p(t + ((xw == m).sum(axis=1, keepdims=True) - 1))
        fresh = lsm.log_softmax(x, axis=1)
        buf = np.full(5 * n + 40, 7.0, dtype)
        out = buf[:5 * n].reshape(5, n)
        assert lsm.log_softmax(x, axis=1, out=out) is out
        y = x.copy()
        assert lsm.log_softmax(y, axis=1, out=y) is y
        assert fresh.tobytes() == out.tobytes() == y.tobytes(), n
        assert np.all(buf[5 * n:] == 7.0), n
        err = np.abs(fresh.astype(wide) - ref) / np.spacing(np.abs(ref).astype(dtype))
        assert err.max() <= (1.0 if dtype == np.float32 else 4.0), (n, err.max())


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("axis", [0, -1, None, (0, 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 9), (3, 700)], ids=str)   # short rows, the row kernel
def test_out_in_place(lsm, name, axis, dtype, shape):
    x = data(shape, dtype, seed=17)
    expect = call(lsm, name, x.copy(), axis=axis)
    res = call(lsm, name, x, axis=axis, out=x)
    assert res is x
    consistent(name, x, expect)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_out_in_place_fortran_and_strided(lsm, name):
    x = np.asfortranarray(data((6, 9), np.float64, seed=18))
    expect = call(lsm, name, x.copy(), axis=0)
    assert call(lsm, name, x, axis=0, out=x) is x
    consistent(name, x, expect)
    base = data((12, 9), np.float64, seed=19)
    v = base[::-2]
    expect = call(lsm, name, v.copy())
    assert call(lsm, name, v, out=v) is v
    consistent(name, v, expect)


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("shift", [1, -1, 3])
def test_out_partial_overlap_1d(lsm, name, shift):
    buf = data((20,), np.float64, seed=20)
    n = 20 - abs(shift)
    x = buf[max(0, -shift): max(0, -shift) + n]
    out = buf[max(0, shift): max(0, shift) + n]
    assert np.shares_memory(x, out)
    expect = call(lsm, name, x.copy())
    res = call(lsm, name, x, out=out)
    assert res is out
    consistent(name, out, expect)


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("axis", [0, 1])
def test_out_partial_overlap_2d(lsm, name, axis):
    buf = data((6, 11), np.float64, seed=21)
    x = buf[:, :10]
    out = buf[:, 1:]
    expect = call(lsm, name, x.copy(), axis=axis)
    assert call(lsm, name, x, axis=axis, out=out) is out
    consistent(name, out, expect)
    # the transposed view overlapping its source
    buf = data((7, 7), np.float64, seed=22)
    x = buf[:6, :6]
    out = buf[1:, 1:].T
    expect = call(lsm, name, x.copy(), axis=axis)
    assert call(lsm, name, x, axis=axis, out=out) is out
    consistent(name, out, expect)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_logsumexp(lsm, dtype):
    x = data((4, 5), dtype, seed=23)
    out = np.empty(4, dtype)
    assert lsm.logsumexp(x, axis=1, out=out) is out
    assert_array_equal(out, lsm.logsumexp(x, axis=1))
    out = np.empty((1, 5), dtype)
    assert lsm.logsumexp(x, axis=0, keepdims=True, out=out) is out
    assert_array_equal(out, lsm.logsumexp(x, axis=0, keepdims=True))
    # full reduction into a 0-d array: the array is returned, not a scalar
    out0 = np.empty((), dtype)
    r = lsm.logsumexp(x, out=out0)
    assert r is out0
    assert out0 == lsm.logsumexp(x)
    # 0-d input into a 0-d out
    out0 = np.empty((), dtype)
    assert lsm.log_softmax(np.array(1.5, dtype), out=out0) is out0
    assert out0 == 0


def test_out_logsumexp_overlapping_input(lsm):
    x = data((5, 6), np.float64, seed=24)
    expect = lsm.logsumexp(x.copy(), axis=1)
    out = x[:, 0]  # writes into the first column of the input being reduced
    assert lsm.logsumexp(x, axis=1, out=out) is out
    consistent("logsumexp", out, expect)
    x = data((5, 6), np.float64, seed=25)
    expect = lsm.logsumexp(x.copy(), axis=0)
    out = x[2]
    assert lsm.logsumexp(x, axis=0, out=out) is out
    consistent("logsumexp", out, expect)


def test_out_float16_and_dtype(lsm):
    x = data((3, 4), np.float64, seed=26)
    out = np.empty((3, 4), np.float32)
    assert lsm.log_softmax(x, dtype=np.float32, out=out) is out
    assert_array_equal(out, lsm.log_softmax(x.astype(np.float32)))
    h = x.astype(np.float16)
    out = np.empty((3, 4), np.float16)
    assert lsm.softmax(h, out=out) is out
    assert_array_equal(out, lsm.softmax(h))


# ------------------------------------------------------------------------------------------
# dtype=


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize(
    "src,dst",
    [
        (np.float64, np.float32),
        (np.float32, np.float64),
        (np.int32, np.float32),
        (np.float64, np.float16),
        (np.float32, LD),
        (np.float64, "float32"),
        (np.float32, np.dtype(np.float64)),
    ],
    ids=str,
)
def test_dtype_argument(lsm, name, src, dst):
    x = (data((3, 7), np.float64, seed=27) * 3).astype(src)
    res = call(lsm, name, x, axis=-1, dtype=dst)
    assert res.dtype == np.dtype(dst)
    # the input is cast first, then computed in that dtype
    assert_array_equal(res, call(lsm, name, x.astype(dst), axis=-1))


def test_dtype_scalar_result(lsm):
    x = data((3, 7), np.float64, seed=28)
    r = lsm.logsumexp(x, dtype=np.float32)
    assert type(r) is np.float32
    assert r == lsm.logsumexp(x.astype(np.float32))


def test_dtype_cast_first_matters(lsm):
    # values distinct in float64 but equal in float32: casting first gives exactly log 2
    x = np.array([1.0, 1.0 + 1e-12])
    y = lsm.log_softmax(x, dtype=np.float32)
    assert_array_equal(y, np.float32([-np.log(2), -np.log(2)]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_dimensional_logsumexp_over_last_axis_is_a_scalar(lsm, dtype):
    # the shortcut for C-contiguous arrays must return NumPy scalars for 0-d results too
    for axis in (-1, 0, None):
        r = lsm.logsumexp(np.zeros(1, dtype), axis=axis)
        assert type(r) is dtype and r == 0


def test_first_and_last_axis_take_the_shortcut(lsm, monkeypatch):
    """A C-contiguous array reduced over its last axis (-1 or ndim - 1) or its first (0 or
    -ndim: columns) takes the compiled backends' shortcut (the general path cost 10-20x more
    on small arrays), logsumexp with keepdims=True too; the results are the general path's,
    bit for bit (a NumPy integer axis takes that path).  Other axes, and an axis out of range,
    still take the general path and its checks."""
    from cylsm import _api

    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal((3, 4, 5))
    grads = {2: rng.standard_normal((3, 4)), 0: rng.standard_normal((4, 5))}
    calls = {
        "log_softmax": lambda ax: lsm.log_softmax(x, axis=ax),
        "softmax": lambda ax: lsm.softmax(x, axis=ax, out=np.empty_like(x)),
        "logsumexp": lambda ax: lsm.logsumexp(x, axis=ax),
        "logsumexp keepdims": lambda ax: lsm.logsumexp(x, axis=ax, keepdims=True),
        "log_softmax_backward": lambda ax: lsm.log_softmax_backward(g, x, axis=ax),
        "softmax_backward": lambda ax: lsm.softmax_backward(g, x, axis=ax),
        "logsumexp_backward": lambda ax: lsm.logsumexp_backward(grads[int(ax) % 3], x, axis=ax),
    }
    expected = {(name, ax): f(np.int64(ax)) for name, f in calls.items() for ax in (2, 0)}
    general = []
    K = _api._K                         # this test's backend (undo() below forgets it)
    if K is not _api._python:           # the general path's kernels must not be reached
        for name in calls:
            if hasattr(K, name):
                monkeypatch.setattr(K, name, lambda *a, _n=name: general.append(_n))
    for name, f in calls.items():
        for ax, same in ((2, 2), (-1, 2), (0, 0), (-3, 0)):
            assert_array_equal(f(ax), expected[name, same], err_msg=f"{name} axis={ax}")
            assert np.shape(f(ax)) == np.shape(expected[name, same])
    assert general == []
    monkeypatch.undo()
    monkeypatch.setattr(_api, "_K", K)
    assert expected["logsumexp keepdims", 2].shape == (3, 4, 1)
    assert expected["logsumexp keepdims", 0].shape == (1, 4, 5)
    for name, f in calls.items():       # out of range: the general path's AxisError
        with pytest.raises(_api.AxisError):
            f(3)
    assert lsm.logsumexp(x, axis=1).shape == (3, 5)             # a middle axis


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_contiguous_out_edge_cases(lsm, name):
    # the shortcut for C-contiguous arrays must hand these to the general path
    f = getattr(lsm, name)
    x = np.random.default_rng(5).standard_normal((4, 6))
    expected = f(x)
    with pytest.raises(ValueError, match="shape"):
        f(x, out=np.empty((6, 4)))                  # same size, other shape
    with pytest.raises(ValueError, match="dtype"):
        f(x, out=np.empty((4, 6), np.float32))
    buf = np.zeros(30)
    xs = buf[:24].reshape(4, 6)
    xs[...] = x
    out = buf[6:30].reshape(4, 6)                   # overlaps x, shifted by one row
    f(xs, out=out)
    assert_allclose(out, expected, rtol=1e-15, atol=0)
    y = x.copy()
    assert f(y, out=y) is y
    assert_allclose(y, expected, rtol=1e-15, atol=0)


def test_contiguous_logsumexp_out(lsm):
    x = np.random.default_rng(6).standard_normal((3, 5))
    out = np.empty(3)
    assert lsm.logsumexp(x, axis=-1, out=out) is out
    assert_allclose(out, scipy.special.logsumexp(x, axis=-1), rtol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        lsm.logsumexp(x, axis=-1, out=np.empty(5))
    scalar_out = np.empty(())
    assert lsm.logsumexp(x, out=scalar_out) is scalar_out
    assert_allclose(scalar_out, scipy.special.logsumexp(x), rtol=1e-15)
