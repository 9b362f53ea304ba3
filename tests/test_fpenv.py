"""The floating-point and OpenMP environment of the process is the caller's: importing and
calling cylsm changes neither (SPEC section 3; issue 5).

- MXCSR (flush-to-zero, denormals-are-zero, rounding, exception masks) and the x87 control word
  are read exactly with the C library's ``fegetenv`` (x86-64 glibc: ``fenv_t`` ends with MXCSR)
  before ``import cylsm``, after it, and after calls of every function, in a fresh process.
- Everywhere, subnormal arithmetic is probed: an operation whose result is subnormal (flushed
  under FTZ) and one whose operand is subnormal (read as 0 under DAZ), scalar and vectorized,
  float32 and float64, and the rounding of ``1 +- 2**-60`` (round to nearest).
- In the OpenMP worker threads, which no Python code runs on: large calls split over several
  threads must keep subnormal results and read subnormal inputs, in every block of rows.
- The OpenMP settings of the process (the ICVs read through the runtime's own ``omp_get_*``
  functions, and ``OMP_*`` / ``GOMP_*`` / ``KMP_*`` variables) are the same before the import,
  after it and after calls.

test_runtime.py::test_fp_environment_untouched is the original short check; this file extends it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest

from cylsm import _select

NO_EXT = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
FENV_READABLE = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
MXCSR_DEFAULT = 0x1F80      # all exceptions masked, round to nearest, no FTZ, no DAZ
FTZ, DAZ = 1 << 15, 1 << 6
STICKY = 0x3F               # exception flags: set by ordinary arithmetic, not settings

# Shared by this process and the subprocesses (executed there from source).
PROBES = r'''
import ctypes, ctypes.util, os, platform, sys
import numpy as np

# Names, not literals: CPython folds constant expressions such as 5e-324 * 2.0 when it compiles
# the code, before any setting could change.
TINY64 = 2.2250738585072014e-308     # smallest normal float64
TINY32 = np.float32(1.1754944e-38)   # smallest normal float32
SUB64 = 5e-324                       # smallest subnormal float64
SUB32 = np.uint32(1).view(np.float32)   # smallest subnormal float32 (no conversion: FTZ would
                                        # flush a float64 -> float32 one)
ONE, EPS60 = 1.0, 2.0**-60
BIG = 2.0**60


def fenv():
    """(MXCSR without the sticky exception flags, x87 control word), or None."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return None
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    buf = ctypes.create_string_buffer(64)        # glibc x86-64 fenv_t: 28 bytes x87 + MXCSR
    if libm.fegetenv(buf) != 0:
        return None
    return (int.from_bytes(buf.raw[28:32], "little") & ~0x3F,
            int.from_bytes(buf.raw[0:2], "little"))


def subnormal_probes():
    """Name -> passed, for arithmetic that FTZ, DAZ or another rounding mode would change."""
    v64 = np.full(67, TINY64)            # vector loops and their remainders
    v32 = np.full(67, TINY32)
    sub64 = np.full(67, 5e-324)
    sub32 = np.full(67, 1, np.uint32).view(np.float32)
    return {
        "ftz python float": TINY64 / 4 > 0,
        "ftz float64 scalar": bool(np.float64(TINY64) / np.float64(4) > 0),
        "ftz float32 scalar": bool(TINY32 / np.float32(4) > 0),
        "ftz float64 vector": bool(np.all(v64 / 4 > 0)),
        "ftz float32 vector": bool(np.all(v32 / np.float32(4) > 0)),
        # DAZ: a subnormal operand, a normal result (compare nothing subnormal: under DAZ the
        # comparison reads it as 0 too)
        "daz python float": SUB64 * BIG > 0,
        "daz float64 scalar": bool(np.float64(SUB64) * np.float64(BIG) > 0),
        "daz float32 scalar": bool(SUB32 * np.float32(BIG) > 0),
        "daz float64 vector": bool(np.all(sub64 * BIG > 0)),
        "daz float32 vector": bool(np.all(sub32 * np.float32(BIG) > 0)),
        "round to nearest": (ONE + EPS60 == ONE and ONE - EPS60 == ONE
                             and -ONE + EPS60 == -ONE and -ONE - EPS60 == -ONE),
        "round to nearest float32 vector": bool(np.all(
            np.full(67, np.float32(1)) + np.float32(2**-30) == np.float32(1))),
        "exceptions masked": masked_division(),     # unmasked: SIGFPE kills the process
    }


def masked_division():
    with np.errstate(all="ignore"):
        return bool(np.all(np.divide(1.0, np.zeros(67)) == np.inf))


def worker_thread_probes(lsm):
    """Calls big enough to be split over the OpenMP threads; every row needs subnormals.
    Name -> passed."""
    rows, n = 512, 1024                  # 512 rows: many tasks per thread
    res = {}
    for dt, far in ((np.float64, -740.0), (np.float32, -100.0)):
        x = np.full((rows, n), -np.inf, dt)
        x[:, 0] = 0
        x[:, 1] = far                    # softmax = exp(far) / (1 + exp(far)): subnormal in dt
        want = np.exp(np.float64(far)) / (1 + np.exp(np.float64(far)))
        bits = np.uint64 if dt is np.float64 else np.uint32    # compared as bits: no FP op
        p = lsm.softmax(x)
        res[f"ftz softmax rows {dt.__name__}"] = bool(
            np.allclose(p[:, 1], want, rtol=0.05, atol=0)) and bool(np.all(p[:, 1].view(bits)))
        pc = lsm.softmax(np.ascontiguousarray(x.T), axis=0)       # column kernels
        res[f"ftz softmax columns {dt.__name__}"] = bool(
            np.allclose(pc[1], want, rtol=0.05, atol=0)) and bool(np.all(pc[1].view(bits)))
        # DAZ reads a subnormal p as 0; here out = p * (g - sum(g p)) = p * (1 - p) = p
        q = np.zeros((rows, n), dt)
        q[:, 0] = 1
        q[:, 1] = np.full(rows, 16, bits).view(dt)
        g = np.zeros_like(q)
        g[:, 1] = 1
        dx = lsm.softmax_backward(g, q)
        res[f"daz softmax_backward {dt.__name__}"] = bool(
            np.all(dx[:, 1].view(bits) == q[:, 1].view(bits)))
    return res


def omp_runtime():
    """The path of the OpenMP runtime loaded in this process (threadpoolctl), or None."""
    import threadpoolctl
    libs = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "openmp"]
    return libs[0]["filepath"] if libs else None


def omp_state(path):
    """The ICVs of the OpenMP runtime at path, read through its own omp_get_* functions, and
    the OMP_/GOMP_/KMP_ environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    lib = ctypes.CDLL(path)
    state = {"env": env}
    for name in ("omp_get_max_threads", "omp_get_dynamic", "omp_get_max_active_levels",
                 "omp_get_thread_limit", "omp_get_proc_bind", "omp_get_nested",
                 "omp_get_num_procs", "omp_get_default_device", "omp_get_cancellation"):
        f = getattr(lib, name, None)
        if f is not None:
            state[name] = f()
    if hasattr(lib, "omp_get_schedule"):
        kind, chunk = ctypes.c_int(), ctypes.c_int()
        lib.omp_get_schedule(ctypes.byref(kind), ctypes.byref(chunk))
        state["omp_get_schedule"] = [kind.value, chunk.value]
    return state


def call_everything(lsm):
    """Every function, forward and backward, small and split over threads."""
    rng = np.random.default_rng(0)
    for shape in ((3, 5), (300, 1000), (2, 300_000), (1000, 300)):
        for dt in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dt)
            for axis in (-1, 0):
                y = lsm.log_softmax(x, axis=axis)
                p = lsm.softmax(x, axis=axis)
                r = lsm.logsumexp(x, axis=axis)
                lsm.log_softmax_backward(np.ones_like(y), y, axis=axis)
                lsm.softmax_backward(np.ones_like(p), p, axis=axis)
                lsm.logsumexp_backward(np.ones_like(r), x, axis=axis)
                lsm.logsumexp(x, axis=axis, b=x > 0, return_sign=True)
                lsm.logsumexp_backward(np.ones_like(r), x, axis=axis, b=x > 0)
'''

# One fresh process: the state before importing cylsm, after it, after calls.
SCRIPT = PROBES + r'''
import json
state = {"before": {"fenv": fenv(), "probes": subnormal_probes()}}
import cylsm
state["import"] = {"fenv": fenv(), "probes": subnormal_probes()}
call_everything(cylsm)
state["calls"] = {"fenv": fenv(), "probes": subnormal_probes(),
                  "workers": worker_thread_probes(cylsm)}
state["backend"] = cylsm.backend
print(json.dumps(state))
'''

# The OpenMP runtime at sys.argv[1] (the kernels' own), loaded before cylsm is imported.
OMP_SCRIPT = PROBES + r'''
import json
import threadpoolctl     # first: it sets KMP_DUPLICATE_LIB_OK at import
path = sys.argv[1]
state = {"before": omp_state(path)}
import cylsm
assert omp_runtime() == path, (omp_runtime(), path)
state["import"] = omp_state(path)
call_everything(cylsm)
state["calls"] = omp_state(path)
state["threads"] = cylsm._api._K.max_threads()
state["maps"] = sorted({l.split()[-1] for l in open("/proc/self/maps")
                        if "gomp" in l or "libomp" in l}) if os.path.exists("/proc/self/maps") else []
print(json.dumps(state))
'''

namespace: dict[str, Any] = {}
exec(PROBES, namespace)    # the same probes, in this process


def run_script(script: str, *args: str, **env: str) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if k != "CYLSM_NO_EXTENSIONS"}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=environ, cwd=tempfile.gettempdir(), check=False)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def failed(probes: dict[str, bool]) -> list[str]:
    return [name for name, ok in probes.items() if not ok]


def test_probes_pass_here() -> None:
    assert failed(namespace["subnormal_probes"]()) == []
    if FENV_READABLE:
        mxcsr, _ = namespace["fenv"]()
        assert mxcsr & (FTZ | DAZ) == 0, hex(mxcsr)


@pytest.mark.skipif(not FENV_READABLE, reason="MXCSR is set through glibc's x86-64 fenv_t")
@pytest.mark.parametrize("bit", ["ftz", "daz"])
def test_the_checks_see_ftz_and_daz(bit: str) -> None:
    """The checks can fail: set FTZ or DAZ with fesetenv before importing cylsm (its OpenMP
    threads, started later, inherit it), and the reader, the probes and the worker-thread
    checks all see it."""
    flag = FTZ if bit == "ftz" else DAZ
    script = PROBES + f'''
import json
libm = ctypes.CDLL(ctypes.util.find_library("m"))
buf = ctypes.create_string_buffer(64)
libm.fegetenv(buf)
raw = bytearray(buf.raw)
raw[28:32] = (int.from_bytes(raw[28:32], "little") | {flag}).to_bytes(4, "little")
libm.fesetenv(ctypes.create_string_buffer(bytes(raw), 64))
import cylsm
print(json.dumps({{"fenv": fenv(), "probes": subnormal_probes(),
                   "workers": worker_thread_probes(cylsm)}}))
'''
    state = run_script(script, OMP_NUM_THREADS="2")
    assert state["fenv"][0] & (FTZ | DAZ) == flag
    bad = set(failed(state["probes"]))
    mine = {n for n in state["probes"] if n.startswith(bit)}
    assert mine == bad if bit == "ftz" else mine <= bad, bad    # DAZ also hides the subnormal
    if bit == "ftz":
        assert {"ftz softmax rows float64", "ftz softmax columns float32"} <= set(
            failed(state["workers"]))
    else:
        assert {"daz softmax_backward float64", "daz softmax_backward float32"} <= set(
            failed(state["workers"]))


@pytest.mark.parametrize("env", [{}, {"CYLSM_NO_EXTENSIONS": "1"}, {"CYLSM_CPU": "baseline"},
                                 {"OMP_NUM_THREADS": "3"}],
                         ids=["best", "python", "baseline", "omp3"])
def test_fp_environment_unchanged_by_import_and_calls(env: dict[str, str]) -> None:
    if NO_EXT and "CYLSM_NO_EXTENSIONS" not in env:
        env = {**env, "CYLSM_NO_EXTENSIONS": "1"}
    state = run_script(SCRIPT, **env)
    assert state["backend"] == ("python" if "CYLSM_NO_EXTENSIONS" in env else "compiled")
    for stage in ("before", "import", "calls"):
        assert failed(state[stage]["probes"]) == [], stage
    assert failed(state["calls"]["workers"]) == []
    if FENV_READABLE:
        before = state["before"]["fenv"]
        assert before[0] == MXCSR_DEFAULT & ~STICKY, hex(before[0])
        assert state["import"]["fenv"] == before
        assert state["calls"]["fenv"] == before


@pytest.mark.skipif(NO_EXT, reason="CYLSM_NO_EXTENSIONS is set: no OpenMP runtime is loaded")
@pytest.mark.parametrize("env", [{}, {"OMP_NUM_THREADS": "3", "OMP_DYNAMIC": "true",
                                      "OMP_SCHEDULE": "dynamic,7",
                                      "OMP_MAX_ACTIVE_LEVELS": "2"}],
                         ids=["default", "set"])
def test_openmp_settings_unchanged(env: dict[str, str]) -> None:
    find = PROBES + "\nimport cylsm, json\nprint(json.dumps(omp_runtime()))"
    path = run_script(find, **env)
    assert path, "no OpenMP runtime in a process that imported the compiled kernels"
    state = run_script(OMP_SCRIPT, path, **env)
    assert state["import"] == state["before"]
    assert state["calls"] == state["before"]
    assert env.items() <= state["before"]["env"].items()
    if env:
        assert state["before"]["omp_get_max_threads"] == state["threads"] == 3
        assert state["before"]["omp_get_dynamic"] == 1
    assert len(state["maps"]) <= 1, state["maps"]        # one OpenMP runtime in the process


def test_in_process_after_calls(lsm: Any) -> None:
    """This process (cylsm imported long ago), after calls on every backend."""
    before = namespace["fenv"]()
    namespace["call_everything"](lsm)
    assert failed(namespace["subnormal_probes"]()) == []
    assert failed(namespace["worker_thread_probes"](lsm)) == []
    assert namespace["fenv"]() == before


@pytest.mark.parametrize("name", _select.COMPILED_NAMES)
def test_openmp_worker_threads_keep_subnormals(name: str) -> None:
    """Every compiled level, with 4 threads (more than this machine may have)."""
    script = PROBES + f'''
import json
from cylsm import _api, _select
_api._K = _select.load({name!r})
print(json.dumps({{"threads": _api._K.max_threads(),
                   "workers": worker_thread_probes(__import__("cylsm"))}}))
'''
    state = run_script(script, OMP_NUM_THREADS="4")
    assert state["threads"] == 4
    assert failed(state["workers"]) == []
