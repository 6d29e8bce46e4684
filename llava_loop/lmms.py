"""Standard benchmarks (MME, POPE, MMBench, TextVQA...) through lmms-eval (``pip install 'llava-loop[lmms]'``).

An export loads in lmms-eval's ``llava_hf`` model as it is: its tokenizer's chat template renders the training
layout for the ``<image>\\n{question}`` strings llava_hf sends, and its ``eos_token`` ends an assistant turn (the
only stop llava_hf passes). lmms-eval runs in a subprocess, so its heavy imports (torchvision, which also changes
transformers' default image-processor backend) never enter a training process, and a run that evaluates
benchmarks in the background keeps training.

Besides the benchmarks, ``llava_loop_heldout`` is a local task written from llava_loop records: each record's
first question that shows one image, or one video file and no image, the prompt laid out as training lays it out,
scored by exact match and token F1 with ``evaluate``'s own functions. On the same records, lmms-eval and
``llava-loop eval`` (``infer.generate_video`` for a video) must agree.

Tiled exports (``--arch llava-next`` / ``llava-onevision``) load in ``llava_hf`` too: it picks
LlavaNextForConditionalGeneration or LlavaOnevisionForConditionalGeneration from config.json's ``model_type``, and
its processor tiles each image as training did. Its processor takes transformers' default image backend
(torchvision, which lmms-eval installs), where llava_loop uses PIL: the two agree exactly at the tower's own size,
but a tiled model resizes every image (its base view at least), and resized pixels differ by up to one grey level
(docs/BENCHMARKS.md, "Pixels"), so an answer can differ where a greedy choice is that close.

Video (OneVision exports). A video doc's visual is its file's path: a string is how llava_hf tells a video from an
image (lmms_eval/models/simple/llava_hf.py:295-298). Its simple variant then writes ``<video>\\n{question}``
(:322-324), which the export's tokenizer template renders in the training layout, reads the frames with decord
(``load_video``, :256-265, called at :341) and hands them to the processor as ``videos`` (:350). Its chat variant
(models/chat/llava_hf.py:53-68) sends the path as a ``{"type": "video"}`` content item and leaves the frames to
transformers' processor, whose own rule (below) is another; so a run whose ``llava_loop_heldout`` asks about a
video takes the simple variant, whose frames ``command`` controls (its images are asked as the chat variant asks
them). Not asked: a video given as frame images or as a window of a file (llava_hf reads whole files), and videos
for a model that takes none, or that was trained with ``data.video_fps`` (llava_hf reads a fixed frame count).

Frames of a clip of T frames, for a model trained on N (``data.video_frames``): llava_hf reads ``max_frames_num``
frames at ``np.linspace(0, T - 1, max_frames_num)`` rounded down (the first, the last, and evenly between; :262),
then the export's video processor (``do_sample_frames``, ``num_frames=N``) samples N of those by transformers' rule
(indices ``i * count // N``). ``command`` sets ``max_frames_num`` to the export's N, so that second step keeps every
frame (at llava_hf's default of 32 a 4-frame model would see frames 0, 0, 1, 2 of a 4-frame clip). Training,
``llava-loop infer --video`` and ``generate_video`` take the frame showing at the middle of each of N equal shares
of the clip (data/video.py): index ``floor((i + 0.5) * T / N)`` at a steady frame rate. The two agree on a clip of
exactly N frames, where both take every frame; otherwise they mostly differ (T = 8, N = 4: llava_hf 0, 2, 4, 7,
training 1, 3, 5, 7), and answers may too. decord and PyAV decode the demo's MPEG-4 clips to the same pixels, and
both sides hand the frames to the export's own video processor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path

from .data.encode import first_exchange, record_messages
from .data.images import image_path, load_image, open_checked
from .data.records import Records
from .data.skips import SkipSample
from .data.sources import image_dir_of, open_records
from .data.video import clip_seconds, require_video_extra
from .errors import UserError
from .evaluate import normalize, token_f1
from .hooks import append_metrics
from .template import IMAGE_TOKEN, VIDEO_TOKEN

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
    frames = video_frames(model_dir)
    if frames:  # llava_hf reads this many frames of a video file; the video processor then keeps them all
        model_args += f",max_frames_num={frames}"
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


def video_processor_config(model_dir: str | Path) -> dict:
    """A saved processor's video processor settings (empty when it has none)."""
    model_dir = Path(model_dir)
    if (model_dir / "processor_config.json").is_file():
        config = json.loads((model_dir / "processor_config.json").read_text()).get("video_processor")
        if config:
            return config
    if (model_dir / "video_preprocessor_config.json").is_file():
        return json.loads((model_dir / "video_preprocessor_config.json").read_text())
    return {}


def video_frames(model_dir: str | Path) -> int | None:
    """The frame count a model's video processor samples from a whole video (an export's ``data.video_frames``);
    None for a model whose processor samples none (or has no video processor)."""
    config = video_processor_config(model_dir)
    return config.get("num_frames") if config.get("do_sample_frames") else None


def why_no_video(model_dir: str | Path) -> str:
    """Why llava_hf cannot show this model a video file as it was trained ('' when it can)."""
    from .infer import export_info

    if not video_processor_config(model_dir):
        return f"{model_dir} has no video processor (a video model is built with --arch llava-onevision)"
    if export_info(Path(model_dir)).get("video_fps"):
        return (
            f"{model_dir} was trained with an fps cap (data.video_fps), and llava_hf reads a fixed count of frames "
            "(max_frames_num)"
        )
    return ""


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
    from ``records`` (read from ``options.data`` when not given) and ``options.image_dir``; when it asks about
    videos, lmms-eval runs llava_hf's simple variant (its frames are the ones ``command`` asks for; see the module
    docstring)."""
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
            no_video=why_no_video(model_dir),
        )
        force_simple = force_simple or asks_videos(include_path)
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
# Written by llava_loop.lmms: the first question of each single-image or single-video record, in the training layout.
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


NOT_ONE_VISUAL = (
    "records whose first question does not show exactly one image, or one video and no image, are not asked "
    "(llava-loop eval scores them)"
)
NOT_A_WHOLE_FILE = (
    "video records are not asked: their video is a list of frame images or a window of a file, and llava_hf reads "
    "whole video files"
)


def whole_file(video) -> bool:
    return not video.frame_list and not video.start and video.end is None


def write_local_task(
    records,
    image_dir: str | Path,
    out: str | Path,
    *,
    max_samples: int = 0,
    max_new_tokens: int = 32,
    no_video: str = "",
) -> Path:
    """Write the ``llava_loop_heldout`` task (YAML, questions, hooks) to ``out`` for ``--include_path``. The
    questions are those ``evaluate_model`` generates for that show one image, or one video file and no image
    (llava_hf puts one ``<image>`` or ``<video>`` before the question), in order; the others are counted on stderr,
    and so are video records when ``no_video`` says why the model cannot be shown one (``why_no_video``). A video
    given as frame images or as a window of a file is not asked: llava_hf reads whole files. A record whose image
    or video cannot be opened is left out and named on stderr, as ``llava-loop eval`` leaves it out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if max_samples:
        records = records.subset(range(min(max_samples, len(records))))
    rows, not_asked = [], Counter()
    for i in range(len(records)):
        record = records[i]
        try:
            messages = record_messages(record)
            user, answer = first_exchange(record.id, messages)
            kind = shown(record, messages[user]["content"])
            if kind == "video" and no_video:
                kind = f"video records are not asked: {no_video}"
            elif kind == "video" and not whole_file(record.video):
                kind = NOT_A_WHOLE_FILE
            if kind not in ("image", "video"):
                not_asked[kind or NOT_ONE_VISUAL] += 1
                continue
            if kind == "image":
                path = image_path(image_dir, record.images[0])
                open_checked(path, decode=False)
            else:
                require_video_extra()
                path = image_path(image_dir, record.video.source)
                clip_seconds(path)  # there, with a video stream, not empty: as training checks it
        except SkipSample as skip:
            print(f"{LOCAL_TASK}: left out record {record.id}: {skip.reason} ({skip.detail})", file=sys.stderr)
            continue
        if not isinstance(path, Path):  # lmms-eval reads files: an embedded or zipped image or video is written out
            folder = out / f"{kind}s"
            folder.mkdir(exist_ok=True)
            suffix = Path(record.video.source).suffix if kind == "video" else ""
            path, data = folder / f"{len(rows):06d}{suffix}", path.read_bytes()
            path.write_bytes(data)
        tag = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
        question = messages[user]["content"].removeprefix(tag).strip()  # the tag comes from the visual
        visual = {"image": "", "video": "", kind: str(path.resolve())}
        rows.append({"id": record.id, **visual, "question": question, "answer": answer})
    for reason, count in not_asked.items():
        print(f"{LOCAL_TASK}: {count} {reason}", file=sys.stderr)
    if not rows:
        raise UserError(f"{records.source}: no single-image or single-video record to ask; {LOCAL_TASK} needs some")
    questions = out / "questions.jsonl"
    questions.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (out / f"{LOCAL_TASK}.yaml").write_text(
        TASK_YAML.format(questions=json.dumps(str(questions.resolve())), max_new_tokens=max_new_tokens)
    )
    (out / "task_hooks.py").write_text(TASK_HOOKS)
    return out


def asks_videos(task_dir: Path) -> bool:
    """Whether a written ``llava_loop_heldout`` asks about a video."""
    lines = (Path(task_dir) / "questions.jsonl").read_text().splitlines()
    return any(json.loads(line)["video"] for line in lines)


def shown(record, question: str) -> str | None:
    """What a record's first question shows, as llava_hf can show it: ``"image"`` (one image, its tag first),
    ``"video"`` (one video and no image, its tag first), or None (anything else)."""
    if record.video is None and len(record.images) == 1 and question.startswith(IMAGE_TOKEN):
        return "image"
    if record.video is not None and not record.images and question.startswith(VIDEO_TOKEN):
        return "video"
    return None


def doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """An image doc's image; a video doc's file path, which is how llava_hf tells a video (it reads the frames)."""
    if doc.get("video"):
        return [doc["video"]]
    return [load_image(Path(doc["image"]))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question without its ``<image>`` (``<video>``) tag: llava_hf puts ``<image>\n`` (``<video>\n``) before
    it, and for an image its chat variant sends [image, text] content, which the export's template renders the same
    way (the training layout)."""
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
