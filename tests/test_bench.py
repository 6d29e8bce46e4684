"""The benchmark scripts keep working (they are not timed here; results live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import helpers


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu():
    out = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=helpers.ROOT, env=helpers.env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | samples/s | tokens/s")
    assert [row.split("|")[1].strip() for row in table[1:]] == ["projector", "lora"]
