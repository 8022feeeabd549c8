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
    A computation that raises is not kept."""

    _UNSET = object()

    def __init__(self, compute: Callable[[], Any], ttl: float = OPEN_CACHE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._compute, self.ttl, self._clock = compute, ttl, clock
        self._lock = threading.Lock()
        self._value: Any = self._UNSET
        self._key: Hashable = None
        self._at = 0.0

    def get(self, key: Hashable = None) -> Any:
        """The kept value if it is younger than `ttl` and was computed for `key`, else a new
        one."""
        with self._lock:
            if self._value is self._UNSET or key != self._key \
                    or self._clock() - self._at >= self.ttl:
                self._value, self._key = self._compute(), key
                self._at = self._clock()
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = self._UNSET
