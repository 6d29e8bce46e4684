"""Video in records: a file decoded with PyAV (the ``video`` extra), or a list of frame images, sampled to frames.

Sampling is a pure function of the clip and the settings, so a record gives the same frames in every epoch,
process and resume, and anyone can recompute them from the record alone:

* ``frames`` (``data.video_frames``, OneVision's 32): that many frames;
* ``fps`` (``data.video_fps``; 0: no cap): at most that many frames per second of the clip, still at most ``frames``;
* a window of the clip (a record's ``video_start`` / ``video_end`` seconds), else all of it.

A file's frames are taken at times spread evenly over the window (each the middle of its share of it), which holds
for variable frame rates too; each is found by seeking to the key frame before it and decoding forward, so a
10-hour video costs its sampled frames, not its length. A frame list is sampled by index the same way, always to
``frames`` frames (a shorter list repeats some, as LLaVA-OneVision's uniform sampling does), so that without an
fps cap every video of a run has the same frame count and a micro-batch's videos stack into one tensor, the shape
transformers' OneVision takes.

Every problem is a ``SkipSample`` with its reason: ``missing_video``, ``corrupt_video`` (unreadable, or no video
stream), ``empty_video`` (no frame), ``video_too_large`` (a frame over ``data.max_image_pixels``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..template import VIDEO_TOKEN
from .archives import ZipMember, member_info
from .images import MAX_IMAGE_PIXELS, image_path, load_image
from .skips import SkipSample


@dataclass(frozen=True)
class Video:
    """A record's video: a file, or its frames as image files in order (``source``, relative to the image folder),
    and an optional window of it in seconds."""

    source: str | tuple[str, ...]
    start: float | None = None
    end: float | None = None

    @property
    def frame_list(self) -> bool:
        return isinstance(self.source, tuple)

    def __str__(self) -> str:
        return f"{self.source[0]} (+{len(self.source) - 1} frames)" if self.frame_list else self.source

    def to_json(self) -> list:
        return [list(self.source) if self.frame_list else self.source, self.start, self.end]

    @classmethod
    def from_json(cls, value) -> Video | None:
        if value is None:
            return None
        source, start, end = value
        return cls(tuple(source) if isinstance(source, list) else source, start, end)


def require_video_extra():
    """PyAV, or a UserError with the command that installs it."""
    try:
        import av
    except ImportError:
        raise UserError(
            "these records hold video files, which need PyAV to decode: pip install 'llava-loop[video]'"
        ) from None
    return av


@dataclass(frozen=True)
class FrameSampling:
    frames: int = 32
    fps: float = 0.0

    def count(self, seconds: float | None = None) -> int:
        """How many frames a clip of ``seconds`` (None: unknown, a frame list) gives."""
        if self.fps and seconds is not None:
            return min(self.frames, max(1, math.ceil(seconds * self.fps)))
        return self.frames

    def times(self, start: float, end: float) -> list[float]:
        """The times (seconds) of a file's frames in ``[start, end)``: the middle of each of ``count`` equal parts."""
        n = self.count(end - start)
        step = (end - start) / n
        return [start + (i + 0.5) * step for i in range(n)]

    def indices(self, available: int) -> list[int]:
        """The indices of a frame list's ``frames`` frames, spread the same way (repeating some of a shorter list)."""
        return [int((i + 0.5) * available / self.frames) for i in range(self.frames)]


def clip_window(duration: float, start: float | None, end: float | None, where) -> tuple[float, float]:
    begin, finish = start or 0.0, duration if end is None else min(end, duration)
    if not 0 <= begin < finish:
        raise SkipSample("empty_video", f"{where}: the window {start}-{end} s holds none of its {duration:.1f} s")
    return begin, finish


# FFmpeg's slice threading, PyAV's default: a seek-and-decode of a few frames gains nothing from frame threading,
# whose threads each hold frames back (docs/BENCHMARKS.md, "Video decoding", measures both)
THREADS = "SLICE"


@contextlib.contextmanager
def opened(where: Path | ZipMember, max_pixels: int = MAX_IMAGE_PIXELS, threads: str = THREADS):
    """``(container, stream, seconds)`` of a video file or zip member, its one video stream checked: there, of a
    frame size within ``max_pixels``, and not empty. ``threads``: FFmpeg's decoding threads (``THREADS``)."""
    av = require_video_extra()

    if isinstance(where, ZipMember):
        archive, info = member_info(where, "missing_video")
        source = archive.open(info)  # seekable: PyAV reads the member in place
    elif not where.is_file():
        raise SkipSample("missing_video", f"{where} does not exist")
    else:
        source = str(where)
    try:
        container = av.open(source)
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise SkipSample("corrupt_video", f"{where}: {exc}") from None
    with container:
        if not container.streams.video:
            raise SkipSample("corrupt_video", f"{where} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = threads
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise SkipSample("video_too_large", f"{where}: frames of {width}x{height}, over {max_pixels} pixels")
        seconds = _duration(container, stream)
        if not seconds:
            raise SkipSample("empty_video", f"{where} holds no frame")
        yield container, stream, seconds


def clip_seconds(where: Path | ZipMember, max_pixels: int = MAX_IMAGE_PIXELS) -> float:
    """A video's length in seconds, from its header (nothing is decoded)."""
    with opened(where, max_pixels) as (_, _, seconds):
        return seconds


def video_paths(video: Video, image_dir, *, allow_absolute: bool) -> Path | ZipMember | list:
    """The file (or zip member), or the frame files, a record's video names under ``image_dir`` (unsafe names are
    ``SkipSample``s, as for images)."""
    names = video.source if video.frame_list else [video.source]
    found = [image_path(image_dir, name, allow_absolute=allow_absolute) for name in names]
    return found if video.frame_list else found[0]


def window_seconds(where: Path | ZipMember, video: Video, max_pixels: int = MAX_IMAGE_PIXELS) -> float:
    """The length of a video file's window (the record's ``video_start`` / ``video_end``, else all of it), from its
    header."""
    start, end = clip_window(clip_seconds(where, max_pixels), video.start, video.end, where)
    return end - start


def read_video(
    where: Path | ZipMember,
    sampling: FrameSampling,
    *,
    start: float | None = None,
    end: float | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    threads: str = THREADS,
) -> list[Image.Image]:
    """The sampled frames of a video file (or zip member), as RGB images."""
    import av

    with opened(where, max_pixels, threads) as (container, stream, seconds):
        times = sampling.times(*clip_window(seconds, start, end, where))
        try:
            frames = [_frame_at(container, stream, t) for t in times]
        except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise SkipSample("corrupt_video", f"{where}: {exc}") from None
    if any(frame is None for frame in frames):
        raise SkipSample("empty_video", f"{where}: no frame decodes at some of {len(times)} sampled times")
    return frames


def _duration(container, stream) -> float:
    """Seconds of the video stream, from its own duration, else the container's (either may be missing)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def _frame_at(container, stream, seconds: float) -> Image.Image | None:
    """The frame showing at ``seconds``: seek to the key frame before it, decode forward to it."""
    base = stream.time_base
    target = int(seconds / base) + (stream.start_time or 0)
    container.seek(target, stream=stream, backward=True, any_frame=False)
    shown = None
    for frame in container.decode(stream):
        if frame.pts is None:
            continue
        if frame.pts > target and shown is not None:
            break
        shown = frame
        if frame.pts >= target:
            break
    return None if shown is None else shown.to_image().convert("RGB")


def read_frame_list(paths: list, sampling: FrameSampling, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """The sampled frames of a video given as its frame images (LLaVA-Video-178K, ShareGPT-4o); a frame picked
    twice is decoded once."""
    if not paths:
        raise SkipSample("empty_video", "the video's frame list is empty")
    picked = sampling.indices(len(paths))
    decoded = {i: load_image(paths[i], max_pixels) for i in sorted(set(picked))}
    return [decoded[i] for i in picked]


def frames_array(frames: list[Image.Image], where="the video") -> np.ndarray:
    """Frames as the (n, height, width, 3) uint8 array transformers' video processors take."""
    if len({frame.size for frame in frames}) > 1:
        raise SkipSample("corrupt_video", f"{where}: its frames differ in size ({sorted({f.size for f in frames})})")
    return np.stack([np.asarray(frame) for frame in frames])


class VideoInputs:
    """What a OneVision processor makes of a record's video, the way training lays it out: its frame count, the
    ``<video>`` placeholders they fill (frames x pooled patches per frame, plus one newline: the processor's own
    count), and the pixels its video processor makes of them, ``(frames, 3, side, side)``."""

    def __init__(self, processor, sampling: FrameSampling, *, max_pixels: int, allow_absolute_paths: bool):
        self.processor = processor
        self.video_processor = processor.video_processor
        self.token_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.sampling, self.max_pixels, self.allow_absolute_paths = sampling, max_pixels, allow_absolute_paths

    @classmethod
    def of(cls, processor, sampling: FrameSampling, **kwargs) -> VideoInputs | None:
        """VideoInputs for a processor with a video processor (OneVision), None for one without."""
        return cls(processor, sampling, **kwargs) if getattr(processor, "video_processor", None) else None

    def tokens(self, frames: int) -> int:
        side = self.video_processor.size
        size = (frames, side["height"], side["width"])
        return self.processor._get_num_multimodal_tokens(video_sizes=[size]).num_video_tokens[0]

    def locate(self, video: Video, image_dir) -> Path | ZipMember | list:
        return video_paths(video, image_dir, allow_absolute=self.allow_absolute_paths)

    def frame_count(self, video: Video, image_dir) -> int:
        """Frames the video gives: ``data.video_frames``, or under an fps cap as many as its window's length allows
        (read from the file's header)."""
        if video.frame_list or not self.sampling.fps:
            return self.sampling.count()
        return self.sampling.count(window_seconds(self.locate(video, image_dir), video, self.max_pixels))

    def frames(self, video: Video, image_dir) -> list[Image.Image]:
        where = self.locate(video, image_dir)
        if video.frame_list:
            return read_frame_list(where, self.sampling, self.max_pixels)
        return read_video(where, self.sampling, start=video.start, end=video.end, max_pixels=self.max_pixels)

    def pixels(self, frames: list[Image.Image], where="the video") -> torch.Tensor:
        array = frames_array(frames, where)
        out = self.video_processor(videos=[array], do_sample_frames=False, return_tensors="pt")
        return out["pixel_values_videos"][0]
