"""``llava-loop data prepare``: small copies of each dataset's download (file names, record fields and zip member
paths as the hub gives them) -> prepare -> data check -> a few training steps; images read from the zips in place
train exactly as the extracted files do; bad downloads are named, counted and the rest prepared."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from llava_loop.cli import main
from llava_loop.data.archives import ZipMember
from llava_loop.data.convert import DESCRIBE_AND_READ_PROMPTS
from llava_loop.data.images import image_path
from llava_loop.data.records import load_records
from llava_loop.data.video import FrameSampling, read_video
from llava_loop.template import IMAGE_TOKEN, VIDEO_TOKEN

import helpers

SHAREGPT4O_PREFIX = "mnt/petrelfs/share_data/someone/sharegpt4o/4o/image/"  # a long nested prefix, as in its zip


def shapes(shapes_data, n: int = 16) -> list[tuple[dict, bytes]]:
    """The first ``n`` shapes records with their JPEG bytes."""
    records = json.loads(Path(shapes_data["train"]).read_text())[:n]
    return [(r, (Path(shapes_data["train_images"]) / r["image"]).read_bytes()) for r in records]


def jsonl(path: Path) -> list[dict]:
    """A JSONL file's rows (split on newlines only: U+2028 may sit inside a string)."""
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:  # stored, as image zips usually are
        for name, data in members.items():
            zf.writestr(name, data)


def renamed(record: dict, image: str, **fields) -> dict:
    return {**record, "image": image, **fields}


def cc3m(src: Path, items) -> int:
    names = [f"GCC_train_{i:09d}.jpg" for i in range(len(items))]
    (src / "chat.json").write_text(json.dumps([renamed(r, n, id=n[:-4]) for (r, _), n in zip(items, names)]))
    (src / "metadata.json").write_text("[]")
    write_zip(src / "images.zip", {n: data for (_, data), n in zip(items, names)})
    return len(items)


def blip558k(src: Path, items) -> int:
    names = [f"{i // 8:05d}/{i:09d}.jpg" for i in range(len(items))]
    (src / "blip_laion_cc_sbu_558k.json").write_text(json.dumps([renamed(r, n) for (r, _), n in zip(items, names)]))
    write_zip(src / "images.zip", {n: data for (_, data), n in zip(items, names)})
    return len(items)


# LLaVA-1.5's image folders, and how each arrives: (record prefix, zip under src, member prefix); None: a folder
MIX665K = (
    ("coco/train2017/", "coco/train2017.zip", "train2017/"),
    ("gqa/images/", "gqa/images.zip", "images/"),
    ("ocr_vqa/images/", None, None),
    ("textvqa/train_images/", "textvqa/train_val_images.zip", "train_images/"),
    ("vg/VG_100K/", "vg/images.zip", "VG_100K/"),
    ("vg/VG_100K_2/", "vg/images2.zip", "VG_100K_2/"),
)


def mix665k(src: Path, items) -> int:
    records, zips = [], {}
    for i, (record, data) in enumerate(items):
        folder, archive, member = MIX665K[i % len(MIX665K)]
        name = f"{i:012d}.jpg"
        records.append(renamed(record, folder + name))
        if archive:
            zips.setdefault(archive, {})[member + name] = data
        else:
            (src / folder).mkdir(parents=True, exist_ok=True)
            (src / folder / name).write_bytes(data)
    last = records[-1]["conversations"][-1]  # a line separator inside a string: the records must still load
    last["value"] += "\u2028(and U+2028)"
    text_only = [
        {"id": f"text_{i}", "conversations": [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": s}]}
        for i, s in enumerate(("circle", "square", "triangle", "star"))
    ]
    (src / "llava_v1_5_mix665k.json").write_text(json.dumps(records + text_only))
    for archive, members in zips.items():
        write_zip(src / archive, members)
    return len(records) + len(text_only)


def sharegpt4o(src: Path, items, clips: dict[str, bytes | None] | None = None) -> int:
    """ShareGPT-4o as the hub holds it (image_conversations/gpt-4o.jsonl, images.zip), and with ``clips`` its video
    part: video_conversations/gpt4o.jsonl, one row per clip, named as the hub's rows name them (``video_10001.mp4``);
    the clips (None: not downloaded) in a zip under a folder the names lack."""
    rows = []
    for i, (record, _) in enumerate(items):  # ShareGPT-4o's captions carry no <image> tag
        turns = [{**t, "value": t["value"].replace("<image>", "").strip()} for t in record["conversations"]]
        rows.append({"id": f"4o_{i}", "image": f"{i:06d}.jpg", "conversations": turns})
    (src / "image_conversations").mkdir()
    (src / "image_conversations" / "gpt-4o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_zip(src / "images.zip", {f"{SHAREGPT4O_PREFIX}{i:06d}.jpg": data for i, (_, data) in enumerate(items)})
    (src / "thumbs").mkdir()  # a decoy: one name also found under a shorter prefix; the prefix serving most wins
    (src / "thumbs" / "000000.jpg").write_bytes(items[-1][1])
    if clips is None:
        return len(items)
    # which tag the hub's video rows carry is not known: one row without (as its image rows), one with <video>
    rows = []
    for i, name in enumerate(clips):
        ask = f"{VIDEO_TOKEN}\nDescribe the video." if i % 2 else "Describe the video."
        turns = [{"from": "human", "value": ask}, {"from": "gpt", "value": f"A square moves right ({name})."}]
        rows.append({"id": name[:-4], "video": name, "conversations": turns})
    (src / "video_conversations").mkdir()
    (src / "video_conversations" / "gpt4o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_zip(src / "videos.zip", {f"pvideo/{name}": data for name, data in clips.items() if data is not None})
    return len(items) + len(clips)


def tiny_clip(path: Path, shade: int) -> bytes:
    """A 4-frame 32x32 mp4 of a square moving right, encoded with PyAV."""
    pytest.importorskip("av")
    from llava_loop.demo.clips import write_clip

    frames = []
    for t in range(4):
        frame = Image.new("RGB", (32, 32), (shade, 40, 40))
        frame.paste((250, 250, 250), (4 + 6 * t, 12, 12 + 6 * t, 20))
        frames.append(frame)
    write_clip(path, frames)
    return path.read_bytes()


def textocr(src: Path, items) -> int:
    rows = [
        {"filename": f"{i:016x}.jpg", "caption": f"DESCRIPTION: {r['conversations'][1]['value']}\n\nTEXT: none"}
        for i, (r, _) in enumerate(items)
    ]
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_zip(src / "train_val_images.zip", {f"train_images/{i:016x}.jpg": data for i, (_, data) in enumerate(items)})
    return len(items)


LAYOUTS = {"llava-cc3m-595k": cc3m, "llava-558k": blip558k, "llava-665k": mix665k, "sharegpt4o": sharegpt4o}
LAYOUTS["textocr-gpt4o"] = textocr


def prepared_run(run_config, out: Path, name: str = "run", **data) -> Path:
    """A run config whose data is the prepared folder alone: no image folder, no held-out set."""
    data = {"path": str(out), "image_dir": "", "eval_path": "", "eval_image_dir": "", **data}
    return run_config(name, data=data, train={"max_steps": 2, "micro_batch_size": 4, "log_sample_ids": True})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_download_prepares_checks_and_trains(
    name, tmp_path, shapes_data, run_config, tiny_processor, tiny_model_dir, capsys
):
    """The 558K run trains in LLaVA-1.5's own plain stage-1 layout: each sample supervises its caption and
    end-of-text token, nothing else."""
    src, out = tmp_path / "download", tmp_path / "prepared"
    src.mkdir()
    n = LAYOUTS[name](src, shapes(shapes_data))
    assert main(["data", "prepare", name, "--src", str(src), "--out", str(out)]) == 0
    manifest = json.loads((out / "prepared.json").read_text())
    assert (manifest["records"], manifest["left_out"]) == (n, {}), manifest
    records = jsonl(out / "records.jsonl")
    images = [r["image"] for r in records if "image" in r]
    assert all(".zip/" in i or i.startswith("ocr_vqa/images/") for i in images), images
    assert not [p for p in src.rglob("*.jpg") if p.parent.name not in ("images", "thumbs")]  # nothing extracted
    card = (out / "README.md").read_text()
    assert f"{n} records kept" in card and "License" in card and f"data prepare {name} --src {src}" in card
    if name == "sharegpt4o":
        assert manifest["found_under"] == {SHAREGPT4O_PREFIX: n}
        assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    if name == "textocr-gpt4o":  # the caption kept whole, behind a describe-and-transcribe instruction
        for record, row in zip(records, jsonl(src / "train.jsonl")):
            question, answer = (t["value"] for t in record["conversations"])
            assert question.replace("<image>", "").strip() in DESCRIBE_AND_READ_PROMPTS
            assert answer == row["caption"]
    if name == "llava-665k":
        assert sum("image" not in r for r in records) == 4  # the text-only records are kept
        # generation reads the zipped images too: eval on the prepared folder, no --image-dir
        evaluated = tmp_path / "eval.json"
        eval_args = ["--max-samples", "6", "--max-new-tokens", "3", "--batch-size", "3"]
        eval_args += ["--model", str(tiny_model_dir), "--data", str(out), "--out", str(evaluated)]
        assert main(["eval", *eval_args]) == 0
        assert len(json.loads(evaluated.read_text())["predictions"]) == 6
    capsys.readouterr()
    assert main(["data", "check", "--data", str(out)]) == 0, capsys.readouterr().out
    assert "no problems found" in capsys.readouterr().out
    template = "plain" if name == "llava-558k" else "chat"
    helpers.train_here(prepared_run(run_config, out, template=template))
    steps = helpers.metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2] and all(s["skipped_samples"] == 0 for s in steps), steps
    if template == "plain":
        captions = {r["id"]: r["conversations"][1]["value"] for r in records}
        tokenizer = tiny_processor.tokenizer
        for step in steps:
            caption_tokens = [
                len(tokenizer(captions[i], add_special_tokens=False)["input_ids"]) + 1 for i in step["sample_ids"]
            ]
            assert step["label_tokens"] == sum(caption_tokens)
        # control: the same run in the chat layout supervises as many tokens (caption + <|im_end|>) but not the same
        helpers.train_here(prepared_run(run_config, out, "chat", template="chat"))
        chat = helpers.metrics(tmp_path / "chat")
        assert [s["label_tokens"] for s in chat] == [s["label_tokens"] for s in steps]
        assert all(c["loss"] != p["loss"] for c, p in zip(chat, steps))


@pytest.mark.slow
def test_images_read_from_zips_train_as_the_extracted_files_do(tmp_path, shapes_data, run_config):
    """The same records through the prepared folder (images in zips) and through chat.json + extracted files: the
    same losses and gradient norms, bit for bit. Control: one member of the zip holds another image."""
    items = shapes(shapes_data)
    src = tmp_path / "download"
    src.mkdir()
    mix665k(src, items)
    assert main(["data", "prepare", "llava-665k", "--src", str(src), "--out", str(tmp_path / "prepared")]) == 0
    extracted = tmp_path / "extracted"
    for archive in src.rglob("*.zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(extracted / archive.parent.relative_to(src))
    for image in (src / "ocr_vqa").rglob("*.jpg"):
        target = extracted / image.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image.read_bytes())
    plain = {"path": str(src / "llava_v1_5_mix665k.json"), "image_dir": str(extracted), "eval_path": ""}

    def run(name, data):
        train = {"max_steps": 3, "micro_batch_size": 4, "log_sample_ids": True}
        helpers.train_here(run_config(name, data=data, train=train))
        return [(s["loss"], s["grad_norm"], s["sample_ids"]) for s in helpers.metrics(tmp_path / name)]

    zipped = run("zipped", {"path": str(tmp_path / "prepared"), "image_dir": "", "eval_path": ""})
    assert zipped == run("extracted", plain)
    # control: every extracted image replaced by the first one changes the losses
    files = sorted(extracted.rglob("*.jpg"))
    for file in files[1:]:
        file.write_bytes(files[0].read_bytes())
    assert run("swapped", plain)[0][:2] != zipped[0][:2]


def test_sharegpt4o_video_part_is_prepared_with_clips_read_in_place(tmp_path, shapes_data, capsys):
    """ShareGPT-4o with its video part: each clip found in the zip it arrived in (under a folder the names lack) and
    named there, read in place; a clip not downloaded and one that is no video are left out and counted; the
    records load as video records. Control: the same download without its video part prepares the images alone
    and says 0 video records."""
    items = shapes(shapes_data, 6)
    clips = {f"video_1000{i}.mp4": tiny_clip(tmp_path / f"{i}.mp4", 60 * i) for i in range(2)}
    clips |= {"video_10002.mp4": None, "video_10003.mp4": b"no mp4 here"}  # not downloaded; broken
    src, out = tmp_path / "download", tmp_path / "prepared"
    src.mkdir()
    n = sharegpt4o(src, items, clips)
    capsys.readouterr()
    assert main(["data", "prepare", "sharegpt4o", "--src", str(src), "--out", str(out)]) == 0
    said = capsys.readouterr()
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["left_out"] == {"missing_video": 1, "corrupt_video": 1}, manifest
    assert (manifest["records"], manifest["images"], manifest["videos"]) == (n - 2, len(items), 2)
    assert manifest["found_under"] == {SHAREGPT4O_PREFIX: len(items), "pvideo/": 3}  # the broken one is found
    left = {e["id"]: e for e in jsonl(out / "left_out.jsonl")}
    assert left["video_10002"]["reason"] == "missing_video" and left["video_10003"]["reason"] == "corrupt_video"
    assert all(e["file"].endswith("video_conversations/gpt4o.jsonl") for e in left.values())
    assert "2 of the 8 records kept are video" in said.err
    assert "8 records kept, with 6 images and 2 video records; 2 left out" in (out / "README.md").read_text()
    assert not list(src.rglob("*.mp4"))  # nothing extracted

    records = load_records(out / "records.jsonl")
    videos = [r for r in records if r.video is not None]
    assert [r.id for r in videos] == ["video_10000", "video_10001"]
    for record, shade in zip(videos, (0, 60)):
        assert record.video.source == f"videos.zip/pvideo/{record.id}.mp4" and record.images == ()
        human = record.turns[0][1]
        assert human.count(VIDEO_TOKEN) == 1 and IMAGE_TOKEN not in human  # a tag added where the row had none
        where = image_path(manifest["image_dir"], record.video.source)
        assert where == ZipMember(src / "videos.zip", f"pvideo/{record.id}.mp4")
        frames = read_video(where, FrameSampling(frames=4))  # read from the zip in place
        assert [f.size for f in frames] == [(32, 32)] * 4
        assert abs(frames[0].getpixel((28, 2))[0] - shade) < 12  # this clip's own background
    assert sum(r.video is None and len(r.images) == 1 for r in records) == len(items)

    # control: the download without its video part
    bare, bare_out = tmp_path / "images-only", tmp_path / "images-only-prepared"
    bare.mkdir()
    sharegpt4o(bare, items)
    capsys.readouterr()
    assert main(["data", "prepare", "sharegpt4o", "--src", str(bare), "--out", str(bare_out)]) == 0
    manifest = json.loads((bare_out / "prepared.json").read_text())
    assert (manifest["records"], manifest["videos"], manifest["left_out"]) == (len(items), 0, {})
    assert "0 of the 6 records kept are video (no video_conversations/" in capsys.readouterr().err
    assert "with 6 images and 0 video records (no video_conversations/" in (bare_out / "README.md").read_text()
    assert all(r.video is None for r in load_records(bare_out / "records.jsonl"))


def test_a_bad_download_is_named_and_counted_and_the_rest_prepared(tmp_path, shapes_data, capsys):
    items = shapes(shapes_data, 12)
    src, out = tmp_path / "download", tmp_path / "prepared"
    src.mkdir()
    mix665k(src, items)
    records = json.loads((src / "llava_v1_5_mix665k.json").read_text())
    records[0]["image"] = "coco/train2017/not_in_the_zip.jpg"  # a name the zip does not hold
    corrupt = records[1]["image"]  # gqa/images/...: its member's bytes broken below
    records[2]["image"] = "../../etc/passwd"  # unsafe
    records.append({"id": "no_turns", "image": records[3]["image"]})
    text = json.dumps(records)
    (src / "llava_v1_5_mix665k.json").write_text(text[: len(text) - 40])  # cut short inside the last records
    gqa = src / "gqa" / "images.zip"
    with zipfile.ZipFile(gqa) as zf:
        members = {m: zf.read(m) for m in zf.namelist()}
    members[next(m for m in members if corrupt.endswith(m))] = b"\xff\xd8 this is no JPEG"
    write_zip(gqa, members)
    vg2 = src / "vg" / "images2.zip"
    vg2.write_bytes(vg2.read_bytes()[:200])  # a download cut off: no central directory
    capsys.readouterr()
    assert main(["data", "prepare", "llava-665k", "--src", str(src), "--out", str(out)]) == 1  # read in part
    said = capsys.readouterr()
    assert "vg/images2.zip is not a readable zip" in said.err
    manifest = json.loads((out / "prepared.json").read_text())
    left = jsonl(out / "left_out.jsonl")
    reasons = {e["reason"] for e in left}
    assert {"missing_image", "unsafe_path", "corrupt_image", "unreadable_archive", "malformed_record"} <= reasons
    assert all(e["file"].endswith("llava_v1_5_mix665k.json") and isinstance(e["record"], int) for e in left)
    cut = next(e for e in left if "cut short" in e["detail"])
    assert cut["reason"] == "malformed_record"
    vg2_records = [r for r in records[: cut["record"]] if str(r.get("image", "")).startswith("vg/VG_100K_2/")]
    assert manifest["left_out"]["unreadable_archive"] == len(vg2_records) > 0
    kept = jsonl(out / "records.jsonl")
    assert manifest["records"] == len(kept) == cut["record"] - sum(manifest["left_out"].values()) + 1
    assert "left out: unreadable_archive" in said.out and "left_out.jsonl" in said.err

    # a record broken mid-list: those before it are kept, and what is not read is said
    mid = tmp_path / "mid"
    mid.mkdir()
    cc3m(mid, items)
    text = (mid / "chat.json").read_text()
    at = text.index('"id": "GCC_train_000000004"')
    (mid / "chat.json").write_text(text[:at] + "oops, " + text[at:])
    capsys.readouterr()
    assert main(["data", "prepare", "llava-cc3m-595k", "--src", str(mid), "--out", str(tmp_path / "mid-out")]) == 1
    (broken,) = jsonl(tmp_path / "mid-out" / "left_out.jsonl")
    assert broken["record"] == 4 and "the 4 records before it are kept" in broken["detail"]
    assert "bytes after it are not read" in broken["detail"]
    manifest = json.loads((tmp_path / "mid-out" / "prepared.json").read_text())
    assert manifest["records"] == 4
    (unread,) = manifest["unread"].values()
    assert unread["after_record"] == 4 and unread["bytes"] == len(text) + len("oops, ") - text.rindex("{", 0, at) - 1
    said = capsys.readouterr()  # the summary says it, with the size, not only left_out.jsonl
    assert f"{unread['bytes']:,} bytes" in said.out and "NOT READ: chat.json after record 4" in said.out
    assert "error: " in said.err and "was read only in part" in said.err
    # the same folder prepared again says so again: it is complete, but not whole
    assert main(["data", "prepare", "llava-cc3m-595k", "--src", str(mid), "--out", str(tmp_path / "mid-out")]) == 1
    assert "was read only in part" in capsys.readouterr().err

    # nothing usable: the one zip of a stage-1 download is cut off -> non-zero, naming it
    bad = tmp_path / "bad"
    bad.mkdir()
    cc3m(bad, items)
    (bad / "images.zip").write_bytes((bad / "images.zip").read_bytes()[:100])
    assert main(["data", "prepare", "llava-cc3m-595k", "--src", str(bad), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no usable record" in err and "unreadable_archive x12" in err and "images.zip is not a readable zip" in err
    assert not (tmp_path / "none" / "prepared.json").exists()


def test_a_rerun_does_nothing_other_inputs_are_refused_and_the_folder_converts_to_shards(tmp_path, shapes_data, capsys):
    src, out = tmp_path / "download", tmp_path / "prepared"
    src.mkdir()
    cc3m(src, shapes(shapes_data, 4))
    args = ["data", "prepare", "llava-cc3m-595k", "--src", str(src), "--out", str(out)]
    assert main(args) == 0
    made = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "already prepared (4 records" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == made
    cc3m(src, shapes(shapes_data, 6))  # the download changed
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert json.loads((out / "prepared.json").read_text())["records"] == 6
    # a prepared folder converts to webdataset shards as it is: its records, its zipped images
    assert main(["data", "convert", "shards", "--input", str(out), "--out", str(tmp_path / "shards")]) == 0
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 6


def test_a_rerun_after_missing_images_arrive_asks_for_force_and_then_keeps_their_records(tmp_path, shapes_data, capsys):
    """A 665K download with loose folders (ocr_vqa/images/) and one image missing: that record is left out; once the
    image is there, a re-run does not say "nothing to do" but names the change, and --force keeps the record. The
    prepared folder inside --src is no change (control: a re-run before the image arrives does nothing)."""
    src = tmp_path / "download"
    src.mkdir()
    items = shapes(shapes_data, 12)
    mix665k(src, items)
    loose = src / "ocr_vqa" / "images"
    missing = sorted(loose.iterdir())[0]
    data = missing.read_bytes()
    missing.unlink()
    out = src / "prepared"  # inside --src: its own files are not the download's
    args = ["data", "prepare", "llava-665k", "--src", str(src), "--out", str(out)]
    assert main(args) == 0
    assert [e["reason"] for e in jsonl(out / "left_out.jsonl")] == ["missing_image"]
    kept = json.loads((out / "prepared.json").read_text())["records"]
    capsys.readouterr()
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().err
    before = sum(p.is_file() and out not in p.parents for p in src.rglob("*"))  # the records file, zips, loose images
    missing.write_bytes(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"held {before} files; it holds {before + 1} now" in err and "pass --force" in err
    assert main([*args, "--force"]) == 0
    assert json.loads((out / "prepared.json").read_text())["records"] == kept + 1
    assert jsonl(out / "left_out.jsonl") == []


def test_convert_captions_can_ask_to_describe_and_read(tmp_path, capsys):
    """Long captions under brief prompts are a warning (control: short ones are not); --prompts switches the pool."""
    table, out = tmp_path / "train.jsonl", tmp_path / "chat.json"
    convert = ["data", "convert", "captions", "--input", str(table), "--out", str(out)]
    table.write_text(json.dumps({"filename": "a.jpg", "caption": "a red sign ."}) + "\n")
    capsys.readouterr()
    assert main(convert) == 0 and "warning" not in capsys.readouterr().err
    caption = "DESCRIPTION: " + "a shop front with a red sign above the door, " * 6 + "\n\nTEXT: OPEN"
    table.write_text(json.dumps({"filename": "a.jpg", "caption": caption}) + "\n")
    assert main(convert) == 0
    assert "--prompts describe-and-read" in capsys.readouterr().err
    brief = json.loads(out.read_text())[0]["conversations"][0]["value"]
    assert main([*convert, "--prompts", "describe-and-read"]) == 0
    assert "warning" not in capsys.readouterr().err
    record = json.loads(out.read_text())[0]
    assert record["conversations"][0]["value"].replace("<image>", "").strip() in DESCRIBE_AND_READ_PROMPTS
    assert brief.replace("<image>", "").strip() not in DESCRIBE_AND_READ_PROMPTS
    assert record["conversations"][1]["value"] == caption


def test_out_is_a_folder_of_its_own_and_one_preparation_at_a_time(tmp_path, shapes_data, capsys):
    """An --out holding anything data prepare did not write is refused (its README.md was overwritten), and so is
    --out equal to --src (the download's card replaced, every image then 'missing'); an --out inside --src works.
    A second preparation into a folder another one holds is refused, naming the holder."""
    src = tmp_path / "download"
    src.mkdir()
    cc3m(src, shapes(shapes_data, 4))
    (src / "README.md").write_text("the dataset's own card")

    def prepare(out):
        return main(["data", "prepare", "llava-cc3m-595k", "--src", str(src), "--out", str(out)])

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    assert prepare(mine) == 2
    assert "holds README.md, which data prepare did not write" in capsys.readouterr().err
    assert (mine / "README.md").read_text() == "my notes" and not (mine / "records.jsonl").exists()
    assert prepare(src) == 2 and "is --src" in capsys.readouterr().err
    assert (src / "README.md").read_text() == "the dataset's own card"
    assert prepare(src / "prepared") == 0  # inside --src: left out of the listing, the images found
    assert json.loads((src / "prepared" / "prepared.json").read_text())["records"] == 4
    assert prepare(tmp_path / "empty") == 0 and prepare(tmp_path / "empty") == 0  # a new folder, then a re-run

    busy = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from llava_loop.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
            str(busy),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=helpers.env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert prepare(busy) == 2
        err = capsys.readouterr().err
        assert f"--out {busy} is in use by another data prepare (pid {holder.pid}" in err
        assert not (busy / "records.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert prepare(busy) == 0  # the holder is gone: its lock is stale, taken over
    assert "taking over the lock of a data prepare that is gone" in capsys.readouterr().err


def test_a_damaged_prepared_json_is_named_with_the_fix(tmp_path, shapes_data, run_config, capsys):
    """prepared.json whose image_dir is null, a number or absent, or which is a bare string: a clear error naming
    the file and the fix, at startup of training and in data check, never a TypeError."""
    src, out = tmp_path / "download", tmp_path / "prepared"
    src.mkdir()
    cc3m(src, shapes(shapes_data, 4))
    assert main(["data", "prepare", "llava-cc3m-595k", "--src", str(src), "--out", str(out)]) == 0
    manifest = json.loads((out / "prepared.json").read_text())
    for damaged in ({**manifest, "image_dir": 3}, "just a string", {**manifest, "image_dir": None}):
        (out / "prepared.json").write_text(json.dumps(damaged))
        capsys.readouterr()
        assert main(["data", "check", "--data", str(out)]) == 2
        err = capsys.readouterr().err
        assert "prepared.json" in err and "prepare the folder again" in err and "Traceback" not in err
    run = helpers.launch(run_config(data={"path": str(out), "image_dir": "", "eval_path": ""}), check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "its image_dir is None" in run.stderr and "prepare the folder again" in run.stderr
