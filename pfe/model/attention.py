"""Inline attention of the main branch (Sec. IV-C, Fig. 6): SEB, FAB and TSAM (Eq. 14).

Each block is applied to the output of layers 2..5 and the next layer consumes its output.
"""

from __future__ import annotations

from typing import get_args

from torch import Tensor, nn

from pfe.config import Attention

ATTENTIONS = get_args(Attention)  # "none", "seb", "fab", "tsam"


def _hidden(channels: int, reduction: int) -> int:
    return max(1, channels // reduction)


class SEB(nn.Module):
    """Squeeze-and-excitation: GAP -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid, a B x C x 1 x 1 mask."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def mask(self, x: Tensor) -> Tensor:
        """M_SEB(x), B x C x 1 x 1 (broadcast over H, W)."""
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask(x) * x


class FAB(nn.Module):
    """Fully attentional block: 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid, a B x C x H x W mask."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _hidden(channels, reduction)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def mask(self, x: Tensor) -> Tensor:
        """M_FAB(x), B x C x H x W."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask(x) * x


class TSAM(nn.Module):
    """Two-stage attention: FAB then SEB, purely multiplicative (Eq. 14)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fab = FAB(channels, reduction)
        self.seb = SEB(channels, reduction)

    def forward(self, f: Tensor) -> Tensor:
        f1 = self.fab.mask(f) * f  # Eq. (14): F' = M_FAB(F) (x) F
        return self.seb.mask(f1) * f1  # Eq. (14): F'' = M_SEB(F') (x) F'


ATTENTION_BLOCKS = (SEB, FAB, TSAM)  # the module types build_attention makes (besides nn.Identity)


def build_attention(name: str, channels: int, reduction: int = 16) -> nn.Module:
    """The attention block ``name`` (none | seb | fab | tsam) for a C-channel map."""
    if name == "none":
        return nn.Identity()
    if name == "seb":
        return SEB(channels, reduction)
    if name == "fab":
        return FAB(channels, reduction)
    if name == "tsam":
        return TSAM(channels, reduction)
    raise ValueError(f"model.attention: unknown attention {name!r}; choose one of {', '.join(ATTENTIONS)}")
