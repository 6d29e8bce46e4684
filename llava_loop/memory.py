"""Per-GPU memory of a LLaVA run: which ZeRO setting fits a model on your GPUs.

Model states follow the ZeRO paper's accounting, per trainable parameter: bf16 weight (2 bytes) and gradient
(2; 4 when accumulation runs in fp32), and Adam's fp32 master, momentum and variance (12). ZeRO-2 keeps every
weight on every GPU and splits gradients and optimizer states N ways; ZeRO-3 splits the weights too (plus the
layers gathered for the current forward); optimizer offload moves the 12 bytes to host memory. Activations
assume gradient checkpointing (each layer's input kept, one layer recomputed at a time) and label-only logits.
``held_weight_bytes`` measures what a process really holds, to hold the per-rank terms against DeepSpeed's.

    python -m llava_loop.memory                      # the table in docs/BENCHMARKS.md
    llava-loop memory --llm 34B --mode full --gpus 8 --gpu-gib 80
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .config import MODES

GIB = 1 << 30
CLIP_L_336 = 303_507_456  # CLIP ViT-L/14-336 vision tower (the LLaVA-1.5 recipe)
CLIP_L_HIDDEN = 1024
RUNTIME_GIB = 2.0  # CUDA context, NCCL buffers and allocator slack, a fixed allowance


@dataclass(frozen=True)
class LLMShape:
    name: str
    params: int
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # key/value projection width (grouped-query attention)


# public configs: Qwen2.5-7B, Vicuna/Llama-2-13B, Yi-34B, Qwen2.5-72B
LLMS = {
    s.name: s
    for s in (
        LLMShape("7B", 7_615_616_512, 3584, 28, 18944, 512),
        LLMShape("13B", 13_015_864_320, 5120, 40, 13824, 5120),
        LLMShape("34B", 34_388_917_248, 7168, 60, 20480, 1024),
        LLMShape("72B", 72_706_203_648, 8192, 80, 29568, 1024),
    )
}
SETTINGS = ("zero2", "zero3", "zero3+offload")


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


def activation_bytes(llm: LLMShape, micro_batch: int, seq_len: int, setting: str) -> float:
    """Gradient checkpointing: each layer's bf16 input kept, one layer's activations (about 34 bytes per token
    and hidden unit, flash attention) live at a time; under ZeRO-3 two layers' bf16 weights are gathered."""
    tokens = micro_batch * seq_len
    kept = 2 * tokens * llm.hidden * llm.layers
    one_layer = 34 * tokens * llm.hidden
    gathered = 2 * 2 * (llm.params / llm.layers) if setting.startswith("zero3") else 0
    return kept + one_layer + gathered


def estimate(
    llm: LLMShape,
    mode: str,
    setting: str,
    gpus: int = 8,
    *,
    micro_batch: int = 16,
    seq_len: int = 2048,
    lora_rank: int = 128,
) -> dict[str, float]:
    """GiB per GPU, by term, and the total."""
    total = llm.params + CLIP_L_336 + projector_params(llm)
    states = model_state_bytes(total, trainable_params(llm, mode, lora_rank), setting, gpus)
    parts = {k: v / GIB for k, v in states.items()}
    parts["activations"] = activation_bytes(llm, micro_batch, seq_len, setting) / GIB
    parts["runtime"] = RUNTIME_GIB
    parts["total"] = sum(v for k, v in parts.items() if k != "host_optimizer")
    return parts


def smallest_fit(llm: LLMShape, mode: str, gpus: int, gpu_gib: float, **kwargs) -> str | None:
    """The first setting, in order of speed (ZeRO-2, ZeRO-3, ZeRO-3 with optimizer offload), that fits."""
    return next((s for s in SETTINGS if estimate(llm, mode, s, gpus, **kwargs)["total"] <= gpu_gib), None)


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", choices=list(LLMS), help="LLM size (omit for the whole table)")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the run (ZeRO splits across all of them)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=128)


def run(args) -> int:
    shape = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "lora_rank": args.lora_rank}
    if not args.llm:
        print(
            f"GiB per GPU, {args.gpus} GPUs, micro-batch {args.micro_batch} x {args.seq_len} tokens, bf16, "
            "gradient checkpointing"
        )
        print(table(args.gpus, **shape))
        return 0
    llm = LLMS[args.llm]
    for setting in SETTINGS:
        parts = estimate(llm, args.mode, setting, args.gpus, **shape)
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total" and v)
        print(f"{setting:14s} {parts['total']:7.1f} GiB per GPU  ({detail})")
    fit = smallest_fit(llm, args.mode, args.gpus, args.gpu_gib, **shape)
    print(
        f"smallest setting that fits {args.gpus} x {args.gpu_gib:g} GiB: "
        + (fit or "none; add GPUs, lower --micro-batch, or use lora")
    )
    return 0 if fit else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
