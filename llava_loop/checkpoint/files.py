"""A checkpoint folder read and checked in one process: its layout, manifest, verification, the pickle scan and
safe loading (no collectives: export, inference and the CLI use these without a run)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import torch

from ..errors import UserError

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
# Non-tensor classes that Accelerate's RNG pickles and DeepSpeed's optimizer shards legitimately carry.
# Any other global in a checkpoint's pickle stream is refused before anything unpickles it.
ALLOWED_GLOBALS = {
    "numpy.dtype",
    "numpy.ndarray",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
}


class CheckpointError(UserError):
    """A checkpoint is incomplete, corrupt or incompatible; the message names the problem and the way out."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:06d}"


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``step-N`` folder, complete or not, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in step_folders(output_dir) if (p / COMPLETE).is_file()]


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete training checkpoint (rather than a model directory)."""
    return (Path(path) / COMPLETE).is_file() and (Path(path) / STATE).is_file()


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
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint file ({exc}); the checkpoint is corrupt"
        ) from None
    unexpected = sorted(found - ALLOWED_GLOBALS)
    if unexpected:
        raise CheckpointError(
            f"{path}: refused to load, its pickle stream references {unexpected}; only tensors and known "
            "DeepSpeed/NumPy state are allowed. Only load checkpoints you wrote yourself."
        )


def check_restorable(obj, what: str) -> None:
    """Refuse now, when saving, what a resume would refuse to load (``scan_pickle`` and ``safe_torch_load``):
    a hook state holding a numpy scalar or a deque saved fine and could never be resumed."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    unexpected = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(buffer)) - ALLOWED_GLOBALS)
    if not unexpected:
        buffer.seek(0)
        try:
            torch.load(buffer, map_location="cpu", weights_only=True)
            return
        except Exception as exc:
            unexpected = [f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
    raise CheckpointError(
        f"{what} holds {', '.join(unexpected)}, which a resume refuses to unpickle; return Python numbers, strings, "
        "lists, dicts and tensors (float(x) for a numpy scalar, list(d) for a deque, torch.from_numpy for an array)"
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


def hash_share(root: Path, rank: int = 0, world_size: int = 1) -> dict:
    """Size and sha256 of every ``world_size``-th file under ``root``, starting at ``rank``: each process
    hashes its share of a checkpoint, so no process works alone while the others wait in a barrier."""
    return {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p), "rank": rank}
        for p in _files(root)[rank::world_size]
    }


def write_manifest(
    root: Path, files: dict | None = None, *, world_size: int = 1, per_rank: tuple[str, ...] = ()
) -> None:
    """MANIFEST.json: every file's size and hash (``files``, from ``hash_share``; hashed here when None), the
    world size, and the file patterns each rank must have written (``{rank}`` filled in) for completeness."""
    files = hash_share(root) if files is None else files
    write_durable(
        root / MANIFEST, json.dumps({"world_size": world_size, "per_rank": list(per_rank), "files": files}, indent=1)
    )


def write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: Path) -> dict:
    """The structural checks of a checkpoint (marker, manifest, every rank's files, nothing extra); returns
    the manifest. Cheap: no file is read beyond the manifest. Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir() or not any((path / name).exists() for name in (COMPLETE, MANIFEST, STATE)):
        raise CheckpointError(f"{path}: not a checkpoint directory (expected output_dir/checkpoints/step-N)")
    if not (path / COMPLETE).is_file() or not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"{path} is incomplete (no {COMPLETE} marker): the save was interrupted. "
            f"Use an earlier checkpoint in {path.parent}"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable ({exc}); the checkpoint is damaged") from None
    for rank in range(manifest.get("world_size", 1)):
        for pattern in manifest.get("per_rank", ()):
            if pattern.format(rank=rank) not in files:
                raise CheckpointError(
                    f"{path}: no {pattern.format(rank=rank)} from process {rank} of {manifest['world_size']}; the "
                    "checkpoint is incomplete (was output_dir on a filesystem every node shares?)"
                )
    extra = sorted(str(p.relative_to(path)) for p in _files(path) if str(p.relative_to(path)) not in files)
    if extra:
        raise CheckpointError(f"{path}: files not in {MANIFEST}: {extra[:5]}; the checkpoint was modified")
    return manifest


def check_files(path: Path, files: dict, level: str) -> None:
    """Each listed file exists with its size (and, at level "hash", its sha256). Raises CheckpointError."""
    for rel, meta in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path}: file {rel} listed in {MANIFEST} is missing; the checkpoint is damaged")
        if file.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"{path}: file {rel} has {file.stat().st_size} bytes, expected {meta['size']}; "
                "the checkpoint is corrupt"
            )
        if level == "hash" and _sha256(file) != meta["sha256"]:
            raise CheckpointError(
                f"{path}: file {rel} does not match its sha256 in {MANIFEST}; the checkpoint is corrupt or was modified"
            )


def read_state(path: Path) -> dict:
    """A checkpoint's trainer state; its config is read too, so a damaged one is found with the rest."""
    read_config(path)
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {STATE} is unreadable ({exc}); the checkpoint is damaged") from None


def read_config(path: Path) -> dict:
    """The config a checkpoint was written with, as a tree; a file that does not parse as one is damage."""
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: config.yaml is unreadable ({problem}); the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config.yaml holds no config; the checkpoint is damaged")
    return config


def verify(path: Path, level: str = "hash") -> dict:
    """Check a checkpoint against its manifest in one process; returns its trainer state."""
    path = Path(path)
    check_files(path, read_manifest(path)["files"], level)
    return read_state(path)


def check_tensor_names(saved: set[str], trainable: set[str], where: Path) -> None:
    """A checkpoint must hold exactly the trainable tensors of the model it is loaded into."""
    if saved != trainable:
        missing, extra = sorted(trainable - saved), sorted(saved - trainable)
        raise CheckpointError(
            f"{where} holds {len(saved)} tensors but this model trains {len(trainable)} (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was it written with another mode or model?"
        )
