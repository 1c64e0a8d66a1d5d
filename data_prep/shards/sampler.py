"""Ordering a split for training: :class:`ShardBatchSampler`, the rank-aware batches of dataset
indices that every process derives alike from (seed, epoch)."""
from __future__ import annotations

import numpy as np


class ShardBatchSampler:
    """Batches of dataset indices for one rank, identical in every process given (seed, epoch).

    Order: ``np.random.default_rng([seed, epoch]).permutation(num_samples)`` (identity when
    ``shuffle=False``), cut into global batches of ``global_batch_size``; rank r of N takes the
    contiguous slice [r*G/N, (r+1)*G/N) of each. So world_size=1 yields, in order, the union of
    what N ranks yield. drop_last=True drops a final partial global batch; drop_last=False splits
    it into N contiguous near-equal parts (a rank whose part is empty yields nothing for it).

    Use as ``DataLoader(ds, sampler=ShardBatchSampler(...), batch_size=None, ...)``.
    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch`` global batches (resume inside
    an epoch). ``state_dict`` records the settings, not progress: with prefetching workers the
    sampler runs ahead of training, so the training loop counts consumed batches itself.
    """

    def __init__(self, num_samples, global_batch_size, rank=0, world_size=1, seed=0,
                 shuffle=True, drop_last=True):
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.local_batch_size = self.global_batch_size // self.world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        if start_batch < 0:
            raise ValueError(f"start_batch={start_batch} must be >= 0")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _partial_part(self):
        """(start, size) of this rank's part of the final partial global batch."""
        rem = self.num_samples % self.global_batch_size
        base, extra = divmod(rem, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, base + (1 if self.rank < extra else 0)

    def __len__(self):
        full = self.num_samples // self.global_batch_size
        n = max(0, full - self.start_batch)
        if not self.drop_last and self.start_batch <= full and self._partial_part()[1] > 0:
            n += 1
        return n

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        G, L = self.global_batch_size, self.local_batch_size
        full = self.num_samples // G
        lo = self.rank * L
        for b in range(self.start_batch, full):
            yield order[b * G + lo: b * G + lo + L].tolist()
        if not self.drop_last and self.start_batch <= full:
            start, size = self._partial_part()
            if size:
                yield order[full * G + start: full * G + start + size].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, d):
        self.seed = int(d["seed"])
        self.set_epoch(d["epoch"], d.get("start_batch", 0))
