"""An incremental is never committed without its base: deletions (rotation, `server delete`,
another server) that race an open upload or its commit keep the base or refuse the commit."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import replace

import pytest

import hostile
import rig
from test_catalog import _clients, _context
from test_server_api import auth, call, upload
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.app import make_app

T0 = 1700000000
POLICY = {"keep_hourly": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}


def _open_incremental(post, headers, parent_when, when, prefix="s"):
    status, data = post("/upload", {
        "dataset": "tank/data", "snapshot": f"{prefix}{when}", "type": "incremental",
        "parent": f"{prefix}{parent_when}", "compression": "none", "snapshot_time": when}, headers)
    assert status == 200, data
    return data


def test_rotation_and_delete_keep_the_base_of_an_open_upload(server_factory, run_zfsmgr):
    """A real server: B (the base of an open incremental) survives `server delete` and the
    timer's `server rotate` (a separate process), each saying why; the commit then lands."""
    server = server_factory(storage="dir", rotation_policy=POLICY)
    headers = hostile.auth_of(server.client_env)
    url = server.url

    def post(path, body, headers):
        status, data, _ = hostile.request(url, "POST", path, body, headers)
        return status, data
    keys = []
    for when, data in ((T0, b"base B" * 1000), (T0 + 7200, b"full C" * 1000)):
        session = hostile.open_upload(url, headers, when=when)
        statuses, declaration = hostile.send_parts(url, headers, session, data)
        status, answer = hostile.commit(url, headers, session, declaration)
        assert status == 200, answer
        keys.append(answer["manifest"]["key"])
    base = keys[0]
    session = _open_incremental(post, headers, T0, T0 + 3600)
    data = b"increment on B" * 500
    statuses, declaration = hostile.send_parts(url, headers, session, data)
    assert statuses == [200]

    refused = run_zfsmgr(["server", "delete", base], env=server.env, cwd=server.workdir)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "open upload" in refused.stderr and session["upload_id"] in refused.stderr
    rotated = run_zfsmgr(["server", "rotate"], env=server.env, cwd=server.workdir, check=True)
    assert f"deleted {base}" not in rotated.stdout, rotated.stdout
    assert (server.storage_dir / base).exists()
    assert f"rotation deleted {base}" not in rotated.stderr  # planned around it
    status, plan = post("/rotate", {"dry_run": False}, headers)
    assert status == 200, plan
    assert base in plan["kept"] and "open upload" in plan["reasons"][base], plan

    status, answer = hostile.commit(url, headers, session, declaration)
    assert status == 200, answer
    status, listing, _ = hostile.request(url, "GET", "/snapshots", headers=headers)
    snapshots = {b["snapshot"] for b in listing["snapshots"]} if status == 200 else set()
    assert {f"s{T0}", f"s{T0 + 3600}"} <= snapshots, listing


def _incremental_app(tmp_path):
    _clients(tmp_path, quota=0)
    ctx = _context(tmp_path)
    app = make_app(ctx)
    assert upload(app, "alice", b"base B" * 100, when=T0)[0] == 200
    assert upload(app, "alice", b"full C" * 100, when=T0 + 7200)[0] == 200

    def post(path, body, headers):
        code, answer, _ = call(app, "POST", path, json.dumps(body).encode(), headers)
        return code, json.loads(answer)
    session = _open_incremental(post, auth("alice"), T0, T0 + 3600, prefix="zfsmgr_")
    data = b"increment on B" * 50
    code, _, _ = call(app, "POST", f"/upload-stream/{session['upload_id']}/0", data,
                      auth("alice"))
    assert code == 200
    declaration = {"sha256": hashlib.sha256(data).hexdigest(),
                   "parts_crc32": rig.parts_crc32([data]), "stored_size": len(data),
                   "raw_size": len(data)}
    return ctx, post, session, declaration


def _during_commit(ctx, monkeypatch, action):
    store = ctx.store_named("dir")
    real = store.commit

    def commit(upload_id, manifest):
        done = real(upload_id, manifest)
        action()  # between the commit's checks and the row it records
        return done
    monkeypatch.setattr(store, "commit", commit)


def _chain_is_whole(ctx):
    backups = ctx.catalog.list("alice")
    snapshots = {m.snapshot for m in backups}
    assert all(m.parent in snapshots for m in backups if m.type == "incremental"), backups
    stored = {m.key for m in ctx.store_named("dir").manifests()}
    assert stored == {m.key for m in backups}  # a reindex finds no orphan either


def test_a_rotation_racing_the_commit_keeps_the_base(tmp_path, monkeypatch):
    """POST /rotate in another thread lands while the incremental commits: its base stays."""
    ctx, post, session, declaration = _incremental_app(tmp_path)
    client = replace(ctx.clients.get("alice"),
                     rotation_policy=RetentionPolicy.from_mapping(POLICY))
    results = []
    _during_commit(ctx, monkeypatch, lambda: results.append(ctx.rotate(client, by_server=True)))
    code, answer = post(f"/upload-stream/{session['upload_id']}/commit", declaration,
                        auth("alice"))
    assert code == 200, answer
    base = next(m for m in ctx.catalog.list("alice") if m.snapshot == f"zfsmgr_{T0}")
    assert results and base.key in results[0]["kept"]
    assert "open upload" in results[0]["reasons"][base.key]
    _chain_is_whole(ctx)


def test_a_base_deleted_behind_the_server_refuses_the_commit(tmp_path, monkeypatch):
    """Another server on the file (which knows none of this one's uploads) removes the base's
    row while the incremental commits: a 409 full_backup_required, and nothing of it stays."""
    ctx, post, session, declaration = _incremental_app(tmp_path)
    base = next(m for m in ctx.catalog.list("alice") if m.snapshot == f"zfsmgr_{T0}")

    def behind():
        with sqlite3.connect(ctx.catalog_path) as other:
            other.execute("DELETE FROM backups WHERE key = ?", (base.key,))
        ctx.store_named("dir").delete(base)
    _during_commit(ctx, monkeypatch, behind)
    code, answer = post(f"/upload-stream/{session['upload_id']}/commit", declaration,
                        auth("alice"))
    assert code == 409 and answer["full_backup_required"] is True, answer
    assert not ctx.sessions.exists(session["upload_id"])
    _chain_is_whole(ctx)


@pytest.mark.parametrize("command", ["delete", "forget"])
def test_admin_deletes_refuse_the_base_of_an_open_upload(tmp_path, command, capsys):
    from zfsmgr.errors import UsageError
    from zfsmgr.server import admin

    ctx, post, session, declaration = _incremental_app(tmp_path)
    base = next(m for m in ctx.catalog.list("alice") if m.snapshot == f"zfsmgr_{T0}")
    with pytest.raises(UsageError, match=f"open upload {session['upload_id']}"):
        if command == "delete":
            admin.delete_backup(ctx, base.key)
        else:
            admin.forget(ctx, "alice", "tank/data")
    assert ctx.catalog.has_key("alice", base.key)
    code, answer = post(f"/upload-stream/{session['upload_id']}/commit", declaration,
                        auth("alice"))
    assert code == 200, answer
    _chain_is_whole(ctx)
