"""Tiny towers, made offline in seconds: a CLIP vision checkpoint, a Qwen2 checkpoint and a byte-level
BPE tokenizer trained on the spot that carries Qwen2.5's special tokens and ChatML chat template.

Each tower is saved as its own plain HF directory and then composed by ``build.build_llava``, the same
code path a real CLIP + Qwen2.5 build takes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny towers; the defaults are what the demo and the tests use."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    tokenizer_vocab: int = 400
    embedding_rows: int = 0  # 0: the tokenizer's size rounded up to 64 (spare rows, like Qwen2.5's 151,936)
    tie_word_embeddings: bool = True
    dropout: float = 0.0  # attention dropout in both towers (resume tests need dropout > 0)
    seed: int = 0


def train_tiny_tokenizer(vocab_size: int = 400):
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped as a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
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
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_clip(out: Path, spec: TinySpec) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(spec.seed)
    config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        attention_dropout=spec.dropout,
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(out)
    return out


def save_tiny_qwen(out: Path, spec: TinySpec) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tiny_tokenizer(spec.tokenizer_vocab)
    rows = spec.embedding_rows or (len(tokenizer) // 64 + 1) * 64  # room for <image> without resizing
    torch.manual_seed(spec.seed + 1)
    config = Qwen2Config(
        vocab_size=rows,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 3,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=spec.tie_word_embeddings,
        attention_dropout=spec.dropout,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


PRESETS = {
    # the demo and the tests: 64 px images in 8 px patches (64 image tokens), a 2-layer Qwen2
    "tiny": TinySpec(),
    # benchmarks at real sequence geometry: 336 px / 14 px patches = 576 image tokens, and Qwen2.5's
    # 151,936-row vocabulary, with towers small enough for a 2-core CPU
    "bench_small": TinySpec(image_size=336, patch_size=14, vision_hidden=64, vision_layers=3, text_hidden=128,
                            text_layers=2, embedding_rows=151_936),
}


def make_tiny_towers(towers_dir: str | Path, spec: TinySpec = TinySpec()) -> tuple[Path, Path]:
    towers_dir = Path(towers_dir)
    vision = save_tiny_clip(towers_dir / "clip-vision", spec)
    llm = save_tiny_qwen(towers_dir / "qwen2", spec)
    (towers_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return vision, llm


def build_tiny(out: str | Path, spec: TinySpec | str = "tiny", towers_dir: str | Path | None = None):
    """Tiny towers next to ``out`` (``<out>-towers/``), composed into ``out``. Returns build_llava's result."""
    from ..build import build_llava

    spec = PRESETS[spec] if isinstance(spec, str) else spec
    out = Path(out)
    towers_dir = Path(towers_dir) if towers_dir else out.parent / f"{out.name}-towers"
    vision, llm = make_tiny_towers(towers_dir, spec)
    return build_llava(str(vision), str(llm), out, dtype="float32", seed=spec.seed)
