"""Deterministic sample order: a function of (seed, epoch) only, so a resumed run sees the same order.

With length grouping, each global batch (the samples of one optimizer step) is sorted by estimated
length before it is cut into micro-batches: micro-batches pad less, and every optimizer step still
sees exactly the samples it would have seen without grouping.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, *, seed: int, shuffle: bool = True, lengths: np.ndarray | None = None,
                 group_size: int = 0):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = lengths
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            order = np.arange(self.size)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i : i + self.group_size] for i in range(0, self.size, self.group_size)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        return order

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return self.size
