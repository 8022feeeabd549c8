"""Neutral helpers for every part of zfsmgr: the read size of streams, durable file writes.

Imports nothing of zfsmgr, so any module may use it (server, client, restore, storage).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time from any stream: big enough for few syscalls, bounded


def fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `path` via a temp file and rename; with `durable`, fsync file and directory.

    The temp file is removed on any failure, so a crash or an error leaves the old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
