"""What the server's catalog needs of this Python: the sqlite3 module, and SQLite 3.24 or later.

Debian's python3 has both. FreeBSD ships the module apart from Python (`py39-sqlite3` and
the like); an old system library lacks the UPSERT of the catalog's triggers (3.24, 2018).
Without this check the first would be an internal error, the second a "damaged catalog".
"""

from __future__ import annotations

from zfsmgr.errors import UsageError

MIN_SQLITE = (3, 24, 0)


def require_sqlite() -> None:
    """Raise a one-line UsageError unless the catalog can run here."""
    try:
        import sqlite3
    except ImportError:
        raise UsageError("the server keeps its catalog in SQLite, and this Python has no"
                         " sqlite3 module (FreeBSD: pkg install py3X-sqlite3 for this Python;"
                         " client and restore do not need it)") from None
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise UsageError(f"the server's catalog needs SQLite 3.24 or later; this Python uses"
                         f" {sqlite3.sqlite_version}")
