"""`pfe-study eval`: a trained model on any registered dataset (cross-dataset included).

Loads the model of a run folder, a Tune checkpoint folder or a checkpoint file, extracts query and
gallery features at the model's own input size, prints the rank metrics of each feature set
(with ``--rerank`` the k-reciprocal re-ranked ones beside them), and optionally exports the
features and draws the paper's pictures. The command itself, and logging to the model's MLflow run,
are :mod:`pfe.study.eval_command` (the engine knows nothing of MLflow).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfe.config import RANK_METRICS, ExperimentConfig, resolve_workers
from pfe.data.datasets import ReIDDataset, build_dataset
from pfe.data.loader import ImageDataset
from pfe.data.transforms import build_test_transform
from pfe.engine import checkpoint as ckpt
from pfe.engine.evaluation import evaluate_features
from pfe.errors import PFEError

EXPORT_FORMAT = "pfe-features/1"


# ---------------------------------------------------------------- locating things
def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file a path stands for.

    A file is itself. A folder (a run folder or a Tune checkpoint folder) gives, in order:
    ``stage2/final.pt``, ``stage1/final.pt``, ``final.pt``, then the newest ``stage2/epoch_*.pt``,
    then the newest ``stage1/epoch_*.pt`` (an unfinished run, or a Tune checkpoint of one epoch).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise PFEError(f"{path}: no such checkpoint file or folder")
    for candidate in (ckpt.final_path(path, 2), ckpt.final_path(path, 1), path / ckpt.FINAL_FILE):
        if candidate.is_file():
            return candidate
    for stage in (2, 1):
        found = ckpt.epoch_checkpoints(path, stage)
        if found:
            return found[-1][1]
    raise PFEError(
        f"{path}: no checkpoint in this folder (looked for stage2/final.pt, stage1/final.pt, final.pt and "
        "stage{1,2}/epoch_*.pt); pass a run folder of `pfe-study train`/`run`, a Tune checkpoint folder or a .pt file"
    )


# ---------------------------------------------------------------- evaluation
@dataclass
class EvalReport:
    """What one evaluation produced. Metric keys: ``eval/<set>/<metric>`` (plain),
    ``rerank/<set>/<metric>`` (k-reciprocal), ``twins/<set>/<metric>`` (synthreid twins-only queries)."""

    checkpoint: Path
    cfg: ExperimentConfig
    dataset: ReIDDataset
    sets: list[str]
    metrics: dict[str, float]
    query: dict[str, torch.Tensor]
    gallery: dict[str, torch.Tensor]
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray
    cmc: dict[str, list[float]] = field(default_factory=dict)
    model: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def value(self, kind: str, set_name: str, metric: str) -> float:
        return self.metrics.get(f"{kind}/{set_name}/{metric}", math.nan)


def _dataset_config(cfg: ExperimentConfig, dataset: str | None, root: str | None) -> ExperimentConfig:
    """The model's config pointed at the dataset to evaluate on (the trained-on root only for the same dataset)."""
    overrides: dict[str, Any] = {}
    if dataset is not None and dataset != cfg.data.dataset:
        overrides["data.dataset"] = dataset
        overrides["data.root"] = root
    elif root is not None:
        overrides["data.root"] = root
    return cfg.with_overrides(overrides, source="--dataset/--root") if overrides else cfg


def _check_sets(sets: list[str], available: list[str], checkpoint: Path) -> None:
    for name in sets:
        missing = [p for p in name.split("_") if p not in available]
        if missing or not name:
            raise PFEError(
                f"--sets {name}: the model of {checkpoint} has trained features {', '.join(available)} only "
                f"(no {', '.join(missing) or name}); sets are layer names joined by '_', e.g. F5 or F2_F3_F4_F5"
            )


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | None = None,
    *,
    root: str | None = None,
    sets: list[str] | None = None,
    rerank: bool = False,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int | None = None,
) -> EvalReport:
    """Evaluate a trained model on ``dataset`` (default: the one it was trained on).

    Input size, flip and max rank come from the model's config; ``sets`` default to the model's
    configured evaluation sets. With ``rerank`` the re-ranked metrics are added beside the plain ones.
    """
    from pfe.engine.trainer import autocast_dtype, extract_split_features, load_trained_model, resolve_device

    path = resolve_checkpoint(checkpoint)
    dev = resolve_device(device)
    model, cfg = load_trained_model(path, str(dev))
    cfg = _dataset_config(cfg, dataset, root)
    data = build_dataset(cfg.data)
    if not data.query or not data.gallery:
        raise PFEError(f"{cfg.data.dataset} at {data.root}: empty query or gallery split, nothing to evaluate")
    available = sorted(getattr(model, "feature_dims", {"F5": 0}))
    if getattr(model, "stage", 2) == 1:  # a stage-I checkpoint: its side branches were never trained
        available = ["F5"]
    sets = list(sets) if sets else [s for s in cfg.eval_sets if all(p in available for p in s.split("_"))]
    _check_sets(sets, available, path)

    transform = build_test_transform(cfg.data.height, cfg.data.width)
    q, g, q_pids, g_pids, q_cams, g_cams = extract_split_features(
        model, ImageDataset(data.query, transform, hint=""), ImageDataset(data.gallery, transform, hint=""), dev,
        autocast_dtype(cfg.runtime.precision, dev), flip=cfg.eval.flip,
        batch_size=batch_size or cfg.eval.batch_size, workers=resolve_workers(cfg.data.workers if workers is None else workers),
    )
    metrics, cmc = evaluate_features(
        q, g, q_pids, g_pids, q_cams, g_cams, sets=sets, max_rank=cfg.eval.max_rank, twins=data.twins, rerank=rerank
    )
    return EvalReport(
        checkpoint=path,
        cfg=cfg,
        dataset=data,
        sets=sets,
        metrics=metrics,
        query=q,
        gallery=g,
        q_pids=q_pids,
        g_pids=g_pids,
        q_camids=q_cams,
        g_camids=g_cams,
        cmc={k: [float(x) for x in v] for k, v in cmc.items()},
        model=model,
        device=dev,
    )


# ---------------------------------------------------------------- output
def format_table(report: EvalReport) -> str:
    """Sets x (rank1, rank5, rank10, mAP, mINP), plain; re-ranked columns beside them when present."""
    has_rr = any(k.startswith("rerank/") for k in report.metrics)
    width = max(len("set"), *(len(s) for s in report.sets))
    head = f"{'set':<{width}}  " + " ".join(f"{m:>7}" for m in RANK_METRICS)
    if has_rr:
        head += "  |  " + " ".join(f"{'rr ' + m:>9}" for m in RANK_METRICS)
    lines = [head, "-" * len(head)]

    def cells(kind: str, name: str, w: int) -> str:
        return " ".join(f"{report.value(kind, name, m):>{w}.2f}" for m in RANK_METRICS)

    for name in report.sets:
        row = f"{name:<{width}}  " + cells("eval", name, 7)
        if has_rr:
            row += "  |  " + cells("rerank", name, 9)
        lines.append(row)
    if any(k.startswith("twins/") for k in report.metrics):
        lines += ["", "twins-only queries (synthreid):"]
        lines += [f"{name:<{width}}  " + cells("twins", name, 7) for name in report.sets]
    return "\n".join(lines)


def describe(report: EvalReport) -> str:
    cfg, data = report.cfg, report.dataset
    m = cfg.model
    return (
        f"{report.checkpoint}: {m.backbone}, attention {m.attention}, side {m.side}, input {cfg.data.height}x"
        f"{cfg.data.width}; on {data.name} ({data.root}): {len(report.q_pids)} queries, {len(report.g_pids)} gallery "
        f"images; {report.device.type}"
    )


def export_features(report: EvalReport, path: str | Path) -> Path:
    """Write query/gallery BN features of every layer (before L2 normalisation), pids, camids and
    image paths to an .npz (no pickled objects: ``np.load(path)`` reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for side, feats in (("query", report.query), ("gallery", report.gallery)):
        for layer, value in feats.items():
            arrays[f"{side}_{layer}"] = value.detach().float().cpu().numpy()
    arrays.update(
        query_pids=report.q_pids.astype(np.int64),
        query_camids=report.q_camids.astype(np.int64),
        gallery_pids=report.g_pids.astype(np.int64),
        gallery_camids=report.g_camids.astype(np.int64),
        query_paths=np.array([s.path for s in report.dataset.query]),
        gallery_paths=np.array([s.path for s in report.dataset.gallery]),
    )
    meta = {
        "format": EXPORT_FORMAT,
        "checkpoint": str(report.checkpoint),
        "dataset": report.dataset.name,
        "root": str(report.dataset.root),
        "layers": sorted(report.query),
        "height": report.cfg.data.height,
        "width": report.cfg.data.width,
        "flip": report.cfg.eval.flip,
        "config_hash": report.cfg.config_hash(),
        "features": "BN features per layer, not normalised; a set = each layer L2-normalised, concatenated",
    }
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def load_features(path: str | Path) -> dict[str, Any]:
    """Read an export back: {"query": {layer: array}, "gallery": {...}, "query_pids", ..., "meta"}."""
    with np.load(path, allow_pickle=False) as z:
        out: dict[str, Any] = {"query": {}, "gallery": {}}
        for key in z.files:
            side, _, layer = key.partition("_")
            if side in ("query", "gallery") and layer.startswith("F"):
                out[side][layer] = z[key]
            elif key == "meta":
                out["meta"] = json.loads(str(z[key]))
            else:
                out[key] = z[key]
    return out


def write_report_pictures(report: EvalReport, out_dir: str | Path, **sizes: int) -> list[Path]:
    """The activation-map and retrieval pictures of an evaluated model (see pfe.engine.pictures);
    ``sizes``: num_images, num_queries, top of ``write_pictures``."""
    from pfe.engine.pictures import write_pictures

    cfg = report.cfg
    final = cfg.final_set if all(p in report.query for p in cfg.final_set.split("_")) else "F5"
    return write_pictures(
        report.model,
        report.dataset.query,
        report.dataset.gallery,
        report.query,
        report.gallery,
        report.q_pids,
        report.g_pids,
        report.q_camids,
        report.g_camids,
        out_dir,
        height=cfg.data.height,
        width=cfg.data.width,
        transform=build_test_transform(cfg.data.height, cfg.data.width),
        final_set=final,
        device=report.device,
        label=f"{cfg.model.backbone} {cfg.model.side} {cfg.stage2.loss} on {report.dataset.name}",
        **sizes,
    )
