"""Bad input, argument by argument (issue 5): every argument of every public function receives
wrong types, wrong shapes, wrong dtypes, float or huge axes and objects whose ``__array__``
raises; each call must raise a clear exception (never crash), and no input may be modified.
Also: an array that another thread tries to resize while a call runs (the call holds the
buffer until it returns).

tests/test_args.py already covers out-of-range and repeated axes, unsupported dtypes, ``out=``
of the wrong shape, dtype or writability, and grad/y shape mismatches; this file adds the rest
and sweeps all of it across every argument."""
from __future__ import annotations

import array
import sys
import threading
import time

import numpy as np
import pytest
from numpy.exceptions import AxisError

FORWARD = ["log_softmax", "softmax", "logsumexp"]
BACKWARD = ["log_softmax_backward", "softmax_backward", "logsumexp_backward"]
ALL = FORWARD + BACKWARD

# the data arguments of each function (positional), then its keyword arguments
DATA_ARGS = {
    "log_softmax": ["x"], "softmax": ["x"], "logsumexp": ["a"],
    "log_softmax_backward": ["grad", "y"], "softmax_backward": ["grad", "p"],
    "logsumexp_backward": ["grad", "x"],
}
KW_ARGS = {
    "log_softmax": ["axis", "out", "dtype", "where"],
    "softmax": ["axis", "out", "dtype", "where"],
    "logsumexp": ["axis", "keepdims", "out", "dtype", "b", "return_sign", "where"],
    "log_softmax_backward": ["axis", "out", "where"],
    "softmax_backward": ["axis", "out", "where"],
    "logsumexp_backward": ["axis", "keepdims", "b", "out", "where"],
}


class ArrayRaises:
    """An array-like whose conversion fails: the caller must see this very exception."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("__array__ refused")


class LenRaises:
    def __len__(self):
        raise RuntimeError("__len__ refused")

    def __getitem__(self, i):
        raise RuntimeError("__getitem__ refused")


def valid_args(name, axis=-1):
    """Valid (positional, keyword) arguments of ``name`` on a (3, 4) float64 problem."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    if name in FORWARD:
        return [x], {}
    if name == "logsumexp_backward":
        return [rng.standard_normal(3), x], {"axis": 1}
    y = np.log(np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True))
    return [rng.standard_normal((3, 4)), y if name == "log_softmax_backward" else np.exp(y)], {}


# bad values for array arguments (x, a, grad, y, p, b) and what each may raise
BAD_ARRAYS = {
    "None": (None, TypeError),
    "object": (object(), TypeError),
    "str": ("abc", TypeError),
    "dict": ({"a": 1.0}, TypeError),
    "set": ({1.0, 2.0}, TypeError),
    "generator": ((i for i in range(3)), TypeError),
    "huge int": (10**30, TypeError),
    "ragged": ([[1.0, 2.0], [3.0]], ValueError),
    "ragged arrays": ([np.ones(2), np.ones(3)], ValueError),
    "__array__ raises": (ArrayRaises(), RuntimeError),
    "list of __array__ raises": ([ArrayRaises(), ArrayRaises()], RuntimeError),
    "__len__ raises": (LenRaises(), (TypeError, RuntimeError)),
    "complex": (np.ones((3, 4), complex), TypeError),
    "object array": (np.ones((3, 4), object), TypeError),
    "datetime": (np.zeros((3, 4), "datetime64[s]"), TypeError),
    "str array": (np.full((3, 4), "1.0"), TypeError),
    "wrong shape": (np.ones((5, 7)), ValueError),
    "too many dims": (np.ones((2, 3, 4, 5)), ValueError),
}

SHAPE_ONLY = {"wrong shape", "too many dims"}   # bad only next to another array argument

BAD_AXES = {
    "float": (1.0, TypeError), "float -1": (-1.0, TypeError),
    "np.float64 -1": (np.float64(-1.0), TypeError), "np.float32": (np.float32(0.0), TypeError),
    "str": ("0", TypeError), "list of float": ([0.0], TypeError),
    "tuple with float": ((0, 1.0), TypeError), "nested": ([[0]], TypeError),
    "bool": (True, TypeError), "slice": (slice(0, 1), TypeError), "Ellipsis": (..., TypeError),
    "array": (np.array([0, 1]), TypeError), "complex": (1j, TypeError),
    "2**63": (2**63, AxisError), "-2**63": (-(2**63), AxisError), "2**64": (2**64, AxisError),
    "10**30": (10**30, AxisError), "np.uint64 2**63": (np.uint64(2**63), AxisError),
    "np.int64 min": (np.int64(-(2**63)), AxisError), "2": (2, AxisError),
    "repeated": ((1, -1), ValueError),
}

BAD_OUTS = {
    "list": ([[0.0] * 4] * 3, TypeError), "float": (0.0, TypeError),
    "__array__ raises": (ArrayRaises(), TypeError),
    "memoryview": (memoryview(np.zeros(12)), TypeError),
    "wrong shape": (np.zeros((4, 3)), ValueError), "wrong dtype": (np.zeros((3, 4), np.float32), ValueError),
    "int": (np.zeros((3, 4), np.int64), ValueError),
    "read-only": (np.lib.stride_tricks.as_strided(np.zeros((3, 4)), writeable=False), ValueError),
    "broadcast": (np.broadcast_to(np.zeros(4), (3, 4)), ValueError),
}

BAD_DTYPES = {
    "unknown": ("float128x", TypeError), "int": (5, TypeError), "object": (ArrayRaises(), TypeError),
    "int32": (np.int32, TypeError), "complex": (complex, TypeError), "bool": (bool, TypeError),
    "str": (str, TypeError),
}

BAD_WHERE = {
    "__array__ raises": (ArrayRaises(), RuntimeError), "int": (np.ones((3, 4), int), TypeError),
    "float": ([1.0, 0.0, 1.0, 1.0], TypeError), "str": ("abc", TypeError),
    "object": (object(), TypeError), "wrong shape": (np.ones((2, 4), bool), ValueError),
    "ragged": ([[True], [True, False]], ValueError),
}


def cases():
    for name in ALL:
        for pos, arg in enumerate(DATA_ARGS[name]):
            for label, (bad, exc) in BAD_ARRAYS.items():
                if name in FORWARD and label in SHAPE_ONLY:
                    continue            # any shape is a valid forward input
                yield pytest.param(name, ("pos", pos), bad, exc, id=f"{name}-{arg}-{label}")
        for kw in KW_ARGS[name]:
            table = {"axis": BAD_AXES, "out": BAD_OUTS, "dtype": BAD_DTYPES, "where": BAD_WHERE,
                     "b": {k: v for k, v in BAD_ARRAYS.items() if k != "None"}}.get(kw)
            if table is None:       # keepdims, return_sign: any truth value is accepted
                continue
            for label, (bad, exc) in table.items():
                if (name, kw, label) == ("logsumexp", "b", "too many dims"):
                    continue            # b broadcasts jointly with x there, as in scipy
                yield pytest.param(name, ("kw", kw), bad, exc, id=f"{name}-{kw}-{label}")


def _snapshot(values):
    out = []
    for v in values:
        out.append(np.array(v, copy=True) if isinstance(v, np.ndarray) else None)
    return out


@pytest.mark.parametrize("name,where,bad,exc", list(cases()))
def test_bad_argument(lsm, name, where, bad, exc):
    args, kw = valid_args(name)
    kind, key = where
    if kind == "pos":
        args[key] = bad
    else:
        if key == "axis" and name == "logsumexp_backward":
            args[0] = np.ones(())   # any grad: the axis is checked first or the shapes differ
        kw[key] = bad
    inputs = list(args) + list(kw.values())
    before = _snapshot(inputs)
    with pytest.raises(exc):
        getattr(lsm, name)(*args, **kw)
    for v, b in zip(inputs, before):          # no input modified, not even out
        if b is not None:
            np.testing.assert_array_equal(v, b)


@pytest.mark.parametrize("name", ALL)
def test_errors_name_the_function(lsm, name):
    """Errors raised by cylsm itself say which function refused what."""
    args, kw = valid_args(name)
    for bad in ({"axis": 1.5}, {"axis": 7}, {"out": [0.0]}, {"where": np.ones(4, int)}):
        with pytest.raises((TypeError, ValueError)) as info:
            getattr(lsm, name)(*args, **{**kw, **bad})
        assert f"cylsm.{name}" in str(info.value), str(info.value)


def test_regression_float_axis_took_the_shortcut(lsm):
    """Found by this file: ``axis=-1.0`` was accepted (``-1.0 == -1`` chose the compiled
    shortcut, which never looked at axis again) while ``axis=-2.0`` raised TypeError."""
    x = np.ones((2, 3))
    for name in FORWARD:
        with pytest.raises(TypeError, match="axis must be an integer"):
            getattr(lsm, name)(x, axis=-1.0)
    with pytest.raises(TypeError, match="axis must be an integer"):
        lsm.log_softmax_backward(x, x, axis=np.float64(-1))
    # an axis array: a clear TypeError, not "truth value of an array is ambiguous"
    with pytest.raises(TypeError, match="axis must be an integer"):
        lsm.softmax(x, axis=np.array([-1, 0]))
    # integer-likes still work everywhere
    for ax in (np.int8(-1), np.int64(-1), np.array(-1)):
        np.testing.assert_array_equal(lsm.softmax(x, axis=ax), lsm.softmax(x))


@pytest.mark.parametrize("name", ["log_softmax_backward", "softmax_backward"])
def test_regression_grad_none(lsm, name):
    """Found by this file: ``grad=None`` reached the compiled shortcut, which raised "a
    bytes-like object is required, not 'NoneType'"."""
    with pytest.raises(TypeError, match=f"cylsm.{name}: grad has dtype object"):
        getattr(lsm, name)(None, np.ones((2, 3)))


def test_array_like_inputs_are_not_modified(lsm):
    """Lists, array.array and read-only or broadcast inputs are read, never written, also with
    out= given and on every path (shortcut, general, weighted, masked)."""
    base = array.array("d", [0.5, -1.0, 2.0, 3.0, 0.0, 1.0])
    x = np.frombuffer(base, dtype=np.float64).reshape(2, 3)        # shares base's memory
    ro = np.arange(6.0).reshape(2, 3)
    ro.flags.writeable = False
    bc = np.broadcast_to(np.array([1.0, 2.0, 3.0]), (2, 3))
    keep = (base.tolist(), ro.copy(), bc.copy())
    for data in (base, x, ro, bc, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]):
        shape = np.shape(np.asarray(data))
        mask = (np.arange(6) % 3 != 1).reshape(shape)
        ro_s, bc_s = ro.reshape(shape), bc.reshape(shape)
        for name in FORWARD:
            for kw in ({}, {"axis": 0}, {"where": mask}):
                getattr(lsm, name)(data, **kw)
        lsm.logsumexp(data, b=ro_s, axis=-1)
        lsm.log_softmax_backward(data, ro_s)
        lsm.softmax_backward(ro_s, data, axis=0)
        lsm.logsumexp_backward(np.ones(shape[:-1]), data, axis=-1, b=bc_s)
        lsm.log_softmax(ro_s, out=np.empty(shape))
    assert base.tolist() == keep[0]
    np.testing.assert_array_equal(ro, keep[1])
    np.testing.assert_array_equal(bc, keep[2])


# ------------------------------------------------------------------------------------------
# Resizing an input from another thread while a call runs


class _SwitchInterval:
    """A long GIL switch interval: the main thread gives up the GIL only where it releases it
    itself (inside the kernels), so the other thread runs exactly then."""

    def __enter__(self):
        self.saved = sys.getswitchinterval()
        sys.setswitchinterval(30.0)

    def __exit__(self, *exc):
        sys.setswitchinterval(self.saved)


def _resize_during(call, resize, undo, rounds):
    """Run ``call`` in this thread while another thread, woken just before, keeps trying
    ``resize`` (then ``undo``, so that an attempt that gets in before the call has taken the
    buffer changes nothing) until the call returns.  Returns (attempts refused, attempts that
    succeeded), counted only while the call ran.  The call is repeated, up to ``rounds`` times,
    until some attempt was refused: on a loaded 2-core machine the scheduler may not run the
    other thread at all during a 2 ms call."""
    go = threading.Event()
    done = threading.Event()
    refused = []
    passed = []

    def other():
        go.wait()
        while not done.is_set():
            try:
                resize()
            except (ValueError, BufferError) as exc:
                if not done.is_set():
                    refused.append(exc)
            else:
                undo()
                if not done.is_set():
                    passed.append(True)
            time.sleep(0)

    for _ in range(rounds):
        go.clear()
        done.clear()
        t = threading.Thread(target=other)
        t.start()
        with _SwitchInterval():
            go.set()
            try:
                call()
            finally:
                done.set()
        t.join(timeout=60)
        assert not t.is_alive()
        if refused:
            break
    return refused, passed


RESIZE_CALLS = {
    "log_softmax": lambda lsm, x: lsm.log_softmax(x),
    "softmax axis=0": lambda lsm, x: lsm.softmax(np.asarray(x).reshape(1000, -1), axis=0),
    "logsumexp": lambda lsm, x: lsm.logsumexp(x),
    "logsumexp b": lambda lsm, x: lsm.logsumexp(x, b=x),
    "log_softmax_backward": lambda lsm, x: lsm.log_softmax_backward(x, x),
    "logsumexp_backward axis=0": lambda lsm, x: lsm.logsumexp_backward(
        np.ones(len(x) // 1000), np.asarray(x).reshape(1000, -1), axis=0),
}


def _rounds():
    """How often to repeat a call until the other thread got in: the compiled kernels release
    the GIL, so 50 calls without it getting in once mean they did not; the Python backend
    need not let it in at all, so once is enough."""
    from cylsm import _api

    return 1 if _api._K.NAME == "python" else 50


def _check_held(lsm, refused, expected):
    """The compiled kernels release the GIL, so the other thread gets in while they run, and
    must be refused; the Python backend lets it in only inside some NumPy loops."""
    from cylsm import _api

    if _api._K.NAME != "python":
        assert refused, "the other thread never got the GIL during the call (GIL held?)"
    assert all(isinstance(e, expected) for e in refused), refused


@pytest.mark.parametrize("op", list(RESIZE_CALLS))
def test_resize_array_array_while_running(lsm, op):
    """array.array refuses to resize while its buffer is exported (BufferError): the other
    thread's append, made while the kernel runs without the GIL, must fail, and succeed once
    the call has returned (so the failure really came from the call holding the buffer)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    n = 4_000_000
    buf = array.array("d", np.random.default_rng(1).standard_normal(n).tobytes())
    call = RESIZE_CALLS[op]
    with threadpoolctl.threadpool_limits(1):        # no parallel region: the nogil path
        refused, _ = _resize_during(lambda: call(lsm, buf), lambda: buf.append(0.0), buf.pop,
                                    _rounds())
    _check_held(lsm, refused, BufferError)
    buf.append(0.0)                                   # and after the call it is allowed
    assert len(buf) == n + 1


@pytest.mark.parametrize("op", list(RESIZE_CALLS))
def test_resize_ndarray_while_running(lsm, op):
    """ndarray.resize from another thread during a call raises ValueError (the call holds a
    reference and a buffer export); after the call the same resize succeeds."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    n = 4_000_000
    holder = [np.random.default_rng(2).standard_normal(n)]
    call = RESIZE_CALLS[op]
    with threadpoolctl.threadpool_limits(1):
        refused, _ = _resize_during(lambda: call(lsm, holder[0]),
                                    lambda: holder[0].resize(n + 1), lambda: holder[0].resize(n),
                                    _rounds())
    _check_held(lsm, refused, ValueError)
    holder[0].resize(n + 1)                           # nothing holds it any more
    assert holder[0].shape == (n + 1,)
