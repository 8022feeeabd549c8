"""Open upload sessions: rows of the server's database, one per upload, found by id or client.

A session row carries the bytes its upload holds against the quota (`reserved`: staged so far,
or all of it while it commits), so a client's quota check is one transaction over its own rows:
committed backups plus every open upload's reservation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from zfsmgr.errors import Conflict
from zfsmgr.server.database import Database

log = logging.getLogger("zfsmgr.server.sessions")


@dataclass(frozen=True)
class Session:
    """An open upload."""

    upload_id: str
    client_id: str
    key: str
    storage_type: str
    dataset: str
    snapshot: str
    type: str
    parent: Optional[str]
    compression: str
    guid: str
    parent_guid: str
    raw_send: bool
    compressed_send: bool
    snapshot_time: float
    estimated_size: int
    part_base: int
    part_every: int
    created: float
    encryption: str = ""  # "age": the client seals the stream (never for `local`)
    segment: int = 0  # the first part of the stream the commit verifies (after a send -t)
    resumed_with: str = ""  # the resume token whose `zfs send -t` stream starts at `segment`
    properties: Optional[dict] = None  # the client's property record (zfsmgr/properties.py)

    def to_json(self) -> str:
        """The session as stored (in the database, and in a store that shares sessions)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Session":
        """Inverse of to_json; ValueError or TypeError when it is not a session."""
        return cls(**json.loads(text))


class SessionTable:
    """The open uploads of one server."""

    def __init__(self, db: Database):
        self.db = db

    def add(self, session: Session, now: float, max_open: int = 0) -> bool:
        """Record a new (or resumed) session; with `max_open` (a new one), only while its client
        has fewer other open sessions, counted in the same transaction (False: nothing
        recorded), so concurrent opens never take a client past its limit, and while no other
        session of the client has its key (Conflict: two opens that raced, which would both
        commit to one key)."""
        with self.db.transaction() as conn:
            if max_open and conn.execute(
                    "SELECT COUNT(*) FROM sessions WHERE client_id = ? AND upload_id != ?",
                    (session.client_id, session.upload_id)).fetchone()[0] >= max_open:
                return False
            if max_open and conn.execute(
                    "SELECT COUNT(*) FROM sessions WHERE client_id = ? AND key = ? AND"
                    " upload_id != ?", (session.client_id, session.key,
                                        session.upload_id)).fetchone()[0]:
                raise Conflict(f"another upload to {session.key} was opened at the same time:"
                               " retry")
            conn.execute("INSERT OR REPLACE INTO sessions (upload_id, client_id, key, reserved,"
                         " touched, session) VALUES (?, ?, ?, COALESCE((SELECT reserved FROM"
                         " sessions WHERE upload_id = ?), 0), ?, ?)",
                         (session.upload_id, session.client_id, session.key,
                          session.upload_id, now, session.to_json()))
        return True

    def get(self, upload_id: str) -> Optional[Session]:
        """A session by id, None when there is none."""
        rows = self.db.query("SELECT session FROM sessions WHERE upload_id = ?", (upload_id,))
        return Session.from_json(rows[0][0]) if rows else None

    def of_client(self, client_id: str) -> List[Session]:
        """The open sessions of one client."""
        return [Session.from_json(r[0]) for r in self.db.query(
            "SELECT session FROM sessions WHERE client_id = ? ORDER BY upload_id", (client_id,))]

    def based_on(self, client_id: str, dataset: str, snapshot: str) -> List[str]:
        """The ids of a client's open incremental uploads on dataset@snapshot."""
        return [s.upload_id for s in self.of_client(client_id)
                if s.dataset == dataset and s.parent == snapshot]

    def idle(self, before: float) -> List[Session]:
        """Sessions not touched since `before` (the janitor's, never a request's, listing)."""
        return [Session.from_json(r[0]) for r in self.db.query(
            "SELECT session FROM sessions WHERE touched < ? ORDER BY touched", (before,))]

    def exists(self, upload_id: str) -> bool:
        """Whether a session is open."""
        return bool(self.db.query("SELECT 1 FROM sessions WHERE upload_id = ?", (upload_id,)))

    def touch(self, upload_id: str, now: float) -> bool:
        """Mark a session as active; False when it is gone."""
        with self.db.transaction() as conn:
            return conn.execute("UPDATE sessions SET touched = ? WHERE upload_id = ?",
                                (now, upload_id)).rowcount > 0

    def reserved(self, client_id: str, besides: str = "") -> int:
        """Bytes a client's open uploads (other than `besides`) hold against its quota."""
        return self.db.query("SELECT COALESCE(SUM(reserved), 0) FROM sessions WHERE"
                             " client_id = ? AND upload_id != ?", (client_id, besides))[0][0]

    def reserve(self, upload_id: str, size: int) -> None:
        """Set the bytes an upload holds against its client's quota."""
        self.db.connection().execute("UPDATE sessions SET reserved = ? WHERE upload_id = ?",
                                     (size, upload_id))

    def remove(self, upload_id: str) -> None:
        """Forget a session (committed or aborted)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE upload_id = ?", (upload_id,))

    def import_folder(self, folder: Path, now: float) -> int:
        """Once, when the database is new: take the session files of an older server."""
        count = 0
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                session = Session.from_json(path.read_text())
            except (ValueError, TypeError, OSError) as exc:
                log.warning("upload session %s is unreadable (%s): not imported", path, exc)
                continue
            self.add(session, path.stat().st_mtime if path.exists() else now)
            count += 1
        if count:
            log.info("imported %d open upload sessions from %s", count, folder)
        return count
