"""Checkpoints that survive faults.

Layout: ``output_dir/checkpoints/step-000100/`` holding Accelerate's ``save_state`` (DeepSpeed engine
files under ZeRO, else model/optimizer), ``trainer_state.json``, ``rng_state_<rank>.pt`` for every
process, the resolved ``config.yaml``, a ``MANIFEST.json`` (size + sha256 of every file) and, last, a
``COMPLETE`` marker.

Saves are atomic: everything is written to ``.tmp-step-000100/``, the manifest and marker go in last,
and only then is the folder renamed into place. Old checkpoints are pruned only after the new one is
complete (the reverse of Accelerate's ``total_limit``, which deletes first). So is the previous run's
``checkpoints.replaced-<time>/`` that ``resume=overwrite`` set aside: kept until this run's first checkpoint is
whole, then deleted by the prune that follows it (unless ``keep_last`` is 0, which keeps all). Frozen weights are never
saved: projector and LoRA checkpoints hold only what trains.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import config_changes
from .errors import UserError
from .runtime import main_process_result

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE = "trainer_state.json"
RNG_FILE = "rng_state_{rank}.pt"  # ours, one per process
ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"  # Accelerate's save_state writes one per process too
STEP_RE = re.compile(r"^step-(\d+)$")
REPLACED = "checkpoints.replaced-"  # + a time: a previous run's checkpoints folder, set aside by resume=overwrite
# Non-tensor classes that Accelerate's RNG pickles and DeepSpeed's optimizer shards legitimately carry.
# Any other global in a checkpoint's pickle stream is refused before anything unpickles it.
ALLOWED_GLOBALS = {
    "numpy.dtype", "numpy.ndarray", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "numpy.dtypes.UInt32DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
}
# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("world_size", "backend", "mode", "model_path", "lora", "micro_batch_size", "grad_accum", "seed")


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


def hash_share(root: Path, rank: int = 0, world_size: int = 1) -> dict:
    """Size and sha256 of every ``world_size``-th file under ``root``, starting at ``rank``: each process
    hashes its share of a checkpoint, so no process works alone while the others wait in a barrier."""
    return {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p), "rank": rank}
            for p in _files(root)[rank::world_size]}


def write_manifest(root: Path, files: dict | None = None, *, world_size: int = 1, per_rank: tuple[str, ...] = ()) -> None:
    """MANIFEST.json: every file's size and hash (``files``, from ``hash_share``; hashed here when None), the
    world size, and the file patterns each rank must have written (``{rank}`` filled in) for completeness."""
    files = hash_share(root) if files is None else files
    _write_durable(root / MANIFEST, json.dumps({"world_size": world_size, "per_rank": list(per_rank), "files": files},
                                               indent=1))


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
                    "checkpoint is incomplete (was output_dir on a filesystem every node shares?)")
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
            raise CheckpointError(f"{path}: file {rel} has {file.stat().st_size} bytes, expected {meta['size']}; "
                                  "the checkpoint is corrupt")
        if level == "hash" and _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {rel} does not match its sha256 in {MANIFEST}; the checkpoint is "
                                  "corrupt or was modified")


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {STATE} is unreadable ({exc}); the checkpoint is damaged") from None


def verify(path: Path, level: str = "hash") -> dict:
    """Check a checkpoint against its manifest in one process; returns its trainer state."""
    path = Path(path)
    check_files(path, read_manifest(path)["files"], level)
    return read_state(path)


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``step-N`` folder, complete or not, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete training checkpoint (rather than a model directory)."""
    return (Path(path) / COMPLETE).is_file() and (Path(path) / STATE).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in step_folders(output_dir) if (p / COMPLETE).is_file()]


def set_aside(path: Path, label: str) -> Path:
    """Rename a checkpoint to ``.<label>-step-N``: kept for inspection, never resumed (``STEP_RE`` no longer
    matches), and its step is saved again when training gets there."""
    target = path.with_name(f".{label}-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


def resume_candidates(output_dir: str | Path, resume: str, warn=print) -> list[Path]:
    """Checkpoints to try, in order: none, the complete ones newest first (auto), or the one path given.
    ``resume=none`` into a folder that already holds checkpoints is refused: the two runs' checkpoints would
    mix, and a later ``auto`` would resume the wrong one. ``overwrite`` moves the old ones aside first."""
    existing = [p.name for p in step_folders(output_dir)]
    if resume == "none" and existing:
        raise CheckpointError(
            f"output_dir {output_dir} already holds checkpoints ({', '.join(existing[-3:])}) and resume=none would "
            "mix a new run with them. Use resume=auto to continue that run, resume=overwrite to move its "
            "checkpoints aside and start fresh, or another output_dir"
        )
    if resume == "none":
        return []
    if resume == "overwrite":
        if existing:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = Path(output_dir) / f"{REPLACED}{stamp}"
            os.rename(checkpoints_dir(output_dir), aside)
            metrics = Path(output_dir) / "metrics.jsonl"
            if metrics.is_file():
                os.rename(metrics, metrics.with_name(f"metrics.replaced-{stamp}.jsonl"))
            warn(f"resume=overwrite: moved the previous run's checkpoints to {aside} (and its metrics beside them); "
                 "they are deleted once this run has a complete checkpoint, unless checkpoint.keep_last is 0")
        return []
    if resume != "auto":
        return [Path(resume)]
    root = checkpoints_dir(output_dir)
    partial = sorted(p.name for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file()) if root.is_dir() else []
    if partial:
        warn(f"ignoring incomplete checkpoint folders in {root}: {', '.join(partial)} (interrupted saves)")
    return list(reversed(complete_checkpoints(output_dir)))


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, and the previous runs' checkpoints that
    ``resume=overwrite`` set aside (0 keeps all). Called only right after a save is sealed: a set-aside copy goes
    once this run holds a complete checkpoint of its own, never while it is all there is."""
    if keep_last <= 0:
        return []
    doomed = complete_checkpoints(output_dir)[:-keep_last] + sorted(Path(output_dir).glob(f"{REPLACED}*"))
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
# The checkpointer: handed stateful parts, never the trainer
# ---------------------------------------------------------------------------------------------


def check_tensor_names(saved: set[str], trainable: set[str], where: Path) -> None:
    """A checkpoint must hold exactly the trainable tensors of the model it is loaded into."""
    if saved != trainable:
        missing, extra = sorted(trainable - saved), sorted(saved - trainable)
        raise CheckpointError(
            f"{where} holds {len(saved)} tensors but this model trains {len(trainable)} (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was it written with another mode or model?"
        )


def start_anew(path: Path) -> str:
    """The way out when a checkpoint cannot be resumed as this run is configured."""
    return (f"export the checkpoint (`llava-loop export --checkpoint {path} --out DIR`) and start a new run from "
            "it with model.path=DIR in a new output_dir")


def check_compatible(saved: dict, current: dict, path: Path) -> None:
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            way_out = (
                "resume with the same number of processes" if key == "world_size" else f"set {key} back to match"
            )
            raise CheckpointError(
                f"{path} was written with {key}={saved.get(key)!r} but this run has {key}={current.get(key)!r}. "
                f"Either {way_out}, or {start_anew(path)}"
            )


class Checkpointer:
    """Saves and restores a run through ``accelerator.save_state``/``load_state`` plus named stateful parts.

    ``states`` maps a name to anything with ``state_dict()`` and ``load_state_dict()`` (progress, skip tally,
    scheduler...); their dicts go into ``trainer_state.json``. ``identity`` holds the settings a resumed run
    must share (``RESUME_KEYS``). Every process calls ``save``, ``find_resume`` and ``load``. Fault tests
    subclass it and override one step (``seal``, ``load``).
    """

    def __init__(self, accelerator, backend, model, output_dir: str | Path, *, states: dict, identity: dict,
                 config_yaml: str, keep_last: int, verify: str, warn=print):
        self.accelerator = accelerator
        self.backend = backend
        self.model = model
        self.output_dir = Path(output_dir)
        self.states = states
        self.identity = identity
        self.config_yaml = config_yaml
        self.keep_last = keep_last
        self.verify_level = verify
        self.warn = warn

    def save(self, step: int) -> Path:
        """Write a complete checkpoint for ``step``."""
        acc = self.accelerator
        final = step_dir(self.output_dir, step)
        if main_process_result(acc, final.is_dir):  # decided once: ranks must not disagree over a network filesystem
            raise CheckpointError(f"{final} already exists; a save never replaces a checkpoint (resume=auto "
                                  "quarantines a damaged one, resume=overwrite moves a previous run's aside)")
        tmp = final.parent / f".tmp-{final.name}"

        def fresh_tmp():
            for stale in final.parent.glob(".tmp-step-*"):
                shutil.rmtree(stale)  # left by an interrupted save; never resumable
            tmp.mkdir(parents=True)

        main_process_result(acc, fresh_tmp)
        self.together(lambda: self.write(tmp), step, tmp)
        files = self.gather_dicts(hash_share(tmp, acc.process_index, acc.num_processes))
        self.together(lambda: self.seal(tmp, final, files) if acc.is_main_process else None, step, tmp)
        return final

    def together(self, work, step: int, tmp: Path) -> None:
        """Run ``work`` on every process, then agree on how it went: a failure anywhere stops every process
        (none waits forever in the next collective). A full disk becomes one clear CheckpointError everywhere;
        any other failure is re-raised, with its traceback, where it happened."""
        acc = self.accelerator
        failure, problem = None, ""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            failure, problem = exc, self.write_failure(exc, step, tmp)
        problems = self.problems_everywhere(problem)
        if not problems:
            return
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if problems[0].startswith("no space left") or failure is None:
            raise CheckpointError(problems[0])
        raise failure

    def write(self, tmp: Path) -> None:
        """Every process: its part of the Accelerate state and its RNG; the main process: the stateful parts
        and the config."""
        acc = self.accelerator
        acc.save_state(str(tmp), safe_serialization=True, **self.backend.save_kwargs())
        torch.save(rng_state(), tmp / RNG_FILE.format(rank=acc.process_index))
        if acc.is_main_process:
            state = {"run": self.identity, **{name: part.state_dict() for name, part in self.states.items()}}
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            (tmp / "config.yaml").write_text(self.config_yaml)

    def write_failure(self, exc: Exception, step: int, tmp: Path) -> str:
        """What to tell the user when writing a checkpoint failed. A full disk surfaces as ENOSPC, or from
        torch's C++ writer as "unexpected pos" / "basic_ios::clear" / "file write failed"."""
        text = f"{type(exc).__name__}: {exc}"
        full = getattr(exc, "errno", None) == errno.ENOSPC or any(
            sign in text for sign in ("No space left", "unexpected pos", "basic_ios::clear", "file write failed"))
        previous = complete_checkpoints(self.output_dir)
        if not full:
            return f"could not write checkpoint step {step} to {tmp.parent}: {text[:300]}"
        needs = sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file()) if previous else \
            sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        free = shutil.disk_usage(tmp.parent).free
        intact = f"the previous checkpoint ({previous[-1].name}) is intact" if previous else "no earlier checkpoint exists"
        return (f"no space left on device while saving step {step} to {tmp.parent} (needs about {needs / 1e9:.2f} GB"
                f"{'' if previous else ' at least'}, {free / 1e9:.2f} GB free there); {intact}. Free space or move "
                "output_dir, then resume with resume=auto")

    def problems_everywhere(self, mine: str) -> list[str]:
        """Every process's problem ("" for none), on every process: all of them then act alike."""
        return [p for p in self.gather_dicts({self.accelerator.process_index: mine}).values() if p]

    def gather_dicts(self, mine: dict) -> dict:
        """Every process's dict, merged, on every process."""
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([mine]):
            merged.update(part)
        return merged

    def seal(self, tmp: Path, final: Path, files: dict) -> None:
        """Main process: manifest, marker, rename into place, then prune (never before the new one is whole)."""
        write_manifest(tmp, files, world_size=self.accelerator.num_processes,
                       per_rank=(RNG_FILE, ACCELERATE_RNG_FILE, *self.backend.rank_files()))
        _write_durable(tmp / COMPLETE, "")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        prune(self.output_dir, self.keep_last)

    def find_resume(self, resume: str) -> tuple[Path, dict] | None:
        """``(checkpoint, its trainer state)`` to resume from, or None. The main process decides which folders to
        try; every process hashes its share of each; all see the same verdict."""
        candidates = main_process_result(self.accelerator, lambda: resume_candidates(self.output_dir, resume, self.warn))
        for path in candidates:
            try:
                found = path, self.verify(path)
                main_process_result(self.accelerator, lambda: self.set_aside_newer(path))
                return found
            except CheckpointError as exc:
                if resume != "auto":
                    raise
                moved = main_process_result(self.accelerator, lambda: set_aside(path, "bad"))
                self.warn(f"skipping damaged checkpoint, moved to {moved.name}: {exc}")
        return None

    def set_aside_newer(self, resumed: Path) -> None:
        """Resuming from an older checkpoint (a rollback): the newer ones of this output_dir would stand where
        this run must save; rename them ``.rolled-back-step-N``, kept, never resumed."""
        match = STEP_RE.match(resumed.name)
        if not match or resumed.resolve().parent != checkpoints_dir(self.output_dir).resolve():
            return
        for newer in step_folders(self.output_dir):
            if int(STEP_RE.match(newer.name).group(1)) > int(match.group(1)):
                target = set_aside(newer, "rolled-back")
                self.warn(f"resuming from {resumed.name}: the newer {newer.name} is moved to {target.name}")

    def verify(self, path: Path) -> dict:
        """``verify`` as a team: structure on the main process, hashing shared; raises on every process alike."""
        acc = self.accelerator
        manifest = main_process_result(acc, lambda: read_manifest(path))
        share = dict(sorted(manifest["files"].items())[acc.process_index::acc.num_processes])
        try:
            check_files(path, share, self.verify_level)
            problem = ""
        except (CheckpointError, OSError) as exc:
            problem = str(exc) if isinstance(exc, CheckpointError) else f"{path}: cannot read its files ({exc})"
        problems = self.problems_everywhere(problem)
        if problems:
            raise CheckpointError(problems[0])
        return main_process_result(acc, lambda: read_state(path))

    def load(self, path: Path, state: dict) -> list[str]:
        """Restore weights, optimizer, every stateful part and this process's RNG from a verified checkpoint.
        Returns the config changes since the checkpoint, which the run applies; any other change is refused."""
        check_compatible(state["run"], self.identity, path)
        applied, refused = config_changes(yaml.safe_load((path / "config.yaml").read_text()), yaml.safe_load(self.config_yaml))
        if refused:
            raise CheckpointError(
                f"{path} was written with a different config, and these settings cannot change on resume: "
                f"{'; '.join(refused)}. Set them back, or {start_anew(path)}"
            )
        rng_file = path / RNG_FILE.format(rank=self.accelerator.process_index)
        if not rng_file.is_file():
            raise CheckpointError(f"{path}: no {rng_file.name}; the checkpoint is damaged")
        scan_pickles(path)  # before Accelerate or DeepSpeed unpickles anything
        self.backend.load(path, self.model)
        for name, part in self.states.items():
            part.load_state_dict(state[name])
        set_rng_state(safe_torch_load(rng_file))  # last: nothing after this may draw random numbers
        return applied
