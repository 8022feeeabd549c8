"""Short-lived answers of the routes anyone reaching the port may call (/health, /metrics, the
status page): each costs the fleet (a store check: a zfs command or an S3 call; a scan of every
client's catalog), so it is computed at most once per `ttl` seconds, whoever asks and however
many ask at once. A request that finds the value being computed waits for that result instead
of computing it again. A new `key` (clients.json changed) or `clear()` (a client changed
something) makes the next caller compute it afresh."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable

OPEN_CACHE_SECONDS = 2.0


class Cached:
    """The value of `compute()`, kept `ttl` seconds; thread-safe, one computation at once.
    A computation that raises is not kept, nor one that a `clear()` overtook (its caller gets
    it all the same). `clear()` never waits for a computation: every client's part and commit
    clears, and a /health stuck on a slow store check held each of them as long."""

    _UNSET = object()

    def __init__(self, compute: Callable[[], Any], ttl: float = OPEN_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._compute, self.ttl, self._clock = compute, ttl, clock
        self._computing = threading.Lock()  # one computation at once
        self._lock = threading.Lock()  # the fields below, held for moments only
        self._value: Any = self._UNSET
        self._key: Hashable = None
        self._at = 0.0
        self._cleared = 0  # clear()s so far

    def _fresh(self, key: Hashable) -> bool:
        return self._value is not self._UNSET and key == self._key \
            and self._clock() - self._at < self.ttl

    def get(self, key: Hashable = None) -> Any:
        """The kept value if it is younger than `ttl` and was computed for `key`, else a new
        one (a caller that finds one being computed waits for it)."""
        with self._computing:
            with self._lock:
                if self._fresh(key):
                    return self._value
                cleared = self._cleared
            value = self._compute()
            with self._lock:
                if cleared == self._cleared:
                    self._value, self._key, self._at = value, key, self._clock()
            return value

    def clear(self) -> None:
        with self._lock:
            self._value = self._UNSET
            self._cleared += 1
