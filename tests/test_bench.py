"""Smoke tests of ``python -m cylsm.bench``: it runs, verifies, and writes its outputs.

Timings are never asserted (the machine may be shared); only that every cell was measured,
that every result was checked against the reference first, and that the files are written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cylsm import bench

FAST = ["--quick", "--peers", "numpy", "--threads", "1"]


def test_quick_run_measures_and_verifies_every_cell(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main([*FAST, "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    cells = report["cells"]
    expected = {(op, dtype, shape.name, 1, style) for op in bench.OPS for dtype in bench.DTYPES
                for shape in bench.SHAPES for style in bench.STYLES}
    assert {(c["op"], c["dtype"], c["shape_name"], c["threads"], c["style"])
            for c in cells} == expected
    for c in cells:
        numpy_runs = c["style"] == "alloc"
        assert c["verification"] == ({"cylsm": "ok", "numpy": "ok"} if numpy_runs
                                     else {"cylsm": "ok"}), c
        roofline = "copy" if numpy_runs else "copyto"
        assert set(c["times"]) == {"cylsm", roofline} | ({"numpy"} if numpy_runs else set())
        for timing in c["times"].values():
            assert 0 < timing["min"] <= timing["median"]
            assert timing["calls_per_round"] >= 1 and len(timing["rounds"]) == 2
    assert report["settings"]["quick"] is True
    assert report["machine"]["cores"] >= 1 and "numpy" in report["machine"]["versions"]
    assert "backend" in report["cylsm_config"]["1"]
    assert {t["text"] for t in report["targets"]} >= {"(1,10): <= 1.0 us per call"}

    printed = capsys.readouterr().out
    assert "best peer" in printed and "targets of issue 3" in printed


def test_plot_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    argv = [*FAST, "--ops", "log_softmax,logsumexp_bwd", "--dtypes", "float32",
            "--shapes", "1x10,1024x4096-axis0", "--plot", str(png), "--markdown"]
    assert bench.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| op | dtype | shape |")
    assert len(table) == 2 + 2 * 2 * 2  # header, rule, ops x shapes x styles


def test_a_wrong_peer_is_dropped_and_a_wrong_cylsm_is_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    case = bench.make_case("softmax", "float32", bench.SHAPES[2], quick=True)
    right = case.reference.astype(np.float32)

    def fake(name: str, result: np.ndarray, out: np.ndarray | None = None) -> object:
        return lambda case, style: bench.Candidate(name, lambda: result, out)

    monkeypatch.setitem(bench.BUILDERS, "numpy", fake("numpy", np.zeros_like(right)))
    monkeypatch.setitem(bench.BUILDERS, "torch", fake("torch", right, np.empty_like(right)))
    cands, verdicts = bench.verified(case, "alloc", ["numpy", "torch"])
    assert [c.name for c in cands] == ["cylsm", "copy"]
    assert verdicts["cylsm"] == "ok"
    assert verdicts["numpy"].startswith("wrong result")
    assert verdicts["torch"] == "did not write its result into out="

    monkeypatch.setitem(bench.BUILDERS, "cylsm", fake("cylsm", right[:, :-1]))
    with pytest.raises(bench.BenchError, match="cylsm softmax float32"):
        bench.verified(case, "alloc", [])


@pytest.mark.parametrize("argv", [["--ops", "exp"], ["--threads", "0"], ["--threads", "1,x"],
                                  ["--style", "inplace"], ["--rounds", "0"]])
def test_bad_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
