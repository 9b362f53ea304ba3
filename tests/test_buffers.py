"""The compiled backends' buffer cache (src/cylsm_buffers.h): the memory of large outputs,
kept once they are freed and given to the next output it fits.

Outputs of at least 4 MiB are allocated through cylsm's NumPy memory handler; a freed one is
kept (at most 8, at most CYLSM_BUFFER_CACHE_MB MiB: 256 by default) and reused.  What a user
relies on: results are the same whatever memory they land in, arrays on that memory behave as
any other (views outlive their base, resize, pickle, tracemalloc), the limits hold, threads may
allocate and free at once, and a bad CYLSM_BUFFER_CACHE_MB is an error that says what to set.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
import tracemalloc

import numpy as np
import pytest

import cylsm
from cylsm import _api, _select

NO_EXT = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
pytestmark = pytest.mark.skipif(NO_EXT, reason="the buffer cache is the compiled backends'")
try:
    from numpy._core.multiarray import get_handler_name     # NumPy >= 2
except ImportError:
    from numpy.core.multiarray import get_handler_name  # type: ignore[no-redef]

MIB = 1 << 20
ROWS, COLS = 1024, 1024             # float64: 8 MiB, twice the smallest size the cache takes


def _x(dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal((ROWS, COLS)).astype(dtype)


# Every function whose output has x's shape: (name, call on x, its arguments).
CALLS = {
    "log_softmax": lambda x, g, **kw: cylsm.log_softmax(x, **kw),
    "softmax": lambda x, g, **kw: cylsm.softmax(x, **kw),
    "log_softmax_backward": lambda x, g, **kw: cylsm.log_softmax_backward(x, x, **kw),
    "softmax_backward": lambda x, g, **kw: cylsm.softmax_backward(x, x, **kw),
    "logsumexp_backward": lambda x, g, **kw: cylsm.logsumexp_backward(g, x, **kw),
}


@pytest.fixture(params=_select.COMPILED_NAMES)
def kernels(request, monkeypatch):
    K = _select.load(request.param)
    monkeypatch.setattr(_api, "_K", K)
    return K


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_freed_output_memory_is_reused_and_results_do_not_depend_on_it(kernels, name, dtype):
    """Free a large output after filling it with NaN: the next output of that size lands in
    the same memory and is bit for bit the result computed into fresh memory (out=)."""
    x = _x(dtype)
    g = np.random.default_rng(1).standard_normal(ROWS).astype(dtype)
    call = CALLS[name]
    for xin in (x, np.asfortranarray(x)):              # the shortcut, the general path
        expected = np.empty_like(xin)                   # (in xin's memory order)
        call(xin, g, axis=-1, out=expected)
        first = call(xin, g, axis=-1)
        assert get_handler_name(first if first.base is None else first.base) == "cylsm_buffers"
        address = first.ctypes.data
        assert address % 64 == 0
        first[...] = np.nan
        before = kernels.buffer_cache()
        del first
        second = call(xin, g, axis=-1)
        after = kernels.buffer_cache()
        assert second.ctypes.data == address
        assert after["reused"] == before["reused"] + 1
        np.testing.assert_array_equal(second, expected, strict=True)
        del second


def test_small_outputs_and_out_do_not_use_the_cache(kernels):
    x = _x()[:256]                                      # 2 MiB: numpy's own memory
    before = kernels.buffer_cache()
    assert get_handler_name(cylsm.softmax(x)) != "cylsm_buffers"
    assert get_handler_name(cylsm.logsumexp(_x(), axis=-1)) != "cylsm_buffers"   # 8 KiB
    out = np.empty_like(_x())
    assert cylsm.softmax(_x(), out=out) is out
    after = kernels.buffer_cache()
    assert (after["reused"], after["fresh"]) == (before["reused"], before["fresh"])


def test_arrays_on_cached_memory_behave_as_any_other(kernels):
    """A view outlives its base; resize (NumPy's realloc through the handler) keeps the data;
    pickling copies; tracemalloc sees the memory NumPy allocates through the handler."""
    x = _x()
    expected = cylsm.log_softmax(x, out=np.empty_like(x))
    y = cylsm.log_softmax(x)
    view = y[::3]
    del y
    others = [cylsm.softmax(x) for _ in range(3)]       # may take any buffer freed meanwhile
    np.testing.assert_array_equal(view, expected[::3])
    del view, others

    y = cylsm.log_softmax(x)
    y.resize((2 * ROWS, COLS), refcheck=False)          # grows: new memory, data copied
    np.testing.assert_array_equal(y[:ROWS], expected)
    y.resize((ROWS // 2, COLS), refcheck=False)         # shrinks in place
    np.testing.assert_array_equal(y, expected[: ROWS // 2])
    back = pickle.loads(pickle.dumps(y))
    np.testing.assert_array_equal(back, y)
    del y, back

    tracemalloc.start()
    try:
        y = cylsm.log_softmax(x)
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert traced >= y.nbytes
    del y


def test_threads_allocate_and_free_at_once(kernels):
    """Four threads each make and drop outputs of three sizes: every result is right and the
    cache stays within its limits."""
    x = _x()
    sizes = [x[: ROWS // 2], x, x[: 3 * ROWS // 4]]
    expected = [cylsm.softmax(s, out=np.empty_like(s)) for s in sizes]
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                k = int(rng.integers(3))
                y = cylsm.softmax(sizes[k])
                if not np.array_equal(y, expected[k]):
                    errors.append(k)
        except Exception as exc:                        # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    cache = kernels.buffer_cache()
    assert cache["count"] <= 8 and cache["held"] <= cache["limit"]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CYLSM_NO_EXTENSIONS", "CYLSM_BUFFER_CACHE_MB")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, cwd=tempfile.gettempdir(), check=False)


LIMITS = """
import numpy as np, cylsm
from cylsm import _api
x = np.ones((1024, 1024))          # 8 MiB outputs
ys = [cylsm.softmax(x) for _ in range(12)]
del ys                             # 12 freed
ys = [cylsm.softmax(x) for _ in range(2)]
del ys                             # 2 taken (unless none was kept) and freed again
c = _api._K.buffer_cache()
print(c["limit"], c["count"], c["held"], c["fresh"], c["reused"])
"""


def test_limits_hold():
    """At most 8 buffers and at most CYLSM_BUFFER_CACHE_MB MiB are kept (the most recently
    freed); a buffer counts its whole mapping (on Linux 2 MiB pages: 10 MiB for 8 MiB of data);
    0 turns the cache off: outputs then come from NumPy as usual."""
    for mb in ("", "25", "4", "0"):
        proc = _run(LIMITS, CYLSM_BUFFER_CACHE_MB=mb)
        assert proc.returncode == 0, proc.stderr
        limit, kept, held, fresh, reused = map(int, proc.stdout.split())
        assert limit == (int(mb) * MIB if mb else 256 * MIB)
        assert held <= limit
        if mb in ("4", "0"):
            assert kept == held == 0
        else:
            size = held // kept                 # every buffer holds the same 8 MiB output
            assert 8 * MIB <= size <= 10 * MIB and kept == min(8, limit // size)
        # 12 new outputs, then 2 from the cache (new ones at "4"; at "0" NumPy makes them)
        assert (fresh, reused) == ((0, 0) if mb == "0" else (14, 0) if mb == "4" else (12, 2))


@pytest.mark.parametrize("value", ["abc", "-1", "1e20", "nan"])
def test_bad_limit_is_an_error_that_says_what_to_set(value):
    proc = _run("import cylsm", CYLSM_BUFFER_CACHE_MB=value)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "CYLSM_BUFFER_CACHE_MB" in proc.stderr
    assert "expected a number from 0" in proc.stderr


def test_show_config_reports_the_cache(capsys):
    if cylsm.backend != "compiled":
        pytest.skip("the Python backend is active")
    cylsm.show_config()
    assert "CYLSM_BUFFER_CACHE_MB" in capsys.readouterr().out


FORK = """
import os, numpy as np, cylsm
from cylsm import _api
x = np.random.default_rng(0).standard_normal((1024, 1024))
expected = cylsm.softmax(x, out=np.empty_like(x))
ys = [cylsm.softmax(x) for _ in range(3)]
del ys
assert _api._K.buffer_cache()["count"] == 3
pid = os.fork()
if pid == 0:
    c = _api._K.buffer_cache()
    ok = c["count"] == 0 and c["held"] == 0
    ys = [cylsm.softmax(x) for _ in range(3)]
    ok = ok and all(np.array_equal(y, expected) for y in ys)
    del ys
    ok = ok and _api._K.buffer_cache()["count"] == 3
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert _api._K.buffer_cache()["count"] == 3
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_starts_with_an_empty_cache():
    """After fork the child has a new lock (the parent's may have been held by another thread)
    and an empty list, and allocates and frees as before; the parent keeps its list."""
    proc = _run(FORK)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
