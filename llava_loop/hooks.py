"""Hooks: extend a run without editing the loop.

A hook is any object with some of these methods (missing ones are skipped):

    on_train_start(trainer)
    on_step_end(trainer, metrics)      # metrics: dict of floats for the optimizer step just taken
    on_eval(trainer, metrics)
    on_save(trainer, path)             # path: the complete checkpoint folder
    on_train_end(trainer)

``trainer`` is the running ``loop.Trainer``: ``trainer.cfg``, ``.accelerator``, ``.model``,
``.optimizer``, ``.state`` and ``.output_dir`` are there to read, and ``trainer.request_stop()`` ends the run
cleanly after this step (saved; on every process once any asks). A hook with ``state_dict()`` and
``load_state_dict()`` is saved with each checkpoint and restored on resume. List extra hooks in the config as
``hooks: [package.module:Class]`` (or ``{fn: package.module:Class, kwargs: {...}}`` to pass arguments);
they are built once and called on every process (check ``trainer.accelerator.is_main_process`` to act once).

The built-ins here need nothing but the trainer; a hook that needs more lives with what it needs (lmms-eval's,
``llava_loop.lmms:LmmsEval``, exports checkpoints), so training imports none of it unless a config names it.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from .errors import UserError
from .importing import bind

TRACKER_PACKAGES = ("tensorboard", "wandb")  # the trackers extra's


class Hooks:
    """Calls each hook that defines an event, in order: one explicit method per event of the protocol above."""

    def __init__(self, hooks: list):
        self.hooks = hooks

    def _defining(self, event: str) -> list:
        return [method for hook in self.hooks if (method := getattr(hook, event, None)) is not None]

    def on_train_start(self, trainer) -> None:
        for method in self._defining("on_train_start"):
            method(trainer)

    def on_step_end(self, trainer, metrics: dict) -> None:
        for method in self._defining("on_step_end"):
            method(trainer, metrics)

    def on_eval(self, trainer, metrics: dict) -> None:
        for method in self._defining("on_eval"):
            method(trainer, metrics)

    def on_save(self, trainer, path) -> None:
        for method in self._defining("on_save"):
            method(trainer, path)

    def on_train_end(self, trainer) -> None:
        for method in self._defining("on_train_end"):
            method(trainer)


def append_metrics(trainer, kind: str, metrics: dict) -> None:
    """One JSON line in ``output_dir/metrics.jsonl`` (main process); each row names the run (launch) that wrote it,
    so a resumed run's rows can be told from the first launch's. A row that cannot be written (a full disk) is
    taken back whole and stops the run cleanly (``trainer.log_write_failed``): the file never ends in half a line."""
    if trainer.accelerator.is_main_process:
        path = Path(trainer.output_dir) / "metrics.jsonl"
        try:
            append_whole(path, (json.dumps({"kind": kind, "run": trainer.run_id, **metrics}) + "\n").encode())
        except OSError as exc:
            trainer.log_write_failed(path, exc)


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` all or nothing: a write that fails part-way is truncated away again."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            write_all(fd, data)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class MetricsJsonl:
    """Appends one row per logged step, per evaluation and per checkpoint to ``output_dir/metrics.jsonl``."""

    def on_step_end(self, trainer, metrics):
        if metrics["step"] % trainer.cfg.train.log_every == 0 or metrics["step"] == trainer.total_steps:
            append_metrics(trainer, "train", metrics)

    def on_eval(self, trainer, metrics):
        append_metrics(trainer, "eval", metrics)

    def on_save(self, trainer, path):
        append_metrics(trainer, "save", {"step": trainer.state.step, "path": str(path)})


class Trackers:
    """Accelerate trackers (tensorboard, wandb...) named in ``trackers:``; Accelerate starts and writes them on the
    main process only. A resumed run continues the curves of the run it resumes instead of starting new ones at
    step 0: wandb gets the same run id (kept in ``output_dir/trackers.json``, made anew when a run starts from
    step 0). TensorBoard's ``purge_step`` hides what an interrupted launch logged after the checkpoint it resumes
    from, so no step is drawn twice; a run that starts afresh in the folder hides all the earlier curves. They are
    finished by ``loop.train``'s ``end_training``, after every process is done (not here: that call also tears
    down the process group the others may still be using)."""

    RUN_FILE = "trackers.json"

    def __init__(self, names: list[str]):
        """Refuses a named tracker that is not installed (Accelerate would leave it out and log nothing)."""
        from accelerate.tracking import get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        missing = [n for n in names if n != "all" and n not in available]
        if missing:
            installs = ["pip install 'llava-loop[trackers]'"] if set(missing) & set(TRACKER_PACKAGES) else []
            installs += [f"pip install {n}" for n in missing if n not in TRACKER_PACKAGES]
            raise UserError(
                f"trackers: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed, "
                f"so nothing would be logged there: {'; '.join(installs)} (or remove it from trackers)"
            )

    def on_train_start(self, trainer):
        step = trainer.state.step
        init = {
            "wandb": {"id": self.run_id(trainer), "resume": "allow", "dir": str(trainer.output_dir)},
            "tensorboard": {"purge_step": step + 1 if step else 0},
        }
        trainer.accelerator.init_trackers("llava_loop", config=_flat(trainer.cfg.to_dict()), init_kwargs=init)

    def run_id(self, trainer) -> str | None:
        """The tracker run id of this run's curves (main process; the others start no tracker)."""
        if not trainer.accelerator.is_main_process:
            return None
        path = Path(trainer.output_dir) / self.RUN_FILE
        if trainer.state.step and path.is_file():
            return json.loads(path.read_text())["run_id"]
        run_id = uuid.uuid4().hex[:12]
        path.write_text(json.dumps({"run_id": run_id}) + "\n")
        return run_id

    def on_step_end(self, trainer, metrics):
        trainer.accelerator.log(
            {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"]
        )

    def on_eval(self, trainer, metrics):
        trainer.accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"]
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Progress:
    """A rich progress bar on the main process: step/total, loss, lr, grad-norm, samples/s, tokens/s, ETA.
    Without a terminal (CI logs, pipes) it prints a plain line about every 5% instead."""

    enabled = False
    bar = None

    def on_train_start(self, trainer):
        from rich.console import Console

        self.enabled = trainer.accelerator.is_main_process
        self.console = Console(stderr=True)
        self.bar = None
        self.every = max(1, trainer.total_steps // 20)
        self.started = time.perf_counter()
        self.first_step = trainer.state.step
        if not self.enabled or not self.console.is_terminal:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task("train", total=trainer.total_steps, completed=trainer.state.step, stats="")
        self.bar.start()

    @staticmethod
    def _stats(m: dict) -> str:
        return (
            f"loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
            f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s"
            + (f" MFU {m['mfu']:.1%}" if "mfu" in m else "")
        )

    def on_step_end(self, trainer, metrics):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=metrics["step"], stats=self._stats(metrics))
        elif metrics["step"] % self.every == 0 or metrics["step"] == trainer.total_steps:
            done = metrics["step"] - self.first_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (trainer.total_steps - metrics["step"])
            self.console.print(
                f"step {metrics['step']}/{trainer.total_steps} {self._stats(metrics)} ETA {eta:.0f}s",
                highlight=False,
                soft_wrap=True,
            )

    def on_eval(self, trainer, metrics):
        if self.enabled:
            self.console.print(
                f"eval step {metrics['step']}: loss {metrics['eval_loss']:.4f} ({metrics['eval_tokens']} tokens)",
                highlight=False,
                soft_wrap=True,
            )

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.stop()


def make_hooks(cfg) -> Hooks:
    hooks = [Progress(), MetricsJsonl()]
    if cfg.trackers:
        hooks.append(Trackers(cfg.trackers))
    for call in cfg.hooks:
        hooks.append(bind(call, "hook")())
    return Hooks(hooks)
