"""`pfe-study eval`: evaluate a trained model (:mod:`pfe.engine.eval_checkpoint`) and, with ``--log-mlflow``, log
the metrics and pictures into the model's MLflow run.

Everything that can stop the command (the MLflow run, its tracking server, the output paths) is
checked before the features are extracted, so a long evaluation is never thrown away at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pfe.errors import PFEError
from pfe.study.uris import check_reachable, mask_uri, sqlite_path

MLFLOW_RUN_FILE = "mlflow_run.json"  # written by the study runner into each trial's run folder


def find_mlflow_run(path: str | Path) -> tuple[dict[str, str] | None, list[Path]]:
    """({tracking_uri, run_id} or None, the folders searched) for a checkpoint path.

    The study runner writes ``mlflow_run.json`` into each trial's run folder; it is looked for in
    the given folder (or the file's folder) and up to two folders above (``<run>/stage2/final.pt``).
    """
    path = Path(path).resolve()
    start = path if path.is_dir() else path.parent
    searched = [start, *list(start.parents)[:2]]
    for folder in searched:
        f = folder / MLFLOW_RUN_FILE
        if f.is_file():
            try:
                info = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise PFEError(f'{f}: unreadable ({err}); expected {{"tracking_uri": ..., "run_id": ...}}') from None
            if not isinstance(info, dict) or not info.get("run_id") or not info.get("tracking_uri"):
                raise PFEError(f'{f}: needs both "tracking_uri" and "run_id"')
            return {"tracking_uri": str(info["tracking_uri"]), "run_id": str(info["run_id"])}, searched
    return None, searched


def mlflow_target(path: str | Path) -> dict[str, str]:
    """The MLflow run to log to, or a PFEError that says why there is none."""
    found, searched = find_mlflow_run(path)
    if found:
        return found
    env_run, env_uri = os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_TRACKING_URI")
    if env_run and env_uri:
        return {"tracking_uri": env_uri, "run_id": env_run}
    where = ", ".join(str(p) for p in searched)
    raise PFEError(
        f"--log-mlflow: this model has no known MLflow run: no {MLFLOW_RUN_FILE} in {where}. Runs trained by "
        "`pfe-study run` carry one in their run folder; a model from `pfe-study train` has no MLflow run. "
        "Pass the run folder of a study trial, set MLFLOW_RUN_ID and MLFLOW_TRACKING_URI, or drop --log-mlflow."
    )


def check_target(target: dict[str, str]) -> None:
    """The run must exist on a reachable store (an absent SQLite file is not created)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, run_id = target["tracking_uri"], target["run_id"]
    advice = "start it (or set MLFLOW_TRACKING_URI to where it runs), or drop --log-mlflow"
    check_reachable(uri, advice=advice)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise PFEError(f"--log-mlflow: tracking store {db} does not exist; {advice}")
    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        raise PFEError(f"--log-mlflow: run {run_id} is not in {mask_uri(uri)} ({err.error_code}); {advice}") from None


def check_outputs(export: str | None, pictures: str | None) -> None:
    """``--export`` names a file (its folder is made), ``--pictures`` a folder."""
    if export and Path(export).is_dir():
        raise PFEError(f"--export {export}: is a folder; name the .npz file to write")
    if pictures and Path(pictures).exists() and not Path(pictures).is_dir():
        raise PFEError(f"--pictures {pictures}: is a file; name a folder for the PNGs")


def mlflow_metrics(report: Any) -> dict[str, float]:
    """The metric keys logged to the model's run: ``eval_on/<dataset>/<set>/<metric>``,
    ``rerank_on/<dataset>/...``, ``twins_on/<dataset>/...`` (never the training-time ``eval/`` keys)."""
    name = report.dataset.name
    out = {}
    for key, value in report.metrics.items():
        kind, _, rest = key.partition("/")
        out[f"{kind}_on/{name}/{rest}"] = float(value)
    return out


def log_to_mlflow(report: Any, target: dict[str, str], pictures: list[Path] | None = None) -> None:
    """Metrics, the table as JSON, and the pictures, into the model's MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target["tracking_uri"])
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0) for k, v in mlflow_metrics(report).items() if math.isfinite(v)]
    for s in range(0, len(items), 1000):
        client.log_batch(target["run_id"], metrics=items[s : s + 1000])
    name = report.dataset.name
    table = {
        "checkpoint": str(report.checkpoint),
        "dataset": name,
        "root": str(report.dataset.root),
        "metrics": report.metrics,
        "cmc": report.cmc,
    }
    client.log_dict(target["run_id"], table, f"eval_on/{name}/metrics.json")
    for path in pictures or []:
        client.log_artifact(target["run_id"], str(path), artifact_path=f"pictures/{name}")


def cli_eval(args: argparse.Namespace) -> int:
    """`pfe-study eval CHECKPOINT --dataset NAME [--root DIR] [--sets ...] [--export F.npz] [--rerank]
    [--log-mlflow] [--pictures DIR]`."""
    from pfe.engine.eval_checkpoint import (
        describe,
        evaluate_checkpoint,
        export_features,
        format_table,
        write_report_pictures,
    )

    export, pictures_dir = getattr(args, "export", None), getattr(args, "pictures", None)
    check_outputs(export, pictures_dir)
    target = None
    if getattr(args, "log_mlflow", False):
        target = mlflow_target(args.checkpoint)
        check_target(target)
    report = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        root=getattr(args, "root", None),
        sets=getattr(args, "sets", None),
        rerank=bool(getattr(args, "rerank", False)),
    )
    print(describe(report))
    print(format_table(report))
    pictures: list[Path] = []
    try:
        if export:
            print(f"features: {export_features(report, export)}")
        if pictures_dir:
            pictures = write_report_pictures(report, pictures_dir)
            for p in pictures:
                print(f"picture: {p}")
    except OSError as err:
        raise PFEError(f"{err.filename}: cannot write ({err.strerror}); the metrics are printed above") from None
    if target is not None:
        log_to_mlflow(report, target, pictures)
        print(f"logged to MLflow run {target['run_id']} ({mask_uri(target['tracking_uri'])})", file=sys.stderr)
    return 0
