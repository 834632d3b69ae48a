"""`pfe-study ui`: a lean MLflow server on a study's store, found through its REST API, stopped cleanly."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pfe.cli import main
from pfe.study.mlflow_server import free_port, is_loopback, process_tree

STUDY = """\
name: ui-toy
variants:
  ResNet50+TSAM: {model.side: none}
  ResNet50+TSAM+MFA: {model.side: mfa}
tracking: {uri: "URI"}
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    """The first stdout line containing ``needle`` (fails on timeout or exit)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} from pfe-study ui within {timeout} s; got: {''.join(seen)}")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_ui_serves_the_study_runs_and_stops_cleanly(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tmp_path / "ui-toy.yaml"
    study.write_text(STUDY.replace("URI", uri))
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ui-toy")
    parent = client.create_run(exp, tags={"pfe.role": "study", "pfe.study": "ui-toy", "pfe.study_file": str(study)})
    for variant in ("ResNet50+TSAM", "ResNet50+TSAM+MFA"):
        run = client.create_run(
            exp,
            tags={
                "pfe.role": "trial",
                "pfe.study": "ui-toy",
                "pfe.variant": variant,
                "pfe.seed": "0",
                "mlflow.parentRunId": parent.info.run_id,
            },
        )
        client.log_metric(run.info.run_id, "rank1", 50.0)
        client.set_terminated(run.info.run_id)

    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfe.cli", "ui", str(study), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = _read_line(proc, "MLflow UI for", timeout=120)
        started = time.monotonic() - t0
        assert f"http://127.0.0.1:{port}/#/experiments/{exp}" in line
        tree = process_tree(proc.pid)
        server_procs = len(tree) - 1  # the mlflow server and its worker(s), without pfe-study itself
        assert 1 <= server_procs <= 2, f"expected a lean server (2 processes), found {server_procs}"
        # the study's runs, through the server's REST API
        base = f"http://127.0.0.1:{port}"
        found = _post(
            f"{base}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp], "filter": "tags.`pfe.role` = 'trial'", "max_results": 10},
        )
        variants = sorted(t["value"] for r in found["runs"] for t in r["data"]["tags"] if t["key"] == "pfe.variant")
        assert variants == ["ResNet50+TSAM", "ResNet50+TSAM+MFA"]
        print(f"ui up in {started:.1f} s with {server_procs} server processes")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping the MLflow UI" in out
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in tree[1:]), "the mlflow server outlived pfe-study ui"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()


def test_ui_warns_on_a_non_loopback_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("127.0.0.9") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["ui", "--tracking-uri", missing, "--host", "0.0.0.0", "--port", "5999"]) == 2
    err = capsys.readouterr().err
    assert "MLflow has no authentication by default" in err and "no MLflow store" in err
    assert not (tmp_path / "none.db").exists()
    assert os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") is None  # the lean setting stays in the child
