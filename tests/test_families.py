"""Every tower family ``build`` accepts, from hub-shaped tiny checkpoints (llava_loop.demo.families): composed,
loaded by plain transformers, weights copied exactly, labels per chat template, trained, exported, generated."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from llava_loop.build import BuildError, build_llava
from llava_loop.config import MODES
from llava_loop.data.encode import IGNORE_INDEX, plain_tokens, tokenize_messages
from llava_loop.demo.families import LLM_FAMILIES, VISION_FAMILIES, make_tokenizer, save_llm, save_vision
from llava_loop.llm import emitted_tokens
from llava_loop.template import render, special_tokens, tokenize, turn_end_token

import helpers

SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2)
ANSWER = "a red circle ."
END_OF_TURN = {
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "llama": "<|eot_id|>",
    "mistral": "</s>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "smollm2": "<|im_end|>",
    "smollm3": "<|im_end|>",
}
PAIRS = [(vision, llm) for vision in VISION_FAMILIES for llm in LLM_FAMILIES]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-towers")
    paths = {
        v: save_vision(root / v, v, image_size=64, patch_size=8, hidden=32, layers=3, heads=2) for v in VISION_FAMILIES
    }
    paths.update({llm: save_llm(root / llm, llm, **SIZES) for llm in LLM_FAMILIES})
    return paths


@pytest.fixture(scope="module")
def answer_data(tmp_path_factory):
    """Eight images that all get the same answer, so a few steps teach a tiny model to say it and stop."""
    root = tmp_path_factory.mktemp("answer-data")
    (root / "images").mkdir()
    records = []
    for i in range(8):
        Image.new("RGB", (64, 64), (200 + i, 30, 30)).save(root / "images" / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": ANSWER},
                ],
            }
        )
    (root / "chat.json").write_text(json.dumps(records))
    return {
        "train": root / "chat.json",
        "train_images": root / "images",
        "val": root / "chat.json",
        "val_images": root / "images",
    }


@pytest.mark.parametrize("llm", [*LLM_FAMILIES, "qwen3-real"])
def test_control_tokens_in_data_text_are_tokenized_as_text(llm, qwen3_tokenizer_dir):
    """A caption holding the tokenizer's own special tokens as text (web captions do: `<|endoftext|>`,
    `<|im_end|>`) trains on that text, never on the control tokens, in every family and under `plain`; the markup
    around it tokenizes exactly as before. Control: the rendered text tokenized whole made them control tokens."""
    from collections import Counter

    from transformers import AutoTokenizer

    from llava_loop.data.records import Record

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir) if llm == "qwen3-real" else None
    tokenizer = tokenizer or make_tokenizer(LLM_FAMILIES[llm])
    controls = sorted(special_tokens(tokenizer))
    caption = "a red circle " + " ".join(controls) + " end ."
    question = {"role": "user", "content": "What is shown?"}
    messages = [question, {"role": "assistant", "content": caption}]
    ids, labels, _ = tokenize_messages(tokenizer, messages)
    control_ids = {tokenizer.convert_tokens_to_ids(t) for t in controls}
    plain_ids, _, _ = tokenize_messages(tokenizer, [question, {"role": "assistant", "content": "a red circle end ."}])
    assert Counter(i for i in ids if i in control_ids) == Counter(i for i in plain_ids if i in control_ids)
    end = "<|im_end|>" if llm == "qwen3-real" else END_OF_TURN[llm]
    assert [run.strip() for run in _supervised_runs(tokenizer, ids, labels)] == [caption + end]

    text = render(tokenizer, messages)
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert sum(i in control_ids for i in whole["input_ids"]) > sum(i in control_ids for i in ids)  # the control
    start = text.index(caption)
    _, offsets = tokenize(tokenizer, text, [(start, start + len(caption))])

    def markup(tokens, spans):  # the tokens wholly before or after the caption
        return [(t, o) for t, o in zip(tokens, spans) if o[1] <= start or o[0] >= start + len(caption)]

    assert markup(ids, offsets) == markup(whole["input_ids"], whole["offset_mapping"])

    record = Record("r", ("x.jpg",), (("user", "<image>"), ("assistant", caption)))
    plain, plain_labels, _ = plain_tokens(tokenizer, record, image_token_id=-1)
    assert plain.count(tokenizer.eos_token_id) == 1  # the caption's end, not its text
    assert tokenizer.decode([t for t in plain_labels if t != IGNORE_INDEX][:-1]).strip() == caption


def test_qwen3s_template_gives_only_the_last_answer_its_think_block(qwen3_tokenizer_dir):
    """What llava_loop does about Qwen3's template in multi-turn records: it keeps the template's one rendering, in
    which the earlier answers follow no <think></think> block while inference (enable_thinking=False) writes one
    before the answer it asks for; the template probe that makes every run say so finds Qwen3's and no other."""
    from transformers import AutoTokenizer

    from llava_loop.template import earlier_answers_lose_the_think_block

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    ids, labels, _ = tokenize_messages(tokenizer, _two_turns())
    text = tokenizer.decode(ids)
    first, last = text.index(ANSWER), text.index("red .")
    assert "<think>" not in text[:first] and "<think>" in text[first:last]
    assert render(tokenizer, _two_turns()[:1], add_generation_prompt=True).rstrip().endswith("</think>")
    assert earlier_answers_lose_the_think_block(tokenizer)
    assert not any(earlier_answers_lose_the_think_block(make_tokenizer(LLM_FAMILIES[f])) for f in ("qwen2", "llama"))


def _source_tensors(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _supervised_runs(tokenizer, ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in runs + ([current] if current else [])]


# ---------------------------------------------------------------------------------------------
# Composition, every pair
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision, llm", PAIRS)
def test_every_pair_composes_into_a_model_plain_transformers_loads(vision, llm, towers, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model, _, report = build_llava(str(towers[vision]), str(towers[llm]), tmp_path / "m", dtype="float32")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    assert type(processor).__name__ == "LlavaProcessor"
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    # token geometry: CLIP drops its CLS feature, SigLIP has none; 64 px / 8 px patches = 64 either way
    assert loaded.config.vision_feature_select_strategy == ("default" if vision == "clip" else "full")
    assert processor.num_additional_image_tokens == (1 if vision == "clip" else 0)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is shown?"}], tokenize=False, add_generation_prompt=True
    )
    batch = processor(text=[prompt], images=[Image.new("RGB", (90, 70), (9, 99, 199))], return_tensors="pt")
    with torch.no_grad():
        features = loaded.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output[0]
        assert torch.isfinite(loaded(**batch).logits).all()
    assert int((batch["input_ids"] == loaded.config.image_token_id).sum()) == features.shape[0] == 64
    assert loaded.config.image_seq_length == report.image_tokens_per_image == 64

    # HF chat-format content lists (pipelines, lmms-eval) render the training layout: one image at the start of
    # its turn, wherever the list put it. The LLM's own template cannot (negative control): it fails or differs.
    trained = render(
        processor.tokenizer, [{"role": "user", "content": "<image>\nWhat is shown?"}], add_generation_prompt=True
    )
    lists = (
        [{"type": "image"}, {"type": "text", "text": "What is shown?"}],
        [{"type": "text", "text": "What is shown? "}, {"type": "image"}],
    )
    for content in lists:
        assert (
            processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, enable_thinking=False
            )
            == trained
        )
    own = AutoTokenizer.from_pretrained(towers[llm])
    try:
        assert (
            own.apply_chat_template(
                [{"role": "user", "content": lists[1]}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            != trained
        )
    except TypeError:  # str + list in the template
        pass

    # every source tensor LLaVA uses is copied exactly; the rest is accounted for
    for name, tensor in _source_tensors(towers[vision]).items():
        tail = name.removeprefix("vision_model.")
        if name.startswith(("text_model.", "logit_", "visual_projection.")) or tail.startswith("head."):
            assert f"model.vision_tower.{tail}" not in state, name  # SigLIP's pooling head is not even built
            continue
        assert torch.equal(state[f"model.vision_tower.{tail}"], tensor), name
    grown = report.embedding_rows_before < report.vocab_size
    for name, tensor in _source_tensors(towers[llm]).items():
        dest = "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        if grown and name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = tensor.shape[0]
            assert state[dest].shape[0] % 64 == 0 and torch.equal(state[dest][:rows], tensor)
            assert torch.equal(state[dest][rows:], tensor.mean(0).expand(state[dest].shape[0] - rows, -1))
        else:
            assert torch.equal(state[dest], tensor), name
    assert grown == (not LLM_FAMILIES[llm].spare_rows)  # Qwen's spare rows hold <image>; the others grow
    assert loaded.config.tie_word_embeddings == LLM_FAMILIES[llm].tied
    if not LLM_FAMILIES[llm].tied:
        assert loaded.lm_head.weight.data_ptr() != loaded.model.language_model.embed_tokens.weight.data_ptr()

    # pad and stop tokens
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[llm])
    assert turn_end_token(tokenizer) == END_OF_TURN[llm] == tokenizer.eos_token  # where lmms-eval's llava_hf stops
    assert tokenizer.pad_token not in emitted_tokens(tokenizer) | {END_OF_TURN[llm]}
    assert loaded.config.text_config.pad_token_id == tokenizer.pad_token_id == report.pad_token_id
    stops = loaded.generation_config.eos_token_id
    assert stops[0] == end
    assert {tokenizer.convert_tokens_to_ids(t) for t in LLM_FAMILIES[llm].generation_eos} <= set(stops)


def test_the_pad_is_never_a_token_the_model_must_emit(towers, tmp_path):
    """SmolLM2 pads with <|im_end|>, its end of turn; Llama 3 has no pad; a tokenizer with nothing to reuse gets
    a new <pad> with a mean-initialised row."""
    _, processor, report = build_llava(str(towers["clip"]), str(towers["smollm2"]))
    assert processor.tokenizer.pad_token == "<|endoftext|>" and "is emitted" in report.pad_choice
    _, processor, report = build_llava(str(towers["clip"]), str(towers["llama"]))
    assert processor.tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert report.pad_choice == "a reserved special token"

    bare = replace(LLM_FAMILIES["mistral"], unk=None, specials=("<s>", "</s>", "[INST]", "[/INST]"))
    save_llm(tmp_path / "bare", bare, **SIZES)
    model, processor, report = build_llava(str(towers["siglip"]), str(tmp_path / "bare"))
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == "<pad>" and report.pad_choice.startswith("added")
    pad = tokenizer.pad_token_id
    assert pad >= report.embedding_rows_before  # a new row, the mean of the originals
    rows = model.get_input_embeddings().weight
    assert torch.equal(rows[pad], rows[: report.embedding_rows_before].mean(0))


# ---------------------------------------------------------------------------------------------
# Chat templates and labels
# ---------------------------------------------------------------------------------------------


def _two_turns():
    return [
        {"role": "user", "content": "<image>\nWhat is shown?"},
        {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "Which colour?"},
        {"role": "assistant", "content": "red ."},
    ]


@pytest.mark.parametrize("llm", list(LLM_FAMILIES))
def test_labels_are_each_answer_and_its_end_of_turn_token(llm):
    tokenizer = make_tokenizer(LLM_FAMILIES[llm])
    ids, labels, _ = tokenize_messages(tokenizer, _two_turns())
    end = END_OF_TURN[llm]
    assert [run.strip() for run in _supervised_runs(tokenizer, ids, labels)] == [ANSWER + end, "red ." + end]
    assert tokenizer.decode(ids).count(end) >= 2  # negative control: the end token also closes unsupervised turns
    if llm in ("llama", "gemma2", "gemma3", "mistral"):  # templates that open with BOS: it is never supervised
        assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX


def test_real_qwen3_tokenizer_labels_skip_the_think_block(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    ids, labels, _ = tokenize_messages(tokenizer, _two_turns())
    assert _supervised_runs(tokenizer, ids, labels) == [ANSWER + "<|im_end|>", "red .<|im_end|>"]
    assert "<think>" in tokenizer.decode(ids)


@pytest.mark.parametrize(
    "template, family, end",
    [("vicuna", "mistral", "</s>"), ("llama3", "llama", "<|eot_id|>"), ("chatml", "qwen2", "<|im_end|>")],
)
def test_base_llms_take_a_built_in_chat_template(template, family, end, towers, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(towers[family], base)
    (base / "chat_template.jinja").unlink()
    with pytest.raises(BuildError, match="no chat template.*--chat-template"):
        build_llava(str(towers["clip"]), str(base))
    _, processor, report = build_llava(str(towers["clip"]), str(base), chat_template=template)
    tokenizer = processor.tokenizer
    ids, labels, _ = tokenize_messages(tokenizer, _two_turns())
    assert [run.strip() for run in _supervised_runs(tokenizer, ids, labels)] == [ANSWER + end, "red ." + end]
    assert report.stop_tokens[0] == end
    for short in ("A", "a", "s", ">", "user"):  # answers that also occur in the markup between the turns
        turns = [{"role": "user", "content": "Which one?"}, {"role": "assistant", "content": short}]
        ids, labels, _ = tokenize_messages(tokenizer, turns)
        assert [run.strip() for run in _supervised_runs(tokenizer, ids, labels)] == [short + end], short
    if template == "vicuna":
        assert tokenizer.decode(ids).startswith("<s>A chat between a curious user")


def test_chat_template_errors_name_the_fix(towers, tmp_path):
    with pytest.raises(BuildError, match=r"--chat-template chatml: the tokenizer has no <\|im_start\|>, <\|im_end\|>"):
        build_llava(str(towers["clip"]), str(towers["mistral"]), chat_template="chatml")
    with pytest.raises(
        BuildError, match="--chat-template nope.jinja: neither a file nor one of chatml, llama3, vicuna"
    ):
        build_llava(str(towers["clip"]), str(towers["mistral"]), chat_template="nope.jinja")
    custom = tmp_path / "t.jinja"  # a file works: here Gemma's layout for a Mistral tokenizer, closed by </s>
    custom.write_text(
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    _, processor, _ = build_llava(str(towers["clip"]), str(towers["mistral"]), chat_template=str(custom))
    assert processor.tokenizer.chat_template == custom.read_text()


# ---------------------------------------------------------------------------------------------
# Vision towers
# ---------------------------------------------------------------------------------------------


def test_feature_layer_is_chosen_and_checked(towers):
    from llava_loop.modes import skip_unused_vision_layers, unused_vision_param_names

    model, _, report = build_llava(str(towers["siglip"]), str(towers["qwen2"]), feature_layer=-1)
    assert model.config.vision_feature_layer == -1 and report.feature_layer == -1
    assert unused_vision_param_names(model) == {n for n, _ in model.named_parameters() if "post_layernorm" in n}
    assert skip_unused_vision_layers(model) == 0
    model, _, _ = build_llava(str(towers["siglip"]), str(towers["qwen2"]), feature_layer=1)
    assert skip_unused_vision_layers(model) == 2  # layers 1 and 2 of 3 never reach the features
    with pytest.raises(BuildError, match=r"--feature-layer -5: the vision tower has 3 layers.*\[-4, 3\]"):
        build_llava(str(towers["siglip"]), str(towers["qwen2"]), feature_layer=-5)


def test_naflex_and_unknown_towers_are_refused_with_the_reason(towers, tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    Siglip2VisionModel(
        Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "naflex")
    with pytest.raises(BuildError, match="SigLIP2 NaFlex.*fixed-resolution SigLIP2 checkpoint"):
        build_llava(str(tmp_path / "naflex"), str(towers["qwen2"]))
    with pytest.raises(BuildError, match="'qwen2' is not a supported vision tower"):
        build_llava(str(towers["qwen2"]), str(towers["qwen2"]))


def test_the_image_processor_comes_from_the_tower(towers, tmp_path):
    """Size, mean, std and resample are the tower's own: SigLIP's 0.5 mean, a legacy CLIP feature-extractor file,
    and a processor whose size disagrees with the tower is refused."""
    import shutil

    _, processor, report = build_llava(str(towers["siglip"]), str(towers["qwen2"]))
    ip = processor.image_processor
    assert list(ip.image_mean) == [0.5, 0.5, 0.5] and dict(ip.size)["height"] == 64
    assert report.image_processor == "preprocessor_config.json"

    legacy = tmp_path / "legacy"
    shutil.copytree(towers["clip"], legacy)
    (legacy / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "feature_extractor_type": "CLIPFeatureExtractor",
                "size": 64,
                "crop_size": 64,
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "resample": 2,
                "image_mean": [0.1, 0.2, 0.3],
                "image_std": [0.4, 0.5, 0.6],
            }
        )
    )
    _, processor, _ = build_llava(str(legacy), str(towers["qwen2"]))
    ip = processor.image_processor
    assert list(ip.image_mean) == [0.1, 0.2, 0.3] and ip.resample == 2 and dict(ip.crop_size)["height"] == 64

    (legacy / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor", "size": {"height": 96, "width": 96}})
    )
    with pytest.raises(BuildError, match="produces 96x96 images but the tower expects 64x64"):
        build_llava(str(legacy), str(towers["qwen2"]))


@pytest.mark.floor
@pytest.mark.parametrize("size", [(400, 300), (64, 64), (37, 100)])
def test_fast_siglip_pixels_equal_the_hugging_face_processor(size, towers):
    import numpy as np

    # from its module: transformers 5.17's top-level name is a torchvision-only placeholder without torchvision
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from llava_loop.data.images import fast_path_applies, fast_pixels

    ip = AutoImageProcessor.from_pretrained(towers["siglip"])
    assert fast_path_applies(ip)
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = ip(images=image, return_tensors="pt")["pixel_values"][0]
    fast = fast_pixels(image, ip)
    assert fast.shape == reference.shape == (3, 64, 64) and (fast - reference).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Training, export and generation
# ---------------------------------------------------------------------------------------------


def _train(tmp_path, run_config, model_dir, data, mode, name, steps, lr=3e-3, checkpointing=False):
    path = run_config(
        name,
        model=model_dir,
        shapes=data,
        mode=mode,
        train={
            "max_steps": steps,
            "lr": lr,
            "micro_batch_size": 4,
            "min_lr_ratio": 1.0,
            "gradient_checkpointing": checkpointing,
        },
        checkpoint={"every": steps, "keep_last": 1},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    helpers.train_here(path)
    return helpers.metrics(tmp_path / name)


def _export(tmp_path, name):
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.export import export

    return export(complete_checkpoints(tmp_path / name)[-1], tmp_path / f"{name}-export")


def _generate(model_dir, eos=None, max_new_tokens=12):
    """Greedy generation with plain transformers: the new token ids."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is shown?"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    batch = processor(text=[prompt], images=[Image.new("RGB", (64, 64), (203, 30, 30))], return_tensors="pt")
    options = {"eos_token_id": eos} if eos is not None else {}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **options)
    return out[0, batch["input_ids"].shape[1] :].tolist(), processor.tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("vision, llm", PAIRS)
def test_every_pair_trains_exports_and_stops_at_its_end_of_turn(
    vision, llm, towers, answer_data, tmp_path, run_config, fresh_accelerate_state
):
    build_llava(str(towers[vision]), str(towers[llm]), tmp_path / "m", dtype="float32")
    lora = _train(tmp_path, run_config, tmp_path / "m", answer_data, "lora", "lora", 2)
    assert len(lora) == 2 and all(m["loss"] == m["loss"] for m in lora)  # LoRA found this LLM's linears
    full = _train(tmp_path, run_config, tmp_path / "m", answer_data, "full", "full", 40, lr=3e-3)
    assert full[-1]["loss"] < 0.1 * full[0]["loss"]

    new, tokenizer = _generate(_export(tmp_path, "full"))
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[llm])
    assert tokenizer.decode(new[:-1], skip_special_tokens=True).strip() == ANSWER
    assert new[-1] == end and len(new) < 12  # stopped by the end-of-turn token
    unstopped, _ = _generate(tmp_path / "full-export", eos=[tokenizer.pad_token_id])  # negative control
    assert len(unstopped) == 12 and end in unstopped

    from transformers import pipeline  # the HF pipeline, given chat-format content with the image after the text

    captioner = pipeline("image-text-to-text", model=str(tmp_path / "full-export"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is shown?"},
                {"type": "image", "image": Image.new("RGB", (64, 64), (203, 30, 30))},
            ],
        }
    ]
    said = captioner(text=messages, max_new_tokens=12, return_full_text=False, generate_kwargs={"do_sample": False})
    assert said[0]["generated_text"].strip() == ANSWER, said

    from llava_loop.data.records import load_records  # llava_loop's own inference and evaluation agree
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    model, _, encoder = load_for_inference(tmp_path / "full-export")
    metrics, predictions, left_out = evaluate_model(
        model, encoder, load_records(answer_data["val"]), answer_data["val_images"], max_new_tokens=12
    )
    assert metrics["exact_match"] == 1.0 and not left_out, predictions[:2]


def _model_dirs_made_for_done_when(towers, tmp_path, pair, qwen3_tokenizer_dir):
    """The issue's two pairs: SigLIP + a Llama-3-Instruct-like LLM (no pad, <|eot_id|>, no spare rows, untied
    head), and CLIP + Qwen3 carrying Qwen3's real tokenizer."""
    if pair == "siglip-llama":
        return build_llava(str(towers["siglip"]), str(towers["llama"]), tmp_path / "m", dtype="float32")
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    torch.manual_seed(0)
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            tie_word_embeddings=True,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(tmp_path / "qwen3")
    tokenizer.save_pretrained(tmp_path / "qwen3")
    return build_llava(str(towers["clip"]), str(tmp_path / "qwen3"), tmp_path / "m", dtype="float32")


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["siglip-llama", "clip-qwen3-real-tokenizer"])
def test_done_when_pairs_train_in_every_mode_export_and_generate(
    pair, towers, answer_data, tmp_path, run_config, qwen3_tokenizer_dir, fresh_accelerate_state, capfd
):
    _, processor, report = _model_dirs_made_for_done_when(towers, tmp_path, pair, qwen3_tokenizer_dir)
    if pair == "siglip-llama":
        assert report.resized_embeddings and report.pad_token == "<|finetune_right_pad_id|>"
    else:
        assert not report.resized_embeddings and report.vocab_size == 151936  # Qwen3's spare rows
    exports = []
    for mode in MODES:
        metrics = _train(tmp_path, run_config, tmp_path / "m", answer_data, mode, mode, 2, checkpointing=True)
        assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics), mode
        exports.append(str(_export(tmp_path, mode)))
        # Qwen3's template loses the think block before earlier answers: every run says so (Llama 3's: none)
        assert ("empty <think></think> block before the last answer only" in capfd.readouterr().err) == (
            pair != "siglip-llama"
        )
    script = (  # one fresh interpreter for all four exports: plain transformers, llava_loop never imported
        "import sys, torch\n"
        "from PIL import Image\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "for path in sys.argv[1:]:\n"
        "    model = LlavaForConditionalGeneration.from_pretrained(path)\n"
        "    processor = AutoProcessor.from_pretrained(path)\n"
        "    text = processor.tokenizer.apply_chat_template([{'role': 'user', 'content': '<image>\\nWhat?'}], "
        "tokenize=False, add_generation_prompt=True)\n"
        "    batch = processor(text=[text], images=[Image.new('RGB', (64, 64))], return_tensors='pt')\n"
        "    out = model.generate(**batch, max_new_tokens=3, do_sample=False)\n"
        "    assert out.shape[1] > batch['input_ids'].shape[1] and 'llava_loop' not in sys.modules\n"
        "    print('ok', path)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *exports], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [word for path in exports for word in ("ok", path)]
    _train(tmp_path, run_config, tmp_path / "m", answer_data, "full", "learn", 60, lr=5e-3)
    new, tokenizer = _generate(_export(tmp_path, "learn"))
    assert tokenizer.decode(new[:-1], skip_special_tokens=True).strip() == ANSWER
    assert tokenizer.convert_ids_to_tokens(new[-1]) == ("<|eot_id|>" if pair == "siglip-llama" else "<|im_end|>")


@pytest.mark.slow
def test_cli_builds_any_pair_with_its_choices_in_the_table(tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "llava_loop.cli", "build", *args],
            capture_output=True,
            text=True,
            check=True,
            env={**helpers.env(), "COLUMNS": "200"},
        ).stdout

    out = cli("--preset", "tiny-siglip-llama", "--out", str(tmp_path / "m"))
    for needle in (
        "siglip (feature layer -2)",
        "<|finetune_right_pad_id|>",
        "a reserved special token",
        "<|eot_id|> <|end_of_text|> <|eom_id|>",
        "411 -> 448 rows, new rows = mean of the old",
    ):
        assert needle in out, needle
    towers = tmp_path / "m-towers"
    (towers / "llama" / "chat_template.jinja").unlink()  # a base LLM
    out = cli(
        "--vision",
        str(towers / "siglip-vision"),
        "--llm",
        str(towers / "llama"),
        "--out",
        str(tmp_path / "b"),
        "--feature-layer",
        "-1",
        "--chat-template",
        "llama3",
    )
    assert "siglip (feature layer -1)" in out
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["vision_feature_layer"] == -1 and config["vision_feature_select_strategy"] == "full"


@pytest.mark.slow
def test_the_demo_runs_with_another_tower_pair(tmp_path, fresh_accelerate_state):
    from transformers import AutoConfig

    from llava_loop.demo.pipeline import run_demo

    results = run_demo(
        preset="tiny-siglip-gemma3",
        overrides=[
            f"model.path={tmp_path / 'model'}",
            f"output_dir={tmp_path / 'demo'}",
            f"data.path={tmp_path / 'data/train/chat.json'}",
            f"data.image_dir={tmp_path / 'data/train/images'}",
            f"data.eval_path={tmp_path / 'data/val/chat.json'}",
            f"data.eval_image_dir={tmp_path / 'data/val/images'}",
            # the pair replaces tiny
            "setup=[{fn: llava_loop.demo.fixtures:prepare, kwargs: {preset: tiny, samples: 64}}]",
            "data.num_workers=0",
            "train.max_steps=3",
            "eval.every=0",
            "eval.max_samples=8",
        ],
    )
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert (config.vision_config.model_type, config.text_config.model_type) == ("siglip_vision_model", "gemma3_text")
    assert results["steps"] == 3 and results["after"]["n"] == 8
