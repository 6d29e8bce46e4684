"""Deterministic sample order: a function of (seed, epoch) only, so a resumed run sees the same order.

With length grouping, each global batch (the samples of one optimizer step) is sorted by token length
(``lengths.token_lengths``) before it is cut into micro-batches: micro-batches pad less, and every optimizer step still
sees exactly the samples it would have seen without grouping.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A permutation of the records per epoch; of a ``mixture``'s draw for that epoch (mixture.py) when given."""

    def __init__(self, size: int, *, seed: int, lengths: np.ndarray | None = None, group_size: int = 0, mixture=None):
        self.mixture = mixture
        self.size = len(mixture) if mixture is not None else size
        self.seed = seed
        self.lengths = lengths
        self.group_size = group_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        if self.mixture is not None:
            order = self.mixture.epoch_indices(epoch)[order]
        if self.lengths is not None and self.group_size > 1:
            groups = [order[i : i + self.group_size] for i in range(0, self.size, self.group_size)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        return order

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return self.size


class TokenBudgetBatches(Sampler[list[int]]):
    """Micro-batches filled up to a token budget (``data.max_tokens_per_micro_batch``) instead of a fixed size.

    The epoch's order (``EpochSampler``) is walked once: each micro-batch opens with the next sample, then takes
    every later sample within a look-ahead ``window`` that still fits (first fit). The batches are a function of
    (seed, epoch), so a resumed run sees the same ones; their count is cut to a multiple of ``multiple``
    (processes x accumulation), so every process runs the same number of micro-batches per step. A sample's cost
    is its token length; a padded micro-batch costs its size times its longest sample, a packed one the sum.
    """

    def __init__(
        self,
        order: EpochSampler,
        lengths: np.ndarray,
        max_tokens: int,
        *,
        packed: bool,
        window: int = 64,
        multiple: int = 1,
    ):
        self.order, self.lengths, self.max_tokens = order, lengths, max_tokens
        self.packed, self.window, self.multiple = packed, window, multiple
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)

    def cost(self, batch_lengths: list[int]) -> int:
        return sum(batch_lengths) if self.packed else len(batch_lengths) * max(batch_lengths)

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            pending = deque(self.order.order(epoch).tolist())  # a list's pop(0) would make an epoch quadratic
            out = []
            while pending:
                batch = [pending.popleft()]
                lengths = [int(self.lengths[batch[0]])]
                i = 0
                while i < min(self.window, len(pending)):
                    candidate = int(self.lengths[pending[i]])
                    if self.cost(lengths + [candidate]) <= self.max_tokens:
                        batch.append(pending[i])
                        del pending[i]
                        lengths.append(candidate)
                    else:
                        i += 1
                out.append(batch)
            self._cache = (epoch, out[: len(out) // self.multiple * self.multiple])
        return self._cache[1]

    def __iter__(self):
        return iter(self.batches(self.order.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.order.epoch))
