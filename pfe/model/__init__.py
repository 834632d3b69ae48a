"""pfe.model: backbones, attention, side branches, PFENet, profiling.

``build_model`` is the one place that maps an ExperimentConfig to the model's constructor.
"""

from __future__ import annotations

import torch

from pfe.config import ExperimentConfig, RuntimeConfig
from pfe.model.pfenet import PFENet, PFEOutput


def build_model(cfg: ExperimentConfig, num_classes: int, *, pretrained: str | None = None) -> PFENet:
    """PFENet for ``cfg``; ``pretrained`` overrides ``cfg.model.pretrained`` (profiling passes "none")."""
    m = cfg.model
    return PFENet(
        backbone=m.backbone,
        last_stride=m.last_stride,
        pretrained=m.pretrained if pretrained is None else pretrained,
        attention=m.attention,
        reduction=m.reduction,
        side=m.side,
        channels=m.channels,
        side_dim=m.side_dim,
        separable=m.separable,
        alpha=m.alpha,
        side_loss=cfg.stage2.loss,
        num_classes=num_classes,
        frozen_main=frozen_main_mode(cfg.runtime),
    )


def frozen_main_mode(runtime: RuntimeConfig, device: torch.device | None = None) -> str:
    """``runtime.frozen_main``, with ``auto`` decided as measured on an H200 (reports/bench/NOTES.md):
    ``fused`` when the step is replayed from a CUDA graph (stage II 9.6 ms against 11.0 folded, session 5;
    cuDNN's fused ops cost host time on every eager call, which a replay does not repeat), else ``folded``
    (eager: 21.0 ms against 23.3 fused, session 4). The model is built with this intent before it has a
    device; given ``device``, what runs there: off a GPU the copy stays ``folded`` (cuDNN's fused kernels
    exist on a GPU only)."""
    mode = runtime.frozen_main
    if mode == "auto":
        mode = "fused" if runtime.cuda_graph else "folded"
    off_gpu = device is not None and device.type != "cuda"
    return "folded" if mode == "fused" and off_gpu else mode


def compile_mode(runtime: RuntimeConfig, device: torch.device) -> str:
    """``runtime.compile``, with ``auto`` as ``all`` when a CUDA device replays the step from a CUDA graph,
    else ``off``. Inside a graph the compiled code's host cost (guards, launches) is paid once, at capture;
    on an H200 (reports/bench/NOTES.md, session 5) ``all`` was the fastest for every step: baseline 19.4 ms
    (off: 25.7), stage I 21.9 (regions 28.2, off 32.9), stage II 8.9 (regions 9.6, off 15.8). Eager, the
    whole model compiled was slower (session 4), and on a CPU compiling costs more than short runs save."""
    if runtime.compile != "auto":
        return runtime.compile
    return "all" if runtime.cuda_graph and device.type == "cuda" else "off"


def autotune_mode(runtime: RuntimeConfig, device: torch.device) -> str:
    """``runtime.autotune`` where it applies: on a GPU, when something is compiled; else ``off`` (Inductor's
    CPU kernels have no block sizes to tune, and its CPU GEMM templates would only slow the compile)."""
    return runtime.autotune if device.type == "cuda" and compile_mode(runtime, device) != "off" else "off"


__all__ = ["PFENet", "PFEOutput", "autotune_mode", "build_model", "compile_mode", "frozen_main_mode"]
