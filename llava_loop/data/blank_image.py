"""A blank image (and a blank video) for collated micro-batches that have none, so every process runs the vision
path on every one."""

from __future__ import annotations

import torch
from PIL import Image

from .encode import IGNORE_INDEX, SampleEncoder


class BlankImage:
    """Every process must produce the same gradients in the same order: ZeRO-2 packs them into its reduce buckets
    in the order backward makes them, so a rank that skips the vision tower and projector (a micro-batch without
    images) misaligns every bucket, silently; under ZeRO-3 a rank that skips them leaves the others waiting for
    its weight shards. Such a micro-batch gets one blank image, as LLaVA does: its placeholders go after row 0's
    last column with attention mask 0 and no labels, so causal attention hides them from every real token, the
    loss is unchanged, and their gradient is exactly zero. In a packed row they are one more sample, with positions
    of their own, which no real token attends to.

    OneVision runs its tower a second time for a batch's videos, so in a run whose data holds videos (``video``)
    a micro-batch without one gets a blank one-frame video the same way, and every rank runs both passes."""

    def __init__(self, encoder: SampleEncoder, device, *, video: bool = False):
        blank = Image.new("RGB", (8, 8))
        (tokens,) = encoder.placeholder_counts([(blank.height, blank.width)])
        # the processor resizes (or tiles) the blank to the tower's input size; made once, kept on the device
        self.blocks = [("pixel_values", encoder.image_token_id, tokens, encoder.image_inputs([blank]))]
        if video:
            frames = {"pixel_values_videos": encoder.video.pixels([blank])[None]}
            self.blocks.append(("pixel_values_videos", encoder.video.token_id, encoder.video.tokens(1), frames))
        self.blocks = [
            (key, token, n, {k: v.to(device) for k, v in inputs.items()}) for key, token, n, inputs in self.blocks
        ]
        self.pad_token_id = encoder.tokenizer.pad_token_id

    def add_where_missing(self, batch: dict) -> dict:
        """``batch`` as it is if it shows an image (and a video, where the run has them), else with the blanks
        added."""
        for key, token_id, n, inputs in self.blocks:
            if key not in batch:
                batch = self.appended(batch, token_id, n, inputs)
        return batch

    def appended(self, batch: dict, token_id: int, n: int, inputs: dict) -> dict:
        ids, labels = batch["input_ids"], batch["labels"]
        if "position_ids" in batch:
            positions, bounds = batch["position_ids"], [*batch["sample_bounds"], batch["sample_bounds"][-1] + n]
            return {
                **batch,
                "input_ids": torch.cat([ids, ids.new_full((1, n), token_id)], 1),
                "position_ids": torch.cat([positions, torch.arange(n, device=ids.device)[None]], 1),
                "labels": torch.cat([labels, labels.new_full((1, n), IGNORE_INDEX)], 1),
                **inputs,
                "sample_bounds": bounds,
                "cu_seq_lens": torch.cat([batch["cu_seq_lens"], batch["cu_seq_lens"].new_tensor([bounds[-1]])]),
            }
        mask = batch["attention_mask"]
        extra_ids = ids.new_full((ids.shape[0], n), self.pad_token_id)
        extra_ids[0] = token_id
        return {
            **batch,
            "input_ids": torch.cat([ids, extra_ids], 1),
            "attention_mask": torch.cat([mask, mask.new_zeros(extra_ids.shape)], 1),
            "labels": torch.cat([labels, labels.new_full(extra_ids.shape, IGNORE_INDEX)], 1),
            **inputs,
        }
