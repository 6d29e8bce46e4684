"""Read LLaVA-style conversation records and keep them compactly.

Accepted files: a JSON list (LLaVA's ``chat.json``), JSONL, or ``{"data": [...]}``. Each record has
``id``, an optional ``image`` (one path relative to the image folder, or a list of them for multi-image
records), an optional ``video`` (a file, or the list of its frame images; ``video_start`` / ``video_end``: a window
of it in seconds) and ``conversations`` of ``{"from": human|gpt|system, "value"}`` or ``{"role", "content"}``
messages. A video stands where its ``<video>`` tag is; a record with a video, no image and one ``<image>`` tag
(LLaVA-Video-178K's and LLaVA-NeXT's convention) has that tag read as ``<video>``.

Structural problems (malformed JSON, bad encoding, a record without ``conversations``...) fail here
with the file name and record index, before any model is loaded. Content problems (unknown roles,
an empty answer, a wrong ``<image>`` count) are left to the encoder, which skips and counts them.

Records are stored as one UTF-8 blob plus an offsets array rather than as ~600K Python dicts: about
the size of the file itself, and copy-on-write friendly for forked DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..template import IMAGE_TOKEN, VIDEO_TOKEN
from .images import EmbeddedImage
from .video import Video

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(UserError):
    """A data file is structurally broken; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class Record:
    id: str
    images: tuple[str | EmbeddedImage, ...]  # paths relative to the image folder, or embedded images, in the order
    # of the record's <image> tags; empty for text-only records
    turns: tuple[tuple[str, str], ...]  # (role, text); role is normalised where known, else kept as given
    video: Video | None = None

    def estimated_tokens(self, image_tokens: int) -> int:
        """A cheap length estimate without a tokenizer: about 4 characters per text token, plus the images."""
        return sum(len(text) for _, text in self.turns) // 4 + image_tokens * len(self.images)


class Records:
    """An immutable, indexable list of ``Record`` backed by a single bytes blob."""

    def __init__(
        self,
        blob: bytes,
        offsets: np.ndarray,
        source: str,
        index: np.ndarray | None = None,
        *,
        holds_video: bool = False,
        holds_video_files: bool = False,
    ):
        self._blob = blob
        self._offsets = offsets
        self._index = index  # a subset view shares the blob
        self.source = source
        self.holds_video = holds_video  # whether the file has a video record (a subset keeps the file's answer)
        self.holds_video_files = holds_video_files  # whether one is a file (decoded with PyAV), not frame images

    @classmethod
    def from_encoded(cls, encoded: list[bytes], source: str, **video) -> Records:
        """``video``: ``holds_video`` and ``holds_video_files``, as ``video_kinds`` finds them."""
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets, source, **video)

    @classmethod
    def from_records(cls, records: list[Record], source: str = "<memory>") -> Records:
        return cls.from_encoded([_encode(r) for r in records], source, **video_kinds(records))

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._index is None else len(self._index)

    def __getitem__(self, index: int) -> Record:
        if self._index is not None:
            index = int(self._index[index])
        start, end = self._offsets[index], self._offsets[index + 1]
        rid, images, turns, *video = json.loads(self._blob[start:end])  # a video is a fourth field
        turns = tuple((role, text) for role, text in turns)
        return Record(rid, tuple(images), turns, Video.from_json(video[0]) if video else None)

    def subset(self, indices) -> Records:
        base = np.asarray(indices, dtype=np.int64)
        if self._index is not None:
            base = self._index[base]
        video = {"holds_video": self.holds_video, "holds_video_files": self.holds_video_files}
        return Records(self._blob, self._offsets, self.source, base, **video)

    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes

    def fingerprint(self) -> str:
        """A digest of exactly these records (content and order), for caches derived from them."""
        digest = hashlib.sha256(self._blob)
        digest.update(self._offsets.tobytes())
        if self._index is not None:
            digest.update(self._index.tobytes())
        return digest.hexdigest()


def video_kinds(records) -> dict[str, bool]:
    """Whether ``records`` hold a video, and a video file (not frame images)."""
    videos = [r.video for r in records if r.video is not None]
    return {"holds_video": bool(videos), "holds_video_files": any(not v.frame_list for v in videos)}


def _encode(record: Record) -> bytes:
    fields = [record.id, record.images, record.turns] + ([record.video.to_json()] if record.video else [])
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


def _where(path: Path, index: int, raw) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"{path}: record {index}" + (f" (id {rid!r})" if rid is not None else "")


def normalize_record(raw, path: Path, index: int) -> Record:
    """Validate one raw record's structure and return it in normalised form."""
    from .preference import is_preference, normalize_preference  # which imports this module's Record

    where = _where(path, index, raw)
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected an object with id/image/conversations, got {type(raw).__name__}")
    if is_preference(raw):
        return normalize_preference(raw, where, index)
    conversations = raw.get("conversations", raw.get("messages"))
    if conversations is None:
        raise RecordError(f"{where}: no 'conversations' list; each record needs conversations=[{{from, value}}, ...]")
    if not isinstance(conversations, list) or not conversations:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} messages")
    turns = [message_turn(message, f"{where}: message {t}", _string) for t, message in enumerate(conversations)]
    image = raw.get("image")
    images = image if isinstance(image, list) else [] if image in (None, "") else [image]
    if not all(isinstance(i, EmbeddedImage) or (isinstance(i, str) and i) for i in images):
        raise RecordError(f"{where}: 'image' must be a relative path or a list of them, got {image!r}")
    video = read_video_field(raw, where)
    if video is not None and not images:
        turns = video_tag_from_image_tag(turns)
    rid = raw.get("id", index)
    return Record(str(rid), tuple(images), tuple(turns), video)


def read_video_field(raw: dict, where: str) -> Video | None:
    """A record's ``video`` (a path, or its frame images' paths) and window (``video_start`` / ``video_end``)."""
    source = raw.get("video")
    if source in (None, "", []):
        return None
    if isinstance(source, list) and all(isinstance(name, str) and name for name in source):
        source = tuple(source)
    elif not isinstance(source, str):
        raise RecordError(f"{where}: 'video' must be a relative path or a list of frame image paths, got {source!r}")
    window = [raw.get("video_start"), raw.get("video_end")]
    if not all(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0) for t in window):
        raise RecordError(f"{where}: video_start / video_end must be seconds (numbers >= 0), got {window}")
    return Video(source, *(None if t is None else float(t) for t in window))


def video_tag_from_image_tag(turns: list) -> list:
    """A video record with no ``<video>`` tag and one ``<image>`` tag: that tag, as LLaVA-Video's data writes it."""
    texts = [text for _, text in turns]
    if any(VIDEO_TOKEN in text for text in texts) or sum(text.count(IMAGE_TOKEN) for text in texts) != 1:
        return turns
    return [(role, text.replace(IMAGE_TOKEN, VIDEO_TOKEN)) for role, text in turns]


def message_turn(message, where: str, text_of) -> tuple[str, str]:
    """``(role, text)`` of a ``{from, value}`` or ``{role, content}`` message; ``text_of(content, where)`` reads its
    content (plain records take strings, preference prompts content lists too)."""
    if not isinstance(message, dict):
        raise RecordError(f"{where} is {type(message).__name__}, expected {{from, value}} or {{role, content}}")
    role = message.get("from", message.get("role"))
    content = message.get("value", message.get("content"))
    if role is None or content is None:
        raise RecordError(f"{where} needs 'from'+'value' or 'role'+'content' (has {sorted(message)})")
    return ROLE_ALIASES.get(str(role).lower(), str(role)), text_of(content, where)


def _string(content, where: str) -> str:
    if not isinstance(content, str):
        raise RecordError(
            f"{where} content is {type(content).__name__}, expected a string; "
            "convert multimodal content lists with `llava-loop data convert`"
        )
    return content


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecordError(
            f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); re-encode the file as UTF-8"
        ) from None


def _iter_jsonl(path: Path, text: str):
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and kin may sit inside a string
        if not line.strip():
            continue
        try:
            yield lineno - 1, json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: line {lineno} (record {lineno - 1}) is not valid JSON: {exc.msg}") from None


def _iter_raw(path: Path):
    """Yield ``(index, raw_record)`` from a JSON list, ``{"data": [...]}`` or JSONL file."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line in a .json file
            yield from _iter_jsonl(path, text)
            return
        raise RecordError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f'{path}: expected a JSON list of records (or {{"data": [...]}}), got {type(data).__name__}')
    yield from enumerate(data)


def load_records(path: str | Path) -> Records:
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"data file {path} not found; set data.path to a chat.json or .jsonl file")
    encoded = []  # encoded as read: 600K Record objects would outweigh the blob many times over
    kinds = {"holds_video": False, "holds_video_files": False}  # as video_kinds says
    for index, raw in _iter_raw(path):
        record = normalize_record(raw, path, index)
        encoded.append(_encode(record))
        if record.video is not None:
            kinds["holds_video"] = True
            kinds["holds_video_files"] |= not record.video.frame_list
    if not encoded:
        raise RecordError(f"{path}: no records")
    return Records.from_encoded(encoded, str(path), **kinds)
