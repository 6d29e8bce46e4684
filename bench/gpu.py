"""Benchmark 5: one GPU, bf16, a random-weight CLIP-L/14-336 + Qwen2.5-0.5B-shaped LLM (configs written here,
nothing downloaded), trained through llava_loop's real loop on LLaVA-pretrain-like shapes data at 336 px.
Reports, for stage 1 (`projector`) and `lora`: samples/s, tokens/s, peak GPU memory and MFU.

MFU counts model FLOPs with the actual token counts and no recompute, two ways:
* "needed": what the step must compute: the frozen vision tower forward only; the LLM forward plus the
  backward to its inputs (and to its weights only where they train); the LM head at supervised positions;
* "6N": the usual convention, 6 x non-embedding parameters x tokens (vision tokens for the vision tower),
  as if every weight trained; comparable with published MFU figures.

    python bench/gpu.py                 # on a GPU machine
    python bench/gpu.py --smoke         # CPU check of the same code path with tiny shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM parts


def model_configs(smoke: bool):
    from transformers import CLIPVisionConfig, Qwen2Config

    if smoke:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=336, patch_size=14, projection_dim=64)
        text = Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        return vision, text
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    return vision, text


def build_random_model(out: Path, smoke: bool) -> None:
    """Compose random-weight towers with the tiny tokenizer (Qwen special tokens, ChatML) into a LLaVA dir."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llava_loop.build import (add_image_token, compose_config, load_image_processor, make_generation_config,
                                  make_processor, pad_token_id_of, save_model_dir)
    from llava_loop.demo.tiny import train_tiny_tokenizer

    vision, text = model_configs(smoke)
    tokenizer = train_tiny_tokenizer()
    image_id, pad_id = add_image_token(tokenizer), pad_token_id_of(tokenizer)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(compose_config(vision, text, image_id, pad_id))
    model.generation_config = make_generation_config(tokenizer, pad_id)
    image_processor = load_image_processor(out, vision.image_size)  # no preprocessor file: CLIP defaults at 336
    save_model_dir(model, make_processor(image_processor, tokenizer, vision), out)


def step_flops(model, batch_tokens: list[int], supervised: int, images: int, mode: str) -> tuple[float, float]:
    """(needed, 6N) FLOPs for one optimizer step's samples."""
    from llava_loop.modes import unused_vision_param_names
    from llava_loop.parts import LLM, PROJECTOR, VISION, part_of

    cfg = model.config
    unused = unused_vision_param_names(model)
    n = {VISION: 0, PROJECTOR: 0, LLM: 0}
    embed = 0
    for name, p in model.named_parameters():
        if name in unused:
            continue
        n[part_of(name)] += p.numel()
        if "embed_tokens" in name:
            embed += p.numel()
    n_llm_body = n[LLM] - embed  # the (tied) embedding is a lookup; the LM head is counted separately
    v, t = cfg.vision_config, cfg.text_config
    img_tokens = (v.image_size // v.patch_size) ** 2 + 1
    vision_fwd = images * (2 * n[VISION] * img_tokens + 4 * img_tokens**2 * v.hidden_size * (v.num_hidden_layers - 1))
    projector = 6 * n[PROJECTOR] * images * (img_tokens - 1)
    tokens = sum(batch_tokens)
    attn = sum(4 * s * s * t.hidden_size * t.num_hidden_layers for s in batch_tokens) / 2  # causal
    llm_fwd = 2 * n_llm_body * tokens + attn
    head_fwd = 2 * t.hidden_size * t.vocab_size * supervised
    weight_grads = 2 * n_llm_body * tokens if mode in ("freeze_vision", "full") else 0
    needed = vision_fwd + projector + 2 * (llm_fwd + head_fwd) + weight_grads
    six_n = 6 * (n[VISION] * img_tokens * images + n[PROJECTOR] * images * (img_tokens - 1) + n_llm_body * tokens)
    return needed, six_n


def run_mode(model_dir: Path, data: Path, mode: str, args) -> dict:
    import torch

    from llava_loop.config import load_config
    from llava_loop.loop import Trainer
    from llava_loop.losses import supervised_positions

    out = Path(tempfile.mkdtemp(prefix=f"gpu-{mode}-"))
    cfg = load_config(None, [
        f"mode={mode}", f"output_dir={out}", "resume=none", f"model.path={model_dir}",
        f"data.path={data / 'chat.json'}", f"data.image_dir={data / 'images'}", f"data.num_workers={args.workers}",
        f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1", f"train.max_steps={args.steps}",
        f"train.lr={1e-3 if mode == 'projector' else 2e-4}", "train.warmup_ratio=0.03", "lora.r=64", "lora.alpha=128",
        "checkpoint.every=0", "checkpoint.keep_last=1", "train.log_every=1",
    ])
    trainer = Trainer(cfg)
    counted = []

    class Count:  # actual token counts of every step, for the FLOP count
        def on_step_end(self, trainer, metrics):
            counted.append(metrics)

    trainer.hooks.hooks.append(Count())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    # FLOPs of a typical step, from one real batch of the same size
    from llava_loop.data.collate import Collator

    batch = Collator(trainer.processor.tokenizer.pad_token_id)([trainer.train_set[i] for i in range(args.micro_batch)])
    lengths = batch["attention_mask"].sum(1).tolist()
    supervised = supervised_positions(batch["labels"])[1].numel()
    model = trainer.accelerator.unwrap_model(trainer.model)
    needed, six_n = step_flops(model, lengths, supervised, args.micro_batch, cfg.canonical_mode)
    steady = counted[2:] or counted
    seconds = common.median([m["step_time"] for m in steady])
    return {"mode": mode, "samples_per_s": args.micro_batch / seconds,
            "tokens_per_s": common.median([m["tokens_per_s"] for m in steady]),
            "peak_gib": peak, "needed_tflops": needed / seconds / 1e12, "six_n_tflops": six_n / seconds / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["projector", "lora"])
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by device name)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.micro_batch, args.workers = 3, 2, 0
    sys.path.insert(0, str(common.ROOT))
    import torch

    from llava_loop.demo.shapes import write_shapes

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU here; use --smoke to check the script on CPU")
    root = Path(tempfile.mkdtemp(prefix="llava-gpu-bench-"))
    build_random_model(root / "model", args.smoke)
    write_shapes(root / "data", args.steps * args.micro_batch + args.micro_batch, seed=0, size=336)
    results = [run_mode(root / "model", root / "data", mode, args) for mode in args.modes]
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    print(common.header(f"GPU: CLIP-L/14-336 + Qwen2.5-0.5B shape, bf16 ({name})",
                        "python bench/gpu.py " + " ".join(sys.argv[1:])))
    print(common.table(
        ["mode", "samples/s", "tokens/s", "peak GPU memory (GiB)", "MFU (needed FLOPs)", "MFU (6N)"],
        [[r["mode"], f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_gib']:.1f}",
          f"{r['needed_tflops'] / peak:.1%}", f"{r['six_n_tflops'] / peak:.1%}"] for r in results]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
