"""A study's table: one row per trial (status, values, cost), aggregated per row label (mean +- std
over seeds, status counts, cost), beside the paper's numbers (reports/paper_reference.yaml), and
formatted for people (Markdown, LaTeX)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pfe.errors import ConfigError
from pfe.study.report.records import (
    STATUSES,
    StudyRecords,
    as_float,
    as_int,
    axis_value,
    tag,
    trial_status,
)
from pfe.study.spec import ReportLayout

METRIC_NAMES = {"rank1": "rank-1", "rank5": "rank-5", "rank10": "rank-10"}
REFERENCE_FILE = Path("reports") / "paper_reference.yaml"


# ---------------------------------------------------------------------------------------------
# one row per trial, with its cost
# ---------------------------------------------------------------------------------------------
def is_gpu(device_kind: str | None) -> bool:
    kind = (device_kind or "").strip().lower()
    return bool(kind) and kind != "cpu" and not kind.startswith("cpu")


def device_hours(wall_s: float, device_kind: str | None, gpu_fraction: Any) -> tuple[float, float]:
    """(GPU-hours, CPU-hours) of ``wall_s`` seconds on that device; GPU time times its fraction."""
    hours = max(wall_s, 0.0) / 3600.0
    if is_gpu(device_kind):
        frac = as_float(gpu_fraction, 1.0)
        return hours * (frac if frac > 0 else 1.0), 0.0
    return 0.0, hours


def trial_frame(records: StudyRecords) -> pd.DataFrame:
    """One row per trial: labels, status, the layout's values (finished trials only), costs."""
    layout = records.layout
    rows = []
    for run in records.trials:
        status = trial_status(run)
        sid = tag(run, "pfe.stage1_run_id")
        s1 = records.stage1.get(sid) if sid else None
        gpu_h, cpu_h = device_hours(
            as_float(tag(run, "pfe.wall_s")), tag(run, "pfe.device_kind"), tag(run, "pfe.gpu_fraction")
        )
        if s1 is not None:
            shared = max(as_int(tag(s1, "pfe.shared_by"), 1) or 1, 1)
            g1, c1 = device_hours(
                as_float(tag(s1, "pfe.wall_s")) / shared, tag(s1, "pfe.device_kind"), tag(s1, "pfe.gpu_fraction")
            )
            gpu_h, cpu_h = gpu_h + g1, cpu_h + c1
        row: dict[str, Any] = {
            "row": axis_value(run, layout.rows),
            "variant": tag(run, "pfe.variant") or "base",
            "seed": tag(run, "pfe.seed") or run.data.params.get("runtime.seed", "?"),
            "status": status,
            "epochs_done": as_int(tag(run, "pfe.epochs_done")),
            "epochs_asked": as_int(tag(run, "pfe.epochs_asked")),
            "gpu_h": gpu_h,
            "cpu_h": cpu_h,
            "run_id": run.info.run_id,
            "stage1_run_id": sid,
        }
        for i, key in enumerate(layout.columns):
            row[f"col{i}"] = axis_value(run, key)
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
        sid = tag(run, "pfe.stage1_run_id")
        if sid:
            used[sid] = used.get(sid, 0) + 1
    gpu_h = cpu_h = 0.0
    for sid, s1 in records.stage1.items():
        shared = max(as_int(tag(s1, "pfe.shared_by"), 1) or 1, 1)
        missing = max(shared - used.get(sid, 0), 0)
        g, c = device_hours(
            as_float(tag(s1, "pfe.wall_s")) * missing / shared, tag(s1, "pfe.device_kind"), tag(s1, "pfe.gpu_fraction")
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
    rows = {norm_label(k): v for k, v in (reference[table].get("rows") or {}).items()}
    for label in labels:
        row = rows.get(norm_label(label))
        if isinstance(row, dict):
            return row
    return {}


def paper_deltas(reference: dict[str, Any], table: str | None) -> list[dict[str, Any]]:
    """The differences between two rows that the paper's text states (``deltas:`` of the table)."""
    if not table or table not in reference:
        return []
    return [d for d in (reference[table].get("deltas") or []) if isinstance(d, dict) and "plus" in d and "minus" in d]


def delta_table(table: pd.DataFrame, layout: ReportLayout, deltas: list[dict[str, Any]]) -> pd.DataFrame:
    """The paper's stated differences beside this study's (plus - minus of the means)."""
    body = table.iloc[:-1]
    means = {}
    for _, r in body.iterrows():
        label = norm_label(_group_label(r, layout))
        means[label] = r
    lines = []
    for d in deltas:
        plus, minus = means.get(norm_label(d["plus"])), means.get(norm_label(d["minus"]))
        for metric, stated in d.items():
            if metric in ("plus", "minus", "source") or not isinstance(stated, (int, float)):
                continue
            here = math.nan
            if plus is not None and minus is not None and f"{metric}_mean" in plus:
                here = plus[f"{metric}_mean"] - minus[f"{metric}_mean"]
            lines.append(
                {
                    "difference": f"{d['plus']} - {d['minus']}",
                    "metric": metric_label(metric),
                    "paper": f"{stated:+.1f}",
                    "here": "–" if math.isnan(here) else f"{here:+.2f}",
                    "source": str(d.get("source", "")),
                }
            )
    return pd.DataFrame(lines, columns=["difference", "metric", "paper", "here", "source"])


def _group_label(rec: Any, layout: ReportLayout) -> str:
    """A table row's label as the reference file keys it: the row, or "<row> / <column> ..." when pivoted."""
    return " / ".join(str(rec[k]) for k in ["row", *layout.columns])


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------
def label_sort_key(label: str) -> tuple:
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def status_text(counts: dict[str, int], expected: int | None = None, blocked: int = 0, blocking: str = "") -> str:
    """ "2 of 3 finished, 1 failed" (expected counts trials not recorded as "not started"); ``blocked`` of
    those were not started because their stage I ended ``blocking`` ("1 not started (stage I failed)")."""
    total = sum(counts.values())
    denom = max(total, expected or 0)
    parts = [f"{counts.get('finished', 0)} of {denom} finished"]
    parts += [f"{counts[s]} {s}" for s in STATUSES[1:] if counts.get(s)]
    if denom > total:
        missing = denom - total
        text = f"{missing} not started"
        if blocked:
            text += f" (stage I {blocking})" if blocked >= missing else f" ({blocked}: stage I {blocking})"
        parts.append(text)
    return ", ".join(parts)


def join_statuses(statuses: Any) -> str:
    """ "failed", "failed/incomplete": the distinct statuses in ``statuses`` (strings, "/"-joined ones too)."""
    seen = {part for text in statuses for part in str(text).split("/") if part in STATUSES}
    return "/".join(s for s in STATUSES if s in seen)


def norm_label(label: Any) -> str:
    """A label as compared between the study file and MLflow's string params (0.05 == 5e-2 == "0.05")."""
    text = str(label)
    try:
        return f"{float(text):.10g}"
    except ValueError:
        return text


def expected_trials(records: StudyRecords) -> list[Any]:
    """The trials the study file asks for (pfe.study.spec.Trial); [] when it cannot tell (no file, a search)."""
    spec = records.spec
    if spec is None or not hasattr(spec, "expand") or getattr(spec, "search", None):
        return []
    try:
        return list(spec.expand())
    except Exception:  # noqa: BLE001 - the report still works from the records alone
        return []


def trial_labels(trial: Any, layout: ReportLayout) -> tuple[str, ...] | None:
    """A study-file trial's normalised (row, *columns) label; None when one of its keys has no value."""
    labels = []
    for key in (layout.rows, *layout.columns):
        if key == "variant":
            value = getattr(trial, "variant", None) or "base"
        elif key == "seed":
            value = getattr(trial, "seed", None)
        else:
            axes = getattr(trial, "axes", {}) or {}
            value = axes.get(key)
            if value is None and getattr(trial, "cfg", None) is not None:
                value = trial.cfg.flat().get(key)
        if value is None:
            return None
        labels.append(norm_label(value))
    return tuple(labels)


def expected_counts(records: StudyRecords) -> dict[tuple, int]:
    """Trials the study file asks for, per normalised (row, *columns) label; {} when it cannot tell (a search)."""
    out: dict[tuple, int] = {}
    for t in expected_trials(records):
        labels = trial_labels(t, records.layout)
        if labels is None:
            return {}
        out[labels] = out.get(labels, 0) + 1
    return out


def blocked_trials(records: StudyRecords) -> list[tuple[Any, Any]]:
    """(trial, stage-I run) per trial the study file asks for that has no record while its stage-I run
    (the newest with its ``pfe.stage1_key``) did not finish: the runner never starts those."""
    recorded = {tag(r, "pfe.trial_id") or tag(r, "pfe.config_hash") for r in records.trials}
    by_key: dict[str, Any] = {}
    for run in sorted(records.stage1.values(), key=lambda r: r.info.start_time or 0):
        by_key[tag(run, "pfe.stage1_key") or ""] = run
    out = []
    for t in expected_trials(records):
        s1 = by_key.get(getattr(t, "stage1_key", None) or "")
        if t.trial_id not in recorded and s1 is not None and trial_status(s1) != "finished":
            out.append((t, s1))
    return out


def blocked_lines(records: StudyRecords) -> list[str]:
    """One line per unfinished stage-I run that kept trials from starting: which, and why (``pfe.error``)."""
    groups: dict[str, list[Any]] = {}
    runs: dict[str, Any] = {}
    for t, s1 in blocked_trials(records):
        groups.setdefault(s1.info.run_id, []).append(t)
        runs[s1.info.run_id] = s1
    lines = []
    for run_id, trials in groups.items():
        s1 = runs[run_id]
        status = trial_status(s1)
        name = f", {s1.info.run_name}" if s1.info.run_name else ""
        why = {"failed": "failed", "incomplete": "did not finish", "running": "is still running"}[status]
        done, asked = as_int(tag(s1, "pfe.epochs_done")), as_int(tag(s1, "pfe.epochs_asked"))
        if status == "incomplete" and done is not None and asked:
            why += f" ({done} of {asked} epochs)"
        error = " ".join(line.strip() for line in (tag(s1, "pfe.error") or "").splitlines() if line.strip())
        if error:
            why += f": {error[:500]}"
        names = ", ".join(f"{t.label} seed {t.seed}" for t in trials)
        lines.append(f"- {len(trials)} not started ({names}): their stage I (run `{run_id}`{name}) {why}")
    return lines


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
    rank = {norm_label(v): i for i, v in enumerate(order)}
    return lambda label: (rank.get(norm_label(label), len(rank)), label_sort_key(str(label)))


def _paper_columns(
    reference: dict[str, Any], layout: ReportLayout, key: tuple, variants: Sequence[str]
) -> dict[str, Any]:
    """One table row's ``<value>_paper`` numbers and ``paper_note`` ("derived" or "")."""
    if layout.columns:  # pivoted: only "<row> / <column>" names one cell of the paper's table
        labels = [" / ".join(str(k) for k in key)]
    else:
        labels = [str(key[0])] + (list(variants) if len(variants) == 1 else [])
    paper = paper_values(reference, layout.paper, labels)
    out = {f"{v}_paper": float(paper[v]) if isinstance(paper.get(v), (int, float)) else math.nan for v in layout.values}
    return {**out, "paper_note": "derived" if paper.get("derived") else ""}


def aggregate(records: StudyRecords, frame: pd.DataFrame, reference: dict[str, Any]) -> pd.DataFrame:
    """One row per (row, *column) label: mean, std, n, paper, diff per value; status counts; cost."""
    layout = records.layout
    col_keys = [f"col{i}" for i in range(len(layout.columns))]
    keys = ["row", *col_keys]
    columns = ["row", *layout.columns]
    for value in layout.values:
        columns += [f"{value}_{s}" for s in ("mean", "std", "n", "paper", "diff")]
    columns += [*STATUSES, "trials", "expected", "blocked_by_stage1", "blocking_stage1", "status"]
    columns += ["paper_note", "gpu_h", "cpu_h"]
    expected = expected_counts(records)
    blocked: dict[tuple, list[str]] = {}  # label -> the stage-I status of each trial it kept from starting
    for trial, s1 in blocked_trials(records):
        labels = trial_labels(trial, layout)
        if labels is not None:
            blocked.setdefault(labels, []).append(trial_status(s1))

    # a label the study asks for that has no record joins as an empty placeholder, so it still gets a row (n = 0)
    recorded = {tuple(map(norm_label, k)) for k in frame[keys].itertuples(index=False, name=None)}
    placeholders = pd.DataFrame([k for k in expected if k not in recorded], columns=keys).reindex(columns=frame.columns)
    parts = [t for t in (frame.assign(trials=1), placeholders.assign(trials=0, gpu_h=0.0, cpu_h=0.0)) if len(t)]
    if parts:
        trials = pd.concat(parts, ignore_index=True)
        groups = trials.assign(**{s: trials["status"] == s for s in STATUSES}).groupby(keys, sort=False, dropna=False)
        # pd.Series.mean/std/sum, not "mean"/"std"/"sum": the grouped kernels round the last digit differently
        stats = groups[layout.values].agg([pd.Series.mean, pd.Series.std, "count"])
        stats.columns = [f"{v}_{'n' if s == 'count' else s}" for v, s in stats.columns]
        sums = groups[[*STATUSES, "trials", "gpu_h", "cpu_h"]].agg(pd.Series.sum)
        variants = groups["variant"].agg(lambda v: list(dict.fromkeys(v.dropna()))).rename("variants")
        table = pd.concat([stats, sums, variants], axis=1).reset_index()

        key_tuples = list(table[keys].itertuples(index=False, name=None))
        paper = [_paper_columns(reference, layout, k, v) for k, v in zip(key_tuples, table["variants"])]
        table = table.join(pd.DataFrame(paper, index=table.index))
        table["paper_note"] = table["paper_note"].where(table["trials"] > 0, "")  # placeholders: no note
        for value in layout.values:
            table[f"{value}_diff"] = table[f"{value}_mean"] - table[f"{value}_paper"]

        norm_keys = [tuple(map(norm_label, k)) for k in key_tuples]
        n_expected = [expected.get(k) for k in norm_keys]
        why = [blocked.get(k, []) for k in norm_keys]
        n_blocked = [min(len(w), max((n or 0) - t, 0)) for w, n, t in zip(why, n_expected, table["trials"])]
        blocking = [join_statuses(w) if b else "" for w, b in zip(why, n_blocked)]
        counts = [dict(zip(STATUSES, c)) for c in table[list(STATUSES)].itertuples(index=False, name=None)]
        table["expected"], table["blocked_by_stage1"], table["blocking_stage1"] = n_expected, n_blocked, blocking
        table["status"] = list(map(status_text, counts, n_expected, n_blocked, blocking))
        table = table.rename(columns=dict(zip(col_keys, layout.columns)))[columns]
        order = {"row": _order_key(records, layout.rows, list(frame["row"]))}
        order.update({c: _order_key(records, c) for c in layout.columns})
        table = table.sort_values(
            ["row", *layout.columns], key=lambda col: col.map(order[col.name]), kind="stable"
        ).reset_index(drop=True)
    else:
        table = pd.DataFrame(columns=columns)

    # the table's total: all trials, plus stage-I runs no recorded trial accounts for
    extra_gpu, extra_cpu = unattributed_stage1(records)
    counts = frame["status"].value_counts().to_dict()
    expected_total = sum(expected.values()) if expected else None
    total: dict[str, Any] = {"row": "total", **{c: "" for c in layout.columns}}
    for value in layout.values:
        total.update({f"{value}_{s}": math.nan for s in ("mean", "std", "paper", "diff")})
        total[f"{value}_n"] = int(frame[value].notna().sum())
    total.update({s: int(counts.get(s, 0)) for s in STATUSES})
    total.update(
        trials=len(frame),
        expected=expected_total,
        blocked_by_stage1=int(table["blocked_by_stage1"].sum()),
        blocking_stage1=join_statuses(table["blocking_stage1"]),
    )
    total.update(
        status=status_text(counts, expected_total, total["blocked_by_stage1"], total["blocking_stage1"]),
        paper_note="",
        gpu_h=float(frame["gpu_h"].sum()) + extra_gpu,
        cpu_h=float(frame["cpu_h"].sum()) + extra_cpu,
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


def metric_label(key: str) -> str:
    if key.startswith("eval/"):
        parts = key.split("/")
        if len(parts) == 3:
            return f"{parts[1]} {METRIC_NAMES.get(parts[2], parts[2])}"
    return METRIC_NAMES.get(key, key)


def display_table(table: pd.DataFrame, layout: ReportLayout) -> pd.DataFrame:
    """The table as a person reads it: one line per row label, formatted cells, cost, trials."""
    row_name = layout.rows
    body, total = table.iloc[:-1], table.iloc[-1]

    def has_paper(rows: pd.DataFrame) -> dict[str, bool]:
        return {v: bool(rows[f"{v}_paper"].notna().any()) for v in layout.values}

    def cells(r: pd.Series, prefix: str, paper_shown: dict[str, bool]) -> dict[str, str]:
        """One row's formatted values (a row of NaNs with n = 0 reads "–"), and the paper's where shown."""
        out: dict[str, str] = {}
        for v in layout.values:
            name = metric_label(v)
            out[prefix + name] = format_cell(r[f"{v}_mean"], r[f"{v}_std"], int(r[f"{v}_n"]))
            if paper_shown[v]:
                paper, diff, mark = r[f"{v}_paper"], r[f"{v}_diff"], "*" if r["paper_note"] else ""
                out[prefix + f"paper {name}"] = "" if math.isnan(paper) else f"{paper:.1f}{mark}"
                out[prefix + f"Δ {name}"] = "" if math.isnan(diff) else f"{diff:+.2f}"
        return out

    lines = []
    if not layout.columns:
        paper_shown = has_paper(body)
        for _, r in body.iterrows():
            ns = [int(r[f"{v}_n"]) for v in layout.values]
            line = {row_name: r["row"], **cells(r, "", paper_shown), "n": str(min(ns)) if ns else ""}
            lines.append({**line, "trials": r["status"], "cost": format_cost(r["gpu_h"], r["cpu_h"])})
    else:
        combos = list(dict.fromkeys(body[layout.columns].itertuples(index=False, name=None)))
        paper_shown = {combo: has_paper(rows) for combo, rows in body.groupby(layout.columns, sort=False)}
        n_header = "n (" + ", ".join("/".join(str(v) for v in combo) for combo in combos) + ")"
        n_cols = [f"{v}_n" for v in layout.values]
        combo_frame = pd.DataFrame(combos, columns=layout.columns)
        for label, rows in body.groupby("row", sort=False):
            # one row per column combination, in the table's order; a combination without a row: NaNs, n = 0
            by_combo = combo_frame.merge(rows, on=layout.columns, how="left").fillna(dict.fromkeys(n_cols, 0))
            line = {row_name: label}
            for combo, (_, r) in zip(combos, by_combo.iterrows()):
                line.update(cells(r, ", ".join(str(val) for val in combo) + ": ", paper_shown[combo]))
            line[n_header] = ", ".join(str(int(n)) for n in by_combo[n_cols[0]])
            expected = rows["expected"].dropna()
            line["trials"] = status_text(
                rows[list(STATUSES)].sum().to_dict(),
                int(expected.sum()) if len(expected) else None,
                int(rows["blocked_by_stage1"].sum()),
                join_statuses(rows["blocking_stage1"]),
            )
            line["cost"] = format_cost(float(rows["gpu_h"].sum()), float(rows["cpu_h"].sum()))
            lines.append(line)
    frame = pd.DataFrame(lines)
    total_line = {c: "" for c in frame.columns} if len(frame.columns) else {}
    total_line.update(
        {row_name: "total", "trials": total["status"], "cost": format_cost(total["gpu_h"], total["cpu_h"])}
    )
    return pd.concat([frame, pd.DataFrame([total_line])], ignore_index=True).fillna("")


def to_latex(display: pd.DataFrame, layout: ReportLayout, label: str) -> str:
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
