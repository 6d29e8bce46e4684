"""Test helpers: run configs, launchers, and hooks/losses that tests plug in by name (``helpers:Class``)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def write_config(path: Path, *, model: Path, data: dict, output_dir: Path, **sections) -> Path:
    """A small run config: tiny model, shapes data, no workers, few steps; ``sections`` override keys."""
    config = {
        "mode": "full",
        "output_dir": str(output_dir),
        "model": {"path": str(model)},
        "data": {
            "path": str(data["train"]),
            "image_dir": str(data["train_images"]),
            "eval_path": str(data["val"]),
            "eval_image_dir": str(data["val_images"]),
            "num_workers": 0,
            "max_length": 256,
        },
        "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 4, "lr": 1e-3, "warmup_ratio": 0.0, "seed": 1},
        "checkpoint": {"every": 0, "keep_last": 0},
        "eval": {"every": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), e.get("PYTHONPATH", "")])
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("PYTHONFAULTHANDLER", "1")  # a process killed by a signal (SIGABRT, SIGSEGV) prints its stacks
    return e


WHY = re.compile(r"Fatal Python error|terminate called|what\(\):|Error|Exception|Abort|Thread 0x|File \"")


def failure(what: str, out: subprocess.CompletedProcess) -> AssertionError:
    """A failed launch, with the lines that say why last: CI shows the head and tail of a long log, and a rank's
    abort message sits between the config echo and the launcher's traceback."""
    why = [line for line in out.stderr.splitlines() if WHY.search(line)][-40:]
    return AssertionError(
        f"{what} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}\n"
        "--- the lines that say why ---\n" + "\n".join(why)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    config: Path,
    *overrides: str,
    processes: int = 0,
    timeout: int = 300,
    check: bool = True,
    extra_env: dict | None = None,
    fault: str = "",
    accelerate_config: str = "accelerate_config.yaml",
) -> subprocess.CompletedProcess:
    """``python train.py`` (processes=0) or ``accelerate launch --config_file accelerate_config.yaml`` (N processes;
    ``accelerate_config_zero3.yaml`` for ZeRO-3). ``fault`` runs tests/train_patched.py with that deliberate fault
    instead of train.py."""
    script = [str(TESTS / "train_patched.py"), fault] if fault else [str(ROOT / "train.py")]
    if processes:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / accelerate_config),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            *script,
        ]
    else:
        cmd = [sys.executable, *script]
    cmd += ["--config", str(config), *overrides]
    run_env = env()
    run_env.update(extra_env or {})
    out = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise failure(" ".join(cmd), out)
    return out


def reset_accelerate_state() -> None:
    """Accelerate's state is a process-wide singleton: reset it so the next Trainer in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_here(config: Path, *overrides: str):
    """The run in this process, as ``python train.py`` runs it, without paying a launch's imports again (about 4 s
    of the 5 a short launch takes here); for runs whose test reads what the run wrote, not what it printed."""
    from llava_loop.config import load_config
    from llava_loop.loop import train

    try:
        return train(load_config(config, list(overrides)))
    finally:
        reset_accelerate_state()


def launch_two_nodes(
    config: Path,
    *overrides: str,
    timeout: int = 300,
    check: bool = True,
    per_node: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
) -> list[subprocess.CompletedProcess]:
    """Two ``accelerate launch`` invocations (machine_rank 0 and 1, one process each) on loopback: a 2-node run.
    ``per_node`` adds overrides to one node only (e.g. a node-local output_dir)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_config.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            str(ROOT / "train.py"),
            "--config",
            str(config),
            *overrides,
            *per_node[rank],
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for out in results:
        if check and out.returncode != 0:
            raise failure("node", out)
    return results


def metrics(output_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [m for m in map(json.loads, path.read_text().splitlines()) if m["kind"] == kind]


def tensorboard_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` of every scalar in a TensorBoard log folder, read with TensorBoard's own reader
    (the ``trackers`` extra); a step drawn twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} step {event.step} drawn twice"
            scalars[tag, event.step] = event.value
    return scalars


# ---------------------------------------------------------------------------------------------
# Hooks and losses referenced from test configs
# ---------------------------------------------------------------------------------------------


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


def mixed_text_and_image_data(root, shapes_data, n=48):
    """Shapes records where every other one is text-only (no image, no <image> tag): a stage-2-like mix."""
    from llava_loop.demo.shapes import write_shapes

    path = write_shapes(root, n, seed=7, size=64, max_turns=2)
    records = json.loads(path.read_text())
    for record in records[1::2]:
        del record["image"]
        record["id"] = "text_" + record["id"]
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    path.write_text(json.dumps(records))
    return dict(shapes_data, train=path, train_images=root / "images")


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


def export_and_rerun_logits(checkpoint_dir: Path, run_dir: Path, out: Path, adapter_base: Path | None = None) -> dict:
    """``llava-loop export`` a checkpoint to ``out``, then, in a fresh interpreter that never imports llava_loop,
    run plain transformers on the inputs FinalLogits saved in ``run_dir``: {"merged": logits}, plus
    {"adapter": logits} of PEFT's adapter on ``adapter_base`` when given."""
    subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "export", "--checkpoint", str(checkpoint_dir), "--out", str(out)],
        check=True,
        env=env(),
        capture_output=True,
    )
    result = out.parent / f"{out.name}_logits.pt"
    script = f"""
import sys, torch
from transformers import LlavaForConditionalGeneration
ref = torch.load({str(run_dir / "final_logits.pt")!r})
model = LlavaForConditionalGeneration.from_pretrained({str(out)!r}).eval()
with torch.no_grad():
    results = {{"merged": model(**ref["inputs"]).logits}}
if {adapter_base is not None!r}:
    from peft import PeftModel
    base = LlavaForConditionalGeneration.from_pretrained({str(adapter_base)!r})
    peft_model = PeftModel.from_pretrained(base, {str(out / "adapter")!r}).eval()
    with torch.no_grad():
        results["adapter"] = peft_model(**ref["inputs"]).logits
assert "llava_loop" not in sys.modules
torch.save(results, {str(result)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return torch.load(result)


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
