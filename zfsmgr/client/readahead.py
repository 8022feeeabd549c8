"""Plumbing between the compressed stream and the upload: read-ahead, counting, sized takes."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

from zfsmgr.files import CHUNK


class ReadAhead:
    """Reads `source` on a thread into a bounded queue of chunks, so compression goes on
    while the main thread waits for the server (a part's answer, a slow network)."""

    def __init__(self, source, limit: int = 16 << 20, chunk: int = CHUNK):
        self.source, self.chunk = source, chunk
        self.queue: "queue.Queue" = queue.Queue(maxsize=max(1, limit // chunk))
        self.buffer, self.done, self.stopped = b"", False, threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            while not self.stopped.is_set():
                data = self.source.read(self.chunk)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reader
            self._put(exc)

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end; re-raises the source's error."""
        while not self.buffer and not self.done:
            item = self.queue.get()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if not item:
                self.done = True
            self.buffer = item
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def close(self) -> None:
        """Stop the thread; one blocked on the source ends when that source is killed."""
        self.stopped.set()
        self.thread.join(timeout=0.5)


class Counter:
    """Counts raw bytes coming out of `zfs send`."""

    def __init__(self, source):
        self.source, self.count = source, 0

    def read(self, size: int) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        return data


def take(stream, size: int) -> Iterator[bytes]:
    """Up to `size` bytes of `stream`, in chunks."""
    left = size
    while left > 0:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
