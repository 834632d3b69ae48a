"""The main branch as stage II runs it: frozen, so an inference copy can stand in for it.

In stage II the main branch is a fixed function (eval-mode BatchNorm, no gradient). Its training
forward (the floor of a stage-II step) can then skip two kinds of work that the checkpointed modules
would do on every step:

- every BatchNorm that follows a convolution is folded into it (``torch.fx.experimental.optimization.fuse``:
  w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta), one pass
  over each activation fewer;
- the weights are stored in the autocast dtype, so autocast does not cast them again on every step.

:class:`FrozenMainBranch` keeps that copy and rebuilds it whenever what it was made from changes:
the device, the dtype, the autocast dtype, or any weight or BN statistic (through the tensors'
in-place version counters, which ``load_state_dict`` and every in-place update bump).
The copy lives outside the module tree: it is never saved, moved or counted with the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse


def main_branch_maps(backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> list[Tensor]:
    """Post-attention maps of layers 2..5: stem, then each stage followed by its attention block."""
    x = backbone.stem(images)
    maps = []
    for stage, block in zip(backbone.stages, attention):
        x = block(stage(x))
        maps.append(x)
    return maps


class _MainBranch(nn.Module):
    def __init__(self, backbone: nn.Module, attention: nn.ModuleList) -> None:
        super().__init__()
        self.backbone, self.attention = backbone, attention

    def forward(self, images: Tensor) -> list[Tensor]:
        return main_branch_maps(self.backbone, self.attention, images)


def fold_main_branch(backbone: nn.Module, attention: nn.ModuleList, dtype: torch.dtype | None = None) -> nn.Module:
    """An inference copy of the main branch with each conv's BatchNorm folded in, in ``dtype``
    (default: the weights' own). The originals must be in eval mode; they are not changed."""
    if backbone.training or attention.training:
        raise RuntimeError("fold_main_branch: the main branch must be in eval mode (its BN statistics frozen)")
    folded = fuse(_MainBranch(backbone, attention))  # a deep copy: the model's own modules stay as they are
    folded.requires_grad_(False).eval()
    return folded.to(dtype=dtype) if dtype is not None else folded


class FrozenMainBranch:
    """The folded copy of a model's main branch, rebuilt when its weights, device or dtypes change."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._folded: nn.Module | None = None
        self.compile_options: dict | None = None  # set by PFENet.compile_blocks: torch.compile the copy

    @staticmethod
    def _key_of(backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> tuple:
        device = images.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        tensors = [*backbone.parameters(), *backbone.buffers(), *attention.parameters(), *attention.buffers()]
        first = tensors[0]
        return (first.device, first.dtype, autocast, tuple(t._version for t in tensors))

    def __call__(self, backbone: nn.Module, attention: nn.ModuleList, images: Tensor) -> list[Tensor]:
        key = self._key_of(backbone, attention, images)
        if key != self._key:
            self._folded = None  # free the old copy before making the new one
            self._folded = fold_main_branch(backbone, attention, dtype=key[2])
            if images.device.type == "cuda":
                self._folded = self._folded.to(memory_format=torch.channels_last)
            if self.compile_options is not None:
                self._folded = torch.compile(self._folded, **self.compile_options)
            self._key = key
        assert self._folded is not None
        with torch.no_grad():
            return self._folded(images)
