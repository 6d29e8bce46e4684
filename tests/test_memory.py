"""The memory estimator (llava_loop/memory.py): its per-rank model-state terms against the tensors DeepSpeed
really holds in 2-process ZeRO-2 and ZeRO-3 runs, its answers at real sizes, and the tokens and tiles it sizes a
sample with from an image's geometry against a real build's processor and model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_loop import memory
from llava_loop.checkpoint import files as checkpoint
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
    # the final checkpoint holds the trained tensors alone: no frozen weight, no frozen tied LM head
    final = checkpoint.complete_checkpoints(tmp_path / "run")[-1]
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}  # a tied head too
    assert helpers.saved_module_names(final) == trained
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
    # 13B full at 16 x 2,048 tokens is just over ZeRO-2 on 80 GB (LLaVA-1.5 trains its 13B under ZeRO-3); at 8 it fits
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 80) == "zero3"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 80, micro_batch=8) == "zero2"
    assert memory.smallest_fit(memory.LLMS["34B"], "full", 8, 80) == "zero3+offload"
    assert memory.smallest_fit(memory.LLMS["13B"], "full", 8, 48, micro_batch=8) == "zero3"
    assert memory.smallest_fit(llm72, "full", 8, 80) is None  # 72B full needs more than 8 x 80 GiB
    # at 32,768 tokens a GPU, one 72B layer recomputed with LoRA's dropout copies is 20 GB: fewer tokens fit
    assert memory.smallest_fit(llm72, "lora", 8, 80) is None
    assert memory.smallest_fit(llm72, "lora", 8, 80, micro_batch=4) == "zero3"
    assert memory.smallest_fit(llm72, "full", 32, 80, micro_batch=4) == "zero3"
    for llm in memory.LLMS.values():  # each setting needs less per GPU than the one before, in every mode
        for mode in memory.MODES:
            totals = [memory.estimate(llm, mode, s)["total"] for s in memory.SETTINGS]
            assert totals[0] > totals[1] >= totals[2]


def test_the_cli_names_the_smallest_setting_and_fails_when_none_fits():
    fits = helpers.cli("memory", "--llm", "34B", "--mode", "full")
    assert fits.returncode == 0 and "smallest setting that fits 8 x 80 GiB (5% left free): zero3+offload" in fits.stdout
    too_big = helpers.cli("memory", "--llm", "72B", "--gpus", "8")
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
    assert "smallest setting that fits 8 x 80 GiB (5% left free): zero2" in out

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


def _saved_bytes_per_token_and_layer(llm: memory.LLMShape, mode: str, *, rank: int = 8, checkpointing: bool = False):
    """What autograd really keeps for a bf16 Qwen2 stack of this geometry on a padded batch (the inputs require
    gradients, as the projector's outputs do): the storage of every saved tensor that is not a weight, for 3 layers
    less 1, per layer and token."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2Model

    batch, seq = 2, 64

    def saved(layers: int) -> int:
        config = Qwen2Config(
            hidden_size=llm.hidden,
            intermediate_size=llm.intermediate,
            num_attention_heads=llm.heads,
            num_key_value_heads=llm.kv_dim // (llm.hidden // llm.heads),
            num_hidden_layers=layers,
            vocab_size=llm.vocab,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        model = Qwen2Model(config).to(torch.bfloat16)
        model.requires_grad_(mode == "freeze_vision")
        if mode == "lora":
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets)
            model = get_peft_model(model, lora).to(torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
            model.train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        inputs = torch.randn(batch, seq, llm.hidden, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, seq // 2 :] = 0  # one padded row, as a micro-batch of two lengths has
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(inputs_embeds=inputs, attention_mask=mask)
        return sum(kept.values())

    return (saved(3) - saved(1)) / 2 / (batch * seq), seq


@pytest.mark.parametrize("mode", ["projector", "freeze_vision", "lora"])
@pytest.mark.parametrize(
    "llm",
    [
        memory.LLMShape("small-gqa", 0, 128, 0, 704, 64, 4, 1000),  # 2 key/value heads for 4 query heads
        memory.LLMShape("wide-mha", 0, 256, 0, 1024, 256, 8, 1000),
    ],
    ids=lambda llm: llm.name,
)
def test_the_activation_model_is_what_autograd_keeps(mode, llm):
    """The bytes per token and layer the estimate charges without checkpointing are exactly what a bf16 Qwen2 layer
    saves for backward (frozen, trained, and LoRA with dropout), at two geometries the formula was not fitted on; with
    checkpointing a layer keeps its bf16 input alone (the recompute is charged as one layer at a time)."""
    measured, seq = _saved_bytes_per_token_and_layer(llm, mode)
    assert memory.layer_activation_bytes(llm, mode, lora_rank=8, seq_len=seq) == measured
    if mode == "projector":
        checkpointed, _ = _saved_bytes_per_token_and_layer(llm, mode, checkpointing=True)
        assert checkpointed == 2 * llm.hidden  # the control: checkpointing keeps a tiny fraction of it
        assert measured > 10 * checkpointed


def test_the_3b_stage1_row_needs_an_h200_at_micro_batch_32_and_fits_an_h100_at_16():
    """The arithmetic behind bench/gpu.py's 3B row, at CLIP-L/336 + Qwen2.5-3B, 700-token padded samples, no
    checkpointing: about 100 KB per token and layer, so micro-batch 32 holds about 77 GiB of activations, over an
    H100's usable memory; 16 halves them; Liger's kernels would keep about 30% less."""
    llm = memory.LLMS["3B"]
    per_layer = memory.layer_activation_bytes(llm, "projector", seq_len=700)
    assert 95_000 < per_layer < 105_000
    h100, h200 = 81559 / 1024, 143771 / 1024
    shape = dict(seq_len=700, checkpointing=False)
    at_32 = memory.estimate(llm, "projector", "zero2", gpus=1, micro_batch=32, **shape)
    at_16 = memory.estimate(llm, "projector", "zero2", gpus=1, micro_batch=16, **shape)
    liger = memory.estimate(llm, "projector", "zero2", gpus=1, micro_batch=32, kernels="liger", **shape)
    assert not memory.fits(at_32, h100) and memory.fits(at_32, h200) and memory.fits(at_16, h100)
    assert at_16["activations"] == pytest.approx(at_32["activations"] / 2, rel=0.05)
    assert 0.6 < liger["activations"] / at_32["activations"] < 0.75
    checkpointed = memory.estimate(llm, "projector", "zero2", gpus=1, micro_batch=32, seq_len=700)
    assert checkpointed["activations"] < at_32["activations"] / 5
