"""lmms-eval against the real package (the ``lmms`` extra; CI runs it in its own venv, see .ci/run): a trained demo
export scores the same in lmms-eval's llava_hf, chat and simple variants, as in ``llava-loop eval`` on the same
questions, answer for answer; the LLM's own chat template in its place does not (negative control). Also the
pixels of transformers' two image-processor backends, which installing lmms-eval (torchvision) switches between."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import helpers

pytestmark = [pytest.mark.extras, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A tiny model trained on shapes captions to partial accuracy (so a wrong prompt shows), exported."""
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.demo.shapes import write_shapes
    from llava_loop.export import export

    root = tmp_path_factory.mktemp("lmms")
    data = {
        "train": write_shapes(root / "train", 1600, seed=0, size=64, prefix="train"),
        "train_images": root / "train" / "images",
        "val": write_shapes(root / "val", 40, seed=1, size=64, prefix="val"),
        "val_images": root / "val" / "images",
    }
    config = helpers.write_config(
        root / "run.yaml",
        model=tiny_model_dir,
        shapes=data,
        output_dir=root / "run",
        train={
            "max_steps": 400,
            "micro_batch_size": 16,
            "lr": 1e-3,
            "warmup_ratio": 0.05,
            "weight_decay": 0.0,
            "seed": 0,
        },
        checkpoint={"every": 0, "keep_last": 1},
    )
    helpers.train_here(config)
    export(complete_checkpoints(root / "run")[-1], root / "export")
    return {**data, "export": root / "export"}


def lmms_predictions(output_dir) -> list[str]:
    """What lmms-eval generated for each question, in question order (its samples file)."""
    samples = next(output_dir.rglob("*_samples_*.jsonl"))
    rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    answers = [row["filtered_resps"] for row in rows]  # the task has no filters: what the model said
    return [a if isinstance(a, str) else a[0] for a in answers]


def test_lmms_eval_scores_an_export_as_llava_loop_eval_does(trained, tmp_path):
    from llava_loop import lmms
    from llava_loop.data.records import load_records
    from llava_loop.evaluate import evaluate_model, normalize
    from llava_loop.infer import load_for_inference

    records = load_records(trained["val"])
    model, _, encoder = load_for_inference(trained["export"], device="cpu")
    ours, predictions, left_out = evaluate_model(model, encoder, records, trained["val_images"], max_new_tokens=32)
    assert not left_out and len(predictions) == 40
    assert 0.2 <= ours["exact_match"] <= 0.95, ours  # partly trained: a prompt the model was not trained on shows
    expected = [normalize(p["prediction"]) for p in predictions]

    for variant, force_simple in (("chat", False), ("simple", True)):
        out = tmp_path / variant
        options = lmms.LmmsOptions([lmms.LOCAL_TASK], image_dir=trained["val_images"], max_new_tokens=32)
        scores = lmms.run(trained["export"], options, out, records=records, force_simple=force_simple)[lmms.LOCAL_TASK]
        assert [normalize(p) for p in lmms_predictions(out)] == expected, variant
        assert scores["exact_match"] == pytest.approx(ours["exact_match"], abs=1e-12), variant
        assert scores["token_f1"] == pytest.approx(ours["token_f1"], abs=1e-9), variant

    # negative control: with the LLM's own chat template (no content-list prelude) in the export, lmms-eval's
    # default (chat) variant cannot even render its prompts, and the failure is reported with lmms-eval's log
    from llava_loop.errors import UserError
    from llava_loop.template import CONTENT_LIST_PRELUDE

    own = tmp_path / "own-template"
    shutil.copytree(trained["export"], own)
    template = (own / "chat_template.jinja").read_text()
    assert template.startswith(CONTENT_LIST_PRELUDE)
    (own / "chat_template.jinja").write_text(template.removeprefix(CONTENT_LIST_PRELUDE))
    with pytest.raises(UserError, match="(?s)lmms-eval failed.*lmms_eval.log.*concatenate str"):
        lmms.run(
            own,
            lmms.LmmsOptions([lmms.LOCAL_TASK], image_dir=trained["val_images"], max_new_tokens=32),
            tmp_path / "control",
            records=records,
        )


@pytest.mark.parametrize("arch", ["llava-next", "llava-onevision"])
def test_lmms_eval_scores_a_tiled_export_as_llava_loop_eval_does(arch, trained, tmp_path, run_config):
    """The trained export upgraded to tiles (``build --from``), trained on for a few steps and exported: on
    held-out images of mixed aspect ratios lmms-eval's llava_hf (which loads the class config.json names) answers
    as ``llava-loop eval`` does, answer for answer, though its processor resizes with torchvision. The control:
    the base-resolution export's answers to the same questions, which differ."""
    from test_anyres_train import ASPECTS

    from llava_loop import lmms
    from llava_loop.build import upgrade_llava
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.data.records import load_records
    from llava_loop.evaluate import evaluate_model, normalize
    from llava_loop.export import export
    from llava_loop.infer import load_for_inference

    images = tmp_path / "images"
    shutil.copytree(trained["val_images"], images)
    for k, path in enumerate(sorted(images.iterdir())):
        with Image.open(path) as image:
            image.resize(ASPECTS[k % len(ASPECTS)]).save(path)
    mixed = {"train": trained["val"], "train_images": images, "val": trained["val"], "val_images": images}
    upgrade_llava(trained["export"], tmp_path / "tiled", arch=arch)
    train = {"max_steps": 4, "lr": 2e-4}
    data = {"max_length": 1024}  # a wide image takes 264 placeholders
    helpers.train_here(run_config(model=tmp_path / "tiled", shapes=mixed, mode="projector", train=train, data=data))
    export(complete_checkpoints(tmp_path / "run")[-1], tmp_path / "export")

    records = load_records(trained["val"])

    def evaluated(model_dir):
        model, _, encoder = load_for_inference(model_dir, device="cpu")
        metrics, predictions, left_out = evaluate_model(model, encoder, records, images, max_new_tokens=32)
        assert not left_out
        return metrics, [normalize(p["prediction"]) for p in predictions]

    ours, expected = evaluated(tmp_path / "export")
    assert 0.1 <= ours["exact_match"] <= 0.95, ours  # partly right: a wrong layout or wrong tiles show
    assert evaluated(trained["export"])[1] != expected

    options = lmms.LmmsOptions([lmms.LOCAL_TASK], image_dir=images, max_new_tokens=32)
    scores = lmms.run(tmp_path / "export", options, tmp_path / "lmms", records=records)[lmms.LOCAL_TASK]
    assert [normalize(p) for p in lmms_predictions(tmp_path / "lmms")] == expected
    assert scores["exact_match"] == pytest.approx(ours["exact_match"], abs=1e-12)
    assert scores["token_f1"] == pytest.approx(ours["token_f1"], abs=1e-9)


VIDEO_FRAMES = 4  # what the video export's processor samples, and the held-out clips' length


def interleaved_clip(path, seed: int) -> None:
    """A control clip of 2 x VIDEO_FRAMES frames, two demo clips' frames in turn: the even frames show one shape,
    the odd ones another, so llava_hf's frames (0, 2, 4, 7) and training's (1, 3, 5, 7) show different shapes."""
    import random

    from llava_loop.demo.clips import clip_frames, write_clip

    rng = random.Random(seed)
    (_, first), (_, second) = clip_frames(rng, 64, VIDEO_FRAMES), clip_frames(rng, 64, VIDEO_FRAMES)
    write_clip(path, [frame for pair in zip(first, second) for frame in pair])


def test_lmms_eval_answers_about_videos_as_generate_video_does(trained, tmp_path, run_config):
    """The trained export upgraded to OneVision, trained 4 steps on demo clips of VIDEO_FRAMES frames and exported
    (its video processor samples VIDEO_FRAMES). One ``llava_loop_heldout`` run asks about held-out clips of exactly
    that many frames, two shapes images and four control clips: on the clips, where both sides take every frame,
    lmms-eval's llava_hf answers as ``generate_video`` does, and on the images as ``generate`` does, answer for
    answer. The control clips (twice as long, see ``interleaved_clip``): llava_hf answers as llava_loop does on
    llava_hf's frames (linspace, first and last), and not always as ``generate_video`` does on training's."""
    from llava_loop import lmms
    from llava_loop.build import upgrade_llava
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.data.records import load_records
    from llava_loop.data.video import FrameSampling, read_video
    from llava_loop.demo.clips import write_clips
    from llava_loop.export import export
    from llava_loop.infer import generate, generate_ids, generate_video, load_for_inference

    upgrade_llava(trained["export"], tmp_path / "onevision", arch="llava-onevision")
    clips = write_clips(tmp_path / "clips", 16, seed=0, frames=VIDEO_FRAMES)
    clip_data = {
        "train": clips,
        "train_images": clips.parent / "videos",
        "val": clips,
        "val_images": clips.parent / "videos",
    }
    data = {"max_length": 1024, "video_frames": VIDEO_FRAMES}
    config = run_config(
        model=tmp_path / "onevision", shapes=clip_data, mode="projector", train={"max_steps": 4, "lr": 2e-4}, data=data
    )
    helpers.train_here(config)
    model_dir = export(complete_checkpoints(tmp_path / "run")[-1], tmp_path / "export")
    assert lmms.video_frames(model_dir) == VIDEO_FRAMES
    assert f"max_frames_num={VIDEO_FRAMES}" in lmms.command(model_dir, [lmms.LOCAL_TASK], tmp_path)[6]

    held = tmp_path / "held"
    rows = json.loads(write_clips(held, 4, seed=1, frames=VIDEO_FRAMES).read_text())
    for k in range(4):
        interleaved_clip(held / "videos" / f"control_{k}.mp4", seed=100 + k)
        rows.append({**rows[k], "id": f"control_{k}", "video": f"control_{k}.mp4"})
    for row in rows:
        row["video"] = f"videos/{row['video']}"
    (held / "images").mkdir()
    for row in json.loads(trained["val"].read_text())[:2]:
        shutil.copy(trained["val_images"] / row["image"], held / "images")
        rows.append({**row, "image": f"images/{row['image']}"})
    (held / "mixed.json").write_text(json.dumps(rows))
    records = load_records(held / "mixed.json")

    model, _, encoder = load_for_inference(model_dir, device="cpu")
    expected, at_their_frames = [], []
    for i in range(len(records)):
        record = records[i]
        question = record.turns[0][1]
        if record.video is None:
            expected.append(generate(model, encoder, [held / record.images[0]], question, max_new_tokens=32)[0])
            continue
        clip = held / record.video.source
        expected.append(generate_video(model, encoder, clip, question, max_new_tokens=32))
        every = read_video(clip, FrameSampling(2 * VIDEO_FRAMES if record.id.startswith("control") else VIDEO_FRAMES))
        theirs = [every[k] for k in np.linspace(0, len(every) - 1, VIDEO_FRAMES, dtype=int)]
        ids = [encoder.question_ids(question, 0, video=True)]
        at_their_frames.append(generate_ids(model, encoder, ids, [[]], videos=[theirs], max_new_tokens=32)[0])
    assert len(set(expected)) > 2  # the answers follow the clips

    options = lmms.LmmsOptions([lmms.LOCAL_TASK], image_dir=held, max_new_tokens=32)
    lmms.run(model_dir, options, tmp_path / "lmms", records=records)  # the chat variant by default: videos go simple
    answers = [answer.strip() for answer in lmms_predictions(tmp_path / "lmms")]
    same_frames, control, images = slice(0, 4), slice(4, 8), slice(8, 10)
    assert answers[same_frames] == expected[same_frames] == at_their_frames[same_frames]
    assert answers[images] == expected[images]
    assert answers[control] == at_their_frames[control]
    assert answers[control] != expected[control]  # the control: other frames, other answers


def test_the_local_task_asks_whole_video_files_of_a_model_that_takes_them(tmp_path, capsys):
    """Records of a clip, a clip given as frame images, a window of a clip, a missing clip and an image: the task asks
    about the clip (its path, a video to llava_hf) and the image; the others are counted or named on stderr. For a
    model without a video processor, or one trained with an fps cap, no video is asked, and stderr says why."""
    from llava_loop import lmms
    from llava_loop.data.records import load_records
    from llava_loop.demo.clips import write_clips

    root = tmp_path / "data"
    rows = json.loads(write_clips(root, 1, seed=0, frames=VIDEO_FRAMES).read_text())
    rows += json.loads(write_clips(root, 1, seed=1, frames=VIDEO_FRAMES, frame_lists=1.0).read_text())
    rows += [{**rows[0], "id": "window", "video_start": 0.25}, {**rows[0], "id": "missing", "video": "none.mp4"}]
    Image.new("RGB", (64, 64), "red").save(root / "videos" / "red.png")
    rows.append(
        {
            "id": "image",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "What colour?\n<image>"}, {"from": "gpt", "value": "red"}],
        }
    )
    (root / "records.json").write_text(json.dumps(rows))
    records = load_records(root / "records.json")

    task = lmms.write_local_task(records, root / "videos", tmp_path / "task")
    questions = [json.loads(line) for line in (task / "questions.jsonl").read_text().splitlines()]
    assert [q["id"] for q in questions] == [rows[0]["id"], "image"] and lmms.asks_videos(task)
    video_doc, image_doc = questions
    assert video_doc["question"] == rows[0]["conversations"][0]["value"].removeprefix("<video>\n")
    assert lmms.doc_to_visual(video_doc) == [str((root / "videos" / rows[0]["video"]).resolve())]
    assert isinstance(lmms.doc_to_visual(image_doc)[0], Image.Image) and image_doc["question"] == "What colour?"
    err = capsys.readouterr().err
    assert "2 video records are not asked: their video is a list of frame images or a window of a file" in err
    assert "left out record missing: missing_video" in err

    configs = {
        "plain": None,
        "fps": {"video_processor": {"do_sample_frames": True, "num_frames": VIDEO_FRAMES}},
        "frames": {"video_processor": {"do_sample_frames": True, "num_frames": VIDEO_FRAMES}},
    }
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        if config:
            (tmp_path / name / "processor_config.json").write_text(json.dumps(config))
    (tmp_path / "fps" / "llava_loop_export.json").write_text(json.dumps({"video_fps": 2.0}))  # the run's cap
    assert lmms.video_frames(tmp_path / "frames") == VIDEO_FRAMES and lmms.why_no_video(tmp_path / "frames") == ""
    assert lmms.video_frames(tmp_path / "plain") is None
    for name, why in (("plain", "has no video processor"), ("fps", "trained with an fps cap")):
        no_video = lmms.why_no_video(tmp_path / name)
        assert why in no_video
        task = lmms.write_local_task(records, root / "videos", tmp_path / f"task-{name}", no_video=no_video)
        assert [json.loads(line)["id"] for line in (task / "questions.jsonl").read_text().splitlines()] == ["image"]
        assert f"4 video records are not asked: {no_video}" in capsys.readouterr().err


def test_cli_eval_writes_lmms_eval_scores_beside_its_own(trained, tmp_path, capsys):
    """The CLI's scores equal its own metrics; a second run into the same folder whose lmms-eval fails quietly
    (an unknown task: lmms-eval logs it and exits 0) is an error, not the first run's scores again."""
    from llava_loop.cli import main

    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(trained["export"]),
                "--data",
                str(trained["val"]),
                "--image-dir",
                str(trained["val_images"]),
                "--device",
                "cpu",
                "--max-samples",
                "8",
                "--max-new-tokens",
                "32",
                "--lmms-eval",
                "--tasks",
                "llava_loop_heldout",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    ours, theirs = result["metrics"], result["lmms_eval"]["llava_loop_heldout"]
    assert ours["n"] == 8 and theirs["exact_match"] == pytest.approx(ours["exact_match"], abs=1e-12)
    assert (tmp_path / "eval_lmms" / "lmms_eval.log").is_file()
    capsys.readouterr()
    again = ["eval", "--model", str(trained["export"]), "--device", "cpu", "--lmms-eval", "--tasks", "no_such_task"]
    assert main([*again, "--out", str(out)]) == 2
    assert "lmms-eval failed (exit 0, no results)" in capsys.readouterr().err


def test_the_lmms_eval_hook_scores_checkpoints_while_training_goes_on(trained, tmp_path, run_config):
    """Two processes continue training the exported model; the hook (main process only) evaluates step 2 in the
    background while the steps after it run, and the final step after the last save; scores reach metrics.jsonl
    and equal llava-loop's own evaluation of the same checkpoint."""
    from llava_loop.data.records import load_records
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    out = tmp_path / "run"
    hook = {
        "fn": "llava_loop.lmms:LmmsEval",
        "kwargs": {
            "tasks": ["llava_loop_heldout"],
            "every": 2,
            "data": str(trained["val"]),
            "image_dir": str(trained["val_images"]),
            "max_samples": 8,
        },
    }
    config = run_config(
        model=trained["export"],
        shapes=trained,
        hooks=[hook],
        trackers=["tensorboard"],
        train={"max_steps": 6, "micro_batch_size": 4, "lr": 1e-4},
        checkpoint={"every": 2, "keep_last": 1},
    )
    run = helpers.launch(config, processes=2)
    rows = {row["step"]: row for row in helpers.metrics(out, "lmms_eval")}
    assert 2 in rows and 6 in rows and set(rows) <= {2, 4, 6}
    assert rows[2]["logged_at_step"] > 2  # training went on while step 2 was evaluated
    assert run.stderr.count("lmms-eval, step 6") == 1  # reported once: the other process started nothing
    assert not (out / "lmms_eval" / "step-000002" / "checkpoint").exists()  # the hard-linked copy is gone
    final = out / "checkpoints" / "step-000006"
    model, _, encoder = load_for_inference(final, device="cpu")
    ours, _, _ = evaluate_model(model, encoder, load_records(trained["val"]), trained["val_images"], max_samples=8)
    assert rows[6]["scores"]["llava_loop_heldout"]["exact_match"] == pytest.approx(ours["exact_match"], abs=1e-12)
    assert ours["exact_match"] > 0
    # and in the trackers, at the step training had reached when they arrived (both may arrive at step 6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "llava_loop"))
    events.Reload()
    weights = [(e.step, e.value) for e in events.Scalars("lmms_eval/weights_step")]
    assert weights == [(rows[step]["logged_at_step"], step) for step in sorted(rows)]
    assert events.Scalars("lmms_eval/llava_loop_heldout/exact_match")[-1].value == pytest.approx(ours["exact_match"])


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_pixels_of_the_two_image_processor_backends(tower, tiny_model_dir, tmp_path):
    """PIL (what llava_loop trains with) and torchvision (transformers' default once torchvision is installed):
    identical at the tower's own size; on resize, at most one 8-bit grey level apart (docs/BENCHMARKS.md)."""
    from transformers import AutoImageProcessor

    from llava_loop.demo.families import save_vision
    from llava_loop.runtime import load_model

    path = tmp_path / tower
    save_vision(path, tower, image_size=64, patch_size=8, hidden=32, layers=1, heads=2)
    pil = AutoImageProcessor.from_pretrained(path, backend="pil")
    vision = AutoImageProcessor.from_pretrained(path)
    assert type(vision).__name__.endswith("ImageProcessor") and type(pil).__name__.endswith("Pil")
    grey_level = 1 / 255 / min(pil.image_std)  # one 8-bit step, after normalisation
    rng = np.random.default_rng(0)
    for width, height in ((64, 64), (90, 70), (640, 480), (333, 500)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        a, b = (p(images=image, return_tensors="pt")["pixel_values"] for p in (pil, vision))
        gap = (a - b).abs()
        if (width, height) == (64, 64):
            assert gap.max() < 1e-6
        else:
            assert 0 < gap.max() <= grey_level * 1.01 and gap.mean() < grey_level * 0.01
    # llava_loop's own loading takes the PIL backend even with torchvision installed
    _, processor = load_model(tiny_model_dir)
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert torch.is_tensor(
        processor.image_processor(images=Image.new("RGB", (64, 64)), return_tensors="pt")["pixel_values"]
    )
