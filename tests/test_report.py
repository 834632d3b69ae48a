"""`pfe-study report` on MLflow records with known values, and after the tests' small study."""

from __future__ import annotations

import http.server
import math
import re
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pfe.cli import main
from pfe.study.eval_command import find_mlflow_run

GPU = "NVIDIA H100 80GB HBM3"
STUDY_YAML = """\
name: toy
description: three variants x three seeds, written by hand into MLflow
variants:
  ResNet50+TSAM: {model.side: none}
  ResNet50+TSAM+MFA: {model.side: mfa}
  ResNet50+TSAM+FA: {model.side: fa}
repeats: 3
tracking: {uri: "URI"}
report:
  title: "Toy table: side branches"
  rows: variant
  values: [rank1, mAP]
  paper: toy_table
"""
REFERENCE_YAML = """\
tables:
  toy_table:
    source: "a test table"
    rows:
      ResNet50+TSAM: {rank1: 65.9, source: "Sec. X"}
      ResNet50+TSAM+MFA: {rank1: 71.2, mAP: 58.5, derived: true}
"""

# variant -> per seed: (status, rank1, mAP, wall_s, device, gpu fraction)
TRIALS = {
    "ResNet50+TSAM": [
        ("finished", 60.0, 50.0, 0.0, GPU, 0.5),
        ("finished", 62.0, 51.0, 0.0, GPU, 0.5),
        ("finished", 64.0, 55.0, 0.0, GPU, 0.5),
    ],
    "ResNet50+TSAM+MFA": [
        ("finished", 70.0, 60.0, 360.0, "cpu", 0.0),
        ("finished", 71.0, 60.0, 720.0, GPU, 0.5),
        ("finished", 75.0, 60.0, 720.0, GPU, 0.5),
    ],
    "ResNet50+TSAM+FA": [
        ("finished", 68.0, 57.0, 1800.0, "NVIDIA A100-SXM4-40GB", 1.0),
        ("finished", 69.0, 58.0, 1800.0, "NVIDIA A100-SXM4-40GB", 1.0),
        ("failed", 10.0, 5.0, 900.0, "NVIDIA A100-SXM4-40GB", 1.0),  # its partial metrics must not count
    ],
}
STAGE1_WALL = {0: 3600.0, 1: 7200.0, 2: 1800.0}  # one stage I per seed on half an H100, shared by 3 trials


def _log(client: MlflowClient, run_id: str, metrics: dict[str, list[float]], params: dict[str, str] | None = None):
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now + i, i) for k, vals in metrics.items() for i, v in enumerate(vals)]
    client.log_batch(run_id, metrics=batch, params=[Param(k, v) for k, v in (params or {}).items()])


def write_records(uri: str, study_file: Path) -> None:
    """The runner's MLflow layout (contracts: MLflow records), with known values."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toy")
    parent = client.create_run(
        exp, run_name="toy", tags={"pfe.role": "study", "pfe.study": "toy", "pfe.study_file": str(study_file)}
    )
    pid = parent.info.run_id
    stage1 = {}
    for seed, wall in STAGE1_WALL.items():
        run = client.create_run(
            exp,
            run_name=f"stage1-s{seed}",
            tags={
                "pfe.role": "stage1",
                "pfe.study": "toy",
                "pfe.stage1_key": f"key{seed}",
                "pfe.seed": str(seed),
                "pfe.status": "finished",
                "pfe.epochs_done": "3",
                "pfe.epochs_asked": "3",
                "pfe.wall_s": str(wall),
                "pfe.device_kind": GPU,
                "pfe.gpu_fraction": "0.5",
                "pfe.shared_by": "3",
                "mlflow.parentRunId": pid,
            },
        )
        _log(
            client,
            run.info.run_id,
            {
                "train/stage1/loss": [5.0, 4.0 - seed * 0.1, 3.0],
                "train/stage1/ce": [4.0, 3.0, 2.5],
                "eval/F5/rank1": [61.0 + seed],
            },
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        stage1[seed] = run.info.run_id
    for variant, seeds in TRIALS.items():
        side = {"ResNet50+TSAM": "none", "ResNet50+TSAM+MFA": "mfa", "ResNet50+TSAM+FA": "fa"}[variant]
        for seed, (status, r1, m_ap, wall, device, frac) in enumerate(seeds):
            done = 3 if status == "finished" else 1
            run = client.create_run(
                exp,
                run_name=f"{variant}-s{seed}",
                tags={
                    "pfe.role": "trial",
                    "pfe.study": "toy",
                    "pfe.variant": variant,
                    "pfe.seed": str(seed),
                    "pfe.config_hash": f"{side}{seed}",
                    "pfe.stage1_key": f"key{seed}",
                    "pfe.stage1_run_id": stage1[seed],
                    "pfe.status": status,
                    "pfe.epochs_done": str(done),
                    "pfe.epochs_asked": "3",
                    "pfe.wall_s": str(wall),
                    "pfe.device_kind": device,
                    "pfe.gpu_fraction": str(frac),
                    "pfe.host": "test",
                    "pfe.storage_path": "/tmp/x",
                    "mlflow.parentRunId": pid,
                },
            )
            metrics = {"rank1": [r1], "mAP": [m_ap], "eval/F2_F3_F4_F5/rank1": [r1]}
            if side != "none":
                metrics["train/stage2/loss"] = [2.0, 1.5, 1.0][:done]
            _log(client, run.info.run_id, metrics, params={"model.side": side, "runtime.seed": str(seed)})
            client.set_terminated(run.info.run_id, "FINISHED" if status == "finished" else "FAILED")
    client.set_terminated(pid, "FINISHED")


def hours(wall_s: float, frac: float = 1.0) -> float:
    return wall_s * frac / 3600.0


@pytest.fixture()
def toy_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    monkeypatch.chdir(tmp_path)  # reports/paper_reference.yaml of this folder is the reference
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "paper_reference.yaml").write_text(REFERENCE_YAML)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tmp_path / "toy.yaml"
    study.write_text(STUDY_YAML.replace("URI", uri))
    write_records(uri, study)
    return uri, study


def test_report_cells_match_hand_computed_values(toy_store: tuple[str, Path], tmp_path: Path) -> None:
    uri, study = toy_store
    out = tmp_path / "out"
    assert main(["report", str(study), "--out", str(out)]) == 0
    table = pd.read_csv(out / "toy" / "table.csv", index_col="row")
    assert list(table.index) == ["ResNet50+TSAM", "ResNet50+TSAM+MFA", "ResNet50+TSAM+FA", "total"]

    a, mfa, fa, total = (table.loc[k] for k in table.index)
    # mean, sample std (ddof 1) and n over the finished seeds
    assert a["rank1_mean"] == pytest.approx(62.0) and a["rank1_std"] == pytest.approx(2.0) and a["rank1_n"] == 3
    assert a["mAP_mean"] == pytest.approx(52.0) and a["mAP_std"] == pytest.approx(math.sqrt(7.0))
    assert mfa["rank1_mean"] == pytest.approx(72.0) and mfa["rank1_std"] == pytest.approx(math.sqrt(7.0))
    assert mfa["mAP_std"] == pytest.approx(0.0)
    # the failed seed's partial metrics (rank1 10) are not averaged in; it is counted as failed
    assert fa["rank1_mean"] == pytest.approx(68.5) and fa["rank1_std"] == pytest.approx(math.sqrt(0.5))
    assert fa["rank1_n"] == 2 and fa["failed"] == 1 and fa["finished"] == 2
    assert fa["status"] == "2 of 3 finished, 1 failed"
    assert a["status"] == "3 of 3 finished" and total["status"] == "8 of 9 finished, 1 failed"
    # the paper's number and the difference where the reference has one
    assert a["rank1_paper"] == pytest.approx(65.9) and a["rank1_diff"] == pytest.approx(-3.9)
    assert mfa["rank1_diff"] == pytest.approx(0.8) and mfa["mAP_diff"] == pytest.approx(1.5)
    assert math.isnan(fa["rank1_paper"]) and math.isnan(a["mAP_paper"])
    # cost: own wall time + stage-I wall / shared_by, GPU-hours x fraction, CPU-hours on a CPU
    stage1_share = sum(hours(w / 3, 0.5) for w in STAGE1_WALL.values())  # per row: one share per seed
    assert a["gpu_h"] == pytest.approx(stage1_share) and a["cpu_h"] == pytest.approx(0.0)
    assert mfa["gpu_h"] == pytest.approx(stage1_share + 2 * hours(720, 0.5))
    assert mfa["cpu_h"] == pytest.approx(hours(360))
    assert fa["gpu_h"] == pytest.approx(stage1_share + hours(1800) * 2 + hours(900))  # the failed trial's time counts
    assert total["gpu_h"] == pytest.approx(sum(hours(w, 0.5) for w in STAGE1_WALL.values()) + 0.2 + 1.25)
    assert total["gpu_h"] == pytest.approx(a["gpu_h"] + mfa["gpu_h"] + fa["gpu_h"])
    assert total["cpu_h"] == pytest.approx(0.1)

    md = (out / "toy" / "table.md").read_text()
    assert "62.00 ± 2.00" in md and "72.00 ± 2.65" in md and "68.50 ± 0.71" in md
    assert "2 of 3 finished, 1 failed" in md and "-3.90" in md and "71.2*" in md
    assert f"{stage1_share:.3g} GPU-h" in md and "0.783 GPU-h + 0.1 CPU-h" in md and "3.2 GPU-h + 0.1 CPU-h" in md
    page = (out / "toy" / "index.md").read_text()
    assert "**failed**, 1 of 3 epochs" in page  # the failed trial is listed, not dropped
    tex = (out / "toy" / "table.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"62.00 $\pm$ 2.00" in tex and r"ResNet50+TSAM+FA" in tex
    assert (out / "toy" / "curves_stage1.png").stat().st_size > 5000
    assert (out / "toy" / "curves_stage2.png").stat().st_size > 5000
    index = (out / "index.md").read_text()
    assert "toy/index.md" in index and "toy/table.csv" in index
    assert (out / "index.html").is_file()

    # no STUDY argument: every study in the store, the layout read from the pfe.study_file tag
    out2 = tmp_path / "out2"
    assert main(["report", "--tracking-uri", uri, "--out", str(out2), "--format", "csv"]) == 0
    again = pd.read_csv(out2 / "toy" / "table.csv", index_col="row")
    pd.testing.assert_frame_equal(again, table)
    assert not (out2 / "toy" / "table.md").exists()


def test_report_refuses_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'nothing.db'}"
    assert main(["report", "--tracking-uri", missing, "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "nothing.db").exists()
    assert main(["report", "--tracking-uri", missing, "--format", "pdf"]) == 2


def test_report_names_a_tracking_server_that_is_down_or_not_mlflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback, the credentials masked: a closed port, then an HTTP server that is not MLflow's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main(["report", "--tracking-uri", f"http://bob:hunter2@127.0.0.1:{closed}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"tracking server http://bob:***@127.0.0.1:{closed} is unreachable" in err and "hunter2" not in err
    assert "Traceback" not in err

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://bob:hunter2@127.0.0.1:{server.server_address[1]}"
        assert main(["report", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert "reading the MLflow records of http://bob:***@127.0.0.1:" in err and "an MLflow tracking server" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_report_after_the_tiny_study(tiny_study_run, tmp_path: Path) -> None:
    """After the tests' small study (tests/conftest.py: killed once, resumed), md, csv, tex and plots are written."""
    out = tmp_path / "reports"
    args = ["report", str(tiny_study_run.study), "--out", str(out), "--tracking-uri", tiny_study_run.tracking_uri]
    assert main(args) == 0
    folder = out / "tiny"
    for name in ("table.md", "table.csv", "table.tex", "index.md", "curves_stage1.png", "curves_stage2.png"):
        assert (folder / name).is_file(), name
    table = pd.read_csv(folder / "table.csv")
    assert list(table["row"]) == ["TSAM", "TSAM+side", "TSAM+MFA", "total"]  # the study file's variant order
    assert list(table["status"]) == ["1 of 1 finished"] * 3 + ["3 of 3 finished"]
    assert (table["cpu_h"] > 0).all() and (table["gpu_h"] == 0).all()  # CPU trials; TSAM costs its stage-I share
    assert table["cpu_h"].iloc[-1] == pytest.approx(table["cpu_h"].iloc[:-1].sum())
    assert table["rank1_n"].iloc[:-1].tolist() == [1, 1, 1] and table["rank1_mean"].iloc[:-1].between(0, 100).all()
    assert r"\toprule" in (folder / "table.tex").read_text()
    assert "| TSAM+MFA" in (folder / "table.md").read_text()
    assert (out / "index.md").is_file() and (out / "index.html").is_file()

    # the pictures of a stage-II trial: in its final checkpoint, logged to its run, linked from the page
    client = MlflowClient(tiny_study_run.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`pfe.role` = 'trial' and tags.`pfe.variant` = 'TSAM+MFA'")
    run = max(runs, key=lambda r: r.info.start_time)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert {"pictures/activation_maps.png", "pictures/retrieval.png"} <= logged
    page = (folder / "index.md").read_text()
    links = re.findall(r"^- TSAM\+MFA \(seed \d+\): (.*)$", page, flags=re.M)
    assert len(links) == 1, page
    targets = dict(re.findall(r"\[([\w.]+)\]\(([^)]+)\)", links[0]))
    assert set(targets) == {"activation_maps.png", "retrieval.png"}
    assert all((folder / t).is_file() and (folder / t).stat().st_size > 1000 for t in targets.values())
    assert "- TSAM (seed" not in page  # side=none: no stage II, no pictures
    # `pfe-study eval <final checkpoint folder> --log-mlflow` finds the trial's run
    checkpoint = Path(run.data.tags["pfe.checkpoint"])
    assert (checkpoint / "pictures" / "retrieval.png").is_file()
    found, _ = find_mlflow_run(checkpoint)
    assert found == {"tracking_uri": tiny_study_run.tracking_uri, "run_id": run.info.run_id}


GRID_YAML = """\
name: grid
base: {overrides: {stage2.w_ro: 0.0}}
axes:
  stage2.loss: [independent, uniform, cascade]
  model.side: [side, mfa]
repeats: 2
tracking: {uri: "URI"}
report:
  title: "Grid: loss x side"
  rows: stage2.loss
  columns: [model.side]
  values: [rank1, mAP]
  paper: grid_table
"""
ALPHA_YAML = """\
name: alpha
axes:
  model.alpha: [0.0, 0.05, 0.1]
repeats: 2
tracking: {uri: "URI"}
report: {title: "Fig. 7 (a) toy: alpha", rows: model.alpha, values: [rank1, mAP], paper: fig_alpha, plot: line}
"""
LAYERS_YAML = """\
name: layers
variants:
  PFE (ResNet50): {}
repeats: 2
tracking: {uri: "URI"}
report:
  title: "Fig. 8 toy: layers"
  rows: variant
  values: [eval/F2/rank1, eval/F5/rank1, eval/F2_F3_F4_F5/rank1]
  plot: layers
"""
GRID_REFERENCE = """\
tables:
  grid_table:
    rows:
      cascade / mfa: {rank1: 71.2}
      cascade: {rank1: 99.0}   # a plain row label never matches a cell of a pivoted table
    deltas:
      - {plus: uniform / mfa, minus: uniform / side, rank1: 5.6, source: "Sec. V-C.3"}
  fig_alpha:
    chosen: 0.05
"""
SETS = ("F2", "F3", "F4", "F5", "F4_F5", "F3_F4_F5", "F2_F3_F4_F5")


def record_trials(uri: str, name: str, study_file: Path, trials: list[dict]) -> None:
    """A parent run, one CPU stage I per seed shared by all of the study's trials, and ``trials``."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(name)
    pid = client.create_run(exp, tags={"pfe.role": "study", "pfe.study": name, "pfe.study_file": str(study_file)})
    pid = pid.info.run_id
    seeds = sorted({t["seed"] for t in trials})
    stage1 = {}
    for seed in seeds:
        tags = {
            "pfe.role": "stage1",
            "pfe.study": name,
            "pfe.seed": str(seed),
            "pfe.stage1_key": f"k{seed}",
            "pfe.status": "finished",
            "pfe.wall_s": "720",
            "pfe.device_kind": "cpu",
            "pfe.gpu_fraction": "0",
            "pfe.shared_by": str(sum(t["seed"] == seed for t in trials)),
            "mlflow.parentRunId": pid,
        }
        stage1[seed] = client.create_run(exp, tags=tags).info.run_id
        _log(client, stage1[seed], {"train/stage1/loss": [3.0, 2.0, 1.5]})
    for t in trials:
        tags = {
            "pfe.role": "trial",
            "pfe.study": name,
            "pfe.variant": t.get("variant", ""),
            "pfe.seed": str(t["seed"]),
            "pfe.config_hash": f"{t['params']}{t['seed']}",
            "pfe.stage1_run_id": stage1[t["seed"]],
            "pfe.status": "finished",
            "pfe.epochs_done": str(t.get("epochs_done", 2)),  # tagged finished, fewer epochs: incomplete
            "pfe.epochs_asked": "2",
            "pfe.wall_s": "360",
            "pfe.device_kind": "cpu",
            "pfe.gpu_fraction": "0",
            "pfe.pictures": "retrieval.png",  # the page links it whether or not the artifact is there
            "mlflow.parentRunId": pid,
        }
        run_id = client.create_run(exp, tags=tags).info.run_id
        _log(
            client,
            run_id,
            {k: [v] for k, v in t["metrics"].items()} | {"train/stage2/loss": [2.0, 1.0]},
            params=t["params"],
        )
        client.set_terminated(run_id)


def test_report_pivot_order_deltas_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "paper_reference.yaml").write_text(GRID_REFERENCE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = {}
    for name, text in (("grid", GRID_YAML), ("alpha", ALPHA_YAML), ("layers", LAYERS_YAML)):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(text.replace("URI", uri))
    base = {"independent": 60.0, "uniform": 61.0, "cascade": 62.0}
    grid = [
        {
            "seed": s,
            "params": {"stage2.loss": loss, "model.side": side},
            "metrics": {"rank1": base[loss] + (5.0 if side == "mfa" else 0.0) + s, "mAP": base[loss] - 10 + s},
            "epochs_done": 1 if (loss, side, s) == ("uniform", "side", 1) else 2,
        }
        for loss in ("cascade", "uniform", "independent")
        for side in ("mfa", "side")
        for s in (0, 1)
        if not (loss == "cascade" and side == "side") and not (loss == "independent" and side == "mfa" and s == 1)
    ]
    record_trials(uri, "grid", files["grid"], grid)
    alpha = [
        {
            "seed": s,
            "params": {"model.alpha": str(a)},
            "metrics": {"rank1": 70 - 20 * abs(a - 0.05) + s, "mAP": 55 + 10 * a + s},
        }
        for a in (0.1, 0.0, 0.05)
        for s in (0, 1)
    ]
    record_trials(uri, "alpha", files["alpha"], alpha)
    layers = [
        {
            "seed": s,
            "variant": "PFE (ResNet50)",
            "params": {"model.side": "mfa"},
            "metrics": {
                f"eval/{k}/{m}": 40.0 + 5 * i + s + (0 if m == "rank1" else -15)
                for i, k in enumerate(SETS)
                for m in ("rank1", "mAP")
            },
        }
        for s in (0, 1)
    ]
    record_trials(uri, "layers", files["layers"], layers)

    out = tmp_path / "out"
    assert main(["report", *(str(f) for f in files.values()), "--out", str(out)]) == 0
    table = pd.read_csv(out / "grid" / "table.csv", keep_default_na=False)
    # the study file's axis order, not the order of the records nor alphabetical
    cells = list(zip(table["row"], table["model.side"]))
    assert cells == [
        ("independent", "side"),
        ("independent", "mfa"),
        ("uniform", "side"),
        ("uniform", "mfa"),
        ("cascade", "side"),
        ("cascade", "mfa"),
        ("total", ""),
    ]
    by = {c: r for c, (_, r) in zip(cells, table.iterrows())}
    assert by[("independent", "mfa")]["status"] == "1 of 2 finished, 1 not started"
    assert by[("cascade", "side")]["status"] == "0 of 2 finished, 2 not started"
    assert by[("uniform", "side")]["status"] == "1 of 2 finished, 1 incomplete"
    assert by[("uniform", "side")]["rank1_mean"] == "61.0" and int(by[("uniform", "side")]["rank1_n"]) == 1
    assert by[("uniform", "mfa")]["rank1_mean"] == "66.5" and by[("cascade", "mfa")]["rank1_paper"] == "71.2"
    assert by[("cascade", "side")]["rank1_paper"] == "" and by[("total", "")]["status"] == (
        "8 of 12 finished, 1 incomplete, 3 not started"
    )
    # each trial: 360 s of its own + its share of its seed's 720 s CPU stage I (5 + 4 trials share them)
    assert float(by[("total", "")]["cpu_h"]) == pytest.approx((2 * 720 + 9 * 360) / 3600)
    md = (out / "grid" / "table.md").read_text()
    assert md.index("| independent") < md.index("| uniform") < md.index("| cascade")
    assert "mfa: rank-1" in md and "mfa: paper rank-1" in md and "side: paper rank-1" not in md
    page = (out / "grid" / "index.md").read_text()
    assert "uniform / mfa - uniform / side" in page and "+5.6" in page and "+5.50" in page
    # each trial's pictures are labelled with its whole cell (row / column) and seed
    assert "- uniform / mfa (seed 0): [retrieval.png]" in page and "- uniform / side (seed 1): [retrieval.png]" in page
    assert "**incomplete**, 1 of 2 epochs" in page

    alpha_table = pd.read_csv(out / "alpha" / "table.csv")
    assert list(alpha_table["row"]) == ["0.0", "0.05", "0.1", "total"]
    assert alpha_table["rank1_mean"].iloc[1] == pytest.approx(70.5)
    assert (out / "alpha" / "fig7_line.png").stat().st_size > 10000
    assert (out / "layers" / "fig8_layers.png").stat().st_size > 10000
    layers_md = (out / "layers" / "table.md").read_text()
    assert "F2 rank-1" in layers_md and "40.50 ± 0.71" in layers_md
    index = (out / "index.md").read_text()
    assert all(f"{n}/index.md" in index for n in ("grid", "alpha", "layers"))


def test_paper_reference_rows_match_the_study_files() -> None:
    """Every row and stated difference of reports/paper_reference.yaml names a cell its study file produces."""
    from pfe.study.report.records import StudyRecords, layout_from_spec
    from pfe.study.report.tables import expected_counts, load_reference, norm_label
    from pfe.study.spec import load_study

    root = Path(__file__).resolve().parents[1]
    reference = load_reference(root / "reports" / "paper_reference.yaml")
    assert {"table1", "table2", "table3", "table4", "table5", "table6", "fig7a", "fig7b", "fig8"} <= set(reference)
    checked = 0
    for path in sorted((root / "studies").glob("*.yaml")):
        spec = load_study(path)
        table = spec.report.paper
        if not table:
            continue
        assert table in reference, f"{path.name}: report.paper {table!r} is not in paper_reference.yaml"
        records = StudyRecords(spec.name, "", "", layout_from_spec(spec.report, spec.name), None, [], {}, spec=spec)
        labels = {" / ".join(key) for key in expected_counts(records)}
        entry = reference[table]
        for label in entry.get("rows") or {}:
            assert norm_label(label) in labels, f"{table}: row {label!r} is no cell of {path.name} ({sorted(labels)})"
            checked += 1
        for delta in entry.get("deltas") or []:
            assert {norm_label(delta["plus"]), norm_label(delta["minus"])} <= labels, f"{table}: {delta}"
        for row in (entry.get("rows") or {}).values():
            assert row.get("source"), f"{table}: every number needs its source"
    assert checked >= 15


BLOCKED_YAML = """\
name: blocked
variants:
  ResNet50+TSAM+MFA: {model.side: mfa}
  ResNet50+TSAM+FA: {model.side: fa}
repeats: 2
tracking: {uri: "URI"}
report: {title: "Blocked by a stage I", rows: variant, values: [rank1]}
"""


def test_report_names_the_failed_stage_i_of_trials_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 1's stage I failed, so the runner never started its stage-II trials: the report says so."""
    from pfe.study.spec import load_study

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = tmp_path / "blocked.yaml"
    study.write_text(BLOCKED_YAML.replace("URI", uri))
    trials = load_study(study).expand()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("blocked")
    tags = {"pfe.study": "blocked", "pfe.study_file": str(study)}
    pid = client.create_run(exp, run_name="blocked", tags={**tags, "pfe.role": "study"}).info.run_id
    stage1 = {}
    for seed, status in ((0, "finished"), (1, "failed")):
        key = next(t.stage1_key for t in trials if t.seed == seed)
        s1_tags = {
            **tags,
            "pfe.role": "stage1",
            "pfe.stage1_key": key,
            "pfe.seed": str(seed),
            "pfe.status": status,
            "pfe.wall_s": "3600",
            "pfe.device_kind": "cpu",
            "pfe.shared_by": "2",
            "mlflow.parentRunId": pid,
        }
        if status == "failed":  # as TrackingCallback.on_trial_error records it
            s1_tags["pfe.error"] = "RuntimeError: CUDA out of memory"
        stage1[seed] = client.create_run(exp, run_name=f"stage1-s{seed}", tags=s1_tags).info.run_id
        client.set_terminated(stage1[seed], "FINISHED" if status == "finished" else "FAILED")
    for t in trials:
        if t.seed != 0:
            continue
        run_id = client.create_run(
            exp,
            run_name=f"{t.variant}-s0",
            tags={
                **tags,
                "pfe.role": "trial",
                "pfe.variant": t.variant,
                "pfe.seed": "0",
                "pfe.trial_id": t.trial_id,
                "pfe.config_hash": t.trial_id,
                "pfe.stage1_key": t.stage1_key,
                "pfe.stage1_run_id": stage1[0],
                "pfe.status": "finished",
                "pfe.wall_s": "360",
                "pfe.device_kind": "cpu",
                "mlflow.parentRunId": pid,
            },
        ).info.run_id
        _log(client, run_id, {"rank1": [70.0]})
        client.set_terminated(run_id)

    out = tmp_path / "out"
    assert main(["report", str(study), "--out", str(out)]) == 0
    table = pd.read_csv(out / "blocked" / "table.csv", index_col="row")
    assert table.loc["ResNet50+TSAM+MFA", "status"] == "1 of 2 finished, 1 not started (stage I failed)"
    assert table.loc["total", "status"] == "2 of 4 finished, 2 not started (stage I failed)"
    assert "1 not started (stage I failed)" in (out / "blocked" / "table.md").read_text()
    page = (out / "blocked" / "index.md").read_text()
    assert (
        f"- 2 not started (ResNet50+TSAM+MFA seed 1, ResNet50+TSAM+FA seed 1): their stage I "
        f"(run `{stage1[1]}`, stage1-s1) failed: RuntimeError: CUDA out of memory"
    ) in page
    assert stage1[0] not in page.split("## Trials not finished")[1]  # the finished stage I is not blamed

    from pfe.study.report.tables import status_text

    assert status_text({"finished": 1}, 4, 2, "failed/incomplete") == (
        "1 of 4 finished, 3 not started (2: stage I failed/incomplete)"
    )


def test_layout_is_the_study_files_report_section() -> None:
    """records.layout_from_spec gives spec.ReportLayout (its fields and defaults), titled with the study's name
    when untitled; a mapping an older run stored is read leniently."""
    from pfe.study.report.records import layout_from_spec
    from pfe.study.spec import ReportLayout

    assert layout_from_spec(None, "toy") == ReportLayout(title="toy")
    spec_layout = ReportLayout(rows="model.alpha", values=["mAP"], plot="line")
    assert layout_from_spec(spec_layout, "alpha") == spec_layout.model_copy(update={"title": "alpha"})
    assert layout_from_spec(ReportLayout(title="Fig. 7"), "alpha").title == "Fig. 7"
    old = {"title": "", "rows": "stage2.loss", "columns": "model.side", "values": [], "plot": "bars", "legend": 1}
    assert layout_from_spec(old, "grid") == ReportLayout(title="grid", rows="stage2.loss", columns=["model.side"])
