"""The model composer: tiny preset, hand-made towers, weight copy, bad inputs, real-scale shapes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llava_loop.build import BuildError, build_llava
from llava_loop.parts import count_params

import helpers


@pytest.fixture(scope="module")
def hand_made_towers(tmp_path_factory, qwen3_tokenizer_dir):
    """Towers saved by plain transformers, no llava_loop involved: a full CLIPModel, a CLIPVisionModel,
    a tied Qwen2 with spare embedding rows and an untied Qwen2 whose rows are exactly the tokenizer."""
    from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("towers")
    vision_config, clip_config = helpers.tiny_clip_configs()
    torch.manual_seed(0)
    CLIPModel(clip_config).save_pretrained(root / "clip-full")
    CLIPVisionModel(vision_config).save_pretrained(root / "clip-vision")
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    for name, rows, tied in (("qwen-tied", 151936, True), ("qwen-exact", len(tokenizer), False)):
        Qwen2ForCausalLM(helpers.tiny_qwen2_config(rows, tied)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _source_tensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("vision", ["clip-full", "clip-vision"])
@pytest.mark.parametrize("llm", ["qwen-tied", "qwen-exact"])
def test_weights_equal_sources_tensor_for_tensor(hand_made_towers, vision, llm):
    model, processor, report = build_llava(str(hand_made_towers / vision), str(hand_made_towers / llm), dtype="float32")
    state = model.state_dict()

    vision_src = _source_tensors(hand_made_towers / vision)
    checked = 0
    for name, tensor in vision_src.items():
        if name.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
            continue
        dest = "model.vision_tower." + name.removeprefix("vision_model.")
        assert torch.equal(state[dest], tensor), dest
        checked += 1
    assert checked == sum(1 for k in state if k.startswith("model.vision_tower."))

    llm_src = _source_tensors(hand_made_towers / llm)
    resized = llm == "qwen-exact"
    for name, tensor in llm_src.items():
        dest = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if resized and name in ("model.embed_tokens.weight", "lm_head.weight"):
            # the original rows are kept; new rows (<image>, then padding to a multiple of 64) are their mean
            rows = tensor.shape[0]
            assert torch.equal(state[dest][:rows], tensor)
            assert state[dest].shape[0] == -(-(rows + 1) // 64) * 64 == 151680
            assert torch.equal(state[dest][rows:], tensor.mean(0).expand(151680 - rows, -1))
        else:
            assert torch.equal(state[dest], tensor), dest
    assert report.resized_embeddings == resized
    if llm == "qwen-tied":
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
        assert report.vocab_size == 151936  # Qwen's spare rows hold <image>: no resize
    # the projector is fresh, and not left uninitialised
    proj = model.model.multi_modal_projector
    assert torch.isfinite(proj.linear_1.weight).all() and proj.linear_1.weight.abs().sum() > 0


def test_tiny_model_loads_with_plain_transformers(tiny_model_dir):
    """A fresh interpreter that never imports llava_loop loads the directory and runs a chat prompt."""
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained({str(tiny_model_dir)!r})
        processor = AutoProcessor.from_pretrained({str(tiny_model_dir)!r})
        messages = [{{"role": "user", "content": "<image>\\nDescribe the image briefly."}}]
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = processor(text=[text], images=[Image.new("RGB", (90, 70), (200, 30, 30))], return_tensors="pt")
        with torch.no_grad():
            out = model(**batch)
            n_features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output[0].shape[0]
        print(json.dumps({{
            "finite": bool(torch.isfinite(out.logits).all()),
            "n_image_tokens": int((batch["input_ids"] == model.config.image_token_id).sum()),
            "n_features": int(n_features),
            "imported_llava_loop": "llava_loop" in sys.modules,
            "processor": type(processor).__name__,
            "eos": model.generation_config.eos_token_id,
            "im_end": processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad": model.config.text_config.pad_token_id,
            "endoftext": processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"] and not result["imported_llava_loop"]
    assert result["processor"] == "LlavaProcessor"
    assert result["n_image_tokens"] == result["n_features"] == 64  # (64 / 8) ** 2
    assert result["im_end"] in result["eos"]
    assert result["pad"] == result["endoftext"]


def test_cli_build_tiny_prints_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "llava_loop.cli", "build", "--preset", "tiny", "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    for needle in (
        "params: vision_tower",
        "params: projector",
        "params: llm",
        "<image> token id",
        "pad token id",
        "image tokens per image",
    ):
        assert needle in out.stdout
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "processor_config.json").is_file()


def test_build_refuses_composing_flags_that_a_preset_or_an_upgrade_would_ignore(tiny_model_dir, tmp_path, capsys):
    """--dtype, --feature-layer and --chat-template shape a composition from --vision and --llm; with --preset or
    --from they were dropped without a word (a float32 model with layer -2 written). Control: the preset alone
    builds (test_cli_build_tiny_prints_report)."""
    from llava_loop.cli import main

    for argv, flag in (
        (["--preset", "tiny", "--dtype", "bfloat16"], "--dtype"),
        (["--preset", "tiny", "--feature-layer", "-1"], "--feature-layer"),
        (["--from", str(tiny_model_dir), "--chat-template", "vicuna"], "--chat-template"),
    ):
        assert main(["build", *argv, "--out", str(tmp_path / "m")]) == 2
        assert f"{flag} apply only when composing from --vision and --llm" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_bad_inputs_get_clear_errors(hand_made_towers, tmp_path):
    good_vision, good_llm = str(hand_made_towers / "clip-vision"), str(hand_made_towers / "qwen-tied")
    with pytest.raises(BuildError, match="--vision .*directory not found"):
        build_llava(str(tmp_path / "nope"), good_llm)
    with pytest.raises(BuildError, match="--vision .*is not a supported vision tower"):
        build_llava(good_llm, good_llm)
    with pytest.raises(BuildError, match="--llm .*is not a text-only causal LM"):
        build_llava(good_vision, good_vision)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BuildError, match="no config.json"):
        build_llava(good_vision, str(empty))

    import shutil

    no_template = tmp_path / "no-template"
    shutil.copytree(good_llm, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError, match="no chat template"):
        build_llava(good_vision, str(no_template))

    truncated = tmp_path / "truncated"
    shutil.copytree(good_llm, truncated)
    from safetensors.torch import load_file, save_file

    weights = load_file(truncated / "model.safetensors")
    weights.pop("model.norm.weight")
    save_file(weights, truncated / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match="not found in the checkpoints.*model.language_model.norm.weight"):
        build_llava(good_vision, str(truncated))


def test_cli_reports_errors_without_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_loop.cli",
            "build",
            "--vision",
            str(tmp_path / "x"),
            "--llm",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "error: --vision" in out.stderr and "Traceback" not in out.stderr


def test_real_scale_parameter_counts_on_meta_device():
    """clip-vit-large-patch14-336 + Qwen2.5-3B-Instruct, from their published configs, no weights."""
    from transformers import LlavaForConditionalGeneration

    config = helpers.clip_l_qwen25_3b_config()
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    counts = count_params(model)
    assert counts["vision_tower"] == pytest.approx(303e6, rel=0.01)
    assert counts["projector"] == pytest.approx(6.3e6, rel=0.01)
    assert counts["llm"] == pytest.approx(3.09e9, rel=0.01)
    assert config.image_seq_length == 576


@pytest.mark.floor
def test_clip_qwen_builds_are_pinned_byte_for_byte(tmp_path):
    """The CLIP + Qwen2/2.5 path composes exactly what it composed before other tower families were added:
    configs, generation config, processor and tokenizer files, and weight bytes (tests/build_snapshot.py)."""
    from build_snapshot import PINNED, pinned_builds

    pinned = json.loads(PINNED.read_text())
    built = pinned_builds(tmp_path)
    assert built.keys() == pinned.keys()
    for name in pinned:
        sidecar = "llava_loop_build.json"  # llava_loop's own build record may gain keys; the old ones hold
        built[name][sidecar] = {k: v for k, v in built[name][sidecar].items() if k in pinned[name][sidecar]}
        assert built[name] == pinned[name], f"the {name} build changed; see tests/build_snapshot.py"


@pytest.mark.floor
@pytest.mark.parametrize("packed", [False, True])
def test_auto_attention_is_flash_attention_where_flash_attn_runs_else_sdpa(packed, tiny_model_dir):
    """``auto`` in bf16: flash_attention_2 on a machine with flash-attn and a GPU (its varlen kernel serves packed
    rows), else sdpa, and sdpa_varlen on the LLM for packed rows. Each machine checks the branch it has."""
    from transformers.utils import is_flash_attn_2_available

    from llava_loop.runtime import load_model

    model = load_model(tiny_model_dir, dtype=torch.bfloat16, packed=packed)[0]
    if is_flash_attn_2_available():
        expected = ("flash_attention_2", "flash_attention_2")
    else:
        expected = ("sdpa", "sdpa_varlen" if packed else "sdpa")
    config = model.config
    assert (config.vision_config._attn_implementation, config.text_config._attn_implementation) == expected


def _build_cli(vision, llm, out, *extra) -> str:
    """``llava-loop build`` in this process: must exit 2 (a user error); returns what it printed on stderr."""
    import contextlib
    import io

    from llava_loop.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["build", "--vision", str(vision), "--llm", str(llm), "--out", str(out), *extra])
    assert code == 2, err.getvalue()
    return err.getvalue()


def test_an_invalid_jinja_chat_template_names_the_file_and_line(hand_made_towers, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text(
        "{%- for message in messages -%}\n{{ message['role'] }}\n{{ message['content' }}\n{%- endfor -%}\n"
    )
    err = _build_cli(
        hand_made_towers / "clip-vision",
        hand_made_towers / "qwen-tied",
        tmp_path / "out",
        "--chat-template",
        str(template),
    )
    assert f"--chat-template {template}: invalid Jinja at line 3" in err, err
    import shutil

    llm = tmp_path / "own-template"  # the LLM's own template, broken the same way
    shutil.copytree(hand_made_towers / "qwen-tied", llm)
    (llm / "chat_template.jinja").write_text(template.read_text())
    err = _build_cli(hand_made_towers / "clip-vision", llm, tmp_path / "out")
    assert (
        f"--llm {llm}: its chat template (chat_template.jinja or tokenizer_config.json): invalid Jinja at line 3" in err
    )


@pytest.mark.parametrize("template", [[], ["--chat-template", "chatml"]], ids=["own", "chatml"])
def test_an_llm_without_tokenizer_files_says_so(template, hand_made_towers, tmp_path):
    import shutil

    llm = tmp_path / "no-tokenizer"
    shutil.copytree(hand_made_towers / "qwen-tied", llm)
    for path in llm.iterdir():
        if path.name not in ("config.json", "generation_config.json", "model.safetensors"):
            path.unlink()
    err = _build_cli(hand_made_towers / "clip-vision", llm, tmp_path / "out", *template)
    assert f"--llm {llm}: no tokenizer files" in err and "tokenizer.json" in err and "end-of-turn" not in err, err


class _Payload:
    def __reduce__(self):  # unpickling calls print: a stand-in for a code payload
        return print, ("payload ran",)


def test_a_bin_weight_file_with_a_pickle_payload_is_refused_by_name(hand_made_towers, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    llm = tmp_path / "qwen-bin"
    shutil.copytree(hand_made_towers / "qwen-tied", llm)
    weights = load_file(llm / "model.safetensors")
    (llm / "model.safetensors").unlink()
    torch.save({**weights, "extra": _Payload()}, llm / "pytorch_model.bin")
    err = _build_cli(hand_made_towers / "clip-vision", llm, tmp_path / "out")
    assert f"--llm {llm / 'pytorch_model.bin'}: refused to load" in err and "builtins.print" in err, err
    assert "weights_only=False" not in err and "payload ran" not in capsys.readouterr().out
    torch.save(weights, llm / "pytorch_model.bin")  # the same tensors without the payload build
    build_llava(str(hand_made_towers / "clip-vision"), str(llm))


def test_the_composed_text_config_drops_the_llms_auto_map(hand_made_towers, tmp_path):
    """An LLM shipped with remote code names it in auto_map; the composed model is plain transformers, and a
    kept auto_map would point loaders at code that is not in the output directory."""
    import shutil

    llm = tmp_path / "qwen-remote"
    shutil.copytree(hand_made_towers / "qwen-tied", llm)
    config = json.loads((llm / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    }
    (llm / "config.json").write_text(json.dumps(config))
    build_llava(str(hand_made_towers / "clip-vision"), str(llm), tmp_path / "out")
    composed = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in composed and "auto_map" not in composed["text_config"]
