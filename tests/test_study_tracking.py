"""Checks that stop a study before Ray starts, and the MLflow writer's bookkeeping (no Ray needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pfe.cli import main
from pfe.study.tracking import StudyTracker, per_layer

STUDY = """\
name: preflight
variants:
  MFA: {model.side: mfa}
resources: {cpu: 1}
"""


def _study(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY + extra)
    return path


def _ray_started() -> bool:
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def test_missing_dataset_stops_before_ray_and_says_where_data_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PFE_DATA", str(tmp_path / "datasets"))
    path = _study(tmp_path, "base: {overrides: {data.dataset: market1501}}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "market1501" in err and str(tmp_path / "datasets") in err
    assert "PFE_DATA" in err  # how to point at the data
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    assert not _ray_started()


def test_cluster_needs_a_tracking_server_and_shared_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = _study(tmp_path)
    assert main(["run", str(path), "--address", "10.0.0.1:6379"]) == 2
    assert "MLflow server" in capsys.readouterr().err
    assert main(["run", str(path), "--address", "ray://10.0.0.1:10001"]) == 2
    assert "ray job submit" in capsys.readouterr().err
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # the address may come from the environment too
    assert main(["run", str(path)]) == 2
    assert "MLflow server" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://u:pw@mlflow.example:5000")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not shared" in err and "pw" not in err.replace("pfe-study", "")
    assert not list(tmp_path.glob("*.db")) and not _ray_started()


def test_unreachable_tracking_server_stops_before_any_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _study(tmp_path, f'tracking: {{uri: "http://alice:hunter2@127.0.0.1:{port}"}}\n')
    assert main(["run", str(path), "--simulate"]) == 2
    err = capsys.readouterr().err
    assert f"http://alice:***@127.0.0.1:{port}" in err and "hunter2" not in err
    assert "No trial was started" in err and not _ray_started()


def test_tracker_batches_dedups_resumes_and_starts_fresh(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracker = StudyTracker(uri, "exp", "study-a", "study.yaml")
    parent, resumed = tracker.open_parent()
    assert not resumed
    rec = tracker.open_run("trial", "abc", "A-s0", {"pfe.variant": "A"}, params={"model.alpha": 0.05})
    metrics = {"train/stage2/loss": 1.0, "eval/F5/rank1": 50.0, "eval/F5/mAP": 40.0}
    assert tracker.log_step(rec, metrics, 1, {"pfe.epochs_done": "1"}) == 3
    assert tracker.log_step(rec, metrics, 1) == 0  # the same (metric, step) again: skipped
    assert tracker.log_step(rec, {**metrics, "lr/stage2": 1e-4}, 2) == 4

    # a new driver (resume): the parent and child runs are found, history is read back from MLflow
    again = StudyTracker(uri, "exp", "study-a", "study.yaml")
    assert again.open_parent() == (parent, True)
    rec2 = again.get("trial", "abc")
    assert rec2 is not None and rec2.run_id == rec.run_id and rec2.epochs_done == 1
    assert again.open_run("trial", "abc", "A-s0", {"pfe.variant": "A"}).run_id == rec.run_id
    assert again.log_step(rec2, metrics, 2) == 0 and again.log_step(rec2, metrics, 3) == 3
    again.end_run(rec2, "incomplete")
    client = MlflowClient(uri)
    history = client.get_metric_history(rec.run_id, "train/stage2/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    run = client.get_run(rec.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pfe.status"] == "incomplete"
    assert run.data.params == {"model.alpha": "0.05"} and run.data.tags["mlflow.parentRunId"] == parent

    # --fresh: the study's earlier runs are soft-deleted, a new parent starts; other studies untouched
    other = StudyTracker(uri, "exp", "study-b")
    other_parent, _ = other.open_parent()
    fresh = StudyTracker(uri, "exp", "study-a")
    new_parent, resumed = fresh.open_parent(fresh=True)
    assert not resumed and new_parent != parent and fresh.get("trial", "abc") is None
    assert client.get_run(parent).info.lifecycle_stage == "deleted"
    assert client.get_run(rec.run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(other_parent).info.lifecycle_stage == "active"
    assert per_layer({"eval/F5/rank1": 1.0, "eval/F2_F3/mAP": 2.0, "rank1": 3.0}) == {
        "F5": {"rank1": 1.0},
        "F2_F3": {"mAP": 2.0},
    }


def test_paths_and_numbers_a_command_cannot_use_are_named_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["data", "synth", "--out", str(blocker / "synthreid")]) == 2  # an output folder under a file
    assert str(blocker) in capsys.readouterr().err
    not_a_db = tmp_path / "mlflow.db"
    not_a_db.write_text("notes, not a database")
    assert main(["report", "--tracking-uri", f"sqlite:///{not_a_db}", "--out", str(tmp_path / "out")]) == 2
    assert f"{not_a_db} is not an SQLite database" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["run", str(_study(tmp_path)), "--max-concurrent", "0"])
    assert stop.value.code == 2 and "1 or more" in capsys.readouterr().err
