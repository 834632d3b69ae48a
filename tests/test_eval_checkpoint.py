"""`pfe-study eval`: a tiny model trained once on synthreid, evaluated on another synthreid and on
real Market-1501 crops; features read back from the export; pictures written as PNG."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from pfe.cli import main
from pfe.config import load_config
from pfe.data.datasets import load_dataset
from pfe.data.synth import generate_synthreid
from pfe.engine.eval_checkpoint import evaluate_checkpoint, export_features, load_features, resolve_checkpoint
from pfe.engine.trainer import train
from pfe.study.eval_command import MLFLOW_RUN_FILE

REAL_MARKET = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reid-real" / "market1501"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a resnet18 PFE (mfa, cascade) trained 1 + 1 epochs on a tiny synthreid at 64x32."""
    base = tmp_path_factory.mktemp("inspect")
    data = base / "synth_a"
    generate_synthreid(data, ids_train=4, ids_test=3, images_per_id=4, cameras=2, seed=0)
    cfg = load_config(
        None,
        [
            "data.dataset=synthreid",
            f"data.root={data}",
            "data.height=64",
            "data.width=32",
            "data.ids_per_batch=4",
            "data.images_per_id=2",
            "data.workers=0",
            "model.backbone=resnet18",
            "model.pretrained=none",
            "model.channels=16",
            "model.side_dim=32",
            "stage1.epochs=1",
            "stage2.epochs=1",
            "eval.batch_size=64",
            "runtime.device=cpu",
            "runtime.progress=false",
        ],
    )
    run = base / "run"
    train(cfg, run)
    assert (run / "stage2" / "final.pt").is_file()
    return run


@pytest.fixture(scope="module")
def synth_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_b") / "data"
    generate_synthreid(out, ids_train=2, ids_test=4, images_per_id=4, cameras=3, seed=7)
    return out


@pytest.fixture(scope="module")
def real_market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Market-1501 tree from the real crops: the pid-51 pair (cameras 3 and 4) gives the one
    valid query; a few other crops are queries without a match; the rest is the gallery."""
    files = sorted(REAL_MARKET.glob("*.jpg"))
    if not files:  # a checkout without ../shared beside it (as test_datasets' real-crop tests)
        pytest.skip(f"needs the real crops in {REAL_MARKET}")
    root = tmp_path_factory.mktemp("market") / "Market-1501-v15.09.15"
    queries = {"0051_c3s1_005551_00.jpg", "0010_c6s4_002427_02.jpg", "0227_c2s1_046426_00.jpg"}
    for name in ("bounding_box_train", "query", "bounding_box_test"):
        (root / name).mkdir(parents=True)
    for i, f in enumerate(files):
        if f.name in queries:
            shutil.copy(f, root / "query" / f.name)
        else:
            shutil.copy(f, root / "bounding_box_test" / f.name)
            if i % 4 == 0 and not f.name.startswith("0000"):
                shutil.copy(f, root / "bounding_box_train" / f.name)
    return root.parent


def test_eval_cli_cross_synthreid_with_export_rerank_pictures(
    trained: Path, synth_b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "feats.npz"
    pictures = tmp_path / "pictures"
    code = main(
        [
            "eval",
            str(trained),
            "--dataset",
            "synthreid",
            "--root",
            str(synth_b),
            "--export",
            str(export),
            "--rerank",
            "--pictures",
            str(pictures),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "F2_F3_F4_F5" in out and "rr rank1" in out and "mINP" in out
    assert str(synth_b) in out  # evaluated on the dataset given, not the one it was trained on

    feats = load_features(export)
    manifest = json.loads((synth_b / "manifest.json").read_text())
    assert manifest["seed"] == 7
    nq, ng = len(feats["query_pids"]), len(feats["gallery_pids"])
    assert nq == len(list((synth_b / "query").glob("*.jpg"))) and ng == len(
        list((synth_b / "bounding_box_test").glob("*.jpg"))
    )
    assert set(feats["query"]) == set(feats["gallery"]) == {"F2", "F3", "F4", "F5"}
    assert feats["query"]["F5"].shape == (nq, 512) and feats["gallery"]["F2"].shape == (ng, 32)
    data = load_dataset("synthreid", str(synth_b))
    np.testing.assert_array_equal(feats["query_pids"], [q.pid for q in data.query])
    np.testing.assert_array_equal(feats["query_camids"], [q.camid for q in data.query])
    np.testing.assert_array_equal(feats["gallery_pids"], [g.pid for g in data.gallery])
    np.testing.assert_array_equal(feats["gallery_camids"], [g.camid for g in data.gallery])
    assert feats["gallery_paths"].tolist() == [g.path for g in data.gallery]
    assert feats["meta"]["dataset"] == "synthreid" and (feats["meta"]["height"], feats["meta"]["width"]) == (64, 32)

    for name in ("activation_maps.png", "retrieval.png"):
        data = (pictures / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.mark.filterwarnings("ignore:market1501 at .* differs from the published sizes")
def test_eval_checkpoint_file_on_real_market_crops(trained: Path, real_market: Path, tmp_path: Path) -> None:
    report = evaluate_checkpoint(
        trained / "stage2" / "final.pt", "market1501", root=str(real_market), rerank=True, workers=0
    )
    assert report.dataset.name == "market1501"
    assert report.q_pids.tolist() == [10, 51, 227]
    assert report.query["F5"].shape == (3, 512) and report.gallery["F3"].shape[0] == 33
    for s in report.sets:
        for kind in ("eval", "rerank"):
            value = report.metrics[f"{kind}/{s}/rank10"]
            assert 0.0 <= value <= 100.0
    # one valid query (pid 51, cameras 3 and 4); the gallery holds 33 images, so rank-10 may miss it
    path = export_features(report, tmp_path / "real.npz")
    back = load_features(path)
    np.testing.assert_array_equal(back["query_pids"], [10, 51, 227])
    np.testing.assert_array_equal(back["gallery_pids"], report.g_pids)
    np.testing.assert_array_equal(back["gallery_camids"], report.g_camids)
    np.testing.assert_allclose(back["gallery"]["F4"], report.gallery["F4"].numpy())


def test_tune_checkpoint_folder_and_missing_mlflow_run(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tune_ckpt = tmp_path / "checkpoint_000003"
    (tune_ckpt / "stage2").mkdir(parents=True)
    shutil.copy(trained / "stage2" / "final.pt", tune_ckpt / "stage2" / "epoch_0001.pt")
    (tune_ckpt / "pfe_checkpoint.json").write_text('{"stage": 2, "epoch": 1}')
    assert resolve_checkpoint(tune_ckpt) == tune_ckpt / "stage2" / "epoch_0001.pt"
    assert resolve_checkpoint(trained) == trained / "stage2" / "final.pt"

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert not (trained / MLFLOW_RUN_FILE).exists()
    code = main(["eval", str(tune_ckpt), "--dataset", "synthreid", "--log-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and MLFLOW_RUN_FILE in err and "no known MLflow run" in err

    code = main(["eval", str(tmp_path / "nothing"), "--dataset", "synthreid"])
    assert code == 2 and "no such checkpoint" in capsys.readouterr().err


def test_log_mlflow_to_the_models_run(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("inspect"))
    client.set_terminated(run.info.run_id)
    folder = tmp_path / "trial"
    shutil.copytree(trained, folder)
    (folder / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}))
    assert main(["eval", str(folder), "--dataset", "synthreid", "--sets", "F5", "F4_F5", "--log-mlflow"]) == 0
    capsys.readouterr()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert {"eval_on/synthreid/F5/rank1", "eval_on/synthreid/F4_F5/mAP"} <= set(metrics)
    assert not any(k.startswith("eval/") for k in metrics)  # the training-time keys are left alone
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "eval_on/synthreid")]
    assert "eval_on/synthreid/metrics.json" in arts


def test_eval_checks_its_outputs_and_mlflow_run_before_the_work(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What would stop `eval` at the end stops it at the start: no evaluation is thrown away."""
    folder = tmp_path / "trial"
    shutil.copytree(trained, folder)
    args = ["eval", str(folder), "--dataset", "synthreid"]
    assert main([*args, "--export", str(tmp_path)]) == 2
    assert "is a folder; name the .npz file" in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    assert main([*args, "--pictures", str(tmp_path / "taken")]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err
    missing_db = tmp_path / "gone" / "mlflow.db"
    (folder / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": f"sqlite:///{missing_db}", "run_id": "abc"}))
    assert main([*args, "--log-mlflow"]) == 2
    assert f"tracking store {missing_db} does not exist" in capsys.readouterr().err and not missing_db.exists()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    (folder / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": f"http://127.0.0.1:{port}", "run_id": "abc"}))
    assert main([*args, "--log-mlflow"]) == 2
    err = capsys.readouterr()
    assert "unreachable" in err.err and "rank1" not in err.out  # stopped before evaluating
    stage1 = str(folder / "stage1" / "final.pt")  # its side branches were never trained: F5 only
    assert main(["eval", stage1, "--dataset", "synthreid", "--sets", "F2"]) == 2
    assert "has trained features F5 only" in capsys.readouterr().err
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.tracking.MlflowClient(tracking_uri=uri).create_experiment("inspect")
    (folder / MLFLOW_RUN_FILE).write_text(json.dumps({"tracking_uri": uri, "run_id": "0123abc"}))
    assert main([*args, "--log-mlflow"]) == 2
    assert "run 0123abc is not in" in capsys.readouterr().err


def test_eval_refuses_files_that_are_no_pfe_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state dict of someone else's, a truncated file, bytes that are no torch file: each named with why,
    and never the advice torch's own message gives (weights_only=False)."""
    import torch

    foreign, truncated, garbage = tmp_path / "resnet.pt", tmp_path / "cut.pt", tmp_path / "notes.pt"
    empty, text = tmp_path / "empty.pt", tmp_path / "text.pt"
    torch.save({"conv1.weight": torch.zeros(2)}, foreign)
    truncated.write_bytes(foreign.read_bytes()[:100])
    garbage.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    text.write_text("hello world")  # torch's own reason: "101"
    for path, why in ((foreign, "not a pfe checkpoint (a torch file without format"),
                      (truncated, "not a readable pfe checkpoint (PytorchStreamReader"),
                      (garbage, "not a readable pfe checkpoint (not a torch file"),
                      (empty, "not a readable pfe checkpoint (empty, truncated or not a torch file"),
                      (text, "not a readable pfe checkpoint (empty, truncated or not a torch file")):
        assert main(["eval", str(path), "--dataset", "synthreid"]) == 2
        err = capsys.readouterr().err
        assert f"{path}: {why}" in err and "final.pt that `pfe-study train` wrote" in err, err
        assert len(err.strip().splitlines()) == 1 and "weights_only" not in err and "Traceback" not in err
