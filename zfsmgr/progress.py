"""Progress for people (a live line on a TTY) and for cron (one summary line at most)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def utc_text(epoch: float) -> str:
    """A moment for people to read, in UTC: 2024-02-13 14:30:00 UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def human(size: float) -> str:
    """Bytes in powers of 1024, labelled so: `512 B`, `635.8 MiB`, `1.2 GiB`."""
    value, unit = float(size), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{int(size)} B" if unit == 0 else f"{value:.1f} {_UNITS[unit]}"


class Progress:
    """Bytes, rate and ETA of one transfer: a `\\r` line on a terminal, redrawn at most four
    times a second; `finish(outcome)` prints one summary line, `finish()` just clears."""

    def __init__(self, label: str, total: Optional[int] = None,
                 stream: Optional[TextIO] = None, live: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.clock = label, total, clock
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)()) if live is None \
            else live
        self.done, self.started, self._shown = 0, clock(), float("-inf")

    def _rate(self, now: float) -> float:
        return self.done / max(now - self.started, 1e-6)

    def advance(self, count: int) -> None:
        """Count `count` more bytes."""
        self.update(self.done + count)

    def update(self, done: int) -> None:
        """Record the bytes done so far; redraw the line when due."""
        self.done = done
        now = self.clock()
        if self.live and now - self._shown >= 0.25:
            self._shown = now
            rate = self._rate(now)
            line = f"{self.label}: {human(done)}"
            if self.total:
                line += f" of {human(self.total)}"
            line += f" at {human(rate)}/s"
            if self.total and rate > 0 and done <= self.total:
                line += f", {done * 100 // self.total}%, ETA {int((self.total - done) / rate)}s"
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()

    def finish(self, outcome: Optional[str] = None) -> float:
        """End the line: print `label: outcome, bytes in time (rate)` if given; seconds taken."""
        now = self.clock()
        if outcome is not None:
            line = (f"{self.label}: {outcome}, {human(self.done)} in {now - self.started:.1f}s"
                    f" ({human(self._rate(now))}/s)")
            self.stream.write(f"\r{line}\x1b[K\n" if self.live else line + "\n")
        elif self.live:
            self.stream.write("\r\x1b[K")
        self.stream.flush()
        return now - self.started
