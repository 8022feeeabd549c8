"""The one runner for external commands (`zfs`, `zpool`, `zstd`, `age`): argument lists,
stderr drained, errors with argv and the command's own message.

Every child process of zfsmgr starts here: `execute`/`run` for short commands, `spawn` for
pipelines (StreamingCommand for `zfs send`/`recv`, compress.py's zstd filter). A missing
program and a command that does not answer within its timeout are a ZfsError like any other
failure; a failure because the named dataset, snapshot or pool does not exist is a ZfsNotFound.
Programs named without a '/' are looked up on PATH and then in /sbin, /usr/sbin,
/usr/local/sbin and /usr/local/bin (cron's and sudo's PATH often lack them).

It knows no zfs subcommand: the typed wrappers that build zfs command lines are zfs.py's.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, List, Optional, Sequence

from zfsmgr.errors import MissingProgram, ZfsError, ZfsNotFound

# where programs are looked for after PATH (cron's is /usr/bin:/bin): zfs is in /sbin or
# /usr/sbin on Linux and FreeBSD; `pkg install age zstd` (FreeBSD) and hand installs put
# programs in /usr/local/bin
PROGRAM_DIRS = ("/sbin", "/usr/sbin", "/usr/local/sbin", "/usr/local/bin")
TIMEOUT = 600.0  # seconds a short command may take
INTERRUPT_GRACE = 10.0  # seconds a short command under way at an interrupt may take to end
_MISSING = re.compile(r"does not exist|no such pool|could not find any snapshots")


def find_program(name: str) -> str:
    """The path to run for `name`: as given when it holds a '/', else found on PATH, else in
    PROGRAM_DIRS; the bare name when it is nowhere."""
    if "/" in name:
        return name
    found = shutil.which(name)
    if found:
        return found
    for folder in PROGRAM_DIRS:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return name


def program_available(name: str) -> bool:
    """Whether `find_program(name)` names a program that exists."""
    path = find_program(name)
    return os.path.isfile(path) and os.access(path, os.X_OK)


def spawn(argv: Sequence[str], **popen) -> subprocess.Popen:
    """Start a child (the only Popen of zfsmgr); a program that cannot start is a ZfsError."""
    argv = list(argv)
    try:
        return subprocess.Popen(argv, executable=find_program(argv[0]), **popen)
    except FileNotFoundError as exc:  # one line, exit 2: nothing to retry, install it
        raise MissingProgram(argv[0], PROGRAM_DIRS) from exc
    except OSError as exc:
        raise ZfsError(argv, 127, f"{argv[0]}: {exc.strerror}") from exc


@dataclass(frozen=True)
class Completed:
    """What a short command did."""

    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    def error(self) -> ZfsError:
        """The ZfsError of this (failed) run: ZfsNotFound when the target does not exist."""
        message = self.stderr or self.stdout
        kind = ZfsNotFound if _MISSING.search(message) else ZfsError
        return kind(self.argv, self.returncode, message)


def execute(argv: Sequence[str], stdin_data: Optional[bytes] = None,
            timeout: float = TIMEOUT) -> Completed:
    """Run a short command to its end, whatever its exit code; ZfsError only when it cannot
    start or does not finish within `timeout` seconds (it is killed then)."""
    argv = list(argv)
    proc = spawn(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: a wrapper's children hold the pipes
        proc.communicate()
        raise ZfsError(argv, -9, f"no answer within {timeout:g} seconds: killed") from None
    except BaseException:  # Ctrl-C, SIGTERM: its own session kept the signal from it, and it
        try:  # went on behind the cleanup (a snapshot that appeared after it); it ends first
            proc.communicate(timeout=INTERRUPT_GRACE)
        except BaseException:  # too slow, or interrupted again: killed
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise
    return Completed(argv, proc.returncode, out.decode("utf-8", "replace"),
                     err.decode("utf-8", "replace"))


def run(argv: Sequence[str], check: bool = True, stdin_data: Optional[bytes] = None,
        timeout: float = TIMEOUT) -> str:
    """Run a short command, return its stdout; raise ZfsError (ZfsNotFound when the target
    does not exist) on a non-zero exit."""
    done = execute(argv, stdin_data, timeout)
    if check and done.returncode != 0:
        raise done.error()
    return done.stdout


class _StderrDrain(threading.Thread):
    """Reads a child's stderr as it runs, keeping the last lines only."""

    def __init__(self, stream: IO[bytes]):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, collections.deque(maxlen=50)

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            self.lines.append(line.decode("utf-8", "replace").rstrip())
        self.stream.close()

    def text(self) -> str:
        self.join(timeout=5)
        return "\n".join(self.lines)


class StreamingCommand:
    """A `zfs send` (reading) or `zfs recv` (writing) child; always reaped on exit.

    Use as a context manager. Leaving the block normally waits for the child and raises
    ZfsError if it failed; leaving it with an exception kills the child first.
    """

    def __init__(self, argv: Sequence[str], mode: str):
        self.argv = list(argv)
        kwargs = {"stdout": subprocess.PIPE} if mode == "r" else {
            "stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL}
        self.proc = spawn(self.argv, stderr=subprocess.PIPE, **kwargs)
        self.stream = self.proc.stdout if mode == "r" else self.proc.stdin
        self._stderr = _StderrDrain(self.proc.stderr)
        self._stderr.start()

    def __enter__(self) -> "StreamingCommand":
        return self

    def read(self, size: int) -> bytes:
        """Read up to `size` bytes of the child's stdout."""
        return self.stream.read(size)

    def write(self, data: bytes) -> None:
        """Write to the child's stdin."""
        try:
            self.stream.write(data)
        except BrokenPipeError:
            self.finish()
            raise ZfsError(self.argv, self.proc.returncode or 1, self._stderr.text()) from None

    def finish(self) -> None:
        """Close our end, wait for the child, raise ZfsError if it failed."""
        if self.stream and not self.stream.closed:
            try:
                self.stream.close()
            except BrokenPipeError:
                pass
        code = self.proc.wait()
        if code != 0:
            raise ZfsError(self.argv, code, self._stderr.text())

    def kill(self) -> None:
        """Stop the child and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        except OSError:
            pass
        self.proc.wait()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.kill()
        else:
            self.finish()
