"""Leaks: 100,000 calls of each public function keep the process flat and leave no references.

Each function is called 100,000 times, cycling through its call forms: the shortcut, the
general path (other axes, ``where=``, ``b=``, ``dtype=``, non-contiguous input), ``out=``, and
calls that raise.  That runs in a fresh process per backend (the default, best compiled level,
and the Python backend with 20,000 calls: it is ~5x slower), where a leak shows in the RSS at
once.  After a warm-up, the measures are

- the resident set size (RSS, from /proc/self/statm): it must grow by less than ``RSS_BOUND``;
- the number of blocks held by CPython's allocator (``sys.getallocatedblocks``): a leaked
  object of any kind (array, scalar, tuple, exception, traceback) is one block or more per call;
- ``sys.getrefcount`` of every input, of every ``out``, of the dtypes and of the NumPy
  functions the kernels call: all unchanged; a new result is referenced by the caller only.

The compiled kernels are also called directly, in ways that raise while buffers are held (a
read-only ``out``, a wrong dtype, a non-buffer gradient): their error paths must release them.

``python tests/test_leaks.py`` prints the measurements for every backend, 100,000 calls each.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import pytest

from cylsm import _api, _select

try:
    from numpy.exceptions import AxisError
except ImportError:  # NumPy < 1.25
    from numpy import AxisError  # type: ignore[attr-defined,no-redef]

N_CALLS = 100_000
N_CALLS_PYTHON = 20_000      # in the suite: the NumPy backend is ~5x slower (the script: 100,000)
WARMUP = 10_000
RSS_BOUND = 1 << 20          # bytes of RSS growth allowed over N_CALLS calls
# CPython allocator blocks.  Warm caches still settle by up to ~200 blocks (logsumexp's general
# path); a leak of one block per call in a single call form gives over 1,600 at 20,000 calls.
BLOCKS_BOUND = 1000
HAVE_STATM = os.path.exists("/proc/self/statm")
NO_EXT = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
# Under AddressSanitizer (tools/sanitize.sh) freed memory sits in a quarantine, so RSS grows
# without a leak, and PYTHONMALLOC=malloc bypasses the allocator whose blocks are counted: those
# two measures are then left out; the reference counts are still checked.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
PYMALLOC = sys.getallocatedblocks() > 0


def rss() -> int:
    """Resident set size in bytes (Linux); 0 where /proc is not available."""
    if not HAVE_STATM:
        return 0
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


Call = Callable[[], Any]


class Case:
    """The call forms of one function, over small fixed inputs."""

    def __init__(self, calls: list[tuple[str, Call, type[BaseException] | None]],
                 inputs: list[Any], outs: list[np.ndarray]):
        self.calls = calls
        self.inputs = inputs
        self.outs = outs


def cases(lsm: Any) -> dict[str, Case]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    x64 = rng.standard_normal((3, 10))
    g = rng.standard_normal((2, 8)).astype(np.float32)
    mask = rng.random((2, 8)) > 0.3
    b = rng.random((2, 8)).astype(np.float32) - 0.2
    xc = x.astype(np.complex64)
    xnc = x64[:, ::2]                                   # not contiguous
    ro = np.empty_like(x)
    ro.flags.writeable = False
    out = np.empty_like(x)
    out0 = np.empty((8,), np.float32)
    out1 = np.empty((2,), np.float32)
    y = lsm.log_softmax(x)
    p = lsm.softmax(x)
    g1 = rng.standard_normal(2).astype(np.float32)
    inputs = [x, x64, g, mask, b, xc, xnc, y, p, g1]

    def forward(f: Callable[..., Any], fill_out: np.ndarray) -> Case:
        return Case([
            ("shortcut", lambda: f(x), None),
            ("shortcut out=", lambda: f(x, out=fill_out), None),
            ("in place float64", lambda: f(x64, out=x64), None),
            ("axis=0", lambda: f(x, axis=0), None),
            ("axis=None, where=", lambda: f(x, axis=None, where=mask), None),
            ("dtype=float64", lambda: f(x, dtype=np.float64), None),
            ("not contiguous", lambda: f(xnc), None),
            ("list input", lambda: f([1.0, 2.0, 3.0]), None),
            ("complex: TypeError", lambda: f(xc), TypeError),
            ("axis=5: AxisError", lambda: f(x, axis=5), AxisError),
            ("read-only out", lambda: f(x, out=ro), ValueError),
            ("out of wrong shape", lambda: f(x, out=out1), ValueError),
        ], inputs, [fill_out, ro, out1])

    def backward(f: Callable[..., Any], q: np.ndarray) -> Case:
        return Case([
            ("shortcut", lambda: f(g, q), None),
            ("shortcut out=", lambda: f(g, q, out=out), None),
            ("axis=0", lambda: f(g, q, axis=0), None),
            ("where=", lambda: f(g, q, where=mask), None),
            ("float64 grad", lambda: f(g.astype(np.float64), q), None),
            ("shape mismatch", lambda: f(g[:1], q), ValueError),
            ("axis=(0, 0)", lambda: f(g, q, axis=(0, 0)), ValueError),
            # (with its dtype: NumPy 2.4's np.empty(shape) leaks a reference to float64's dtype)
            ("out of wrong dtype", lambda: f(g, q, out=np.empty((2, 8), np.float64)), ValueError),
        ], inputs, [out])

    return {
        "log_softmax": forward(lsm.log_softmax, out),
        "softmax": forward(lsm.softmax, out),
        "logsumexp": Case([
            ("shortcut", lambda: lsm.logsumexp(x), None),
            ("shortcut axis=-1", lambda: lsm.logsumexp(x, axis=-1), None),
            ("shortcut out=", lambda: lsm.logsumexp(x, axis=-1, out=out1), None),
            ("axis=0 out=", lambda: lsm.logsumexp(x, axis=0, out=out0), None),
            ("b=, return_sign", lambda: lsm.logsumexp(x, axis=1, b=b, return_sign=True), None),
            ("where=, keepdims", lambda: lsm.logsumexp(x, axis=1, where=mask, keepdims=True),
             None),
            ("dtype=float64", lambda: lsm.logsumexp(x, dtype=np.float64), None),
            ("b of wrong shape", lambda: lsm.logsumexp(x, b=b[:, :3]), ValueError),
            ("complex: TypeError", lambda: lsm.logsumexp(xc), TypeError),
            ("out of wrong shape", lambda: lsm.logsumexp(x, axis=0, out=out1), ValueError),
        ], inputs, [out0, out1]),
        "log_softmax_backward": backward(lsm.log_softmax_backward, y),
        "softmax_backward": backward(lsm.softmax_backward, p),
        "logsumexp_backward": Case([
            ("axis=None", lambda: lsm.logsumexp_backward(1.0, x), None),
            ("axis=1", lambda: lsm.logsumexp_backward(g1, x, axis=1), None),
            ("axis=1 out=", lambda: lsm.logsumexp_backward(g1, x, axis=1, out=out), None),
            ("b=", lambda: lsm.logsumexp_backward(g1, x, axis=1, b=b), None),
            ("where=", lambda: lsm.logsumexp_backward(g1, x, axis=1, where=mask), None),
            ("grad of wrong shape", lambda: lsm.logsumexp_backward(g, x, axis=1), ValueError),
            ("axis='a'", lambda: lsm.logsumexp_backward(g1, x, axis="a"), TypeError),
        ], inputs, [out]),
    }


def kernel_case(K: Any) -> Case:
    """The compiled kernels called directly, raising with buffers already acquired."""
    x = np.random.default_rng(1).standard_normal((2, 8))
    x3 = x.reshape(2, 8, 1)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    out = np.empty_like(x)
    out32 = np.empty((2, 8, 1), np.float32)
    g = np.ones_like(x)
    gdt = np.zeros(x.shape, "M8[s]")       # datetime64: getting its buffer raises
    ls = K.OPS["log_softmax"]
    lsb = K.OPS["log_softmax_backward"]
    return Case([
        ("fast", lambda: K.fast(ls, x), None),
        ("fast out=", lambda: K.fast(ls, x, False, out), None),
        ("fast declines a read-only out", lambda: K.fast(ls, x, False, ro), None),
        ("fast declines g not an array", lambda: K.fast(lsb, x, False, None, 1.5), None),
        ("fast declines g of other shape", lambda: K.fast(lsb, x, False, None, g[:1]), None),
        ("fast declines g without a buffer format", lambda: K.fast(lsb, x, False, None, gdt),
         None),
        ("fast declines out without a buffer format", lambda: K.fast(ls, x, False, gdt), None),
        ("kernel", lambda: K.log_softmax(x3, x3.copy()), None),
        ("kernel read-only out", lambda: K.log_softmax(x3, ro.reshape(2, 8, 1)), ValueError),
        ("kernel dtype mismatch", lambda: K.log_softmax(x3, out32), ValueError),
        ("kernel wrong ndim", lambda: K.logsumexp(x3, x3.copy()), ValueError),
    ], [x, x3, ro, out, out32, g, gdt], [out, ro, out32])


def watched(case: Case) -> list[Any]:
    """Objects whose reference counts must not change: inputs, outs, dtypes, NumPy functions."""
    return [*case.inputs, *case.outs, np.dtype(np.float32), np.dtype(np.float64),
            np.empty, np.empty_like, np.copyto, AxisError]


def run_calls(case: Case, n: int) -> None:
    calls = case.calls
    k = len(calls)
    for i in range(n):
        _, f, exc = calls[i % k]
        if exc is None:
            f()
        else:
            try:
                f()
            except exc:
                pass
            else:
                raise AssertionError(f"{calls[i % k][0]}: {exc.__name__} was not raised")


def measure(case: Case, n: int = N_CALLS) -> dict[str, Any]:
    """Call the case's forms n times in turn; what changed."""
    for name, f, exc in case.calls:        # a result is new (the caller's alone) or the out
        if exc is None:
            r = f()
            if isinstance(r, tuple):
                assert [sys.getrefcount(r[i]) for i in range(len(r))] == [2] * len(r), name
            elif not any(r is o for o in case.outs + case.inputs) and r is not None:
                assert sys.getrefcount(r) == 2, name
            del r
    run_calls(case, WARMUP)
    watch = watched(case)
    gc.collect()
    refs = [sys.getrefcount(o) for o in watch]
    blocks = sys.getallocatedblocks()
    rss0 = rss()
    t0 = time.perf_counter()
    run_calls(case, n)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss1 = rss()
    blocks1 = sys.getallocatedblocks()
    refs1 = [sys.getrefcount(o) for o in watch]
    changed = [(repr(o)[:60], a, b) for o, a, b in zip(watch, refs, refs1) if a != b]
    return {"calls": n, "rss_before": rss0, "rss_after": rss1, "rss_growth": rss1 - rss0,
            "blocks_growth": blocks1 - blocks, "refcounts_changed": changed, "seconds": seconds}


def check(m: dict[str, Any]) -> None:
    assert m["refcounts_changed"] == [], m
    if PYMALLOC:
        assert m["blocks_growth"] < BLOCKS_BOUND, m
    # Without /proc there is no portable reading of the current RSS; the counts still hold.
    if HAVE_STATM and not UNDER_ASAN:
        assert m["rss_growth"] < RSS_BOUND, m


FUNCTIONS = ["log_softmax", "softmax", "logsumexp", "log_softmax_backward", "softmax_backward",
             "logsumexp_backward"]
KERNELS = "kernels called directly"
# The default backend (the best compiled level) and the Python one; the other compiled levels
# run the same Python code and the same kernel source: their error paths are measured.
BACKENDS = ([] if NO_EXT else [_select.COMPILED_NAMES[0]] if _select.COMPILED_NAMES else []) + [
    "python"]


def measure_backend(name: str, leak: bool = False, full: bool = False
                    ) -> dict[str, dict[str, Any]]:
    """Every function of backend ``name`` (and its kernels called directly), measured in this
    process.  leak: a backend that keeps a small array per call (to see the test fail); full:
    N_CALLS on the Python backend too."""
    import cylsm

    K = _select.load(name)
    if leak:
        kept: list[Any] = []

        class Leaky:
            def __getattr__(self, attr: str) -> Any:
                f = getattr(K, attr)
                if not callable(f):
                    return f

                def wrapper(*args: Any) -> Any:
                    kept.append(np.empty(4, np.float64))
                    return f(*args)
                return wrapper
        _api._K = Leaky()  # type: ignore[assignment]
        case = cases(cylsm)["log_softmax"]
        case.calls = case.calls[:1]
        return {"log_softmax": measure(case, 20_000)}
    _api._K = K
    rows = list(cases(cylsm).items())
    if name != "python":
        rows.append((KERNELS, kernel_case(K)))
    n = N_CALLS if name != "python" or full else N_CALLS_PYTHON
    return {fname: measure(case, n) for fname, case in rows}


@functools.lru_cache(maxsize=None)
def measured(name: str, leak: bool = False, full: bool = False) -> dict[str, dict[str, Any]]:
    """measure_backend in a fresh process (``python tests/test_leaks.py --json name``): there a
    leak makes RSS grow at once, where a long pytest run has freed memory to reuse first."""
    args = [sys.executable, os.path.abspath(__file__), "--json", name]
    args += (["--leak"] if leak else []) + (["--full"] if full else [])
    env = {k: v for k, v in os.environ.items() if k != "CYLSM_NO_EXTENSIONS" or name == "python"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    result: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("fname", FUNCTIONS + [KERNELS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_leak(backend: str, fname: str) -> None:
    if backend == "python" and fname == KERNELS:
        return          # the Python backend has no buffers to release
    check(measured(backend)[fname])


@pytest.mark.parametrize("name", _select.COMPILED_NAMES[1:])
def test_no_leak_in_kernel_error_paths(name: str) -> None:
    """The other compiled levels, in this process (their Python side is the same code)."""
    check(measure(kernel_case(_select.load(name)), 20_000))


def test_a_leak_is_caught() -> None:
    """The measurements can fail: a backend that keeps a small array per call."""
    m = measured(BACKENDS[0], leak=True)["log_softmax"]
    if PYMALLOC:
        assert m["blocks_growth"] >= 19_000, m
    if HAVE_STATM and not UNDER_ASAN:
        assert m["rss_growth"] > RSS_BOUND, m         # 20,000 small arrays: ~3 MB
    if PYMALLOC or (HAVE_STATM and not UNDER_ASAN):
        with pytest.raises(AssertionError):
            check(m)


def test_a_reference_leak_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import cylsm

    leaked: list[Any] = []
    case = cases(cylsm)["softmax"]
    x = case.inputs[0]
    case.calls = [("leaky", lambda: leaked.append(x) or cylsm.softmax(x), None)]
    m = measure(case, 1_000)
    assert any(b - a == 1_000 for _, a, b in m["refcounts_changed"]), m
    with pytest.raises(AssertionError):
        check(m)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--json"]:
        print(json.dumps(measure_backend(sys.argv[2], leak="--leak" in sys.argv,
                                         full="--full" in sys.argv)))
        sys.exit(0)
    names = list(_select.COMPILED_NAMES) + ["python"]
    print(f"{N_CALLS} calls each, in a fresh process per backend; RSS and CPython allocator "
          "blocks before -> after")
    for name in names:
        for fname, m in measured(name, full=True).items():
            print(f"{name:18} {fname:24} {m['calls']} calls  RSS {m['rss_before'] / 2**20:6.2f} -> "
                  f"{m['rss_after'] / 2**20:6.2f} MiB ({m['rss_growth'] / 1024:+5.0f} KiB)  "
                  f"blocks {m['blocks_growth']:+4d}  refcounts changed: "
                  f"{m['refcounts_changed'] or 'none'}  ({m['seconds']:.1f} s)")
