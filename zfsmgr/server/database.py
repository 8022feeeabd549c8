"""The server's SQLite database: one connection per thread, WAL, the schema and its migrations.

Every table of the server's state is declared here, once, as a numbered migration; the schema
version is SQLite's `user_version`, so a newer server upgrades an older database in place and an
older server refuses a newer one. `transaction()` is `BEGIN IMMEDIATE`: the writer lock is taken
at the start, so a check and the write it allows are one step for every thread and process that
opens the same file (waitress threads, `server reindex`, a second server process on one disk).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from zfsmgr.errors import CatalogDamaged, StorageFull, ZfsmgrError
from zfsmgr.files import hand_over

log = logging.getLogger("zfsmgr.server.database")

BUSY_TIMEOUT_MS = 30_000

# Append only: a released migration is never edited; the database's user_version counts those
# applied. Each runs in the transaction that bumps the version.
MIGRATIONS: List[str] = [
    # 1: committed backups, open upload sessions, per-client sync state, settings of the file
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE backups (
        client_id TEXT NOT NULL,
        key TEXT NOT NULL,
        dataset TEXT NOT NULL,
        snapshot TEXT NOT NULL,
        snapshot_time REAL NOT NULL,
        created TEXT NOT NULL,
        stored_size INTEGER NOT NULL,
        storage_type TEXT NOT NULL,
        manifest TEXT NOT NULL,
        PRIMARY KEY (client_id, key)
    ) WITHOUT ROWID;
    CREATE INDEX backups_by_dataset ON backups (client_id, dataset, snapshot);
    CREATE INDEX backups_by_time ON backups (client_id, snapshot_time, key);
    CREATE TABLE sessions (
        upload_id TEXT PRIMARY KEY,
        client_id TEXT NOT NULL,
        key TEXT NOT NULL,
        reserved INTEGER NOT NULL DEFAULT 0,
        touched REAL NOT NULL,
        session TEXT NOT NULL
    );
    CREATE INDEX sessions_by_client ON sessions (client_id, key);
    CREATE TABLE synced (
        client_id TEXT NOT NULL,
        storage_type TEXT NOT NULL,
        marker TEXT NOT NULL,
        PRIMARY KEY (client_id, storage_type)
    ) WITHOUT ROWID;
    """,
    # 2: the ledger (zfsmgr.server.ledger): what happened per dataset, counters per client
    """
    CREATE TABLE dataset_events (
        client_id TEXT NOT NULL,
        dataset TEXT NOT NULL,
        last_success REAL,
        last_failure REAL,
        last_failure_message TEXT,
        last_verify_success REAL,
        last_verify_failure REAL,
        last_verify_message TEXT,
        stale INTEGER,
        PRIMARY KEY (client_id, dataset)
    ) WITHOUT ROWID;
    CREATE TABLE client_counters (
        client_id TEXT NOT NULL,
        name TEXT NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (client_id, name)
    ) WITHOUT ROWID;
    """,
    # 3: covering indexes: status, quota, parent checks and a store's keys read no manifest
    """
    DROP INDEX backups_by_dataset;
    CREATE INDEX backups_by_dataset
        ON backups (client_id, dataset, snapshot, snapshot_time, stored_size, created);
    CREATE INDEX backups_by_kind ON backups (client_id, storage_type, stored_size);
    """,
    # 4: the ledger's last "checked, unchanged" of a dataset (POST /checkin)
    """
    ALTER TABLE dataset_events ADD COLUMN last_checked REAL;
    """,
    # 5: per-dataset totals kept by triggers, and indexes for a dataset's oldest, newest and
    # last committed backup: a scrape of the fleet (/metrics, check, the status page) reads a
    # few rows per dataset, not every backup. A REPLACE fires the delete trigger because every
    # connection turns recursive_triggers on.
    """
    CREATE TABLE dataset_totals (
        client_id TEXT NOT NULL,
        dataset TEXT NOT NULL,
        backups INTEGER NOT NULL,
        stored_bytes INTEGER NOT NULL,
        PRIMARY KEY (client_id, dataset)
    ) WITHOUT ROWID;
    INSERT INTO dataset_totals
        SELECT client_id, dataset, COUNT(*), SUM(stored_size) FROM backups
        GROUP BY client_id, dataset;
    CREATE TRIGGER backups_added AFTER INSERT ON backups BEGIN
        INSERT INTO dataset_totals VALUES (NEW.client_id, NEW.dataset, 1, NEW.stored_size)
            ON CONFLICT (client_id, dataset) DO UPDATE SET backups = backups + 1,
            stored_bytes = stored_bytes + excluded.stored_bytes;
    END;
    CREATE TRIGGER backups_removed AFTER DELETE ON backups BEGIN
        UPDATE dataset_totals SET backups = backups - 1,
            stored_bytes = stored_bytes - OLD.stored_size
            WHERE client_id = OLD.client_id AND dataset = OLD.dataset;
        DELETE FROM dataset_totals
            WHERE client_id = OLD.client_id AND dataset = OLD.dataset AND backups <= 0;
    END;
    CREATE INDEX backups_by_dataset_time ON backups (client_id, dataset, snapshot_time, key);
    CREATE INDEX backups_by_dataset_created ON backups (client_id, dataset, created);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration, one at a time (a trigger's body holds ';' too)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


def damaged(path: Path, why: object) -> CatalogDamaged:
    """The error (with the way out) for a database that cannot be used."""
    return CatalogDamaged(f"catalog {path} is damaged ({why}): stop the server and run"
                          " `zfsmgr server reindex` to rebuild it from storage")


FREE_MARGIN = 1 << 20  # bytes free on the catalog's disk below which an I/O error means "full"


def unusable(path: Path, exc: sqlite3.DatabaseError) -> ZfsmgrError:
    """The error for a database SQLite refused to open or check: a full disk (SQLite says
    "full", or an I/O error creating its -wal or -shm file with no room left) is StorageFull,
    which freeing space mends; anything else is damage, which reindex mends."""
    text = str(exc)
    if "full" in text or ("I/O" in text and _free_bytes(path.parent) < FREE_MARGIN):
        return StorageFull(f"the server's catalog {path} cannot be opened: its disk is full"
                           f" ({text}); free space on it and start again (it is not damaged)")
    return damaged(path, exc)


def _free_bytes(folder: Path) -> int:
    try:
        info = os.statvfs(folder)
    except (OSError, AttributeError):
        return FREE_MARGIN
    return info.f_bavail * info.f_frsize


class Database:
    """One SQLite file shared by the threads of a process; each thread has its own connection."""

    def __init__(self, path: str, check: bool = True):
        self.path = Path(path).absolute()
        self._local = threading.local()
        self._all: List[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.created:  # made empty first and given to the folder's owner (an admin command
            self.path.touch()  # run as root: the server's file), so SQLite gives its -wal and
            hand_over(self.path)  # -shm files that owner too, as it does for root
        try:
            self._migrate()
            if check and not self.created:
                self.check()
        except sqlite3.DatabaseError as exc:
            raise unusable(self.path, exc) from None

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; transactions are explicit)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a committed backup survives power loss
            conn.execute("PRAGMA cache_size = -2000")  # 2 MB a connection, whatever the size
            conn.execute("PRAGMA recursive_triggers = ON")  # REPLACE fires the delete trigger
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error; SQLite's "database or disk is
        full" is StorageFull (507), a state the next request recovers from."""
        conn = self.connection()
        if conn.in_transaction:  # nested: part of the caller's transaction
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")  # a full disk may refuse this too: rolled back, below
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StorageFull(f"the server's catalog {self.path} has no room: {exc}"
                                  " (free space on its disk; nothing was recorded)") from None
            raise

    def query(self, sql: str, args: tuple = ()) -> list:
        """All rows of one statement."""
        return self.connection().execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ZfsmgrError(f"catalog {self.path} has schema version {version}; this"
                                  f" zfsmgr knows up to {SCHEMA_VERSION}: upgrade zfsmgr")
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
            if version < SCHEMA_VERSION and version:
                log.info("catalog %s: schema upgraded from version %d to %d", self.path,
                         version, SCHEMA_VERSION)

    def check(self) -> None:
        """Raise CatalogDamaged unless SQLite's quick_check passes."""
        try:
            rows = self.query("PRAGMA quick_check")
        except sqlite3.DatabaseError as exc:
            raise unusable(self.path, exc) from None
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise damaged(self.path, "; ".join(problems[:3]))

    def get_meta(self, name: str, default: str = "") -> str:
        """A value of the meta table."""
        rows = self.query("SELECT value FROM meta WHERE name = ?", (name,))
        return rows[0][0] if rows else default

    def set_meta(self, name: str, value: str) -> None:
        """Set a value of the meta table."""
        self.connection().execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                                  (name, value))

    def close(self) -> None:
        """Close every thread's connection (tests, reindex)."""
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()
