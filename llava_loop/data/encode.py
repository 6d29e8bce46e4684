"""One record -> one training sample: chat template, labels, image and video placeholders, pixels.

Labels supervise exactly the assistant answers plus their closing turn token; everything else
(system, user, template scaffolding, image placeholders) is -100. The supervised spans come from the
tokenizer's own chat template (see ``template.py``), not from hard-coded ChatML offsets. ``data.template: plain``
is LLaVA-1.5's stage-1 layout instead: the image, the caption, its end (``plain_tokens``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import jinja2
import torch
from PIL import Image

from ..errors import UserError
from ..template import IMAGE_TOKEN, VIDEO_TOKEN, TemplateError, message_spans, render, tokenize
from .images import (
    MAX_IMAGE_PIXELS,
    expand_to_square,
    fast_path_applies,
    fast_pixels,
    image_path,
    load_image,
    open_checked,
    processed_size,
)
from .preference import is_pair, pair_sides
from .records import Record
from .skips import SkipSample
from .tiles import Tiler
from .video import FrameSampling, VideoInputs

IGNORE_INDEX = -100
KNOWN_ROLES = ("system", "user", "assistant")


def image_tokens_per_image(processor) -> int:
    """Placeholders one ``<image>`` expands to, computed the way LlavaProcessor does (a tiled processor: an image
    of the tower's own size, alone in its sample)."""
    tiler = Tiler.of(processor)
    if tiler is not None:
        return tiler.tokens(tiler.side, tiler.side, 1)
    height, width = processed_size(processor.image_processor)
    n = (height // processor.patch_size) * (width // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def place_image_token(text: str, tag: str = IMAGE_TOKEN) -> str:
    """``<image>`` (or ``<video>``) at the start of its turn, on its own line, wherever the data put it (as LLaVA
    does)."""
    rest = text.replace(tag, "").strip()
    return f"{tag}\n{rest}" if rest else tag


def check_tags(record: Record, tag: str, expected: int, reason: str, noun: str) -> None:
    n_tags = sum(text.count(tag) for _, text in record.turns)
    if n_tags != expected or any(tag in text for role, text in record.turns if role != "user"):
        raise SkipSample(
            reason, f"record {record.id}: {n_tags} {tag} tags for {expected} {noun}(s) (tags go in user turns)"
        )


def record_messages(record: Record, system_prompt: str = "") -> list[dict]:
    """Validated chat messages for a record. One image (or a video alone): its tag moves to the start of its turn,
    as LLaVA does. Several: each tag stays where the data put it (interleaved), and stands for the images in
    order."""
    unknown = sorted({role for role, _ in record.turns if role not in KNOWN_ROLES})
    if unknown:
        raise SkipSample("unknown_role", f"record {record.id}: roles {unknown}")
    expected = len(record.images)
    check_tags(record, IMAGE_TOKEN, expected, "image_token_mismatch", "image")
    check_tags(record, VIDEO_TOKEN, int(record.video is not None), "video_token_mismatch", "video")
    alone = {IMAGE_TOKEN: expected == 1 and record.video is None, VIDEO_TOKEN: expected == 0}
    messages = []
    if system_prompt and not any(role == "system" for role, _ in record.turns):
        messages.append({"role": "system", "content": system_prompt})
    for role, text in record.turns:
        text = text.strip()
        for tag in (IMAGE_TOKEN, VIDEO_TOKEN):
            if tag in text and alone[tag]:
                text = place_image_token(text, tag)
        messages.append({"role": role, "content": text})
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers or not all(answers):
        raise SkipSample("empty_answer", f"record {record.id}: an assistant turn is empty (its loss would be NaN)")
    return messages


def first_exchange(record_id: str, messages: list[dict]) -> tuple[int, str]:
    """``(index of the first user message, the answer that follows it)``: the question evaluation generates for
    and its reference. A record with no answer after a user turn has no question to ask (SkipSample)."""
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    answer = (
        None if user is None else next((m["content"] for m in messages[user + 1 :] if m["role"] == "assistant"), None)
    )
    if answer is None:
        raise SkipSample(
            "no_question",
            f"record {record_id}: no user turn is followed by an answer, so there is no "
            "question to generate for (give it a user turn before an assistant turn)",
        )
    return user, answer


def tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels, and the token index just past each assistant turn's closing token."""
    text = render(tokenizer, messages)
    located = message_spans(tokenizer, messages, text)
    spans = [(start, closed) for m, (start, _, closed) in zip(messages, located) if m["role"] == "assistant"]
    ids, offsets = tokenize(tokenizer, text, [(start, end) for start, end, _ in located])
    labels = [IGNORE_INDEX] * len(ids)
    turn_ends = []
    span_iter = iter(spans)
    start, end = next(span_iter)
    for i, (a, b) in enumerate(offsets):
        while a >= end:  # past this span: close it and move to the next one
            turn_ends.append(i)
            nxt = next(span_iter, None)
            if nxt is None:
                return ids, labels, turn_ends
            start, end = nxt
        if b > start and a < end and b > a:
            labels[i] = ids[i]
    turn_ends.append(len(ids))
    return ids, labels, turn_ends


def plain_tokens(
    tokenizer, record: Record, image_token_id: int, caption_end: str = "eos"
) -> tuple[list[int], list[int], list[int]]:
    """LLaVA-1.5's ``plain`` pretraining layout: the record's images, then its caption (the one answer), closed by
    the end-of-text token (LLaVA's code closes it with a newline; an end token is what generation stops at); no
    system prompt, question or chat template. Only the caption and that token are supervised.
    Token ids, labels and the one turn end, as ``tokenize_messages`` gives them."""
    messages = record_messages(record)  # the same checks: roles, <image> tags, an empty answer
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if len(answers) != 1 or not record.images:
        raise SkipSample(
            "not_a_caption",
            f"record {record.id}: data.template=plain trains on images and one caption; this record has "
            f"{len(record.images)} images and {len(answers)} answers (use data.template=chat)",
        )
    prefix = plain_prefix(tokenizer, image_token_id, len(record.images))
    if caption_end == "newline":  # LLaVA's layout: the caption and its separator tokenized as one text
        caption = tokenize(tokenizer, answers[0] + "\n", [(0, len(answers[0]))])[0]
    else:
        caption = tokenize(tokenizer, answers[0], [(0, len(answers[0]))])[0] + [tokenizer.eos_token_id]
    ids = prefix + caption
    return ids, [IGNORE_INDEX] * len(prefix) + caption, [len(ids)]


def plain_prefix(tokenizer, image_token_id: int, n_images: int) -> list[int]:
    """What comes before a ``plain`` caption: the tokenizer's BOS where it adds one (Llama, Gemma), the images."""
    return bos_ids(tokenizer) + [image_token_id] * n_images


@lru_cache(maxsize=8)
def bos_ids(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts text with it, else ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def expand_image_tokens(ids, labels, turn_ends, image_token_id: int, counts: list[int]):
    """Replace the i-th ``<image>`` id by ``counts[i]`` placeholders (labels -100), shifting turn ends to match."""
    out_ids, out_labels, new_index = [], [], []
    counts = iter(counts)
    for token, label in zip(ids, labels):
        new_index.append(len(out_ids))
        if token == image_token_id:
            n = next(counts)
            out_ids += [image_token_id] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(token)
            out_labels.append(label)
    new_index.append(len(out_ids))
    return out_ids, out_labels, [new_index[e] for e in turn_ends]


def blocks_held(n_placeholders: int, counts: list[int]) -> int:
    """How many leading image blocks of ``counts`` placeholders ``n_placeholders`` make up (truncation keeps or drops
    a block whole)."""
    held = 0
    for count in counts:
        if count > n_placeholders:
            break
        n_placeholders -= count
        held += 1
    return held


class SampleEncoder:
    """Callable turning a ``Record`` into ``{"id", "input_ids", "labels", "pixel_values", "pixel_values_videos"}``
    or raising SkipSample.

    A tiled model's samples also carry ``image_sizes`` (height, width per image; its placeholder counts follow them)
    and, for OneVision, ``batch_num_images``; their ``pixel_values`` are every image's tiles, concatenated. A
    OneVision sample's video is ``(frames, 3, side, side)`` (``video.VideoInputs``)."""

    def __init__(
        self,
        processor,
        *,
        max_length: int,
        system_prompt: str = "",
        image_aspect_ratio: str = "resize",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        allow_absolute_paths: bool = False,
        template: str = "chat",
        caption_end: str = "eos",
        video_frames: int = 32,
        video_fps: float = 0.0,
    ):
        self.tokenizer = processor.tokenizer
        if template == "plain" and self.tokenizer.eos_token_id is None:
            raise UserError("data.template=plain ends each caption with the end-of-text token; the tokenizer has none")
        self.template, self.caption_end = template, caption_end
        self.image_processor = processor.image_processor
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.tiler = Tiler.of(processor)
        if self.tiler is not None and image_aspect_ratio == "pad":
            raise UserError(
                "data.image_aspect_ratio=pad squares every image, but this model tiles images at their own aspect "
                f"ratio ({self.tiler.describe()}); use data.image_aspect_ratio=resize"
            )
        self.n_image_tokens = image_tokens_per_image(processor)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_aspect_ratio = image_aspect_ratio
        self.max_image_pixels = max_image_pixels
        self.allow_absolute_paths = allow_absolute_paths
        self.pad_fill = tuple(int(255 * m) for m in self.image_processor.image_mean)
        self.fast_pixels = fast_path_applies(self.image_processor)
        self.video = VideoInputs.of(
            processor,
            FrameSampling(video_frames, video_fps),
            max_pixels=max_image_pixels,
            allow_absolute_paths=allow_absolute_paths,
        )

    def placeholder_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Placeholders each image of one sample fills, from the images' (height, width)."""
        if self.tiler is None:
            return [self.n_image_tokens] * len(sizes)
        return [self.tiler.tokens(height, width, len(sizes)) for height, width in sizes]

    def image_sizes(self, record: Record, image_dir: str | Path | None) -> list[tuple[int, int]]:
        """Each image's (height, width): read from the file headers for a tiled model, whose placeholder counts
        follow them (a fixed-size model needs none and opens nothing)."""
        if self.tiler is None:
            return [(0, 0)] * len(record.images)
        if image_dir is None:
            raise ValueError("a tiled model's token counts need the images: pass image_dir")
        sizes = []
        for name in record.images:
            where = image_path(image_dir, name, allow_absolute=self.allow_absolute_paths)
            width, height = open_checked(where, self.max_image_pixels, decode=False)
            sizes.append((height, width))
        return sizes

    def video_frames(self, record: Record, image_dir: str | Path | None) -> int:
        """How many frames the record's video gives (0: it has none); under ``data.video_fps`` read from its
        file's header. A video for a model without a video path is the run's error, not the record's."""
        if record.video is None:
            return 0
        if self.video is None:
            raise UserError(
                f"record {record.id} holds a video, and this model takes none: build it with --arch "
                "llava-onevision (llava-loop build), or leave video records out of data.path"
            )
        return self.video.frame_count(record.video, image_dir)

    def encode_text(self, record: Record, image_dir: str | Path | None = None) -> tuple[list[int], list[int]]:
        """Token ids and labels; later turns are dropped whole when too long, so an image block is never cut (the
        images of dropped turns go with them). ``image_dir``: where a tiled model's images are (their sizes count),
        and videos (their frame counts, under an fps cap). A preference pair's are its two sequences end to end:
        what it holds of a micro-batch."""
        sizes, frames = self.image_sizes(record, image_dir), self.video_frames(record, image_dir)
        if is_pair(record):
            (chosen, chosen_labels), (rejected, rejected_labels) = self.encode_pair(record, sizes, frames)
            return chosen + rejected, chosen_labels + rejected_labels
        ids, labels, _ = self.encode_kept(record, sizes, frames)
        return ids, labels

    def expand_visuals(self, ids, labels, turn_ends, counts: list[int], frames: int = 0):
        """``expand_image_tokens`` for the images (``counts`` placeholders each), then the video of ``frames``."""
        ids, labels, turn_ends = expand_image_tokens(ids, labels, turn_ends, self.image_token_id, counts)
        if frames:
            ids, labels, turn_ends = expand_image_tokens(
                ids, labels, turn_ends, self.video.token_id, [self.video.tokens(frames)]
            )
        return ids, labels, turn_ends

    def encode_pair(
        self, record: Record, sizes: list[tuple[int, int]], frames: int = 0
    ) -> list[tuple[list[int], list[int]]]:
        """A preference pair's chosen and rejected sequences: each the prompt laid out as training lays out any
        record, then its answer as the assistant's, only that answer (and its end of turn) supervised. A pair whose
        longer sequence exceeds ``max_length`` is skipped: cutting it would score a part of an answer."""
        sides = []
        for (role, _), side in zip(record.turns[-2:], pair_sides(record)):
            ids, labels, ends = self.tokens(side)
            labels = [IGNORE_INDEX] * ends[-2] + labels[ends[-2] :] if len(ends) > 1 else labels
            ids, labels, _ = self.expand_visuals(ids, labels, [], self.placeholder_counts(sizes), frames)
            if len(ids) > self.max_length:
                raise SkipSample(
                    "too_long", f"record {record.id}: its {role} sequence is {len(ids)} tokens > data.max_length"
                )
            sides.append((ids, labels))
        return sides

    def encode_kept(
        self, record: Record, sizes: list[tuple[int, int]], frames: int = 0
    ) -> tuple[list[int], list[int], int]:
        """``encode_text`` given the images' sizes and the video's frames, and how many of the record's images the
        kept turns show (whether they show its video: its token is in the ids)."""
        counts = self.placeholder_counts(sizes)
        text_ids, text_labels, text_ends = self.tokens(record)
        ids, labels, kept = self.fit(record, text_ids, text_labels, text_ends, counts, frames)
        if kept != len(sizes) and self.placeholder_counts(sizes[:kept]) != counts[:kept]:
            # the kept images are laid out as their own count says (OneVision tiles a lone image), and fit again
            counts = self.placeholder_counts(sizes[:kept]) + counts[kept:]
            ids, labels, kept = self.fit(record, text_ids, text_labels, text_ends, counts, frames)
        return ids, labels, kept

    def tokens(self, record: Record) -> tuple[list[int], list[int], list[int]]:
        """A record's text as its layout (``chat`` or ``plain``) tokenizes it: ids, labels, turn ends."""
        if self.template == "plain":
            return plain_tokens(self.tokenizer, record, self.image_token_id, self.caption_end)
        messages = record_messages(record, self.system_prompt)
        try:
            return tokenize_messages(self.tokenizer, messages)
        except (TemplateError, jinja2.TemplateError) as exc:
            if not self.tokenizer.chat_template:  # no record can be encoded: the run's error, not this one's
                raise
            raise SkipSample("template_error", f"record {record.id}: {exc}") from None

    def fit(
        self, record: Record, ids, labels, turn_ends, counts: list[int], frames: int = 0
    ) -> tuple[list[int], list[int], int]:
        """Images expanded to ``counts`` placeholders (the video to its frames'), then later turns dropped whole past
        ``max_length``."""
        ids, labels, turn_ends = self.expand_visuals(ids, labels, turn_ends, counts, frames)
        if len(ids) > self.max_length:
            fitting = [end for end in turn_ends if end <= self.max_length]
            if not fitting:  # the first exchange, its images included, does not fit
                first = turn_ends[0]
                held = f"{ids[:first].count(self.image_token_id)} of them image placeholders"
                if frames:
                    held += f", {ids[:first].count(self.video.token_id)} video placeholders"
                raise SkipSample(
                    "too_long",
                    f"record {record.id}: its first answer ends at token {first} ({held}) "
                    f"> data.max_length={self.max_length}",
                )
            ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]  # drop later turns whole
        return ids, labels, blocks_held(ids.count(self.image_token_id), counts)

    def question_ids(self, prompt: str, images: int = 1, video: bool = False) -> list[int]:
        """Token ids of a one-turn prompt ready for generation, laid out exactly as training lays out a record with
        ``images`` images (and a ``video``), with one ``<image>`` id per image (``expand`` fills them in). One
        image (or a video alone): its tag goes to the start of the turn, wherever the prompt put it or if it put
        none. Several: the prompt's tags, one per image in order, stay where they are; a prompt with none gets them
        at its start, one per line. Under ``plain`` the images are the whole prompt: the model was taught to
        caption what it is shown, and ``prompt`` is not used."""
        if self.template == "plain":
            return plain_prefix(self.tokenizer, self.image_token_id, images)
        if prompt.count(VIDEO_TOKEN) > int(video):
            raise UserError(f"the prompt has {prompt.count(VIDEO_TOKEN)} {VIDEO_TOKEN} tags for {int(video)} video")
        if video and VIDEO_TOKEN not in prompt:
            prompt = f"{VIDEO_TOKEN}\n{prompt}"
        if video and not images:
            return self.generation_ids(
                self.with_system([{"role": "user", "content": place_image_token(prompt, VIDEO_TOKEN)}])
            )
        tags = prompt.count(IMAGE_TOKEN)
        if tags not in (0, images):
            raise UserError(
                f"the prompt has {tags} {IMAGE_TOKEN} tags for {images} image(s): write one per image, in the order "
                "the images are given, or none (then they go at the start of the prompt)"
            )
        if images == 1 and not video:
            content = place_image_token(prompt if tags else IMAGE_TOKEN + prompt)
        elif tags == images:  # several tags in place, or no image at all
            content = prompt.strip()
        else:
            content = "\n".join([IMAGE_TOKEN] * images + [prompt.strip()])
        return self.generation_ids(self.with_system([{"role": "user", "content": content}]))

    def with_system(self, messages: list[dict]) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, *messages] if self.system_prompt else messages

    def prompt_ids(self, prompt: str, sizes: tuple[tuple[int, int], ...] = ((0, 0),), frames: int = 0) -> list[int]:
        """``question_ids`` with each image's placeholders in place (``sizes``: one (height, width) per image, which
        a tiled model's counts follow; empty for a text-only prompt), and a video's of ``frames`` frames."""
        return self.expand(self.question_ids(prompt, len(sizes), video=bool(frames)), list(sizes), frames)

    def first_question(self, record: Record) -> tuple[list[int], str, str]:
        """A record's first question as token ids ready for generation, its text, and the reference answer (see
        ``first_exchange``). The ids are the training layout's own prefix (system prompt, image tags where training
        puts them) with one ``<image>`` id per image it shows, the record's first ``ids.count(image_token_id)``.
        Under ``plain``: the images alone, and the caption."""
        messages = record_messages(record, self.system_prompt)
        user, answer = first_exchange(record.id, messages)
        if self.template == "plain":
            return plain_prefix(self.tokenizer, self.image_token_id, len(record.images)), "", answer
        return self.generation_ids(messages[: user + 1]), messages[user]["content"], answer

    def generation_ids(self, messages: list[dict]) -> list[int]:
        text = render(self.tokenizer, messages, add_generation_prompt=True)
        located = message_spans(self.tokenizer, messages, text)
        return tokenize(self.tokenizer, text, [(start, end) for start, end, _ in located])[0]

    def expand(self, ids: list[int], sizes: list[tuple[int, int]], frames: int = 0) -> list[int]:
        """Generation ids with each ``<image>`` id replaced by its image's placeholders, and the ``<video>`` id by
        its ``frames`` frames'."""
        ids, _, _ = self.expand_visuals(ids, [IGNORE_INDEX] * len(ids), [], self.placeholder_counts(sizes), frames)
        return ids

    def pixels(self, path: Path) -> torch.Tensor:
        return self.pixel_values(self.load(path))

    def load(self, where) -> Image.Image:
        """An image file decoded to RGB; a ``SkipSample`` when it, or what its preprocessing makes of it, is too
        large (``check_working_size``)."""
        image = load_image(where, self.max_image_pixels)
        self.check_working_size(image.size, where)
        return image

    def check_working_size(self, size: tuple[int, int], name="the image") -> None:
        """A ``SkipSample`` when a fixed-size model's preprocessing would hold more than ``max_image_pixels`` at
        once: ``pad`` squares the image first, and a shortest-edge resize scales the short side to its target
        before the centre crop, so a 30000x1 strip would become 1,920,000x64 (10,080,000x336 at CLIP-L/336). A
        tiled model's views are bounded by its grid, and its base view is a fixed-size resize."""
        if self.tiler is not None:
            return
        width, height = (max(size),) * 2 if self.image_aspect_ratio == "pad" else size
        working = width * height
        short = dict(getattr(self.image_processor, "size", None) or {}).get("shortest_edge")
        if short:
            scale = short / min(width, height)
            working = max(working, round(width * scale) * round(height * scale))
        if working > self.max_image_pixels:
            raise SkipSample(
                "extreme_aspect_ratio",
                f"{name} is {size[0]}x{size[1]}: preprocessing it would hold {working:,} pixels at once, over "
                f"data.max_image_pixels={self.max_image_pixels:,}; crop it to a saner aspect ratio",
            )

    def pixel_values(self, image) -> torch.Tensor:
        """An RGB PIL image -> normalised (3, H, W) pixels, padded to square first in ``pad`` mode (fixed-size
        models; a tiled one's come from ``image_inputs``)."""
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, self.pad_fill)
        if self.fast_pixels:  # same pixels as the CLIP / SigLIP processor, ~6x cheaper at 336 px (docs/BENCHMARKS.md)
            return fast_pixels(image, self.image_processor)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def image_inputs(self, images: list) -> dict:
        """One sample's RGB images -> the model's image inputs: ``pixel_values`` (n, 3, H, W); for a tiled model
        every image's tiles concatenated, with ``image_sizes`` (and OneVision's ``batch_num_images``)."""
        if not images:
            return {"pixel_values": None}
        if self.tiler is None:
            return {"pixel_values": torch.stack([self.pixel_values(image) for image in images])}
        inputs = {
            "pixel_values": self.tiler.views(images),
            "image_sizes": torch.tensor([[image.height, image.width] for image in images], dtype=torch.long),
        }
        if self.tiler.onevision:
            inputs["batch_num_images"] = torch.tensor([len(images)], dtype=torch.long)
        return inputs

    def video_inputs(self, record: Record, image_dir, frames: int) -> torch.Tensor:
        """The record's video as its ``frames`` frames' pixels."""
        pixels = self.video.pixels(self.video.frames(record.video, image_dir), record.video)
        if len(pixels) != frames:  # the count the placeholders were laid out for
            raise SkipSample("corrupt_video", f"{record.video}: {len(pixels)} frames decoded, {frames} expected")
        return pixels

    def __call__(self, record: Record, image_dir: str | Path) -> dict:
        # text first (with only the headers of a tiled model's images read): cheap checks before image decode
        sizes, frames = self.image_sizes(record, image_dir), self.video_frames(record, image_dir)
        if is_pair(record):  # the chosen sequence, and the rejected one beside it: one sample, never split
            (ids, labels), (rejected, rejected_labels) = self.encode_pair(record, sizes, frames)
            kept = len(record.images)
            pair = {"rejected": {"input_ids": as_ids(rejected), "labels": as_ids(rejected_labels)}}
        else:
            ids, labels, kept = self.encode_kept(record, sizes, frames)
            pair = {}
        shown = frames and self.video.token_id in ids  # the video's turn kept
        names = record.images[:kept]  # every image the kept turns refer to, in tag order
        where = [image_path(image_dir, name, allow_absolute=self.allow_absolute_paths) for name in names]
        return {
            "id": record.id,
            "input_ids": as_ids(ids),
            "labels": as_ids(labels),
            **pair,
            **self.image_inputs([self.load(path) for path in where]),
            "pixel_values_videos": self.video_inputs(record, image_dir, frames) if shown else None,
        }


def as_ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
