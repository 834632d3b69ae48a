"""ImageDataset: decoded, transformed images with (pid, camid, index)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from pfe.data.datasets import Sample
from pfe.errors import DataError

# data.workers=auto never starts more: past ~8 decoding workers a GPU step is no longer input-bound at
# 384x192 (about 400 images/s per worker on a 2-core CI machine), and each worker holds its prefetched batches.
MAX_AUTO_WORKERS = 8


def resolve_workers(setting: int | str, cpus: float | None = None) -> int:
    """DataLoader workers for ``data.workers``: a number as it is; ``auto``: one less than ``cpus`` (the
    main process needs one; default: the CPUs this process may run on), at most ``MAX_AUTO_WORKERS``."""
    if setting != "auto":
        return int(setting)
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, int(cpus) - 1))


def read_image(path: str) -> Image.Image:
    """Decode an image file as RGB; an unreadable, truncated or corrupt file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{path}: cannot read image ({err}). Replace or delete the file, or set data.skip_corrupt: true to skip it"
        ) from None


class ImageDataset(Dataset):
    """``samples[i]`` -> (image tensor, pid, camid, index).

    With ``skip_corrupt`` an unreadable image is reported once (a warning naming it) and replaced by
    the next readable sample, returned with that sample's own pid, camid and index, so batches keep
    their size and labels stay consistent; without it the DataError stops the run.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any] | None = None,
                 skip_corrupt: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if i in self._bad:
                continue
            sample = self.samples[i]
            try:
                img = read_image(sample.path)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                self._bad.add(i)
                warnings.warn(f"skipped (data.skip_corrupt): {err}", stacklevel=2)
                continue
            image = self.transform(img) if self.transform is not None else to_tensor(img)
            return image, sample.pid, sample.camid, i
        raise DataError(f"none of the {len(self.samples)} images could be read (first: {self.samples[0].path})")
