"""Session 4's second GPU call: where stage I's and stage II's device time goes, and what three candidate
fixes would buy, so that the next changes are chosen from measurements (issue 9).

Run from the repo root: ``PYTHONPATH=. python3 reports/bench/probe_gpu.py OUT_DIR [--quick] [--session5]``.
``--session5`` replaces the last measurement (TSAM compiled, eager step) with stage I and II steps
compiled inside the CUDA graph. It was not run: session 5 measured the same through the trainer itself
(``runtime.compile=regions`` and ``all``, rows of ``pfe-study bench train``; NOTES.md).
Writes ``OUT_DIR/probe_<device>.json`` after every measurement (a run cut short keeps what it has).

1. ``ops_*``: the step's device time per aten op and input shapes (torch.profiler, record_shapes), to
   name the ops behind the slow non-vectorised elementwise kernels of the first run.
2. ``graph_*``: the step captured whole in a CUDA graph and replayed (fused Adam with capturable=True,
   autocast without its cast cache): the step's device-bound time, without the host's launch overhead.
3. ``tsam_compiled``: stage I with torch.compile on the four attention blocks only (the backbone stays
   eager cuDNN): does fusing TSAM's gates recover what compiling the whole main branch lost?
4. ``conv1x1_*``: a BN-folded 1x1 conv + bias + ReLU as cuDNN conv then separate passes, against one
   cuBLASLt GEMM with the bias and ReLU in its epilogue (``torch._addmm_activation``) on the NHWC view.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pfe.bench.train import FULL, QUICK, _timed_runs, bench_configs, random_batches
from pfe.engine.trainer import (
    LossTally,
    autocast_dtype,
    place_model,
    resolve_device,
    seed_everything,
    stage_loss_fn,
)
from pfe.model import build_model


def make_model(cfg: Any, stage: int, sizes: Any, device: torch.device) -> Any:
    seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)
    model = place_model(build_model(cfg, sizes.num_classes), device)
    model.set_stage(stage)
    model.train()
    return model


def make_step(cfg: Any, stage: int, sizes: Any, device: torch.device, *, capturable: bool = False,
              tweak: Callable[[Any], None] | None = None) -> tuple[Callable[[int], None], Any]:
    """The trainer's step (as pfe.bench.train.build_step) with optional model tweak and capturable Adam."""
    model = make_model(cfg, stage, sizes, device)
    if tweak is not None:
        tweak(model)
    amp = autocast_dtype(cfg.runtime.precision, device)
    params = list(model.main_branch_parameters() if stage == 1 else model.side_parameters())
    recipe = cfg.stage1 if stage == 1 else cfg.stage2
    gpu = device.type == "cuda"
    optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=gpu or None,
                                 capturable=capturable)
    loss_fn = stage_loss_fn(cfg, stage)
    tally = LossTally()
    batches = random_batches(sizes, device)

    def step(i: int) -> None:
        images, pids = batches[i % len(batches)]
        # autocast's cast cache must be off inside a CUDA graph capture
        with torch.autocast(device.type, amp, enabled=amp is not None, cache_enabled=not capturable):
            out = model(images, stage=stage)
        terms = loss_fn(out, pids)
        optimizer.zero_grad(set_to_none=not capturable)
        terms["loss"].backward()
        optimizer.step()
        tally.add(terms)

    return step, model


def op_profile(cfg: Any, stage: int, sizes: Any, device: torch.device, steps: int = 3) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    step, _ = make_step(cfg, stage, sizes, device)
    for i in range(3):
        step(i)
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])], record_shapes=True) as prof:
        for i in range(steps):
            step(i)
        if gpu:
            torch.cuda.synchronize()

    def dev_us(e: Any) -> float:
        return e.self_device_time_total if gpu else e.self_cpu_time_total

    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if e.device_type == torch.autograd.DeviceType.CPU and dev_us(e) > 0]
    rows.sort(key=dev_us, reverse=True)
    total = sum(dev_us(e) for e in rows)
    return {
        "device_ms_per_step": total / 1e3 / steps,
        "top": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / steps,
                 "ms_per_step": dev_us(e) / 1e3 / steps, "share": dev_us(e) / total} for e in rows[:30]],
    }


def timed(step: Callable[[int], None], sizes: Any, device: torch.device) -> dict[str, Any]:
    first, runs = _timed_runs(step, sizes, device)
    ms = 1000 * sorted(runs)[len(runs) // 2] / sizes.steps
    return {"step_ms": ms, "img_s": sizes.batch * 1000 / ms, "first_step_s": round(first, 2),
            "runs_s": [round(r, 4) for r in runs]}


def graphed(cfg: Any, stage: int, sizes: Any, device: torch.device,
            tweak: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """The whole step in one CUDA graph (the PyTorch docs' whole-network capture), replayed."""
    step, _ = make_step(cfg, stage, sizes, device, capturable=True, tweak=tweak)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(sizes.warmup):
            step(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(0)
    result = timed(lambda i: graph.replay(), sizes, device)
    result["eager_same_step_ms"] = timed(step, sizes, device)["step_ms"]  # capturable Adam, no cast cache
    return result


def compile_attention(model: Any) -> None:
    """torch.compile each attention block (TSAM's gates fused by Inductor); the backbone stays eager."""
    torch._dynamo.config.cache_size_limit = max(16, torch._dynamo.config.cache_size_limit)
    for i, block in enumerate(model.attention):
        model.attention[i] = torch.compile(block)


def compile_all(model: Any) -> None:
    """What runtime.compile does: the main branch, the side branches and the folded copy."""
    model.compile_blocks()


def tsam_compiled(cfg: Any, sizes: Any, device: torch.device) -> dict[str, Any]:
    step, _ = make_step(cfg, 1, sizes, device, tweak=compile_attention)
    return timed(step, sizes, device)


def _conv_against_gemm(device: torch.device, batch: int, cin: int, cout: int, h: int, w: int) -> dict[str, float]:
    x = torch.randn(batch, cin, h, w, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, 1, 1, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, device=device, dtype=torch.bfloat16)

    def conv() -> torch.Tensor:
        return F.relu_(F.conv2d(x, weight, bias))

    def gemm() -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1).reshape(-1, cin)  # NHWC: a view
        y = torch._addmm_activation(bias, rows, weight.view(cout, cin).t(), use_gelu=False)
        return y.view(batch, h, w, cout).permute(0, 3, 1, 2)

    with torch.no_grad():
        out: dict[str, float] = {"rel_diff": ((conv().float() - gemm().float()).norm() / conv().float().norm()).item()}
        for label, fn in (("conv_bias_relu_ms", conv), ("gemm_epilogue_ms", gemm)):
            for _ in range(5):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[label] = 1000 * (time.perf_counter() - start) / 50
    return out


def conv1x1(device: torch.device, batch: int) -> dict[str, Any]:
    """Forward, no grad, bf16 NHWC: cuDNN conv (bias) + relu_ against _addmm_activation (bias+ReLU epilogue)."""
    shapes = {  # (in, out, H, W) of ResNet50's 1x1 convs at 384x192, last stride 1
        "l1_conv1": (256, 64, 96, 48), "l1_conv3": (64, 256, 96, 48),
        "l2_conv1": (512, 128, 48, 24), "l2_conv3": (128, 512, 48, 24),
        "l3_conv1": (1024, 256, 24, 12), "l3_conv3": (256, 1024, 24, 12),
        "l4_conv1": (2048, 512, 24, 12), "l4_conv3": (512, 2048, 24, 12),
    }
    return {name: _conv_against_gemm(device, batch, *shape) for name, shape in shapes.items()}


def main() -> int:
    out_dir = Path(sys.argv[1])
    quick = "--quick" in sys.argv
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    sizes = QUICK if quick else FULL
    configs = bench_configs(sizes, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "measurements": {}, "errors": {}}
    path = out_dir / f"probe_{device.type}.json"

    def measure(name: str, fn: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            results["measurements"][name] = fn()
        except Exception as err:
            results["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        print(f"probe: {name} done in {time.perf_counter() - started:.1f}s", flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")

    measure("ops_stage1", lambda: op_profile(configs["stage1"], 1, sizes, device))
    measure("ops_stage2", lambda: op_profile(configs["stage2"], 2, sizes, device))
    measure("conv1x1", lambda: conv1x1(device, sizes.batch))
    if device.type == "cuda":
        for name, stage in (("baseline", 1), ("stage1", 1), ("stage2", 2)):
            measure(f"graph_{name}", lambda name=name, stage=stage: graphed(configs[name], stage, sizes, device))
    if "--session5" in sys.argv and device.type == "cuda":  # compiled code inside the CUDA graph: fusion without its host cost
        for name, tweak, stage in (("graph_stage1_tsam_compiled", compile_attention, 1),
                                   ("graph_stage1_compiled", compile_all, 1),
                                   ("graph_stage2_compiled", compile_all, 2)):
            measure(name, lambda tweak=tweak, stage=stage: graphed(configs[f"stage{stage}"], stage, sizes, device, tweak))
        return 0
    measure("tsam_compiled", lambda: tsam_compiled(configs["stage1"], sizes, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
