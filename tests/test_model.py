"""PFENet: masks, gradient paths of the cascade loss, stage II freezing, every variant, weights."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision import models

from pfe.config import load_config
from pfe.errors import PFEError
from pfe.losses import cross_entropy, stage1_losses, stage2_losses
from pfe.model import PFENet, build_model
from pfe.model.backbones import build_backbone, imagenet_weights_path
from pfe.model.side import activation_map, mask_count, top_mask

ATTENTIONS = ("none", "seb", "fab", "tsam")
SIDES = ("none", "side", "fa", "mfa")
LOSSES = ("independent", "uniform", "cascade")
H, W = 64, 32


def make(**kw) -> PFENet:
    """A small ResNet18 PFENet (C = 16, 32-d side features) for CPU tests."""
    args = dict(
        backbone="resnet18",
        last_stride=1,
        pretrained="none",
        attention="tsam",
        reduction=16,
        side="mfa",
        channels=16,
        side_dim=32,
        separable=False,
        alpha=0.05,
        side_loss="cascade",
        num_classes=3,
    )
    args.update(kw)
    return PFENet(**args)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, H, W, generator=g), torch.tensor([0, 0, 1, 1])


def _grad(module: torch.nn.Module) -> float:
    """Sum of |grad| over a module's parameters (0 when none was reached)."""
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ---- masks (Eq. 12) -----------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,h,w", [(0.05, 16, 8), (0.05, 4, 2), (0.3, 8, 4), (0.5, 3, 3), (1.0, 4, 4)])
def test_mask_zeroes_exactly_k_largest(alpha: float, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, h, w, generator=g).round(decimals=1)  # many ties
    mask = top_mask(a, alpha)
    k = max(1, round(alpha * h * w))
    assert mask_count(alpha, h, w) == k
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for i in range(3):
        flat, m = a[i].flatten(), mask[i].flatten()
        assert int((m == 0).sum()) == k
        if k < h * w:
            assert flat[m == 0].min() >= flat[m == 1].max()
        expected = sorted(range(h * w), key=lambda j: (-float(flat[j]), j))[:k]  # ties by index
        assert sorted((m == 0).nonzero().flatten().tolist()) == sorted(expected)


def test_mask_ties_by_index_and_alpha_zero() -> None:
    a = torch.ones(2, 4, 5)
    mask = top_mask(a, 0.15)  # k = round(3.0) = 3: the first three positions
    assert mask.flatten(1)[:, :3].eq(0).all() and mask.flatten(1)[:, 3:].eq(1).all()
    assert top_mask(a, 0.0).eq(1).all()  # alpha = 0 masks nothing (so mfa == fa)
    assert top_mask(a, 0.001).eq(0).sum(dim=(1, 2)).tolist() == [1, 1]  # at least one position


def test_model_masks_hide_the_top_of_each_activation_map(batch) -> None:
    x, _ = batch
    model = make(alpha=0.1).set_stage(2)
    out = model(x, stage=2)
    assert sorted(out.masks) == ["M2", "M3", "M4", "M5"] and sorted(out.activation_maps) == ["A2", "A3", "A4", "A5"]
    for s in (2, 3, 4, 5):
        a, m = out.activation_maps[f"A{s}"], out.masks[f"M{s}"]
        assert a.shape == m.shape and not m.requires_grad
        assert float(a.detach().min()) >= 0.0 and float(a.detach().max()) <= 1.0
        hw = a.shape[1] * a.shape[2]
        k = max(1, round(0.1 * hw))
        top = a.detach().flatten(1).topk(k, dim=1).indices
        for i in range(a.shape[0]):
            assert set((m[i].flatten() == 0).nonzero().flatten().tolist()) == set(top[i].tolist())


def test_activation_map_normalises_each_channel() -> None:
    t = torch.zeros(1, 2, 2, 2)
    t[0, 0, 0, 0], t[0, 1, 1, 1] = -4.0, 2.0  # |T| / channel max: 1 at (0,0) in ch 0, 1 at (1,1) in ch 1
    a = activation_map(t)
    assert torch.allclose(a, torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]), atol=1e-5)


def test_activation_map_of_bf16_maps_has_one_top_k() -> None:
    """A_s in bf16 left tens of positions on the k-th value of a layer-2 map; fp32 leaves M_s no ties to break."""
    t = torch.randn(2, 128, 96, 48, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # C, 384x192
    a = activation_map(t)
    assert a.dtype == torch.float32
    values = a.flatten(1).sort(dim=1, descending=True).values
    k = mask_count(0.05, 96, 48)
    ties = (values == values[:, k - 1 : k]).sum(dim=1)
    assert ties.max() <= 2, f"{ties.tolist()} positions share the k-th value of A_2"


# ---- cascade gradients (Eq. 7) ----------------------------------------------------------------------
@pytest.mark.parametrize("s", [2, 3, 4])
def test_cascade_loss_gradient_reach(batch, s: int) -> None:
    x, y = batch
    model = make(side_loss="cascade").set_stage(2)
    model.zero_grad(set_to_none=True)
    out = model(x, stage=2)
    cross_entropy(out.logits[f"F{s}"] / 8.0, y).backward()
    side = model.side
    assert _grad(model.side_heads[f"F{s}"]) > 0
    assert model.side_necks[f"F{s}"].weight.grad is not None and float(model.side_necks[f"F{s}"].weight.grad.abs().sum()) > 0
    assert _grad(side.conv[f"F{s}"]) > 0
    for d in range(s, 6):  # T convs of layers s..5: Phi is not detached
        assert _grad(side.t[f"T{d}"]) > 0, f"T{d} got no gradient from L_{s}"
    for d in range(2, s):
        assert _grad(side.t[f"T{d}"]) == 0
    for d in range(s + 1, 5):  # no CONV, BN or classifier of a deeper layer
        assert _grad(side.conv[f"F{d}"]) == 0
        assert _grad(model.side_necks[f"F{d}"]) == 0
        assert _grad(model.side_heads[f"F{d}"]) == 0
    for d in range(2, s):
        assert _grad(side.conv[f"F{d}"]) == 0
    assert all(p.grad is None for p in model.main_branch_parameters())


def test_uniform_loss_reaches_every_side_feature(batch) -> None:
    x, y = batch
    model = make(side_loss="uniform").set_stage(2)
    out = model(x, stage=2)
    cross_entropy(out.logits["uniform"], y).backward()
    for s in (2, 3, 4):
        assert _grad(model.side.conv[f"F{s}"]) > 0
    assert all(p.grad is None for p in model.main_branch_parameters())


# ---- variants ------------------------------------------------------------------------------------
def test_fa_equals_mfa_at_alpha_zero(batch) -> None:
    x, _ = batch
    torch.manual_seed(3)
    mfa = make(side="mfa", alpha=0.0)
    fa = make(side="fa", alpha=0.3)
    fa.load_state_dict(mfa.state_dict())
    mfa.eval(), fa.eval()
    a, b = mfa.extract(x), fa.extract(x)
    assert sorted(a) == ["F2", "F3", "F4", "F5"]
    for key in a:
        assert torch.equal(a[key], b[key])
    # ... and masking changes the shallower features
    mfa.side.alpha = 0.2
    c = mfa.extract(x)
    assert not torch.allclose(c["F2"], a["F2"]) and torch.equal(c["F5"], a["F5"])


def test_side_without_propagation_has_no_t5_and_no_masks(batch) -> None:
    x, _ = batch
    model = make(side="side").set_stage(2)
    out = model(x, stage=2)
    assert "T5" not in model.side.t and out.masks == {}
    assert sorted(out.activation_maps) == ["A2", "A3", "A4"]
    assert sorted(out.features) == ["F2", "F3", "F4", "F5"]


def test_stage2_step_changes_no_main_branch_parameter_or_bn_statistic(batch) -> None:
    x, y = batch
    model = make(attention="tsam", side="mfa")
    model.train()  # run stage I once so that BN statistics are not at their initial values
    stage1_losses(model(x), y)["loss"].backward()
    model.set_stage(2)
    model.train()  # must keep the main branch in eval mode
    main = [model.backbone, model.attention, model.neck, model.head]
    assert all(not m.training for top in main for m in top.modules())
    assert model.side.training
    before = {k: v.clone() for top in ("backbone", "attention", "neck", "head") for k, v in getattr(model, top).state_dict(prefix=top + ".").items()}
    side_before = {k: v.clone() for k, v in model.side.state_dict().items()}
    opt = torch.optim.Adam(list(model.main_branch_parameters()) + list(model.side_parameters()), lr=0.1, weight_decay=5e-4)
    opt.zero_grad(set_to_none=True)
    out = model(x, stage=2)
    assert all(not v.requires_grad for k, v in out.features.items() if k == "F5")
    stage2_losses(out, y, mode="cascade", temperatures=(10.0, 8.0, 6.0), w_ro=0.001)["loss"].backward()
    opt.step()
    after = {k: v for top in ("backbone", "attention", "neck", "head") for k, v in getattr(model, top).state_dict(prefix=top + ".").items()}
    assert any("running_mean" in k for k in before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"stage II changed {k}"
    side_after = model.side.state_dict()
    assert any(not torch.equal(v, side_after[k]) for k, v in side_before.items() if "running" not in k)
    assert any(not torch.equal(v, side_after[k]) for k, v in side_before.items() if "running_mean" in k)


def test_stage_mismatch_in_training_mode_is_refused(batch) -> None:
    x, _ = batch
    model = make()
    model.train()
    with pytest.raises(RuntimeError, match="set_stage"):
        model(x, stage=2)


def test_extract_gives_bn_features_and_restores_mode(batch) -> None:
    x, _ = batch
    model = make(side_dim=24)
    model.train()
    feats = model.extract(x)
    assert model.training
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"F2": (4, 24), "F3": (4, 24), "F4": (4, 24), "F5": (4, 512)}
    assert all(not v.requires_grad for v in feats.values())
    assert model.feature_dims == {"F2": 24, "F3": 24, "F4": 24, "F5": 512}
    assert list(make(side="none").extract(x)) == ["F5"]


def _run_stage1(model: PFENet, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    out = model(x)
    assert sorted(out.features) == ["F5"] and sorted(out.logits) == ["F5"]
    terms = stage1_losses(out, y, margin=0.3)
    assert set(terms) == {"ce", "triplet", "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert _grad(model.backbone) > 0 and _grad(model.head) > 0


def _run_stage2(model: PFENet, x: torch.Tensor, y: torch.Tensor, loss: str) -> None:
    model.set_stage(2)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x, stage=2)
    if model.side is None:
        assert sorted(out.features) == ["F5"] and list(model.side_parameters()) == []
        return
    assert sorted(out.features) == sorted(out.bn_features) == ["F2", "F3", "F4", "F5"]
    assert sorted(out.logits) == (["F2", "F3", "F4", "F5"] if loss != "uniform" else ["F5", "uniform"])
    terms = stage2_losses(out, y, mode=loss, temperatures=(10.0, 8.0, 6.0), w_ro=0.001)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for s in (2, 3, 4):
        assert _grad(model.side.conv[f"F{s}"]) > 0
    assert all(p.grad is None for p in model.main_branch_parameters())


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_trains_in_stage1(batch, attention: str) -> None:
    x, y = batch
    model = make(attention=attention)
    _run_stage1(model, x, y)
    if attention != "none":
        assert _grad(model.attention) > 0


@pytest.mark.parametrize("attention,side", list(itertools.product(ATTENTIONS, SIDES)))
def test_every_variant_runs_stage2_forward_and_backward(batch, attention: str, side: str) -> None:
    """Every attention x side x loss; the side branches and heads are what differ in stage II."""
    x, y = batch[0][:2], batch[1][1:3]  # two images of two identities keep the CPU time small
    for loss in LOSSES:
        torch.manual_seed(0)
        _run_stage2(make(attention=attention, side=side, side_loss=loss, separable=loss == "uniform"), x, y, loss)


def test_bf16_autocast_stage2(batch) -> None:
    """runtime.precision=bf16: masks, maps and losses work on bf16 activations; A_s stays fp32."""
    x, y = batch
    model = make(alpha=0.1).set_stage(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, stage=2)
        terms = stage2_losses(out, y, mode="cascade", temperatures=(10.0, 8.0, 6.0), w_ro=0.001)
    assert out.features["F2"].dtype == torch.bfloat16 and terms["loss"].dtype == torch.float32
    assert {a.dtype for a in out.activation_maps.values()} == {torch.float32}
    hw = out.masks["M2"].shape[1] * out.masks["M2"].shape[2]
    assert (out.masks["M2"] == 0).sum(dim=(1, 2)).tolist() == [max(1, round(0.1 * hw))] * 4
    terms["loss"].backward()
    assert _grad(model.side.t["T5"]) > 0


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "resnext101_32x8d", "densenet169"])
def test_other_backbones_run_once(backbone: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, H, W, generator=g), torch.tensor([0, 1])
    model = make(backbone=backbone, separable=True)
    _run_stage1(model, x, y)
    _run_stage2(model, x, y, "cascade")
    maps = model.main_maps(x)
    assert [m.shape[1] for m in maps] == list(model.backbone.channels)
    assert maps[-1].shape[-2:] == maps[-2].shape[-2:]  # last stride 1


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "densenet169"])
def test_last_stride(backbone: str) -> None:
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        one = build_backbone(backbone, 1).eval()(x)
        two = build_backbone(backbone, 2).eval()(x)
    assert [tuple(t.shape[-2:]) for t in one] == [(16, 16), (8, 8), (4, 4), (4, 4)]
    assert [tuple(t.shape[-2:]) for t in two] == [(16, 16), (8, 8), (4, 4), (2, 2)]


# ---- weights -------------------------------------------------------------------------------------
def test_imagenet_without_cached_weights_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained=imagenet"])
    with pytest.raises(PFEError) as err:
        build_model(cfg, num_classes=3)
    message = str(err.value)
    assert str(expected) in message and "download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not expected.exists()  # nothing was downloaded


def test_imagenet_reads_the_hub_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(5)
    reference = models.resnet18()
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = make(pretrained="imagenet", side="none")
    assert torch.equal(model.backbone.stem[0].weight, reference.conv1.weight)


def test_state_dict_path_loads(tmp_path) -> None:
    torch.manual_seed(7)
    reference = models.resnet18()
    path = tmp_path / "r18.pt"
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, path)  # DataParallel prefix too
    model = make(pretrained=str(path))
    assert torch.equal(model.backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone.stages[3][1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_bad_state_dict_paths_are_clear_errors(tmp_path) -> None:
    with pytest.raises(PFEError, match="does not exist"):
        make(pretrained=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in models.resnet18().state_dict().items() if not k.startswith("layer4")}, wrong)
    with pytest.raises(PFEError, match=r"resnet18 weights .* missing"):
        make(pretrained=str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(PFEError, match="cannot read"):
        make(pretrained=str(junk))
