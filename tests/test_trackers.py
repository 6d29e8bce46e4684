"""Trackers against the real packages (the ``trackers`` extra): what TensorBoard's event files and wandb's offline
run hold, read back with their own readers, equals ``metrics.jsonl``; only the main process writes; a resumed
run continues the same curves. Run with ``python -m pytest -m extras`` after ``pip install -e '.[test,trackers]'``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.extras

WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true"}
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s")


def wandb_records(path: Path) -> list:
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``): a 7-byte ``:W&B`` header, then
    32 KiB blocks of chunks, each ``<crc32 u32, length u16, type u8>`` + payload (full / first / middle / last).
    wandb 0.31 ships no Python reader for it (its reader moved into the Go core); the record schema is wandb's."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(path: Path) -> dict[tuple[str, int], float]:
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history[key, step] = json.loads(item.value_json)
    return history


def expected(output_dir: Path) -> dict[tuple[str, int], float]:
    rows = {}
    for m in helpers.metrics(output_dir, "train"):
        rows.update({(f"train/{k}", m["step"]): m[k] for k in TRAIN_KEYS})
    for m in helpers.metrics(output_dir, "eval"):
        rows[("eval/eval_loss", m["step"])] = m["eval_loss"]
    return rows


@pytest.mark.slow
def test_tensorboard_and_wandb_offline_hold_the_metrics_and_a_resumed_run_continues_them(tmp_path, run_config):
    out = tmp_path / "run"
    config = run_config(
        trackers=["tensorboard", "wandb"],
        train={"micro_batch_size": 2, "max_steps": 3},
        eval={"every": 2, "max_samples": 8},
        checkpoint={"every": 3, "keep_last": 1},
    )
    helpers.launch(config, processes=2, extra_env=WANDB_ENV)
    run_id = json.loads((out / "trackers.json").read_text())["run_id"]
    helpers.launch(config, "train.max_steps=5", processes=2, extra_env=WANDB_ENV)  # resumes at step 3

    want = expected(out)
    assert sorted({step for key, step in want if key == "train/loss"}) == [1, 2, 3, 4, 5]
    assert sorted({step for key, step in want if key == "eval/eval_loss"}) == [0, 2, 3, 4, 5]

    # TensorBoard: one event file per launch (the main process only), every step once, the values logged
    assert len(list((out / "llava_loop").glob("events.out.tfevents.*"))) == 2
    scalars = helpers.tensorboard_scalars(out / "llava_loop")
    for key, value in want.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key  # event files hold float32

    # wandb offline: one run folder per launch, both the same run (id), the second continuing the first's steps
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
    first, second = (wandb_history(r / f"run-{run_id}.wandb") for r in runs)
    assert {step for _, step in first} == {0, 1, 2, 3} and {step for _, step in second} == {4, 5}
    logged = {**first, **second}
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key

    # a run started afresh in the same folder is a new run: a new id, and only its own curve in TensorBoard
    helpers.launch(config, "resume=overwrite", "train.max_steps=1", "eval.every=0", processes=2, extra_env=WANDB_ENV)
    assert json.loads((out / "trackers.json").read_text())["run_id"] != run_id
    fresh = helpers.tensorboard_scalars(out / "llava_loop")
    assert sorted(step for key, step in fresh if key == "train/loss") == [1]
    assert fresh["train/loss", 1] == pytest.approx(helpers.metrics(out)[0]["loss"], rel=1e-6)
