"""The study's figures: Fig. 7 style lines, Fig. 8 style bars per layer, and training curves from the
metric history (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pfe.config import FINAL_SET
from pfe.study.report.records import (
    CONCAT_SETS,
    SINGLE_SETS,
    StudyRecords,
    as_int,
    axis_value,
    slug,
    spec_attr,
    tag,
    trial_status,
)
from pfe.study.report.tables import label_sort_key, metric_label
from pfe.study.uris import open_client


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
        axes = spec_attr(records.spec, attr)
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
        fin["row"] = fin["run_id"].map(lambda i: axis_value(by_id[i], x_key))
    values = [v for v in layout.values if fin[v].notna().any()]
    if not values:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(4.2 * len(values), 3.4), squeeze=False)
    series_keys = [f"col{i}" for i in range(len(layout.columns))]
    groups = fin.groupby(series_keys, sort=True) if series_keys else [((), fin)]
    xs_all = sorted(dict.fromkeys(fin["row"]), key=label_sort_key)
    numeric = all(label_sort_key(x)[0] == 0 for x in xs_all)
    pos = {x: i for i, x in enumerate(xs_all)}
    chosen = (reference.get(layout.paper or "", {}) or {}).get("chosen")
    for ax, value in zip(axes[0], values):
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            stats = g.groupby("row")[value].agg(["mean", "std", "count"])
            stats = stats.loc[sorted(stats.index, key=label_sort_key)]
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
        ax.set_ylabel(f"{metric_label(value)} (%)")
        ax.set_title(metric_label(value))
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
    labels = list(dict.fromkeys(axis_value(r, records.layout.rows) for r in fin))
    plt = _pyplot()
    for label in labels:
        runs = [r for r in fin if axis_value(r, records.layout.rows) == label]
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
                bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=metric_label(metric))
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
        path = out / (f"fig8_layers_{slug(label)}.png" if len(labels) > 1 else "fig8_layers.png")
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
    client = open_client(records.tracking_uri)
    paths = []
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    stage1_runs = sorted(
        records.stage1.values(), key=lambda r: (as_int(tag(r, "pfe.seed"), 0), tag(r, "pfe.stage1_key") or "")
    )
    for stage, runs, group_of in (
        (1, stage1_runs, lambda r: f"seed {tag(r, 'pfe.seed', '?')} ({(tag(r, 'pfe.stage1_key') or '')[:8]})"),
        (2, records.trials, lambda r: axis_value(r, records.layout.rows)),
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
