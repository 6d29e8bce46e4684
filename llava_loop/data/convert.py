"""``llava-loop data convert``: other datasets into LLaVA's chat.json form.

* ``captions``: an image-caption table (CSV, JSON, JSONL, or Parquet with pyarrow installed); every row becomes a
  one-turn record with an instruction from a fixed pool: ``brief`` (short captions, as in CC3M) or
  ``describe-and-read`` (long description + transcription captions, as in TextOCR-GPT4o).
* ``conversations``: ShareGPT-4o / ShareGPT-style records (``conversations`` of from/value) or
  OpenAI-style ``messages`` whose content may be a list of ``{"type": "text"|"image"}`` parts; one image or
  several (``image``/``images`` lists), with image parts becoming ``<image>`` tags where they stand.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ..errors import UserError
from ..template import IMAGE_TOKEN
from .records import ROLE_ALIASES

LLAVA_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
# Brief-description instructions in the spirit of LLaVA's pretraining prompts; one is drawn per caption row.
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "What is shown in this image? Answer briefly.",
    "Write a concise caption for the photo.",
    "Summarize what you see in one sentence.",
    "Provide a brief caption for the image.",
    "Tell me in a few words what the picture shows.",
    "Describe the main content of the image concisely.",
)
# Instructions for long DESCRIPTION + TEXT captions (TextOCR-GPT4o): a brief-caption prompt would contradict them.
DESCRIBE_AND_READ_PROMPTS = (
    "Describe the image in detail and transcribe all the text in it.",
    "Give a detailed description of this picture, then write out every piece of text you can read.",
    "What does this image show? Describe it and transcribe any visible text.",
    "Describe the scene and read out all of the text that appears in it.",
    "Provide a thorough description of the image, including a transcription of its text.",
    "Write a detailed caption for this image and list the text it contains.",
)
PROMPT_POOLS = {"brief": CAPTION_PROMPTS, "describe-and-read": DESCRIBE_AND_READ_PROMPTS}
IMAGE_KEYS = ("image", "file_name", "filename", "image_path", "img", "path")
CAPTION_KEYS = ("caption", "text", "description", "answer")


class ConvertError(UserError):
    """The input cannot be converted; the message names the file, the row and the fix."""


def read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConvertError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data["data"] if isinstance(data, dict) and "data" in data else data


def _pick(row: dict, keys: tuple[str, ...], wanted: str | None, what: str, where: str):
    if wanted:
        if wanted not in row:
            raise ConvertError(f"{where}: no column {wanted!r} (columns: {sorted(row)})")
        return row[wanted]
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    raise ConvertError(f"{where}: no {what} column among {list(keys)} (columns: {sorted(row)}); pass --{what}-key")


def _image_path(value) -> str:
    if isinstance(value, dict):  # HF datasets' Image feature exported as {"path": ..., "bytes": ...}
        value = value.get("path")
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, str) or not value:
        raise ValueError("image must be a relative path string")
    return value


def _image_paths(value) -> list[str]:
    return [_image_path(v) for v in value] if isinstance(value, list) else [_image_path(value)]


def caption_record(
    row: dict,
    where: str,
    rng: random.Random,
    *,
    prompts: tuple[str, ...] = CAPTION_PROMPTS,
    image_key: str | None = None,
    caption_key: str | None = None,
    prompt: str | None = None,
) -> dict:
    """One caption row as a one-turn record: an instruction from ``prompts`` (or ``prompt``), the caption whole."""
    try:
        image = _image_path(_pick(row, IMAGE_KEYS, image_key, "image", where))
    except ValueError as exc:
        raise ConvertError(f"{where}: {exc}") from None
    caption = str(_pick(row, CAPTION_KEYS, caption_key, "caption", where)).strip()
    instruction = prompt or rng.choice(prompts)
    human = f"{IMAGE_TOKEN}\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n{IMAGE_TOKEN}"
    return {
        "id": str(row.get("id", Path(image).stem)),
        "image": image,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
    }


def from_captions(
    path: Path,
    *,
    image_key: str | None = None,
    caption_key: str | None = None,
    prompt: str | None = None,
    prompts: str = "brief",
    seed: int = 0,
) -> list[dict]:
    rng = random.Random(seed)
    pool = PROMPT_POOLS[prompts]
    return [
        caption_record(
            row, f"{path}: row {i}", rng, prompts=pool, image_key=image_key, caption_key=caption_key, prompt=prompt
        )
        for i, row in enumerate(read_rows(path))
    ]


def _message_text(content, where: str) -> str:
    """Flatten string or list-of-parts content into text, image parts becoming <image> tags."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ConvertError(f"{where}: content must be a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text", ""), str):
                raise ConvertError(f"{where}: a text part's text is {type(part['text']).__name__}, not a string")
            texts.append(part.get("text", ""))
        elif kind in ("image", "image_url"):
            texts.append(IMAGE_TOKEN)
        else:
            raise ConvertError(f"{where}: unknown content part {part!r}")
    return "\n".join(t for t in texts if t)


def conversation_record(row: dict, where: str, index: int | str) -> dict:
    """One ShareGPT-style or OpenAI-style record as a LLaVA record, with one ``<image>`` tag per image."""
    if not isinstance(row, dict):
        raise ConvertError(f"{where}: expected an object, got {type(row).__name__}")
    messages = row.get("conversations") or row.get("messages")
    if not messages or not isinstance(messages, list):
        raise ConvertError(f"{where}: no 'conversations' or 'messages'")
    image = row.get("image") or row.get("images") or row.get("image_path")
    conversations = []
    for message in messages:
        if not isinstance(message, dict):
            raise ConvertError(f"{where}: a message is {type(message).__name__}, expected {{from, value}}")
        role = str(message.get("from", message.get("role")))
        text = _message_text(message.get("value", message.get("content")), where)
        conversations.append({"from": LLAVA_FROM.get(ROLE_ALIASES.get(role.lower()), role), "value": text})
    record = {"id": str(row.get("id", index)), "conversations": conversations}
    if image:
        try:
            paths = _image_paths(image)
        except ValueError as exc:
            raise ConvertError(f"{where}: {exc}") from None
        record["image"] = paths[0] if len(paths) == 1 else paths
        tags = sum(c["value"].count(IMAGE_TOKEN) for c in conversations)
        if tags == 0:  # ShareGPT-4o keeps images beside the text: put the tags where LLaVA expects them
            first = next((c for c in conversations if c["from"] == "human"), None)
            if first is None:
                raise ConvertError(f"{where}: an image but no human message to show it in")
            first["value"] = f"{IMAGE_TOKEN}\n" * len(paths) + first["value"]
        elif tags != len(paths):
            raise ConvertError(
                f"{where}: {tags} <image> tags or image parts for {len(paths)} images; each image needs exactly one"
            )
    return record


def from_conversations(path: Path) -> list[dict]:
    return [conversation_record(row, f"{path}: record {i}", i) for i, row in enumerate(read_rows(path))]


LONG_CAPTION_WORDS = 40  # a brief-caption prompt over answers this long teaches the model to ignore prompts


def brief_prompt_warning(records: list[dict]) -> str | None:
    """Why the ``brief`` pool does not fit these captions, when their median is long (TextOCR-GPT4o's)."""
    words = sorted(len(r["conversations"][1]["value"].split()) for r in records)
    median = words[len(words) // 2] if words else 0
    if median <= LONG_CAPTION_WORDS:
        return None
    return (
        f"the captions are long (median {median} words) for brief-caption prompts, which would contradict "
        "them; for description + transcription captions pass --prompts describe-and-read, or give --prompt"
    )


def convert(kind: str, source: str | Path, out: str | Path, **options) -> list[dict]:
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise ConvertError(f"{source}: file not found")
    records = from_captions(source, **options) if kind == "captions" else from_conversations(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return records
