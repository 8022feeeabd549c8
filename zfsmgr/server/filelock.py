"""An exclusive lock between processes and threads, on a lock file beside what it guards."""

from __future__ import annotations

import fcntl
import os
import threading

from zfsmgr.files import hand_over

_local_locks: dict = {}
_guard = threading.Lock()


class FileLock:
    """`with FileLock(path):` holds flock(LOCK_EX) on `path` and a per-path thread lock."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        with _guard:
            self._thread_lock = _local_locks.setdefault(self.path, threading.RLock())
        self._fd = -1

    def __enter__(self) -> "FileLock":
        self._thread_lock.acquire()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            hand_over(self.path)  # one that root made stays usable by the folder's owner
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        finally:
            self._thread_lock.release()
