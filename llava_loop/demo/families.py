"""Tiny, hub-shaped towers of every family ``build`` accepts, made offline in seconds.

Each LLM family is described by the facts a real checkpoint of it carries: its model and config classes, its
special tokens (which one is BOS, EOS, pad, unknown), the layout of its chat template, the EOS ids in its
``generation_config.json``, whether its embedding matrix has spare rows and whether its LM head is tied. The
templates are written here to lay conversations out as each family does; the tokenizers are a byte-level BPE
trained on the shapes corpus. The saved directories look like hub downloads (``config.json``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
``model.safetensors``, ``preprocessor_config.json``), so ``build`` reads them exactly as it reads real ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .shapes import tokenizer_corpus

# Qwen2.5's ChatML layout (no tools): a default system turn when none is given.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen3: no default system turn; the last assistant turn carries an empty <think> block, which a generation
# prompt gets only with enable_thinking=False.
QWEN3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and loop.last -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
# Llama 3.1+: BOS, a system header that always states the knowledge cut-off, header blocks closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] | trim -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
# Mistral Instruct: [INST] blocks, answers closed by EOS (</s>).
MISTRAL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
# Gemma 2/3: no system role (its text opens the first user turn); the assistant is "model".
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages[0]['role'] == 'system' else '' -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def _chatml_with_system(system: str) -> str:
    return CHATML_TEMPLATE.replace("You are a helpful assistant.", system)


@dataclass(frozen=True)
class LLMFamily:
    model_class: str
    config_class: str
    template: str
    specials: tuple[str, ...]  # special tokens, in id order after the BPE vocabulary
    eos: str
    generation_eos: tuple[str, ...]  # what generation_config.json lists as eos_token_id
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    added: tuple[str, ...] = ()  # non-special added tokens (Qwen3's <think>)
    spare_rows: bool = False  # embedding rows rounded up past the tokenizer (Qwen), else exactly the tokenizer
    tied: bool = True
    config_kwargs: dict = field(default_factory=dict)


LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

LLM_FAMILIES = {
    "qwen2": LLMFamily(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        CHATML_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        spare_rows=True,
    ),
    "qwen3": LLMFamily(
        "Qwen3ForCausalLM",
        "Qwen3Config",
        QWEN3_TEMPLATE,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        added=("<think>", "</think>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        spare_rows=True,
    ),
    # Llama 3.1 8B Instruct: no pad token, no spare rows, an untied head
    "llama": LLMFamily(
        "LlamaForCausalLM",
        "LlamaConfig",
        LLAMA3_TEMPLATE,
        LLAMA3_SPECIALS,
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        tied=False,
    ),
    "mistral": LLMFamily(
        "MistralForCausalLM",
        "MistralConfig",
        MISTRAL_TEMPLATE,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        eos="</s>",
        bos="<s>",
        unk="<unk>",
        generation_eos=("</s>",),
        tied=False,
    ),
    "gemma2": LLMFamily(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        GEMMA_TEMPLATE,
        GEMMA_SPECIALS,
        eos="<eos>",
        bos="<bos>",
        pad="<pad>",
        unk="<unk>",
        generation_eos=("<eos>", "<end_of_turn>"),
        config_kwargs={"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    ),
    "gemma3": LLMFamily(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        GEMMA_TEMPLATE,
        GEMMA_SPECIALS,
        eos="<eos>",
        bos="<bos>",
        pad="<pad>",
        unk="<unk>",
        generation_eos=("<eos>", "<end_of_turn>"),
    ),
    # SmolLM2 Instruct pads with <|im_end|>, the token it must learn to emit: build picks another
    "smollm2": LLMFamily(
        "LlamaForCausalLM",
        "LlamaConfig",
        _chatml_with_system("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        bos="<|im_start|>",
        pad="<|im_end|>",
        unk="<|endoftext|>",
        generation_eos=("<|im_end|>",),
    ),
    "smollm3": LLMFamily(
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        _chatml_with_system("You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
        ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|im_start|>", "<|im_end|>"),
        eos="<|im_end|>",
        pad="<|im_end|>",
        generation_eos=("<|im_end|>",),
    ),
}
VISION_FAMILIES = ("clip", "siglip")


def train_bpe(vocab_size: int):
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on the shapes corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    bpe.decoder = decoders.ByteLevel()
    return bpe


def make_tokenizer(family: LLMFamily, vocab_size: int = 400):
    """The family's tokens on a tiny BPE: a ``Qwen2Tokenizer`` for Qwen, as Qwen ships, else a tokenizers-backed one."""
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    bpe = train_bpe(vocab_size)
    roles = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    if family.model_class.startswith("Qwen"):
        model = json.loads(bpe.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tokenizer = Qwen2Tokenizer(
            vocab=model["vocab"], merges=merges, **roles, additional_special_tokens=list(family.specials[1:])
        )
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(family.specials)}, replace_extra_special_tokens=False
    )
    if family.added:
        tokenizer.add_tokens(list(family.added))
    tokenizer.chat_template = family.template
    return tokenizer


def save_llm(
    out: Path,
    family: str | LLMFamily,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab_size: int = 400,
    embedding_rows: int = 0,
    tied: bool | None = None,
    dropout: float = 0.0,
    seed: int = 1,
) -> Path:
    """A tiny hub-shaped checkpoint of an LLM family (a name in ``LLM_FAMILIES``, or a variant of one)."""
    import transformers
    from transformers import GenerationConfig

    family = LLM_FAMILIES[family] if isinstance(family, str) else family
    tokenizer = make_tokenizer(family, vocab_size)
    rows = embedding_rows or ((len(tokenizer) // 64 + 1) * 64 if family.spare_rows else len(tokenizer))
    ids = {
        role: tokenizer.convert_tokens_to_ids(t) if t else None
        for role, t in (("bos_token_id", family.bos), ("eos_token_id", family.eos), ("pad_token_id", family.pad))
    }
    config = getattr(transformers, family.config_class)(
        vocab_size=rows,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=family.tied if tied is None else tied,
        attention_dropout=dropout,
        **ids,
        **family.config_kwargs,
    )
    if getattr(config, "head_dim", None) not in (None, hidden // heads):  # Gemma's and Qwen3's defaults are real-size
        config.head_dim = hidden // heads
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        pad_token_id=ids["pad_token_id"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in family.generation_eos],
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_vision(
    out: Path,
    family: str,
    *,
    image_size: int,
    patch_size: int,
    hidden: int,
    layers: int,
    heads: int,
    dropout: float = 0.0,
    seed: int = 0,
) -> Path:
    """A tiny vision tower with its preprocessor config: a vision-only CLIP, or a full SigLIP (vision and text
    encoders, as google/siglip-so400m-patch14-384 ships) whose text half and pooling head ``build`` drops."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        attention_dropout=dropout,
    )
    if family == "clip":
        CLIPVisionModel(
            CLIPVisionConfig(**sizes, image_size=image_size, patch_size=patch_size, projection_dim=hidden)
        ).save_pretrained(out)
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    elif family == "siglip":
        text = dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=1,
            num_attention_heads=heads,
            vocab_size=64,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        SiglipModel(
            SiglipConfig(vision_config={**sizes, "image_size": image_size, "patch_size": patch_size}, text_config=text)
        ).save_pretrained(out)
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown vision family {family!r}; expected one of {VISION_FAMILIES}")
    processor.save_pretrained(out)
    return out
