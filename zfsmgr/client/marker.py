"""Marking a run's committed backups as this server's bases while the next ones stream.

Marking a base takes several zfs calls (hold or bookmark, the bases property, the release and
destroy of the old base), each of which waits for the pool to sync a transaction: about as long
as streaming a few MiB. A Marker does it in a thread of its own, and each round takes every
backup committed since its last round at once (client/base.py `mark_bases`: one `zfs hold`,
one `zfs set`, one `zfs release` for all of them), so a run over many datasets pays those
waits a few times, not once per dataset, and never between two streams.

A round waits until BATCH backups are committed (or the run ends, or BATCH_WAIT has passed):
marked one by one as they came, 20 datasets cost 80 zfs calls, each a pool sync, on the
same CPUs as the streams. A committed backup not yet marked is safe: should the run die
first, the next one adopts it (client/backup.py `cleanup_stale`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, List, Optional, Tuple

from zfsmgr.client.base import Committed, mark_bases
from zfsmgr.errors import ZfsmgrError
from zfsmgr.zfs import Zfs

log = logging.getLogger("zfsmgr.client")
BATCH = 4  # committed backups a round waits for (or for the run's end) ...
BATCH_WAIT = 5.0  # ... but no longer than this after the first
Done = Callable[[Committed, object, Optional[ZfsmgrError]], None]


class Marker:
    """Marks what `add` is given as server `tag`'s bases, then calls `done(item, payload,
    error or None)` for each (from its own thread); `close` waits until all are marked."""

    def __init__(self, zfs: Zfs, tag: str, done: Done):
        self.zfs, self.tag, self.done = zfs, tag, done
        self._queue: "queue.Queue[Optional[Tuple[Committed, object]]]" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="zfsmgr-mark", daemon=True)
        self._thread.start()

    def add(self, item: Committed, payload: object) -> None:
        """Mark `item` soon (`payload` goes back to `done` with it)."""
        self._queue.put((item, payload))

    def close(self) -> None:
        """Mark everything added, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            batch: List[Optional[Tuple[Committed, object]]] = [self._queue.get()]
            until = time.monotonic() + BATCH_WAIT
            while batch[-1] is not None and len(batch) < BATCH:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
            while batch[-1] is not None:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [entry for entry in batch if entry is not None]
            if items:
                self._mark(items)
            if len(items) < len(batch):
                return

    def _mark(self, items: List[Tuple[Committed, object]]) -> None:
        try:
            failed = mark_bases(self.zfs, [item for item, _ in items], self.tag)
        except Exception as exc:  # noqa: BLE001 (a bug must not lose the outcomes)
            log.exception("marking the bases failed")
            failed = {item.dataset: ZfsmgrError(f"marking the base failed: {exc}")
                      for item, _ in items}
        for item, payload in items:
            self.done(item, payload, failed.get(item.dataset))
