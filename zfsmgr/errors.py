"""Every error type of zfsmgr, each carrying the exit code and the HTTP status it maps to.

The CLI exits with `exc.exit_status`; the server answers with `exc.http_status`. Both are class
attributes, so a subclass states its own and nothing depends on the order of a lookup table.
"""

from __future__ import annotations

import enum
import shlex
from typing import Optional, Sequence


class ExitStatus(enum.IntEnum):
    """Documented exit codes of every `zfsmgr` command."""

    OK = 0
    ERROR = 1  # the operation failed (zfs, server, storage, integrity)
    USAGE = 2  # bad command line or bad settings
    LOCKED = 3  # another run holds the lock for this dataset
    UNREACHABLE = 4  # the server could not be reached
    VERIFY_FAILED = 5  # verify found a damaged or incomplete backup


class ZfsmgrError(Exception):
    """Base error: its message is one line a person can act on."""

    exit_status = ExitStatus.ERROR
    http_status = 500


class UsageError(ZfsmgrError):
    """The command line or a setting is wrong."""

    exit_status = ExitStatus.USAGE
    http_status = 400


class SettingsError(UsageError):
    """A setting is missing or malformed."""


class ValidationError(ZfsmgrError, ValueError):
    """A name or value from outside failed validation."""

    exit_status = ExitStatus.USAGE
    http_status = 400


class LockedError(ZfsmgrError):
    """Another zfsmgr run holds the lock."""

    exit_status = ExitStatus.LOCKED
    http_status = 409


class ServerUnreachable(ZfsmgrError):
    """The backup server could not be reached."""

    exit_status = ExitStatus.UNREACHABLE
    http_status = 502


class IntegrityError(ZfsmgrError):
    """Stored data does not match its recorded checksum or size."""

    exit_status = ExitStatus.VERIFY_FAILED


class BrokenChain(IntegrityError):
    """A stream needed to rebuild a snapshot is not on the server (exit 5)."""


# -- the server's answers to a client ------------------------------------------------------

class CatalogDamaged(ZfsmgrError):
    """The server's catalog database is unreadable or fails its integrity check."""


class Unauthorized(ZfsmgrError):
    """Unknown client or wrong key (401)."""

    http_status = 401


class Forbidden(ZfsmgrError):
    """The client is disabled or may not do this (403)."""

    http_status = 403


class Conflict(ZfsmgrError):
    """The request contradicts the state of the upload or the catalog (409)."""

    http_status = 409


class CommitUnderWay(Conflict):
    """The upload is committing: it cannot be aborted now (409, `committing`); its state says
    how the commit ended."""

    payload = {"committing": True}


class TooManyUploads(Conflict):
    """The client has as many open uploads as it may (409): abort one, or let it expire."""


class TooBusy(ZfsmgrError):
    """The client already has its share of requests in the server (429): retry shortly."""

    http_status = 429


class VerificationFailed(Conflict):
    """What the server holds of an upload is not what the client declared (409)."""


# -- storage -------------------------------------------------------------------------------

class StorageError(ZfsmgrError):
    """The storage backend failed or is unreachable (503: worth retrying later)."""

    http_status = 503


class NotFound(StorageError):
    """No object or upload under that name (404)."""

    http_status = 404


class QuotaExceeded(StorageError):
    """A part would take the client past its quota (413)."""

    http_status = 413


class TooLargeForStore(StorageError):
    """A stream larger than the store keeps as one object (S3: 5 TiB)."""

    http_status = 413


class Locked(StorageError):
    """The store's Object Lock (or a hold) refuses to delete it before its retain-until (409)."""

    http_status = 409


class OutOfOrder(StorageError):
    """A part that does not continue what is staged (409, with the parts held): the client's
    fault, which it mends by asking for the upload's state."""

    http_status = 409

    def __init__(self, message: str, parts_held: int):
        super().__init__(message)
        self.payload = {"parts_held": parts_held}


class StorageFull(StorageError):
    """The store has no room left (507): the message names the store and the room needed.
    Nothing half-written stays behind; the same request succeeds once there is room."""

    http_status = 507


class Unsupported(StorageError):
    """The store cannot do what was asked (a 409, not worth retrying)."""

    http_status = 409


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


class NeedsFullBackup(Unsupported):
    """An incremental cannot be stored on what the server holds; a full backup can."""


# -- external commands ---------------------------------------------------------------------

class ZfsError(ZfsmgrError):
    """A zfs/zpool/zstd command failed: carries argv, exit code and the command's own message."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        tail = " ".join(self.stderr.splitlines()[-3:]) or "(no message)"
        super().__init__(f"`{shlex.join(self.argv)}` failed (exit {returncode}): {tail}")


class MissingProgram(ZfsError):
    """A program zfsmgr needs (zfs, zpool, zstd) is not installed where it looks."""

    exit_status = ExitStatus.USAGE
    http_status = 503

    def __init__(self, name: str, looked_in: Sequence[str]):
        ZfsmgrError.__init__(self, f"{name} not found (looked in PATH and"
                                   f" {', '.join(looked_in)}): is it installed?")
        self.argv, self.returncode, self.stderr = [name], 127, f"{name}: command not found"


class ZfsNotFound(ZfsError):
    """The command failed because the dataset, snapshot or bookmark does not exist."""


# -- the client's view of the server -------------------------------------------------------

RETRYABLE_HTTP = frozenset({408, 429, 502, 503, 504})  # trouble that may pass; not a refusal


class ServerError(ZfsmgrError):
    """The server answered with an error status and message."""

    def __init__(self, status: int, message: str, payload: Optional[dict] = None):
        super().__init__(f"server refused ({status}): {message}")
        self.status, self.server_message = status, message
        self.payload = payload or {}

    @property
    def transient(self) -> bool:
        """Worth retrying: storage unavailable, a proxy or gateway in trouble, rate limits.

        A 500 is the server's own bug and a 4xx is a refusal; retrying either only repeats it."""
        return self.status in RETRYABLE_HTTP


class AnswerTooLarge(ZfsmgrError):
    """The server's JSON answer is larger than a client reads (protocol.MAX_ANSWER)."""


class CodecError(ZfsmgrError, RuntimeError):
    """A filter program (zstd) failed or could not start: a one-line error naming its command
    line, not an "internal error" (a RuntimeError as well, which its readers catch)."""


class CryptError(CodecError):
    """`age` failed."""


class StreamChanged(ZfsmgrError):
    """The regenerated stream does not match what the server holds: start over."""
