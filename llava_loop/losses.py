"""Loss functions. The loop calls ``loss_fn(model, batch)`` and expects a dict:

* ``"loss"``: the loss **summed** over the batch's supervised tokens (a 0-dim tensor);
* any other entries: named terms, also sums, logged as-is after the same normalisation.

The loop divides every term by the number of supervised tokens in the whole accumulated global batch,
so gradients are exact whatever the micro-batch, accumulation and process layout. Point the config at
your own function to replace the default, with keyword arguments if it takes any:

    loss: package.module:function
    loss: {fn: llava_loop.losses:ce_with_z_loss, kwargs: {z_weight: 1.0e-3}}

A loss that declares a ``state`` parameter also gets the run's live ``TrainState`` (``state.step`` is
the number of optimizer steps completed), so a warm-up or curriculum of a loss term needs no global.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from .data.encode import IGNORE_INDEX
from .importing import bind


def make_loss(call, state):
    """The configured loss as ``loss_fn(model, batch) -> dict``, built once: kwargs bound, and the live
    training ``state`` passed to a loss that declares it."""
    fn = bind(call, "loss")
    if "state" in inspect.signature(fn).parameters:
        return functools.partial(fn, state=state)
    return fn


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)``: a (B, T) mask of positions whose *next* token is supervised, and those tokens."""
    nxt = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = nxt != IGNORE_INDEX
    return keep, nxt[nxt != IGNORE_INDEX]


def model_inputs(batch: dict) -> dict:
    """What the model takes from a batch: a padded batch's attention mask, or a packed one's position ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in batch}


def supervised_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at supervised positions only, and their targets (N,).

    The LM head runs on ~40 caption positions instead of ~600 image and prompt positions: at Qwen2.5's
    151,936-token vocabulary that is most of a stage-1 step's cost and memory.
    """
    keep, targets = supervised_positions(batch["labels"])
    out = model(**model_inputs(batch), logits_to_keep=keep, use_cache=False)
    return out.logits.float(), targets


def label_only_ce(model, batch: dict) -> dict:
    """Default: summed next-token cross-entropy on supervised tokens, LM head on those positions only."""
    logits, targets = supervised_logits(model, batch)
    return {"loss": F.cross_entropy(logits, targets, reduction="sum")}


def full_logits_ce(model, batch: dict) -> dict:
    """The textbook version (full-vocabulary logits at every position); equal to ``label_only_ce``."""
    out = model(**model_inputs(batch), use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return {"loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="sum")}


def ce_with_z_loss(model, batch: dict, z_weight: float = 1e-4) -> dict:
    """Example custom loss: cross-entropy plus PaLM's z-loss (log Z)^2, which keeps logits from drifting."""
    logits, targets = supervised_logits(model, batch)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    z = torch.logsumexp(logits, dim=-1).pow(2).sum()
    return {"loss": ce + z_weight * z, "ce": ce, "z_loss": z}
