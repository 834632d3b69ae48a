"""`pfe-study report`: a study's tables and plots, from its MLflow records.

Per study (one folder under ``--out``): ``table.md``, ``table.csv``, ``table.tex`` (as asked with
``--format``), the plots as PNG, and ``index.md`` (the table, the notes, the plots); ``--out`` gets
an ``index.md`` and ``index.html`` linking every study. What a table shows is the study file's
``report:`` section (rows, columns, values, paper, plot); runs are read as the runner records
them (tags ``pfe.role``, ``pfe.study``, ``pfe.variant``, ``pfe.status``, ``pfe.wall_s``, ...).

A cell is the mean +- sample standard deviation (ddof 1) over the seeds whose trial finished,
with their number n. Trials that failed, stopped early or are still running are counted in the
row's ``trials`` column ("2 of 3 finished, 1 failed") and listed under the table, never dropped.
A row's cost is the sum over its trials (all of them, finished or not) of the trial's own
stage-II wall time plus its share of the stage-I run it started from (stage-I wall time /
``pfe.shared_by``), as GPU-hours (times the GPU fraction) where the device is a GPU, else CPU-hours.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd
import yaml

from pfe.errors import ConfigError, PFEError

FINAL_SET = "F2_F3_F4_F5"
SINGLE_SETS = ("F2", "F3", "F4", "F5")
CONCAT_SETS = ("F5", "F4_F5", "F3_F4_F5", "F2_F3_F4_F5")
STATUSES = ("finished", "failed", "incomplete", "running")
MLFLOW_STATUS = {
    "FINISHED": "finished",
    "FAILED": "failed",
    "KILLED": "incomplete",
    "RUNNING": "running",
    "SCHEDULED": "running",
}
FORMATS = ("md", "csv", "tex")
METRIC_NAMES = {"rank1": "rank-1", "rank5": "rank-5", "rank10": "rank-10"}
REFERENCE_FILE = Path("reports") / "paper_reference.yaml"


# ---------------------------------------------------------------------------------------------
# what a table shows
# ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """A study's ``report:`` section (pfe.study.spec.ReportLayout), with defaults."""

    title: str
    rows: str = "variant"
    columns: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=lambda: ["rank1", "mAP"])
    paper: str | None = None
    plot: str = "none"

    @classmethod
    def from_spec(cls, report: Any, name: str) -> Layout:
        if report is None:
            return cls(title=name)
        get = report.get if isinstance(report, dict) else lambda k, d=None: getattr(report, k, d)
        columns = get("columns") or []
        values = get("values") or ["rank1", "mAP"]
        return cls(
            title=str(get("title") or name),
            rows=str(get("rows") or "variant"),
            columns=[str(c) for c in ([columns] if isinstance(columns, str) else columns)],
            values=[str(v) for v in ([values] if isinstance(values, str) else values)],
            paper=get("paper") or None,
            plot=str(get("plot") or "none"),
        )


@dataclass
class StudyRecords:
    """What MLflow holds for one study."""

    name: str
    tracking_uri: str
    experiment_id: str
    layout: Layout
    parent: Any | None  # mlflow Run with pfe.role=study (the newest, if several)
    trials: list[Any]  # trial runs (newest per variant x seed x config hash)
    stage1: dict[str, Any]  # run id -> stage-I run
    spec: Any | None = None
    study_file: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading MLflow
# ---------------------------------------------------------------------------------------------
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


def _tag(run: Any, key: str, default: str | None = None) -> str | None:
    return run.data.tags.get(key, default)


def _float(value: Any, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the study files' default store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    try:
        from pfe.study import spec as spec_module
    except ImportError:
        spec_module = None
    for name in ("DEFAULT_TRACKING_URI", "default_tracking_uri"):
        value = getattr(spec_module, name, None)
        if callable(value):
            value = value()
        if value:
            return str(value)
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def check_store(uri: str) -> None:
    """A local SQLite store must exist (MLflow would silently create an empty one)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise PFEError(
                f"no MLflow store at {path} (tracking URI {uri}): run `pfe-study run STUDY` first, "
                "or pass --tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the study"
            )


def _load_study(path: str | Path) -> Any:
    from pfe.study.spec import load_study

    return load_study(path)


def _spec_attr(spec: Any, *names: str, default: Any = None) -> Any:
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
    parents = [r for r in runs if _tag(r, "pfe.role") == "study"]
    parent = _newest(parents)
    notes: list[str] = []
    if len(parents) > 1:
        notes.append(
            f"{len(parents)} parent runs of this study in the store; this report shows the newest "
            f"({parent.info.run_id}, started {pd.Timestamp(parent.info.start_time, unit='ms'):%Y-%m-%d %H:%M} UTC)."
        )
    if parent is not None:
        pid = parent.info.run_id
        runs = [r for r in runs if _tag(r, "mlflow.parentRunId") == pid]
    trials_all = [r for r in runs if _tag(r, "pfe.role") == "trial"]
    stage1 = {r.info.run_id: r for r in runs if _tag(r, "pfe.role") == "stage1"}
    # a trial recorded more than once (a retried or resumed trial): keep the newest record
    by_key: dict[tuple, list[Any]] = {}
    for r in trials_all:
        key = (_tag(r, "pfe.variant"), _tag(r, "pfe.seed"), _tag(r, "pfe.config_hash"))
        by_key.setdefault(key, []).append(r)
    trials = sorted((_newest(v) for v in by_key.values()), key=lambda r: r.info.start_time or 0)
    dropped = len(trials_all) - len(trials)
    if dropped:
        notes.append(
            f"{dropped} older record(s) of a trial recorded again (same variant, seed and config) not counted."
        )
    # stage-I runs a trial names but that are not among the children (e.g. under another parent)
    for r in trials:
        sid = _tag(r, "pfe.stage1_run_id")
        if sid and sid not in stage1:
            try:
                stage1[sid] = client.get_run(sid)
            except Exception:  # noqa: BLE001 - a missing run is reported, not fatal
                notes.append(
                    f"stage-I run {sid} named by trial {r.info.run_id} is not in the store: its cost is missing."
                )
                stage1[sid] = None
    if spec is not None:
        layout = Layout.from_spec(_spec_attr(spec, "report"), name)
    else:
        layout = Layout(title=name)
        if study_file:
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
    uri = tracking_uri or _spec_attr(spec, "tracking", "uri") or default_tracking_uri()
    check_store(uri)
    experiment_name = _spec_attr(spec, "tracking", "experiment") or name
    client = _client(uri)
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
    client = _client(uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    ids = [e.experiment_id for e in experiments]
    parents: list[Any] = []
    for i in range(0, len(ids), 100):
        parents += _search(client, ids[i : i + 100], "tags.`pfe.role` = 'study'")
    seen: dict[tuple[str, str], Any] = {}
    for p in sorted(parents, key=lambda r: r.info.start_time or 0):
        seen[(p.info.experiment_id, _tag(p, "pfe.study") or p.info.run_name or p.info.run_id)] = p
    out = []
    for (exp_id, name), p in sorted(seen.items(), key=lambda kv: kv[0][1]):
        study_file = _tag(p, "pfe.study_file")
        spec = None
        if study_file and Path(study_file).is_file():
            try:
                spec = _load_study(study_file)
            except (PFEError, ImportError) as err:
                print(f"pfe-study report: {study_file}: {err}; using the default layout", file=sys.stderr)
        out.append(collect_study(client, uri, exp_id, name, spec=spec, study_file=study_file))
    return out


# ---------------------------------------------------------------------------------------------
# one row per trial
# ---------------------------------------------------------------------------------------------
def is_gpu(device_kind: str | None) -> bool:
    kind = (device_kind or "").strip().lower()
    return bool(kind) and kind != "cpu" and not kind.startswith("cpu")


def device_hours(wall_s: float, device_kind: str | None, gpu_fraction: Any) -> tuple[float, float]:
    """(GPU-hours, CPU-hours) of ``wall_s`` seconds on that device; GPU time times its fraction."""
    hours = max(wall_s, 0.0) / 3600.0
    if is_gpu(device_kind):
        frac = _float(gpu_fraction, 1.0)
        return hours * (frac if frac > 0 else 1.0), 0.0
    return 0.0, hours


def trial_status(run: Any) -> str:
    """finished | failed | incomplete | running: the pfe.status tag, checked against epochs done/asked."""
    status = (_tag(run, "pfe.status") or MLFLOW_STATUS.get(run.info.status, "running")).lower()
    if status not in STATUSES:
        status = MLFLOW_STATUS.get(run.info.status, "running")
    if status == "running" and run.info.status in ("FAILED", "KILLED"):
        status = MLFLOW_STATUS[run.info.status]
    done, asked = _int(_tag(run, "pfe.epochs_done")), _int(_tag(run, "pfe.epochs_asked"))
    if status == "finished" and done is not None and asked is not None and done < asked:
        status = "incomplete"
    return status


def _axis_value(run: Any, key: str) -> str:
    if key == "variant":
        return _tag(run, "pfe.variant") or "base"
    if key == "seed":
        return _tag(run, "pfe.seed") or run.data.params.get("runtime.seed", "?")
    value = run.data.params.get(key)
    if value is None:
        value = _tag(run, key)
    return "?" if value is None else str(value)


def trial_frame(records: StudyRecords) -> pd.DataFrame:
    """One row per trial: labels, status, the layout's values (finished trials only), costs."""
    layout = records.layout
    rows = []
    for run in records.trials:
        status = trial_status(run)
        sid = _tag(run, "pfe.stage1_run_id")
        s1 = records.stage1.get(sid) if sid else None
        gpu_h, cpu_h = device_hours(
            _float(_tag(run, "pfe.wall_s")), _tag(run, "pfe.device_kind"), _tag(run, "pfe.gpu_fraction")
        )
        if s1 is not None:
            shared = max(_int(_tag(s1, "pfe.shared_by"), 1) or 1, 1)
            g1, c1 = device_hours(
                _float(_tag(s1, "pfe.wall_s")) / shared, _tag(s1, "pfe.device_kind"), _tag(s1, "pfe.gpu_fraction")
            )
            gpu_h, cpu_h = gpu_h + g1, cpu_h + c1
        row: dict[str, Any] = {
            "row": _axis_value(run, layout.rows),
            "variant": _tag(run, "pfe.variant") or "base",
            "seed": _tag(run, "pfe.seed") or run.data.params.get("runtime.seed", "?"),
            "status": status,
            "epochs_done": _int(_tag(run, "pfe.epochs_done")),
            "epochs_asked": _int(_tag(run, "pfe.epochs_asked")),
            "gpu_h": gpu_h,
            "cpu_h": cpu_h,
            "run_id": run.info.run_id,
            "stage1_run_id": sid,
        }
        for i, key in enumerate(layout.columns):
            row[f"col{i}"] = _axis_value(run, key)
        for key in layout.values:
            value = run.data.metrics.get(key)
            row[key] = float(value) if value is not None and status == "finished" else math.nan
        rows.append(row)
    cols = [
        "row",
        "variant",
        "seed",
        "status",
        "epochs_done",
        "epochs_asked",
        "gpu_h",
        "cpu_h",
        "run_id",
        "stage1_run_id",
        *[f"col{i}" for i in range(len(layout.columns))],
        *layout.values,
    ]
    return pd.DataFrame(rows, columns=cols)


def unattributed_stage1(records: StudyRecords) -> tuple[float, float]:
    """Cost of stage-I runs no recorded trial names (e.g. every trial that would reuse it is missing)."""
    used: dict[str, int] = {}
    for run in records.trials:
        sid = _tag(run, "pfe.stage1_run_id")
        if sid:
            used[sid] = used.get(sid, 0) + 1
    gpu_h = cpu_h = 0.0
    for sid, s1 in records.stage1.items():
        shared = max(_int(_tag(s1, "pfe.shared_by"), 1) or 1, 1)
        missing = max(shared - used.get(sid, 0), 0)
        g, c = device_hours(
            _float(_tag(s1, "pfe.wall_s")) * missing / shared, _tag(s1, "pfe.device_kind"), _tag(s1, "pfe.gpu_fraction")
        )
        gpu_h, cpu_h = gpu_h + g, cpu_h + c
    return gpu_h, cpu_h


# ---------------------------------------------------------------------------------------------
# the paper's numbers
# ---------------------------------------------------------------------------------------------
def reference_path() -> Path | None:
    """reports/paper_reference.yaml in the working directory, else in the source checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / REFERENCE_FILE
        if path.is_file():
            return path
    return None


def load_reference(path: Path | None = None) -> dict[str, Any]:
    path = path or reference_path()
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    tables = data.get("tables", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: key 'tables' must map table names to tables")
    return tables


def paper_values(reference: dict[str, Any], table: str | None, labels: Sequence[str]) -> dict[str, Any]:
    """The paper's row (metric -> number, plus source/derived notes) for the first label it has.

    Labels compare as numbers where they are numbers (a YAML key 0.05 matches the param "0.05").
    """
    if not table or table not in reference:
        return {}
    rows = {_norm(k): v for k, v in (reference[table].get("rows") or {}).items()}
    for label in labels:
        row = rows.get(_norm(label))
        if isinstance(row, dict):
            return row
    return {}


def paper_deltas(reference: dict[str, Any], table: str | None) -> list[dict[str, Any]]:
    """The differences between two rows that the paper's text states (``deltas:`` of the table)."""
    if not table or table not in reference:
        return []
    return [d for d in (reference[table].get("deltas") or []) if isinstance(d, dict) and "plus" in d and "minus" in d]


def delta_table(table: pd.DataFrame, layout: Layout, deltas: list[dict[str, Any]]) -> pd.DataFrame:
    """The paper's stated differences beside this study's (plus - minus of the means)."""
    body = table.iloc[:-1]
    means = {}
    for _, r in body.iterrows():
        label = _norm(_group_label(r, layout))
        means[label] = r
    lines = []
    for d in deltas:
        plus, minus = means.get(_norm(d["plus"])), means.get(_norm(d["minus"]))
        for metric, stated in d.items():
            if metric in ("plus", "minus", "source") or not isinstance(stated, (int, float)):
                continue
            here = math.nan
            if plus is not None and minus is not None and f"{metric}_mean" in plus:
                here = plus[f"{metric}_mean"] - minus[f"{metric}_mean"]
            lines.append(
                {
                    "difference": f"{d['plus']} - {d['minus']}",
                    "metric": _metric_label(metric),
                    "paper": f"{stated:+.1f}",
                    "here": "–" if math.isnan(here) else f"{here:+.2f}",
                    "source": str(d.get("source", "")),
                }
            )
    return pd.DataFrame(lines, columns=["difference", "metric", "paper", "here", "source"])


def _group_label(rec: Any, layout: Layout) -> str:
    """A table row's label as the reference file keys it: the row, or "<row> / <column> ..." when pivoted."""
    return " / ".join(str(rec[k]) for k in ["row", *layout.columns])


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------
def _label_sort_key(label: str) -> tuple:
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def status_text(counts: dict[str, int], expected: int | None = None) -> str:
    """ "2 of 3 finished, 1 failed" (expected counts trials not recorded as "not started")."""
    total = sum(counts.values())
    denom = max(total, expected or 0)
    parts = [f"{counts.get('finished', 0)} of {denom} finished"]
    parts += [f"{counts[s]} {s}" for s in STATUSES[1:] if counts.get(s)]
    if denom > total:
        parts.append(f"{denom - total} not started")
    return ", ".join(parts)


def _norm(label: Any) -> str:
    """A label as compared between the study file and MLflow's string params (0.05 == 5e-2 == "0.05")."""
    text = str(label)
    try:
        return f"{float(text):.10g}"
    except ValueError:
        return text


def _expected_counts(records: StudyRecords) -> dict[tuple, int]:
    """Trials the study file asks for, per normalised (row, *columns) label; {} when it cannot tell (a search)."""
    spec = records.spec
    if spec is None or not hasattr(spec, "expand") or getattr(spec, "search", None):
        return {}
    layout = records.layout
    try:
        trials = spec.expand()
    except Exception:  # noqa: BLE001 - the report still works from the records alone
        return {}
    out: dict[tuple, int] = {}
    for t in trials:
        labels = []
        for key in (layout.rows, *layout.columns):
            if key == "variant":
                value = getattr(t, "variant", None) or "base"
            elif key == "seed":
                value = getattr(t, "seed", None)
            else:
                axes = getattr(t, "axes", {}) or {}
                value = axes.get(key)
                if value is None and getattr(t, "cfg", None) is not None:
                    value = t.cfg.flat().get(key)
            if value is None:
                return {}
            labels.append(_norm(value))
        out[tuple(labels)] = out.get(tuple(labels), 0) + 1
    return out


def _order_key(records: StudyRecords, key: str, seen: Sequence[str] = ()) -> Any:
    """Sort key for the labels of ``key`` ("variant" or an axis key): the study file's order, else the
    order the trials were recorded in (variants) or numeric/alphabetic order (axis values)."""
    spec = records.spec
    order: list[Any] = []
    if spec is not None:
        if key == "variant":
            order = list(getattr(spec, "variants", None) or {})
        else:
            order = list((getattr(spec, "axes", None) or {}).get(key, []))
    if not order and key == "variant":
        order = list(dict.fromkeys(seen))
    rank = {_norm(v): i for i, v in enumerate(order)}
    return lambda label: (rank.get(_norm(label), len(rank)), _label_sort_key(str(label)))


def aggregate(records: StudyRecords, frame: pd.DataFrame, reference: dict[str, Any]) -> pd.DataFrame:
    """One row per (row, *column) label: mean, std, n, paper, diff per value; status counts; cost."""
    layout = records.layout
    col_keys = [f"col{i}" for i in range(len(layout.columns))]
    group_keys = ["row", *col_keys]
    expected = _expected_counts(records)
    out = []
    if not frame.empty:
        grouped = frame.groupby(group_keys, sort=False, dropna=False)
        for key, group in grouped:
            key = key if isinstance(key, tuple) else (key,)
            rec: dict[str, Any] = {"row": key[0]}
            for i, col in enumerate(layout.columns):
                rec[col] = key[1 + i]
            variants = list(dict.fromkeys(group["variant"]))
            if layout.columns:  # pivoted: only "<row> / <column>" names one cell of the paper's table
                labels = [" / ".join(str(k) for k in key)]
            else:
                labels = [str(key[0])] + (variants if len(variants) == 1 else [])
            paper = paper_values(reference, layout.paper, labels)
            for value in layout.values:
                series = group[value].dropna()
                rec[f"{value}_mean"] = series.mean() if len(series) else math.nan
                rec[f"{value}_std"] = series.std(ddof=1) if len(series) > 1 else math.nan
                rec[f"{value}_n"] = int(len(series))
                ref = paper.get(value)
                rec[f"{value}_paper"] = float(ref) if isinstance(ref, (int, float)) else math.nan
                rec[f"{value}_diff"] = rec[f"{value}_mean"] - rec[f"{value}_paper"]
            counts = group["status"].value_counts().to_dict()
            for s in STATUSES:
                rec[s] = int(counts.get(s, 0))
            rec["trials"] = int(len(group))
            rec["expected"] = expected.get(tuple(_norm(k) for k in key))
            rec["status"] = status_text(counts, rec["expected"])
            rec["paper_note"] = "derived" if paper.get("derived") else ""
            rec["gpu_h"] = float(group["gpu_h"].sum())
            rec["cpu_h"] = float(group["cpu_h"].sum())
            out.append(rec)
    # rows the study asks for but that have no record at all
    recorded = {tuple(_norm(r.get(k, "")) for k in ("row", *layout.columns)) for r in out}
    for key, n in expected.items():
        if key not in recorded:
            rec = {"row": key[0], **{c: key[1 + i] for i, c in enumerate(layout.columns)}}
            paper = paper_values(reference, layout.paper, [" / ".join(key)])
            for value in layout.values:
                ref = paper.get(value)
                rec.update(
                    {
                        f"{value}_mean": math.nan,
                        f"{value}_std": math.nan,
                        f"{value}_n": 0,
                        f"{value}_paper": float(ref) if isinstance(ref, (int, float)) else math.nan,
                        f"{value}_diff": math.nan,
                    }
                )
            rec.update({s: 0 for s in STATUSES})
            rec.update(trials=0, expected=n, status=status_text({}, n), paper_note="", gpu_h=0.0, cpu_h=0.0)
            out.append(rec)
    columns = ["row", *layout.columns]
    for value in layout.values:
        columns += [f"{value}_{s}" for s in ("mean", "std", "n", "paper", "diff")]
    columns += [*STATUSES, "trials", "expected", "status", "paper_note", "gpu_h", "cpu_h"]
    table = pd.DataFrame(out, columns=columns)
    if not table.empty:
        keys = {"row": _order_key(records, layout.rows, list(frame["row"]) if not frame.empty else [])}
        keys.update({c: _order_key(records, c) for c in layout.columns})
        table = table.sort_values(
            ["row", *layout.columns], key=lambda col: col.map(keys[col.name]), kind="stable"
        ).reset_index(drop=True)
    # the table's total: all trials, plus stage-I runs no recorded trial accounts for
    extra_gpu, extra_cpu = unattributed_stage1(records)
    counts = frame["status"].value_counts().to_dict() if not frame.empty else {}
    expected_total = sum(expected.values()) if expected else None
    total = {"row": "total", **{c: "" for c in layout.columns}}
    for value in layout.values:
        total.update(
            {
                f"{value}_mean": math.nan,
                f"{value}_std": math.nan,
                f"{value}_n": int(frame[value].notna().sum()) if not frame.empty else 0,
                f"{value}_paper": math.nan,
                f"{value}_diff": math.nan,
            }
        )
    total.update({s: int(counts.get(s, 0)) for s in STATUSES})
    total.update(
        trials=int(len(frame)),
        expected=expected_total,
        status=status_text(counts, expected_total),
        paper_note="",
        gpu_h=float(frame["gpu_h"].sum() if not frame.empty else 0.0) + extra_gpu,
        cpu_h=float(frame["cpu_h"].sum() if not frame.empty else 0.0) + extra_cpu,
    )
    return pd.concat([table, pd.DataFrame([total], columns=columns)], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def format_cell(mean: float, std: float, n: int, digits: int = 2) -> str:
    """ "68.20 ± 0.35" (n >= 2), "68.20" (n = 1), "–" (no finished trial)."""
    if not n or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n < 2 or std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_cost(gpu_h: float, cpu_h: float) -> str:
    """ "1.23 GPU-h", "0.0412 CPU-h", or both."""
    parts = []
    if gpu_h > 0:
        parts.append(f"{gpu_h:.3g} GPU-h")
    if cpu_h > 0 or not parts:
        parts.append(f"{cpu_h:.3g} CPU-h")
    return " + ".join(parts)


def _metric_label(key: str) -> str:
    if key.startswith("eval/"):
        parts = key.split("/")
        if len(parts) == 3:
            return f"{parts[1]} {METRIC_NAMES.get(parts[2], parts[2])}"
    return METRIC_NAMES.get(key, key)


def display_table(table: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """The table as a person reads it: one line per row label, formatted cells, cost, trials."""
    row_name = "variant" if layout.rows == "variant" else layout.rows
    lines = []
    body, total = table.iloc[:-1], table.iloc[-1]
    col_names = layout.columns

    def paper_columns(sub: pd.DataFrame) -> dict[str, bool]:
        return {v: bool(sub[f"{v}_paper"].notna().any()) for v in layout.values}

    def cells(sub: pd.DataFrame, prefix: str, has_paper: dict[str, bool]) -> dict[str, str]:
        out: dict[str, str] = {}
        r = sub.iloc[0] if len(sub) else None
        for v in layout.values:
            name = _metric_label(v)
            if r is None:
                out[prefix + name] = "–"
            else:
                out[prefix + name] = format_cell(r[f"{v}_mean"], r[f"{v}_std"], int(r[f"{v}_n"]))
            if has_paper[v]:
                paper = r[f"{v}_paper"] if r is not None else math.nan
                diff = r[f"{v}_diff"] if r is not None else math.nan
                mark = "*" if r is not None and r["paper_note"] else ""
                out[prefix + f"paper {name}"] = "" if math.isnan(paper) else f"{paper:.1f}{mark}"
                out[prefix + f"Δ {name}"] = "" if math.isnan(diff) else f"{diff:+.2f}"
        return out

    if not col_names:
        for _, r in body.iterrows():
            line = {row_name: r["row"]}
            line.update(cells(body.loc[[_]], "", paper_columns(body)))
            ns = [int(r[f"{v}_n"]) for v in layout.values]
            line["n"] = str(min(ns)) if ns else ""
            line["trials"] = r["status"]
            line["cost"] = format_cost(r["gpu_h"], r["cpu_h"])
            lines.append(line)
    else:
        combos = list(dict.fromkeys(tuple(r[c] for c in col_names) for _, r in body.iterrows()))
        combo_paper = {}
        for combo in combos:
            match = body
            for c, val in zip(col_names, combo):
                match = match[match[c] == val]
            combo_paper[combo] = paper_columns(match)
        n_header = "n (" + ", ".join("/".join(str(v) for v in combo) for combo in combos) + ")"
        for label in dict.fromkeys(body["row"]):
            sub = body[body["row"] == label]
            line = {row_name: label}
            for combo in combos:
                match = sub
                for c, val in zip(col_names, combo):
                    match = match[match[c] == val]
                prefix = ", ".join(f"{val}" for val in combo) + ": "
                line.update(cells(match, prefix, combo_paper[combo]))
            ns = []
            for combo in combos:
                match = sub
                for c, val in zip(col_names, combo):
                    match = match[match[c] == val]
                ns.append(str(int(match[f"{layout.values[0]}_n"].iloc[0])) if len(match) else "0")
            line[n_header] = ", ".join(ns)
            counts = {s: int(sub[s].sum()) for s in STATUSES}
            exp = sub["expected"].dropna()
            line["trials"] = status_text(counts, int(exp.sum()) if len(exp) else None)
            line["cost"] = format_cost(float(sub["gpu_h"].sum()), float(sub["cpu_h"].sum()))
            lines.append(line)
    frame = pd.DataFrame(lines)
    total_line = {c: "" for c in frame.columns} if len(frame.columns) else {}
    total_line.update(
        {row_name: "total", "trials": total["status"], "cost": format_cost(total["gpu_h"], total["cpu_h"])}
    )
    return pd.concat([frame, pd.DataFrame([total_line])], ignore_index=True).fillna("")


def to_latex(display: pd.DataFrame, layout: Layout, label: str) -> str:
    """Booktabs LaTeX through pandas' Styler."""
    styler = display.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    caption = layout.title.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
    tex = styler.to_latex(
        hrules=True,
        caption=caption,
        label=f"tab:{label}",
        position_float="centering",
        column_format="l" + "r" * (len(display.columns) - 1),
    )
    tex = tex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")
    return tex.replace("\ntotal &", "\n\\midrule\ntotal &")


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _line_x_key(records: StudyRecords) -> str:
    layout = records.layout
    if layout.rows not in ("variant", "seed"):
        return layout.rows
    for attr in ("axes", "grid"):
        axes = _spec_attr(records.spec, attr)
        if isinstance(axes, dict) and axes:
            return str(next(iter(axes)))
    return layout.rows


def plot_line(records: StudyRecords, frame: pd.DataFrame, out: Path, reference: dict[str, Any]) -> Path | None:
    """Fig. 7 style: each value (rank-1, mAP) against the first axis, mean +- std over seeds."""
    layout = records.layout
    x_key = _line_x_key(records)
    fin = frame[frame["status"] == "finished"].copy()
    if fin.empty:
        return None
    if x_key != layout.rows:
        by_id = {r.info.run_id: r for r in records.trials}
        fin["row"] = fin["run_id"].map(lambda i: _axis_value(by_id[i], x_key))
    values = [v for v in layout.values if fin[v].notna().any()]
    if not values:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 3.4), squeeze=False)
    series_keys = [f"col{i}" for i in range(len(layout.columns))]
    groups = fin.groupby(series_keys, sort=True) if series_keys else [((), fin)]
    xs_all = sorted(dict.fromkeys(fin["row"]), key=_label_sort_key)
    numeric = all(_label_sort_key(x)[0] == 0 for x in xs_all)
    pos = {x: i for i, x in enumerate(xs_all)}
    chosen = (reference.get(layout.paper or "", {}) or {}).get("chosen")
    for ax, value in zip(axes[0], values):
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            stats = g.groupby("row")[value].agg(["mean", "std", "count"])
            stats = stats.loc[sorted(stats.index, key=_label_sort_key)]
            label = ", ".join(f"{c}={k}" for c, k in zip(layout.columns, key)) or None
            ax.errorbar(
                [pos[x] for x in stats.index],
                stats["mean"],
                yerr=stats["std"].fillna(0.0),
                marker="o",
                capsize=3,
                label=label,
            )
        if chosen is not None and numeric:
            match = [x for x in xs_all if math.isclose(float(x), float(chosen))]
            if match:
                ax.axvline(pos[match[0]], color="grey", linestyle=":", label=f"paper's choice {chosen}")
        ax.set_xticks(range(len(xs_all)), xs_all)
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{_metric_label(value)} (%)")
        ax.set_title(_metric_label(value))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(layout.title, fontsize=10)
    fig.tight_layout()
    path = out / "fig7_line.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _set_label(s: str) -> str:
    return s if "_" not in s else "[" + ", ".join(s.split("_")) + "]"


def plot_layers(records: StudyRecords, out: Path) -> list[Path]:
    """Fig. 8 style bars: (a) each layer's feature, (b) F5 concatenated with shallower ones; per row label."""
    paths = []
    fin = [r for r in records.trials if trial_status(r) == "finished"]
    if not fin:
        return paths
    labels = list(dict.fromkeys(_axis_value(r, records.layout.rows) for r in fin))
    plt = _pyplot()
    for label in labels:
        runs = [r for r in fin if _axis_value(r, records.layout.rows) == label]
        panels = [("(a) features of single layers", SINGLE_SETS), ("(b) concatenated features", CONCAT_SETS)]
        present = [
            (t, [s for s in sets if any(f"eval/{s}/rank1" in r.data.metrics for r in runs)]) for t, sets in panels
        ]
        present = [(t, sets) for t, sets in present if sets]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 3.6), squeeze=False)
        for ax, (title, sets) in zip(axes[0], present):
            width = 0.38
            for j, metric in enumerate(("rank1", "mAP")):
                vals = [
                    [r.data.metrics[f"eval/{s}/{metric}"] for r in runs if f"eval/{s}/{metric}" in r.data.metrics]
                    for s in sets
                ]
                means = [sum(v) / len(v) if v else math.nan for v in vals]
                stds = [pd.Series(v).std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
                xs = [i + (j - 0.5) * width for i in range(len(sets))]
                bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=_metric_label(metric))
                ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
            ax.set_xticks(range(len(sets)), [_set_label(s) for s in sets])
            ax.set_ylabel("%")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(0, min(105, max(ax.get_ylim()[1] * 1.12, 1)))
            ax.legend(fontsize=8, loc="upper left")
            ax.grid(axis="y", alpha=0.3)
        n = len(runs)
        fig.suptitle(f"{records.layout.title} - {label} (mean over {n} seed{'s' if n > 1 else ''})", fontsize=10)
        fig.tight_layout()
        path = out / (f"fig8_layers_{_slug(label)}.png" if len(labels) > 1 else "fig8_layers.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _history(client, run_id: str, key: str) -> pd.Series:
    hist = client.get_metric_history(run_id, key)
    if not hist:
        return pd.Series(dtype=float)
    s = pd.Series({m.step: m.value for m in sorted(hist, key=lambda m: (m.step, m.timestamp))})
    return s.sort_index()


def _curve_keys(runs: list[Any], prefixes: Sequence[str], limit: int = 6) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.metrics if any(k.startswith(p) for p in prefixes)})
    # the total loss first, then its terms
    keys.sort(key=lambda k: (not k.endswith("/loss"), k))
    return keys[:limit]


def plot_curves(records: StudyRecords, out: Path) -> list[Path]:
    """Training curves per stage from the metric history: stage I per stage-I run, stage II per row (mean over seeds)."""
    client = _client(records.tracking_uri)
    paths = []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    stage1_runs = sorted(
        records.stage1.values(), key=lambda r: (_int(_tag(r, "pfe.seed"), 0), _tag(r, "pfe.stage1_key") or "")
    )
    for stage, runs, group_of in (
        (1, stage1_runs, lambda r: f"seed {_tag(r, 'pfe.seed', '?')} ({(_tag(r, 'pfe.stage1_key') or '')[:8]})"),
        (2, records.trials, lambda r: _axis_value(r, records.layout.rows)),
    ):
        keys = _curve_keys(runs, (f"train/stage{stage}/",))
        if stage == 1:
            keys += [k for k in _curve_keys(runs, ("eval/F5/rank1",), 1)]
        else:
            keys += [k for k in _curve_keys(runs, (f"eval/{FINAL_SET}/rank1",), 1)]
        curves: dict[str, dict[str, list[pd.Series]]] = {}
        for r in runs:
            for key in keys:
                s = _history(client, r.info.run_id, key)
                if len(s) > 1:
                    curves.setdefault(key, {}).setdefault(group_of(r), []).append(s)
        if not curves:
            continue
        keys = [k for k in keys if k in curves]
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            for label, series in curves[key].items():
                df = pd.concat(series, axis=1)
                mean = df.mean(axis=1)
                line = ax.plot(
                    mean.index,
                    mean.values,
                    marker="o" if len(mean) <= 12 else None,
                    markersize=3,
                    label=f"{label} (n={len(series)})" if len(series) > 1 else label,
                )
                if len(series) > 1:
                    std = df.std(axis=1, ddof=1).fillna(0.0)
                    ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=line[0].get_color())
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            fig.legend(
                handles[:12], labels[:12], loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False
            )
        fig.suptitle(f"{records.layout.title} - stage {'I' if stage == 1 else 'II'} training", fontsize=10)
        extra = 0.06 * math.ceil(min(len(handles), 12) / 4) if handles else 0.0
        fig.tight_layout(rect=(0, min(extra / nrows + 0.04, 0.3), 1, 1))
        path = out / f"curves_stage{stage}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "study"


@dataclass
class StudyOutput:
    name: str
    title: str
    folder: Path
    tables: dict[str, Path]
    plots: list[Path]
    display: pd.DataFrame
    summary: str


def _problem_lines(frame: pd.DataFrame) -> list[str]:
    lines = []
    for _, r in frame[frame["status"] != "finished"].iterrows():
        epochs = ""
        if r["epochs_done"] is not None and not pd.isna(r["epochs_done"]):
            epochs = f", {int(r['epochs_done'])} of {int(r['epochs_asked']) if not pd.isna(r['epochs_asked']) else '?'} epochs"
        lines.append(
            f"- {r['row']} (variant {r['variant']}, seed {r['seed']}): **{r['status']}**{epochs}; run `{r['run_id']}`"
        )
    return lines


def picture_link(artifact_uri: str, name: str, folder: Path) -> str:
    """Where a run's ``pictures/<name>`` is: a path relative to ``folder`` for a local artifact store,
    else the artifact URI."""
    parts = urlsplit(artifact_uri)
    if parts.scheme in ("", "file"):
        local = Path(url2pathname(parts.path)) / "pictures" / name
        return Path(os.path.relpath(local, folder.resolve())).as_posix()
    return f"{artifact_uri.rstrip('/')}/pictures/{name}"


def picture_lines(records: StudyRecords, folder: Path) -> list[str]:
    """One line per trial whose run carries pictures (tag ``pfe.pictures``, set by the study runner)."""
    lines = []
    for run in records.trials:
        names = [n for n in (_tag(run, "pfe.pictures") or "").split(",") if n]
        if not names:
            continue
        cell = " / ".join(_axis_value(run, key) for key in (records.layout.rows, *records.layout.columns))
        label = f"{cell} (seed {_tag(run, 'pfe.seed') or '?'})"
        links = ", ".join(f"[{n}]({picture_link(run.info.artifact_uri, n, folder)})" for n in names)
        lines.append(f"- {label}: {links}")
    return lines


def write_study(
    records: StudyRecords, out_root: Path, formats: Sequence[str], reference: dict[str, Any]
) -> StudyOutput:
    """Write one study's table files, plots and page."""
    layout = records.layout
    folder = out_root / _slug(records.name)
    folder.mkdir(parents=True, exist_ok=True)
    frame = trial_frame(records)
    table = aggregate(records, frame, reference)
    display = display_table(table, layout)
    tables: dict[str, Path] = {}
    md_table = display.to_markdown(index=False, disable_numparse=True)
    if "md" in formats:
        tables["md"] = folder / "table.md"
        tables["md"].write_text(f"# {layout.title}\n\n{md_table}\n")
    if "csv" in formats:
        tables["csv"] = folder / "table.csv"
        table.to_csv(tables["csv"], index=False)
    if "tex" in formats:
        tables["tex"] = folder / "table.tex"
        tables["tex"].write_text(to_latex(display, layout, _slug(records.name)))
    plots: list[Path] = []
    if layout.plot == "line":
        p = plot_line(records, frame, folder, reference)
        plots += [p] if p else []
    elif layout.plot == "layers":
        plots += plot_layers(records, folder)
    plots += plot_curves(records, folder)

    # the study's page
    ref_table = reference.get(layout.paper or "", {}) if layout.paper else {}
    lines = [f"# {layout.title}", ""]
    meta = [f"study `{records.name}`", f"tracking `{records.tracking_uri}` (experiment {records.experiment_id})"]
    if records.parent is not None:
        meta.append(f"parent run `{records.parent.info.run_id}`")
    if records.study_file:
        meta.append(f"file `{records.study_file}`")
    lines += ["; ".join(meta) + ".", "", md_table, ""]
    lines += [
        "Cells: mean ± sample standard deviation over the seeds whose trial finished; n = their number. "
        "Cost: each trial's own wall time plus its share of the stage-I run it reused (stage-I time / trials "
        "sharing it), in GPU-hours (times the GPU fraction) on a GPU, else CPU-hours; the total includes every "
        "trial, finished or not.",
    ]
    if layout.paper:
        src = ref_table.get("source") if isinstance(ref_table, dict) else None
        if ref_table:
            lines.append(
                f"Paper: `{layout.paper}` in reports/paper_reference.yaml ({src or 'no source given'}); "
                "Δ = this study's mean - the paper's number; * = a number derived from a difference the "
                "paper's text states (see the reference file)."
            )
        else:
            lines.append(f"Paper: no table `{layout.paper}` in reports/paper_reference.yaml.")
    deltas = paper_deltas(reference, layout.paper)
    if deltas:
        lines += [
            "",
            "## Differences the paper states",
            "",
            delta_table(table, layout, deltas).to_markdown(index=False, disable_numparse=True),
        ]
    problems = _problem_lines(frame)
    if problems:
        lines += ["", "## Trials not finished", "", *problems]
    if records.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in records.notes]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    pictures = picture_lines(records, folder)
    if pictures:
        lines += ["", "## Pictures", "", "Activation maps (A_s, M_s) and retrieval grids of the finished trials:", ""]
        lines += pictures
    if tables:
        lines += ["", "Files: " + ", ".join(f"[{p.name}]({p.name})" for p in tables.values())]
    (folder / "index.md").write_text("\n".join(lines) + "\n")
    total = table.iloc[-1]
    summary = f"{total['status']}; {format_cost(total['gpu_h'], total['cpu_h'])}"
    return StudyOutput(records.name, layout.title, folder, tables, plots, display, summary)


def write_index(out_root: Path, outputs: list[StudyOutput]) -> list[Path]:
    """index.md and index.html linking every study's page, tables and plots."""
    md = ["# pfe-study reports", ""]
    if not outputs:
        md.append("No study found in the tracking store.")
    for o in outputs:
        rel = o.folder.relative_to(out_root)
        md += [f"## [{o.title}]({rel.as_posix()}/index.md)", "", f"Study `{o.name}`: {o.summary}.", ""]
        links = [f"[{k}]({(rel / p.name).as_posix()})" for k, p in o.tables.items()]
        links += [f"[{p.stem}]({(rel / p.name).as_posix()})" for p in o.plots]
        if links:
            md += ["Files: " + ", ".join(links), ""]
    (out_root / "index.md").write_text("\n".join(md) + "\n")
    body = ["<h1>pfe-study reports</h1>"]
    for o in outputs:
        rel = o.folder.relative_to(out_root).as_posix()
        body.append(f'<h2 id="{html.escape(o.name)}">{html.escape(o.title)}</h2>')
        body.append(
            f"<p>Study <code>{html.escape(o.name)}</code>: {html.escape(o.summary)}. "
            + " ".join(f'<a href="{rel}/{p.name}">{k}</a>' for k, p in o.tables.items())
            + "</p>"
        )
        body.append(
            o.display.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1).to_html()
        )
        body += [f'<p><img src="{rel}/{p.name}" alt="{p.stem}" style="max-width:100%"></p>' for p in o.plots]
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
    )
    (out_root / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>pfe-study reports</title><style>{style}</style>"
        f"</head><body>{''.join(body)}</body></html>\n"
    )
    return [out_root / "index.md", out_root / "index.html"]


def cli_report(args: argparse.Namespace) -> int:
    """`pfe-study report [STUDY ...] [--out DIR] [--format md,csv,tex] [--tracking-uri URI]`."""
    formats = [f.strip().lower() for f in str(args.format or "").split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"--format: unknown {', '.join(bad)}; use a comma-separated subset of {', '.join(FORMATS)}")
    if "md" in formats:
        try:
            import tabulate  # noqa: F401 - DataFrame.to_markdown needs it
        except ImportError:
            raise PFEError("--format md needs the 'tabulate' package: pip install tabulate") from None
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    reference = load_reference()
    if args.studies:
        all_records = [records_for_study_file(p, args.tracking_uri) for p in args.studies]
    else:
        uri = args.tracking_uri or default_tracking_uri()
        all_records = records_in_store(uri)
        if not all_records:
            print(f"pfe-study report: no study (run tagged pfe.role=study) in {uri}", file=sys.stderr)
    outputs = [write_study(r, out_root, formats, reference) for r in all_records]
    index = write_index(out_root, outputs)
    for o in outputs:
        print(f"{o.name}: {o.summary} -> {o.folder / 'index.md'}")
    print(f"index: {index[0]}")
    return 0
