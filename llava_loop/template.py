"""Chat-template helpers: render conversations, find what the assistant said, and templates for base LLMs.

Everything here is derived from the tokenizer's own chat template, so any template whose assistant turns end in
a special token (ChatML for Qwen and SmolLM, Qwen3 with its empty ``<think>`` block, Llama 3, Mistral, Gemma,
Vicuna) works without hard-coded offsets.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from .errors import UserError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # OneVision's; a record's video stands where it is
VISUAL_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN)  # tags in data text that keep their special tokens

# Sentinels used to probe a template; chosen so no real conversation contains them.
_PROBE_USER = "llava-loop-probe-user"
_PROBE_ANSWER = "llava-loop-probe-answer"


class TemplateError(UserError):
    """The chat template does not render a conversation in a way we can supervise."""


def render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """Render ``[{"role", "content"}, ...]`` to text with the tokenizer's chat template.

    Answers are trained without reasoning, after the empty ``<think>`` block Qwen3's template writes before the
    last answer; ``enable_thinking=False`` gives generation prompts that same block (other templates ignore it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; "
            "use an instruct/chat checkpoint (e.g. Qwen2.5-*-Instruct) or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )


# Prepended to the LLM's template to make the processor's: HF chat-format content lists ([{"type": "image"},
# {"type": "text", "text": ...}], what pipelines and lmms-eval send) become the strings training used. One image
# goes to the start of its turn on its own line whatever its place in the list, as place_image_token does (LLaVA's
# layout); several keep their order, one item per line. String contents pass through untouched.
CONTENT_LIST_PRELUDE = """{#- llava_loop: content lists in the training layout -#}
{%- set llava_ns = namespace(messages=[]) -%}
{%- for message in messages -%}
{%- if message['content'] is string -%}
{%- set llava_ns.messages = llava_ns.messages + [message] -%}
{%- else -%}
{%- set visuals = message['content'] | selectattr('type', 'in', ['image', 'image_url', 'video']) | list -%}
{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list -%}
{%- if visuals | length == 1 -%}
{%- set tag = '<video>' if visuals[0]['type'] == 'video' else '<image>' -%}
{%- set body = texts | join('\n') | trim -%}
{%- set content = tag + '\n' + body if body else tag -%}
{%- else -%}
{%- set parts = namespace(items=[]) -%}
{%- for item in message['content'] -%}
{%- set tags = {'image': '<image>', 'image_url': '<image>', 'video': '<video>'} -%}
{%- set parts.items = parts.items + [tags[item['type']] if item['type'] in tags else item['text']] -%}
{%- endfor -%}
{%- set content = parts.items | join('\n') -%}
{%- endif -%}
{%- set llava_ns.messages = llava_ns.messages + [dict(role=message['role'], content=content)] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = llava_ns.messages -%}
"""


def processor_chat_template(llm_template: str) -> str:
    """The processor's chat template: the LLM's, taking content lists in the layout the model was trained on."""
    return llm_template if llm_template.startswith(CONTENT_LIST_PRELUDE) else CONTENT_LIST_PRELUDE + llm_template


@lru_cache(maxsize=8)
def turn_end_token(tokenizer) -> str:
    """The special token that closes an assistant turn (``<|im_end|>`` for ChatML templates)."""
    probe = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    text = render(tokenizer, probe)
    at = text.find(_PROBE_ANSWER)
    if at < 0:
        raise TemplateError("the chat template drops assistant content; cannot derive labels")
    rest = text[at + len(_PROBE_ANSWER) :]
    specials = sorted(special_tokens(tokenizer), key=len, reverse=True)
    for token in specials:
        if rest.startswith(token):
            return token
    eos = tokenizer.eos_token
    if eos and rest.lstrip().startswith(eos):
        return eos
    raise TemplateError(
        f"cannot find the end-of-turn token after an assistant message (template renders {rest[:40]!r}); "
        "the template must close assistant turns with a special token such as <|im_end|>"
    )


@lru_cache(maxsize=8)
def earlier_answers_lose_the_think_block(tokenizer) -> bool:
    """Whether the template writes its empty ``<think>`` block before the last answer only (Qwen3's): then in one
    rendering of a multi-turn record the earlier answers follow no block, while inference (``enable_thinking=False``)
    writes one before every answer it asks for."""
    turns = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ANSWER + "-1"},
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ANSWER + "-2"},
    ]
    text = render(tokenizer, turns)
    first, last = text.find(_PROBE_ANSWER + "-1"), text.find(_PROBE_ANSWER + "-2")
    return "<think>" not in text[:first] and "<think>" in text[first:last]


THINK_BLOCK_NOTE = (
    "the chat template writes its empty <think></think> block before the last answer only (Qwen3's): in a "
    "multi-turn record the earlier answers are trained without the block that inference (enable_thinking=False) "
    "puts before every answer. llava_loop keeps the template's own layout (the history inference renders has no "
    "blocks either); records of one exchange each train every answer exactly in its inference context"
)


def special_tokens(tokenizer) -> set[str]:
    """The tokenizer's named special tokens and every added token marked special (reserved ones included)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {
        tok.content for tok in decoder.values() if getattr(tok, "special", False)
    }


def message_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int, int]]:
    """``(start, end, closed)`` character offsets of each message's content in ``text`` = render(messages); for an
    assistant message ``closed`` is the end of its closing turn token (the answer and that token are what is
    supervised), for others it is ``end``. Messages are located in order, so an answer that repeats the prompt is
    found in the right turn."""
    end_token = turn_end_token(tokenizer)
    spans = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()
        if message["role"] == "assistant":
            # an answer is found with its closing token: a short one ("a", "A", "end") also occurs in the role
            # headers between the turns, and a bare search would stop there
            closed = re.compile(re.escape(content) + r"\s*" + re.escape(end_token)).search(text, cursor)
            if closed is None:
                raise TemplateError(f"assistant message {content[:40]!r} is not closed by {end_token!r}")
            spans.append((closed.start(), closed.start() + len(content), closed.end()))
            cursor = closed.end()
            continue
        at = text.find(content, cursor) if content else cursor
        if at < 0:
            raise TemplateError(
                f"the chat template rewrote a {message['role']} message; cannot locate {content[:40]!r}"
            )
        spans.append((at, at + len(content), at + len(content)))
        cursor = at + len(content)
    return spans


@lru_cache(maxsize=8)
def special_pattern(tokenizer, size: int) -> re.Pattern:
    """The tokenizer's special tokens as one pattern, longest first; built once per tokenizer and vocabulary size
    (``size``: a token added later, ``<image>`` by build, makes another), not for every sample."""
    return re.compile("|".join(re.escape(t) for t in sorted(special_tokens(tokenizer), key=len, reverse=True)))


def tokenize(tokenizer, text: str, data_spans: list[tuple[int, int]] = ()) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``, where only the template's own markup holds special tokens:
    inside ``data_spans`` (what records and prompts said) a special token's text (``<|im_end|>``, ``<|endoftext|>``
    in a web caption) is tokenized as the text it is, and only the ``<image>`` and ``<video>`` tags keep their
    tokens. Text with no special token in its data is tokenized whole, as it always was."""
    inside = [(a, b) for a, b in data_spans if b > a]
    pattern = special_pattern(tokenizer, len(tokenizer))
    if not any(m.group() not in VISUAL_TOKENS for a, b in inside for m in pattern.finditer(text, a, b)):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], encoding["offset_mapping"]
    # the tokenizer splits text at its special tokens before anything else: split it here at the markup's own ones
    # and the image tags instead, and tokenize what lies between with special tokens as plain text
    kept = [
        m
        for m in pattern.finditer(text)
        if m.group() in VISUAL_TOKENS or not any(a <= m.start() < b for a, b in inside)
    ]
    ids, offsets, cursor = [], [], 0
    for match in [*kept, None]:
        stop = len(text) if match is None else match.start()
        if stop > cursor:
            piece = tokenizer(
                text[cursor:stop], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
            )
            ids += piece["input_ids"]
            offsets += [(a + cursor, b + cursor) for a, b in piece["offset_mapping"]]
        if match is not None:
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            offsets.append(match.span())
            cursor = match.end()
    return ids, offsets


# Templates for LLMs that ship none (base checkpoints), chosen with ``build --chat-template NAME``. Each lays a
# conversation out the way its family's chat models were trained: ChatML (Qwen, SmolLM), Llama 3's header
# blocks, and Vicuna v1 (what LLaVA-1.5 reproductions train with, answers closed by ``</s>``).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    "vicuna": (
        "{{- bos_token -}}"
        "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}"
        "{%- else -%}{{- 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user\\'s questions.' -}}{%- endif -%}"
        "{%- for message in messages if message['role'] != 'system' -%}"
        "{%- if message['role'] == 'user' -%}{{- ' USER: ' + message['content'] -}}"
        "{%- else -%}{{- ' ASSISTANT: ' + message['content'] + eos_token -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
    ),
}
TEMPLATE_TOKENS = {  # special tokens a built-in template writes, which the tokenizer must have as single tokens
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "vicuna": (),
}


def chat_template_from(spec: str, tokenizer) -> str:
    """A built-in template by name, or a Jinja file's text; checked against the tokenizer it will render with."""
    if spec in BUILTIN_TEMPLATES:
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS[spec] if t not in vocab]
        if spec == "vicuna" and not tokenizer.eos_token:
            missing.append("eos token (Vicuna closes answers with it)")
        if missing:
            raise TemplateError(
                f"--chat-template {spec}: the tokenizer has no {', '.join(missing)}; this template "
                "needs them as single tokens (pick the template of the LLM's family, or pass a file)"
            )
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TemplateError(f"--chat-template {spec}: neither a file nor one of {', '.join(BUILTIN_TEMPLATES)}")
    text = path.read_text()
    check_jinja(text, f"--chat-template {path}")
    return text


def check_jinja(text: str, where: str) -> None:
    """Compile a chat template as transformers will render it; a syntax error names ``where`` and the line."""
    from jinja2 import TemplateSyntaxError

    try:  # transformers' own environment (its extensions, e.g. {% generation %}); private, so with a fallback
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse
    try:
        compile_template(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"{where}: invalid Jinja at line {exc.lineno}: {exc.message}") from None
