"""``data check --report``: the PNG shows what the data holds. Read back from the picture: each bar where its count
says, as tall as its count says, in its colour; what is absent is not drawn."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from llava_loop.cli import main
from llava_loop.data.check import check_dataset
from llava_loop.data.report import BAR, HEIGHT, LIMIT, WIDTH, draw_report


def records_with_known_shape(root: Path, shapes_data) -> Path:
    """12 one-image records (one image missing), 4 two-image ones, 6 text-only; one image 4:1 wide."""
    images = sorted(Path(shapes_data["train_images"]).glob("*.jpg"))[:20]
    Image.new("RGB", (256, 64), "grey").save(root / "wide.jpg")
    names = [str(p) for p in images]

    def record(i, image, turns):
        conversations = []
        for t in range(turns):
            tags = "<image>\n" * (len(image) if isinstance(image, list) else 1) if image and t == 0 else ""
            conversations += [
                {"from": "human", "value": f"{tags}What is it {t}?"},
                {"from": "gpt", "value": "a circle"},
            ]
        return {"id": str(i), **({"image": image} if image else {}), "conversations": conversations}

    records = [record(i, names[i], 1 + i % 3) for i in range(11)]
    records.append(record(11, str(root / "wide.jpg"), 1))
    records[0]["image"] = str(root / "missing.jpg")
    records += [record(20 + i, names[12 + 2 * i : 14 + 2 * i], 1) for i in range(4)]
    records += [record(30 + i, None, 2) for i in range(6)]
    path = root / "chat.json"
    path.write_text(json.dumps(records))
    return path


def test_the_report_draws_what_the_data_holds(tmp_path, shapes_data):
    path = records_with_known_shape(tmp_path, shapes_data)
    report = check_dataset(path, "/", allow_absolute_paths=True, image_tokens=16, progress=False)
    image, panels = draw_report(report, "t", max_length=256)
    by_title = {p.title: p for p in panels}
    pixels = image.load()

    def bars(title):
        panel = by_title[title]
        for rect in panel.bars.values():  # each bar is drawn in its colour
            assert pixels[(rect[0] + rect[2]) // 2, (rect[1] + rect[3]) // 2] in (BAR, LIMIT)
        return {label: rect[3] - rect[1] for label, rect in panel.bars.items()}

    per_record = bars("images per record")  # the missing image's record fails the image check, not the text one
    assert set(per_record) == {"0", "1", "2"}
    assert (
        abs(per_record["0"] / per_record["1"] - 6 / 12) < 0.02
        and abs(per_record["2"] / per_record["1"] - 4 / 12) < 0.02
    )
    answers = bars("answers per record")
    assert set(answers) == {"1", "2", "3"}  # 1 + i % 3 answers, and the text-only records' 2
    aspects = bars("aspect ratios")
    assert set(aspects) == {"~1:1", ">3:1"} and aspects[">3:1"] < aspects["~1:1"]
    assert set(bars("what training would skip")) == {"missing_image"}
    assert image.size == (WIDTH, HEIGHT)


def test_check_and_prepare_write_the_report(tmp_path, shapes_data, capsys):
    path = records_with_known_shape(tmp_path, shapes_data)
    png = tmp_path / "out" / "report.png"
    args = ["data", "check", "--data", str(path), "--image-dir", "/", "--allow-absolute-paths"]
    assert main([*args, "--report", str(png), "--json", str(tmp_path / "r.json")]) == 1  # a missing image
    assert Image.open(png).size == (WIDTH, HEIGHT)
    assert "distributions" not in json.loads((tmp_path / "r.json").read_text())  # per-record arrays stay out
    src = tmp_path / "download"
    src.mkdir()
    (src / "chat.json").write_text(
        json.dumps([{**r, "image": Path(r["image"]).name} for r in json.loads(path.read_text())[1:11]])
    )
    import zipfile

    with zipfile.ZipFile(src / "images.zip", "w") as zf:
        for r in json.loads(path.read_text())[1:11]:
            zf.write(r["image"], Path(r["image"]).name)
    prepared = tmp_path / "prepared"
    assert (
        main(
            [
                "data",
                "prepare",
                "llava-cc3m-595k",
                "--src",
                str(src),
                "--out",
                str(prepared),
                "--report",
                str(prepared / "report.png"),
            ]
        )
        == 0
    )
    assert Image.open(prepared / "report.png").size == (WIDTH, HEIGHT)
    assert "no problems found" in capsys.readouterr().out
