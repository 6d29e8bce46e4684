"""The reference model a loss scores against: given to any loss that declares a ``reference`` parameter (the
preference objectives of preference.py; a teacher for distillation would be one too), as an object with
``logps(batch)``: each sequence's log-probability under the reference, without gradients.

``reference.hold`` chooses how it is held:

* ``adapters`` (``auto`` in ``lora`` without a ``reference.path``): the policy itself with its LoRA adapters and
  trained projector switched off, i.e. its starting weights; no copy in memory;
* ``copy`` (``auto`` otherwise): a frozen copy of ``reference.path`` (default ``model.path``: the policy's starting
  weights) in the weights' dtype on each process's device; under ZeRO-3 partitioned by its own DeepSpeed engine;
* ``precompute``: every training pair's log-probabilities computed once before the first step (by that copy, or
  by the policy itself before it has trained when there is no ``reference.path``), the processes splitting the
  pass, and cached under ``$LLAVA_LOOP_CACHE`` keyed on the reference and on the records and every encoder setting
  (as the length cache is): nothing is held during training, and a resumed run reads the same numbers back.

The held references run in eval mode (no dropout, no random draws) and in the training forward's lockstep: every
process calls them for every micro-batch, the same batch the policy saw (text-only batches carry the blank image),
so ZeRO-3's gathers line up on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError
from .preference import sequence_logps


class Frozen:
    """A model scored without gradients, in eval mode, under the policy's autocast: a frozen copy, or the policy
    itself before it has trained."""

    def __init__(self, model, accelerator):
        self.model, self.accelerator = model, accelerator

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast(), evaluating(self.model):
            return sequence_logps(self.model, batch)[0]


class AdaptersOff(Frozen):
    """The LoRA policy with its adapters (and PEFT's trained copies, the projector among them) disabled."""

    def logps(self, batch: dict) -> torch.Tensor:
        with peft_model(self.model).disable_adapter():
            return super().logps(batch)


class Precomputed:
    """Each pair's ``(chosen, rejected)`` reference log-probabilities by record id, computed before training."""

    def __init__(self, table: dict[str, tuple[float, float]]):
        self.table = table

    def logps(self, batch: dict) -> torch.Tensor:
        pairs = [self.table[rid] for rid in batch["ids"]]
        return torch.tensor([c for c, _ in pairs] + [r for _, r in pairs], dtype=torch.float64)


@contextmanager
def evaluating(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def peft_model(model):
    """The PEFT model under Accelerate's and DeepSpeed's wrappers."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model


def make_reference(cfg, accelerator, backend, policy, load, *, data, blank_image, say=print):
    """The reference ``cfg.reference`` describes, for the prepared ``policy``; ``load(path)`` loads a model as the
    run loads its own (dtype, attention); ``data`` (the training set) and ``blank_image`` serve ``precompute``."""

    def pass_over(score):
        return precomputed_table(score, cfg, accelerator, backend, data, blank_image, say)

    r = cfg.reference
    hold = r.hold if r.hold != "auto" else ("adapters" if cfg.canonical_mode == "lora" and not r.path else "copy")
    if hold == "adapters":
        if cfg.canonical_mode != "lora" or r.path:
            raise UserError(
                "reference.hold=adapters needs mode=lora and no reference.path (the reference is then the policy "
                "with its adapters off); use reference.hold=copy or precompute"
            )
        return AdaptersOff(policy, accelerator)
    if hold == "precompute" and not r.path:  # the policy before its first step is its own starting weights
        return Precomputed(pass_over(Frozen(policy, accelerator).logps))
    model = load(r.path or cfg.model.path)
    model.requires_grad_(False)
    model.eval()
    reference = Frozen(backend.place_frozen(model), accelerator)
    if hold == "precompute":
        table = pass_over(reference.logps)
        del reference, model  # nothing of the reference is held while training
        return Precomputed(table)
    return reference


CACHE_VERSION = 1


def cache_key(dataset, cfg, weights_dtype) -> str:
    """What a pair's reference log-probability depends on: the records and every encoder setting (the length cache's
    key), the reference's weight files (by name, size and time), the dtype it runs in."""
    from .data.lengths import cache_key as data_key

    folder = Path(cfg.reference.path or cfg.model.path).resolve()
    weights = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin")
    )
    parts = {
        "version": CACHE_VERSION,
        "data": data_key(dataset.records, dataset.encoder, dataset.image_dir),
        "reference": [str(folder), weights, str(weights_dtype), cfg.train.precision],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def read_table(path: Path) -> dict | None:
    try:
        return {rid: tuple(pair) for rid, pair in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # absent or damaged: computed again


def write_table(path: Path, table: dict) -> None:
    """Written whole, then renamed (as the length cache is); a read-only cache folder costs a recount next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, path)
    except OSError:
        pass


def precomputed_table(score, cfg, accelerator, backend, data, blank_image, say) -> dict:
    """Every training pair's reference ``(chosen, rejected)`` log-probabilities by record id: from the cache, else
    one pass in micro-batches that the processes split (the last ones repeated so every process runs as many
    forwards: ZeRO-3's lockstep), then shared and cached."""
    from accelerate.utils import gather_object, send_to_device

    from .data.collate import Collator
    from .data.dataset import LlavaDataset
    from .data.lengths import cache_dir

    if not isinstance(data, LlavaDataset):
        raise UserError(
            "reference.hold=precompute reads one records source (data.path: a records file, Parquet, a prepared "
            "folder), not shards or a data.mix; use reference.hold=copy"
        )
    ids = [data.record_id(i) for i in range(len(data))]
    if len(set(ids)) < len(ids):
        twice = next(rid for rid, n in Counter(ids).items() if n > 1)
        raise UserError(
            f"reference.hold=precompute keys each pair by its id, and {data.source} has id {twice!r} more than "
            "once; give every record its own id, or use reference.hold=copy"
        )
    path = cache_dir() / "reference_logps" / f"{cache_key(data, cfg, backend.weights_dtype())}.json"
    table = read_table(path)
    if table is not None and set(ids) <= set(table):
        say(f"reference log-probabilities of {len(ids)} pairs: from the cache ({path})")
        return table
    size, processes = cfg.train.micro_batch_size, accelerator.num_processes
    batches = [list(range(i, min(i + size, len(data)))) for i in range(0, len(data), size)]
    mine = batches[accelerator.process_index :: processes]
    mine += [batches[-1]] * (-(-len(batches) // processes) - len(mine))
    collate, found = Collator(blank_image.pad_token_id, cfg.data.padding_free), []
    for indices in mine:
        batch = blank_image.add_where_missing(send_to_device(collate([data[i] for i in indices]), accelerator.device))
        values, pairs = score(batch).double().cpu().tolist(), batch["n_pairs"]
        found += [(rid, (values[k], values[pairs + k])) for k, rid in enumerate(batch["ids"])]
    table = dict(gather_object(found))
    if accelerator.is_main_process:
        write_table(path, table)
    say(f"reference log-probabilities of {len(ids)} pairs: computed, cached at {path}")
    return table
