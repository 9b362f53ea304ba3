#!/usr/bin/env bash
# Build cylsm's kernels with checks on, in a throw-away virtual environment, and run the test
# suite against that build:
#
#   tools/sanitize.sh asan  [pytest args...]   AddressSanitizer + UndefinedBehaviorSanitizer
#                                               (the shipped -O3 code, instrumented)
#   tools/sanitize.sh debug [pytest args...]   CYLSM_DEBUG_BUILD=1: Cython bounds/wraparound/
#                                               initialized checks on, -O0 -g
#
# The sources are copied (tracked and untracked-but-not-ignored files of the working tree) into a
# temporary directory and installed from there, non-editable: no stale build/, src/*.c or .so of
# the developer's .venv can leak into the build under test, and .venv is never touched.
#
# Environment: PYTHON (default python3), KEEP=1 keeps the temporary directory,
# LEVELS=v4 (say) builds only that CPU level besides baseline (setup.py's CYLSM_LEVELS: a
# quicker build, for CI).  LeakSanitizer stays off (detect_leaks=0): CPython never frees
# everything at exit; leaks are the business of tests/test_leaks.py and of tools/valgrind.sh
# (definite leaks allocated through the kernels).
set -euo pipefail

mode=${1:-asan}
shift || true
case "$mode" in
    asan|debug) ;;
    *) echo "usage: $0 asan|debug [pytest args...]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cylsm-$mode.XXXXXX")
if [ "${KEEP:-}" = 1 ]; then
    echo "== keeping $tmp"
else
    trap 'rm -rf "$tmp"' EXIT
fi
src=$tmp/src
venv=$tmp/venv
mkdir -p "$src"
t0=$SECONDS

echo "== copy the sources to $src"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf -) | tar -xf - -C "$src"
else
    (cd "$root" && tar --exclude='./.venv*' --exclude=./build --exclude='*.so' \
        --exclude='./src/*.c' -cf - .) | tar -xf - -C "$src"
fi

build_env=()
run_env=()
if [ "$mode" = asan ]; then
    # float-cast-overflow is not part of -fsanitize=undefined in GCC.  Recovery is off: the first
    # report aborts the process, so nothing can scroll by unnoticed.
    san="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all"
    # Through CC, not CFLAGS/LDFLAGS: setup.py probes OpenMP by linking a test *executable*,
    # and distutils adds LDFLAGS to shared-object links only; the probe would fail to link and
    # the kernels would silently be built serial (untested parallel paths).
    build_env=(CC="${CC:-gcc} $san" CFLAGS="-fno-omit-frame-pointer")
    libasan=$(gcc -print-file-name=libasan.so)
    if [ ! -e "$libasan" ]; then
        echo "sanitize.sh: gcc has no libasan.so (install libasan / gcc's sanitizer runtime)" >&2
        exit 1
    fi
    # The ASan runtime must come first in a python that is not itself instrumented.
    # PYTHONMALLOC=malloc: Python objects go through malloc too, so ASan sees their bounds and
    # lifetimes (a refcount bug becomes a use-after-free report).  allocator_may_return_null: a
    # huge allocation is a MemoryError, as without ASan, not an abort.
    run_env=(
        LD_PRELOAD="$libasan"
        PYTHONMALLOC=malloc
        ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_stack_use_after_return=1"
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:report_error_type=1"
    )
else
    build_env=(CYLSM_DEBUG_BUILD=1)
fi
deselect=()
if [ -n "${LEVELS:-}" ]; then
    build_env+=(CYLSM_LEVELS="$LEVELS")
    deselect+=(--deselect tests/test_runtime.py::test_every_cpu_level_is_built_and_the_best_is_default)
fi
if [ "$mode" = asan ]; then
    # Type checks, not memory: mypy under ASan with PYTHONMALLOC=malloc takes minutes.
    deselect+=(--deselect tests/test_runtime.py::test_stub_matches_compiled_modules
               --deselect tests/test_runtime.py::test_mypy_strict_on_typed_example)
fi

echo "== build ($mode) in $venv"
"$python" -m venv "$venv"

env "${build_env[@]}" "$venv/bin/python" -m pip install -q "$src[test]"
echo "== build took $((SECONDS - t0)) s"

# Nothing may shadow the installed build: not the copied package (a test's subprocess that
# runs in the checkout would import it), not its C sources.
rm -rf "$src/cylsm" "$src"/src/*.c "$src/build"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
sos=("$site"/cylsm/_kernels_*.so)
if [ ! -e "${sos[0]}" ]; then
    echo "sanitize.sh: no compiled kernels were installed" >&2
    exit 1
fi
if [ "$mode" = asan ]; then
    for so in "${sos[@]}"; do
        if ! readelf -d "$so" | grep -q 'NEEDED.*libasan'; then
            echo "sanitize.sh: $so is not linked against the ASan runtime" >&2
            exit 1
        fi
    done
fi

# The build under test, from outside any checkout: the cylsm imported must be the installed one.
cd "$tmp"
env "${run_env[@]}" "$venv/bin/python" - "$mode" "$site" <<'EOF'
import sys
import numpy as np
import cylsm
from cylsm import _select

mode, site = sys.argv[1], sys.argv[2]
assert cylsm.__file__.startswith(site), cylsm.__file__
assert cylsm.backend == "compiled", cylsm.backend
for name in _select.COMPILED_NAMES:
    K = _select.load(name)
    flags = K.build_info()["build_flags"]
    assert K.openmp_enabled(), f"{name} was built without OpenMP"
    if mode == "debug":
        assert "-O0" in flags, flags
        # boundscheck on: indexing an empty memoryview raises instead of reading garbage
        e = np.empty((0, 1, 1))
        try:
            K.log_softmax(e, e)
        except IndexError:
            pass
        else:
            raise AssertionError(f"{name}: Cython bounds checks are off in the debug build")
    print(f"{name}: {flags}")
print("kernels under test:", ", ".join(_select.COMPILED_NAMES))
EOF

echo "== pytest on the $mode build"
t1=$SECONDS
# From the copied checkout (test paths in "$@" are relative to it), by the pytest script: unlike
# python -m pytest it puts no cwd on sys.path, so cylsm is the installed build.
cd "$src"
env "${run_env[@]}" "$venv/bin/pytest" -p no:cacheprovider -q "${deselect[@]}" "$@"
echo "== pytest ($mode) took $((SECONDS - t1)) s"

echo "== sanitize.sh $mode: OK in $((SECONDS - t0)) s"
