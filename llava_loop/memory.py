"""Per-GPU memory of a LLaVA run: which ZeRO setting fits a model on your GPUs.

Model states follow the ZeRO paper's accounting, per trainable parameter: bf16 weight (2 bytes) and gradient
(2; 4 when accumulation runs in fp32), and Adam's fp32 master, momentum and variance (12). ZeRO-2 keeps every
weight on every GPU and splits gradients and optimizer states N ways, and holds two gradient buckets whatever the
trained size; ZeRO-3 splits the weights too (plus the layers gathered for the current forward); optimizer offload
moves the 12 bytes to host memory.

Activations are what autograd keeps per token and decoder layer (``layer_activation_bytes``: transformers' Qwen2
layer in bf16, read off the tensors it saves; ``tests/test_memory.py`` holds the formula against them): every
layer's without gradient checkpointing, or each layer's input plus one layer recomputed at a time with it; plus one
layer's worth of backward working memory and the chunked loss's logits. The vision tower's count only in ``full``,
where it trains: the inputs of its checkpointed layers, per view (an image, or a tiled image's base view and each
tile). Frozen, its outputs carry no graph and its forward's transients are freed before the LLM's forward, so they
never meet the LLM's peak. A fit leaves ``HEADROOM`` of the GPU free for the allocator's fragmentation.
``held_weight_bytes`` measures what a process really holds, to hold the per-rank terms against DeepSpeed's.

A sample is ``--seq-len`` tokens with one base-resolution image, or is sized from one image's geometry
(``--image-size WxH`` at ``--arch``): text plus that image's placeholders, counted by the processor ``llava-loop
build`` writes for CLIP-L/336, through the Tiler training counts with (data/tiles.py).

    llava-loop memory                                # the table in docs/BENCHMARKS.md
    llava-loop memory --llm 34B --mode full --gpus 8 --gpu-gib 80
    llava-loop memory --llm 7B --mode full --arch llava-next --image-size 672x672 --text-tokens 64
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import MODES
from .data.images import MAX_IMAGE_PIXELS

GIB = 1 << 30
CLIP_L_336 = 303_507_456  # CLIP ViT-L/14-336 vision tower (the LLaVA-1.5 recipe): clip_l_336()'s parameters
CLIP_L_HIDDEN = 1024
CLIP_L_TOKENS = 577  # per view: 24 x 24 patches and CLS
CLIP_L_USED_LAYERS = 23  # the projector reads the penultimate layer; the last is never run
RUNTIME_GIB = 2.0  # CUDA context, NCCL buffers and allocator slack, a fixed allowance
HEADROOM = 0.05  # of a GPU's memory, left free for the allocator's fragmentation: a fit must not use it
ZERO2_BUCKET = 2e8  # configs/ds_zero2.json's reduce_bucket_size, in elements; overlap_comm holds two
CHUNK_ROWS = 512  # losses.chunked_ce's rows of logits alive at once


@dataclass(frozen=True)
class LLMShape:
    name: str
    params: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # key/value projection width (grouped-query attention)
    heads: int
    vocab: int


# public configs: Qwen2.5-0.5B, -3B and -7B, Vicuna/Llama-2-13B, Yi-34B, Qwen2.5-72B
LLMS = {
    s.name: s
    for s in (
        LLMShape("0.5B", 494_032_768, 896, 24, 4864, 128, 14, 151_936),
        LLMShape("3B", 3_085_938_688, 2048, 36, 11008, 256, 16, 151_936),
        LLMShape("7B", 7_615_616_512, 3584, 28, 18944, 512, 28, 152_064),
        LLMShape("13B", 13_015_864_320, 5120, 40, 13824, 5120, 40, 32_000),
        LLMShape("34B", 34_388_917_248, 7168, 60, 20480, 1024, 56, 64_000),
        LLMShape("72B", 72_706_203_648, 8192, 80, 29568, 1024, 64, 152_064),
    )
}
SETTINGS = ("zero2", "zero3", "zero3+offload")
KERNELS = ("plain", "liger")


def clip_l_336():
    """openai/clip-vit-large-patch14-336's vision config, the tower these estimates assume."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=CLIP_L_HIDDEN,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


@dataclass(frozen=True)
class Sample:
    """One training sample: its tokens (text and image placeholders), the views its image costs the vision tower,
    and where the count came from."""

    tokens: int
    views: int = 1
    source: str = "--seq-len, one base-resolution image"


def clip_l_processor(arch: str, grids: str | None = None, max_tiles: int = 0):
    """``(tower, processor)`` as ``llava-loop build --arch`` writes them for CLIP-L/336. The tokenizer is a
    stand-in holding the image token alone: the processors need one, and counting reads no text."""
    from pathlib import Path

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from .build import add_image_token, make_processor, prepare_tiling
    from .vision_tower import CLIP, VisionTower, load_image_processor

    vision, nowhere = clip_l_336(), Path(os.devnull)  # no preprocessor file: CLIP's defaults at 336 px
    tower = VisionTower(nowhere, CLIP, vision, *load_image_processor(nowhere, CLIP, vision))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), unk_token="<unk>"
    )
    add_image_token(tokenizer)
    tiling, _ = prepare_tiling(arch, tower, tokenizer, grids, max_tiles)
    return tower, make_processor(tower, tokenizer, tiling)


def image_sample(
    arch: str, width: int, height: int, *, text_tokens: int, grids: str | None = None, max_tiles: int = 0
) -> Sample:
    """A sample of ``text_tokens`` and one ``width`` x ``height`` image, as a CLIP-L/336 build of ``arch`` counts
    its placeholders and tiles."""
    from .data.tiles import Tiler

    tower, processor = clip_l_processor(arch, grids, max_tiles)
    tiler = Tiler.of(processor)
    if tiler is None:
        image_tokens, views = tower.features_per_image, 1
    else:
        image_tokens = tiler.tokens(height, width, 1)
        views = tiler.view_count(width, height)
    plural = "s" if views > 1 else ""
    source = (
        f"{text_tokens} text + {image_tokens} image tokens: one {width}x{height} image at {arch}, {views} view{plural}"
    )
    return Sample(text_tokens + image_tokens, views, source)


def video_sample(frames: int, *, text_tokens: int) -> Sample:
    """A sample of ``text_tokens`` and one video of ``frames`` frames, as a CLIP-L/336 ``llava-onevision`` build
    lays it out: each frame one view of the tower, frames x pooled patches + 1 placeholders (its processor's
    count). Needs torchvision, as OneVision's processor does."""
    from .data.video import FrameSampling, VideoInputs

    _, processor = clip_l_processor("llava-onevision")
    video = VideoInputs(processor, FrameSampling(frames), max_pixels=MAX_IMAGE_PIXELS, allow_absolute_paths=False)
    tokens = video.tokens(frames)
    source = f"{text_tokens} text + {tokens} video tokens: {frames} frames at llava-onevision, {frames} views"
    return Sample(text_tokens + tokens, frames, source)


def projector_params(llm: LLMShape, vision_hidden: int = CLIP_L_HIDDEN) -> int:
    """LLaVA-1.5's mlp2x_gelu: vision -> hidden -> hidden, with biases."""
    return vision_hidden * llm.hidden + llm.hidden + llm.hidden * llm.hidden + llm.hidden


def lora_params(llm: LLMShape, rank: int) -> int:
    """LoRA A and B on every linear layer of every block (q, k, v, o, gate, up, down)."""
    h, i, kv = llm.hidden, llm.intermediate, llm.kv_dim
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    return rank * per_layer * llm.layers


def trainable_params(llm: LLMShape, mode: str, lora_rank: int = 128, vision: int = CLIP_L_336) -> int:
    projector = projector_params(llm)
    return {
        "projector": projector,
        "lora": projector + lora_params(llm, lora_rank),
        "freeze_vision": projector + llm.params,
        "full": projector + llm.params + vision,
    }[mode]


def model_state_bytes(
    total: int,
    trainable: int,
    setting: str,
    gpus: int,
    *,
    weight_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
) -> dict[str, float]:
    """Bytes per GPU for weights, gradients and optimizer states (and host bytes for offloaded states)."""
    shards = gpus if setting.startswith("zero3") else 1
    out = {
        "weights": weight_bytes * total / shards,
        "gradients": grad_bytes * trainable / gpus,
        "optimizer": optimizer_bytes * trainable / gpus,
        "host_optimizer": 0.0,
    }
    if setting == "zero3+offload":
        out["host_optimizer"], out["optimizer"] = out["optimizer"], 0.0
    return out


def held_weight_bytes(model) -> int:
    """Weight bytes this process really holds: ZeRO-3's shard of each parameter (``ds_tensor``), else the whole."""
    return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters())


def layer_activation_bytes(
    llm: LLMShape, mode: str, kernels: str = "plain", lora_rank: int = 128, seq_len: int = 0
) -> int:
    """Bytes autograd keeps per token for one bf16 decoder layer of ``seq_len``-token rows, by what each op saves
    for backward (transformers' Qwen2 layer, sdpa).

    A frozen layer still keeps what the backward to its input needs: both RMSNorms' fp32 input and rsqrt (8h + 8);
    sdpa's query, output and logsumexp, with keys and values repeated to every head, and the padding mask (8h + 4
    per head + 2 per token of the row); the MLP's gate, up and SiLU outputs (6i). Trained weights add their
    linears' inputs and the norms' normalised inputs (8h + 2i). LoRA (dropout on, as by default) adds each
    adapter's bf16 dropout mask and output and its rank-r product (4 x each input width + 2r, over q k v o gate up
    down). Liger's RMSNorm keeps its bf16 input instead of an fp32 copy and its SwiGLU recomputes the SiLU (4h + 2i
    less; 4h more where the norm weights train: no normalised input kept)."""
    h, i = llm.hidden, llm.intermediate
    kept = 16 * h + 6 * i + 4 * llm.heads + 8 + 2 * seq_len
    if mode in ("freeze_vision", "full"):
        kept += 8 * h + 2 * i
    elif mode == "lora":
        kept += 4 * (6 * h + i) + 7 * 2 * lora_rank
    if kernels == "liger":
        kept -= 4 * h + 2 * i + (4 * h if mode in ("freeze_vision", "full") else 0)
    return kept


def activation_bytes(
    llm: LLMShape,
    micro_batch: int,
    seq_len: int,
    setting: str,
    *,
    mode: str = "full",
    checkpointing: bool = True,
    kernels: str = "plain",
    lora_rank: int = 128,
    padding_free: bool = False,
) -> float:
    """A micro-batch's LLM activations: every layer's kept tensors, or with gradient checkpointing each layer's
    bf16 input and one layer recomputed at a time; one layer's worth more as the backward's working memory; the
    chunked loss's fp32 logits, their softmax and gradient (``CHUNK_ROWS`` rows); under ZeRO-3 two layers' bf16
    weights gathered. ``padding_free``: rows packed from samples, whose varlen attention keeps no padding mask."""
    tokens = micro_batch * seq_len
    one_layer = layer_activation_bytes(llm, mode, kernels, lora_rank, 0 if padding_free else seq_len) * tokens
    kept = (2 * tokens * llm.hidden * llm.layers + one_layer) if checkpointing else one_layer * llm.layers
    loss = 3 * 4 * min(tokens, CHUNK_ROWS) * llm.vocab
    gathered = 2 * 2 * (llm.params / llm.layers) if setting.startswith("zero3") else 0
    return kept + one_layer + loss + gathered


def vision_activation_bytes(mode: str, micro_batch: int, views: int) -> float:
    """A trained, checkpointed CLIP-L keeps each used layer's bf16 input per view through the LLM's backward; its
    one-layer recompute comes after, once the LLM's activations are freed."""
    if mode != "full":
        return 0.0
    return 2 * micro_batch * views * CLIP_L_TOKENS * CLIP_L_HIDDEN * CLIP_L_USED_LAYERS


def estimate(
    llm: LLMShape,
    mode: str,
    setting: str,
    gpus: int = 8,
    *,
    micro_batch: int = 16,
    seq_len: int = 2048,
    views: int = 1,
    lora_rank: int = 128,
    checkpointing: bool = True,
    kernels: str = "plain",
    padding_free: bool = False,
) -> dict[str, float]:
    """GiB per GPU, by term, and the total; ``views``: what one sample's image costs the vision tower."""
    total = llm.params + CLIP_L_336 + projector_params(llm)
    states = model_state_bytes(total, trainable_params(llm, mode, lora_rank), setting, gpus)
    parts = {k: v / GIB for k, v in states.items()}
    parts["buckets"] = 2 * ZERO2_BUCKET * 2 / GIB if setting == "zero2" else 0.0
    llm_part = activation_bytes(
        llm,
        micro_batch,
        seq_len,
        setting,
        mode=mode,
        checkpointing=checkpointing,
        kernels=kernels,
        lora_rank=lora_rank,
        padding_free=padding_free,
    )
    parts["activations"] = (llm_part + vision_activation_bytes(mode, micro_batch, views)) / GIB
    parts["runtime"] = RUNTIME_GIB
    parts["total"] = sum(v for k, v in parts.items() if k != "host_optimizer")
    return parts


def fits(parts: dict[str, float], gpu_gib: float) -> bool:
    """Whether an estimate fits a GPU of ``gpu_gib`` with ``HEADROOM`` of it left free."""
    return parts["total"] <= gpu_gib * (1 - HEADROOM)


def smallest_fit(llm: LLMShape, mode: str, gpus: int, gpu_gib: float, **kwargs) -> str | None:
    """The first setting, in order of speed (ZeRO-2, ZeRO-3, ZeRO-3 with optimizer offload), that fits."""
    return next((s for s in SETTINGS if fits(estimate(llm, mode, s, gpus, **kwargs), gpu_gib)), None)


def table(gpus: int = 8, **kwargs) -> str:
    rows = ["| LLM (+ CLIP-L) | mode | ZeRO-2 | ZeRO-3 | ZeRO-3 + optimizer offload (host) |", "|---|---|---|---|---|"]
    for llm in LLMS.values():
        for mode in MODES:
            cells = [estimate(llm, mode, s, gpus, **kwargs) for s in SETTINGS]
            rows.append(
                f"| {llm.name} | {mode} | {cells[0]['total']:.1f} | {cells[1]['total']:.1f} | "
                f"{cells[2]['total']:.1f} ({cells[2]['host_optimizer']:.1f}) |"
            )
    return "\n".join(rows)
