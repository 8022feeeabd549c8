"""`server reindex`: a new catalog database from the manifests in storage, swapped in whole."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Tuple

from zfsmgr.protocol import Manifest
from zfsmgr.server.catalog import Catalog
from zfsmgr.server.database import Database
from zfsmgr.storage.directory import fsync_dir

log = logging.getLogger("zfsmgr.server.rebuild")
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _remove(path: Path) -> None:
    for name in [str(path)] + [str(path) + s for s in _SIDE_FILES]:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def _copy_sessions(old: Path, new: Database) -> int:
    """The open upload sessions of the old file, when it can still be read."""
    if not old.exists():
        return 0
    try:
        source = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
        try:
            rows = source.execute("SELECT upload_id, client_id, key, reserved, touched, session"
                                  " FROM sessions").fetchall()
        finally:
            source.close()
    except sqlite3.Error as exc:
        log.warning("open uploads of %s are lost (%s): their clients start them again", old, exc)
        return 0
    with new.transaction() as conn:
        conn.executemany("INSERT OR REPLACE INTO sessions (upload_id, client_id, key, reserved,"
                         " touched, session) VALUES (?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def rebuild(path: Path, manifests: Iterable[Manifest]) -> Tuple[int, int]:
    """Replace the database at `path` by one holding `manifests`; (backups, sessions kept)."""
    path = Path(path)
    building = path.with_name(path.name + ".rebuild")
    _remove(building)
    new = Database(str(building), check=False)
    try:
        count = Catalog(new).replace(manifests)
        sessions = _copy_sessions(path, new)
        with new.transaction():
            new.set_meta("reindexed", "1")
        new.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        new.close()
        _remove(building)
        raise
    new.close()
    _remove(path)  # an old -wal must never meet the new file
    os.replace(building, path)
    fsync_dir(path.parent)
    return count, sessions
