"""The Tune trainable: what one trial runs in a Ray worker, around ``pfe.engine.trainer.train``.

A trial is a stage I, a stage II from a shared stage I's checkpoint, or both (a search over stage-I
keys). :class:`_Reporter` turns the engine's epoch hooks into ``tune.report`` calls, each with the
epoch's checkpoint file; a retried or resumed trial restores its last checkpoint first (``_restore``).
The driver's side (planning, resuming, the Tune runs) is :mod:`pfe.study.runner`; MLflow is written by
the driver only (:class:`pfe.study.tracking.TrackingCallback`). ``--simulate`` runs :func:`_simulated`,
the same reporting path without torch or data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pfe.config import FINAL_SET, ExperimentConfig, resolve_workers, validate_config, with_headline
from pfe.errors import PFEError, user_message

CHECKPOINT_META = "pfe_checkpoint.json"
PICTURES_DIR = "pictures"  # in the final stage-II checkpoint; logged to the trial's MLflow run by the driver


def resolve_payload(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's payload with a search sample's values applied to its config (driver and worker alike)."""
    payload = dict(config["pfe"])
    keys = payload.get("search_keys") or []
    if keys:
        values = {k: config[k] for k in keys if k in config}
        cfg = validate_config(payload["cfg"]).with_overrides(values, source="<search sample>")
        payload["cfg"] = cfg.model_dump(mode="json")
        payload["key"] = cfg.config_hash()
        payload["search_values"] = values
        payload["resume_uri"] = (payload.get("resume_map") or {}).get(payload["key"])
    return payload


class _Reporter:
    """Turns the engine's epoch hooks into ``tune.report`` calls with a checkpoint."""

    def __init__(self, payload: dict[str, Any], workdir: Path):
        self.payload, self.workdir = payload, workdir
        self.started = time.perf_counter()
        self.pending: dict[str, float] | None = None
        self.device = "cpu"
        self.resolved: dict[str, str] = {}  # the run's auto settings as resolved (pfe.engine.trainer.resolved_runtime)
        self.offset = 0
        cfg = payload["cfg"]
        self.stage_epochs = {1: cfg["stage1"]["epochs"], 2: cfg["stage2"]["epochs"]}
        if payload["stages"] == [1, 2]:
            self.offset = self.stage_epochs[1]  # stage-II steps follow stage I's in one run

    def _fields(self, stage: int, epoch: int) -> dict[str, Any]:
        step = epoch + (self.offset if stage == 2 else 0)
        done = step if self.payload["stages"] == [1, 2] else epoch
        return {
            "pfe_stage": stage,
            "pfe_epoch": epoch,
            "pfe_step": step,
            "pfe_epochs_done": done,
            "pfe_elapsed": time.perf_counter() - self.started,
            "pfe_device": self.device,
            "pfe_host": socket.gethostname(),
            "pfe_resolved": json.dumps(self.resolved, sort_keys=True),
        }

    def epoch(self, stage: int, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        from ray import tune

        if checkpoint is None or epoch >= self.stage_epochs[stage]:
            if checkpoint is None:  # epoch 0: the untrained model's evaluation
                tune.report({**metrics, **self._fields(stage, epoch)})
            else:
                self.pending = dict(metrics)  # the last epoch is reported with final.pt (on_stage_end)
            return
        self._report_with(stage, epoch, metrics, checkpoint)

    def stage_end(self, stage: int, metrics: dict[str, float], final: Path) -> None:
        epoch = self.stage_epochs[stage]
        self._report_with(stage, epoch, self.pending if self.pending is not None else metrics, final, end=True)
        self.pending = None

    def _report_with(self, stage: int, epoch: int, metrics: dict[str, float], path: Path, end: bool = False) -> None:
        """One report with a checkpoint folder; a stage's end is flagged (``pfe_stage_end``) for the driver,
        and the end of stage II (side branches) also carries the pictures (``pictures/``, ``pfe_pictures``)."""
        from ray import tune

        folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=self.workdir.parent))
        try:
            target = folder / f"stage{stage}" / path.name
            target.parent.mkdir(parents=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
            (folder / CHECKPOINT_META).write_text(
                json.dumps({"stage": stage, "epoch": epoch, "key": self.payload["key"]})
            )
            fields = self._fields(stage, epoch)
            if end:
                fields["pfe_stage_end"] = stage
                if stage == 2 and self.payload["cfg"]["model"]["side"] != "none" and not self.payload.get("simulate"):
                    fields["pfe_pictures"] = _write_pictures(self.payload, path, folder / PICTURES_DIR)
            tune.report({**metrics, **fields}, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def input_error(self, err: PFEError) -> None:
        """End the trial on bad input without raising, so Tune does not retry it (``pfe_input_error``)."""
        from ray import tune

        tune.report({"pfe_input_error": user_message(err), "pfe_elapsed": time.perf_counter() - self.started})

    def final(self, metrics: dict[str, float], cmc: dict[str, list[float]], wall: dict[str, float]) -> None:
        from ray import tune

        stage = self.payload["stages"][-1]
        if stage == 2 and self.payload["cfg"]["model"]["side"] == "none":
            stage = 1
        fields = self._fields(stage, self.stage_epochs[stage])
        tune.report({**metrics, **fields, "pfe_final": 1, "pfe_cmc": json.dumps(cmc)})


def _write_pictures(payload: dict[str, Any], final: Path, out: Path) -> int:
    """The activation maps and the retrieval grid of a finished stage II into ``out``: what
    ``pfe-study eval --pictures`` draws, smaller (4 images, 4 queries x top 5; ~2 s of drawing on a CPU) and
    with only the two sets the grid shows evaluated (one more feature extraction of query and gallery).
    Returns how many PNGs; a failure is a warning, never the trial's end."""
    try:
        from pfe.engine.eval_checkpoint import evaluate_checkpoint, write_report_pictures

        started = time.perf_counter()
        cfg = _trial_workers(validate_config(payload["cfg"]))
        sets = list(dict.fromkeys(["F5", cfg.final_set]))
        report = evaluate_checkpoint(final, sets=sets, device=cfg.runtime.device, workers=cfg.data.workers)
        paths = write_report_pictures(report, out, num_images=4, num_queries=4, top=5)
        print(f"pictures: {len(paths)} PNGs in {time.perf_counter() - started:.1f} s", flush=True)
        return len(paths)
    except Exception as err:  # noqa: BLE001 - a picture never fails a trial
        shutil.rmtree(out, ignore_errors=True)
        print(f"warning: trial {payload.get('key', '?')[:10]}: no pictures ({type(err).__name__}: {err})", flush=True)
        return 0


def _restore(checkpoint: Any, workdir: Path) -> None:
    """A Tune checkpoint (this trial's, or the one recorded in MLflow) into the run folder."""
    checkpoint.to_directory(str(workdir))
    (workdir / CHECKPOINT_META).unlink(missing_ok=True)
    for stage_dir in workdir.glob("stage[12]"):
        final = stage_dir / "final.pt"
        if final.is_file():
            # the engine resumes from epoch files: a stage that ended is its final state at its last epoch
            meta_epoch = _last_epoch_of(final)
            if meta_epoch is not None:
                link = stage_dir / f"epoch_{meta_epoch:04d}.pt"
                if not link.exists():
                    os.link(final, link)


def _last_epoch_of(final: Path) -> int | None:
    from pfe.engine import checkpoint as ckpt

    try:
        return int(ckpt.load(final)["epoch"])
    except (PFEError, KeyError, ValueError):
        return None


def trainable(config: dict[str, Any]) -> None:
    """One Tune trial: a stage I, a stage II from a shared stage I, or both (a search over stage-I keys)."""
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "Checkpoint created" line per epoch is noise
    payload = resolve_payload(config)
    if payload.get("simulate"):
        _simulated(payload)
        return
    from pfe.engine.trainer import TrainHooks, device_kind, resolve_device, resolved_runtime, train

    cfg = _trial_workers(validate_config(payload["cfg"]))
    root = Path(tempfile.gettempdir()) / "pfe-trials" / f"{payload['role']}-{payload['key'][:16]}-{os.getpid()}"
    workdir = root / "run"
    shutil.rmtree(root, ignore_errors=True)
    workdir.mkdir(parents=True)
    reporter = _Reporter(payload, workdir)
    device = resolve_device(cfg.runtime.device)
    reporter.device, reporter.resolved = device_kind(device), resolved_runtime(cfg, device)
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None and payload.get("resume_uri"):
            checkpoint = tune.Checkpoint(payload["resume_uri"])
        if checkpoint is not None:
            _restore(checkpoint, workdir)
        stage1_from = None
        if payload.get("stage1_uri"):
            stage1_dir = root / "stage1_from"
            tune.Checkpoint(payload["stage1_uri"]).to_directory(str(stage1_dir))
            stage1_from = stage1_dir

        class Hooks(TrainHooks):
            def on_epoch_end(self, stage: int, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
                reporter.epoch(stage, epoch, metrics, checkpoint)

            def on_stage_end(self, stage: int, metrics: dict[str, float], checkpoint: Path) -> None:
                reporter.stage_end(stage, metrics, checkpoint)

        try:
            result = train(cfg, workdir, hooks=Hooks(), stage1_from=stage1_from, stages=tuple(payload["stages"]))
        except PFEError as err:  # bad input (a corrupt image, a NaN loss, a missing file): a retry fails alike
            reporter.input_error(err)
            return
        reporter.device = result.device_kind
        reporter.final(result.metrics, result.cmc, result.wall_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _trial_workers(cfg: ExperimentConfig) -> ExperimentConfig:
    """``data.workers=auto`` in a trial counts the CPUs Ray reserved for it (``resources.cpu``), not the node's."""
    if cfg.data.workers != "auto":
        return cfg
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return cfg.with_overrides({"data.workers": resolve_workers("auto", cpus)})


def _maybe_crash(stage: int, epoch: int) -> None:
    """PFE_SIMULATE_CRASH_ONCE=DIR: the first simulated trial to reach stage-II epoch 3 kills its worker
    process once (a lost node, as far as Tune can tell), to exercise FailureConfig retries."""
    folder = os.environ.get("PFE_SIMULATE_CRASH_ONCE")
    if not folder or stage != 2 or epoch != 3:
        return
    try:
        fd = os.open(Path(folder) / "crashed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)


def _simulated(payload: dict[str, Any]) -> None:
    """`--simulate`: the same reporting path with made-up metrics and tiny checkpoint files (no torch, no data).
    Checks a cluster, a tracking server and the storage in seconds."""
    from ray import tune

    root = Path(tempfile.mkdtemp(prefix="pfe-sim-"))
    workdir = root / "run"
    workdir.mkdir()
    reporter = _Reporter(payload, workdir)
    cfg = payload["cfg"]
    stages = payload["stages"]
    start = {1: 1, 2: 1}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and payload.get("resume_uri"):
        checkpoint = tune.Checkpoint(payload["resume_uri"])
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / CHECKPOINT_META).read_text())
        for s in stages:
            if s < meta["stage"]:
                start[s] = reporter.stage_epochs[s] + 1
        start[meta["stage"]] = meta["epoch"] + 1
    delay = float(os.environ.get("PFE_SIMULATE_EPOCH_S", "0.05"))
    metrics: dict[str, float] = {}
    try:
        for stage in stages:
            if stage == 2 and cfg["model"]["side"] == "none":
                continue
            epochs = reporter.stage_epochs[stage]
            for epoch in range(start[stage], epochs + 1):
                time.sleep(delay)
                _maybe_crash(stage, epoch)
                seed = cfg["runtime"]["seed"]
                metrics = {
                    f"train/stage{stage}/loss": 5.0 / (epoch + seed + 1),
                    f"train/stage{stage}/ce": 4.0 / (epoch + 1),
                    f"lr/stage{stage}": 3.5e-4,
                    f"img_per_s/stage{stage}": 100.0 + epoch,
                    f"epoch_time_s/stage{stage}": delay,
                }
                if epoch == epochs:
                    sets = ["F5"] if stage == 1 else cfg["eval"]["sets"]
                    for i, s in enumerate(sets):
                        for j, m in enumerate(("rank1", "rank5", "rank10", "mAP", "mINP")):
                            metrics[f"eval/{s}/{m}"] = 50.0 + i + j + cfg["model"]["alpha"] * 10
                    metrics = with_headline(metrics, "F5" if stage == 1 else FINAL_SET)
                path = workdir / f"stage{stage}" / ("final.pt" if epoch == epochs else f"epoch_{epoch:04d}.pt")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"simulated checkpoint")
                if epoch == epochs:
                    reporter.pending = metrics
                    reporter.stage_end(stage, metrics, path)
                else:
                    reporter.epoch(stage, epoch, metrics, path)
        reporter.final(metrics, {"F5": [0.5, 0.6]}, {})
    finally:
        shutil.rmtree(root, ignore_errors=True)
