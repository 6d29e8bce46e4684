"""Images read from zip archives in place, never extracted: a record names ``images.zip/GCC_train_000.jpg``, the
archive as if it were a folder (as Python's zipimport names modules inside a zip), and the member is read from it.

Each process opens an archive once and keeps it (keyed by process id, so a forked DataLoader worker never shares
its parent's file position), until the file's size or modification time changes."""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .skips import SkipSample

# no real image is this large; a member that claims more is a zip bomb, refused before it is inflated
MAX_MEMBER_BYTES = 1 << 28
_open: dict[tuple[int, Path], tuple[tuple[int, int], zipfile.ZipFile]] = {}
os.register_at_fork(after_in_child=_open.clear)  # a worker's copy of its parent's tables is never used


@dataclass(frozen=True)
class ZipMember:
    """One member of a zip file."""

    archive: Path
    member: str

    def __str__(self) -> str:
        return f"{self.archive}/{self.member}"

    def read_bytes(self) -> bytes:
        return read_member(self)


def is_zip_name(part: str) -> bool:
    return part.lower().endswith(".zip")


def split_archive(image_dir: Path, name: str) -> ZipMember | None:
    """The member ``name`` reaches through a zip file in ``image_dir`` (its first folder that is a ``.zip`` file),
    or None when no folder of it is one."""
    parts = name.split("/")
    root = Path("/") if name.startswith("/") else image_dir  # an absolute name (data.allow_absolute_paths)
    for i, part in enumerate(parts[:-1], 1):
        if is_zip_name(part):
            archive = root.joinpath(*parts[:i])
            if archive.is_file():
                return ZipMember(archive, "/".join(parts[i:]))
    return None


def open_archive(path: Path) -> zipfile.ZipFile:
    """This process's open handle on ``path``; raises ``zipfile.BadZipFile`` (or OSError) when it is not a zip."""
    key, stat = (os.getpid(), path), path.stat()
    version = (stat.st_size, stat.st_mtime_ns)
    if key not in _open or _open[key][0] != version:
        if key in _open:
            _open[key][1].close()
        _open[key] = (version, zipfile.ZipFile(path))
    return _open[key][1]


def member_info(member: ZipMember, missing: str = "missing_image") -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The open archive and the member's entry; a ``SkipSample`` (``missing``: the reason for an absent member) when
    either is not there."""
    try:
        archive = open_archive(member.archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SkipSample("unreadable_archive", f"{member.archive}: not a readable zip ({exc})") from None
    try:
        info = archive.getinfo(member.member)
    except KeyError:
        raise SkipSample(missing, f"{member.archive} has no member {member.member!r}") from None
    if info.is_dir():
        raise SkipSample("not_a_file", f"{member} is a folder in the archive")
    return archive, info


def read_member(member: ZipMember) -> bytes:
    """The member's bytes, CRC checked; every failure is a ``SkipSample`` naming the archive and the member."""
    archive, info = member_info(member)
    if info.file_size > MAX_MEMBER_BYTES:
        raise SkipSample("decompression_bomb", f"{member} inflates to {info.file_size} bytes")
    if info.file_size == 0:
        raise SkipSample("empty_image", f"{member} is zero bytes")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        # a bad CRC, a cut-off member, an unsupported compression or an encrypted member
        raise SkipSample("corrupt_image", f"{member}: {exc}") from None
