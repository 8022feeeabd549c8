"""What a store says about its downloads (StreamInfo) is what the server sends and lists, and
what restore and rotation act on; no layer above storage/ asks which store it is."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from test_server_api import auth, call, server, upload  # noqa: F401 (server: a fixture)
from zfsmgr import protocol
from zfsmgr.protocol import Manifest
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.rotation import plan_rotation
from zfsmgr.storage.directory import DirectoryStore
from zfsmgr.storage.zfslocal import ZfsLocalStore

PACKAGE = Path(__file__).resolve().parent.parent / "zfsmgr"


def test_no_layer_above_storage_asks_which_store_it_is():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "storage":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""(storage_type|kind)\s*[!=]=\s*["'](local|s3|dir)["']""", line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert found == []


def _manifest(snapshot, parent=None, minutes=0, storage="dir"):
    when = 1707834600 + minutes * 60
    stamp = protocol.format_timestamp(datetime.fromtimestamp(when, timezone.utc))
    return Manifest(key=f"client1/tank_data_{stamp}.zfs.gz", client_id="client1",
                    dataset="tank/data", snapshot=snapshot,
                    type="incremental" if parent else "full", parent=parent,
                    compression="gzip", raw_size=20, stored_size=10, sha256="a" * 64,
                    created="2024-02-13T14:30:00+00:00", snapshot_time=float(when),
                    storage_type=storage)


def test_each_store_describes_its_downloads():
    full, inc = _manifest("a"), _manifest("b", "a", 1)
    assert DirectoryStore.describe(full).self_contained and \
        not DirectoryStore.describe(inc).self_contained
    info = DirectoryStore.describe(inc)
    assert (info.size, info.sha256, info.compression, info.ranged) == \
        (10, "a" * 64, "gzip", True)
    info = ZfsLocalStore.describe(inc)  # a fresh full send
    assert (info.size, info.sha256, info.compression, info.ranged, info.self_contained) == \
        (None, "", "none", False, True)


def test_rotation_may_delete_a_parent_only_when_its_child_restores_alone():
    backups = [_manifest("a"), _manifest("b", "a", 60), _manifest("c", "b", 120)]
    policy = RetentionPolicy(0, 0, 0, 0)
    now = backups[-1].snapshot_time + 3600
    kept = plan_rotation(backups, policy, now)  # the newest is kept, so its chain is
    assert [m.snapshot for m in kept.delete] == []
    alone = [m.__class__(**{**m.to_dict(), "self_contained": True}) for m in backups]
    freed = plan_rotation(alone, policy, now)
    assert sorted(m.snapshot for m in freed.delete) == ["a", "b"]


def test_the_listing_marks_what_restores_alone(server):  # noqa: F811
    ctx, app = server
    code, body, _ = upload(app, "alice", b"x" * 100)
    assert code == 200
    local = _manifest("z", "y", 5, storage="local")  # as the local store's commit leaves it
    ctx.catalog.add(ZfsLocalStore.marked(Manifest(**{
        **local.to_dict(), "client_id": "alice", "key": local.key.replace("client1/", "alice/")})))
    code, body, _ = call(app, "GET", "/snapshots", headers=auth("alice"))
    listed = {m["storage_type"]: m for m in json.loads(body)["snapshots"]}
    assert listed["local"]["self_contained"] is True  # incremental, but a full send
    assert listed["dir"]["self_contained"] is True  # a full stream, marked at commit
    assert Manifest.from_dict(listed["local"]).restores_alone


def test_a_download_carries_what_its_store_says(server):  # noqa: F811
    ctx, app = server
    data = bytes(range(256)) * 4
    code, body, _ = upload(app, "alice", data)
    key = body["manifest"]["key"]
    code, got, headers = call(app, "GET", "/download", headers=auth("alice"),
                              query=f"key={key}")
    assert code == 200 and got == data
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers[protocol.HEADER_SHA256.lower()] == hashlib.sha256(data).hexdigest()
    assert headers[protocol.HEADER_STORED_SIZE.lower()] == str(len(data))
    assert headers[protocol.HEADER_COMPRESSION.lower()] == "none"
    assert headers[protocol.HEADER_OFFSET.lower()] == "0"
    code, got, headers = call(app, "GET", "/download", query=f"key={key}",
                              headers={**auth("alice"), "Range": "bytes=1000-"})
    assert code == 206 and got == data[1000:]
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert headers[protocol.HEADER_OFFSET.lower()] == "1000"
    code, _, _ = call(app, "GET", "/download", query=f"key={key}",
                      headers={**auth("alice"), "Range": f"bytes={len(data)}-"})
    assert code == 416


@pytest.mark.parametrize("status, offset_header, ok", [
    (206, None, True), (200, "1000", True), (200, None, False), (200, "0", False)])
def test_restore_accepts_a_resumed_download_only_where_the_server_says_where_it_starts(
        status, offset_header, ok):
    from zfsmgr.errors import ZfsmgrError
    from zfsmgr.restore.stream import StoredStream

    class Body:
        def __init__(self, offset):
            self.headers = {"Content-Range": f"bytes {offset}-1999/2000"} if status == 206 \
                else {}
            if offset_header is not None:
                self.headers[protocol.HEADER_OFFSET] = offset_header
            self.response = type("R", (), {"status": status if offset else 200})()

        def read(self, size):
            return b""

        def close(self):
            pass

    class Client:
        def download(self, key, offset, on_socket=None):
            return Body(offset)

    stream = StoredStream(Client(), _manifest("a"))
    stream.offset = 1000
    if ok:
        stream._open().close()
    else:
        with pytest.raises(ZfsmgrError, match="unexpected HTTP status 200"):
            stream._open()


def test_an_imported_json_catalog_is_marked_by_its_stores(tmp_path, monkeypatch):
    from zfsmgr import settings
    from zfsmgr.server.context import ServerContext

    monkeypatch.chdir(tmp_path)
    local = _manifest("b", "a", 5, storage="local")
    stored = _manifest("c", "b", 6, storage="dir")
    (tmp_path / "metadata.json").write_text(json.dumps(
        {"version": 1, "backups": {"client1": [local.to_dict(), stored.to_dict()]}}))
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b")}))
    found = {m.key: m for m in ctx.catalog.list("client1")}
    assert found[local.key].self_contained and not found[stored.key].self_contained
