"""Quota on the server in-process: rotate-remote frees quota by whole old chains (never the
newest chain of a dataset, never a needed base) and says how far over it stays; AUTO_ROTATE
plans first and deletes only when the plan makes room, also for uploads of unknown size."""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import pytest

import rig
from test_server_api import call
from zfsmgr import settings
from zfsmgr.server.app import make_app
from zfsmgr.server.context import ServerContext
from zfsmgr.server.rotation import plan_rotation

KEY = "quota-key"
AUTH = {"X-Client-ID": "c1", "X-API-Key": KEY}
DAY = 86400
KEEP_ALL = {"keep_hourly": 0, "keep_daily": 1000, "keep_weekly": 0, "keep_monthly": 0}


def make(tmp_path, monkeypatch, quota, auto_rotate=False):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients.json").write_text(json.dumps([{
        "client_id": "c1", "api_key": hashlib.sha256(KEY.encode()).hexdigest(),
        "max_size_bytes": quota, "storage_type": "dir", "rotation_policy": KEEP_ALL}]))
    ctx = ServerContext(settings.load("server", environ={
        "STORAGE_DIR": str(tmp_path / "b"), "PART_SIZE": "1K",
        "AUTO_ROTATE": "true" if auto_rotate else "false"}))
    return ctx, make_app(ctx)


def set_quota(ctx, quota):
    path = ctx.clients.path
    entries = json.loads(path.read_text())
    entries[0]["max_size_bytes"] = quota
    path.write_text(json.dumps(entries))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def send(app, snapshot, data, when, parent=None, dataset="tank/data", estimate=True):
    """One upload through the API: open, parts, commit; (status, body) of the last step."""
    request = {"dataset": dataset, "snapshot": snapshot, "compression": "none",
               "type": "incremental" if parent else "full", "parent": parent,
               "snapshot_time": when, "estimated_size": len(data) if estimate else 0}
    code, body, _ = call(app, "POST", "/upload", json.dumps(request).encode(), AUTH)
    if code != 200:
        return code, json.loads(body)
    session = json.loads(body)
    size = session["part_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    for index, piece in enumerate(pieces):
        code, body, _ = call(app, "POST", f"/upload-stream/{session['upload_id']}/{index}",
                             piece, AUTH)
        if code != 200:
            return code, json.loads(body)
        assert json.loads(body)["crc32"] == f"{zlib.crc32(piece):08x}"
    code, body, _ = call(app, "POST", f"/upload-stream/{session['upload_id']}/commit",
                         json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                     "parts_crc32": rig.parts_crc32(pieces),
                                     "stored_size": len(data), "raw_size": len(data)}).encode(),
                         AUTH)
    return code, json.loads(body)


def history(app, chains=3, length=3, size=2000, start=1_700_000_000, dataset="tank/data"):
    """`chains` chains of a full and (length-1) incrementals, a day apart; snapshot names."""
    names, when = [], start
    for c in range(chains):
        for i in range(length):
            name = f"{dataset.replace('/', '-')}-c{c}-{i}"
            code, body = send(app, name, bytes([c * 16 + i]) * size, when,
                              parent=names[-1] if i else None, dataset=dataset)
            assert code == 200, body
            names.append(name)
            when += DAY
    return names


def snapshots(app):
    code, body, _ = call(app, "GET", "/snapshots", headers=AUTH)
    return [m["snapshot"] for m in json.loads(body)["snapshots"]]


def rotate(app, dry_run=False):
    code, body, _ = call(app, "POST", "/rotate", json.dumps({"dry_run": dry_run}).encode(),
                         AUTH)
    assert code == 200, body
    return json.loads(body)


def test_rotate_remote_frees_quota_oldest_whole_chains_first(tmp_path, monkeypatch):
    ctx, app = make(tmp_path, monkeypatch, quota=0)
    names = history(app)  # 3 chains of 3 x 2000 bytes
    other = history(app, chains=1, length=2, dataset="tank/other", start=1_690_000_000)
    set_quota(ctx, 11_000)  # 22,000 used: the two oldest chains of tank/data... and more
    plan = rotate(app, dry_run=True)
    assert snapshots(app) == other + names  # a dry run deletes nothing
    done = rotate(app)
    assert done["deleted"] == plan["deleted"]
    left = snapshots(app)
    # oldest first: tank/other's only chain is its newest and stays; tank/data's c0 and c1 go
    # whole; its newest chain c2 stays
    assert left == other + names[6:], left
    assert done["used_bytes"] == 10_000 <= 11_000 and done["over_bytes"] == 0
    assert done["freed_bytes"] == 12_000
    assert all(done["reasons"][k] == "old chain removed to free quota" for k in done["deleted"])


def test_rotate_remote_says_how_far_over_it_stays(tmp_path, monkeypatch):
    ctx, app = make(tmp_path, monkeypatch, quota=0)
    names = history(app, chains=2)
    set_quota(ctx, 1000)
    done = rotate(app)
    assert snapshots(app) == names[3:]  # the newest chain is never deleted, even over quota
    assert done["used_bytes"] == 6000 and done["over_bytes"] == 5000
    assert done["enough"] is False


def test_auto_rotate_plans_first_and_never_deletes_in_vain(tmp_path, monkeypatch):
    ctx, app = make(tmp_path, monkeypatch, quota=0, auto_rotate=True)
    names = history(app, chains=2)
    set_quota(ctx, 7000)  # 12,000 used; deletable: the old chain (6000)
    code, body = send(app, "big", b"x" * 5000, 1_800_000_000)  # needs 5000: 6000+5000 > 7000
    assert code == 413, body
    assert "AUTO_ROTATE can free only 5.9 KiB" in body["message"]
    assert "nothing was deleted" in body["message"]
    assert snapshots(app) == names  # refused without touching history
    code, body = send(app, "fits", b"y" * 1000, 1_800_000_000)  # 6000 + 1000 fits once c0 goes
    assert code == 200, body
    assert snapshots(app) == names[3:] + ["fits"]


def test_auto_rotate_plans_around_the_base_of_an_open_upload(tmp_path, monkeypatch):
    """An open incremental on chain 0's full: the plan counted chain 0 as freed, deletion
    kept its full (the upload's base) after deleting the rest of it, and the upload it made
    room for was refused anyway (413, "set AUTO_ROTATE=true"). The plan spares that chain
    now and frees the next one."""
    ctx, app = make(tmp_path, monkeypatch, quota=0, auto_rotate=True)
    names = history(app)  # 3 chains of 3 x 2000 bytes
    request = {"dataset": "tank/data", "snapshot": "open", "compression": "none",
               "type": "incremental", "parent": names[0], "snapshot_time": 1_800_000_000,
               "estimated_size": 10}
    code, body, _ = call(app, "POST", "/upload", json.dumps(request).encode(), AUTH)
    assert code == 200, body
    set_quota(ctx, 18_000)
    code, body = send(app, "other", b"o" * 5000, 1_800_000_100, dataset="tank/other")
    assert code == 200, body
    assert snapshots(app) == names[:3] + names[6:] + ["other"]  # chain 1 went, whole


def test_a_plan_settled_with_a_backup_that_stays_says_so(tmp_path, monkeypatch):
    """deletion.apply keeps a planned backup that turned out to be needed: the plan's
    `enough` and `over_bytes` follow (they stayed as planned), with the store's sizes."""
    ctx, app = make(tmp_path, monkeypatch, quota=0)
    history(app)
    client = ctx.clients.get("c1")
    backups = ctx.backups(client)
    sizes = {m.key: 3000 for m in backups}  # what the store says each takes
    plan = plan_rotation(backups, client.rotation_policy, 1_800_000_000, quota=18_000,
                         sizes=sizes)
    assert plan.enough and plan.used_after == 18_000 and len(plan.delete) == 3
    settled = plan.settle(plan.delete[:1])
    assert (settled.used_after, settled.freed_bytes) == (21_000, 6000)
    assert settled.enough is False and settled.over_bytes == 3000
    assert len(settled.delete) == 2 and len(settled.keep) == len(plan.keep) + 1


def test_auto_rotate_makes_room_for_an_upload_of_unknown_size(tmp_path, monkeypatch):
    ctx, app = make(tmp_path, monkeypatch, quota=0, auto_rotate=True)
    names = history(app, chains=2)
    set_quota(ctx, 9000)
    # an incremental with no estimate (zfs-fuse has no send -nvP): measured part by part
    code, body = send(app, "inc", b"z" * 2500, 1_800_000_000, parent=names[-1],
                      estimate=False)
    assert code == 200, body
    assert snapshots(app) == names[3:] + ["inc"]  # the old chain went; the base stayed


def test_without_auto_rotate_the_refusal_says_what_frees_space(tmp_path, monkeypatch):
    ctx, app = make(tmp_path, monkeypatch, quota=0)
    history(app, chains=1)
    set_quota(ctx, 6500)
    code, body = send(app, "more", b"m" * 1000, 1_800_000_000)
    assert code == 413
    message = body["message"]
    assert "used 5.9 KiB" in message and "quota 6.3 KiB" in message
    assert "zfsmgr client rotate-remote" in message and "AUTO_ROTATE=true" in message


@pytest.mark.parametrize("size, text", [(666_653_340, "635.8 MiB"), (20_500_000, "19.6 MiB")])
def test_sizes_are_labelled_in_binary_units(size, text):
    from zfsmgr.progress import human

    assert human(size) == text
