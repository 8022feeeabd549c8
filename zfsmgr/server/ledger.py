"""What happened to each dataset, which the catalog of committed backups does not say.

The ledger keeps, per client and dataset, the time of the last committed upload, the last
failed one (with its message), the last "checked, unchanged" the client reported (POST
/checkin: BACKUP_UNCHANGED=false sends nothing for such a dataset), the last verification a
restore tool reported (success and failure), and whether the stale notification was sent; per
client, the counters that `/metrics` exports (uploads by result, bytes uploaded, backups
deleted by rotation). Counters survive a restart (Prometheus handles resets anyway).

Its tables (`dataset_events`, `client_counters`) live in the server's database beside the
catalog (migrations 2 and 4 of zfsmgr.server.database); `reindex` carries them into the new
file.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable, Dict, Optional

from zfsmgr.server.database import Database

UPLOAD_RESULTS = ("committed", "failed", "aborted")
_EVENTS = ("last_success", "last_failure", "last_failure_message", "last_verify_success",
           "last_verify_failure", "last_verify_message", "stale", "last_checked")


class Ledger:
    """Events per dataset and counters per client, in the server's database."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time):
        self.db, self.clock = db, clock

    @staticmethod
    def _set(conn: sqlite3.Connection, client_id: str, dataset: str, **values) -> None:
        conn.execute("INSERT OR IGNORE INTO dataset_events (client_id, dataset) VALUES (?, ?)",
                     (client_id, dataset))
        columns = ", ".join(f"{name} = ?" for name in values if name in _EVENTS)
        conn.execute(f"UPDATE dataset_events SET {columns} WHERE client_id = ? AND dataset = ?",
                     (*values.values(), client_id, dataset))

    @staticmethod
    def _count(conn: sqlite3.Connection, client_id: str, name: str, amount: int) -> None:
        conn.execute("INSERT OR IGNORE INTO client_counters (client_id, name, value)"
                     " VALUES (?, ?, 0)", (client_id, name))
        conn.execute("UPDATE client_counters SET value = value + ? WHERE client_id = ? AND"
                     " name = ?", (amount, client_id, name))

    def record_upload(self, client_id: str, dataset: str, result: str, stored_bytes: int = 0,
                      message: str = "") -> None:
        """An upload ended: committed (with its stored size), failed or aborted."""
        if result not in UPLOAD_RESULTS:
            raise ValueError(f"unknown upload result {result!r}")
        now = self.clock()
        with self.db.transaction() as conn:
            self._count(conn, client_id, f"uploads_{result}", 1)
            if result == "committed":
                self._count(conn, client_id, "upload_bytes", stored_bytes)
                if dataset:
                    self._set(conn, client_id, dataset, last_success=now)
            elif dataset:
                self._set(conn, client_id, dataset, last_failure=now,
                          last_failure_message=message[-500:])

    def record_checkin(self, client_id: str, dataset: str) -> float:
        """The client checked the dataset and found nothing written since its newest backup:
        the data on the server is current as of now (the server's clock, not the client's)."""
        now = self.clock()
        with self.db.transaction() as conn:
            self._set(conn, client_id, dataset, last_checked=now)
        return now

    def record_rotation(self, client_id: str, deleted: int) -> None:
        """Rotation deleted `deleted` backups of a client."""
        if deleted:
            with self.db.transaction() as conn:
                self._count(conn, client_id, "rotation_deleted", deleted)

    def record_verify(self, client_id: str, dataset: str, ok: bool, message: str = "") -> None:
        """A restore tool verified a dataset's backups: all well, or not (with why)."""
        now = self.clock()
        with self.db.transaction() as conn:
            if ok:
                self._set(conn, client_id, dataset, last_verify_success=now)
            else:
                self._set(conn, client_id, dataset, last_verify_failure=now,
                          last_verify_message=message[-500:])

    def mark_stale(self, client_id: str, dataset: str, stale: bool) -> bool:
        """Record whether a dataset is stale; True when that changed (notify once per change)."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT stale FROM dataset_events WHERE client_id = ? AND"
                               " dataset = ?", (client_id, dataset)).fetchone()
            if bool(row and row[0]) == stale:
                return False
            self._set(conn, client_id, dataset, stale=int(stale))
            return True

    def forget(self, client_id: str, dataset: Optional[str] = None) -> None:
        """Drop a dataset's events (or, without one, everything of a client)."""
        with self.db.transaction() as conn:
            if dataset is None:
                conn.execute("DELETE FROM dataset_events WHERE client_id = ?", (client_id,))
                conn.execute("DELETE FROM client_counters WHERE client_id = ?", (client_id,))
            else:
                conn.execute("DELETE FROM dataset_events WHERE client_id = ? AND dataset = ?",
                             (client_id, dataset))

    def view(self) -> Dict[str, dict]:
        """`{"datasets": {client: {dataset: {event: value}}}, "clients": {client: counters}}`
        with counters `{"uploads": {result: n}, "upload_bytes": n, "rotation_deleted": n}`."""
        datasets: Dict[str, Dict[str, dict]] = {}
        for row in self.db.query(f"SELECT client_id, dataset, {', '.join(_EVENTS)}"
                                 " FROM dataset_events"):
            datasets.setdefault(row[0], {})[row[1]] = {
                k: v for k, v in zip(_EVENTS, row[2:]) if v is not None}
        return {"datasets": datasets, "clients": self.counters()}

    def of_client(self, client_id: str) -> Dict[str, dict]:
        """One client's events, by dataset (as `view()["datasets"][client_id]`)."""
        return {row[0]: {k: v for k, v in zip(_EVENTS, row[1:]) if v is not None}
                for row in self.db.query(f"SELECT dataset, {', '.join(_EVENTS)} FROM"
                                         " dataset_events WHERE client_id = ?", (client_id,))}

    def counters(self) -> Dict[str, dict]:
        """Per client `{"uploads": {result: n}, "upload_bytes": n, "rotation_deleted": n}`
        (what /metrics exports: the events per dataset are not read)."""
        clients: Dict[str, dict] = {}
        for client_id, name, value in self.db.query(
                "SELECT client_id, name, value FROM client_counters"):
            entry = clients.setdefault(client_id, {
                "uploads": {r: 0 for r in UPLOAD_RESULTS}, "upload_bytes": 0,
                "rotation_deleted": 0})
            if name.startswith("uploads_"):
                entry["uploads"][name[len("uploads_"):]] = value
            else:
                entry[name] = value
        return clients
