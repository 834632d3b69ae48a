"""`pfe-study bench cost`: the two numbers before any GPU timing: work and bytes of each training step.

For the steps ``bench train`` times (baseline, stage I, stage II and its variants, stage II's frozen
forward), real steps on the CPU under bf16 autocast and fused Adam, as on a GPU, go through a
``TorchDispatchMode`` that records every aten op: its FLOPs (``torch.utils.flop_counter``'s
formulas), the bytes it reads and writes (each tensor argument and result once; views move
nothing), which part of the model ran it (``ModuleTracker``) and whether it ran in the forward or
backward pass or in the optimiser. bf16 convolutions are slow on this kind of CPU, so the steps run
small (three recordings: two batch sizes, two input sizes) and each op's cost is extrapolated to
batch 64 at 384x192: an op's cost is a constant plus a per-image plus a per-pixel term.

From these, each step's floors on a given card (the ceilings are measured numbers, see
:data:`H100`): FLOPs over the bf16 matrix rate, bytes over the copy bandwidth, the eager-mode sum of
the per-op rooflines (each kernel alone is either compute- or memory-bound), and the number of
kernels (a launch costs a few microseconds of host time in eager mode). Ratios of those floors
between steps say what a ratio of measured images/s can reach without fusing kernels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

from pfe.bench.train import FULL, QUICK, BenchStep, Sizes, bench_configs, build_step


@dataclass(frozen=True)
class Card:
    """The ceilings a floor is computed with (measured, not datasheet numbers)."""

    name: str
    matmul_flops: float  # bf16 dense matrix product, FLOP/s
    copy_bytes: float  # device-to-device copy, bytes read + written per second
    launch_s: float  # host time per eager kernel launch


# Measured on this workplace's H100 (device/KINDS.md, 2026-11-13): an 8192^3 bf16 matrix product at
# 798 TFLOP/s, a device-to-device copy at 3.0 TB/s. 5 us per eager launch is PyTorch's usual host cost.
H100 = Card("NVIDIA H100 80GB HBM3", matmul_flops=798e12, copy_bytes=3.0e12, launch_s=5e-6)

GROUPS = ("backbone", "attention", "side", "heads", "other", "optimizer")
_NO_DATA = {  # metadata queries and ops that move no data
    torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.lift_fresh.default,
    torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten._local_scalar_dense.default,
}


def _group(parents: set[str], phase: str) -> str:
    if phase == "optimizer":
        return "optimizer"
    for name in sorted(parents, key=len, reverse=True):  # the deepest PFENet child that ran the op
        parts = name.split(".")
        # GraphModule: stage II's folded copy of the main branch (pfe.model.frozen), same child names
        if len(parts) >= 2 and parts[0] in ("PFENet", "GraphModule"):
            child = parts[1]
            if child in ("backbone", "attention"):
                return child
            if child.startswith("side"):
                return "side"
            if child in ("neck", "head"):
                return "heads"
    if "GraphModule" in parents:  # the folded copy's own functional ops (residual adds, attention products)
        return "backbone"
    return "other"  # losses, F5's pooling, and backward ops no module's hooks enclose


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an op touches in ``t``: its elements, at most its storage (a broadcast view reads little)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


@dataclass
class Op:
    """One aten op of a step: where it ran, its FLOPs and the bytes it touched."""

    group: str
    direction: str  # forward | backward | update
    name: str
    flops: float
    bytes: float


class OpRecorder(TorchDispatchMode):
    """Records every data-moving aten op of an eager step, in order."""

    def __init__(self, tracker: ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.phase = "step"
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func in _NO_DATA:
            return out
        packet = func._overloadpacket
        flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
        tensors = {id(t): t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
        direction = "update" if self.phase == "optimizer" else "backward" if self.tracker.is_bw else "forward"
        self.ops.append(Op(_group(self.tracker.parents, self.phase), direction, str(packet),
                           flops, float(sum(_nbytes(t) for t in tensors.values()))))
        return out


def record_step(step: BenchStep) -> list[Op]:
    """The ops of one call of ``step``; the optimiser's own are told apart through its step hooks."""
    with ModuleTracker() as tracker, OpRecorder(tracker) as recorder:
        hooks = []
        if step.optimizer is not None:
            hooks = [step.optimizer.register_step_pre_hook(lambda *_: setattr(recorder, "phase", "optimizer")),
                     step.optimizer.register_step_post_hook(lambda *_: setattr(recorder, "phase", "step"))]
        try:
            step.run(1)
        finally:
            for hook in hooks:
                hook.remove()
    return recorder.ops


def extrapolate(base: list[Op], more_images: list[Op], more_pixels: list[Op], batches: tuple[int, int],
                pixels: tuple[int, int], batch: int, target_pixels: int) -> list[Op]:
    """Each op's cost at (``batch``, ``target_pixels``) from three recordings of the same op sequence:
    (b0, p0), (b1, p0), (b0, p1). An op's cost is c + B * (v + s * P): weights and optimiser state
    (c), per-image vectors such as GAP features and logits (v), per-pixel maps (s)."""
    if not len(base) == len(more_images) == len(more_pixels):
        raise RuntimeError(f"bench cost: the op sequences differ in length ({len(base)}, {len(more_images)}, "
                           f"{len(more_pixels)}): the step branches on the input size")
    (b0, b1), (p0, p1) = batches, pixels

    def at_target(f00: float, f10: float, f01: float) -> float:
        per_pixel = (f01 - f00) / (b0 * (p1 - p0))
        per_image = (f10 - f00) / (b1 - b0) - p0 * per_pixel
        constant = f00 - b0 * per_image - b0 * p0 * per_pixel
        return max(0.0, constant + batch * (per_image + target_pixels * per_pixel))

    return [replace(a, flops=at_target(a.flops, b.flops, c.flops), bytes=at_target(a.bytes, b.bytes, c.bytes))
            for a, b, c in zip(base, more_images, more_pixels)]


def summarise_ops(ops: list[Op], card: Card) -> dict[str, Any]:
    """Totals, floors on ``card`` and a (group, pass) breakdown of a step's ops."""
    rows: dict[tuple[str, str], dict[str, float]] = defaultdict(
        lambda: {"flops": 0.0, "bytes": 0.0, "kernels": 0.0, "roofline_s": 0.0})
    for op in ops:
        row = rows[(op.group, op.direction)]
        row["flops"] += op.flops
        row["bytes"] += op.bytes
        row["kernels"] += 1
        row["roofline_s"] += max(op.flops / card.matmul_flops, op.bytes / card.copy_bytes)  # one kernel alone
    table = [{"group": g, "pass": p, **v} for (g, p), v in sorted(rows.items(), key=lambda kv: (GROUPS.index(kv[0][0]), kv[0][1]))]
    flops, nbytes = sum(r["flops"] for r in table), sum(r["bytes"] for r in table)
    return {
        "rows": table,
        "flops": flops,
        "bytes": nbytes,
        "kernels": len(ops),
        "compute_floor_ms": 1e3 * flops / card.matmul_flops,
        "memory_floor_ms": 1e3 * nbytes / card.copy_bytes,
        "eager_roofline_ms": 1e3 * sum(r["roofline_s"] for r in table),
        "launch_floor_ms": 1e3 * len(ops) * card.launch_s,
    }


# Where the ops are recorded: (batch, height, width) x 3, on the CPU under bf16 autocast. bf16
# convolutions are slow on a CPU without AVX-512 BF16, so the full size is reached by extrapolation.
COUNT_AT = {
    "full": ((4, 64, 32), (8, 64, 32), (4, 128, 64)),
    "quick": ((4, 32, 16), (8, 32, 16), (4, 64, 32)),
}


def record_ops(name: str, sizes: Sizes, batch: int, height: int, width: int) -> list[Op]:
    """The ops of one ``bench train`` step ``name`` at this batch and input size (CPU, bf16 autocast, fused Adam)."""
    device = torch.device("cpu")
    small = replace(sizes, ids_per_batch=batch // 2, images_per_id=2, height=height, width=width)  # PK split: no cost
    cfg = bench_configs(small, device)["stage2" if name == "stage2_frozen_forward" else name]
    stage = 1 if name in ("baseline", "stage1") else 2
    step = build_step(cfg, stage, small, device, amp_dtype=torch.bfloat16, fused_adam=True,  # as on a GPU
                      frozen_forward_only=name == "stage2_frozen_forward")
    step.run(0)  # one step first: lazy state (optimiser moments, the folded copy) exists before recording
    return record_step(step)


def step_cost(name: str, sizes: Sizes, card: Card = H100, count_at: tuple = COUNT_AT["full"]) -> dict[str, Any]:
    """Cost and floors of one ``bench train`` measurement at ``sizes`` (batch, height x width)."""
    (b0, h0, w0), (b1, _, _), (_, h1, w1) = count_at
    recorded = [record_ops(name, sizes, b, h, w) for b, h, w in count_at]
    ops = extrapolate(*recorded, batches=(b0, b1), pixels=(h0 * w0, h1 * w1), batch=sizes.batch,
                      target_pixels=sizes.height * sizes.width)
    return {"batch": sizes.batch, **summarise_ops(ops, card)}


STEPS = ("baseline", "stage1", "stage2", "stage2_separable", "stage2_unfolded", "stage2_frozen_forward")


def bench_cost(quick: bool = False, card: Card = H100, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The cost of every step ``bench train`` times, and the ratios of their floors to the baseline's."""
    sizes = QUICK if quick else FULL
    report: dict[str, Any] = {
        "benchmark": "cost",
        "quick": quick,
        "torch": torch.__version__,
        "card": {"name": card.name, "matmul_tflops": card.matmul_flops / 1e12, "copy_tb_s": card.copy_bytes / 1e12,
                 "launch_us": card.launch_s * 1e6},
        "setup": {"input": f"{sizes.height}x{sizes.width}", "batch": sizes.batch, "backbone": sizes.backbone,
                  "precision": "bf16 autocast", "counted_at": COUNT_AT["quick" if quick else "full"]},
        "steps": {},
    }
    for name in STEPS:
        log(f"bench cost: {name}")
        report["steps"][name] = step_cost(name, sizes, card, COUNT_AT["quick" if quick else "full"])
    base = report["steps"]["baseline"]
    for cost in report["steps"].values():
        cost["vs_baseline"] = {  # how many times the baseline's images/s each floor allows
            key: base[key] / cost[key] if cost[key] else None
            for key in ("flops", "bytes", "eager_roofline_ms", "launch_floor_ms")
        }
    return report


def render_markdown(report: dict[str, Any]) -> str:
    card, setup = report["card"], report["setup"]
    lines = [
        "# What each training step must do: FLOPs, bytes, kernels" + (" (quick sizes)" if report["quick"] else ""),
        "",
        f"Recorded op by op on the CPU (torch {report['torch']}) in real steps under bf16 autocast with fused "
        f"Adam, at (batch, height, width) {', '.join(str(tuple(c)) for c in setup['counted_at'])}, and extrapolated "
        f"to batch {setup['batch']} at {setup['input']} ({setup['backbone']}). Floors use {card['name']}'s measured ceilings: "
        f"{card['matmul_tflops']:.0f} TFLOP/s bf16 matrix product, {card['copy_tb_s']:.1f} TB/s copy, "
        f"{card['launch_us']:.0f} us of host time per eager kernel.",
        "",
        "| step | GFLOP | GB moved | kernels | compute floor (ms) | memory floor (ms) | eager roofline (ms) | launch floor (ms) | x baseline by eager roofline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in report["steps"].items():
        ratio = c["vs_baseline"]["eager_roofline_ms"]
        lines.append(f"| {name} | {c['flops'] / 1e9:,.0f} | {c['bytes'] / 1e9:,.2f} | {c['kernels']:,} | "
                     f"{c['compute_floor_ms']:.2f} | {c['memory_floor_ms']:.2f} | {c['eager_roofline_ms']:.2f} | "
                     f"{c['launch_floor_ms']:.2f} | {ratio:.2f} |")
    for name in ("baseline", "stage2"):
        c = report["steps"][name]
        note = (" (the folded copy of the frozen main branch inlines the attention products and residual adds: "
                "they count as backbone; 'other' backward is mostly the side branches' functional ops, masks, "
                "upsampling and activation maps, which ModuleTracker cannot place in the backward pass)"
                if name == "stage2" else "")
        lines += ["", f"{name}, by part of the model and pass{note}:", "",
                  "| part | pass | GFLOP | GB moved | kernels | eager roofline (ms) |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for r in c["rows"]:
            lines.append(f"| {r['group']} | {r['pass']} | {r['flops'] / 1e9:,.1f} | {r['bytes'] / 1e9:,.2f} | "
                         f"{int(r['kernels'])} | {1e3 * r['roofline_s']:.2f} |")
    return "\n".join(lines) + "\n"


def cli_bench_cost(args: Any) -> int:
    """The ``cost`` part of `pfe-study bench`: prints the Markdown and where the JSON went."""
    import sys

    from pfe.bench import write_report

    report = bench_cost(quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
    write_report(Path(args.out), "cost" + ("_quick" if args.quick else ""), report, render_markdown(report))
    return 0
