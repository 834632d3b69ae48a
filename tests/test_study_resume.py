"""`pfe-study run` on real (tiny) training: MLflow layout, stage-I sharing, kill + resume.

The run itself is the session fixture ``tiny_study_run`` (tests/conftest.py): the driver is
SIGKILLed after the first trial finished and the next one reported an epoch, then rerun.
"""

from __future__ import annotations

from collections import Counter

from conftest import StudyRun, run_cli
from mlflow import MlflowClient

from pfe.config import RANK_METRICS
from pfe.study.spec import load_study


def _runs(run: StudyRun) -> tuple[MlflowClient, list]:
    client = MlflowClient(run.tracking_uri)
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id])


def test_tiny_study_mlflow_layout(tiny_study_run: StudyRun) -> None:
    run = tiny_study_run
    spec = load_study(run.study)
    client, runs = _runs(run)
    by_role = Counter(r.data.tags.get("pfe.role") for r in runs)
    # one parent, one stage I (distinct stage-I keys x seeds), one child per trial
    assert by_role == {"study": 1, "stage1": len(spec.stage1_groups()), "trial": len(spec.expand())}
    parent = next(r for r in runs if r.data.tags["pfe.role"] == "study")
    stage1 = next(r for r in runs if r.data.tags["pfe.role"] == "stage1")
    assert stage1.data.tags["pfe.shared_by"] == "3" and stage1.data.tags["pfe.status"] == "finished"
    assert stage1.data.tags["pfe.epochs_done"] == stage1.data.tags["pfe.epochs_asked"] == "2"
    assert float(stage1.data.tags["pfe.wall_s"]) > 0 and stage1.data.tags["pfe.device_kind"] == "cpu"
    # how the trial really ran (its auto settings resolved)
    assert stage1.data.tags["pfe.resolved.data.workers"] == "0" and stage1.data.tags["pfe.resolved.runtime.device"] == "cpu"
    assert stage1.data.tags["pfe.resolved.runtime.compile"] == "off"
    assert stage1.data.tags["pfe.resolved.runtime.precision"] == "fp32"
    for trial in spec.expand():
        (r,) = [x for x in runs if x.data.tags.get("pfe.trial_id") == trial.trial_id]
        tags = r.data.tags
        assert r.info.status == "FINISHED" and tags["pfe.status"] == "finished"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["pfe.variant"] == trial.variant and tags["pfe.seed"] == "0"
        assert tags["pfe.stage1_run_id"] == stage1.info.run_id and tags["pfe.stage1_key"] == trial.stage1_key
        assert tags["pfe.config_hash"] == trial.cfg.config_hash()
        assert tags["data.root"] == str(run.data_root)  # environment keys are tags, not params
        params = r.data.params
        assert "data.root" not in params and params["model.side"] == trial.cfg.model.side
        assert set(params) == set(trial.cfg.flat(defining_only=True))
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "per_layer.json"} <= artifacts
        final = trial.cfg.final_set
        for name in ("rank1", "mAP", "mINP"):
            assert r.data.metrics[name] == r.data.metrics[f"eval/{final}/{name}"]
        if trial.has_stage2:
            assert "cmc.json" in artifacts
            assert tags["pfe.epochs_done"] == tags["pfe.epochs_asked"] == "2"
            assert {f"eval/{s}/{m}" for s in trial.cfg.eval_sets for m in RANK_METRICS} <= set(r.data.metrics)
        else:  # no stage II: the stage-I run's final metrics, no time of its own
            assert tags["pfe.wall_s"] == "0" and tags["pfe.epochs_asked"] == "0"
            assert r.data.metrics["rank1"] == stage1.data.metrics["eval/F5/rank1"]


def test_killed_study_resumes_without_rerunning_or_duplicating(tiny_study_run: StudyRun) -> None:
    run = tiny_study_run
    assert run.killed, "the first run ended before it could be killed mid-study:\n" + run.logs[0][-3000:]
    first, second = run.logs
    assert "Tune: 1 stage-I run(s), 2 stage-II trial(s)" in first
    # the rerun trains no stage I again and only the unfinished stage-II trial, from its checkpoint
    assert "study tiny: resuming" in second
    assert "Tune: 0 stage-I run(s), 1 stage-II trial(s)" in second
    assert "(resuming after epoch 1)" in second
    client, runs = _runs(run)
    before = run.before_kill
    finished_before = {rid for rid, r in before.items() if r["tags"].get("pfe.status") == "finished"}
    roles_before = {before[rid]["tags"]["pfe.role"] for rid in finished_before}
    assert roles_before == {"stage1", "trial"}
    after = {r.info.run_id: r for r in runs}
    assert set(before) <= set(after)  # the resumed trial continued its own MLflow run
    for rid in finished_before:  # finished runs were left alone
        assert after[rid].info.end_time == before[rid]["end_time"]
        assert after[rid].data.metrics == before[rid]["metrics"]
    interrupted = [rid for rid, r in before.items() if r["tags"].get("pfe.status") == "running"]
    assert len(interrupted) == 1 and after[interrupted[0]].data.tags["pfe.status"] == "finished"
    assert float(after[interrupted[0]].data.tags["pfe.wall_s"]) > float(before[interrupted[0]]["tags"]["pfe.wall_s"])
    # exactly one point per (metric, epoch) in every run's history
    for r in runs:
        for key in r.data.metrics:
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (r.info.run_name, key, steps)
        if r.data.tags.get("pfe.role") == "trial" and r.data.tags.get("pfe.epochs_asked") == "2":
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/stage2/loss"))
            assert steps == [1, 2]


def test_rerunning_a_finished_study_runs_nothing(tiny_study_run: StudyRun) -> None:
    client, runs = _runs(tiny_study_run)
    proc = run_cli(["run", str(tiny_study_run.study)], tiny_study_run.cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every trial is already finished; nothing to run" in proc.stdout
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    _, again = _runs(tiny_study_run)
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}


def test_a_trial_failing_on_bad_input_is_not_retried_and_says_why(tmp_path) -> None:
    """A NaN loss (a PFEError, as a corrupt image or a missing file is) fails alike on every retry: the trial
    ends FAILED at once with the message, instead of max_failures attempts with tracebacks."""
    from conftest import TINY_STUDY

    text = TINY_STUDY.read_text().replace("name: tiny", "name: tiny_nan")
    text = text[: text.index("variants:")] + (
        "variants:\n  NaN: {model.side: mfa, stage1.lr: 1.0e+30, runtime.nan_check_every: 1}\n"
        "max_failures: 2\nresources: {cpu: 1, gpu: 0}\ntracking: {uri: sqlite:///mlflow.db}\nstorage: ray_results\n"
    )
    study = tmp_path / "nan.yaml"
    study.write_text(text)
    proc = run_cli(["run", str(study)], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "on bad input (not retried)" in out and "became NaN/Inf" in out, out[-4000:]
    assert "fix first what a FAILED line above names" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny_nan").experiment_id])
    stage1 = [r for r in runs if r.data.tags.get("pfe.role") == "stage1"]
    assert len(stage1) == 1 and stage1[0].info.status == "FAILED"
    assert stage1[0].data.tags["pfe.input_error"] == "1" and "lower the learning rate" in stage1[0].data.tags["pfe.error"]
    assert out.count("Traceback") == 0  # one attempt, no retry's traceback
