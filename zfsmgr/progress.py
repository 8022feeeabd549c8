"""Progress for people (a live line on a TTY) and for cron (one summary line)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def human(size: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, the seed's units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PB"


class Progress:
    """Prints `bytes, rate, ETA` at most twice a second when stderr is a TTY."""

    def __init__(self, label: str, total: Optional[int] = None,
                 stream: Optional[TextIO] = None, live: Optional[bool] = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.started = self.last = time.monotonic()
        self.done = 0

    def update(self, done: int) -> None:
        """Record bytes done; redraw if due."""
        self.done = done
        now = time.monotonic()
        if self.live and now - self.last >= 0.5:
            self.last = now
            rate = done / max(now - self.started, 1e-6)
            line = f"{self.label}: {human(done)} at {human(rate)}/s"
            if self.total and rate > 0 and done <= self.total:
                line += f", {done * 100 // self.total}%, ETA {int((self.total - done) / rate)}s"
            self.stream.write("\r" + line.ljust(78)[:120])
            self.stream.flush()

    def finish(self) -> float:
        """Clear the live line; return seconds elapsed."""
        if self.live:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()
        return time.monotonic() - self.started
