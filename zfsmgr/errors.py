"""Error types shared by every part of zfsmgr, and the exit codes they map to."""

from __future__ import annotations

import enum


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


class UsageError(ZfsmgrError):
    """The command line or a setting is wrong."""

    exit_status = ExitStatus.USAGE


class SettingsError(UsageError):
    """A setting is missing or malformed."""


class LockedError(ZfsmgrError):
    """Another zfsmgr run holds the lock."""

    exit_status = ExitStatus.LOCKED


class ServerUnreachable(ZfsmgrError):
    """The backup server could not be reached."""

    exit_status = ExitStatus.UNREACHABLE


class IntegrityError(ZfsmgrError):
    """Stored data does not match its recorded checksum or size."""

    exit_status = ExitStatus.VERIFY_FAILED


class ValidationError(ZfsmgrError, ValueError):
    """A name or value from outside failed validation."""

    exit_status = ExitStatus.USAGE
