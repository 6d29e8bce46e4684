"""One run per output_dir: an exclusive lock file, and a run id for every metrics row.

Two runs in one folder delete each other's in-flight saves and resume each other's checkpoints. The main
process creates ``output_dir/.llava_loop.lock`` exclusively (``O_EXCL``), holding the pid, host, start time
and run id; a second run exits at once, naming the holder. A lock whose process is gone (same host, pid no
longer alive) is stale and taken over with a warning; one from another host cannot be checked from here,
so the message says how to remove it. Released when the run ends; a run killed with SIGKILL leaves it for
the next run to find stale.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK = ".llava_loop.lock"


class OutputDirBusy(UserError):
    """Another run holds output_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """``what``: how the folder is named to the user (``output_dir``; ``--out`` for ``data prepare``); ``work``:
    what holds it (a run, a preparation)."""

    def __init__(self, output_dir: str | Path, warn=print, *, what: str = "output_dir", work: str = "run"):
        self.path = Path(output_dir) / LOCK
        self.warn = warn
        self.what, self.work = what, work
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.held = False

    def acquire(self) -> str:
        """Take the lock (or fail naming its holder); returns this run's id."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.path.parent / f".llava_loop-write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(
                f"{self.what} {self.path.parent} is not writable ({exc.strerror or exc}); choose a folder "
                "this user can write to"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "run_id": self.run_id,
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self.warn(f"taking over the lock of a {self.work} that is gone ({self._describe(holder)})")
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputDirBusy(
                    f"{self.what} {self.path.parent} is in use by another {self.work} ({self._describe(holder)}). "
                    f"Wait for it, stop it, or use another {self.what}; if that {self.work} is gone, delete "
                    f"{self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self.run_id
        raise OutputDirBusy(f"could not take {self.path}: another {self.work} keeps taking it")

    @contextmanager
    def released_at_end(self):
        """Release the lock when the block ends, however it ends."""
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        if self.held and self._holder().get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:  # being written right now, or left half-written by a run that died while taking it
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except FileNotFoundError:
                return True
        same_process = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        return same_process or (holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))))

    @staticmethod
    def _describe(holder: dict) -> str:
        return (
            f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"run {holder.get('run_id')}"
            if holder
            else "an unreadable lock file"
        )
