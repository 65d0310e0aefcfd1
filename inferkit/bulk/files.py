"""The files of a bulk job: its output's lock, and writes that appear whole under their name or not at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from inferkit.errors import JobLocked

# O_EXCL never opens what is already there (a planted symlink included); NOFOLLOW says so twice.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HASH_BLOCK = 1 << 20


def _temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a job killed while writing it (call under the lock)."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{12}\.tmp")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if pattern.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()  # unlink never follows a symlink: only the name goes


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` to a new file of a random name beside ``path``, flush it to disk, then rename it into place.

    The temporary is created exclusively, so nothing already there (a symlink planted at a
    predictable name) is opened or overwritten; it is removed if ``write`` fails.
    """
    while True:
        temporary = _temporary_name(path)
        try:
            fd = os.open(temporary, _CREATE, 0o666)
            break
        except FileExistsError:  # 48 random bits taken: try another
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` (``flock`` on ``<output>.lock``) for a job's whole run.

    The kernel drops the lock when its holder dies, ``kill -9`` included, so a stale lock file
    never blocks the next run. The file is removed on release while still locked; a run that
    locked a file already removed checks the name afterwards and locks the new one instead.
    """
    path = output.with_name(output.name + ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                msg = f"{path} is a symbolic link; remove it (a job's lock is a plain file)"
                raise JobLocked(msg) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            msg = f"another job is writing {output} now (it holds {path}); wait for it to finish"
            raise JobLocked(msg) from None
        try:
            current = path.lstat()
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the holder before us removed the file we locked: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def file_identity(path: Path, *, digest: bool) -> dict[str, Any]:
    """What a resumed job checks a file by: size and mtime, or size and a SHA-256 of its bytes."""
    stat = path.stat()
    if not digest:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
    return {"size": stat.st_size, "sha256": sha.hexdigest()}
