"""Tiled builds (issue 27, compose): ``--arch llava-next`` / ``llava-onevision`` write directories plain transformers
loads as LLaVA-NeXT / OneVision, with the same towers and projector a ``llava`` build of the pair has, an
``image_newline`` that trains with the projector, and image token counts that follow each image's size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava_loop.anyres import NEXT_GRIDS, parse_grids, tiling_for
from llava_loop.build import build_llava, upgrade_llava
from llava_loop.demo.tiny import TinySpec, make_tiny_towers, towers_beside
from llava_loop.errors import BuildError
from llava_loop.parts import PROJECTOR, part_of
from llava_loop.template import IMAGE_TOKEN, render

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def towers(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny CLIP + Qwen2 towers the session's tiny model was composed from, and a tiny SigLIP tower."""
    clip_dir = towers_beside(tiny_model_dir)
    siglip, _ = make_tiny_towers(tmp_path_factory.mktemp("siglip-towers"), TinySpec(vision="siglip"))
    return {"clip": clip_dir / "clip-vision", "siglip": siglip, "llm": clip_dir / "qwen2"}


def _image_tokens(processor, model, size: tuple[int, int]) -> int:
    prompt = render(processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nRead it."}])
    batch = processor(text=[prompt], images=[Image.new("RGB", size, (200, 30, 30))], return_tensors="pt")
    return int((batch["input_ids"] == model.config.image_token_id).sum())


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_a_llava_next_build_loads_in_plain_transformers_with_the_llava_builds_weights(towers, vision, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    plain, _, _ = build_llava(str(towers[vision]), str(towers["llm"]), dtype="float32")
    _, _, report = build_llava(
        str(towers[vision]), str(towers["llm"]), tmp_path / "next", arch="llava-next", dtype="float32"
    )
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "next")
    processor = AutoProcessor.from_pretrained(tmp_path / "next")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(processor).__name__ == "LlavaNextProcessor"
    side = plain.config.vision_config.image_size
    assert model.config.image_grid_pinpoints == [[r * side, c * side] for r, c in NEXT_GRIDS]
    # towers and LLM copied exactly, the projector drawn from the same seed: only image_newline is new
    ours, theirs = model.state_dict(), plain.state_dict()
    assert set(ours) - set(theirs) == {"model.image_newline"} and set(theirs) <= set(ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert json.loads((tmp_path / "next" / "llava_loop_build.json").read_text())["arch"] == "llava-next"
    from llava_loop.runtime import load_model

    loaded, _ = load_model(tmp_path / "next")
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    assert any("llava-next" in note for note in report.notes)

    # the token count follows the image's shape, the model yields as many features, and it generates
    base = _image_tokens(processor, model, (side, side))
    wide = _image_tokens(processor, model, (3 * side, side))
    tall = _image_tokens(processor, model, (side, 2 * side))
    assert base > report.image_tokens_per_image and len({base, wide, tall}) == 3
    prompt = render(processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nRead it."}])
    batch = processor(text=[prompt], images=[Image.new("RGB", (3 * side, side))], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert batch["input_ids"].shape[1] < out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_image_newline_is_seeded_and_trains_with_the_projector_in_every_mode(towers):
    from llava_loop.config import MODES, LoraConfig
    from llava_loop.modes import apply_mode

    first, _, _ = build_llava(str(towers["clip"]), str(towers["llm"]), arch="llava-next", seed=3)
    again, _, _ = build_llava(str(towers["clip"]), str(towers["llm"]), arch="llava-next", seed=3)
    other, _, _ = build_llava(str(towers["clip"]), str(towers["llm"]), arch="llava-next", seed=4)
    newline = first.model.image_newline
    assert torch.equal(newline, again.model.image_newline) and not torch.equal(newline, other.model.image_newline)
    assert 0.5 < newline.float().std().item() * first.config.text_config.hidden_size**0.5 < 2  # std 1/sqrt(hidden)
    assert part_of("model.image_newline") == PROJECTOR
    assert part_of("base_model.model.model.image_newline") == PROJECTOR  # under PEFT's wrapper
    hidden = first.config.text_config.hidden_size
    for mode in MODES:
        counts = {}
        for arch in ("llava", "llava-next"):
            model, _, _ = build_llava(str(towers["clip"]), str(towers["llm"]), arch=arch)
            model = apply_mode(model, mode, LoraConfig(r=2, alpha=4))
            trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
            counts[arch] = sum(trainable.values())
        assert any(n.endswith("image_newline") for n in trainable), mode
        assert counts["llava-next"] == counts["llava"] + hidden, mode  # image_newline, and nothing else, added


def test_grids_and_tile_bounds(towers):
    assert parse_grids("1x2, 2x1,2X2,1x2") == ((1, 2), (2, 1), (2, 2))
    assert tiling_for("llava-next", 336).pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert tiling_for("llava-next", 336, max_tiles=2).pinpoints == [[336, 672], [672, 336]]
    bounded = tiling_for("llava-next", 336, max_tiles=3)
    assert bounded.grids == ((1, 2), (2, 1), (3, 1), (1, 3))  # 2x2 (4 tiles) left out
    assert tiling_for("llava-onevision", 384).vision_aspect_ratio == "anyres_max_9"
    assert tiling_for("llava-onevision", 384, max_tiles=4).vision_aspect_ratio == "anyres_max_4"
    assert tiling_for("llava", 336) is None
    for bad, message in [
        (lambda: parse_grids("2x"), r"'2x' is not a grid"),
        (lambda: parse_grids("0x2"), r"'0x2' is not a grid"),
        (lambda: tiling_for("llava", 336, grids="1x2"), r"need --arch llava-next or llava-onevision"),
        (lambda: tiling_for("llava-next", 336, grids="2x2", max_tiles=3), r"every grid .* has more tiles"),
        (lambda: tiling_for("llava-nxt", 336), r"--arch 'llava-nxt': choose one of llava, llava-next"),
    ]:
        with pytest.raises(BuildError, match=message):
            bad()
    model, _, _ = build_llava(
        str(towers["clip"]), str(towers["llm"]), arch="llava-next", grid_pinpoints="1x3,3x1,2x2", max_tiles=3
    )
    assert model.config.image_grid_pinpoints == [[64, 192], [192, 64]]  # the tiny tower's 64 px tiles


def test_a_stage1_model_upgrades_to_llava_next_keeping_towers_and_projector(tiny_model_dir, tmp_path):
    """The LLaVA-NeXT recipe: stage 1 at base resolution, then tiles. Through the CLI, as a user runs it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    out = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "build", "--from", str(tiny_model_dir), "--out", str(tmp_path / "up")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "upgraded from" in out.stdout
    stage1 = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "up")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    upgraded = model.state_dict()
    assert set(upgraded) - set(stage1) == {"model.image_newline"}
    assert all(torch.equal(upgraded[k], stage1[k]) for k in stage1)
    processor = AutoProcessor.from_pretrained(tmp_path / "up")
    assert _image_tokens(processor, model, (192, 64)) > _image_tokens(processor, model, (64, 64))
    # negative control: the plain llava model still sees one fixed-size view whatever the image's shape
    plain = AutoProcessor.from_pretrained(tiny_model_dir)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert _image_tokens(plain, base, (192, 64)) == _image_tokens(plain, base, (64, 64)) == 64

    with pytest.raises(BuildError, match=r"it is a llava model already"):
        upgrade_llava(tiny_model_dir, arch="llava")
    refused = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "build", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "no config.json" in refused.stderr and "Traceback" not in refused.stderr
    # an upgraded (tiled) model is refused: a second upgrade replaced its trained image_newline with a fresh one
    tiled = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "build", "--from", str(tmp_path / "up"), "--out", str(tmp_path / "2")],
        capture_output=True,
        text=True,
    )
    assert tiled.returncode != 0 and "Traceback" not in tiled.stderr, tiled.stderr
    assert "a llava_next model" in tiled.stderr and "image_newline would be replaced" in tiled.stderr
    assert not (tmp_path / "2").exists()


@pytest.mark.skipif(HAS_TORCHVISION, reason="the refusal is for machines without torchvision")
def test_onevision_without_torchvision_is_refused_naming_the_fix(towers):
    with pytest.raises(BuildError, match=r"OneVision processor needs torchvision.*pip install torchvision"):
        build_llava(str(towers["clip"]), str(towers["llm"]), arch="llava-onevision")


@pytest.mark.extras
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_a_onevision_build_loads_in_plain_transformers(towers, vision, tmp_path):
    """In CI's extras venv, which has torchvision (transformers' OneVision processor needs it)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    plain, _, _ = build_llava(str(towers[vision]), str(towers["llm"]), dtype="float32")
    build_llava(str(towers[vision]), str(towers["llm"]), tmp_path / "ov", arch="llava-onevision", dtype="float32")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "ov")
    processor = AutoProcessor.from_pretrained(tmp_path / "ov")
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    assert model.config.vision_aspect_ratio == "anyres_max_9"
    ours, theirs = model.state_dict(), plain.state_dict()
    shared = [k for k in theirs if "embed_tokens" not in k and "lm_head" not in k]  # <video> grows the embeddings
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    side = plain.config.vision_config.image_size
    assert _image_tokens(processor, model, (3 * side, side)) > _image_tokens(processor, model, (side, side))
