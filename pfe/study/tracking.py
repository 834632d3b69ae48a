"""MLflow tracking of a study: one writer (the driver), batched, resumable.

Layout: one experiment per study, one parent run (``pfe.role=study``), one child run
per stage-I run (``pfe.role=stage1``) and per trial (``pfe.role=trial``). Only the driver talks to
MLflow: Tune workers report to the driver, and :class:`TrackingCallback` (a ``tune.Callback``) turns
each reported epoch into ONE ``log_batch`` call (metrics + tags), so many concurrent trials never
contend for a SQLite lock, and a resumed trial never logs a (metric, epoch) point twice.

Measured here (MLflow 3.17, SQLite, 2 cores): ``log_batch`` of 70 metrics + a tag ~50 ms; the same
70 as single ``log_metric`` calls ~1.5 s. Creating a fresh SQLite store ~8 s (done once, by the driver,
before any trial: several processes creating one store at once fail).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pfe.errors import ConfigError, PFEError
from pfe.study.eval_command import MLFLOW_RUN_FILE
from pfe.study.trainable import PICTURES_DIR
from pfe.study.uris import (
    TrackingError,
    is_local_tracking,
    is_shared_storage,
    mask_text,
    mask_uri,
    open_client,
    split_credentials,
    sqlite_path,
    tracking_scheme,
)

# Run status tag values (contract) and the MLflow run status each maps to.
STATUS_TO_MLFLOW = {"finished": "FINISHED", "incomplete": "KILLED", "failed": "FAILED", "running": "RUNNING"}
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100


# ---- pre-flight checks (before Ray starts / before any trial) ----------------------------------
def check_cluster_rules(tracking_uri: str, storage: str, address: str | None) -> None:
    """On a cluster the tracking store must be a server and storage shared; refuse otherwise."""
    if not address or address in ("local",):
        return
    shown = mask_uri(address)
    if address.startswith("ray://"):
        raise ConfigError(
            f"--address {shown}: Ray Client is not supported; run the driver inside the cluster: `ray job submit "
            "--address http://HEAD:8265 --working-dir . -- pfe-study run STUDY`, or on a node with --address HEAD:6379"
        )
    if is_local_tracking(tracking_uri):
        raise ConfigError(
            f"tracking uri {mask_uri(tracking_uri)}: a local {tracking_scheme(tracking_uri)} store cannot be written "
            f"by a Ray cluster ({shown}). Set `tracking.uri` in the study (or MLFLOW_TRACKING_URI) to an MLflow "
            "server, e.g. http://mlflow-host:5000 (see cluster/README.md)."
        )
    if not is_shared_storage(storage):
        raise ConfigError(
            f"storage {mask_uri(storage)}: a local path is not shared by the nodes of the Ray cluster ({shown}). "
            "Set `storage` in the study (or PFE_STORAGE) to s3://, gs:// or a network filesystem mount (NFS, Lustre; "
            "PFE_STORAGE_SHARED=1 if it is one this check cannot recognise)."
        )


# ---- records -----------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """What the driver knows about one child run."""

    run_id: str
    role: str  # "stage1" | "trial"
    key: str  # stage1_key or trial_id
    tags: dict[str, str] = field(default_factory=dict)
    logged: dict[str, set[int]] | None = None  # metric -> steps already in MLflow (loaded lazily)

    @property
    def status(self) -> str:
        return self.tags.get("pfe.status", "running")

    @property
    def epochs_done(self) -> int:
        return int(self.tags.get("pfe.epochs_done", "0") or 0)

    @property
    def checkpoint(self) -> str | None:
        return self.tags.get("pfe.checkpoint") or None

    @property
    def wall_s(self) -> float:
        return float(self.tags.get("pfe.wall_s", "0") or 0)


class StudyTracker:
    """The driver's MLflow client for one study: store, experiment, parent run, child runs."""

    def __init__(self, uri: str, experiment: str, study: str, study_file: str = "") -> None:
        self.uri, self.experiment_name, self.study, self.study_file = uri, experiment, study, study_file
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = open_client(uri)
            self.experiment_id = self._experiment(db)
        except PFEError:
            raise
        except Exception as err:  # noqa: BLE001 - any client failure: name the (masked) store
            raise TrackingError(f"tracking store {mask_uri(uri)}: {mask_text(str(err), [uri])}") from None
        self.parent_id: str | None = None
        self.records: dict[tuple[str, str], RunRecord] = {}

    def _experiment(self, db: Path | None) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another driver
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    # -- queries
    def _search(self, filter_string: str) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=filter_string, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def study_runs(self) -> list[Any]:
        return self._search(f"tags.`pfe.study` = '{self.study}'")

    # -- parent run
    def open_parent(self, fresh: bool = False, tags: dict[str, str] | None = None) -> tuple[str, bool]:
        """Reuse the study's latest parent run (resume) or start a new one. Returns (run_id, resumed).
        ``fresh`` soft-deletes the study's earlier runs (parent and children) first."""
        runs = self.study_runs()
        parents = sorted(
            (r for r in runs if r.data.tags.get("pfe.role") == "study"), key=lambda r: r.info.start_time, reverse=True
        )
        if fresh:
            for run in runs:
                self.client.delete_run(run.info.run_id)
            parents = []
        all_tags = {"pfe.role": "study", "pfe.study": self.study, "pfe.study_file": self.study_file, **(tags or {})}
        if parents:
            self.parent_id = parents[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            self._set_tags(self.parent_id, {k: v for k, v in all_tags.items() if k != "pfe.role"})
            resumed = True
        else:
            run = self.client.create_run(self.experiment_id, tags={"mlflow.runName": self.study, **all_tags})
            self.parent_id = run.info.run_id
            resumed = False
        self._load_children()
        return self.parent_id, resumed

    def _load_children(self) -> None:
        self.records.clear()
        for run in self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}'"):
            tags = dict(run.data.tags)
            role = tags.get("pfe.role", "")
            key = tags.get("pfe.trial_id") if role == "trial" else tags.get("pfe.stage1_key")
            if not key:
                continue
            rec = RunRecord(run.info.run_id, role, key, tags)
            old = self.records.get((role, key))
            if old is None or rec.epochs_done > old.epochs_done or rec.status == "finished":
                self.records[(role, key)] = rec

    def close_parent(self, status: str) -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, STATUS_TO_MLFLOW.get(status, "FINISHED"))

    # -- child runs
    def get(self, role: str, key: str) -> RunRecord | None:
        return self.records.get((role, key))

    def open_run(
        self,
        role: str,
        key: str,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        texts: dict[str, str] | None = None,
    ) -> RunRecord:
        """The child run for (role, key): reused when it exists (resume), else created with params."""
        assert self.parent_id, "open_parent first"
        rec = self.get(role, key)
        key_tag = "pfe.trial_id" if role == "trial" else "pfe.stage1_key"
        tags = {**tags, key_tag: key, "pfe.role": role, "pfe.study": self.study, "pfe.status": "running"}
        if rec is not None:
            if self.client.get_run(rec.run_id).info.status != "RUNNING":
                self.client.update_run(rec.run_id, status="RUNNING")
            self.set_tags(rec, tags)
            return rec
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": self.parent_id}
        )
        rec = RunRecord(run.info.run_id, role, key, {**tags, "mlflow.parentRunId": self.parent_id}, logged={})
        self.records[(role, key)] = rec
        if params:
            self.log_params(rec, params)
        for path, text in (texts or {}).items():
            self.log_text(rec, text, path)
        return rec

    def log_params(self, rec: RunRecord, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(rec.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def _logged(self, rec: RunRecord) -> dict[str, set[int]]:
        """(metric -> steps) already in MLflow: read once per run on resume, then kept in memory."""
        if rec.logged is None:
            run = self.client.get_run(rec.run_id)
            rec.logged = {k: {m.step for m in self.client.get_metric_history(rec.run_id, k)} for k in run.data.metrics}
        return rec.logged

    def log_step(self, rec: RunRecord, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> int:
        """One batch: the metrics of one epoch (skipping (metric, step) points already logged) and tags.
        Returns the number of metric points written."""
        from mlflow.entities import Metric, RunTag

        logged = self._logged(rec)
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if step not in logged.get(k, ())]
        tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items() if rec.tags.get(k) != str(v)]
        for i in range(0, max(len(fresh), 1), MAX_METRICS_PER_BATCH):
            chunk = fresh[i : i + MAX_METRICS_PER_BATCH]
            tag_chunk = tag_items if i == 0 else []
            if chunk or tag_chunk:
                self.client.log_batch(rec.run_id, metrics=chunk, tags=tag_chunk[:MAX_TAGS_PER_BATCH])
                for j in range(MAX_TAGS_PER_BATCH, len(tag_chunk), MAX_TAGS_PER_BATCH):
                    self.client.log_batch(rec.run_id, tags=tag_chunk[j : j + MAX_TAGS_PER_BATCH])
        for m in fresh:
            logged.setdefault(m.key, set()).add(m.step)
        rec.tags.update({t.key: t.value for t in tag_items})
        return len(fresh)

    def set_tags(self, rec: RunRecord, tags: dict[str, Any]) -> None:
        changed = {k: str(v) for k, v in tags.items() if rec.tags.get(k) != str(v)}
        if changed:
            self._set_tags(rec.run_id, changed)
            rec.tags.update(changed)

    def _set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_TAGS_PER_BATCH])

    def log_text(self, rec: RunRecord, text: str, artifact_file: str) -> None:
        self.client.log_text(rec.run_id, text, artifact_file)

    def end_run(self, rec: RunRecord, status: str, tags: dict[str, Any] | None = None) -> None:
        """Set ``pfe.status`` (finished | incomplete | failed) and the matching MLflow run status."""
        self.set_tags(rec, {**(tags or {}), "pfe.status": status})
        self.client.set_terminated(rec.run_id, STATUS_TO_MLFLOW[status])


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a Tune result: numeric values with a DESIGN.md key (``eval/...``,
    ``train/...``, ``rank1`` ...); Tune's own fields and the runner's ``pfe_*`` fields are left out."""
    out = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if "/" in key or key in ("rank1", "mAP", "mINP"):
            if key.startswith(("config/", "pfe_")):
                continue
            out[key] = float(value) if math.isfinite(value) else float("nan")
    return out


def per_layer(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``eval/<set>/<metric>`` -> {set: {metric: value}} (the per_layer.json artifact)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


# ---- the Tune side: the driver's one writer ----------------------------------------------------
def _tune_callback_base() -> type:
    from ray import tune

    return tune.Callback


class _TrialState:
    def __init__(self, rec: RunRecord, payload: dict[str, Any]):
        self.rec, self.payload = rec, payload
        self.base_wall = rec.wall_s
        self.last_elapsed = 0.0
        self.final_seen = False
        self.epochs_done = rec.epochs_done
        self.input_error = ""  # the trial's PFEError, when bad input ended it (not retried)


def make_tracking_callback(
    tracker: StudyTracker,
    open_run: Any,
    storage: str,
    gpu_fraction: dict[str, float],
    early_stopping: bool = False,
) -> Any:
    """A ``tune.Callback`` that writes every reported epoch of every trial to MLflow in one batch.

    ``open_run(trial.config) -> (RunRecord, payload)`` opens (or reopens, on a resume) the trial's run.
    Results carry ``pfe_step`` (the MLflow step), ``pfe_epochs_done``, ``pfe_elapsed`` (seconds of this
    attempt), ``pfe_device``, ``pfe_host``, ``pfe_resolved`` (JSON: the auto settings as the trial resolved
    them; tags ``pfe.resolved.*``), optionally ``pfe_final`` and ``pfe_cmc``; the checkpoint's
    storage URI is recorded in the same batch as the epoch's metrics (tag ``pfe.checkpoint``).
    """
    base = _tune_callback_base()
    scheme = urlsplit(storage).scheme
    prefix = f"{scheme}://" if scheme and len(scheme) > 1 and scheme != "file" else ""

    class TrackingCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.states: dict[str, _TrialState] = {}
            self.points = 0

        def _state(self, trial: Any) -> _TrialState:
            state = self.states.get(trial.trial_id)
            if state is None:
                rec, payload = open_run(trial.config)
                state = self.states[trial.trial_id] = _TrialState(rec, payload)
                tracker.set_tags(rec, {"pfe.tune_trial": f"{trial.trial_id}"})
            return state

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            state = self._state(trial)
            resumed = f" (resuming after epoch {state.epochs_done})" if state.epochs_done else ""
            _say(f"start  {_label(state)}{resumed}")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            state = self._state(trial)
            if result.get("pfe_input_error"):
                state.input_error = str(result["pfe_input_error"])
                return
            elapsed = float(result.get("pfe_elapsed", 0.0))
            if elapsed < state.last_elapsed:  # a new attempt (retry from a checkpoint)
                state.base_wall += state.last_elapsed
            state.last_elapsed = elapsed
            state.epochs_done = max(state.epochs_done, int(result.get("pfe_epochs_done", 0)))
            tags: dict[str, str] = {
                "pfe.epochs_done": str(state.epochs_done),
                "pfe.wall_s": f"{state.base_wall + elapsed:.1f}",
                "pfe.status": "running",
            }
            if result.get("pfe_device"):
                tags["pfe.device_kind"] = str(result["pfe_device"])
                if str(result["pfe_device"]) == "cpu":
                    tags["pfe.gpu_fraction"] = "0"
                else:
                    tags["pfe.gpu_fraction"] = f"{gpu_fraction.get(state.rec.role, 0.0):g}"
            if result.get("pfe_host"):
                tags["pfe.host"] = str(result["pfe_host"])
            for key, value in json.loads(result.get("pfe_resolved") or "{}").items():
                tags[f"pfe.resolved.{key}"] = value  # e.g. data.workers: auto -> the count the trial used
            if result.get("checkpoint_dir_name") and trial.path:
                tags["pfe.checkpoint"] = f"{prefix}{trial.path}/{result['checkpoint_dir_name']}"
            step = int(result.get("pfe_step", result.get("training_iteration", 0)))
            metrics = metric_items(result)
            self.points += tracker.log_step(state.rec, metrics, step, tags)
            if result.get("pfe_stage_end") and result.get("checkpoint_dir_name") and trial.path:
                at_end(tracker, state.rec, prefix, f"{trial.path}/{result['checkpoint_dir_name']}", result)
            if not result.get("pfe_final"):
                shown = "  ".join(
                    f"{k.split('/')[-1] if k.startswith('train/') else k}={metrics[k]:.3g}"
                    for k in metrics
                    if k.endswith("/loss") or k in ("rank1", "mAP")
                )
                asked = state.payload.get("epochs_asked", "?")
                _say(f"epoch  {_label(state)}  {state.epochs_done}/{asked}  {shown}")
            if result.get("pfe_final"):
                state.final_seen = True
                metrics = metric_items(result)
                tracker.log_text(state.rec, json.dumps(per_layer(metrics), indent=1), "per_layer.json")
                try:
                    cmc = json.loads(result.get("pfe_cmc") or "{}")
                except ValueError:
                    cmc = {}
                if cmc:
                    tracker.log_text(state.rec, json.dumps(cmc), "cmc.json")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            state = self._state(trial)
            asked = int(state.payload.get("epochs_asked", 0))
            if state.input_error:
                tracker.end_run(state.rec, "failed", {"pfe.error": state.input_error[:5000], "pfe.input_error": "1"})
                _say(f"FAILED {_label(state)} on bad input (not retried): {state.input_error}")
            elif state.epochs_done >= asked:  # all its epochs reported (the final report adds artifacts only)
                tracker.end_run(state.rec, "finished")
                shown = "  ".join(f"{k}={v}" for k, v in state.rec.tags.items() if k == "pfe.wall_s")
                _say(f"done   {_label(state)}  {shown}")
            else:
                # ended before all its epochs (time budget, lost resources, early stopping): never "finished"
                tags = {"pfe.stopped_early": "1"} if early_stopping else {}
                tracker.end_run(state.rec, "incomplete", tags)
                why = "stopped early by the scheduler" if early_stopping else "ended early"
                _say(f"INCOMPLETE {_label(state)}: {state.epochs_done} of {asked} epochs ({why})")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            state = self._state(trial)
            error = _error_text(trial)
            tracker.end_run(state.rec, "failed", {"pfe.error": error})
            _say(f"FAILED {_label(state)}: {error}")

    return TrackingCallback()


def public_tracking_uri(uri: str) -> str:
    """The tracking URI without credentials (user info, secret query values): safe to write into a file."""
    clean = split_credentials(uri)[0]
    if mask_uri(clean) == clean:
        return clean
    parts = urlsplit(clean)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))


def at_end(tracker: StudyTracker, rec: RunRecord, prefix: str, path: str, result: dict[str, Any]) -> None:
    """A stage's final checkpoint (``prefix + path``) has been stored: log its ``pictures/`` PNGs to the run
    (tag ``pfe.pictures`` lists them) and, on local storage, write ``mlflow_run.json`` into the folder so
    ``pfe-study eval FOLDER --log-mlflow`` finds the run. Either failing is a warning, never the trial's end."""
    import tempfile

    if result.get("pfe_pictures"):
        try:
            with tempfile.TemporaryDirectory(prefix="pfe-pictures-") as tmp:
                if prefix:  # remote storage (s3://, gs://, ...): fetch just the pictures
                    from pyarrow import fs as pafs

                    pafs.copy_files(f"{prefix}{path}/{PICTURES_DIR}", tmp)
                    local = Path(tmp)
                else:
                    local = Path(path) / PICTURES_DIR
                names = sorted(p.name for p in local.glob("*.png"))
                if names:
                    tracker.client.log_artifacts(rec.run_id, str(local), artifact_path=PICTURES_DIR)
                    tracker.set_tags(rec, {"pfe.pictures": ",".join(names)})
        except Exception as err:  # noqa: BLE001 - pictures are a courtesy
            _say(f"warning: pictures of run {rec.run_id} not logged: {mask_text(str(err), [tracker.uri])}")
    folder = Path(path)
    if not prefix and folder.is_dir():
        info = {"tracking_uri": public_tracking_uri(tracker.uri), "run_id": rec.run_id}
        try:
            (folder / MLFLOW_RUN_FILE).write_text(json.dumps(info, indent=1) + "\n")
        except OSError as err:
            _say(f"warning: {folder / MLFLOW_RUN_FILE}: not written ({err})")


def _label(state: _TrialState) -> str:
    role = "stage I" if state.rec.role == "stage1" else "trial"
    label = state.rec.tags.get("pfe.label", state.rec.key)
    if state.rec.role == "stage1":
        return f"[{label}]"
    return f"[{role} {label} seed {state.rec.tags.get('pfe.seed', '?')}]"


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _error_text(trial: Any) -> str:
    try:
        path = trial.error_file
        if path and Path(path).is_file():
            lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
            return mask_text(lines[-1] if lines else "error", [])[:4000]
    except Exception:  # noqa: BLE001 - the tag is a courtesy
        pass
    return "the trial failed; see the Tune output"
