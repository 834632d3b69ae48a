"""`pfe-study run`: a study as Ray Tune trials, tracked in MLflow, resumable.

Order of work (nothing reaches Ray before the study, the data and the tracking store are checked):

1. load and validate the study (every trial's config); ``--dry-run`` stops here;
2. refuse a local tracking store or local storage on a cluster; check a tracking server answers;
3. check every dataset is there (a synthreid folder is generated instead), before Ray starts;
4. the driver creates the MLflow store, experiment and parent run, and reads what earlier runs of
   this study finished (resume: keyed by stage-I key and trial id = config hash);
5. phase A: each distinct stage I (stage1_key, which includes the seed) that is not finished yet
   is one Tune trial; phase B: each stage-II trial starts from its stage-I checkpoint on the study's
   storage; a trial without side branches only records its stage I's final metrics;
   a search study runs Optuna (OptunaSearch, optional ASHA) in phase B.

Every trial (:func:`pfe.study.trainable.trainable`, in a Ray worker) reports each epoch with a
checkpoint (``tune.report``); the driver's :class:`~pfe.study.tracking.TrackingCallback` writes it to
MLflow in one batch. A retried trial
(FailureConfig) restarts from ``tune.get_checkpoint()``; a rerun study restarts unfinished trials
from the checkpoint recorded in MLflow (``pfe.checkpoint``), and skips finished ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfe.config import STAGE1_PREFIXES, ExperimentConfig, dump_config, validate_config, with_headline
from pfe.errors import ConfigError, DataError
from pfe.study.spec import StudySpec, Trial, format_plan, load_study, stage1_config
from pfe.study.tracking import (
    RunRecord,
    StudyTracker,
    check_cluster_rules,
    per_layer,
)
from pfe.study.trainable import resolve_payload, trainable
from pfe.study.uris import check_ray_address, check_reachable, mask_uri


# ---- CLI ---------------------------------------------------------------------------------------
def cli_run(args: argparse.Namespace) -> int:
    """`pfe-study run STUDY [--dry-run] [--address ADDR] [--fresh] [--max-concurrent N]`."""
    spec = load_study(args.study)
    if getattr(args, "dry_run", False):
        print(format_plan(spec))
        return 0
    outcome = run_study(
        spec,
        address=getattr(args, "address", None),
        fresh=bool(getattr(args, "fresh", False)),
        max_concurrent=getattr(args, "max_concurrent", None),
        simulate=bool(getattr(args, "simulate", False)),
    )
    print(outcome.summary())
    return 0 if outcome.ok else 1


@dataclass
class Outcome:
    """What a `pfe-study run` did."""

    study: str
    tracking_uri: str
    parent_run_id: str = ""
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished before this run
    unfinished: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unfinished

    def summary(self) -> str:
        lines = [
            f"study {self.study}: {len(self.finished)} trial(s) finished now, {len(self.skipped)} were already "
            f"finished, {len(self.unfinished)} unfinished; {self.wall_s:.0f} s",
            f"MLflow: {mask_uri(self.tracking_uri)} (parent run {self.parent_run_id}); "
            f"`pfe-study report` builds the table",
        ]
        if self.unfinished:
            lines.append("unfinished: " + "; ".join(self.unfinished) + "  (rerun the same command to resume; "
                         "fix first what a FAILED line above names)")
        return "\n".join(lines)


# ---- the study ---------------------------------------------------------------------------------
def run_study(
    spec: StudySpec,
    *,
    address: str | None = None,
    fresh: bool = False,
    max_concurrent: int | None = None,
    simulate: bool = False,
    num_cpus: int | None = None,
    callbacks: list[Any] | None = None,
) -> Outcome:
    """Run (or resume) a study; returns what happened. Raises PFEError before any trial on bad input.

    ``callbacks``: extra ``tune.Callback`` objects for the Tune runs, called in the driver's main thread
    after the tracking callback (tests/test_cluster_fault_tolerance.py removes a node from one)."""
    started = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS") or None
    uri, storage = spec.tracking_uri, spec.storage_path
    check_cluster_rules(uri, storage, address)
    check_reachable(uri)
    check_ray_address(address)
    trials = spec.expand()
    if spec.search and len(trials) != 1:
        raise ConfigError(
            f"{spec.source}: search: a search study takes one base trial (no variants, axes or repeats > 1); "
            f"this one expands to {len(trials)}"
        )
    if not simulate:
        trials = [_with_data_root(t) for t in trials]
        prepare_data(spec, trials)

    tracker = StudyTracker(uri, spec.experiment, spec.name, str(Path(spec.source).resolve()))
    parent_id, resumed = tracker.open_parent(
        fresh=fresh, tags={"pfe.storage_path": mask_uri(storage), "pfe.description": spec.description[:5000]}
    )
    outcome = Outcome(spec.name, uri, parent_id)
    print(
        f"study {spec.name}: {'resuming' if resumed else 'starting'}; MLflow {mask_uri(uri)} experiment "
        f"{spec.experiment!r} parent run {parent_id}; storage {mask_uri(storage)}",
        flush=True,
    )
    status = "failed"
    ray_started = requested = False
    try:
        plan = Plan(spec, trials, tracker, simulate=simulate, callbacks=callbacks)
        plan.warn_stale()
        outcome.skipped = plan.already_finished()
        if plan.nothing_to_do():
            print(f"study {spec.name}: every trial is already finished; nothing to run (--fresh starts over)")
            status = "finished"
            return outcome
        ray_started = _init_ray(address, num_cpus)
        requested = _check_resources(spec, address)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # evaluation metrics come every N epochs
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # MLflow is the record; Tune's CSV/JSON/TensorBoard loggers would import torch into the driver (~4 s, ~1 GB)
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # "no result.json"
        # Tune keeps one trial pending at a time with a searcher: released stage-II trials would start one by one
        os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "16")
        plan.record_stage1_only_trials()  # stage Is finished by an earlier run
        plan.run_staged(max_concurrent)
        plan.record_stage1_only_trials()
        plan.run_search(max_concurrent)
        outcome.finished, outcome.unfinished = plan.results()
        status = "finished" if not outcome.unfinished else "incomplete"
        return outcome
    finally:
        outcome.wall_s = time.perf_counter() - started
        tracker.close_parent(status)
        if requested:  # withdraw the autoscaler request: idle nodes may scale down again
            from ray.autoscaler.sdk import request_resources

            with contextlib.suppress(Exception):  # never hide the study's own error
                request_resources(bundles=[])
        if ray_started:
            import ray

            ray.shutdown()


def _with_data_root(trial: Trial) -> Trial:
    """data.root unset means $PFE_DATA, else ./data, as seen by the driver: made absolute here, because
    Tune runs trials in other working directories (data.root is not hashed: ids do not change)."""
    if trial.cfg.data.root:
        return trial
    from pfe.data.datasets import resolve_root

    root = str(resolve_root(None).resolve())
    return dataclasses.replace(trial, cfg=trial.cfg.with_overrides({"data.root": root}))


def prepare_data(spec: StudySpec, trials: list[Trial]) -> None:
    """Every dataset the trials read must be there before Ray starts (a synthreid folder is generated)."""
    seen: set[str] = set()
    for trial in trials:
        data = trial.cfg.data
        ident = json.dumps(data.model_dump(mode="json", include={"dataset", "root", "cuhk03_split", "msmt_version"}))
        if ident in seen:
            continue
        seen.add(ident)
        if data.dataset == "synthreid" and data.root and (Path(data.root) / "manifest.json").is_file():
            _check_synthetic(spec, Path(data.root))
        elif data.dataset == "synthreid" and data.root:
            from pfe.data.synth import generate_synthreid

            sizes = spec.synthetic.model_dump() if spec.synthetic else {}
            print(f"generating synthreid data in {data.root} ({sizes or 'default sizes'}) ...", flush=True)
            target = Path(data.root)
            if target.exists() and any(target.iterdir()):
                raise DataError(
                    f"{spec.source}: data.root {target} is not empty and holds no synthreid manifest.json; "
                    "empty it (or point data.root elsewhere) to have it generated"
                )
            partial = target.with_name(f".{target.name}.partial")  # renamed when complete: an interrupted
            shutil.rmtree(partial, ignore_errors=True)  # generation never looks like a dataset
            generate_synthreid(partial, **sizes)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.rmdir()
            partial.rename(target)
        from pfe.data.datasets import build_dataset

        try:
            dataset = build_dataset(data)
        except DataError as err:
            raise DataError(f"{spec.source}: trial {trial.label!r} (data.dataset={data.dataset}): {err}") from None
        if not dataset.train or not dataset.query or not dataset.gallery:
            raise DataError(
                f"{spec.source}: data.dataset={data.dataset} at {data.root or '$PFE_DATA'}: an empty split "
                f"({dataset.stats()}); check the folder"
            )


def _check_synthetic(spec: StudySpec, root: Path) -> None:
    """The synthreid already at ``root`` is the one the study's ``synthetic:`` asks for (if it asks)."""
    from pfe.data.synth import manifest_differences, read_manifest

    manifest = read_manifest(root)
    changed = manifest_differences(manifest, **spec.synthetic.model_dump()) if spec.synthetic and manifest else []
    if changed:
        raise DataError(
            f"{spec.source}: synthetic: asks for another set than the synthreid at data.root {root} "
            f"({'; '.join(changed)}); point data.root elsewhere, or remove the folder to have it generated"
        )


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    return True


def _check_resources(spec: StudySpec, address: str | None) -> bool:
    """A trial asking for more than Ray has waits PENDING forever. Locally: refuse a GPU this machine lacks,
    shrink CPUs to what it has. On a cluster an autoscaler may still add the nodes (GPU workers with min 0):
    ask it for one trial's resources now and warn. Returns True when a request was made (withdrawn at the end)."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    on_cluster = bool(address) and address != "local"
    bundles = []
    for where, res in (("resources", spec.resources), ("resources.stage1", spec.resources.stage1)):
        if res is None:
            continue
        if on_cluster:
            if res.gpu > gpus or res.cpu > cpus:
                bundles.append({k: v for k, v in (("CPU", res.cpu), ("GPU", res.gpu)) if v > 0})
                print(
                    f"warning: {spec.source}: {where}: a trial asks for cpu {res.cpu:g}, gpu {res.gpu:g}; the Ray "
                    f"cluster has {cpus:g} CPUs, {gpus:g} GPUs now. Asked the autoscaler for them; trials wait "
                    "PENDING until such a node joins (forever on a cluster without an autoscaler, or at its "
                    "max_workers: then stop with Ctrl-C and fix `resources`).",
                    flush=True,
                )
            continue
        if res.gpu > gpus:
            raise ConfigError(
                f"{spec.source}: {where}.gpu: a trial asks for {res.gpu:g} GPU but this machine's Ray has {gpus:g}; "
                "set `gpu: 0` to train on the CPU (slow), or run on a GPU machine or cluster (--address)"
            )
        if res.cpu > cpus:
            print(f"note: {where}.cpu {res.cpu:g} > this machine's {cpus:g} CPUs; using {cpus:g}")
            res.cpu = cpus
    if bundles:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    return bool(bundles)


# ---- planning and the two phases ---------------------------------------------------------------
def _stage1_params(cfg: ExperimentConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat(defining_only=True).items() if k.startswith(STAGE1_PREFIXES)}


def _env_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Config keys that do not define the experiment (paths, devices) are tags: they may change on a resume."""
    flat = cfg.flat()
    return {
        k: json.dumps(v) if not isinstance(v, str) else v
        for k, v in flat.items()
        if k not in cfg.flat(defining_only=True)
    }


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _host() -> str:
    return socket.gethostname()


class Plan:
    """Which stage-I runs and trials still need work, and the Tune runs that do it."""

    def __init__(
        self,
        spec: StudySpec,
        trials: list[Trial],
        tracker: StudyTracker,
        simulate: bool = False,
        callbacks: list[Any] | None = None,
    ):
        self.spec, self.trials, self.tracker, self.simulate = spec, trials, tracker, simulate
        self.callbacks = list(callbacks or [])  # extra tune.Callbacks (run_study)
        self.search = spec.search is not None
        self.full_trials = self.search and spec.search_touches_stage1()
        self.groups: dict[str, list[Trial]] = {}
        for trial in trials:
            self.groups.setdefault(trial.stage1_key, []).append(trial)
        self.gpu = {role: spec.resources.for_role(role).gpu for role in ("stage1", "trial")}
        self.unfinished_now: list[str] = []
        self.already_finished_at_start: list[str] = self.already_finished()

    # -- bookkeeping
    def _trial_done(self, trial: Trial) -> bool:
        rec = self.tracker.get("trial", trial.trial_id)
        return rec is not None and rec.status == "finished"

    def _stage1_done(self, key: str) -> bool:
        rec = self.tracker.get("stage1", key)
        return rec is not None and rec.status == "finished" and bool(rec.checkpoint or self.simulate)

    def already_finished(self) -> list[str]:
        if self.search:
            return [
                r.key for (role, _), r in self.tracker.records.items() if role == "trial" and r.status == "finished"
            ]
        return [t.label + f" seed {t.seed}" for t in self.trials if self._trial_done(t)]

    def nothing_to_do(self) -> bool:
        if self.search:
            return self._search_remaining() == 0
        return all(self._trial_done(t) for t in self.trials)

    def results(self) -> tuple[list[str], list[str]]:
        finished, unfinished = [], list(self.unfinished_now)
        if self.search:
            runs = [r for (role, _), r in self.tracker.records.items() if role == "trial"]
            before = set(self.already_finished_at_start)
            finished = [r.tags.get("pfe.label", r.key) for r in runs if r.status == "finished" and r.key not in before]
            unfinished += [
                f"{r.tags.get('pfe.label', r.key)} ({r.status})"
                for r in runs
                if r.status not in ("finished",) and r.tags.get("pfe.stopped_early") != "1"
            ]
            return finished, unfinished
        skipped = set(self.already_finished_at_start)
        for t in self.trials:
            name = t.label + f" seed {t.seed}"
            rec = self.tracker.get("trial", t.trial_id)
            if rec is not None and rec.status == "finished":
                if name not in skipped:
                    finished.append(name)
            elif not any(name in u for u in unfinished):
                unfinished.append(f"{name} ({rec.status if rec else 'not started'})")
        return finished, unfinished

    def warn_stale(self) -> None:
        """Runs of this study whose config the study file no longer asks for (it was edited): kept, but named."""
        if self.search:
            return
        wanted = {("trial", t.trial_id) for t in self.trials} | {("stage1", k) for k in self.groups}
        stale = [r for key, r in self.tracker.records.items() if key not in wanted]
        if stale:
            names = ", ".join(sorted({r.tags.get("pfe.label", r.key) for r in stale}))
            print(
                f"note: {len(stale)} earlier run(s) of this study no longer match the study file ({names}); they stay "
                "in MLflow under the same parent run. `--fresh` starts the study over.",
                flush=True,
            )

    # -- common payload
    def _payload(self, role: str, key: str, cfg: ExperimentConfig, stages: list[int], **extra: Any) -> dict[str, Any]:
        epochs = {1: cfg.stage1.epochs, 2: cfg.stage2.epochs if cfg.model.side != "none" else 0}
        return {
            "role": role,
            "key": key,
            "cfg": cfg.model_dump(mode="json"),
            "stages": stages,
            "epochs_asked": sum(epochs[s] for s in stages),
            "step_offset": 0,
            "stage1_uri": None,
            "resume_uri": None,
            "simulate": self.simulate,
            **extra,
        }

    def _common_tags(self, seed: int, role: str = "trial") -> dict[str, str]:
        return {
            "pfe.seed": str(seed),
            "pfe.gpu_fraction": f"{self.gpu[role]:g}",
            "pfe.host": _host(),
            "pfe.storage_path": mask_uri(self.spec.storage_path),
        }

    # -- stage I and stage II in one Tune run
    def run_staged(self, max_concurrent: int | None) -> None:
        """Each unfinished stage I is a Tune trial; a stage-II trial is released the moment its own
        stage I has finished (one Tune run, so worker actors are reused and groups overlap)."""
        if self.full_trials:
            return
        first: list[dict[str, Any]] = []
        waiting: dict[str, list[dict[str, Any]]] = {}
        n_stage1 = 0
        for key, members in self.groups.items():
            todo2 = [] if self.search else [t for t in members if t.has_stage2 and not self._trial_done(t)]
            needs_stage1 = not self._stage1_done(key) and (self.search or any(not self._trial_done(t) for t in members))
            if needs_stage1:
                cfg = stage1_config(members[0].cfg)
                rec = self.tracker.get("stage1", key)
                first.append(self._payload("stage1", key, cfg, [1], resume_uri=rec.checkpoint if rec else None))
                n_stage1 += 1
            payloads = [self._stage2_payload(t) for t in todo2]
            if needs_stage1:
                waiting[key] = payloads
            else:
                first += [self._release_payload(p) for p in payloads]
        if not first:
            return
        n_stage2 = len(first) - n_stage1 + sum(len(v) for v in waiting.values())
        print(f"Tune: {n_stage1} stage-I run(s), {n_stage2} stage-II trial(s)", flush=True)
        searcher = _staged_searcher(first, waiting, self._release_payload)
        self._tune("study", searcher, n_stage1 + n_stage2, max_concurrent)
        for key, payloads in searcher.blocked.items():
            for p in payloads:
                trial = self.trials[p["index"]]
                self.unfinished_now.append(f"{trial.label} seed {trial.seed} (its stage I {key[:10]} did not finish)")

    def _stage2_payload(self, trial: Trial) -> dict[str, Any]:
        rec = self.tracker.get("trial", trial.trial_id)
        return self._payload(
            "trial",
            trial.trial_id,
            trial.cfg,
            [2],
            resume_uri=rec.checkpoint if rec else None,
            index=self.trials.index(trial),
            stage1_key=trial.stage1_key,
        )

    def _release_payload(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The stage-II payload with its stage-I checkpoint, or None when that stage I has none."""
        s1 = self.tracker.get("stage1", payload["stage1_key"])
        if s1 is None or not (s1.checkpoint or self.simulate):
            return None
        return {**payload, "stage1_uri": s1.checkpoint, "stage1_run_id": s1.run_id}

    def _open_stage1(self, payload: dict[str, Any]) -> RunRecord:
        key = payload["key"]
        cfg = validate_config(payload["cfg"])
        members = self.groups.get(key, [])
        tags = {
            **self._common_tags(cfg.runtime.seed, "stage1"),
            "pfe.stage1_key": key,
            "pfe.epochs_asked": str(payload["epochs_asked"]),
            "pfe.shared_by": str(len(members)),
            "pfe.label": f"stage I {cfg.model.backbone}+{cfg.model.attention} {cfg.data.dataset} seed {cfg.runtime.seed}",
            **_env_tags(cfg),
        }
        name = f"stage1-{cfg.model.backbone}-{cfg.model.attention}-{cfg.data.dataset}-s{cfg.runtime.seed}"
        return self.tracker.open_run(
            "stage1", key, name, tags, params=_stage1_params(cfg), texts={"config.yaml": dump_config(cfg)}
        )

    # -- trials without a stage II: their stage I's results are their results
    def record_stage1_only_trials(self) -> None:
        if self.search:
            return
        for trial in self.trials:
            if trial.has_stage2 or self._trial_done(trial):
                continue
            s1 = self.tracker.get("stage1", trial.stage1_key)
            if s1 is None or s1.status != "finished":
                continue
            rec = self._open_trial(trial.cfg, trial, s1)
            run = self.tracker.client.get_run(s1.run_id)
            final = with_headline(
                {k: v for k, v in run.data.metrics.items() if k.startswith(("eval/", "twins/"))}, "F5"
            )
            self.tracker.log_step(rec, final, trial.cfg.stage1.epochs)
            self.tracker.log_text(rec, json.dumps(per_layer(final), indent=1), "per_layer.json")
            self.tracker.end_run(
                rec,
                "finished",
                {
                    "pfe.epochs_done": "0",
                    "pfe.epochs_asked": "0",
                    "pfe.wall_s": "0",
                    "pfe.device_kind": s1.tags.get("pfe.device_kind", ""),
                    "pfe.gpu_fraction": s1.tags.get("pfe.gpu_fraction", f"{self.gpu['stage1']:g}"),
                },
            )

    def _open_trial(
        self,
        cfg: ExperimentConfig,
        trial: Trial | None,
        s1: RunRecord | None,
        epochs_asked: int | None = None,
        **extra_tags: str,
    ) -> RunRecord:
        variant = (trial.variant if trial else "") or "base"
        label = trial.label if trial else extra_tags.pop("pfe.label", "search")
        tags = {
            **self._common_tags(cfg.runtime.seed),
            "pfe.variant": variant,
            "pfe.label": label,
            "pfe.trial_id": cfg.config_hash(),
            "pfe.config_hash": cfg.config_hash(),
            "pfe.stage1_key": cfg.stage1_key(),
            "pfe.stage1_run_id": s1.run_id if s1 else "",
            "pfe.epochs_asked": str(
                epochs_asked if epochs_asked is not None else cfg.stage2.epochs if cfg.model.side != "none" else 0
            ),
            **_env_tags(cfg),
        }
        tags.update({k: v for k, v in extra_tags.items() if k.startswith("pfe.")})
        if trial is not None and trial.axes:
            tags["pfe.axes"] = json.dumps(trial.axes)
        name = f"{variant if trial and trial.variant else label}-s{cfg.runtime.seed}"[:250]
        return self.tracker.open_run(
            "trial",
            cfg.config_hash(),
            name,
            tags,
            params=cfg.flat(defining_only=True),
            texts={"config.yaml": dump_config(cfg)},
        )

    # -- a search (after its stage I)
    def run_search(self, max_concurrent: int | None) -> None:
        if self.search:
            self._run_search(max_concurrent)

    def _open_payload_trial(self, payload: dict[str, Any]) -> RunRecord:
        cfg = validate_config(payload["cfg"])
        trial = self.trials[payload["index"]] if payload.get("index") is not None else None
        s1 = self.tracker.get("stage1", cfg.stage1_key()) if payload.get("stage1_run_id") else None
        extra = {}
        if payload.get("search_values"):
            shown = ", ".join(f"{k}={_short(v)}" for k, v in payload["search_values"].items())
            extra = {"pfe.search": "1", "pfe.label": f"search {shown}"}
        return self._open_trial(cfg, trial, s1, payload["epochs_asked"], **extra)

    # -- search (Optuna via OptunaSearch, optional ASHA)
    def _search_runs(self) -> list[RunRecord]:
        return [
            r for (role, _), r in self.tracker.records.items() if role == "trial" and r.tags.get("pfe.search") == "1"
        ]

    def _search_remaining(self) -> int:
        assert self.spec.search is not None
        done = [r for r in self._search_runs() if r.status == "finished" or r.tags.get("pfe.stopped_early") == "1"]
        return max(0, self.spec.search.num_samples - len(done))

    def _run_search(self, max_concurrent: int | None) -> None:
        search = self.spec.search
        assert search is not None
        base = self.trials[0]
        stages = [1, 2] if self.full_trials else [2]
        s1 = None
        if not self.full_trials:
            s1 = self.tracker.get("stage1", base.stage1_key)
            if not self._stage1_done(base.stage1_key) or s1 is None:
                self.unfinished_now.append("the search's stage I did not finish")
                return
        space = {k: d.to_optuna() for k, d in search.space.items()}
        done, pending = [], []
        done_values: dict[str, float | None] = {}
        resume: dict[str, str] = {}
        for rec in self._search_runs():
            params = self.tracker.client.get_run(rec.run_id).data.params
            point = {k: json.loads(params[k]) for k in search.space if k in params}
            if len(point) != len(search.space):
                continue
            if rec.status == "finished" or rec.tags.get("pfe.stopped_early") == "1":
                value = self.tracker.client.get_run(rec.run_id).data.metrics.get(self.spec.metric)
                done.append((point, value, rec.status != "finished"))
                done_values[rec.key] = value
            else:
                pending.append(point)
                if rec.checkpoint:
                    resume[rec.key] = rec.checkpoint
        remaining = self._search_remaining()
        if remaining == 0:
            return
        seed = None if search.seed is None else search.seed + len(done)  # a resumed search draws new points
        searcher = _optuna_search(
            base.cfg,
            done_values,
            space=space,
            metric=self.spec.metric,
            mode=self.spec.mode,
            sampler=_sampler(search.sampler, seed),
            points_to_evaluate=pending[:remaining] or None,
        )
        for point, value, pruned in done:
            if value is not None:
                searcher.add_evaluated_point(point, value, pruned=pruned)
        scheduler = None
        if search.scheduler:
            epochs = base.cfg.stage2.epochs + (base.cfg.stage1.epochs if self.full_trials else 0)
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(
                time_attr="pfe_step",
                metric=self.spec.metric,
                mode=self.spec.mode,
                max_t=(search.scheduler.max_t or epochs) + 1,  # +1: never cut the final evaluation
                grace_period=search.scheduler.grace_period,
                reduction_factor=search.scheduler.reduction_factor,
            )
        payload = self._payload(
            "trial",
            "",
            base.cfg,
            stages,
            stage1_uri=s1.checkpoint if s1 else None,
            stage1_run_id=s1.run_id if s1 else None,
            resume_map=resume,
            search_keys=list(search.space),
        )
        if self.full_trials:
            payload["step_offset"] = 0
        print(f"phase B: search, {remaining} sample(s) ({len(done)} done before)", flush=True)
        self._tune("search", searcher, remaining, max_concurrent, param_space={"pfe": payload}, scheduler=scheduler)

    # -- Tune
    def _tune(
        self,
        phase: str,
        search_alg: Any,
        num_samples: int,
        max_concurrent: int | None,
        param_space: dict[str, Any] | None = None,
        scheduler: Any = None,
    ) -> None:
        from ray import tune

        from pfe.study.tracking import make_tracking_callback

        spec = self.spec
        callback = make_tracking_callback(
            self.tracker,
            open_run=self._open_for_tune,
            storage=spec.storage_path,
            gpu_fraction=self.gpu,
            early_stopping=scheduler is not None,
        )
        resources = {role: spec.resources.for_role(role) for role in ("stage1", "trial")}

        def request(config: dict[str, Any]) -> Any:
            res = resources["stage1" if config["pfe"]["role"] == "stage1" else "trial"]
            return tune.PlacementGroupFactory([{"CPU": res.cpu, "GPU": res.gpu}])

        tuner = tune.Tuner(
            tune.with_resources(trainable, resources=request),
            param_space=param_space or {},
            tune_config=tune.TuneConfig(
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent or spec.max_concurrent,
                time_budget_s=spec.time_budget_s,
                reuse_actors=True,  # one torch import per worker, not per trial
                trial_dirname_creator=_dirname,
                trial_name_creator=_dirname,
            ),
            run_config=tune.RunConfig(
                name=f"{spec.name}-{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=spec.storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[callback, *self.callbacks],
                verbose=0,  # the tracking callback prints one line per trial event
            ),
        )
        tuner.fit()

    def _open_for_tune(self, config: dict[str, Any]) -> tuple[RunRecord, dict[str, Any]]:
        """Called by the callback when a Tune trial starts: its MLflow run (new or resumed)."""
        payload = resolve_payload(config)
        if payload["role"] == "stage1":
            return self._open_stage1(payload), payload
        return self._open_payload_trial(payload), payload


def _staged_searcher(first: list[dict[str, Any]], waiting: dict[str, list[dict[str, Any]]], release: Any) -> Any:
    """A Tune Searcher that hands out the stage-I payloads (and stage-II payloads whose stage I is
    already done) at once, and each group's stage-II payloads when its stage I has finished."""
    from ray.tune.search import Searcher

    class StagedSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.queue = list(first)
            self.waiting = {k: list(v) for k, v in waiting.items()}
            self.blocked: dict[str, list[dict[str, Any]]] = {}
            self.stage1_of: dict[str, str] = {}

        def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
            return True

        def save(self, checkpoint_path: str) -> None:  # resume state lives in MLflow, not in Tune
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if self.queue:
                payload = self.queue.pop(0)
                if payload["role"] == "stage1":
                    self.stage1_of[trial_id] = payload["key"]
                return {"pfe": payload}
            return None if self.waiting else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            key = self.stage1_of.pop(trial_id, None)
            if key is None or key not in self.waiting:
                return
            payloads = self.waiting.pop(key)
            ok = not error and bool(result and result.get("pfe_final"))
            released = [release(p) for p in payloads] if ok else []
            if ok and all(p is not None for p in released):
                self.queue += released
            else:
                self.blocked[key] = payloads

    return StagedSearcher()


def _optuna_search(base: ExperimentConfig, done: dict[str, float | None], **kwargs: Any) -> Any:
    """OptunaSearch that (1) ignores results without the metric (evaluation runs every N epochs) and
    (2) never hands out a sample whose config already ran to the end in MLflow: Optuna is told its
    known value instead and asked again, so a resumed search never reruns a finished trial."""
    from ray.tune.search.optuna import OptunaSearch

    class ResumableOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            if isinstance(self.metric, str) and self.metric in result:
                super().on_trial_result(trial_id, result)

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            for attempt in range(100):
                tid = trial_id if attempt == 0 else f"{trial_id}-known{attempt}"
                config = super().suggest(tid)
                if not isinstance(config, dict):
                    return config
                try:
                    key = base.with_overrides(config, source="<search sample>").config_hash()
                except ConfigError:
                    return config  # the trial reports the error itself
                if key not in done:
                    if tid != trial_id:  # Ray keys its bookkeeping by the id it asked with
                        self._ot_trials[trial_id] = self._ot_trials.pop(tid)
                    return config
                value = done[key]
                result = {self.metric: value} if value is not None else None
                super().on_trial_complete(tid, result=result)
            return None

    return ResumableOptunaSearch(**kwargs)


def _sampler(name: str, seed: int | None) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _dirname(trial: Any) -> str:
    payload = trial.config.get("pfe", {})
    key = payload.get("key") or "search"
    return f"{payload.get('role', 'trial')}_{key[:10]}_{trial.trial_id}"
