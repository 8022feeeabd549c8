"""The catalog database: JSON import, damage and reindex, schema versions, the quota edge."""

from __future__ import annotations

import hashlib
import json
import os
import logging
import sqlite3
import threading

import pytest

import rig
from test_server_api import KEYS, auth, call, upload
from zfsmgr import settings
from zfsmgr.errors import CatalogDamaged, StorageFull
from zfsmgr.protocol import Manifest
from zfsmgr.server.app import make_app
from zfsmgr.server.context import ServerContext
from zfsmgr.server.database import SCHEMA_VERSION, Database


def _clients(tmp_path, quota=10_000):
    entries = [{"client_id": c, "api_key": hashlib.sha256(k.encode()).hexdigest(),
                "max_size_bytes": quota, "enabled": True, "storage_type": "dir"}
               for c, k in KEYS.items()]
    (tmp_path / "clients.json").write_text(json.dumps(entries))


def _context(tmp_path, **env):
    values = {"STORAGE_DIR": str(tmp_path / "b"), "PART_SIZE": "1K",
              "CONFIG_FILE": str(tmp_path / "clients.json"),
              "METADATA_FILE": str(tmp_path / "metadata.json")}
    values.update(env)
    return ServerContext(settings.load("server", environ=values))


def _manifest(client, n, size=100, dataset="tank/data"):
    return Manifest(key=f"{client}/tank_data_2024-01-01_00:00:{n:02d}.zfs", client_id=client,
                    dataset=dataset, snapshot=f"s{n}", type="full" if n == 0 else "incremental",
                    parent=None if n == 0 else f"s{n - 1}", compression="none", raw_size=size,
                    stored_size=size, sha256="0" * 64, created=f"2024-01-01T00:00:{n:02d}Z",
                    snapshot_time=1704067200.0 + n, storage_type="dir")


def test_a_json_catalog_and_its_sessions_are_imported_once(tmp_path, caplog):
    _clients(tmp_path)
    old = {"alice": [_manifest("alice", n).to_dict() for n in range(3)],
           "bob": [_manifest("bob", 0).to_dict()]}
    (tmp_path / "metadata.json").write_text(json.dumps({"version": 1, "backups": old}))
    sessions = tmp_path / "metadata.json.uploads"
    sessions.mkdir()
    session = {"upload_id": "ab" * 16, "client_id": "alice", "key": _manifest("alice", 9).key,
               "storage_type": "dir", "dataset": "tank/data", "snapshot": "s9", "type": "full",
               "parent": None, "compression": "none", "guid": "", "parent_guid": "",
               "raw_send": False, "compressed_send": False, "snapshot_time": 1704067209.0,
               "estimated_size": 0, "part_base": 1024, "part_every": 1000, "created": 1.0}
    (sessions / f"{'ab' * 16}.json").write_text(json.dumps(session))
    with caplog.at_level(logging.INFO):
        ctx = _context(tmp_path)
    assert "imported 4 backups from" in caplog.text and str(tmp_path / "metadata.db") \
        in caplog.text
    assert [m.snapshot for m in ctx.catalog.list("alice")] == ["s0", "s1", "s2"]
    assert ctx.uploads.get("alice", "ab" * 16).snapshot == "s9"
    ctx.db.close()
    # the JSON file is read only once: a later change to it is not taken
    (tmp_path / "metadata.json").write_text(json.dumps({"version": 1, "backups": {}}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = _context(tmp_path)
    assert "imported" not in caplog.text
    assert len(again.catalog.list("alice")) == 3 and again.catalog.used_bytes("bob") == 100


def test_catalog_db_setting_and_a_non_json_metadata_file(tmp_path):
    _clients(tmp_path)
    ctx = _context(tmp_path, CATALOG_DB=str(tmp_path / "state" / "cat.sqlite"))
    assert ctx.db.path == tmp_path / "state" / "cat.sqlite"
    ctx = _context(tmp_path, METADATA_FILE=str(tmp_path / "catalog.sqlite"))
    assert ctx.db.path == tmp_path / "catalog.sqlite"


def _damage(path):
    """Overwrite the pages after the first with noise (the header stays: SQLite opens it)."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    noise = hashlib.sha256(b"noise").digest() * (page // 32)
    for start in range(page, len(data), page):
        data[start:start + page] = noise[:len(data) - start]
    path.write_bytes(bytes(data))


def test_damage_is_found_at_start_and_reindex_rebuilds(tmp_path, run_zfsmgr):
    _clients(tmp_path, quota=0)
    ctx = _context(tmp_path)
    app = make_app(ctx)
    for when in (1700000000, 1700000100):
        assert upload(app, "alice", b"payload %d" % when, when=when)[0] == 200
    before = ctx.catalog.list("alice")
    ctx.db.close()
    _damage(tmp_path / "metadata.db")
    with pytest.raises(CatalogDamaged, match="server reindex"):
        _context(tmp_path)
    env = {"STORAGE_DIR": str(tmp_path / "b"), "CONFIG_FILE": str(tmp_path / "clients.json"),
           "METADATA_FILE": str(tmp_path / "metadata.json"), "PORT": str(rig.free_port()),
           "HOST": "127.0.0.1"}
    refused = run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=60)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "is damaged" in refused.stderr and "zfsmgr server reindex" in refused.stderr
    (tmp_path / "metadata.db").write_bytes(b"not a database at all" * 300)
    assert "is damaged" in run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=60).stderr
    rebuilt = run_zfsmgr(["server", "reindex"], env=env, cwd=tmp_path, timeout=60)
    assert rebuilt.returncode == 0 and "rebuilt: 2 backups" in rebuilt.stdout, rebuilt.stderr
    assert _context(tmp_path).catalog.list("alice") == before


def test_reindex_keeps_the_open_uploads(tmp_path):
    from zfsmgr.server.commands import reindex

    _clients(tmp_path, quota=0)
    ctx = _context(tmp_path)
    app = make_app(ctx)
    assert upload(app, "alice", b"committed")[0] == 200
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "open", "type": "full", "compression": "none",
        "snapshot_time": 1700009999}).encode(), auth("alice"))
    upload_id = json.loads(body)["upload_id"]
    assert reindex(ctx) == 0
    assert ctx.uploads.get("alice", upload_id).snapshot == "open"
    assert len(ctx.catalog.list("alice")) == 1


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "c.db"
    Database(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="upgrade zfsmgr"):
        Database(str(path))


def test_concurrent_commits_at_the_quota_edge(tmp_path):
    """20 uploads of 1,000 bytes race for a quota of 10,000 on two servers sharing one database
    file: exactly ten commit, none twice, and the quota holds."""
    _clients(tmp_path, quota=10_000)
    limits = {"CLIENT_MAX_UPLOADS": "20", "CLIENT_MAX_REQUESTS": "40"}
    apps = [make_app(_context(tmp_path, **limits)) for _ in range(2)]
    opened = []
    for n in range(20):
        code, body, _ = call(apps[n % 2], "POST", "/upload", json.dumps({
            "dataset": "tank/data", "snapshot": f"s{n}", "type": "full", "compression": "none",
            "snapshot_time": 1700000000 + n}).encode(), auth("alice"))
        assert code == 200, body
        opened.append(json.loads(body)["upload_id"])
    results = {}
    start = threading.Barrier(20)

    def send(n, upload_id):
        app, data = apps[n % 2], bytes([n]) * 1000
        start.wait()
        code, _, _ = call(app, "POST", f"/upload-stream/{upload_id}/0", data, auth("alice"))
        if code == 200:
            code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/commit", json.dumps({
                "sha256": hashlib.sha256(data).hexdigest(), "stored_size": 1000,
                "parts_crc32": rig.parts_crc32([data])}).encode(), auth("alice"))
        results[n] = code

    threads = [threading.Thread(target=send, args=(n, u)) for n, u in enumerate(opened)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == [200] * 10 + [413] * 10, results
    ctx = _context(tmp_path)
    stored = ctx.catalog.list("alice")
    assert len(stored) == len({m.key for m in stored}) == 10
    assert ctx.catalog.used_bytes("alice") == 10_000
    assert sorted(m.snapshot for m in stored) == sorted(
        f"s{n}" for n, code in results.items() if code == 200)


def test_reindex_in_place_keeps_what_changed_while_it_listed(tmp_path):
    """A commit after the rows were read stays; a row deleted after the listing stays gone;
    a row whose backup is gone from storage goes; one database file throughout."""
    from zfsmgr.server.catalog import Catalog

    db = Database(str(tmp_path / "c.db"))
    catalog = Catalog(db)
    for n in (0, 1, 2):
        catalog.add(_manifest("alice", n))
    inode = (tmp_path / "c.db").stat().st_ino
    known = db.query("SELECT client_id, key FROM backups")
    listed = [_manifest("alice", 0), _manifest("alice", 1)]  # 2 is gone from storage
    catalog.add(_manifest("alice", 3))  # committed while the stores were listed
    catalog.remove("alice", _manifest("alice", 1).key)  # rotated while they were listed
    assert catalog.rebuild(known, listed) == 1
    assert [m.snapshot for m in catalog.list("alice")] == ["s0", "s3"]
    assert (tmp_path / "c.db").stat().st_ino == inode


def test_a_crash_while_a_damaged_catalog_is_replaced_leaves_one(tmp_path, monkeypatch):
    """The swap removed the damaged file before renaming the new one in: a crash in between
    left no catalog, and the next start made an empty one."""
    from zfsmgr.server import rebuild

    _clients(tmp_path, quota=0)
    ctx = _context(tmp_path)
    assert upload(make_app(ctx), "alice", b"payload")[0] == 200
    listed = ctx.catalog.list("alice")
    ctx.db.close()
    _damage(tmp_path / "metadata.db")

    def crash(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(rebuild.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        rebuild.rebuild(tmp_path / "metadata.db", listed)
    assert (tmp_path / "metadata.db").exists()  # the old one, damaged as it was
    monkeypatch.undo()
    assert rebuild.rebuild(tmp_path / "metadata.db", listed) == (1, 0)
    assert _context(tmp_path).catalog.list("alice") == listed


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_a_full_disk_at_start_is_a_full_disk_not_a_damaged_catalog(tmp_path, run_zfsmgr):
    """A healthy catalog on a full disk (SQLite cannot make its -wal and -shm files: "disk
    I/O error") was reported damaged, with `server reindex` as the way out, which then failed
    for want of room too and left an empty metadata.db.rebuild."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        _clients(disk, quota=0)
        Database(str(disk / "metadata.db")).close()
        with open(disk / "filler", "wb", buffering=0) as out:
            with pytest.raises(OSError):
                while True:
                    out.write(b"x" * 65536)
        with pytest.raises(StorageFull, match="disk is full") as full:
            Database(str(disk / "metadata.db"))
        assert "damaged" in str(full.value) and "not damaged" in str(full.value)
        env = {"STORAGE_DIR": str(tmp_path / "b"), "PORT": str(rig.free_port()),
               "HOST": "127.0.0.1"}
        for args in (["server"], ["server", "reindex"]):
            done = run_zfsmgr(args, env=env, cwd=disk, timeout=60)
            assert done.returncode != 0 and "disk is full" in done.stderr, done.stderr
            assert "server reindex" not in done.stderr
        assert not (disk / "metadata.db.rebuild").exists()
        (disk / "filler").unlink()
        Database(str(disk / "metadata.db")).close()  # room again: it opens as it was
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_children_of_a_backup_are_found_without_reading_the_datasets_history(
        tmp_path, monkeypatch):
    """Each deletion asks, in its write transaction, which backups need the one it deletes:
    that parsed every manifest of the dataset (0.16 s at 20,000 backups, each deletion of a
    rotation holding every commit of the server as long)."""
    import dataclasses

    _clients(tmp_path)
    ctx = _context(tmp_path)
    chain = [_manifest("alice", n) for n in range(60)]  # s0 <- s1 <- ... <- s59
    for manifest in chain:
        ctx.catalog.add(manifest)
    ctx.catalog.add(dataclasses.replace(_manifest("alice", 61), parent="s10",
                                        self_contained=True))  # restores alone: no child
    ctx.catalog.add(_manifest("alice", 62, dataset="tank/other"))  # on an s61 of its own
    parsed = []
    loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: parsed.append(1) or
                        loads(text, *a, **k))
    assert ctx.catalog.children("alice", "tank/data", "s10") == [chain[11].key]
    assert len(parsed) <= 4, len(parsed)  # s10's own row, its children, no other
    assert ctx.catalog.children("alice", "tank/data", "s59") == []
    assert ctx.catalog.children("alice", "tank/data", "s61") == []  # tank/other's s62 is not
    assert ctx.catalog.children("alice", "tank/other", "s61") == [
        "alice/tank_data_2024-01-01_00:00:62.zfs"]
