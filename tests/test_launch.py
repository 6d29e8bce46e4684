"""How a launched process ends (llava_loop/launch.py): without the interpreter teardown that aborts a finished
rank while gloo still releases a collective's tensors."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

import helpers


def two_ranks(how: str, folder) -> subprocess.CompletedProcess:
    """tests/late_collective.py as ranks 0 and 1; rank 1's outcome."""
    env = helpers.env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(helpers.free_port()), "WORLD_SIZE": "2"}
    script = [sys.executable, str(helpers.TESTS / "late_collective.py"), how, str(folder)]
    rank0 = subprocess.Popen(script, env=env | {"RANK": "0", "LOCAL_RANK": "0"}, stderr=subprocess.PIPE, text=True)
    rank1 = subprocess.run(
        script, env=env | {"RANK": "1", "LOCAL_RANK": "1"}, capture_output=True, text=True, timeout=120
    )
    _, errors = rank0.communicate(timeout=60)
    assert rank0.returncode == 0, errors
    return rank1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc's system() through ctypes, as on Linux CI")
def test_a_rank_whose_collective_ends_during_exit_leaves_cleanly(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "fixed").mkdir()
    # the control: Python's own exit aborts the process once the worker waits for the GIL as teardown begins
    control = two_ranks("sys.exit", tmp_path / "control")
    assert control.returncode == -signal.SIGABRT, (control.returncode, control.stderr[-2000:])
    assert "terminate called without an active exception" in control.stderr

    fixed = two_ranks("exit_process", tmp_path / "fixed")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert (tmp_path / "fixed" / "leaving").exists()  # its exit hooks ran
    assert fixed.stdout == "rank 1 done"  # and its output was flushed


TEARDOWN = """
from llava_loop.launch import exit_process
class Teardown:
    def __del__(self, say=print):
        say("teardown")
kept = Teardown()  # released by the interpreter's teardown, which a launched process skips
exit_process(3)
"""


@pytest.mark.parametrize("launched", [False, True])
def test_only_a_launched_process_skips_the_interpreter_teardown(launched):
    env = {k: v for k, v in helpers.env().items() if k != "LOCAL_RANK"} | ({"LOCAL_RANK": "0"} if launched else {})
    out = subprocess.run([sys.executable, "-c", TEARDOWN], env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (3, "" if launched else "teardown\n")
