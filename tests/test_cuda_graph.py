"""runtime.cuda_graph: the training step replayed from a CUDA graph trains as the eager step does.

The GPU tests run where CUDA is (the device machine: `python3 -m pytest tests/test_cuda_graph.py`);
on a CPU they skip and the rest checks when the graph is used at all."""

from __future__ import annotations

import pytest
import torch

from pfe.config import ExperimentConfig
from pfe.engine.graphed import GraphedTrainStep
from pfe.engine.trainer import (
    LossTally,
    build_optimizer,
    make_train_step,
    place_model,
    resolved_runtime,
    stage_loss_fn,
    uses_cuda_graph,
)
from pfe.model import autotune_mode, build_model, compile_mode
from pfe.model.frozen import compiled, main_branch_maps

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = {
    "data.height": 128,
    "data.width": 64,
    "data.ids_per_batch": 4,
    "data.images_per_id": 4,
    "model.backbone": "resnet18",
    "model.pretrained": "none",
    "model.channels": 32,
    "model.side_dim": 64,
}


def test_the_graph_is_used_on_a_cuda_device_only_and_compiles_there() -> None:
    cfg = ExperimentConfig()
    assert cfg.runtime.cuda_graph is True
    assert uses_cuda_graph(cfg, torch.device("cuda"))
    assert not uses_cuda_graph(cfg, torch.device("cpu"))
    assert uses_cuda_graph(cfg.with_overrides({"runtime.compile": True}), torch.device("cuda"))
    assert not uses_cuda_graph(cfg.with_overrides({"runtime.cuda_graph": False}), torch.device("cuda"))
    # runtime.compile=auto: everything, inside the graph only
    assert compile_mode(cfg.runtime, torch.device("cuda")) == "all"
    assert compile_mode(cfg.runtime, torch.device("cpu")) == "off"
    assert compile_mode(cfg.with_overrides({"runtime.cuda_graph": False}).runtime, torch.device("cuda")) == "off"
    assert compile_mode(cfg.with_overrides({"runtime.compile": True}).runtime, torch.device("cpu")) == "all"
    assert cfg.with_overrides({"runtime.compile": False}).runtime.compile == "off"
    # what a run records of its auto settings (MLflow tags pfe.resolved.*)
    on_gpu, on_cpu = resolved_runtime(cfg, torch.device("cuda")), resolved_runtime(cfg, torch.device("cpu"))
    assert {k: on_gpu[k] for k in ("runtime.precision", "runtime.cuda_graph", "runtime.compile", "runtime.frozen_main")} \
        == {"runtime.precision": "bf16", "runtime.cuda_graph": "true", "runtime.compile": "all", "runtime.frozen_main": "fused"}
    assert {k: on_cpu[k] for k in ("runtime.precision", "runtime.cuda_graph", "runtime.compile", "runtime.frozen_main")} \
        == {"runtime.precision": "fp32", "runtime.cuda_graph": "false", "runtime.compile": "off", "runtime.frozen_main": "folded"}
    assert on_cpu["data.workers"].isdigit()
    # an environment key: it does not change what a run computes, so not its identity
    off = cfg.with_overrides({"runtime.cuda_graph": False})
    assert (off.config_hash(), off.stage1_key()) == (cfg.config_hash(), cfg.stage1_key())


def test_autotuning_applies_where_something_is_compiled_on_a_gpu() -> None:
    cfg = ExperimentConfig().with_overrides({"runtime.autotune": "max_autotune"})
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert ExperimentConfig().runtime.autotune == "off"
    assert autotune_mode(cfg.runtime, gpu) == "max_autotune"
    assert autotune_mode(cfg.runtime, cpu) == "off"  # nothing to tune in Inductor's CPU kernels
    assert autotune_mode(cfg.with_overrides({"runtime.compile": "off"}).runtime, gpu) == "off"  # nothing compiled
    assert autotune_mode(cfg.with_overrides({"runtime.cuda_graph": False}).runtime, gpu) == "off"  # auto = off
    assert resolved_runtime(cfg, gpu)["runtime.autotune"] == "max_autotune"
    assert resolved_runtime(cfg, cpu)["runtime.autotune"] == "off"
    # compile time only: not part of a run's identity
    assert (cfg.config_hash(), cfg.stage1_key()) == (ExperimentConfig().config_hash(), ExperimentConfig().stage1_key())
    with pytest.raises(ValueError, match="runtime.autotune"):
        ExperimentConfig().with_overrides({"runtime.autotune": "fast"})
    with pytest.raises(ValueError, match="runtime.autotune: unknown 'fast'"):
        compiled(torch.nn.Identity(), "fast")


def test_a_graph_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedTrainStep(lambda *a, **k: {}, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                         torch.device("cpu"))


def _two_steps(cfg: ExperimentConfig, stage: int, device: torch.device, compile: str = "off"):
    """An eager and a graphed step on two identical models (both compiled as ``compile`` says)."""
    steps, models, optimizers = [], [], []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = place_model(build_model(cfg, num_classes=8), device, compile)
        if stage == 2:  # a main branch with trained BN statistics, then frozen
            with torch.no_grad():
                for _ in range(2):
                    main_branch_maps(model.backbone, model.attention, torch.randn(8, 3, 128, 64, device=device))
        model.set_stage(stage).train()
        params = list(model.main_branch_parameters() if stage == 1 else model.side_parameters())
        optimizer = build_optimizer(params, cfg.stage1 if stage == 1 else cfg.stage2, device)
        steps.append(make_train_step(model, optimizer, stage=stage, loss_fn=stage_loss_fn(cfg, stage), device=device,
                                     amp_dtype=torch.bfloat16, cuda_graph=graphed))
        models.append(model)
        optimizers.append(optimizer)
    return steps, models, optimizers


@CUDA
@pytest.mark.parametrize("compile", ["off", "all"])  # regions passed too (session 5)
@pytest.mark.parametrize("stage", [1, 2])
def test_the_graphed_step_trains_as_the_eager_step(stage: int, compile: str) -> None:
    """Same losses step by step and same weights after 12 steps, through a learning-rate change (the step
    is captured again) and a one-off smaller batch (a new shape: run eagerly, the graph kept); the host
    never waits for the device in a replay. With compile=all, compiled code runs inside the graph."""
    device = torch.device("cuda")
    cfg = ExperimentConfig().with_overrides({**SMALL, "runtime.device": "cuda"})
    torch.backends.cudnn.benchmark = True
    (eager, graphed), models, optimizers = _two_steps(cfg, stage, device, compile)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 128, 64, generator=generator), torch.arange(4).repeat_interleave(4))
               for _ in range(3)]
    batches.append((batches[0][0][:8], batches[0][1][:8]))  # a smaller batch
    tallies = (LossTally(), LossTally())
    for i in range(12):
        if i == 6:  # as the scheduler does between epochs
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1
        images, pids = batches[3] if i == 10 else batches[i % 3]
        images, pids = images.pin_memory(), pids.pin_memory()  # as the DataLoader gives them
        want = eager(images, pids)
        if i == 8:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # a replay must not wait for the device
        got = graphed(images, pids)
        torch.cuda.set_sync_debug_mode("default")
        tallies[0].add(want)
        tallies[1].add(got)
        for name in want:
            assert torch.allclose(got[name].float(), want[name].float(), rtol=3e-2, atol=3e-3), (i, name)
    assert graphed.captures == 2  # after warm-up; after the lr change (the smaller batch ran eagerly)
    assert tallies[1].non_finite() == []
    for p_e, p_g in zip(optimizers[0].param_groups[0]["params"], optimizers[1].param_groups[0]["params"]):
        assert ((p_g - p_e).norm() / p_e.norm().clamp_min(1e-6)).item() < 3e-2
    if stage == 2:  # the frozen main branch stayed frozen
        for (name, a), b in zip(models[0].backbone.state_dict().items(), models[1].backbone.state_dict().values()):
            assert torch.equal(a, b), name
