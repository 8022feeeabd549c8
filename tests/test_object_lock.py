"""Immutable storage: S3 Object Lock on SeaweedFS 4.48 (which enforces it: a locked version
cannot be deleted), the startup check that proves it and fails closed, and the `local` store's
`zfs hold` on every committed snapshot."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

import hostile
import rig
from test_rotation_e2e import make_history
from zfsmgr import protocol
from zfsmgr.errors import StorageError
from zfsmgr.remote import ServerClient
from zfsmgr.retention import RetentionPolicy
from zfsmgr.storage.s3lock import ObjectLock, horizon

POLICY = {"keep_hourly": 2, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}


def api_of(server):
    return ServerClient(server.url, server.client_env["CLIENT_ID"],
                        server.client_env["API_KEY"])


def retained_until(client, bucket, key) -> datetime:
    return client.get_object_retention(bucket, key).retain_until_date


@pytest.mark.zfs
@pytest.mark.s3
def test_object_lock_retains_every_backup_and_extends_bases(pool, server_factory, run_zfsmgr):
    server = server_factory("s3", rotation_policy=POLICY,
                            env={"S3_OBJECT_LOCK": "governance", "MIN_RETAIN_DAYS": "0"})
    assert "Object Lock (governance) on bucket" in server.log() and "is enforced" in server.log()
    s3, bucket = server.s3["seaweed"].client(), server.s3["bucket"]
    api = api_of(server)
    started = datetime.now(timezone.utc)
    dataset, uploaded = make_history(pool, api, chains=2, length=2, step=3600.0)
    for m in uploaded:
        for key in (m["key"], protocol.manifest_key(m["key"])):
            until = retained_until(s3, bucket, key)
            assert started + timedelta(hours=2) - timedelta(seconds=5) <= until
            assert until <= datetime.now(timezone.utc) + timedelta(hours=2, seconds=5)
        assert m["extra"]["retain_until"]  # recorded in the (plaintext) manifest
    for base, child in ((uploaded[0], uploaded[1]), (uploaded[2], uploaded[3])):  # extended
        assert retained_until(s3, bucket, base["key"]) >= retained_until(s3, bucket,
                                                                         child["key"])
    full = uploaded[0]["key"]
    # the service itself refuses to delete a retained version, whoever asks
    version = s3.stat_object(bucket, full).version_id
    with pytest.raises(Exception) as refused:
        s3.remove_object(bucket, full, version_id=version)
    assert "AccessDenied" in str(refused.value)
    # the server's rotation plans to delete the old ones, and the lock keeps them for now
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["rotation_policy"] = {"keep_hourly": 0, "keep_daily": 0, "keep_weekly": 0,
                                     "keep_monthly": 0}
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    plan = api.call("POST", protocol.ROTATE, {"dry_run": True})
    assert sorted(plan["deleted"]) == sorted(m["key"] for m in uploaded[:2])  # the old chain
    done = run_zfsmgr(["server", "rotate"], env=server.env, cwd=server.workdir)
    assert done.returncode == 0, done.stderr
    assert "client1: deleted 0," in done.stdout
    assert len(api.call("GET", protocol.SNAPSHOTS)["snapshots"]) == 4
    restore = run_zfsmgr(["restore", "verify", "--all"], env=server.client_env)
    assert restore.returncode == 0, restore.stderr


@pytest.mark.s3
def test_a_bucket_without_object_lock_refuses_to_start(seaweed, tmp_path, run_zfsmgr):
    bucket = f"nolock-{int(time.time() * 1000)}"
    seaweed.client().make_bucket(bucket)  # an existing bucket, made without Object Lock
    env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1", "STORAGE_DIR": str(tmp_path),
           "S3_ENABLED": "true", "S3_ENDPOINT": seaweed.endpoint, "S3_USE_SSL": "false",
           "S3_ACCESS_KEY": seaweed.access_key, "S3_SECRET_KEY": seaweed.secret_key,
           "S3_BUCKET": bucket, "S3_OBJECT_LOCK": "compliance"}
    refused = run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=60)
    assert refused.returncode != 0
    assert f"bucket {bucket} has no Object Lock" in refused.stderr
    assert list(seaweed.client().list_objects(bucket, recursive=True)) == []
    bad = run_zfsmgr(["server"], env={**env, "S3_OBJECT_LOCK": "sometimes"}, cwd=tmp_path)
    assert bad.returncode == 2 and "S3_OBJECT_LOCK" in bad.stderr


class _IgnoringService:
    """A service that takes retention and then deletes anyway (pure logic for prove())."""

    def __init__(self):
        self.deleted = []

    def get_object_lock_config(self, bucket):
        return object()

    def list_objects(self, *args, **kwargs):
        return []

    def put_object(self, bucket, key, data, length, retention=None):
        assert retention is not None
        return type("Written", (), {"version_id": "v1"})()

    def remove_object(self, bucket, key, version_id=None):
        self.deleted.append((key, version_id))


def test_the_startup_check_fails_closed_when_the_lock_is_ignored():
    service = _IgnoringService()
    lock = ObjectLock("compliance", service, "b", lambda what, func, *a, **k: func(*a, **k))
    with pytest.raises(StorageError) as err:
        lock.prove()
    assert "does not enforce Object Lock; refusing to start" in str(err.value)
    assert service.deleted and not lock.proven


def test_retention_follows_the_policy_with_a_floor():
    assert horizon(RetentionPolicy(24, 7, 4, 12), 0) == timedelta(hours=24)
    assert horizon(RetentionPolicy(0, 7, 4, 12), 0) == timedelta(days=7)
    assert horizon(RetentionPolicy(0, 0, 0, 12), 0) == timedelta(days=12 * 31)
    assert horizon(RetentionPolicy(24, 7, 4, 12), 30) == timedelta(days=30)


@pytest.mark.zfs
def test_the_local_store_holds_what_it_received(pool, server_factory, run_zfsmgr):
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/srv")
    policy = {"keep_hourly": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    server = server_factory("local", base_dataset=f"{pool.name}/srv", rotation_policy=policy)
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    for seed in (1, 2):
        rig.write_files(pool.mountpoint(dataset), seed=seed, count=1, size=20_000)
        run_zfsmgr(["client", "backup-full"], env=env, check=True)
    received = [line for line in rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot",
                                        "-r", f"{pool.name}/srv").splitlines() if line]
    assert len(received) == 2
    for snap in received:
        assert rig.sh("zfs", "get", "-H", "-o", "value", "userrefs", snap).strip() == "1"
        by_hand = subprocess.run(["zfs", "destroy", snap], capture_output=True, text=True)
        assert by_hand.returncode != 0  # held
    done = run_zfsmgr(["server", "rotate"], env=server.env, cwd=server.workdir)
    assert done.returncode == 0, done.stderr
    assert "client1: deleted 1," in done.stdout
    left = [line for line in rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r",
                                    f"{pool.name}/srv").splitlines() if line]
    assert left == received[1:]
    assert len(api_of(server).call("GET", protocol.SNAPSHOTS)["snapshots"]) == 1


@pytest.mark.zfs
@pytest.mark.s3
def test_a_locked_backup_an_admin_deletes_stays_listed(pool, server_factory, run_zfsmgr):
    """`server delete` and `forget` of an object-locked backup fail with the store's reason,
    and the backup, still stored, stays in the catalog (before: unlisted, yet stored)."""
    server = server_factory("s3", env={"S3_OBJECT_LOCK": "governance", "MIN_RETAIN_DAYS": "1"})
    api = api_of(server)
    dataset, uploaded = make_history(pool, api, chains=1, length=1)
    key = uploaded[0]["key"]
    for argv in (["delete", key], ["forget", "client1", dataset]):
        refused = run_zfsmgr(["server", *argv], env=server.env, cwd=server.workdir)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        listed = run_zfsmgr(["server", "clients", "--json"], env=server.env, cwd=server.workdir)
        assert json.loads(listed.stdout)["clients"][0]["backups"] == 1  # the catalog as is
        assert [m["key"] for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]] == [key]
        assert f"{key} not deleted, still listed:" in refused.stderr
        assert "Object Lock" in refused.stderr and "Traceback" not in refused.stderr
    s3, bucket = server.s3["seaweed"].client(), server.s3["bucket"]
    assert s3.stat_object(bucket, key).size == uploaded[0]["stored_size"]


@pytest.mark.s3
def test_a_malformed_commit_extends_no_retention(server_factory):
    """The retention of the chain's bases was extended before the commit's body was checked:
    a malformed commit (here a sha256 that is no hex) locked the client's bases for longer,
    every time it was sent."""
    server = server_factory("s3", rotation_policy=POLICY,
                            env={"S3_OBJECT_LOCK": "governance", "MIN_RETAIN_DAYS": "0"})
    s3, bucket = server.s3["seaweed"].client(), server.s3["bucket"]
    alice = hostile.auth_of(server.client_env)
    full = hostile.open_upload(server.url, alice)
    statuses, declaration = hostile.send_parts(server.url, alice, full, b"f" * 1000)
    assert hostile.commit(server.url, alice, full, declaration)[0] == 200
    locked = retained_until(s3, bucket, full["key"])
    status, answer, _ = hostile.request(server.url, "POST", "/upload", {
        "dataset": "tank/data", "snapshot": "s1700000100", "type": "incremental",
        "parent": "s1700000000", "compression": "none", "snapshot_time": 1700000100}, alice)
    assert status == 200, answer
    statuses, declaration = hostile.send_parts(server.url, alice, answer, b"i" * 100)
    time.sleep(1.5)
    status, refused = hostile.commit(server.url, alice, answer,
                                     {**declaration, "sha256": "not hex"})
    assert status == 400, refused
    assert retained_until(s3, bucket, full["key"]) == locked
    assert hostile.commit(server.url, alice, answer, declaration)[0] == 200
    assert retained_until(s3, bucket, full["key"]) > locked


def test_an_object_lock_service_out_of_reach_is_a_storage_error():
    """The Object Lock calls that read S3's refusals themselves (the startup proof, the
    retention a commit extends, the deletes of versions) let a service out of reach through
    as urllib3's MaxRetryError: a 500 with a traceback from a commit or a rotation, where
    every other S3 call says StorageError (503, retried). A closed port on loopback is out
    of reach for real."""
    from zfsmgr.storage.s3 import S3Store

    store = S3Store(f"127.0.0.1:{rig.free_port()}", "access", "secret", "bucket",
                    secure=False, object_lock="governance")
    with pytest.raises(StorageError, match="retention of some/key failed: MaxRetryError"):
        store.lock.extend("some/key", datetime.now(timezone.utc) + timedelta(days=1))
    with pytest.raises(StorageError, match="Object Lock configuration of bucket failed"):
        store.lock.prove()
