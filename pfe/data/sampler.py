"""PK sampling: batches of P identities x K images (for the batch-hard triplet loss)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from pfe.errors import DataError


class PKSampler(Sampler[list[int]]):
    """A batch sampler: each batch holds ``ids_per_batch`` distinct identities with
    ``images_per_id`` images each.

    An epoch deals every identity's images out in groups of K (shuffled; an identity with fewer
    than K images is drawn with replacement, one with n >= K images gives floor(n / K) groups), so
    an epoch sees about every training image once, as BoT's RandomIdentitySampler does. Each batch
    takes one group from P distinct identities, chosen with probability proportional to the groups
    they have left; when fewer than P identities have groups left, fresh groups are dealt for more.
    The number of batches is fixed, ``len(sampler) = total groups // P``, and the batches depend
    only on (seed, epoch): call ``set_epoch`` before iterating, so a resumed run sees the same ones.
    """

    def __init__(self, pids: Sequence[int], ids_per_batch: int, images_per_id: int, seed: int = 0) -> None:
        if ids_per_batch < 1 or images_per_id < 1:
            raise ValueError("ids_per_batch and images_per_id must be >= 1")
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.by_pid[int(pid)].append(index)
        self.pids = sorted(self.by_pid)
        if len(self.pids) < ids_per_batch:
            raise DataError(
                f"the training set has {len(self.pids)} identities, fewer than data.ids_per_batch = {ids_per_batch}"
            )
        self.p, self.k, self.seed, self.epoch = ids_per_batch, images_per_id, seed, 0
        self.groups_per_id = np.array([max(1, len(self.by_pid[p]) // self.k) for p in self.pids])
        self.num_batches = max(1, int(self.groups_per_id.sum()) // self.p)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _deal(self, rng: np.random.Generator, slot: int) -> list[list[int]]:
        """Fresh groups of K indices for identity ``self.pids[slot]``."""
        indices = np.asarray(self.by_pid[self.pids[slot]])
        if len(indices) < self.k:
            return [rng.choice(indices, self.k, replace=True).tolist()]
        shuffled = rng.permutation(indices)
        return [shuffled[i * self.k : (i + 1) * self.k].tolist() for i in range(len(indices) // self.k)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = [self._deal(rng, slot) for slot in range(len(self.pids))]
        left = np.array([len(g) for g in groups], dtype=np.float64)
        for _ in range(self.num_batches):
            available = np.flatnonzero(left > 0)
            if len(available) < self.p:  # top up: deal fresh groups to identities picked at random
                empty = np.flatnonzero(left == 0)
                for slot in rng.choice(empty, self.p - len(available), replace=False):
                    groups[slot] = self._deal(rng, int(slot))
                    left[slot] = len(groups[slot])
            chosen = rng.choice(len(left), self.p, replace=False, p=left / left.sum())
            batch: list[int] = []
            for slot in chosen:
                batch += groups[slot].pop()
                left[slot] -= 1
            yield batch
