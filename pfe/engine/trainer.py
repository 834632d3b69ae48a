"""The two-stage PFE trainer.

Stage I trains the main branch (backbone + attention + F5 head) with Eq. (6); stage II freezes it
and trains the side branches with Eq. (9). One function, :func:`train`, runs both, resumes from
the run folder's checkpoints, and reports each epoch through :class:`TrainHooks`. It knows
nothing of Ray or MLflow: the study runner wraps it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pfe import losses
from pfe.config import (
    STAGE1_PREFIXES,
    ExperimentConfig,
    _Recipe,
    dump_config,
    load_config,
    load_config_text,
    resolve_workers,
    with_headline,
)
from pfe.data.datasets import ReIDDataset, build_dataset
from pfe.data.device_cache import DeviceTrainCache, epoch_generator
from pfe.data.loader import ImageDataset, SeededBatches
from pfe.data.sampler import PKSampler
from pfe.data.transforms import build_test_transform, build_train_transform
from pfe.engine import checkpoint as ckpt
from pfe.engine.evaluation import evaluate_features, extract_features
from pfe.engine.graphed import GraphedTrainStep
from pfe.errors import PFEError
from pfe.model import PFENet, PFEOutput, autotune_mode, build_model, compile_mode, frozen_main_mode

RESULT_FILE = "result.json"


class NonFiniteLoss(PFEError):
    """A loss term became NaN or Inf."""


class TrainHooks:
    """Callbacks of a training run; the default does nothing. The study runner subclasses it."""

    def on_epoch_end(self, stage: int, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        """After each epoch's checkpoint is on disk. ``checkpoint`` is that epoch's file (None for the
        evaluation of the untrained model, epoch 0)."""

    def on_stage_end(self, stage: int, metrics: dict[str, float], checkpoint: Path) -> None:
        """After a stage's final checkpoint (``stage{N}/final.pt``) is on disk."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    workdir: Path
    metrics: dict[str, float]
    stage1_metrics: dict[str, float]
    cmc: dict[str, list[float]] = field(default_factory=dict)
    device_kind: str = "cpu"
    wall_s: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- setup helpers
def resolve_device(name: str, setting: str = "runtime.device") -> torch.device:
    """auto (a GPU where there is one), cpu or cuda[:N]; ``setting`` names where ``name`` came from
    (a config key, or a command's ``--device``) in the message when no GPU is here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PFEError(f"{setting}={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PFEError(f"{setting}={name}: no CUDA device here; use {setting}=cpu or auto")
    return device


def device_kind(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU (``auto``), fp32 on a CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolved_runtime(cfg: ExperimentConfig, device: torch.device) -> dict[str, str]:
    """What the ``auto`` settings of ``cfg`` become on ``device``: how the run really executes, for the
    record (MLflow tags ``pfe.resolved.*``)."""
    amp = autocast_dtype(cfg.runtime.precision, device)
    return {
        "runtime.device": str(device),
        "runtime.precision": "bf16" if amp is torch.bfloat16 else "fp32",
        "data.workers": str(resolve_workers(cfg.data.workers)),
        "runtime.cuda_graph": str(uses_cuda_graph(cfg, device)).lower(),
        "runtime.compile": compile_mode(cfg.runtime, device),
        "runtime.autotune": autotune_mode(cfg.runtime, device),
        "runtime.frozen_main": frozen_main_mode(cfg.runtime, device),
    }


def seed_everything(seed: int, deterministic: bool | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic is None:
        return
    # both ways explicitly: a deterministic run earlier in the process must not slow this one down
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def lr_factor(recipe: _Recipe) -> Callable[[int], float]:
    """Linear warmup, then x gamma at each milestone (epochs completed so far)."""

    def factor(epochs_done: int) -> float:
        warm = min(1.0, (epochs_done + 1) / recipe.warmup_epochs) if recipe.warmup_epochs else 1.0
        return warm * recipe.gamma ** bisect_right(recipe.milestones, epochs_done)

    return factor


def build_optimizer(
    params: list[nn.Parameter], recipe: _Recipe, device: torch.device, fused: bool | None = None
) -> torch.optim.Optimizer:
    """Adam; fused (one multi-tensor kernel per step) on a GPU unless ``fused`` says otherwise."""
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused or None)


def extract_split_features(
    model: PFENet,
    query: ImageDataset,
    gallery: ImageDataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    flip: bool = False,
    batch_size: int = 128,
    workers: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BN features of every layer for the query and gallery images:
    (query, gallery, q_pids, g_pids, q_camids, g_camids), the arguments of ``evaluate_features``."""
    model.eval()
    # the layout place_model gave the weights on a GPU: cuDNN would otherwise convert every batch
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def forward(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            feats = model.extract(images.to(device, non_blocking=True, memory_format=layout))
        return {k: v.float() for k, v in feats.items()}

    def loader(dataset: ImageDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")

    q, q_pids, q_cams = extract_features(forward, loader(query), device, flip=flip)
    g, g_pids, g_cams = extract_features(forward, loader(gallery), device, flip=flip)
    return q, g, q_pids, g_pids, q_cams, g_cams


def place_model(model: PFENet, device: torch.device, compile: str = "off", autotune: str = "off") -> PFENet:
    """The model on ``device``; channels_last on a GPU (faster convolutions with bf16); what training runs
    through torch.compile as ``compile`` says (off | regions | all), with Inductor's ``autotune`` (off |
    coordinate_descent | max_autotune_gemm | max_autotune; ``PFENet.compile_blocks``)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.compile_blocks(compile, autotune) if compile != "off" else model


LossFn = Callable[[PFEOutput, torch.Tensor], dict[str, torch.Tensor]]


def stage_loss_fn(cfg: ExperimentConfig, stage: int) -> LossFn:
    """Eq. (6) for stage 1, Eq. (9) for stage 2, with the config's settings: (output, pids) -> loss terms."""
    if stage == 1:
        s1 = cfg.stage1
        return lambda out, pids: losses.stage1_losses(
            out, pids, margin=s1.triplet_margin, label_smoothing=s1.label_smoothing
        )
    s2 = cfg.stage2
    return lambda out, pids: losses.stage2_losses(
        out, pids, mode=s2.loss, temperatures=s2.temperatures, w_ro=s2.w_ro, label_smoothing=s2.label_smoothing
    )


def train_step(
    model: PFENet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    pids: torch.Tensor,
    *,
    stage: int,
    loss_fn: LossFn,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    autocast_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """One optimiser step (forward under autocast, loss terms, backward, step); returns the terms.

    Nothing in it waits for the device: the caller decides when to look at the values.
    ``autocast_cache=False``: autocast casts the weights at each use (needed inside a CUDA graph capture).
    """
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    pids = pids.to(device, non_blocking=True)
    with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None, cache_enabled=autocast_cache):
        out = model(images, stage=stage)
    terms = loss_fn(out, pids)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return terms


TrainStep = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def uses_cuda_graph(cfg: ExperimentConfig, device: torch.device) -> bool:
    """runtime.cuda_graph applies on a CUDA device."""
    return cfg.runtime.cuda_graph and device.type == "cuda"


def make_train_step(model: PFENet, optimizer: torch.optim.Optimizer, *, stage: int, loss_fn: LossFn,
                    device: torch.device, amp_dtype: torch.dtype | None, cuda_graph: bool) -> TrainStep:
    """``step(images, pids) -> loss terms`` for one stage: :func:`train_step`, replayed from a CUDA graph
    with ``cuda_graph`` (:class:`pfe.engine.graphed.GraphedTrainStep`)."""

    def eager(images: torch.Tensor, pids: torch.Tensor, autocast_cache: bool = True) -> dict[str, torch.Tensor]:
        return train_step(model, optimizer, images, pids, stage=stage, loss_fn=loss_fn, device=device,
                          amp_dtype=amp_dtype, autocast_cache=autocast_cache)

    return GraphedTrainStep(eager, optimizer, device) if cuda_graph else eager


class LossTally:
    """An epoch's sums of the loss terms and which became NaN/Inf, kept on the device: adding a step's
    terms never waits for the device; ``means`` and ``non_finite`` do."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.steps = 0
        self._sums: torch.Tensor | None = None
        self._bad: torch.Tensor | None = None

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        values = torch.stack([t.detach().float() for t in terms.values()])
        if self._sums is None:
            self.names = list(terms)
            self._sums, self._bad = torch.zeros_like(values), torch.zeros_like(values, dtype=torch.bool)
        self._sums += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        self._bad |= ~torch.isfinite(values)
        self.steps += 1

    def non_finite(self) -> list[str]:
        """The terms that were NaN or Inf at some step so far."""
        if self._bad is None or not bool(self._bad.any()):
            return []
        return [n for n, b in zip(self.names, self._bad.tolist()) if b]

    def means(self) -> dict[str, float]:
        assert self._sums is not None, "no step was added"
        return dict(zip(self.names, (self._sums / self.steps).tolist()))


def main_branch_state(model: PFENet) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the main branch (what stage I trains and stage II freezes)."""
    side_ids = {id(p) for p in model.side_parameters()}
    side_prefixes = tuple({name.rsplit(".", 1)[0] + "." for name, p in model.named_parameters() if id(p) in side_ids})
    return {k: v for k, v in model.state_dict().items() if not k.startswith(side_prefixes)}


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- the run
class _Run:
    """One training run's state: data, model, device. Stages are methods."""

    def __init__(self, cfg: ExperimentConfig, workdir: Path, hooks: TrainHooks, log: Callable[[str], None]):
        self.cfg, self.workdir, self.hooks, self.log = cfg, workdir, hooks, log
        self.device = resolve_device(cfg.runtime.device)
        self.amp_dtype = autocast_dtype(cfg.runtime.precision, self.device)
        seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)
        self.data: ReIDDataset = build_dataset(cfg.data)
        self.workers = resolve_workers(cfg.data.workers)
        log(f"data: {cfg.data.dataset}, {len(self.data.train)} training images; {self.workers} DataLoader "
            f"worker{'' if self.workers == 1 else 's'}" + (" (data.workers=auto)" if cfg.data.workers == "auto" else ""))
        self.compile = compile_mode(cfg.runtime, self.device)
        self.autotune = autotune_mode(cfg.runtime, self.device)
        self.model = place_model(build_model(cfg, self.data.num_train_pids), self.device, self.compile, self.autotune)
        self.train_set = ImageDataset(
            self.data.train,
            build_train_transform(cfg.data.height, cfg.data.width, cfg.data.flip_prob, cfg.data.erasing_prob, cfg.data.pad),
            skip_corrupt=cfg.data.skip_corrupt,
        )
        self.sampler = PKSampler(
            [s.pid for s in self.data.train], cfg.data.ids_per_batch, cfg.data.images_per_id, cfg.runtime.seed
        )
        self.seeded_batches = SeededBatches(self.sampler, cfg.runtime.seed)
        # one loader for the run: its workers start on the first epoch and stay up for the next ones
        self.train_loader = DataLoader(
            self.train_set,
            batch_sampler=self.seeded_batches,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None,
            persistent_workers=self.workers > 0,
        )
        test_tf = build_test_transform(cfg.data.height, cfg.data.width)
        self.query_set = ImageDataset(self.data.query, test_tf, skip_corrupt=cfg.data.skip_corrupt)
        self.gallery_set = ImageDataset(self.data.gallery, test_tf, skip_corrupt=cfg.data.skip_corrupt)
        self.cmc: dict[str, list[float]] = {}
        self.train_cache: DeviceTrainCache | None = None
        if cfg.data.cache == "device":
            started = time.perf_counter()
            d = cfg.data
            self.train_cache = DeviceTrainCache.build(
                self.data.train, d.height, d.width, self.device, flip_prob=d.flip_prob, erasing_prob=d.erasing_prob,
                pad=d.pad, skip_corrupt=d.skip_corrupt, workers=self.workers,
            )
            log(f"data.cache=device: {len(self.train_cache)} training images ({self.train_cache.nbytes() / 2**30:.2f} GiB"
                f" uint8) on {self.device} in {time.perf_counter() - started:.1f}s")

    # -- data
    def _train_batches(self, stage: int, epoch: int) -> Iterable[tuple[torch.Tensor, ...]]:
        """The epoch's training batches (images, pids, camids, indices): DataLoader workers, or the device cache."""
        self.sampler.set_epoch(epoch)
        if self.train_cache is not None:
            generator = epoch_generator(self.device, self.cfg.runtime.seed, stage, epoch)
            return self.train_cache.epoch(self.sampler, generator)
        self.seeded_batches.set_epoch(stage, epoch)
        return self.train_loader

    # -- evaluation
    def evaluate(self, stage: int) -> dict[str, float]:
        """Metrics of each configured set (F5 only in stage I), twins-only and re-ranked ones too."""
        sets = ["F5"] if stage == 1 else self.cfg.eval_sets
        feats = extract_split_features(
            self.model, self.query_set, self.gallery_set, self.device, self.amp_dtype,
            flip=self.cfg.eval.flip, batch_size=self.cfg.eval.batch_size, workers=self.workers,
        )
        metrics, cmc = evaluate_features(
            *feats, sets=sets, max_rank=self.cfg.eval.max_rank, twins=self.data.twins, rerank=self.cfg.eval.rerank
        )
        self.cmc = {k: [float(x) for x in v] for k, v in cmc.items()}
        return with_headline(metrics, "F5" if stage == 1 else self.cfg.final_set)

    # -- one stage
    def run_stage(self, stage: int, start_state: dict[str, Any] | None) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        recipe = cfg.stage1 if stage == 1 else cfg.stage2
        model.set_stage(stage)
        params = list(model.main_branch_parameters()) if stage == 1 else list(model.side_parameters())
        optimizer = build_optimizer(params, recipe, self.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe))
        first_epoch, metrics = 1, {}
        # Each stage starts from its own seed, so a stage II is the same whether its stage I ran
        # in this process or came from a shared checkpoint.
        seed_everything(cfg.runtime.seed * 10 + stage)
        if start_state is not None and start_state["stage"] == stage:
            model.load_state_dict(start_state["model"])
            optimizer.load_state_dict(start_state["optimizer"])
            for group in optimizer.param_groups:  # as this run steps it (a graphed run saved True)
                group["capturable"] = False
            scheduler.load_state_dict(start_state["scheduler"])
            ckpt.set_rng_state(start_state["rng"])
            first_epoch = start_state["epoch"] + 1
            metrics = dict(start_state["metrics"])
            self.cmc = dict(start_state.get("cmc", {}))
            self.log(f"stage {stage}: resuming after epoch {start_state['epoch']}")
        elif stage == 1 and cfg.eval.at_start:
            metrics = self.evaluate(stage)
            self.hooks.on_epoch_end(stage, 0, metrics, None)
            self.log(f"stage 1 epoch 0 (untrained): {_summary(metrics)}")

        train_step = self.stage_step(stage, optimizer)
        started = time.perf_counter()
        for epoch in range(first_epoch, recipe.epochs + 1):
            epoch_metrics = self._train_epoch(stage, epoch, optimizer, train_step)
            scheduler.step()
            if epoch == recipe.epochs or (cfg.eval.interval and epoch % cfg.eval.interval == 0):
                epoch_metrics.update(self.evaluate(stage))
            metrics = epoch_metrics
            path = ckpt.epoch_path(self.workdir, stage, epoch)
            ckpt.save_atomic(self._state(stage, epoch, optimizer, scheduler, metrics), path)
            ckpt.prune(self.workdir, stage)
            self.hooks.on_epoch_end(stage, epoch, metrics, path)
            done = epoch - first_epoch + 1
            eta = (time.perf_counter() - started) / done * (recipe.epochs - epoch)
            self.log(f"stage {stage} epoch {epoch}/{recipe.epochs}  {_summary(metrics)}  ETA {eta:.0f}s")

        if recipe.epochs == 0 or first_epoch > recipe.epochs and not metrics:
            metrics = self.evaluate(stage)
        final = ckpt.final_path(self.workdir, stage)
        ckpt.save_atomic(self._state(stage, recipe.epochs, optimizer, scheduler, metrics), final)
        self.hooks.on_stage_end(stage, metrics, final)
        return metrics

    def stage_step(self, stage: int, optimizer: torch.optim.Optimizer) -> TrainStep:
        """The stage's training step (eager, or replayed from a CUDA graph: runtime.cuda_graph)."""
        graphed = uses_cuda_graph(self.cfg, self.device)
        how = ["runs from a CUDA graph (runtime.cuda_graph)"] if graphed else []
        if self.compile != "off":
            tuned = f", runtime.autotune={self.autotune}" if self.autotune != "off" else ""
            how.append(f"is compiled (runtime.compile={self.compile}{tuned}): its first step waits for torch.compile, "
                       "30-50 s for ResNet50 on an H200" + (", longer while it autotunes" if tuned else ""))
        if how:
            self.log(f"stage {stage}: the training step {' and '.join(how)}")
        return make_train_step(self.model, optimizer, stage=stage, loss_fn=stage_loss_fn(self.cfg, stage),
                               device=self.device, amp_dtype=self.amp_dtype, cuda_graph=graphed)

    def _train_epoch(self, stage: int, epoch: int, optimizer: torch.optim.Optimizer, train_step: TrainStep) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        loader = self._train_batches(stage, epoch)
        model.train()
        tally = LossTally()
        images_seen = 0
        started = time.perf_counter()
        for step, (images, pids, _, _) in enumerate(loader, start=1):
            tally.add(train_step(images, pids))  # on the device: no host sync per step
            images_seen += images.shape[0]
            if step % cfg.runtime.nan_check_every == 0:
                self._check_finite(tally, stage, epoch)
        if not tally.steps:
            raise PFEError(f"stage {stage} epoch {epoch}: the training set yielded no batch")
        self._check_finite(tally, stage, epoch)
        elapsed = time.perf_counter() - started
        metrics = {f"train/stage{stage}/{name}": value for name, value in tally.means().items()}
        metrics[f"lr/stage{stage}"] = optimizer.param_groups[0]["lr"]
        metrics[f"img_per_s/stage{stage}"] = images_seen / elapsed
        metrics[f"epoch_time_s/stage{stage}"] = elapsed
        return metrics

    @staticmethod
    def _check_finite(tally: LossTally, stage: int, epoch: int) -> None:
        terms = tally.non_finite()
        if terms:
            raise NonFiniteLoss(
                f"stage {stage} epoch {epoch}: loss term(s) {', '.join(terms)} became NaN/Inf. The checkpoint of "
                f"epoch {epoch - 1} is kept; lower the learning rate (stage{stage}.lr) or use runtime.precision=fp32."
            )

    def _state(self, stage: int, epoch: int, optimizer, scheduler, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "stage": stage,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "sampler": {"seed": self.sampler.seed, "epoch": epoch},
            "metrics": {k: float(v) for k, v in metrics.items()},
            "num_classes": self.data.num_train_pids,
            "config": dump_config(self.cfg),
            "cmc": self.cmc,
        }


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


def _summary(metrics: dict[str, float]) -> str:
    shown = [k for k in metrics if k.startswith("train/") and k.endswith("/loss")] + [
        k for k in ("rank1", "mAP") if k in metrics
    ]
    return "  ".join(f"{k.split('/')[-2] + ' loss' if k.startswith('train/') else k}={metrics[k]:.3f}" for k in shown)


def _find_stage1_final(path: str | Path) -> Path:
    """A stage-I final checkpoint from a file, a run folder or a Tune checkpoint folder."""
    path = Path(path)
    for candidate in (path, path / "stage1" / ckpt.FINAL_FILE, path / ckpt.FINAL_FILE):
        if candidate.is_file():
            return candidate
    raise PFEError(f"{path}: no stage-I checkpoint there (looked for stage1/final.pt and final.pt)")


def train(
    cfg: ExperimentConfig,
    workdir: str | Path,
    hooks: TrainHooks | None = None,
    stage1_from: str | Path | None = None,
    stages: tuple[int, ...] = (1, 2),
    log: Callable[[str], None] | None = None,
    fresh: bool = False,
) -> TrainResult:
    """Train (or resume) stage I then stage II in ``workdir``.

    ``stage1_from``: start stage II from this stage-I checkpoint instead of training stage I.
    ``stages``: which stages to run (the runner trains stage I alone, once per stage-I key).
    Resumes from the newest checkpoint in ``workdir``; a finished run returns its stored result.
    ``fresh``: start over, removing the trainer's own files in ``workdir`` once the data and model are built.
    """
    workdir = Path(workdir)
    hooks = hooks or TrainHooks()
    if log is None:
        log = _print_stderr if cfg.runtime.progress else _quiet
    previous = workdir / "config.yaml"
    run = None
    if fresh:
        run = _Run(cfg, workdir, hooks, log)  # a missing dataset or a bad setting stops before anything is removed
        _clear_run_folder(workdir, log)
    elif previous.is_file():  # a run folder continues only the run it holds
        _same_run(load_config_text(previous.read_text(), str(previous)), cfg, stages, str(workdir), "run folder")
    workdir.mkdir(parents=True, exist_ok=True)
    previous.write_text(dump_config(cfg))
    want_stage2 = 2 in stages and cfg.model.side != "none"

    result_file = workdir / RESULT_FILE
    stored = _stored_result(result_file, log)
    if stored.get("config_hash") == cfg.config_hash() and stored.get("stages") == list(stages):
        log(f"{workdir}: already finished")
        return TrainResult(workdir=workdir, **{k: v for k, v in stored["result"].items()})

    run = run or _Run(cfg, workdir, hooks, log)
    wall: dict[str, float] = {}

    def resume_state(stage: int) -> dict[str, Any] | None:
        """The stage's final checkpoint if it ended, else its newest epoch checkpoint, else None."""
        if ckpt.final_path(workdir, stage).is_file():
            return ckpt.load(ckpt.final_path(workdir, stage))
        found = ckpt.epoch_checkpoints(workdir, stage)
        return ckpt.load(found[-1][1]) if found else None

    stage1_final = ckpt.final_path(workdir, 1)
    if stage1_from is not None:
        stage1_final = _find_stage1_final(stage1_from)
    if stage1_final.is_file():
        state = ckpt.load(stage1_final)
        _same_run(load_config_text(state["config"], str(stage1_final)), cfg, (1,), str(stage1_final), "stage I")
        run.model.load_state_dict(_with_fresh_side(run.model, state["model"]), strict=True)
        stage1_metrics = dict(state["metrics"])
        run.cmc = dict(state.get("cmc", {}))
    elif 1 in stages:
        t0 = time.perf_counter()
        stage1_metrics = run.run_stage(1, resume_state(1))
        wall["stage1"] = time.perf_counter() - t0
    else:
        raise PFEError(f"{workdir}: stage II needs a stage-I checkpoint; pass stage1_from or train stage I first")

    metrics, cmc = stage1_metrics, run.cmc
    if want_stage2:
        t0 = time.perf_counter()
        metrics = run.run_stage(2, resume_state(2))
        cmc = run.cmc
        wall["stage2"] = time.perf_counter() - t0

    result = TrainResult(workdir, metrics, stage1_metrics, cmc, device_kind(run.device), wall)
    payload = {k: v for k, v in result.__dict__.items() if k != "workdir"}
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config_hash": cfg.config_hash(), "stages": list(stages), "result": payload}))
    tmp.replace(result_file)
    return result


RUN_FOLDER_ENTRIES = ("config.yaml", RESULT_FILE, "result.tmp", "stage1", "stage2")  # what train() writes


def _clear_run_folder(workdir: Path, log: Callable[[str], None]) -> None:
    """Remove what :func:`train` wrote in ``workdir``; anything else there is left alone."""
    for name in RUN_FOLDER_ENTRIES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    others = sorted(p.name for p in workdir.iterdir()) if workdir.is_dir() else []
    if others:
        log(f"{workdir}: --fresh removed the previous run; kept what it did not write: {', '.join(others[:5])}")


def _same_run(stored: ExperimentConfig, cfg: ExperimentConfig, stages: tuple[int, ...], where: str, what: str) -> None:
    """Stop when ``where`` (a run folder or a stage-I checkpoint) was made under another config than ``cfg``.

    Only what the ``stages`` run compute counts: stage I alone is judged by its stage-I key."""
    if stages == (1,):
        differ = stored.stage1_key() != cfg.stage1_key()
        keys = [k for k in _differing(stored, cfg) if k.startswith(STAGE1_PREFIXES)]
    else:
        differ = stored.config_hash() != cfg.config_hash()
        keys = _differing(stored, cfg)
    if differ:
        shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "") or "a default changed since"
        advice = (
            "pass the stage I of a run with this config's stage-I settings, or drop --stage1-from"
            if what == "stage I"
            else "give another --out (the default folder is named by the config's hash), or --fresh to start over there"
        )
        raise PFEError(f"{where}: this {what} was trained under another config ({shown}); {advice}")


def _differing(stored: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    old, new = stored.flat(defining_only=True), cfg.flat(defining_only=True)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def _stored_result(result_file: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """A finished run's stored result; {} when there is none or it is unreadable (then the final checkpoints,
    which hold everything, finish the run again quickly)."""
    if not result_file.is_file():
        return {}
    try:
        stored = json.loads(result_file.read_text())
    except (OSError, ValueError):
        log(f"{result_file}: unreadable, ignored; the run's checkpoints give its result again")
        return {}
    return stored if isinstance(stored, dict) else {}


def _with_fresh_side(model: PFENet, stage1_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stage-I main branch with this run's own (seeded) side-branch initialisation."""
    merged = model.state_dict()
    main = main_branch_state(model)
    missing = [k for k in main if k not in stage1_state]
    if missing:
        raise PFEError(f"stage-I checkpoint lacks {missing[:3]}...: it was trained with another model config")
    merged.update({k: stage1_state[k] for k in main})
    return merged


# ---------------------------------------------------------------- CLI
def cli_train(args: argparse.Namespace) -> int:
    """`pfe-study train [CONFIG] [key=value ...]`."""
    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.out) if args.out else Path(cfg.runtime.output_dir) / cfg.config_hash()
    result = train(cfg, workdir, stage1_from=args.stage1_from, fresh=args.fresh)
    print(f"run folder: {workdir}")
    width = max((len(k) for k in result.metrics), default=0)
    for key in sorted(k for k in result.metrics if k.startswith(("eval/", "twins/"))):
        value = result.metrics[key]
        print(f"  {key:<{width}}  {value:7.2f}" if math.isfinite(value) else f"  {key:<{width}}  n/a")
    return 0


def load_trained_model(path: str | Path, device: str = "cpu") -> tuple[PFENet, ExperimentConfig]:
    """The model of a run folder or checkpoint file (newest final stage), in eval mode."""
    path = Path(path)
    if path.is_dir():
        candidates = [ckpt.final_path(path, 2), ckpt.final_path(path, 1), path / ckpt.FINAL_FILE]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise PFEError(f"{path}: no stage2/final.pt or stage1/final.pt in this folder")
        path = found[0]
    state = ckpt.load(path, advice="give a run folder or a stage's final.pt that `pfe-study train` wrote")
    cfg = load_config_text(state["config"], str(path))
    model = build_model(cfg.with_overrides({"model.pretrained": "none"}), state["num_classes"])
    model.load_state_dict(state["model"])
    model.set_stage(state["stage"])
    return model.to(device).eval(), cfg

