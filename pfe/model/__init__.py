"""pfe.model: backbones, attention, side branches, PFENet, profiling.

``build_model`` is the one place that maps an ExperimentConfig to the model's constructor.
"""

from __future__ import annotations

from pfe.config import ExperimentConfig
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
        frozen_main=cfg.runtime.frozen_main,
    )


__all__ = ["PFENet", "PFEOutput", "build_model"]
