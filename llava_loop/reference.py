"""The reference model a loss scores against: given to any loss that declares a ``reference`` parameter (the
preference objectives of preference.py; a teacher for distillation would be one too), as an object with
``logps(batch)``: each sequence's log-probability under the reference, without gradients.

``reference.hold`` chooses how it is held:

* ``adapters`` (``auto`` in ``lora`` without a ``reference.path``): the policy itself with its LoRA adapters and
  trained projector switched off, i.e. its starting weights; no copy in memory;
* ``copy`` (``auto`` otherwise): a frozen copy of ``reference.path`` (default ``model.path``: the policy's starting
  weights) in the weights' dtype on each process's device; under ZeRO-3 partitioned by its own DeepSpeed engine.

Either runs in the training forward's lockstep: every process calls it for every micro-batch, the same batch the
policy saw (text-only batches carry the blank image), so ZeRO-3's gathers line up on every rank.
"""

from __future__ import annotations

import copy

import torch

from .errors import UserError
from .preference import sequence_logps


class AdaptersOff:
    """The LoRA policy with its adapters (and PEFT's trained copies, the projector among them) disabled."""

    def __init__(self, model, accelerator):
        self.model, self.accelerator = model, accelerator

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), peft_model(self.model).disable_adapter():
            return sequence_logps(self.model, batch)[0]


class FrozenCopy:
    """A second model, frozen, its forward under the policy's autocast."""

    def __init__(self, model, accelerator):
        self.model, self.accelerator = model, accelerator

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            return sequence_logps(self.model, batch)[0]


def peft_model(model):
    """The PEFT model under Accelerate's and DeepSpeed's wrappers."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model


def make_reference(cfg, accelerator, backend, policy, load):
    """The reference ``cfg.reference`` describes, for the prepared ``policy``; ``load(path)`` loads a model as the
    run loads its own (dtype, attention)."""
    r = cfg.reference
    hold = r.hold if r.hold != "auto" else ("adapters" if cfg.canonical_mode == "lora" and not r.path else "copy")
    if hold == "adapters":
        if cfg.canonical_mode != "lora" or r.path:
            raise UserError(
                "reference.hold=adapters needs mode=lora and no reference.path (the reference is then the policy "
                "with its adapters off); use reference.hold=copy"
            )
        return AdaptersOff(policy, accelerator)
    model = load(r.path or cfg.model.path)
    model.requires_grad_(False)
    model.eval()
    if backend.name == "deepspeed" and backend.stage == 3:
        model = zero3_inference_engine(model, backend)
    else:
        model = model.to(accelerator.device)
    return FrozenCopy(model, accelerator)


def zero3_inference_engine(model, backend):
    """The frozen copy partitioned as the policy is (its own engine, no optimizer): each rank holds its shard and
    gathers layer by layer in the forward, in lockstep with the others."""
    import deepspeed

    config = copy.deepcopy(backend.config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
