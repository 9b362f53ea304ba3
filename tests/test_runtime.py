"""The package around the kernels: backend choice, environment, threads, stubs, entry point."""
from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import cylsm
from cylsm import _api, _select

from _reference import misaligned

HERE = Path(__file__).parent
NO_EXT = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
requires_compiled = pytest.mark.skipif(NO_EXT, reason="CYLSM_NO_EXTENSIONS is set")


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run this Python in a directory outside the checkout, so that the cylsm imported is the
    one under test (the installed package), never the source tree."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir(), check=False)


def run_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "CYLSM_NO_EXTENSIONS"}
    environ.update(env)
    proc = run(["-c", code], environ)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_env_var_forces_python_backend() -> None:
    assert run_python("import cylsm; print(cylsm.backend)", CYLSM_NO_EXTENSIONS="1") == "python"


@requires_compiled
def test_compiled_backend_is_default() -> None:
    assert cylsm.backend == "compiled"
    assert run_python("import cylsm; print(cylsm.backend)") == "compiled"


def test_backend_matches_active_kernels() -> None:
    assert cylsm.backend == ("python" if _api._K.NAME == "python" else "compiled")
    with pytest.raises(ValueError, match="unknown cylsm backend"):
        _select.load("gpu")
    with pytest.raises(ValueError, match="unknown cylsm backend"):
        _select.load("compiled-v9")


def test_show_config(capsys: pytest.CaptureFixture[str]) -> None:
    cylsm.show_config()
    text = capsys.readouterr().out
    assert "backend" in text and cylsm.backend in text
    assert "openmp" in text and "threads" in text and np.__version__ in text


@requires_compiled
@pytest.mark.parametrize("name", _select.COMPILED_NAMES)
def test_openmp_compiled_in(name: str) -> None:
    kernels = _select.load(name)
    assert kernels.NAME == name
    assert kernels.openmp_enabled() is True
    assert "-fopenmp" in kernels.build_info()["openmp_flags"] or os.name == "nt"


@requires_compiled
@pytest.mark.parametrize("name", _select.COMPILED_NAMES)
def test_op_codes_agree(name: str) -> None:
    """The public functions call every backend's shortcut with the Python backend's op
    codes (cylsm/_api.py)."""
    assert _select.load(name).OPS == _select.load("python").OPS


@requires_compiled
@pytest.mark.parametrize("name", _select.COMPILED_NAMES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shortcut_takes_and_declines(name: str, dtype: type) -> None:
    """The shortcut (``fast``, which reads the arrays through NumPy's C API) computes exactly
    the arrays it can hand to the kernels as they are, and returns None for every other one:
    the general path then casts, copies or rejects them."""
    K = _select.load(name)
    ops = K.OPS
    x = np.random.default_rng(3).standard_normal((5, 7)).astype(dtype)
    g = np.ones_like(x)
    g1 = np.ones(5, dtype)
    other = np.float64 if dtype == np.float32 else np.float32

    lsm = K.fast(ops["log_softmax"], x)
    ref = np.empty((5, 7, 1), dtype)
    K.log_softmax(x.reshape(5, 7, 1), ref)                  # the kernel behind the general path
    assert lsm.dtype == dtype and lsm.shape == x.shape
    np.testing.assert_array_equal(lsm, ref.reshape(x.shape))
    lse = K.fast(ops["logsumexp"], x, True)
    assert type(lse) is np.dtype(dtype).type               # a NumPy scalar
    r = K.fast(ops["logsumexp"], x, False, None, None, 0)
    assert r.shape == (7,) and r.dtype == dtype
    x3 = np.random.default_rng(4).standard_normal((3, 5, 4)).astype(dtype)
    for axis in (0, 1, -1, -2):                             # any one axis: (outer, n, inner)
        k = axis % 3
        shape3 = (math.prod(x3.shape[:k]), x3.shape[k], math.prod(x3.shape[k + 1:]))
        ref3 = np.empty(shape3, dtype)
        K.softmax(x3.reshape(shape3), ref3)
        np.testing.assert_array_equal(K.fast(ops["softmax"], x3, False, None, None, axis),
                                      ref3.reshape(x3.shape))
        lse3 = np.empty((shape3[0], shape3[2]), dtype)
        K.logsumexp(x3.reshape(shape3), lse3)
        r3 = K.fast(ops["logsumexp"], x3, False, None, None, axis)
        np.testing.assert_array_equal(r3, lse3.reshape(np.delete(x3.shape, k)))
    out = np.empty_like(x)
    assert K.fast(ops["softmax"], x, False, out) is out
    read_only = out.copy()
    read_only.flags.writeable = False
    assert K.fast(ops["logsumexp_backward"], x, False, None, g1).shape == x.shape

    declined = {
        "byte-swapped x": lambda: K.fast(ops["log_softmax"], x.astype(x.dtype.newbyteorder())),
        "unaligned x": lambda: K.fast(ops["log_softmax"], misaligned(x)),
        "non-contiguous x": lambda: K.fast(ops["log_softmax"], x[:, ::2]),
        "float16 x": lambda: K.fast(ops["log_softmax"], x.astype(np.float16)),
        "int x": lambda: K.fast(ops["log_softmax"], x.astype(np.int64)),
        "0-d x": lambda: K.fast(ops["log_softmax"], x[0, 0].reshape(())),
        "empty x": lambda: K.fast(ops["log_softmax"], x[:0]),
        "axis out of range": lambda: K.fast(ops["log_softmax"], x, False, None, None, 2),
        "axis out of range, negative": lambda: K.fast(ops["log_softmax"], x, False, None, None,
                                                      -3),
        "logsumexp out reduced over another axis": lambda: K.fast(
            ops["logsumexp"], x3, False, np.empty((3, 5), dtype), None, 1),
        "out of the other dtype": lambda: K.fast(ops["log_softmax"], x, False,
                                                 np.empty(x.shape, other)),
        "read-only out": lambda: K.fast(ops["log_softmax"], x, False, read_only),
        "unaligned out": lambda: K.fast(ops["log_softmax"], x, False, misaligned(x)),
        "byte-swapped out": lambda: K.fast(ops["log_softmax"], x, False,
                                           np.empty(x.shape, x.dtype.newbyteorder())),
        "out of another shape": lambda: K.fast(ops["log_softmax"], x, False, out[:4]),
        "out overlapping x": lambda: K.fast(ops["log_softmax"], x[1:], False, x[:-1]),
        "logsumexp out of x's shape": lambda: K.fast(ops["logsumexp"], x, False, out),
        "g of the other dtype": lambda: K.fast(ops["softmax_backward"], x, False, None,
                                               g.astype(other)),
        "unaligned g": lambda: K.fast(ops["softmax_backward"], x, False, None, misaligned(g)),
        "g of another shape": lambda: K.fast(ops["softmax_backward"], x, False, None, g[:4]),
        "logsumexp_backward g of x's shape": lambda: K.fast(ops["logsumexp_backward"], x,
                                                            False, None, g),
    }
    for what, call in declined.items():
        assert call() is None, what


@requires_compiled
def test_every_cpu_level_is_built_and_the_best_is_default() -> None:
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        level = _select.load("compiled-baseline").cpu_level()
        expected = [lv for lv, rank in _select.LEVELS.items() if rank <= level]
        assert sorted(_select.COMPILED_NAMES) == sorted(f"compiled-{lv}" for lv in expected)
    assert _api._K.NAME == _select.COMPILED_NAMES[0]


@requires_compiled
def test_cpu_env_var_caps_the_level() -> None:
    code = "from cylsm import _api; print(_api._K.NAME)"
    assert run_python(code, CYLSM_CPU="baseline") == "compiled-baseline"
    assert run_python(code, CYLSM_CPU="v4") == _select.COMPILED_NAMES[0]
    proc = run(["-c", "import cylsm"], {**os.environ, "CYLSM_CPU": "avx9000"})
    assert proc.returncode != 0 and "CYLSM_CPU='avx9000' is not a CPU level" in proc.stderr


def test_fp_environment_untouched() -> None:
    # Flush-to-zero / denormals-are-zero (e.g. from -ffast-math) would turn these into 0.
    code = (
        "import numpy as np, cylsm\n"
        "x = np.random.default_rng(0).standard_normal((300, 1000))\n"
        "cylsm.log_softmax(x); cylsm.softmax(x, axis=0); cylsm.logsumexp(x, axis=1)\n"
        "tiny = np.array([5e-324, 2.2e-308]); one = np.ones(2)\n"
        "print((tiny * one)[0] > 0, (tiny / 2)[1] > 0, np.float32(1e-45) * np.float32(1) > 0)\n"
    )
    for env in ({}, {"CYLSM_NO_EXTENSIONS": "1"}):
        assert run_python(code, **env) == "True True True"


def test_subnormal_results_are_kept(lsm) -> None:
    # exp(-740) is subnormal in float64: softmax must return it, not 0.
    p = lsm.softmax(np.array([0.0, -740.0]))
    assert 0 < p[1] < np.finfo(np.float64).tiny
    assert p[1] == pytest.approx(np.exp(-740.0), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((300, 2000), -1), ((2000, 300), 0), ((1, 600_000), -1),
                                        ((40, 3000, 7), 1)])
def test_results_do_not_depend_on_threads(lsm, dtype, shape, axis) -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 10).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)

    def everything():
        y = lsm.log_softmax(x, axis=axis)
        p = lsm.softmax(x, axis=axis)
        return [y, p, lsm.logsumexp(x, axis=axis), lsm.log_softmax_backward(g, y, axis=axis),
                lsm.softmax_backward(g, p, axis=axis),
                lsm.logsumexp_backward(lsm.logsumexp(g, axis=axis), x, axis=axis)]

    with threadpoolctl.threadpool_limits(1):
        one = everything()
    with threadpoolctl.threadpool_limits(2):
        two = everything()
    again = everything()
    for a, b, c in zip(one, two, again):
        assert np.array_equal(a, b) and np.array_equal(b, c)


@requires_compiled
def test_stub_matches_compiled_modules() -> None:
    pytest.importorskip("mypy")
    modules = [f"cylsm._kernels_{name.split('-', 1)[1]}" for name in _select.COMPILED_NAMES]
    proc = run(["-m", "mypy.stubtest", *modules])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_on_typed_example() -> None:
    pytest.importorskip("mypy")
    env = dict(os.environ)
    package_parent = Path(cylsm.__file__).resolve().parent.parent
    if package_parent.name not in ("site-packages", "dist-packages"):
        env["MYPYPATH"] = str(package_parent)    # an editable install: mypy cannot see its hook
    proc = run(["-m", "mypy", "--strict", "--no-incremental", str(HERE / "typing_example.py")], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docstring_examples(lsm) -> None:
    result = doctest.testmod(_api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8
    assert result.failed == 0


def test_main_entry_point() -> None:
    proc = run(["-m", "cylsm", "--no-bench"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "self-check" in proc.stdout and "backend" in proc.stdout
