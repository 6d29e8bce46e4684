"""Webdataset shards: the writer, the stream's layout (per rank and worker, equal steps), and exact resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from llava_loop.data.check import check_dataset
from llava_loop.data.collate import Collator
from llava_loop.data.dataset import DataError
from llava_loop.data.shards import count_samples, expand, iter_shard, parse_size, read_index, shard_counts, write_shards
from llava_loop.data.stream import StreamDataset, StreamLayout, StreamPosition, stream_loader
from llava_loop.errors import UserError
from llava_loop.loaders import make_encoder

import helpers
from helpers import K, N, bitwise_equal, final_state, steps_by_number, trajectory

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shapes_data):
    """The 96 shapes training records as uneven shards of at most 30 KB (the last one short), with a seek point
    every 4 samples."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    report = write_shards(
        shapes_data["train"], shapes_data["train_images"], out, shard_size=parse_size("30KB"), seek_every=4
    )
    assert report["samples"] == 96 and report["skipped"] == {}
    return out


def test_shard_sizes_parse_and_bad_ones_name_the_fix():
    assert parse_size("200KB") == 200_000 and parse_size("1GB") == 10**9 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("4096") == 4096
    for bad in ("1XB", "GB", "-1GB", "0"):
        with pytest.raises(UserError, match="200KB"):
            parse_size(bad)


def test_convert_shards_writes_sized_numbered_shards_with_an_index(tmp_path, shapes_data):
    import webdataset as wds

    out = tmp_path / "shards"
    cli = helpers.cli(
        "data",
        "convert",
        "shards",
        "--input",
        str(shapes_data["train"]),
        "--image-dir",
        str(shapes_data["train_images"]),
        "--out",
        str(out),
        "--shard-size",
        "30KB",
    )
    assert cli.returncode == 0, cli.stderr
    files = sorted(out.glob("*.tar"))
    assert [f.name for f in files[:2]] == ["000000.tar", "000001.tar"] and len(files) > 3
    index = json.loads((out / "shards.json").read_text())
    assert [s["name"] for s in index["shards"]] == [f.name for f in files]
    assert all(s["bytes"] == (out / s["name"]).stat().st_size <= 30_000 for s in index["shards"])  # never over
    assert [s["samples"] for s in index["shards"]] == [count_samples(f) for f in files]  # header count agrees
    # webdataset itself reads them back: every record once, its json and its image bytes
    records = {r["id"]: r for r in json.loads(shapes_data["train"].read_text())}
    seen = [s for s in wds.WebDataset([str(f) for f in files], shardshuffle=False)]
    assert len(seen) == 96
    for sample in seen:
        meta = json.loads(sample["json"])
        assert sample["0.jpg"] == (shapes_data["train_images"] / records[meta["id"]]["image"]).read_bytes()
    # a missing image is left out, counted, and the exit status says so
    broken = json.loads(shapes_data["train"].read_text())[:4]
    broken[1]["image"] = "nope.jpg"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    cli = helpers.cli(
        "data",
        "convert",
        "shards",
        "--input",
        str(tmp_path / "broken.json"),
        "--image-dir",
        str(shapes_data["train_images"]),
        "--out",
        str(tmp_path / "b"),
    )
    assert cli.returncode == 1 and "missing_image" in cli.stdout
    assert shard_counts(expand(tmp_path / "b")) == [3]


def _layout(shards, processes=1, workers=0, micro_batch=2, grad_accum=2, block=8, counts=None, seed=3):
    files = expand(shards)
    found, seeks = read_index(files)
    return StreamLayout(
        files,
        counts or found,
        seed=seed,
        processes=processes,
        workers=workers,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        block=block,
        seeks=seeks,
    )


def test_a_shard_read_from_a_seek_point_equals_one_read_from_the_top(shards):
    files = expand(shards)
    counts, seeks = read_index(files)
    assert seeks[0][0] == 4 and len(seeks[0][1]) == -(-counts[0] // 4)
    keys = [s["__key__"] for s in iter_shard(files[0])]
    assert len(keys) == counts[0]
    last = counts[0] - 1
    assert last >= 4  # the last sample is past a seek point
    for skip in (0, 3, 4, last):
        assert [s["__key__"] for s in iter_shard(files[0], skip, seeks[0])] == keys[skip:]
    # negative controls: seek points that all say 0 jump back to the top; ones off by a header are named
    assert [s["__key__"] for s in iter_shard(files[0], last, (4, [0] * len(seeks[0][1])))] == keys[last % 4 :]
    with pytest.raises(DataError, match=f"{files[0].name} cannot be read from byte .*delete shards.json"):
        list(iter_shard(files[0], last, (4, [o + 512 for o in seeks[0][1]])))


def _ids(loader, n=None):
    out = []
    for batch in loader:
        out.append(tuple(batch["ids"]))
        if n is not None and len(out) == n:
            break
    return out


def _stream(layout, processor, rank=0):
    from llava_loop.config import Config

    return StreamDataset(layout, make_encoder(Config(), processor), rank=rank, source="shards")


def _loader(dataset, workers):
    kwargs = {"num_workers": workers}
    return stream_loader(dataset, Collator(0), kwargs, dataset.layout.micro_batch)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_reads_its_own_slice_and_runs_the_same_steps(workers, shards, tiny_processor):
    layout = [_layout(shards, processes=2, workers=workers, micro_batch=2, grad_accum=3) for _ in range(2)]
    assert layout[0].micro_batches == layout[1].micro_batches  # uneven shards, same steps on every rank
    per_rank = []
    for rank in (0, 1):
        dataset = _stream(layout[rank], tiny_processor, rank)
        dataset.start(epoch=0, micro_batches=0)
        per_rank.append(_ids(_loader(dataset, workers), layout[rank].micro_batches))
    flat = [[i for batch in rank for i in batch] for rank in per_rank]
    assert len(flat[0]) == len(flat[1]) == layout[0].micro_batches * 2
    assert not set(flat[0]) & set(flat[1]) and len(set(flat[0])) == len(flat[0])  # disjoint, no repeats
    dataset = _stream(layout[0], tiny_processor)
    dataset.start(epoch=1, micro_batches=0)
    assert _ids(_loader(dataset, workers), layout[0].micro_batches) != per_rank[0]  # the order changes by epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_started_mid_epoch_continues_exactly_where_it_was(workers, shards, tiny_processor):
    """Every position, including ones inside a shuffle block and inside a shard, resumes to the same batches."""
    layout = _layout(shards, workers=workers, block=5)
    dataset = _stream(layout, tiny_processor)
    dataset.start(epoch=2, micro_batches=0)
    full = _ids(_loader(dataset, workers), layout.micro_batches)
    assert len(full) == layout.micro_batches
    for k in (1, 3, 4, 7, len(full) - 1):
        dataset.start(epoch=2, micro_batches=k)
        assert _ids(_loader(dataset, workers), len(full) - k) == full[k:], k
    positions = StreamPosition(layout, type("P", (), {"epoch": 2, "step_in_epoch": 2})(), grad_accum=2).positions()
    assert [p["samples"] for p in positions] == ([8] if workers == 0 else [4, 4])
    assert all(p["block_start"] == p["samples"] // 5 * 5 and p["shard"].endswith(".tar") for p in positions)


def test_a_truncated_shard_and_a_bad_sample_are_named_and_counted(tmp_path, shards, tiny_processor):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    first = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(first) as tar:  # rewrite shard 0 with one image corrupt
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name.endswith(".0.jpg") and member.name.startswith(members[0][0].name.split(".")[0]):
                data = b"not a jpeg"
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    layout = _layout(copy, block=200)  # one block: the whole slice
    dataset = _stream(layout, tiny_processor)
    batches = list(_loader(dataset, 0))
    events = [e for b in batches for e in b["skipped"]]
    assert len(events) == 1 and events[0][1] == "corrupt_image" and first.name in events[0][0]
    assert all(len(b["ids"]) == 2 for b in batches)  # replaced from the block: batches stay full
    report = check_dataset(copy, "", decode=True, progress=False)  # `llava-loop data check` reads shards too
    assert report["problems"] == {"corrupt_image": 1} and report["records"] == report["images"] == 96
    counts = shard_counts(expand(copy))
    counts[0] += 3  # an index that promises more than the shard holds
    dataset = _stream(_layout(copy, counts=counts, block=200), tiny_processor)
    with pytest.raises(DataError, match="shards.json is stale"):
        list(_loader(dataset, 0))


def _stream_run(shards, workers) -> dict:
    """``run_config``'s sections for a resumable run on ``shards`` (``helpers.RESUMED_TRAIN``), streamed by
    ``workers`` workers through a shuffle buffer of 6."""
    return {
        "hooks": ["plugins:FinalState", "plugins:StopAtStep"],
        "train": helpers.RESUMED_TRAIN,
        "data": {"path": str(shards), "image_dir": "", "num_workers": workers, "shuffle_buffer": 6},
    }


@pytest.mark.slow
def test_an_interrupted_and_resumed_stream_run_is_bitwise_identical(
    tmp_path, run_config, tiny_dropout_model_dir, shards
):
    """Two workers, each with its own position (one worker's positions: the in-process tests above)."""
    workers = 2

    never, stop = {"LLAVA_TEST_STOP_AT": "-1"}, {"LLAVA_TEST_STOP_AT": str(K)}
    helpers.launch(run_config("A", model=tiny_dropout_model_dir, **_stream_run(shards, workers)), extra_env=never)
    b = run_config("B", model=tiny_dropout_model_dir, **_stream_run(shards, workers))
    helpers.launch(b, extra_env=stop)
    saved = json.loads((tmp_path / "B" / "checkpoints" / f"step-{K:06d}" / "trainer_state.json").read_text())["stream"]
    assert [(p["worker"], p["samples"]) for p in saved["positions"]] == [(0, K * 2), (1, K * 2)]  # K steps x 2 x 2
    assert all(p["shard"].endswith(".tar") for p in saved["positions"])
    shutil.copytree(tmp_path / "B", tmp_path / "C")  # the negative control's first K steps
    helpers.launch(b, extra_env=never)  # resumes mid-epoch, mid-block (6 samples a block)

    steps_a, steps_b = steps_by_number(tmp_path / "A"), steps_by_number(tmp_path / "B")
    assert trajectory(steps_a, 1, N) == trajectory(steps_b, 1, N)
    assert bitwise_equal(final_state(tmp_path / "A"), final_state(tmp_path / "B"))
    # negative control: a resume that loses the data position replays the epoch's start
    control = run_config("C", model=tiny_dropout_model_dir, **_stream_run(shards, workers))
    helpers.launch(control, extra_env=never, fault="no-data-position")
    steps_c = steps_by_number(tmp_path / "C")
    assert trajectory(steps_a, K + 1, N) != trajectory(steps_c, K + 1, N)
    assert [steps_c[s]["sample_ids"] for s in range(K + 1, N + 1)] == [
        steps_a[s]["sample_ids"] for s in range(1, N - K + 1)
    ]
    assert not bitwise_equal(final_state(tmp_path / "A"), final_state(tmp_path / "C"))
    # the stream's layout is part of its position: other workers are refused, naming the setting
    out = helpers.launch(b, "train.max_steps=8", "data.num_workers=1", check=False)
    assert out.returncode == 2 and "workers" in out.stderr and "data.num_workers" in out.stderr


def test_streams_refuse_what_needs_every_length_or_a_holdout(run_config, shards, tiny_processor):
    from llava_loop.config import load_config
    from llava_loop.data.records import RecordError
    from llava_loop.loaders import make_datasets, split_records

    path = run_config("R", **_stream_run(shards, 0))
    with pytest.raises(RecordError, match="eval.holdout cannot split the shard stream .* data.eval_path"):
        split_records(load_config(path, ["eval.holdout=4", "data.eval_path="]))
    with pytest.raises(UserError, match="max_tokens_per_micro_batch .* turn them off for shards"):
        make_datasets(load_config(path, ["data.max_tokens_per_micro_batch=512"]), tiny_processor)


@pytest.mark.slow
def test_two_processes_stream_disjoint_slices_in_lockstep(tmp_path, run_config, shards, tiny_processor):
    """2 processes x 2 workers under accelerate launch + DeepSpeed: one epoch of uneven shards, the same steps on
    both ranks, each rank's micro-batches exactly its own slice of the stream."""
    path = run_config("P", **_stream_run(shards, 2))
    helpers.launch(
        path,
        "train.micro_batch_size=5",
        "train.grad_accum=1",
        "train.max_steps=0",
        "train.epochs=1",
        processes=2,
        extra_env={"LLAVA_TEST_STOP_AT": "-1"},
    )
    steps = helpers.metrics(tmp_path / "P")
    layout = _layout(shards, processes=2, workers=2, micro_batch=5, grad_accum=1, block=6, seed=1)  # the run's
    assert len(steps) == layout.micro_batches == 8  # 96 samples: 4 micro-batches of 5 per consumer, 16 dropped
    expected = []
    for rank in (0, 1):
        dataset = _stream(layout, tiny_processor, rank)
        expected.append(_ids(_loader(dataset, 2), layout.micro_batches))
    assert [m["sample_ids"] for m in steps] == [list(a + b) for a, b in zip(*expected)]
    ids = [i for m in steps for i in m["sample_ids"]]
    assert len(ids) == len(set(ids)) == 80


def _truncate_mid_member(shard, member_index=3) -> int:
    """Cut ``shard`` in the middle of one member's data; returns that member's header offset."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[member_index]
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    return member.offset


def _cli(*argv) -> tuple[int, str]:
    import contextlib

    from llava_loop.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()


def test_a_truncated_shard_without_an_index_is_named_with_its_byte_offset(
    tmp_path, run_config, shards, fresh_accelerate_state
):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    (copy / "shards.json").unlink()
    shard = sorted(copy.glob("*.tar"))[1]
    offset = _truncate_mid_member(shard)
    code, err = _cli("data", "check", "--data", str(copy))
    assert code == 2 and f"{shard}: truncated or corrupt at byte {offset}" in err and "Traceback" not in err, err
    code, err = _cli("train", "--config", str(run_config("T", **_stream_run(copy, 0))))
    assert code == 2 and f"{shard}: truncated or corrupt at byte {offset}" in err, err


def test_a_damaged_shard_is_named_at_startup_and_a_run_can_go_on_without_it(
    tmp_path, run_config, shards, monkeypatch, fresh_accelerate_state
):
    """shards.json's sizes are checked before the model loads: every damaged shard is named with both sizes and the
    way out; data.skip_damaged_shards=true trains without it, fresh or resumed (the change printed)."""
    from llava_loop import loop

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    path = run_config(
        train={"micro_batch_size": 2, "max_steps": 2, "log_sample_ids": True},
        checkpoint={"every": 2, "keep_last": 0},
        data={"path": str(copy), "image_dir": "", "shuffle_buffer": 6},
    )
    helpers.train_here(path)  # two steps on whole shards, checkpointed

    damaged = sorted(copy.glob("*.tar"))[1]
    lost_ids = {json.loads(s["json"])["id"] for s in iter_shard(damaged)}
    expected = damaged.stat().st_size
    _truncate_mid_member(damaged)
    actual = damaged.stat().st_size
    with monkeypatch.context() as m:
        m.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model loaded before the shards were checked"))
        code, err = _cli("train", "--config", str(path), "train.max_steps=4")
    assert code == 2 and f"{damaged} is {actual:,} bytes, shards.json says {expected:,}" in err, err
    assert "data.skip_damaged_shards=true" in err
    helpers.reset_accelerate_state()

    code, err = _cli("train", "--config", str(path), "train.max_steps=4", "data.skip_damaged_shards=true")
    assert code == 0, err
    assert f"resuming without the damaged shards {damaged.name} ({len(lost_ids)} samples)" in err, err
    steps = {m["step"]: m for m in helpers.metrics(tmp_path / "run")}
    assert sorted(steps) == [1, 2, 3, 4]
    assert not lost_ids & {i for s in (3, 4) for i in steps[s]["sample_ids"]}
    helpers.reset_accelerate_state()

    code, err = _cli(
        "train", "--config", str(path), "output_dir=" + str(tmp_path / "fresh"), "data.skip_damaged_shards=true"
    )
    assert code == 0 and f"training without 1 damaged shards ({len(lost_ids)} samples left out)" in err, err


def test_convert_shards_never_embeds_a_symlink_that_leaves_the_image_folder(tmp_path, shapes_data):
    records = json.loads(shapes_data["train"].read_text())[:4]
    images = tmp_path / "real-images"
    shutil.copytree(shapes_data["train_images"], images)
    (tmp_path / "secret.jpg").write_bytes((images / records[1]["image"]).read_bytes())
    (images / records[1]["image"]).unlink()
    (images / records[1]["image"]).symlink_to(tmp_path / "secret.jpg")  # points out of the folder
    (images / "inside.jpg").write_bytes((images / records[2]["image"]).read_bytes())
    (images / records[2]["image"]).unlink()
    (images / records[2]["image"]).symlink_to(images / "inside.jpg")  # stays inside: fine
    (tmp_path / "linked").symlink_to(images)  # an image folder that is itself a link: fine
    (tmp_path / "chat.json").write_text(json.dumps(records))
    report = write_shards(tmp_path / "chat.json", tmp_path / "linked", tmp_path / "out", shard_size=parse_size("1MB"))
    assert report["samples"] == 3 and report["skipped"] == {"unsafe_path": 1}
    assert "is a symbolic link to" in report["examples"]["unsafe_path"]
    embedded = [json.loads(s["json"])["id"] for s in iter_shard(tmp_path / "out" / "000000.tar")]
    assert records[1]["id"] not in embedded and records[2]["id"] in embedded
