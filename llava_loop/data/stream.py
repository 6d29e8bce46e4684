"""Streaming webdataset shards, with exact resume.

An epoch's data is a function of (seed, epoch, shard counts, processes, workers, micro-batch size) alone:

1. the shard list is permuted by (seed, epoch) and read as one sequence of samples (counts from ``shards.json``);
2. the sequence is cut into equal contiguous slices, one per consumer (process x DataLoader worker; one per
   process without workers), each a whole number of micro-batches; the remainder is dropped, so every process
   runs the same number of steps however uneven the shards are;
3. each consumer reads its slice in blocks of ``data.shuffle_buffer`` samples and shuffles each block by
   (seed, epoch, consumer, block): memory is bounded by one block.

A consumer's stream position is therefore fully described by (epoch, samples it has consumed): the shard and
offset of its next sample, and its shuffle buffer's contents and order, follow from it. This is the documented
equivalent of storing shard, offset and buffer. A resumed consumer seeks to the start of its current block (whole
shards before it are never opened; inside its shard it jumps to the nearest seek point that shards.json records, so
it reads through at most 1000 samples, or the shard's head without an index), re-forms the block and drops what
was consumed.
Checkpoints store every process's and worker's position explicitly (``StreamPosition``), and resume verifies it.

A DataLoader with W workers takes micro-batch j of a process from worker j mod W, each worker making whole
micro-batches of its own slice; after k micro-batches, resume starts worker w on logical consumer (w + k) mod W.
A bad sample is replaced by the next good one of its block (the block is in memory), counted, as map-style data
replaces it. The order depends on the number of processes and workers, so a resume must keep both.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..console import say_on_main
from ..errors import UserError
from .dataset import MAX_ATTEMPTS, DataError
from .encode import SampleEncoder
from .shards import iter_shard, sample_record
from .skips import SkipSample


class StreamLayout:
    """Where every consumer's samples come from, per epoch: pure arithmetic over the shard counts."""

    def __init__(
        self,
        shards: list[Path],
        counts: list[int],
        *,
        seed: int,
        processes: int,
        workers: int,
        micro_batch: int,
        grad_accum: int,
        block: int,
        seeks: list | None = None,
    ):
        self.shards, self.counts = shards, np.asarray(counts, dtype=np.int64)
        self.seeks = seeks or [None for _ in shards]  # seek points inside each shard, from shards.json
        self.dropped: set[str] = set()  # shards data.path names that the stream leaves out (damaged ones)
        self.seed, self.processes, self.workers = seed, processes, max(workers, 1)
        self.micro_batch, self.block = micro_batch, block
        self.total = int(self.counts.sum())
        consumers = self.processes * self.workers
        self.batches_per_consumer = self.total // (consumers * micro_batch)
        self.slice = self.batches_per_consumer * micro_batch  # samples per consumer per epoch
        # micro-batches a process runs per epoch: whole optimizer steps, taken round-robin from its workers
        self.micro_batches = self.workers * self.batches_per_consumer // grad_accum * grad_accum

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def consumer(self, rank: int, logical: int) -> int:
        return rank * self.workers + logical

    def consumed(self, logical: int, micro_batches: int) -> int:
        """Samples logical worker ``logical`` of a process has handed over after ``micro_batches`` of it."""
        return len(range(logical, micro_batches, self.workers)) * self.micro_batch

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(index into the epoch's shard order, offset in that shard) of global sample ``position``."""
        ends = np.cumsum(self.counts[self.order(epoch)])
        k = int(np.searchsorted(ends, position, side="right"))
        return k, position - int(ends[k - 1] if k else 0)

    def position(self, epoch: int, rank: int, logical: int, micro_batches: int) -> dict:
        """A consumer's stream position, as the checkpoint records it."""
        done = self.consumed(logical, micro_batches)
        start = self.consumer(rank, logical) * self.slice
        block_start = done // self.block * self.block
        k, offset = self.locate(epoch, start + done) if done < self.slice else (len(self.shards), 0)
        return {
            "rank": rank,
            "worker": logical,
            "epoch": epoch,
            "samples": done,
            "block_start": block_start,
            "shard": self.shards[self.order(epoch)[k]].name if k < len(self.shards) else None,
            "offset": offset,
        }

    def raw_samples(self, epoch: int, start: int, stop: int):
        """Global samples ``start`` to ``stop`` of the epoch's sequence: whole shards before ``start`` are never
        opened; the first one is entered at its offset (from the nearest seek point)."""
        order = self.order(epoch)
        k, offset = self.locate(epoch, start)
        needed = stop - start
        while needed > 0:
            shard = self.shards[order[k]]
            expected = int(self.counts[order[k]])
            got = 0
            for sample in islice(iter_shard(shard, offset, self.seeks[order[k]]), expected - offset):
                yield sample
                got += 1
                needed -= 1
                if needed == 0:
                    return
            if offset + got < expected:
                raise DataError(
                    f"{shard} holds {offset + got} samples but its count says {expected}; the shard is "
                    f"truncated or shards.json is stale (delete shards.json beside the shards to recount)"
                )
            k, offset = k + 1, 0

    def consumer_samples(self, epoch: int, consumer: int, done: int):
        """The consumer's samples in training order from its ``done``-th on, as ``(block, i)``: sample ``i`` of the
        in-memory block of raw samples (the block, to replace a bad sample from)."""
        start = consumer * self.slice
        first = done // self.block * self.block
        reader = self.raw_samples(epoch, start + first, start + self.slice)
        for block_start in range(first, self.slice, self.block):
            block = list(islice(reader, min(self.block, self.slice - block_start)))
            order = np.random.default_rng([self.seed, epoch, consumer, block_start // self.block]).permutation(
                len(block)
            )
            skip = done - block_start if block_start == first else 0
            for i in order[skip:]:
                yield block, int(i)


class StreamDataset(IterableDataset):
    """One process's share of the shards, as encoded samples in training order. ``start(epoch, k)`` sets where the
    next iterator begins: micro-batch ``k`` of ``epoch``."""

    holds_video = holds_video_files = False  # shards carry images as members; a video would be a path outside them

    def __init__(self, layout: StreamLayout, encoder: SampleEncoder, *, rank: int, source: str):
        self.layout, self.encoder, self.rank, self.source = layout, encoder, rank, source
        self.epoch, self.skip = 0, 0

    def start(self, epoch: int, micro_batches: int) -> None:
        self.epoch, self.skip = epoch, micro_batches

    def __len__(self) -> int:
        return self.layout.total

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.skip) % self.layout.workers
        done = self.layout.consumed(logical, self.skip)
        consumer = self.layout.consumer(self.rank, logical)
        for block, i in self.layout.consumer_samples(self.epoch, consumer, done):
            yield self.encode(block, i)

    def encode(self, block: list[dict], i: int) -> dict:
        """Sample ``i`` of the block, or the next good one after it (cyclically), with the skips it cost."""
        skipped = []
        for attempt in range(min(MAX_ATTEMPTS, len(block))):
            raw = block[(i + attempt) % len(block)]
            try:
                sample = self.encoder(sample_record(raw), image_dir="")
            except SkipSample as skip:
                skipped.append((f"{Path(raw['__url__']).name}:{raw['__key__']}", skip.reason, skip.detail))
                continue
            sample["skipped"] = skipped
            return sample
        reasons = "; ".join(f"{rid}: {reason} ({detail})" for rid, reason, detail in skipped[-3:])
        raise DataError(
            f"{len(skipped)} samples in a row from {self.source} could not be used (last: {reasons}); "
            "run `llava-loop data check` on the shards"
        )


class StreamPosition:
    """The checkpoint's record of every process's and worker's stream position (a stateful part). It is derived
    from the run's progress (epoch, micro-batches into it); on resume it must match the layout and the progress."""

    def __init__(self, layout: StreamLayout, progress, grad_accum: int):
        self.layout, self.progress, self.grad_accum = layout, progress, grad_accum

    def positions(self) -> list[dict]:
        k = self.progress.step_in_epoch * self.grad_accum
        return [
            self.layout.position(self.progress.epoch, rank, logical, k)
            for rank in range(self.layout.processes)
            for logical in range(self.layout.workers)
        ]

    def fingerprint(self) -> dict:
        lay = self.layout
        return {
            "shards": [s.name for s in lay.shards],
            "counts": lay.counts.tolist(),
            "processes": lay.processes,
            "workers": lay.workers,
            "micro_batch": lay.micro_batch,
            "shuffle_buffer": lay.block,
        }

    def state_dict(self) -> dict:
        return {"layout": self.fingerprint(), "positions": self.positions()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state["layout"], self.fingerprint()
        changed = [key for key in now if saved.get(key) != now[key]]
        if changed and self.without_damaged(saved, now, changed):
            return
        if changed:
            raise UserError(
                f"the checkpoint's stream was laid out with other {', '.join(changed)} (e.g. {changed[0]}="
                f"{_short(saved.get(changed[0]))}, now {_short(now[changed[0]])}); its position means nothing in this "
                "layout. Resume with the same shards, processes, data.num_workers, micro-batch size and "
                "data.shuffle_buffer, or start a new run"
            )
        if state["positions"] != self.positions():
            raise UserError(
                "the checkpoint's stream positions disagree with its progress counters; the checkpoint is damaged"
            )

    def without_damaged(self, saved: dict, now: dict, changed: list[str]) -> bool:
        """Whether the only change is damaged shards left out (data.skip_damaged_shards): then the run goes on,
        saying so. Its epoch continues in the new layout, from the same micro-batch."""
        removed = [name for name in saved["shards"] if name not in now["shards"]]
        kept = [(n, c) for n, c in zip(saved["shards"], saved["counts"]) if n not in removed]
        if not (
            removed
            and set(changed) <= {"shards", "counts"}
            and set(removed) <= self.layout.dropped
            and kept == list(zip(now["shards"], now["counts"]))
        ):
            return False
        lost = sum(c for n, c in zip(saved["shards"], saved["counts"]) if n in removed)
        say_on_main(
            f"[yellow]warning:[/yellow] resuming without the damaged shards {', '.join(removed)} ({lost:,} "
            f"samples): the rest of epoch {self.progress.epoch} follows the stream's layout without them, so "
            "some of its samples may repeat or be missed; later epochs read every remaining sample once"
        )
        return True


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def stream_loader(dataset: StreamDataset, collate, loader_kwargs: dict, micro_batch: int):
    """Workers are not persistent: each epoch (and a resume) starts them at a new position."""
    from torch.utils.data import DataLoader

    kwargs = {**loader_kwargs, "persistent_workers": False}
    return DataLoader(
        dataset, batch_size=micro_batch, collate_fn=collate, generator=torch.Generator().manual_seed(0), **kwargs
    )
