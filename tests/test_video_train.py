"""Training OneVision models on video (issue 40; the extras step: OneVision's processor needs torchvision).

Proven here, on the tiny model upgraded to OneVision and synthetic demo clips (files and frame lists) mixed with
image and text-only records: a video sample holds what transformers' own OneVision processor makes of the same
record and frames, token for token and pixel for pixel (a video alone, and beside an image); bad videos are skipped
with their reasons; padded and packed batches give the same losses and gradients in every mode; 1 process x
micro-batch 4 equals 2-process ZeRO-2 and ZeRO-3 x micro-batch 1 x accumulation 2 (ranks holding a video, an
image or neither in the same slot) and padding-free; a run resumes bitwise mid-epoch with loader workers; and the
export generates from a video through plain transformers as ``llava-loop infer --video`` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_anyres_train import _losses_and_grads
from test_onevision_train import onevision_dir  # noqa: F401 - the fixture

from llava_loop.data.collate import Collator
from llava_loop.data.dataset import LlavaDataset
from llava_loop.data.encode import SampleEncoder, record_messages
from llava_loop.data.records import Record, load_records
from llava_loop.data.video import FrameSampling, Video, frames_array, read_video
from llava_loop.template import render

import helpers

pytestmark = pytest.mark.extras
FRAMES = 4


@pytest.fixture(scope="module")
def video_mix(tmp_path_factory, shapes_data) -> dict:
    """24 demo clips (a quarter as frame lists), 12 shapes images and 12 text-only records in one folder, shuffled
    so that micro-batches and ranks hold every combination; 8 held-out clips."""
    from llava_loop.demo.clips import write_clips

    root = tmp_path_factory.mktemp("video-mix")
    clips = json.loads(write_clips(root, 24, seed=0, frame_lists=0.25).read_text())
    held = write_clips(root / "held", 8, seed=1)
    images = json.loads(Path(shapes_data["train"]).read_text())[:24]
    shutil.copytree(shapes_data["train_images"], root / "images")  # a symlink out of the folder is unsafe_path
    for record in clips:
        record["video"] = (
            [f"videos/{name}" for name in record["video"]]
            if isinstance(record["video"], list)
            else f"videos/{record['video']}"
        )
    for record in images[:12]:
        record["image"] = f"images/{record['image']}"
    for record in images[12:]:
        del record["image"]
        record["id"] = "text_" + record["id"]
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    records = clips + images
    np.random.default_rng(0).shuffle(records)
    path = root / "mix.json"
    path.write_text(json.dumps(records))
    return {"train": path, "train_images": root, "val": held, "val_images": root / "held" / "videos"}


def _encoder(processor, **kwargs):
    return SampleEncoder(processor, max_length=1024, video_frames=FRAMES, **kwargs)


def test_a_video_sample_is_what_transformers_processor_makes_of_it(onevision_dir, video_mix):  # noqa: F811
    """A clip alone and a clip beside an image: our ids (its placeholders frames x pooled patches + 1) and pixels
    equal the OneVision processor's for the same rendered text and frames. The control: other frames differ."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(onevision_dir)
    encoder = _encoder(processor)
    root = video_mix["train_images"]
    records = load_records(video_mix["train"])
    clip = next(r for r in (records[i] for i in range(len(records))) if r.video and not r.video.frame_list)
    image = next(r for r in (records[i] for i in range(len(records))) if r.images)
    both = Record(
        "both", image.images, (("user", "<image>\n<video>\nWhat happens?"), ("assistant", "it moves")), clip.video
    )
    for record in (clip, both):
        sample = encoder(record, root)
        frames = read_video(root / clip.video.source, FrameSampling(FRAMES))
        text = render(processor.tokenizer, record_messages(record))
        kwargs = {"images": [encoder.load(root / record.images[0])]} if record.images else {}
        expected = processor(
            text=text, videos=[frames_array(frames)], do_sample_frames=False, return_tensors="pt", **kwargs
        )
        assert sample["input_ids"].tolist() == expected["input_ids"][0].tolist()
        assert (sample["input_ids"] == encoder.video.token_id).sum() == FRAMES * 16 + 1  # 8x8 patches pooled to 4x4
        assert torch.equal(sample["pixel_values_videos"], expected["pixel_values_videos"][0])
        if record.images:
            assert torch.equal(sample["pixel_values"], expected["pixel_values"][0][: len(sample["pixel_values"])])
    other = next(r for r in (records[i] for i in range(len(records))) if r.video and r.video != clip.video)
    assert not torch.equal(encoder(other, root)["pixel_values_videos"], encoder(clip, root)["pixel_values_videos"])


def test_an_fps_cap_counts_a_clips_frames_from_its_header_and_its_window(onevision_dir, video_mix):  # noqa: F811
    """The demo clips are 2 s (16 frames at 8 fps): at most 1.5 frames a second gives 3 frames, their window of
    1 s gives 2; each laid out with that many frames' placeholders and decoded to that many."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(onevision_dir)
    encoder = _encoder(processor, video_fps=1.5)
    root = video_mix["train_images"]
    records = load_records(video_mix["train"])
    clip = next(r for r in (records[i] for i in range(len(records))) if r.video and not r.video.frame_list)
    windowed = Record(clip.id, (), clip.turns, Video(clip.video.source, start=0.5, end=1.5))
    for record, frames in ((clip, 3), (windowed, 2)):
        sample = encoder(record, root)
        assert len(sample["pixel_values_videos"]) == frames
        assert (sample["input_ids"] == encoder.video.token_id).sum() == encoder.video.tokens(frames)


def test_bad_videos_are_skipped_with_their_reasons_never_a_crash(onevision_dir, video_mix, tmp_path):  # noqa: F811
    """A missing file, a truncated one, a file with no video stream, a tag without a video and the reverse, a path
    out of the folder, an empty frame list: each replaced by a good record, its reason counted."""
    from transformers import AutoProcessor

    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    good = sorted(Path(video_mix["train_images"], "videos").glob("*.mp4"))[0]
    (root / "videos" / "good.mp4").write_bytes(good.read_bytes())
    (root / "videos" / "cut.mp4").write_bytes(good.read_bytes()[:300])
    (root / "videos" / "text.mp4").write_text("not a video")
    ask = [("user", "<video>\nWhich way?"), ("assistant", "left")]
    cases = {
        "missing_video": Record("a", (), tuple(ask), Video("videos/none.mp4")),
        "corrupt_video": Record("b", (), tuple(ask), Video("videos/cut.mp4")),
        "corrupt_video ": Record("c", (), tuple(ask), Video("videos/text.mp4")),
        "video_token_mismatch": Record("d", (), tuple(ask)),
        "video_token_mismatch ": Record(
            "e", (), (("user", "Which way?"), ("assistant", "left")), Video("videos/good.mp4")
        ),
        "unsafe_path": Record("f", (), tuple(ask), Video("../outside.mp4")),
        "empty_video": Record("g", (), tuple(ask), Video("videos/good.mp4", start=100.0)),
    }
    from llava_loop.data.records import Records

    good_record = Record("ok", (), tuple(ask), Video("videos/good.mp4"))
    records = Records.from_records([*cases.values(), good_record])
    dataset = LlavaDataset(records, _encoder(AutoProcessor.from_pretrained(onevision_dir)), root)
    for i, reason in enumerate(cases):
        sample = dataset[i]
        assert [event[1] for event in sample["skipped"]][:1] == [reason.strip()], (reason, sample["skipped"])
        assert sample["pixel_values_videos"] is not None  # replaced by a good record
    assert dataset[len(cases)]["skipped"] == []


def _mixed_batch(onevision_dir, video_mix, padding_free):  # noqa: F811
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(onevision_dir)
    dataset = LlavaDataset(load_records(video_mix["train"]), _encoder(processor), video_mix["train_images"])
    picked = [i for i in range(len(dataset)) if not dataset.records[i].images][:3]  # videos and text
    picked += [next(i for i in range(len(dataset)) if dataset.records[i].images)]
    samples = [dataset[i] for i in picked]
    assert any(s["pixel_values_videos"] is not None for s in samples) and any(
        s["pixel_values"] is not None for s in samples
    )
    return Collator(processor.tokenizer.pad_token_id, padding_free=padding_free)(samples)


@pytest.mark.parametrize("mode", ["projector", "lora", "freeze_vision", "full"])
def test_video_batches_train_in_every_mode_alike_padded_packed_and_checkpointed(mode, onevision_dir, video_mix):  # noqa: F811
    """Videos, an image and text in one micro-batch: padded and packed rows (and gradient checkpointing) give the
    same per-token losses and gradients, within 1e-5. The control: frames swapped between the videos."""
    padded = _mixed_batch(onevision_dir, video_mix, False)
    videos, frames = padded["pixel_values_videos"].shape[:2]
    assert padded["n_views"] == len(padded["pixel_values"]) + videos * frames  # what FLOPs count through the tower
    reference, grads = _losses_and_grads(onevision_dir, mode, padded)
    for batch, checkpointing in ((_mixed_batch(onevision_dir, video_mix, True), False), (padded, True)):
        losses, other = _losses_and_grads(onevision_dir, mode, batch, checkpointing=checkpointing)
        assert (losses - reference).abs().max() < 1e-5
        assert all((other[n] - g).abs().max() < 1e-5 for n, g in grads.items())
    swapped = dict(padded, pixel_values_videos=padded["pixel_values_videos"].flip(1).flip(0))
    assert (_losses_and_grads(onevision_dir, mode, swapped)[0] - reference).abs().max() > 1e-4


@pytest.mark.slow
def test_video_runs_match_across_packing_and_two_process_zero2_and_zero3(
    tmp_path,
    run_config,
    onevision_dir,  # noqa: F811
    video_mix,
):
    """On the video + image + text mix: 1 process x mb4 padded, the same padding-free, 2-process ZeRO-2 x mb1 x
    acc2 padding-free and 2-process ZeRO-3 x mb1 x acc2 log the same losses within 1e-5, with slots where one rank
    held a video and the other none (the control: the same run on 2 frames a video); token-budget micro-batches
    under 2-process ZeRO-2 match 1 process."""
    train = {"max_steps": 3, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "log_sample_ids": True}
    layouts = {
        "padded": (0, 4, 1, False, "", FRAMES),
        "packed": (0, 4, 1, True, "", FRAMES),
        "zero2-2x1x2": (2, 1, 2, True, "", FRAMES),
        "zero3-2x1x2": (2, 1, 2, False, "accelerate_config_zero3.yaml", FRAMES),
        "two-frames": (0, 4, 1, False, "", 2),
    }
    runs = {}
    for name, (processes, micro, accum, packed, zero, frames) in layouts.items():
        config = run_config(
            name,
            model=onevision_dir,
            shapes=video_mix,
            mode="freeze_vision",
            train={**train, "micro_batch_size": micro, "grad_accum": accum},
            data={"padding_free": packed, "max_length": 1024, "video_frames": frames},
        )
        if processes:
            helpers.launch(config, processes=processes, accelerate_config=zero or "accelerate_config.yaml")
        else:
            helpers.train_here(config)
        runs[name] = helpers.metrics(tmp_path / name)
    clips = {r["id"] for r in json.loads(Path(video_mix["train"]).read_text()) if "video" in r}
    slots = [ids for ids in (m["sample_ids"] for m in runs["zero2-2x1x2"])]
    assert any((ids[k] in clips) != (ids[2 + k] in clips) for ids in slots for k in (0, 1))
    reference = [m["loss"] for m in runs["padded"]]
    for name in ("packed", "zero2-2x1x2", "zero3-2x1x2"):
        assert [m["loss"] for m in runs[name]] == pytest.approx(reference, rel=1e-5), name
    assert [m["loss"] for m in runs["two-frames"]] != pytest.approx(reference, rel=1e-4)
    assert runs["padded"][0]["flops"] > runs["two-frames"][0]["flops"]  # frames and their tokens are counted

    budget = {"padding_free": True, "max_length": 1024, "max_tokens_per_micro_batch": 1024, "video_frames": FRAMES}
    helpers.check_token_budgets_match(
        run_config, tmp_path, model=onevision_dir, shapes=video_mix, train=train, data=budget
    )


@pytest.mark.slow
def test_a_video_run_resumes_bitwise_with_workers_and_its_export_generates_as_infer_does(
    tmp_path,
    capsys,
    run_config,
    onevision_dir,  # noqa: F811
    video_mix,
):
    """LoRA (dropout on), 2 loader workers: stopped at step K and resumed in a fresh process, the run matches an
    uninterrupted one to the bit (the control: a resume that forgets the data position). Its merged export, loaded
    by plain transformers (its processor and generate, and its any-to-any pipeline), generates from a clip's
    frames what ``llava-loop infer --video`` generates."""
    from llava_loop.checkpoint import files as checkpoint
    from llava_loop.export import export
    from llava_loop.infer import generate_video, load_for_inference

    hooks = ["plugins:FinalState", "plugins:StopAtStep"]
    sections = {"train": helpers.RESUMED_TRAIN, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "hooks": hooks}
    sections["data"] = {"max_length": 1024, "num_workers": 2, "video_frames": FRAMES}
    configs = {name: run_config(name, model=onevision_dir, shapes=video_mix, mode="lora", **sections) for name in "ABC"}
    helpers.check_resumes_bitwise(configs, tmp_path)

    out = tmp_path / "export"
    export(checkpoint.complete_checkpoints(tmp_path / "B")[-1], out)
    clip = sorted(Path(video_mix["train_images"], "videos").glob("*.mp4"))[0]
    model, _, encoder = load_for_inference(out, device="cpu")
    # six tokens that are not blank: a briefly trained model may answer in newlines alone, which would compare empty
    tokenizer = encoder.tokenizer
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    forced = {"max_new_tokens": 6, "min_new_tokens": 6, "suppress_tokens": blank}
    ours = generate_video(model, encoder, clip, "Which way does the shape move?", **forced)
    from llava_loop.cli import main

    argv = ["infer", "--model", str(out), "--device", "cpu", "--video", str(clip), "--max-new-tokens", "6"]
    assert main([*argv, "--prompt", "Which way does the shape move?"]) == 0
    assert capsys.readouterr().out.strip() == generate_video(
        model, encoder, clip, "Which way does the shape move?", max_new_tokens=6
    )

    from transformers import AutoModelForImageTextToText, AutoProcessor

    plain_model = AutoModelForImageTextToText.from_pretrained(out).eval()
    plain = AutoProcessor.from_pretrained(out)
    frames = frames_array(read_video(clip, FrameSampling(plain.video_processor.num_frames)))
    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way does the shape move?"}]}
    ]
    prompt = plain.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = plain(text=prompt, videos=[frames], do_sample_frames=False, return_tensors="pt")
    generated = plain_model.generate(**inputs, **forced, do_sample=False)
    theirs = plain.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == theirs.strip() and ours
    from transformers import pipeline

    # transformers' pipeline samples num_frames (the run's) itself: handed exactly those frames, it keeps them all
    pipe = pipeline("any-to-any", model=str(out), device="cpu")
    chat = [{"role": "user", "content": [{"type": "video", "video": frames}, conversation[0]["content"][1]]}]
    said = pipe(text=chat, generate_kwargs={**forced, "do_sample": False}, return_full_text=False)
    assert said[0]["generated_text"] == ours


def test_data_check_counts_videos_their_frames_and_placeholders_and_draws_them(onevision_dir, video_mix, tmp_path):  # noqa: F811
    """``data check --model`` on the mix: every clip counted with its sampled frames and exact placeholders (the
    encoder's), lengths that hold them, a broken clip counted by reason; the report adds the two video panels."""
    from transformers import AutoProcessor

    from llava_loop.data.check import check_dataset
    from llava_loop.data.report import draw_report

    records = json.loads(Path(video_mix["train"]).read_text())
    broken = dict(next(r for r in records if isinstance(r.get("video"), str)), id="broken", video="videos/none.mp4")
    data = tmp_path / "mix.json"
    data.write_text(json.dumps([*records, broken]))
    processor = AutoProcessor.from_pretrained(onevision_dir)
    report = check_dataset(
        data, video_mix["train_images"], processor=processor, max_length=1024, video_frames=FRAMES, progress=False
    )
    clips = sum("video" in r for r in records)
    assert report["videos"] == clips and report["problems"] == {"missing_video": 1}
    dist = report["distributions"]
    assert dist["video_frames"].tolist() == [FRAMES] * clips
    assert dist["video_tokens"].tolist() == [_encoder(processor).video.tokens(FRAMES)] * clips
    assert len(dist["video_seconds"]) == sum(isinstance(r.get("video"), str) for r in records)  # files have a length
    assert dist["total_tokens"].max() > dist["video_tokens"].max()
    image, panels = draw_report(report, "video mix", max_length=1024)
    assert [p.title for p in panels][-2:] == ["video lengths", "frames per video"]
    assert list(panels[-1].bars) == [str(FRAMES)]
    image_only = dict(report, distributions={**dist, "video_frames": dist["video_frames"][:0]})
    assert draw_report(image_only, "no videos", max_length=1024)[0].height < image.height


@pytest.mark.slow
def test_the_gpu_benchs_video_row_runs_through_the_real_launch_on_cpu(tmp_path):
    """bench/gpu.py's video row, as its CPU twin (tiny OneVision towers at 336 px, 2 clips of 32 frames as frame
    lists): built in a child, launched with accelerate + DeepSpeed ZeRO-2, its tokens and FLOPs those of 32 frames."""
    from test_bench import gpu_bench, table_rows

    out, _ = gpu_bench(tmp_path, "--smoke", "--rows", "video", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = table_rows(out.stdout)
    assert row[0] == "video" and row[-1].startswith("ok"), row
    [run] = map(json.loads, (tmp_path / "out" / "rows.jsonl").read_text().splitlines())
    assert 32 * 144 + 1 < run["tokens_per_sample"] < 32 * 144 + 120  # 32 frames of 12 x 12 pooled patches, + text


def test_memory_sizes_a_sample_from_a_video_as_the_processor_counts_it(capsys):
    """``llava-loop memory --video-frames 32``: CLIP-L/336 at OneVision, 32 frames x 12 x 12 pooled patches + 1
    placeholders and 32 views of the tower; more frames hold more."""
    from llava_loop.cli import main
    from llava_loop.memory import LLMS, estimate

    argv = ["memory", "--llm", "0.5B", "--mode", "freeze_vision", "--gpus", "1", "--micro-batch", "4"]
    assert main([*argv, "--video-frames", "32"]) == 0
    assert "tokens per sample: 4673 (64 text + 4609 video tokens: 32 frames at llava-onevision, 32 views)" in (
        capsys.readouterr().out
    )
    shape = dict(gpus=1, micro_batch=4, checkpointing=True)
    assert (
        estimate(LLMS["0.5B"], "freeze_vision", "zero2", seq_len=4673, views=32, **shape)["activations"]
        > (estimate(LLMS["0.5B"], "freeze_vision", "zero2", seq_len=4673 - 16 * 144, views=16, **shape)["activations"])
    )
