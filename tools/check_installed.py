"""Check the cylsm that this Python imports is an installed wheel, and that it is what we shipped.

Run from a directory outside the checkout (tools/check_wheels.sh and cibuildwheel's test-command
do).  Prints show_config() for the log, then fails with a message that says what is wrong:

    python check_installed.py --backend compiled   # a binary wheel: compiled kernels + OpenMP
    python check_installed.py --backend python     # the py3-none-any wheel: no kernels at all

Checks: cylsm is imported from site-packages (not a source tree); its version equals the wheel's
metadata; the active backend is the expected one; for a binary wheel, every CPU level built for
this architecture is in the package, each was compiled with OpenMP, and on a free-threaded
Python importing the kernels leaves the GIL disabled (they are declared freethreading-safe).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import platform
import sys
import sysconfig
from pathlib import Path


def fail(message: str) -> None:
    print(f"check_installed: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def expected_levels() -> list[str]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["baseline", "v3", "v4"]
    return ["baseline"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["compiled", "python"], required=True)
    args = parser.parse_args()

    import cylsm
    from cylsm import _select

    cylsm.show_config()
    package = Path(cylsm.__file__).resolve().parent
    site_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if package.parent not in site_dirs:
        fail(f"cylsm was imported from {package}, not from this Python's site-packages "
             f"{sorted(map(str, site_dirs))}: the test would not exercise the installed wheel")

    dist_version = importlib.metadata.version("cylsm")
    if dist_version != cylsm.__version__:
        fail(f"cylsm.__version__ is {cylsm.__version__!r} but the installed distribution "
             f"says {dist_version!r}")

    if cylsm.backend != args.backend:
        fail(f"the active backend is {cylsm.backend!r}, expected {args.backend!r} "
             f"(show_config above says why)")

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    shipped = sorted(p.name for p in package.iterdir() if p.name.endswith(suffixes))
    if args.backend == "python":
        if shipped:
            fail(f"the pure-Python wheel contains compiled modules: {shipped}")
        print("check_installed: OK (pure-Python wheel, python backend)")
        return

    for level in expected_levels():
        name = f"_kernels_{level}"
        if not any(f.startswith(name + ".") for f in shipped):
            fail(f"the wheel has no {name} module for this architecture (it has {shipped})")
    for backend in _select.COMPILED_NAMES:
        kernels = _select.load(backend)
        if not kernels.openmp_enabled():
            fail(f"{kernels.__name__} was compiled without OpenMP")
        if kernels.max_threads() < 1:
            fail(f"{kernels.__name__}.max_threads() is {kernels.max_threads()}")
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        for level in expected_levels():
            importlib.import_module(f"cylsm._kernels_{level}")
        if sys._is_gil_enabled():  # type: ignore[attr-defined]
            fail("importing cylsm's kernels re-enabled the GIL on a free-threaded Python: "
                 "they were not built with freethreading_compatible=True")
    print(f"check_installed: OK (compiled backend {_select.COMPILED_NAMES[0]}, OpenMP, "
          f"levels in the wheel: {', '.join(expected_levels())})")


if __name__ == "__main__":
    main()
