"""Exact token lengths of every training record, for length grouping and token budgets, cached on disk.

A sample's length is what the encoder makes of it: the chat template rendered, the text tokenized, each
``<image>`` expanded to its placeholders (a tiled model's follow the image's size, read from its header), later turns
dropped past ``data.max_length``. A record the
encoder would skip keeps the cheap estimate (clipped to ``max_length``): the dataset replaces it with another
record at load time, whose length no one can know in advance.

Counting 665K records takes minutes of tokenizing, so the result is cached under ``$LLAVA_LOOP_CACHE`` (default
``~/.cache/llava_loop``), keyed by the records' content, the tokenizer and every encoder setting that changes a
length: a changed file, tokenizer or ``max_length`` counts again, a second run with the same ones does not. A
tiled model's key also holds its tiling and the image folder's path, not the images' sizes (reading 665K image
headers at every start is what the cache saves). A cache is never trusted blindly: every model's cached lengths are
checked against ``SPOT_CHECK`` records counted afresh, and counted again whole when one differs (images replaced in
place by others of other sizes, a cache file written by something else); a cache file that does not read as one
length per record (truncated, garbage, pickled: never unpickled) is counted again too, saying so. A few replaced
images among many can pass the check; their micro-batches then miss their token budget by those images'
difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .encode import SampleEncoder
from .skips import SkipSample

VERSION = 3  # bump when the way a length is counted changes (3: special-token text in data is text)
SPOT_CHECK = 64  # records a tiled model's cached lengths are checked against


def cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_LOOP_CACHE") or Path.home() / ".cache" / "llava_loop")


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the fast tokenizer's whole definition
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(records, encoder: SampleEncoder, image_dir) -> str:
    tokenizer = encoder.tokenizer
    settings = {
        "version": VERSION,
        "records": records.fingerprint(),
        "max_length": encoder.max_length,
        "system_prompt": encoder.system_prompt,
        "template": encoder.template,
        "caption_end": encoder.caption_end,
        "image_tokens": encoder.n_image_tokens,
        "tiling": None
        if encoder.tiler is None
        else [encoder.tiler.describe(), encoder.tiler.image_processor.image_grid_pinpoints, str(image_dir)],
        "image_token_id": encoder.image_token_id,
        "video": None if encoder.video is None else video_settings(encoder.video, image_dir),
        "chat_template": tokenizer.chat_template,
        "vocab": _tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def video_settings(video, image_dir) -> list:
    """What a video's length follows: its frame count (under an fps cap, the files' headers in ``image_dir``) and
    the placeholders per frame."""
    sampling = video.sampling
    return [sampling.frames, sampling.fps, video.token_id, video.tokens(1), str(image_dir) if sampling.fps else None]


class _Lengths(torch.utils.data.Dataset):
    """Record ``i``'s length, so a DataLoader's workers can count in parallel."""

    def __init__(self, records, encoder: SampleEncoder, image_dir):
        self.records, self.encoder, self.image_dir = records, encoder, image_dir

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> int:
        try:
            record = self.records[index]
        except SkipSample:  # a malformed table row: skipped in training too
            return 0
        try:
            return len(self.encoder.encode_text(record, self.image_dir)[0])
        except SkipSample:
            return min(record.estimated_tokens(self.encoder.n_image_tokens), self.encoder.max_length)


def _first_stale(lengths: np.ndarray, records, encoder: SampleEncoder, image_dir) -> tuple[int, int] | None:
    """``(index, length now)`` of the first of ``SPOT_CHECK`` seeded records whose length is no longer the cached
    one; None when all agree."""
    if not len(records):
        return None
    count = _Lengths(records, encoder, image_dir)
    picked = np.random.default_rng(0).choice(len(records), min(SPOT_CHECK, len(records)), replace=False)
    now = ((int(i), count[int(i)]) for i in sorted(picked))
    return next(((i, n) for i, n in now if n != lengths[i]), None)


def _read_cache(path: Path, n: int, say) -> np.ndarray | None:
    """The cached lengths at ``path``, or None (saying why) when the file is not ``n`` integer lengths: truncated,
    garbage or pickled (never unpickled), or of another record count. A cache is never worth a dead run."""
    try:
        lengths = np.load(path, allow_pickle=False)
        ok = isinstance(lengths, np.ndarray) and lengths.shape == (n,) and lengths.dtype.kind in "iu"
        why = (
            "" if ok else f"it holds {getattr(lengths, 'shape', '?')} {getattr(lengths, 'dtype', '?')}, not {n} lengths"
        )
    except (ValueError, OSError, EOFError) as exc:
        lengths, why = None, f"{type(exc).__name__}: {exc}"[:200]
    if why:
        say(f"token lengths: the cache ({path}) is unreadable ({why}): counting again")
        return None
    return lengths


def count_lengths(records, encoder: SampleEncoder, image_dir=None, *, workers: int = 0, progress: bool = False):
    # its own generator: an iterator without one draws its seed from the global torch RNG, and a run that counts
    # would then draw different dropout masks from one that read the cache (a resumed run)
    loader = torch.utils.data.DataLoader(
        _Lengths(records, encoder, image_dir),
        batch_size=1024,
        num_workers=workers,
        collate_fn=list,
        generator=torch.Generator().manual_seed(0),
    )
    batches = loader
    if progress:
        from rich.progress import track

        batches = track(loader, total=len(loader), description=f"counting the tokens of {len(records)} records")
    return np.array([n for batch in batches for n in batch], dtype=np.int64)


def token_lengths(
    records,
    encoder: SampleEncoder,
    image_dir=None,
    *,
    workers: int = 0,
    progress: bool = False,
    say=lambda text: None,
) -> np.ndarray:
    """Every record's exact length, from the cache when it holds this (records, tokenizer, settings) key.
    ``image_dir``: where the records' images are, which a tiled model's lengths read the sizes of."""
    path = cache_dir() / "token_lengths" / f"{cache_key(records, encoder, image_dir)}.npy"
    lengths = _read_cache(path, len(records), say) if path.is_file() else None
    if lengths is not None:
        stale = _first_stale(lengths, records, encoder, image_dir)
        if stale is None:
            say(f"token lengths of {len(records)} records: from the cache ({path})")
            return lengths
        index, now = stale
        say(
            f"token lengths: the cache ({path}) says {lengths[index]} tokens for record {index}, which now "
            f"makes {now} (its images replaced, or the file written by something else?): counting again"
        )
    lengths = count_lengths(records, encoder, image_dir, workers=workers, progress=progress)
    try:  # written whole, then renamed: a run killed mid-write leaves no half file for the next one
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, lengths)
        os.replace(tmp.name, path)
        say(f"token lengths of {len(records)} records: counted, cached at {path}")
    except OSError as exc:  # a read-only home is no reason to stop a run
        say(f"token lengths of {len(records)} records: counted (not cached: {exc}; set LLAVA_LOOP_CACHE)")
    return lengths
