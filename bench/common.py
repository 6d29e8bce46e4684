"""Shared benchmark plumbing: run a child process and read its own peak RSS, medians, markdown tables."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """The machine in words; the GPU's name from nvidia-smi, so that asking creates no CUDA context here."""
    cpus = os.cpu_count()
    try:
        import torch

        threads = torch.get_num_threads()
    except Exception:
        threads = "?"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        gpu = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "no GPU"
    except OSError:
        gpu = "no GPU"
    return f"{platform.machine()} {cpus} cores ({threads} torch threads), {gpu}, Python {platform.python_version()}"


def run_child(
    cmd: list[str], env: dict | None = None, cwd: Path = ROOT, *, check: bool = True, timeout: float | None = None
) -> dict:
    """Run ``cmd`` to completion; returns exit code, stdout/stderr text and the child's own peak RSS (MiB,
    its DataLoader workers included as the largest of them, as wait4 reports).

    ``check=False`` returns a failure instead of raising it. ``timeout`` (seconds) runs the child in a process group
    of its own and stops the whole group when time is up (``timed_out`` is then True), or when this process is
    interrupted: an ``accelerate launch`` leaves no rank behind holding GPU memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=timeout is not None,
        )
        timed_out = False
        if timeout is None:
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            deadline = time.monotonic() + timeout
            try:
                while True:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() > deadline:
                        timed_out = True
                        _, status, usage = _stop_group(proc.pid)
                        break
                    time.sleep(0.2)
            except BaseException:
                _stop_group(proc.pid)
                raise
            _kill_stragglers(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = {
            "returncode": proc.returncode,
            "stdout": out.read(),
            "stderr": err.read(),
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "timed_out": timed_out,
        }
    if check and result["returncode"] != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{result['stderr'][-4000:]}")
    return result


def _stop_group(pid: int):
    """SIGTERM a child's process group, SIGKILL it 10 s later; returns the child's wait4 result."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:  # already gone; wait4 below reaps it
        pass
    for _ in range(100):
        done = os.wait4(pid, os.WNOHANG)
        if done[0]:
            _kill_stragglers(pid)
            return done
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return os.wait4(pid, 0)


def _kill_stragglers(pgid: int) -> None:
    """Whatever is left in the group once its leader has exited (a rank the launcher did not reap)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def median(values) -> float:
    return statistics.median(values)


def loss_steps(model, loss, repeats: int) -> dict:
    """Forward + backward of ``loss()`` (the loss tensor of one forward of ``model``), ``repeats`` + 1 times, the
    first a warm-up: the median seconds of the others, the last loss, and this process's peak RSS (MiB) before the
    steps and after them."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        value = loss()
        value.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": median(times[1:]), "loss": float(value), "peak_rss_mib": peak, "before_mib": before}


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, command: str) -> str:
    return f"### {title}\n\n`{command}` — {machine()}, {date.today().isoformat()}\n"


def python() -> str:
    return sys.executable


def demo_run(out: Path, model: Path, data: Path, image_dir: Path, steps: int, extra: list[str]) -> tuple[Path, float]:
    """A run of the demo's recipe (configs/demo.yaml: tiny towers, ``full``) from ``model`` on ``data`` for ``steps``
    optimizer steps into ``out``, with ``extra`` overrides; returns its export (beside ``out``) and training seconds."""
    from llava_loop.checkpoint.files import complete_checkpoints
    from llava_loop.config import load_config
    from llava_loop.export import export
    from llava_loop.loop import train

    overrides = [
        f"output_dir={out}",
        "resume=overwrite",
        f"model.path={model}",
        "setup=[]",
        f"data.path={data}",
        f"data.image_dir={image_dir}",
        "data.eval_path=",
        "data.eval_image_dir=",
        f"train.max_steps={steps}",
        "train.time_limit_minutes=0",
        "eval.every=0",
        *extra,
    ]
    started = time.monotonic()
    train(load_config("configs/demo.yaml", overrides))
    seconds = time.monotonic() - started
    return export(complete_checkpoints(out)[-1], out.parent / f"{out.name}-export"), seconds
