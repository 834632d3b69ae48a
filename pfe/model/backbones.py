"""Backbones from torchvision with four stage taps (the paper's layers 2..5).

Layers 2..5 of the paper are ResNet conv2_x..conv5_x = torchvision ``layer1..layer4``.
For DenseNet169 a stage is one dense block, preceded by the transition that downsamples into it,
so each tap has the same strides as ResNet's (4, 8, 16, 32):

    stem    conv0, norm0, relu0, pool0
    layer 2 denseblock1                          256 channels, stride 4
    layer 3 transition1, denseblock2             512 channels, stride 8
    layer 4 transition2, denseblock3            1280 channels, stride 16
    layer 5 transition3, denseblock4, norm5, ReLU  1664 channels, stride 32 (16 with last stride 1)

Last stride 1 sets the stride of the first block of layer 5 to 1 (ResNet: its 3x3 conv and
downsample; DenseNet: transition3's 2x2 average pooling is dropped).

Weights: ``pretrained="imagenet"`` reads torchvision's ImageNet file from the local torch hub cache
only (never downloads), ``"none"`` keeps the random init, anything else is a path to a state-dict
file with torchvision's key names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models

from pfe.errors import PFEError

# name -> (constructor, torchvision weights enum member used for "imagenet")
_ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V1),
    "resnext101_32x8d": (models.resnext101_32x8d, models.ResNeXt101_32X8D_Weights.IMAGENET1K_V1),
    "densenet169": (models.densenet169, models.DenseNet169_Weights.IMAGENET1K_V1),
}
BACKBONES = tuple(_ARCHS)

# Old DenseNet checkpoints (torchvision's own included) name layers 'norm.1' instead of 'norm1'.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_HEAD_PREFIXES = ("fc.", "classifier.")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone gives the rest of the model."""

    channels: tuple[int, int, int, int]  # output channels of layers 2..5


class Backbone(nn.Module):
    """A stem and four stages; ``forward`` is not used: PFENet interleaves attention."""

    def __init__(self, stem: nn.Module, stages: list[nn.Module], channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.channels = channels

    def forward(self, images: Tensor) -> list[Tensor]:
        """The four stage outputs (without attention)."""
        x = self.stem(images)
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        return taps


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision's ImageNet weights for ``name`` must lie: the torch hub cache."""
    _, weights = _ARCHS[name]
    file_name = weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise PFEError(f"model.pretrained: {what} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        raise PFEError(f"model.pretrained: cannot read {what} {path} as a state dict ({err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PFEError(f"model.pretrained: {path} is not a state dict (a mapping of names to tensors)")
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _load_weights(net: nn.Module, name: str, pretrained: str) -> None:
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        path = imagenet_weights_path(name)
        if not path.is_file():
            _, weights = _ARCHS[name]
            raise PFEError(
                f"model.pretrained=imagenet: torchvision's ImageNet weights for {name} are not in the torch hub "
                f"cache: {path} does not exist. Nothing is downloaded at run time: copy the file from "
                f"{weights.url} to {path} (the folder is $TORCH_HOME/hub/checkpoints, TORCH_HOME defaults to "
                f"~/.cache/torch), or set model.pretrained to the path of a state-dict file, or to none."
            )
        what = "ImageNet weights file"
    else:
        path = Path(pretrained).expanduser()
        what = "state-dict file"
    state = _read_state_dict(path, what)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in expected and not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise PFEError(
            f"model.pretrained: {path} does not hold {name} weights with torchvision's key names "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise PFEError(f"model.pretrained: {path} does not fit {name}: {err}") from None


def build_backbone(name: str, last_stride: int = 1, pretrained: str = "none") -> Backbone:
    """A torchvision backbone cut into a stem and the paper's layers 2..5."""
    if name not in _ARCHS:
        raise PFEError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if last_stride not in (1, 2):
        raise PFEError(f"model.last_stride: must be 1 or 2, got {last_stride!r}")
    constructor, _ = _ARCHS[name]
    net = constructor(weights=None)
    _load_weights(net, name, pretrained)
    if name.startswith("densenet"):
        f = net.features
        if last_stride == 1:
            f.transition3.pool = nn.Identity()
        stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        stages = [
            f.denseblock1,
            nn.Sequential(f.transition1, f.denseblock2),
            nn.Sequential(f.transition2, f.denseblock3),
            nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True)),
        ]
        channels = tuple(
            m.num_features for m in (f.transition1.norm, f.transition2.norm, f.transition3.norm, f.norm5)
        )
    else:
        if last_stride == 1:
            block = net.layer4[0]
            # Bottleneck (torchvision v1.5) strides in its 3x3 conv2, BasicBlock (resnet18) in conv1.
            strided = block.conv2 if isinstance(block, models.resnet.Bottleneck) else block.conv1
            strided.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        channels = tuple(_resnet_out_channels(layer) for layer in stages)
    return Backbone(stem, stages, channels)  # type: ignore[arg-type]


def _resnet_out_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)
