"""SPEC section 3: special values, row by row, for logsumexp, log_softmax and softmax.

Every row is checked on its own (1-D), as one row of a 2-D array reduced over axis -1 and as one
column of a 2-D array reduced over axis 0, so that both the row kernel and the strided-column
kernel see it; the neighbouring rows are ordinary finite data that must come out unaffected.
No warning may be emitted.
"""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from _reference import (
    assert_lse_close,
    assert_ulp_close,
    eps,
    no_warnings,
    ref_log_softmax,
    ref_logsumexp,
    ref_softmax,
    same_special,
)

INF = np.inf
NAN = np.nan
DTYPES = [np.float32, np.float64]


def _expect_all(value):
    return lambda row: np.full(len(row), value)


def _inf_log_softmax(row):
    row = np.asarray(row)
    return np.where(row == INF, NAN, -INF)


def _finite_ref(fn):
    def f(row):
        return fn(np.asarray(row))
    return f


# (id, row, expected logsumexp or None for "reference", log_softmax, softmax)
# None means: compare with the high-precision reference (and -inf entries exact).
ROWS = [
    ("all_-inf", [-INF, -INF, -INF], -INF, _expect_all(NAN), _expect_all(NAN)),
    ("single_-inf", [-INF], -INF, _expect_all(NAN), _expect_all(NAN)),
    ("nan_middle", [1.0, NAN, 2.0], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("nan_only", [NAN], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("nan_first", [NAN, 1.0, 2.0, 3.0, 4.0], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("nan_with_+inf", [INF, NAN], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("nan_with_-inf", [-INF, NAN, -INF], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("nan_last_long", [0.5] * 40 + [NAN], NAN, _expect_all(NAN), _expect_all(NAN)),
    ("+inf_first", [INF, 1.0, 2.0], INF, _inf_log_softmax, _expect_all(NAN)),
    ("+inf_last", [1.0, 2.0, INF], INF, _inf_log_softmax, _expect_all(NAN)),
    ("+inf_only", [INF], INF, _inf_log_softmax, _expect_all(NAN)),
    ("+inf_twice", [INF, 3.0, INF], INF, _inf_log_softmax, _expect_all(NAN)),
    ("+inf_and_-inf", [-INF, INF, 0.0], INF, _inf_log_softmax, _expect_all(NAN)),
    ("+inf_long", [0.25] * 37 + [INF] + [1.0] * 5, INF, _inf_log_softmax, _expect_all(NAN)),
    ("-inf_among_finite", [-INF, 1.0, 2.0], None, None, None),
    ("-inf_many", [1.0, -INF, -INF, 0.5, -INF], None, None, None),
    ("-inf_long", [-INF] * 20 + [3.0] + [-INF] * 20, None, None, None),
]


def _logsumexp_expect(row, dtype, expect):
    if expect is None:
        return ref_logsumexp(np.asarray(row, dtype))
    return expect


def _check_elementwise(res, row, dtype, expect, ref_fn):
    res = np.asarray(res)
    assert res.dtype == dtype
    if expect is None:
        ref = ref_fn(np.asarray(row, dtype))
        same_special(res, ref)
        fin = np.isfinite(ref)
        # exact at -inf entries (log_softmax) and 0 (softmax), accurate elsewhere
        assert_ulp_close(res, ref, dtype, 4, rel_extra=0 if ref_fn is ref_log_softmax else
                         eps(dtype) * np.abs(np.log(np.where(ref > 0, ref, 1))))
        if ref_fn is ref_softmax:
            assert np.all(res[np.asarray(row) == -INF] == 0)
        else:
            assert np.all(res[np.asarray(row) == -INF] == -INF)
        assert fin.any()
    else:
        same_special(res, np.asarray(expect(row), dtype))


def _check_lse(r, row, dtype, expect):
    want = _logsumexp_expect(row, dtype, expect)
    if expect is None:
        assert_lse_close(r, want, dtype)
    else:
        same_special(r, np.asarray(want, dtype))


def _neighbours(n, dtype, k=3, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 2).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_row_1d(lsm, case, dtype):
    _, row, e_lse, e_lsm, e_sm = case
    x = np.array(row, dtype)
    before = x.copy()
    with no_warnings():
        r = lsm.logsumexp(x)
        y = lsm.log_softmax(x)
        p = lsm.softmax(x)
        r_axis = lsm.logsumexp(x, axis=-1)
    assert type(r) is dtype
    _check_lse(r, row, dtype, e_lse)
    same_special(r_axis, r)
    _check_elementwise(y, row, dtype, e_lsm, ref_log_softmax)
    _check_elementwise(p, row, dtype, e_sm, ref_softmax)
    assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [0, 1, 3])
@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_row_in_2d_axis_last(lsm, case, dtype, where):
    _, row, e_lse, e_lsm, e_sm = case
    x = _neighbours(len(row), dtype, k=4, seed=where)
    x[where] = row
    with no_warnings():
        r = lsm.logsumexp(x, axis=-1)
        y = lsm.log_softmax(x, axis=-1)
        p = lsm.softmax(x, axis=-1)
        rk = lsm.logsumexp(x, axis=1, keepdims=True)
    assert r.shape == (4,) and rk.shape == (4, 1)
    _check_lse(r[where], row, dtype, e_lse)
    same_special(rk[:, 0], r)
    _check_elementwise(y[where], row, dtype, e_lsm, ref_log_softmax)
    _check_elementwise(p[where], row, dtype, e_sm, ref_softmax)
    others = np.delete(np.arange(4), where)
    xo = x[others]
    assert_lse_close(r[others], ref_logsumexp(xo, axis=1), dtype)
    assert_ulp_close(y[others], ref_log_softmax(xo), dtype, 4)
    assert np.all(np.isfinite(p[others]))
    np.testing.assert_allclose(p[others], ref_softmax(xo), rtol=64 * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ncols", [1, 5, 17])
@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_row_as_column_axis0(lsm, case, dtype, ncols):
    _, row, e_lse, e_lsm, e_sm = case
    col = ncols // 2
    x = _neighbours(len(row), dtype, k=ncols, seed=ncols).T.copy()  # C order, (n, ncols)
    x[:, col] = row
    with no_warnings():
        r = lsm.logsumexp(x, axis=0)
        y = lsm.log_softmax(x, axis=0)
        p = lsm.softmax(x, axis=0)
    assert r.shape == (ncols,)
    _check_lse(r[col], row, dtype, e_lse)
    _check_elementwise(y[:, col], row, dtype, e_lsm, ref_log_softmax)
    _check_elementwise(p[:, col], row, dtype, e_sm, ref_softmax)
    others = [j for j in range(ncols) if j != col]
    if others:
        xo = x[:, others]
        assert_lse_close(r[others], ref_logsumexp(xo, axis=0), dtype)
        assert_ulp_close(y[:, others], ref_log_softmax(xo, axis=0), dtype, 4)
        np.testing.assert_allclose(p[:, others], ref_softmax(xo, axis=0), rtol=64 * eps(dtype))
    # logsumexp_backward: the column gives what the row gives; and both ops in place (softmax
    # and logsumexp_backward keep their exps in out, which is then x)
    g = np.linspace(-2.0, 3.0, ncols).astype(dtype)
    with no_warnings():
        d = lsm.logsumexp_backward(g, x, axis=0)
        d_row = lsm.logsumexp_backward(g[col], x[:, col].copy())
        same_special(d[:, col], d_row)
        np.testing.assert_allclose(d[:, col], d_row, rtol=8 * eps(dtype))
        in_place = [(lambda a, out: lsm.softmax(a, axis=0, out=out), p),
                    (lambda a, out: lsm.logsumexp_backward(g, a, axis=0, out=out), d)]
        for f, want in in_place:
            xi = x.copy()
            assert f(xi, out=xi) is xi
            assert xi.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_row_in_3d_middle_axis(lsm, case, dtype):
    _, row, e_lse, e_lsm, e_sm = case
    n = len(row)
    x = (np.random.default_rng(5).standard_normal((2, n, 3))).astype(dtype)
    x[1, :, 2] = row
    with no_warnings():
        r = lsm.logsumexp(x, axis=1)
        y = lsm.log_softmax(x, axis=1)
        p = lsm.softmax(x, axis=-2)
    _check_lse(r[1, 2], row, dtype, e_lse)
    _check_elementwise(y[1, :, 2], row, dtype, e_lsm, ref_log_softmax)
    _check_elementwise(p[1, :, 2], row, dtype, e_sm, ref_softmax)
    assert np.all(np.isfinite(r[0]))


# ------------------------------------------------------------------------------------------
# empty axis


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_axis(lsm, dtype):
    with no_warnings():
        assert lsm.logsumexp(np.zeros(0, dtype)) == -INF
        y = lsm.log_softmax(np.zeros(0, dtype))
        p = lsm.softmax(np.zeros(0, dtype))
        r_row = lsm.logsumexp(np.zeros((3, 0), dtype), axis=-1)
        y_row = lsm.log_softmax(np.zeros((3, 0), dtype), axis=-1)
        p_row = lsm.softmax(np.zeros((3, 0), dtype), axis=-1)
        r_col = lsm.logsumexp(np.zeros((0, 3), dtype), axis=0)
        y_col = lsm.log_softmax(np.zeros((0, 3), dtype), axis=0)
        p_col = lsm.softmax(np.zeros((0, 3), dtype), axis=0)
    assert y.shape == p.shape == (0,)
    assert y.dtype == p.dtype == dtype
    assert r_row.dtype == dtype
    assert_array_equal(r_row, np.full(3, -INF, dtype))
    assert_array_equal(r_col, np.full(3, -INF, dtype))
    assert y_row.shape == p_row.shape == (3, 0)
    assert y_col.shape == p_col.shape == (0, 3)


# ------------------------------------------------------------------------------------------
# huge finite values: no overflow


HUGE = {
    np.float32: [np.float32(3e38), np.finfo(np.float32).max],
    np.float64: [1.7e308, np.finfo(np.float64).max],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("layout", ["1d", "row", "column"])
def test_huge_values(lsm, dtype, which, layout):
    h = dtype(HUGE[dtype][which])
    row = np.array([h, h], dtype)
    if layout == "1d":
        x, axis, pick = row, -1, (lambda a: a)
    elif layout == "row":
        x = np.array([[0.0, 1.0], row, [2.0, -1.0]], dtype)
        axis, pick = -1, (lambda a: a[1])
    else:
        x = np.array([[0.0, 1.0, 5.0], [2.0, 2.0, 5.0]], dtype)
        x[:, 1] = row
        axis, pick = 0, (lambda a: a[..., 1])
    with no_warnings():
        r = pick(lsm.logsumexp(x, axis=axis))
        y = pick(lsm.log_softmax(x, axis=axis))
        p = pick(lsm.softmax(x, axis=axis))
    # h + log 2, rounded: h itself (log 2 is far below half an ulp of h), never inf
    expect = np.float64(h) + np.log(2)
    assert np.isfinite(r)
    assert r == dtype(expect)
    assert_array_equal(y, np.full(2, -np.log(2), dtype))
    assert_array_equal(p, np.full(2, 0.5, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_mixed(lsm, dtype):
    big = np.finfo(dtype).max
    x = np.array([big, 0.0, -big, big / 2], dtype)
    with no_warnings():
        r = lsm.logsumexp(x)
        y = lsm.log_softmax(x)
        p = lsm.softmax(x)
    assert r == big
    # differences of such values overflow to -inf; the results are -inf / 0 there, 0 / 1 at max
    assert y[0] == 0 and p[0] == 1
    assert np.all(y[1:] == -INF) or np.all(y[1:] < -1e30)
    assert_array_equal(p[1:], [0, 0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_negative(lsm, dtype):
    big = np.finfo(dtype).max
    x = np.array([-big, -big], dtype)
    with no_warnings():
        r = lsm.logsumexp(x)
        y = lsm.log_softmax(x)
        p = lsm.softmax(x)
    assert r == -big  # -big + log 2 rounds back to -big
    assert_array_equal(y, np.full(2, -np.log(2), dtype))
    assert_array_equal(p, np.full(2, 0.5, dtype))


# ------------------------------------------------------------------------------------------
# tiny results: log1p


@pytest.mark.parametrize("layout", ["1d", "row", "column"])
def test_tiny_result_float64(lsm, layout):
    row = np.array([0.0, -40.0])
    if layout == "1d":
        x, axis, pick = row, -1, (lambda a: a)
    elif layout == "row":
        x = np.array([[1.0, 2.0], row], np.float64)
        axis, pick = -1, (lambda a: a[1])
    else:
        x = np.array([[1.0, 0.0, 3.0], [2.0, -40.0, 4.0]])
        axis, pick = 0, (lambda a: a[..., 1])
    with no_warnings():
        r = pick(lsm.logsumexp(x, axis=axis))
        y = pick(lsm.log_softmax(x, axis=axis))
        p = pick(lsm.softmax(x, axis=axis))
    assert r == 4.248354255291589e-18
    ref_y = ref_log_softmax(row)
    assert_ulp_close(y, ref_y, np.float64, 4)
    assert y[0] < 0
    assert_ulp_close(p, ref_softmax(row), np.float64, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gap", [10.0, 20.0, 40.0, 80.0])
def test_tiny_results(lsm, dtype, gap):
    x = np.array([0.0, -gap, -gap - 1], dtype)
    with no_warnings():
        r = lsm.logsumexp(x)
        y = lsm.log_softmax(x)
    ref = ref_logsumexp(x)
    assert_ulp_close(r, ref, dtype, 4)
    assert r > 0
    assert_ulp_close(y, ref_log_softmax(x), dtype, 4)
    assert y[0] < 0


# ------------------------------------------------------------------------------------------
# subnormal results are kept


SUBNORMAL = {np.float32: -90.0, np.float64: -720.0}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["1d", "row", "column"])
def test_subnormal_results(lsm, dtype, layout):
    gap = SUBNORMAL[dtype]
    row = np.array([0.0, gap], dtype)
    tiny = np.finfo(dtype).smallest_normal
    if layout == "1d":
        x, axis, pick = row, -1, (lambda a: a)
    elif layout == "row":
        x = np.array([[1.0, 2.0], row], dtype)
        axis, pick = -1, (lambda a: a[1])
    else:
        x = np.array([[1.0, 0.0, 3.0], [2.0, gap, 4.0]], dtype)
        axis, pick = 0, (lambda a: a[..., 1])
    with no_warnings():
        r = pick(lsm.logsumexp(x, axis=axis))
        y = pick(lsm.log_softmax(x, axis=axis))
        p = pick(lsm.softmax(x, axis=axis))
    e = np.exp(np.float64(gap))  # exp(gap) is the subnormal result
    assert 0 < r < tiny
    assert_ulp_close(r, e, dtype, 1)
    assert -tiny < y[0] < 0
    assert_ulp_close(y[0], -e, dtype, 1)
    assert 0 < p[1] < tiny
    assert_ulp_close(p[1], e, dtype, 1)
    assert p[0] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs(lsm, dtype):
    s = np.finfo(dtype).smallest_subnormal
    x = np.array([s, 3 * s], dtype)
    with no_warnings():
        r = lsm.logsumexp(x[:1])
        y = lsm.log_softmax(x)
        p = lsm.softmax(x)
    assert r == s
    assert_array_equal(y, np.full(2, -np.log(2), dtype))
    assert_array_equal(p, np.full(2, 0.5, dtype))
    # a sum of subnormal weights stays subnormal
    assert lsm.logsumexp(np.array([[s]], dtype), axis=1)[0] == s


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_flush_to_zero_after_import(lsm, dtype):
    # importing cylsm (done by conftest) must not have switched on FTZ/DAZ for the process
    tiny = np.finfo(dtype).smallest_normal
    half = np.array([tiny], dtype) / dtype(2)
    assert half[0] != 0
    assert half[0] * dtype(2) == tiny
    assert np.array([np.finfo(dtype).smallest_subnormal], dtype)[0] * dtype(1) > 0
    # and after running the kernels
    lsm.log_softmax(np.arange(2000, dtype=dtype).reshape(20, 100))
    lsm.logsumexp(np.arange(2000, dtype=dtype).reshape(20, 100), axis=0)
    half = np.array([tiny], dtype) / dtype(2)
    assert half[0] != 0


# ------------------------------------------------------------------------------------------
# axis=() and 0-d specials: each element is its own row


@pytest.mark.parametrize("dtype", DTYPES)
def test_singleton_rows_specials(lsm, dtype):
    x = np.array([[1.0, -INF], [INF, NAN]], dtype)
    with no_warnings():
        r = lsm.logsumexp(x, axis=())
        y = lsm.log_softmax(x, axis=())
        p = lsm.softmax(x, axis=())
        r0 = lsm.logsumexp(np.array(-INF, dtype))
    same_special(r, x)
    same_special(y, np.array([[0.0, NAN], [NAN, NAN]], dtype))
    same_special(p, np.array([[1.0, NAN], [NAN, NAN]], dtype))
    assert r0 == -INF
