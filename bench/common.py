"""Shared benchmark plumbing: run a child process and read its own peak RSS, medians, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpus = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
    except Exception:
        gpu, threads = "?", "?"
    return f"{platform.machine()} {cpus} cores ({threads} torch threads), {gpu}, Python {platform.python_version()}"


def run_child(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` to completion; returns exit code, stdout/stderr text and the child's own peak RSS (MiB,
    its DataLoader workers included as the largest of them, as wait4 reports)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = {"returncode": proc.returncode, "stdout": out.read(), "stderr": err.read(),
                  "peak_rss_mib": usage.ru_maxrss / 1024}
    if result["returncode"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{result['stderr'][-4000:]}")
    return result


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def median(values) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, command: str) -> str:
    return f"### {title}\n\n`{command}` — {machine()}, {date.today().isoformat()}\n"


def python() -> str:
    return sys.executable
