"""Tiny towers, made offline in seconds, composed by ``build.build_llava`` the same way real towers are.

The default (``tiny``) is a CLIP vision tower and a Qwen2 LLM with Qwen2.5's tokens and ChatML template; the
``tiny-<vision>-<llm>`` presets pair each vision family (clip, siglip) with each LLM family (qwen2, qwen3,
llama, mistral, gemma2, gemma3, smollm2, smollm3) from ``families.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .families import LLM_FAMILIES, VISION_FAMILIES, save_llm, save_vision


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny towers; the defaults are the ``tiny`` preset's (the demo's)."""

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
    embedding_rows: int = 0  # 0: the family's (Qwen: rounded up past the tokenizer, as Qwen2.5's 151,936; else exact)
    tie_word_embeddings: bool | None = None  # None: the family's (Llama 3 and Mistral untied, the others tied)
    dropout: float = 0.0  # attention dropout in both towers (> 0: dropout masks, which a resume must restore exactly)
    seed: int = 0
    vision: str = "clip"  # a vision family: clip | siglip
    llm: str = "qwen2"  # an LLM family of families.LLM_FAMILIES


PRESETS = {
    # the demo's: 64 px images in 8 px patches (64 image tokens), a 2-layer Qwen2
    "tiny": TinySpec(),
    # benchmarks at real sequence geometry: 336 px / 14 px patches = 576 image tokens, and Qwen2.5's
    # 151,936-row vocabulary, with towers small enough for a 2-core CPU
    "bench_small": TinySpec(
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        text_hidden=128,
        text_layers=2,
        embedding_rows=151_936,
    ),
    # bench/batching.py: the same geometry with an LLM wide enough that, as in real LLMs, its linear layers and
    # not its attention dominate a 2,048-token sequence (hidden 512, MLP 1,536)
    # bench/zero3_load.py: a Qwen2.5-0.5B-sized LLM (about 0.45B parameters with Qwen's vocabulary), big enough
    # that its weights dominate a process's memory
    "bench_load": TinySpec(
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        text_hidden=1024,
        text_heads=16,
        text_kv_heads=2,
        text_layers=24,
        embedding_rows=151_936,
    ),
    "bench_stage2": TinySpec(
        image_size=336,
        patch_size=14,
        vision_hidden=64,
        vision_layers=3,
        text_hidden=512,
        text_heads=8,
        text_kv_heads=2,
        text_layers=4,
        embedding_rows=151_936,
    ),
    # every vision family with every LLM family, e.g. tiny-siglip-llama, tiny-clip-qwen3
    **{f"tiny-{vision}-{llm}": TinySpec(vision=vision, llm=llm) for vision in VISION_FAMILIES for llm in LLM_FAMILIES},
}


def make_tiny_towers(towers_dir: str | Path, spec: TinySpec = TinySpec()) -> tuple[Path, Path]:
    towers_dir = Path(towers_dir)
    vision = save_vision(
        towers_dir / f"{spec.vision}-vision",
        spec.vision,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden=spec.vision_hidden,
        layers=spec.vision_layers,
        heads=spec.vision_heads,
        dropout=spec.dropout,
        seed=spec.seed,
    )
    llm = save_llm(
        towers_dir / spec.llm,
        spec.llm,
        hidden=spec.text_hidden,
        layers=spec.text_layers,
        heads=spec.text_heads,
        kv_heads=spec.text_kv_heads,
        vocab_size=spec.tokenizer_vocab,
        embedding_rows=spec.embedding_rows,
        tied=spec.tie_word_embeddings,
        dropout=spec.dropout,
        seed=spec.seed + 1,
    )
    (towers_dir / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return vision, llm


def towers_beside(out: str | Path) -> Path:
    """Where ``build_tiny`` puts the towers it composes into ``out``."""
    return Path(out).parent / f"{Path(out).name}-towers"


def build_tiny(out: str | Path, spec: TinySpec | str = "tiny"):
    """Tiny towers next to ``out`` (``<out>-towers/``), composed into ``out``. Returns build_llava's result."""
    from ..build import build_llava

    spec = PRESETS[spec] if isinstance(spec, str) else spec
    out = Path(out)
    vision, llm = make_tiny_towers(towers_beside(out), spec)
    return build_llava(str(vision), str(llm), out, dtype="float32", seed=spec.seed)
