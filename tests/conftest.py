"""Shared fixtures.

``tiny_study_run``: tests/data/tiny_study.yaml really run once per session with `pfe-study run`
(local Ray, MLflow in a SQLite file, real ResNet18 training on a tiny generated synthreid), the way
a user's study gets interrupted: the driver is SIGKILLed once the first trial has finished and the
next one has reported an epoch, then the same command is run again and completes the study.
The report tests read the resulting store; tests/test_study_resume.py checks the resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TINY_STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
RUN_TIMEOUT_S = 420


@dataclass
class StudyRun:
    """A finished run of the tiny study; also readable as a dict (``run["tracking_uri"]``)."""

    study: Path  # the study file (absolute paths inside, so it loads from any working directory)
    tracking_uri: str
    storage: Path
    data_root: Path
    cwd: Path
    logs: list[str] = field(default_factory=list)  # stdout+stderr of each `pfe-study run`
    killed: bool = False  # the first run was SIGKILLed mid-study
    before_kill: dict[str, Any] = field(default_factory=dict)  # MLflow state right after the kill
    wall_s: list[float] = field(default_factory=list)

    @property
    def study_file(self) -> Path:
        return self.study

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def run_cli(
    args: list[str], cwd: Path, timeout: float = RUN_TIMEOUT_S, **env: str
) -> subprocess.CompletedProcess[str]:
    """`pfe-study ARGS` in a subprocess (its own local Ray), without the caller's cluster/tracking
    settings; ``env``: extra environment variables (e.g. PFE_SIMULATE_EPOCH_S)."""
    return subprocess.run(
        [sys.executable, "-m", "pfe.cli", *args],
        cwd=cwd,
        env={**_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PFE_STORAGE", "PFE_DATA"):
        env.pop(name, None)
    return env


def _run_and_kill(args: list[str], cwd: Path) -> tuple[str, bool]:
    """Run until the first trial is done and the next has reported an epoch, then SIGKILL the driver."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfe.cli", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the driver's local Ray lives in this process group: cleaned up below
    )
    lines: list[str] = []
    killed, first_done = False, False
    deadline = time.monotonic() + RUN_TIMEOUT_S
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if " done   [trial " in line:
                first_done = True
            elif first_done and " epoch  [trial " in line:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            if time.monotonic() > deadline:
                break
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of that Ray (agents); our own process group
        if proc.poll() is None:
            proc.kill()
    return "".join(lines), killed


def _snapshot(uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {
        r.info.run_id: {
            "tags": dict(r.data.tags),
            "status": r.info.status,
            "end_time": r.info.end_time,
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    }


@pytest.fixture(scope="session")
def tiny_study_run(tmp_path_factory: pytest.TempPathFactory) -> StudyRun:
    """The tiny study, run (killed and resumed) once per test session. See the module docstring."""
    cwd = tmp_path_factory.mktemp("tiny_study")
    text = TINY_STUDY.read_text()
    replacements = {
        "uri: sqlite:///mlflow.db": f"uri: sqlite:///{cwd / 'mlflow.db'}",
        "storage: ray_results": f"storage: {cwd / 'ray_results'}",
        "data.root: synthreid-tiny": f"data.root: {cwd / 'synthreid-tiny'}",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    study = cwd / "tiny_study.yaml"
    study.write_text(text)
    run = StudyRun(study, f"sqlite:///{cwd / 'mlflow.db'}", cwd / "ray_results", cwd / "synthreid-tiny", cwd)

    t0 = time.perf_counter()
    log, run.killed = _run_and_kill(["run", str(study), "--max-concurrent", "1"], cwd)
    run.wall_s.append(time.perf_counter() - t0)
    run.logs.append(log)
    if run.killed:
        run.before_kill = _snapshot(run.tracking_uri)
    t0 = time.perf_counter()
    proc = run_cli(["run", str(study)], cwd)
    run.wall_s.append(time.perf_counter() - t0)
    run.logs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, "\n".join(run.logs)[-6000:]
    return run
