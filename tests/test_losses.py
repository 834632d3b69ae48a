"""Losses: CE, batch-hard triplet, region overlap (Eq. 8), stage I and stage II totals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pfe.losses import (
    batch_hard_triplet,
    cross_entropy,
    region_overlap,
    stage1_losses,
    stage2_losses,
)
from pfe.model import PFENet


def make(side_loss: str = "cascade", side: str = "mfa") -> PFENet:
    return PFENet(
        backbone="resnet18",
        last_stride=1,
        pretrained="none",
        attention="none",
        reduction=16,
        side=side,
        channels=16,
        side_dim=32,
        separable=True,
        alpha=0.05,
        side_loss=side_loss,
        num_classes=3,
    )


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 64, 32, generator=g), torch.tensor([0, 0, 1, 2])


def test_cross_entropy_and_label_smoothing() -> None:
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    assert torch.allclose(cross_entropy(logits, y), F.cross_entropy(logits, y))
    assert not torch.allclose(cross_entropy(logits, y, 0.1), cross_entropy(logits, y))


def test_batch_hard_triplet_by_hand() -> None:
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    y = torch.tensor([0, 0, 1, 1])
    # anchors: 0: pos 1, neg 3 -> 1-3+m; 1: pos 1, neg 2 -> 1-2+m; 2: pos 4, neg 2 -> 4-2+m; 3: pos 4, neg 6 -> 4-6+m
    m = 0.3
    expected = (max(0, 1 - 3 + m) + max(0, 1 - 2 + m) + max(0, 4 - 2 + m) + max(0, 4 - 6 + m)) / 4
    assert math.isclose(float(batch_hard_triplet(f, y, m)), expected, rel_tol=1e-5)
    far = torch.tensor([[0.0], [0.1], [10.0], [10.1]], requires_grad=True)
    loss = batch_hard_triplet(far, y)
    assert float(loss.detach()) == 0.0
    loss.backward()  # zero but differentiable
    same = batch_hard_triplet(torch.randn(3, 4, requires_grad=True), torch.tensor([1, 1, 1]))
    assert float(same.detach()) == 0.0 and same.requires_grad  # no negatives anywhere


def test_region_overlap_disjoint_is_zero_overlapping_is_positive() -> None:
    a2 = torch.zeros(2, 4, 4)
    a2[:, :2] = 1.0  # top half
    a3 = torch.zeros(2, 2, 2)
    a3[:, 1] = 1.0  # bottom half at half the resolution
    a4 = torch.ones(2, 1, 1)
    assert float(region_overlap([a2, a3, a4, a4])) == 0.0
    a3b = torch.zeros(2, 2, 2)
    a3b[:, 0, 0] = 0.5  # upsampled: the top-left 2x2 block of A_2's grid
    assert math.isclose(float(region_overlap([a2, a3b, a4, a4])), 4 * 0.5, rel_tol=1e-6)
    one = torch.rand(3, 5, 4)
    assert torch.allclose(region_overlap([one]), one.sum(dim=(1, 2)).mean())


def test_region_overlap_gradient_reaches_the_t_convs(images) -> None:
    x, _ = images
    model = make().set_stage(2)
    model.train()
    out = model(x, stage=2)
    ro = region_overlap([out.activation_maps[k] for k in ("A2", "A3", "A4", "A5")])
    assert float(ro.detach()) > 0
    ro.backward()
    for s in (2, 3, 4, 5):
        grad = model.side.t[f"T{s}"].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0
    for s in (2, 3, 4):  # only the T convs make the activation maps
        assert all(p.grad is None for p in model.side.conv[f"F{s}"].parameters())


def test_stage1_losses(images) -> None:
    x, y = images
    model = make()
    model.train()
    out = model(x)
    terms = stage1_losses(out, y, margin=0.3, label_smoothing=0.0)
    assert set(terms) == {"ce", "triplet", "loss"}
    assert torch.allclose(terms["loss"], terms["ce"] + terms["triplet"])
    assert torch.allclose(terms["ce"], F.cross_entropy(out.logits["F5"], y))
    assert torch.allclose(terms["triplet"], batch_hard_triplet(out.features["F5"], y, 0.3))


@pytest.mark.parametrize("mode", ["independent", "cascade", "uniform"])
def test_stage2_losses(images, mode: str) -> None:
    x, y = images
    model = make(side_loss=mode).set_stage(2)
    model.train()
    out = model(x, stage=2)
    t = (10.0, 8.0, 6.0)
    terms = stage2_losses(out, y, mode=mode, temperatures=t, w_ro=0.01, label_smoothing=0.0)
    side_keys = ["ce_uniform"] if mode == "uniform" else ["ce_F2", "ce_F3", "ce_F4"]
    assert sorted(terms) == sorted([*side_keys, "ro", "loss"])
    ro = region_overlap([out.activation_maps[k] for k in ("A2", "A3", "A4", "A5")])
    assert torch.allclose(terms["ro"], ro)
    assert torch.allclose(terms["loss"], sum(terms[k] for k in side_keys) + 0.01 * ro)
    if mode == "cascade":  # logits / t_s
        for name, temp in zip(("F2", "F3", "F4"), t):
            assert torch.allclose(terms[f"ce_{name}"], F.cross_entropy(out.logits[name] / temp, y))
    elif mode == "independent":  # no temperature
        assert torch.allclose(terms["ce_F2"], F.cross_entropy(out.logits["F2"], y))
    no_ro = stage2_losses(out, y, mode=mode, temperatures=t, w_ro=0.0)
    assert torch.allclose(no_ro["loss"], sum(no_ro[k] for k in side_keys))


def test_stage2_losses_refuse_a_mode_the_model_was_not_built_for(images) -> None:
    x, y = images
    model = make(side_loss="cascade").set_stage(2)
    out = model(x, stage=2)
    with pytest.raises(ValueError, match="uniform"):
        stage2_losses(out, y, mode="uniform")
    with pytest.raises(ValueError, match="unknown"):
        stage2_losses(out, y, mode="sum")
