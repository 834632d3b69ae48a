"""What MLflow holds for a study: its layout, parent run, trials and stage-I runs, read as the runner
records them (tags ``pfe.role``, ``pfe.study``, ``pfe.variant``, ``pfe.status``, ``pfe.wall_s``, ...)."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from pfe.config import FINAL_SET
from pfe.errors import PFEError
from pfe.study.spec import ReportLayout
from pfe.study.uris import check_reachable, check_sqlite_file, default_tracking_uri, open_client, sqlite_path

SINGLE_SETS = ("F2", "F3", "F4", "F5")  # Fig. 8 (a)
CONCAT_SETS = ("F5", "F4_F5", "F3_F4_F5", FINAL_SET)  # Fig. 8 (b)
STATUSES = ("finished", "failed", "incomplete", "running")
MLFLOW_STATUS = {
    "FINISHED": "finished",
    "FAILED": "failed",
    "KILLED": "incomplete",
    "RUNNING": "running",
    "SCHEDULED": "running",
}


# ---------------------------------------------------------------------------------------------
# what a table shows
# ---------------------------------------------------------------------------------------------
def layout_from_spec(report: Any, name: str) -> ReportLayout:
    """A study's ``report:`` section as a :class:`~pfe.study.spec.ReportLayout`, titled ``name`` when it has no title.

    ``report`` is the study file's ReportLayout, None (the defaults) or a mapping, read leniently as an
    older run may have stored it: unknown keys dropped, empty values and fields that no longer validate at
    their defaults, a single column or value as a one-item list.
    """
    if report is None:
        raw: dict[str, Any] = {}
    elif isinstance(report, dict):
        raw = report
    else:
        raw = {key: getattr(report, key, None) for key in ReportLayout.model_fields}
    data: dict[str, Any] = {"title": name}
    for key in ReportLayout.model_fields:
        value = raw.get(key)
        if key in ("columns", "values") and value:
            value = [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif value:
            value = str(value)
        if value:
            data[key] = value
    try:
        return ReportLayout.model_validate(data)
    except ValidationError as err:
        invalid = {e["loc"][0] for e in err.errors() if e["loc"]}
        return ReportLayout.model_validate({k: v for k, v in data.items() if k not in invalid})


@dataclass
class StudyRecords:
    """What MLflow holds for one study."""

    name: str
    tracking_uri: str
    experiment_id: str
    layout: ReportLayout
    parent: Any | None  # mlflow Run with pfe.role=study (the newest, if several)
    trials: list[Any]  # trial runs (newest per variant x seed x config hash)
    stage1: dict[str, Any]  # run id -> stage-I run
    spec: Any | None = None
    study_file: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading MLflow
# ---------------------------------------------------------------------------------------------
def _search(client, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """All runs matching ``filter_string`` (every page)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def tag(run: Any, key: str, default: str | None = None) -> str | None:
    return run.data.tags.get(key, default)


def as_float(value: Any, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def as_int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def check_store(uri: str) -> None:
    """The store must be there: a local SQLite file must exist (MLflow would silently create an empty
    one), a tracking server must answer."""
    advice = "pass --tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the study"
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise PFEError(f"no MLflow store at {path} (tracking URI {uri}): run `pfe-study run STUDY` first, or {advice}")
    check_sqlite_file(uri)
    check_reachable(uri, advice=f"start it, or {advice}")


def _load_study(path: str | Path) -> Any:
    from pfe.study.spec import load_study

    return load_study(path)


def spec_attr(spec: Any, *names: str, default: Any = None) -> Any:
    obj = spec
    for name in names:
        obj = getattr(obj, name, None) if obj is not None else None
    return default if obj is None else obj


def _newest(runs: Iterable[Any]) -> Any | None:
    runs = list(runs)
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def collect_study(
    client, uri: str, experiment_id: str, name: str, spec: Any | None = None, study_file: str | None = None
) -> StudyRecords:
    """The newest parent run of study ``name`` in the experiment, its trials and stage-I runs."""
    runs = _search(client, [experiment_id], f"tags.`pfe.study` = '{name}'")
    parents = [r for r in runs if tag(r, "pfe.role") == "study"]
    parent = _newest(parents)
    notes: list[str] = []
    if len(parents) > 1:
        notes.append(
            f"{len(parents)} parent runs of this study in the store; this report shows the newest "
            f"({parent.info.run_id}, started {pd.Timestamp(parent.info.start_time, unit='ms'):%Y-%m-%d %H:%M} UTC)."
        )
    if parent is not None:
        pid = parent.info.run_id
        runs = [r for r in runs if tag(r, "mlflow.parentRunId") == pid]
    trials_all = [r for r in runs if tag(r, "pfe.role") == "trial"]
    stage1 = {r.info.run_id: r for r in runs if tag(r, "pfe.role") == "stage1"}
    # a trial recorded more than once (a retried or resumed trial): keep the newest record
    by_key: dict[tuple, list[Any]] = {}
    for r in trials_all:
        key = (tag(r, "pfe.variant"), tag(r, "pfe.seed"), tag(r, "pfe.config_hash"))
        by_key.setdefault(key, []).append(r)
    trials = sorted((_newest(v) for v in by_key.values()), key=lambda r: r.info.start_time or 0)
    dropped = len(trials_all) - len(trials)
    if dropped:
        notes.append(
            f"{dropped} older record(s) of a trial recorded again (same variant, seed and config) not counted."
        )
    # stage-I runs a trial names but that are not among the children (e.g. under another parent)
    for r in trials:
        sid = tag(r, "pfe.stage1_run_id")
        if sid and sid not in stage1:
            try:
                stage1[sid] = client.get_run(sid)
            except Exception:  # noqa: BLE001 - a missing run is reported, not fatal
                notes.append(
                    f"stage-I run {sid} named by trial {r.info.run_id} is not in the store: its cost is missing."
                )
                stage1[sid] = None
    layout = layout_from_spec(spec_attr(spec, "report"), name)
    if spec is None and study_file:
        notes.append(f"study file {study_file} not readable here: default layout (variants x rank-1, mAP).")
    return StudyRecords(
        name=name,
        tracking_uri=uri,
        experiment_id=experiment_id,
        layout=layout,
        parent=parent,
        trials=trials,
        stage1={k: v for k, v in stage1.items() if v is not None},
        spec=spec,
        study_file=study_file,
        notes=notes,
    )


def records_for_study_file(path: str, tracking_uri: str | None) -> StudyRecords:
    """Load a study file and read its records from its tracking store (or ``tracking_uri``)."""
    spec = _load_study(path)
    name = str(spec.name)
    uri = tracking_uri or spec_attr(spec, "tracking", "uri") or default_tracking_uri()
    check_store(uri)
    experiment_name = spec_attr(spec, "tracking", "experiment") or name
    client = open_client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise PFEError(
            f"{path}: no MLflow experiment {experiment_name!r} in {uri}: run `pfe-study run {path}` first, "
            "or pass the --tracking-uri that holds it"
        )
    return collect_study(client, uri, experiment.experiment_id, name, spec=spec, study_file=str(path))


def records_in_store(uri: str) -> list[StudyRecords]:
    """Every study (parent run with pfe.role=study) in the store; the newest parent per study name."""
    check_store(uri)
    client = open_client(uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    ids = [e.experiment_id for e in experiments]
    parents: list[Any] = []
    for i in range(0, len(ids), 100):
        parents += _search(client, ids[i : i + 100], "tags.`pfe.role` = 'study'")
    seen: dict[tuple[str, str], Any] = {}
    for p in sorted(parents, key=lambda r: r.info.start_time or 0):
        seen[(p.info.experiment_id, tag(p, "pfe.study") or p.info.run_name or p.info.run_id)] = p
    out = []
    for (exp_id, name), p in sorted(seen.items(), key=lambda kv: kv[0][1]):
        study_file = tag(p, "pfe.study_file")
        spec = None
        if study_file and Path(study_file).is_file():
            try:
                spec = _load_study(study_file)
            except (PFEError, ImportError) as err:
                print(f"pfe-study report: {study_file}: {err}; using the default layout", file=sys.stderr)
        out.append(collect_study(client, uri, exp_id, name, spec=spec, study_file=study_file))
    return out


# ---- a trial's status and labels
def trial_status(run: Any) -> str:
    """finished | failed | incomplete | running: the pfe.status tag, checked against epochs done/asked."""
    status = (tag(run, "pfe.status") or MLFLOW_STATUS.get(run.info.status, "running")).lower()
    if status not in STATUSES:
        status = MLFLOW_STATUS.get(run.info.status, "running")
    if status == "running" and run.info.status in ("FAILED", "KILLED"):
        status = MLFLOW_STATUS[run.info.status]
    done, asked = as_int(tag(run, "pfe.epochs_done")), as_int(tag(run, "pfe.epochs_asked"))
    if status == "finished" and done is not None and asked is not None and done < asked:
        status = "incomplete"
    return status


def axis_value(run: Any, key: str) -> str:
    if key == "variant":
        return tag(run, "pfe.variant") or "base"
    if key == "seed":
        return tag(run, "pfe.seed") or run.data.params.get("runtime.seed", "?")
    value = run.data.params.get(key)
    if value is None:
        value = tag(run, key)
    return "?" if value is None else str(value)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "study"
