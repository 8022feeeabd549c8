"""Locks of the client: one run per server at a time, one zfsmgr process per dataset at a time
(flock, released when the process dies)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
import urllib.parse
from pathlib import Path

from zfsmgr.errors import LockedError, SettingsError
from zfsmgr.files import NAME_MAX


class Lock:
    """An exclusive flock on `path`, waited for up to `wait` seconds (0: not at all);
    LockedError with `busy` when it stays taken."""

    def __init__(self, path: Path, busy: str, wait: float = 0.0):
        self.path, self.busy, self.wait = path, busy, wait

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a STATE_DIR of another user's, a read-only one
            raise SettingsError(f"cannot make the lock {self.path}: {exc.strerror or exc}"
                                " (STATE_DIR must be writable by this user)") from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise LockedError(f"{self.busy} ({self.path})") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        os.close(self.fd)


class DatasetLock(Lock):
    """One zfsmgr run per dataset at a time."""

    def __init__(self, folder: Path, dataset: str, wait: float = 0.0):
        # the real name, escaped: tank/a_b and tank/a/b must not share a lock; a name that
        # escapes past a file name's 255 bytes (a long one with many ':') is cut, with a hash
        name = "lock-" + urllib.parse.quote(dataset, safe="")
        if len(name) > NAME_MAX:
            digest = hashlib.sha256(dataset.encode()).hexdigest()[:16]
            name = f"{name[:NAME_MAX - 17]}~{digest}"
        super().__init__(folder / name, f"another zfsmgr run is working on {dataset}", wait)


class RunLock(Lock):
    """One backup run per server (`tag`) at a time."""

    def __init__(self, folder: Path, tag: str):
        super().__init__(folder / f"lock-run-{tag}", "another zfsmgr backup run to this server"
                         " is in progress")
