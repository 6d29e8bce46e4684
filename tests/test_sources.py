"""Parquet and Arrow sources: read in place, the same records and samples as JSON, bad rows skipped and counted."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from llava_loop.config import Config
from llava_loop.data.dataset import LlavaDataset
from llava_loop.data.lengths import count_lengths
from llava_loop.data.records import RecordError, load_records
from llava_loop.data.sources import open_records, source_kind
from llava_loop.loaders import make_encoder

import helpers

datasets = pytest.importorskip("datasets")


def _rows(records, images_dir, image="struct"):
    """Table rows of LLaVA records with the image as a path, embedded bytes or the datasets Image struct."""
    rows = []
    for r in records:
        data = (images_dir / r["image"]).read_bytes()
        value = {"path": r["image"], "struct": {"bytes": data, "path": r["image"]}, "bytes": data}[image]
        rows.append({"id": r["id"], "conversations": r["conversations"], "image": value})
    return rows


@pytest.fixture(scope="module")
def tables(tmp_path_factory, shapes_data):
    """The 96 shapes training records as Parquet (paths; Image structs in row groups of 10; raw bytes in a folder of
    two files) and as a save_to_disk folder with the Image feature."""
    root = tmp_path_factory.mktemp("tables")
    records = json.loads(shapes_data["train"].read_text())
    images = shapes_data["train_images"]
    out = {"json": shapes_data["train"]}
    datasets.Dataset.from_list(_rows(records, images, "path")).to_parquet(str(root / "paths.parquet"))
    embedded = datasets.Dataset.from_list(_rows(records, images, "struct")).cast_column("image", datasets.Image())
    embedded.to_parquet(str(root / "structs.parquet"), batch_size=10)
    embedded.save_to_disk(str(root / "arrow"))
    (root / "bytes").mkdir()
    raw = datasets.Dataset.from_list(_rows(records, images, "bytes"))
    raw.select(range(50)).to_parquet(str(root / "bytes" / "part-0.parquet"))
    raw.select(range(50, 96)).to_parquet(str(root / "bytes" / "part-1.parquet"))
    out.update(
        paths=root / "paths.parquet", structs=root / "structs.parquet", arrow=root / "arrow", bytes=root / "bytes"
    )
    return out


def test_sources_are_told_apart(tables, tmp_path):
    kinds = {name: source_kind(path) for name, path in tables.items()}
    assert kinds == {"json": "json", "paths": "parquet", "structs": "parquet", "arrow": "arrow", "bytes": "parquet"}
    assert source_kind("shards/{000000..000127}.tar") == "shards"
    with pytest.raises(RecordError, match="no .parquet files, no .tar shards"):
        source_kind(tmp_path)


@pytest.mark.parametrize("name", ["paths", "structs", "arrow", "bytes"])
def test_every_table_layout_encodes_exactly_the_json_samples(name, tables, shapes_data, tiny_processor):
    encoder = make_encoder(Config(), tiny_processor)
    json_set = LlavaDataset(load_records(tables["json"]), encoder, shapes_data["train_images"])
    table = open_records(tables[name])
    table_set = LlavaDataset(table, encoder, shapes_data["train_images"] if name == "paths" else "")
    assert len(table_set) == len(json_set) == 96
    for i in (0, 37, 95):
        a, b = json_set[i], table_set[i]
        assert a["id"] == b["id"] and b["skipped"] == []
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(a[key], b[key]), (name, i, key)
    if name != "paths":  # the image came from the table, not from the image folder
        on_disk = shapes_data["train_images"] / load_records(tables["json"])[0].images[0]
        assert table[0].images[0].data == on_disk.read_bytes()
    held = table.subset([5, 2])
    assert [held[0].id, held[1].id] == [table[5].id, table[2].id]
    assert table.fingerprint() == open_records(tables[name]).fingerprint() != held.fingerprint()
    assert count_lengths(table, encoder).tolist() == count_lengths(load_records(tables["json"]), encoder).tolist()


def test_opening_a_table_writes_nothing(tables, tmp_path, monkeypatch):
    """Read in place: no Arrow cache, no second copy of the images."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    before = {p: p.stat().st_mtime_ns for p in tables["structs"].parent.rglob("*")}
    for name in ("structs", "arrow", "bytes"):
        records = open_records(tables[name])
        assert records[len(records) - 1].images
    assert {p: p.stat().st_mtime_ns for p in tables["structs"].parent.rglob("*")} == before
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.arrow"))


def _broken_table(tmp_path, shapes_data, image_list=False):
    """Six rows: a corrupt embedded image (row 1), no conversations (row 2), a two-image list (row 4)."""
    records = json.loads(shapes_data["train"].read_text())[:6]
    rows = _rows(records, shapes_data["train_images"], "struct")
    rows[1]["image"] = {"bytes": b"not an image", "path": "broken.jpg"}
    rows[2]["conversations"] = None
    rows = [{**r, "image": [r["image"]]} for r in rows]
    rows[4]["image"] = rows[4]["image"] * 2
    rows[4]["conversations"] = [dict(c) for c in rows[4]["conversations"]]
    rows[4]["conversations"][0]["value"] += "\n<image>"
    path = tmp_path / "broken.parquet"
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Sequence(datasets.Image())).to_parquet(str(path))
    return path


def test_bad_rows_are_skipped_counted_and_replaced(tmp_path, shapes_data, tiny_processor):
    records = open_records(_broken_table(tmp_path, shapes_data))
    assert len(records[4].images) == 2
    dataset = LlavaDataset(records, make_encoder(Config(), tiny_processor), "", seed=0)
    corrupt, malformed = dataset[1], dataset[2]
    assert [e[1] for e in corrupt["skipped"]] == ["corrupt_image"] and "broken.jpg" in corrupt["skipped"][0][2]
    assert [e[1] for e in malformed["skipped"]] == ["malformed_record"] and "row 2" in malformed["skipped"][0][0]
    assert "conversations" in malformed["skipped"][0][2]
    assert corrupt["input_ids"] is not None and malformed["input_ids"] is not None  # replaced
    assert dataset[4]["pixel_values"].shape[0] == 2


def test_data_check_reads_tables(tmp_path, shapes_data):
    path = _broken_table(tmp_path, shapes_data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_loop.cli",
            "data",
            "check",
            "--data",
            str(path),
            "--decode",
            "--json",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        env=helpers.env(),
    )
    assert out.returncode == 1, out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"] == {"corrupt_image": 1, "malformed_record": 1}
    assert report["records"] == 6 and report["images"] == 6  # five rows with images, one of them two


def test_a_table_without_conversations_or_with_splits_names_the_fix(tmp_path):
    datasets.Dataset.from_list([{"text": "hi"}]).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(
        RecordError, match=r"t.parquet: no 'conversations' or 'messages' column \(columns: \['text'\]\)"
    ):
        open_records(tmp_path / "t.parquet")
    ds = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "a"}]}])
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError, match="set data.path to one of them"):
        open_records(tmp_path / "dd")


@pytest.mark.slow
def test_training_from_parquet_and_arrow_equals_training_from_json(tmp_path, run_config, tables, shapes_data):
    """One skip, encode and collate path: the same records give the same run, with workers (forked readers)."""
    losses = {}
    for name in ("json", "structs", "arrow"):
        path = run_config(
            name,
            train={"log_sample_ids": True},
            data={
                "path": str(tables[name]),
                "num_workers": 2,
                "image_dir": str(shapes_data["train_images"]) if name == "json" else "",
            },
        )
        helpers.train_here(path)
        losses[name] = [(m["loss"], m["sample_ids"]) for m in helpers.metrics(tmp_path / name)]
    assert losses["json"] == losses["structs"] == losses["arrow"] and len(losses["json"]) == 4


@pytest.mark.parametrize("kind, module", [("arrow", "datasets"), ("parquet", "pyarrow"), ("shards", "webdataset")])
def test_without_the_data_extra_the_error_says_how_to_install_it(kind, module, tables, monkeypatch):
    from llava_loop.data.sources import require_data_extra
    from llava_loop.errors import UserError

    path = {"arrow": tables["arrow"], "parquet": tables["structs"], "shards": "s/{000..001}.tar"}[kind]
    require_data_extra(kind, path)  # installed: no complaint
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a module that cannot be imported
    with pytest.raises(UserError, match=rf"{module}: pip install 'llava-loop\[data\]'"):
        require_data_extra(kind, path)


def test_large_parquet_row_groups_warn_naming_the_fix(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}] * 1001
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "big.parquet"), batch_size=1001)
    with pytest.warns(UserWarning, match="big.parquet: row groups of up to 1001 rows.*batch_size=100"):
        open_records(tmp_path / "big.parquet")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "small.parquet"), batch_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_records(tmp_path / "small.parquet")) == 1001


@pytest.mark.parametrize("second", ["text_only", "images_column"])
def test_a_parquet_folder_whose_files_have_different_columns_keeps_every_image(second, tmp_path, shapes_data):
    """Each file is read with its own columns: a last file without an image column (or calling it `images`) must
    not drop the others' images."""
    records = json.loads(shapes_data["train"].read_text())
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_list(_rows(records, shapes_data["train_images"], "bytes")).to_parquet(
        str(tmp_path / "mixed" / "a.parquet")
    )
    text = [
        {"id": f"text-{i}", "conversations": [{"from": "human", "value": f"say {i}"}, {"from": "gpt", "value": "ok"}]}
        for i in range(40)
    ]
    if second == "images_column":
        data = (shapes_data["train_images"] / records[0]["image"]).read_bytes()
        text = [{**r, "images": [data]} for r in text]
        for r in text:
            r["conversations"] = [
                {**r["conversations"][0], "value": "<image>\n" + r["conversations"][0]["value"]},
                r["conversations"][1],
            ]
    datasets.Dataset.from_list(text).to_parquet(str(tmp_path / "mixed" / "b.parquet"))
    table = open_records(tmp_path / "mixed")
    assert len(table) == 136
    assert all(len(table[i].images) == 1 for i in range(96))
    assert table[0].images[0].data == (shapes_data["train_images"] / records[0]["image"]).read_bytes()
    assert all(len(table[i].images) == (1 if second == "images_column" else 0) for i in range(96, 136))
