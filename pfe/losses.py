"""Losses of PFE as pure functions (Eqs. 6-9).

Stage I (Eq. 6): CE on the BNNeck'ed F5 + batch-hard triplet on F5 before BN (the BoT convention).
Stage II (Eq. 9 without L_ID, the main branch being frozen): the side losses (independent, uniform
or cascade, Eq. 7) plus w_ro times the region overlap (Eq. 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from pfe.model.pfenet import PFEOutput

SIDE_LAYERS = ("F2", "F3", "F4")


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross entropy, optionally label-smoothed (off by default: the paper does not smooth)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``x`` (clamped before the sqrt for a finite gradient)."""
    x = x.float()
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = sq + sq.t() - 2.0 * x @ x.t()
    return d2.clamp_min(1e-12).sqrt()


def batch_hard_triplet(features: Tensor, targets: Tensor, margin: float = 0.3) -> Tensor:
    """Batch-hard triplet loss [3]: per anchor, the farthest positive and the closest negative.

    Anchors without a negative in the batch are skipped; with none left the loss is 0. No host
    sync (no data-dependent branch or shape): the mean over all anchors is rescaled by
    anchors / valid anchors, a factor of exactly 1 when every anchor has a negative (a PK batch).
    """
    dist = pairwise_distances(features)
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    hardest_pos = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(dim=1)
    valid = torch.isfinite(hardest_neg)
    per_anchor = torch.where(valid, F.relu(hardest_pos - hardest_neg + margin), torch.zeros_like(hardest_pos))
    return per_anchor.mean() * (valid.numel() / valid.sum().clamp_min(1))


def region_overlap(maps: Sequence[Tensor]) -> Tensor:
    """L_ro (Eq. 8): batch mean of the L1 norm of A_2 (x) Up(A_3) (x) ... on A_2's grid (maps are B x H x W)."""
    if not maps:
        raise ValueError("region_overlap needs at least one activation map")
    first = maps[0]
    product = first.float()
    for a in maps[1:]:
        if a.shape[-2:] != first.shape[-2:]:
            a = F.interpolate(a.unsqueeze(1), size=first.shape[-2:], mode="nearest").squeeze(1)
        product = product * a.float()
    return product.abs().sum(dim=(1, 2)).mean()


def stage1_losses(out: PFEOutput, targets: Tensor, *, margin: float = 0.3, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Eq. (6): CE(FC(BN(F5)), y) + Tri(F5). Keys "ce", "triplet", "loss"."""
    ce = cross_entropy(out.logits["F5"], targets, label_smoothing)
    triplet = batch_hard_triplet(out.features["F5"], targets, margin)
    return {"ce": ce, "triplet": triplet, "loss": ce + triplet}


def stage2_losses(
    out: PFEOutput,
    targets: Tensor,
    *,
    mode: str,
    temperatures: Sequence[float] = (10.0, 8.0, 6.0),
    w_ro: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Stage-II loss: sum_s L_s + w_ro * L_ro (Eq. 9). Keys "ce_F2".."ce_F4" or "ce_uniform", "ro", "loss".

    ``mode`` must match the heads the model was built with (PFENet's ``side_loss``):
    independent: CE(FC_s(BN(F_s)), y); cascade: CE(FC_s([BN(F_s), ..., BN(F5)]) / t_s, y) (Eq. 7)
    with temperatures (t2, t3, t4); uniform: one CE(FC([BN(F2), ..., BN(F5)]), y).
    """
    terms: dict[str, Tensor] = {}
    if mode in ("independent", "cascade"):
        if len(temperatures) != len(SIDE_LAYERS):
            raise ValueError(f"stage2.temperatures: need t2, t3, t4, got {list(temperatures)}")
        for name, t in zip(SIDE_LAYERS, temperatures):
            if name not in out.logits:
                raise ValueError(f"stage2.loss={mode}: the model gave no {name} logits (built with side=none?)")
            logits = out.logits[name] / t if mode == "cascade" else out.logits[name]
            terms[f"ce_{name}"] = cross_entropy(logits, targets, label_smoothing)
    elif mode == "uniform":
        if "uniform" not in out.logits:
            raise ValueError("stage2.loss=uniform: the model gave no 'uniform' logits (built with another side_loss?)")
        terms["ce_uniform"] = cross_entropy(out.logits["uniform"], targets, label_smoothing)
    else:
        raise ValueError(f"stage2.loss: unknown {mode!r}; choose independent, uniform or cascade")
    maps = [out.activation_maps[k] for k in sorted(out.activation_maps)]
    ro = region_overlap(maps) if maps else targets.new_zeros((), dtype=torch.float32)
    total = sum(terms.values(), start=targets.new_zeros((), dtype=torch.float32))
    if w_ro:
        total = total + w_ro * ro
    return {**terms, "ro": ro, "loss": total}
