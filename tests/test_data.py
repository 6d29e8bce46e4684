"""Data path: records, labels from the chat template, images, truncation, the bad-input policy, collation."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from llava_loop.data.collate import Collator
from llava_loop.data.dataset import DataError, LlavaDataset
from llava_loop.data.encode import IGNORE_INDEX, SampleEncoder, record_messages, tokenize_messages
from llava_loop.data.records import Record, RecordError, Records, load_records
from llava_loop.data.sampler import EpochSampler
from llava_loop.data.skips import SkipSample, SkipTally, TooManySkips

import helpers

MULTI_TURN = Record(
    "mt",
    ("img.jpg",),
    (
        ("system", "You describe pictures."),
        ("user", "What is this?\n<image>"),
        ("assistant", "a red circle in the top left ."),
        ("user", "And its colour?"),
        ("assistant", "red, like a (ripe) tomato: 100% red!"),
        ("user", "Shape?"),
        ("assistant", "circle ."),
    ),
)


def supervised_runs(ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def answers(record):
    return [text for role, text in record.turns if role == "assistant"]


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "qwen3"])
@pytest.mark.parametrize(
    "record",
    [MULTI_TURN, Record("st", (), (("user", "Say hi."), ("assistant", "hi there .")))],
    ids=["multi_turn", "single_turn"],
)
def test_supervised_tokens_decode_to_exactly_the_answers(which, record, tiny_processor, qwen3_tokenizer):
    tokenizer = tiny_processor.tokenizer if which == "tiny" else qwen3_tokenizer
    ids, labels, turn_ends = tokenize_messages(tokenizer, record_messages(record))
    runs = supervised_runs(ids, labels)
    assert [tokenizer.decode(run) for run in runs] == [a + "<|im_end|>" for a in answers(record)]
    assert len(turn_ends) == len(answers(record))
    # nothing else is supervised: system, user, role headers, the <think> scaffolding of Qwen3's template
    assert sum(len(r) for r in runs) == sum(label != IGNORE_INDEX for label in labels)
    if which == "qwen3":
        assert "<think>" in tokenizer.decode(ids)
        assert all("<think>" not in tokenizer.decode(run) for run in runs)


CAPTION = Record(
    "cap",
    ("img.jpg",),
    (("user", "<image>\nDescribe the image briefly."), ("assistant", "a red circle in the top left .")),
)


def test_plain_template_is_the_image_then_the_caption_and_end_of_text(tiny_processor):
    """LLaVA-1.5's stage-1 layout: no system prompt, question or chat template; the caption and end token supervised.
    Control: the chat layout of the same record holds the question and the template's tokens."""
    tokenizer = tiny_processor.tokenizer
    encoder = SampleEncoder(tiny_processor, max_length=1024, template="plain")
    ids, labels = encoder.encode_text(CAPTION)
    image_id, n = tokenizer.convert_tokens_to_ids("<image>"), encoder.n_image_tokens
    caption = tokenizer(answers(CAPTION)[0], add_special_tokens=False)["input_ids"]
    assert ids == [image_id] * n + caption + [tokenizer.eos_token_id]
    assert supervised_runs(ids, labels) == [caption + [tokenizer.eos_token_id]]
    chat = tokenizer.decode(SampleEncoder(tiny_processor, max_length=1024).encode_text(CAPTION)[0])
    assert "Describe the image briefly." in chat and "<|im_start|>" in chat
    assert "Describe" not in tokenizer.decode(ids) and "<|im_start|>" not in tokenizer.decode(ids)
    # evaluation asks with the image alone, and scores against the caption
    assert encoder.first_question(CAPTION) == ([image_id], "", answers(CAPTION)[0])
    assert encoder.prompt_ids("ignored") == [image_id] * n


def test_a_plain_caption_can_end_as_llavas_code_ends_it_with_a_newline(tiny_processor):
    """data.caption_end=newline: LLaVA-1.5's preprocess_plain layout, the image, then the caption and its "\n"
    separator tokenized as one text, supervised, with no end-of-text token (the control: the default's ends in it)."""
    tokenizer = tiny_processor.tokenizer
    ids, labels = SampleEncoder(tiny_processor, max_length=1024, template="plain", caption_end="newline").encode_text(
        CAPTION
    )
    caption = tokenizer(answers(CAPTION)[0] + "\n", add_special_tokens=False)["input_ids"]
    assert supervised_runs(ids, labels) == [caption] and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(caption).endswith("\n")
    default = SampleEncoder(tiny_processor, max_length=1024, template="plain").encode_text(CAPTION)[0]
    assert default[-1] == tokenizer.eos_token_id and default != ids


def test_plain_template_starts_with_bos_where_the_tokenizer_adds_one():
    """Llama 3's tokenizer starts text with <|begin_of_text|>: the plain layout keeps it, unsupervised. Control: the
    same tokenizer without its BOS post-processor gives no BOS."""
    from tokenizers.processors import TemplateProcessing

    from llava_loop.data.encode import plain_tokens
    from llava_loop.demo.families import LLM_FAMILIES, make_tokenizer

    image_id = 7  # any id stands for the image here
    without = make_tokenizer(LLM_FAMILIES["llama"])
    assert plain_tokens(without, CAPTION, image_id)[0][0] == image_id
    tokenizer = make_tokenizer(LLM_FAMILIES["llama"])
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    ids, labels, _ = plain_tokens(tokenizer, CAPTION, image_id)
    caption = tokenizer(answers(CAPTION)[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == [tokenizer.bos_token_id, image_id, *caption]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, *caption]


def test_plain_template_skips_a_record_that_is_not_images_and_one_caption(tiny_processor):
    encoder = SampleEncoder(tiny_processor, max_length=4096, template="plain")
    text_only = Record("t", (), (("user", "Say hi."), ("assistant", "hi there .")))
    for record in (MULTI_TURN, text_only):
        with pytest.raises(SkipSample) as skip:
            encoder.encode_text(record)
        assert skip.value.reason == "not_a_caption" and "data.template=chat" in skip.value.detail


def test_image_tag_at_start_or_end_is_placed_at_the_start(tiny_processor):
    for text in ("Describe it.\n<image>", "<image>\nDescribe it.", "Describe <image> it."):
        messages = record_messages(Record("x", ("a.jpg",), (("user", text), ("assistant", "ok ."))))
        assert messages[0]["content"].startswith("<image>\n")
        assert messages[0]["content"].count("<image>") == 1


def test_system_prompt_from_config_is_used(tiny_processor):
    record = Record("x", (), (("user", "hi"), ("assistant", "ok .")))
    messages = record_messages(record, system_prompt="Be terse.")
    assert messages[0] == {"role": "system", "content": "Be terse."}
    ids, _, _ = tokenize_messages(tiny_processor.tokenizer, messages)
    assert "Be terse." in tiny_processor.tokenizer.decode(ids)


def test_image_block_expands_to_placeholders_and_is_unsupervised(tiny_processor):
    encoder = SampleEncoder(tiny_processor, max_length=1024)
    ids, labels = encoder.encode_text(MULTI_TURN)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == encoder.n_image_tokens == 64  # (64 px / 8 px patches) ** 2
    assert positions == list(range(positions[0], positions[0] + 64))  # one contiguous block
    assert all(labels[i] == IGNORE_INDEX for i in positions)


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------


def test_truncation_drops_later_turns_whole_and_never_splits_the_image_block(tiny_processor):
    full = SampleEncoder(tiny_processor, max_length=4096).encode_text(MULTI_TURN)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    n_answers = len(answers(MULTI_TURN))
    seen_turn_counts = set()
    for max_length in range(1, len(full[0]) + 1):
        encoder = SampleEncoder(tiny_processor, max_length=max_length)
        try:
            ids, labels = encoder.encode_text(MULTI_TURN)
        except SkipSample as skip:
            assert skip.reason == "too_long"
            continue
        assert len(ids) <= max_length
        assert ids.count(image_id) == 64  # the block is whole or the sample is skipped
        runs = supervised_runs(ids, labels)
        assert [tiny_processor.tokenizer.decode(r) for r in runs] == [
            a + "<|im_end|>" for a in answers(MULTI_TURN)[: len(runs)]
        ]
        assert ids == full[0][: len(ids)]  # a prefix cut at a turn boundary
        seen_turn_counts.add(len(runs))
    assert seen_turn_counts == set(range(1, n_answers + 1))


def test_sample_whose_first_answer_does_not_fit_is_too_long(tiny_processor):
    with pytest.raises(SkipSample) as info:
        SampleEncoder(tiny_processor, max_length=80).encode_text(MULTI_TURN)
    assert info.value.reason == "too_long"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _image_in_mode(mode: str) -> Image.Image:
    rgb = Image.new("RGB", (40, 30), (200, 40, 40))
    if mode == "P_transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        image = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
        assert image.mode == "I;16"
        return image
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparency", "CMYK", "I;16", "1", "RGB"])
@pytest.mark.parametrize("aspect", ["resize", "pad"])
def test_every_pil_mode_becomes_finite_rgb_pixels(mode, aspect, tiny_processor, tmp_path):
    path = tmp_path / "img.png" if mode != "CMYK" else tmp_path / "img.jpg"
    _image_in_mode(mode).save(path)
    encoder = SampleEncoder(tiny_processor, max_length=512, image_aspect_ratio=aspect)
    pixels = encoder.pixels(path)
    assert pixels.shape == (3, 64, 64)
    assert torch.isfinite(pixels).all()


def test_i16_is_rescaled_not_clipped(tiny_processor, tmp_path):
    from llava_loop.data.images import to_rgb

    rgb = to_rgb(_image_in_mode("I;16"))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (156, 156, 156)  # 40000/65535*255


def test_pad_mode_pads_with_the_processor_mean_colour(tiny_processor, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (64, 16), (255, 0, 0)).save(path)
    pad = SampleEncoder(tiny_processor, max_length=512, image_aspect_ratio="pad").pixels(path)
    resize = SampleEncoder(tiny_processor, max_length=512, image_aspect_ratio="resize").pixels(path)
    mean = torch.tensor(tiny_processor.image_processor.image_mean)
    std = torch.tensor(tiny_processor.image_processor.image_std)
    corner = pad[:, 0, 0] * std + mean  # un-normalise the top-left pixel: it is padding
    assert torch.allclose(corner, torch.tensor([int(255 * m) / 255 for m in mean.tolist()]), atol=0.01)
    assert not torch.allclose(pad, resize)


# ---------------------------------------------------------------------------------------------
# The bad-input policy
# ---------------------------------------------------------------------------------------------


def _jpeg_bytes(size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bad_case(case: str, image_dir) -> Record:
    """A record that must be skipped for ``case``; writes whatever image file it needs."""
    good_turns = (("user", "<image>\nDescribe."), ("assistant", "a green square ."))
    if case == "missing_image":
        return Record(case, ("does-not-exist.jpg",), good_turns)
    if case == "empty_image":
        (image_dir / "empty.jpg").write_bytes(b"")
        return Record(case, ("empty.jpg",), good_turns)
    if case == "corrupt_image":
        (image_dir / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
        return Record(case, ("corrupt.jpg",), good_turns)
    if case == "truncated_image":
        data = _jpeg_bytes((256, 256))
        (image_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
        return Record(case, ("truncated.jpg",), good_turns)
    if case == "decompression_bomb":
        Image.new("L", (3000, 3000)).save(image_dir / "bomb.png")  # small file, 9M pixels > the 1M limit below
        return Record(case, ("bomb.png",), good_turns)
    if case == "image_token_mismatch":
        return Record(case, ("good.jpg",), (("user", "Describe."), ("assistant", "a green square .")))
    if case == "empty_answer":
        return Record(case, ("good.jpg",), (("user", "<image>\nDescribe."), ("assistant", "   ")))
    if case == "unknown_role":
        return Record(case, ("good.jpg",), (("user", "<image>\nDescribe."), ("narrator", "hmm"), ("assistant", "ok .")))
    if case == "too_long":
        return Record(case, ("good.jpg",), (("user", "<image>\n" + "describe " * 300), ("assistant", "ok .")))
    if case == "unsafe_path:parent":  # the image exists, outside the image folder: never opened
        (image_dir.parent / "outside.jpg").write_bytes(_jpeg_bytes())
        return Record(case, ("../outside.jpg",), good_turns)
    if case == "unsafe_path:absolute":
        (image_dir.parent / "outside.jpg").write_bytes(_jpeg_bytes())
        return Record(case, (str(image_dir.parent / "outside.jpg"),), good_turns)
    if case == "unsafe_path:symlink":  # a link inside the folder to a file outside it: never opened
        (image_dir.parent / "outside.jpg").write_bytes(_jpeg_bytes())
        (image_dir / "link.jpg").symlink_to(image_dir.parent / "outside.jpg")
        return Record(case, ("link.jpg",), good_turns)
    if case == "not_a_file:directory":
        (image_dir / "folder.jpg").mkdir()
        return Record(case, ("folder.jpg",), good_turns)
    if case == "not_a_file:symlink_loop":
        (image_dir / "loop.jpg").symlink_to(image_dir / "loop.jpg")
        return Record(case, ("loop.jpg",), good_turns)
    raise AssertionError(case)


BAD_CASES = [
    "missing_image",
    "empty_image",
    "corrupt_image",
    "truncated_image",
    "decompression_bomb",
    "image_token_mismatch",
    "empty_answer",
    "unknown_role",
    "too_long",
    "unsafe_path:parent",
    "unsafe_path:absolute",
    "unsafe_path:symlink",
    "not_a_file:directory",
    "not_a_file:symlink_loop",
]
DETAILS = {
    "unsafe_path:parent": "is not inside the image folder",
    "unsafe_path:absolute": "allow_absolute_paths",
    "unsafe_path:symlink": "is a symbolic link to",
    "not_a_file:directory": "is a directory",
    "not_a_file:symlink_loop": "broken or looping symbolic link",
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_sample_is_skipped_counted_and_the_batch_stays_full(case, tiny_processor, tmp_path):
    tmp_path = tmp_path / "images"
    tmp_path.mkdir()
    (tmp_path / "good.jpg").write_bytes(_jpeg_bytes())
    good = [
        Record(f"good{i}", ("good.jpg",), (("user", "<image>\nDescribe."), ("assistant", "a green square .")))
        for i in range(7)
    ]
    records = Records.from_records(good[:3] + [_bad_case(case, tmp_path)] + good[3:])
    encoder = SampleEncoder(tiny_processor, max_length=160, max_image_pixels=1_000_000)
    dataset = LlavaDataset(records, encoder, tmp_path, seed=0)
    loader = DataLoader(dataset, batch_size=4, collate_fn=Collator(tiny_processor.tokenizer.pad_token_id))
    batches = list(loader)
    assert [len(b["ids"]) for b in batches] == [4, 4]  # full batches: the bad sample was replaced
    assert all(rid.startswith("good") for b in batches for rid in b["ids"])
    events = [e for b in batches for e in b["skipped"]]
    tally = SkipTally()
    tally.add(events)
    assert tally.counts == Counter({case.split(":")[0]: 1}) and tally.bad_ids == {case}
    assert DETAILS.get(case, "") in events[0][2]
    # the replacement is deterministic: a second pass picks the same samples
    assert [b["ids"] for b in DataLoader(dataset, batch_size=4, collate_fn=loader.collate_fn)] == [
        b["ids"] for b in batches
    ]


def test_skip_budget_stops_the_run_with_a_clear_error():
    tally = SkipTally()
    tally.add([("r1", "missing_image", "x/1.jpg does not exist")])
    tally.check(dataset_size=200, max_fraction=0.01, source="chat.json")  # 1 of 200 is within 1%
    tally.add([("r2", "corrupt_image", "bad"), ("r3", "missing_image", "x/3.jpg does not exist")])
    with pytest.raises(
        TooManySkips, match=r"3 of 200 records in chat.json were skipped.*missing_image=2.*max_skip_fraction"
    ):
        tally.check(dataset_size=200, max_fraction=0.01, source="chat.json")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_rotated_photo_is_seen_upright_as_transformers_pipeline_sees_it(suffix, tmp_path):
    """A phone photo stored sideways with EXIF orientation 6: training's loader, data check's header size and the
    infer/eval path (the same loader) see it upright, pixel for pixel as transformers' load_image (what pipeline
    uses) does. Control: PIL as LLaVA's loader opens it keeps it sideways."""
    from transformers.image_utils import load_image as transformers_load_image

    from llava_loop.data.images import load_image, open_checked

    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # a red corner, to see which way it turned
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo{suffix}"
    stored.save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (32, 64) == open_checked(path, decode=False)
    assert np.array_equal(np.asarray(ours), np.asarray(transformers_load_image(str(path)).convert("RGB")))
    assert Image.open(path).convert("RGB").size == (64, 32)  # the control: orientation ignored


def test_a_dataset_of_only_bad_records_fails_fast_naming_the_image_dir(tiny_processor, tmp_path):
    records = Records.from_records(
        [Record(f"r{i}", (f"{i}.jpg",), (("user", "<image>\nx"), ("assistant", "y ."))) for i in range(40)]
    )
    dataset = LlavaDataset(records, SampleEncoder(tiny_processor, max_length=128), tmp_path / "wrong-dir")
    with pytest.raises(DataError, match="check data.image_dir"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# Records files
# ---------------------------------------------------------------------------------------------

LLAVA_RECORD = {
    "id": "GCC_1",
    "image": "GCC_1.jpg",
    "conversations": [{"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": "a dog ."}],
}


@pytest.mark.parametrize("layout", ["list", "jsonl", "data_wrapper", "role_content", "jsonl_in_json"])
def test_record_file_layouts(layout, tmp_path):
    records = [LLAVA_RECORD, {**LLAVA_RECORD, "id": "GCC_2"}]
    if layout == "role_content":
        records = [
            {
                "id": "m",
                "image": "m.jpg",
                "messages": [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "hello ."}],
            }
        ]
    path = tmp_path / ("data.jsonl" if layout == "jsonl" else "data.json")
    if layout in ("jsonl", "jsonl_in_json"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif layout == "data_wrapper":
        path.write_text(json.dumps({"data": records}))
    else:
        path.write_text(json.dumps(records))
    loaded = load_records(path)
    assert len(loaded) == len(records)
    first = loaded[0]
    assert first.turns[0][0] == "user" and first.turns[-1][0] == "assistant"
    assert first.images[0].endswith(".jpg") and len(first.images) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"id": 1, "conversations": [}]', r"data.json: malformed JSON at line 1 column \d+"),
        ('[{"id": "a", "image": "a.jpg"}]', r"data.json: record 0 \(id 'a'\): no 'conversations' list"),
        (
            '[{"id": "a", "conversations": [{"from": "human"}]}]',
            r"record 0 \(id 'a'\): message 0 needs 'from'\+'value'",
        ),
        ('[{"id": "a", "conversations": [{"from": "human", "value": [1]}]}]', r"content is list, expected a string"),
        ('[{"id": "a", "conversations": []}]', r"'conversations' must be a non-empty list"),
        ('{"x": 1}', r"expected a JSON list of records"),
    ],
)
def test_structural_errors_fail_at_startup_naming_file_and_record(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(RecordError, match=message):
        load_records(path)


def test_bad_jsonl_line_and_bad_encoding_are_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(LLAVA_RECORD) + "\n{broken\n")
    with pytest.raises(RecordError, match=r"data.jsonl: line 2 \(record 1\) is not valid JSON"):
        load_records(path)
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([LLAVA_RECORD]).replace("a dog", "caf\u00e9").encode("latin-1"))
    with pytest.raises(RecordError, match=r"latin.json: not valid UTF-8 at byte \d+ \(line 1\); re-encode"):
        load_records(latin)


def test_records_subset_and_fingerprint(tmp_path):
    records = Records.from_records(
        [Record(str(i), ("x.jpg",) if i % 2 else (), (("user", "a" * (i * 8)), ("assistant", "b"))) for i in range(10)]
    )
    sub = records.subset([7, 2, 9])
    assert [r.id for r in (sub[0], sub[1], sub[2])] == ["7", "2", "9"]
    assert [r.id for r in (sub.subset([2, 0])[0], sub.subset([2, 0])[1])] == ["9", "7"]
    same = Records.from_records([records[i] for i in range(10)])
    assert same.fingerprint() == records.fingerprint() and sub.fingerprint() == same.subset([7, 2, 9]).fingerprint()
    assert len({records.fingerprint(), sub.fingerprint(), records.subset([2, 7, 9]).fingerprint()}) == 3


def test_exact_token_lengths_are_the_encoders_and_cached_by_what_changes_them(
    tmp_path, shapes_data, tiny_processor, monkeypatch
):
    from llava_loop.data.lengths import token_lengths

    monkeypatch.setenv("LLAVA_LOOP_CACHE", str(tmp_path / "cache"))
    records = load_records(helpers.mixed_text_and_image_data(tmp_path / "mixed", shapes_data, 24)["train"])
    encoder = SampleEncoder(tiny_processor, max_length=256)
    said = []
    lengths = token_lengths(records, encoder, workers=2, say=said.append)
    assert lengths.tolist() == [len(encoder.encode_text(records[i])[0]) for i in range(len(records))]
    assert lengths.tolist() != [records[i].estimated_tokens(encoder.n_image_tokens) for i in range(len(records))]
    (cached,) = (tmp_path / "cache" / "token_lengths").glob("*.npy")
    assert "counted, cached at" in said[-1]
    assert (token_lengths(records, encoder, say=said.append) == lengths).all() and "from the cache" in said[-1]
    # a wrong but well-formed cache (a fixed-size model's too) fails the spot check and is counted again
    np.save(cached, lengths + 1)
    assert (token_lengths(records, encoder, say=said.append) == lengths).all()
    assert "counting again" in said[-2] and "counted, cached at" in said[-1]
    # a truncated, garbage or pickled cache is counted again, never unpickled, and says which file
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for damage in (cached.read_bytes()[:20], b"garbage" * 10, pickled.read_bytes()):
        cached.write_bytes(damage)
        assert (token_lengths(records, encoder, say=said.append) == lengths).all()
        assert "is unreadable" in said[-2] and str(cached) in said[-2] and "counted" in said[-1]
    short = SampleEncoder(
        tiny_processor, max_length=100
    )  # negative control: a setting that changes lengths counts again
    assert token_lengths(records, short, say=said.append).max() <= 100 and "counted" in said[-1]
    assert token_lengths(records.subset([1, 0]), encoder).tolist() == lengths[[1, 0]].tolist()


# ---------------------------------------------------------------------------------------------
# Collation and sampling
# ---------------------------------------------------------------------------------------------


def test_collator_masks_from_lengths_even_when_pad_is_a_real_token(tiny_processor):
    pad = tiny_processor.tokenizer.pad_token_id
    samples = [
        {
            "id": "a",
            "input_ids": torch.tensor([5, pad, 6, pad]),
            "labels": torch.tensor([-100, pad, 6, pad]),
            "pixel_values": torch.zeros(1, 3, 64, 64),
            "skipped": [],
        },
        {
            "id": "b",
            "input_ids": torch.tensor([7, 8]),
            "labels": torch.tensor([-100, 8]),
            "pixel_values": None,
            "skipped": [("z", "missing_image", "")],
        },
    ]
    batch = Collator(pad)(samples)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # real pad tokens stay visible
    assert batch["input_ids"].tolist() == [[5, pad, 6, pad], [7, 8, pad, pad]]  # right padding
    assert batch["labels"].tolist() == [[-100, pad, 6, pad], [-100, 8, -100, -100]]
    assert batch["pixel_values"].shape == (1, 3, 64, 64)  # image rows only: a mixed batch
    assert batch["ids"] == ["a", "b"] and batch["skipped"] == [("z", "missing_image", "")]


def test_mixed_image_and_text_batch_runs_through_the_model(tiny_model_dir, tiny_processor, tmp_path):
    from transformers import LlavaForConditionalGeneration

    (tmp_path / "good.jpg").write_bytes(_jpeg_bytes())
    records = Records.from_records(
        [
            Record("img", ("good.jpg",), (("user", "<image>\nDescribe."), ("assistant", "a green square ."))),
            Record("txt", (), (("user", "Say hi."), ("assistant", "hi ."))),
        ]
    )
    dataset = LlavaDataset(records, SampleEncoder(tiny_processor, max_length=128), tmp_path)
    batch = Collator(tiny_processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("packed", [False, True])
def test_a_blank_image_puts_a_text_only_batch_through_the_vision_path_and_changes_nothing_else(
    packed, tiny_model_dir, tmp_path
):
    """Every process must run the vision path on every micro-batch (ZeRO's reduce buckets, ZeRO-3's gathers): a
    text-only one gets the blank image. Its loss stays what it was, the projector now gets a gradient, and that
    gradient is exactly zero; a batch that shows an image passes untouched."""
    from llava_loop.data.blank_image import BlankImage
    from llava_loop.losses import label_only_ce
    from llava_loop.parts import PROJECTOR, part_of
    from llava_loop.runtime import load_model

    model, processor = load_model(tiny_model_dir, packed=packed)
    encoder = SampleEncoder(processor, max_length=128)
    records = Records.from_records(
        [
            Record("a", (), (("user", "Say hi."), ("assistant", "hi ."))),
            Record("b", (), (("user", "A colour?"), ("assistant", "a green one ."))),
        ]
    )
    dataset = LlavaDataset(records, encoder, tmp_path)
    batch = Collator(processor.tokenizer.pad_token_id, packed)([dataset[0], dataset[1]])
    blank = BlankImage(encoder, "cpu")
    filled = blank.add_where_missing(batch)
    assert "pixel_values" not in batch and blank.add_where_missing(filled) is filled
    assert filled["input_ids"].shape[1] == batch["input_ids"].shape[1] + encoder.n_image_tokens
    projector = [p for name, p in model.named_parameters() if part_of(name) == PROJECTOR]
    losses = []
    for b in (batch, filled):
        model.zero_grad(set_to_none=True)
        loss = label_only_ce(model, b)["loss"]
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert all(p.grad is not None and not p.grad.any() for p in projector)


TWO_IMAGES = Record(
    "two",
    ("red.png", "blue.png"),
    (
        ("user", "First:\n<image>\nSecond:\n<image>\nWhich one is red?"),
        ("assistant", "the first ."),
        ("user", "And now?\n<image>"),
        ("assistant", "blue ."),
    ),
)


def _solid_images(folder, colours):
    for name, rgb in colours.items():
        Image.new("RGB", (64, 64), rgb).save(folder / name)


def test_multi_image_records_keep_each_tag_in_place_with_its_own_image(tiny_processor, tmp_path):
    _solid_images(tmp_path, {"red.png": (220, 30, 30), "blue.png": (30, 30, 220)})
    record = Record("two", ("red.png", "blue.png", "red.png"), TWO_IMAGES.turns)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    encoder = SampleEncoder(tiny_processor, max_length=512)
    sample = encoder(record, tmp_path)
    ids = sample["input_ids"].tolist()
    assert ids.count(image_id) == 3 * 64 and sample["pixel_values"].shape == (3, 3, 64, 64)
    text = tiny_processor.tokenizer.decode([i for i in ids if i != image_id])
    assert "First:\n\nSecond:\n\nWhich one is red?" in text  # interleaved: tags stay where the data put them
    red, blue = (encoder.pixels(tmp_path / n) for n in ("red.png", "blue.png"))
    assert [torch.equal(p, x) for p, x in zip(sample["pixel_values"], (red, blue, red))] == [True] * 3
    runs = supervised_runs(ids, sample["labels"].tolist())
    assert [tiny_processor.tokenizer.decode(r) for r in runs] == ["the first .<|im_end|>", "blue .<|im_end|>"]

    with pytest.raises(SkipSample) as skip:  # two tags for three images
        encoder(Record("bad", ("red.png", "blue.png", "red.png"), TWO_IMAGES.turns[:2]), tmp_path)
    assert skip.value.reason == "image_token_mismatch"
    # the first exchange (two images, 194 tokens) fits, the third image does not: later turns go, as text does
    kept = SampleEncoder(tiny_processor, max_length=200)(record, tmp_path)
    assert kept["input_ids"].tolist().count(image_id) == 2 * 64 and len(kept["pixel_values"]) == 2
    assert [
        tiny_processor.tokenizer.decode(r) for r in supervised_runs(kept["input_ids"].tolist(), kept["labels"].tolist())
    ] == ["the first .<|im_end|>"]
    with pytest.raises(SkipSample) as skip:  # the first exchange's two images alone are over max_length
        SampleEncoder(tiny_processor, max_length=2 * 64 - 1)(record, tmp_path)
    assert (
        skip.value.reason == "too_long"
        and "(128 of them image placeholders) > data.max_length=127" in skip.value.detail
    )


def test_truncating_a_multi_image_record_drops_the_images_of_dropped_turns(tiny_processor, tmp_path):
    _solid_images(tmp_path, {"red.png": (220, 30, 30), "blue.png": (30, 30, 220)})
    record = Record("two", ("red.png", "blue.png", "red.png"), TWO_IMAGES.turns)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    full = SampleEncoder(tiny_processor, max_length=512)(record, tmp_path)["input_ids"].tolist()
    sample = SampleEncoder(tiny_processor, max_length=len(full) - 10)(record, tmp_path)  # cuts into the last turn
    ids = sample["input_ids"].tolist()
    assert ids == full[: len(ids)] and len(ids) < len(full) - 64  # the last turn went whole, its image block too
    assert ids.count(image_id) == 2 * 64 and sample["pixel_values"].shape[0] == 2
    runs = supervised_runs(ids, sample["labels"].tolist())
    assert [tiny_processor.tokenizer.decode(r) for r in runs] == ["the first .<|im_end|>"]


def test_a_batch_of_text_one_and_two_image_samples_fills_each_placeholder_with_its_image(
    tiny_model_dir, tiny_processor, tmp_path
):
    """Rows of one batch give the logits each sample gives alone: pixels are stacked in row and tag order. Swapping
    the two images of the two-image sample (the negative control) changes its logits."""
    from transformers import LlavaForConditionalGeneration

    _solid_images(tmp_path, {"red.png": (220, 30, 30), "blue.png": (30, 30, 220), "green.png": (30, 200, 30)})
    records = [
        Record("txt", (), (("user", "Say hi."), ("assistant", "hi ."))),
        Record("two", ("red.png", "blue.png"), TWO_IMAGES.turns[:2]),
        Record("one", ("green.png",), (("user", "<image>\nDescribe."), ("assistant", "green ."))),
    ]
    dataset = LlavaDataset(Records.from_records(records), SampleEncoder(tiny_processor, max_length=512), tmp_path)
    samples = [dataset[i] for i in range(len(records))]
    collate = Collator(tiny_processor.tokenizer.pad_token_id)
    batch = collate(samples)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()

    def logits(b):
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in b}
        with torch.no_grad():
            return model(**inputs).logits

    together = logits(batch)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        alone = logits(collate([sample]))[0]
        assert (together[row, :n] - alone[:n]).abs().max() < 1e-5, sample["id"]
    swapped = dict(samples[1], pixel_values=samples[1]["pixel_values"].flip(0))
    assert (logits(collate([swapped]))[0] - logits(collate([samples[1]]))[0]).abs().max() > 1e-3


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(100, seed=3), EpochSampler(100, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)
    assert sorted(a) == list(range(100))


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_batches_fit_the_budget_and_are_a_function_of_seed_and_epoch(packed):
    from llava_loop.data.sampler import TokenBudgetBatches

    lengths = np.random.default_rng(0).integers(40, 700, 500)

    def batches(seed, epoch, window=64):
        return TokenBudgetBatches(
            EpochSampler(500, seed=seed), lengths, 2048, packed=packed, window=window, multiple=4
        ).batches(epoch)

    first = batches(1, 0)
    cost = (lambda b: sum(lengths[b])) if packed else (lambda b: len(b) * max(lengths[b]))
    assert all(cost(b) <= 2048 for b in first) and len(first) % 4 == 0
    flat = [i for b in first for i in b]
    assert len(flat) == len(set(flat)) and len(flat) > 480  # each sample once; only the last few are cut
    assert first == batches(1, 0) and first != batches(1, 1) and first != batches(2, 0)
    fill = np.mean([cost(b) for b in first]) / 2048
    assert fill > (0.95 if packed else 0.7), fill
    order = EpochSampler(500, seed=1).order(0).tolist()  # first fit never reaches past the look-ahead window
    narrow = batches(1, 0, window=1)
    assert [i for b in narrow for i in b] == order[: len([i for b in narrow for i in b])]
    assert np.mean([cost(b) for b in narrow]) < np.mean([cost(b) for b in first])


def test_length_grouping_keeps_each_step_s_samples_and_pads_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 600, size=512)
    plain = EpochSampler(512, seed=1).order(0)
    grouped = EpochSampler(512, seed=1, lengths=lengths, group_size=64).order(0)
    for start in range(0, 512, 64):  # each optimizer step (global batch of 64) has the same sample set
        assert set(plain[start : start + 64]) == set(grouped[start : start + 64])

    def pad_fraction(order, micro=8):
        batches = [lengths[order[i : i + micro]] for i in range(0, 512, micro)]
        return 1 - sum(b.sum() for b in batches) / sum(b.max() * len(b) for b in batches)

    assert pad_fraction(grouped) < 0.5 * pad_fraction(plain)


# ---------------------------------------------------------------------------------------------
# User tools: data check, synth, convert
# ---------------------------------------------------------------------------------------------


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llava_loop.cli", *args], capture_output=True, text=True)


def test_data_synth_writes_the_llava_cc3m_layout(tmp_path):
    out = _cli(
        "data",
        "synth",
        "--out",
        str(tmp_path / "shapes"),
        "--n",
        "12",
        "--seed",
        "3",
        "--size",
        "96",
        "--max-turns",
        "2",
    )
    assert out.returncode == 0, out.stderr
    records = json.loads((tmp_path / "shapes" / "chat.json").read_text())
    assert len(records) == 12
    from llava_loop.demo.shapes import parse_caption

    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        assert (tmp_path / "shapes" / "images" / r["image"]).is_file()
        human, gpt = r["conversations"][:2]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") or human["value"].endswith("\n<image>")
        assert all(parse_caption(gpt["value"]).values())
        with Image.open(tmp_path / "shapes" / "images" / r["image"]) as im:
            assert im.size == (96, 96)
    starts = {r["conversations"][0]["value"].startswith("<image>") for r in records}
    assert starts == {True, False}  # both placements occur, as in the real data
    assert {len(r["conversations"]) for r in records} == {2, 4}


def test_data_check_counts_problems_and_exits_nonzero(tmp_path):
    from llava_loop.demo.shapes import write_shapes

    path = write_shapes(tmp_path / "d", 10, seed=0, size=48)
    records = json.loads(path.read_text())
    records[1]["image"] = [records[1]["image"], "missing.jpg"]  # a two-image record with its second image missing
    records[1]["conversations"][0]["value"] += "\n<image>"
    records[2]["conversations"][1]["value"] = ""
    (tmp_path / "d" / "images" / records[3]["image"]).write_bytes(b"garbage")
    path.write_text(json.dumps(records))
    out = _cli(
        "data",
        "check",
        "--data",
        str(path),
        "--image-dir",
        str(tmp_path / "d" / "images"),
        "--decode",
        "--json",
        str(tmp_path / "report.json"),
    )
    assert out.returncode == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == {"missing_image": 1, "empty_answer": 1, "corrupt_image": 1}
    assert report["records"] == 10 and report["with_image"] == 9 and report["images"] == 10
    assert report["image_sizes"]["width"] == {"min": 48, "median": 48, "max": 48}
    assert "missing_image" in out.stdout and "3 problem records" in out.stdout
    records = json.loads(path.read_text())
    for bad in (1, 2, 3):
        records[bad] = records[0]
    path.write_text(json.dumps(records))
    good = _cli("data", "check", "--data", str(path), "--image-dir", str(tmp_path / "d" / "images"))
    assert good.returncode == 0 and "no problems found" in good.stdout
    # the same images against a limit below their 48 x 48 pixels, as data.max_image_pixels=2000 would train
    args = ("data", "check", "--data", str(path), "--image-dir", str(tmp_path / "d" / "images"))
    small = _cli(*args, "--max-image-pixels", "2000", "--json", str(tmp_path / "small.json"))
    assert small.returncode == 1
    assert json.loads((tmp_path / "small.json").read_text())["problems"] == {"decompression_bomb": 10}


def test_data_check_with_the_model_tokenizer_reports_exact_lengths(tmp_path, tiny_processor):
    from llava_loop.data.check import check_dataset
    from llava_loop.demo.shapes import write_shapes

    path = write_shapes(tmp_path / "d", 6, seed=0, size=32)
    report = check_dataset(path, tmp_path / "d" / "images", processor=tiny_processor, progress=False)
    encoder = SampleEncoder(tiny_processor, max_length=2048)
    exact = [len(encoder.encode_text(load_records(path)[i])[0]) for i in range(6)]
    assert report["token_lengths"]["p100"] == max(exact) and not report["token_lengths_estimated"]


def test_convert_caption_tables(tmp_path):
    (tmp_path / "t.csv").write_text("filename,caption\na.jpg,A sign that reads OPEN.\nb.jpg,Two cats.\n")
    out = _cli("data", "convert", "captions", "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr
    records = load_records(tmp_path / "c.json")
    assert [(r.images[0], r.turns[-1]) for r in (records[0], records[1])] == [
        ("a.jpg", ("assistant", "A sign that reads OPEN.")),
        ("b.jpg", ("assistant", "Two cats.")),
    ]
    assert all("<image>" in records[i].turns[0][1] for i in range(2))
    (tmp_path / "t.jsonl").write_text(json.dumps({"img_file": "x.png", "text": "hi"}) + "\n")
    bad = _cli("data", "convert", "captions", "--input", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "d.json"))
    assert bad.returncode == 2 and "row 0: no image column" in bad.stderr and "--image-key" in bad.stderr
    ok = _cli(
        "data",
        "convert",
        "captions",
        "--input",
        str(tmp_path / "t.jsonl"),
        "--out",
        str(tmp_path / "d.json"),
        "--image-key",
        "img_file",
        "--prompt",
        "Read the text.",
    )
    assert ok.returncode == 0
    assert load_records(tmp_path / "d.json")[0].turns[0][1] in ("<image>\nRead the text.", "Read the text.\n<image>")


def test_convert_sharegpt_and_openai_style_conversations(tmp_path):
    rows = [
        {
            "id": "s1",
            "image": "s1.jpg",
            "conversations": [
                {"from": "human", "value": "What is shown?"},
                {"from": "gpt", "value": "A bridge."},
                {"from": "human", "value": "Where?"},
                {"from": "gpt", "value": "Over a river."},
            ],
        },
        {
            "id": "o1",
            "images": ["o1.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red bus."}]},
            ],
        },
    ]
    rows += [  # ShareGPT-4o style with two images beside the text, and interleaved OpenAI-style parts
        {
            "id": "m1",
            "image": ["a.jpg", "b.jpg"],
            "conversations": [{"from": "human", "value": "Which is red?"}, {"from": "gpt", "value": "The first."}],
        },
        {
            "id": "m2",
            "images": ["c.png", "d.png"],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Left:"},
                        {"type": "image"},
                        {"type": "text", "text": "Right:"},
                        {"type": "image"},
                        {"type": "text", "text": "Same?"},
                    ],
                },
                {"role": "assistant", "content": "No."},
            ],
        },
    ]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    out = _cli(
        "data", "convert", "conversations", "--input", str(tmp_path / "in.json"), "--out", str(tmp_path / "o.json")
    )
    assert out.returncode == 0, out.stderr
    records = load_records(tmp_path / "o.json")
    first, second, two, interleaved = (records[i] for i in range(4))
    assert first.turns[0] == ("user", "<image>\nWhat is shown?") and len(first.turns) == 4
    assert second.images == ("o1.png",) and second.turns == (
        ("user", "<image>\nDescribe it."),
        ("assistant", "A red bus."),
    )
    assert two.images == ("a.jpg", "b.jpg") and two.turns[0] == ("user", "<image>\n<image>\nWhich is red?")
    assert interleaved.images == ("c.png", "d.png")
    assert interleaved.turns[0] == ("user", "Left:\n<image>\nRight:\n<image>\nSame?")
    for record in (first, second, two, interleaved):  # every converted record is trainable
        record_messages(record)
    rows[3]["messages"][0]["content"].pop(1)  # one image part for two images
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    bad = _cli(
        "data", "convert", "conversations", "--input", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.json")
    )
    assert bad.returncode == 2 and "record 3: 1 <image> tags or image parts for 2 images" in bad.stderr


@pytest.mark.parametrize("size", [(400, 300), (300, 400), (64, 64), (100, 37), (999, 1000), (16, 16)])
def test_fast_clip_pixels_equal_the_hugging_face_processor(size, tiny_processor):
    from llava_loop.data.images import fast_path_applies, fast_pixels

    image_processor = tiny_processor.image_processor
    assert fast_path_applies(image_processor)
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    fast = fast_pixels(image, image_processor)
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    assert (fast - reference).abs().max() < 1e-5


def test_processors_outside_the_fast_path_fall_back_to_hugging_face(tiny_processor):
    import copy

    from llava_loop.data.images import fast_path_applies

    processor = copy.deepcopy(tiny_processor)
    processor.image_processor.size = {"height": 64, "width": 64}  # not a shortest-edge resize
    assert not fast_path_applies(processor.image_processor)
    encoder = SampleEncoder(processor, max_length=128)
    assert not encoder.fast_pixels
    image = Image.new("RGB", (80, 50), (1, 2, 3))
    expected = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(encoder.pixel_values(image), expected)


def test_absolute_image_paths_load_when_allowed(tiny_processor, tmp_path):
    (tmp_path / "outside.jpg").write_bytes(_jpeg_bytes())
    record = Record("a", (str(tmp_path / "outside.jpg"),), (("user", "<image>\nDescribe."), ("assistant", "ok .")))
    encoder = SampleEncoder(tiny_processor, max_length=160, allow_absolute_paths=True)
    assert encoder(record, tmp_path / "images")["pixel_values"] is not None
    with pytest.raises(SkipSample, match="unsafe_path"):
        SampleEncoder(tiny_processor, max_length=160)(record, tmp_path / "images")


def test_an_answer_that_also_occurs_in_the_template_markup_is_supervised_in_its_own_turn(tiny_processor, tmp_path):
    """ChatML's markup between turns holds "a", "tan", "end", ">": each such answer is found where the assistant
    says it and supervised with its <|im_end|> (a bare text search stopped in the markup and raised). A
    conversation the chat template refuses is a record skipped as template_error, never a crash of the run."""
    _solid_images(tmp_path, {"red.png": (220, 30, 30)})
    encoder = SampleEncoder(tiny_processor, max_length=512)
    for answer in ("a", "tan", "end", ">", "<", "assistant", "a ."):
        record = Record(answer, ("red.png",), (("user", "<image>\nWhich?"), ("assistant", answer)))
        sample = encoder(record, tmp_path)
        runs = supervised_runs(sample["input_ids"].tolist(), sample["labels"].tolist())
        assert [tiny_processor.tokenizer.decode(r) for r in runs] == [answer + "<|im_end|>"], answer
    tokenizer = tiny_processor.tokenizer
    chatml = tokenizer.chat_template
    try:  # a template that refuses system turns, as Gemma's does
        tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        )
        refused = Record(
            "sys", ("red.png",), (("system", "Be brief."), ("user", "<image>\nWhich?"), ("assistant", "red ."))
        )
        with pytest.raises(SkipSample) as skip:
            encoder(refused, tmp_path)
        assert skip.value.reason == "template_error" and "record sys" in skip.value.detail
        assert "no system role" in skip.value.detail
    finally:
        tokenizer.chat_template = chatml


def test_a_strip_whose_resize_would_be_a_bomb_is_skipped_in_training_and_in_inference(
    tiny_processor, tiny_model_dir, tmp_path
):
    """A 30000x1 strip has few pixels, but the shortest-edge resize would make it 1,920,000x64 (122.9M pixels),
    and pad squares a 20000x50 panorama to 400M: each is skipped as extreme_aspect_ratio, named, before any of that
    is allocated; a 4000x50 image is prepared in both modes (the control). Inference leaves the strip out, named."""
    from llava_loop.infer import caption, load_for_inference

    sizes = {"strip.png": (30000, 1), "panorama.png": (20000, 50), "wide.png": (4000, 50)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / name)
    usable = {("strip.png", "resize"): False, ("panorama.png", "resize"): True, ("wide.png", "resize"): True}
    usable |= {("strip.png", "pad"): False, ("panorama.png", "pad"): False, ("wide.png", "pad"): True}
    for (name, ratio), ok in usable.items():
        encoder = SampleEncoder(tiny_processor, max_length=512, image_aspect_ratio=ratio)
        record = Record(name, (name,), (("user", "<image>\nWhat?"), ("assistant", "red .")))
        if ok:
            assert encoder(record, tmp_path)["pixel_values"].shape == (1, 3, 64, 64), (name, ratio)
            continue
        with pytest.raises(SkipSample) as skip:
            encoder(record, tmp_path)
        assert skip.value.reason == "extreme_aspect_ratio" and name in skip.value.detail, (name, ratio)
        assert "data.max_image_pixels=89,478,485" in skip.value.detail
    model, _, encoder = load_for_inference(tiny_model_dir, device="cpu")
    answers, unreadable = caption(model, encoder, [tmp_path / "strip.png", tmp_path / "wide.png"], "What?")
    assert answers[0] is None and unreadable[0][0] == "extreme_aspect_ratio" and answers[1] is not None
    # data check with the model counts it too (without --model the preprocessing is unknown: headers only)
    from llava_loop.data.check import check_dataset

    rows = [
        {"id": n, "image": n, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
        for n in sizes
    ]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    checked = check_dataset(tmp_path / "chat.json", tmp_path, processor=tiny_processor, progress=False)
    assert (
        checked["problems"] == {"extreme_aspect_ratio": 1}
        and "strip.png" in checked["examples"]["extreme_aspect_ratio"]
    )
    assert check_dataset(tmp_path / "chat.json", tmp_path, progress=False)["problems"] == {}
