"""The memory estimator (llava_loop/memory.py): its per-rank model-state terms against the tensors DeepSpeed
really holds in 2-process ZeRO-2 and ZeRO-3 runs, its answers at real sizes, and the tokens and tiles it sizes a
sample with from an image's geometry against a real build's processor and model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_loop import memory
from llava_loop.parts import count_params

import helpers


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("setting", ["zero2", "zero3"])
def test_model_state_terms_match_what_deepspeed_holds(setting, mode, tmp_path, run_config, tiny_model_dir):
    from transformers import LlavaForConditionalGeneration

    from llava_loop.config import LoraConfig
    from llava_loop.modes import apply_mode

    config = run_config(
        mode=mode,
        hooks=["plugins:ModelStateBytes"],
        lora={"r": 4, "alpha": 8},
        train={"micro_batch_size": 1, "max_steps": 1},
    )
    accelerate_config = "accelerate_config_zero3.yaml" if setting == "zero3" else "accelerate_config.yaml"
    helpers.launch(config, processes=2, accelerate_config=accelerate_config)
    held = [json.loads((tmp_path / "run" / f"model_state_bytes_rank{r}.json").read_text()) for r in (0, 1)]

    model = apply_mode(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), mode, LoraConfig(r=4, alpha=8))
    total, trainable = sum(count_params(model).values()), sum(count_params(model, trainable_only=True).values())
    expected = memory.model_state_bytes(total, trainable, setting, gpus=2, weight_bytes=4, grad_bytes=4)
    for rank in held:  # fp32 on CPU; partitions are padded to the world size, hence the 1%
        assert rank["weights"] == pytest.approx(expected["weights"], rel=0.01), (rank, expected)
        assert rank["optimizer"] == pytest.approx(expected["optimizer"], rel=0.01), (rank, expected)
    if setting == "zero3":  # and the negative control: ZeRO-2's accounting would be 2x off for ZeRO-3's weights
        assert (
            held[0]["weights"] < 0.6 * memory.model_state_bytes(total, trainable, "zero2", 2, weight_bytes=4)["weights"]
        )


def test_estimates_at_real_sizes_pick_the_smallest_setting_that_fits():
    llm7, llm72 = memory.LLMS["7B"], memory.LLMS["72B"]
    # Qwen2.5-7B + CLIP-L + projector is about 7.9B parameters: 14.8 GiB of bf16 weights on every ZeRO-2 GPU
    full7 = memory.estimate(llm7, "full", "zero2", gpus=8)
    assert full7["weights"] == pytest.approx(
        2 * (llm7.params + memory.CLIP_L_336 + memory.projector_params(llm7)) / memory.GIB
    )
    assert memory.smallest_fit(llm7, "full", 8, 80) == "zero2"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 80) == "zero2"  # ZeRO-2's limit, as LLaVA found
    assert memory.smallest_fit(memory.LLMS["34B"], "full", 8, 80) == "zero3+offload"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 48) == "zero3"
    assert memory.smallest_fit(llm72, "full", 8, 80) is None  # 72B full needs more than 8 x 80 GiB
    assert memory.smallest_fit(llm72, "lora", 8, 80) == "zero3"
    assert memory.smallest_fit(llm72, "full", 32, 80) == "zero3+offload"
    for llm in memory.LLMS.values():  # each setting needs less per GPU than the one before, in every mode
        for mode in memory.MODES:
            totals = [memory.estimate(llm, mode, s)["total"] for s in memory.SETTINGS]
            assert totals[0] > totals[1] >= totals[2]


def test_the_cli_names_the_smallest_setting_and_fails_when_none_fits():
    import subprocess
    import sys

    fits = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "memory", "--llm", "34B", "--mode", "full"],
        capture_output=True,
        text=True,
        env=helpers.env(),
    )
    assert fits.returncode == 0 and "smallest setting that fits 8 x 80 GiB: zero3+offload" in fits.stdout
    too_big = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "memory", "--llm", "72B", "--gpus", "8"],
        capture_output=True,
        text=True,
        env=helpers.env(),
    )
    assert too_big.returncode == 1 and "none; add GPUs" in too_big.stdout


def _real_count(model, processor, size: tuple[int, int]) -> tuple[int, int]:
    """(placeholders, tiles) of one image, from a built processor's own expansion; the model yields as many
    features."""
    from llava_loop.template import IMAGE_TOKEN, render

    prompt = render(processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nRead it."}])
    batch = processor(text=[prompt], images=[Image.new("RGB", size)], return_tensors="pt")
    tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    assert features.pooler_output[0].shape[0] == tokens
    return tokens, batch["pixel_values"].shape[1]


def _build(tmp_path, arch: str):
    """A tiny build at CLIP-L/336's geometry (336 px, 14 px patches, a CLS token), its own towers and tokenizer."""
    from llava_loop.build import build_llava
    from llava_loop.demo.tiny import TinySpec, make_tiny_towers

    vision, llm = make_tiny_towers(tmp_path / "towers", TinySpec(image_size=336, patch_size=14))
    model, processor, _ = build_llava(str(vision), str(llm), arch=arch, dtype="float32")
    return model, processor


def test_a_sample_sized_from_an_image_holds_a_real_builds_tokens_and_tiles(tmp_path):
    """llava-next at CLIP-L/336 with the default pinpoints: a wide, a tall (more rows, so more row-end newlines) and
    a square image get the placeholders and tiles a real build's processor gives them, and the estimate grows with
    them."""
    model, processor = _build(tmp_path, "llava-next")
    for size in [(1344, 336), (336, 1344), (672, 672)]:
        tokens, views = _real_count(model, processor, size)
        sample = memory.image_sample("llava-next", *size, text_tokens=10)
        assert (sample.tokens, sample.views) == (10 + tokens, views), size
    assert memory.image_sample("llava-next", 672, 672, text_tokens=0).tokens == 2928  # base 576 + 2x2 tiles' 2352
    assert memory.image_sample("llava", 1344, 336, text_tokens=64) == memory.Sample(
        640, 1, "64 text + 576 image tokens: one 1344x336 image at llava, 1 view"
    )

    llm7 = memory.LLMS["7B"]
    square = memory.image_sample("llava-next", 672, 672, text_tokens=64)
    base = memory.estimate(llm7, "full", "zero2", seq_len=640)
    tiled = memory.estimate(llm7, "full", "zero2", seq_len=square.tokens, views=square.views)
    # the LLM's activations follow the tokens; a trained tower keeps its layer inputs for each of the 5 views
    llm_part = memory.activation_bytes(llm7, 16, square.tokens, "zero2") / memory.GIB
    vision_per_view = 16 * memory.vision_activation_bytes("full", 1, 1) / memory.GIB
    assert tiled["activations"] == pytest.approx(llm_part + 5 * vision_per_view)
    assert tiled["total"] - base["total"] > 4 * vision_per_view
    # a frozen tower keeps nothing: projector-mode activations depend on the tokens alone
    frozen = [memory.estimate(llm7, "projector", "zero2", seq_len=square.tokens, views=v) for v in (1, 5)]
    assert frozen[0] == frozen[1]


def test_the_clip_l_constants_are_the_towers():
    from transformers import CLIPVisionModel

    config = memory.clip_l_336()
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    assert sum(p.numel() for p in tower.parameters()) == memory.CLIP_L_336
    assert memory.CLIP_L_HIDDEN == config.hidden_size
    assert memory.CLIP_L_TOKENS == (config.image_size // config.patch_size) ** 2 + 1
    assert memory.CLIP_L_USED_LAYERS == config.num_hidden_layers - 1  # feature layer -2: the last never runs


def test_the_cli_prints_the_tokens_per_sample_and_refuses_bad_geometry(capsys):
    from llava_loop import cli

    argv = ["memory", "--llm", "7B", "--arch", "llava-next", "--image-size", "1344x336", "--text-tokens", "64"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens per sample: 1954 (64 text + 1890 image tokens: one 1344x336 image at llava-next, 4 views)" in out
    assert "smallest setting that fits 8 x 80 GiB: zero2" in out

    for size, why in [("garbage", "is not an image size"), ("0x336", "is not an image size"), ("20000x20000", "bombs")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["memory", "--image-size", size])
        assert exit_.value.code == 2 and why in capsys.readouterr().err, size
    assert cli.main(["memory", "--arch", "llava-next", "--seq-len", "4096"]) == 2
    assert "--arch llava-next: these size a sample from an image; add --image-size" in capsys.readouterr().err
    assert cli.main(["memory", "--image-size", "672x672", "--max-tiles", "4"]) == 2  # tiles need a tiled arch
    assert "need --arch llava-next or llava-onevision" in capsys.readouterr().err


@pytest.mark.extras
def test_a_onevision_sample_holds_a_real_builds_tokens_past_the_tile_bound(tmp_path):
    """In CI's extras venv (OneVision's processor needs torchvision): a 2016x1344 image passes anyres_max_9, so its
    tile features are pooled; the count follows the real build's."""
    model, processor = _build(tmp_path, "llava-onevision")
    tokens, views = _real_count(model, processor, (2016, 1344))
    sample = memory.image_sample("llava-onevision", 2016, 1344, text_tokens=0)
    assert (sample.tokens, sample.views) == (tokens, views)
    assert tokens < 577 + 576 * (views - 1)  # pooled: fewer than the tiles' own features
