"""Stage II's folded copy of the frozen main branch: same maps, rebuilt when the weights change, never saved."""

from __future__ import annotations

import pytest
import torch
from test_model import H, W, make

from pfe.model import PFENet
from pfe.model.frozen import fold_main_branch


def _stage2_model(backbone: str = "resnet18", **kw) -> PFENet:
    """A model whose BN statistics are not the init values (so folding has something to fold)."""
    torch.manual_seed(0)
    model = make(backbone=backbone, **kw)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.main_maps(torch.randn(4, 3, H, W) * 2 + 0.5)
    return model.set_stage(2).train()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "densenet169"])  # DenseNet: BN before conv, partly folded
def test_folded_maps_equal_the_modules_maps_in_fp32(backbone: str) -> None:
    model = _stage2_model(backbone)
    images = torch.randn(2, 3, H, W)
    folded = model.frozen_main_maps(images)
    reference = model.main_maps(images)
    assert [m.shape for m in folded] == [m.shape for m in reference]
    for got, want in zip(folded, reference):
        assert _rel(got, want) < 1e-5
        assert not got.requires_grad


def test_folding_removes_every_batchnorm_of_a_resnet() -> None:
    model = _stage2_model()
    folded = fold_main_branch(model.backbone, model.attention)
    kinds = {type(m).__name__ for m in folded.modules()}
    assert "BatchNorm2d" not in kinds
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0  # the model keeps its own


def test_the_copy_is_not_part_of_the_model() -> None:
    model = _stage2_model()
    keys, params = set(model.state_dict()), sum(p.numel() for p in model.parameters())
    model(torch.randn(4, 3, H, W), stage=2)
    assert model._frozen_copy._folded is not None
    assert set(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == params


def test_the_copy_follows_new_weights() -> None:
    """load_state_dict or any in-place change of a weight or BN statistic rebuilds the copy."""
    model = _stage2_model()
    images = torch.randn(2, 3, H, W)
    before = model.frozen_main_maps(images)[-1]
    other = _stage2_model()
    with torch.no_grad():
        for p in other.backbone.stages[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.load_state_dict(other.state_dict())
    after = model.frozen_main_maps(images)[-1]
    assert _rel(after, before) > 1e-2
    assert _rel(after, model.main_maps(images)[-1]) < 1e-5
    with torch.no_grad():
        model.backbone.stages[-1][-1].bn2.running_var.mul_(4)  # a buffer, changed in place
    assert _rel(model.frozen_main_maps(images)[-1], model.main_maps(images)[-1]) < 1e-5


def test_evaluation_and_the_switch_use_the_modules_themselves() -> None:
    images = torch.randn(2, 3, H, W)
    model = _stage2_model()
    model.eval()
    assert torch.equal(model.frozen_main_maps(images)[-1], model.main_maps(images)[-1])
    assert model._frozen_copy._folded is None
    off = _stage2_model(frozen_main="modules")
    assert torch.equal(off.frozen_main_maps(images)[-1], off.main_maps(images)[-1])
    assert off._frozen_copy is None


def test_under_bf16_autocast_the_copy_holds_bf16_weights() -> None:
    model = _stage2_model()
    images = torch.randn(2, 3, H, W)
    with torch.autocast("cpu", torch.bfloat16):
        folded = model.frozen_main_maps(images)
        reference = model.main_maps(images)
    assert {p.dtype for p in model._frozen_copy._folded.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.backbone.parameters()} == {torch.float32}
    assert _rel(folded[-1], reference[-1]) < 3e-2
    model.frozen_main_maps(images)  # autocast off again: an fp32 copy
    assert {p.dtype for p in model._frozen_copy._folded.parameters()} == {torch.float32}


def test_every_autotune_option_is_one_this_torch_knows_and_compiles_with() -> None:
    """runtime.autotune's Inductor options: names this release has (a misspelt one would be dropped
    silently, as the options of newer releases are on older ones), and torch.compile accepts each set."""
    from torch._inductor import config as inductor_config

    from pfe.model.frozen import AUTOTUNE_OPTIONS, compiled

    assert set(AUTOTUNE_OPTIONS) == {"off", "coordinate_descent", "max_autotune_gemm", "max_autotune"}
    for mode, options in AUTOTUNE_OPTIONS.items():
        assert all(hasattr(inductor_config, key) for key in options), mode
    assert AUTOTUNE_OPTIONS["max_autotune_gemm"]["max_autotune_conv_backends"] == "ATEN"  # cuDNN keeps the convs
    x = torch.randn(8, 4)
    for mode in AUTOTUNE_OPTIONS:
        torch._dynamo.reset()
        assert torch.allclose(compiled(lambda t: torch.sigmoid(t) * t, autotune=mode)(x), torch.sigmoid(x) * x)
    with pytest.raises(ValueError, match="runtime.autotune: unknown 'fast'"):
        compiled(torch.sigmoid, autotune="fast")


@pytest.mark.parametrize("mode", ["regions", "all"])
def test_compiled_blocks_give_the_eager_step(mode: str) -> None:
    """runtime.compile: same loss and gradients as eager in both stages, same state-dict keys; the folded
    copy compiled whole (all) or its attention blocks alone (regions)."""
    from pfe.losses import stage1_losses, stage2_losses

    # fixed inputs: with others, a near-tie in the top-k masks or the hardest triplet can flip between
    # the two implementations' roundings, and a flipped choice changes the gradients for real
    images, pids = torch.randn(4, 3, H, W, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 0, 1, 1])

    def grads(model: PFENet, stage: int) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(images, stage=stage)
        terms = stage1_losses(out, pids) if stage == 1 else stage2_losses(out, pids, mode="cascade", w_ro=0.1)
        terms["loss"].backward()
        params = model.main_branch_parameters() if stage == 1 else model.side_parameters()
        return terms["loss"].item(), [p.grad.clone() for p in params if p.grad is not None]

    for stage in (1, 2):
        eager = _stage2_model().set_stage(stage).train()
        compiled = _stage2_model().set_stage(stage).train()
        keys = list(compiled.state_dict())
        compiled.compile_blocks(mode)
        assert list(compiled.state_dict()) == keys
        loss_e, grads_e = grads(eager, stage)
        loss_c, grads_c = grads(compiled, stage)
        assert loss_c == pytest.approx(loss_e, rel=1e-4)
        assert len(grads_c) == len(grads_e) > 0
        # all gradients as one vector: a tensor whose gradient is nearly 0 has no meaningful relative error
        assert _rel(torch.cat([g.flatten() for g in grads_c]), torch.cat([g.flatten() for g in grads_e])) < 1e-3
    copy = compiled._frozen_copy._folded
    compiled_parts = [m for m in copy.modules() if isinstance(m, torch._dynamo.eval_frame.OptimizedModule)]
    if mode == "all":
        assert compiled_parts == [copy]
    else:  # the four TSAM blocks, called as modules by the copy; its convs stay as they are
        assert [type(m._orig_mod).__name__ for m in compiled_parts] == ["TSAM"] * 4
        assert {type(m).__name__ for m in copy.modules()} >= {"PointwiseConv", "Conv2d"}
    got = compiled.extract(images)  # evaluation runs the modules themselves: bit-equal without compile
    compiled._compiled = {}
    assert all(torch.equal(got[k], v) for k, v in compiled.extract(images).items())


@pytest.mark.parametrize("backbone, blocks", [("resnet18", 8), ("resnet50", 16)])
def test_fused_copy_merges_conv_relu_and_residual_ends(backbone: str, blocks: int) -> None:
    """frozen_main=fused: every residual block ends in one conv+add+ReLU module; the maps stay the same."""
    from pfe.model.frozen import ConvAddReLU, ConvReLU

    model = _stage2_model(backbone)
    fused = fold_main_branch(model.backbone, model.attention, fuse_relu=True)
    folded = fold_main_branch(model.backbone, model.attention)
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(ConvAddReLU) == blocks
    assert kinds.count(ConvReLU) >= blocks  # the stem, each block's inner convs, the attention convs
    relus_left = [n for n in fused.graph.nodes if n.op == "call_module" and isinstance(fused.get_submodule(n.target), torch.nn.ReLU)]
    assert relus_left == []
    images = torch.randn(2, 3, H, W)
    for got, want in zip(fused(images), folded(images)):
        assert _rel(got, want) < 1e-5  # fp32 rounding: the folded copy's SEB convs (1x1 maps) are GEMMs


def test_folded_copy_runs_its_1x1_convs_as_gemms_on_nhwc_maps() -> None:
    """frozen_main=folded: each 1x1 stride-1 conv (and the ReLU that is its only user) is one GEMM with the
    bias (and ReLU) in its epilogue when the maps are channels_last, as on a GPU; the maps stay the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pfe.model.frozen import PointwiseConv

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = _stage2_model("resnet50")
    copy = fold_main_branch(model.backbone, model.attention).to(memory_format=torch.channels_last)
    gemms = [m for m in copy.modules() if isinstance(m, PointwiseConv)]
    originals = [m for m in [*model.backbone.modules(), *model.attention.modules()]
                 if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)]
    assert len(gemms) == len(originals) == 16 * 2 + 2 + 4 * 4  # conv1, conv3; the stride-1 shortcuts (layer1; layer4, last stride 1); FAB, SEB
    assert sum(m.relu for m in gemms) == 16 + 4 * 2  # each block's conv1; the first conv of FAB and SEB
    images = torch.randn(2, 3, H, W).contiguous(memory_format=torch.channels_last)
    with Ops() as ops:
        maps = copy(images)
    assert ops.seen.count("_addmm_activation.default") == 16 + 4 * 2
    assert ops.seen.count("addmm.default") == len(gemms) - (16 + 4 * 2)
    assert ops.seen.count("convolution.default") == 1 + 16 + 2  # the stem, each 3x3, the stride-2 shortcuts
    for got, want in zip(maps, model.main_maps(images)):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert _rel(got, want) < 1e-5


def test_fused_copy_takes_fp32_images_with_bf16_weights() -> None:
    """cuDNN's fused ops have no autocast rule: the bf16 copy must cast the fp32 images itself (as the
    folded copy's convs are cast by autocast), or a GPU run refuses the fused copy at its stem."""
    model = _stage2_model()
    fused = fold_main_branch(model.backbone, model.attention, dtype=torch.bfloat16, fuse_relu=True)
    folded = fold_main_branch(model.backbone, model.attention, dtype=torch.bfloat16)
    images = torch.randn(2, 3, H, W)
    got = fused(images)  # no autocast: the same inputs cudnn_convolution_relu receives under autocast
    with torch.autocast("cpu", torch.bfloat16):
        want = folded(images)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert torch.equal(g, w)  # on a CPU both run the same bf16 convs on the same bf16 inputs


def test_fused_mode_on_a_cpu_runs_the_folded_copy() -> None:
    import warnings

    images = torch.randn(2, 3, H, W)
    fused, folded = _stage2_model(frozen_main="fused"), _stage2_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: on a CPU there is nothing to check
        got = fused.frozen_main_maps(images)
    assert torch.equal(got[-1], folded.frozen_main_maps(images)[-1])
    with pytest.raises(ValueError, match="runtime.frozen_main"):
        _stage2_model(frozen_main="bogus")


@pytest.mark.parametrize(("setting", "cuda_graph", "device", "runs"), [
    ("auto", True, None, "fused"), ("auto", True, "cuda", "fused"), ("auto", True, "cpu", "folded"),
    ("auto", False, "cuda", "folded"), ("fused", True, "cpu", "folded"), ("fused", False, "cuda", "fused"),
    ("modules", True, "cuda", "modules"), ("folded", True, "cuda", "folded"),
])
def test_frozen_main_mode_names_the_copy_that_runs_on_the_device(setting: str, cuda_graph: bool, device: str | None,
                                                                 runs: str) -> None:
    from pfe.config import RuntimeConfig
    from pfe.model import frozen_main_mode

    runtime = RuntimeConfig(frozen_main=setting, cuda_graph=cuda_graph)
    assert frozen_main_mode(runtime, None if device is None else torch.device(device)) == runs


def test_stage2_training_steps_reuse_one_copy() -> None:
    """Training the side branches changes nothing the copy was made from: it is built once, not per step."""
    from pfe.losses import stage2_losses

    model = _stage2_model()
    optimizer = torch.optim.Adam(model.side_parameters(), lr=1e-3)
    pids = torch.tensor([0, 0, 1, 1])
    copies = []
    for _ in range(3):
        out = model(torch.randn(4, 3, H, W), stage=2)
        loss = stage2_losses(out, pids, mode="cascade", w_ro=0.1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        copies.append(model._frozen_copy._folded)
    assert copies[0] is copies[1] is copies[2]


def test_a_fused_copy_that_fails_or_differs_is_refused() -> None:
    """The check a GPU run makes before trusting cuDNN's fused kernels, on CPU copies."""
    from pfe.model.frozen import fused_copy_problem

    model = _stage2_model()
    folded = fold_main_branch(model.backbone, model.attention)
    fused = fold_main_branch(model.backbone, model.attention, fuse_relu=True)
    images = torch.randn(2, 3, H, W)
    assert fused_copy_problem(fused, folded, images) is None

    class Refuses(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            raise NotImplementedError("no engine for this dtype\nmore detail")

    assert fused_copy_problem(Refuses(), folded, images) == "cuDNN refused it (NotImplementedError: no engine for this dtype)"
    with torch.no_grad():
        next(p for n, p in fused.named_parameters() if n.endswith("weight")).mul_(3)
    assert "differ" in fused_copy_problem(fused, folded, images)
