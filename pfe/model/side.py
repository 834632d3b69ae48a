"""Side branches on layers 2..4 (Sec. IV-B, Fig. 4): none | side | fa | mfa.

Names follow the paper. For layer s: T_s = CONV1x1(layer s map) with C channels; A_s its
activation map (Eq. 12); M_s the binary mask hiding the top alpha share of A_s; Phi_s the
propagated map (Eq. 13); T^_s the augmented map (Eq. 10); F_s = GAP(CONV(T^_s)) (Eq. 11).

- ``mfa``: Masked Feature Augmentation as written. Layer 5 has a T_5 that starts the propagation.
- ``fa``: the same with every M_s = 1 (so ``fa`` equals ``mfa`` at alpha = 0). The paper writes FA's
  propagation as a sum of the deeper augmented maps; Phi_s = T_s + Up(Phi_{s+1}) is that sum.
- ``side``: no propagation, F_s = GAP(CONV(T_s)) ("+side" of Table II); no T_5, no masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pfe.config import Side

SIDES = get_args(Side)  # "none", "side", "fa", "mfa"
SIDE_LAYERS = (2, 3, 4)
EPS = 1e-6


def mask_count(alpha: float, height: int, width: int) -> int:
    """k of Eq. (12): the number of positions masked out; 0 when alpha = 0 (nothing masked)."""
    if alpha <= 0:
        return 0
    return min(height * width, max(1, round(alpha * height * width)))


def activation_map(t: Tensor, eps: float = EPS) -> Tensor:
    """A_s (Eq. 12): |T_s| with each channel divided by its spatial max, averaged over channels; B x H x W in [0, 1].

    Always fp32, also under bf16 autocast: bf16's 8-bit mantissa would put tens of positions on the
    k-th largest value that M_s cuts at, and the tie rule (lower index first) would then pick rows.
    """
    a = t.abs().float()
    a = a / (a.amax(dim=(2, 3), keepdim=True) + eps)
    return a.mean(dim=1)


def top_mask(a: Tensor, alpha: float) -> Tensor:
    """M_s (Eq. 12): 0 at exactly k positions with the largest A_s (ties: lower index first), 1 elsewhere.

    The threshold thsh is the k-th largest value of A_s. The mask is a constant (no gradient).
    """
    b, h, w = a.shape
    k = mask_count(alpha, h, w)
    mask = torch.ones(b, h * w, dtype=a.dtype, device=a.device)
    if k > 0:
        order = torch.sort(a.detach().reshape(b, h * w), dim=1, descending=True, stable=True).indices
        mask.scatter_(1, order[:, :k], 0.0)
    return mask.reshape(b, h, w)


def upsample(x: Tensor, like: Tensor) -> Tensor:
    """Up(.): nearest resize of ``x`` to the spatial size of ``like``."""
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class SideConv(nn.Module):
    """CONV of Eq. (11): conv3x3 (C->C; depthwise-separable when ``separable``) -> BN -> ReLU
    -> conv1x1 (C->side_dim) -> BN -> ReLU."""

    def __init__(self, channels: int, side_dim: int, separable: bool = False) -> None:
        super().__init__()
        if separable:  # MFA-dagger: depthwise 3x3 then pointwise 1x1 [47]
            conv3: nn.Module = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.Conv2d(channels, channels, 1, bias=False),
            )
        else:
            conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            conv3,
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, side_dim, 1, bias=False),
            nn.BatchNorm2d(side_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@dataclass
class SideOutput:
    """Side features F2..F4 (before BN), activation maps A_s and masks M_s (keys "A2", "M2", ...)."""

    features: dict[str, Tensor] = field(default_factory=dict)
    activation_maps: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)


class SideBranches(nn.Module):
    """T convs, CONV blocks and the deep-to-shallow propagation for layers 2..4 (and T_5)."""

    def __init__(
        self,
        in_channels: tuple[int, int, int, int],
        mode: str = "mfa",
        channels: int = 128,
        side_dim: int = 512,
        separable: bool = False,
        alpha: float = 0.05,
    ) -> None:
        super().__init__()
        if mode not in SIDES or mode == "none":
            raise ValueError(f"model.side: side branches need one of side | fa | mfa, got {mode!r}")
        self.mode = mode
        self.alpha = float(alpha)
        layers = (2, 3, 4) if mode == "side" else (2, 3, 4, 5)  # T_5 only starts the propagation
        self.t = nn.ModuleDict({f"T{s}": nn.Conv2d(in_channels[s - 2], channels, 1) for s in layers})
        self.conv = nn.ModuleDict({f"F{s}": SideConv(channels, side_dim, separable) for s in SIDE_LAYERS})
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, maps: list[Tensor]) -> SideOutput:
        """``maps``: the main branch's post-attention outputs of layers 2..5."""
        out = SideOutput()
        t = {s: self.t[f"T{s}"](maps[s - 2]) for s in range(2, 6) if f"T{s}" in self.t}  # T_s = CONV1x1
        for s, t_s in t.items():
            out.activation_maps[f"A{s}"] = activation_map(t_s)  # Eq. (12), A_s
        if self.mode == "side":
            for s in SIDE_LAYERS:
                out.features[f"F{s}"] = self._feature(s, t[s])  # F_s = GAP(CONV(T_s)), no propagation
            return out
        for s in (5, 4, 3, 2):
            a_s = out.activation_maps[f"A{s}"]
            # Eq. (12), M_s; fa masks nothing
            m_s = top_mask(a_s, self.alpha) if self.mode == "mfa" else torch.ones_like(a_s)
            out.masks[f"M{s}"] = m_s
            kept = t[s] * m_s.unsqueeze(1).to(t[s].dtype)  # T_s (x) M_s
            if s == 5:
                phi = kept  # Eq. (13), s = S: Phi_5 = T_5 (x) M_5
                continue
            up = upsample(phi, t[s])  # Upsample(Phi_{s+1})
            t_hat = t[s] + up  # Eq. (10): T^_s = T_s (+) Upsample(Phi_{s+1})
            out.features[f"F{s}"] = self._feature(s, t_hat)  # Eq. (11)
            phi = kept + up  # Eq. (13), s < S: Phi_s = (T_s (x) M_s) (+) Upsample(Phi_{s+1})
        out.features = {k: out.features[k] for k in sorted(out.features)}
        out.masks = {k: out.masks[k] for k in sorted(out.masks)}
        return out

    def _feature(self, s: int, x: Tensor) -> Tensor:
        return self.conv[f"F{s}"](x).mean(dim=(2, 3))  # F_s = GAP(CONV(.)), Eq. (11)
