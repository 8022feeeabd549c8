"""Two servers on one SeaweedFS bucket: leases, change markers, shared sessions, chains."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import threading
import time
import urllib.request
import uuid

import pytest

import rig
from test_backup_e2e import files_of
from zfsmgr.storage.s3 import S3Store
from zfsmgr.storage.s3shared import LEASES


def _store(s3, bucket):
    store = S3Store(s3["endpoint"], s3["access_key"], s3["secret_key"], bucket, secure=False)
    store.check()
    return store


def test_a_lease_is_held_by_one_server_at_a_time_and_taken_over_when_expired(s3, caplog):
    bucket = f"zfsmgr-{uuid.uuid4().hex[:12]}"
    with caplog.at_level(logging.INFO):
        first, second = _store(s3, bucket), _store(s3, bucket)
    assert first.coordination.conditional is True
    assert "enforces conditional writes" in caplog.text
    order = []
    inside = threading.Event()

    def hold():
        with first.client_lease("c1"):
            inside.set()
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    with second.client_lease("c1"):  # waits for the first server's release
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]
    with second.client_lease("c2"):  # another client is not held up
        pass
    # a server died holding a lease: once it expired, another takes it over
    first.put_small(f"{LEASES}c3", json.dumps({"holder": "dead:1", "until": 1.0}).encode())
    with caplog.at_level(logging.WARNING):
        with second.client_lease("c3"):
            pass
    assert "held by dead:1 expired" in caplog.text
    assert not list(second.client.list_objects(bucket, prefix=LEASES, recursive=True))


def _request(server, path, client, key, body=None, method="GET"):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.url + path, data=data, method=method, headers={
        "X-Client-ID": client, "X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _pair(server_factory, clients, **kwargs):
    """Two servers on one bucket, each with its own database, both knowing `clients`."""
    entries = [{"client_id": c, "api_key": hashlib.sha256(k.encode()).hexdigest(),
                "max_size_bytes": 0, "enabled": True, "storage_type": "s3"}
               for c, k in clients.items()]
    return [server_factory("s3", extra_clients=entries, **kwargs) for _ in range(2)]


def test_an_upload_opened_on_one_server_is_finished_on_the_other(server_factory):
    key = secrets.token_hex(16)
    a, b = _pair(server_factory, {"c1x": key})
    code, opened = _request(a, "/upload", "c1x", key, {
        "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}, "POST")
    assert code == 200, opened
    part = b"p" * (5 << 20)
    upload_id = opened["upload_id"]
    assert _request(b, f"/upload-stream/{upload_id}/0", "c1x", key, part, "POST")[0] == 200
    code, done = _request(a, f"/upload-stream/{upload_id}/commit", "c1x", key, {
        "sha256": hashlib.sha256(part).hexdigest(), "stored_size": len(part),
        "parts_crc32": rig.parts_crc32([part])}, "POST")
    assert code == 200, done
    assert "was opened by another server" in b.log()
    # each server lists what the other committed, and deletes seen by both
    for server in (a, b):
        code, listed = _request(server, "/snapshots", "c1x", key)
        assert [s["key"] for s in listed["snapshots"]] == [done["manifest"]["key"]]
    code, again = _request(b, "/upload", "c1x", key, {
        "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}, "POST")
    assert code == 409 and "already exists" in again["message"]
    # a deletion through one (here: the bucket's own store object) is seen by both at once
    store = _store(a.s3, a.s3["bucket"])
    store.delete(store.read_manifest(done["manifest"]["key"]))
    for server in (a, b):
        assert _request(server, "/snapshots", "c1x", key)[1]["snapshots"] == []
        assert _request(server, "/status", "c1x", key)[1]["snapshot_count"] == 0


class _Unconditional:
    """A bucket that ignores preconditions, as some S3 services do (only the calls probed)."""

    bucket = "plain"

    def __init__(self):
        self.objects = {}

    def put_small(self, key, data, headers=None):
        self.objects[key] = data
        return "etag"

    def delete_key(self, key, headers=None):
        self.objects.pop(key, None)


def test_without_conditional_writes_the_server_says_it_must_run_alone(caplog):
    from zfsmgr.storage.s3shared import Coordination

    bucket = _Unconditional()
    coordination = Coordination(bucket)
    with caplog.at_level(logging.WARNING):
        with coordination.lease("c1"):  # only this process's lock: nothing in the bucket
            assert bucket.objects == {}
    assert coordination.conditional is False
    assert "run only ONE zfsmgr server on this bucket" in caplog.text


def test_clients_alternating_between_two_servers_keep_their_chains(
        pool, server_factory, run_zfsmgr):
    """Each client backs up through server A, then B, then A…: every incremental finds its
    base (committed through the other server), and the chains restore."""
    keys = {f"alt{n}": secrets.token_hex(16) for n in range(2)}
    servers = _pair(server_factory, keys)
    datasets = {c: pool.create(f"d{c}") for c in keys}
    expected = {}
    for round_ in range(4):
        for n, (client, key) in enumerate(keys.items()):
            server = servers[(round_ + n) % 2]
            expected[client] = rig.write_files(pool.mountpoint(datasets[client]),
                                               seed=round_ * 10 + n, count=2, size=40_000)
            env = {"CLIENT_ID": client, "API_KEY": key, "SERVER_URL": server.url,
                   "STATE_DIR": str(pool.dir / f"state-{client}"),
                   "LOCAL_DATASET": datasets[client]}
            done = run_zfsmgr(["client", "backup"], env=env, check=True)
            assert (": full," in done.stdout) == (round_ == 0), done.stdout + done.stderr
        time.sleep(1.1)  # distinct snapshot timestamps
    for n, (client, key) in enumerate(keys.items()):
        env = {"CLIENT_ID": client, "API_KEY": key, "SERVER_URL": servers[n % 2].url,
               "STATE_DIR": str(pool.dir / f"state-{client}")}
        listed = json.loads(run_zfsmgr(["restore", "list", "--json"], env=env,
                                       check=True).stdout)
        assert len(listed) == 4
        target = f"{pool.name}/back{n}"
        run_zfsmgr(["restore", "latest", target], env=env, check=True)
        assert files_of(pool, target) == expected[client]
    assert "refreshed from s3" in servers[0].log() and "refreshed from s3" in servers[1].log()


def test_commits_through_two_servers_at_the_quota_edge(s3, tmp_path):
    """Twelve 1 KiB uploads of one client race through two servers (each its own database) on
    one bucket, against a quota of ten: the reservations in the bucket refuse parts past the
    quota, and the lease and the refresh under it let exactly ten commit (the check and the
    reservation of a part are not one step across servers, so more may stage), and the bucket
    holds exactly those."""
    from test_server_api import call
    from zfsmgr import settings
    from zfsmgr.server.app import make_app
    from zfsmgr.server.context import ServerContext

    key = secrets.token_hex(16)
    (tmp_path / "clients.json").write_text(json.dumps([{
        "client_id": "edge", "api_key": hashlib.sha256(key.encode()).hexdigest(),
        "max_size_bytes": 10 * 1024, "enabled": True, "storage_type": "s3"}]))
    apps = [make_app(ServerContext(settings.load("server", environ={
        "CONFIG_FILE": str(tmp_path / "clients.json"), "S3_ENABLED": "true",
        "S3_ENDPOINT": s3["endpoint"], "S3_ACCESS_KEY": s3["access_key"],
        "S3_SECRET_KEY": s3["secret_key"], "S3_BUCKET": s3["bucket"], "S3_USE_SSL": "false",
        "METADATA_FILE": str(tmp_path / f"server{n}" / "metadata.json"),
        "CLIENT_MAX_UPLOADS": "20", "CLIENT_MAX_REQUESTS": "20"}))) for n in range(2)]
    auth = {"X-Client-ID": "edge", "X-API-Key": key}
    results, start = {}, threading.Barrier(12, timeout=60)

    def race(n):
        app, data = apps[n % 2], bytes([n]) * 1024
        code, body, _ = call(app, "POST", "/upload", json.dumps({
            "dataset": "tank/data", "snapshot": f"s{n}", "type": "full", "compression": "none",
            "snapshot_time": 1700000000 + n}).encode(), auth)
        assert code == 200, body
        upload_id = json.loads(body)["upload_id"]
        code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/0", data, auth)
        assert code in (200, 413), body  # 413: the parts staged through both servers count
        start.wait(60)
        if code != 200:
            results[n] = code
            return
        code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/commit", json.dumps({
            "sha256": hashlib.sha256(data).hexdigest(), "stored_size": 1024,
            "parts_crc32": rig.parts_crc32([data])}).encode(), auth)
        results[n] = code

    threads = [threading.Thread(target=race, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.values()) == [200] * 10 + [413] * 2, sorted(results.items())
    store = _store(s3, s3["bucket"])
    assert len(store.manifest_keys("edge")) == 10
    for app in apps:
        code, body, _ = call(app, "GET", "/status", headers=auth)
        assert json.loads(body)["used_bytes"] == 10 * 1024


def test_an_upload_busy_on_the_other_server_does_not_expire_here(s3, tmp_path):
    """Server A opened an upload whose parts now arrive through B: A's janitor finds its own
    row idle, but the bucket shows the upload active, so A keeps it."""
    from zfsmgr.server.clients import ClientConfig

    store = _store(s3, s3["bucket"])
    a, b = rig.uploads(tmp_path / "a"), rig.uploads(tmp_path / "b")
    client = ClientConfig("c1", "0" * 64)
    session = a.open(client, store, {"dataset": "tank/data", "snapshot": "s1", "type": "full",
                                     "compression": "none", "snapshot_time": 1700000000})
    b.table.add(session, time.time())
    part = b"q" * 1024
    b.put_part(client, store, session, 0, io.BytesIO(part), len(part))
    a.table.db.connection().execute("UPDATE sessions SET touched = 0")
    assert a.expire({"s3": store}) == []
    assert a.table.exists(session.upload_id) and store.staged_parts(session.upload_id)
    # truly abandoned (the bucket idle too): it goes
    assert a.expire({"s3": store}, now=time.time() + 7200) == [session.upload_id]
    assert store.staged_parts(session.upload_id) == []


def test_the_quota_counts_the_parts_staged_through_the_other_server(s3, tmp_path):
    """Each server records what an upload of a client with a quota holds in the bucket, so
    the other's quota check counts it; an abort or a commit drops it."""
    from test_server_api import call
    from zfsmgr import settings
    from zfsmgr.server.app import make_app
    from zfsmgr.server.context import ServerContext
    from zfsmgr.storage.s3shared import RESERVED

    key = secrets.token_hex(16)
    (tmp_path / "clients.json").write_text(json.dumps([{
        "client_id": "edge", "api_key": hashlib.sha256(key.encode()).hexdigest(),
        "max_size_bytes": 10 * 1024, "enabled": True, "storage_type": "s3"}]))
    a, b = (make_app(ServerContext(settings.load("server", environ={
        "CONFIG_FILE": str(tmp_path / "clients.json"), "S3_ENABLED": "true",
        "S3_ENDPOINT": s3["endpoint"], "S3_ACCESS_KEY": s3["access_key"],
        "S3_SECRET_KEY": s3["secret_key"], "S3_BUCKET": s3["bucket"], "S3_USE_SSL": "false",
        "METADATA_FILE": str(tmp_path / f"server{n}" / "metadata.json")}))) for n in range(2))
    auth = {"X-Client-ID": "edge", "X-API-Key": key}
    store = _store(s3, s3["bucket"])

    def open_on(app, n, estimate=0):
        code, body, _ = call(app, "POST", "/upload", json.dumps({
            "dataset": "tank/data", "snapshot": f"s{n}", "type": "full", "compression": "none",
            "snapshot_time": 1700000000 + n, "estimated_size": estimate}).encode(), auth)
        return code, json.loads(body)

    def part(app, upload_id, size):
        code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/0", b"p" * size, auth)
        return code, json.loads(body)

    code, u1 = open_on(a, 1)
    assert code == 200 and part(a, u1["upload_id"], 6 * 1024)[0] == 200
    assert store.reservations("edge", 3600) == {u1["upload_id"]: 6 * 1024}
    code, u2 = open_on(b, 2)
    assert code == 200
    code, refused = part(b, u2["upload_id"], 6 * 1024)  # 6 KiB staged through A + 6 > 10
    assert code == 413 and "12.0 KiB > quota 10.0 KiB" in refused["message"], refused
    assert store.staged_parts(u2["upload_id"]) == []  # refused and aborted: nothing staged
    code, refused = open_on(b, 3, estimate=6 * 1024)
    assert code == 413, refused
    code, u4 = open_on(b, 4)
    assert code == 200 and part(b, u4["upload_id"], 4 * 1024)[0] == 200  # 6 + 4 fit

    assert call(a, "POST", f"/upload-stream/{u1['upload_id']}/abort", b"", auth)[0] == 200
    assert store.reservations("edge", 3600) == {u4["upload_id"]: 4 * 1024}
    code, u5 = open_on(a, 5)
    assert code == 200 and part(a, u5["upload_id"], 6 * 1024)[0] == 200  # 4 + 6 fit now
    data = b"p" * 4 * 1024
    code, body, _ = call(b, "POST", f"/upload-stream/{u4['upload_id']}/commit", json.dumps({
        "sha256": hashlib.sha256(data).hexdigest(), "stored_size": len(data),
        "parts_crc32": rig.parts_crc32([data])}).encode(), auth)
    assert code == 200, body
    assert store.reservations("edge", 3600) == {u5["upload_id"]: 6 * 1024}

    # a reservation whose server died: counted until it is older than the upload expiry
    store.reserve("edge", "f" * 32, 1024)
    time.sleep(2.1)
    assert store.reservations("edge", 1.0) == {}
    assert [o.object_name for o in store.client.list_objects(
        s3["bucket"], prefix=f"{RESERVED}edge/", recursive=True)] == []


def test_a_lease_this_server_left_behind_is_taken_back_at_once(s3, monkeypatch):
    """A release that failed (the bucket out of reach a moment) or a lease write whose answer
    was lost left this server's own lease in the bucket: every later commit or rotation of
    the client waited for it (LEASE_WAIT) and failed with a 503, for its 15 minutes."""
    from zfsmgr.errors import StorageError
    from zfsmgr.storage import s3shared

    monkeypatch.setattr(s3shared, "LEASE_WAIT", 2.0)
    bucket = f"zfsmgr-{uuid.uuid4().hex[:12]}"
    store = _store(s3, bucket)
    left = {"holder": store.coordination.holder, "until": time.time() + 900}
    store.put_small(f"{LEASES}c1", json.dumps(left).encode())
    with store.client_lease("c1"):
        pass
    assert not list(store.client.list_objects(bucket, prefix=LEASES, recursive=True))
    other = {"holder": "other-server:1", "until": time.time() + 900}  # still waited for
    store.put_small(f"{LEASES}c2", json.dumps(other).encode())
    with pytest.raises(StorageError, match="busy on another server"):
        with store.client_lease("c2"):
            pass


def test_a_manifest_write_sent_again_after_its_answer_was_lost_commits(s3, monkeypatch):
    """minio sends a write again when its answer is lost or a 5xx; the manifest's first write
    (If-None-Match: *) had been applied, so the second got 412 and the commit said "committed
    by another server" (409, not retried), and the client's abort then deleted the backup."""
    from zfsmgr.errors import Conflict
    from zfsmgr.protocol import Manifest

    store = _store(s3, f"zfsmgr-{uuid.uuid4().hex[:12]}")
    data = secrets.token_bytes(1000)
    key = "c1/tank_data_2024-02-13_14:30:00.zfs"
    manifest = Manifest(key=key, client_id="c1", dataset="tank/data", snapshot="a",
                        type="full", parent=None, compression="none", raw_size=len(data),
                        stored_size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        created="2024-02-13T14:30:05Z", snapshot_time=1707834600.0,
                        storage_type="s3", extra={"note": "x"})
    put = store.put_small

    def applied_then_sent_again(name, body, headers=None, *args):
        etag = put(name, body, headers, *args)
        if name.endswith(".manifest.json"):
            put(name, body, headers, *args)  # the service's own 412 for the second
        return etag

    monkeypatch.setattr(store, "put_small", applied_then_sent_again)
    upload_id = uuid.uuid4().hex
    store.stage_part(upload_id, 0, io.BytesIO(data), len(data))
    assert store.commit(upload_id, manifest) == manifest
    assert store.read_manifest(key) == manifest
    other = uuid.uuid4().hex  # another backup under that key is still a conflict
    store.stage_part(other, 0, io.BytesIO(data), len(data))
    with pytest.raises(Conflict, match="committed by another server"):
        store.commit(other, Manifest.from_dict({**manifest.to_dict(), "created": "later"}))


def test_a_lease_held_longer_than_its_life_is_renewed_not_taken_over(s3, monkeypatch):
    """A lease was written once, for LEASE_SECONDS: a commit composing thousands of parts
    outlasted it, and another server took the lease over in the middle of that commit."""
    from zfsmgr.storage import s3shared

    monkeypatch.setattr(s3shared, "LEASE_SECONDS", 1.5)
    bucket = f"zfsmgr-{uuid.uuid4().hex[:12]}"
    first, second = _store(s3, bucket), _store(s3, bucket)
    order, inside = [], threading.Event()

    def hold():
        with first.client_lease("c1"):
            inside.set()
            time.sleep(5)  # three lives of the lease
            order.append("first out")

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    with second.client_lease("c1"):  # waits (LEASE_WAIT) for the release
        order.append("second in")
    thread.join()
    assert order == ["first out", "second in"]
