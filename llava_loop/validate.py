"""The held-out loss while training: every process through its share of the held-out set, in lockstep, reduced to
one number. (Generated answers and their scores, after training, are ``evaluate.py``'s.)"""

from __future__ import annotations

from collections import Counter

import torch
from accelerate.utils import gather_object

from .config import Config
from .data.blank_image import BlankImage
from .data.dataset import LlavaDataset
from .data.encode import IGNORE_INDEX
from .loaders import make_eval_loader
from .losses import UNITS, label_only_ce


@torch.no_grad()
def heldout_loss_sums(model, loader, loss_fn=label_only_ce, device=None, units=UNITS["tokens"]):
    """(summed loss, its units: supervised tokens by default, left-out samples' skip events) over a held-out
    loader; the caller divides (after reducing across processes). The loss is summed on the device and read
    once."""
    loss_sum, tokens, left_out = torch.zeros((), dtype=torch.float64, device=device), 0, []
    for batch in loader:
        left_out += batch["skipped"]
        if not batch["ids"]:  # every sample of this batch was left out
            continue
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss_sum += loss_fn(model, batch)["loss"].detach().double()
        tokens += units(batch)
    return float(loss_sum), tokens, left_out


class Validator:
    """The held-out loss of ``eval_set`` under the training loss, on every process, each over its share."""

    def __init__(
        self, cfg: Config, accelerator, eval_set: LlavaDataset, loss_fn, blank_image: BlankImage, *, warn, units
    ):
        self.cfg, self.accelerator, self.eval_set = cfg, accelerator, eval_set
        self.loss_fn, self.blank_image, self.warn, self.units = loss_fn, blank_image, warn, units
        self.loader = make_eval_loader(
            eval_set,
            cfg,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pad_token_id=blank_image.pad_token_id,
        )

    def validate(self, model, step: int) -> dict:
        """``{step, eval_loss, eval_tokens, eval_left_out}``, the same on every process."""
        acc = self.accelerator
        model.eval()
        loss_sum, tokens, left_out = heldout_loss_sums(
            model, self.lockstep(), self.loss_fn, device=acc.device, units=self.units
        )
        model.train()
        total = acc.reduce(
            torch.tensor([loss_sum, tokens, len(left_out)], dtype=torch.float64, device=acc.device), reduction="sum"
        ).tolist()
        metrics = {
            "step": step,
            "eval_loss": total[0] / max(total[1], 1),
            "eval_tokens": int(total[1]),
            "eval_left_out": int(total[2]),
        }
        if metrics["eval_left_out"]:
            self.report_left_out(left_out, metrics["eval_left_out"])
        return metrics

    def lockstep(self):
        """Held-out batches such that every process runs the same number of forwards, each through the vision
        path: under ZeRO-3 each forward gathers weight shards from all ranks, so a rank with one batch fewer
        (an uneven split), an all-left-out batch or a text-only batch would leave the others waiting. The
        stand-ins are one padding token plus the blank image, with no labels: they add nothing to the loss."""
        pad = self.blank_image.pad_token_id
        idle = {
            "input_ids": torch.tensor([[pad]]),
            "labels": torch.tensor([[IGNORE_INDEX]]),
            "ids": ["(idle)"],
            "n_label_tokens": 0,
            "n_samples": 0,
            "skipped": [],
        }
        idle.update(
            {
                "position_ids": torch.tensor([[0]]),
                "sample_bounds": [0, 1],
                "cu_seq_lens": torch.tensor([0, 1], dtype=torch.int32),
            }
            if self.cfg.data.padding_free
            else {"attention_mask": torch.tensor([[1]])}
        )
        longest = int(self.accelerator.reduce(torch.tensor(len(self.loader), device=self.accelerator.device), "max"))
        batches = iter(self.loader)
        for _ in range(longest):
            batch = next(batches, None)
            if batch is None or not batch["ids"]:
                batch = {**idle, "skipped": batch["skipped"] if batch else []}
            yield self.blank_image.add_where_missing(batch)

    def report_left_out(self, local_events: list, count: int) -> None:
        """Held-out samples are never replaced: say which were left out, why, and which setting to check."""
        events = gather_object(local_events)
        reasons = ", ".join(f"{reason} x{n}" for reason, n in Counter(e[1] for e in events).most_common())
        d = self.cfg.data
        setting = (
            f"data.eval_image_dir={self.eval_set.image_dir}"
            if d.eval_path
            else f"data.image_dir={self.eval_set.image_dir}"
        )
        self.warn(
            f"held-out loss: {count} of {len(self.eval_set)} samples left out ({reasons}; e.g. "
            f"{events[0][0]}: {events[0][2]}); check {setting} and run `llava-loop data check`"
        )
