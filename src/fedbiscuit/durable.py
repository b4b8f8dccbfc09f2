"""Files that survive a crash and a power loss: written beside their target, synced, renamed, folder synced.

``os.replace`` alone makes the new name atomic for other processes, but after a power loss the file system
may hold the rename without the data it points to, or lose the rename itself. Syncing the file before the
rename and its folder after closes both gaps. A write that fails leaves no temporary file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | Path, directory: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    if directory and os.name != "posix":
        return  # folders cannot be opened for syncing on Windows; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def durable_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent, directory=True)
    finally:
        if os.path.exists(tmp):  # the write (or the sync) failed: no stray temporary file
            os.unlink(tmp)


def durable_write_text(path: str | Path, text: str) -> None:
    with durable_write(path) as tmp:
        tmp.write_text(text)
