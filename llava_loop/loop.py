"""The training loop: Accelerate (+ DeepSpeed ZeRO-2) with exact accumulation, hooks and safe stops.

Read ``Trainer.fit`` and ``Trainer.train_step`` top to bottom; everything else is a named helper.

Loss normalisation: the loss function returns sums over supervised tokens; each step divides by the
supervised-token count of the whole accumulated global batch (all micro-batches, all processes), so
1x4x1, 1x2x2 and 2x1x2 layouts produce the same gradients. Accelerate (and DeepSpeed) divide by the
accumulation steps and average over processes; ``scale`` undoes both.
"""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import send_to_device, set_seed

from .backends import backend_for
from .checkpoint.checkpointer import Checkpointer
from .config import Config, mix_names
from .console import Console
from .data.sampler import TokenBudgetBatches
from .data.skips import SkipTally
from .data.stream import StreamDataset, StreamPosition
from .errors import UserError, size_text
from .flops import FlopsModel, device_peak_tflops
from .hooks import make_hooks
from .importing import bind
from .kernels import apply_liger, compile_decoder_layers
from .loaders import (
    blank_inputs,
    make_datasets,
    make_train_loader,
    needs_lengths,
    split_records,
    train_lengths,
    worker_deaths_reported,
)
from .losses import make_loss, unit_count, wants_reference
from .modes import apply_mode, group_lr, param_groups, trainable_table
from .ranks import on_main
from .reference import make_reference
from .runlock import RunLock
from .runtime import load_model, make_accelerator, require_shared_dir
from .template import THINK_BLOCK_NOTE, earlier_answers_lose_the_think_block
from .validate import Validator


class LogWriteError(UserError):
    """A log of the run (metrics.jsonl) could not be written; the run stopped after saving."""


class NonFiniteError(UserError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs (a stateful part of every checkpoint)."""

    step: int = 0  # optimizer steps taken (windows consumed), including skipped ones
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def record_step(self, *, samples: int, tokens: int, stepped: bool) -> None:
        """One optimizer step taken (or skipped: non-finite), with what it consumed."""
        self.step += 1
        self.step_in_epoch += 1
        self.samples_seen += samples
        self.tokens_seen += tokens
        self.skipped_steps += not stepped
        self.consecutive_skips = 0 if stepped else self.consecutive_skips + 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def due(self, every: int) -> bool:
        """True on every ``every``-th step (never when ``every`` is 0): evaluations and checkpoints."""
        return every > 0 and self.step % every == 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """In place: the loss and hooks hold this object."""
        for key, value in asdict(TrainState(**state)).items():
            setattr(self, key, value)


def warmup_cosine(optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_setup(cfg: Config) -> None:
    """The config's ``setup:`` functions, in order (the demo's fixture builder is one)."""
    for call in cfg.setup:
        bind(call, "setup")(cfg)


class Trainer:
    """``__init__`` assembles a run from named steps, each returning what it makes; ``fit`` runs the loop.
    ``checkpointer_cls``: the Checkpointer (sub)class to build (a subclass may replace one of its steps)."""

    def __init__(self, cfg: Config, *, checkpointer_cls=Checkpointer):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = make_accelerator(cfg)
        self.backend = backend_for(self.accelerator)
        self.backend.configure(cfg)
        self.console = Console(enabled=self.accelerator.is_main_process)
        set_seed(cfg.train.seed)  # python, numpy and torch
        self.state = TrainState()
        self.skips = SkipTally()
        self.loss_fn = make_loss(cfg.loss, self.state)  # config callables resolve before anything slow
        self.loss_units = unit_count(cfg.loss)  # what the loss's sums are divided by (losses.py)
        self.hooks = make_hooks(cfg)
        self.stop_requested = False  # set by signals, the time limit or hooks (request_stop) on any process
        self.log_failure: str | None = None  # why a log could not be written: the run stops, then fails with it
        self.stopped = False  # all processes agreed to stop early
        self.started = self.last_step_end = time.monotonic()  # reset when fit starts

        self.lock = RunLock(self.output_dir, warn=self.console.warn)  # one run per output_dir
        self.run_id = on_main(self.accelerator, self.lock.acquire)
        atexit.register(self.lock.release)
        self.prepare_output_dir()
        records = split_records(cfg)  # before the model: a broken data file fails in seconds, naming the record

        model, self.processor = self.build_model()
        self.flops = FlopsModel.from_model(model, cfg.canonical_mode)
        self.peak_tflops = cfg.train.peak_tflops or device_peak_tflops(self.accelerator)

        self.train_set, self.eval_set = make_datasets(
            cfg, self.processor, records, rank=self.accelerator.process_index, processes=self.accelerator.num_processes
        )
        if cfg.data.template == "chat" and earlier_answers_lose_the_think_block(self.processor.tokenizer):
            self.console.warn(THINK_BLOCK_NOTE)
        self.stream = self.train_set.layout if isinstance(self.train_set, StreamDataset) else None
        loader, self.sampler = self.build_train_loader()
        self.blank_image = blank_inputs(self.train_set, self.eval_set, self.accelerator.device)
        self.validator = self.build_validator()

        optimizer = self.build_optimizer(model)
        self.model, self.optimizer, self.loader = self.prepare(model, optimizer, loader)
        if wants_reference(cfg.loss):  # after prepare: adapters-off references are the prepared policy itself
            self.reference = make_reference(
                cfg,
                self.accelerator,
                self.backend,
                self.model,
                load=self.load_reference,
                data=self.train_set,
                blank_image=self.blank_image,
                say=self.console.say,
            )
            self.loss_fn = functools.partial(self.loss_fn, reference=self.reference)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.steps_per_epoch = self.steps_in_epoch(0)  # of the current epoch: token budgets vary it
        self.total_steps = self.count_total_steps()
        self.scheduler = warmup_cosine(optimizer, self.total_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
        self.describe_batch()

        self.checkpointer = self.build_checkpointer(checkpointer_cls)
        self.resume()

    # ------------------------------------------------------------------------------------------
    # Construction steps
    # ------------------------------------------------------------------------------------------

    def prepare_output_dir(self) -> None:
        """Setup functions and the output folder, on the main process before the others read anything; then
        every process proves it sees that same folder."""

        def setup_and_mkdir():
            run_setup(self.cfg)
            self.output_dir.mkdir(parents=True, exist_ok=True)

        on_main(self.accelerator, setup_and_mkdir)  # the others wait, and fail too if it fails
        require_shared_dir(self.accelerator, self.output_dir)
        self.console.say(f"[bold]config[/bold]\n{self.cfg.to_yaml()}")

    def build_model(self):
        """The model in its training mode (modes.py), kernels fused, and its processor."""
        cfg = self.cfg
        model, processor = load_model(
            cfg.model.path,
            attn_implementation=cfg.model.attn_implementation,
            dtype=self.backend.weights_dtype(),
            packed=cfg.data.padding_free,
        )
        set_seed(cfg.train.seed)  # LoRA's initial weights must not depend on how loading drew (ZeRO-3 init draws)
        model = apply_mode(model, cfg.canonical_mode, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
        model.train()  # from_pretrained returns eval mode: dropout would silently stay off
        self.fuse_kernels(model)
        self.console.table("parameters", ("part", "trainable", "total", "%"), trainable_table(model))
        return model, processor

    def load_reference(self, path: str):
        """A reference model loaded as the policy is (dtype, attention kernel), without its training mode."""
        cfg = self.cfg
        model, _ = load_model(
            path,
            attn_implementation=cfg.model.attn_implementation,
            dtype=self.backend.weights_dtype(),
            packed=cfg.data.padding_free,
        )
        self.fuse_kernels(model)
        return model

    def fuse_kernels(self, model) -> None:
        """Liger's kernels and regional compilation (kernels.py), as ``train.liger`` and ``train.compile`` say."""
        t = self.cfg.train
        if apply_liger(model, t.liger):
            self.console.say("Liger kernels: the LLM's RMSNorm, SwiGLU and RoPE")
        if t.compile:
            refusal = self.backend.compile_refusal()
            if refusal:
                raise UserError(
                    f"train.compile: not under {self.backend.describe()}: {refusal}; use "
                    "accelerate_config.yaml (ZeRO-2) or train.compile=false"
                )
            self.console.say(f"compiled {compile_decoder_layers(model)} decoder layers (torch.compile, per layer)")

    def build_train_loader(self):
        """The (not yet prepared) training loader and its sampler; exact token lengths first where batching needs
        them, counted once by the main process for all."""
        cfg, acc = self.cfg, self.accelerator
        lengths = None
        if self.stream is None and needs_lengths(cfg):
            lengths = on_main(acc, lambda: train_lengths(self.train_set, cfg, say=self.console.say))
        return make_train_loader(
            self.train_set,
            cfg,
            world_size=acc.num_processes,
            pad_token_id=self.processor.tokenizer.pad_token_id,
            lengths=lengths,
        )

    def build_validator(self) -> Validator | None:
        """The held-out loss (validate.py), when there is a held-out split."""
        if self.eval_set is None:
            return None
        return Validator(
            self.cfg,
            self.accelerator,
            self.eval_set,
            self.loss_fn,
            self.blank_image,
            warn=self.console.warn,
            units=self.loss_units,
        )

    def build_optimizer(self, model):
        """AdamW (the backend's) over the trainable groups (modes.py), each at its learning rate."""
        t = self.cfg.train
        return self.backend.make_optimizer(
            model,
            param_groups(model, lr=t.lr, projector_lr=t.projector_lr, weight_decay=t.weight_decay),
            lr=t.lr,
            betas=(t.adam_beta1, t.adam_beta2),
            eps=t.adam_eps,
        )

    def prepare(self, model, optimizer, loader) -> tuple:
        """Model, optimizer and loader as Accelerate prepares them (a stream's loader stays as it is: prepared,
        every process would read every shard and keep its slice)."""
        if self.stream is None:
            return self.accelerator.prepare(model, optimizer, loader)
        return (*self.accelerator.prepare(model, optimizer), loader)

    def count_total_steps(self) -> int:
        """``train.max_steps``, or the steps in ``train.epochs`` (a fraction of one counts its part)."""
        t = self.cfg.train
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{len(self.train_set)} training samples cannot fill one optimizer step of "
                f"{self.global_batch} samples; lower train.micro_batch_size or train.grad_accum"
                + (
                    " (a stream first cuts them into equal slices per process and DataLoader worker: or lower "
                    "data.num_workers)"
                    if self.stream
                    else ""
                )
            )
        whole, part = int(t.epochs), t.epochs - int(t.epochs)
        return t.max_steps or (
            sum(self.steps_in_epoch(e) for e in range(whole))
            + (math.ceil(part * self.steps_in_epoch(whole)) if part else 0)
        )

    def describe_batch(self) -> None:
        t, acc = self.cfg.train, self.accelerator
        budget = self.cfg.data.max_tokens_per_micro_batch
        batch = (
            f"micro-batches of up to {budget} tokens x accumulation {t.grad_accum} x processes {acc.num_processes}"
            if budget
            else f"micro-batch {t.micro_batch_size} x accumulation {t.grad_accum} x processes "
            f"{acc.num_processes} = {self.global_batch} samples/step"
        )
        self.console.say(
            f"effective batch: {batch}; {self.steps_per_epoch} steps/epoch; {self.total_steps} steps; "
            f"{self.backend.describe()}"
        )

    def build_checkpointer(self, checkpointer_cls):
        """The checkpointer, holding every stateful part of the run (checkpoint/checkpointer.py)."""
        cfg, c = self.cfg, self.cfg.checkpoint
        states = {"skips": self.skips, "scheduler": self.scheduler}
        if self.stream:
            states["stream"] = StreamPosition(self.stream, self.state, cfg.train.grad_accum)
        return checkpointer_cls(
            self.accelerator,
            self.backend,
            self.model,
            self.output_dir,
            progress=self.state,
            states=states,
            hooks=self.hooks.hooks,
            run_facts=self.run_facts(),
            config_yaml=cfg.to_yaml(),
            every=c.every,
            keep_last=c.keep_last,
            verify=c.verify,
            warn=self.console.warn,
        )

    def resume(self) -> None:
        """Resume from a checkpoint if there is one, then record this run's config (never before a resume was
        accepted: a refused one leaves output_dir as it was)."""
        self.checkpointer.hook_states()  # a hook whose state a resume could not load fails now, not at a save
        found = self.checkpointer.find_resume(self.cfg.resume)
        if found is not None:
            path, saved = found
            changes = self.checkpointer.load(path, saved)
            self.schedule_from_config()
            s = self.state
            self.console.say(f"resumed from {path} at step {s.step} (epoch {s.epoch}, {s.step_in_epoch} steps into it)")
            if changes:
                self.console.warn("config changed since the checkpoint, applied from here on: " + "; ".join(changes))
        if self.accelerator.is_main_process:
            (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml())

    def schedule_from_config(self) -> None:
        """After a resume, the learning rates follow this run's config from the current step on: the restored
        optimizer and scheduler carry the old peak rates and the old step's rate (a raised train.max_steps would
        otherwise run on at the old schedule's final rate, 0)."""
        t, scheduler = self.cfg.train, self.scheduler
        groups = scheduler.optimizer.param_groups
        scheduler.base_lrs = [group_lr(g["name"], lr=t.lr, projector_lr=t.projector_lr) for g in groups]
        for group, peak, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"] = peak
            group["lr"] = peak * factor(scheduler.last_epoch)

    def run_facts(self) -> dict:
        """What a resumed run must share with the run that wrote its checkpoint and its config cannot say (the
        config's own fields each declare whether they may change on resume)."""
        return {
            "world_size": self.accelerator.num_processes,
            "backend": self.backend.name,
            "model_path": str(Path(self.cfg.model.path).resolve()),
        }

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train to ``total_steps`` or an agreed stop; the lock is released and the signal handlers restored
        however it ends."""
        with self.lock.released_at_end(), self.stop_signals_caught(), worker_deaths_reported(self.cfg):
            self.started = self.last_step_end = time.monotonic()
            self.hooks.on_train_start(self)
            if self.state.step == 0 and self.cfg.eval.every:
                self.eval_loss()  # the starting point of the eval curve
            for window in self.windows():
                metrics = self.train_step(window)
                self.hooks.on_step_end(self, metrics)
                stop = self.stop_agreed()
                self.save(force=stop)  # when due, or stopping; before evaluating: an evaluation never costs training
                if self.state.due(self.cfg.eval.every):
                    self.eval_loss()
                self.last_step_end = time.monotonic()  # eval and save time are not the next step's
                if stop or self.state.step >= self.total_steps:
                    break
            if not self.stopped:
                self.save(force=True)  # the final checkpoint is always written (once), before the final evaluation
                if not self.state.due(self.cfg.eval.every):
                    self.eval_loss()
            if self.log_failure:
                raise LogWriteError(
                    f"stopped at step {self.state.step}: {self.log_failure}. The step's checkpoint is saved; free "
                    "space (or fix the folder), then resume with resume=auto"
                )
            self.hooks.on_train_end(self)
            return self.state

    def train_step(self, window: list[dict]) -> dict:
        acc = self.accelerator
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}  # this step's rates
        counts = self.global_window_counts(window)  # stays on the device: no host read before backward
        scale = self.cfg.train.grad_accum * acc.num_processes / counts[0].clamp(min=1)
        terms = {}
        for batch in window:
            with acc.accumulate(self.model):
                out = self.loss_fn(self.model, self.blank_image.add_where_missing(batch))
                acc.backward(out["loss"] * scale.to(out["loss"].dtype))
            for name, value in out.items():  # summed on the device, read once per step
                terms[name] = terms.get(name, 0) + value.detach().double()
        assert acc.sync_gradients, "a window must end on an accumulation boundary"
        grad_norm, stepped = self.backend.optimizer_step(
            self.model, self.optimizer, self.trainable, self.cfg.train.max_grad_norm
        )
        if stepped:
            self.scheduler.step()
        stats, sums = self.read_step(counts, terms)
        self.state.record_step(samples=stats["samples"], tokens=stats["tokens"], stepped=stepped)
        self.check_skipped_updates(stepped)
        self.record_skips(window, stats)
        now = time.monotonic()  # step time includes waiting for data: throughput as the user sees it
        metrics = self.step_metrics(sums, stats, lrs, grad_norm, stepped, now - self.last_step_end)
        self.last_step_end = now
        if self.cfg.train.log_sample_ids:
            from accelerate.utils import gather_object

            metrics["sample_ids"] = gather_object([i for b in window for i in b["ids"]])
        return metrics

    # ------------------------------------------------------------------------------------------
    # Step helpers
    # ------------------------------------------------------------------------------------------

    def windows(self):
        """Yield lists of ``grad_accum`` micro-batches, resuming mid-epoch at the exact next one."""
        ga = self.cfg.train.grad_accum
        while self.state.step < self.total_steps:  # a resumed run that already finished trains no more
            skip = self.state.step_in_epoch * ga
            if self.stream is None:
                self.sampler.set_epoch(self.state.epoch)  # Accelerate cannot reach it inside a skipping sampler
                self.loader.generator.manual_seed(self.cfg.train.seed + self.state.epoch)
                loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
                # Accelerate's loaders hand the sampler their own epoch count on every iter, and count an epoch
                # only when iterated to the end, which the loop never does: without this, every epoch is epoch 0
                loader.set_epoch(self.state.epoch)
            else:  # the stream seeks to its position itself (stream.py); replaying it would read the epoch again
                self.train_set.start(self.state.epoch, skip)
                # pinned batches (data.pin_memory on a GPU) copy without blocking the host, as prepared loaders do
                loader = (
                    send_to_device(batch, self.accelerator.device, non_blocking=self.cfg.data.pin_memory)
                    for batch in self.loader
                )
            self.steps_per_epoch = self.steps_in_epoch(self.state.epoch)
            batches = iter(loader)
            while self.state.step_in_epoch < self.steps_per_epoch:
                yield [next(batches) for _ in range(ga)]
            self.state.next_epoch()

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``: the same in every epoch, except under token budgets, whose micro-batches
        are cut from that epoch's order."""
        ga = self.cfg.train.grad_accum
        if isinstance(self.sampler, TokenBudgetBatches):
            return len(self.sampler.batches(epoch)) // (ga * self.accelerator.num_processes)
        return (self.stream.micro_batches if self.stream is not None else len(self.loader)) // ga

    COUNTS = ("units", "label_tokens", "samples", "tokens", "padded_slots", "skip_events", "views", "attention_pairs")

    def global_window_counts(self, window: list[dict]) -> torch.Tensor:
        """One all-reduce of the window's ``COUNTS`` (from the collator's Python ints); left on the device."""
        local = torch.tensor(
            [
                sum(self.loss_units(b) for b in window),
                sum(b["n_label_tokens"] for b in window),
                sum(len(b["ids"]) for b in window),
                sum(b["n_tokens"] for b in window),
                sum(b["n_slots"] for b in window),
                sum(len(b["skipped"]) for b in window),
                sum(b["n_views"] for b in window),
                sum(b["n_attention_pairs"] for b in window),
                *self.source_counts(window),
            ],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        return self.accelerator.reduce(local, reduction="sum")

    def source_counts(self, window: list[dict]) -> list[int]:
        """A ``data.mix``'s samples per source in this window (mixture.py), read as ``samples/<name>``."""
        if not self.cfg.data.mix:
            return []
        sources = np.asarray([s for b in window for s in b["sources"]], dtype=np.int64)
        return np.bincount(sources, minlength=len(self.cfg.data.mix)).tolist()

    def read_step(self, counts: torch.Tensor, terms: dict) -> tuple[dict, dict]:
        """The step's one metrics read: the global counts and the loss terms summed over processes."""
        sums = self.accelerator.reduce(torch.stack(list(terms.values())), reduction="sum")
        values = torch.cat([counts, sums]).tolist()
        stats = {name: int(v) for name, v in zip(self.COUNTS, values)}
        mixed = values[len(self.COUNTS) : len(counts)]
        stats["per_source"] = dict(zip(mix_names(self.cfg.data.mix), map(int, mixed)))
        return stats, dict(zip(terms, values[len(counts) :]))

    def check_skipped_updates(self, stepped: bool) -> None:
        """Warn of a skipped update; abort after too many non-finite steps in a row."""
        s = self.state
        if not stepped:
            self.console.warn(
                f"step {s.step}: non-finite loss or gradient norm; update skipped ({s.consecutive_skips} in a row)"
            )
        if s.consecutive_skips >= self.cfg.train.max_consecutive_skips:
            raise NonFiniteError(
                f"{s.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}); lower train.lr, "
                "check the data, or enable train.max_grad_norm"
            )

    def record_skips(self, window: list[dict], stats: dict) -> None:
        """Tally the bad samples any process replaced in this window; abort past the data's skip budget."""
        if not stats["skip_events"]:
            return
        from accelerate.utils import gather_object

        events = gather_object([e for b in window for e in b["skipped"]])
        for rid, reason, detail in self.skips.add(events):
            self.console.warn(f"skipping bad sample {rid} ({reason}: {detail}); counted, replaced deterministically")
        self.skips.check(len(self.train_set), self.cfg.data.max_skip_fraction, self.train_set.source)

    def step_metrics(self, sums: dict, stats: dict, lrs: dict, grad_norm: float, stepped: bool, seconds: float) -> dict:
        n = max(stats["units"], 1)  # the loss's units: supervised tokens by default
        metrics = {name: value / n for name, value in sums.items()}
        metrics.update(
            step=self.state.step,
            epoch=self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch,
            lr=next(iter(lrs.values())),
            grad_norm=grad_norm,
            stepped=stepped,
            label_tokens=stats["label_tokens"],
            samples=stats["samples"],
            samples_per_s=stats["samples"] / seconds,
            tokens_per_s=stats["tokens"] / seconds,
            step_time=seconds,
            pad_fraction=1 - stats["tokens"] / max(stats["padded_slots"], 1),
            skipped_samples=sum(self.skips.counts.values()),
            bad_records=len(self.skips.bad_ids),
        )
        metrics.update(self.throughput(stats, seconds))
        metrics.update({f"lr/{name}": lr for name, lr in lrs.items()})
        metrics.update({f"skipped/{reason}": count for reason, count in self.skips.counts.items()})
        metrics.update({f"samples/{name}": n for name, n in stats["per_source"].items()})
        return metrics

    def throughput(self, stats: dict, seconds: float) -> dict:
        """``flops``: what the step needed (flops.py, all processes); ``model_tflops_per_s``: that per second per
        process; ``mfu``: that over one device's dense bf16 peak, where it is known (``train.peak_tflops``, or the
        GPU's name)."""
        needed = self.flops.step(
            views=stats["views"],
            tokens=stats["tokens"],
            attention_pairs=stats["attention_pairs"],
            supervised=stats["label_tokens"],
        )
        tflops = needed / seconds / 1e12 / self.accelerator.num_processes
        return {
            "flops": needed,
            "model_tflops_per_s": tflops,
            **({"mfu": tflops / self.peak_tflops} if self.peak_tflops else {}),
        }

    # ------------------------------------------------------------------------------------------
    # Held-out loss, checkpoints, signals
    # ------------------------------------------------------------------------------------------

    def eval_loss(self) -> dict | None:
        """The held-out loss (validate.py), the same on every process; calls on_eval."""
        if self.validator is None:
            return None
        metrics = self.validator.validate(self.model, self.state.step)
        self.hooks.on_eval(self, metrics)
        return metrics

    def save(self, *, force: bool = False) -> None:
        """A checkpoint when the checkpointer's policy says so (``force``: now, unless this step's exists); on_save."""
        path = self.checkpointer.save_if_due(force=force)
        if path is not None:
            self.hooks.on_save(self, path)

    @contextmanager
    def stop_signals_caught(self):
        """SIGTERM/SIGINT: finish the current step, save, exit 0. A second SIGINT stops at once. The previous
        handlers come back when the block ends."""

        def request_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.console.warn(f"received {signal.Signals(signum).name}: finishing this step, saving, then exiting")

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def request_stop(self) -> None:
        """Finish the current step, save a checkpoint and return from fit (hooks may call this)."""
        self.stop_requested = True

    def log_write_failed(self, path: Path, exc: OSError) -> None:
        """A log (metrics.jsonl) could not be written: stop as a signal would, saving this step's checkpoint (if
        the disk allows: else the save says how much it needs), then end with an error naming the file."""
        free = size_text(shutil.disk_usage(path.parent).free)
        self.log_failure = (
            f"could not write {path} ({exc.strerror or exc}; {free} free there); this step's row is lost, the "
            "file holds every row before it whole"
        )
        self.console.warn(f"{self.log_failure}: stopping, saving a checkpoint first")
        self.request_stop()

    def stop_agreed(self) -> bool:
        """True on every process once any process asked to stop (signal, time limit, hook)."""
        limit = self.cfg.train.time_limit_minutes
        if limit and time.monotonic() - self.started > 60 * limit:
            self.stop_requested = True
        self.stopped = self.stop_requested
        if self.accelerator.num_processes > 1:  # the step's one more host read
            flag = torch.tensor([float(self.stop_requested)], device=self.accelerator.device)
            self.stopped = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return self.stopped

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.accelerator.num_processes


def train(cfg: Config, *, checkpointer_cls=Checkpointer) -> TrainState:
    """A whole run, as `train.py`, `llava-loop train` and the demo make it: fit, then end it the way Accelerate
    asks a script to (trackers finished, process group destroyed), every process together, so none exits while
    another still talks to it."""
    trainer = Trainer(cfg, checkpointer_cls=checkpointer_cls)
    state = trainer.fit()
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return state
