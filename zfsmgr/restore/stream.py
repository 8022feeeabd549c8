"""One stored stream coming down from the server: resumed when the connection breaks, counted
and hashed as it passes, checked against its manifest at the end. Plus the progress line.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import threading
from collections.abc import Callable, Iterator

from zfsmgr.crypt import Plaintext
from zfsmgr.errors import IntegrityError, ServerError, ServerUnreachable, ZfsmgrError
from zfsmgr.protocol import (HEADER_COMPRESSION, HEADER_OFFSET, HEADER_SHA256, HEADER_STORED_SIZE,
                             Manifest)
from zfsmgr.files import CHUNK
from zfsmgr.remote import ServerClient, shut_down
from zfsmgr.progress import Progress

RETRIES = 5  # reconnections in a row without a byte in between
BACKOFF = 0.5  # seconds before the first reconnection; doubles each time


class StoredStream:
    """The stored bytes of one backup, read in order with `read(n)`.

    A connection that breaks (error, or end of body before the recorded size) is reopened with
    `Range: bytes=N-` from the byte reached, up to `retries` times in a row with a doubling
    backoff. `check()` at the end raises IntegrityError naming the key unless the bytes had the
    recorded size and sha256. A download the server sends with neither (the `local` store's
    fresh `zfs send`) is left to zfs's own stream checksums.

    `cancel()`, from another thread, stops it for good: a codec's feeder thread reads it, and
    a restore that is interrupted must not wait for a stalled server to time out, reconnect,
    and time out again before that thread lets go.
    """

    def __init__(self, client: ServerClient, manifest: Manifest, progress: Progress | None = None,
                 retries: int = RETRIES, backoff: float = BACKOFF,
                 sleep: Callable[[float], object] | None = None, identity: str = ""):
        self.client, self.manifest, self.progress = client, manifest, progress
        self.encryption = manifest.encryption  # "age": the stored bytes are an age file
        self.identity = identity  # the age key file that opens them
        self._cancelled = threading.Event()
        self._connecting = None  # the socket of a reconnection awaiting its answer
        self.retries, self.backoff = retries, backoff
        self.sleep = sleep if sleep is not None else self._cancelled.wait  # cut short by cancel
        self.offset, self.hash, self.eof = 0, hashlib.sha256(), False
        self.key = manifest.key
        self._failures = 0  # in a row, without a byte in between
        self._body = self._open_retrying(None)
        headers = self._body.headers
        self.compression = headers.get(HEADER_COMPRESSION) or manifest.compression
        sha = headers.get(HEADER_SHA256)
        self.expected_sha = (sha if sha is not None else manifest.sha256).strip().lower()
        stored = headers.get(HEADER_STORED_SIZE)  # empty: the server knows no size in advance
        self.size: int | None = manifest.stored_size if stored is None else (
            int(stored) if stored.strip().isdigit() else None)
        self._check_length(self._body)
        if progress is not None and progress.total is None:
            progress.total = self.size

    def _opening(self, sock) -> None:
        """The socket of a (re)connection, while its answer is awaited: cancel() cuts it off."""
        self._connecting = sock
        if self._cancelled.is_set():
            shut_down(sock)

    def _open(self):
        try:
            try:
                body = self.client.download(self.key, self.offset, on_socket=self._opening)
            finally:
                self._connecting = None
        except ServerError as exc:
            if exc.status in (404, 416):
                raise IntegrityError(f"{self.key} is missing from the server's storage:"
                                     f" {exc.server_message}") from None
            raise
        status = body.response.status
        # At an offset, a fixed object answers 206; a stream made anew (a `local` store's
        # send) answers 200 and says where its body starts.
        skipped = status == 200 and body.headers.get(HEADER_OFFSET) == str(self.offset)
        if (status != 206 and not skipped) if self.offset else (status != 200):
            body.close()
            raise ZfsmgrError(f"download of {self.key} from byte {self.offset}: unexpected"
                              f" HTTP status {status}")
        if status == 206:
            start = (body.headers.get("Content-Range") or "").split(" ")[-1].split("-")[0]
            if start != str(self.offset):
                body.close()
                raise ZfsmgrError(f"download of {self.key}: asked for byte {self.offset}, the"
                                  f" server answered {body.headers.get('Content-Range')!r}")
        return body

    def _check_length(self, body) -> None:
        """A body whose length contradicts the recorded size means the object was changed."""
        length = (body.headers.get("Content-Length") or "").strip()
        if self.size is not None and length.isdigit() and self.offset + int(length) != self.size:
            body.close()
            raise IntegrityError(f"{self.key} is damaged: the server holds"
                                 f" {self.offset + int(length)} bytes, the manifest records"
                                 f" {self.size}")

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` stored bytes; b"" once the whole object has been read."""
        if self.eof or size == 0:
            return b""
        while True:
            self._stop_if_cancelled()
            if self._body is None:  # closed by the caller: carry on from the byte reached
                self._body = self._open_retrying(None)
                self._check_length(self._body)
                continue  # through the cancel check
            failure: BaseException | None = None
            try:
                data = self._body.read(size)
            except (OSError, http.client.HTTPException) as exc:
                data, failure = b"", exc
            self._stop_if_cancelled()  # what a shut-down socket gave is not the stream's end
            if data:
                self._failures = 0
                return self._count(data)
            if failure is None and (self.size is None or self.offset >= self.size):
                self.eof = True
                self.close()
                return b""
            self.close()
            self._body = self._open_retrying(failure or "connection closed early")
            self._check_length(self._body)
            self._stop_if_cancelled()  # a cancel while it reconnected

    def _count(self, data: bytes) -> bytes:
        self.offset += len(data)
        self.hash.update(data)
        if self.size is not None and self.offset > self.size:
            raise IntegrityError(f"{self.key} is damaged: the server sent more than the"
                                 f" {self.size} bytes the manifest records")
        if self.progress is not None:
            self.progress.advance(len(data))
        return data

    def _open_retrying(self, failure):
        """(Re)open the download at `offset`, through transient trouble, with backoff."""
        while True:
            self._stop_if_cancelled()
            if failure is not None:
                self._failures += 1
                if self._failures > self.retries:
                    raise ServerUnreachable(f"download of {self.key} failed at byte"
                                            f" {self.offset} after {self.retries} retries:"
                                            f" {failure}")
                self.sleep(self.backoff * 2 ** (self._failures - 1))
                self._stop_if_cancelled()
            try:
                return self._open()
            except ServerUnreachable as exc:
                failure = exc
            except ServerError as exc:
                if not exc.transient:
                    raise
                failure = exc

    def damage(self) -> str | None:
        """Why the bytes read do not match the manifest (None if they do); call at the end."""
        if self.size is not None and self.offset != self.size:
            return f"{self.offset} bytes where the manifest records {self.size}"
        digest = self.hash.hexdigest()
        if self.expected_sha and digest != self.expected_sha:
            return f"sha256 {digest} where the manifest records {self.expected_sha}"
        return None

    def check(self) -> None:
        """Raise IntegrityError naming the key unless all was read and matches the manifest."""
        if not self.eof:
            raise IntegrityError(f"{self.key}: the stream ended at byte {self.offset} before"
                                 " the end of the stored object")
        problem = self.damage()
        if problem:
            raise IntegrityError(f"{self.key} is damaged: {problem}")

    def drain(self) -> None:
        """Read (and hash) the rest of the object, discarding it."""
        while self.read(CHUNK):
            pass

    def verify_whole(self) -> None:
        """Read the rest and raise IntegrityError naming the key unless it all matches."""
        self.drain()
        self.check()

    def blame(self) -> None:
        """After a consumer (a codec, `zfs recv`) rejected the bytes: raise IntegrityError if
        the rest of the stream proves them damaged; return when it cannot tell (no checksum)
        or they are whole, so the consumer's own error stands."""
        if self.verifiable:
            self.verify_whole()

    @property
    def verifiable(self) -> bool:
        """Whether the server gave a checksum to compare the bytes with."""
        return bool(self.expected_sha)

    def cancel(self) -> None:
        """Stop the download for good, from any thread: a read blocked on the network returns
        (its socket is shut down), and every read after raises ZfsmgrError."""
        self._cancelled.set()
        body, connecting = self._body, self._connecting
        if body is not None:
            body.abort()
        if connecting is not None:  # a reconnection waiting for the server's answer
            shut_down(connecting)

    def _stop_if_cancelled(self) -> None:
        if self._cancelled.is_set():
            self.close()
            raise ZfsmgrError(f"download of {self.key} stopped at byte {self.offset}")

    def close(self) -> None:
        """Drop the connection (reading again reconnects)."""
        body, self._body = self._body, None  # a feeder thread and its reader may both close
        if body is not None:
            try:
                body.close()
            except OSError:
                pass


def plain(source: "StoredStream"):
    """A reader of the plain zfs stream of `source` (zstd needs its binary, age its binary and
    key); a codec's refusal to start is a one-line ZfsmgrError naming the key."""
    try:
        return Plaintext(source, source.compression, source.encryption, source.identity)
    except (ValueError, RuntimeError) as exc:
        source.close()
        raise ZfsmgrError(f"cannot decompress {source.key}: {exc}") from exc


@contextlib.contextmanager
def reported(source: "StoredStream", outcome: str) -> Iterator["StoredStream"]:
    """Close a stream's progress line with `outcome`, or with "failed" if the block raises."""
    try:
        yield source
    except BaseException:
        if source.progress is not None:
            source.progress.finish("failed")
        raise
    if source.progress is not None:
        source.progress.finish(outcome)
