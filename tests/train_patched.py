"""``python train.py`` with one deliberate fault, injected as a Checkpointer subclass, for negative controls and
crash tests.

    python tests/train_patched.py no-rng-restore --config ...        resume without restoring RNG state
    python tests/train_patched.py no-data-position --config ...      resume restarting the epoch's data
    python tests/train_patched.py kill-in-save:STEP --config ...     SIGKILL itself while writing checkpoint STEP
    python tests/train_patched.py disk-full:STEP --config ...        the disk fills up while writing checkpoint STEP
    python tests/train_patched.py metrics-disk-full:STEP[:save] --config ...
                                    the disk fills up while writing step STEP's metrics row (and, with :save, the
                                    checkpoint the run then saves)
    python tests/train_patched.py deepspeed-frozen-filter --config ...
                                    DeepSpeed's own exclude_frozen_parameters (which keeps frozen tied aliases)
"""

import argparse
import contextlib
import errno
import os
import signal
import sys

from llava_loop import backends, hooks
from llava_loop.checkpoint.checkpointer import Checkpointer
from llava_loop.checkpoint.rng import rng_state, set_rng_state
from llava_loop.config import load_config
from llava_loop.errors import UserError
from llava_loop.launch import exit_process
from llava_loop.loop import train


class NoRngRestore(Checkpointer):
    def load(self, path, state):
        before = rng_state()
        super().load(path, state)
        set_rng_state(before)  # undo every RNG restore, ours and Accelerate's


class NoDataPosition(Checkpointer):
    def load(self, path, state):
        super().load(path, state)
        self.states["progress"].step_in_epoch = 0


def kill_in_save(target: int):
    class KillInSave(Checkpointer):
        def seal(self, tmp, final, files):
            if final.name == f"step-{target:06d}":
                os.kill(
                    os.getpid(), signal.SIGKILL
                )  # model, optimizer and RNG files are written; no manifest, no marker
            super().seal(tmp, final, files)

    return KillInSave


def disk_full(target: int):
    class DiskFull(Checkpointer):
        def write(self, tmp):
            if tmp.name == f".tmp-step-{target:06d}":
                (tmp / "optimizer.bin").write_bytes(b"partial")  # what a full disk leaves: part of a file
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write(tmp)

    return DiskFull


fault = sys.argv[1]
if fault == "no-rng-restore":
    checkpointer_cls = NoRngRestore
elif fault == "no-data-position":
    checkpointer_cls = NoDataPosition
elif fault.startswith("kill-in-save:"):
    checkpointer_cls = kill_in_save(int(fault.split(":")[1]))
elif fault.startswith("disk-full:"):
    checkpointer_cls = disk_full(int(fault.split(":")[1]))
elif fault.startswith("metrics-disk-full:"):
    step, *save_too = fault.split(":")[1:]
    write_all = hooks.write_all

    def half_then_full(fd, data):
        if b'"kind": "train"' in data and f'"step": {step},'.encode() in data:
            write_all(fd, data[: len(data) // 2])  # what a filling disk leaves: half a line
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    hooks.write_all = half_then_full
    checkpointer_cls = disk_full(int(step)) if save_too else Checkpointer
elif fault == "deepspeed-frozen-filter":
    checkpointer_cls = Checkpointer
    backends.without_frozen_aliases = lambda engine: contextlib.nullcontext()
else:
    raise SystemExit(f"unknown fault {fault}")
parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args(sys.argv[2:])
try:
    train(load_config(args.config, args.overrides), checkpointer_cls=checkpointer_cls)
except UserError as exc:  # as the CLI reports it
    print(f"error: {exc}", file=sys.stderr)
    exit_process(2)
exit_process(0)  # as train.py ends
