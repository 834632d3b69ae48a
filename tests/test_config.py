"""ExperimentConfig: defaults, validation messages, overrides, hashes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from pfe.config import HASHED_AT_DEFAULT, ExperimentConfig, dump_config, load_config
from pfe.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_recipe():
    cfg = ExperimentConfig()
    assert (cfg.data.height, cfg.data.width, cfg.data.batch_size) == (384, 192, 32)
    assert (cfg.stage1.epochs, cfg.stage1.lr, cfg.stage1.milestones) == (120, 3.5e-4, [40, 70])
    assert (cfg.stage2.epochs, cfg.stage2.lr, cfg.stage2.milestones) == (80, 3.5e-5, [30, 60])
    assert cfg.stage2.temperatures == [10.0, 8.0, 6.0]
    assert (cfg.model.alpha, cfg.stage2.w_ro, cfg.model.last_stride) == (0.05, 0.001, 1)
    assert cfg.final_set == "F2_F3_F4_F5"


def test_auto_workers_leave_the_main_process_a_cpu():
    from pfe.config import MAX_AUTO_WORKERS, resolve_workers

    assert ExperimentConfig().data.workers == "auto"
    assert load_config(None, ["data.workers=3"]).data.workers == 3
    assert [resolve_workers("auto", cpus) for cpus in (0.5, 1, 2, 8, 64)] == [0, 0, 1, 7, MAX_AUTO_WORKERS]
    assert resolve_workers(0, cpus=64) == 0 and resolve_workers(5) == 5  # a number stays as it is
    import os

    assert resolve_workers("auto") == min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) - 1)


def test_good_file_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  side: fa\nstage2:\n  temperatures: [5, 4, 3]\n")
    cfg = load_config(path, ["stage1.epochs=2", "model.alpha=0.1", "eval.sets=[F5, F4_F5]"])
    assert cfg.model.side == "fa"
    assert cfg.stage2.temperatures == [5.0, 4.0, 3.0]
    assert cfg.stage1.epochs == 2 and cfg.model.alpha == 0.1
    assert cfg.eval.sets == ["F5", "F4_F5"]
    again = cfg.with_overrides({"model.side": "mfa"})
    assert again.model.side == "mfa" and again.stage1.epochs == 2
    assert load_config(None, []).model_dump() == ExperimentConfig().model_dump()
    # The resolved YAML round-trips.
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("model:\n  sid: mfa\n", [], "model.sid: unknown key"),
        ("", ["modle.side=mfa"], "modle: unknown key"),
        ("stage1:\n  epochs: many\n", [], "stage1.epochs"),
        ("model:\n  side: hydra\n", [], "model.side"),
        ("model:\n  alpha: 1.5\n", [], "model.alpha"),
        ("", ["stage2.temperatures=[1, 2]"], "stage2.temperatures"),
        ("", ["data.ids_per_batch=1"], "data.ids_per_batch"),
        ("", ["data.workers=-1"], "data.workers"),
        ("", ["data.workers=many"], "data.workers"),
        ("", ["eval.sets=[F6]"], "eval.sets"),
        ("stage1:\n  milestones: [70, 40]\n", [], "stage1.milestones"),
        ("model: [1, 2\n", [], "not valid YAML"),
        ("model:\n  side: side\n", [], "stage2.w_ro=0.001 with model.side=side"),  # no A_5 for Eq. 8
        ("stage1:\n  epochs: 5\nstage1:\n  lr: 0.1\n", [], "key 'stage1' is given twice"),  # not the last silently
        ("", ["model.alpha=[0.1"], "override 'model.alpha=[0.1'"),
        ("runtime:\n  device: gpu\n", [], "runtime.device: a device is auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_configs_name_the_file_and_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_a_binary_file_or_a_folder_is_named_as_such(tmp_path):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    with pytest.raises(ConfigError, match="config.yaml: not a UTF-8 text file"):
        load_config(binary)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


def test_cli_rejects_bad_config_with_exit_2_and_no_traceback(tmp_path):
    path = write(tmp_path, "model:\n  sid: mfa\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pfe.cli", "profile", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "model.sid" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


STAGE1_CHANGES = {
    "data.dataset": "dukemtmcreid",
    "data.height": 256,
    "model.backbone": "resnet101",
    "model.last_stride": 2,
    "model.pretrained": "none",
    "model.attention": "seb",
    "stage1.epochs": 60,
    "stage1.lr": 1e-4,
    "runtime.precision": "fp32",
    "runtime.seed": 1,
}
SIDE_OR_STAGE2_CHANGES = {
    "model.side": "fa",
    "model.alpha": 0.1,
    "model.channels": 256,
    "model.separable": True,
    "stage2.loss": "uniform",
    "stage2.w_ro": 0.0,
    "stage2.epochs": 10,
    "stage2.temperatures": [5, 4, 3],
    "eval.flip": True,
}
ENVIRONMENT_CHANGES = {"data.root": "/elsewhere", "runtime.device": "cuda:1", "runtime.output_dir": "/tmp/x"}


@pytest.mark.parametrize(("key", "value"), STAGE1_CHANGES.items())
def test_stage1_key_changes_with_stage1_fields(key, value):
    base = ExperimentConfig()
    changed = base.with_overrides({key: value})
    assert changed.stage1_key() != base.stage1_key()
    assert changed.config_hash() != base.config_hash()


@pytest.mark.parametrize(("key", "value"), SIDE_OR_STAGE2_CHANGES.items())
def test_stage1_key_ignores_side_and_stage2_fields(key, value):
    base = ExperimentConfig()
    changed = base.with_overrides({key: value})
    assert changed.stage1_key() == base.stage1_key()
    assert changed.config_hash() != base.config_hash()


@pytest.mark.parametrize(("key", "value"), ENVIRONMENT_CHANGES.items())
def test_environment_keys_change_no_hash(key, value):
    base = ExperimentConfig()
    changed = base.with_overrides({key: value})
    assert (changed.stage1_key(), changed.config_hash()) == (base.stage1_key(), base.config_hash())
    assert key not in changed.flat(defining_only=True)


def test_keys_are_stable_and_explicit_defaults_hash_like_implicit_ones():
    # Pinned: a change here means existing studies lose their stage-I checkpoints and MLflow links.
    assert ExperimentConfig().stage1_key() == ExperimentConfig().stage1_key()
    assert ExperimentConfig().with_overrides({"model.side": "mfa"}).config_hash() == ExperimentConfig().config_hash()
    assert len(ExperimentConfig().stage1_key()) == 16


def test_a_changed_default_never_resumes_a_trial_of_the_old_one():
    """model.channels defaulted to 96 before 2026-12: its trials, hashed without it, must not pass for C = 128."""
    empty_payload = hashlib.sha256(b"{}").hexdigest()[:16]  # the defaults' hash when nothing is hashed at default
    cfg = ExperimentConfig()
    assert cfg.model.channels == 128 and "model.channels" in HASHED_AT_DEFAULT
    assert cfg.config_hash() != empty_payload  # the old default config's trial id
    assert cfg.stage1_key() == empty_payload  # stage I does not depend on C: its checkpoints stay shared
    assert cfg.with_overrides({"model.channels": 96}).config_hash() != cfg.config_hash()
