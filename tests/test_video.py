"""Video decoding and frame sampling (llava_loop/data/video.py), on clips encoded here with PyAV: the frames are
the ones at evenly spread times, the same from the record alone, bounded by the sampled frames whatever the clip's
length, and every kind of bad file is a counted skip with its reason."""

from __future__ import annotations

from fractions import Fraction

import av  # noqa: E402 - the video extra, in the test extra
import numpy as np
import pytest

from llava_loop.data.skips import SkipSample
from llava_loop.data.video import FrameSampling, read_frame_list, read_video


def write_clip(path, levels, *, pts_seconds=None, rate=10, size=(64, 48)):
    """A clip whose i-th frame is grey level ``levels[i]``, shown at ``pts_seconds[i]`` (default i / rate)."""
    width, height = size
    times = pts_seconds if pts_seconds is not None else [i / rate for i in range(len(levels))]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for level, seconds in zip(levels, times):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(seconds * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def grey(frames) -> list[int]:
    return [int(round(np.asarray(frame).mean())) for frame in frames]


def test_frames_are_taken_at_evenly_spread_times_and_capped_by_fps_and_count():
    sampling = FrameSampling(frames=4)
    assert sampling.times(0.0, 8.0) == [1.0, 3.0, 5.0, 7.0]
    assert FrameSampling(frames=32, fps=0.25).times(0.0, 8.0) == [2.0, 6.0]  # a frame every 4 s of 8 s
    assert FrameSampling(frames=3, fps=10).count(60.0) == 3  # the count caps the rate
    assert sampling.indices(8) == [1, 3, 5, 7] and sampling.indices(2) == [0, 0, 1, 1]  # a short list repeats


def test_a_clip_gives_the_frames_showing_at_the_sampled_times_every_time(tmp_path):
    """30 frames at 10 fps, grey level 8 x frame number: 3 frames of the whole clip are frames 5, 15 and 25; of the
    window 1-2 s, frames 11, 15 and 18 (showing at 1.17, 1.5 and 1.83 s). Read twice, the same pixels."""
    clip = write_clip(tmp_path / "clip.mp4", [8 * i for i in range(30)])
    frames = read_video(clip, FrameSampling(frames=3))
    assert [round(g / 8) for g in grey(frames)] == [5, 15, 25]
    assert [np.asarray(f).tolist() for f in read_video(clip, FrameSampling(frames=3))] == [
        np.asarray(f).tolist() for f in frames
    ]
    assert [round(g / 8) for g in grey(read_video(clip, FrameSampling(frames=3), start=1.0, end=2.0))] == [11, 15, 18]


def test_a_variable_frame_rate_clip_is_sampled_by_time_not_by_frame_number(tmp_path):
    """Frames at 0, 0.1, 0.2 s, then one at 5 s, then every 0.1 s to 6 s: the frame showing at 2.5 s is the one
    shown from 0.2 s until 5 s, not the fourth frame stored."""
    times = [0.0, 0.1, 0.2, *[5.0 + 0.1 * i for i in range(11)]]
    clip = write_clip(tmp_path / "vfr.mp4", [10 * i for i in range(len(times))], pts_seconds=times)
    [middle] = read_video(clip, FrameSampling(frames=1), start=0.0, end=5.0)  # the window's middle: 2.5 s
    assert round(grey([middle])[0] / 10) == 2


def test_a_ten_hour_clip_costs_its_sampled_frames(tmp_path):
    """One frame every 100 s for 10 hours, in four 2.5-hour blocks of grey 0, 64, 128 and 192: 4 sampled frames
    come one from each block (a decoder that read from the start would stop in the first block, or take minutes)."""
    levels = [64 * (i // 90) for i in range(360)]
    clip = write_clip(tmp_path / "long.mp4", levels, pts_seconds=[100.0 * i for i in range(360)], rate=1)
    got = grey(read_video(clip, FrameSampling(frames=4)))
    assert [abs(g - e) <= 12 for g, e in zip(got, [0, 64, 128, 192])] == [True] * 4, got


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("missing", "missing_video"),
        ("garbage", "corrupt_video"),
        ("truncated", "corrupt_video|empty_video"),
        ("too_large", "video_too_large"),
        ("window", "empty_video"),
    ],
)
def test_a_bad_video_is_a_skip_with_its_reason(damage, reason, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", [8 * i for i in range(30)])
    kwargs = {}
    if damage == "missing":
        clip = tmp_path / "gone.mp4"
    elif damage == "garbage":
        clip.write_bytes(b"not a video at all" * 100)
    elif damage == "truncated":
        clip.write_bytes(clip.read_bytes()[:200])
    elif damage == "too_large":
        kwargs["max_pixels"] = 1000  # 64 x 48 frames are over it
    elif damage == "window":
        kwargs.update(start=40.0, end=50.0)  # past the clip's 3 s
    with pytest.raises(SkipSample) as skipped:
        read_video(clip, FrameSampling(frames=4), **kwargs)
    assert __import__("re").fullmatch(reason, skipped.value.reason), skipped.value


def test_a_frame_list_is_sampled_by_index(tmp_path):
    from PIL import Image

    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.new("RGB", (8, 8), (20 * i,) * 3).save(paths[-1])
    assert [g // 20 for g in grey(read_frame_list(paths, FrameSampling(frames=5)))] == [1, 3, 5, 7, 9]
    with pytest.raises(SkipSample, match="empty"):
        read_frame_list([], FrameSampling(frames=5))


def test_an_fps_cap_asks_for_one_clip_per_micro_batch():
    """data.video_fps gives clips different frame counts, which transformers cannot stack: refused with more than
    one sample per micro-batch or with a token budget, accepted at micro-batch 1."""
    from llava_loop.config import ConfigError, load_config

    base = ["output_dir=/tmp/x", "data.path=x.json", "data.video_fps=1"]
    for extra in (["train.micro_batch_size=2"], ["train.micro_batch_size=1", "data.max_tokens_per_micro_batch=4096"]):
        with pytest.raises(ConfigError, match="data.video_fps gives videos different frame counts"):
            load_config(None, base + extra)
    assert load_config(None, base + ["train.micro_batch_size=1"]).data.video_fps == 1


def test_video_files_without_pyav_are_refused_with_the_install_command(tmp_path, monkeypatch):
    """Records naming a video file mark their source as needing PyAV (a run checks it at startup); frame lists do
    not. Without PyAV the check says how to install it."""
    import json
    import sys

    from llava_loop.data.records import load_records
    from llava_loop.data.video import require_video_extra
    from llava_loop.errors import UserError

    kinds = {}
    for name, video in (("file", "a.mp4"), ("frames", ["a/0.png", "a/1.png"]), ("none", None)):
        question = "<video>\nWhat happens?" if video else "What happens?"
        record = {"id": name, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "it"}]}
        if video:
            record["video"] = video
        (tmp_path / f"{name}.json").write_text(json.dumps([record]))
        records = load_records(tmp_path / f"{name}.json")
        kinds[name] = (records.holds_video, records.holds_video_files)
    assert kinds == {"file": (True, True), "frames": (True, False), "none": (False, False)}
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails, as without the extra
    with pytest.raises(UserError, match=r"pip install 'llava-loop\[video\]'"):
        require_video_extra()
