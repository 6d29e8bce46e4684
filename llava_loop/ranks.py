"""Rank agreement: work run on the main process or on every process, with one outcome on all of them.

A failure on any process is raised on every process, so none waits forever in the next collective for one that
failed. The process where it happened raises the original, with its traceback; the others raise a copy: a
``UserError`` keeps its class and message (so every process takes the same ``except`` branch), anything else
becomes what ``describe`` makes of it, by default a RuntimeError naming the process and the error.
"""

from __future__ import annotations

import pickle

from .errors import UserError


def on_main(accelerator, fn):
    """``fn()`` on the main process only; its result, or its failure, on every process."""
    result, failure, copy = _attempt(fn, 0, None) if accelerator.is_main_process else (None, None, None)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, copy = broadcast_object_list([result, copy])
    _raise(failure, [copy])
    return result


def everywhere(accelerator, fn, describe=None) -> list:
    """``fn()`` on every process; every process's result, in rank order, on every process. ``describe(exc)`` makes
    the error the others raise for a failure that is not a UserError."""
    result, failure, copy = _attempt(fn, accelerator.process_index, describe)
    outcomes = [(result, copy)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object(outcomes)
    _raise(failure, [c for _, c in outcomes])
    return [r for r, _ in outcomes]


def _attempt(fn, rank: int, describe) -> tuple:
    """``(result, None, None)``, or ``(None, the exception, (class, message) of the copy the others raise)``."""
    try:
        return fn(), None, None
    except Exception as exc:  # noqa: BLE001 - raised again below, on every process
        where = "the main process" if rank == 0 else f"process {rank}"
        copy = (
            exc
            if isinstance(exc, UserError)
            else (describe(exc) if describe else RuntimeError(f"on {where}: {type(exc).__name__}: {exc}"))
        )
        kind = type(copy)
        try:  # the class travels by reference and is rebuilt from the message alone
            pickle.loads(pickle.dumps(kind))
            kind(str(copy))
        except Exception:  # noqa: BLE001 - a local class, or one that takes other arguments
            kind = UserError if isinstance(copy, UserError) else RuntimeError
        return None, exc, (kind, str(copy))


def _raise(failure: Exception | None, copies: list) -> None:
    if failure is not None:
        raise failure
    first = next((c for c in copies if c is not None), None)
    if first is not None:
        kind, message = first
        raise kind(message) from None
