"""HEALTHCHECK_URL: tell a dead man's switch (healthchecks.io, or any alike) about each run.

The healthchecks.io convention: `POST URL/start` when a run begins, `POST URL` with the run's
summary when every selected dataset was backed up, `POST URL/fail` with the tail of the run's
warnings and errors otherwise. The switch raises the alarm when the success ping stops coming,
which also covers a host that stopped running backups at all. A ping that cannot be delivered
is a warning on stderr, never the run's failure. The URL carries the check's secret: only its
host is ever printed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Deque, Iterator, Optional

from zfsmgr import __version__

TAIL_LINES = 40
MAX_BODY = 10_000  # healthchecks.io keeps the first 100 kB of a body


class Tail(logging.Handler):
    """The last log records at WARNING and above, for the /fail body."""

    def __init__(self, lines: int = TAIL_LINES):
        super().__init__(logging.WARNING)
        self.lines: Deque[str] = collections.deque(maxlen=lines)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Healthcheck:
    """Pings of one check URL."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url, timeout
        self.host = urllib.parse.urlsplit(url).hostname or "?"

    def _at(self, suffix: str) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + suffix))

    def ping(self, suffix: str = "", body: str = "") -> bool:
        """POST to URL+suffix ("", "/start", "/fail"); False (with a warning) if it failed."""
        data = body.encode("utf-8", "replace")[-MAX_BODY:]
        request = urllib.request.Request(self._at(suffix), data=data, method="POST", headers={
            "Content-Type": "text/plain; charset=utf-8", "User-Agent": f"zfsmgr/{__version__}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read(65536)
            return True
        except Exception as exc:  # noqa: BLE001 - a ping never fails or stops a run: not
            # reachable, a garbled answer (http.client's BadStatusLine), a URL http.client
            # refuses (its message quotes the secret path: only the type is shown)
            why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) \
                else type(exc).__name__
            sys.stderr.write(f"zfsmgr: warning: healthcheck ping{suffix or ''} to {self.host}"
                             f" failed ({why})\n")
            return False


class Run:
    """What a run reports: `note` lines for the success ping, `failed` datasets for /fail."""

    def __init__(self) -> None:
        self.notes: list = []
        self.failures: list = []

    def note(self, text: str) -> None:
        """A line for the success ping's body."""
        self.notes.append(text)

    def failed(self, text: str) -> None:
        """One selected dataset failed (the run goes on): the run pings /fail, not success."""
        self.failures.append(text)


@contextlib.contextmanager
def pinged(url: Optional[str], what: str) -> Iterator[Run]:
    """Ping /start, then success (the notes) or /fail (the log tail and the error) around a
    run; without a URL, just run. The run fails if anything raises out of the block or if any
    dataset was marked `failed`: success is pinged only when every selected dataset succeeded."""
    run = Run()
    if not url:
        yield run
        return
    check, tail = Healthcheck(url), Tail()
    root = logging.getLogger()
    root.addHandler(tail)
    check.ping("/start", what)
    try:
        yield run
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else \
            str(exc) or type(exc).__name__
        check.ping("/fail", "\n".join([f"{what} failed", *tail.lines, f"error: {reason}"]))
        raise
    finally:
        root.removeHandler(tail)
    if run.failures:
        check.ping("/fail", "\n".join([f"{what}: {len(run.failures)} failed", *run.notes,
                                       *tail.lines, *(f"error: {f}" for f in run.failures)]))
    else:
        check.ping("", "\n".join([what, *run.notes]))
