"""Concurrency (issue 5): many Python threads at once give the serial results bit for bit; the
compiled kernels release the GIL (another Python thread makes progress during a long call, and
two threads on two long calls overlap); cylsm works nested in concurrent.futures pools (threads,
and processes whichever way they start) and under threadpool_limits; on a free-threaded
interpreter importing cylsm keeps the GIL off."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cylsm import _select

threadpoolctl = pytest.importorskip("threadpoolctl")

N_THREADS = 16


def shared_inputs():
    """Read-only inputs that take each kernel shape: rows, short rows (tiles), one long row
    (shared by the OpenMP threads), columns (axis=0), a transposed view, weights and masks."""
    rng = np.random.default_rng(5)
    d = {}
    for dt in (np.float32, np.float64):
        d[dt, "rows"] = (rng.standard_normal((96, 3000)) * 8).astype(dt)
        d[dt, "short"] = (rng.standard_normal((3000, 20)) * 8).astype(dt)
        d[dt, "long"] = (rng.standard_normal(300_000) * 8).astype(dt)
        d[dt, "cols"] = (rng.standard_normal((700, 300)) * 8).astype(dt)
    for a in d.values():
        a.flags.writeable = False
    return d


def calls(lsm, d, private):
    """Every public function on every input shape; ``private`` makes the out= arrays."""
    out = []
    for dt in (np.float32, np.float64):
        rows, short, long_, cols = d[dt, "rows"], d[dt, "short"], d[dt, "long"], d[dt, "cols"]
        b = np.abs(cols[:, :1]) - 0.5
        w = cols > -4
        for x, axis in ((rows, -1), (short, -1), (long_, -1), (cols, 0), (rows.T, 1)):
            y = lsm.log_softmax(x, axis=axis)
            p = lsm.softmax(x, axis=axis, out=private(x.shape, dt))
            r = lsm.logsumexp(x, axis=axis)
            out += [y, p, r,
                    lsm.log_softmax_backward(x, y, axis=axis, out=private(x.shape, dt)),
                    lsm.softmax_backward(x, p, axis=axis),
                    lsm.logsumexp_backward(r, x, axis=axis)]
        out += [lsm.logsumexp(cols, axis=0, b=b, return_sign=True)[1],
                lsm.logsumexp(cols, axis=0, b=b, return_sign=True)[0],
                lsm.softmax(cols, axis=0, where=w),
                lsm.logsumexp_backward(np.ones(300, dt), cols, axis=0, b=b, where=w),
                lsm.logsumexp(rows, axis=None), lsm.logsumexp(rows, axis=(0, 1), keepdims=True)]
    return out


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert u.tobytes() == v.tobytes(), f"result {i} differs from the serial one"


@pytest.mark.parametrize("limit", [None, 1], ids=["default-threads", "threadpool_limits-1"])
def test_sixteen_threads_bitwise_identical(lsm, limit):
    d = shared_inputs()
    before = {k: v.copy() for k, v in d.items()}
    serial = calls(lsm, d, np.empty)
    barrier = threading.Barrier(N_THREADS)
    results = [None] * N_THREADS
    errors = []

    def worker(k):
        try:
            barrier.wait()
            with threadpoolctl.threadpool_limits(limit):
                results[k] = calls(lsm, d, np.empty)
        except BaseException as exc:        # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        assert_bitwise(r, serial)
    for k, v in d.items():                  # the shared inputs are untouched
        assert v.tobytes() == before[k].tobytes()


# ------------------------------------------------------------------------------------------
# GIL release


def _long_calls(lsm):
    """Calls of some 50 ms or more, even at two threads on v4 (the kernels got faster: at a
    quarter of these sizes some took 13 ms, too short to tell a released GIL from a held one
    between the scheduler's slices), on every compiled entry point: the shortcut, the general
    (memoryview) kernels, the weighted ones, forward and backward.  Each is one call: between
    two calls the interpreter may hand the GIL over, which would hide a kernel that holds it."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal((3000, 4000))] * 4)
    g = np.concatenate([rng.standard_normal((3000, 4000))] * 4)
    b = np.abs(x[:, :1])
    return {
        "log_softmax (shortcut)": lambda: lsm.log_softmax(x),
        "softmax axis=0": lambda: lsm.softmax(x, axis=0),
        "logsumexp axis=0": lambda: lsm.logsumexp(x, axis=0),
        "logsumexp b=": lambda: lsm.logsumexp(x, axis=1, b=b),
        "log_softmax_backward axis=0": lambda: lsm.log_softmax_backward(g, x, axis=0),
        "softmax_backward axis=None": lambda: lsm.softmax_backward(g, x, axis=None),
        "logsumexp_backward axis=1": lambda: lsm.logsumexp_backward(np.ones(12000), x, axis=1),
    }


def _longest_stall(call):
    """The longest time a spinning Python thread went without a turn while ``call`` ran, as a
    fraction of the call's duration: near 1 when the call holds the GIL throughout, small
    (a switch interval or a scheduler slice) when the kernel releases it."""
    stamps = []
    stop = threading.Event()

    def spin():
        clock = time.perf_counter
        while not stop.is_set():
            stamps.append(clock())

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join()
    inside = np.array([t0] + [s for s in stamps if t0 < s < t1] + [t1])
    return float(np.diff(inside).max() / (t1 - t0)), t1 - t0


@pytest.mark.parametrize("backend", [] if os.environ.get("CYLSM_NO_EXTENSIONS")
                         else _select.COMPILED_NAMES)
def test_gil_released_during_kernels(backend, monkeypatch):
    """With one OpenMP thread (no parallel region, where the GIL was once held) and with the
    default threads.  Robust on a shared machine: a released GIL lets the spinner in every few
    milliseconds, a held one not at all for the whole call (tenths of a second); each call
    gets three tries."""
    from cylsm import _api
    import cylsm

    monkeypatch.setattr(_api, "_K", _select.load(backend))
    stalls = {}
    for limit in (1, None):
        with threadpoolctl.threadpool_limits(limit):
            for name, call in _long_calls(cylsm).items():
                best = (1.0, 0.0)
                for _ in range(3):
                    best = min(best, _longest_stall(call))
                    if best[0] < 0.5:
                        break
                stalls[name, limit] = f"{best[0]:.2f} of {best[1] * 1e3:.0f} ms"
                assert best[1] > 0.03, f"{name}: too short a call to tell ({best[1]:.3f} s)"
    print("longest stall of another Python thread during each call:", stalls)
    held = {k: v for k, v in stalls.items() if float(v.split()[0]) >= 0.5}
    assert not held, f"the GIL looks held during {held}"


# ------------------------------------------------------------------------------------------
# pools and threadpool_limits


def test_thread_pool_nested(lsm):
    """Workers of a ThreadPoolExecutor each start their own OpenMP team (nested use), some
    under threadpool_limits of their own: the results equal the serial ones."""
    d = shared_inputs()
    serial = calls(lsm, d, np.empty)

    def job(k):
        with threadpoolctl.threadpool_limits([None, 1, 2][k % 3]):
            return calls(lsm, d, np.empty)

    with ThreadPoolExecutor(max_workers=4) as ex:
        for r in ex.map(job, range(8)):
            assert_bitwise(r, serial)
    # a pool inside a pool
    with ThreadPoolExecutor(max_workers=2) as outer:
        futs = [outer.submit(lambda: list(ThreadPoolExecutor(2).map(job, range(2)))) for _ in range(2)]
        for f in futs:
            for r in f.result():
                assert_bitwise(r, serial)


POOL_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp, sys
    from concurrent.futures import ProcessPoolExecutor
    import numpy as np, cylsm

    def work(seed):
        x = np.random.default_rng(seed).standard_normal((600, 3000))
        return cylsm.log_softmax(x, axis=0).tobytes(), cylsm.logsumexp(x, axis=1).tobytes()

    if __name__ == "__main__":
        expect = [work(s) for s in range(4)]      # the parent runs parallel regions first
        with ProcessPoolExecutor(2, mp_context=mp.get_context(sys.argv[1])) as ex:
            got = list(ex.map(work, range(4)))
        assert got == expect
        print("ok")
    """
)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_process_pool(method, tmp_path):
    """A ProcessPoolExecutor after the parent has used the OpenMP threads.  With fork, GNU
    libgomp cannot start a parallel region in the child (it waits forever for the parent's
    pool threads): the kernels run the child on one thread.  In a subprocess, with a timeout,
    so that a hang fails this test instead of the run."""
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    env = dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, str(script), method], capture_output=True,
                              text=True, timeout=120, cwd=tempfile.gettempdir(), env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ProcessPoolExecutor ({method}) hung")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


FT = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


@pytest.mark.skipif(not FT, reason="not a free-threaded interpreter (none on this machine)")
def test_free_threaded_import_keeps_gil_off():  # pragma: no cover - needs python3.13t
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import sys, cylsm; cylsm.log_softmax([1.0, 2.0]); print(sys._is_gil_enabled())"],
        capture_output=True, text=True, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
