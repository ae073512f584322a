"""Identity (PK) sampler: batches of P identities x K images each, DDP-aware."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Sequence

import numpy as np
from torch.utils.data import Sampler

__all__ = ["PKSampler"]


class PKSampler(Sampler[int]):
    """Yields dataset indices in consecutive groups of ``batch_size = P * K``.

    Each epoch: every identity's images are shuffled and cut into chunks of K (an identity with
    fewer than K images is sampled with replacement to one chunk; leftovers that do not fill a
    chunk are dropped for that epoch); batches are then formed by repeatedly picking P distinct
    identities that still have chunks, until fewer than P remain. Use it with
    ``DataLoader(batch_size=P*K, drop_last=True)``.

    Distributed: every replica builds the same batch list from ``(seed, epoch)`` and takes
    batches ``rank, rank + num_replicas, ...``, truncated to the same count on every replica
    (an epoch with fewer batches than replicas is an error, not an empty epoch);
    ``batch_size`` is per replica. Call ``set_epoch(e)`` each epoch (as with
    ``DistributedSampler``); without it, the epoch advances by one when an iteration ends (or is
    abandoned), so that ``len()`` before an iteration (``len(loader)``) counts the epoch it draws.
    """

    def __init__(self, pids: Sequence[int], batch_size: int = 64, num_instances: int = 4,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}")
        self.pids = np.asarray(pids, dtype=np.int64)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_pids_per_batch = batch_size // num_instances
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.index_of: Dict[int, List[int]] = defaultdict(list)
        for i, p in enumerate(self.pids.tolist()):
            self.index_of[p].append(i)
        self.id_list = sorted(self.index_of)
        if len(self.id_list) < self.num_pids_per_batch:
            raise ValueError(f"PK sampling needs at least P = batch_size / num_instances = {self.num_pids_per_batch} "
                             f"identities, the training set has {len(self.id_list)}")
        self.epoch = 0
        self._explicit_epoch = False
        self._cache = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._explicit_epoch = True

    def _batches(self, epoch: int) -> List[List[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, epoch])
        K, P = self.num_instances, self.num_pids_per_batch
        chunks: Dict[int, List[List[int]]] = {}
        for p in self.id_list:
            idx = np.asarray(self.index_of[p])
            if len(idx) < K:
                idx = rng.choice(idx, size=K, replace=True)
            else:
                idx = rng.permutation(idx)
            n = len(idx) // K
            chunks[p] = [idx[j * K:(j + 1) * K].tolist() for j in range(n)]
        active = [p for p in self.id_list if chunks[p]]
        batches: List[List[int]] = []
        while len(active) >= P:
            pick = rng.choice(len(active), size=P, replace=False)
            batch: List[int] = []
            for j in pick:
                batch.extend(chunks[active[j]].pop())
            batches.append(batch)
            active = [p for p in active if chunks[p]]
        n_each = len(batches) // self.num_replicas
        if n_each == 0:
            raise ValueError(
                f"PK sampling formed {len(batches)} batch(es) of P={P} identities x K={K} images from "
                f"{len(self.id_list)} identities, fewer than num_replicas={self.num_replicas}: some replicas would "
                "train on nothing; use a smaller batch_size or num_instances, or fewer processes")
        mine = batches[self.rank: n_each * self.num_replicas: self.num_replicas]
        self._cache = (epoch, mine)
        return mine

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        try:
            for b in self._batches(epoch):
                yield from b
        finally:
            if not self._explicit_epoch:
                self.epoch = epoch + 1

    def __len__(self) -> int:
        return len(self._batches(self.epoch)) * self.batch_size
