"""Interrupts held back while a request whose answer must not be lost is in flight.

An interrupted `POST /upload` opens a session on the server whose id the client never learns,
so it could not abort it. `Held` keeps SIGINT and SIGTERM from breaking into such a request:
the first one is noted and the request goes on, for at most `patience` seconds more (then the
interrupt breaks in after all: SIGALRM); a second one breaks in at once. Once the request is
done, the caller sees `held.signum`, aborts what the request opened (still in the block, so
within the same patience) and raises KeyboardInterrupt. If the request fails meanwhile,
leaving the block raises KeyboardInterrupt instead of its error. Off the main thread (parallel
uploads) nothing is held: signals reach the main thread only, which cancels the uploads at
their next chunk.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

PATIENCE = 10.0  # seconds a held interrupt waits for the request's answer


class Held:
    """A context manager holding SIGINT/SIGTERM back (see the module docstring)."""

    def __init__(self, patience: float = PATIENCE):
        self.patience, self.signum = patience, 0
        self._saved: Optional[dict] = None

    def __enter__(self) -> "Held":
        if threading.current_thread() is threading.main_thread():
            held = [sig for sig in (signal.SIGINT, signal.SIGTERM)  # an ignored one stays so
                    if signal.getsignal(sig) is not signal.SIG_IGN] + [signal.SIGALRM]
            self._saved = {sig: signal.signal(sig, self._note) for sig in held}
        return self

    def _note(self, signum, _frame) -> None:
        if signum == signal.SIGALRM or self.signum:  # no answer in time, or asked twice
            raise KeyboardInterrupt
        self.signum = signum
        signal.setitimer(signal.ITIMER_REAL, self.patience)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._saved is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in self._saved.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if self.signum and exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            raise KeyboardInterrupt from None
