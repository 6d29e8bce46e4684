"""Standard benchmarks (MME, POPE, MMBench, TextVQA...) through lmms-eval (``pip install 'llava-loop[lmms]'``).

An export loads in lmms-eval's ``llava_hf`` model as it is: its tokenizer's chat template renders the training
layout for the ``<image>\\n{question}`` strings llava_hf sends, and its ``eos_token`` ends an assistant turn (the
only stop llava_hf passes). lmms-eval runs in a subprocess, so its heavy imports (torchvision, which also changes
transformers' default image-processor backend) never enter a training process, and a run that evaluates
benchmarks in the background keeps training.

Besides the benchmarks, ``llava_loop_heldout`` is a local task written from llava_loop records: each record's
first question that shows one image, the prompt laid out as training lays it out, scored by exact match and token
F1 with ``evaluate``'s own functions. On the same records, lmms-eval and ``llava-loop eval`` must agree.

Tiled exports (``--arch llava-next`` / ``llava-onevision``) load in ``llava_hf`` too: it picks
LlavaNextForConditionalGeneration or LlavaOnevisionForConditionalGeneration from config.json's ``model_type``, and
its processor tiles each image as training did. Its processor takes transformers' default image backend
(torchvision, which lmms-eval installs), where llava_loop uses PIL: the two agree exactly at the tower's own size,
but a tiled model resizes every image (its base view at least), and resized pixels differ by up to one grey level
(docs/BENCHMARKS.md, "Pixels"), so an answer can differ where a greedy choice is that close.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path

from .data.encode import first_exchange, record_messages
from .data.images import image_path, load_image, open_checked
from .data.records import Records
from .data.skips import SkipSample
from .data.sources import image_dir_of, open_records
from .errors import UserError
from .evaluate import normalize, token_f1
from .hooks import append_metrics
from .template import IMAGE_TOKEN

LMMS_EXTRA = "pip install 'llava-loop[lmms]'"
LOCAL_TASK = "llava_loop_heldout"
# set by torchrun / accelerate launch: a child that inherits them would try to join the training's process group
LAUNCHER_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
)


@dataclass
class LmmsOptions:
    """What lmms-eval is asked, the same for ``llava-loop eval --lmms-eval``, the ``LmmsEval`` hook's kwargs and the
    background job the hook starts (``to_argv`` writes its flags, ``add_arguments`` and ``from_args`` read them)."""

    tasks: list[str]
    _: KW_ONLY
    data: str | None = None  # the records the llava_loop_heldout task asks
    image_dir: str | None = None  # their images' folder
    max_samples: int = 0  # llava_loop_heldout: at most this many records (0: all)
    max_new_tokens: int = 32  # llava_loop_heldout's generation length
    limit: int = 0  # at most this many questions per task (0: all)
    device: str = "cpu"
    dtype: str = "float32"

    def to_argv(self) -> list[str]:
        """The command-line flags of ``python -m llava_loop.lmms`` for these options (unset ones left out)."""
        argv = ["--tasks", ",".join(self.tasks)]
        for f in fields(LmmsOptions)[1:]:
            if getattr(self, f.name):
                argv += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return argv

    @staticmethod
    def add_arguments(parser) -> None:
        """The flags ``to_argv`` writes, on an argparse parser."""
        parser.add_argument("--tasks", required=True, type=lambda text: [t for t in text.split(",") if t])
        for f in fields(LmmsOptions)[1:]:
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", default=f.default, type=str if f.default is None else type(f.default)
            )

    @staticmethod
    def from_args(args) -> LmmsOptions:
        return LmmsOptions(**{f.name: getattr(args, f.name) for f in fields(LmmsOptions)})


def command(
    model_dir: str | Path,
    tasks: list[str],
    output_dir: str | Path,
    *,
    include_path: str | Path | None = None,
    limit: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 1,
    force_simple: bool = False,
) -> list[str]:
    """The ``python -m lmms_eval`` command line for an exported model directory. lmms-eval runs ``llava_hf``'s chat
    variant (HF content lists through the processor's template) unless ``force_simple`` (``<image>\n`` strings
    through the tokenizer's); the export renders both in the training layout."""
    # device_map too: llava_hf's default ("") is no device map transformers 5 accepts
    model_args = f"pretrained={Path(model_dir).resolve()},device={device},device_map={device},dtype={dtype}"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(output_dir),
        "--log_samples",
    ]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    if limit:
        cmd += ["--limit", str(limit)]
    if force_simple:
        cmd.append("--force_simple")
    return cmd


def child_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("ACCELERATE_")}


def start(cmd: list[str], output_dir: str | Path) -> subprocess.Popen:
    """Start lmms-eval in the background; its output goes to ``output_dir/lmms_eval.log``."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / "lmms_eval.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())


def finish(process: subprocess.Popen, output_dir: str | Path, since: float) -> dict[str, dict[str, float]]:
    """Wait for a started lmms-eval and return its scores. lmms-eval logs most failures and still exits 0 (an
    unknown task name does), so a run that wrote no results file since ``since`` (a ``time.time()`` taken before
    it started) is a failure too: an earlier run's file in the same folder is not this run's. The error quotes the
    end of its log."""
    process.wait()
    scores = read_results(output_dir, since)
    if process.returncode != 0 or scores is None:
        log = Path(output_dir) / "lmms_eval.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise UserError(f"lmms-eval failed (exit {process.returncode}, no results); its log is {log}:\n{tail}")
    return scores


def read_results(output_dir: str | Path, since: float = 0.0) -> dict[str, dict[str, float]] | None:
    """``{task: {metric: value}}`` from the newest ``*_results.json`` lmms-eval wrote under ``output_dir`` (at or
    after ``since``)."""
    found = [(p.stat().st_mtime, p) for p in Path(output_dir).rglob("*_results.json")]
    files = sorted((t, p) for t, p in found if t >= since)
    if not files:
        return None
    scores = {}
    for task, values in json.loads(files[-1][1].read_text())["results"].items():
        scores[task] = {
            key.split(",")[0]: value
            for key, value in values.items()
            if isinstance(value, (int, float)) and "_stderr" not in key
        }
    return scores


def run(
    model_dir: str | Path,
    options: LmmsOptions,
    output_dir: str | Path,
    *,
    records: Records | None = None,
    force_simple: bool = False,
) -> dict[str, dict[str, float]]:
    """Run lmms-eval on ``options.tasks`` and return its scores. ``llava_loop_heldout`` among them is written first
    from ``records`` (read from ``options.data`` when not given) and ``options.image_dir``."""
    output_dir = Path(output_dir)
    include_path = None
    if LOCAL_TASK in options.tasks:
        if records is None and options.data:
            records = open_records(options.data)
        if records is None:
            raise UserError(f"the {LOCAL_TASK} task is written from your records: give --data (and --image-dir)")
        include_path = write_local_task(
            records,
            image_dir_of(options.data or "", options.image_dir or ""),
            output_dir / "tasks",
            max_samples=options.max_samples,
            max_new_tokens=options.max_new_tokens,
        )
    cmd = command(
        model_dir,
        options.tasks,
        output_dir,
        include_path=include_path,
        limit=options.limit,
        device=options.device,
        dtype=options.dtype,
        force_simple=force_simple,
    )
    since = time.time()
    return finish(start(cmd, output_dir), output_dir, since)


# ------------------------------------------------------------------------------------------
# The local task
# ------------------------------------------------------------------------------------------

TASK_YAML = f"""\
# Written by llava_loop.lmms: the first question of each single-image record, laid out as training lays it out.
task: {LOCAL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{questions}}
test_split: test
output_type: generate_until
doc_to_visual: !function task_hooks.doc_to_visual
doc_to_text: !function task_hooks.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {{max_new_tokens}}
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function task_hooks.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: token_f1
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""
TASK_HOOKS = "from llava_loop.lmms import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def write_local_task(
    records,
    image_dir: str | Path,
    out: str | Path,
    *,
    max_samples: int = 0,
    max_new_tokens: int = 32,
) -> Path:
    """Write the ``llava_loop_heldout`` task (YAML, questions, hooks) to ``out`` for ``--include_path``. The
    questions are those ``evaluate_model`` generates for that show one image (llava_hf puts one image before the
    question), in order; the others are counted on stderr. A record whose image cannot be opened is left out and
    named on stderr, as ``llava-loop eval`` leaves it out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if max_samples:
        records = records.subset(range(min(max_samples, len(records))))
    rows, not_one_image = [], 0
    for i in range(len(records)):
        record = records[i]
        try:
            messages = record_messages(record)
            user, answer = first_exchange(record.id, messages)
            if len(record.images) != 1 or not messages[user]["content"].startswith(IMAGE_TOKEN):
                not_one_image += 1
                continue
            path = image_path(image_dir, record.images[0])
            open_checked(path, decode=False)
        except SkipSample as skip:
            print(f"{LOCAL_TASK}: left out record {record.id}: {skip.reason} ({skip.detail})", file=sys.stderr)
            continue
        if not isinstance(path, Path):  # lmms-eval reads files: an embedded or zipped image is written out
            (out / "images").mkdir(exist_ok=True)
            path, data = out / "images" / f"{len(rows):06d}", path.read_bytes()
            path.write_bytes(data)
        question = messages[user]["content"].removeprefix(IMAGE_TOKEN).strip()  # the tag comes from the image
        rows.append({"id": record.id, "image": str(path.resolve()), "question": question, "answer": answer})
    if not_one_image:
        print(
            f"{LOCAL_TASK}: {not_one_image} records whose first question does not show exactly one image are not "
            "asked (llava-loop eval scores them)",
            file=sys.stderr,
        )
    if not rows:
        raise UserError(f"{records.source}: no single-image record to ask; {LOCAL_TASK} needs some")
    questions = out / "questions.jsonl"
    questions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (out / f"{LOCAL_TASK}.yaml").write_text(
        TASK_YAML.format(questions=json.dumps(str(questions.resolve())), max_new_tokens=max_new_tokens)
    )
    (out / "task_hooks.py").write_text(TASK_HOOKS)
    return out


def doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    return [load_image(Path(doc["image"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question without its ``<image>`` tag: llava_hf puts ``<image>\n`` before it, and its chat variant sends
    [image, text] content, which the export's template renders the same way (the training layout)."""
    return doc["question"]


def process_results(doc, results):
    prediction = results[0]
    return {
        "exact_match": float(normalize(prediction) == normalize(doc["answer"])),
        "token_f1": token_f1(prediction, doc["answer"]),
    }


# ------------------------------------------------------------------------------------------
# A checkpoint, in the background (the LmmsEval hook's job)
# ------------------------------------------------------------------------------------------


def stage(checkpoint: Path, out: Path) -> Path:
    """Hard links to a complete checkpoint's files in ``out/checkpoint``: instant, no second copy on disk, and
    still there when ``checkpoint.keep_last`` prunes the original while lmms-eval runs."""
    staged = out / "checkpoint"
    shutil.copytree(checkpoint, staged, copy_function=os.link)
    return staged


def evaluate_checkpoint(checkpoint: Path, out: Path, options: LmmsOptions) -> dict:
    """Export a (staged) checkpoint, run lmms-eval on it, write ``out/scores.json``; the staged files go either way
    (once the original is pruned, a failed evaluation's hard links would hold a whole checkpoint on disk)."""
    from .export import export

    try:
        scores = run(export(checkpoint, out / "export"), options, out)
    finally:
        if checkpoint.parent == out:
            shutil.rmtree(checkpoint)
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    return scores


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m llava_loop.lmms", description=evaluate_checkpoint.__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    LmmsOptions.add_arguments(p)
    a = p.parse_args(argv)
    evaluate_checkpoint(a.checkpoint, a.out, LmmsOptions.from_args(a))
    return 0


@dataclass(eq=False)  # a hook is an object, not a value
class LmmsEval(LmmsOptions):
    """Standard benchmarks while training, through lmms-eval (``pip install 'llava-loop[lmms]'``)::

        hooks:
          - fn: llava_loop.lmms:LmmsEval
            kwargs: {tasks: [mme, pope], every: 2000, device: "cuda:7", dtype: bfloat16}

    Its kwargs are ``LmmsOptions``' fields and ``every``. Every ``every`` steps (a multiple of ``checkpoint.every``)
    and at the end, the checkpoint just saved is hard-linked aside (instant; ``keep_last`` may prune the original
    meanwhile), exported and scored by lmms-eval in a background process on the main process, so training does
    not wait. It fires on ``on_save`` rather than ``on_eval``: an export needs a complete checkpoint, and one of
    the step's own is there for free. Files go to ``output_dir/lmms_eval/step-N/``. Scores arrive steps later: they
    are logged when they do, to metrics.jsonl (kind ``lmms_eval``, with the step of the weights) and to the
    trackers (``lmms_eval/<task>/<metric>`` at the step training has reached, ``lmms_eval/weights_step`` beside
    them: trackers need steps to increase). One evaluation runs at a time; a checkpoint due while one runs is
    skipped with a warning. At the end the run waits for the last one. ``data``/``image_dir`` give the
    ``llava_loop_heldout`` task its questions. A failed evaluation is a warning naming its log, never the end of
    the run."""

    every: int = 0
    running: tuple | None = field(default=None, init=False, repr=False)  # (process, step, folder)

    def __post_init__(self):
        if importlib.util.find_spec("lmms_eval") is None:  # at startup, not at the first evaluation hours later
            raise UserError(f"hook llava_loop.lmms:LmmsEval needs lmms-eval, which is not installed: {LMMS_EXTRA}")
        self.tasks = list(self.tasks)

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
        out = Path(trainer.output_dir) / "lmms_eval" / f"step-{step:06d}"
        shutil.rmtree(out, ignore_errors=True)  # a resumed run redoes an evaluation it did not finish
        out.mkdir(parents=True)
        cmd = [sys.executable, "-m", "llava_loop.lmms", str(stage(Path(path), out)), str(out), *self.to_argv()]
        with open(out / "job.log", "w") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env())
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
        flat = {
            f"lmms_eval/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()
        }
        if trainer.cfg.trackers:
            trainer.accelerator.log({**flat, "lmms_eval/weights_step": step}, step=trainer.state.step)
        trainer.console.say(
            f"lmms-eval, step {step}: " + ", ".join(f"{k.removeprefix('lmms_eval/')} {v:.4f}" for k, v in flat.items())
        )


if __name__ == "__main__":
    sys.exit(main())
