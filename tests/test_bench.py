"""The benchmark scripts keep working (they are not timed here; results live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_the_real_launch_on_cpu():
    """The GPU script through the path it measures: accelerate launch + DeepSpeed ZeRO-2 + train.py, per mode, with
    gradient checkpointing (tiny shapes, fp32, one CPU process)."""
    out = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--port", str(helpers.free_port())],
                         cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| shape | mode | checkpointing | samples/s | tokens/s")
    rows = [[cell.strip() for cell in row.split("|")[1:4]] for row in table[1:]]
    assert rows == [["tiny", "projector", "on"], ["tiny", "lora", "on"]]
    assert "accelerate launch + DeepSpeed ZeRO-2" in out.stdout
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_sample"] > 576 for r in runs)
