"""Log lines as the ecosystem takes them: plain text, JSON for shippers, journald's own form.

- plain (default): `2026-12-01 08:00:00,123 INFO zfsmgr.server: message`;
- `LOG_FORMAT=json`: one object per line with the same fields,
  `{"time": "2026-12-01T08:00:00.123+00:00", "level": "INFO", "logger": "zfsmgr.server",
  "message": "…"}` (and `"exception"` with the traceback when there is one);
- under systemd, when stderr is the journal (`JOURNAL_STREAM` names its device and inode), plain
  lines lose the timestamp (journald adds its own) and start with the syslog priority, `<6>`,
  which journald turns into the entry's priority (`journalctl -p warning` works).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Mapping, Optional, TextIO

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def one_line(text: str) -> str:
    """`text` with its line breaks and other control characters escaped (`\\n`, `\\x1b`):
    a request's path or a client's text can never start a log line of its own."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class PlainFormatter(logging.Formatter):
    """`PLAIN` lines, each message on its one line (a traceback follows it as it is)."""

    def __init__(self, fmt: str = PLAIN) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                     timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class JournalFormatter(PlainFormatter):
    """Plain lines without a timestamp, led by the syslog priority journald reads."""

    def __init__(self) -> None:
        super().__init__(JOURNAL)

    def format(self, record: logging.LogRecord) -> str:
        record.priority = _PRIORITY.get(record.levelno, 6)
        return super().format(record)


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def formatter(log_format: str, stream: TextIO,
              environ: Optional[Mapping[str, str]] = None) -> logging.Formatter:
    """The formatter for LOG_FORMAT on `stream`."""
    if log_format == "json":
        return JsonFormatter()
    if under_journald(stream, os.environ if environ is None else environ):
        return JournalFormatter()
    return PlainFormatter()


def configure(verbose: bool, log_format: str = "plain", stream: Optional[TextIO] = None) -> None:
    """Set up the root logger once for a command."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(log_format, stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("waitress.queue", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
