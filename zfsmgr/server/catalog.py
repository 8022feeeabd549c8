"""The catalog of committed backups: rows of the server's database, a cache of the manifests.

Every read and write names one client and goes through the (client_id, …) indexes, so its cost
follows that client's backups, never the fleet's. The manifests in storage stay the truth:
`replace` (reindex) rebuilds the table from them and `sync` brings one client's rows in line
with a listing of its manifests (the S3 store, shared by several servers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from zfsmgr.errors import NotFound
from zfsmgr.protocol import Manifest, parse_key
from zfsmgr.server.database import Database

log = logging.getLogger("zfsmgr.server.catalog")

_COLUMNS = "client_id, key, dataset, snapshot, snapshot_time, created, stored_size," \
           " storage_type, manifest"
_INSERT = f"INSERT OR REPLACE INTO backups ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _row(manifest: Manifest) -> tuple:
    return (manifest.client_id, manifest.key, manifest.dataset, manifest.snapshot,
            manifest.snapshot_time, manifest.created, manifest.stored_size,
            manifest.storage_type, json.dumps(manifest.to_dict(), separators=(",", ":")))


def catalog_path(metadata_file: str, catalog_db: str = "") -> Path:
    """CATALOG_DB, else METADATA_FILE with `.db` for `.json` (metadata.json → metadata.db)."""
    if catalog_db:
        return Path(catalog_db).absolute()
    path = Path(metadata_file).absolute()
    return path.with_suffix(".db") if path.suffix == ".json" else path


class Catalog:
    """Committed backups per client, oldest snapshot first."""

    def __init__(self, db: Database):
        self.db = db
        self.path = db.path

    def list(self, client_id: str, dataset: Optional[str] = None) -> List[Manifest]:
        """A client's backups (of one dataset), oldest snapshot first."""
        return [Manifest.from_dict(d) for d in self.list_dicts(client_id, dataset)]

    def list_dicts(self, client_id: str, dataset: Optional[str] = None) -> List[dict]:
        """Like `list`, as the stored mappings (no validation: they were validated on entry)."""
        return [json.loads(text) for text in self.list_json(client_id, dataset)]

    def list_json(self, client_id: str, dataset: Optional[str] = None) -> List[str]:
        """Like `list`, each manifest as the JSON text stored."""
        if dataset is None:
            rows = self.db.query("SELECT manifest FROM backups WHERE client_id = ?"
                                 " ORDER BY snapshot_time, key", (client_id,))
        else:
            rows = self.db.query("SELECT manifest FROM backups WHERE client_id = ? AND"
                                 " dataset = ? ORDER BY snapshot_time, key", (client_id, dataset))
        return [r[0] for r in rows]

    def find(self, client_id: str, key: str) -> Manifest:
        """One backup by key, or KeyError."""
        rows = self.db.query("SELECT manifest FROM backups WHERE client_id = ? AND key = ?",
                             (client_id, key))
        if not rows:
            raise KeyError(key)
        return Manifest.from_dict(json.loads(rows[0][0]))

    def has_key(self, client_id: str, key: str) -> bool:
        """Whether a backup is stored at `key`."""
        return bool(self.db.query("SELECT 1 FROM backups WHERE client_id = ? AND key = ?",
                                  (client_id, key)))

    def has_snapshot(self, client_id: str, dataset: str, snapshot: str) -> bool:
        """Whether a backup of dataset@snapshot is stored (an incremental's base)."""
        return bool(self.db.query("SELECT 1 FROM backups WHERE client_id = ? AND dataset = ?"
                                  " AND snapshot = ? LIMIT 1", (client_id, dataset, snapshot)))

    def tokens(self, client_id: str) -> Dict[str, str]:
        """The key token (`tank_data`) each of a client's datasets is stored under."""
        rows = self.db.query("SELECT dataset, MIN(key) FROM backups WHERE client_id = ?"
                             " GROUP BY dataset", (client_id,))
        return {dataset: parse_key(key).dataset_token for dataset, key in rows}

    def add(self, manifest: Manifest) -> None:
        """Record a committed backup (replacing one with the same key)."""
        with self.db.transaction() as conn:
            conn.execute(_INSERT, _row(manifest))

    def remove(self, client_id: str, key: str) -> bool:
        """Forget a backup; False when it was not listed (forgotten already)."""
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM backups WHERE client_id = ? AND key = ?",
                                (client_id, key)).rowcount > 0

    def children(self, client_id: str, dataset: str, snapshot: str) -> List[str]:
        """Keys of the backups whose download needs dataset@snapshot before it (incrementals on
        it that do not restore alone). Asked for every deletion, in its write transaction:
        SQLite passes on only the manifests that name the snapshot at all (a child names it
        as its parent), not the dataset's whole history to parse (0.16 s at 20,000 backups,
        each deletion of a rotation holding every commit of the server as long)."""
        found = []
        rows = self.db.query("SELECT manifest FROM backups WHERE client_id = ? AND dataset = ?"
                             " AND instr(manifest, ?) > 0",
                             (client_id, dataset, json.dumps(snapshot)))
        for (text,) in rows:
            entry = json.loads(text)
            if entry.get("parent") == snapshot and entry.get("type") != "full" and \
                    not entry.get("self_contained"):
                found.append(entry["key"])
        return found

    def used_bytes(self, client_id: str) -> int:
        """Stored bytes of a client's committed backups."""
        return self.db.query("SELECT COALESCE(SUM(stored_size), 0) FROM backups"
                             " WHERE client_id = ?", (client_id,))[0][0]

    def version(self, client_id: str) -> tuple:
        """What changes whenever a client's committed backups do (one small indexed read):
        their number, stored bytes and newest snapshot time."""
        totals = self.db.query("SELECT TOTAL(backups), TOTAL(stored_bytes) FROM dataset_totals"
                               " WHERE client_id = ?", (client_id,))[0]
        newest = self.db.query("SELECT MAX(snapshot_time) FROM backups WHERE client_id = ?",
                               (client_id,))[0][0]
        return (*totals, newest)

    def summary(self, client_id: str) -> Dict[str, dict]:
        """Per dataset: snapshot_count, used_bytes, last_backup, latest_snapshot."""
        rows = self.db.query(
            "SELECT dataset, COUNT(*), SUM(stored_size), MAX(snapshot_time), snapshot, created"
            " FROM backups WHERE client_id = ? GROUP BY dataset ORDER BY dataset", (client_id,))
        # SQLite takes the bare columns (snapshot, created) from the row of MAX(snapshot_time)
        return {dataset: {"snapshot_count": count, "used_bytes": used, "last_backup": created,
                          "latest_snapshot": snapshot}
                for dataset, count, used, _, snapshot, created in rows}

    def dataset_totals(self, client_id: str) -> List[tuple]:
        """(dataset, backups, stored bytes) of each of a client's datasets, kept by triggers
        (migration 5): no backup row is read."""
        return self.db.query("SELECT dataset, backups, stored_bytes FROM dataset_totals"
                             " WHERE client_id = ? ORDER BY dataset", (client_id,))

    def dataset_span(self, client_id: str, dataset: str) -> tuple:
        """(oldest snapshot_time, newest snapshot_time, latest `created`) of a dataset's
        backups, each one index lookup; Nones without backups."""
        where = "FROM backups WHERE client_id = ?1 AND dataset = ?2"
        return self.db.query(f"SELECT (SELECT MIN(snapshot_time) {where}),"
                             f" (SELECT MAX(snapshot_time) {where}), (SELECT MAX(created) {where})",
                             (client_id, dataset))[0]

    def newest(self, client_id: str, dataset: str) -> Optional[dict]:
        """The stored mapping of a dataset's newest backup (by snapshot_time, key)."""
        rows = self.db.query("SELECT manifest FROM backups WHERE client_id = ? AND dataset = ?"
                             " ORDER BY snapshot_time DESC, key DESC LIMIT 1",
                             (client_id, dataset))
        return json.loads(rows[0][0]) if rows else None

    def first_of_snapshot(self, client_id: str, dataset: str, snapshot: str) -> Optional[dict]:
        """The stored mapping of the first backup (by snapshot_time, key) of dataset@snapshot."""
        rows = self.db.query("SELECT manifest FROM backups INDEXED BY backups_by_dataset"
                             " WHERE client_id = ? AND dataset = ? AND snapshot = ?"
                             " ORDER BY snapshot_time, key LIMIT 1",
                             (client_id, dataset, snapshot))
        return json.loads(rows[0][0]) if rows else None

    def replace(self, manifests: Iterable[Manifest]) -> int:
        """Replace every backup row (reindex); return the number of entries."""
        count = 0
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM backups")
            conn.execute("DELETE FROM synced")
            for manifest in manifests:
                conn.execute(_INSERT, _row(manifest))
                count += 1
        return count

    def rebuild(self, known: Iterable[tuple], manifests: List[Manifest],
                unlisted: Iterable[str] = ()) -> int:
        """Reindex in place, in one transaction: the rows become `manifests`, except that a
        row committed after `known` (the (client_id, key) rows read before the listing) stays,
        a listed backup whose row was removed since `known` (rotation, delete) stays gone, and
        the rows of the stores in `unlisted` (skipped: unusable, and no client needs them)
        stay as they were. Return the number of rows written."""
        known = set(map(tuple, known))
        listed = {(m.client_id, m.key) for m in manifests}
        count = 0
        with self.db.transaction() as conn:
            now = set(map(tuple, conn.execute("SELECT client_id, key FROM backups")))
            skipped = sorted(set(unlisted))
            kept = set(map(tuple, conn.execute(
                "SELECT client_id, key FROM backups WHERE storage_type IN"
                f" ({', '.join('?' * len(skipped))})", skipped))) if skipped else set()
            conn.executemany("DELETE FROM backups WHERE client_id = ? AND key = ?",
                             sorted(known - listed - kept))
            for manifest in manifests:
                row = (manifest.client_id, manifest.key)
                if row in known and row not in now:  # deleted meanwhile
                    continue
                conn.execute(_INSERT, _row(manifest))
                count += 1
            conn.execute("DELETE FROM synced")
        return count

    def kinds(self, client_id: str) -> List[str]:
        """The stores that hold a client's backups."""
        return [r[0] for r in self.db.query(
            "SELECT DISTINCT storage_type FROM backups WHERE client_id = ?", (client_id,))]

    def keys(self, client_id: str, storage_type: str) -> List[str]:
        """The keys of a client's backups in one store."""
        return [r[0] for r in self.db.query(
            "SELECT key FROM backups WHERE client_id = ? AND storage_type = ?",
            (client_id, storage_type))]

    def sync(self, client_id: str, storage_type: str, gone: Iterable[str],
             found: Iterable[Manifest], marker: str) -> None:
        """Bring one client's rows of one store in line with storage, remembering `marker`.

        `gone` must come from rows read before the listing, so a backup committed meanwhile
        (in the table, not yet listed) is not dropped; the next marker change lists again."""
        with self.db.transaction() as conn:
            for key in gone:
                conn.execute("DELETE FROM backups WHERE client_id = ? AND key = ? AND"
                             " storage_type = ?", (client_id, key, storage_type))
            for manifest in found:
                conn.execute(_INSERT, _row(manifest))
            conn.execute("INSERT OR REPLACE INTO synced (client_id, storage_type, marker)"
                         " VALUES (?, ?, ?)", (client_id, storage_type, marker))

    def refresh(self, store, client_id: str) -> None:
        """Before a decision on a client's backups in a shared store (S3 with several servers):
        when its change marker moved since the last look, take what the listing shows."""
        if not store.shared:
            return
        marker = store.change_marker(client_id)
        if self.synced_marker(client_id, store.kind) == marker:
            return
        known = set(self.keys(client_id, store.kind))  # before the listing: see `sync`
        listed = store.manifest_keys(client_id)
        found = []
        for key in sorted(listed - known):
            try:
                found.append(store.marked(store.read_manifest(key)))
            except NotFound:  # deleted since the listing
                continue
        self.sync(client_id, store.kind, known - listed, found, marker)
        if found or known - listed:
            log.info("catalog of %s refreshed from %s: %d new, %d gone", client_id,
                     store.kind, len(found), len(known - listed))

    def synced_marker(self, client_id: str, storage_type: str) -> Optional[str]:
        """The change marker seen at the last sync of a client's store (None: never synced)."""
        rows = self.db.query("SELECT marker FROM synced WHERE client_id = ? AND"
                             " storage_type = ?", (client_id, storage_type))
        return rows[0][0] if rows else None

    def import_json(self, json_path: Path, mark=lambda m: m) -> int:
        """Once, when the database is new: take the backups of an old JSON catalog (each as
        `mark` completes it: what its store says of its download)."""
        try:
            data = json.loads(json_path.read_bytes())
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            log.warning("catalog %s is unreadable (%s): not imported; run `zfsmgr server"
                        " reindex` to rebuild the catalog from storage", json_path, exc)
            return 0
        backups = data.get("backups", {}) if isinstance(data, dict) else {}
        count = 0
        with self.db.transaction() as conn:
            for entries in backups.values():
                for entry in entries:
                    conn.execute(_INSERT, _row(mark(Manifest.from_dict(entry))))
                    count += 1
            self.db.set_meta("imported_json", str(json_path))
        log.info("catalog: imported %d backups from %s into %s (the JSON file is no longer"
                 " read)", count, json_path, self.path)
        return count
