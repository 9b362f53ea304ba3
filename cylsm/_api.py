"""The public functions: argument checks and normalisation, done once, here.

The kernels (``_K``, chosen by ``cylsm._select``) see only clean buffers: C-contiguous, native
float32/float64 (longdouble goes to the NumPy backend), laid out as (outer, n, inner) and reduced
over the middle axis.  Reaching that layout costs no copy whenever the reduced axes are adjacent
in the array's memory order (C, Fortran or any transpose of them); otherwise the data is copied
once into an order where they are.
"""
from __future__ import annotations

import math
import operator
from types import ModuleType
from typing import Any, Sequence, Union

import numpy as np

from . import _python, _select

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError  # type: ignore[attr-defined,no-redef]

_K: ModuleType = _select.choose()

AxisLike = Union[int, Sequence[int], None]

# ---------------------------------------------------------------------------------------------
# Argument checks


def _array(a: Any, fname: str, argname: str) -> np.ndarray:
    arr = a if isinstance(a, np.ndarray) else np.asarray(a)
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"cylsm.{fname}: {argname} has dtype {arr.dtype}, which is not supported; expected "
            "real floating-point (float16, float32, float64, longdouble), integer or boolean "
            "values (integers and booleans are computed in float64)"
        )
    return arr


_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _weak(a: Any, arr: np.ndarray) -> Any:
    """What dtype promotion sees of an argument ``a`` (converted to ``arr``): a Python bool,
    int or float is a "weak" scalar that takes the other operands' dtype, as in NumPy 2 (NEP
    50) and scipy (``logsumexp(x32, b=2.0)`` is float32); anything else is its array."""
    return a if type(a) in (float, int, bool) else arr


def _result_dtype(fname: str, *arrays: Any, dtype: Any = None) -> np.dtype:
    """The result dtype of operands ``arrays`` (ndarrays, or weak scalars: see _weak)."""
    if dtype is not None:
        d = np.dtype(dtype)
        if d.kind != "f":
            raise TypeError(
                f"cylsm.{fname}: dtype={d} is not a floating-point dtype; expected float16, "
                "float32, float64 or longdouble"
            )
    else:
        d = getattr(arrays[0], "dtype", None)
        if (d is _NATIVE[0] or d is _NATIVE[1]) and all(
                getattr(a, "dtype", None) is d for a in arrays):
            return d                        # the common case, without result_type's cost
        # promoted by dtype alone, as NumPy 2 does (NEP 50): NumPy 1.x would let the value of
        # a 0-d array decide (a 0-d float64 b left a float32 x's result float32)
        d = np.result_type(*(getattr(a, "dtype", a) for a in arrays))
        if d.kind != "f":
            d = np.dtype(np.float64)
    native: np.dtype = np.dtype(d.type)  # native byte order
    return native


def _compute_dtype(d: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if d == np.float16 else d


def _kernels(cdt: np.dtype) -> ModuleType:
    return _python if cdt.type is np.longdouble else _K


def _axes(axis: AxisLike, ndim: int, fname: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if type(axis) is int and -ndim <= axis < ndim:      # the common case, at once
        return (axis % ndim,)
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    result = []
    for a in items:
        if isinstance(a, (bool, np.bool_)):
            raise TypeError(f"cylsm.{fname}: axis must be an integer, a tuple of integers or None, not {a!r}")
        try:
            i = operator.index(a)
        except TypeError:
            raise TypeError(
                f"cylsm.{fname}: axis must be an integer, a tuple of integers or None, "
                f"not {type(a).__name__}"
            ) from None
        if not -ndim <= i < ndim:
            raise AxisError(i, ndim, f"cylsm.{fname}")
        result.append(i % ndim)
    if len(set(result)) != len(result):
        raise ValueError(f"cylsm.{fname}: repeated axis in axis={axis!r}")
    return tuple(sorted(result))


def _check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, fname: str) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"cylsm.{fname}: out must be a numpy.ndarray, not {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"cylsm.{fname}: out has shape {out.shape}; the result has shape {shape}")
    if out.dtype != dtype:
        raise ValueError(
            f"cylsm.{fname}: out has dtype {out.dtype}; the result has dtype {dtype} "
            "(pass dtype= to choose another result dtype)"
        )
    if not out.flags.writeable:
        raise ValueError(f"cylsm.{fname}: out is read-only; pass a writable array")
    return out


def _mask(where: Any, shape: tuple[int, ...], fname: str) -> np.ndarray | None:
    """The ``where`` mask broadcast to ``shape``, or None when it masks nothing."""
    if where is None:
        return None
    w = np.asarray(where)
    if w.dtype != np.bool_:
        raise TypeError(f"cylsm.{fname}: where must be a boolean array, not of dtype {w.dtype}")
    try:
        w = w if w.shape == shape else np.broadcast_to(w, shape)    # (5 us)
    except ValueError:
        raise ValueError(
            f"cylsm.{fname}: where has shape {w.shape}, which does not broadcast to the input "
            f"shape {shape}"
        ) from None
    return None if w.all() else w


def _same_shape(fname: str, a: np.ndarray, aname: str, b: np.ndarray, bname: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"cylsm.{fname}: {aname} has shape {a.shape} but {bname} has shape {b.shape}; "
            "they must be equal"
        )


def _is_same_buffer(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
        and a.dtype == b.dtype
    )


def _result_buffer(out: np.ndarray | None, cdt: np.dtype, inputs: Sequence[np.ndarray],
                   layout: _Layout) -> np.ndarray:
    """Where the kernel writes a same-shape result: straight into ``out`` when it has the
    compute dtype, fits ``layout`` and overlaps no input (other than being one of them
    exactly: in place); else a new array in ``layout``, copied into ``out`` afterwards."""
    if out is None or out.dtype != cdt or not layout.fits(out):
        return layout.empty(cdt)
    for a in inputs:
        if np.may_share_memory(out, a) and not _is_same_buffer(out, a):
            return layout.empty(cdt)
    return out


# ---------------------------------------------------------------------------------------------
# Layout: an axis order in which the array is C-contiguous and the reduced axes are adjacent.


def _c_order(a: np.ndarray) -> list[int] | None:
    """A permutation p with a.transpose(p) C-contiguous, or None."""
    nd = a.ndim
    if a.flags.c_contiguous:
        return list(range(nd))
    if a.flags.f_contiguous:
        return list(range(nd))[::-1]
    p = sorted(range(nd), key=lambda i: -abs(a.strides[i]))
    return p if a.transpose(p).flags.c_contiguous else None


class _Layout:
    """The (outer, n, inner) view of arrays of ``shape`` reduced over ``axes``."""

    def __init__(self, shape: tuple[int, ...], axes: tuple[int, ...], order: list[int] | None):
        p = order if order is not None else list(range(len(shape)))
        pos = [p.index(a) for a in axes]
        if pos and pos[-1] - pos[0] + 1 != len(pos):      # not adjacent: reduced axes go last
            p = [a for a in p if a not in axes] + [a for a in p if a in axes]
            pos = list(range(len(p) - len(axes), len(p)))
        a0 = pos[0] if pos else len(p)
        a1 = pos[-1] + 1 if pos else len(p)
        pshape = [shape[a] for a in p]
        self.perm = p
        self.inverse = [0] * len(p)         # (np.argsort of a list costs 3 us)
        for i, a in enumerate(p):
            self.inverse[a] = i
        self.outer = math.prod(pshape[:a0])
        self.n = math.prod(pshape[a0:a1])
        self.inner = math.prod(pshape[a1:])
        self.pshape = pshape
        self.reduced_pshape = [1 if a0 <= i < a1 else s for i, s in enumerate(pshape)]

    def fits(self, a: np.ndarray) -> bool:
        return bool(a.flags.aligned and a.transpose(self.perm).flags.c_contiguous)

    def three(self, a: np.ndarray, cdt: np.dtype) -> np.ndarray:
        """``a`` (full shape) as a C-contiguous (outer, n, inner) array: a view when it can be."""
        t = _aligned(np.ascontiguousarray(a.transpose(self.perm), dtype=cdt))
        return t.reshape(self.outer, self.n, self.inner)

    def view3(self, a: np.ndarray) -> np.ndarray:
        """``a``, which fits this layout, as its (outer, n, inner) view (writes go through)."""
        return a.transpose(self.perm).reshape(self.outer, self.n, self.inner)

    def empty(self, cdt: np.dtype) -> np.ndarray:
        """A new array of the full shape that fits this layout."""
        a: np.ndarray = _K.empty(self.pshape, cdt)    # (large ones: the compiled buffer cache)
        return a.transpose(self.inverse)

    def strided3(self, a: np.ndarray) -> np.ndarray:
        """``a`` (full shape, any strides: a broadcast ``b`` or mask) as an (outer, n, inner)
        view, without a copy wherever NumPy can reshape it so (every layout of up to three
        axes, and any whose merged axes are contiguous or all broadcast)."""
        return a.transpose(self.perm).reshape(self.outer, self.n, self.inner)

    def mask3(self, mask: np.ndarray | None) -> np.ndarray | None:
        """A where= mask (full shape, any strides) as the kernels take it: an (outer, n, inner)
        uint8 view (see strided3), or None."""
        return None if mask is None else self.strided3(mask.view(np.uint8))

    def two(self, r: np.ndarray, cdt: np.dtype) -> np.ndarray:
        """``r`` (keepdims shape of the reduction) as a C-contiguous (outer, inner) array."""
        t = _aligned(np.ascontiguousarray(r.transpose(self.perm), dtype=cdt))
        return t.reshape(self.outer, self.inner)

    def unreduce(self, r2: np.ndarray) -> np.ndarray:
        """An (outer, inner) result as an array of the keepdims shape, in the original order."""
        return r2.reshape(self.reduced_pshape).transpose(self.inverse)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a``, or an aligned copy of it when it starts at an address that is not a multiple of
    its itemsize (a view into a byte buffer): the kernels' loads assume the dtype's alignment.
    (NumPy's contiguity flags do not look at alignment, and ascontiguousarray keeps it.)"""
    return a if a.flags.aligned else a.copy()


def _cast(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    """a in dtype dt; what overflows it (a dtype= cast, a float16 result) is inf, without a
    warning."""
    if a.dtype == dt:
        return a
    with np.errstate(over="ignore"):
        return a.astype(dt, copy=False)


def _finish(res: np.ndarray, out: np.ndarray | None, rdt: np.dtype, scalar: bool) -> Any:
    """Deliver a result computed in ``res``: into ``out``, or as a new array or NumPy scalar."""
    if out is not None:
        if res is not out:
            with np.errstate(over="ignore"):     # float16 results may round to inf: no warning
                np.copyto(out, res.reshape(out.shape), casting="unsafe")
        return out
    res = _cast(res, rdt)
    return res.reshape(())[()] if scalar else res


# ---------------------------------------------------------------------------------------------
# log_softmax and softmax


def _normalize(fname: str, x: Any, axis: AxisLike, out: Any, dtype: Any, where: Any) -> Any:
    xa = _array(x, fname, "x")
    rdt = _result_dtype(fname, xa, dtype=dtype)
    cdt = _compute_dtype(rdt)
    if dtype is not None:                           # dtype=: the input is cast first
        xa = _cast(xa, rdt)
    scalar = xa.ndim == 0
    if out is not None:
        _check_out(out, xa.shape, rdt, fname)
    xv = xa.reshape(1) if scalar else xa
    axes = _axes(axis, xv.ndim, fname)
    mask = _mask(where, xv.shape, fname)
    if xv.size == 0:
        return _finish(np.empty(xv.shape, cdt), out, rdt, scalar)

    outv = None if out is None else (out.reshape(1) if scalar else out)
    # Work in the memory order of out when one is given (x is copied into it when needed).
    layout = _Layout(xv.shape, axes, (None if outv is None else _c_order(outv)) or _c_order(xv))
    res = _result_buffer(outv, cdt, [xv] + ([] if mask is None else [mask]), layout)
    r3 = layout.view3(res)
    m3 = layout.mask3(mask)
    if xv.dtype != cdt or not layout.fits(xv):
        np.copyto(res, xv, casting="unsafe")       # work in place in the result
        x3 = r3
    else:
        x3 = layout.three(xv, cdt)
    getattr(_kernels(cdt), fname)(x3, r3, m3)
    return _finish(res, out, rdt, scalar)


# The kernels' shortcut, ``_K.fast(op, x, all_axes, out, g, axis)``: C-contiguous
# float32/float64 ndarrays (x, and g for the backward ops) and a C-contiguous writable ``out``,
# reduced over all axes or over any one; it returns None when it does not apply (the kernels
# check: an axis out of range too, which the general path then reports).  The public functions
# call it inline, with the op codes below (every backend's OPS has these: test_runtime checks),
# and only for a plain int axis (``type(axis) is int``: a float, bool or array axis takes the
# general path, which validates it).  A helper function's call cost up to a fifth of a (1, 10)
# call.
_OPS = _python.OPS
_LOG_SOFTMAX = _OPS["log_softmax"]
_SOFTMAX = _OPS["softmax"]
_LOGSUMEXP = _OPS["logsumexp"]
_LOGSUMEXP_BACKWARD = _OPS["logsumexp_backward"]


def log_softmax(x: Any, axis: AxisLike = -1, *, out: np.ndarray | None = None,
                dtype: Any = None, where: Any = None) -> Any:
    """Logarithm of the softmax: ``x - logsumexp(x, axis, keepdims=True)``, computed exactly.

    Parameters
    ----------
    x : array_like
        Input values (real floating-point, integer or boolean).
    axis : int, tuple of ints or None, optional
        Axis or axes over which the softmax is normalised; default -1 (the last axis).
        None means all axes.
    out : ndarray, optional
        Array of the result's shape and dtype to write into; may be ``x`` itself.
    dtype : floating dtype, optional
        Compute and return in this dtype (``x`` is cast first).
    where : array_like of bool, optional
        Entries that take part; the others are ``-inf`` in the result.  A fully masked row
        gives ``-inf`` everywhere.

    Returns
    -------
    ndarray or NumPy scalar
        Same shape as ``x``; ``exp`` of it sums to 1 along ``axis``.

    Notes
    -----
    With M the maximum and t the sum of ``exp(x_j - M)`` over all elements but the first
    maximal one, ``log_softmax(x)_i = (x_i - M) - log1p(t)``.  Using ``log1p`` rather than
    ``log(1 + t)`` keeps every element, the largest included, within a few ulp [1]_.

    References
    ----------
    .. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
       softmax functions", IMA J. Numer. Anal. 41(4), 2021. :doi:`10.1093/imanum/draa038`

    Examples
    --------
    >>> import cylsm
    >>> cylsm.log_softmax([1000.0, 1.0])
    array([   0., -999.])
    >>> cylsm.log_softmax([[0.0, 0.0], [1.0, 1.0]], axis=1)
    array([[-0.69314718, -0.69314718],
           [-0.69314718, -0.69314718]])
    """
    if type(axis) is int and dtype is None and where is None:
        result = _K.fast(_LOG_SOFTMAX, x, False, out, None, axis)
        if result is not None:
            return result
    return _normalize("log_softmax", x, axis, out, dtype, where)


def softmax(x: Any, axis: AxisLike = -1, *, out: np.ndarray | None = None,
            dtype: Any = None, where: Any = None) -> Any:
    """Softmax: ``exp(x) / sum(exp(x), axis)``, without overflow.

    Parameters
    ----------
    x : array_like
        Input values (real floating-point, integer or boolean).
    axis : int, tuple of ints or None, optional
        Axis or axes to normalise over; default -1.  None means all axes.
    out : ndarray, optional
        Array of the result's shape and dtype to write into; may be ``x`` itself.
    dtype : floating dtype, optional
        Compute and return in this dtype (``x`` is cast first).
    where : array_like of bool, optional
        Entries that take part; the others are 0 in the result.  A fully masked row gives 0
        everywhere (never NaN).

    Returns
    -------
    ndarray or NumPy scalar
        Same shape as ``x``, summing to 1 along ``axis``.

    Notes
    -----
    ``softmax(x)_i = exp(x_i - M) / (1 + t)`` with M the maximum and t the sum of the other
    terms [1]_.

    References
    ----------
    .. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
       softmax functions", IMA J. Numer. Anal. 41(4), 2021. :doi:`10.1093/imanum/draa038`

    Examples
    --------
    >>> import cylsm
    >>> cylsm.softmax([0.0, 0.0, 0.0, 0.0])
    array([0.25, 0.25, 0.25, 0.25])
    >>> cylsm.softmax([1.0, 2.0, 3.0], where=[True, True, False])
    array([0.26894142, 0.73105858, 0.        ])
    """
    if type(axis) is int and dtype is None and where is None:
        result = _K.fast(_SOFTMAX, x, False, out, None, axis)
        if result is not None:
            return result
    return _normalize("softmax", x, axis, out, dtype, where)


# ---------------------------------------------------------------------------------------------
# logsumexp


def _broadcast(fname: str, x: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.shape == b.shape:                  # (broadcast_shapes and broadcast_to: 10 us)
        return x, b
    try:
        shape = np.broadcast_shapes(x.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"cylsm.{fname}: b has shape {b.shape}, which does not broadcast with x of shape "
            f"{x.shape}"
        ) from None
    return np.broadcast_to(x, shape), np.broadcast_to(b, shape)


def _reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def logsumexp(a: Any, axis: AxisLike = None, *, keepdims: bool = False,
              out: np.ndarray | None = None, dtype: Any = None, b: Any = None,
              return_sign: bool = False, where: Any = None) -> Any:
    """Logarithm of the sum of exponentials, ``log(sum(b * exp(a), axis))``, without overflow.

    Parameters
    ----------
    a : array_like
        Input values (real floating-point, integer or boolean).
    axis : int, tuple of ints or None, optional
        Axis or axes to reduce; default None (all axes).
    keepdims : bool, optional
        Keep the reduced axes as dimensions of size one.
    out : ndarray, optional
        Array of the result's shape and dtype to write the value into.
    dtype : floating dtype, optional
        Compute and return in this dtype (``a`` is cast first).
    b : array_like, optional
        Weights, broadcast together with ``a`` (as in scipy).  Entries with ``b == 0`` take no
        part, even where ``a`` is inf or NaN.  Negative weights are allowed.
    return_sign : bool, optional
        Return ``(log|s|, sign(s))`` instead of NaN for a negative sum ``s``.
    where : array_like of bool, optional
        Entries that take part; a fully masked reduction gives ``-inf``.

    Returns
    -------
    ndarray or NumPy scalar, or a pair of them when ``return_sign`` is True.

    Notes
    -----
    With M the maximum, ``logsumexp(a) = M + log1p(t)`` where t sums ``exp(a_j - M)`` over
    all elements but one maximal one: results near 0 keep full relative accuracy [1]_.

    References
    ----------
    .. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
       softmax functions", IMA J. Numer. Anal. 41(4), 2021. :doi:`10.1093/imanum/draa038`

    Examples
    --------
    >>> import cylsm
    >>> float(cylsm.logsumexp([0.0, -40.0]))
    4.248354255291589e-18
    >>> cylsm.logsumexp([[1.0, 2.0], [3.0, 4.0]], axis=1)
    array([2.31326169, 4.31326169])
    >>> value, sign = cylsm.logsumexp([1.0, 2.0], b=[1.0, -1.0], return_sign=True)
    >>> float(value), float(sign)
    (1.5413248546129181, -1.0)
    """
    if (axis is None or type(axis) is int) and dtype is None and b is None \
            and not return_sign and where is None and not (keepdims and out is not None):
        result = _K.fast(_LOGSUMEXP, a, axis is None, out, None, axis)
        if result is not None:      # (a is then an ndarray, axis None or valid)
            if keepdims:            # the reduced axes as ones: a reshape (not the general path)
                return result.reshape(_reduced_shape(a.shape, _axes(axis, a.ndim, "logsumexp"),
                                                     True))
            return result
    fname = "logsumexp"
    xa = _array(a, fname, "a")
    ba = None if b is None else _array(b, fname, "b")
    rdt = _result_dtype(fname, xa, *([] if ba is None else [_weak(b, ba)]), dtype=dtype)
    cdt = _compute_dtype(rdt)
    if dtype is not None:                           # dtype=: the inputs are cast first
        xa = _cast(xa, rdt)
        ba = None if ba is None else _cast(ba, rdt)
    if ba is not None:          # cast before broadcasting: a broadcast b is never copied
        xa, ba = _broadcast(fname, xa, _aligned(_cast(ba, cdt)))
    scalar_in = xa.ndim == 0
    xv = xa.reshape(1) if scalar_in else xa
    bv = None if ba is None else (ba.reshape(1) if scalar_in else ba)
    axes = _axes(axis, xv.ndim, fname)
    rshape = () if scalar_in else _reduced_shape(xv.shape, axes, keepdims)
    if out is not None:
        _check_out(out, rshape, rdt, fname)
    mask = _mask(where, xv.shape, fname)

    layout = _Layout(xv.shape, axes, _c_order(xv))
    res2 = np.empty((layout.outer, layout.inner), cdt)
    sign2 = np.empty_like(res2) if return_sign else None
    m3 = layout.mask3(mask)         # b and the mask go to the kernels as views
    if res2.size:
        if layout.n == 0:
            res2.fill(-np.inf)
        elif bv is not None:
            _kernels(cdt).logsumexp_weighted(layout.three(xv, cdt), layout.strided3(bv), res2,
                                             sign2, m3)
        else:
            _kernels(cdt).logsumexp(layout.three(xv, cdt), res2, m3)
        if sign2 is not None and (bv is None or layout.n == 0):
            # a sum of exps: positive, or 0 (result -inf), or NaN
            np.copyto(sign2, np.where(res2 == -np.inf, 0.0, np.where(np.isnan(res2), np.nan, 1.0)))
    value = layout.unreduce(res2).reshape(rshape)
    result = _finish(value, out, rdt, rshape == () and out is None)
    if not return_sign:
        return result
    assert sign2 is not None
    sign = _finish(layout.unreduce(sign2).reshape(rshape), None, rdt, rshape == ())
    return result, sign


# ---------------------------------------------------------------------------------------------
# Backward


def _backward(fname: str, grad: Any, y: Any, yname: str, axis: AxisLike, out: Any,
              where: Any) -> Any:
    if type(axis) is int and where is None:
        result = _K.fast(_OPS[fname], y, False, out, grad, axis)
        if result is not None:
            return result
    g = _array(grad, fname, "grad")
    ya = _array(y, fname, yname)
    _same_shape(fname, g, "grad", ya, yname)
    rdt = _result_dtype(fname, _weak(grad, g), ya)
    cdt = _compute_dtype(rdt)
    scalar = ya.ndim == 0
    if out is not None:
        _check_out(out, ya.shape, rdt, fname)
    gv, yv = (g.reshape(1), ya.reshape(1)) if scalar else (g, ya)
    axes = _axes(axis, yv.ndim, fname)
    mask = _mask(where, yv.shape, fname)
    if yv.size == 0:
        return _finish(np.empty(yv.shape, cdt), out, rdt, scalar)
    outv = None if out is None else (out.reshape(1) if scalar else out)
    layout = _Layout(yv.shape, axes, _c_order(yv))
    res = _result_buffer(outv, cdt, [gv, yv] + ([] if mask is None else [mask]), layout)
    r3 = layout.view3(res)
    # The mask reaches the kernel as a view: masked entries take no part in the sums, get 0.
    getattr(_kernels(cdt), fname)(layout.three(gv, cdt), layout.three(yv, cdt), r3,
                                  **({} if mask is None else {"where": layout.mask3(mask)}))
    return _finish(res, out, rdt, scalar)


def log_softmax_backward(grad: Any, y: Any, axis: AxisLike = -1, *,
                         out: np.ndarray | None = None, where: Any = None) -> Any:
    """Gradient of :func:`log_softmax`: ``grad - exp(y) * sum(grad, axis)``.

    Parameters
    ----------
    grad : array_like
        Upstream gradient dL/dy, of the shape of ``y``.
    y : array_like
        The forward result ``log_softmax(x, axis)``.
    axis : int, tuple of ints or None, optional
        The axis given to the forward call; default -1.
    out : ndarray, optional
        Array to write dL/dx into; may be ``grad`` or ``y``.
    where : array_like of bool, optional
        The mask given to the forward call: masked entries get gradient 0 and take no part in
        the sum.

    Returns
    -------
    ndarray or NumPy scalar
        dL/dx, of the shape of ``y``.

    Examples
    --------
    >>> import numpy as np, cylsm
    >>> y = cylsm.log_softmax([0.0, 0.0])
    >>> cylsm.log_softmax_backward(np.array([1.0, 0.0]), y)
    array([ 0.5, -0.5])
    """
    return _backward("log_softmax_backward", grad, y, "y", axis, out, where)


def softmax_backward(grad: Any, p: Any, axis: AxisLike = -1, *,
                     out: np.ndarray | None = None, where: Any = None) -> Any:
    """Gradient of :func:`softmax`: ``p * (grad - sum(grad * p, axis))``.

    Parameters
    ----------
    grad : array_like
        Upstream gradient dL/dp, of the shape of ``p``.
    p : array_like
        The forward result ``softmax(x, axis)``.
    axis : int, tuple of ints or None, optional
        The axis given to the forward call; default -1.
    out : ndarray, optional
        Array to write dL/dx into; may be ``grad`` or ``p``.
    where : array_like of bool, optional
        The mask given to the forward call: masked entries get gradient 0 and take no part in
        the sum.

    Returns
    -------
    ndarray or NumPy scalar
        dL/dx, of the shape of ``p``.

    Examples
    --------
    >>> import numpy as np, cylsm
    >>> p = cylsm.softmax([0.0, 0.0])
    >>> cylsm.softmax_backward(np.array([1.0, 0.0]), p)
    array([ 0.25, -0.25])
    """
    return _backward("softmax_backward", grad, p, "p", axis, out, where)


def logsumexp_backward(grad: Any, x: Any, axis: AxisLike = None, *, keepdims: bool = False,
                       b: Any = None, out: np.ndarray | None = None, where: Any = None) -> Any:
    """Gradient of :func:`logsumexp`: ``grad * b * exp(x - logsumexp(x, b=b))``.

    Parameters
    ----------
    grad : array_like
        Upstream gradient, of the shape of the logsumexp result for this ``axis`` and
        ``keepdims``.
    x : array_like
        The forward input (not the result: the gradient is formed from ``x - max`` so that it
        stays accurate when ``|logsumexp(x)|`` is large).
    axis : int, tuple of ints or None, optional
        The axis given to the forward call; default None (all axes).
    keepdims : bool, optional
        Whether ``grad`` has the reduced axes as dimensions of size one.
    b : array_like, optional
        The weights given to the forward call (broadcastable to ``x``).
    out : ndarray, optional
        Array of the shape of ``x`` to write dL/dx into; may be ``x``.
    where : array_like of bool, optional
        The mask given to the forward call: masked entries get gradient 0.

    Returns
    -------
    ndarray or NumPy scalar
        dL/dx, of the shape of ``x``.  A reduction whose logsumexp is -inf gets exactly 0.

    Examples
    --------
    >>> import cylsm
    >>> cylsm.logsumexp_backward(1.0, [0.0, 0.0])
    array([0.5, 0.5])
    """
    if (axis is None or type(axis) is int) and not keepdims and b is None and where is None:
        result = _K.fast(_LOGSUMEXP_BACKWARD, x, axis is None, out, grad, axis)
        if result is not None:
            return result
    fname = "logsumexp_backward"
    xa = _array(x, fname, "x")
    g = _array(grad, fname, "grad")
    ba = None if b is None else _array(b, fname, "b")
    rdt = _result_dtype(fname, _weak(grad, g), xa, *([] if ba is None else [_weak(b, ba)]))
    cdt = _compute_dtype(rdt)
    scalar = xa.ndim == 0
    if out is not None:
        _check_out(out, xa.shape, rdt, fname)
    xv = xa.reshape(1) if scalar else xa
    axes = _axes(axis, xv.ndim, fname)
    gshape = () if scalar else _reduced_shape(xv.shape, axes, keepdims)
    if g.shape != gshape:
        raise ValueError(
            f"cylsm.{fname}: grad has shape {g.shape} but the logsumexp of x (shape "
            f"{xa.shape}) over axis={axis!r} with keepdims={keepdims} has shape {gshape}"
        )
    mask = _mask(where, xv.shape, fname)
    bv: np.ndarray | None = None
    if ba is not None:          # cast before broadcasting: a broadcast b is never copied
        bc = _aligned(_cast(ba.reshape(1) if ba.ndim == 0 else ba, cdt))
        try:
            bv = bc if bc.shape == xv.shape else np.broadcast_to(bc, xv.shape)
        except ValueError:
            raise ValueError(
                f"cylsm.{fname}: b has shape {ba.shape}, which does not broadcast to x of shape "
                f"{xa.shape}"
            ) from None
    if xv.size == 0:
        return _finish(np.empty(xv.shape, cdt), out, rdt, scalar)

    outv = None if out is None else (out.reshape(1) if scalar else out)
    layout = _Layout(xv.shape, axes, _c_order(xv))
    res = _result_buffer(outv, cdt, [xv, g] + [v for v in (bv, mask) if v is not None], layout)
    r3 = layout.view3(res)
    g2 = layout.two(g.reshape(_reduced_shape(xv.shape, axes, True)), cdt)
    K = _kernels(cdt)
    m3 = layout.mask3(mask)         # b and the mask go to the kernels as views; they write 0
    if bv is None:                  # where those are 0
        K.logsumexp_backward(g2, layout.three(xv, cdt), r3, m3)
    else:
        K.logsumexp_backward_weighted(g2, layout.three(xv, cdt), layout.strided3(bv), r3, m3)
    return _finish(res, out, rdt, scalar)
