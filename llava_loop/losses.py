"""Loss functions. The loop calls ``loss_fn(model, batch)`` and expects a dict:

* ``"loss"``: the loss **summed** over the batch's units (a 0-dim tensor);
* any other entries: named terms, also sums, logged as-is after the same normalisation.

A loss's unit is what its sums are summed over, declared as its ``unit`` attribute: ``"tokens"`` (the default:
supervised tokens), ``"samples"``, ``"pairs"`` (preference pairs), or a function of a batch that counts its own
units on the host. The loop counts the units of the whole accumulated global batch before the forward (one
all-reduce per step) and divides every term by it, so gradients are exact whatever the micro-batch, accumulation
and process layout. Point the config at your own function to replace the default, with keyword arguments if it
takes any:

    loss: package.module:function
    loss: {fn: llava_loop.losses:ce_with_z_loss, kwargs: {z_weight: 1.0e-3}}
    loss: {fn: llava_loop.losses:label_only_ce, kwargs: {chunk_rows: 512}}

A loss that declares a ``state`` parameter also gets the run's live ``TrainState`` (``state.step`` is
the number of optimizer steps completed), so a warm-up or curriculum of a loss term needs no global.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import packed_kwargs
from .data.collate import MODEL_INPUTS
from .data.collate import supervised_index as supervised_from_labels
from .data.encode import IGNORE_INDEX
from .errors import UserError
from .importing import bind, resolve
from .parts import base_llava

CHUNK_ROWS = 512  # supervised rows whose (rows x vocabulary) logits exist at once in the default loss


def make_loss(call, state):
    """The configured loss as ``loss_fn(model, batch) -> dict``, built once: kwargs bound, and the live
    training ``state`` passed to a loss that declares it."""
    fn = bind(call, "loss")
    if "state" in inspect.signature(fn).parameters:
        return functools.partial(fn, state=state)
    return fn


def wants_reference(call) -> bool:
    """Whether the configured loss takes the run's reference model (reference.py)."""
    return "reference" in inspect.signature(resolve(call.fn, "loss")).parameters


UNITS = {  # a batch's count of each unit a loss may be normalised by (data/collate.py counts them)
    "tokens": lambda batch: batch["n_label_tokens"],
    "samples": lambda batch: batch["n_samples"],
    "pairs": lambda batch: batch.get("n_pairs", 0),
}


def unit_count(call):
    """``count(batch) -> int``: the units the configured loss sums over (its ``unit`` attribute)."""
    target = resolve(call.fn, "loss")
    unit = getattr(target, "unit", "tokens")
    if callable(unit):
        return unit
    if unit not in UNITS:
        raise UserError(f"loss {call.fn}: unit {unit!r} is none of {', '.join(UNITS)} (or a function of a batch)")
    return UNITS[unit]


def supervised_index(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, targets)`` of the positions whose next token is supervised. The collator computes them on
    the host (``data/collate.py``), so indexing with them needs no device-to-host read; a batch made elsewhere
    gets them from its labels (a boolean mask, which costs a read on a GPU)."""
    return (batch["supervised"] if "supervised" in batch else supervised_from_labels(batch["labels"])).unbind(0)


def model_inputs(batch: dict) -> dict:
    """What the model takes from a batch: a padded batch's attention mask, or a packed one's position ids (and its
    sample boundaries, computed once by the collator for every attention layer: attention.py)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", *MODEL_INPUTS) if k in batch}
    return {**inputs, **packed_kwargs(batch)}


def unwrapped(model):
    """The model under Accelerate's and DeepSpeed's wrappers (a PEFT model stays one: it finds the head)."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def head_bypassed(model):
    """While inside, the model's LM head is an identity: its ``logits`` are its final hidden states. The head is
    swapped out, not called: under ZeRO-3 even a skipped call would gather the head's weight for nothing."""
    llava = base_llava(unwrapped(model))
    head = llava.get_output_embeddings()
    name = next(name for name, child in llava.named_children() if child is head)
    setattr(llava, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(llava, name, head)


def supervised_hidden(model, batch: dict):
    """``(head, hidden (N, H), targets (N,))``: the final hidden states at supervised positions only, and the LM
    head to apply to them. The forward passes the model's own wrappers (autocast, DeepSpeed), as a plain call."""
    rows, cols, targets = supervised_index(batch)
    with head_bypassed(model) as head:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    return head, hidden[rows, cols], targets


def supervised_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at supervised positions only, and their targets (N,).

    The LM head runs on ~40 caption positions instead of ~600 image and prompt positions: at Qwen2.5's
    151,936-token vocabulary that is most of a stage-1 step's cost and memory.
    """
    head, hidden, targets = supervised_hidden(model, batch)
    return head(hidden).float(), targets


def _chunk_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_ce(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` with at most ``chunk_rows`` rows of logits alive at once. Each
    chunk keeps only its hidden rows for backward and recomputes its logits there (one more LM-head forward), so
    thousands of stage-2 answer tokens x a 151,936-row vocabulary never sit in memory together with their
    gradient. One chunk (stage 1's few caption tokens) is computed as is, with nothing recomputed."""
    if hidden.shape[0] <= chunk_rows or not torch.is_grad_enabled():  # no row: the head still joins the graph
        return sum(_chunk_ce(head, h, t) for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows)))
    return sum(
        checkpoint(_chunk_ce, head, h, t, use_reentrant=False, preserve_rng_state=False)
        for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows))
    )


def label_only_ce(model, batch: dict, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Default: summed next-token cross-entropy on supervised tokens, the LM head on those positions only, in
    chunks of ``chunk_rows`` rows (``chunked_ce``)."""
    head, hidden, targets = supervised_hidden(model, batch)
    return {"loss": chunked_ce(head, hidden, targets, chunk_rows)}


def full_logits_ce(model, batch: dict) -> dict:
    """The textbook version (full-vocabulary logits at every position); equal to ``label_only_ce``."""
    out = model(**model_inputs(batch), use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return {
        "loss": F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    }


def ce_with_z_loss(model, batch: dict, z_weight: float = 1e-4) -> dict:
    """Example custom loss: cross-entropy plus PaLM's z-loss (log Z)^2, which keeps logits from drifting."""
    logits, targets = supervised_logits(model, batch)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    z = torch.logsumexp(logits, dim=-1).pow(2).sum()
    return {"loss": ce + z_weight * z, "ce": ce, "z_loss": z}
