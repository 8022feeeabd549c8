"""What happened to each dataset, which the catalog of committed backups does not say.

The ledger keeps, per client and dataset, the time of the last committed upload, the last
failed one (with its message), the last verification a restore tool reported (success and
failure), and whether the stale notification was sent; per client, the counters that
`/metrics` exports (uploads by result, bytes uploaded, backups deleted by rotation). Counters
survive a restart (Prometheus handles resets anyway).

It lives beside the catalog (`METADATA_FILE` + `.ledger.json`), written read-modify-write
under a lock file and replaced atomically, like the catalog. The interface is small on purpose
(`record_*`, `view`, `forget`) so that it can move into the catalog's database unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from zfsmgr.server.filelock import FileLock
from zfsmgr.storage.directory import write_atomic

UPLOAD_RESULTS = ("committed", "failed", "aborted")


class Ledger:
    """Events per dataset and counters per client, in one small JSON file."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self.path = Path(path).absolute()
        self._lock = FileLock(str(self.path) + ".lock")
        self.clock = clock

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {"datasets": {}, "clients": {}}
        except ValueError:  # a damaged ledger loses history, never blocks a backup
            return {"datasets": {}, "clients": {}}
        data.setdefault("datasets", {})
        data.setdefault("clients", {})
        return data

    def _update(self, change: Callable[[dict], object]) -> object:
        with self._lock:
            data = self._read()
            result = change(data)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
            return result

    @staticmethod
    def _dataset(data: dict, client_id: str, dataset: str) -> dict:
        return data["datasets"].setdefault(client_id, {}).setdefault(dataset, {})

    @staticmethod
    def _client(data: dict, client_id: str) -> dict:
        entry = data["clients"].setdefault(client_id, {})
        entry.setdefault("uploads", {r: 0 for r in UPLOAD_RESULTS})
        entry.setdefault("upload_bytes", 0)
        entry.setdefault("rotation_deleted", 0)
        return entry

    def record_upload(self, client_id: str, dataset: str, result: str, stored_bytes: int = 0,
                      message: str = "") -> None:
        """An upload ended: committed (with its stored size), failed or aborted."""
        if result not in UPLOAD_RESULTS:
            raise ValueError(f"unknown upload result {result!r}")
        now = self.clock()

        def change(data: dict) -> None:
            counters = self._client(data, client_id)
            counters["uploads"][result] = counters["uploads"].get(result, 0) + 1
            if dataset:
                entry = self._dataset(data, client_id, dataset)
                if result == "committed":
                    counters["upload_bytes"] += stored_bytes
                    entry["last_success"] = now
                else:
                    entry["last_failure"] = now
                    entry["last_failure_message"] = message[-500:]
        self._update(change)

    def record_rotation(self, client_id: str, deleted: int) -> None:
        """Rotation deleted `deleted` backups of a client."""
        def change(data: dict) -> None:
            self._client(data, client_id)["rotation_deleted"] += deleted
        if deleted:
            self._update(change)

    def record_verify(self, client_id: str, dataset: str, ok: bool, message: str = "") -> None:
        """A restore tool verified a dataset's backups: all well, or not (with why)."""
        now = self.clock()

        def change(data: dict) -> None:
            entry = self._dataset(data, client_id, dataset)
            if ok:
                entry["last_verify_success"] = now
            else:
                entry["last_verify_failure"] = now
                entry["last_verify_message"] = message[-500:]
        self._update(change)

    def mark_stale(self, client_id: str, dataset: str, stale: bool) -> bool:
        """Record whether a dataset is stale; True when that changed (notify once per change)."""
        def change(data: dict) -> bool:
            entry = self._dataset(data, client_id, dataset)
            changed = bool(entry.get("stale")) != stale
            entry["stale"] = stale
            return changed
        return bool(self._update(change))

    def forget(self, client_id: str, dataset: Optional[str] = None) -> None:
        """Drop a dataset's events (or, without one, everything of a client)."""
        def change(data: dict) -> None:
            if dataset is None:
                data["datasets"].pop(client_id, None)
                data["clients"].pop(client_id, None)
            else:
                data["datasets"].get(client_id, {}).pop(dataset, None)
        self._update(change)

    def view(self) -> Dict[str, dict]:
        """`{"datasets": {client: {dataset: {...}}}, "clients": {client: counters}}`."""
        with self._lock:
            data = self._read()
        for client_id in list(data["clients"]):
            self._client(data, client_id)
        return data
