"""The language-model half of a build: which causal LMs fit, and their tokens.

* **Chat template**: the tokenizer's own, or ``--chat-template FILE|chatml|llama3|vicuna`` for base LLMs.
* **Pad token**: the tokenizer's, unless it is a token the model must learn to emit (SmolLM2 pads with
  ``<|im_end|>``); else a reserved special token (Llama 3's ``<|finetune_right_pad_id|>``,
  ``<|reserved_special_token_N|>``); else ``<|endoftext|>`` or the unknown token; else a new ``<pad>``.
* **Stop tokens**: the template's end-of-turn token, the LLM's ``generation_config`` EOS ids and its tokenizer's EOS.
* **Embeddings**: spare rows hold new tokens where the LLM has them (Qwen); otherwise both embedding matrices grow
  to a multiple of 64 rows and every new row is the mean of the old ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import BuildError
from .folders import RemoteCodeRefused, load
from .template import BUILTIN_TEMPLATES, TemplateError, chat_template_from, check_jinja, special_tokens, turn_end_token

RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>")
RESERVED_PATTERN = re.compile(r"<\|reserved_special_token_(\d+)\|>")
SHARED_PADS = ("<|endoftext|>",)  # Qwen's pad, for tokenizers that do not name one
NEW_PAD = "<pad>"
EMBEDDING_MULTIPLE = 64
# The files a tokenizer's vocabulary comes from: fast (tokenizer.json), SentencePiece (*.model), BPE/WordPiece
# (vocab.json + merges.txt, vocab.txt) or tiktoken. Without one, transformers builds an empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def load_text_config(path: Path, config):
    """The LLM's config, if LLaVA can hold it: a ``*ForCausalLM`` whose base model transformers can build alone."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    archs = config.architectures or []
    if (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or config.model_type not in MODEL_MAPPING_NAMES
        or (archs and not any(a.endswith("ForCausalLM") for a in archs))
    ):
        raise BuildError(
            f"--llm {path}: model_type {config.model_type!r} (architectures {archs}) is not a text-only causal LM; "
            "expected a *ForCausalLM checkpoint such as Qwen2.5/Qwen3, Llama 3, Mistral, Gemma 2/3 or SmolLM"
        )
    return config


def load_tokenizer(path: Path, chat_template: str | None = None):
    """The LLM's tokenizer with a chat template that closes assistant turns with a special token."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any(any(Path(path).glob(pattern)) for pattern in TOKENIZER_FILES):
        raise BuildError(
            f"--llm {path}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}, beside "
            "tokenizer_config.json); copy the LLM's tokenizer files into it (tokenizer.save_pretrained), "
            "or pass the checkpoint directory they came with"
        )
    try:
        tokenizer = load(AutoTokenizer, path, "--llm")
    except RemoteCodeRefused:
        raise
    except Exception as exc:
        raise BuildError(f"--llm {path}: cannot load its tokenizer ({exc})") from exc
    try:
        if chat_template:
            tokenizer.chat_template = chat_template_from(chat_template, tokenizer)
        elif not getattr(tokenizer, "chat_template", None):
            raise BuildError(
                f"--llm {path}: the tokenizer has no chat template (a base LLM?); pass --chat-template FILE or one "
                f"of {', '.join(BUILTIN_TEMPLATES)} (LLaVA-1.5 reproductions use vicuna), or use a chat/instruct "
                "checkpoint whose tokenizer_config.json or chat_template.jinja carries one"
            )
        elif isinstance(tokenizer.chat_template, str):
            check_jinja(tokenizer.chat_template, "its chat template (chat_template.jinja or tokenizer_config.json)")
        turn_end_token(tokenizer)
    except TemplateError as exc:
        raise BuildError(f"--llm {path}: {exc}") from exc
    return tokenizer


def emitted_tokens(tokenizer) -> set[str]:
    """Tokens the model is trained to emit (the end-of-turn token) or stops at (EOS): never usable as padding."""
    return {turn_end_token(tokenizer), tokenizer.eos_token} - {None}


def choose_pad_token(tokenizer) -> tuple[str, str]:
    """Set ``tokenizer.pad_token`` to a token that is safe to pad with; returns ``(token, why)``."""
    vocab, emitted = tokenizer.get_vocab(), emitted_tokens(tokenizer)
    specials = special_tokens(tokenizer)

    def usable(token: str | None) -> bool:
        return bool(token) and token in vocab and token not in emitted

    reserved = sorted((int(m.group(1)), t) for t in specials if (m := RESERVED_PATTERN.fullmatch(t)))
    candidates = [
        (tokenizer.pad_token, "the tokenizer's pad token"),
        *[(t, "a reserved special token") for t in RESERVED_PADS if t in specials],
        *[(t, "a reserved special token") for _, t in reserved],
        *[(t, "<|endoftext|>, which chat turns never use") for t in SHARED_PADS],
        (tokenizer.unk_token, "the unknown token (as LLaVA pads Llama/Vicuna)"),
    ]
    for token, why in candidates:
        if usable(token):
            if token != tokenizer.pad_token:
                why += f" (the tokenizer's own pad, {tokenizer.pad_token}, is emitted)" if tokenizer.pad_token else ""
                tokenizer.pad_token = token
            return token, why
    tokenizer.add_special_tokens({"pad_token": NEW_PAD})
    return NEW_PAD, "added (no pad, reserved or unknown token to reuse)"


def generation_config(tokenizer, llm_path: Path, config):
    """Greedy decoding that stops at the end-of-turn token first, then at the LLM's own generation EOS ids, the
    tokenizer's EOS and the pad token; pads with the tokenizer's (chosen) pad token."""
    from transformers import GenerationConfig

    ids = [tokenizer.convert_tokens_to_ids(turn_end_token(tokenizer))]
    eos = config.eos_token_id
    if (llm_path / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(llm_path).eos_token_id
    ids += eos if isinstance(eos, list) else [eos]
    ids += [tokenizer.eos_token_id, tokenizer.pad_token_id]
    stops = list(dict.fromkeys(i for i in ids if i is not None))
    return GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, do_sample=False)


def fit_embeddings(model, n_tokens: int) -> tuple[int, int]:
    """Make room for ``n_tokens`` token ids; returns ``(rows before, rows after)``.

    New rows (input embeddings, and the LM head when it is untied) are the mean of the old rows: a new token
    starts as an average token rather than a random direction of arbitrary norm.
    """
    before = model.get_input_embeddings().weight.shape[0]
    if n_tokens <= before:
        return before, before
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    means = [m.weight.detach().float().mean(0) for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    after = -(-n_tokens // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    model.resize_token_embeddings(after, mean_resizing=False)
    with torch.no_grad():
        for module, mean in zip((model.get_input_embeddings(), model.get_output_embeddings()), means):
            if module is model.get_output_embeddings() and tied:
                continue
            module.weight[before:] = mean.to(module.weight.dtype)
    return before, after
