"""Each process's random state (Python, NumPy, torch, CUDA), stored without pickled objects.

llava_loop writes its own ``rng_state_<rank>.pt`` beside Accelerate's ``random_states_<rank>.pkl`` because
Accelerate's ``load_state`` swallows a failed RNG restore (it logs "Could not load random states" at info level and
goes on): a resumed run would then silently draw other dropout masks and data orders. Ours loads with
``weights_only`` and fails loudly.
"""

from __future__ import annotations

import random

import numpy as np
import torch

RNG_FILE = "rng_state_{rank}.pt"  # ours, one per process
ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"  # Accelerate's save_state writes one per process too


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
