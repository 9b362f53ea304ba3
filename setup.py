"""Build cylsm's compiled kernels (Cython + OpenMP), or pure Python with CYLSM_NO_EXTENSIONS=1.

- OpenMP is probed by compiling and linking a test program with the flags of the compiler in use
  (gcc/clang: -fopenmp; MSVC: /openmp; Apple clang: -Xpreprocessor -fopenmp -lomp).  Without it
  the kernels are built serial and the build says so; under CIBUILDWHEEL=1 that is an error.
- Never -ffast-math: it breaks inf/NaN handling and, at link time, puts the whole process into
  flush-to-zero.  -fno-trapping-math only lets the compiler if-convert selects (we never enable
  FP traps); it changes no result.
- One kernel source (src/_kernels.pxi) is compiled once per CPU level as its own module:
  _kernels_baseline (no -march: runs on every CPU of the architecture), and on x86-64 also
  _kernels_v3 (x86-64-v3: AVX2/FMA) and _kernels_v4 (x86-64-v4: AVX-512).  cylsm picks the best
  one the CPU supports at import.  A level the compiler cannot target is skipped, with a message.
- CYLSM_DEBUG_BUILD=1 turns Cython's bounds/initialization checks back on and drops -O3.
- CYLSM_OPENMP_PREFIX=DIR: an OpenMP runtime installed under DIR (DIR/include/omp.h,
  DIR/lib/libomp.*), e.g. the libomp the macOS wheel build compiles for its deployment target
  (tools/build_libomp_macos.sh); its include and library directories are added to the probe and
  to the kernels.
- The modules are compiled in parallel (one job per CPU) unless -j/--parallel says otherwise.
- The kernels' shortcut reads arrays through NumPy's C API: NumPy 2's headers at build time,
  targeting the C API of NumPy 1.25 (the oldest NumPy cylsm supports at run time).
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("CYLSM_NO_EXTENSIONS"))
DEBUG = bool(os.environ.get("CYLSM_DEBUG_BUILD"))

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


# CPU level -> (gcc/clang flags, MSVC flags)
LEVELS: dict[str, tuple[list[str], list[str]]] = {
    "baseline": ([], []),
    "v3": (["-march=x86-64-v3", "-mtune=generic"], ["/arch:AVX2"]),
    "v4": (["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"], ["/arch:AVX512"]),
}


def targets_x86_64() -> bool:
    """Is the build for x86-64 (and only x86-64: no universal2 or arm64 cross build)?"""
    if sys.platform == "darwin" and os.environ.get("ARCHFLAGS"):
        return os.environ["ARCHFLAGS"].split() == ["-arch", "x86_64"]
    if os.environ.get("VSCMD_ARG_TGT_ARCH", "").lower() in ("arm64", "arm"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64")


def openmp_prefix_flags() -> tuple[list[str], list[str]]:
    """Compile and link args for the OpenMP runtime under CYLSM_OPENMP_PREFIX (none if unset)."""
    prefix = os.environ.get("CYLSM_OPENMP_PREFIX")
    if not prefix:
        return [], []
    include, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib")
    if not os.path.isfile(os.path.join(include, "omp.h")):
        raise RuntimeError(f"cylsm: CYLSM_OPENMP_PREFIX={prefix!r} has no include/omp.h")
    # The rpath lets the linker and delocate resolve libomp's @rpath install name.
    rpath = [f"-Wl,-rpath,{lib}"] if sys.platform == "darwin" else []
    return [f"-I{include}"], [f"-L{lib}", *rpath]


def openmp_flag_candidates(compiler_type: str) -> list[tuple[list[str], list[str]]]:
    """(compile args, link args) to try, in order, for this compiler."""
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    inc, lib = openmp_prefix_flags()
    if sys.platform == "darwin":
        return [
            (["-Xpreprocessor", "-fopenmp", *inc], [*lib, "-lomp"]),
            (["-fopenmp", *inc], [*lib, "-fopenmp"]),
        ]
    return [(["-fopenmp", *inc], [*lib, "-fopenmp"])]


class BuildExt(build_ext):
    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:           # three independent modules: build them side by side
            self.parallel = os.cpu_count() or 1

    def _compiles(self, flags: list[str]) -> bool:
        tmp = tempfile.mkdtemp(prefix="cylsm-flags-")
        try:
            src = os.path.join(tmp, "test_flags.c")
            with open(src, "w") as f:
                f.write("double f(double x) { return x * 2.0; }\n")
            self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _try_openmp(self, compile_args: list[str], link_args: list[str]) -> bool:
        tmp = tempfile.mkdtemp(prefix="cylsm-openmp-")
        try:
            src = os.path.join(tmp, "test_openmp.c")
            with open(src, "w") as f:
                f.write(OPENMP_TEST)
            objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
            self.compiler.link_executable(
                objs, "test_openmp", output_dir=tmp, extra_postargs=link_args
            )
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def build_extensions(self) -> None:
        ctype = self.compiler.compiler_type
        omp: tuple[list[str], list[str]] | None = None
        for compile_args, link_args in openmp_flag_candidates(ctype):
            if self._try_openmp(compile_args, link_args):
                omp = (compile_args, link_args)
                break
        if omp is None:
            msg = (
                "cylsm: OpenMP was not found for this compiler; building SERIAL kernels "
                "(one thread). Install an OpenMP runtime (libgomp, libomp) to get threads."
            )
            if os.environ.get("CIBUILDWHEEL") == "1":
                raise RuntimeError(msg + " Refusing to build a wheel without OpenMP.")
            print("\n" + "*" * 72 + "\n" + msg + "\n" + "*" * 72 + "\n", file=sys.stderr)
        if ctype == "msvc":
            base = ["/O2" if not DEBUG else "/Od"]
        else:
            base = ["-O3" if not DEBUG else "-O0", "-g0" if not DEBUG else "-g",
                    "-fno-trapping-math", "-fno-math-errno"]
        kept = []
        for ext in self.extensions:
            level = ext.name.rsplit("_", 1)[-1]
            level_flags = LEVELS[level][1 if ctype == "msvc" else 0]
            if level_flags and not self._compiles(level_flags):
                print(f"cylsm: the compiler cannot target {level} ({' '.join(level_flags)}); "
                      f"skipping {ext.name}", file=sys.stderr)
                continue
            flags = base + level_flags + (omp[0] if omp else [])
            ext.extra_compile_args = flags + ext.extra_compile_args
            ext.extra_link_args = (omp[1] if omp else []) + ext.extra_link_args
            ext.define_macros = [
                *ext.define_macros,
                ("CYLSM_OPENMP_FLAGS", c_string(" ".join(omp[0]) if omp else "")),
                ("CYLSM_BUILD_FLAGS", c_string(" ".join(flags))),
            ]
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        return []
    try:
        import numpy
    except ImportError as e:
        raise RuntimeError(
            "cylsm: building the kernels needs NumPy's C headers (numpy>=2.0 at build time, a "
            "build requirement in pyproject.toml that pip installs by itself); with "
            "--no-build-isolation, install numpy first, or set CYLSM_NO_EXTENSIONS=1 for the "
            "pure-Python package") from e
    from Cython.Build import cythonize

    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": not DEBUG,
        "embedsignature": True,
        "autotestdict": False,
        # The kernels keep no mutable module state (OPS and the numpy functions are set once at
        # import) but the buffer cache, which a lock guards (src/cylsm_buffers.h): safe to run
        # without the GIL (free-threaded 3.14t).
        "freethreading_compatible": True,
    }
    libraries = [] if sys.platform == "win32" else ["m"]
    levels = list(LEVELS) if targets_x86_64() else ["baseline"]
    if os.environ.get("CYLSM_LEVELS"):   # e.g. "v4": fewer levels, for quick sanitizer builds
        wanted = os.environ["CYLSM_LEVELS"].split(",")
        levels = [lv for lv in levels if lv == "baseline" or lv in wanted]   # baseline: always
    exts = [
        Extension(
            f"cylsm._kernels_{level}",
            [f"src/_kernels_{level}.pyx"],
            include_dirs=["src", numpy.get_include()],
            define_macros=[("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION"),
                           ("NPY_NO_DEPRECATED_API", "NPY_1_25_API_VERSION")],
            libraries=libraries,
            depends=["src/_kernels.pxi", "src/cylsm_exp.h", "src/cylsm_cpu.h",
                     "src/cylsm_tile.h", "src/cylsm_buffers.h", "src/cylsm_stream.h"],
        )
        for level in levels
    ]
    return cythonize(exts, compiler_directives=directives, include_path=["src"])


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
