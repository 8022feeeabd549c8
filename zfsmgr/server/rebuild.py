"""`server reindex`: the catalog rebuilt from the manifests in storage.

A database that opens and passes its check is rebuilt in place, in one transaction of the live
file, so a running server (and `server rotate`) keep using the one database while it happens.
Only a damaged file that cannot be opened is replaced by a new one built beside it; that needs
the server stopped (it stops itself at start on a damaged file).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Tuple

from zfsmgr.errors import CatalogDamaged
from zfsmgr.protocol import Manifest
from zfsmgr.server.catalog import Catalog
from zfsmgr.server.database import Database
from zfsmgr.files import fsync_dir

log = logging.getLogger("zfsmgr.server.rebuild")
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _remove(path: Path, side_files_only: bool = False) -> None:
    for name in [str(path)] * (not side_files_only) + [str(path) + s for s in _SIDE_FILES]:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


KEPT_TABLES = ("sessions", "dataset_events", "client_counters")  # not rebuilt from storage


def _copy_kept(old: Path, new: Database) -> int:
    """The rows of KEPT_TABLES (open upload sessions, the ledger) of the old file, when it can
    still be read; return the number of sessions."""
    if not old.exists():
        return 0
    copied = {}
    try:
        source = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        log.warning("%s cannot be read (%s): open uploads start again, the ledger is lost",
                    old, exc)
        return 0
    try:
        for table in KEPT_TABLES:
            try:
                cursor = source.execute(f"SELECT * FROM {table}")
                names = ", ".join(d[0] for d in cursor.description)  # an older file: fewer
                copied[table] = (names, cursor.fetchall())
            except sqlite3.Error as exc:
                log.warning("the %s of %s are lost (%s)", table, old, exc)
    finally:
        source.close()
    with new.transaction() as conn:
        for table, (names, rows) in copied.items():
            if rows:
                marks = ", ".join("?" * len(rows[0]))
                conn.executemany(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})",
                                 rows)
    return len(copied.get("sessions", ("", []))[1])


def rebuild(path: Path, manifests: Iterable[Manifest], unlisted: Iterable[str] = ()
            ) -> Tuple[int, int]:
    """Make the database at `path` hold `manifests`; (backups, open sessions kept). The rows
    of the stores in `unlisted` (filled while `manifests` is read: stores skipped) stay."""
    path = Path(path)
    try:
        db = Database(str(path))
    except CatalogDamaged as exc:
        log.warning("%s; building a new file (the server must be stopped)", exc)
        return _swap(path, manifests)
    try:
        known = db.query("SELECT client_id, key FROM backups")  # before the listing
        listed = list(manifests)
        count = Catalog(db).rebuild(known, listed, unlisted)
        sessions = db.query("SELECT COUNT(*) FROM sessions")[0][0]
        with db.transaction():
            db.set_meta("reindexed", "1")
    finally:
        db.close()
    return count, sessions


def _swap(path: Path, manifests: Iterable[Manifest]) -> Tuple[int, int]:
    """A damaged file: a new one built beside it takes its place."""
    building = path.with_name(path.name + ".rebuild")
    _remove(building)
    new = Database(str(building), check=False)
    try:
        count = Catalog(new).replace(manifests)
        sessions = _copy_kept(path, new)
        with new.transaction():
            new.set_meta("reindexed", "1")
        new.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        new.close()
        _remove(building)
        raise
    new.close()
    # an old -wal must never meet the new file; the old file itself goes by the rename, so a
    # crash in between leaves a catalog, never none
    _remove(path, side_files_only=True)
    os.replace(building, path)
    fsync_dir(path.parent)
    return count, sessions
