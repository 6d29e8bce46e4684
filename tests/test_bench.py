"""The benchmark scripts keep working (they are not timed here; results live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import helpers

# Imported at startup by every interpreter that has this folder on its PYTHONPATH: it leaves one file per process.
MARKER = """import json, os, sys
with open(os.path.join(os.environ["PYTHONPATH_MARKERS"], f"{os.getpid()}.json"), "w") as f:
    json.dump(sys.argv, f)
"""


def table_rows(stdout: str) -> list[list[str]]:
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| shape | mode | checkpointing | samples/s | tokens/s")
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in table[1:]]


@pytest.mark.slow
@pytest.mark.floor
def test_gpu_benchmark_smoke_runs_the_real_launch_on_cpu_and_a_failed_launch_does_not_end_it(tmp_path):
    """The GPU script through the path it measures: accelerate launch + DeepSpeed ZeRO-2 + train.py, per shape and
    mode, with gradient checkpointing (tiny shapes, fp32, one CPU process), the anyres row a LLaVA-NeXT build over
    672x336 and 1008x336 images. A launch that fails (here train.py refuses an unknown mode) is recorded with its
    reason and stderr, the next launch still runs, and the table shows both. The launched ranks see the caller's
    PYTHONPATH (on the GPU machine it holds the carried wheels). lora is left out for CI time: its launch differs
    from projector's by the mode's name, and lora trains under DeepSpeed launches in test_memory and test_zero3."""
    site, markers = tmp_path / "site", tmp_path / "markers"
    site.mkdir(), markers.mkdir()
    (site / "sitecustomize.py").write_text(MARKER)
    env = helpers.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(site)])
    env["PYTHONPATH_MARKERS"] = str(markers)
    out = subprocess.run(
        [
            sys.executable,
            "bench/gpu.py",
            "--smoke",
            "--port",
            str(helpers.free_port()),
            "--shapes",
            "0.5b",
            "anyres",
            "--modes",
            "projector",
            "no-such-mode",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=helpers.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # 1: a launch failed, and the bench went on
    rows = table_rows(out.stdout)
    assert [row[:3] for row in rows] == [
        ["tiny", "projector", "on"],
        ["tiny", "no-such-mode", "on"],
        ["tiny-anyres", "projector", "on"],
        ["tiny-anyres", "no-such-mode", "on"],
    ]
    assert [row[-1].split(":")[0] for row in rows] == ["ok", "failed", "ok", "failed"]
    assert "mode" in rows[1][-1] and rows[1][3] == "—"
    assert "accelerate launch + DeepSpeed ZeRO-2" in out.stdout
    runs = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    base, tiled = runs[0], runs[2]
    assert base["status"] == tiled["status"] == "ok" and base["samples_per_s"] > 0 < tiled["samples_per_s"]
    # text + 576 image tokens, one view; tiled: 1,752 or 2,328 image tokens, the base view and 2 or 3 tiles
    assert 576 < base["tokens_per_sample"] < 700 and base["views_per_sample"] == 1
    assert 1752 < tiled["tokens_per_sample"] < 2328 + 124 and tiled["views_per_sample"] == 3.5
    assert tiled["flops"] > 2 * base["flops"]  # the loop counts the tiles the tower encoded
    failed = runs[1]
    assert failed["status"] == "failed" and "no-such-mode" in failed["stderr_tail"], failed
    assert (tmp_path / "out" / "table.md").read_text().count("| tiny") == 4
    launched = [argv for argv in (json.loads(p.read_text()) for p in markers.iterdir()) if argv[0].endswith("train.py")]
    assert len(launched) == 4, launched  # every launch's rank, the failed ones included


@pytest.mark.slow
def test_gpu_benchmark_starts_no_launch_past_its_time_budget():
    """Out of time before the first launch: every row is listed as skipped, nothing is launched, exit 0. The
    default shapes' smoke twins: the base-resolution and the tiled one."""
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--smoke", "--budget-minutes", "0"],
        cwd=helpers.ROOT,
        env=helpers.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = table_rows(out.stdout)
    assert [(row[0], row[1], row[-1].split(":")[0]) for row in rows] == [
        ("tiny", "projector", "skipped"),
        ("tiny", "lora", "skipped"),
        ("tiny-anyres", "projector", "skipped"),
        ("tiny-anyres", "lora", "skipped"),
    ]
    assert "time budget" in rows[0][-1] and "accelerate" not in out.stderr


def test_gpu_benchmark_plans_the_anyres_row_right_after_the_target_rows():
    """Under a time budget the rows run in plan order: the two targets, then the tiled row, then the rest."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", helpers.ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    rows = gpu.plan(["0.5b", "3b", "anyres"], ["projector", "lora"], ["off", "on"], ["plain", "liger"])
    assert rows[:4] == [
        ("0.5b", "projector", "off", "plain"),
        ("3b", "projector", "off", "plain"),
        ("anyres", "projector", "off", "plain"),
        ("0.5b", "projector", "off", "liger"),
    ]
    assert len(set(rows)) == len(rows) == 24
