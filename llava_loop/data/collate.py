"""Collate encoded samples into a batch: padded rows, or one packed row without padding.

Padded (default): right padding, masks built from lengths, never from token values.

Padding-free (``data.padding_free``): the samples are laid end to end in one row, with ``position_ids`` restarting
at 0 for each and no attention mask. Transformers reads the restarts as packed sequences: varlen flash-attention
(``cu_seqlens`` from the positions) under flash_attention_2, sdpa per sample under sdpa_varlen (attention.py), a
block-diagonal causal mask under sdpa/eager. So no
token attends across samples, every sample sees the positions it would see alone, and no slot is spent on padding.

The batch also carries, computed here on the host so that nothing is read back from the device:

* its counts as Python ints (supervised tokens, real tokens, slots, views the vision tower encodes (an image, a
  tiled image's base view and each tile, a video's frames), and the sum of squared sample lengths
  that attention costs), for the loop's loss normalisation and its FLOPs count;
* ``supervised``: a (3, N) tensor of the (row, column, next token) of every position whose next token is
  supervised, which the loss indexes the hidden states with (``losses.supervised_index``);
* packed rows only: ``sample_bounds`` (start offsets plus the row length) and ``cu_seq_lens`` (the same as an int32
  tensor, moved to the device with the batch), which every attention layer reads (``attention.PackedSamples``).
"""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.padding_free = padding_free

    def __call__(self, samples: list[dict]) -> dict:
        events = [event for s in samples for event in s["skipped"]]
        samples = [s for s in samples if s["input_ids"] is not None]  # left-out held-out samples (dataset.py)
        if not samples:
            return {
                "ids": [],
                "sources": [],
                "skipped": events,
                "n_label_tokens": 0,
                "n_samples": 0,
                "n_pairs": 0,
                "n_tokens": 0,
                "n_slots": 0,
                "n_views": 0,
                "n_attention_pairs": 0,
            }
        records = samples
        samples = sequences(samples)  # a preference pair is two sequences: every chosen one, then every rejected one
        batch = self.packed(samples) if self.padding_free else self.padded(samples)
        batch["supervised"] = supervised_index(batch["labels"])
        batch["n_label_tokens"] = batch["supervised"].shape[1]
        batch["supervised_sequence"] = (
            torch.searchsorted(torch.tensor(batch["sample_bounds"][1:]), batch["supervised"][1], right=True)
            if self.padding_free
            else batch["supervised"][0]
        )  # which sequence each supervised position belongs to: a row, or a packed row's sample
        batch["n_pairs"] = len(samples) - len(records)
        lengths = [len(s["input_ids"]) for s in samples]
        batch["n_tokens"] = sum(lengths)
        batch["n_attention_pairs"] = sum(n * n for n in lengths)
        batch["n_slots"] = batch["input_ids"].numel()
        batch.update(merge_image_inputs(samples))
        batch["n_views"] = sum(len(batch[key].flatten(0, -4)) for key in VISUAL_INPUTS if key in batch)
        batch["ids"] = [s["id"] for s in records]
        batch["n_samples"] = len(records)
        batch["sources"] = [s.get("source", 0) for s in records]  # a data.mix source's number (mixture.py)
        batch["skipped"] = events
        return batch

    def padded(self, samples: list[dict]) -> dict:
        lengths = [len(s["input_ids"]) for s in samples]
        width = max(lengths)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):  # right padding
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
        attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def packed(samples: list[dict]) -> dict:
        labels = []
        for sample in samples:
            own = sample["labels"].clone()
            own[0] = IGNORE_INDEX  # never the target of the previous sample's last token
            labels.append(own)
        bounds = [0]
        for sample in samples:
            bounds.append(bounds[-1] + len(sample["input_ids"]))
        return {
            "input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
            "sample_bounds": bounds,
            "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        }


def sequences(samples: list[dict]) -> list[dict]:
    """The sequences a batch's rows hold: each sample's, and for preference pairs (data/preference.py) every
    chosen sequence first, then every rejected one in the same order, each with its pair's images. A batch is all
    pairs or none."""
    pairs = [s for s in samples if "rejected" in s]
    if not pairs:
        return samples
    if len(pairs) != len(samples):
        raise ValueError("a batch mixes preference pairs with other samples; train them in separate runs")
    return samples + [{**s, **s["rejected"]} for s in samples]


IMAGE_INPUTS = ("pixel_values", "image_sizes", "batch_num_images")
VISUAL_INPUTS = ("pixel_values", "pixel_values_videos")  # what the vision tower encodes, view by view
MODEL_INPUTS = (*IMAGE_INPUTS, "pixel_values_videos")


def merge_image_inputs(samples: list[dict]) -> dict:
    """The image inputs of several samples (``SampleEncoder.image_inputs``) as one batch's: every sample's images
    (a tiled model's tiles, sizes and image counts too) concatenated in row and tag order, the order the model
    fills the ``<image>`` placeholders in. None of them when no sample has an image. Videos, one per sample at
    most, stack in row order as ``(videos, frames, 3, side, side)``: transformers' OneVision takes them so, which
    needs one frame count (``data.video_fps`` is refused where a micro-batch could mix two: config.py)."""
    shown = [s for s in samples if s["pixel_values"] is not None]
    merged = {key: torch.cat([s[key] for s in shown]) for key in IMAGE_INPUTS if shown and key in shown[0]}
    videos = [s["pixel_values_videos"] for s in samples if s.get("pixel_values_videos") is not None]
    if videos:
        if len({len(video) for video in videos}) > 1:
            raise ValueError(f"a micro-batch holds videos of {sorted({len(v) for v in videos})} frames; see config.py")
        merged["pixel_values_videos"] = torch.stack(videos)
    return merged


def supervised_index(labels: torch.Tensor) -> torch.Tensor:
    """(3, N): row, column and target of each position whose *next* token carries a label."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return torch.stack([rows, cols, labels[rows, cols + 1]])
