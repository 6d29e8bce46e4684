"""Checkpoints that survive faults.

Layout: ``output_dir/checkpoints/step-000100/`` holding Accelerate's ``save_state`` (DeepSpeed engine
files under ZeRO, else model/optimizer), ``trainer_state.json``, ``rng_state_<rank>.pt`` for every
process, the resolved ``config.yaml``, a ``MANIFEST.json`` (size + sha256 of every file) and, last, a
``COMPLETE`` marker.

Saves are atomic: everything is written to ``.tmp-step-000100/``, the manifest and marker go in last,
and only then is the folder renamed into place. Old checkpoints are pruned only after the new one is
complete (the reverse of Accelerate's ``total_limit``, which deletes first). Frozen weights are never
saved: projector and LoRA checkpoints hold only what trains.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
# Settings a resumed run must share with the run that wrote the checkpoint.
# Non-tensor classes that Accelerate's RNG pickles and DeepSpeed's optimizer shards legitimately carry.
# Any other global in a checkpoint's pickle stream is refused before anything unpickles it.
ALLOWED_GLOBALS = {
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
}
RESUME_KEYS = ("world_size", "deepspeed", "mode", "model_path", "lora", "micro_batch_size", "grad_accum", "seed")


class CheckpointError(UserError):
    """A checkpoint is incomplete, corrupt or incompatible; the message names the problem and the way out."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:06d}"


def safe_torch_load(path: Path):
    """``torch.load`` restricted to tensors and plain containers: a pickled code payload is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: refused to load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the file is corrupt "
            "or carries non-tensor pickled objects. Only load checkpoints you wrote yourself."
        ) from None


def scan_pickle(path: Path) -> None:
    """Refuse a pickle-based file whose stream names any global outside ``ALLOWED_GLOBALS`` (code payloads).
    Reads opcodes only; nothing is constructed."""
    try:
        found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint file ({exc}); the checkpoint is corrupt") from None
    unexpected = sorted(found - ALLOWED_GLOBALS)
    if unexpected:
        raise CheckpointError(
            f"{path}: refused to load, its pickle stream references {unexpected}; only tensors and known "
            "DeepSpeed/NumPy state are allowed. Only load checkpoints you wrote yourself."
        )


def scan_pickles(root: Path) -> None:
    """``scan_pickle`` every pickle-based file (.pt, .bin, .pkl) under ``root``."""
    for file in sorted(root.rglob("*.pt")) + sorted(root.rglob("*.bin")) + sorted(root.rglob("*.pkl")):
        scan_pickle(file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (COMPLETE, MANIFEST))


def write_manifest(root: Path) -> None:
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    _write_durable(root / MANIFEST, json.dumps({"files": files}, indent=1))


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path, level: str = "hash") -> dict:
    """Check a checkpoint against its manifest; returns its trainer state. Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"resume={path}: not a checkpoint directory")
    if not (path / COMPLETE).is_file() or not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} is incomplete (no {COMPLETE} marker): the save was interrupted. "
            f"Resume from an earlier checkpoint in {path.parent} or use resume=auto"
        )
    manifest = json.loads((path / MANIFEST).read_text())["files"]
    for rel, meta in manifest.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path}: file {rel} listed in {MANIFEST} is missing; the checkpoint is damaged")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: file {rel} has {file.stat().st_size} bytes, expected {meta['size']}; "
                                  "the checkpoint is corrupt")
        if level == "hash" and _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {rel} does not match its sha256 in {MANIFEST}; the checkpoint is "
                                  "corrupt or was modified")
    extra = sorted(str(p.relative_to(path)) for p in _files(path) if str(p.relative_to(path)) not in manifest)
    if extra:
        raise CheckpointError(f"{path}: files not in {MANIFEST}: {extra[:5]}; the checkpoint was modified")
    return json.loads((path / STATE).read_text())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def find_resume(output_dir: str | Path, resume: str, level: str, warn=print) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one (auto), or an explicit path."""
    if resume == "none":
        return None
    if resume != "auto":
        verify(Path(resume), level)
        return Path(resume)
    root = checkpoints_dir(output_dir)
    partial = sorted(p.name for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file()) if root.is_dir() else []
    if partial:
        warn(f"ignoring incomplete checkpoint folders in {root}: {', '.join(partial)} (interrupted saves)")
    for candidate in reversed(complete_checkpoints(output_dir)):
        try:
            verify(candidate, level)
            return candidate
        except CheckpointError as exc:
            warn(f"skipping damaged checkpoint: {exc}")
    return None


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0 keeps all)."""
    if keep_last <= 0:
        return []
    doomed = complete_checkpoints(output_dir)[:-keep_last]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# ---------------------------------------------------------------------------------------------
# RNG state, stored without pickled objects
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Save and load, called by the loop
# ---------------------------------------------------------------------------------------------


def frozen_tensor_filter(models, weights, output_dir) -> None:
    """Accelerate save-state pre-hook: keep each trainable tensor once (under its first name, as
    ``named_parameters`` does); drop frozen tensors and tied aliases."""
    for model, state in zip(models, weights):
        frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
        seen = set()
        for key in list(state):
            ptr = state[key].data_ptr()
            if ptr in frozen or ptr in seen:
                del state[key]
            seen.add(ptr)


def save(trainer) -> Path:
    """Write a complete checkpoint for ``trainer.state.step``; every process must call this."""
    acc, output_dir = trainer.accelerator, Path(trainer.output_dir)
    final = step_dir(output_dir, trainer.state.step)
    if final.is_dir():
        return final  # this step is already saved (a periodic save that is also the last step)
    tmp = final.parent / f".tmp-{final.name}"
    if acc.is_main_process:
        for stale in final.parent.glob(".tmp-step-*"):
            shutil.rmtree(stale)  # left by an interrupted save; never resumable
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    ds_kwargs = {"exclude_frozen_parameters": True} if trainer.deepspeed else {}
    acc.save_state(str(tmp), safe_serialization=True, **ds_kwargs)
    torch.save(rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps(trainer.state_dict(), indent=1))
        (tmp / "config.yaml").write_text(trainer.cfg.to_yaml())
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp)
        _write_durable(tmp / COMPLETE, "")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        prune(output_dir, trainer.cfg.checkpoint.keep_last)
    acc.wait_for_everyone()
    return final


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    for key in RESUME_KEYS:
        if saved["run"].get(key) != current.get(key):
            way_out = (
                "resume with the same number of processes" if key == "world_size" else f"set {key} back to match"
            )
            raise CheckpointError(
                f"{path} was written with {key}={saved['run'].get(key)!r} but this run has {key}={current.get(key)!r}. "
                f"Either {way_out}, or export the checkpoint (`llava-loop export --checkpoint {path} --out DIR`) and "
                "start a new run from it with model.path=DIR and resume=none"
            )


def load(trainer, path: Path) -> None:
    """Restore model, optimizer, scheduler, data position, counters and this process's RNG from ``path``
    (a checkpoint ``find_resume`` has verified)."""
    acc = trainer.accelerator
    state = json.loads((path / STATE).read_text())
    check_compatible(state, trainer.run_identity(), path)
    rng_file = path / f"rng_state_{acc.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{path}: no {rng_file.name}; the checkpoint is damaged")
    scan_pickles(path)  # before Accelerate or DeepSpeed unpickles anything
    if trainer.deepspeed:
        acc.load_state(str(path), load_module_strict=False)
    else:
        _check_saved_keys(trainer, path)
        acc.load_state(str(path), strict=False)
    trainer.load_state_dict(state)
    set_rng_state(safe_torch_load(rng_file))  # last: nothing after this may draw random numbers


def _check_saved_keys(trainer, path: Path) -> None:
    """A non-DeepSpeed checkpoint must hold exactly the trainable tensors of this model."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        saved = set(f.keys())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    if saved != trainable:
        missing, extra = sorted(trainable - saved), sorted(saved - trainable)
        raise CheckpointError(
            f"{path}/model.safetensors does not match this run's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written with another mode or model?"
        )
