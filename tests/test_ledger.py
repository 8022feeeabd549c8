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


def test_a_client_cannot_grow_the_ledger_with_names_it_never_backed_up(tmp_path, monkeypatch):
    """An abort (or a failure) of an upload recorded a row of events for its dataset, any
    name the client opened; 20,000 open+aborts made 20,000 rows, never shown, never removed,
    and every /metrics scrape read them all."""
    import hashlib

    from test_server_api import call
    from zfsmgr.server.app import make_app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients.json").write_text(json.dumps([{
        "client_id": "alice", "api_key": hashlib.sha256(b"k").hexdigest(),
        "storage_type": "dir"}]))
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b")}))
    app = make_app(ctx)
    alice = {"X-Client-ID": "alice", "X-API-Key": "k"}
    for n in range(5):
        code, body, _ = call(app, "POST", "/upload", json.dumps({
            "dataset": f"tank/junk{n}", "snapshot": "s1", "type": "full", "compression": "none",
            "snapshot_time": 1700000000}).encode(), alice)
        assert code == 200, body
        upload_id = json.loads(body)["upload_id"]
        assert call(app, "POST", f"/upload-stream/{upload_id}/abort", b"", alice)[0] == 200
    assert ctx.db.query("SELECT COUNT(*) FROM dataset_events")[0][0] == 0
    assert ctx.ledger.counters()["alice"]["uploads"]["aborted"] == 5  # still counted
