"""One writer per output folder: an exclusive ``fcntl`` lock on ``<folder>/.lock``.

Two ``stlink train`` runs of the same dataset at once would interleave their checkpoints and tag
one MLflow run with the other's model.  The second one is refused at once with a one-line error
naming the folder and the holder's pid.  The lock is released when the process ends, however it
ends (the kernel drops ``flock`` locks with the file descriptor), so a killed run leaves no stale lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

from stlink.errors import ResourceError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "training") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` for the block; ``ResourceError`` (EBUSY) when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ResourceError(errno.EBUSY, f"{folder}: another {what} is writing this folder (pid {holder}); wait "
                                             f"for it to finish, or use another data.dataset") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
