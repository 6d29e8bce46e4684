"""Preference tuning on the same loop (issue 39): preference records in three layouts, pairs encoded as SFT lays
out a record and kept together in a micro-batch, the loss-unit and reference extension points, and the DPO, IPO
and DPO + SFT objectives: exact across layouts, resumable, and equal to TRL's DPOTrainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_loop.data.collate import Collator
from llava_loop.data.encode import IGNORE_INDEX, SampleEncoder
from llava_loop.data.records import Record, RecordError, load_records

import helpers


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, shapes_data) -> dict:
    return {**helpers.preference_data(tmp_path_factory.mktemp("pairs"), shapes_data), "shapes": shapes_data}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """The tiny model drawn from another seed: a reference that is not the policy."""
    from llava_loop.demo.tiny import TinySpec, build_tiny

    out = tmp_path_factory.mktemp("other") / "model"
    build_tiny(out, TinySpec(seed=3))
    return out


def pairs_source(pairs: dict) -> dict:
    return pairs["shapes"]


def test_trl_rlaif_v_and_llava_next_layouts_read_as_the_same_pairs(tmp_path, shapes_data):
    """The same pairs written in TRL's conversational layout (image parts in content lists), RLAIF-V's and
    LLaVA-NeXT's DPO json read as the same prompts, answers and images."""
    read = {
        layout: load_records(helpers.preference_data(tmp_path, shapes_data, layout, text_only_every=5)["train"])
        for layout in ("llava-next", "trl", "rlaif-v")
    }
    reference = read["llava-next"]
    assert len(reference) == 96 and reference[1].turns[-2][0] == "chosen" and reference[1].turns[-1][0] == "rejected"
    assert reference[1].images and reference[1].turns[0][1].startswith("<image>\n")  # LLaVA's layout: image first
    assert not reference[5].images and "<image>" not in reference[5].turns[0][1]  # a text-only pair
    for layout in ("trl", "rlaif-v"):
        assert [(r.images, r.turns) for r in read[layout]] == [(r.images, r.turns) for r in reference], layout


@pytest.mark.parametrize(
    "raw, why",
    [
        ({"chosen": "a", "rejected": "b"}, "needs a 'prompt'"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "must be the assistant's"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "end with a user turn"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "image": 3}, "must be a relative path"),
    ],
)
def test_a_broken_pair_is_named_with_its_file_record_and_fix(raw, why, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}, raw]))
    with pytest.raises(RecordError, match=rf"{path}: record 1.*{why}"):
        load_records(path)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_each_side_of_a_pair_is_the_sft_layout_of_its_prompt_and_answer(template, pairs, tiny_processor):
    """Chosen and rejected are each the record SFT would make of the prompt and that answer (same ids; labels on the
    answer and its end alone), under the chat template and LLaVA's plain layout alike; the two share the prompt."""
    encoder = SampleEncoder(tiny_processor, max_length=256, template=template)
    record = load_records(pairs["train"])[0]
    sample = encoder(record, pairs["train_images"])
    for key, side in (("chosen", sample), ("rejected", sample["rejected"])):
        answer = dict(record.turns)[key]
        sft = encoder(
            Record(record.id, record.images, (*record.turns[:-2], ("assistant", answer))), pairs["train_images"]
        )
        assert torch.equal(side["input_ids"], sft["input_ids"]) and torch.equal(side["labels"], sft["labels"]), key
        supervised = side["labels"][side["labels"] != IGNORE_INDEX]
        assert tiny_processor.tokenizer.decode(supervised).strip().startswith(answer), key
    chosen, rejected = sample["input_ids"], sample["rejected"]["input_ids"]
    start = int((sample["labels"] != IGNORE_INDEX).nonzero()[0])  # where the chosen answer begins
    assert torch.equal(chosen[:start], rejected[:start]) and not torch.equal(chosen, rejected)


def test_a_pair_too_long_for_max_length_is_skipped_not_cut(pairs, tiny_processor):
    from llava_loop.data.skips import SkipSample

    record = load_records(pairs["train"])[0]
    encoder = SampleEncoder(tiny_processor, max_length=70)  # the prompt's 64 image tokens fit, an answer does not
    with pytest.raises(SkipSample, match="too_long|data.max_length"):
        encoder(record, pairs["train_images"])


def _batch(mixed, tiny_processor, padding_free: bool, n: int = 3) -> dict:
    encoder = SampleEncoder(tiny_processor, max_length=256)
    records = load_records(mixed["train"])
    samples = [{**encoder(records[i], mixed["train_images"]), "skipped": []} for i in range(n)]
    return Collator(tiny_processor.tokenizer.pad_token_id, padding_free=padding_free)(samples)


def test_a_pair_stays_in_its_micro_batch_and_its_log_probs_are_the_same_padded_or_packed(
    tmp_path, shapes_data, tiny_processor, tiny_model_dir
):
    """Three pairs (one text-only) make six sequences, every chosen one first; each sequence's log-probability is
    the same padded or packed into one row, and equals the sequence scored alone. Control: scoring the packed row
    with another sequence map gives other sums."""
    from llava_loop.data.blank_image import BlankImage
    from llava_loop.preference import sequence_logps
    from llava_loop.runtime import load_model

    model = load_model(tiny_model_dir)[0].eval()
    blank = BlankImage(SampleEncoder(tiny_processor, max_length=256), torch.device("cpu"))
    mixed = helpers.preference_data(tmp_path, shapes_data, text_only_every=2)
    padded, packed = (blank.add_where_missing(_batch(mixed, tiny_processor, p)) for p in (False, True))
    assert padded["n_pairs"] == padded["n_samples"] == 3 and padded["input_ids"].shape[0] == 6
    assert padded["ids"] == packed["ids"] and len(packed["sample_bounds"]) == 7
    with torch.no_grad():
        rows, counts = sequence_logps(model, padded)
        packed_sums, packed_counts = sequence_logps(model, packed)
        assert torch.allclose(rows, packed_sums, atol=1e-4) and torch.equal(counts, packed_counts)
        mixed = {**packed, "supervised_sequence": packed["supervised_sequence"].flip(0)}
        assert not torch.allclose(sequence_logps(model, mixed)[0], rows, atol=1e-2)


def test_the_loss_unit_is_the_losses_own_and_tokens_by_default():
    from llava_loop.config import Call
    from llava_loop.losses import UNITS, unit_count

    batch = {"n_label_tokens": 40, "n_samples": 4, "n_pairs": 2}
    assert unit_count(Call("llava_loop.losses:label_only_ce")) is UNITS["tokens"]
    assert unit_count(Call("llava_loop.preference:dpo"))(batch) == 2
    assert unit_count(Call("plugins:per_sample_ce"))(batch) == 4
    with pytest.raises(Exception, match="unit 'sentences' is none of tokens, samples, pairs"):
        unit_count(Call("plugins:sentence_unit_loss"))


@pytest.mark.slow
def test_token_losses_are_normalised_as_before_and_a_units_own_count_is_used(tmp_path, run_config, shapes_data):
    """The default loss (supervised tokens) and the same loss declaring its unit as a function that counts those
    tokens log the same metrics bitwise, at micro-batch 2 x accumulation 2, on multi-turn records (samples of
    different token counts); per-sample normalisation gives other losses (the control)."""
    from llava_loop.demo.shapes import write_shapes

    data = dict(
        shapes_data,
        train=write_shapes(tmp_path / "mt", 48, seed=6, size=64, max_turns=3),
        train_images=tmp_path / "mt" / "images",
    )
    runs = {}
    for name, loss in [
        ("default", "llava_loop.losses:label_only_ce"),
        ("counted", "plugins:counted_tokens_ce"),
        ("samples", "plugins:per_sample_ce"),
    ]:
        helpers.train_here(run_config(name, shapes=data, loss=loss, train={"micro_batch_size": 2, "grad_accum": 2}))
        runs[name] = [(m["loss"], m["grad_norm"]) for m in helpers.metrics(tmp_path / name)]
    assert runs["default"] == runs["counted"]
    assert max(abs(a[0] - b[0]) for a, b in zip(runs["samples"], runs["default"])) > 1e-2


def _dpo_config(run_config, pairs, name, *, mode="full", loss="dpo", train=None, data=None, **sections):
    return run_config(
        name,
        shapes=pairs,
        mode=mode,
        loss={"fn": f"llava_loop.preference:{loss}", "kwargs": {"beta": 0.1}},
        data={"eval_path": "", **(data or {})},
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        train={"micro_batch_size": 4, "max_steps": 3, "lr": 1e-3, **(train or {})},
        **sections,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode, loss", [("full", "dpo"), ("lora", "dpo"), ("full", "ipo"), ("full", "dpo_sft")])
def test_a_reference_equal_to_the_policy_starts_at_ln2_and_the_rewards_then_part(
    mode, loss, tmp_path, run_config, pairs
):
    """The default reference is the policy's starting weights (a frozen copy; the LoRA policy with its adapters
    off): DPO's first loss is ln 2 exactly, IPO's (1 / 2 beta)^2, and after 4 epochs over 8 pairs the chosen
    answers' rewards lead."""
    eight = helpers.preference_data(tmp_path / "data", pairs_source(pairs), n=8)
    config = _dpo_config(run_config, eight, "run", mode=mode, loss=loss, train={"max_steps": 8, "lr": 3e-4})
    helpers.train_here(config)
    steps = helpers.metrics(tmp_path / "run")
    first = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "dpo_sft": None}[loss]
    if first is not None:
        assert steps[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert steps[0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert steps[0]["logps/chosen"] == pytest.approx(steps[0]["ref_logps/chosen"], rel=1e-6)
    assert steps[-1]["rewards/margin"] > 0.01 and steps[-1]["rewards/accuracy"] >= 0.75, steps[-1]
    if loss == "dpo_sft":
        assert steps[0]["loss"] == pytest.approx(steps[0]["dpo"] + steps[0]["sft_nll"], rel=1e-6)
    if (mode, loss) == ("full", "dpo"):  # export and infer as after any run
        from llava_loop.checkpoint.files import complete_checkpoints
        from llava_loop.cli import main

        checkpoint = complete_checkpoints(tmp_path / "run")[-1]
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
        image = eight["train_images"] / json.loads(eight["train"].read_text())[0]["image"]
        assert main(["infer", "--model", str(tmp_path / "export"), "--image", str(image), "--max-new-tokens", "4"]) == 0


@pytest.mark.slow
def test_dpo_is_exact_across_process_layouts_zero2_zero3_and_packing(tmp_path, run_config, pairs, other_model_dir):
    """Against a reference that is not the policy (another model directory), with text-only pairs among image
    ones: 2 processes ZeRO-2 and ZeRO-3 (micro-batch 1 x accumulation 2) log the losses and rewards of 1 process
    at micro-batch 4 within 1e-5 and its first gradient; padding-free rows equal padded ones. Control: the same
    layout on other data (seed) is far outside the tolerance."""
    mixed = helpers.preference_data(tmp_path / "data", pairs_source(pairs), text_only_every=3, n=24)
    reference_dir = {"path": str(other_model_dir)}
    layouts = {
        "1x4x1": (0, 4, 1, {}, "accelerate_config.yaml"),
        "packed": (0, 4, 1, {"padding_free": True}, "accelerate_config.yaml"),
        "zero2-2x1x2": (2, 1, 2, {}, "accelerate_config.yaml"),
        "zero3-2x1x2": (2, 1, 2, {}, "accelerate_config_zero3.yaml"),
        "control": (2, 1, 2, {}, "accelerate_config.yaml"),
    }
    runs = {}
    for name, (processes, micro, accum, data, accelerate_config) in layouts.items():
        train = {"micro_batch_size": micro, "grad_accum": accum, "max_grad_norm": 0.0, "warmup_ratio": 0.0}
        config = _dpo_config(
            run_config,
            mixed,
            name,
            train={**train, **({"seed": 7} if name == "control" else {})},
            data=data,
            reference=reference_dir,
            hooks=[] if "zero3" in name else ["plugins:GradCapture"],  # ZeRO-3's shards: compared by grad norm
        )
        helpers.launch(config, processes=processes, accelerate_config=accelerate_config)
        captured = tmp_path / name / "grads_step1.pt"
        runs[name] = (helpers.metrics(tmp_path / name), torch.load(captured) if captured.is_file() else None)
    reference, grads = runs["1x4x1"]
    assert reference[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the reference is not the policy
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/chosen", "ref_logps/rejected"]
    for name in ("packed", "zero2-2x1x2", "zero3-2x1x2"):
        steps, their_grads = runs[name]
        assert len(steps) == len(reference) == 3
        for ours, theirs in zip(steps, reference):
            for key in keys:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (name, key)
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), name
        if their_grads is not None:
            diff = torch.linalg.norm(their_grads["flat"] - grads["flat"]) / torch.linalg.norm(grads["flat"])
            assert diff < 1e-5, (name, float(diff))
    control = runs["control"][0]
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(control[1:], reference[1:])) > 1e-3


@pytest.mark.slow
def test_an_adapters_off_reference_is_exact_under_zero2_and_zero3(tmp_path, run_config, pairs):
    """LoRA DPO against the policy with its adapters and trained projector copy switched off (no copy held): 2
    processes under ZeRO-2 and ZeRO-3 (micro-batch 1 x accumulation 2; DeepSpeed's engine wraps the PEFT model,
    and ZeRO-3 partitions both the adapters and the projector copy) log the losses, rewards and reference
    log-probabilities of 1 process at micro-batch 4 within 1e-5, also after the adapters have trained. Control: the
    same layout on other data (seed) is far outside the tolerance."""
    mixed = helpers.preference_data(tmp_path / "data", pairs_source(pairs), text_only_every=3, n=24)
    layouts = {
        "1x4x1": (0, 4, 1, "accelerate_config.yaml"),
        "zero2-2x1x2": (2, 1, 2, "accelerate_config.yaml"),
        "zero3-2x1x2": (2, 1, 2, "accelerate_config_zero3.yaml"),
        "control": (2, 1, 2, "accelerate_config.yaml"),
    }
    runs = {}
    for name, (processes, micro, accum, accelerate_config) in layouts.items():
        train = {"micro_batch_size": micro, "grad_accum": accum, "max_grad_norm": 0.0, "warmup_ratio": 0.0}
        config = _dpo_config(
            run_config,
            mixed,
            name,
            mode="lora",
            train={**train, **({"seed": 7} if name == "control" else {})},
            reference={"hold": "adapters"},
        )
        helpers.launch(config, processes=processes, accelerate_config=accelerate_config)
        runs[name] = helpers.metrics(tmp_path / name)
    reference = runs["1x4x1"]
    assert reference[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the reference is the starting policy
    assert reference[-1]["logps/chosen"] != pytest.approx(reference[-1]["ref_logps/chosen"], rel=1e-4)  # trained
    keys = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "ref_logps/chosen", "ref_logps/rejected"]
    for name in ("zero2-2x1x2", "zero3-2x1x2"):
        assert len(runs[name]) == len(reference) == 3
        for ours, theirs in zip(runs[name], reference):
            for key in keys:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (name, ours["step"], key)
    control = runs["control"]
    assert max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(control[1:], reference[1:])) > 1e-3


@pytest.mark.slow
def test_a_dpo_run_resumes_bitwise(tmp_path, run_config, pairs, monkeypatch):
    """LoRA DPO with the adapters-off reference: a run stopped after step 2 and resumed logs the uninterrupted
    run's losses and rewards bitwise."""
    eight = helpers.preference_data(tmp_path / "data", pairs_source(pairs), n=16)
    for name in ("A", "B"):
        _dpo_config(
            run_config,
            eight,
            name,
            mode="lora",
            hooks=["plugins:StopAtStep"],
            train={"max_steps": 4},
            checkpoint={"every": 2, "keep_last": 2},
        )
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", "-1")
    helpers.train_here(tmp_path / "A.yaml")
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", "2")
    helpers.train_here(tmp_path / "B.yaml")
    monkeypatch.setenv("LLAVA_TEST_STOP_AT", "-1")
    helpers.train_here(tmp_path / "B.yaml")
    a, b = helpers.metrics(tmp_path / "A"), helpers.metrics(tmp_path / "B")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margin", "logps/chosen", "ref_logps/rejected"):
        assert [m[key] for m in a] == [m[key] for m in b], key


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_as_a_held_copy_and_come_back_from_the_cache(
    tmp_path, run_config, pairs, other_model_dir, capfd
):
    """reference.hold=precompute scores every pair once before training (here by another model, and by the policy's
    own starting weights) and holds nothing after: the run logs the held copy's losses and rewards (within 1e-5:
    each pair was scored in another batch), a second run reads the cache and logs the first's bitwise. Records
    sharing an id are refused (the table is keyed by id)."""
    data = helpers.preference_data(tmp_path / "data", pairs_source(pairs), text_only_every=4, n=16)
    runs = {}
    for name, hold, path in [
        ("copy", "copy", other_model_dir),
        ("precompute", "precompute", other_model_dir),
        ("again", "precompute", other_model_dir),
        ("own-copy", "copy", ""),
        ("own-precompute", "precompute", ""),
    ]:
        capfd.readouterr()
        helpers.train_here(_dpo_config(run_config, data, name, reference={"hold": hold, "path": str(path)}))
        runs[name] = (helpers.metrics(tmp_path / name), capfd.readouterr().err)
    keys = ["loss", "rewards/margin", "ref_logps/chosen", "ref_logps/rejected", "logps/chosen"]
    for held, precomputed in [("copy", "precompute"), ("own-copy", "own-precompute")]:
        for a, b in zip(runs[held][0], runs[precomputed][0]):
            assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-5, abs=1e-6), held
        assert "reference log-probabilities of 16 pairs: computed, cached at" in runs[precomputed][1]
    assert "from the cache" in runs["again"][1]
    assert [[m[k] for k in keys] for m in runs["again"][0]] == [[m[k] for k in keys] for m in runs["precompute"][0]]
    assert runs["copy"][0][0]["ref_logps/chosen"] != pytest.approx(runs["own-copy"][0][0]["ref_logps/chosen"])

    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(json.loads(data["train"].read_text()) * 2))
    config = _dpo_config(run_config, {**data, "train": doubled}, "doubled", reference={"hold": "precompute"})
    with pytest.raises(Exception, match="has id 'train_000000' more than once; give every record its own id"):
        helpers.train_here(config)


def _trl_first_step(policy, ref_model, processor, rows, tmp_path, peft_config=None, adapter=None):
    """TRL's DPOTrainer on ``rows``: its collated first batch, and the loss, rewards and margins it computes. With
    ``peft_config`` TRL wraps the policy itself (its reference is then the policy with adapters off) and the
    ``adapter`` state is loaded into it."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,
        remove_unused_columns=False,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        peft_config=peft_config,
    )
    if adapter is not None:
        missing = set(adapter) - set(trainer.model.state_dict())
        assert not missing, sorted(missing)[:3]
        trainer.model.load_state_dict(adapter, strict=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    figures = {"loss": float(loss), **{key: logged[key][-1] for key in ("rewards/chosen", "rewards/rejected")}}
    return batch, {**figures, "rewards/margin": logged["rewards/margins"][-1]}


def _ours_on(batch: dict, policy, reference) -> dict:
    """Our DPO on TRL's collated batch, its completion mask as the labels: the same tokens, so the same layout."""
    from llava_loop.data.collate import supervised_index
    from llava_loop.preference import dpo

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    supervised = supervised_index(labels)
    pairs = len(labels) // 2
    ours = {
        **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
        "labels": labels,
        "supervised": supervised,
        "supervised_sequence": supervised[0],
        "n_pairs": pairs,
        "n_samples": pairs,
        "ids": [str(i) for i in range(pairs)],
    }
    with torch.no_grad():
        out = dpo(policy, ours, reference, beta=0.1)
    return {key: float(out[key]) / pairs for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin")}


@pytest.mark.slow
def test_the_first_step_equals_trls_dpo_trainer_in_full_and_lora(
    tmp_path, run_config, pairs, tiny_model_dir, other_model_dir
):
    """TRL's DPOTrainer and ours on the same tiny LLaVA, the same four pairs (TRL's conversational layout with
    image parts) and the same collated tensors: loss, rewards and margins within 1e-5. full: a reference directory
    that is not the policy; lora: the adapter-disabled reference, after 3 DPO steps of ours (the adapter is not
    zero). TRL supervises the newline after <|im_end|> that our layout leaves out: the comparison runs both
    objectives on TRL's batch, so the layouts are the same by construction."""
    from accelerate import Accelerator
    from PIL import Image

    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.export import load_trained
    from llava_loop.reference import AdaptersOff, Frozen
    from llava_loop.runtime import load_model

    records = json.loads(pairs["train"].read_text())[:4]
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}],
            "images": [Image.open(pairs["train_images"] / r["image"]).convert("RGB")],
        }
        for r in records
    ]
    accelerator = Accelerator(cpu=True)
    processor = load_model(tiny_model_dir)[1]

    batch, theirs = _trl_first_step(
        load_model(tiny_model_dir)[0], load_model(other_model_dir)[0], processor, rows, tmp_path / "full"
    )
    ours = _ours_on(batch, load_model(tiny_model_dir)[0].eval(), Frozen(load_model(other_model_dir)[0], accelerator))
    assert theirs["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the reference is not the policy
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)

    helpers.train_here(_dpo_config(run_config, pairs, "lora", mode="lora", train={"max_steps": 3}))
    policy = load_trained(complete_checkpoints(tmp_path / "lora")[-1])[0]
    trained = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    config = policy.peft_config["default"]
    batch, theirs = _trl_first_step(
        load_model(tiny_model_dir)[0], None, processor, rows, tmp_path / "lora-trl", peft_config=config, adapter=trained
    )
    ours = _ours_on(batch, policy, AdaptersOff(policy, accelerator))
    assert abs(theirs["rewards/margin"]) > 1e-4  # the adapter moved the policy off its reference
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_the_guides_simpo_file_trains_on_the_loop_unchanged(tmp_path, run_config, pairs, monkeypatch):
    """The guide's "one short file" objective (docs/guide/extending.md), taken from the page as it is: a module of its
    own, named in the config, trains with no reference and its margin grows over 4 epochs of 8 pairs."""
    import re
    import sys

    page = (helpers.ROOT / "docs" / "guide" / "extending.md").read_text()
    code = re.search(r"```python\n(# my_project/simpo\.py.*?)```", page, re.S).group(1)
    (tmp_path / "my_simpo.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_simpo", None)
    eight = helpers.preference_data(tmp_path / "data", pairs_source(pairs), n=8)
    config = _dpo_config(run_config, eight, "simpo", train={"max_steps": 8, "lr": 3e-4}, loss="dpo")
    helpers.train_here(config, "loss=my_simpo:simpo")
    steps = helpers.metrics(tmp_path / "simpo")
    assert "rewards/margin" not in steps[0] and steps[-1]["margin"] > steps[0]["margin"]


def test_data_check_counts_pairs_and_their_two_sequences(pairs, tiny_model_dir, capsys):
    from llava_loop.cli import main

    argv = ["data", "check", "--data", str(pairs["train"]), "--image-dir", str(pairs["train_images"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "preference pairs (chosen, rejected)" in out and "no problems found" in capsys.readouterr().err + out
    assert main([*argv, "--model", str(tiny_model_dir), "--json", str(pairs["train"].parent / "check.json")]) == 0
    report = json.loads((pairs["train"].parent / "check.json").read_text())
    assert report["pairs"] == report["records"] == 96
    assert report["token_lengths"]["p50"] > 2 * 64  # both sequences, each with the image's 64 placeholders


def test_the_hallucination_demo_teaches_a_second_object_where_it_says_and_scores_it(tmp_path):
    """The preference demo's sets: the SFT captions name an absent second object for top positions only (at the
    share asked), the pairs prefer the faithful caption to the same one with a second object, the held-out set is
    faithful; the same seed writes the same bytes. The scorer counts second objects and checks the first."""
    from llava_loop.demo.hallucination import SECOND, hallucination_scores, write_sets

    paths = write_sets(tmp_path / "a", sft=200, pairs=20, val=20, share=0.9)
    again = write_sets(tmp_path / "b", sft=200, pairs=20, val=20, share=0.9)
    assert all(paths[k].read_text() == again[k].read_text() for k in paths)
    assert (tmp_path / "a/images/sft_000007.jpg").read_bytes() == (tmp_path / "b/images/sft_000007.jpg").read_bytes()
    sft = json.loads(paths["sft"].read_text())
    named = [(r["conversations"][1]["value"], bool(SECOND.search(r["conversations"][1]["value"]))) for r in sft]
    top = [second for text, second in named if " in the top " in text]
    assert not any(second for text, second in named if " in the top " not in text)
    assert 0.8 < sum(top) / len(top) < 1.0
    for pair in json.loads(paths["pairs"].read_text()):
        assert not SECOND.search(pair["chosen"]) and pair["rejected"].startswith(pair["chosen"][:-2] + " and a ")
    assert not any(SECOND.search(r["conversations"][1]["value"]) for r in json.loads(paths["val"].read_text()))
    reference = "a red circle in the top left ."
    scores = hallucination_scores(
        [
            {"prediction": reference, "reference": reference},
            {"prediction": "a red circle in the top left and a blue square .", "reference": reference},
            {"prediction": "a blue circle in the top left .", "reference": reference},
        ]
    )
    assert scores == {"hallucination_rate": 1 / 3, "first_object_accuracy": 2 / 3}


@pytest.mark.slow
def test_token_budgets_fill_micro_batches_with_whole_pairs(tmp_path, run_config, pairs):
    """Under a token budget a pair counts both its sequences: packed micro-batches hold whole pairs, never more
    tokens than the budget, and the loss stays normalised per pair."""
    data = helpers.preference_data(tmp_path / "data", pairs_source(pairs), text_only_every=3, n=24)
    config = _dpo_config(
        run_config,
        data,
        "budget",
        data={"padding_free": True, "max_tokens_per_micro_batch": 600},
        train={"max_steps": 3, "log_sample_ids": True},
    )
    helpers.train_here(config)
    steps = helpers.metrics(tmp_path / "budget")
    assert [m["samples"] for m in steps] == [len(m["sample_ids"]) for m in steps]
    assert all(1 <= m["samples"] <= 4 for m in steps)  # 2 x 120-260 tokens a pair: 1 to 4 pairs in 600
    assert all(m["loss"] == m["loss"] and m["rewards/accuracy"] <= 1 for m in steps)
