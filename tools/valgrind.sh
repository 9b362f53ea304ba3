#!/usr/bin/env bash
# valgrind memcheck over a focused subset (tools/valgrind_cases.py): every loop shape of the
# kernels, compared with the Python backend, on the CPU levels valgrind can run.
#
#   tools/valgrind.sh [level...]      default: baseline and v3 (when this CPU runs v3)
#
# Environment: PYTHON (default: .venv/bin/python of the checkout, with cylsm installed),
# KEEP=1 keeps the logs.  tools/valgrind.supp: known false positives outside cylsm.
#
# - valgrind cannot decode AVX-512; it hides AVX-512 from CPUID, so under valgrind cylsm's own
#   CPU check never picks v4 and NumPy dispatches no AVX-512 loop (valgrind_cases.py checks
#   both).  The baseline module is checked to hold no AVX/AVX-512 instruction, v3 no AVX-512.
# - PYTHONMALLOC=malloc: Python objects come from malloc, so memcheck sees their bounds.
# - CPython itself is not clean under memcheck (an interpreter that only starts reports ~25
#   "uninitialised value" errors here), so the gate is: no invalid read/write/free anywhere,
#   no uninitialised-value error whose stack or origin (--track-origins) passes through
#   cylsm's kernels, no definite leak allocated through them.  Everything else is counted.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")   # absolute: we cd below
levels=("$@")
if [ ${#levels[@]} -eq 0 ]; then      # baseline, and v3 where this CPU runs it
    read -r -a levels < <(cd /tmp && "$python" -c 'from cylsm import _select
print(" ".join(lv for lv in ("baseline", "v3") if "compiled-" + lv in _select.COMPILED_NAMES))')
fi
command -v valgrind >/dev/null || { echo "valgrind.sh: valgrind is not installed" >&2; exit 1; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cylsm-valgrind.XXXXXX")
if [ "${KEEP:-}" = 1 ]; then echo "== logs kept in $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
t0=$SECONDS
cd "$tmp"     # outside the checkout: the installed cylsm

echo "== instruction sets of the kernel modules"
pkg=$("$python" -c 'import cylsm, os; print(os.path.dirname(cylsm.__file__))')
for level in "${levels[@]}"; do
    so=$(ls "$pkg"/_kernels_"$level".*so)
    dis=$(objdump -d --no-show-raw-insn "$so")
    zmm=$(grep -cE '%zmm|%k[1-7]' <<<"$dis" || true)
    ymm=$(grep -c '%ymm' <<<"$dis" || true)
    echo "$(basename "$so"): AVX-512 operands $zmm, AVX operands $ymm"
    if [ "$zmm" != 0 ] || { [ "$level" = baseline ] && [ "$ymm" != 0 ]; }; then
        echo "valgrind.sh: $level holds instructions valgrind cannot run or it should not" >&2
        exit 1
    fi
done

vg=(valgrind --tool=memcheck --track-origins=yes --leak-check=full
    --show-leak-kinds=definite --errors-for-leak-kinds=none --num-callers=40
    --suppressions="$root/tools/valgrind.supp")
echo "== memcheck: tools/valgrind_cases.py ${levels[*]} (OMP_NUM_THREADS=2)"
t1=$SECONDS
status=0
PYTHONMALLOC=malloc OMP_NUM_THREADS=2 "${vg[@]}" --log-file="$tmp/vg.%p" \
    "$python" "$root/tools/valgrind_cases.py" --under-valgrind "${levels[@]}" || status=$?
echo "== memcheck took $((SECONDS - t1)) s (exit status $status)"
"$python" - "$tmp" "$status" <<'EOF'
import glob, re, sys
tmp, status = sys.argv[1], int(sys.argv[2])
ours, other, invalid, kinds, others = [], 0, [], {}, {}
for path in glob.glob(tmp + "/vg.*"):
    text = open(path).read()
    # one record per error: the lines between blank "==pid== " separators
    for rec in re.split(r"\n==\d+== \n", text):
        head = re.sub(r"^==\d+== ", "", rec.strip().splitlines()[0]) if rec.strip() else ""
        if not re.match(r"(Invalid|Conditional|Use of uninit|Mismatched|Source and dest|"
                        r"Syscall param|\d[\d,]* bytes in \d[\d,]* blocks are definitely)", head):
            continue
        kind = re.sub(r"\d[\d,]*", "N", head)
        kinds[kind] = kinds.get(kind, 0) + 1
        if head.startswith(("Invalid", "Mismatched", "Source and dest")):
            invalid.append(rec)
        elif "_kernels_" in rec:
            ours.append(rec)
        else:
            other += 1
            frames = re.findall(r"(?:at|by) 0x[0-9A-F]+: (\S+) \(([^)]*)\)", rec)
            first = next((f"{fn} ({where})" for fn, where in frames
                          if not re.search(r"(malloc|calloc|realloc|vg_replace)", fn)), "?")
            others[f"{kind} at {first}"] = others.get(f"{kind} at {first}", 0) + 1
print(f"memcheck records: {sum(kinds.values())}; through cylsm's kernels: {len(ours)}; "
      f"invalid accesses anywhere: {len(invalid)}; elsewhere (CPython, not gated): {other}")
for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"  {n:4d}  {k}")
print("not gated, by first frame:")
for k, n in sorted(others.items(), key=lambda kv: -kv[1]):
    print(f"  {n:4d}  {k}")
for rec in ours + invalid:
    print(rec)
if status != 0:
    print(f"valgrind_cases.py failed (exit status {status}); see above")
sys.exit(1 if ours or invalid or status else 0)
EOF
echo "== valgrind.sh: OK in $((SECONDS - t0)) s"
