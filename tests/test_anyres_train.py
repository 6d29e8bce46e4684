"""Training tiled (LLaVA-NeXT) models (issue 27, train): per-image placeholder counts that follow the image's size,
bad images, exact lengths, the four modes with checkpointing and packing, and process-layout parity and resume on
records of mixed aspect ratios with text-only and two-image records mixed in. OneVision's multi-image rule needs
torchvision (its processor): tested in the extras step."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llava_loop.config import LoraConfig
from llava_loop.data.collate import Collator
from llava_loop.data.dataset import LlavaDataset
from llava_loop.data.encode import SampleEncoder
from llava_loop.data.records import load_records
from llava_loop.data.skips import SkipSample
from llava_loop.losses import model_inputs, supervised_logits
from llava_loop.modes import apply_mode
from llava_loop.runtime import load_model
from llava_loop.template import IMAGE_TOKEN, render

import helpers

# (width, height) the mix's images take in turn: square, wide, tall, and a wide one on another grid
ASPECTS = [(64, 64), (192, 64), (64, 128), (128, 64)]


@pytest.fixture(scope="module")
def next_dir(tiny_model_dir, tmp_path_factory):
    """The session's tiny model upgraded to LLaVA-NeXT (its towers and projector, a seeded image_newline)."""
    from llava_loop.build import upgrade_llava

    out = tmp_path_factory.mktemp("next") / "model"
    upgrade_llava(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def aspect_mix(tmp_path_factory, shapes_data) -> dict:
    """A stage-2 mix at mixed aspect ratios: one-image records (some multi-turn) whose images are square, wide or
    tall, text-only records and two-image records, shuffled together."""
    from llava_loop.demo.shapes import write_shapes

    root = tmp_path_factory.mktemp("aspect-mix")
    data = helpers.mixed_text_and_image_data(root, shapes_data, 40)
    pairs = json.loads(
        write_shapes(root, 8, seed=8, size=64, pair_ratio=1.0, prefix="pair", json_name="p.json").read_text()
    )
    records = json.loads(data["train"].read_text()) + pairs
    for k, path in enumerate(sorted((root / "images").iterdir())):
        with Image.open(path) as image:
            image.resize(ASPECTS[k % len(ASPECTS)]).save(path)
    random.Random(0).shuffle(records)
    data["train"].write_text(json.dumps(records))
    return data


def _processor_count(processor, image) -> int:
    """Placeholders transformers' own processor writes for one image."""
    prompt = render(processor.tokenizer, [{"role": "user", "content": IMAGE_TOKEN + "\nRead it."}])
    batch = processor(text=[prompt], images=[image], return_tensors="pt")
    return int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum())


def _record(rid, images, question="<image>\nWhat is it?"):
    return {"id": rid, "image": images, "conversations": [{"from": "human", "value": question},
                                                          {"from": "gpt", "value": "a shape ."}]}  # fmt: skip


def _write_mixed_records(folder, image_names):
    """``folder/chat.json``: one record per image, a record of wide.png and tall.png together, a text-only record;
    returns them loaded."""
    rows = [_record(name, name) for name in image_names]
    rows.append(_record("two", ["wide.png", "tall.png"], "<image> then <image>: which is wider?"))
    rows.append({"id": "text", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hi ."}]})
    (folder / "chat.json").write_text(json.dumps(rows))
    return load_records(folder / "chat.json")


def test_every_image_fills_the_processors_count_and_bad_images_never_split_or_crash(next_dir, tiny_model_dir, tmp_path):
    """A 1x1 image, a 20,000-pixel panorama, a grayscale and a CMYK scan, wide and tall: each sample holds exactly
    the placeholders transformers' processor writes, a batch of them (with a text-only and a two-image record)
    runs through the model padded and packed, and an image whose tiles alone pass data.max_length is skipped as
    too_long, counted by data check, never cut."""
    from llava_loop.data.check import check_dataset
    from llava_loop.data.lengths import token_lengths

    model, processor = load_model(next_dir)
    images = {
        "dot.png": ("RGB", (1, 1)),
        "panorama.png": ("RGB", (20000, 50)),
        "grey.png": ("L", (100, 40)),
        "scan.jpg": ("CMYK", (90, 30)),
        "wide.png": ("RGB", (192, 64)),
        "tall.png": ("RGB", (64, 128)),
    }
    for name, (mode, size) in images.items():
        Image.new(mode, size, 120 if mode == "L" else (200, 60, 30, 0)[: len(mode)]).save(tmp_path / name)
    records = _write_mixed_records(tmp_path, images)
    encoder = SampleEncoder(processor, max_length=2048)
    samples = LlavaDataset(records, encoder, tmp_path, substitute=False)
    samples = [samples[i] for i in range(len(records))]
    counts = [int((s["input_ids"] == encoder.image_token_id).sum()) for s in samples]
    from llava_loop.data.images import load_image

    expected = [_processor_count(processor, load_image(tmp_path / name)) for name in images]
    assert counts[: len(images)] == expected and len(set(expected)) >= 4  # the count follows the image's size
    assert counts[-2] == expected[-2] + expected[-1] and counts[-1] == 0  # LLaVA-NeXT tiles each of several
    # the plain model's count is the same for every image (the negative control for "follows the size")
    plain = SampleEncoder(load_model(tiny_model_dir)[1], max_length=2048)
    assert {plain.placeholder_counts([(h, w)])[0] for _, (w, h) in images.values()} == {plain.n_image_tokens}

    for padding_free in (False, True):  # transformers raises when features and placeholders differ in number
        batch = Collator(processor.tokenizer.pad_token_id, padding_free=padding_free)(samples)
        assert batch["n_views"] == sum(len(s["pixel_values"]) for s in samples if s["pixel_values"] is not None)
        with torch.no_grad():
            assert torch.isfinite(model(**model_inputs(batch)).logits).all()

    lengths = token_lengths(records, encoder, tmp_path)
    assert lengths.tolist() == [len(s["input_ids"]) for s in samples]
    short = SampleEncoder(processor, max_length=200)  # the wide image alone takes 264 placeholders
    with pytest.raises(SkipSample) as skip:
        short(records[4], tmp_path)
    assert skip.value.reason == "too_long" and "(264 of them image placeholders)" in skip.value.detail
    report = check_dataset(tmp_path / "chat.json", tmp_path, processor=processor, max_length=200, progress=False)
    too_long = int((lengths > 200).sum())  # one-turn records: too long is skipped, nothing to drop
    assert too_long >= 2 and report["problems"] == {"too_long": too_long}
    assert report["token_lengths"]["p100"] == max(n for n in lengths.tolist() if n <= 200)


def test_a_tiled_models_cached_lengths_are_counted_again_when_its_images_change_size(next_dir, tmp_path, monkeypatch):
    """The length cache is keyed on the records, not on the images' sizes, which a tiled model's counts follow:
    images replaced in place by others of other sizes are caught by the spot check of cached lengths and counted
    again (control: the same images read the cache)."""
    from llava_loop.data.lengths import count_lengths, token_lengths

    monkeypatch.setenv("LLAVA_LOOP_CACHE", str(tmp_path / "cache"))
    names = ("wide.png", "tall.png", "a.png", "b.png")
    for name in names:
        Image.new("RGB", (192, 64), (200, 60, 30)).save(tmp_path / name)
    records = _write_mixed_records(tmp_path, names)
    encoder = SampleEncoder(load_model(next_dir)[1], max_length=2048)
    said = []
    first = token_lengths(records, encoder, tmp_path, say=said.append)
    assert "counted, cached at" in said[-1]
    assert (token_lengths(records, encoder, tmp_path, say=said.append) == first).all() and "from the cache" in said[-1]
    for name in names:  # a 1x1 grid now: fewer tiles
        Image.new("RGB", (64, 64), (200, 60, 30)).save(tmp_path / name)
    again = token_lengths(records, encoder, tmp_path, say=said.append)
    assert "counting again" in said[-2] and "counted, cached at" in said[-1]
    assert again.tolist() == count_lengths(records, encoder, tmp_path).tolist() != first.tolist()


def _losses_and_grads(model_dir, mode, batch, *, checkpointing=False):
    torch.manual_seed(0)  # the same LoRA initialisation for every layout
    model = apply_mode(
        load_model(model_dir)[0], mode, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=checkpointing
    )
    model.train()
    logits, targets = supervised_logits(model, batch)
    losses = F.cross_entropy(logits, targets, reduction="none")
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), "a trainable tensor got no gradient"
    return losses.detach(), grads


@pytest.mark.parametrize("mode", ["projector", "lora", "freeze_vision", "full"])
def test_tiled_batches_train_in_every_mode_alike_padded_packed_and_checkpointed(mode, next_dir, aspect_mix):
    """Padded, padding-free and gradient-checkpointed forwards of one tiled batch (square, wide and tall images, a
    two-image and a text-only record) give the same per-token losses and gradients, image_newline's included;
    the control, the batch's tiles in another order, does not."""
    _, processor = load_model(next_dir)
    dataset = LlavaDataset(load_records(aspect_mix["train"]), SampleEncoder(processor, max_length=2048),
                           aspect_mix["train_images"])  # fmt: skip
    records = [dataset.records[i] for i in range(len(dataset))]
    pick = {"text_": 1, "pair": 1, "shapes": 4}  # how many of each kind, in the mix's order
    chosen = [i for kind, n in pick.items() for i in [k for k, r in enumerate(records) if r.id.startswith(kind)][:n]]
    samples = [dataset[i] for i in sorted(chosen)]
    assert len({tuple(s["image_sizes"][0].tolist()) for s in samples if s["pixel_values"] is not None}) > 1
    pad = processor.tokenizer.pad_token_id
    padded, packed = Collator(pad)(samples), Collator(pad, padding_free=True)(samples)
    reference, reference_grads = _losses_and_grads(next_dir, mode, padded)
    assert any(name.endswith("image_newline") for name in reference_grads)
    for batch, checkpointing in ((packed, False), (padded, True)):
        losses, grads = _losses_and_grads(next_dir, mode, batch, checkpointing=checkpointing)
        assert losses.shape == reference.shape and (losses - reference).abs().max() < 1e-5
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            assert (grad - reference_grads[name]).abs().max() < 1e-5, name
    shuffled = dict(padded, pixel_values=padded["pixel_values"].flip(0))
    assert (_losses_and_grads(next_dir, mode, shuffled)[0] - reference).abs().max() > 1e-3


@pytest.mark.slow
def test_tiled_runs_match_across_packing_token_budgets_and_two_process_zero2_and_zero3(
    tmp_path, run_config, next_dir, tiny_model_dir, aspect_mix
):
    """On the mixed-aspect stage-2 mix: 1 process x mb4 padded, the same padding-free, 2-process ZeRO-2 x mb1 x
    acc2 padding-free and 2-process ZeRO-3 x mb1 x acc2 log the same losses; token-budget micro-batches under
    2-process ZeRO-2 match 1 process. The control: the base-resolution model these tiles were upgraded from."""
    train = {"max_steps": 3, "max_grad_norm": 0.0, "warmup_ratio": 0.0, "log_sample_ids": True}
    runs = {}
    layouts = {
        "padded": (0, 4, 1, False, ""),
        "packed": (0, 4, 1, True, ""),
        "zero2-2x1x2": (2, 1, 2, True, ""),
        "zero3-2x1x2": (2, 1, 2, False, "accelerate_config_zero3.yaml"),
        "base-resolution": (0, 4, 1, False, ""),
    }
    for name, (processes, micro, accum, packed, zero) in layouts.items():
        config = run_config(
            name,
            model=tiny_model_dir if name == "base-resolution" else next_dir,
            shapes=aspect_mix,
            mode="freeze_vision",
            train={**train, "micro_batch_size": micro, "grad_accum": accum},
            data={"padding_free": packed, "max_length": 1024},
        )
        if processes:
            helpers.launch(config, processes=processes, accelerate_config=zero or "accelerate_config.yaml")
        else:
            helpers.train_here(config)
        runs[name] = helpers.metrics(tmp_path / name)
    assert helpers.mixed_slots(runs["zero2-2x1x2"])  # some slot had an image on one rank and none on the other
    reference = [m["loss"] for m in runs["padded"]]
    for name in ("packed", "zero2-2x1x2", "zero3-2x1x2"):
        assert [m["loss"] for m in runs[name]] == pytest.approx(reference, rel=1e-5), name
    assert [m["loss"] for m in runs["base-resolution"]] != pytest.approx(reference, rel=1e-3)
    assert all(m["pad_fraction"] == 0 for m in runs["packed"])

    budget = {"padding_free": True, "max_length": 1024, "max_tokens_per_micro_batch": 1024}
    helpers.check_token_budgets_match(run_config, tmp_path, model=next_dir, shapes=aspect_mix, train=train, data=budget)


@pytest.mark.slow
def test_a_tiled_lora_run_resumes_bitwise_and_its_export_infers_and_evaluates_at_any_aspect_ratio(
    tmp_path, run_config, next_dir, aspect_mix
):
    """LoRA (dropout on) on the mixed-aspect mix: stopped at step K and resumed in a fresh process, the run
    matches an uninterrupted one to the bit (the control: a resume that forgets the data position). Its export,
    merged and as a PEFT adapter on the base (image_newline included), gives the trained model's logits; llava_loop's
    generation and transformers' pipeline say the same for a wide and a tall image; evaluation takes them all."""
    from llava_loop.checkpoint import files as checkpoint
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import caption, load_for_inference

    hooks = ["plugins:FinalState", "plugins:StopAtStep", "plugins:FinalLogits"]
    sections = {"train": helpers.RESUMED_TRAIN, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "hooks": hooks}
    sections["data"] = {"max_length": 1024}  # two tiled images take 400 placeholders
    configs = {name: run_config(name, model=next_dir, shapes=aspect_mix, mode="lora", **sections) for name in "ABC"}
    helpers.check_resumes_bitwise(configs, tmp_path)

    ckpt = checkpoint.complete_checkpoints(tmp_path / "B")[-1]
    export = tmp_path / "export"
    exported = helpers.export_and_rerun_logits(ckpt, tmp_path / "B", export, adapter_base=next_dir)
    reference = torch.load(tmp_path / "B" / "final_logits.pt")
    assert set(exported) == {"merged", "adapter"}
    for logits in exported.values():
        assert (logits - reference["logits"]).abs().max() < 1e-5
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    newline = load_file(export / "adapter" / "adapter_model.safetensors")["base_model.model.model.image_newline"]
    untrained = AutoModelForImageTextToText.from_pretrained(next_dir).model.image_newline
    assert not torch.equal(newline, untrained)  # it trained, and the adapter carries it

    model, processor, encoder = load_for_inference(export)
    images = [Image.new("RGB", (192, 64), (200, 40, 40)), Image.new("RGB", (64, 128), (40, 40, 200))]
    greedy = {"max_new_tokens": 6, "min_new_tokens": 6}
    ours, unreadable = caption(model, encoder, images, "What is shown?", **greedy)
    assert not unreadable
    from transformers import pipeline

    captioner = pipeline("image-text-to-text", model=str(export))
    for image, answer in zip(images, ours):
        content = [{"type": "image", "image": image}, {"type": "text", "text": "What is shown?"}]
        messages = [{"role": "user", "content": content}]
        # the prompt transformers' processor makes from the exported chat template is llava_loop's, tiles and all
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        theirs = processor(text=[text], images=[image], return_tensors="pt")
        ids = encoder.expand(encoder.question_ids("What is shown?"), [(image.height, image.width)])
        assert theirs["input_ids"][0].tolist() == ids
        ours_in = encoder.image_inputs([image])
        assert torch.equal(theirs["image_sizes"], ours_in["image_sizes"])
        assert torch.equal(theirs["pixel_values"][0], ours_in["pixel_values"])  # one image: (tiles, 3, side, side)
        said = captioner(text=messages, return_full_text=False, generate_kwargs={"do_sample": False, **greedy})
        assert said[0]["generated_text"].strip() == answer
    records = load_records(aspect_mix["train"]).subset(range(12))
    metrics, predictions, left_out = evaluate_model(
        model, encoder, records, aspect_mix["train_images"], max_new_tokens=4
    )
    assert not left_out and metrics["n"] == len(predictions) == 12 and metrics["eval_tokens"] > 0
