"""Hooks: extend a run without editing the loop.

A hook is any object with some of these methods (missing ones are skipped):

    on_train_start(trainer)
    on_step_end(trainer, metrics)      # metrics: dict of floats for the optimizer step just taken
    on_eval(trainer, metrics)
    on_save(trainer, path)             # path: the complete checkpoint folder
    on_train_end(trainer)

``trainer`` is the running ``loop.Trainer``: ``trainer.cfg``, ``.accelerator``, ``.model``,
``.optimizer``, ``.state`` and ``.output_dir`` are there to read. List extra hooks in the config as
``hooks: [package.module:Class]`` (or ``{fn: package.module:Class, kwargs: {...}}`` to pass arguments);
they are built once and called on every process (check ``trainer.accelerator.is_main_process`` to act once).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .errors import UserError
from .importing import bind

LMMS_EXTRA = "pip install 'llava-loop[lmms]'"
TRACKER_PACKAGES = ("tensorboard", "wandb")  # the trackers extra's

EVENTS = ("on_train_start", "on_step_end", "on_eval", "on_save", "on_train_end")


class Hooks:
    """Calls every hook that defines an event, in order."""

    def __init__(self, hooks: list):
        self.hooks = hooks

    def __getattr__(self, event: str):
        if event not in EVENTS:
            raise AttributeError(event)

        def call(*args, **kwargs):
            for hook in self.hooks:
                method = getattr(hook, event, None)
                if method is not None:
                    method(*args, **kwargs)

        return call


def append_metrics(trainer, kind: str, metrics: dict) -> None:
    """One JSON line in ``output_dir/metrics.jsonl`` (main process); each row names the run (launch) that wrote it,
    so a resumed run's rows can be told from the first launch's."""
    if trainer.accelerator.is_main_process:
        with open(Path(trainer.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "run": trainer.run_id, **metrics}) + "\n")


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
            raise UserError(f"trackers: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed, "
                            f"so nothing would be logged there: {'; '.join(installs)} (or remove it from trackers)")

    def on_train_start(self, trainer):
        step = trainer.state.step
        init = {"wandb": {"id": self.run_id(trainer), "resume": "allow", "dir": str(trainer.output_dir)},
                "tensorboard": {"purge_step": step + 1 if step else 0}}
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
        trainer.accelerator.log({f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                                step=metrics["step"])

    def on_eval(self, trainer, metrics):
        trainer.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                                step=metrics["step"])


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
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task = self.bar.add_task("train", total=trainer.total_steps, completed=trainer.state.step, stats="")
        self.bar.start()

    @staticmethod
    def _stats(m: dict) -> str:
        return (f"loss {m['loss']:.4f} lr {m['lr']:.2e} gnorm {m['grad_norm']:.3f} "
                f"{m['samples_per_s']:.1f} samples/s {m['tokens_per_s']:.0f} tok/s"
                + (f" MFU {m['mfu']:.1%}" if "mfu" in m else ""))

    def on_step_end(self, trainer, metrics):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=metrics["step"], stats=self._stats(metrics))
        elif metrics["step"] % self.every == 0 or metrics["step"] == trainer.total_steps:
            done = metrics["step"] - self.first_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (trainer.total_steps - metrics["step"])
            self.console.print(f"step {metrics['step']}/{trainer.total_steps} {self._stats(metrics)} ETA {eta:.0f}s",
                               highlight=False, soft_wrap=True)

    def on_eval(self, trainer, metrics):
        if self.enabled:
            self.console.print(f"eval step {metrics['step']}: loss {metrics['eval_loss']:.4f} "
                               f"({metrics['eval_tokens']} tokens)", highlight=False, soft_wrap=True)

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.stop()


class LmmsEval:
    """Standard benchmarks while training, through lmms-eval (``pip install 'llava-loop[lmms]'``)::

        hooks:
          - fn: llava_loop.hooks:LmmsEval
            kwargs: {tasks: [mme, pope], every: 2000, device: "cuda:7", dtype: bfloat16}

    Every ``every`` steps (a multiple of ``checkpoint.every``) and at the end, the checkpoint just saved is hard-
    linked aside (instant; ``keep_last`` may prune the original meanwhile), exported and scored by lmms-eval in a
    background process on the main process, so training does not wait. It fires on ``on_save`` rather than
    ``on_eval``: an export needs a complete checkpoint, and one of the step's own is there for free. Files go to
    ``output_dir/lmms_eval/step-N/``. Scores arrive steps later: they are logged when they do, to metrics.jsonl
    (kind ``lmms_eval``, with the step of the weights) and to the trackers (``lmms_eval/<task>/<metric>`` at the
    step training has reached, ``lmms_eval/weights_step`` beside them: trackers need steps to increase). One
    evaluation runs at a time; a checkpoint due while one runs is skipped with a warning. At the end the run waits
    for the last one. ``data``/``image_dir`` give the ``llava_loop_heldout`` task its questions. A failed
    evaluation is a warning naming its log, never the end of the run."""

    def __init__(self, tasks: list[str], every: int = 0, *, data: str | None = None, image_dir: str | None = None,
                 max_samples: int = 0, max_new_tokens: int = 32, limit: int = 0, device: str = "cpu",
                 dtype: str = "float32"):
        import importlib.util

        if importlib.util.find_spec("lmms_eval") is None:  # at startup, not at the first evaluation hours later
            raise UserError(f"hook llava_loop.hooks:LmmsEval needs lmms-eval, which is not installed: {LMMS_EXTRA}")
        self.tasks, self.every = list(tasks), every
        self.options = {"data": data, "image_dir": image_dir, "max_samples": max_samples,
                        "max_new_tokens": max_new_tokens, "limit": limit, "device": device, "dtype": dtype}
        self.running = None  # (process, step, folder)

    def on_save(self, trainer, path):
        step = trainer.state.step
        final = step >= trainer.total_steps
        if not trainer.accelerator.is_main_process or not (final or (self.every and step % self.every == 0)):
            return
        if self.running is not None:
            if not final:
                trainer.console.warn(f"lmms-eval: step {step} skipped, step {self.running[1]}'s evaluation still runs")
                return
            self.collect(trainer, wait=True)
        from . import lmms

        out = Path(trainer.output_dir) / "lmms_eval" / f"step-{step:06d}"
        shutil.rmtree(out, ignore_errors=True)  # a resumed run redoes an evaluation it did not finish
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "llava_loop.lmms", str(lmms.stage(Path(path), out)), str(out),
               "--tasks", ",".join(self.tasks)]
        for key, value in self.options.items():
            if value:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        with open(out / "job.log", "w") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=lmms.child_env())
        self.running = (process, step, out)

    def on_step_end(self, trainer, metrics):
        if self.running is not None:
            self.collect(trainer, wait=False)

    def on_train_end(self, trainer):
        if self.running is not None:
            trainer.console.say(f"waiting for lmms-eval on step {self.running[1]} ({self.running[2]})")
            self.collect(trainer, wait=True)

    def collect(self, trainer, *, wait: bool) -> None:
        process, step, out = self.running
        if process.poll() is None and not wait:
            return
        process.wait()
        self.running = None
        scores_file = out / "scores.json"
        if process.returncode != 0 or not scores_file.is_file():
            trainer.console.warn(f"lmms-eval on step {step} failed (exit {process.returncode}); see {out / 'job.log'}")
            return
        scores = json.loads(scores_file.read_text())
        append_metrics(trainer, "lmms_eval", {"step": step, "logged_at_step": trainer.state.step, "scores": scores})
        flat = {f"lmms_eval/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}
        if trainer.cfg.trackers:
            trainer.accelerator.log({**flat, "lmms_eval/weights_step": step}, step=trainer.state.step)
        trainer.console.say(f"lmms-eval, step {step}: " + ", ".join(f"{k.removeprefix('lmms_eval/')} {v:.4f}"
                                                                    for k, v in flat.items()))


def make_hooks(cfg) -> Hooks:
    hooks = [Progress(), MetricsJsonl()]
    if cfg.trackers:
        hooks.append(Trackers(cfg.trackers))
    for call in cfg.hooks:
        hooks.append(bind(call, "hook")())
    return Hooks(hooks)
