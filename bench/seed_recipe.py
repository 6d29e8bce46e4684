"""The seed tutorial's recipe, rewritten from its description, as the benchmark's baseline:

* HF ``Trainer`` (no custom loop);
* a collator that runs the processor on every batch in the main process (dataloader_num_workers=0);
* left padding with the EOS id, and an attention mask derived from the EOS id (which also hides real EOS tokens);
* only the first human/gpt exchange is used;
* the model's own loss: full-vocabulary logits at every position.

    python bench/seed_recipe.py --config configs/bench_small.yaml --steps 12
Prints one JSON line: per-step wall times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class SeedCollator:
    def __init__(self, processor, image_dir: Path):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_dir = image_dir

    def __call__(self, records: list[dict]) -> dict:
        eos = self.tokenizer.eos_token_id
        ids, labels, pixels = [], [], []
        for record in records:
            human = next(c["value"] for c in record["conversations"] if c["from"] == "human")
            answer = next(c["value"] for c in record["conversations"] if c["from"] == "gpt")
            image = Image.open(self.image_dir / record["image"]).convert("RGB")
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": human}], tokenize=False, add_generation_prompt=True
            )
            inputs = self.processor(text=prompt, images=image, return_tensors="pt")
            answer_ids = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            prompt_ids = inputs["input_ids"][0]
            ids.append(torch.cat([prompt_ids, answer_ids, torch.tensor([eos])]))
            labels.append(torch.cat([torch.full_like(prompt_ids, -100), answer_ids, torch.tensor([eos])]))
            pixels.append(inputs["pixel_values"])
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), eos)
        label_ids = torch.full((len(ids), width), -100)
        for row, (x, y) in enumerate(zip(ids, labels)):  # left padding with EOS
            input_ids[row, width - len(x) :] = x
            label_ids[row, width - len(y) :] = y
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != eos).long(),
            "labels": label_ids,
            "pixel_values": torch.cat(pixels),
        }


def main() -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

    from llava_loop.config import load_config
    from llava_loop.loop import run_setup

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench_small.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/bench-seed")
    args = parser.parse_args()
    cfg = load_config(args.config)
    run_setup(cfg)
    records = json.loads(Path(cfg.data.path).read_text())
    model = LlavaForConditionalGeneration.from_pretrained(cfg.model.path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(cfg.model.path)

    class StepTimes(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.times:
                self.times.append(time.monotonic())

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.monotonic())

    training = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=args.steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=round(cfg.train.warmup_ratio * args.steps),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.train.seed,
        max_grad_norm=cfg.train.max_grad_norm,
    )
    callback = StepTimes()
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=records,
        data_collator=SeedCollator(processor, Path(cfg.data.image_dir)),
        callbacks=[callback],
    )
    trainer.train()
    times = callback.times
    print(
        json.dumps(
            {
                "step_seconds": [b - a for a, b in zip(times, times[1:])],
                "samples_per_step": cfg.train.micro_batch_size * cfg.train.grad_accum,
            }
        )
    )


if __name__ == "__main__":
    main()
