"""How this process was started and how it ends: one of a launched group (``accelerate launch`` / torchrun) or a
plain ``python train.py``."""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def launched() -> bool:
    """True under ``accelerate launch`` / torchrun (which set LOCAL_RANK), False for ``python train.py``."""
    return "LOCAL_RANK" in os.environ


def exit_process(code: int) -> NoReturn:
    """End ``train.py`` or the ``llava-loop`` command with ``code``.

    A launched process runs its exit hooks, flushes its output and leaves without the interpreter's teardown, as
    multiprocessing ends its children. Gloo's worker threads can still be releasing a collective's tensors when the
    main thread finishes. A worker that waits for the GIL as teardown begins is then ended by Python mid-way
    through a C++ destructor, and the process aborts (SIGABRT, "terminate called without an active exception")
    after its run succeeded (pytorch/pytorch#190489). DeepSpeed's ZeRO-3 keeps the model, and with it the process
    groups, for the life of the process, so they cannot be torn down first. A plain ``python train.py`` has no
    process group and exits as usual.
    """
    if not launched():
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
