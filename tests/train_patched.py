"""``python train.py`` with one deliberate fault, for negative controls and crash tests.

    python tests/train_patched.py no-rng-restore --config ...        resume without restoring RNG state
    python tests/train_patched.py no-data-position --config ...      resume restarting the epoch's data
    python tests/train_patched.py kill-in-save:STEP --config ...     SIGKILL itself while writing checkpoint STEP
"""

import os
import signal
import sys

from llava_loop import checkpoint, loop
from llava_loop.cli import main

fault, argv = sys.argv[1], sys.argv[2:]
if fault == "no-rng-restore":
    load = checkpoint.load

    def load_without_rng(trainer, path):
        before = checkpoint.rng_state()
        load(trainer, path)
        checkpoint.set_rng_state(before)  # undo every RNG restore, ours and Accelerate's

    checkpoint.load = load_without_rng
elif fault == "no-data-position":
    original = loop.Trainer.load_state_dict

    def forget_position(self, state):
        original(self, state)
        self.state.step_in_epoch = 0

    loop.Trainer.load_state_dict = forget_position
elif fault.startswith("kill-in-save:"):
    target = int(fault.split(":")[1])
    write_manifest = checkpoint.write_manifest

    def dying_manifest(root):
        if root.name == f".tmp-step-{target:06d}":
            os.kill(os.getpid(), signal.SIGKILL)  # model, optimizer and RNG files are written; no manifest, no marker
        write_manifest(root)

    checkpoint.write_manifest = dying_manifest
else:
    raise SystemExit(f"unknown fault {fault}")
sys.exit(main(["train", *argv]))
