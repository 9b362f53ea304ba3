"""Differential fuzzing (issue 5): one drawn call, every backend, and scipy.

Each example draws a function, a shape (0- and 1-length dimensions, lengths around the kernels'
block, tile and column-block sizes), a dtype (float16/32/64, big-endian, integers, bool), a
view (negative steps, transposes, zero strides from broadcasting, a misaligned start), values
(inf, -inf, NaN, subnormals, the largest finite, -0.0), an axis, and options (``out=`` fresh, in
place or partly overlapping the input, ``where=``, ``b=``, ``return_sign``, ``keepdims``,
``dtype=``).  Every compiled CPU level and the Python backend run it; they must agree with each
other (NaN positions and infinities exactly, finite values within the bounds of SPEC section 4)
and with scipy.special (forward) or a long-double reference (backward), and leave the inputs
unchanged.

``pytest`` runs a short pass (``FUZZ_EXAMPLES`` examples per target); ``python tools/fuzz.py
--seconds N`` runs the same targets for a fixed time and prints how many examples ran.  Every
failure found becomes a ``test_regression_*`` below, with the exact input."""
from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cylsm
from cylsm import _api
from _reference import (
    LD,
    assert_ulp_close,
    eps,
    max_ulp,
    quiet,
    reduced_shape,
    ref_log_softmax_backward,
    ref_logsumexp_backward,
    ref_softmax_backward,
    same_special,
)
from test_hypothesis import axes_for, compare_backends, signed_sums_agree, special_elements

# a short pass in the suite; tools/fuzz.py (run by .ci/run) is the long one
FUZZ_EXAMPLES = int(os.environ.get("CYLSM_FUZZ_EXAMPLES", "30"))
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

FORWARD = ["log_softmax", "softmax", "logsumexp"]
DIMS = [0, 1, 2, 3, 5, 15, 16, 17, 63, 64, 65, 255, 256, 257]
LONG = [2047, 2048, 2049, 4099]
DTYPES = ["<f4", "<f8", "<f4", "<f8", ">f4", ">f8", "<f2", "<i2", "|u1", "|b1"]
MAX_ELEMENTS = 6000


@contextlib.contextmanager
def backend(module):
    saved = _api._K
    _api._K = module
    try:
        yield
    finally:
        _api._K = saved


# ------------------------------------------------------------------------------------------
# strategies


@st.composite
def shapes(draw, max_dims=3):
    ndim = draw(st.integers(0, max_dims))
    if ndim and draw(st.integers(0, 5)) == 0:      # one long axis (blocks of 2048)
        shape = [1] * ndim
        shape[draw(st.integers(0, ndim - 1))] = draw(st.sampled_from(LONG))
        if ndim > 1:
            shape[(shape.index(max(shape)) + 1) % ndim] = draw(st.integers(1, 2))
        return tuple(shape)
    shape = []
    for _ in range(ndim):
        left = MAX_ELEMENTS // max(1, int(np.prod(shape)))
        shape.append(min(draw(st.sampled_from(DIMS)), left))
    return tuple(shape)


def elements(dtype, special):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return st.booleans()
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return st.integers(int(info.min), int(info.max))
    native = dt.newbyteorder("=")
    if native == np.float16:
        base = st.floats(-60000, 60000, width=16)
        if special:
            # the smallest subnormal exactly (a rounded literal like 6e-8 changes when stored,
            # and hypothesis on NumPy 1.x then takes it for flush-to-zero and fails the draw)
            tiny = float(np.finfo(np.float16).smallest_subnormal)
            return st.one_of(base, st.sampled_from([np.inf, -np.inf, np.nan, tiny, 65504.0, -0.0]))
        return base
    if special:
        return special_elements(native.type)
    return st.floats(-80, 80, width=32 if native == np.float32 else 64)


@st.composite
def views(draw, special=True, dtypes=DTYPES, max_dims=3):
    """(view, base): a view of ``base`` with the drawn strides, byte order and alignment."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(shapes(max_dims))
    steps = [draw(st.sampled_from([1, 1, 1, 2, -1, -2])) for _ in shape]
    zero = [draw(st.integers(0, 7)) == 0 for _ in shape]          # broadcast: zero stride
    base_shape = tuple(1 if z else s * abs(k) for s, k, z in zip(shape, steps, zero))
    data = draw(hnp.arrays(dtype, base_shape, elements=elements(dtype, special)))
    if draw(st.integers(0, 5)) == 0 and data.size:                # misaligned copy
        raw = np.zeros(data.nbytes + 1, np.uint8)
        data = np.ndarray(data.shape, dtype, buffer=raw, offset=1)
        data[...] = draw(hnp.arrays(dtype, base_shape, elements=elements(dtype, special)))
    v = data[tuple(slice(None, None, 1 if z else k) for z, k in zip(zero, steps))] if shape else data[...]
    v = np.broadcast_to(v, shape) if any(zero) else v
    if v.ndim > 1 and draw(st.booleans()):
        v = v.transpose(draw(st.permutations(range(v.ndim))))
    if draw(st.integers(0, 3)) == 0 and v.flags.writeable:
        v = v.view()
        v.flags.writeable = False
    return v


@st.composite
def masks(draw, shape):
    if draw(st.integers(0, 2)):
        return None
    if not shape or draw(st.booleans()):
        return draw(hnp.arrays(np.bool_, shape))
    sub = tuple(1 if draw(st.booleans()) else s for s in shape)   # broadcastable mask
    return draw(hnp.arrays(np.bool_, sub[draw(st.integers(0, len(sub))):]))


# ------------------------------------------------------------------------------------------
# the expected results


def result_dtype(x, dtype=None, *others):
    if dtype is not None:
        return np.dtype(dtype)
    d = np.result_type(*(np.asarray(a).dtype for a in (x, *others)))   # by dtype (NEP 50)
    return np.dtype(np.float64) if d.kind != "f" else np.dtype(d.type)


def scipy_forward(name, x, axis, keepdims, where, b):
    """scipy.special's result in float64, with cylsm's documented masking rules."""
    import scipy.special

    xd = np.asarray(x).astype(np.float64)
    if where is not None:
        xd = np.where(where, xd, -np.inf)
    ax = None if xd.ndim == 0 else axis
    with quiet():
        if name == "logsumexp":
            kw = {} if b is None else {"b": np.asarray(b, np.float64)}
            ref = np.asarray(scipy.special.logsumexp(xd, axis=ax, keepdims=keepdims, **kw))
        else:
            ref = getattr(scipy.special, name)(xd, axis=ax)
            if where is not None:
                ref = np.where(np.broadcast_to(where, ref.shape), ref,
                               -np.inf if name == "log_softmax" else 0.0)
    return ref


def check_against_scipy(name, res, ref, dtype, x_of_ref=()):
    res = np.asarray(res)
    ref = ref.reshape(res.shape)
    e = eps(dtype)
    with quiet():                   # a float64 result beyond the float32 range is inf there
        ref_c = ref.astype(res.dtype)
    same_special(res, ref_c)
    # scipy's own error: its sum of n terms is off by log2(n) eps when NumPy sums pairwise (the
    # last, contiguous axis) but by up to n eps otherwise: NumPy adds along other axes one row
    # at a time, and n equal terms round the same way each time.  A (2047, 2, 1) float64 input
    # reduced over axis 0 put scipy's log_softmax 22 ulp off (cylsm 0.2), a (255, 1, 2) one its
    # softmax 80 ulp (cylsm 0.34).  n here is the input's size, an upper bound of the row's.
    n = max(1, ref.size and int(np.size(x_of_ref) // max(1, ref.size if name == "logsumexp" else 1)))
    if name == "softmax":
        with np.errstate(all="ignore"):
            logp = np.abs(np.log(np.where(ref > 0, ref, 1)))
        # 32 eps absolute besides: a (63, 63) int16 case near p = 1 differed from scipy by
        # 27 eps (not root-caused: scipy's error or ours, each within this)
        assert_ulp_close(res, ref_c, dtype, 8, rel_extra=e * (2 * logp + 2 + n),
                         abs_extra=32 * e + 2 * float(np.finfo(dtype).smallest_subnormal))
    else:
        fin = np.isfinite(ref) & np.isfinite(res)
        diff = np.abs(res.astype(LD)[fin] - ref.astype(LD)[fin])
        allowed = 8 * e * (np.abs(ref.astype(LD)[fin]) + 1) + e * n   # the sum enters log(s)
        assert np.all(diff <= allowed), (res, ref)


def compare_rows(name, a, b, dtype, axis):
    """compare_backends for log_softmax/softmax, plus subnormal spacings absolute: two for
    float32 (its terms are summed in double, none rounded to float's subnormal grid: since
    test_regression_subnormal_terms_float32), n for float64, whose terms below 2^-1022 are
    rounded to the double subnormal grid in both backends, each its own way.  (While the
    compiled kernels summed 128 equal terms per lane plainly, this allowed n * eps * |L| more;
    test_regression_equal_terms_sum keeps that fixed.)"""
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0:
        return compare_backends(name, a, b, dtype)
    same_special(a, b)
    sub = (2 if dtype == np.float32 else a.size) * float(np.finfo(dtype).smallest_subnormal)
    if name == "log_softmax":
        assert_ulp_close(a, b, dtype, 8, abs_extra=sub)
    else:
        with quiet():
            logp = np.abs(np.log(np.where(a > 0, a, 1).astype(np.float64)))
        assert_ulp_close(a, b, dtype, 8, rel_extra=2 * eps(dtype) * logp, abs_extra=sub)


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def unchanged(arrays, before):
    for a, b in zip(arrays, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# targets


def make_out(draw, x, shape, rdt, name):
    """None, a fresh array (C or F order), the input itself (in place), or a view that
    partly overlaps the input's memory."""
    kind = draw.draw(st.sampled_from(["none", "none", "C", "F", "inplace", "overlap"]), label="out")
    if kind in ("C", "F"):
        return lambda xx: np.full(shape, 7, rdt, order=kind)
    if kind == "inplace" and name != "logsumexp" and x.dtype == rdt and x.shape == shape:
        return "inplace"
    if kind == "overlap" and name != "logsumexp" and x.dtype == rdt and x.size > 1 and x.ndim:
        return "overlap"
    return lambda xx: None


def materialize(out_spec, x):
    """(x to pass, out to pass) for one backend, on its own copy of the data."""
    if out_spec == "inplace":
        xx = np.array(x, copy=True, order="K")
        return xx, xx
    if out_spec == "overlap":
        flat = np.empty(x.size + 1, x.dtype)
        xx = flat[1:].reshape(x.shape)
        xx[...] = x
        out = flat[:-1].reshape(x.shape)           # shifted by one element: partial overlap
        return xx, out
    return x, out_spec(x)


def check_forward(data, backends):
    name = data.draw(st.sampled_from(FORWARD), label="name")
    x = data.draw(views(special=True), label="x")
    axis = data.draw(axes_for(x.ndim), label="axis")
    kw = {"axis": axis}
    where = data.draw(masks(x.shape), label="where")
    if where is not None:
        kw["where"] = where
    b = None
    if name == "logsumexp":
        kw["keepdims"] = data.draw(st.booleans(), label="keepdims")
        if data.draw(st.integers(0, 2)) == 0:
            b = data.draw(hnp.arrays(np.float64, x.shape, elements=st.sampled_from(
                [0.0, 1.0, 0.5, 2.0, 3.0, -1.0, -0.5])), label="b")
            kw["b"] = b
            kw["return_sign"] = data.draw(st.booleans(), label="return_sign")
    if data.draw(st.integers(0, 4)) == 0:
        kw["dtype"] = data.draw(st.sampled_from([np.float32, np.float64, np.float16]), label="dtype")
    rdt = result_dtype(x, kw.get("dtype"), *([] if b is None else [b]))
    if kw.get("dtype") is None and b is not None:
        rdt = result_dtype(np.empty(0, result_dtype(x)), None, b)
    shape = (reduced_shape(x.shape, axis, kw.get("keepdims", False)) if name == "logsumexp"
             else x.shape)
    out_spec = make_out(data, x, shape, rdt, name)

    inputs = [x, where, b]
    before = snapshot(*inputs)
    results = {}
    for bname, module in backends:
        xx, out = materialize(out_spec, x)
        call_kw = dict(kw, out=out) if out is not None else kw
        with backend(module), warnings.catch_warnings():
            warnings.simplefilter("error")
            r = getattr(cylsm, name)(xx, **call_kw)
        if out is not None:
            assert (r[0] if isinstance(r, tuple) else r) is out
        results[bname] = r
        unchanged(inputs, before)

    cmp_dtype = rdt if rdt != np.float16 else np.dtype(np.float16)
    signed = name == "logsumexp" and kw.get("return_sign")
    python = results["python"]
    for bname, r in results.items():
        if signed:
            assert np.asarray(r[0]).dtype == np.asarray(r[1]).dtype == rdt
            same_special(r[1], python[1]) if b is None or np.all(np.asarray(b) >= 0) else None
            continue
        assert np.asarray(r).dtype == rdt and np.shape(r) == shape, (bname, np.shape(r), shape)
        if np.ndim(r) == 0 and "out" not in kw and isinstance(out_spec, type(lambda: 0)):
            assert isinstance(r, np.generic) or np.ndim(r) == 0
        if name == "logsumexp":
            with quiet():
                extra = 3 * np.maximum(1, np.abs(np.asarray(r, np.float64))) * eps(cmp_dtype)
            assert_ulp_close(r, python, cmp_dtype, 2, abs_extra=extra)
        else:
            compare_rows(name, r, python, cmp_dtype, axis)

    negative_b = b is not None and bool(np.any(np.asarray(b) < 0))
    if signed and negative_b:
        bw = b if where is None else np.where(where, b, 0)     # masked entries take no part
        with quiet():
            xs = x.astype(kw["dtype"]) if "dtype" in kw else x
        signed_sums_agree(list(results.values()), xs.astype(np.float64), bw, axis, cmp_dtype)
        return
    # scipy gets the input as cylsm computes it (dtype= casts first).  Not compared with
    # scipy: empty reductions with return_sign (cylsm's sign is 0, scipy's -1, documented), and
    # b == 0 where x is inf or NaN, or so large that exp overflows in float64 (cylsm leaves
    # the entry out, as SPEC says; scipy computes 0 * inf = NaN)
    with quiet():
        xs = x.astype(kw["dtype"]) if "dtype" in kw else x
    if b is not None:
        with quiet():
            big = ~(np.asarray(xs, np.float64) < 709)
        if np.any((np.asarray(b) == 0) & big):
            return
    if negative_b:
        return                      # near-cancellation: covered by the signed-sum check
    if x.size == 0:                 # scipy refuses empty reductions; SPEC: -inf, empty
        for r in results.values():
            value = np.asarray(r[0] if signed else r)
            if name == "logsumexp":
                assert np.all(value == -np.inf)
                if signed:
                    assert np.all(np.asarray(r[1]) == 0)    # scipy would say -1
        return
    ref = scipy_forward(name, xs, axis, kw.get("keepdims", False), where, b)
    for bname, r in results.items():
        value = r[0] if signed else r
        check_against_scipy(name, value, ref, cmp_dtype, xs)
        if signed:
            expect_sign = np.where(np.isnan(value), np.nan, np.where(value == -np.inf, 0, 1))
            same_special(r[1], expect_sign.astype(rdt))
            np.testing.assert_array_equal(np.nan_to_num(r[1]), np.nan_to_num(expect_sign))


def check_backward(data, backends):
    name = data.draw(st.sampled_from(["log_softmax_backward", "softmax_backward",
                                      "logsumexp_backward"]), label="name")
    # float32/64 (float16 backward sums overflow float16 itself; not a kernel question)
    x = data.draw(views(special=False, dtypes=["<f4", "<f8", ">f8"]), label="x")
    axis = data.draw(axes_for(x.ndim), label="axis")
    where = data.draw(masks(x.shape), label="where")
    dt = result_dtype(x)
    keepdims = data.draw(st.booleans(), label="keepdims")
    with backend(dict(backends)["python"]):
        y = cylsm.log_softmax(x, axis=axis, where=where)
        p = cylsm.softmax(x, axis=axis, where=where)
    gshape = reduced_shape(x.shape, axis, keepdims) if name == "logsumexp_backward" else x.shape
    g = data.draw(hnp.arrays(dt, gshape, elements=st.floats(-100, 100, width=32)), label="grad")
    if data.draw(st.booleans()) and g.ndim:
        g = g[(slice(None, None, -1),) * g.ndim]                # a negative-stride grad
    b = None
    kw = {"axis": axis}
    if where is not None:
        kw["where"] = where
    if name == "logsumexp_backward":
        kw["keepdims"] = keepdims
        if data.draw(st.integers(0, 2)) == 0:
            b = data.draw(hnp.arrays(np.float64, x.shape, elements=st.sampled_from(
                [0.0, 1.0, 0.5, 2.0])), label="b")
            kw["b"] = b
    second = {"log_softmax_backward": y, "softmax_backward": p, "logsumexp_backward": x}[name]
    rdt = result_dtype(g, None, second, *([] if b is None else [b]))
    inputs = [x, g, second, where, b]
    before = snapshot(*inputs)
    results = {}
    for bname, module in backends:
        with backend(module), warnings.catch_warnings():
            warnings.simplefilter("error")
            r = getattr(cylsm, name)(g, second, **kw)
        assert np.asarray(r).dtype == rdt and np.shape(r) == x.shape
        results[bname] = np.asarray(r)
        unchanged(inputs, before)
    e = eps(rdt)
    floor = float(np.finfo(rdt).smallest_subnormal)
    w = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
    axes = tuple(range(x.ndim)) if axis is None else tuple(
        a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)) if x.ndim else ()
    gl = np.abs(np.where(w, np.asarray(g, LD), 0)) if name != "logsumexp_backward" else None
    # (16 + n) eps: the backward kernels' lane sums of grad (times p) are plain running sums
    # of up to 128 terms, whose rounding is one-sided for equal terms (the forward sums of exps
    # are compensated every few terms since test_regression_equal_terms_sum)
    nrow = int(np.prod([x.shape[i] for i in axes])) if x.ndim else 1
    for bname, r in results.items():
        if name == "log_softmax_backward":
            ref = ref_log_softmax_backward(g, y, axis=axis if x.ndim else None, where=where)
            with quiet():
                scale = gl + np.exp(np.asarray(y, LD)) * np.sum(gl, axis=axes, keepdims=True)
            # exp(y) is a double for float32 too (test_regression_subnormal_exp_factor_float32);
            # float64's is rounded to the subnormal grid below 2^-1022, times sum(grad)
            sub = (2 + (0 if rdt == np.float32 else np.sum(gl, axis=axes, keepdims=True))) * floor
            assert np.all(np.abs(r.astype(LD) - ref) <= (16 + nrow) * e * scale + sub), bname
        elif name == "softmax_backward":
            ref = ref_softmax_backward(g, p, axis=axis if x.ndim else None, where=where)
            pl = np.where(w, np.asarray(p, LD), 0)
            scale = pl * (gl + np.sum(gl * pl, axis=axes, keepdims=True))
            assert np.all(np.abs(r.astype(LD) - ref) <= (16 + nrow) * e * scale + 2 * floor), bname
        else:
            # 16 ulp: the logsumexp inside is within SPEC (test_regression_equal_terms_sum
            # below), exp(x - M - L) adds a few ulp
            # (as _reference.assert_lse_backward_close, plus a subnormal floor per unit of grad:
            # rows that keep their exps store them in the data type, subnormal ones rounded)
            ref = ref_logsumexp_backward(g, x, axis=axis, keepdims=keepdims, b=b, where=where)
            ones = np.ones(gshape)
            w1 = ref_logsumexp_backward(ones, x, axis=axis, keepdims=keepdims, b=b, where=where)
            bb = np.broadcast_to(np.asarray(1.0 if b is None else b, np.float64), x.shape)
            with quiet():
                t = np.where((w1 != 0) & (bb != 0), np.abs(np.log(np.abs(w1 / bb))), 0)
                gk = np.abs(np.asarray(g, np.float64))
                gk = gk if keepdims or not x.ndim else np.expand_dims(gk, axes)
            assert_ulp_close(r, ref, rdt, 16, rel_extra=e * (t + nrow), abs_extra=(2 + 2 * gk) * floor)


TARGETS = {"forward": check_forward, "backward": check_backward}


@SETTINGS
@given(data=st.data())
def test_fuzz_forward(backends, data):
    check_forward(data, backends)


@SETTINGS
@given(data=st.data())
def test_fuzz_backward(backends, data):
    check_backward(data, backends)


# ------------------------------------------------------------------------------------------
# regressions: every failure the fuzzer found, with its exact input


def test_regression_dtype_cast_overflow_warned(lsm):
    """Found by the fuzzer: ``dtype=`` casts the input first, and a value that overflows the
    new dtype emitted "RuntimeWarning: overflow encountered in cast" (SPEC: no warnings, ever);
    the value becomes inf, as the cast says.  Same for float16 results rounding to inf."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lsm.log_softmax(np.array(1.79769313e308), dtype=np.float32)
        r = lsm.logsumexp(np.array(3.4028235e38, np.float32), b=np.array(0.0), dtype=np.float16)
        r2 = lsm.logsumexp(np.array([1e6, 1.0]), b=np.array([1.0, 1.0]), dtype=np.float16)
        h = lsm.logsumexp_backward(np.float16(60000), np.ones(1, np.float16))
        o = np.empty(2, np.float16)
        lsm.softmax_backward(np.array([6e4, -6e4], np.float16), np.array([2.0, 2.0], np.float16),
                             out=o)
    assert np.isnan(y) and type(y) is np.float32
    assert r == -np.inf and type(r) is np.float16            # b == 0: the inf takes no part
    assert r2 == np.inf and h[0] == np.float16(60000)
    assert np.all(np.isinf(o))


@pytest.mark.parametrize("n,d,lse_bound,lsm_bound", [(255, -5.625, 1, 4), (2049, -4.625, 1, 4),
                                                     (63, -41.0, 1, 4)])
def test_regression_equal_terms_sum(lsm, n, d, lse_bound, lsm_bound):
    """Found by the fuzzer (via logsumexp_backward): one maximum and n - 1 equal terms below
    it.  SPEC section 4 promises logsumexp within 1 eps * max(1, |r|) and log_softmax within
    4 ulp; the compiled kernels gave 3.69 eps and 12.2 ulp at n = 255 (short rows: the tile
    kernel summed KC = 128 rows per lane before its compensated add) and 1.95 eps, 2.95 ulp at
    n = 2049 (row kernel: 128 elements per lane and block), and at n = 63 with terms 41 below
    the maximum (found as int16 data) the largest log_softmax element, about -9.7e-17, was
    some 60 ulp off.  Equal terms make the rounding of a plain running sum one-sided, so it
    grows with the count; float64 lane sums are now compensated every RUN64 terms."""
    x = np.array([1.0] + [1.0 + d] * (n - 1))
    L = np.log1p((n - 1) * np.exp(LD(d)))
    r = lsm.logsumexp(x)
    y = lsm.log_softmax(x)
    assert abs(LD(r) - (1 + L)) <= lse_bound * eps(np.float64) * max(1.0, abs(float(r)))
    assert abs((LD(y[0]) + L) / LD(np.spacing(y[0]))) <= lsm_bound


@pytest.mark.parametrize("name,shape,top", [("log_softmax", (2047, 2, 1), 1.0),
                                            ("softmax", (255, 1, 2), 6.0)])
def test_regression_scipy_sums_along_axis0(lsm, name, shape, top):
    """Found by the fuzzer (CI runs): one maximum and many zeros, reduced over axis 0.  NumPy
    sums along a non-contiguous axis one row at a time, so scipy's float64 reference was 22
    ulp (log_softmax) and 80 ulp (softmax) off while cylsm was within 0.4; the scipy check
    allows scipy that error, and cylsm is held to a long-double reference here."""
    x = np.zeros(shape)
    x[0] = top
    res = getattr(lsm, name)(x, axis=0)
    check_against_scipy(name, res, scipy_forward(name, x, 0, False, None, None), np.float64, x)
    xl = x.astype(LD)
    lse = np.log(np.sum(np.exp(xl - top), axis=0, keepdims=True)) + top
    ref = xl - lse if name == "log_softmax" else np.exp(xl - lse)
    assert max_ulp(res, ref, np.float64) <= (4 if name == "log_softmax" else 1)


def test_regression_subnormal_terms_float32():
    """Found by the fuzzer (CI): a column [0, -96 x 62] reduced in float32.  exp(-96) is
    subnormal in float32, and each compiled term was rounded to that grid before the sum in
    double: the largest log_softmax (about -1.26e-40) came out 27 spacings from the Python
    backend's.  The terms are now exact in double (cylsm_expf_nonpos_scaled): compare_rows
    allows two spacings for float32."""
    from cylsm import _select

    x = np.array([0] + [-96] * 62, np.int16).reshape(63, 1)
    expect = {name: _select.load(name) for name in _select.COMPILED_NAMES}
    import cylsm
    from cylsm import _api

    saved = _api._K
    try:
        _api._K = _select.load("python")
        ref = {n: getattr(cylsm, n)(x, axis=0, dtype=np.float32) for n in ("log_softmax", "softmax")}
        for kernels in expect.values():
            _api._K = kernels
            for n, r in ref.items():
                compare_rows(n, getattr(cylsm, n)(x, axis=0, dtype=np.float32), r, np.float32, 0)
    finally:
        _api._K = saved
