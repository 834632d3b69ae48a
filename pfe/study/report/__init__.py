"""`pfe-study report`: a study's tables and plots, from its MLflow records.

Per study (one folder under ``--out``): ``table.md``, ``table.csv``, ``table.tex`` (as asked with
``--format``), the plots as PNG, and ``index.md`` (the table, the notes, the plots); ``--out`` gets
an ``index.md`` and ``index.html`` linking every study. What a table shows is the study file's
``report:`` section (rows, columns, values, paper, plot); runs are read as the runner records
them (tags ``pfe.role``, ``pfe.study``, ``pfe.variant``, ``pfe.status``, ``pfe.wall_s``, ...).

A cell is the mean +- sample standard deviation (ddof 1) over the seeds whose trial finished,
with their number n. Trials that failed, stopped early or are still running are counted in the
row's ``trials`` column ("2 of 3 finished, 1 failed") and listed under the table, never dropped;
trials the study file asks for that have no record are "not started", and where their stage-I run
failed (or did not finish) the column says so and a line under the table names that run and its
``pfe.error``.
A row's cost is the sum over its trials (all of them, finished or not) of the trial's own
stage-II wall time plus its share of the stage-I run it started from (stage-I wall time /
``pfe.shared_by``), as GPU-hours (times the GPU fraction) where the device is a GPU, else CPU-hours.

``records`` reads the store, ``tables`` builds and formats the table, ``plots`` draws the figures;
this module writes each study's files and page, and the index.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pandas as pd

from pfe.errors import ConfigError, PFEError
from pfe.study.report.plots import plot_curves, plot_layers, plot_line
from pfe.study.report.records import (
    StudyRecords,
    axis_value,
    records_for_study_file,
    records_in_store,
    slug,
    tag,
)
from pfe.study.report.tables import (
    aggregate,
    blocked_lines,
    delta_table,
    display_table,
    format_cost,
    load_reference,
    paper_deltas,
    to_latex,
    trial_frame,
)
from pfe.study.uris import TrackingError, default_tracking_uri, mask_text, mask_uri

FORMATS = ("md", "csv", "tex")
__all__ = ["cli_report", "write_index", "write_study"]


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
        names = [n for n in (tag(run, "pfe.pictures") or "").split(",") if n]
        if not names:
            continue
        cell = " / ".join(axis_value(run, key) for key in (records.layout.rows, *records.layout.columns))
        label = f"{cell} (seed {tag(run, 'pfe.seed') or '?'})"
        links = ", ".join(f"[{n}]({picture_link(run.info.artifact_uri, n, folder)})" for n in names)
        lines.append(f"- {label}: {links}")
    return lines


def write_study(
    records: StudyRecords, out_root: Path, formats: Sequence[str], reference: dict[str, Any]
) -> StudyOutput:
    """Write one study's table files, plots and page."""
    layout = records.layout
    folder = out_root / slug(records.name)
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
        tables["tex"].write_text(to_latex(display, layout, slug(records.name)))
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
    problems = _problem_lines(frame) + blocked_lines(records)
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
    uri = args.tracking_uri or default_tracking_uri()
    from mlflow.exceptions import MlflowException

    try:
        if args.studies:
            all_records = [records_for_study_file(p, args.tracking_uri) for p in args.studies]
        else:
            all_records = records_in_store(uri)
            if not all_records:
                print(f"pfe-study report: no study (run tagged pfe.role=study) in {mask_uri(uri)}", file=sys.stderr)
        outputs = [write_study(r, out_root, formats, reference) for r in all_records]
    except MlflowException as err:  # a server that answered but refused (auth, permissions, a broken store)
        store = "the studies' tracking stores" if args.studies and not args.tracking_uri else mask_uri(uri)
        reason = mask_text((err.message.splitlines() or [""])[0], [uri])
        raise TrackingError(
            f"reading the MLflow records of {store} failed ({reason}); check that it is an MLflow tracking "
            "server you may read, or pass --tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the study"
        ) from None
    index = write_index(out_root, outputs)
    for o in outputs:
        print(f"{o.name}: {o.summary} -> {o.folder / 'index.md'}")
    print(f"index: {index[0]}")
    return 0
