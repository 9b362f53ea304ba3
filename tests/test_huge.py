"""Arrays beyond 2^31 elements (issue 5): one float32 row longer than 2^31, and a 2-D float32
array of more than 2^31 elements, through log_softmax, softmax and logsumexp.  About 17.2 GB
at a time (input and output, 8.6 GB each; the output is reused with out=).  Marked slow:
deselected by default, run by .ci/run with ``pytest -m slow``.

Only the compiled backend, at the best CPU level this machine runs: the index arithmetic under
test (Py_ssize_t offsets of superblocks, rows, the first maximum) is the same source at every
level, and one level already costs a minute.  Not the Python backend: it forms float64
temporaries of the whole input (the input in float64, x - M and its rounding error, the exps:
some 17 GB each for a 2^31 float32 row), and a single row cannot be split into row chunks;
streaming it would mean rewriting the readable reference implementation as a chunked two-pass
one.  Its NumPy operations take int64 sizes anyway.

The checks need no 9 GB float64 temporary.  The data repeat with a period that is no power of
two (1-D) or are rotations of one row plus an exact per-row constant (2-D), so every output
element can be compared exactly with the corresponding element of a small part, which is
checked against a float64 reference with SPEC section 4's bounds (logsumexp within 1 eps *
max(1, |r|), log_softmax within 4 ulp).  A single maximum placed beyond 2^31 elements tests
the index of the first maximum."""
from __future__ import annotations

import gc
import resource
import time
import traceback

import numpy as np
import pytest

from cylsm import _api, _select
from _reference import assert_ulp_close, ulp_err

pytestmark = pytest.mark.slow

P = 1_000_003                    # period of the 1-D data: prime, so a wrapped index shows
N_ROW = 2**31 + 4099             # one row longer than 2^31 elements
MARK = 2**31 + 1234              # the single maximum, beyond 2^31
ROWS, COLS = 40_000, 53_700      # 2 148 000 000 elements > 2^31
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture
def best(monkeypatch):
    if not _select.COMPILED_NAMES:
        pytest.fail("the huge-array tests need the compiled backend")
    monkeypatch.setattr(_api, "_K", _select.load(_select.COMPILED_NAMES[0]))
    import cylsm

    yield cylsm
    gc.collect()


def _report(label, t0, times):
    times[label] = round(time.perf_counter() - t0, 1)


def _peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _one_row(best, big):
    times = {}
    t0 = time.perf_counter()
    base = (np.random.default_rng(11).standard_normal(P) * 3).astype(np.float32)
    x = big['x'] = np.empty(N_ROW, np.float32)
    for k in range(0, N_ROW, P):
        x[k:k + P] = base[:min(P, N_ROW - k)]
    replaced = float(x[MARK])
    x[MARK] = 40.0
    _report("fill", t0, times)

    # float64 reference from the period: t = sum of exp(x - 40) over all but the maximum
    b64 = base.astype(np.float64)
    full, rem = divmod(N_ROW, P)
    t = full * np.sum(np.exp(b64 - 40)) + np.sum(np.exp(b64[:rem] - 40)) - np.exp(replaced - 40)
    L = np.log1p(t)

    t0 = time.perf_counter()
    r = best.logsumexp(x)
    _report("logsumexp", t0, times)
    assert type(r) is np.float32
    assert abs(float(r) - (40 + L)) <= EPS32 * max(1.0, abs(float(r))), (r, 40 + L)

    y = big['y'] = np.empty_like(x)
    k_mark = MARK // P * P
    for name, ref0 in (("log_softmax", (b64 - 40) - L), ("softmax", np.exp(b64 - 40) / (1 + t))):
        y.fill(np.nan)
        t0 = time.perf_counter()
        assert getattr(best, name)(x, out=y) is y
        _report(name, t0, times)
        t0 = time.perf_counter()
        y0 = y[:P]
        if name == "log_softmax":
            assert ulp_err(y0, ref0, np.float32).max() <= 4
            assert ulp_err(y[MARK], -L, np.float32) <= 4
        else:
            assert_ulp_close(y0, ref0, np.float32, 4)
            assert abs(float(y[MARK]) - 1 / (1 + t)) <= 2 * EPS32
        for k in range(P, N_ROW, P):             # every period equals the first, exactly
            part = y[k:k + P]
            if k == k_mark:
                part = part.copy()
                part[MARK - k] = y0[MARK - k]
            assert np.array_equal(part, y0[:part.size]), f"{name}: period at {k} differs"
        if name == "softmax":
            total = sum(float(np.sum(y[k:k + 2**26], dtype=np.float64)) for k in range(0, N_ROW, 2**26))
            assert abs(total - 1) < 1e-5
        _report(f"check {name}", t0, times)
    del x, y
    big.clear()
    print(f"one row of {N_ROW} float32: times (s) {times}; peak RSS {_peak_gb():.1f} GB")


def _two_d(best, big):
    times = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(12)
    row = (rng.integers(-128, 64, COLS) / 8).astype(np.float32)     # exact multiples of 1/8
    row[rng.integers(COLS)] = 9.0                                    # one maximum per row
    x = big['x'] = np.empty((ROWS, COLS), np.float32)
    for r in range(ROWS):               # row r: row rotated left by r % COLS, plus r % 1024
        s, c = r % COLS, np.float32(r % 1024)
        np.add(row[s:], c, out=x[r, :COLS - s])
        np.add(row[:s], c, out=x[r, COLS - s:])
    _report("fill", t0, times)
    assert x.size > 2**31

    r64 = row.astype(np.float64)
    e = np.exp(r64 - 9.0)
    t = np.sum(e) - 1.0
    L = np.log1p(t)
    t0 = time.perf_counter()
    lse = best.logsumexp(x, axis=1)
    _report("logsumexp", t0, times)
    ref = 9.0 + L + (np.arange(ROWS) % 1024)
    err = np.abs(lse.astype(np.float64) - ref) / (EPS32 * np.maximum(1, np.abs(ref)))
    assert err.max() <= 1, (err.argmax(), err.max())

    y = big['y'] = np.empty_like(x)
    for name, ref0 in (("log_softmax", (r64 - 9.0) - L), ("softmax", e / (1 + t))):
        t0 = time.perf_counter()
        assert getattr(best, name)(x, out=y) is y
        _report(name, t0, times)
        t0 = time.perf_counter()
        y0 = y[0]
        if name == "log_softmax":
            assert ulp_err(y0, ref0, np.float32).max() <= 4
        else:
            assert_ulp_close(y0, ref0, np.float32, 4)
        for r in range(1, ROWS):       # each row is row 0's result rotated, exactly
            s = r % COLS
            if not (np.array_equal(y[r, :COLS - s], y0[s:]) and np.array_equal(y[r, COLS - s:], y0[:s])):
                pytest.fail(f"{name}: row {r} (element offset {r * COLS}) differs")
        _report(f"check {name}", t0, times)
    del x, y
    big.clear()
    print(f"{ROWS} x {COLS} float32: times (s) {times}; peak RSS {_peak_gb():.1f} GB")


def _run(body, best):
    """Run ``body`` and free its 17 GB even when it fails (a traceback keeps frames alive, and
    the next test would then run out of memory)."""
    big = {}
    try:
        body(best, big)
    except BaseException as exc:
        big.clear()
        traceback.clear_frames(exc.__traceback__)     # the failing frames' arrays too
        raise
    finally:
        big.clear()
        gc.collect()


def test_one_row_longer_than_2_31(best):
    _run(_one_row, best)


def test_2d_more_than_2_31_elements(best):
    _run(_two_d, best)
