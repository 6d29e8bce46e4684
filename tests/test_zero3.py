"""DeepSpeed ZeRO-3 (accelerate_config_zero3.yaml) on 2 CPU processes over gloo: the same losses as one process
in every mode (weight decay on), held-out loss over an uneven split, bf16 LoRA, generation of different lengths
per rank, exact resume, consolidated export. What only a GPU shows (NCCL, bf16 speed, real sizes) is in
bench/gpu.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llava_loop.checkpoint import files as checkpoint

import helpers

ZERO3 = "accelerate_config_zero3.yaml"


def _parameter_table(stdout: str) -> list[str]:
    """The start-of-run parameter table's rows, as printed."""
    return [" ".join(row.split()) for row in re.findall(r"│ (?:vision_tower|projector|llm|total) .*│", stdout)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["projector", "lora", "full"])  # freeze_vision: between projector and full
def test_two_process_zero3_matches_one_process(mode, tmp_path, run_config, shapes_data):
    """2 processes x mb1 x acc2 under ZeRO-3 against 1 process x mb4, on a mix with text-only records (so some
    micro-batch has no image on one rank): the same step losses, the same held-out loss over 7 samples (4 on
    one rank, 3 on the other), and the same parameter table (counted with ds_numel, not the shard's numel).
    Weight decay is on, and strong (lr 1e-3 x 100 shrinks every matrix 10% a step), so decay groups split by the
    shard's shape (1-d: no decay anywhere) would show: the control, 1 process without decay, misses both
    tolerances by 10x or more."""
    data = helpers.mixed_text_and_image_data(tmp_path / "mixed", shapes_data)
    runs, tables = {}, {}
    for name, (processes, micro, accum) in {"1x4x1": (0, 4, 1), "zero3-2x1x2": (2, 1, 2)}.items():
        config = run_config(
            name,
            shapes=data,
            mode=mode,
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            train={
                "micro_batch_size": micro,
                "grad_accum": accum,
                "max_steps": 3,
                "max_grad_norm": 1.0,
                "warmup_ratio": 0.0,
                "log_sample_ids": True,
                "lr": 1e-3,
                "weight_decay": 100.0,
            },
            eval={"every": 3, "max_samples": 7},
        )
        out = helpers.launch(config, processes=processes, accelerate_config=ZERO3)
        printed = out.stdout + out.stderr
        runs[name], tables[name] = helpers.metrics(tmp_path / name), _parameter_table(printed)
        if processes:
            assert "DeepSpeed ZeRO-3" in printed
    zero3, reference = runs["zero3-2x1x2"], runs["1x4x1"]
    assert helpers.mixed_slots(zero3)  # some accumulation slot had an image on one rank and none on the other
    assert [m["loss"] for m in zero3] == pytest.approx([m["loss"] for m in reference], rel=1e-5)
    assert [m["grad_norm"] for m in zero3] == pytest.approx([m["grad_norm"] for m in reference], rel=1e-4)
    helpers.train_here(tmp_path / "1x4x1.yaml", "train.weight_decay=0", f"output_dir={tmp_path / 'no-decay'}")
    no_decay = helpers.metrics(tmp_path / "no-decay")
    assert [m["loss"] for m in no_decay] != pytest.approx([m["loss"] for m in reference], rel=1e-4)
    assert [m["grad_norm"] for m in no_decay] != pytest.approx([m["grad_norm"] for m in reference], rel=1e-3)
    evals = [helpers.metrics(tmp_path / name, "eval") for name in runs]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [0, 3]
    assert [e["eval_loss"] for e in evals[1]] == pytest.approx([e["eval_loss"] for e in evals[0]], rel=1e-5)
    assert evals[0][-1]["eval_tokens"] == evals[1][-1]["eval_tokens"]
    assert len(tables["1x4x1"]) == 4 and tables["zero3-2x1x2"] == tables["1x4x1"]


@pytest.mark.slow
def test_zero3_bf16_lora_holds_the_adapters_in_bf16_and_trains_them(tmp_path, run_config):
    """bf16 LoRA under 2-process ZeRO-3 (zero.Init): PEFT makes the adapters fp32, and the engine casts no zero.Init
    model, so ZeRO-3's optimizer met fp32 adapters beside bf16 weights and failed (an assert in its defragment).
    Held in bf16 like every weight (DeepSpeed keeps the fp32 masters), on every rank; every adapter trains (each
    lora_B, zero at start, is not in the consolidated checkpoint); the losses are a 1-process fp32 run's within
    bf16's rounding (2^-8: a bound, not parity)."""
    config = run_config(
        "bf16",
        mode="lora",
        hooks=["plugins:TrainedDtypes"],
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"micro_batch_size": 1, "max_steps": 2, "precision": "bf16"},
    )
    helpers.launch(config, processes=2, accelerate_config=ZERO3)
    for rank in (0, 1):
        dtypes = json.loads((tmp_path / "bf16" / f"trained_dtypes_rank{rank}.json").read_text())
        assert any(".lora_A." in n for n in dtypes) and any("multi_modal_projector" in n for n in dtypes)
        assert set(dtypes.values()) == {"bfloat16"}, rank
    from llava_loop.backends import DeepSpeedBackend

    trained = DeepSpeedBackend.trained_tensors(checkpoint.complete_checkpoints(tmp_path / "bf16")[-1])
    lora_b = {n: t for n, t in trained.items() if ".lora_B." in n}
    assert lora_b and all(t.abs().max() > 0 for t in lora_b.values())
    helpers.train_here(
        config, "train.precision=fp32", "train.micro_batch_size=2", "hooks=[]", f"output_dir={tmp_path / 'fp32'}"
    )
    bf16, fp32 = helpers.metrics(tmp_path / "bf16"), helpers.metrics(tmp_path / "fp32")
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], rel=2**-8)


@pytest.mark.slow
def test_zero3_resumes_exactly_generates_in_lockstep_and_exports(tmp_path, run_config, tiny_dropout_model_dir):
    """LoRA under 2-process ZeRO-3 with dropout: a run stopped after step 2 and resumed logs the uninterrupted
    run's losses within 1e-6; each rank saved its weight shards; a 1-process resume is refused naming export;
    ranks generating 2 and 12 tokens both finish; the consolidated export (LoRA merged) gives the trained
    model's logits within 1e-5 in plain transformers."""
    steps, stop = 4, 2
    hooks = ["plugins:StopAtStep", "plugins:FinalLogits", "plugins:GenerateOnEveryRank"]
    for name in ("A", "B"):
        run_config(
            name,
            model=tiny_dropout_model_dir,
            mode="lora",
            hooks=hooks,
            lora={"r": 4, "alpha": 8, "dropout": 0.1},
            train={
                "micro_batch_size": 1,
                "grad_accum": 2,
                "max_steps": steps,
                "warmup_ratio": 0.0,
                "log_sample_ids": True,
            },
            checkpoint={"every": stop, "keep_last": 2},
        )
    never, at_stop = {"LLAVA_TEST_STOP_AT": "-1"}, {"LLAVA_TEST_STOP_AT": str(stop)}
    helpers.launch(tmp_path / "A.yaml", processes=2, accelerate_config=ZERO3, extra_env=never)
    helpers.launch(tmp_path / "B.yaml", processes=2, accelerate_config=ZERO3, extra_env=at_stop)
    first = checkpoint.complete_checkpoints(tmp_path / "B")[-1]
    assert first.name == f"step-{stop:06d}"
    for rank in (0, 1):
        assert (first / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
    helpers.launch(tmp_path / "B.yaml", processes=2, accelerate_config=ZERO3, extra_env=never)
    a, b = helpers.metrics(tmp_path / "A"), helpers.metrics(tmp_path / "B")
    assert [m["step"] for m in b] == list(range(1, steps + 1))
    assert [m["sample_ids"] for m in b] == [m["sample_ids"] for m in a]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"]), (x, y)

    generated = [json.loads((tmp_path / "B" / f"generated_rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["n"] for g in generated] == [2, 12] and [g["forwards"] for g in generated] == [12, 12]

    out = helpers.launch(tmp_path / "B.yaml", "train.max_steps=6", processes=0, check=False)
    assert out.returncode == 2 and "world_size=2" in out.stderr and "llava-loop export" in out.stderr

    final = checkpoint.complete_checkpoints(tmp_path / "B")[-1]
    exported = helpers.export_and_rerun_logits(final, tmp_path / "B", tmp_path / "export")["merged"]
    reference = torch.load(tmp_path / "B" / "final_logits.pt")
    assert (exported - reference["logits"]).abs().max() < 1e-5
    from transformers import LlavaForConditionalGeneration  # negative control: the base model is far from it

    base = LlavaForConditionalGeneration.from_pretrained(tiny_dropout_model_dir).eval()
    with torch.no_grad():
        assert (base(**reference["inputs"]).logits - reference["logits"]).abs().max() > 1e-2
