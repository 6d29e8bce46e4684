"""``llava-loop data check``: validate a whole dataset before a long run.

Structural errors stop at the first bad record (they would stop training too). Everything the
training run would skip is counted by reason, with examples. Token lengths come from the model's
tokenizer when ``--model`` is given, else from ``Record.estimated_tokens`` with ``image_tokens``
placeholders per image. Images go through the same checks as in training (``images.open_checked``), and
videos too: a file's header (its stream, frame size and length; ``decode``: its sampled frames), each image of a
frame list.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .encode import record_messages
from .images import MAX_IMAGE_PIXELS, EmbeddedImage, image_path, open_checked
from .preference import is_pair, pair_sides
from .skips import SkipSample
from .sources import image_dir_of, open_records, require_data_extra, source_kind
from .video import FrameSampling, read_video, video_paths, window_seconds


def source_records(data: str | Path):
    """``(count, records)`` of any source, in stored order; a row or sample that is itself broken comes as its
    SkipSample. Structural problems of a JSON file raise RecordError here."""
    kind = source_kind(data)
    if kind != "json":
        require_data_extra(kind, data)
    if kind == "shards":
        from .shards import expand, iter_shard, sample_record, shard_counts

        shards = expand(data)

        def shard_records():
            for shard in shards:
                for sample in iter_shard(shard):
                    try:
                        yield sample_record(sample)
                    except SkipSample as skip:
                        yield skip

        return sum(shard_counts(shards)), shard_records()
    records = open_records(data)

    def table_records():
        for i in range(len(records)):
            try:
                yield records[i]
            except SkipSample as skip:
                yield skip

    return len(records), table_records()


def _image_problem(args) -> tuple[str | None, str, tuple[int, int] | None]:
    """(reason or None, detail, (width, height)) for one image; decode fully only when asked."""
    path, decode, max_pixels = args
    try:
        result = open_checked(path, max_pixels, decode=decode)
    except SkipSample as skip:
        return skip.reason, skip.detail, None
    return None, "", result.size if decode else result


def _video_problem(record, image_dir, sampling: FrameSampling, decode: bool, max_pixels: int, absolute: bool):
    """``(seconds or None for a frame list, image paths to check as images)`` of a record's video; its problems are
    SkipSamples. A file's header is read (its frames decoded too when ``decode``); a frame list's images go with
    the other images."""
    video = record.video
    where = video_paths(video, image_dir, allow_absolute=absolute)
    if video.frame_list:
        if not where:
            raise SkipSample("empty_video", f"{record.id}: the video's frame list is empty")
        return None, where
    seconds = window_seconds(where, video, max_pixels)
    if decode:
        read_video(where, sampling, start=video.start, end=video.end, max_pixels=max_pixels)
    return seconds, []


def check_dataset(
    data: str | Path,
    image_dir: str | Path,
    *,
    decode: bool = False,
    processor=None,
    max_length: int = 2048,
    image_tokens: int = 0,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    allow_absolute_paths: bool = False,
    workers: int = 0,
    progress: bool = True,
    template: str = "chat",
    video_frames: int = 32,
    video_fps: float = 0.0,
) -> dict:
    """Count every problem the training run would skip. ``image_tokens`` is the placeholders per image for
    the length estimate when no ``processor`` gives exact lengths."""
    image_dir = image_dir_of(data, image_dir or "")
    count, records = source_records(data)
    problems: Counter = Counter()
    examples: dict[str, str] = {}
    lengths, image_jobs, image_ids, embedded, with_image, pairs = [], [], [], [], 0, 0
    text_tokens, turns, images_per_record = [], [], []  # per record past the text checks, for report.py
    video_frames_per, video_seconds, video_tokens = [], [], []  # per video record, for report.py
    frame_images = 0  # the images of frame-list videos, checked as images are
    sampling = FrameSampling(video_frames, video_fps)
    encoder = None
    if processor is not None:
        from .encode import SampleEncoder

        encoder = SampleEncoder(
            processor,
            max_length=max_length,
            max_image_pixels=max_image_pixels,
            allow_absolute_paths=allow_absolute_paths,
            template=template,
            video_frames=video_frames,
            video_fps=video_fps,
        )
    if progress:
        from rich.progress import track

        records = track(records, total=count, description=f"checking {count} records")
    for record in records:
        if isinstance(record, SkipSample):
            problems[record.reason] += 1
            examples.setdefault(record.reason, record.detail)
            continue
        try:
            paths = [image_path(image_dir, name, allow_absolute=allow_absolute_paths) for name in record.images]
            seconds, frames = None, []
            if record.video is not None:
                seconds, frames = _video_problem(
                    record, image_dir, sampling, decode, max_image_pixels, allow_absolute_paths
                )
            if encoder is not None:
                ids, _ = encoder.encode_text(record, image_dir)  # a tiled model's counts read the headers
                lengths.append(len(ids))
                held = ids.count(encoder.video.token_id) if encoder.video is not None else 0
                text_tokens.append(len(ids) - ids.count(encoder.image_token_id) - held)
                video_tokens += [held] if record.video is not None else []
            else:
                for side in pair_sides(record) if is_pair(record) else (record,):
                    record_messages(side)
                sides = 2 if is_pair(record) else 1  # a pair trains on its prompt twice, once per answer
                # a video: OneVision pools each frame's patch grid by 2 a side, and adds one newline
                video = sampling.count(seconds) * math.ceil(math.sqrt(image_tokens) / 2) ** 2 + 1 if record.video else 0
                lengths.append(sides * (record.estimated_tokens(image_tokens) + video))
                text_tokens.append(record.estimated_tokens(0))
            pairs += is_pair(record)
            turns.append(sum(role in ("assistant", "chosen") for role, _ in record.turns))
            images_per_record.append(len(record.images))
            if record.video is not None:
                video_frames_per.append(sampling.count(seconds))
                video_seconds += [seconds] if seconds is not None else []
        except SkipSample as skip:
            problems[skip.reason] += 1
            examples.setdefault(skip.reason, f"{record.id}: {skip.detail}")
            continue
        with_image += bool(paths)
        frame_images += len(frames)
        for path in paths + frames:
            if isinstance(path, EmbeddedImage):  # checked here: its bytes are not kept for a pool
                reason, detail, size = _image_problem((path, decode, max_image_pixels))
                embedded.append((record.id, path, (reason, detail, size)))
            else:
                image_jobs.append((path, decode, max_image_pixels))
                image_ids.append(record.id)
    sizes = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_image_problem, image_jobs, chunksize=256))
    else:
        results = map(_image_problem, image_jobs)
        if progress:
            from rich.progress import track

            results = track(results, total=len(image_jobs), description=f"{'decoding' if decode else 'opening'} images")
    for rid, path, (reason, detail, size) in [*embedded, *zip(image_ids, (job[0] for job in image_jobs), results)]:
        if not reason and encoder is not None:  # what the model's preprocessing would make of it
            try:
                encoder.check_working_size(size, path)
            except SkipSample as skip:
                reason, detail = skip.reason, skip.detail
        if reason:
            problems[reason] += 1
            examples.setdefault(reason, f"{rid}: {detail}")
        else:
            sizes.append(size)
    lengths_arr = np.array(lengths) if lengths else np.zeros(1)
    sizes_arr = np.array(sizes) if sizes else np.zeros((1, 2))
    return {
        "records": count,
        "videos": len(video_frames_per),
        "pairs": pairs,  # preference records among them (data/preference.py)
        "with_image": with_image,
        "images": len(image_jobs) + len(embedded) - frame_images,
        "problems": dict(problems),
        "examples": examples,
        "token_lengths": {f"p{q}": int(np.percentile(lengths_arr, q)) for q in (50, 90, 99, 100)},
        "token_lengths_estimated": encoder is None,
        "image_sizes": {
            "width": {k: int(f(sizes_arr[:, 0])) for k, f in (("min", np.min), ("median", np.median), ("max", np.max))},
            "height": {
                k: int(f(sizes_arr[:, 1])) for k, f in (("min", np.min), ("median", np.median), ("max", np.max))
            },
        },
        "decoded": decode,
        # per record and per image, for report.py; not written to --json
        "distributions": {
            "total_tokens": np.array(lengths, dtype=np.int64),
            "text_tokens": np.array(text_tokens, dtype=np.int64),
            "turns": np.array(turns, dtype=np.int64),
            "images": np.array(images_per_record, dtype=np.int64),
            "sizes": np.array(sizes, dtype=np.int64).reshape(-1, 2),
            "video_frames": np.array(video_frames_per, dtype=np.int64),
            "video_seconds": np.array(video_seconds, dtype=np.float64),
            "video_tokens": np.array(video_tokens, dtype=np.int64),
        },
    }
