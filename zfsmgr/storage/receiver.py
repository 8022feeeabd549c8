"""A live `zfs recv` fed from an upload's parts as they arrive (the `local` store's pipeline).

Part requests hand their bytes to a bounded queue; one thread per upload decompresses them and
writes the stream into `zfs recv`. Nothing is staged on disk, so a local-pool server needs no
scratch space the size of the stream, and memory stays at the queue's few MiB. A receive that
dies (zfs refused the stream, the server was killed) is reported on the next write or at
`finish`; with `recv -s` its progress survives as the target's `receive_resume_token`.
`zfs recv` starts only once the head of the stream passed `check` (sendstream.check_head): a
stream that is not a plain zfs substream never reaches zfs.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Optional

from zfsmgr.compress import decompressor
from zfsmgr.errors import StorageFull, ValidationError, ZfsError
from zfsmgr.files import CHUNK
from zfsmgr.storage.base import StorageError
from zfsmgr.storage.sendstream import BEGIN_SIZE
from zfsmgr.zfs import Zfs

# what zfs recv says of a stream whose content is damaged or made up: the sender's fault (400)
REFUSED_STREAM = ("invalid backup stream", "invalid stream", "checksum mismatch",
                  "unsupported version", "unsupported feature", "invalid record type")
QUEUE_CHUNKS = 8  # bytes handed over but not yet decompressed: at most 8 MiB per upload


class Feed:
    """A bounded byte queue between the part requests (writers) and the receive thread."""

    def __init__(self, limit: int = QUEUE_CHUNKS):
        self.queue: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=limit)
        self.buffer, self.offset, self.ended = b"", 0, False
        self.abandoned = threading.Event()
        self.starved = False  # the reader waits for data

    def put(self, data: Optional[bytes], alive) -> None:
        """Queue `data` (None ends the stream); gives up when `alive()` turns false."""
        while not self.abandoned.is_set():
            try:
                self.queue.put(data, timeout=0.2)
                return
            except queue.Full:
                if not alive():
                    break
        raise StorageError("the receive stopped before it took all the data")

    def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" once the stream ended (or was abandoned)."""
        while self.offset >= len(self.buffer) and not self.ended:
            try:
                item = self.queue.get(block=False)
            except queue.Empty:
                self.starved = True
                try:
                    item = self.queue.get(timeout=0.2)
                except queue.Empty:
                    if self.abandoned.is_set():
                        self.ended = True
                    continue
            self.starved = False
            if item is None:
                self.ended = True
            else:
                self.buffer, self.offset = item, 0
        data = self.buffer[self.offset:self.offset + size]  # copies only what is returned
        self.offset += len(data)
        return data


class LiveReceive:
    """`zfs recv [-s] -u target` on a thread, fed through a Feed."""

    def __init__(self, zfs: Zfs, target: str, codec: str, resumable: bool,
                 check: Optional[Callable[[bytes], object]] = None):
        self.target, self.codec = target, codec
        self.zfs, self.resumable, self.check = zfs, resumable, check
        self.feed = Feed()
        self.raw_bytes = 0  # decompressed bytes written into zfs recv
        self.error: Optional[BaseException] = None
        self.command = None  # zfs recv, once the head of the stream passed `check`
        self.head_checked = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"recv {target}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            stream = decompressor(self.codec, self.feed)
            try:
                head = b""
                while len(head) < BEGIN_SIZE:
                    more = stream.read(BEGIN_SIZE - len(head))
                    if not more:
                        break
                    head += more
                if self.check is not None:
                    self.check(head)
                if self.feed.abandoned.is_set():
                    raise StorageError(f"the receive into {self.target} was abandoned")
                self.command = self.zfs.receive(self.target, resumable=self.resumable)
                self.head_checked.set()
                self._give(head)
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    if self.feed.abandoned.is_set():
                        raise StorageError(f"the receive into {self.target} was abandoned")
                    self._give(chunk)
            finally:
                stream.close()
            if self.feed.abandoned.is_set():
                raise StorageError(f"the receive into {self.target} was abandoned")
            self.command.finish()
        except BaseException as exc:  # reported to the writer or at finish()
            self.error = exc
            if self.command is not None:
                self.command.kill()
            self.feed.abandoned.set()
        finally:
            self.head_checked.set()

    def _give(self, data: bytes) -> None:
        """Write to zfs recv; data it no longer reads after it succeeded is the client's."""
        try:
            self.command.write(data)
        except ZfsError:
            if self.command.proc.returncode == 0:  # it took a whole stream, and more came
                raise ValidationError(f"the stream sent for {self.target} goes on after its"
                                      f" end: zfs recv took a whole stream in"
                                      f" {self.raw_bytes} bytes") from None
            raise
        self.raw_bytes += len(data)

    @property
    def alive(self) -> bool:
        """Whether the receive can still take data."""
        return self.error is None and self.thread.is_alive()

    def write(self, data: bytes) -> None:
        """Hand `data` to the receive; raises StorageError once it has failed."""
        self._raise()
        try:
            self.feed.put(data, lambda: self.thread.is_alive())
        except StorageError:
            self.thread.join(timeout=5)
            self._raise()
            raise

    def await_head(self, timeout: float = 30.0) -> None:
        """Wait until the head of the stream passed its check (or the receive failed), while
        the receive has data to read; raise its error (ValidationError: not a stream the store
        takes). A head longer than the data handed over so far is checked later, still before
        zfs recv starts."""
        deadline, idle = time.monotonic() + timeout, 0
        while not self.head_checked.is_set() and time.monotonic() < deadline:
            idle = idle + 1 if self.feed.starved and self.feed.queue.empty() else 0
            if idle >= 3:
                break
            time.sleep(0.01)
        self._raise()

    def finish(self) -> None:
        """End the stream and wait until zfs has received it all; raise if it failed."""
        if self.thread.is_alive():
            self.feed.put(None, lambda: self.thread.is_alive())
        self.thread.join()
        self._raise()

    def kill(self) -> None:
        """Stop the receive (zfs keeps a resume token where `recv -s` was used)."""
        self.feed.abandoned.set()
        if self.command is not None:
            self.command.kill()
        self.thread.join(timeout=30)

    def _raise(self) -> None:
        if self.error is None:
            return
        if isinstance(self.error, (StorageError, ValidationError)):
            raise self.error
        if isinstance(self.error, ZfsError) and any(
                text in self.error.stderr for text in ("out of space", "quota exceeded")):
            raise StorageFull(f"the local store is full: cannot receive into {self.target}:"
                              f" {self.error}")
        if isinstance(self.error, ValueError) and not isinstance(self.error, ValidationError):
            raise ValidationError(f"the stream sent for {self.target} does not decompress"
                                  f" as {self.codec}: {self.error}")
        if isinstance(self.error, ZfsError) and any(
                text in self.error.stderr for text in REFUSED_STREAM):
            raise ValidationError(f"zfs recv refused the stream sent for {self.target}:"
                                  f" {self.error.stderr.splitlines()[-1]}")
        raise StorageError(f"cannot receive into {self.target}: {self.error}")
