"""The two-stage trainer on a tiny synthetic dataset: resume after a kill, frozen main branch, NaN stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pfe.config import ExperimentConfig
from pfe.data.synth import generate_synthreid
from pfe.engine import checkpoint as ckpt
from pfe.engine.trainer import (
    RESULT_FILE,
    NonFiniteLoss,
    TrainHooks,
    _clear_run_folder,
    main_branch_state,
    state_checksum,
    train,
)
from pfe.errors import PFEError
from pfe.model import build_model

TINY = {
    "data.dataset": "synthreid",
    "data.height": 64,
    "data.width": 32,
    "data.ids_per_batch": 4,
    "data.images_per_id": 2,
    "data.workers": 0,
    "model.backbone": "resnet18",
    "model.pretrained": "none",
    "model.channels": 16,
    "model.side_dim": 32,
    "stage1.epochs": 2,
    "stage1.milestones": [1],
    "stage2.epochs": 2,
    "stage2.milestones": [1],
    "stage2.lr": 3.5e-4,
    "eval.batch_size": 64,
    "runtime.deterministic": True,
    "runtime.progress": False,
}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "synthreid"
    generate_synthreid(root, ids_train=8, ids_test=6, images_per_id=4, cameras=2, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_cfg(synth_root) -> ExperimentConfig:
    return ExperimentConfig().with_overrides({**TINY, "data.root": str(synth_root)})


class Recorder(TrainHooks):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []
        self.stage_ends: list[int] = []

    def on_epoch_end(self, stage, epoch, metrics, checkpoint):
        self.epochs.append((stage, epoch))
        assert checkpoint is None or checkpoint.is_file()

    def on_stage_end(self, stage, metrics, checkpoint):
        self.stage_ends.append(stage)


@pytest.fixture(scope="module")
def uninterrupted(tiny_cfg, tmp_path_factory):
    hooks = Recorder()
    result = train(tiny_cfg, tmp_path_factory.mktemp("run"), hooks=hooks)
    return result, hooks


def test_full_run_reports_every_epoch_and_keeps_few_checkpoints(uninterrupted):
    result, hooks = uninterrupted
    assert hooks.epochs == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert hooks.stage_ends == [1, 2]
    for key in ("rank1", "mAP", "mINP", "eval/F5/rank1", "eval/F2_F3_F4_F5/mAP", "eval/F2/rank5"):
        assert 0.0 <= result.metrics[key] <= 100.0, key
    assert result.metrics["rank1"] == result.metrics["eval/F2_F3_F4_F5/rank1"]
    assert "train/stage2/loss" in result.metrics and "img_per_s/stage2" in result.metrics
    assert set(result.stage1_metrics) >= {"eval/F5/rank1", "train/stage1/triplet", "lr/stage1"}
    assert any(k.startswith("twins/") for k in result.metrics), "synthreid twins-only subset missing"
    for stage in (1, 2):
        kept = [e for e, _ in ckpt.epoch_checkpoints(result.workdir, stage)]
        assert kept == [1, 2] and ckpt.final_path(result.workdir, stage).is_file()
    # A finished run folder returns its stored result without training again.
    again = train(ExperimentConfig.model_validate(result_cfg(result.workdir)), result.workdir, hooks=Recorder())
    assert again.metrics == result.metrics


def result_cfg(workdir: Path) -> dict:
    import yaml

    return yaml.safe_load((workdir / "config.yaml").read_text())


def test_killed_mid_epoch_then_resumed_matches_uninterrupted(tiny_cfg, uninterrupted, tmp_path):
    cfg = tiny_cfg.with_overrides({"stage1.epochs": 2})
    out = tmp_path / "killed"
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text((uninterrupted[0].workdir / "config.yaml").read_text())
    cmd = [sys.executable, "-m", "pfe.cli", "train", str(config_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = ckpt.epoch_path(out, 1, 1)
    deadline = time.monotonic() + 180
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.is_file(), "the training process wrote no checkpoint"
    time.sleep(0.3)  # into epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not ckpt.final_path(out, 2).is_file(), "the run finished before it could be killed"

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr or ckpt.final_path(out, 1).is_file()
    final = ckpt.load(ckpt.final_path(out, 2))["metrics"]
    expected = uninterrupted[0].metrics
    assert cfg.stage1_key() == tiny_cfg.stage1_key()
    assert {k: final[k] for k in expected if k.startswith(("eval/", "twins/"))} == {
        k: v for k, v in expected.items() if k.startswith(("eval/", "twins/"))
    }


def test_stage2_from_stage1_checkpoint_leaves_main_branch_bit_identical(tiny_cfg, uninterrupted, tmp_path):
    stage1_dir = uninterrupted[0].workdir
    stage1_state = ckpt.load(ckpt.final_path(stage1_dir, 1))["model"]
    model = build_model(tiny_cfg, ckpt.load(ckpt.final_path(stage1_dir, 1))["num_classes"])
    keys = main_branch_state(model).keys()
    before = state_checksum({k: stage1_state[k] for k in keys})

    variant = tiny_cfg.with_overrides({"model.side": "fa", "stage2.loss": "uniform", "eval.rerank": True})
    hooks = Recorder()
    result = train(variant, tmp_path / "stage2", hooks=hooks, stage1_from=stage1_dir)
    assert hooks.epochs == [(2, 1), (2, 2)], "stage I must not be retrained"
    # Re-ranked metrics come beside the plain ones, never instead.
    assert {"rerank/F2_F3_F4_F5/mAP", "eval/F2_F3_F4_F5/mAP"} <= result.metrics.keys()
    after_state = ckpt.load(ckpt.final_path(tmp_path / "stage2", 2))["model"]
    assert state_checksum({k: after_state[k] for k in keys}) == before
    side_keys = [k for k in after_state if k not in keys and after_state[k].is_floating_point()]
    assert side_keys and any(not torch.equal(after_state[k], stage1_state[k]) for k in side_keys if k in stage1_state)


def test_the_number_of_workers_changes_nothing_a_run_computes(tiny_cfg, uninterrupted, tmp_path):
    """data.workers is an environment key (no hash, a tag): 2 DataLoader workers train exactly what 0 do."""
    result = train(tiny_cfg.with_overrides({"data.workers": 2}), tmp_path / "workers")

    def computed(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith(("img_per_s/", "epoch_time_s/"))}

    assert len(computed(result.metrics)) > 50 and computed(result.metrics) == computed(uninterrupted[0].metrics)


def test_nan_loss_stops_naming_stage_epoch_and_term(tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"stage1.lr": 1e30, "runtime.nan_check_every": 1})
    with pytest.raises(NonFiniteLoss, match=r"stage 1 epoch 1: loss term\(s\) .*(ce|triplet|loss)"):
        train(cfg, tmp_path / "nan")


def test_a_stage_restored_from_its_final_checkpoint_is_not_retrained(tiny_cfg, uninterrupted, tmp_path):
    import shutil

    result = uninterrupted[0]
    copy = tmp_path / "restored"
    for stage in (1, 2):  # what a Tune checkpoint of a finished stage holds: final.pt only
        (copy / f"stage{stage}").mkdir(parents=True)
        shutil.copy(ckpt.final_path(result.workdir, stage), ckpt.final_path(copy, stage))
    hooks = Recorder()
    restored = train(tiny_cfg, copy, hooks=hooks)
    assert hooks.epochs == [] and hooks.stage_ends == [2]
    assert restored.metrics == result.metrics
    assert restored.cmc == result.cmc and "F2_F3_F4_F5" in restored.cmc


def test_a_run_folder_or_a_stage_one_of_another_config_never_continues(tiny_cfg, uninterrupted, tmp_path):
    import shutil

    result = uninterrupted[0]
    copy = tmp_path / "copy"
    shutil.copytree(result.workdir, copy)
    with pytest.raises(PFEError, match=r"this run folder was trained under another config \(stage2.lr: 0.00035 -> 0.001"):
        train(tiny_cfg.with_overrides({"stage2.lr": 1e-3}), copy)
    with pytest.raises(PFEError, match=r"this stage I was trained under another config \(model.attention: 'tsam' -> 'seb'"):
        train(tiny_cfg.with_overrides({"model.attention": "seb"}), tmp_path / "new", stage1_from=result.workdir)
    assert (copy / "config.yaml").read_text() == (result.workdir / "config.yaml").read_text()  # not overwritten
    # An unreadable result.json is ignored: the final checkpoints give the same result again, nothing retrained.
    (copy / RESULT_FILE).write_text("{half a file")
    hooks = Recorder()
    assert train(tiny_cfg, copy, hooks=hooks).metrics == result.metrics and hooks.epochs == []


def test_fresh_removes_the_previous_run_only_once_the_data_is_found_and_only_its_files(tiny_cfg, uninterrupted, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(uninterrupted[0].workdir, copy)
    (copy / "my_notes.txt").write_text("not the trainer's")
    with pytest.raises(PFEError, match="typo"):
        train(tiny_cfg.with_overrides({"data.root": str(tmp_path / "typo")}), copy, fresh=True)
    assert (copy / RESULT_FILE).is_file() and ckpt.final_path(copy, 2).is_file()  # nothing lost
    _clear_run_folder(copy, lambda message: None)
    assert [p.name for p in copy.iterdir()] == ["my_notes.txt"]


def test_a_checkpoint_without_its_config_is_refused(tmp_path):
    path = tmp_path / "final.pt"
    torch.save({"format": ckpt.FORMAT, "model": {}}, path)
    with pytest.raises(PFEError, match="final.pt: a pfe checkpoint without stage, epoch, metrics, config"):
        ckpt.load(path)


def test_a_deterministic_run_does_not_leave_the_process_deterministic() -> None:
    from pfe.engine.trainer import seed_everything

    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        seed_everything(0, deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
