"""Video in records: a file decoded with PyAV (the ``video`` extra), or a list of frame images, sampled to frames.

Sampling is a pure function of the clip and the settings, so a record gives the same frames in every epoch,
process and resume, and anyone can recompute them from the record alone:

* ``frames`` (``data.video_frames``, OneVision's 32): at most that many frames;
* ``fps`` (``data.video_fps``; 0: no cap): at most that many frames per second of the clip, still at most ``frames``;
* a window of the clip (a record's ``video_start`` / ``video_end`` seconds), else all of it.

A file's frames are taken at times spread evenly over the window (each the middle of its share of it), which holds
for variable frame rates too; each is found by seeking to the key frame before it and decoding forward, so a
10-hour video costs its sampled frames, not its length. A frame list is sampled by index the same way.

Every problem is a ``SkipSample`` with its reason: ``missing_video``, ``corrupt_video`` (unreadable, or no video
stream), ``empty_video`` (no frame), ``video_too_large`` (a frame over ``data.max_image_pixels``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .images import MAX_IMAGE_PIXELS, load_image
from .skips import SkipSample

VIDEO_TOKEN = "<video>"


def require_video_extra() -> None:
    """PyAV, or the command that installs it."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise UserError(
            "these records hold videos, which need PyAV to decode: pip install 'llava_loop[video]'"
        ) from None


@dataclass(frozen=True)
class FrameSampling:
    frames: int = 32
    fps: float = 0.0

    def count(self, seconds: float | None, available: int | None = None) -> int:
        """How many frames a clip of ``seconds`` (None: unknown, a frame list) gives, at most ``available``."""
        n = self.frames
        if self.fps and seconds is not None:
            n = min(n, max(1, math.ceil(seconds * self.fps)))
        return n if available is None else min(n, available)

    def times(self, start: float, end: float) -> list[float]:
        """The times (seconds) of a file's frames in ``[start, end)``: the middle of each of ``count`` equal parts."""
        n = self.count(end - start)
        step = (end - start) / n
        return [start + (i + 0.5) * step for i in range(n)]

    def indices(self, available: int) -> list[int]:
        """The indices of a frame list's frames, spread the same way."""
        n = self.count(None, available)
        return [int((i + 0.5) * available / n) for i in range(n)]


def clip_window(duration: float, start: float | None, end: float | None, where) -> tuple[float, float]:
    begin, finish = start or 0.0, duration if end is None else min(end, duration)
    if not 0 <= begin < finish:
        raise SkipSample("empty_video", f"{where}: the window {start}-{end} s holds none of its {duration:.1f} s")
    return begin, finish


def read_video(
    path: Path,
    sampling: FrameSampling,
    *,
    start: float | None = None,
    end: float | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[Image.Image]:
    """The sampled frames of a video file, as RGB images."""
    import av

    if not path.is_file():
        raise SkipSample("missing_video", f"{path} does not exist")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise SkipSample("corrupt_video", f"{path}: {exc}") from None
    with container:
        if not container.streams.video:
            raise SkipSample("corrupt_video", f"{path} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise SkipSample("video_too_large", f"{path}: frames of {width}x{height}, over {max_pixels} pixels")
        duration = _duration(container, stream)
        if not duration:
            raise SkipSample("empty_video", f"{path} holds no frame")
        times = sampling.times(*clip_window(duration, start, end, path))
        try:
            frames = [_frame_at(container, stream, t) for t in times]
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise SkipSample("corrupt_video", f"{path}: {exc}") from None
    if any(frame is None for frame in frames):
        raise SkipSample("empty_video", f"{path}: no frame decodes at some of {len(times)} sampled times")
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
    """The sampled frames of a video given as its frame images (LLaVA-Video-178K, ShareGPT-4o)."""
    if not paths:
        raise SkipSample("empty_video", "the video's frame list is empty")
    return [load_image(paths[i], max_pixels) for i in sampling.indices(len(paths))]


def frames_array(frames: list[Image.Image]) -> np.ndarray:
    """Frames as the (n, height, width, 3) uint8 array transformers' video processors take."""
    return np.stack([np.asarray(frame) for frame in frames])
