"""The ``Checkpointer``: every process of a run saves and restores it together, and it decides when to save."""

from __future__ import annotations

import errno
import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch
import yaml

from ..errors import size_text
from ..ranks import everywhere, on_main
from .files import (
    COMPLETE,
    STATE,
    CheckpointError,
    check_files,
    check_restorable,
    complete_checkpoints,
    fsync_dir,
    hash_share,
    read_config,
    read_manifest,
    read_state,
    safe_torch_load,
    scan_pickles,
    step_dir,
    write_durable,
    write_manifest,
)
from .policy import check_resumable, prune, resume_candidates, set_aside, set_aside_newer
from .rng import ACCELERATE_RNG_FILE, RNG_FILE, rng_state, set_rng_state

HOOK_FILE = "hook_state_{rank}.pt"  # every process's stateful hooks (a hook's state may differ per process)


def stateful_hooks(hooks) -> dict:
    """The hooks with ``state_dict`` and ``load_state_dict``, by class (``#2`` on for more of one class): saved and
    restored with the checkpoint, so an EMA of the weights or a running mean needs no edit of the loop."""
    named = {}
    for hook in hooks:
        if callable(getattr(hook, "state_dict", None)) and callable(getattr(hook, "load_state_dict", None)):
            name = f"{type(hook).__module__}:{type(hook).__qualname__}"
            count = sum(key.split("#")[0] == name for key in named)
            named[f"{name}#{count + 1}" if count else name] = hook
    return named


def disk_full(exc: Exception) -> bool:
    """A full disk surfaces as ENOSPC, or from torch's C++ writer as "unexpected pos" / "basic_ios::clear" /
    "file write failed"."""
    return getattr(exc, "errno", None) == errno.ENOSPC or any(
        sign in f"{exc}" for sign in ("No space left", "unexpected pos", "basic_ios::clear", "file write failed")
    )


class Checkpointer:
    """Saves and restores a run through ``accelerator.save_state``/``load_state`` plus named stateful parts, and
    owns the save policy: every ``every`` steps, on request (a stop, the end), never twice for one step.

    ``progress`` (whose ``step`` the policy reads), each of ``states`` and each stateful hook has ``state_dict()``
    and ``load_state_dict()``; the parts' dicts go into ``trainer_state.json``, the hooks' into each process's
    ``hook_state_<rank>.pt``. ``run_facts`` are what a resumed run must share that its config cannot say
    (``policy.check_resumable``). Every process calls ``save``, ``find_resume`` and ``load``. A subclass may
    replace one step (``write``, ``seal``, ``load``); ``train(cfg, checkpointer_cls=...)`` builds it.
    """

    def __init__(
        self,
        accelerator,
        backend,
        model,
        output_dir: str | Path,
        *,
        progress,
        states: dict,
        hooks=(),
        run_facts: dict,
        config_yaml: str,
        every: int,
        keep_last: int,
        verify: str,
        warn=print,
    ):
        self.accelerator = accelerator
        self.backend = backend
        self.model = model
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.states = {"progress": progress, **states}
        self.hooks = stateful_hooks(hooks)
        self.run_facts = run_facts
        self.config_yaml = config_yaml
        self.every = every
        self.keep_last = keep_last
        self.verify_level = verify
        self.warn = warn
        self.last_saved: int | None = None  # the step whose checkpoint this run's state is: written or resumed

    # ------------------------------------------------------------------------------------------
    # When to save
    # ------------------------------------------------------------------------------------------

    def save_if_due(self, *, force: bool = False) -> Path | None:
        """A checkpoint of the current step when it is due (or ``force``: a stop, the end of training), unless
        that step's is written already; returns it, or None."""
        step = self.progress.step
        if step == self.last_saved or not (force or self.progress.due(self.every)):
            return None
        return self.save(step)

    # ------------------------------------------------------------------------------------------
    # Saving, every process together
    # ------------------------------------------------------------------------------------------

    def save(self, step: int) -> Path:
        """Write a complete checkpoint for ``step``."""
        acc = self.accelerator
        final = step_dir(self.output_dir, step)
        if on_main(acc, final.is_dir):  # decided once: ranks must not disagree over a network filesystem
            raise CheckpointError(
                f"{final} already exists; a save never replaces a checkpoint (resume=auto "
                "quarantines a damaged one, resume=overwrite moves a previous run's aside)"
            )
        tmp = final.parent / f".tmp-{final.name}"

        def fresh_tmp():
            for stale in final.parent.glob(".tmp-step-*"):
                shutil.rmtree(stale)  # left by an interrupted save; never resumable
            tmp.mkdir(parents=True)

        on_main(acc, fresh_tmp)
        self.writing(lambda: self.write(tmp), step, tmp)
        files = {}
        for share in self.writing(lambda: hash_share(tmp, acc.process_index, acc.num_processes), step, tmp):
            files.update(share)
        self.writing(lambda: self.seal(tmp, final, files) if acc.is_main_process else None, step, tmp)
        self.last_saved = step
        return final

    def writing(self, work, step: int, tmp: Path) -> list:
        """``work`` on every process (``ranks.everywhere``); a failure anywhere removes the folder being written. A
        full disk is one clear CheckpointError on every process; any other failure is raised as itself where it
        happened, and as a CheckpointError saying what failed on the others."""

        def work_or_full_disk():
            try:
                return work()
            except Exception as exc:
                if disk_full(exc):
                    raise CheckpointError(self.write_failure(exc, step, tmp)) from None
                raise

        try:
            return everywhere(
                self.accelerator,
                work_or_full_disk,
                describe=lambda exc: CheckpointError(self.write_failure(exc, step, tmp)),
            )
        except Exception:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write(self, tmp: Path) -> None:
        """Every process: its part of the Accelerate state, its RNG and its stateful hooks; the main process: the
        stateful parts and the config."""
        acc = self.accelerator
        self.backend.save_state(self.model, tmp)
        torch.save(rng_state(), tmp / RNG_FILE.format(rank=acc.process_index))
        if self.hooks:
            torch.save(self.hook_states(), tmp / HOOK_FILE.format(rank=acc.process_index))
        if acc.is_main_process:
            state = {"run": self.run_facts, **{name: part.state_dict() for name, part in self.states.items()}}
            (tmp / STATE).write_text(json.dumps(state, indent=1))
            (tmp / "config.yaml").write_text(self.config_yaml)

    def write_failure(self, exc: Exception, step: int, tmp: Path) -> str:
        """What to tell the user when writing a checkpoint failed."""
        text = f"{type(exc).__name__}: {exc}"
        if not disk_full(exc):
            return f"could not write checkpoint step {step} to {tmp.parent}: {text[:300]}"
        previous = complete_checkpoints(self.output_dir)
        needs = (
            sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file())
            if previous
            else sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        )
        free = shutil.disk_usage(tmp.parent).free
        intact = (
            f"the previous checkpoint ({previous[-1].name}) is intact" if previous else "no earlier checkpoint exists"
        )
        return (
            f"no space left on device while saving step {step} to {tmp.parent} (needs about {size_text(needs)}"
            f"{'' if previous else ' at least'}, {size_text(free)} free there); {intact}. Free space or move "
            "output_dir, then resume with resume=auto"
        )

    def seal(self, tmp: Path, final: Path, files: dict) -> None:
        """Main process: manifest, marker, rename into place, then prune (never before the new one is whole)."""
        per_rank = (RNG_FILE, ACCELERATE_RNG_FILE, *((HOOK_FILE,) if self.hooks else ()), *self.backend.rank_files())
        write_manifest(tmp, files, world_size=self.accelerator.num_processes, per_rank=per_rank)
        write_durable(tmp / COMPLETE, "")
        os.rename(tmp, final)
        fsync_dir(final.parent)
        prune(self.output_dir, self.keep_last)

    # ------------------------------------------------------------------------------------------
    # Resuming, every process together
    # ------------------------------------------------------------------------------------------

    def find_resume(self, resume: str) -> tuple[Path, dict] | None:
        """``(checkpoint, its trainer state)`` to resume from, or None. The main process decides which folders to
        try; every process hashes its share of each; all see the same verdict."""
        acc = self.accelerator
        candidates = on_main(acc, lambda: resume_candidates(self.output_dir, resume, self.warn))
        for path in candidates:
            try:
                found = path, self.verify(path)
                on_main(acc, partial(set_aside_newer, self.output_dir, path, self.warn))
                return found
            except CheckpointError as exc:
                if resume != "auto":
                    raise
                moved = on_main(acc, partial(set_aside, path, "bad"))
                self.warn(f"skipping damaged checkpoint, moved to {moved.name}: {exc}")
        return None

    def verify(self, path: Path) -> dict:
        """``verify`` as a team: structure on the main process, hashing shared; raises on every process alike."""
        acc = self.accelerator
        manifest = on_main(acc, lambda: read_manifest(path))
        share = dict(sorted(manifest["files"].items())[acc.process_index :: acc.num_processes])

        def check_share():
            try:
                check_files(path, share, self.verify_level)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read its files ({exc})") from None

        everywhere(acc, check_share)
        return on_main(acc, lambda: read_state(path))

    def load(self, path: Path, state: dict) -> list[str]:
        """Restore weights, optimizer, every stateful part and hook and this process's RNG from a verified
        checkpoint. Returns the config changes since the checkpoint, which the run applies; any other change is
        refused."""
        applied = check_resumable(
            path,
            state["run"],
            self.run_facts,
            read_config(path),
            yaml.safe_load(self.config_yaml),
        )
        rng_file = path / RNG_FILE.format(rank=self.accelerator.process_index)
        if not rng_file.is_file():
            raise CheckpointError(f"{path}: no {rng_file.name}; the checkpoint is damaged")
        scan_pickles(path)  # before Accelerate or DeepSpeed unpickles anything
        self.backend.load(path, self.model)
        for name, part in self.states.items():
            part.load_state_dict(state[name])
        self.load_hooks(path)
        self.last_saved = self.progress.step
        set_rng_state(safe_torch_load(rng_file))  # last: nothing after this may draw random numbers
        return applied

    def hook_states(self) -> dict:
        """Each stateful hook's state, checked to load on resume as it will be loaded (also at the start of a run,
        so a hook whose state cannot be restored fails then, not at the first save hours later)."""
        states = {name: hook.state_dict() for name, hook in self.hooks.items()}
        for name, state in states.items():
            check_restorable(state, f"hook {name}: its state_dict()")
        return states

    def load_hooks(self, path: Path) -> None:
        """Each stateful hook from this process's file; a hook the checkpoint has no state for (added since, or
        given state_dict since) starts from its initial state, saying so."""
        hook_file = path / HOOK_FILE.format(rank=self.accelerator.process_index)
        saved = safe_torch_load(hook_file) if hook_file.is_file() else {}
        for name, hook in self.hooks.items():
            if name in saved:
                hook.load_state_dict(saved[name])
            else:
                self.warn(f"hook {name} has no state in {path}: it starts from its initial state")
