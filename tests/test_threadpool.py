"""Threads: threadpoolctl finds cylsm's OpenMP runtime and really limits it; the kernels can be
called from many Python threads at once (the free-threaded 3.14t leg runs this file with
pytest-run-parallel as well).

The checks run in a fresh interpreter with OMP_NUM_THREADS=2, so that the expected thread counts
do not depend on the machine or on what the test process has already loaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

NO_EXT = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
requires_compiled = pytest.mark.skipif(NO_EXT, reason="CYLSM_NO_EXTENSIONS is set")
pytest.importorskip("threadpoolctl")


def run_fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter outside the checkout; it prints one JSON object."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CYLSM_NO_EXTENSIONS", "CYLSM_CPU", "OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linked_openmp_library(module_file: str) -> str | None:
    """The OpenMP runtime the dynamic loader resolves for ``module_file`` (Linux, via ldd)."""
    try:
        out = subprocess.run(["ldd", module_file], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        return None
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith(("libgomp", "libomp", "libiomp")) and rest.startswith("/"):
            return os.path.realpath(rest.split(" (")[0])
    return None


@requires_compiled
def test_threadpoolctl_finds_our_openmp_runtime() -> None:
    info = run_fresh(
        "import json, threadpoolctl, numpy\n"
        "before = {m['filepath'] for m in threadpoolctl.threadpool_info()}\n"
        "from cylsm import _select\n"
        "k = _select.load('compiled')\n"
        "after = threadpoolctl.threadpool_info()\n"
        "print(json.dumps({'before': sorted(before), 'after': after, 'kernels': k.__file__}))\n"
    )
    openmp = [m for m in info["after"] if m["internal_api"] == "openmp"]
    assert openmp, f"threadpoolctl lists no OpenMP runtime after importing cylsm: {info}"
    ours = linked_openmp_library(info["kernels"]) if sys.platform.startswith("linux") else None
    if ours is not None:
        # The entry is the very library our extension module links (in a repaired wheel: the
        # copy auditwheel vendored into cylsm.libs/), not some other package's runtime.
        paths = [os.path.realpath(m["filepath"]) for m in openmp]
        assert ours in paths, f"cylsm links {ours}; threadpoolctl sees {paths}"
    else:
        # Elsewhere: importing cylsm's kernels is what brought an OpenMP runtime in (or one that
        # was already loaded is shared).
        assert any(m["filepath"] not in info["before"] for m in openmp) or info["before"]


@requires_compiled
def test_threadpool_limits_change_the_threads_cylsm_uses() -> None:
    counts_threads = sys.platform.startswith("linux") and os.path.isdir("/proc/self/task")
    info = run_fresh(
        "import json, os, numpy as np, threadpoolctl, cylsm\n"
        "from cylsm import _select\n"
        "k = _select.load('compiled')\n"
        f"counts = {counts_threads!r}\n"
        "def os_threads():\n"
        "    return len(os.listdir('/proc/self/task')) if counts else -1\n"
        "x = np.random.default_rng(0).standard_normal((256, 4096))   # big enough for threads\n"
        "r = {'default': k.max_threads()}\n"
        "with threadpoolctl.threadpool_limits(1):\n"
        "    r['limited'] = k.max_threads()\n"
        "with threadpoolctl.threadpool_limits(limits=1, user_api='openmp'):\n"
        "    r['limited_openmp'] = k.max_threads()\n"
        "    t0 = os_threads()\n"
        "    y1 = cylsm.log_softmax(x)\n"
        "    r['threads_limited'] = os_threads() - t0\n"
        "r['restored'] = k.max_threads()\n"
        "t0 = os_threads()\n"
        "y2 = cylsm.log_softmax(x)\n"
        "r['threads_unlimited'] = os_threads() - t0\n"
        "r['equal'] = bool(np.array_equal(y1, y2))\n"
        "print(json.dumps(r))\n"
    )
    assert info["default"] == 2                     # OMP_NUM_THREADS=2
    assert info["limited"] == 1                     # threadpool_limits(1) reaches our runtime
    assert info["limited_openmp"] == 1
    assert info["restored"] == 2
    assert info["equal"]
    if counts_threads:
        # Observed, not inferred: the limited call starts no OpenMP worker thread, the next
        # call starts exactly one (the calling thread is the other of the two).
        assert info["threads_limited"] == 0, info
        assert info["threads_unlimited"] == 1, info


@requires_compiled
def test_omp_num_threads_is_honoured() -> None:
    info = run_fresh(
        "import json, os\n"
        "from cylsm import _select\n"
        "print(json.dumps({'n': _select.load('compiled').max_threads()}))\n"
    )
    assert info["n"] == 2


def test_concurrent_calls_from_python_threads() -> None:
    """Many Python threads call the active backend at once, on shared read-only input and on
    their own outputs (in place too); every result equals the one computed alone.  Without the
    GIL (3.14t) this is where shared state in the kernels would show."""
    import cylsm

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 3000)) * 5).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    expected = [cylsm.log_softmax(x), cylsm.softmax(x, axis=0), cylsm.logsumexp(x, axis=1),
                cylsm.log_softmax_backward(g, cylsm.log_softmax(x))]
    errors: list[str] = []
    start = threading.Barrier(6)

    def work(i: int) -> None:
        start.wait()
        for _ in range(20):
            own = x.copy()
            got = [cylsm.log_softmax(x), cylsm.softmax(x, axis=0), cylsm.logsumexp(x, axis=1),
                   cylsm.log_softmax_backward(g, cylsm.log_softmax(own, out=own))]
            for a, b in zip(got, expected):
                if not np.array_equal(a, b):
                    errors.append(f"thread {i}: result differs from the serial one")
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
