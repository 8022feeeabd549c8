"""Sized readers over byte streams, and a child process as one (ProcessFilter).

A Reader refuses whole-stream reads (`read()` needs a size) and is a context manager whose
close releases what it holds, never its source. ProcessFilter runs a program (through the one
runner, runner.spawn) with the source fed to its stdin from a thread and its stderr drained,
so read() returns the program's output as it comes: compress.py's zstd and crypt.py's age.
A failed child is a CodecError (a RuntimeError) naming its command line, exit code and stderr tail.
"""

from __future__ import annotations

import shlex
import subprocess
import threading

from zfsmgr.errors import CodecError, ZfsError
from zfsmgr.runner import spawn

FEED_SIZE = 1 << 16  # input read size for a filter's feeder and the decompressor


def read_bytes(source, size: int) -> bytes:
    """Read up to size bytes from source as bytes; b"" only at EOF ('' is accepted as EOF)."""
    data = source.read(size)
    if data == "":
        return b""
    if not isinstance(data, (bytes, bytearray, memoryview)):  # None: a non-blocking source
        raise TypeError(f"source.read() returned {type(data).__name__}, not bytes")
    return data if type(data) is bytes else bytes(data)


def read_full(source, size: int) -> bytes:
    """Read exactly size bytes unless EOF comes first (pipes return short reads)."""
    parts, got = [], 0
    while got < size:
        data = read_bytes(source, size - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Reader:
    """Shared file-like plumbing: sized reads only, context manager."""

    def close(self) -> None:
        """Release resources; the source is not closed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def _check_size(size) -> int:
        if size is None or size < 0:
            raise ValueError("read() needs a size: whole-stream reads are not allowed")
        return size


def write_all(pipe, data: bytes) -> bool:
    """Write all of data to an unbuffered pipe; False if the reading end has gone away."""
    view = memoryview(data)
    try:
        while view:
            view = view[pipe.write(view):]
    except BrokenPipeError:
        return False  # the child exited; its exit status says why
    return True


class ProcessFilter(Reader):
    """Run argv with the source fed to stdin from a thread; read() returns its stdout."""

    def __init__(self, argv: list[str], source) -> None:
        self._argv = argv
        self._source = source
        self._feed_error: BaseException | None = None
        self._error: BaseException | None = None
        self._stderr_tail = bytearray()
        self._finished = False
        self.raw_bytes = 0  # bytes fed to the child so far
        try:
            self._proc = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, bufsize=0)
        except ZfsError as exc:
            raise CodecError(f"cannot start {shlex.join(argv)}: {exc.stderr}") from exc
        self._feeder = threading.Thread(target=self._feed, name=f"{argv[0]}-feed", daemon=True)
        self._drainer = threading.Thread(target=self._drain, name=f"{argv[0]}-stderr", daemon=True)
        self._feeder.start()
        self._drainer.start()

    def _feed(self) -> None:
        stdin = self._proc.stdin
        try:
            while True:
                data = read_bytes(self._source, FEED_SIZE)
                if not data:
                    break
                self.raw_bytes += len(data)
                if not write_all(stdin, data):
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the reading thread by _finish()
            self._feed_error = exc
            self._proc.kill()  # the child must not end its output cleanly on a partial input
        finally:
            stdin.close()  # unbuffered: nothing to flush, so no BrokenPipeError here

    def _drain(self) -> None:
        for data in iter(lambda: self._proc.stderr.read(FEED_SIZE), b""):
            self._stderr_tail += data
            del self._stderr_tail[:-4096]

    def read(self, size: int = -1) -> bytes:
        """Return up to size bytes of the child's output; b"" at EOF; RuntimeError if it failed."""
        self._check_size(size)
        if self._error is not None:
            raise self._error
        if self._finished or not size:
            return b""
        data = self._proc.stdout.read(size)
        if not data:
            self._finished = True
            returncode = self._reap()
            if self._feed_error is not None:
                self._error = self._feed_error
            elif returncode != 0:
                tail = self._stderr_tail.decode("utf-8", "replace").strip()
                self._error = CodecError(
                    f"{shlex.join(self._argv)} exited with {returncode}: {tail}")
            if self._error is not None:
                raise self._error
        return data

    def _reap(self) -> int:
        returncode = self._proc.wait()
        self._feeder.join()
        self._drainer.join()
        self._proc.stdout.close()
        self._proc.stderr.close()
        return returncode

    def close(self) -> None:
        """Kill the child if it still runs and reap it; the source is not closed."""
        if not self._finished:
            self._finished = True
            self._proc.kill()  # no-op once it has exited; it is reaped below either way
            self._reap()
