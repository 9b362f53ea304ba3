"""One fixture runs every test on every backend.

``lsm`` is the ``cylsm`` module with its kernels switched to one backend for the duration of the
test.  The compiled backend is *required*: if it cannot be imported the tests that use it fail
(they are never skipped), unless ``CYLSM_NO_EXTENSIONS`` is set or ``--no-c-extensions`` is
given, in which case only the Python backend is exercised.
"""
from __future__ import annotations

import os

import pytest

import cylsm
from cylsm import _api, _select


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-c-extensions",
        action="store_true",
        help="test only the pure-Python backend",
    )
    parser.addoption(
        "--backends",
        default="all",
        help="the backends to run the tests on: 'all' (default: every compiled level this CPU "
        "runs, then the Python backend), 'best' (the best compiled level alone: the wheels' "
        "test-command, after the full suite has run on every level), or names separated by "
        "commas (e.g. compiled-baseline,python)",
    )


def backend_names(config: pytest.Config) -> list[str]:
    if os.environ.get("CYLSM_NO_EXTENSIONS") or config.getoption("--no-c-extensions"):
        return ["python"]
    every = list(_select.COMPILED_NAMES) + ["python"]
    choice = config.getoption("--backends")
    if choice == "all":
        return every
    if choice == "best":
        return every[:1]
    names = choice.split(",")
    unknown = [n for n in names if n not in every]
    if unknown:
        raise pytest.UsageError(
            f"--backends {choice}: {', '.join(unknown)} is not a backend of this machine; "
            f"use all, best, or names from {', '.join(every)}"
        )
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lsm" in metafunc.fixturenames:
        metafunc.parametrize("lsm", backend_names(metafunc.config), indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--backends also chooses among the tests parametrized by a backend's name ("backend":
    tests that measure one backend in a subprocess, tests/test_leaks.py, test_concurrency.py)."""
    chosen = set(backend_names(config))
    keep, drop = [], []
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("backend")
        (drop if isinstance(name, str) and name not in chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def lsm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    try:
        kernels = _select.load(request.param)
    except ImportError as exc:  # a build problem must never pass as green
        pytest.fail(f"backend {request.param!r} cannot be imported: {exc}")
    monkeypatch.setattr(_api, "_K", kernels)
    return cylsm


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> list[tuple[str, object]]:
    """Every backend at once, as (name, kernel module): for tests that compare them with each
    other in one example (tests/test_fuzz.py).  The Python backend is always among them, as the
    oracle the others are compared with, also under --backends best.  Missing compiled kernels
    fail, as for ``lsm``."""
    names = backend_names(request.config)
    found = []
    for name in names + ([] if "python" in names else ["python"]):
        try:
            found.append((name, _select.load(name)))
        except ImportError as exc:
            pytest.fail(f"backend {name!r} cannot be imported: {exc}")
    return found
