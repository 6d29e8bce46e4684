"""Benchmark 16: video decode throughput of llava_loop/data/video.py, frames/s in one process (one loader worker).

Clips encoded here with PyAV (MPEG-4 part 2, its bundled encoder): the video demo's 64 px clips (16 frames), and
640x360 clips of 30 s at 30 fps (900 frames, a key frame every 2 s) like a short instruction video. Each clip's
``--frames`` sampled frames are read as training reads them (seek to the key frame before each, decode forward),
with FFmpeg's slice threading (PyAV's default, llava_loop's) and with frame threading as well (``AUTO``); the
median of 3 passes. Also: the same 640x360 clips decoded whole, the cost seeking avoids.

    python bench/video_decode.py          # about 2 minutes on the 2-core CPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def write_long_clip(path: Path, seconds: int = 30, fps: int = 30, size=(640, 360)) -> Path:
    """A clip of moving noise bands: cheap to make, not trivially compressible."""
    from fractions import Fraction

    import av
    import numpy as np

    width, height = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width * 2, 3), dtype=np.uint8)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base, stream.gop_size = Fraction(1, fps), 2 * fps
        for i in range(seconds * fps):
            shift = (i * 4) % width
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, shift : shift + width]), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def sampled_rate(clips: list[Path], frames: int, threads: str) -> float:
    from llava_loop.data.video import FrameSampling, read_video

    sampling, timings = FrameSampling(frames), []
    for _ in range(3):
        started = time.perf_counter()
        for clip in clips:
            read_video(clip, sampling, threads=threads)
        timings.append(time.perf_counter() - started)
    return len(clips) * frames / common.median(timings)


def whole_rate(clips: list[Path]) -> tuple[float, float]:
    """(frames/s, clips/s) decoding every frame of each clip."""
    import av

    started, n = time.perf_counter(), 0
    for clip in clips:
        with av.open(str(clip)) as container:
            for frame in container.decode(video=0):
                frame.to_image()
                n += 1
    seconds = time.perf_counter() - started
    return n / seconds, len(clips) / seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    args = parser.parse_args()
    sys.path.insert(0, str(common.ROOT))
    from llava_loop.demo.clips import write_clips

    root = Path(tempfile.mkdtemp(prefix="video-decode-"))
    write_clips(root / "demo", 100, seed=0)
    demo = sorted((root / "demo" / "videos").glob("*.mp4"))
    long = [write_long_clip(root / f"long{i}.mp4") for i in range(4)]
    rows = []
    for name, clips in (("demo: 100 clips, 16 frames, 64 px", demo), ("4 clips, 30 s, 30 fps, 640x360", long)):
        for threads in ("SLICE", "AUTO"):
            label = "slice threads (default)" if threads == "SLICE" else "frame + slice threads"
            rate = sampled_rate(clips, args.frames, threads)
            rows.append([name, f"{args.frames} sampled, {label}", f"{rate:.0f}", f"{rate / args.frames:.1f}"])
    frames, clips = whole_rate(long)
    rows.append(["4 clips, 30 s, 30 fps, 640x360", "every frame decoded (no seeking)", f"{frames:.0f}", f"{clips:.1f}"])
    print(common.header("Video decode, one process (PyAV)", "python bench/video_decode.py"))
    print(common.table(["clips", "read", "frames/s", "clips/s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
