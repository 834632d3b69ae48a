"""data.cache=device: the decoded uint8 training split with batched augmentation, run on the CPU.

The same code runs on a GPU (the tensors' device is the only difference), so these tests cover the
path the GPU trainer takes: exact agreement with the CPU transform when augmentation is off, flip,
pad + crop and Random Erasing semantics, determinism per (seed, stage, epoch), the trainer using it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfe.config import ExperimentConfig
from pfe.data.datasets import Sample, load_dataset
from pfe.data.device_cache import DeviceTrainCache, augment_batch, epoch_generator, erase_mask
from pfe.data.loader import read_image
from pfe.data.sampler import PKSampler
from pfe.data.synth import generate_synthreid
from pfe.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform
from pfe.engine.trainer import train

H, W = 64, 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache") / "synthreid"
    generate_synthreid(root, ids_train=6, ids_test=4, images_per_id=4, cameras=2, seed=3)
    return root


@pytest.fixture(scope="module")
def cache(synth) -> DeviceTrainCache:
    data = load_dataset("synthreid", synth)
    return DeviceTrainCache.build(data.train, H, W, CPU, flip_prob=0.5, erasing_prob=0.5, workers=0, batch_size=7)


def _normalised_black() -> torch.Tensor:
    return (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def test_cache_without_augmentation_equals_the_cpu_transform_bit_for_bit(synth, cache) -> None:
    data = load_dataset("synthreid", synth)
    assert cache.images.dtype == torch.uint8 and cache.images.shape == (len(data.train), 3, H, W)
    assert cache.pids.tolist() == [s.pid for s in data.train]
    assert cache.camids.tolist() == [s.camid for s in data.train]
    reference = torch.stack([build_train_transform(H, W, 0.0, 0.0, 0)(read_image(s.path)) for s in data.train])
    out = augment_batch(cache.images, epoch_generator(CPU, 0, 1, 1), flip_prob=0.0, erasing_prob=0.0)
    assert out.dtype == torch.float32 and torch.equal(out, reference)


def test_flip_erase_and_crop_do_what_the_train_transform_does(cache) -> None:
    plain = augment_batch(cache.images, epoch_generator(CPU, 0, 1, 1), flip_prob=0.0, erasing_prob=0.0)
    flipped = augment_batch(cache.images, epoch_generator(CPU, 0, 1, 1), flip_prob=1.0, erasing_prob=0.0)
    assert torch.equal(flipped, plain.flip(3))

    erased = augment_batch(cache.images, epoch_generator(CPU, 0, 1, 1), flip_prob=0.0, erasing_prob=1.0)
    changed = (erased != plain).any(dim=1)  # B x H x W
    assert changed.any(dim=(1, 2)).float().mean() > 0.5, "p = 1 must erase (nearly) every image"
    assert torch.all(erased.permute(0, 2, 3, 1)[changed] == 0.0), "erased pixels are the mean pixel, 0 after normalising"

    pad = 3
    cropped = augment_batch(cache.images, epoch_generator(CPU, 0, 1, 2), flip_prob=0.0, erasing_prob=0.0, pad=pad)
    assert cropped.shape == plain.shape
    black = _normalised_black()
    padded = torch.nn.functional.pad(plain, (pad, pad, pad, pad))
    padded[:, :, :pad], padded[:, :, -pad:], padded[:, :, :, :pad], padded[:, :, :, -pad:] = black, black, black, black
    offsets = set()
    for i in range(cropped.shape[0]):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(cropped[i], padded[i, :, dy:dy + H, dx:dx + W])]
        assert found, f"image {i} is not a crop of its padded original"
        offsets.add(found[0])
    assert len(offsets) > 1, "the crop offsets must vary"


def test_values_are_in_the_normalised_range_and_batches_are_deterministic(cache) -> None:
    low = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    high = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    a = augment_batch(cache.images, epoch_generator(CPU, 5, 1, 3), flip_prob=0.5, erasing_prob=0.5, pad=2)
    b = augment_batch(cache.images, epoch_generator(CPU, 5, 1, 3), flip_prob=0.5, erasing_prob=0.5, pad=2)
    c = augment_batch(cache.images, epoch_generator(CPU, 5, 1, 4), flip_prob=0.5, erasing_prob=0.5, pad=2)
    assert torch.equal(a, b), "same (seed, stage, epoch): same batch"
    assert not torch.equal(a, c), "another epoch: other augmentations"
    assert torch.isfinite(a).all()
    assert torch.all(a >= low.view(1, 3, 1, 1) - 1e-6) and torch.all(a <= high.view(1, 3, 1, 1) + 1e-6)


def test_erase_mask_follows_random_erasing() -> None:
    n, h, w = 4000, 96, 48
    mask = erase_mask(n, h, w, 0.5, torch.Generator().manual_seed(0), CPU)
    area = mask.float().mean(dim=(1, 2))
    erased = area > 0
    assert abs(erased.float().mean().item() - 0.5) < 0.04
    # area ratio drawn in [0.02, 0.4]; rounding h and w moves it a little
    assert area[erased].min() >= 0.012 and area[erased].max() <= 0.45
    assert 0.17 < area[erased].mean() < 0.24  # E[ratio] = 0.21 before the "fits inside" rejection
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    assert torch.all(rows[erased].sum(1) < h) and torch.all(cols[erased].sum(1) < w), "strictly inside"
    # a rectangle: every erased row has the same set of erased columns
    i = int(torch.nonzero(erased)[0])
    block = mask[i][rows[i]][:, cols[i]]
    assert block.all() and int(block.numel()) == int(mask[i].sum())


def test_epoch_follows_the_pk_sampler_and_labels_match_images(synth, cache) -> None:
    data = load_dataset("synthreid", synth)
    sampler = PKSampler([s.pid for s in data.train], 3, 2, seed=0)
    sampler.set_epoch(1)
    planned = list(sampler)
    batches = list(cache.epoch(sampler, epoch_generator(CPU, 0, 1, 1)))
    assert len(batches) == len(planned) == len(sampler)
    for (images, pids, camids, indices), plan in zip(batches, planned):
        assert images.shape == (6, 3, H, W)
        assert indices.tolist() == plan
        assert pids.tolist() == [data.train[i].pid for i in plan]
        assert camids.tolist() == [data.train[i].camid for i in plan]
    uneven = list(cache.epoch([[0, 1, 2], [3]], epoch_generator(CPU, 0, 1, 1)))
    assert [b[0].shape[0] for b in uneven] == [3, 1]


def test_skip_corrupt_slot_holds_the_next_readable_image_with_its_labels(synth, tmp_path) -> None:
    data = load_dataset("synthreid", synth)
    bad = tmp_path / "0099_c1s1_000001_00.jpg"
    bad.write_bytes(b"not a jpeg")
    samples = [data.train[0], Sample(str(bad), 99, 0), data.train[1]]
    with pytest.warns(UserWarning, match="skipped"):
        c = DeviceTrainCache.build(samples, H, W, CPU, flip_prob=0.0, erasing_prob=0.0, skip_corrupt=True)
    assert torch.equal(c.images[1], c.images[2])
    assert c.pids.tolist() == [data.train[0].pid, data.train[1].pid, data.train[1].pid]


def test_config_field_keeps_hashes_and_the_trainer_runs_deterministically(synth, tmp_path) -> None:
    base = ExperimentConfig()
    assert base.with_overrides({"data.cache": "none"}).config_hash() == base.config_hash()
    assert base.with_overrides({"data.cache": "none"}).stage1_key() == base.stage1_key()
    assert base.with_overrides({"data.cache": "device"}).stage1_key() != base.stage1_key()

    cfg = ExperimentConfig().with_overrides({
        "data.dataset": "synthreid", "data.root": str(synth), "data.height": H, "data.width": W,
        "data.ids_per_batch": 3, "data.images_per_id": 2, "data.workers": 0, "data.cache": "device",
        "data.pad": 2, "model.backbone": "resnet18", "model.pretrained": "none", "model.channels": 16,
        "model.side_dim": 32, "stage1.epochs": 1, "stage1.milestones": [1], "stage2.epochs": 1,
        "stage2.milestones": [1], "eval.batch_size": 64, "runtime.device": "cpu", "runtime.deterministic": True,
        "runtime.progress": False,
    })
    first = train(cfg, tmp_path / "a")
    second = train(cfg, tmp_path / "b")
    keys = [k for k in first.metrics if k.startswith(("train/", "eval/"))]
    assert "train/stage2/loss" in keys and first.stage1_metrics["train/stage1/loss"] > 0
    assert {k: first.metrics[k] for k in keys} == {k: second.metrics[k] for k in keys}
    assert first.stage1_metrics["train/stage1/loss"] == second.stage1_metrics["train/stage1/loss"]


def test_channels_last_output_holds_the_same_values(cache) -> None:
    """The GPU path asks for channels_last; the values must not depend on the memory format."""
    dense = augment_batch(cache.images, epoch_generator(CPU, 1, 1, 1), flip_prob=0.5, erasing_prob=0.5, pad=2)
    last = augment_batch(cache.images, epoch_generator(CPU, 1, 1, 1), flip_prob=0.5, erasing_prob=0.5, pad=2,
                         channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dense, last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_epoch_on_a_gpu_never_waits_for_the_device(synth) -> None:
    """After the first batch (which makes the normalisation constants), augmenting a batch launches work
    and returns: a host sync per batch drains the GPU's queue between training steps."""
    data = load_dataset("synthreid", synth)
    gpu = torch.device("cuda")
    cache = DeviceTrainCache.build(data.train, H, W, gpu, flip_prob=0.5, erasing_prob=0.5, pad=4, workers=0)
    generator = epoch_generator(gpu, 0, 1, 1)
    list(cache.epoch([[0, 1]], generator))
    rows = torch.arange(6, device=gpu).view(3, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [cache.batch(indices, generator) for indices in rows]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [b[0].shape for b in batches] == [(2, 3, H, W)] * 3
