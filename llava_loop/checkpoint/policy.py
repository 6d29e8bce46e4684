"""Folder policy: which checkpoint a run resumes and whether it may, what it sets aside, what it prunes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ..config import change_line, config_differences
from .files import COMPLETE, STEP_RE, CheckpointError, checkpoints_dir, complete_checkpoints, step_folders

REPLACED = "checkpoints.replaced-"  # + a time: a previous run's checkpoints folder, set aside by resume=overwrite


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
    mix, and a later ``auto`` would resume the wrong one; so is a path outside this output_dir into one that holds
    any. ``overwrite`` moves the old ones aside first."""
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
            warn(
                f"resume=overwrite: moved the previous run's checkpoints to {aside} (and its metrics beside them); "
                "they are deleted once this run has a complete checkpoint, unless checkpoint.keep_last is 0"
            )
        return []
    if resume != "auto":
        path = Path(resume)
        if existing and path.resolve().parent != checkpoints_dir(output_dir).resolve():
            raise CheckpointError(
                f"resume={path} is another folder's checkpoint, and output_dir {output_dir} already holds "
                f"checkpoints ({', '.join(existing[-3:])}): this run's would mix with them, and pruning would count "
                "theirs as its own. Resume into an empty output_dir, or move those checkpoints away"
            )
        return [path]
    root = checkpoints_dir(output_dir)
    partial = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file()) if root.is_dir() else []
    )
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


def start_anew(path: Path) -> str:
    """The way out when a checkpoint cannot be resumed as this run is configured."""
    return (
        f"export the checkpoint (`llava-loop export --checkpoint {path} --out DIR`) and start a new run from "
        "it with model.path=DIR in a new output_dir"
    )


def set_aside_newer(output_dir: str | Path, resumed: Path, warn=print) -> None:
    """Resuming from an older checkpoint (a rollback): the newer ones of this output_dir would stand where
    this run must save; rename them ``.rolled-back-step-N``, kept, never resumed."""
    match = STEP_RE.match(resumed.name)
    if not match or resumed.resolve().parent != checkpoints_dir(output_dir).resolve():
        return
    for newer in step_folders(output_dir):
        if int(STEP_RE.match(newer.name).group(1)) > int(match.group(1)):
            target = set_aside(newer, "rolled-back")
            warn(f"resuming from {resumed.name}: the newer {newer.name} is moved to {target.name}")


def check_resumable(path: Path, saved_run: dict, run: dict, saved_config: dict, config: dict) -> list[str]:
    """The one rule for "may this run resume that checkpoint?": the run facts the config cannot say (world size,
    backend, resolved model path) must match, and so must every config field not declared ``resume=True``.
    Returns the config changes the run applies (``key: old -> new``); raises CheckpointError naming the rest."""
    changes = config_differences(saved_config, config)
    refused = [(key, saved_run.get(key), run.get(key)) for key in run if saved_run.get(key) != run.get(key)]
    refused += [(key, old, new) for key, old, new, may_change in changes if not may_change]
    if refused:
        key, old, new = refused[0]
        hint = (
            " (resume with the same number of processes)"
            if saved_run.get("world_size") != run.get("world_size")
            else ""
        )
        raise CheckpointError(
            f"{path} was written with {key}={old!r} but this run has {key}={new!r}; settings that cannot change on "
            f"resume: {'; '.join(change_line(*change) for change in refused)}. Set them back{hint}, or "
            f"{start_anew(path)}"
        )
    return [change_line(key, old, new) for key, old, new, may_change in changes if may_change]
