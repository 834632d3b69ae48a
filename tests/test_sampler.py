"""PKSampler: P distinct ids x K images, fixed length, deterministic per (seed, epoch)."""

from __future__ import annotations

from collections import Counter

import pytest

from pfe.data.sampler import PKSampler
from pfe.errors import DataError

# 12 ids: id i has i + 1 images (so ids 0..2 have fewer than K = 4)
PIDS = [pid for pid in range(12) for _ in range(pid + 1)]


def test_batches_hold_p_ids_times_k_images() -> None:
    sampler = PKSampler(PIDS, ids_per_batch=3, images_per_id=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sum(max(1, (p + 1) // 4) for p in range(12)) // 3
    for batch in batches:
        per_id = Counter(PIDS[i] for i in batch)
        assert len(batch) == 12 and len(per_id) == 3 and set(per_id.values()) == {4}
    # an id with >= K images gives distinct images within its group; one with fewer repeats some
    seen = Counter(i for b in batches for i in b)
    big = [i for i, p in enumerate(PIDS) if p == 11]
    assert sum(seen[i] for i in big) >= 4 and max(seen[i] for i in big) <= 2


def test_deterministic_per_seed_and_epoch() -> None:
    a, b = PKSampler(PIDS, 3, 4, seed=5), PKSampler(PIDS, 3, 4, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(PKSampler(PIDS, 3, 4, seed=6)) != list(PKSampler(PIDS, 3, 4, seed=5))


def test_epoch_covers_the_images() -> None:
    pids = [pid for pid in range(50) for _ in range(8)]
    sampler = PKSampler(pids, ids_per_batch=8, images_per_id=4, seed=1)
    used = {i for batch in sampler for i in batch}
    assert len(sampler) == 100 // 8
    assert len(used) >= 0.9 * len(pids)


def test_too_few_ids() -> None:
    with pytest.raises(DataError, match="ids_per_batch"):
        PKSampler([0, 0, 1, 1], ids_per_batch=3, images_per_id=2)
