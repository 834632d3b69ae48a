"""PFENet: the main branch (backbone + inline attention -> F5) and the side branches (F2, F3, F4).

Every feature goes through a BNNeck (BatchNorm1d, bias frozen at 0, the BoT convention) and a
bias-free linear classifier. The side heads depend on the stage-II loss (Sec. IV-A, Fig. 2):

- ``independent``: FC_s(BN(F_s)) for s = 2, 3, 4.
- ``cascade`` (Eq. 7): FC_s([BN(F_s), BN(F_{s+1}).detach(), ..., BN(F5).detach()]): only F_s is
  updated by L_s. The propagated maps Phi are not detached, so the T convs of layers s+1..5 also
  receive gradient from L_s ("each T_s receives different gradients").
- ``uniform``: one FC([BN(F2), BN(F3), BN(F4), BN(F5)]) with gradient into every side feature.

Stage 1 trains the main branch; stage 2 freezes it (requires_grad False, eval mode, run under
torch.no_grad) and trains the side branches. Stage II's training forward runs the frozen main
branch through an inference copy with BatchNorm folded into the convs (pfe.model.frozen) unless
``frozen_main`` is ``modules``; evaluation always runs the modules as checkpointed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

import torch
from torch import Tensor, nn

from pfe.config import SideLoss
from pfe.model.attention import ATTENTIONS, build_attention
from pfe.model.backbones import build_backbone
from pfe.model.frozen import FROZEN_MAIN, FrozenMainBranch, compiled, main_branch_maps
from pfe.model.side import SIDE_LAYERS, SIDES, SideBranches, SideOutput

SIDE_LOSSES = get_args(SideLoss)  # "independent", "uniform", "cascade"
COMPILE = ("off", "regions", "all")


@dataclass
class PFEOutput:
    """What PFENet.forward returns. Keys: "F2".."F5", "A2".."A5", "M2".."M5"; logits also "uniform"."""

    features: dict[str, Tensor] = field(default_factory=dict)  # before BNNeck (F5 feeds the triplet loss)
    bn_features: dict[str, Tensor] = field(default_factory=dict)  # after BNNeck (classifiers, evaluation)
    logits: dict[str, Tensor] = field(default_factory=dict)
    activation_maps: dict[str, Tensor] = field(default_factory=dict)  # A_s, B x H_s x W_s
    masks: dict[str, Tensor] = field(default_factory=dict)  # M_s, B x H_s x W_s (mfa, fa)


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    bn.bias.requires_grad_(False)  # BoT: no shift, so BN(F) stays centred for the bias-free classifier
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return fc


class PFENet(nn.Module):
    """Progressive Feature Enhancement network (Fig. 3). ``build_model`` maps a config to these arguments.

    backbone, last_stride, pretrained: see pfe.model.backbones; attention (none | seb | fab | tsam)
    with reduction r; side (none | side | fa | mfa) with width C = ``channels`` of the T_s maps,
    ``side_dim`` of F2..F4, ``separable`` 3x3 in CONV (MFA-dagger) and mask share ``alpha``;
    side_loss (independent | uniform | cascade) picks the side heads; ``frozen_main`` (modules | folded
    | fused): how stage II runs the frozen main branch in training (pfe.model.frozen; the same function
    up to rounding).
    """

    def __init__(
        self,
        backbone: str,
        last_stride: int,
        pretrained: str,
        attention: str,
        reduction: int,
        side: str,
        channels: int,
        side_dim: int,
        separable: bool,
        alpha: float,
        side_loss: str,
        num_classes: int,
        frozen_main: str = "folded",
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"model.attention: unknown {attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if side not in SIDES:
            raise ValueError(f"model.side: unknown {side!r}; choose one of {', '.join(SIDES)}")
        if side_loss not in SIDE_LOSSES:
            raise ValueError(f"stage2.loss: unknown {side_loss!r}; choose one of {', '.join(SIDE_LOSSES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.side_mode = side
        self.side_loss = side_loss
        self.num_classes = num_classes
        self.stage = 1
        if frozen_main not in FROZEN_MAIN:
            raise ValueError(f"runtime.frozen_main: unknown {frozen_main!r}; choose one of {', '.join(FROZEN_MAIN)}")
        # a plain attribute, not a submodule: never saved, moved or counted
        self._frozen_copy = FrozenMainBranch(frozen_main) if frozen_main != "modules" else None
        # what training calls instead of the modules, set by compile_blocks: "main_maps", "side"
        self._compiled: dict[str, Callable[..., Any]] = {}

        # ---- main branch: backbone with attention after each of layers 2..5, F5 head
        self.backbone = build_backbone(backbone, last_stride, pretrained)
        self.attention = nn.ModuleList(build_attention(attention, c, reduction) for c in self.backbone.channels)
        top = self.backbone.channels[-1]
        self.neck = _bnneck(top)
        self.head = _classifier(top, num_classes)
        self.feature_dims = {"F5": top}

        # ---- side branches: F2, F3, F4 with their BNNecks and heads
        self.side: SideBranches | None = None
        self.side_necks = nn.ModuleDict()
        self.side_heads = nn.ModuleDict()
        if side != "none":
            self.side = SideBranches(self.backbone.channels, side, channels, side_dim, separable, alpha)
            for s in SIDE_LAYERS:
                self.side_necks[f"F{s}"] = _bnneck(side_dim)
                self.feature_dims[f"F{s}"] = side_dim
            if side_loss == "independent":
                for s in SIDE_LAYERS:
                    self.side_heads[f"F{s}"] = _classifier(side_dim, num_classes)
            elif side_loss == "cascade":  # FC_s sees [F_s, ..., F4, F5]
                for s in SIDE_LAYERS:
                    self.side_heads[f"F{s}"] = _classifier(side_dim * (5 - s) + top, num_classes)
            else:
                self.side_heads["uniform"] = _classifier(side_dim * len(SIDE_LAYERS) + top, num_classes)
        self.feature_dims = {k: self.feature_dims[k] for k in sorted(self.feature_dims)}

    # ---- parameter groups and stages ------------------------------------------------------------
    def _main_modules(self) -> list[nn.Module]:
        return [self.backbone, self.attention, self.neck, self.head]

    def _side_modules(self) -> list[nn.Module]:
        return [m for m in (self.side, self.side_necks, self.side_heads) if m is not None]

    def main_branch_parameters(self) -> Iterator[nn.Parameter]:
        """Backbone, attention, F5 BNNeck and classifier (stage I's optimiser)."""
        for m in self._main_modules():
            yield from m.parameters()

    def side_parameters(self) -> Iterator[nn.Parameter]:
        """T convs, CONV blocks, side BNNecks and side classifiers (stage II's optimiser)."""
        for m in self._side_modules():
            yield from m.parameters()

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The classifier heads (not counted in Table V's parameters)."""
        yield from self.head.parameters()
        yield from self.side_heads.parameters()

    def set_stage(self, stage: int) -> PFENet:
        """1: train the main branch. 2: freeze it (no grad, eval mode incl. BN statistics), train the side."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        for m in self._main_modules():
            m.requires_grad_(stage == 1)
        for m in self._side_modules():
            m.requires_grad_(stage == 2)
        for bn in [self.neck, *self.side_necks.values()]:
            bn.bias.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> PFENet:
        """As nn.Module.train, but the frozen main branch stays in eval mode in stage 2."""
        super().train(mode)
        if self.stage == 2:
            for m in self._main_modules():
                m.eval()
        return self

    # ---- forward -------------------------------------------------------------------------------
    def compile_blocks(self, mode: str = "all", autotune: str = "off") -> PFENet:
        """``torch.compile`` what training runs (evaluation keeps the modules); state-dict keys stay as they are.

        ``regions``: each attention block and the side branches, and the attention blocks of stage II's
        frozen copy. Inductor fuses their memory-bound work (TSAM's gates and products, the masks, the
        side branches' BN, ReLU and pooling); the backbone stays as it is (cuDNN, or the folded copy's
        GEMMs and fused kernels). ``all``: also the backbone (one graph for the main branch) and the
        whole frozen copy. ``off``: nothing. Shapes are compiled as static; ``autotune`` (off |
        coordinate_descent | max_autotune_gemm | max_autotune) says how long Inductor searches for faster kernels
        (pfe.model.frozen.compiled)."""
        if mode not in COMPILE:
            raise ValueError(f"runtime.compile: unknown {mode!r}; choose one of {', '.join(COMPILE)}")
        compile_fn = functools.partial(compiled, autotune=autotune)
        self._compiled = {}
        if mode == "regions":
            blocks = [b if isinstance(b, nn.Identity) else compile_fn(b) for b in self.attention]
            self._compiled["main_maps"] = functools.partial(main_branch_maps, self.backbone, blocks)
        elif mode == "all":
            self._compiled["main_maps"] = functools.partial(compile_fn(main_branch_maps), self.backbone, self.attention)
        if mode != "off" and self.side is not None:
            self._compiled["side"] = compile_fn(self.side)
        if self._frozen_copy is not None:
            self._frozen_copy.compile = mode
            self._frozen_copy.autotune = autotune
        return self

    def main_maps(self, images: Tensor) -> list[Tensor]:
        """Post-attention maps of layers 2..5 (the last one gives F5)."""
        if self.training and "main_maps" in self._compiled:
            return self._compiled["main_maps"](images)
        return main_branch_maps(self.backbone, self.attention, images)

    def side_branches(self, maps: list[Tensor]) -> SideOutput:
        """The side branches on the main branch's maps (compiled in training after compile_blocks)."""
        assert self.side is not None
        return self._compiled["side"](maps) if self.training and "side" in self._compiled else self.side(maps)

    def frozen_main_maps(self, images: Tensor) -> list[Tensor]:
        """Stage II's main-branch maps, without gradient; in training, from the inference copy (``frozen_main``)."""
        with torch.no_grad():  # not inference_mode: the side branches backprop from these maps
            if self.training and self._frozen_copy is not None:
                return self._frozen_copy(self.backbone, self.attention, images)
            return self.main_maps(images)

    def features(self, images: Tensor, stage: int = 1) -> PFEOutput:
        """Features, BN features, maps and masks, without the classifier heads."""
        if self.training and stage != self.stage:
            raise RuntimeError(f"forward(stage={stage}) in training mode: call model.set_stage({stage}) first")
        out = PFEOutput()
        if stage == 2:
            maps = self.frozen_main_maps(images)
            with torch.no_grad():
                f5 = maps[-1].mean(dim=(2, 3))
                bn5 = self.neck(f5)
        else:
            maps = self.main_maps(images)
            f5 = maps[-1].mean(dim=(2, 3))  # GAP
            bn5 = self.neck(f5)
        if stage == 2 and self.side is not None:
            side = self.side_branches(maps)
            out.features.update(side.features)
            out.activation_maps, out.masks = side.activation_maps, side.masks
            for name, f in side.features.items():
                out.bn_features[name] = self.side_necks[name](f)
        out.features["F5"] = f5
        out.bn_features["F5"] = bn5
        return out

    def forward(self, images: Tensor, stage: int = 1) -> PFEOutput:
        out = self.features(images, stage)
        bn = out.bn_features
        if stage == 2:
            with torch.no_grad():
                out.logits["F5"] = self.head(bn["F5"])
        else:
            out.logits["F5"] = self.head(bn["F5"])
        if stage == 2 and self.side is not None:
            if self.side_loss == "independent":
                for s in SIDE_LAYERS:
                    out.logits[f"F{s}"] = self.side_heads[f"F{s}"](bn[f"F{s}"])
            elif self.side_loss == "cascade":
                for s in SIDE_LAYERS:
                    deeper = [bn[f"F{d}"].detach() for d in range(s + 1, 6)]  # Eq. (7): F_{s+1..5} fixed
                    out.logits[f"F{s}"] = self.side_heads[f"F{s}"](torch.cat([bn[f"F{s}"], *deeper], dim=1))
            else:
                fused = torch.cat([bn[f"F{s}"] for s in (*SIDE_LAYERS, 5)], dim=1)
                out.logits["uniform"] = self.side_heads["uniform"](fused)
        return out

    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """BN features per layer for evaluation (eval mode, no grad); F2..F4 only with side branches."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self.features(images, stage=2 if self.side is not None else 1)
        finally:
            self.train(was_training)
        return out.bn_features
