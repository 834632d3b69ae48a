"""`pfe-study bench`: a quick smoke run of the evaluation benchmark (timings are not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pfe.cli import main


def test_bench_eval_quick_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "eval", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_cpu_quick.json").read_text())
    names = {r["name"] for r in report["results"]}
    assert {"rank_metrics (ours)", "per-query NumPy loop"} <= names
    assert all(v <= 1e-12 for v in report["agreement"]["ours_vs_numpy_loop"].values())
    assert "| rank_metrics (ours) |" in (tmp_path / "eval_cpu_quick.md").read_text()
    assert "Speed-up" in capsys.readouterr().out


def test_bench_train_is_not_available_yet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train"]) == 2
    assert "GPU issue" in capsys.readouterr().err
