"""The ledger in the server's database: events, counters, forgetting, and reindex keeps it."""

from __future__ import annotations

import json

from zfsmgr import settings
from zfsmgr.server.commands import reindex
from zfsmgr.server.context import ServerContext


def test_events_and_counters_survive_a_reindex(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients.json").write_text(json.dumps([]))
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b")}))
    ledger = ctx.ledger
    ledger.clock = lambda: 1000.0
    ledger.record_upload("web1", "tank/db", "committed", 500)
    ledger.record_upload("web1", "tank/db", "committed", 200)
    ledger.clock = lambda: 2000.0
    ledger.record_upload("web1", "tank/db", "failed", message="x" * 900)
    ledger.record_upload("web1", "tank/www", "aborted")
    ledger.record_rotation("web1", 3)
    ledger.record_verify("web1", "tank/db", True)
    ledger.record_verify("web1", "tank/www", False, "damaged")
    assert ledger.mark_stale("web1", "tank/db", True) is True
    assert ledger.mark_stale("web1", "tank/db", True) is False
    assert ledger.mark_stale("web1", "tank/new", False) is False  # fresh from the start
    view = ledger.view()
    assert view["clients"]["web1"] == {
        "uploads": {"committed": 2, "failed": 1, "aborted": 1}, "upload_bytes": 700,
        "rotation_deleted": 3}
    db = view["datasets"]["web1"]["tank/db"]
    assert (db["last_success"], db["last_failure"], db["last_verify_success"], db["stale"]) == \
        (1000.0, 2000.0, 2000.0, 1)
    assert len(db["last_failure_message"]) == 500
    assert view["datasets"]["web1"]["tank/www"]["last_verify_message"] == "damaged"

    assert reindex(ctx) == 0
    assert ctx.ledger.view() == view

    ctx.ledger.forget("web1", "tank/www")
    assert list(ctx.ledger.view()["datasets"]["web1"]) == ["tank/db"]
    ctx.ledger.forget("web1")
    assert ctx.ledger.view() == {"datasets": {}, "clients": {}}


def test_a_reindex_carries_the_ledger_of_an_older_schema(tmp_path):
    """A file of schema 3 (no `last_checked` yet): its ledger rows are copied by column name
    into the new file, the new column empty."""
    import sqlite3

    from zfsmgr.server.database import MIGRATIONS, Database
    from zfsmgr.server.rebuild import _copy_kept

    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        for migration in MIGRATIONS[:3]:
            conn.executescript(migration)
        conn.execute("PRAGMA user_version = 3")
        conn.execute("INSERT INTO dataset_events (client_id, dataset, last_success)"
                     " VALUES ('alice', 'tank/data', 1700000000.0)")
    conn.close()
    new = Database(str(tmp_path / "new.db"))
    _copy_kept(old, new)
    assert new.query("SELECT client_id, dataset, last_success, last_checked"
                     " FROM dataset_events") == [("alice", "tank/data", 1700000000.0, None)]


def test_a_reindex_keeps_the_rows_of_a_store_it_skipped(tmp_path, monkeypatch, capsys):
    """A store no enabled client uses is skipped when it is unusable; the rebuild then
    deleted every row of it as if its backups were gone (S3 down, a disk read-only)."""
    from zfsmgr.protocol import Manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients.json").write_text(json.dumps([{
        "client_id": "carol", "api_key": "0" * 64, "enabled": False, "storage_type": "s3"}]))
    ctx = ServerContext(settings.load("server", environ={
        "STORAGE_DIR": str(tmp_path / "b"), "S3_ENABLED": "true", "S3_ENDPOINT": "127.0.0.1:9",
        "S3_ACCESS_KEY": "a", "S3_SECRET_KEY": "b", "S3_BUCKET": "gone", "S3_USE_SSL": "false"}))
    stored = Manifest(key="carol/tank_data_2024-02-13_14:30:00.zfs", client_id="carol",
                      dataset="tank/data", snapshot="s1", type="full", parent=None,
                      compression="none", raw_size=1, stored_size=1, sha256="",
                      created="2024-02-13T14:30:00+00:00", snapshot_time=1707834600.0,
                      storage_type="s3")
    ctx.catalog.add(stored)
    assert reindex(ctx) == 0
    assert "s3: skipped, unusable and no client uses it" in capsys.readouterr().err
    assert [m.key for m in ctx.catalog.list("carol")] == [stored.key]
