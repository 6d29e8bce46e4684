"""A map-style dataset that never returns a bad sample: it replaces it, deterministically, and says why."""

from __future__ import annotations

import random
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import UserError
from .encode import SampleEncoder
from .records import Records
from .skips import SkipSample

MAX_ATTEMPTS = 32


class DataError(UserError):
    """Many records in a row failed: almost always a wrong image_dir or a broken dataset."""


def replacement_index(index: int, attempt: int, size: int, seed: int) -> int:
    """Where to look after ``attempt`` failures at ``index``: any record but ``index`` itself, fixed by
    (seed, index, attempt) alone, so every process, worker and resumed run makes the same choice."""
    if size < 2:
        return index
    return (index + 1 + random.Random(f"{seed}:{index}:{attempt}").randrange(size - 1)) % size


class LlavaDataset(Dataset):
    """Training sets replace a bad sample (``substitute``); held-out sets never do: a bad sample comes back as
    a left-out marker (``input_ids`` None, the reason in ``skipped``) that the collator drops and counts, so an
    evaluation scores exactly the samples it says it scored."""

    def __init__(
        self, records: Records, encoder: SampleEncoder, image_dir: str | Path, *, seed: int = 0, substitute: bool = True
    ):
        self.records = records
        self.encoder = encoder
        self.image_dir = Path(image_dir)
        self.seed = seed
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.records)

    @property
    def holds_video(self) -> bool:
        """Whether the records may hold a video (every process gets the same answer: its source's)."""
        return getattr(self.records, "holds_video", False)

    @property
    def holds_video_files(self) -> bool:
        """Whether they may hold a video file, which PyAV decodes."""
        return getattr(self.records, "holds_video_files", False)

    @property
    def source(self) -> str:
        return self.records.source

    def encode(self, index: int) -> dict:
        """Record ``index`` as a sample; a table row that is itself broken raises SkipSample like a bad image."""
        return self.encoder(self.records[index], self.image_dir)

    def record_id(self, index: int) -> str:
        try:
            return self.records[index].id
        except SkipSample:  # a malformed row has no id to trust
            return f"row {index}"

    def __getitem__(self, index: int) -> dict:
        if not self.substitute:
            try:
                return {**self.encode(index), "skipped": []}
            except SkipSample as skip:
                rid = self.record_id(index)
                return {"id": rid, "input_ids": None, "skipped": [(rid, skip.reason, skip.detail)]}
        skipped, tried = [], set()
        current = index
        for attempt in range(MAX_ATTEMPTS):
            if current not in tried:  # a record that failed once in this call is not tried (or counted) again
                tried.add(current)
                try:
                    sample = self.encode(current)
                except SkipSample as skip:
                    skipped.append((self.record_id(current), skip.reason, skip.detail))
                else:
                    sample["skipped"] = skipped
                    return sample
            current = replacement_index(index, attempt, len(self.records), self.seed)
        reasons = "; ".join(f"{rid}: {reason} ({detail})" for rid, reason, detail in skipped[-3:])
        raise DataError(
            f"{MAX_ATTEMPTS} records in a row from {self.records.source} could not be used (last: {reasons}); "
            f"check data.image_dir={self.image_dir} and run `llava-loop data check`"
        )
