"""Plugins that test configs name by string, ``plugins:Name``: hooks (``hooks: [plugins:RecordCalls]``) and losses
(``loss: plugins:nan_on_poisoned_steps``). The loop imports this module by name, so tests/ must be importable: in
process, tests/conftest.py puts it on sys.path; in launched runs, ``helpers.env()`` puts it on PYTHONPATH. The run
helpers that write those configs and launch them are in tests/helpers.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch


class RecordCalls:
    """Writes every hook call it receives to output_dir/hook_calls.jsonl (main process)."""

    def _log(self, trainer, event, **info):
        if trainer.accelerator.is_main_process:
            with open(Path(trainer.output_dir) / "hook_calls.jsonl", "a") as f:
                f.write(json.dumps({"event": event, **info}) + "\n")

    def on_train_start(self, trainer):
        self._log(trainer, "on_train_start", step=trainer.state.step)

    def on_step_end(self, trainer, metrics):
        self._log(trainer, "on_step_end", step=metrics["step"], loss=metrics["loss"])

    def on_eval(self, trainer, metrics):
        self._log(trainer, "on_eval", step=metrics["step"], eval_loss=metrics["eval_loss"])

    def on_save(self, trainer, path):
        self._log(trainer, "on_save", step=trainer.state.step, path=str(path))

    def on_train_end(self, trainer):
        self._log(trainer, "on_train_end", step=trainer.state.step)


class NumpyMean:
    """A hook whose state holds a numpy scalar: saved as torch.save pickles it, but refused by a resume's safe load
    (so a run with it is refused at its start)."""

    def __init__(self):
        self.mean = np.float64(0.0)

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"]


class RunningLoss:
    """A hook with state: the count and running mean of the step losses it has seen, restored with a checkpoint
    because it has ``state_dict``/``load_state_dict``; written to output_dir/running_loss.json at the end."""

    def __init__(self):
        self.count, self.mean = 0, 0.0

    def on_step_end(self, trainer, metrics):
        self.count += 1
        self.mean += (metrics["loss"] - self.mean) / self.count

    def state_dict(self):
        return {"count": self.count, "mean": self.mean}

    def load_state_dict(self, state):
        self.count, self.mean = state["count"], state["mean"]

    def on_train_end(self, trainer):
        if trainer.accelerator.is_main_process:
            (Path(trainer.output_dir) / "running_loss.json").write_text(json.dumps(self.state_dict()))


class GradCapture:
    """Captures the accumulated gradient of optimizer step 1 from the gradients autograd produces (before any
    reduction), sums micro-batches, averages over processes as DDP/ZeRO do, and saves grads_step1.pt."""

    def on_train_start(self, trainer):
        self.sums, self.active = {}, True
        for name, param in trainer.model.named_parameters():
            if param.requires_grad:
                param.register_hook(self._hook(name.removeprefix("module.")))

    def _hook(self, name):
        def hook(grad):
            if self.active:
                self.sums[name] = self.sums.get(name, 0) + grad.detach().double().clone()
            return grad

        return hook

    def on_step_end(self, trainer, metrics):
        if metrics["step"] != 1:
            return
        self.active = False
        names = sorted(self.sums)
        flat = torch.cat([self.sums[n].flatten() for n in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
        if trainer.accelerator.is_main_process:
            torch.save({"names": names, "flat": flat}, Path(trainer.output_dir) / "grads_step1.pt")


class ProcessGroupTimeout:
    """Writes the default process group's timeout (seconds) to output_dir/pg_timeout.txt (main process)."""

    def on_train_start(self, trainer):
        import torch.distributed as dist

        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        if trainer.accelerator.is_main_process:
            (Path(trainer.output_dir) / "pg_timeout.txt").write_text(str(backend.options._timeout.total_seconds()))


class KillWorkersAtStep2:
    """SIGKILLs every DataLoader worker after optimizer step 2, as the out-of-memory killer would."""

    def on_step_end(self, trainer, metrics):
        import multiprocessing
        import signal

        if metrics["step"] == 2:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)


class StopAtStep:
    """Requests a stop (as SIGTERM would) after optimizer step $LLAVA_TEST_STOP_AT."""

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == int(os.environ["LLAVA_TEST_STOP_AT"]):
            trainer.request_stop()


class FinalState:
    """At the end of training, saves parameters, AdamW moments and the next random draws to final_state.pt."""

    def on_train_end(self, trainer):
        if not trainer.accelerator.is_main_process:
            return
        import random

        import numpy as np

        model = trainer.accelerator.unwrap_model(trainer.model)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        moments = {}
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                for key, value in trainer.optimizer.state[p].items():
                    moments.setdefault(key, []).append(value.detach().clone() if torch.is_tensor(value) else value)
        draws = {"torch": torch.rand(4), "python": random.random(), "numpy": float(np.random.rand())}
        torch.save({"params": params, "moments": moments, "draws": draws}, Path(trainer.output_dir) / "final_state.pt")


class Snapshots:
    """Keeps parameters and optimizer moments after every step, for the non-finite skip test."""

    def on_train_start(self, trainer):
        trainer.snapshots = {0: self._take(trainer)}

    def on_step_end(self, trainer, metrics):
        trainer.snapshots[metrics["step"]] = self._take(trainer)

    @staticmethod
    def _take(trainer):
        params = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
        moments = [
            v.detach().clone() for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ]
        return {"params": params, "moments": moments, "lr": trainer.optimizer.param_groups[0]["lr"]}


def nan_on_poisoned_steps(model, batch, state, steps=()):
    """The default loss, made NaN during the optimizer steps listed in ``steps`` (a loss kwarg); ``state`` is the
    run's live progress, which the loop hands to any loss that declares it."""
    from llava_loop.losses import label_only_ce

    out = label_only_ce(model, batch)
    if state.step + 1 in steps:  # state.step counts completed steps
        out["loss"] = out["loss"] * math.nan
    return out


def label_only_ce_read_each_micro_batch(model, batch):
    """The default loss, plus one host read of its value per micro-batch (the read-counting negative control)."""
    from llava_loop.losses import label_only_ce

    out = label_only_ce(model, batch)
    float(out["loss"])
    return out


class FinalLogits:
    """At the end of training, runs the in-training model on the first two held-out samples and saves the
    batch and its logits to final_logits.pt: the reference for export parity."""

    def on_train_end(self, trainer):
        from llava_loop.data.collate import Collator
        from llava_loop.losses import model_inputs

        batch = Collator(trainer.processor.tokenizer.pad_token_id)([trainer.eval_set[0], trainer.eval_set[1]])
        inputs = model_inputs(batch)
        trainer.model.eval()
        with torch.no_grad():
            logits = trainer.model(**{k: v.to(trainer.accelerator.device) for k, v in inputs.items()}).logits
        if trainer.accelerator.is_main_process:
            torch.save({"inputs": inputs, "logits": logits.float().cpu()}, Path(trainer.output_dir) / "final_logits.pt")


class GenerateOnEveryRank:
    """At the end of training, every rank generates for its own held-out image, rank r exactly 2 + 10 r tokens,
    counting the model's forwards: under ZeRO-3 a rank that finished first must keep joining the others'."""

    def on_train_end(self, trainer):
        from llava_loop.infer import generate

        rank = trainer.accelerator.process_index
        n = 2 + 10 * rank
        sample = trainer.eval_set.records[rank]
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        forwards = []
        llava = next(m for m in model.modules() if type(m).__name__ == "LlavaForConditionalGeneration")  # under PEFT
        handle = llava.register_forward_hook(lambda *args: forwards.append(1))
        generate(
            model,
            trainer.eval_set.encoder,
            [trainer.eval_set.image_dir / sample.images[0]],
            "Describe the image.",
            max_new_tokens=n,
            min_new_tokens=n,
        )
        handle.remove()
        (Path(trainer.output_dir) / f"generated_rank{rank}.json").write_text(
            json.dumps({"n": n, "forwards": len(forwards)})
        )


class ModelStateBytes:
    """After step 1, each rank writes the bytes DeepSpeed really holds for it: weight partitions (ZeRO-3's
    ds_tensor shards, else whole weights) and optimizer states (fp32 master partition, Adam's two moments)."""

    def on_step_end(self, trainer, metrics):
        from llava_loop.memory import held_weight_bytes

        if metrics["step"] != 1:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        weights = held_weight_bytes(model)
        zero = trainer.optimizer.optimizer  # Accelerate's wrapper -> DeepSpeed's ZeRO optimizer
        masters = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        moments = [
            t for state in zero.optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()
        ]
        optimizer = sum(t.numel() * t.element_size() for t in [*masters, *moments])
        rank = trainer.accelerator.process_index
        (Path(trainer.output_dir) / f"model_state_bytes_rank{rank}.json").write_text(
            json.dumps({"weights": weights, "optimizer": optimizer})
        )


class TrainedDtypes:
    """At the start of training, each rank writes the dtype its trained parameters are held in (under ZeRO-3, its
    partition's) to trained_dtypes_rank{r}.json."""

    def on_train_start(self, trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        dtypes = {
            name: str(getattr(p, "ds_tensor", p).dtype).removeprefix("torch.")
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        rank = trainer.accelerator.process_index
        (Path(trainer.output_dir) / f"trained_dtypes_rank{rank}.json").write_text(json.dumps(dtypes))


def per_sample_ce(model, batch: dict) -> dict:
    """Each sample's mean token cross-entropy, summed over samples: normalised per sample (``unit``)."""
    from llava_loop.losses import supervised_hidden

    head, hidden, targets = supervised_hidden(model, batch)
    losses = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    index = batch["supervised_sequence"].to(losses.device)
    sums = torch.zeros(batch["n_samples"], device=losses.device).index_add(0, index, losses)
    counts = torch.zeros(batch["n_samples"], device=losses.device).index_add(0, index, torch.ones_like(losses))
    return {"loss": (sums / counts.clamp(min=1)).sum()}


per_sample_ce.unit = "samples"


def sentence_unit_loss(model, batch: dict) -> dict:
    raise AssertionError("never called: its unit is refused at startup")


sentence_unit_loss.unit = "sentences"


def counted_tokens_ce(model, batch: dict) -> dict:
    """The default loss with its unit given as a function of the batch: the supervised tokens, counted here."""
    from llava_loop.losses import label_only_ce

    return label_only_ce(model, batch)


counted_tokens_ce.unit = lambda batch: batch["n_label_tokens"]
