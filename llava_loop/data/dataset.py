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

    def __init__(self, records: Records, encoder: SampleEncoder, image_dir: str | Path, *, seed: int = 0,
                 substitute: bool = True):
        self.records = records
        self.encoder = encoder
        self.image_dir = Path(image_dir)
        self.seed = seed
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not self.substitute:
            record = self.records[index]
            try:
                return {**self.encoder(record, self.image_dir), "skipped": []}
            except SkipSample as skip:
                return {"id": record.id, "input_ids": None, "skipped": [(record.id, skip.reason, skip.detail)]}
        skipped, tried = [], set()
        current = index
        for attempt in range(MAX_ATTEMPTS):
            if current not in tried:  # a record that failed once in this call is not tried (or counted) again
                tried.add(current)
                record = self.records[current]
                try:
                    sample = self.encoder(record, self.image_dir)
                except SkipSample as skip:
                    skipped.append((record.id, skip.reason, skip.detail))
                else:
                    sample["skipped"] = skipped
                    return sample
            current = replacement_index(index, attempt, len(self.records), self.seed)
        reasons = "; ".join(f"{rid}: {reason} ({detail})" for rid, reason, detail in skipped[-3:])
        raise DataError(
            f"{MAX_ATTEMPTS} records in a row from {self.records.source} could not be used (last: {reasons}); "
            f"check data.image_dir={self.image_dir} and run `llava-loop data check`"
        )
