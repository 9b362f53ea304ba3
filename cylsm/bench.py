"""Benchmark of cylsm against the implementations a user would otherwise pick.

``python -m cylsm.bench`` runs it (``--help`` lists the options; a full run takes minutes and
prints a progress line on stderr); ``python -m cylsm`` runs a short version.

What is measured
----------------
Six operations -- ``log_softmax``, ``softmax`` and ``logsumexp``, forward and backward
(``*_bwd``) -- on float32 and float64 arrays of the standard shapes (:data:`SHAPES`), at one
thread and at all cores, in two call styles, compared like with like:

``alloc``
    Every candidate returns a fresh result: cylsm's default call; NumPy's textbook max-shift
    formulas (and the analytic formulas of the backward ops); ``scipy.special`` (forward only);
    torch's native ops on ``torch.from_numpy`` views (``torch.log_softmax``, ...,
    ``torch._log_softmax_backward_data``, ``torch._softmax_backward_data`` and, for
    ``logsumexp``, the formula its autograd uses); jax with ``jax_enable_x64``, jit-compiled
    (the compile is not timed), ``block_until_ready``, on device arrays.  The roofline is
    ``x.copy()``: the same bytes copied into a fresh array.
``out``
    The result goes into a preallocated array: cylsm with ``out=`` against torch's ``out=``
    variants (``torch._log_softmax``, ``torch._softmax``, ``torch.logsumexp``,
    ``torch._log_softmax_backward_data``, ``torch._softmax_backward_data``; for ``logsumexp``
    backward ``sub``/``exp_``/``mul_`` into the buffer).  The roofline is
    ``np.copyto(buffer, x)``.

The backward ops take the upstream gradient and the forward output (``y = log_softmax(x)``,
``p = softmax(x)``); for ``logsumexp`` the peers also get the forward result, as autograd keeps
it, while cylsm recomputes it from ``x``.  The roofline of every cell copies an array of the
shape and dtype of ``x``: the bytes a forward op reads and a backward op writes.  Each peer
takes part only when it is importable.

Method
------
1. The inputs of a cell are built once (standard normal times 3, fixed seed); big arrays are
   freed before the next cell.
2. Every candidate's first result is checked against a float64 NumPy reference:
   ``max |r - ref| / (|ref| + max |ref|)`` must stay within 1e-4 (float32) or 1e-8 (float64),
   and an ``out=`` candidate must have written into its buffer.  A peer that fails is reported
   and dropped; a failing cylsm stops the benchmark with an error.
3. Warm-up and calibration: each candidate gets the number of calls that takes at least
   ``min_time`` (20 ms), at least one.
4. Timing: in each of ``rounds`` (7) rounds every candidate runs its calls in turn, so a noisy
   neighbour slows all of them alike; the time per call of each round is kept and the minimum
   and the median over the rounds are reported.  Ratios are formed only between times of the
   same run, from the minima.
5. Each thread count runs in a subprocess whose thread pools are set before anything is
   imported: ``OMP_NUM_THREADS`` (cylsm, and torch), ``XLA_FLAGS`` asking jax for one thread
   in the one-thread run, then ``torch.set_num_threads`` and ``threadpoolctl`` limits.  On
   Linux the subprocess is also pinned to as many CPUs as it has threads: jax 0.10's XLA
   ignores those flags and used both cores of the "one-thread" run (measured: CPU time twice
   the wall time).  The parent collects the subprocesses' results as JSON.

The targets of issue 3 are evaluated at the end (:func:`evaluate_targets`): every cell within
0.80 x the best peer's time; at 16 MiB or more, all cores, ``out=``: forward log_softmax and
softmax within 1.3 x the copy roofline, backward within 2.0 x, logsumexp within 0.8 x; the
(1, 10) cells within 1 microsecond per call.  Accuracy and memory targets are the test suite's.

Examples
--------
::

    python -m cylsm.bench --quick                         # a smoke run, seconds
    python -m cylsm.bench --ops log_softmax,softmax --dtypes float32 --threads 2 --style out
    python -m cylsm.bench --json bench.json --plot bench.png --markdown
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from importlib import metadata
from itertools import repeat
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

OPS = ("log_softmax", "log_softmax_bwd", "softmax", "softmax_bwd", "logsumexp", "logsumexp_bwd")
FORWARD = ("log_softmax", "softmax", "logsumexp")
DTYPES = ("float32", "float64")
PEERS = ("numpy", "scipy", "torch", "jax")
STYLES = ("alloc", "out")
ROOFLINE = {"alloc": "copy", "out": "copyto"}  # the roofline candidate of each call style
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
SEED = 20240601
BIG = 16 * 2**20  # bytes: the arrays the roofline targets are about

PEER_LIMIT = 0.80  # cylsm time / best peer time, every cell
ROOF_LIMITS = {"log_softmax": 1.3, "softmax": 1.3, "logsumexp": 0.8,  # cylsm time / copy time
               "log_softmax_bwd": 2.0, "softmax_bwd": 2.0, "logsumexp_bwd": 2.0}
CALL_LIMIT = 1e-6  # seconds per call for the (1, 10) cells


@dataclass(frozen=True)
class Shape:
    """A standard shape: name, full size, ``--quick`` stand-in, reduced axis, why it is here."""

    name: str
    full: Tuple[int, ...]
    quick: Tuple[int, ...]
    axis: int
    note: str


SHAPES: Tuple[Shape, ...] = (
    Shape("1x10", (1, 10), (1, 10), -1, "per-call overhead"),
    Shape("65536x32", (65536, 32), (512, 32), -1, "many short rows"),
    Shape("4096x1024", (4096, 1024), (16, 1024), -1, "medium rows"),
    Shape("512x32000", (512, 32000), (2, 32000), -1, "LM vocabulary"),
    Shape("16x262144", (16, 262144), (4, 16384), -1, "long rows"),
    Shape("1x16M", (1, 16_000_000), (1, 100_000), -1, "one long row"),
    Shape("1024x4096-axis0", (1024, 4096), (128, 256), 0, "reduced over axis 0"),
)
SHAPE_NAMES = tuple(s.name for s in SHAPES)


class BenchError(Exception):
    """The benchmark cannot go on (cylsm gave a wrong result, a subprocess failed, ...)."""


def default_threads() -> List[int]:
    """One thread and all the cores this process may run on."""
    return sorted({1, cores()})


def cores() -> int:
    getaffinity = getattr(os, "sched_getaffinity", None)
    return len(getaffinity(0)) if getaffinity is not None else (os.cpu_count() or 1)


@dataclass
class Settings:
    """What to run; the defaults are the full benchmark of issue 3."""

    ops: List[str] = field(default_factory=lambda: list(OPS))
    dtypes: List[str] = field(default_factory=lambda: list(DTYPES))
    shapes: List[str] = field(default_factory=lambda: list(SHAPE_NAMES))
    threads: List[int] = field(default_factory=default_threads)
    styles: List[str] = field(default_factory=lambda: list(STYLES))
    peers: List[str] = field(default_factory=lambda: list(PEERS))
    rounds: int = 7
    min_time: float = 0.02
    quick: bool = False

    def cells_per_thread_count(self) -> int:
        return len(self.ops) * len(self.dtypes) * len(self.shapes) * len(self.styles)


@dataclass
class Timing:
    """Seconds per call of one candidate: minimum and median over the rounds, and the rounds."""

    min: float
    median: float
    calls_per_round: int
    rounds: List[float]


@dataclass
class Cell:
    """The measurements of one (op, dtype, shape, threads, style)."""

    op: str
    dtype: str
    shape_name: str
    label: str
    shape: List[int]
    axis: int
    threads: int
    style: str
    nbytes: int
    verification: Dict[str, str]
    times: Dict[str, Timing]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Cell":
        times = {k: Timing(**v) for k, v in d["times"].items()}
        return cls(**{**d, "times": times})

    @property
    def cylsm(self) -> float:
        return self.times["cylsm"].min

    @property
    def roofline(self) -> float:
        return self.times[ROOFLINE[self.style]].min

    def best_peer(self) -> Optional[Tuple[str, float]]:
        """The fastest peer that passed verification (name, time), or None."""
        peers = [(t.min, n) for n, t in self.times.items() if n in PEERS]
        return None if not peers else min(peers)[::-1]

    def peer_ratio(self) -> float:
        """cylsm time / best peer time; nan without a peer."""
        best = self.best_peer()
        return math.nan if best is None else self.cylsm / best[1]

    def roof_ratio(self) -> float:
        return self.cylsm / self.roofline

    def title(self) -> str:
        return f"{self.op} {self.dtype} {self.label} {self.threads}t {self.style}"


# ---------------------------------------------------------------------------------------------
# The textbook formulas: the NumPy peer, the float64 reference, and jax's backward peers


def _log_softmax(xp: Any, x: Any, axis: int) -> Any:
    s = x - x.max(axis, keepdims=True)
    return s - xp.log(xp.exp(s).sum(axis, keepdims=True))


def _softmax(xp: Any, x: Any, axis: int) -> Any:
    e = xp.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _logsumexp(xp: Any, x: Any, axis: int) -> Any:
    m = x.max(axis, keepdims=True)
    return xp.squeeze(m, axis) + xp.log(xp.exp(x - m).sum(axis))


def _log_softmax_bwd(xp: Any, grad: Any, y: Any, axis: int) -> Any:
    return grad - xp.exp(y) * grad.sum(axis, keepdims=True)


def _softmax_bwd(xp: Any, grad: Any, p: Any, axis: int) -> Any:
    return p * (grad - (grad * p).sum(axis, keepdims=True))


def _logsumexp_bwd(xp: Any, grad: Any, x: Any, lse: Any, axis: int) -> Any:
    return xp.expand_dims(grad, axis) * xp.exp(x - xp.expand_dims(lse, axis))


TEXTBOOK: Dict[str, Callable[..., Any]] = {
    "log_softmax": _log_softmax, "softmax": _softmax, "logsumexp": _logsumexp,
    "log_softmax_bwd": _log_softmax_bwd, "softmax_bwd": _softmax_bwd,
    "logsumexp_bwd": _logsumexp_bwd,
}
ARGS = {  # the inputs of each op, in the order the peers take them
    "log_softmax": ("x",), "softmax": ("x",), "logsumexp": ("x",),
    "log_softmax_bwd": ("grad", "y"), "softmax_bwd": ("grad", "p"),
    "logsumexp_bwd": ("grad", "x", "lse"),
}
CYLSM = {  # cylsm's function and its inputs
    "log_softmax": ("log_softmax", ("x",)), "softmax": ("softmax", ("x",)),
    "logsumexp": ("logsumexp", ("x",)),
    "log_softmax_bwd": ("log_softmax_backward", ("grad", "y")),
    "softmax_bwd": ("softmax_backward", ("grad", "p")),
    "logsumexp_bwd": ("logsumexp_backward", ("grad", "x")),
}


# ---------------------------------------------------------------------------------------------
# Inputs and reference


@dataclass
class Case:
    """The inputs of one (op, dtype, shape) and the float64 reference result."""

    op: str
    dtype: np.dtype
    shape: Shape
    size: Tuple[int, ...]
    arrays: Dict[str, np.ndarray]
    reference: np.ndarray
    ref_max: float  # max |reference|, the scale of the absolute tolerance

    @property
    def axis(self) -> int:
        return self.shape.axis

    @property
    def full(self) -> np.ndarray:
        """An input of x's shape and dtype: the bytes of the copy roofline."""
        return self.arrays["x"] if "x" in self.arrays else self.arrays["grad"]


def _normal(rng: np.random.Generator, size: Tuple[int, ...], dtype: np.dtype,
            scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal(size, dtype=dtype)
    a *= scale
    return a


def _inputs(op: str, dtype: np.dtype, size: Tuple[int, ...], axis: int) -> Dict[str, np.ndarray]:
    """x = 3 * standard normal; a backward op gets a standard normal gradient and the output."""
    rng = np.random.default_rng(SEED)
    x = _normal(rng, size, dtype, 3.0)
    if op in FORWARD:
        return {"x": x}
    x64 = x.astype(np.float64, copy=False)
    if op == "logsumexp_bwd":
        reduced = tuple(n for i, n in enumerate(size) if i != axis % len(size))
        lse = _logsumexp(np, x64, axis).astype(dtype)
        return {"grad": _normal(rng, reduced, dtype), "x": x, "lse": lse}
    name, forward = ("y", _log_softmax) if op == "log_softmax_bwd" else ("p", _softmax)
    return {"grad": _normal(rng, size, dtype), name: forward(np, x64, axis).astype(dtype)}


def make_case(op: str, dtype: str, shape: Shape, quick: bool) -> Case:
    size = shape.quick if quick else shape.full
    arrays = _inputs(op, np.dtype(dtype), size, shape.axis)
    as64 = [arrays[k].astype(np.float64, copy=False) for k in ARGS[op]]
    reference = TEXTBOOK[op](np, *as64, axis=shape.axis)
    ref_max = float(np.max(np.abs(reference), initial=np.finfo(np.float64).tiny))
    return Case(op, np.dtype(dtype), shape, size, arrays, reference, ref_max)


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Candidate:
    """A call to time; ``out`` is the buffer an ``out=`` candidate must write into."""

    name: str
    call: Callable[[], object]
    out: Optional[np.ndarray] = None


@lru_cache(maxsize=None)
def peer_module(name: str) -> Any:
    """The module of an optional peer (jax with x64 enabled), or None when not importable."""
    module = {"numpy": "numpy", "scipy": "scipy.special"}.get(name, name)
    try:
        mod = importlib.import_module(module)
    except (ImportError, OSError):
        return None
    if name == "jax":
        mod.config.update("jax_enable_x64", True)
    return mod


def _cylsm(case: Case, style: str) -> Candidate:
    cylsm = importlib.import_module("cylsm")
    fname, keys = CYLSM[case.op]
    call = partial(getattr(cylsm, fname), *(case.arrays[k] for k in keys), case.axis)
    if style == "alloc":
        return Candidate("cylsm", call)
    out = np.empty(case.reference.shape, case.dtype)
    return Candidate("cylsm", partial(call, out=out), out)


def _numpy(case: Case, style: str) -> Optional[Candidate]:
    if style != "alloc":
        return None
    args = (case.arrays[k] for k in ARGS[case.op])
    return Candidate("numpy", partial(TEXTBOOK[case.op], np, *args, axis=case.axis))


def _scipy(case: Case, style: str) -> Optional[Candidate]:
    special = peer_module("scipy")
    if special is None or style != "alloc" or case.op not in FORWARD:
        return None
    return Candidate("scipy", partial(getattr(special, case.op), case.arrays["x"], axis=case.axis))


def _torch_logsumexp_bwd(grad: Any, x: Any, lse: Any, dim: int) -> Any:
    """What torch's autograd computes for the gradient of logsumexp."""
    return grad.unsqueeze(dim) * (x - lse.unsqueeze(dim)).exp()


def _torch_logsumexp_bwd_out(sub: Any, grad: Any, x: Any, lse: Any, dim: int, out: Any) -> Any:
    """The same into a preallocated tensor, with no temporary: three passes over ``out``."""
    sub(x, lse.unsqueeze(dim), out=out)
    return out.exp_().mul_(grad.unsqueeze(dim))


def _torch_alloc(torch: Any, op: str, t: Dict[str, Any], dim: int) -> Callable[[], object]:
    if op in FORWARD:
        return partial(getattr(torch, op), t["x"], dim)
    if op == "log_softmax_bwd":
        return partial(torch._log_softmax_backward_data, t["grad"], t["y"], dim, t["y"].dtype)
    if op == "softmax_bwd":
        return partial(torch._softmax_backward_data, t["grad"], t["p"], dim, t["p"].dtype)
    return partial(_torch_logsumexp_bwd, t["grad"], t["x"], t["lse"], dim)


def _torch_out(torch: Any, op: str, t: Dict[str, Any], dim: int, o: Any) -> Callable[[], object]:
    if op in ("log_softmax", "softmax"):
        return partial(getattr(torch, "_" + op), t["x"], dim, False, out=o)
    if op == "logsumexp":
        return partial(torch.logsumexp, t["x"], dim, out=o)
    if op == "log_softmax_bwd":
        return partial(torch._log_softmax_backward_data, t["grad"], t["y"], dim, o.dtype, out=o)
    if op == "softmax_bwd":
        return partial(torch._softmax_backward_data, t["grad"], t["p"], dim, o.dtype,
                       grad_input=o)
    return partial(_torch_logsumexp_bwd_out, torch.sub, t["grad"], t["x"], t["lse"], dim, o)


def _torch(case: Case, style: str) -> Optional[Candidate]:
    torch = peer_module("torch")
    if torch is None:
        return None
    t = {k: torch.from_numpy(a) for k, a in case.arrays.items()}
    if style == "alloc":
        return Candidate("torch", _torch_alloc(torch, case.op, t, case.axis))
    out = np.empty(case.reference.shape, case.dtype)
    return Candidate("torch", _torch_out(torch, case.op, t, case.axis, torch.from_numpy(out)), out)


def _block(f: Callable[..., Any], *args: Any) -> Any:
    return f(*args).block_until_ready()


def _jax(case: Case, style: str) -> Optional[Candidate]:
    jax = peer_module("jax")
    if jax is None or style != "alloc":
        return None
    if case.op in FORWARD:
        f = partial(getattr(importlib.import_module("jax.nn"), case.op), axis=case.axis)
    else:
        f = partial(TEXTBOOK[case.op], importlib.import_module("jax.numpy"), axis=case.axis)
    args = [jax.device_put(case.arrays[k]) for k in ARGS[case.op]]
    return Candidate("jax", partial(_block, jax.jit(f), *args))


def _roofline(case: Case, style: str) -> Candidate:
    x = case.full
    if style == "alloc":
        return Candidate("copy", x.copy)
    buffer = np.empty_like(x)
    return Candidate("copyto", partial(np.copyto, buffer, x), buffer)


BUILDERS: Dict[str, Callable[[Case, str], Optional[Candidate]]] = {
    "cylsm": _cylsm, "numpy": _numpy, "scipy": _scipy, "torch": _torch, "jax": _jax,
}


# ---------------------------------------------------------------------------------------------
# Verification and timing


def relative_error(got: np.ndarray, ref: np.ndarray, ref_max: float,
                   chunk: int = 2**16) -> float:
    """max |got - ref| / (|ref| + ref_max) (nan if got has a nan), in cache-sized pieces."""
    g, r = got.reshape(-1), ref.reshape(-1)
    errors = [np.max(np.abs(g[i:i + chunk] - r[i:i + chunk]) / (np.abs(r[i:i + chunk]) + ref_max))
              for i in range(0, r.size, chunk)]
    return float(np.max(errors, initial=0.0))


def check(cand: Candidate, case: Case) -> str:
    """"ok", or what is wrong with the candidate's result."""
    got = np.asarray(cand.call())
    if cand.out is not None and not np.may_share_memory(got, cand.out):
        return "did not write its result into out="
    ref = case.reference
    if got.shape != ref.shape or got.dtype != case.dtype:
        return f"returned {got.dtype} {got.shape}, expected {case.dtype} {ref.shape}"
    worst = relative_error(got, ref, case.ref_max)
    tol = TOLERANCE[case.dtype.name]
    if not worst <= tol:
        return f"wrong result: max |r - ref| / (|ref| + max |ref|) = {worst:.3g} > {tol:g}"
    return "ok"


def _build_and_check(name: str, case: Case, style: str) -> Tuple[Optional[Candidate], str]:
    """The candidate and its verdict; "" when it has no such call here or is not installed."""
    try:
        cand = BUILDERS[name](case, style)
        return cand, ("" if cand is None else check(cand, case))
    except Exception as exc:  # noqa: BLE001 -- a peer may fail in any way; it is dropped
        return None, f"failed: {type(exc).__name__}: {exc}"


def verified(case: Case, style: str,
             peers: Sequence[str]) -> Tuple[List[Candidate], Dict[str, str]]:
    """The candidates of a cell that give the right result, and every candidate's verdict."""
    kept: List[Candidate] = []
    verdicts: Dict[str, str] = {}
    for name in ["cylsm", *peers]:
        cand, verdict = _build_and_check(name, case, style)
        if verdict:
            verdicts[name] = verdict
        if cand is not None and verdict == "ok":
            kept.append(cand)
    if verdicts["cylsm"] != "ok":
        raise BenchError(f"cylsm {case.op} {case.dtype} {case.size} axis={case.axis} "
                         f"({style}): {verdicts['cylsm']}")
    return kept + [_roofline(case, style)], verdicts


def _run(f: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in repeat(None, n):
        f()
    return time.perf_counter() - t0


def calibrate(f: Callable[[], object], min_time: float) -> int:
    """The number of calls of ``f`` that takes at least ``min_time`` seconds (warms it up)."""
    n = 1
    while True:
        t = _run(f, n)
        if t >= min_time:
            return n
        if t >= min_time / 4:
            t = min(t, _run(f, n))  # a second look: one preempted run must not set the count
            return max(1, math.ceil(n * min_time / t))
        n *= 4


def time_interleaved(calls: Mapping[str, Callable[[], object]], rounds: int = 7,
                     min_time: float = 0.02) -> Dict[str, Timing]:
    """Seconds per call of each candidate, timed in interleaved rounds."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        reps = {name: calibrate(f, min_time) for name, f in calls.items()}
        per_call: Dict[str, List[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, f in calls.items():
                per_call[name].append(_run(f, reps[name]) / reps[name])
    finally:
        if enabled:
            gc.enable()
    return {name: Timing(min(s), statistics.median(s), reps[name], s)
            for name, s in per_call.items()}


# ---------------------------------------------------------------------------------------------
# Running the cells (in the subprocess of one thread count)


class Progress:
    """The progress line on stderr: cell i/N, what runs, time elapsed since ``start``."""

    def __init__(self, done: int, total: int, start: float) -> None:
        self.done, self.total, self.start = done, total, start
        self.tty = sys.stderr.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {what}  elapsed {clock(time.time() - self.start)}"
        sys.stderr.write("\r\x1b[K" + line if self.tty else line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(f"benchmark done in {clock(time.time() - self.start)}\n")


def clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s"


def _label(shape: Shape, size: Tuple[int, ...]) -> str:
    if size == shape.full:
        return shape.name
    return "x".join(map(str, size)) + ("-axis0" if shape.axis == 0 else "")


def run_cell(case: Case, style: str, threads: int, settings: Settings) -> Cell:
    cands, verdicts = verified(case, style, settings.peers)
    times = time_interleaved({c.name: c.call for c in cands}, settings.rounds, settings.min_time)
    return Cell(case.op, case.dtype.name, case.shape.name, _label(case.shape, case.size),
                list(case.size), case.axis, threads, style, case.full.nbytes, verdicts, times)


def _case_cells(op: str, dtype: str, shape: Shape, threads: int, settings: Settings,
                progress: Optional[Progress]) -> List[Cell]:
    """The cells of one (op, dtype, shape), on inputs built once and freed on return."""
    case = make_case(op, dtype, shape, settings.quick)
    cells = []
    for style in settings.styles:
        if progress is not None:
            progress.step(f"{op} {dtype} {_label(shape, case.size)} threads={threads} {style}")
        cells.append(run_cell(case, style, threads, settings))
    if case.full.nbytes >= BIG:  # cycles that hold big arrays go now (gc is slow with torch)
        gc.collect()
    return cells


def run_cells(settings: Settings, threads: int,
              progress: Optional[Progress] = None) -> Iterator[Cell]:
    """Every cell of ``settings`` at the current thread configuration, in this process."""
    shapes = [s for s in SHAPES if s.name in settings.shapes]
    for op in settings.ops:
        for dtype in settings.dtypes:
            for shape in shapes:
                yield from _case_cells(op, dtype, shape, threads, settings, progress)


def _limit_threads(n: int, peers: Sequence[str], stack: ExitStack) -> None:
    """Thread pools of the libraries loaded by now to ``n`` threads (OMP_NUM_THREADS is set)."""
    if "torch" in peers:
        peer_module("torch").set_num_threads(n)
    try:
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        return
    stack.enter_context(threadpoolctl.threadpool_limits(limits=n))


def _pin(n: int) -> None:
    """Run this process, and the threads it starts from now on, on n of the CPUs it may use
    (Linux; elsewhere, and with n at least that many, nothing changes): a peer whose thread
    pool ignores its limits then still gets no more than n cores."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])


def worker(job_file: str) -> int:
    """The subprocess of one thread count: run its cells, write the results as JSON."""
    job = json.loads(Path(job_file).read_text())
    settings, threads = Settings(**job["settings"]), int(job["threads"])
    _pin(threads)           # before any library starts a thread pool
    config = importlib.import_module("cylsm._config")  # loads cylsm's kernels
    found = [p for p in settings.peers if peer_module(p) is not None]
    progress = Progress(job["done"], job["total"], job["start"])
    with ExitStack() as stack:
        _limit_threads(threads, found, stack)
        try:
            cells = [asdict(c) for c in run_cells(settings, threads, progress)]
        except BenchError as exc:
            print(f"\ncylsm.bench: error: {exc}", file=sys.stderr)
            return 1
        result = {"config": config.config(), "peers": found, "cells": cells}
    Path(job["result"]).write_text(json.dumps(result, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per thread count


def thread_env(n: int) -> Dict[str, str]:
    """The environment of the subprocess that runs with ``n`` threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(n))
    if n == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    return env


def _run_subprocess(settings: Settings, threads: int, progress: Progress) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cylsm-bench-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        job = {"settings": asdict(settings), "threads": threads, "done": progress.done,
               "total": progress.total, "start": progress.start, "result": result_file}
        job_file = os.path.join(tmp, "job.json")
        Path(job_file).write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "cylsm.bench", "--worker", job_file]
        code = subprocess.run(cmd, env=thread_env(threads), check=False).returncode
        if code != 0:
            raise BenchError(f"the run with {threads} thread(s) failed (exit status {code})")
        result: Dict[str, Any] = json.loads(Path(result_file).read_text())
    return result


def _cell_order(c: Cell) -> Tuple[int, int, int, int, int]:
    return (OPS.index(c.op), DTYPES.index(c.dtype), SHAPE_NAMES.index(c.shape_name), c.threads,
            STYLES.index(c.style))


def run(settings: Settings) -> Dict[str, Any]:
    """Run the benchmark, one subprocess per thread count; the report (see ``--json``)."""
    start = time.time()
    machine = machine_info()
    if machine["load_average"] > 0.5:
        print(f"warning: the machine is busy (load average {machine['load_average']:.2f}): "
              "timings will be noisy, above all with several threads", file=sys.stderr)
    per_count = settings.cells_per_thread_count()
    progress = Progress(0, per_count * len(settings.threads), start)
    cells: List[Cell] = []
    configs, peers = {}, set()
    for n in settings.threads:
        result = _run_subprocess(settings, n, progress)
        progress.done += per_count
        cells += [Cell.from_json(c) for c in result["cells"]]
        configs[str(n)] = result["config"]
        peers.update(result["peers"])
    progress.finish()
    return {"machine": machine, "settings": asdict(settings), "cylsm_config": configs,
            "peers_found": sorted(peers), "seconds": time.time() - start,
            "cells": sorted(cells, key=_cell_order)}


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    models = [ln.split(":", 1)[1].strip() for ln in text.splitlines()
              if ln.startswith("model name")]
    return models[0] if models else platform.machine()


def machine_info() -> Dict[str, Any]:
    versions: Dict[str, Optional[str]] = {}
    for pkg in ("cylsm", "numpy", "scipy", "torch", "jax", "jaxlib", "threadpoolctl",
                "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu_model(), "cores": cores(), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions}


# ---------------------------------------------------------------------------------------------
# Targets, tables, JSON, plot


@dataclass
class Target:
    """One target of issue 3: the cells it applies to and those that miss it (with the value)."""

    text: str
    column: str  # the table column it marks: "time", "peer" or "copy"
    checked: int
    missed: List[Tuple[int, float]]  # (index of the cell, measured value)

    @property
    def status(self) -> str:
        if not self.checked:
            return "not measured"
        return "MET" if not self.missed else f"MISSED {len(self.missed)}/{self.checked}"


def _target(text: str, column: str, cells: Sequence[Cell], applies: Callable[[Cell], bool],
            value: Callable[[Cell], float], limit: Callable[[Cell], float]) -> Target:
    chosen = [i for i, c in enumerate(cells) if applies(c)]
    missed = [(i, value(cells[i])) for i in chosen if not value(cells[i]) <= limit(cells[i])]
    return Target(text, column, len(chosen), missed)


def evaluate_targets(cells: Sequence[Cell], all_cores: int) -> List[Target]:
    """The speed targets of issue 3 on these cells (times: the minimum over the rounds)."""

    def big(ops: Sequence[str]) -> Callable[[Cell], bool]:
        return lambda c: (c.op in ops and c.nbytes >= BIG and c.style == "out"
                          and c.threads == all_cores)

    where = f">= 16 MiB, {all_cores} threads, out=:"
    roof = (Cell.roof_ratio, lambda c: ROOF_LIMITS[c.op])
    return [
        _target(f"every cell: cylsm <= {PEER_LIMIT:.2f} x best peer", "peer", cells,
                lambda c: c.best_peer() is not None, Cell.peer_ratio, lambda c: PEER_LIMIT),
        _target(f"{where} forward log_softmax/softmax <= 1.3 x copy", "copy", cells,
                big(("log_softmax", "softmax")), *roof),
        _target(f"{where} backward <= 2.0 x copy", "copy", cells,
                big(("log_softmax_bwd", "softmax_bwd", "logsumexp_bwd")), *roof),
        _target(f"{where} logsumexp <= 0.8 x copy", "copy", cells, big(("logsumexp",)), *roof),
        _target("(1,10): <= 1.0 us per call", "time", cells,
                lambda c: c.shape == [1, 10], lambda c: c.cylsm, lambda c: CALL_LIMIT),
    ]


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


TABLE_HEADER = ("op", "dtype", "shape", "threads", "style", "cylsm", "best peer",
                "cylsm/peer", "cylsm/copy")


def _row(c: Cell, missed: Set[str]) -> Tuple[str, ...]:
    """A cell's line of the table, a '*' after each value whose target it misses."""
    def mark(column: str) -> str:
        return " *" if column in missed else ""

    best, ratio = c.best_peer(), c.peer_ratio()
    return (c.op, c.dtype, c.label, str(c.threads), c.style, fmt_time(c.cylsm) + mark("time"),
            "-" if best is None else f"{best[0]} {fmt_time(best[1])}",
            "-" if math.isnan(ratio) else f"{ratio:.2f}" + mark("peer"),
            f"{c.roof_ratio():.2f}" + mark("copy"))


def table_rows(cells: Sequence[Cell], targets: Sequence[Target]) -> List[Tuple[str, ...]]:
    missed: Dict[int, Set[str]] = {i: set() for i in range(len(cells))}
    for t in targets:
        for i, _ in t.missed:
            missed[i].add(t.column)
    return [_row(c, missed[i]) for i, c in enumerate(cells)]


def format_table(rows: Sequence[Tuple[str, ...]], markdown: bool) -> str:
    if markdown:  # the miss mark escaped: a bare '*' is emphasis there
        lines = [TABLE_HEADER, tuple("---" for _ in TABLE_HEADER), *rows]
        return "\n".join("| " + " | ".join(r).replace(" *", " \\*") + " |" for r in lines)
    widths = [max(len(r[k]) for r in [TABLE_HEADER, *rows]) for k in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                     for r in [TABLE_HEADER, *rows])


def format_targets(cells: Sequence[Cell], targets: Sequence[Target], shown: int = 12) -> str:
    lines = ["targets of issue 3 (minimum times; '*' in the table marks a miss):"]
    for t in targets:
        lines.append(f"  {t.status:<14} {t.text} ({t.checked} cells)")
        lines += [f"      {cells[i].title()}: {fmt_time(v) if t.column == 'time' else f'{v:.2f}'}"
                  for i, v in t.missed[:shown]]
        if len(t.missed) > shown:
            lines.append(f"      ... and {len(t.missed) - shown} more")
    lines.append("  (accuracy and memory targets are checked by the test suite, not here)")
    return "\n".join(lines)


def format_dropped(cells: Sequence[Cell]) -> str:
    """The peers that failed verification, one line per cell."""
    return "\n".join(f"dropped: {c.title()}: {name}: {verdict}"
                     for c in cells for name, verdict in c.verification.items() if verdict != "ok")


def describe(report: Mapping[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    found = ["numpy"] + [p for p in PEERS[1:] if p in report["peers_found"]]
    versions = ", ".join(f"{p} {m['versions'][p]}" for p in found)
    config: Dict[str, Any] = next(iter(report["cylsm_config"].values()), {})
    return (f"cylsm {m['versions']['cylsm']} ({config.get('kernels', '?')}) on {m['cpu']}, "
            f"{m['cores']} cores; {versions}; min of {s['rounds']} interleaved rounds")


def write_json(report: Mapping[str, Any], targets: Sequence[Target], path: str) -> None:
    cells = report["cells"]
    data = {**report, "cells": [asdict(c) for c in cells],
            "targets": [{"text": t.text, "status": t.status, "checked": t.checked,
                         "missed": [{"cell": cells[i].title(), "value": v} for i, v in t.missed]}
                        for t in targets]}
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _bars(ax: Any, values: Sequence[float], colors: Sequence[Any], xlabel: str) -> None:
    """Horizontal bars from 1 to each value on a log axis (nan: no bar, "no peer")."""
    widths = [0.0 if math.isnan(v) else v - 1 for v in values]
    ax.barh(range(len(values)), widths, left=1, color=colors, height=0.75)
    for y in (y for y, v in enumerate(values) if math.isnan(v)):
        ax.text(1, y, " no peer", va="center", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.axvline(1, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", which="both", alpha=0.3)


def plot(cells: Sequence[Cell], title: str, path: str) -> None:
    """Two panels: speed-up over the best peer, and time over the copy roofline, per cell."""
    plt = _pyplot()
    colors = dict(zip(OPS, plt.get_cmap("tab10").colors))
    bar_colors = [colors[c.op] for c in cells]
    height = 1.8 + 0.2 * len(cells)
    fig, (left, right) = plt.subplots(1, 2, sharey=True, figsize=(14, height), squeeze=True)
    speedup = [1 / c.peer_ratio() for c in cells]
    _bars(left, speedup, bar_colors, "speed-up over the best peer (peer time / cylsm time)")
    left.axvline(1 / PEER_LIMIT, color="black", linestyle="--", label="target 1/0.8 = 1.25")
    left.legend(loc="lower left", bbox_to_anchor=(0, 1), fontsize=8, frameon=False)
    _bars(right, [c.roof_ratio() for c in cells], bar_colors, "cylsm time / copy roofline")
    for limit, what, style in ((0.8, "logsumexp", ":"), (1.3, "forward", "--"),
                               (2.0, "backward", "-.")):
        right.axvline(limit, color="black", linestyle=style, label=f"target {what} {limit}")
    right.legend(loc="lower left", bbox_to_anchor=(0, 1), fontsize=8, frameon=False, ncol=3)
    left.set_yticks(range(len(cells)))
    left.set_yticklabels([c.title() for c in cells], fontsize=8, family="monospace")
    left.set_ylim(len(cells) - 0.5, -0.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / height))     # the title above the legends
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _names(allowed: Sequence[str], empty_ok: bool = False) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not (names or empty_ok):
            raise argparse.ArgumentTypeError(
                f"{','.join(unknown) or 'nothing'} not among {','.join(allowed)}")
        return [n for n in allowed if n in names]
    return parse


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _thread_counts(text: str) -> List[int]:
    return sorted({_positive(n.strip()) for n in text.split(",")})


DESCRIPTION = """\
Time cylsm's log_softmax, softmax and logsumexp (forward and backward) against NumPy, scipy,
torch and jax (those installed) and a memory-copy roofline, per op, dtype, shape, thread count
and call style. Every result is checked against a float64 reference first; the candidates are
then timed interleaved in rounds and the minimum and median kept. Each thread count runs in
its own subprocess. A full run takes minutes (a progress line goes to stderr); --quick takes
seconds. Lists are comma-separated."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cylsm.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", metavar="LIST", type=_names(OPS), default=list(OPS),
                   help=f"from {', '.join(OPS)} (default all)")
    p.add_argument("--dtypes", metavar="LIST", type=_names(DTYPES), default=list(DTYPES),
                   help="from float32, float64 (default both)")
    p.add_argument("--shapes", metavar="LIST", type=_names(SHAPE_NAMES), default=list(SHAPE_NAMES),
                   help="from " + ", ".join(f"{s.name} ({s.note})" for s in SHAPES)
                   + " (default all)")
    p.add_argument("--threads", metavar="LIST", type=_thread_counts, default=default_threads(),
                   help=f"thread counts (default {','.join(map(str, default_threads()))}: one, "
                        "and all cores)")
    p.add_argument("--style", metavar="LIST", dest="styles", type=_names(STYLES),
                   default=list(STYLES), help="from alloc (fresh results), out (into a "
                                              "preallocated array) (default both)")
    p.add_argument("--peers", metavar="LIST", type=_names(PEERS, empty_ok=True),
                   default=list(PEERS),
                   help=f"from {', '.join(PEERS)} (default all that are installed; '' for none)")
    p.add_argument("--rounds", metavar="N", type=_positive,
                   help="interleaved timing rounds (default 7; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny stand-ins for the shapes and short rounds: a smoke test")
    p.add_argument("--json", metavar="FILE", help="write all raw results and machine info")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot speed-up over the best peer and time over the copy roofline "
                        "(needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    return Settings(args.ops, args.dtypes, args.shapes, args.threads, args.styles, args.peers,
                    rounds, 0.001 if args.quick else 0.02, args.quick)


def report_out(report: Mapping[str, Any], args: argparse.Namespace) -> None:
    """Print the table and the targets; write the JSON and the plot when asked."""
    cells: List[Cell] = report["cells"]
    targets = evaluate_targets(cells, report["machine"]["cores"])
    print(describe(report))
    print(format_table(table_rows(cells, targets), args.markdown) + "\n")
    dropped = format_dropped(cells)
    if dropped:
        print(dropped + "\n")
    print(format_targets(cells, targets))
    if args.json:
        write_json(report, targets, args.json)
    if args.plot:
        plot(cells, describe(report), args.plot)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    try:
        settings = settings_from(args)
        if args.plot:
            _pyplot()  # fail before a long run, not after it
        report_out(run(settings), args)
    except BenchError as exc:
        print(f"cylsm.bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# The short benchmark of ``python -m cylsm``


def short_benchmark(print_fn: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Forward ops on three shapes against the installed peers, in this process (all cores,
    allocating calls, 3 short rounds); prints a line per cell and returns them as dicts."""
    settings = Settings(ops=list(FORWARD), shapes=["1x10", "4096x1024", "512x32000"],
                        threads=[cores()], styles=["alloc"], rounds=3, min_time=0.005)
    print_fn(f"{'op':<12} {'dtype':<8} {'shape':<10} time per call (best), ratio to cylsm")
    rows = []
    for cell in run_cells(settings, cores()):
        ours = cell.cylsm
        parts = [f"{n} {fmt_time(t.min)}" + ("" if n == "cylsm" else f" ({t.min / ours:.1f}x)")
                 for n, t in cell.times.items()]
        parts += [f"{n} dropped" for n, v in cell.verification.items() if v != "ok"]
        print_fn(f"{cell.op:<12} {cell.dtype:<8} {cell.label:<10} " + "  ".join(parts))
        rows.append({"op": cell.op, "dtype": cell.dtype, "shape": tuple(cell.shape),
                     **{n: t.min for n, t in cell.times.items()}})
    return rows


__all__ = ["SHAPES", "Settings", "main", "run", "short_benchmark", "time_interleaved"]

if __name__ == "__main__":
    sys.exit(main())
