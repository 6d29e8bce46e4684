"""Training LLaVA-OneVision models (issue 27, train; the extras step: OneVision's processor needs torchvision).
Proven here: a sample holds what transformers' own OneVision processor makes of the same record, token for token
and pixel for pixel, for single images of several aspect ratios (tiled, anyres_max pooling included), a two-image
record (each image one square view: OneVision's multi-image rule) and a text-only one; a mixed batch gives the
same losses and gradients padded and packed; and a short real run exports a model plain transformers reloads
with the trained logits and that generates as llava_loop does, for one image and for two."""

from __future__ import annotations

import numpy as np
import pytest
import test_anyres_train
import torch
from PIL import Image
from test_anyres_train import _losses_and_grads, _write_mixed_records

from llava_loop.data.collate import Collator
from llava_loop.data.dataset import LlavaDataset
from llava_loop.data.encode import SampleEncoder, record_messages
from llava_loop.data.images import load_image
from llava_loop.data.records import load_records
from llava_loop.runtime import load_model
from llava_loop.template import render

import helpers

pytestmark = pytest.mark.extras
aspect_mix = test_anyres_train.aspect_mix  # its fixture: the mixed-aspect stage-2 mix, two-image records in it


@pytest.fixture(scope="module")
def onevision_dir(tiny_model_dir, tmp_path_factory):
    """The session's tiny model upgraded to OneVision (its towers and projector, a seeded image_newline)."""
    from llava_loop.build import upgrade_llava

    out = tmp_path_factory.mktemp("onevision") / "model"
    upgrade_llava(tiny_model_dir, out, arch="llava-onevision")
    return out


def _noise(width, height, seed):
    """Random pixels: a squashed view and a padded one differ everywhere, not only in the padding."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_samples_hold_what_the_onevision_processor_makes_of_each_record(onevision_dir, tmp_path):
    """Square, wide, tall and a 4x4-tile image (past anyres_max_9: its features are pooled), one per record; a
    two-image record; a text-only record: input ids, pixels, image_sizes and batch_num_images equal the
    processor's. The counts follow the rule: a lone image is tiled, each of two gets one view and a newline."""
    model, processor = load_model(onevision_dir)
    sizes = {"square.png": (64, 64), "wide.png": (192, 64), "tall.png": (64, 128), "big.png": (256, 256)}
    for seed, (name, size) in enumerate(sizes.items()):
        _noise(*size, seed).save(tmp_path / name)
    records = _write_mixed_records(tmp_path, sizes)
    encoder = SampleEncoder(processor, max_length=4096)
    counts = []
    for i in range(len(records)):
        record, sample = records[i], encoder(records[i], tmp_path)
        images = [load_image(tmp_path / name) for name in record.images]
        text = render(processor.tokenizer, record_messages(record))
        theirs = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        assert sample["input_ids"].tolist() == theirs["input_ids"][0].tolist(), record.id
        counts.append(int((sample["input_ids"] == encoder.image_token_id).sum()))
        if not images:
            assert sample["pixel_values"] is None and "pixel_values" not in theirs
            continue
        # the processor pads a sample's images to its most views: one sample of one image has none to pad
        views = theirs["pixel_values"][0] if len(images) == 1 else theirs["pixel_values"][:, 0]
        assert torch.equal(sample["pixel_values"], views), record.id
        for key in ("image_sizes", "batch_num_images"):
            assert torch.equal(sample[key], theirs[key]), (record.id, key)
    square, wide, tall, big, two, text = counts
    assert len({square, wide, tall, big}) == 4 and text == 0
    vision = model.config.vision_config
    assert two == 2 * ((vision.image_size // vision.patch_size) ** 2 + 1) < wide + tall  # a view and a newline each


def test_a_mixed_onevision_batch_trains_alike_padded_and_packed(onevision_dir, aspect_mix):
    """Square, wide and tall single images (tiled), a two-image record (a view each) and a text-only record in one
    batch: padded and padding-free forwards give the same per-token losses and gradients within 1e-5,
    image_newline's included; the control, the batch's views in another order, does not."""
    _, processor = load_model(onevision_dir)
    dataset = LlavaDataset(load_records(aspect_mix["train"]), SampleEncoder(processor, max_length=2048),
                           aspect_mix["train_images"])  # fmt: skip
    ids = [dataset.records[i].id for i in range(len(dataset))]
    pick = {"text_": 1, "pair": 1, "shapes": 4}  # how many of each kind, in the mix's order
    chosen = sorted(i for kind, n in pick.items() for i in [k for k, rid in enumerate(ids) if rid.startswith(kind)][:n])
    samples = [dataset[i] for i in chosen]
    assert any(s["batch_num_images"].tolist() == [2] for s in samples if s["pixel_values"] is not None)
    assert len({tuple(s["image_sizes"][0].tolist()) for s in samples if s["pixel_values"] is not None}) > 1
    pad = processor.tokenizer.pad_token_id
    padded, packed = Collator(pad)(samples), Collator(pad, padding_free=True)(samples)
    reference, reference_grads = _losses_and_grads(onevision_dir, "full", padded)
    assert any(name.endswith("image_newline") for name in reference_grads)
    losses, grads = _losses_and_grads(onevision_dir, "full", packed)
    assert losses.shape == reference.shape and (losses - reference).abs().max() < 1e-5
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert (grad - reference_grads[name]).abs().max() < 1e-5, name
    shuffled = dict(packed, pixel_values=packed["pixel_values"].flip(0))
    assert (_losses_and_grads(onevision_dir, "full", shuffled)[0] - reference).abs().max() > 1e-3


@pytest.mark.slow
def test_a_onevision_run_exports_a_model_that_reloads_and_generates(tmp_path, run_config, onevision_dir, aspect_mix):
    """A short padding-free run on the mixed-aspect mix (two-image and text-only records in it); its export, loaded
    by plain transformers, gives the trained model's logits; reloaded, llava_loop generates for a wide image and
    for a two-image prompt what transformers' processor and generate say."""
    from transformers import AutoModelForImageTextToText

    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.export import export as to_export
    from llava_loop.infer import generate_ids, load_for_inference

    config = run_config(
        model=onevision_dir,
        shapes=aspect_mix,
        mode="freeze_vision",
        hooks=["plugins:FinalLogits"],
        train={"max_steps": 3},
        data={"padding_free": True, "max_length": 1024},
        checkpoint={"every": 0, "keep_last": 1},
    )
    helpers.train_here(config)
    export = tmp_path / "export"
    to_export(complete_checkpoints(tmp_path / "run")[-1], export)
    plain = AutoModelForImageTextToText.from_pretrained(export).eval()
    reference = torch.load(tmp_path / "run" / "final_logits.pt")
    with torch.no_grad():
        assert (plain(**reference["inputs"]).logits - reference["logits"]).abs().max() < 1e-5

    model, processor, encoder = load_for_inference(export, device="cpu")
    wide, tall = _noise(192, 64, 0), _noise(64, 128, 1)
    prompts = {"<image>\nWhat is shown?": [wide], "<image> then <image>: which is wider?": [wide, tall]}
    prompt_ids = [encoder.generation_ids([{"role": "user", "content": text}]) for text in prompts]  # tags kept
    greedy = {"max_new_tokens": 6, "min_new_tokens": 6}
    ours = generate_ids(model, encoder, prompt_ids, list(prompts.values()), **greedy)
    for ids, images, answer in zip(prompt_ids, prompts.values(), ours):
        theirs = processor(text=[processor.tokenizer.decode(ids)], images=[images], return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == encoder.expand(ids, [(im.height, im.width) for im in images])
        out = plain.generate(**theirs, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, **greedy)
        said = processor.tokenizer.decode(out[0, theirs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert said.strip() == answer
