"""Neutral helpers for every part of zfsmgr: the read size of streams, durable file writes.

Imports nothing of zfsmgr, so any module may use it (server, client, restore, storage).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time from any stream: big enough for few syscalls, bounded
NAME_MAX = 255  # bytes of one file name (Linux, FreeBSD)


def fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str) -> Path:
    """The hidden temporary `.<name>.<tag>.tmp` next to `path`, at most NAME_MAX bytes: a long
    name is cut, with 8 hex digits of its sha256, so the temporary of any name the directory
    takes can be made too."""
    name = f".{path.name}.{tag}.tmp"
    if len(name.encode()) <= NAME_MAX:
        return path.with_name(name)
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:8]
    room = NAME_MAX - len(f".~{digest}.{tag}.tmp".encode())
    head = path.name.encode()[:room].decode(errors="ignore")
    return path.with_name(f".{head}~{digest}.{tag}.tmp")


def kept_owner(path: Path) -> tuple[int, int] | None:
    """Whom a file that root (re)writes must belong to: its owner, or for a new one the owner
    of its folder; None when that is root already, or when not running as root. An admin
    command run with sudo in the working directory of a server that runs as its own user must
    not take the server's files away from it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    for where in (path, path.parent):
        try:
            info = os.stat(where)
        except FileNotFoundError:
            continue
        return None if info.st_uid == 0 else (info.st_uid, info.st_gid)
    return None


def hand_over(path: Path) -> None:
    """Give a new file that root made to the owner of its folder (see kept_owner)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        folder = os.stat(Path(path).parent)
        if folder.st_uid != 0:
            os.chown(path, folder.st_uid, folder.st_gid)


def write_atomic(path: Path, data: bytes, durable: bool = True, mode: int | None = None,
                 keep_owner: bool = False) -> None:
    """Write `path` via a temp file and rename; with `durable`, fsync file and directory;
    `mode` is set before a byte is written; with `keep_owner`, the file stays its owner's
    (see kept_owner).

    The temp file is removed on any failure, so a crash or an error leaves the old content."""
    path = Path(path)
    tmp = temp_sibling(path, f"{os.getpid()}.{threading.get_ident()}")
    owner = kept_owner(path) if keep_owner else None
    try:
        with open(tmp, "wb") as out:
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            if owner is not None:
                os.fchown(out.fileno(), *owner)
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
