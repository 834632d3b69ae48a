"""``data.cache: device``: the training split decoded once, augmented in batches on the training device.

The DataLoader path decodes every JPEG, resizes it with PIL and augments it in worker processes
each epoch; on a GPU that starves the step (a ResNet50 step takes ~2,000 images/s on an H100).
Here the training images are decoded and resized once, with the same PIL resize as
:func:`pfe.data.transforms.build_train_transform`, and kept as uint8 (N x 3 x H x W, ~221 KB per
384x192 image: 2.9 GB for Market-1501, 7.2 GB for MSMT17 train+val) on the device. Each batch is a
gather from that tensor followed by the same augmentations, vectorised over the batch on the device:
horizontal flip, optional pad + random crop, Random Erasing (the paper's parameters, the mean
pixel, i.e. 0 after normalising) and ImageNet normalisation. With flip, pad and erasing off the
output equals the CPU transform's bit for bit; with them on, the random draws come from a
generator seeded by (seed, stage, epoch), so a resumed run sees the same augmentations. Nothing
here synchronises the host with the device per batch: the epoch's sampler indices go to the
device in one copy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms as T

from pfe.data.datasets import Sample
from pfe.data.loader import ImageDataset
from pfe.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Random Erasing's parameters (as pfe.data.transforms.RandomErasing's defaults)
ERASE_SL, ERASE_SH, ERASE_R1, ERASE_ATTEMPTS = 0.02, 0.4, 0.3, 100


def epoch_generator(device: torch.device, seed: int, stage: int, epoch: int) -> torch.Generator:
    """A generator on ``device`` seeded by (seed, stage, epoch) only, so a resumed epoch repeats its draws."""
    state = int(np.random.SeedSequence([seed, stage, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint_below(high: Tensor, generator: torch.Generator) -> Tensor:
    """One integer in [0, high) per element of ``high`` (int64, >= 1)."""
    u = _uniform(tuple(high.shape), generator, high.device)
    return torch.minimum((u * high).long(), high - 1)


def erase_mask(
    batch: int,
    height: int,
    width: int,
    prob: float,
    generator: torch.Generator,
    device: torch.device,
    sl: float = ERASE_SL,
    sh: float = ERASE_SH,
    r1: float = ERASE_R1,
    attempts: int = ERASE_ATTEMPTS,
) -> Tensor:
    """Random Erasing's rectangles for a batch, B x H x W bool (True = erased).

    Per image, as pfe.data.transforms.RandomErasing: with probability ``prob``, the first of
    ``attempts`` draws (area ratio in [sl, sh], aspect in [r1, 1/r1]) whose rectangle fits strictly
    inside the image, at a uniform position; no rectangle when none fits.
    """
    apply = _uniform((batch,), generator, device) < prob
    target = height * width * (sl + (sh - sl) * _uniform((batch, attempts), generator, device))
    aspect = r1 + (1 / r1 - r1) * _uniform((batch, attempts), generator, device)
    h = torch.round(torch.sqrt(target * aspect)).long()
    w = torch.round(torch.sqrt(target / aspect)).long()
    fits = (h > 0) & (h < height) & (w > 0) & (w < width)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting draw (argmax: first maximum)
    apply = apply & fits.any(dim=1)
    h = h.gather(1, first).squeeze(1).clamp(1, height - 1)
    w = w.gather(1, first).squeeze(1).clamp(1, width - 1)
    top = _randint_below(height - h + 1, generator)
    left = _randint_below(width - w + 1, generator)
    rows = torch.arange(height, device=device)[None, :, None]
    cols = torch.arange(width, device=device)[None, None, :]
    inside_rows = (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
    inside_cols = (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
    return inside_rows & inside_cols & apply[:, None, None]


@functools.cache
def _normalisation(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std, 1 x 3 x 1 x 1 on ``device``, made once: made from the Python lists on every
    batch they were two blocking host-to-device copies, each draining the GPU's queue (the H200 bench
    counted 6 host syncs in 3 batches)."""
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))


def augment_batch(
    images: Tensor,
    generator: torch.Generator,
    *,
    flip_prob: float,
    erasing_prob: float,
    pad: int = 0,
    channels_last: bool = False,
) -> Tensor:
    """uint8 B x 3 x H x W -> float32, normalised: flip, [pad + random crop], Random Erasing, as the train transform."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"augment_batch wants a uint8 B x C x H x W batch, got {images.dtype} {tuple(images.shape)}")
    device = images.device
    b, _, height, width = images.shape
    x = images
    if flip_prob > 0:
        flip = _uniform((b,), generator, device) < flip_prob
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad > 0:  # T.Pad(pad) (black) then T.RandomCrop((H, W)): offsets in [0, 2 * pad]
        padded = F.pad(x, (pad, pad, pad, pad))
        span = torch.full((b,), 2 * pad + 1, device=device)
        top, left = _randint_below(span, generator), _randint_below(span, generator)
        rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]
        cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]
        x = padded[torch.arange(b, device=device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    mean, std = _normalisation(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # The CPU path's order and arithmetic: ToTensor (x / 255), Normalize ((x - mean) / std).
    out = x.to(torch.float32, memory_format=memory_format).div_(255).sub_(mean).div_(std)
    if erasing_prob > 0:  # erased with the mean pixel before normalising = 0 after
        out = out.masked_fill_(erase_mask(b, height, width, erasing_prob, generator, device)[:, None], 0.0)
    return out


class DeviceTrainCache:
    """The training split as uint8 images and labels on one device; ``epoch()`` yields augmented batches.

    Build it with :meth:`build`. ``images[i]`` is sample ``i`` resized to (height, width); with
    ``skip_corrupt`` an unreadable sample holds the next readable image and that image's pid and
    camid, as :class:`pfe.data.loader.ImageDataset` returns it, so a batch's labels match its images.
    """

    def __init__(self, images: Tensor, pids: Tensor, camids: Tensor, *, flip_prob: float, erasing_prob: float,
                 pad: int, channels_last: bool = False) -> None:
        self.images, self.pids, self.camids = images, pids, camids
        self.flip_prob, self.erasing_prob, self.pad = flip_prob, erasing_prob, pad
        self.channels_last = channels_last

    @classmethod
    def build(
        cls,
        samples: Sequence[Sample],
        height: int,
        width: int,
        device: torch.device | str,
        *,
        flip_prob: float,
        erasing_prob: float,
        pad: int = 0,
        skip_corrupt: bool = False,
        workers: int = 0,
        batch_size: int = 256,
    ) -> DeviceTrainCache:
        """Decode and resize every sample once (PIL, in ``workers`` processes) into a uint8 tensor on ``device``."""
        device = torch.device(device)
        decode = T.Compose([T.Resize((height, width)), T.PILToTensor()])
        dataset = ImageDataset(samples, decode, skip_corrupt=skip_corrupt)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            prefetch_factor=4 if workers else None)
        n = len(samples)
        images = torch.empty((n, 3, height, width), dtype=torch.uint8, device=device)
        pids = torch.empty(n, dtype=torch.long)
        camids = torch.empty(n, dtype=torch.long)
        start = 0
        for batch, batch_pids, batch_camids, _ in loader:
            stop = start + batch.shape[0]
            images[start:stop].copy_(batch, non_blocking=False)
            pids[start:stop], camids[start:stop] = batch_pids, batch_camids
            start = stop
        return cls(images, pids.to(device), camids.to(device), flip_prob=flip_prob, erasing_prob=erasing_prob,
                   pad=pad, channels_last=device.type == "cuda")

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def batch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images float32 normalised, pids, camids, indices) for ``indices`` (a long tensor on the device)."""
        images = augment_batch(
            self.images.index_select(0, indices), generator, flip_prob=self.flip_prob,
            erasing_prob=self.erasing_prob, pad=self.pad, channels_last=self.channels_last,
        )
        return images, self.pids.index_select(0, indices), self.camids.index_select(0, indices), indices

    def epoch(self, batches: Sequence[Sequence[int]] | torch.utils.data.Sampler, generator: torch.Generator,
              ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Augmented batches for the sampler's batches of indices (e.g. a PKSampler after ``set_epoch``).

        All batches of the epoch travel to the device in one asynchronous copy (from pinned memory on
        a GPU); batches may differ in size.
        """
        plan = [list(b) for b in batches]
        if not plan:
            return
        flat = torch.as_tensor([i for b in plan for i in b], dtype=torch.long)
        if self.device.type == "cuda":  # pinned + non_blocking: the copy does not wait for the device
            flat = flat.pin_memory()
        rows = list(flat.to(self.device, non_blocking=True).split([len(b) for b in plan]))
        for indices in rows:
            yield self.batch(indices, generator)
