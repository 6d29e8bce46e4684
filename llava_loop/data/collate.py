"""Pad encoded samples into a batch. Masks come from lengths, never from token values.

The batch also carries its counts as Python ints (supervised tokens, real tokens, padded slots), so the
loop never reads them back from the device.
"""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict:
        events = [event for s in samples for event in s["skipped"]]
        samples = [s for s in samples if s["input_ids"] is not None]  # left-out held-out samples (dataset.py)
        if not samples:
            return {"ids": [], "skipped": events, "n_label_tokens": 0, "n_tokens": 0, "n_slots": 0}
        lengths = [len(s["input_ids"]) for s in samples]
        width = max(lengths)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):  # right padding
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
        attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        # the positions losses.supervised_positions keeps: a label on the next token
        batch["n_label_tokens"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
        batch["n_tokens"], batch["n_slots"] = sum(lengths), len(samples) * width
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        if pixels:  # every sample's images, in row and tag order: the model fills the <image> placeholders in turn
            batch["pixel_values"] = torch.cat(pixels)
        batch["ids"] = [s["id"] for s in samples]
        batch["skipped"] = events
        return batch

