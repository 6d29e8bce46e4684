"""One of two gloo ranks whose collective finishes while rank 1 is leaving, for tests/test_launch.py.

    python tests/late_collective.py sys.exit|exit_process FOLDER     (RANK, WORLD_SIZE, MASTER_ADDR/PORT set)

Rank 1 starts an all-reduce and drops its own references, so the gloo worker holds the tensor's last one; then it
ends the chosen way. Its exit hooks write FOLDER/leaving, then hold the GIL (a C call, which releases nothing) until
rank 0 has joined the all-reduce and a second more: the worker then waits for the GIL to release the tensor, as a
worker does when the main thread wins the race to the end of a real run. Rank 0 waits for FOLDER/leaving, joins,
and writes FOLDER/joined.
"""

import atexit
import ctypes
import datetime
import os
import sys
import time
from pathlib import Path

how, folder = sys.argv[1], Path(sys.argv[2])
leaving, joined = folder / "leaving", folder / "joined"
# Exit hooks run last-registered first: the GIL is held after `leaving` is written
wait_for_rank0 = f"timeout 60 sh -c 'until [ -f {joined} ]; do sleep 0.01; done'; sleep 1"  # bounded: rank 0 may fail
atexit.register(ctypes.PyDLL(None).system, wait_for_rank0.encode())
atexit.register(leaving.touch)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llava_loop.launch import exit_process  # noqa: E402

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
if dist.get_rank() == 0:
    while not leaving.exists():
        time.sleep(0.01)
    dist.all_reduce(torch.ones(4))
    joined.touch()
    os._exit(0)

tensor = torch.ones(4)
tensor.note = "Python state, as DeepSpeed gives its tensors: torch keeps the Python object while C++ holds the tensor"
work = dist.all_reduce(tensor, async_op=True)
del work, tensor
print("rank 1 done", end="")  # unflushed: exit_process must flush it
if how == "sys.exit":
    sys.exit(0)
exit_process(0)
