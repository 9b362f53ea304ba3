"""Run cylsm's differential fuzz targets (tests/test_fuzz.py) for a fixed time.

    python tools/fuzz.py --seconds 180 [--seed N] [--target forward|backward]

Each round is one Hypothesis run of ``--chunk`` examples with a fresh seed, on every backend
this build has (every compiled CPU level and the Python backend; only the latter under
CYLSM_NO_EXTENSIONS=1), alternating the targets until the time is up.  Prints the examples run
per target.  A failure stops the run: Hypothesis shrinks it and prints the minimal example and
the seed that found it (rerun with --seed to reproduce); add it to tests/test_fuzz.py as a
``test_regression_*``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "tests"


def make_run(check, target, backends, counts, s, chunk, given, seed, settings, st, base):
    """One Hypothesis run of ``chunk`` examples of ``check`` with seed ``s``."""

    def body(data):
        counts[target] += 1
        check(data, backends)

    return seed(s)(settings(base, max_examples=chunk, database=None, print_blob=True)(
        given(data=st.data())(body)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    ap.add_argument("--chunk", type=int, default=50, help="examples per Hypothesis run")
    ap.add_argument("--target", choices=["forward", "backward"], action="append")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from hypothesis import given, seed, settings
    from hypothesis import strategies as st

    import test_fuzz
    from cylsm import _select

    names = (["python"] if os.environ.get("CYLSM_NO_EXTENSIONS")
             else [*_select.COMPILED_NAMES, "python"])
    if not os.environ.get("CYLSM_NO_EXTENSIONS") and not _select.COMPILED_NAMES:
        print("fuzz: the compiled kernels are not built (set CYLSM_NO_EXTENSIONS=1 to fuzz the "
              "Python backend alone)", file=sys.stderr)
        return 2
    backends = [(n, _select.load(n)) for n in names]
    targets = args.target or list(test_fuzz.TARGETS)
    counts = dict.fromkeys(targets, 0)
    rng = random.Random(args.seed)
    first = args.seed if args.seed is not None else rng.randrange(2**32)
    print(f"fuzz: backends {', '.join(names)}; targets {', '.join(targets)}; "
          f"budget {args.seconds:g} s; first seed {first}", flush=True)
    start = time.monotonic()
    round_ = 0
    while time.monotonic() - start < args.seconds:
        target = targets[round_ % len(targets)]
        s = first + round_
        round_ += 1
        run = make_run(test_fuzz.TARGETS[target], target, backends, counts, s, args.chunk,
                       given, seed, settings, st, test_fuzz.SETTINGS)
        try:
            run()
        except Exception:
            print(f"fuzz: FAILED in target {target!r}, seed {s} (rerun: python tools/fuzz.py "
                  f"--seed {s} --target {target} --seconds 1)", file=sys.stderr, flush=True)
            raise
    elapsed = time.monotonic() - start
    total = sum(counts.values())
    print(f"fuzz: {total} examples in {elapsed:.0f} s ("
          + ", ".join(f"{t} {c}" for t, c in counts.items()) + f"), {round_} runs, no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
