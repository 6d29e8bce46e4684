"""Several record sources trained as one (``data.mix``): one index space, and each epoch's draw by weight.

A source's weight is how many times each of its records is seen per epoch: 2 twice, 1 once, 0.5 a random half
drawn afresh each epoch (as LLaVA-OneVision's data recipes sample a share of a set). The draw is a function of
(seed, epoch, source) alone, and the sampler shuffles the drawn indices with the (seed, epoch) permutation it
uses for one source, so a resumed run sees the same samples in the same order."""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError, size_text
from .dataset import LlavaDataset


class Mixture:
    """Sources of ``sizes`` records laid end to end (source ``s`` holds indices ``offsets[s]`` on), drawn by
    ``weights``."""

    def __init__(self, sizes: list[int], weights: list[float], *, seed: int):
        self.sizes, self.weights, self.seed = list(sizes), list(weights), seed
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def draws(self, s: int) -> tuple[int, int]:
        """(whole passes over source ``s``, records drawn beyond them) per epoch."""
        whole = int(self.weights[s])
        return whole, round((self.weights[s] - whole) * self.sizes[s])

    def __len__(self) -> int:
        return sum(whole * n + extra for n, (whole, extra) in zip(self.sizes, map(self.draws, range(len(self.sizes)))))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        parts = []
        for s, n in enumerate(self.sizes):
            whole, extra = self.draws(s)
            local = [np.arange(n)] * whole
            if extra:
                local.append(np.sort(np.random.default_rng([self.seed, epoch, s]).choice(n, extra, replace=False)))
            parts += [self.offsets[s] + p for p in local]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1


class MixedDataset(Dataset):
    """The sources' datasets as one; a sample carries its source's number (``source``), and a bad record is
    replaced from its own source, so the mixture's shares hold."""

    def __init__(self, parts: list[LlavaDataset], names: list[str], weights: list[float], *, seed: int):
        self.parts, self.names = parts, names
        self.mixture = Mixture([len(p) for p in parts], weights, seed=seed)
        for s, (part, name) in enumerate(zip(parts, names)):
            if self.mixture.draws(s) == (0, 0):
                raise UserError(
                    f"data.mix source {name} ({part.source}): weight {weights[s]} draws none of its {len(part)} "
                    f"records per epoch; raise it to at least {0.5 / len(part):.2g}"
                )
        check_epoch_fits(self.mixture, names, host_memory())
        self.encoder = parts[0].encoder

    def __len__(self) -> int:
        return int(self.mixture.offsets[-1])

    @property
    def source(self) -> str:
        return "the mixture of " + ", ".join(p.source for p in self.parts)

    @property
    def holds_video(self) -> bool:
        return any(part.holds_video for part in self.parts)

    @property
    def holds_video_files(self) -> bool:
        return any(part.holds_video_files for part in self.parts)

    def __getitem__(self, index: int) -> dict:
        s = self.mixture.source_of(index)
        sample = self.parts[s][index - int(self.mixture.offsets[s])]
        sample["source"] = s
        return sample


EPOCH_COPIES = 3  # int64 arrays of an epoch's length alive at once: the draw, the sampler's order, its shard


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_epoch_fits(mixture: Mixture, names: list[str], memory: int) -> None:
    """An epoch's order is held in memory: refuse, before the first epoch, a mixture whose order would need more
    than half of ``memory``, naming the bytes and the source that draws most."""
    samples = len(mixture)
    need = EPOCH_COPIES * 8 * samples
    if need <= memory // 2:
        return
    biggest = max(range(len(names)), key=lambda s: mixture.weights[s] * mixture.sizes[s])
    raise UserError(
        f"data.mix: an epoch would draw {samples:,} samples, whose order alone needs {size_text(need)} of memory "
        f"({size_text(memory)} here); source {names[biggest]} draws {mixture.weights[biggest]:g} x "
        f"{mixture.sizes[biggest]:,} records. Lower its weight and train longer with train.epochs or train.max_steps"
    )
