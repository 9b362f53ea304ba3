"""Peak extra memory of one call of each cylsm function on the benchmark's large shapes.

Every measurement runs in a fresh subprocess: it builds the inputs (and ``out``, written once so
its pages are resident), warms the function up on a small array (code paged in, OpenMP threads
started), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), records the RSS,
makes the one call, and reads the peak RSS (``VmHWM``).  The extra memory is peak minus base.

A call may use the memory of its result (none with ``out=``) plus a small, size-independent
amount: scratch of O(threads x row block).  The script fails when a call uses more than the
output plus ``--slack-mb`` (default 4 MiB).

    python tools/peak_memory.py            # the full table (about 2 minutes)
    python tools/peak_memory.py --quick    # float64 and two shapes: for CI
    python tools/peak_memory.py --backend python   # the NumPy backend, for comparison only

Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = [((4096, 1024), -1), ((512, 32000), -1), ((16, 262144), -1), ((1, 16_000_000), -1),
          ((1024, 4096), 0)]
QUICK_SHAPES = [((512, 32000), -1), ((1024, 4096), 0)]
OPS = ["log_softmax", "softmax", "logsumexp", "log_softmax_backward", "softmax_backward",
       "logsumexp_backward"]
MiB = 1 << 20


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """One measurement (runs in the subprocess)."""
    import gc

    import numpy as np

    import cylsm
    from cylsm import _api, _select

    if spec["backend"] != "compiled":
        _api._K = _select.load(spec["backend"])
    shape, axis, op, style = tuple(spec["shape"]), spec["axis"], spec["op"], spec["style"]
    dt = np.dtype(spec["dtype"])
    f = getattr(cylsm, op)

    def inputs(shape: tuple[int, ...]) -> tuple[tuple, dict]:
        """The positional arguments and the keywords of the call."""
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=dt)
        kw = {"axis": axis}
        if op in ("log_softmax", "softmax", "logsumexp"):
            return (x,), kw
        if op == "logsumexp_backward":
            return (rng.standard_normal(cylsm.logsumexp(x, axis=axis).shape, dtype=dt), x), kw
        fwd = getattr(cylsm, op[: -len("_backward")])(x, axis=axis)
        del x
        return (rng.standard_normal(shape, dtype=dt), fwd), kw

    def result_shape(args: tuple, kw: dict) -> tuple[int, ...]:
        if op == "logsumexp":
            return tuple(s for i, s in enumerate(args[0].shape) if i != axis % len(shape))
        return args[-1].shape

    small = tuple(min(s, 64) for s in shape[:-1]) + (min(shape[-1], 4096),)
    if axis == 0:
        small = (min(shape[0], 1024), 64)
    for warm in (small, (64, 8192) if axis != 0 else (1024, 256)):   # the second: threads
        wargs, wkw = inputs(warm)
        if style == "out":
            wkw["out"] = np.empty(result_shape(wargs, wkw), dt)
        f(*wargs, **wkw)
    del wargs, wkw

    args, kw = inputs(shape)
    out_bytes = int(np.prod(result_shape(args, kw))) * dt.itemsize
    if style == "out":
        kw["out"] = np.empty(result_shape(args, kw), dt)
        kw["out"][...] = 1          # resident before the call (np.zeros' pages would not be)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                   # reset VmHWM to the current RSS
    base = status_kb("VmRSS")
    r = f(*args, **kw)
    peak = status_kb("VmHWM")
    del r
    return {"base": base, "peak": peak, "out_bytes": out_bytes,
            "input_bytes": int(sum(a.nbytes for a in args if hasattr(a, "nbytes"))),
            "threads": _api._K.max_threads(), "kernels": _api._K.NAME}


def measure(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: the measurement failed:\n{proc.stderr}")
    result: dict = json.loads(proc.stdout)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="float64 and two shapes only")
    ap.add_argument("--backend", default="compiled", help="compiled, compiled-<level> or python")
    ap.add_argument("--slack-mb", type=float, default=4.0,
                    help="allowed extra above the output, MiB (default 4)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        print("peak_memory.py needs Linux's /proc/self/clear_refs", file=sys.stderr)
        return 2

    shapes = QUICK_SHAPES if a.quick else SHAPES
    dtypes = ["float64"] if a.quick else ["float32", "float64"]
    checked = a.backend != "python"
    print(f"peak extra memory of one call, backend {a.backend}; limit: output + "
          f"{a.slack_mb:g} MiB" + ("" if checked else " (not checked for the NumPy backend)"))
    print(f"{'shape':>14} {'axis':>4} {'dtype':>7} {'op':>20} {'style':>5} {'input MB':>8} "
          f"{'output MB':>9} {'peak extra MB':>13} {'over output MB':>14}")
    bad = []
    threads = kernels = None
    for shape, axis in shapes:
        for dtype in dtypes:
            for op in OPS:
                for style in ("alloc", "out"):
                    spec = {"shape": shape, "axis": axis, "dtype": dtype, "op": op,
                            "style": style, "backend": a.backend}
                    m = measure(spec)
                    threads, kernels = m["threads"], m["kernels"]
                    extra = m["peak"] - m["base"]
                    allowed = (m["out_bytes"] if style == "alloc" else 0) + a.slack_mb * MiB
                    over = extra - (m["out_bytes"] if style == "alloc" else 0)
                    flag = "" if extra <= allowed else "  <-- over the limit"
                    print(f"{str(tuple(shape)):>14} {axis:>4} {dtype:>7} {op:>20} {style:>5} "
                          f"{m['input_bytes'] / 1e6:8.1f} {m['out_bytes'] / 1e6:9.2f} "
                          f"{extra / 1e6:13.3f} {over / 1e6:14.3f}{flag}", flush=True)
                    if flag and checked:
                        bad.append(spec)
    print(f"kernels {kernels}, {threads} threads; MB = 10^6 bytes")
    if bad:
        print(f"{len(bad)} calls used more than their output + {a.slack_mb:g} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
