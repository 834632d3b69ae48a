"""ImageDataset: decoded, transformed images with (pid, camid, index); SeededBatches: the training
augmentations as a function of the run's seed and the image's place in the epoch, not of the worker."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.transforms.functional import to_tensor

from pfe.data.datasets import Sample
from pfe.errors import DataError


def read_image(path: str) -> Image.Image:
    """Decode an image file as RGB; an unreadable, truncated or corrupt file is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err}). Replace or delete the file") from None


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """A batch sampler whose indices each come with an augmentation seed drawn from
    (seed, stage, epoch, batch number) alone, for :class:`ImageDataset`; call ``set_epoch`` before
    each epoch (and the wrapped sampler's own).

    Without it every DataLoader worker draws the random flips, crops and erasings from its own RNG
    stream, so the same config trained with another number of workers (``data.workers``, which may
    differ from machine to machine) would see other augmentations. With it the draws are the same for
    any number of workers, with workers kept from one epoch to the next, and on a resumed epoch, as
    with ``data.cache=device``."""

    def __init__(self, batches: Sampler[list[int]], seed: int, stage: int = 1, epoch: int = 0) -> None:
        self.batches, self.seed = batches, seed
        self.set_epoch(stage, epoch)

    def set_epoch(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        key = (self.seed, self.stage, self.epoch)
        for number, batch in enumerate(self.batches):
            seeds = np.random.SeedSequence([*key, number]).generate_state(len(batch), dtype=np.uint64) >> 1
            yield list(zip(batch, seeds.tolist()))


class ImageDataset(Dataset):
    """``samples[i]`` or ``samples[(i, seed)]`` -> (image tensor, pid, camid, index).

    With a seed (from :class:`SeededBatches`) the transform draws its random numbers from a torch
    generator state seeded with it, and the process's own RNG is left as it was.
    With ``skip_corrupt`` an unreadable image is reported once (a warning naming it) and replaced by
    the next readable sample, returned with that sample's own pid, camid and index, so batches keep
    their size and labels stay consistent; without it the DataError stops the run, its message ending
    with ``hint`` (the default names the config key; `pfe-study eval`, which has no such key, passes "").
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any] | None = None,
                 skip_corrupt: bool = False, hint: str = ", or set data.skip_corrupt: true to skip it") -> None:
        self.samples = list(samples)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.hint = hint
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if i in self._bad:
                continue
            sample = self.samples[i]
            try:
                img = read_image(sample.path)
            except DataError as err:
                if not self.skip_corrupt:
                    raise DataError(f"{err}{self.hint}") from None
                self._bad.add(i)
                warnings.warn(f"skipped (data.skip_corrupt): {err}", stacklevel=2)
                continue
            return self._transform(img, seed), sample.pid, sample.camid, i
        raise DataError(f"none of the {len(self.samples)} images could be read (first: {self.samples[0].path})")

    def _transform(self, img: Image.Image, seed: int | None) -> torch.Tensor:
        if self.transform is None:
            return to_tensor(img)
        if seed is None:
            return self.transform(img)
        # the CPU generator the transforms draw from, seeded for this image and restored afterwards
        # (torch.manual_seed / fork_rng would also touch the CUDA generators: ~100x slower)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.transform(img)
        finally:
            generator.set_state(state)
