"""`pfe-study bench train`: training throughput, input pipeline, evaluation time and memory (issue 9).

One run on one device measures, with the trainer's own code (``pfe.engine.trainer.train_step``,
``place_model``, ``build_optimizer``, ``stage_loss_fn`` and, for whole epochs, ``_Run``):

- images/s of one optimiser step on batches already on the device (random images, PK labels) for
  (a) the bag-of-tricks baseline = PFENet with attention=none, side=none (ResNet50, last stride 1,
  BNNeck, CE + batch-hard triplet), (b) PFE stage I (ResNet50 + TSAM), (c) PFE stage II (frozen main
  branch, MFA side branches, cascade loss with temperatures and region overlap: the defaults of
  ExperimentConfig, i.e. the paper's setting), stage II with the separable 3x3 (MFA-dagger), and
  stage II's frozen main-branch forward alone (the floor of a stage-II step);
- stage-I images/s over whole epochs of a SynthReID set read from JPEG files through the trainer's
  input pipeline: ``data.cache=device`` (decoded once, augmented on the device; the headline
  ``epoch_from_jpeg_img_s``) and ``data.cache=none`` (DataLoader workers decoding every epoch);
- the MSMT17-size evaluation (11,659 x 82,161): ``rank_metrics`` on a distance matrix as in
  ``bench eval``, and the final feature set from features (distances + ranking);
- peak GPU memory (``torch.cuda.max_memory_allocated``) of each measurement, and on a GPU the
  synchronising CUDA calls of a few steps after warm-up (``torch.cuda.set_sync_debug_mode``).

Timing: warm-up steps first (cudnn autotuning, allocator), then ``torch.cuda.synchronize`` only
around each timed region, never per step; the median of the timed repeats is reported. Each
measurement runs in a try block: a failure is recorded in the JSON (``errors``) and the run goes on,
and the JSON is rewritten after each measurement, so a run stopped half way leaves what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfe.config import ExperimentConfig
from pfe.errors import PFEError

GB = 1e9

# Acceptance of issue 9 (ratios from one run on one GPU; the absolute number is for an H100).
ACCEPTANCE = {
    "baseline_img_s": (">=", 1850.0),
    "stage1_vs_baseline": (">=", 0.9),
    "stage2_vs_baseline": (">=", 2.0),
    "epoch_from_jpeg_vs_step_from_tensors": (">=", 0.95),
    "eval_msmt_s": ("<=", 1.0),
}


@dataclass(frozen=True)
class Sizes:
    """What one bench run uses: input size, PK batch, model widths, step counts, synthetic set."""

    height: int
    width: int
    ids_per_batch: int
    images_per_id: int
    backbone: str
    channels: int | None  # None: the config's default (the paper's setting)
    side_dim: int | None
    num_classes: int
    warmup: int
    steps: int
    repeats: int
    synth_ids_train: int
    synth_images_per_id: int
    epochs: int
    eval_size: str

    @property
    def batch(self) -> int:
        return self.ids_per_batch * self.images_per_id


# The JPEG set: 800 ids x 16 images = 12,800 training images, about Market-1501's 12,936 (200 batches).
FULL = Sizes(height=384, width=192, ids_per_batch=16, images_per_id=4, backbone="resnet50", channels=None,
             side_dim=None, num_classes=751, warmup=15, steps=30, repeats=3, synth_ids_train=800,
             synth_images_per_id=16, epochs=2, eval_size="msmt17")
# CPU smoke test: ResNet18 at 64x32, batch 8, a few steps, a 32-image set.
QUICK = Sizes(height=64, width=32, ids_per_batch=4, images_per_id=2, backbone="resnet18", channels=16,
              side_dim=32, num_classes=16, warmup=1, steps=2, repeats=1, synth_ids_train=8,
              synth_images_per_id=4, epochs=2, eval_size="quick")




def bench_configs(sizes: Sizes, device: torch.device) -> dict[str, ExperimentConfig]:
    """The configs measured: baseline, stage I (TSAM), stage II (MFA, cascade, RO), MFA-dagger, stage II
    with the frozen main branch run as checkpointed (no BN folding) and with cuDNN conv+ReLU kernels;
    the steps eager (no CUDA graph, nothing compiled), graphed without compiling (runtime.compile=off) and
    with PFE's own parts alone compiled (runtime.compile=regions), to show what the defaults buy; the
    baseline and stage I with Inductor's autotuning (runtime.autotune)."""
    overrides: dict[str, Any] = {
        "data.height": sizes.height,
        "data.width": sizes.width,
        "data.ids_per_batch": sizes.ids_per_batch,
        "data.images_per_id": sizes.images_per_id,
        "model.backbone": sizes.backbone,
        "model.pretrained": "none",
        "runtime.device": str(device),
        "runtime.progress": False,
    }
    if sizes.channels is not None:
        overrides["model.channels"] = sizes.channels
    if sizes.side_dim is not None:
        overrides["model.side_dim"] = sizes.side_dim
    base = ExperimentConfig().with_overrides(overrides)
    baseline = base.with_overrides({"model.attention": "none", "model.side": "none"})
    return {
        "baseline": baseline,
        "stage1": base,
        "stage2": base,
        "stage2_separable": base.with_overrides({"model.separable": True}),
        "stage2_c96": base.with_overrides({"model.channels": 96}),  # model.channels' default before 2026-12
        "stage2_unfolded": base.with_overrides({"runtime.frozen_main": "modules"}),
        "stage2_folded": base.with_overrides({"runtime.frozen_main": "folded"}),
        "stage2_fused": base.with_overrides({"runtime.frozen_main": "fused"}),
        "baseline_eager": baseline.with_overrides({"runtime.cuda_graph": False}),
        "stage1_eager": base.with_overrides({"runtime.cuda_graph": False}),
        "stage2_eager": base.with_overrides({"runtime.cuda_graph": False}),
        "baseline_uncompiled": baseline.with_overrides({"runtime.compile": "off"}),
        "stage1_uncompiled": base.with_overrides({"runtime.compile": "off"}),
        "stage2_uncompiled": base.with_overrides({"runtime.compile": "off"}),
        "stage1_regions": base.with_overrides({"runtime.compile": "regions"}),
        "stage2_regions": base.with_overrides({"runtime.compile": "regions"}),
        **{f"{name}_{tuning}": cfg.with_overrides({"runtime.autotune": tuning})
           for name, cfg in (("baseline", baseline), ("stage1", base)) for tuning in AUTOTUNED},
    }


# ---------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GB, 3) if device.type == "cuda" else None


def count_host_syncs(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> dict[str, Any] | None:
    """Synchronising CUDA calls made by ``repeats`` calls of ``fn`` (torch.cuda.set_sync_debug_mode); None on a CPU."""
    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(repeats):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    # the mode's own "is a prototype feature" notice (once per process) is not a sync
    messages = [str(w.message) for w in caught
                if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    return {"calls": repeats, "syncs": len(messages), "examples": sorted(set(messages))[:3]}


def random_batches(sizes: Sizes, device: torch.device, count: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches on the device: normalised-looking random images and PK labels (P ids x K)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        images = torch.randn(sizes.batch, 3, sizes.height, sizes.width, generator=gen)
        first = (i * sizes.ids_per_batch) % max(1, sizes.num_classes - sizes.ids_per_batch)
        pids = (first + torch.arange(sizes.ids_per_batch)).repeat_interleave(sizes.images_per_id)
        images = images.to(device)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        out.append((images, pids.to(device)))
    return out


def _timed_runs(step: Callable[[int], Any], sizes: Sizes, device: torch.device) -> tuple[float, list[float]]:
    """The first call's seconds (compilation, autotuning), more warm-up calls, then ``repeats`` timed runs
    of ``steps`` calls, synchronised only around each run."""
    _sync(device)
    start = time.perf_counter()
    step(0)
    _sync(device)
    first = time.perf_counter() - start
    for i in range(1, sizes.warmup):
        step(i)
    runs = []
    for _ in range(sizes.repeats):
        _sync(device)
        start = time.perf_counter()
        for i in range(sizes.steps):
            step(i)
        _sync(device)
        runs.append(time.perf_counter() - start)
    return first, runs


@dataclass
class BenchStep:
    """One measured step, ready to call: ``run(i)`` runs it on batch ``i % 4``."""

    run: Callable[[int], None]
    optimizer: torch.optim.Optimizer | None  # None: the frozen forward alone
    params_trained: int
    loss_finite: Callable[[], bool]


def build_step(cfg: ExperimentConfig, stage: int, sizes: Sizes, device: torch.device, *,
               amp_dtype: torch.dtype | None | str = "auto", fused_adam: bool | None = None,
               frozen_forward_only: bool = False) -> BenchStep:
    """The trainer's step (``make_train_step``: eager or, on a GPU by default, replayed from a CUDA graph)
    and the epoch loop's loss bookkeeping, on batches already on the device; with ``frozen_forward_only``,
    stage II's frozen main branch alone (eval mode, no grad, autocast: the floor of a stage-II step). ``amp_dtype="auto"`` and ``fused_adam=None``: the trainer's
    choices for the device."""
    from pfe.engine.trainer import (
        LossTally,
        autocast_dtype,
        build_optimizer,
        make_train_step,
        place_model,
        seed_everything,
        stage_loss_fn,
        uses_cuda_graph,
    )
    from pfe.model import autotune_mode, build_model, compile_mode

    seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)  # cudnn.benchmark as the trainer sets it
    model = place_model(build_model(cfg, sizes.num_classes), device, compile_mode(cfg.runtime, device),
                        autotune_mode(cfg.runtime, device))
    model.set_stage(stage)
    model.train()  # in stage 2 the main branch stays in eval mode
    amp = autocast_dtype(cfg.runtime.precision, device) if amp_dtype == "auto" else amp_dtype
    batches = random_batches(sizes, device)
    if frozen_forward_only:
        def forward(i: int) -> None:
            with torch.autocast(device.type, amp, enabled=amp is not None):
                model.frozen_main_maps(batches[i % len(batches)][0])

        return BenchStep(forward, None, 0, lambda: True)

    params = list(model.main_branch_parameters() if stage == 1 else model.side_parameters())
    optimizer = build_optimizer(params, cfg.stage1 if stage == 1 else cfg.stage2, device, fused=fused_adam)
    train_step = make_train_step(model, optimizer, stage=stage, loss_fn=stage_loss_fn(cfg, stage), device=device,
                                 amp_dtype=amp, cuda_graph=uses_cuda_graph(cfg, device))
    tally = LossTally()  # the epoch loop's bookkeeping

    def step(i: int) -> None:
        tally.add(train_step(*batches[i % len(batches)]))

    return BenchStep(step, optimizer, sum(p.numel() for p in params), lambda: not tally.non_finite())


def time_steps(cfg: ExperimentConfig, stage: int, sizes: Sizes, device: torch.device,
               frozen_forward_only: bool = False) -> dict[str, Any]:
    """images/s of a :func:`build_step` step: warm-up, then timed runs synchronised only at their ends."""
    _reset_peak(device)
    step = build_step(cfg, stage, sizes, device, frozen_forward_only=frozen_forward_only)
    first_s, runs = _timed_runs(step.run, sizes, device)
    steps_done = sizes.warmup + sizes.repeats * sizes.steps
    seconds = statistics.median(runs)
    result = {
        "img_s": sizes.batch * sizes.steps / seconds,
        "step_ms": 1000 * seconds / sizes.steps,
        "runs_s": [round(r, 4) for r in runs],
        "steps_per_run": sizes.steps,
        "warmup_steps": sizes.warmup,
        "first_step_s": round(first_s, 3),
        "peak_mem_gb": _peak_gb(device),
    }
    if not frozen_forward_only:
        result.update({
            "loss_finite": step.loss_finite(),
            # after warm-up: cudnn autotuning syncs once
            "host_syncs": count_host_syncs(lambda: step.run(steps_done), device),
            "params_trained_m": round(step.params_trained / 1e6, 3),
        })
    return result


def profile_step(cfg: ExperimentConfig, stage: int, sizes: Sizes, device: torch.device, steps: int = 5) -> dict[str, Any]:
    """Where a step's device time goes (``torch.profiler``, ``steps`` steps after warm-up): the top GPU
    kernels (on a CPU: aten ops) by self time, and the device's busy time against the wall time.
    The profiler adds host overhead, so ``busy_fraction`` is a lower bound."""
    from torch.profiler import ProfilerActivity, profile

    step = build_step(cfg, stage, sizes, device)
    for i in range(3):
        step.run(i)
    gpu = device.type == "cuda"
    kind = torch.autograd.DeviceType.CUDA if gpu else torch.autograd.DeviceType.CPU
    _sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        for i in range(steps):
            step.run(i)
        _sync(device)
    wall_us = (time.perf_counter() - start) * 1e6

    def self_us(event: Any) -> float:
        return event.self_device_time_total if gpu else event.self_cpu_time_total

    rows = sorted((e for e in prof.key_averages() if e.device_type == kind and self_us(e) > 0), key=self_us, reverse=True)
    busy_us = sum(self_us(e) for e in rows)
    return {
        "steps": steps,
        "wall_ms_per_step": wall_us / 1e3 / steps,
        "busy_ms_per_step": busy_us / 1e3 / steps,
        "busy_fraction": busy_us / wall_us,
        "kernels_per_step": sum(e.count for e in rows) / steps,
        "top": [{"name": e.key[:100], "calls_per_step": e.count / steps, "ms_per_step": self_us(e) / 1e3 / steps,
                 "share": self_us(e) / busy_us} for e in rows[:12]],
    }


# ---------------------------------------------------------------- JPEG set and whole epochs
def _generate_part(args: tuple[str, int, int, int, int, int]) -> int:
    from pfe.data.synth import generate_synthreid

    out, ids_train, ids_test, images_per_id, cameras, seed = args
    generate_synthreid(out, ids_train=ids_train, ids_test=ids_test, images_per_id=images_per_id, cameras=cameras, seed=seed)
    return ids_train


def make_synth_set(root: str | Path, ids_train: int, images_per_id: int, *, ids_test: int = 4, cameras: int = 6,
                   parts: int = 1) -> Path:
    """A SynthReID folder with ``ids_train`` training identities, generated in ``parts`` processes.

    Part 0 is a complete set (its own test split); the training images of parts 1.. (other seeds)
    are moved into it with pids 10000 * part + pid, so the set loads as one synthreid dataset.
    """
    root = Path(root)
    parts = max(1, min(parts, ids_train // 2))
    shares = [ids_train // parts + (1 if i < ids_train % parts else 0) for i in range(parts)]
    scratch = root.parent / f"{root.name}_parts"
    jobs = [(str(root if i == 0 else scratch / str(i)), shares[i], ids_test if i == 0 else 2, images_per_id, cameras, i)
            for i in range(parts)]
    if parts == 1:
        _generate_part(jobs[0])
        return root
    with ProcessPoolExecutor(max_workers=parts, mp_context=get_context("spawn")) as pool:
        list(pool.map(_generate_part, jobs))
    train_dir = root / "bounding_box_train"
    for i in range(1, parts):
        for file in sorted((scratch / str(i) / "bounding_box_train").iterdir()):
            pid, rest = file.name.split("_", 1)
            file.replace(train_dir / f"{10000 * i + int(pid)}_{rest}")
    shutil.rmtree(scratch)
    return root


def time_epochs(cfg: ExperimentConfig, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Stage-I images/s over whole epochs through the trainer's own input pipeline and epoch loop."""
    from pfe.engine.trainer import TrainHooks, _Run, build_optimizer

    _reset_peak(device)
    with tempfile.TemporaryDirectory(prefix="pfe-bench-run-") as workdir:
        started = time.perf_counter()
        run = _Run(cfg, Path(workdir), TrainHooks(), lambda message: None)
        setup_s = time.perf_counter() - started
        run.model.set_stage(1)
        optimizer = build_optimizer(list(run.model.main_branch_parameters()), cfg.stage1, run.device)
        train_step = run.stage_step(1, optimizer)
        epochs = []
        for epoch in range(1, sizes.epochs + 1):
            _sync(device)
            start = time.perf_counter()
            metrics = run._train_epoch(1, epoch, optimizer, train_step)
            _sync(device)
            seconds = time.perf_counter() - start
            images = len(run.sampler) * cfg.data.batch_size
            epochs.append({
                "epoch": epoch,
                "seconds": round(seconds, 4),
                "images": images,
                "img_s": images / seconds,
                "trainer_img_per_s": metrics["img_per_s/stage1"],
            })
        result = {
            "img_s": epochs[-1]["img_s"],  # the last epoch: after cudnn autotuning and allocator warm-up
            "epochs": epochs,
            "train_images": len(run.data.train),
            "setup_s": round(setup_s, 3),
            "cache": cfg.data.cache,
            "workers": cfg.data.workers,
            "peak_mem_gb": _peak_gb(device),
        }
        if run.train_cache is not None:
            from pfe.data.device_cache import epoch_generator

            result["cache_gb"] = round(run.train_cache.nbytes() / GB, 3)
            cache, plan = run.train_cache, list(run.sampler)[:3]
            generator = epoch_generator(run.device, 0, 1, 99)
            result["host_syncs"] = count_host_syncs(lambda: list(cache.epoch(plan, generator)), device, repeats=1)
        del run, optimizer
    return result


# ---------------------------------------------------------------- evaluation
def time_eval(size: str, device: torch.device, repeats: int) -> dict[str, Any]:
    """``rank_metrics`` on a ``size`` distance matrix (as ``bench eval``), and the final set from features."""
    from pfe.bench.evaluation import SIZES, synthetic_eval_problem, timed
    from pfe.config import FINAL_SET
    from pfe.engine.evaluation import evaluate_sets, rank_metrics

    def time_ranking() -> tuple[list[float], tuple[np.ndarray, ...]]:
        distmat, *labels = synthetic_eval_problem(size, seed=1, device=device)
        qp_t, gp_t, qc_t, gc_t = (torch.as_tensor(x, device=device) for x in labels)
        rank_metrics(distmat, qp_t, gp_t, qc_t, gc_t)  # warm-up
        runs, _ = timed(lambda: rank_metrics(distmat, qp_t, gp_t, qc_t, gc_t), repeats, device)
        return runs, tuple(labels)

    _reset_peak(device)
    runs, (qp, gp, qc, gc) = time_ranking()  # the distance matrix is freed on return
    num_q, num_g = SIZES[size][:2]
    gen = torch.Generator().manual_seed(2)
    dims = {"F2": 512, "F3": 512, "F4": 512, "F5": 2048}
    q_feats = {k: torch.randn(num_q, d, generator=gen).to(device) for k, d in dims.items()}
    g_feats = {k: torch.randn(num_g, d, generator=gen).to(device) for k, d in dims.items()}
    evaluate_sets(q_feats, g_feats, qp, gp, qc, gc, sets=[FINAL_SET])  # warm-up
    runs_sets, _ = timed(lambda: evaluate_sets(q_feats, g_feats, qp, gp, qc, gc, sets=[FINAL_SET]), repeats, device)
    return {
        "size": size,
        "queries": num_q,
        "gallery": num_g,
        "rank_metrics_s": statistics.median(runs),
        "rank_metrics_runs_s": [round(r, 4) for r in runs],
        "final_set_from_features_s": statistics.median(runs_sets),
        "final_set_runs_s": [round(r, 4) for r in runs_sets],
        "final_set_dim": sum(dims.values()),
        "peak_mem_gb": _peak_gb(device),
    }


# ---------------------------------------------------------------- the run
def _host(device: torch.device) -> dict[str, Any]:
    host: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        host.update({
            "card": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "multiprocessors": props.multi_processor_count,
            "memory_gb": round(props.total_memory / GB, 1),
        })
    else:
        host["card"] = "cpu"
    return host


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing (a measurement that did not run)."""
    return a / b if a is not None and b else None


# runtime.autotune: the baseline and stage I each way, the cheaper searches first (a capped GPU run may stop
# before max_autotune, whose Triton conv templates take longest to search)
AUTOTUNED = ("coordinate_descent", "max_autotune_gemm", "max_autotune")
# The step measurements, in the order the report lists them: the baseline first, the frozen forward last.
STEP_MEASUREMENTS = ("baseline", "stage1", "stage2", "baseline_uncompiled", "stage1_uncompiled", "stage2_uncompiled",
                     "stage1_regions", "stage2_regions", "baseline_eager", "stage1_eager", "stage2_eager",
                     *(f"{name}_{tuning}" for tuning in AUTOTUNED for name in ("baseline", "stage1")),
                     "stage2_separable", "stage2_c96", "stage2_unfolded", "stage2_folded", "stage2_fused", "stage2_frozen_forward")
GRAPHED = ("baseline", "stage1", "stage2")  # measured with the defaults, eager, and graphed without compiling
# every name `bench train --only` takes
MEASUREMENTS = (*STEP_MEASUREMENTS, "epoch_device_cache", "epoch_workers", "eval",
                *(f"profile_{name}" for name in GRAPHED))


def summarise(report: dict[str, Any]) -> None:
    """Fill the headline keys, ratios and acceptance from the measurements (in place)."""
    m = report["measurements"]

    def get(name: str, key: str = "img_s") -> float | None:
        return m.get(name, {}).get(key)

    for name in STEP_MEASUREMENTS:
        report[f"{name}_img_s"] = get(name)
    for name in STEP_MEASUREMENTS[1:-1]:  # every trained step against the baseline's
        report[f"{name}_vs_baseline"] = ratio(report[f"{name}_img_s"], report["baseline_img_s"])
    report["cuda_graph_speedup"] = {name: ratio(get(name), get(f"{name}_eager")) for name in GRAPHED}
    report["compile_speedup"] = {name: ratio(get(name), get(f"{name}_uncompiled")) for name in GRAPHED}
    for name in ("stage1", "stage2"):  # the ratios with an eager trainer, and with a graphed one compiling nothing
        report[f"{name}_eager_vs_baseline_eager"] = ratio(get(f"{name}_eager"), get("baseline_eager"))
        report[f"{name}_uncompiled_vs_baseline_uncompiled"] = ratio(get(f"{name}_uncompiled"), get("baseline_uncompiled"))
    for tuning in AUTOTUNED:  # stage I against the baseline, both tuned the same way
        report[f"stage1_{tuning}_vs_baseline_{tuning}"] = ratio(get(f"stage1_{tuning}"), get(f"baseline_{tuning}"))
    report["step_from_tensors_img_s"] = get("stage1")
    report["epoch_from_jpeg_img_s"] = get("epoch_device_cache")
    report["epoch_from_jpeg_workers_img_s"] = get("epoch_workers")
    report["epoch_from_jpeg_vs_step_from_tensors"] = ratio(report["epoch_from_jpeg_img_s"], report["step_from_tensors_img_s"])
    report["epoch_workers_vs_step_from_tensors"] = ratio(
        report["epoch_from_jpeg_workers_img_s"], report["step_from_tensors_img_s"]
    )
    report["eval_msmt_s"] = get("eval", "rank_metrics_s")
    report["eval_msmt_final_set_s"] = get("eval", "final_set_from_features_s")
    peaks = [v.get("peak_mem_gb") for k, v in m.items() if k != "eval"]
    peaks = [p for p in peaks if p is not None]
    report["peak_mem_gb"] = max(peaks) if peaks else None
    report["eval_peak_mem_gb"] = get("eval", "peak_mem_gb")
    checks = {}
    for key, (op, bound) in ACCEPTANCE.items():
        value = report.get(key)
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        checks[key] = {"value": value, "bound": f"{op} {bound:g}", "ok": ok}
    report["acceptance"] = {
        "applies": report["device"] == "cuda" and not report["quick"],
        "note": "issue 9's bounds: ratios on any GPU, baseline >= 1,850 images/s on an H100",
        "checks": checks,
    }


def bench_train(device: str = "auto", quick: bool = False, out: str | Path | None = None,
                log: Callable[[str], None] = print, only: Collection[str] | None = None,
                render: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Run the training benchmark; returns the report, also written to ``out/bench_<device>[_quick].json``
    (and ``.md`` by ``render``) after each measurement, so a run cut short keeps what it measured.
    ``only``: the measurements to make (names as in the report, :data:`MEASUREMENTS`), all by default."""
    unknown = sorted(set(only or ()) - set(MEASUREMENTS))
    if unknown:  # checked before anything runs: a one-shot GPU call must not measure nothing
        raise PFEError(f"bench train --only: unknown {', '.join(unknown)}; the measurements are {', '.join(MEASUREMENTS)}")
    from pfe.engine.trainer import resolve_device, uses_cuda_graph
    from pfe.model import autotune_mode, compile_mode, frozen_main_mode

    dev = resolve_device(device, "--device")
    sizes = QUICK if quick else FULL
    configs = bench_configs(sizes, dev)
    report: dict[str, Any] = {
        "benchmark": "train",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "card": None,
        "torch": torch.__version__,
        "quick": quick,
        "host": _host(dev),
        "setup": {
            "input": f"{sizes.height}x{sizes.width}",
            "batch": sizes.batch,
            "pk": f"{sizes.ids_per_batch} ids x {sizes.images_per_id} images",
            "backbone": sizes.backbone,
            "pretrained": "none (random init)",
            "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
            "channels_last": dev.type == "cuda",
            "cudnn_benchmark": dev.type == "cuda",
            "fused_adam": dev.type == "cuda",
            "cuda_graph": uses_cuda_graph(configs["stage1"], dev),
            "compile": compile_mode(configs["stage1"].runtime, dev),
            "frozen_main": frozen_main_mode(configs["stage2"].runtime, dev),
            "num_classes": sizes.num_classes,
            "stage2": {k: configs["stage2"].flat()[k] for k in (
                "model.side", "model.channels", "model.side_dim", "model.separable", "model.alpha",
                "stage2.loss", "stage2.temperatures", "stage2.w_ro")},
        },
        "measurements": {},
        "errors": {},
    }
    report["card"] = report["host"]["card"]
    out_dir = Path(out) if out is not None else None
    stem = f"bench_{dev.type}" + ("_quick" if quick else "")

    def save() -> None:
        summarise(report)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
            if render is not None:
                (out_dir / f"{stem}.md").write_text(render(report))

    def measure(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if only is not None and name not in only:
            return
        started = time.perf_counter()
        try:
            report["measurements"][name] = fn()
        except Exception as err:  # a one-shot GPU run keeps what it has
            report["errors"][name] = f"{type(err).__name__}: {err}"
            log(f"bench train: {name} failed:\n{traceback.format_exc()}")
        log(f"bench train: {name} done in {time.perf_counter() - started:.1f}s")
        save()

    workers = 0 if quick else max(1, min(12, (os.cpu_count() or 2) - 2))
    with tempfile.TemporaryDirectory(prefix="pfe-bench-synth-") as tmp:
        root = Path(tmp) / "synthreid"
        started = time.perf_counter()
        try:  # on the CPUs, before any GPU work (no interference with the timings)
            if only is None or any(name.startswith("epoch") for name in only):
                make_synth_set(root, sizes.synth_ids_train, sizes.synth_images_per_id, parts=1 if quick else workers)
        except Exception as err:
            report["errors"]["synth"] = f"{type(err).__name__}: {err}"
            log(f"bench train: generating the JPEG set failed:\n{traceback.format_exc()}")
        report["setup"]["synth"] = {
            "ids_train": sizes.synth_ids_train,
            "images_per_id": sizes.synth_images_per_id,
            "generate_s": round(time.perf_counter() - started, 2),
            "generate_processes": 1 if quick else workers,
            "epochs_timed": sizes.epochs,
        }
        log(f"bench train: synthreid set generated in {report['setup']['synth']['generate_s']}s")

        def steps(name: str) -> None:
            stage = 2 if name.startswith("stage2") else 1
            measure(name, lambda: time_steps(configs[name], stage, sizes, dev))

        for name in GRAPHED:
            steps(name)
        if uses_cuda_graph(configs["stage1"], dev):  # what the graph and compiling buy
            for name in GRAPHED:
                steps(f"{name}_uncompiled")
            for name in GRAPHED:
                steps(f"{name}_eager")
        data = {"data.dataset": "synthreid", "data.root": str(root), "data.workers": workers}
        if "synth" not in report["errors"]:
            measure("epoch_device_cache", lambda: time_epochs(
                configs["stage1"].with_overrides({**data, "data.cache": "device"}), sizes, dev))
        # the acceptance items are measured by now; the rest explains them (a capped GPU run may stop early)
        eval_size = sizes.eval_size if dev.type == "cuda" or quick else "market1501"
        measure("eval", lambda: time_eval(eval_size, dev, 1 if quick else 3))
        if autotune_mode(configs["stage1_max_autotune"].runtime, dev) != "off":  # compiled on a GPU: tuning applies
            for tuning in AUTOTUNED:
                for name in ("baseline", "stage1"):
                    steps(f"{name}_{tuning}")
        for name, stage in (("baseline", 1), ("stage1", 1), ("stage2", 2)):
            measure(f"profile_{name}", lambda name=name, stage=stage: profile_step(configs[name], stage, sizes, dev))
        if uses_cuda_graph(configs["stage1"], dev):
            for name in ("stage1_regions", "stage2_regions"):
                steps(name)
        steps("stage2_unfolded")
        # the copy the default (frozen_main=auto) does not pick here: folded when the step is graphed on a GPU
        steps("stage2_folded" if frozen_main_mode(configs["stage2"].runtime, dev) == "fused" else "stage2_fused")
        measure("stage2_frozen_forward", lambda: time_steps(configs["stage2"], 2, sizes, dev, frozen_forward_only=True))
        steps("stage2_separable")
        steps("stage2_c96")
        if "synth" not in report["errors"]:
            measure("epoch_workers", lambda: time_epochs(
                configs["stage1"].with_overrides({**data, "data.cache": "none"}), sizes, dev))
    save()
    return report
