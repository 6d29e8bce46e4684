"""Preference records (DPO and its kin): a prompt (chat turns, images or none) and two answers to it, ``chosen``
and ``rejected``.

Three layouts are read, each normalised into a ``Record`` whose turns are the prompt's, then ``("chosen", text)``
and ``("rejected", text)``; the images are the record's, as for any other:

* TRL's: ``{"prompt", "chosen", "rejected", "images"}``. The prompt is a string or a list of messages, each
  answer a string or a list of one assistant message; a message's content is a string or a list of
  ``{"type": "text", "text"}`` and ``{"type": "image"}`` parts (each image part becomes an ``<image>`` tag);
* RLAIF-V's: ``{"question", "chosen", "rejected", "image"}``;
* LLaVA-NeXT's DPO json: ``{"id", "image", "prompt", "chosen", "rejected"}``.

A prompt with images but no ``<image>`` tag gets one per image at the start of its first user turn, LLaVA's layout.
"""

from __future__ import annotations

from .records import ROLE_ALIASES, Record, RecordError, message_turn

CHOSEN, REJECTED = "chosen", "rejected"
IMAGE_TAG = "<image>"


def is_preference(raw) -> bool:
    return isinstance(raw, dict) and CHOSEN in raw and REJECTED in raw


def is_pair(record: Record) -> bool:
    """Whether a normalised record is a preference pair (its last two turns are the answers)."""
    return len(record.turns) >= 3 and (record.turns[-2][0], record.turns[-1][0]) == (CHOSEN, REJECTED)


def pair_sides(record: Record) -> tuple[Record, Record]:
    """A pair as the two records SFT would train on: its prompt, then the chosen (the rejected) answer as the
    assistant's."""
    prompt = record.turns[:-2]
    return tuple(Record(record.id, record.images, (*prompt, ("assistant", answer))) for _, answer in record.turns[-2:])


def normalize_preference(raw: dict, where: str, index: int) -> Record:
    prompt = raw.get("prompt", raw.get("question"))
    if prompt is None:
        raise RecordError(f"{where}: a preference record needs a 'prompt' (TRL, LLaVA-NeXT) or 'question' (RLAIF-V)")
    turns = _prompt_turns(prompt, where)
    answers = [_answer(raw[key], key, where) for key in (CHOSEN, REJECTED)]
    image = raw.get("images", raw.get("image"))
    images = image if isinstance(image, list) else [] if image in (None, "") else [image]
    if not all(isinstance(i, str) and i for i in images):
        raise RecordError(f"{where}: 'images'/'image' must be a relative path or a list of them, got {image!r}")
    tags = sum(text.count(IMAGE_TAG) for _, text in turns)
    if images and not tags:  # LLaVA's layout: the images open the first user turn
        first = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first is None:
            raise RecordError(f"{where}: the prompt has no user turn to show its {len(images)} image(s) in")
        role, text = turns[first]
        turns[first] = (role, "\n".join([IMAGE_TAG] * len(images) + [text]))
    if not turns or turns[-1][0] != "user":
        raise RecordError(f"{where}: the prompt must end with a user turn, which the two answers answer")
    return Record(str(raw.get("id", index)), tuple(images), (*turns, (CHOSEN, answers[0]), (REJECTED, answers[1])))


def _prompt_turns(prompt, where: str) -> list[tuple[str, str]]:
    if isinstance(prompt, str):
        return [("user", prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise RecordError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    return [message_turn(message, f"{where}: prompt message {t}", _text) for t, message in enumerate(prompt)]


def _answer(answer, key: str, where: str) -> str:
    if isinstance(answer, list):  # TRL's conversational layout: one assistant message
        if len(answer) != 1 or not isinstance(answer[0], dict):
            raise RecordError(f"{where}: '{key}' must be a string or a list of one assistant message")
        message = answer[0]
        role = ROLE_ALIASES.get(str(message.get("role", message.get("from", "assistant"))).lower())
        if role != "assistant":
            raise RecordError(f"{where}: '{key}' is a {role or 'role-less'} message; it must be the assistant's")
        answer = message.get("content", message.get("value"))
    text = _text(answer, f"{where}: '{key}'")
    if not text.strip():
        raise RecordError(f"{where}: '{key}' is empty; a preference pair needs two answers")
    return text


def _text(content, where: str) -> str:
    """A message's content as text; content lists' image parts become ``<image>`` tags in place."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif kind in ("image", "image_url"):
                parts.append(IMAGE_TAG)
            else:
                raise RecordError(f"{where} has a content part {part!r}; expected text or image parts")
        return "\n".join(parts)
    raise RecordError(f"{where} is {type(content).__name__}, expected text")
