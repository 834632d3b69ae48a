"""8 concurrent Tune trials logging into ONE SQLite store through the runner's tracking code.

The trials use `pfe-study run --simulate` (a stand-in trainer: same reporting path, made-up metrics,
no torch, no data), so this costs Ray start-up plus seconds, not training time. One trial's worker
process dies once at epoch 3 (PFE_SIMULATE_CRASH_ONCE): Tune retries it from its last checkpoint
(FailureConfig) and its MLflow history still has exactly one point per epoch.
"""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli
from mlflow import MlflowClient

EPOCHS = 6
STUDY = f"""\
name: concurrent
description: 8 stage-II trials at once (stand-in trainer)
base:
  overrides:
    data.dataset: synthreid
    data.root: unused
    stage1.epochs: 2
    stage2.epochs: {EPOCHS}
axes:
  model.alpha: [0.0, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2]
resources: {{cpu: 0.25, gpu: 0}}
tracking: {{uri: "sqlite:///store/mlflow.db"}}
storage: results
report: {{rows: model.alpha, values: [rank1]}}
"""
TRAIN_KEYS = ["train/stage2/loss", "train/stage2/ce", "lr/stage2", "img_per_s/stage2", "epoch_time_s/stage2"]
SETS = ["F2", "F3", "F4", "F5", "F4_F5", "F3_F4_F5", "F2_F3_F4_F5"]
EVAL_KEYS = [f"eval/{s}/{m}" for s in SETS for m in ("rank1", "rank5", "rank10", "mAP", "mINP")]
FINAL_KEYS = ["rank1", "mAP", "mINP"]


def test_auto_workers_in_a_trial_count_the_cpus_reserved_for_it() -> None:
    """data.workers=auto in a Ray worker: its `resources.cpu` (here 1 and 3), not the node's CPUs."""
    import ray

    from pfe.config import ExperimentConfig
    from pfe.study.trainable import _trial_workers

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        workers = ray.remote(lambda cfg: _trial_workers(cfg).data.workers)
        cfg = ExperimentConfig()
        assert ray.get([workers.options(num_cpus=n).remote(cfg) for n in (1, 3)]) == [0, 2]
        assert ray.get(workers.options(num_cpus=3).remote(cfg.with_overrides({"data.workers": 5}))) == 5
    finally:
        ray.shutdown()


def test_eight_concurrent_trials_lose_no_metric_point(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(STUDY)
    (tmp_path / "crash").mkdir()
    proc = run_cli(
        ["run", "study.yaml", "--simulate"],
        tmp_path,
        timeout=300,
        PFE_SIMULATE_EPOCH_S="2.0",
        PFE_SIMULATE_CRASH_ONCE=str(tmp_path / "crash"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    roles = [r.data.tags["pfe.role"] for r in runs]
    assert roles.count("study") == 1 and roles.count("stage1") == 1 and roles.count("trial") == 8
    trials = [r for r in runs if r.data.tags["pfe.role"] == "trial"]
    points = 0
    for run in trials:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["pfe.status"] == "finished", tags
        assert tags["pfe.epochs_done"] == tags["pfe.epochs_asked"] == str(EPOCHS)
        assert set(run.data.metrics) == set(TRAIN_KEYS + EVAL_KEYS + FINAL_KEYS)
        for key in TRAIN_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
            points += len(steps)
        for key in EVAL_KEYS + FINAL_KEYS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == [EPOCHS], (key, steps)
            points += 1
    assert points == 8 * (len(TRAIN_KEYS) * EPOCHS + len(EVAL_KEYS) + len(FINAL_KEYS))

    # one worker died once; the retry resumed from its checkpoint, so every history above is whole
    assert (tmp_path / "crash" / "crashed").is_file()
    assert proc.stdout.count("(resuming after epoch 2)") == 1  # Tune's retry started after the epoch-2 checkpoint

    # they really ran at the same time: the most runs open at one moment
    spans = [(r.info.start_time, r.info.end_time) for r in trials]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap >= 4, spans
