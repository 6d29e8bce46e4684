"""From a ``Config`` to records, datasets and DataLoaders: the one place the config meets ``data/`` (which knows
nothing of it), and where a DataLoader worker's death becomes a message."""

from __future__ import annotations

import re
import signal
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import Config, mix_names
from .data.blank_image import BlankImage
from .data.collate import Collator
from .data.dataset import DataError, LlavaDataset
from .data.encode import SampleEncoder
from .data.lengths import token_lengths
from .data.mixture import MixedDataset
from .data.records import RecordError, Records
from .data.sampler import EpochSampler, TokenBudgetBatches
from .data.shards import expand, read_index, usable_shards
from .data.sources import image_dir_of, open_records, require_data_extra, source_kind
from .data.stream import StreamDataset, StreamLayout, stream_loader
from .data.tables import TableRecords
from .data.video import require_video_extra
from .errors import UserError


def split_records(cfg: Config) -> tuple[Records | TableRecords | list, Records | TableRecords | None]:
    """Training records and held-out records (``data.eval_path``, or ``eval.holdout`` records of ``data.path``).
    Shards are streamed: their training part is the list of shard files (all found, or an error now). A
    ``data.mix``'s training part is each source's records, in order."""
    if cfg.data.mix:
        held = open_records(cfg.data.eval_path) if cfg.data.eval_path else None
        return [open_mix_source(m.path) for m in cfg.data.mix], held
    kind = source_kind(cfg.data.path)
    if kind != "json":
        require_data_extra(kind, cfg.data.path)
    held = open_records(cfg.data.eval_path) if cfg.data.eval_path else None
    if kind == "shards":
        if cfg.eval.holdout:
            raise RecordError(
                f"eval.holdout cannot split the shard stream {cfg.data.path}; give held-out records in "
                "data.eval_path (JSON, Parquet or Arrow)"
            )
        return usable_shards(expand(cfg.data.path), skip_damaged=cfg.data.skip_damaged_shards), held
    records = open_records(cfg.data.path)
    if held is not None:
        return records, held
    if cfg.eval.holdout:
        if cfg.eval.holdout >= len(records):
            raise RecordError(
                f"eval.holdout={cfg.eval.holdout} leaves no training records: {cfg.data.path} holds "
                f"{len(records)}; lower eval.holdout or give held-out records in data.eval_path"
            )
        order = np.random.default_rng(cfg.train.seed).permutation(len(records))
        held = np.sort(order[: cfg.eval.holdout])
        return records.subset(np.sort(order[cfg.eval.holdout :])), records.subset(held)
    return records, None


def open_mix_source(path: str) -> Records | TableRecords:
    if source_kind(path) == "shards":
        raise RecordError(
            f"data.mix: {path} is webdataset shards, which are streamed; a mixture takes map-style sources"
        )
    return open_records(path)


def make_encoder(cfg: Config, processor) -> SampleEncoder:
    d = cfg.data
    return SampleEncoder(
        processor,
        max_length=d.max_length,
        system_prompt=d.system_prompt,
        template=d.template,
        caption_end=d.caption_end,
        image_aspect_ratio=d.image_aspect_ratio,
        max_image_pixels=d.max_image_pixels,
        allow_absolute_paths=d.allow_absolute_paths,
        video_frames=d.video_frames,
        video_fps=d.video_fps,
    )


def make_datasets(
    cfg: Config, processor, records: tuple | None = None, *, rank: int = 0, processes: int = 1
) -> tuple[LlavaDataset | StreamDataset, LlavaDataset | None]:
    """Datasets over ``records`` (from ``split_records``, read here when not given); shards give this process's
    stream (``rank`` of ``processes``)."""
    encoder = make_encoder(cfg, processor)
    train, held = records or split_records(cfg)
    if cfg.data.mix:
        parts = [
            LlavaDataset(records, encoder, image_dir_of(m.path, m.image_dir), seed=cfg.train.seed)
            for records, m in zip(train, cfg.data.mix)
        ]
        weights = [m.weight for m in cfg.data.mix]
        train_ds = MixedDataset(parts, mix_names(cfg.data.mix), weights, seed=cfg.train.seed)
    elif source_kind(cfg.data.path) == "shards":
        train_ds = make_stream(cfg, encoder, train, rank=rank, processes=processes)
    else:
        train_ds = LlavaDataset(train, encoder, image_dir_of(cfg.data.path, cfg.data.image_dir), seed=cfg.train.seed)
    eval_ds = None
    if held is not None:
        d = cfg.data
        held_dir = image_dir_of(d.eval_path, d.eval_image_dir) if d.eval_path else ""
        eval_ds = LlavaDataset(held, encoder, held_dir or image_dir_of(d.path, d.image_dir), substitute=False)
    if train_ds.holds_video_files or getattr(eval_ds, "holds_video_files", False):
        require_video_extra()  # refused now, not in a loader worker at the first clip
    return train_ds, eval_ds


def blank_inputs(train_set, eval_set, device) -> BlankImage:
    """The stand-ins for micro-batches without an image, and without a video where the data holds videos and the
    model takes them (blank_image.py)."""
    videos = train_set.holds_video or getattr(eval_set, "holds_video", False)
    encoder = train_set.encoder
    return BlankImage(encoder, device, video=videos and encoder.video is not None)


def make_stream(cfg: Config, encoder: SampleEncoder, shards: list[Path], *, rank: int, processes: int) -> StreamDataset:
    d, t = cfg.data, cfg.train
    if d.group_by_length or d.max_tokens_per_micro_batch:
        raise UserError(
            "data.group_by_length and data.max_tokens_per_micro_batch need every record's length up "
            "front, which a stream of shards does not have; turn them off for shards, or train from "
            "Parquet/Arrow"
        )
    counts, seeks = read_index(shards)
    layout = StreamLayout(
        shards,
        counts,
        seed=t.seed,
        processes=processes,
        workers=d.num_workers,
        micro_batch=t.micro_batch_size,
        grad_accum=t.grad_accum,
        block=d.shuffle_buffer,
        seeks=seeks,
    )
    layout.dropped = {f.name for f in expand(d.path)} - {f.name for f in shards}  # damaged ones left out
    return StreamDataset(layout, encoder, rank=rank, source=str(d.path))


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the main process, which finishes the step, saves and exits
    0. Slurm and Kubernetes signal the whole process group: a worker killed by it would take the run down
    before the save. (A worker whose parent is gone still exits: PyTorch's workers watch their parent.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_DEATH_MESSAGE = re.compile(r"DataLoader worker \(pid.*\) (is killed by signal|exited unexpectedly)")


def worker_death(exc: BaseException) -> str | None:
    """What a DataLoader worker's death looks like from the main process, or None for any other error.

    A death reaches the main process three ways: PyTorch's SIGCHLD handler (a RuntimeError, wherever the loop
    happens to be), its own liveness check after a failed read (another RuntimeError), and, when the worker
    dies while the main process is still fetching the shared memory of a batch it sent, an OSError or EOFError
    from that transfer (the worker still looks alive for a moment, so PyTorch re-raises it as it is). An error a
    worker raised itself (dataset, collator) is re-raised by PyTorch with its own traceback, never through the
    transfer, so it is not mistaken for a death."""
    if isinstance(exc, RuntimeError) and _DEATH_MESSAGE.search(str(exc)):
        return str(exc).splitlines()[0].strip()
    if isinstance(exc, (OSError, EOFError)):
        frames = traceback.extract_tb(exc.__traceback__)
        if any(Path(f.filename).match("*/torch/multiprocessing/reductions.py") for f in frames):
            return f"{type(exc).__name__} while receiving a batch it had sent: {exc}"
    return None


@contextmanager
def worker_deaths_reported(cfg: Config):
    """A DataLoader worker's death inside becomes a ``DataError`` saying what to lower; any other error passes as
    it is (one raised inside a worker, by the dataset or the collator, keeps its traceback)."""
    try:
        yield
    except (RuntimeError, OSError, EOFError) as exc:
        # first of all: another worker's death must not raise PyTorch's SIGCHLD handler error mid-way
        handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        death = worker_death(exc)
        if death is None:
            signal.signal(signal.SIGCHLD, handler)
            raise
        # the run ends here, the handler left off: the other workers' deaths must not raise its error again on the
        # way out (seen under load, from an exit hook, and while the traceback above was examined)
        raise DataError(
            f"a DataLoader worker died ({death}); killed by the system, most often for memory (check `dmesg` "
            f"for the out-of-memory killer). Lower data.num_workers (now {cfg.data.num_workers}) or "
            "data.prefetch_factor, then resume with resume=auto"
        ) from None


def _loader_kwargs(cfg: Config) -> dict:
    d = cfg.data
    kwargs = {"num_workers": d.num_workers, "pin_memory": d.pin_memory and torch.cuda.is_available()}
    if d.num_workers > 0:
        kwargs.update(
            persistent_workers=d.persistent_workers,
            prefetch_factor=d.prefetch_factor,
            worker_init_fn=ignore_stop_signals,
        )
    return kwargs


def needs_lengths(cfg: Config) -> bool:
    return bool(cfg.data.group_by_length or cfg.data.max_tokens_per_micro_batch)


def train_lengths(dataset: LlavaDataset | MixedDataset, cfg: Config, say=lambda text: None) -> np.ndarray:
    """The exact token length of every training record (``lengths.token_lengths``; a mixture's, source after
    source), counted by ``data.num_workers`` processes."""
    parts = dataset.parts if isinstance(dataset, MixedDataset) else [dataset]
    return np.concatenate(
        [
            token_lengths(p.records, p.encoder, p.image_dir, workers=cfg.data.num_workers, progress=True, say=say)
            for p in parts
        ]
    )


def make_train_loader(
    dataset: LlavaDataset, cfg: Config, *, world_size: int, pad_token_id: int, lengths: np.ndarray | None = None
):
    """Unsharded loader over a deterministic sampler; ``accelerator.prepare`` shards it across processes.

    The DataLoader gets its own generator so creating an iterator never draws from the global torch RNG
    (that draw would shift dropout masks after a resume). ``lengths`` (``train_lengths``) are counted here
    when grouping or token budgets need them and the caller has not.
    """
    t, d = cfg.train, cfg.data
    if isinstance(dataset, StreamDataset):  # its order lives in the stream itself (stream.py)
        return stream_loader(
            dataset, Collator(pad_token_id, d.padding_free), _loader_kwargs(cfg), t.micro_batch_size
        ), None
    if needs_lengths(cfg) and lengths is None:
        lengths = train_lengths(dataset, cfg)
    sampler = EpochSampler(
        len(dataset),
        seed=t.seed,
        lengths=lengths if d.group_by_length else None,
        group_size=t.micro_batch_size * t.grad_accum * world_size,
        mixture=dataset.mixture if isinstance(dataset, MixedDataset) else None,
    )
    generator = torch.Generator().manual_seed(t.seed)
    collate, kwargs = Collator(pad_token_id, d.padding_free), _loader_kwargs(cfg)
    if d.max_tokens_per_micro_batch:
        sampler = TokenBudgetBatches(
            sampler, lengths, d.max_tokens_per_micro_batch, packed=d.padding_free, multiple=t.grad_accum * world_size
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator, **kwargs)
    else:
        loader = DataLoader(
            dataset,
            batch_size=t.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            generator=generator,
            **kwargs,
        )
    return loader, sampler


def make_eval_loader(dataset: LlavaDataset, cfg: Config, *, rank: int, world_size: int, pad_token_id: int):
    """This process's share of the held-out set, in order, each sample exactly once across processes."""
    n = len(dataset) if not cfg.eval.max_samples else min(cfg.eval.max_samples, len(dataset))
    indices = list(range(rank, n, world_size))
    kwargs = _loader_kwargs(cfg)
    kwargs["persistent_workers"] = False
    # its own generator: starting an evaluation must not draw from the global torch RNG, which a checkpoint
    # saved just before it has captured (a resumed run would otherwise see different dropout masks)
    return DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=cfg.eval.micro_batch_size or cfg.train.micro_batch_size,
        collate_fn=Collator(pad_token_id, cfg.data.padding_free),
        generator=torch.Generator().manual_seed(cfg.train.seed),
        **kwargs,
    )
