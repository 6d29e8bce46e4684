"""The benchmark scripts keep working (they are not timed here; results live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import helpers

# Imported at startup by every interpreter that has this folder on its PYTHONPATH: it leaves one file per process,
# and in a launched rank of a run whose config names $FAIL_RUN it fails, of $HANG_RUN it hangs once it has trained.
MARKER = """import atexit, json, os, sys, time
with open(os.path.join(os.environ["PYTHONPATH_MARKERS"], f"{os.getpid()}.json"), "w") as f:
    json.dump(sys.argv, f)
if sys.argv[0].endswith("train.py"):
    if os.environ.get("FAIL_RUN") and any(os.environ["FAIL_RUN"] in a for a in sys.argv):
        sys.exit("injected failure: " + os.environ["FAIL_RUN"])
    if os.environ.get("HANG_RUN") and any(os.environ["HANG_RUN"] in a for a in sys.argv):
        atexit.register(time.sleep, 600)
"""


def table_rows(stdout: str) -> list[list[str]]:
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | shape | mode | micro-batch (tokens) | kernels | samples/s | tokens/s")
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in table[1:]]


def gpu_bench(tmp_path, *args: str, timeout: int = 600, **env_vars) -> tuple[subprocess.CompletedProcess, Path]:
    """``bench/gpu.py ARGS`` with the marker folder on its PYTHONPATH; returns the run and the markers' folder."""
    site, markers = tmp_path / "site", tmp_path / "markers"
    site.mkdir(), markers.mkdir()
    (site / "sitecustomize.py").write_text(MARKER)
    env = helpers.env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(site)])
    env.update(PYTHONPATH_MARKERS=str(markers), **env_vars)
    cmd = [sys.executable, "bench/gpu.py", "--port", str(helpers.free_port()), *args]
    out = subprocess.run(cmd, cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return out, markers


def launched(markers) -> list[list[str]]:
    return [argv for argv in (json.loads(p.read_text()) for p in markers.iterdir()) if argv[0].endswith("train.py")]


def load_gpu_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", helpers.ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # its dataclasses look their module up
    spec.loader.exec_module(gpu)
    return gpu


@pytest.mark.slow
@pytest.mark.floor
def test_gpu_benchmark_smoke_runs_the_plan_through_the_real_launch_on_cpu(tmp_path):
    """The GPU script through the path it measures: accelerate launch + DeepSpeed ZeRO-2 + train.py, one launch per
    row (tiny twins, fp32, one CPU process): stage 1, the stage-2 row (padding-free, a token budget), the anyres row
    (a LLaVA-NeXT build over 672x336 and 1008x336 images). Planned as for an H100, the 3B row at micro-batch 32 is
    refused by the memory model without a launch. A launch that fails (here a rank made to exit) is recorded with
    its reason and stderr, and the next one still runs. The launched ranks see the caller's PYTHONPATH (on the GPU
    machine it holds the carried wheels) and the hub offline."""
    rows = ["0.5b", "stage2", "anyres", "3b-mb32", "0.5b-liger"]
    out, markers = gpu_bench(
        tmp_path, "--smoke", "--card", "h100", "--rows", *rows, "--out", str(tmp_path / "out"), FAIL_RUN="run-stage2"
    )
    assert out.returncode == 1, out.stderr[-3000:]  # 1: a launch failed, and the bench went on
    table = table_rows(out.stdout)
    assert [row[0] for row in table] == ["0.5b", "0.5b-liger", "stage2", "anyres", "3b-mb32"]  # the plan's order
    assert [row[-1].split(":")[0] for row in table] == ["ok", "skipped", "failed", "ok", "refused"]
    assert "injected failure: run-stage2" in table[2][-1] and table[2][5] == "—"
    assert "predicted 8" in table[4][-1] and "GiB usable of the 79.6 GiB NVIDIA H100" in table[4][-1]
    assert "accelerate launch + DeepSpeed ZeRO-2" in out.stdout
    runs = {r["row"]: r for r in map(json.loads, (tmp_path / "out" / "rows.jsonl").read_text().splitlines())}
    base, tiled = runs["0.5b"], runs["anyres"]
    assert base["status"] == tiled["status"] == "ok" and base["samples_per_s"] > 0 < tiled["samples_per_s"]
    # text + 576 image tokens; tiled: 1,752 or 2,328 image tokens, the base view and 2 or 3 tiles
    assert 576 < base["tokens_per_sample"] < 700 and 1752 < tiled["tokens_per_sample"] < 2328 + 124
    assert tiled["flops"] > 2 * base["flops"]  # the loop counts the tiles the tower encoded
    assert runs["stage2"]["status"] == "failed" and "run-stage2" in runs["stage2"]["stderr_tail"]
    assert runs["3b-mb32"]["predicted_gib"] > 79.6 * 0.95 > runs["0.5b"]["predicted_gib"]
    assert table_rows((tmp_path / "out" / "table.md").read_text()) == table
    assert "fp32 (smoke) on 1 x CPU (planned as for a NVIDIA H100 80GB HBM3)" in out.stdout
    assert "| 3b-mb32 | 3b | projector | 32 | plain | 87" in (tmp_path / "out" / "plan.md").read_text()
    ranks = launched(markers)
    assert len(ranks) == 3, ranks  # every launch's rank, the failed one included; none for the refused row
    configs = [yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) for argv in ranks]
    stage2 = next(c for c in configs if c["mode"] == "freeze_vision")
    assert stage2["data"]["padding_free"] and stage2["data"]["max_tokens_per_micro_batch"] == 2048
    builders = [p for p in markers.iterdir() if "--build" in json.loads(p.read_text())]
    assert len(builders) == 2  # a child process per shape built (tiny, tiny-anyres): this process never held a GPU


@pytest.mark.slow
def test_gpu_benchmark_keeps_what_a_launch_measured_when_the_budget_stops_it(tmp_path):
    """A launch that outlives the budget (here its rank hangs after training) is stopped at the deadline, and the
    steps it logged are reported as a partial row; the launch's processes are gone."""
    out, markers = gpu_bench(
        tmp_path,
        "--smoke",
        "--rows",
        "0.5b",
        "--budget-minutes",
        "1.2",
        "--out",
        str(tmp_path / "out"),
        HANG_RUN="run-0.5b",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = table_rows(out.stdout)
    assert row[-1].startswith("partial: stopped at the time budget after 1 steady steps"), row
    assert float(row[5]) > 0  # samples/s, from the steps it logged
    [rank] = launched(markers)
    pid = int(next(p.stem for p in markers.iterdir() if json.loads(p.read_text()) == rank))
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.slow
def test_gpu_benchmark_starts_no_launch_past_its_time_budget(tmp_path):
    """Out of time before the first launch: every row of the plan is listed as skipped, nothing is built or
    launched, exit 0."""
    out, markers = gpu_bench(tmp_path, "--smoke", "--budget-minutes", "0", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    table = table_rows(out.stdout)
    gpu = load_gpu_bench()
    assert [row[0] for row in table] == [row.name for row in gpu.PLAN]
    assert {row[-1].split(":")[0] for row in table} == {"skipped"}
    assert "time budget" in table[0][-1] and "accelerate" not in out.stderr
    assert not [p for p in markers.iterdir() if "--build" in json.loads(p.read_text())] and not launched(markers)


def test_the_gpu_plan_runs_the_target_rows_first_and_fits_its_rows_to_the_card():
    """The plan's order is the issue's: 0.5B plain, its Liger and compiled twins, the 3B target, stage 2, AnyRes,
    video, then what only an H200 holds. The memory model (llava-loop memory's) refuses the 3B row at micro-batch 32
    on an H100, not on an H200, and fits every other row on both."""
    gpu = load_gpu_bench()
    assert [row.name for row in gpu.PLAN] == [
        "0.5b",
        "0.5b-liger",
        "0.5b-compile",
        "3b",
        "stage2",
        "anyres",
        "video",
        "3b-mb32",
    ]
    assert gpu.ROWS["0.5b"].target and gpu.ROWS["3b"].target
    for row in gpu.PLAN:
        assert gpu.refusal(row, gpu.CARDS["h200"]) is None, row
        assert (gpu.refusal(row, gpu.CARDS["h100"]) is None) == (row.name != "3b-mb32"), row

    # the same answer from the command line, for the 3B rows
    def smallest_fit(micro_batch: str) -> subprocess.CompletedProcess:
        argv = ["memory", "--llm", "3B", "--mode", "projector", "--gpus", "1", "--gpu-gib", "79.6"]
        argv += ["--micro-batch", micro_batch, "--seq-len", "700", "--checkpointing", "off"]
        return helpers.cli(*argv)

    assert smallest_fit("16").returncode == 0 and smallest_fit("32").returncode == 1


def test_the_gpu_dry_run_prints_the_plan_with_memory_and_minutes_per_card():
    out = subprocess.run(
        ["bash", "bench/device.sh", "--dry-run"], cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| row | shape | mode | micro-batch (tokens) | kernels | predicted GiB | H100 min |")
    assert "H200 cumulative" in lines[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]}
    assert list(rows) == ["0.5b", "0.5b-liger", "0.5b-compile", "3b", "stage2", "anyres", "video", "3b-mb32"]
    assert rows["3b-mb32"][6] == "refused" and float(rows["3b-mb32"][8]) > 0  # H100 refuses it, H200 runs it
    assert all(float(cells[6]) > 0 for name, cells in rows.items() if name != "3b-mb32")
