"""Inference and evaluation on exported models, base + adapter and checkpoints; the stop at <|im_end|>."""

from __future__ import annotations

import json

import pytest
import torch

from llava_loop.checkpoint.files import complete_checkpoints

import helpers

PROMPT = "Describe the image briefly."


def _cli(*args):
    out = helpers.cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, shapes_data):
    """A full-mode and a LoRA run (long enough to learn to end answers), each exported."""
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for mode, lr in (("full", 2e-3), ("lora", 5e-3)):
        config = helpers.write_config(
            root / f"{mode}.yaml",
            model=tiny_model_dir,
            shapes=shapes_data,
            output_dir=root / mode,
            mode=mode,
            train={"max_steps": 60, "micro_batch_size": 8, "lr": lr, "warmup_ratio": 0.1},
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
        )
        helpers.train_here(config)
        checkpoint = complete_checkpoints(root / mode)[-1]
        _cli("export", "--checkpoint", str(checkpoint), "--out", str(root / f"{mode}-export"))
        runs[mode] = {
            "checkpoint": checkpoint,
            "export": root / f"{mode}-export",
            "output_dir": root / mode,
            "in_loop_eval": helpers.metrics(root / mode, "eval")[-1]["eval_loss"],
        }
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("how", ["export", "base+adapter", "checkpoint"])
def test_eval_agrees_with_the_in_loop_evaluation(how, trained, tiny_model_dir, shapes_data, tmp_path):
    mode = "full" if how == "export" else "lora"
    run = trained[mode]
    model_args = {
        "export": ["--model", str(run["export"])],
        "base+adapter": ["--model", str(tiny_model_dir), "--adapter", str(trained["lora"]["export"] / "adapter")],
        "checkpoint": ["--model", str(run["checkpoint"])],
    }[how]
    out = tmp_path / "results.json"
    printed = _cli(
        "eval",
        *model_args,
        "--data",
        str(shapes_data["val"]),
        "--image-dir",
        str(shapes_data["val_images"]),
        "--scorer",
        "llava_loop.demo.shapes:attribute_accuracy",
        "--out",
        str(out),
    ).stdout
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert metrics["eval_loss"] == pytest.approx(run["in_loop_eval"], rel=1e-5)  # same images, same number
    assert metrics["n"] == 32 and len(results["predictions"]) == 32
    for key in ("exact_match", "token_f1", "color_accuracy", "shape_accuracy", "position_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0 and key in printed
    # infer on one of those images agrees with eval's generation for it
    first = results["predictions"][0]
    single = _cli(
        "infer",
        *model_args,
        "--image",
        str(shapes_data["val_images"] / first["images"][0]),
        "--prompt",
        first["prompt"],
        "--device",
        "cpu",
    ).stdout.strip()
    assert single.splitlines()[-1].strip() == first["prediction"]


@pytest.mark.slow
def test_caption_a_folder_and_the_python_api_agree(trained, shapes_data, tmp_path):
    from llava_loop.infer import caption, images_in, load_for_inference

    out = tmp_path / "captions.jsonl"
    _cli(
        "infer",
        "--model",
        str(trained["full"]["export"]),
        "--images-dir",
        str(shapes_data["val_images"]),
        "--out",
        str(out),
        "--prompt",
        PROMPT,
        "--batch-size",
        "5",
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    files = images_in(shapes_data["val_images"])
    assert [line["image"] for line in lines] == [f.name for f in files]
    model, _, encoder = load_for_inference(trained["full"]["export"])
    assert [line["caption"] for line in lines] == caption(model, encoder, files, PROMPT, batch_size=7)[0]


@pytest.mark.slow
@pytest.mark.floor
def test_generation_stops_at_im_end_and_hides_special_tokens(trained, shapes_data):
    from llava_loop.infer import load_for_inference

    model, processor, encoder = load_for_inference(trained["full"]["export"])
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    ids = torch.tensor([encoder.prompt_ids(PROMPT)])
    image = next(iter(sorted(shapes_data["val_images"].iterdir())))
    from llava_loop.data.images import load_image

    pixels = encoder.pixel_values(load_image(image, encoder.max_image_pixels))[None]
    with torch.no_grad():
        stopped = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40)[0, ids.shape[1] :]
        unstopped = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=40, eos_token_id=None)[
            0, ids.shape[1] :
        ]
    assert stopped[-1] == im_end and len(stopped) < 40  # ended its turn
    assert len(unstopped) == 40  # negative control: without the stop token it talks on
    assert torch.equal(unstopped[: len(stopped)], stopped)
    text = processor.tokenizer.decode(stopped, skip_special_tokens=True)
    assert "<|im_end|>" not in text and text.strip()


def test_inference_runs_on_the_gpu_in_bf16_when_there_is_one_and_says_so_when_asked_for_a_missing_one():
    from llava_loop.errors import UserError
    from llava_loop.infer import inference_device

    device, dtype = inference_device("auto")
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
        with pytest.raises(UserError, match="no CUDA GPU is visible; use --device cpu"):
            inference_device("cuda")
    assert inference_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="not a device name"):
        inference_device("gpu0")


@pytest.mark.slow
def test_a_bad_image_never_stops_infer_or_eval_and_is_listed(trained, shapes_data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(shapes_data["val_images"], images)
    files = sorted(images.iterdir())
    files[1].write_text("not an image")  # corrupt
    files[2].unlink()  # missing (eval only: infer captions what is in the folder)
    model = str(trained["full"]["export"])
    out = tmp_path / "captions.jsonl"
    run = helpers.cli("infer", "--model", model, "--images-dir", str(images), "--out", str(out), "--prompt", PROMPT)
    assert run.returncode == 1  # some failed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 31 and [r["image"] for r in rows if "error" in r] == [files[1].name]
    assert all(r["caption"] for r in rows if "error" not in r) and rows[1]["error"] == "corrupt_image"
    assert "1 left out" in run.stderr and files[1].name in run.stderr
    results = tmp_path / "results.json"
    run = helpers.cli(
        "eval", "--model", model, "--data", str(shapes_data["val"]), "--image-dir", str(images), "--out", str(results)
    )
    assert run.returncode == 1
    report = json.loads(results.read_text())
    assert report["metrics"]["n"] == 30 and report["metrics"]["left_out"] == 2
    assert sorted(x["reason"] for x in report["left_out"]) == ["corrupt_image", "missing_image"]
    single = helpers.cli("infer", "--model", model, "--image", str(files[1]))
    assert single.returncode == 2 and "cannot be used as an image (corrupt_image" in single.stderr
    assert "Traceback" not in single.stderr


@pytest.mark.slow
def test_eval_reads_parquet_with_embedded_images_as_it_reads_json(trained, shapes_data, tmp_path):
    """The same held-out records as a Parquet file with the images embedded (the datasets Image struct, no image
    folder) score exactly as the JSON records with their image folder."""
    import datasets

    from llava_loop.data.records import load_records
    from llava_loop.data.sources import open_records
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    records = json.loads(shapes_data["val"].read_text())
    rows = [
        {
            "id": r["id"],
            "conversations": r["conversations"],
            "image": {"bytes": (shapes_data["val_images"] / r["image"]).read_bytes(), "path": r["image"]},
        }
        for r in records
    ]
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "val.parquet"))
    model, _, encoder = load_for_inference(trained["full"]["export"], device="cpu")
    from_json, json_predictions, _ = evaluate_model(
        model, encoder, load_records(shapes_data["val"]), shapes_data["val_images"]
    )
    from_parquet, parquet_predictions, left_out = evaluate_model(
        model, encoder, open_records(tmp_path / "val.parquet"), ""
    )
    assert not left_out and from_parquet == from_json
    assert [p["prediction"] for p in parquet_predictions] == [p["prediction"] for p in json_predictions]


def test_eval_asks_every_record_with_no_image_one_or_several(tiny_model_dir, tmp_path):
    """One batch mixes one-image records, two-image records (the demo's pair task) and text-only ones, and every
    record is asked its first question. Each prompt is the training layout's own prefix, and the logits generation
    starts from are the training forward's at the first answer token, with each image in its own placeholders;
    swapping a two-image record's images there moves them (the negative control). A record with no question to ask
    is counted and named."""
    from llava_loop.data.collate import Collator
    from llava_loop.data.encode import IGNORE_INDEX
    from llava_loop.data.records import load_records
    from llava_loop.demo.shapes import attribute_accuracy, write_shapes
    from llava_loop.evaluate import evaluate_model
    from llava_loop.infer import load_for_inference

    path = write_shapes(tmp_path, 8, seed=3, size=64, prefix="m", pair_ratio=0.5)
    raw = json.loads(path.read_text()) + [
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "What is red?"}, {"from": "gpt", "value": "red ."}],
        },
        {"id": "no_question", "conversations": [{"from": "gpt", "value": "red ."}]},
    ]
    path.write_text(json.dumps(raw))
    records = load_records(path)
    asked = [records[i] for i in range(len(raw) - 1)]
    assert sorted({len(r.images) for r in asked}) == [0, 1, 2]
    model, _, encoder = load_for_inference(tiny_model_dir, device="cpu")
    prefills = []  # the last is generation's first forward: every prompt at once, left-padded
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: prefills.append(out.logits[:, -1]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    metrics, predictions, left_out = evaluate_model(
        model, encoder, records, tmp_path / "images", max_new_tokens=2, scorers=[attribute_accuracy]
    )
    hook.remove()
    assert [p["id"] for p in predictions] == [r.id for r in asked] and metrics["n"] == len(asked)
    assert [p["images"] for p in predictions] == [list(r.images) for r in asked]
    assert [(x["id"], x["reason"]) for x in left_out] == [("no_question", "no_question")] and metrics["left_out"] == 1
    assert "no user turn" in left_out[0]["detail"]
    assert "color_accuracy" in metrics  # over the one-image captions, the pair answers aside
    generation_starts = prefills[-1]
    assert generation_starts.shape[0] == len(asked)
    collate = Collator(encoder.tokenizer.pad_token_id)

    def first_answer_logits(sample):  # the training forward, alone, at the position that predicts the answer
        labels = sample["labels"].tolist()
        at = labels.index(next(x for x in labels if x != IGNORE_INDEX)) - 1
        batch = collate([dict(sample, skipped=[])])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
        with torch.no_grad():
            return model(**inputs).logits[0, at], sample["input_ids"][: at + 1].tolist()

    for row, (record, prediction) in enumerate(zip(asked, predictions)):
        sample = encoder(record, tmp_path / "images")
        expected, prompt = first_answer_logits(sample)
        question = encoder.first_question(record)[0]
        assert encoder.expand(question, [(0, 0)] * question.count(encoder.image_token_id)) == prompt, record.id
        assert (generation_starts[row] - expected).abs().max() < 1e-5, record.id
        if len(record.images) == 2:
            swapped, _ = first_answer_logits(dict(sample, pixel_values=sample["pixel_values"].flip(0)))
            assert (generation_starts[row] - swapped).abs().max() > 1e-3, record.id
            assert encoder.prompt_ids(prediction["prompt"], ((0, 0), (0, 0))) == prompt  # infer's, as in training


def test_infer_lays_out_a_multi_image_prompt_as_training_lays_out_the_record(trained, tmp_path):
    """``infer --image a --image b`` with the record's own question: the prompt ids are the training layout's
    prefix for that two-image record (each tag where the question put it), and the CLI says what the Python API
    generates. A prompt without tags gets one per image at its start; a tag count that is not the image count
    is refused, naming both (a one-image layout of this prompt dropped a tag: the control)."""
    from llava_loop.data.records import load_records
    from llava_loop.demo.shapes import write_shapes
    from llava_loop.errors import UserError
    from llava_loop.infer import generate, load_for_inference

    records = load_records(write_shapes(tmp_path, 2, seed=5, size=64, prefix="p", pair_ratio=1.0))
    record = records[0]
    question = record.turns[0][1]
    assert question.count("<image>") == 2 and question.index("<image>") > 0  # interleaved, not at the start
    model, _, encoder = load_for_inference(trained["full"]["export"], device="cpu")
    image_id = encoder.image_token_id
    ids = encoder.question_ids(question, 2)
    assert ids == encoder.first_question(record)[0]
    with pytest.raises(UserError, match="2 <image> tags for 1 image"):
        encoder.question_ids(question, 1)
    untagged = encoder.question_ids("Which is red?", 2)
    assert untagged.count(image_id) == 2 and untagged.index(image_id) < untagged.index(
        encoder.tokenizer("Which")["input_ids"][0]
    )
    images = [str(tmp_path / "images" / name) for name in record.images]
    out = _cli(
        "infer",
        "--model",
        str(trained["full"]["export"]),
        "--device",
        "cpu",
        "--image",
        images[0],
        "--image",
        images[1],
        "--prompt",
        question,
        "--max-new-tokens",
        "6",
    )
    said = generate(model, encoder, [images], question, max_new_tokens=6)[0]
    assert said and out.stdout.strip() == said


def test_an_adapter_on_its_base_is_prompted_as_its_run_trained_and_never_applied_twice(
    tiny_model_dir, shapes_data, tmp_path
):
    """A LoRA run with a system prompt, pad and a max_length: its merged export, its checkpoint and its adapter on
    the base model all lay prompts out alike and truncate held-out records at the run's max_length (before, the
    adapter got no system prompt, resize and no limit); the adapter on the merged export is refused (LoRA twice).
    Control: the base model alone keeps the defaults."""
    from llava_loop.data.records import load_records
    from llava_loop.errors import UserError
    from llava_loop.infer import load_for_inference

    config = helpers.write_config(
        tmp_path / "lora.yaml",
        model=tiny_model_dir,
        shapes=shapes_data,
        output_dir=tmp_path / "run",
        mode="lora",
        data={"system_prompt": "Name colours.", "image_aspect_ratio": "pad", "max_length": 140},
        train={"max_steps": 2},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
    )
    helpers.train_here(config)
    checkpoint = complete_checkpoints(tmp_path / "run")[-1]
    _cli("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"))
    record = load_records(shapes_data["val"])[0]

    def layout(*where):
        _, _, encoder = load_for_inference(*where, device="cpu")
        settings = (encoder.system_prompt, encoder.image_aspect_ratio, encoder.max_length)
        return settings, encoder.first_question(record)[0]

    merged = layout(tmp_path / "export")
    assert merged[0] == ("Name colours.", "pad", 140)
    assert layout(checkpoint) == merged
    assert layout(tiny_model_dir, tmp_path / "export" / "adapter") == merged
    assert layout(tiny_model_dir)[0] == ("", "resize", 1 << 30)
    with pytest.raises(UserError, match="merged LoRA export: its adapter is in its weights already"):
        load_for_inference(tmp_path / "export", tmp_path / "export" / "adapter", device="cpu")


def test_cli_mistakes_are_named_before_any_model_loads(tiny_model_dir, shapes_data, tmp_path, capsys):
    """Each of these once ran the whole evaluation or captioning first, then failed writing or checking (a raw
    traceback, or no results file), or dropped the argument without a word."""
    from llava_loop.cli import main

    data = ["--data", str(shapes_data["val"]), "--image-dir", str(shapes_data["val_images"])]
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    cases = [
        (["infer", *model, "--images-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c.jsonl")], "not a folder"),
        (
            [
                "infer",
                *model,
                "--images-dir",
                str(shapes_data["val_images"]),
                "--out",
                str(tmp_path / "no" / "c.jsonl"),
            ],
            "does not exist; create it",
        ),
        (["infer", *model, "--image", "a.png", "--images-dir", str(shapes_data["val_images"])], "Pass one"),
        (["eval", *model, *data, "--out", str(tmp_path / "no" / "r.json")], "does not exist; create it"),
        (["eval", *model, *data, "--adapter", str(tmp_path), "--lmms-eval", "--tasks", "mme"], "not --adapter"),
        (["eval", *model, *data, "--lmms-eval"], "--lmms-eval needs --tasks"),
        (["eval", *model, *data, "--tasks", "mme"], "add --lmms-eval"),
        (["eval", *model, *data, "--adapter", str(tmp_path)], "no adapter_config.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        printed = capsys.readouterr()
        assert message in printed.err and "Traceback" not in printed.err and "evaluation of" not in printed.out, argv
