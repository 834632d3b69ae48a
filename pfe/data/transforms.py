"""Train and test transforms: resize, horizontal flip, optional pad + random crop, random erasing,
ImageNet normalisation."""

from __future__ import annotations

import math

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomErasing(torch.nn.Module):
    """Random Erasing (Zhong et al., AAAI 2020, the paper's [43]) with that paper's area and aspect
    parameters: with probability ``p`` erase a rectangle of area ratio in [sl, sh] and aspect ratio in
    [r1, 1/r1] (up to 100 tries). The fill is the mean pixel, as in the ReID bag of tricks (Luo et al.)
    and fast-reid, not [43]'s random values: the PFE paper does not say which. Applied to a [0, 1] CHW
    tensor before normalisation, so the erased region is exactly 0 after normalising with ``mean``."""

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 mean: tuple[float, ...] = IMAGENET_MEAN, attempts: int = 100) -> None:
        super().__init__()
        self.p, self.sl, self.sh, self.r1, self.attempts = p, sl, sh, r1, attempts
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        _, height, width = img.shape
        area = height * width
        for _ in range(self.attempts):
            target = area * (self.sl + (self.sh - self.sl) * float(torch.rand(())))
            aspect = self.r1 + (1 / self.r1 - self.r1) * float(torch.rand(()))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                img = img.clone()
                img[:, top : top + h, left : left + w] = self.mean.to(img.dtype)
                return img
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}, sl={self.sl}, sh={self.sh}, r1={self.r1}"


def build_train_transform(height: int, width: int, flip_prob: float = 0.5, erasing_prob: float = 0.5,
                          pad: int = 0) -> T.Compose:
    """Resize to (height, width), flip, [pad + random crop], to tensor, random erasing, normalise."""
    steps: list[torch.nn.Module] = [T.Resize((height, width))]
    if flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(flip_prob))
    if pad > 0:
        steps += [T.Pad(pad), T.RandomCrop((height, width))]
    steps.append(T.ToTensor())
    if erasing_prob > 0:
        steps.append(RandomErasing(p=erasing_prob))
    steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def build_test_transform(height: int, width: int) -> T.Compose:
    """Resize to (height, width), to tensor, normalise."""
    return T.Compose([T.Resize((height, width)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
