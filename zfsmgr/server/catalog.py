"""METADATA_FILE: the catalog of committed backups, a cache of the manifests in storage.

Every change is read-modify-write under a lock file and replaced atomically, so concurrent
uploads (threads or processes) never lose an entry; `reindex` rebuilds it from storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List

from zfsmgr.errors import ZfsmgrError
from zfsmgr.protocol import Manifest
from zfsmgr.server.filelock import FileLock
from zfsmgr.storage.directory import write_atomic


class Catalog:
    """Committed backups per client, oldest first."""

    def __init__(self, path: str):
        self.path = Path(path).absolute()
        self._lock = FileLock(str(self.path) + ".lock")

    def _read(self) -> Dict[str, List[dict]]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ZfsmgrError(f"catalog {self.path} is damaged ({exc}):"
                              " run `zfsmgr server reindex`") from None
        return data.get("backups", {}) if isinstance(data, dict) else {}

    def _write(self, backups: Dict[str, List[dict]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": 1, "backups": {k: v for k, v in sorted(backups.items()) if v}}
        write_atomic(self.path, json.dumps(body, indent=1).encode())

    def list(self, client_id: str) -> List[Manifest]:
        """A client's backups, oldest snapshot first."""
        with self._lock:
            entries = self._read().get(client_id, [])
        manifests = [Manifest.from_dict(e) for e in entries]
        return sorted(manifests, key=lambda m: (m.snapshot_time, m.key))

    def find(self, client_id: str, key: str) -> Manifest:
        """One backup by key, or KeyError."""
        for manifest in self.list(client_id):
            if manifest.key == key:
                return manifest
        raise KeyError(key)

    def add(self, manifest: Manifest) -> None:
        """Record a committed backup (replacing one with the same key)."""
        with self._lock:
            backups = self._read()
            entries = [e for e in backups.get(manifest.client_id, []) if e["key"] != manifest.key]
            backups[manifest.client_id] = entries + [manifest.to_dict()]
            self._write(backups)

    def remove(self, client_id: str, key: str) -> None:
        """Forget a backup."""
        with self._lock:
            backups = self._read()
            backups[client_id] = [e for e in backups.get(client_id, []) if e["key"] != key]
            self._write(backups)

    def replace(self, manifests: Iterable[Manifest]) -> int:
        """Replace the whole catalog (reindex); return the number of entries."""
        backups: Dict[str, List[dict]] = {}
        count = 0
        for manifest in manifests:
            backups.setdefault(manifest.client_id, []).append(manifest.to_dict())
            count += 1
        with self._lock:
            self._write(backups)
        return count

    def used_bytes(self, client_id: str) -> int:
        """Stored bytes of a client's committed backups."""
        return sum(m.stored_size for m in self.list(client_id))
