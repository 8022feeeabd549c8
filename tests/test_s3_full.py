"""An S3 provider with no room left: a 507 naming the bucket and the bytes needed, and nothing
staged left behind.

SeaweedFS (the real S3 server here) enforces a bucket quota by making the bucket read-only, and
then answers every write 500 InternalError with a generic message, as it does when its volumes
are full: nothing tells "full" apart from a fault, so that stays a 503 (pinned below, with the
abort that still frees what was staged). The answers of the providers that do say it (Ceph's and
OpenStack's QuotaExceeded, MinIO's XMinioStorageFull, AWS's EntityTooLarge) are played by a
relay in front of SeaweedFS, so that the minio client parses real S3 error responses.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
import time

import pytest

import rig
from hostile import request
from s3relay import ANSWERS, S3Relay, compose
from zfsmgr.errors import StorageError, StorageFull
from zfsmgr.protocol import MIN_S3_PART_SIZE, Manifest
from zfsmgr.storage.s3 import STAGING, S3Store

PART = MIN_S3_PART_SIZE


def _parts_from(first: int):
    """Refuse the upload of staged part `first` and those after it."""
    def refuse(method, path, headers):
        found = re.search(r"/part-(\d{6})(\?|$)", path)
        return method == "PUT" and found is not None and int(found.group(1)) >= first
    return refuse


def _leftovers(seaweed, bucket):
    """Staged objects and incomplete multipart uploads left in the bucket."""
    client = seaweed.client()
    objects = [o.object_name for o in client.list_objects(bucket, prefix=STAGING,
                                                          recursive=True)]
    pending = client._list_multipart_uploads(bucket, prefix=STAGING).uploads
    return objects + [u.object_name for u in pending]


def _manifest(size):
    return Manifest(key="client1/tank_data_s1700000000.zfs", client_id="client1",
                    dataset="tank/data", snapshot="s1700000000", type="full", parent=None,
                    compression="none", raw_size=size, stored_size=size, sha256="0" * 64,
                    created="2023-11-14T22:13:20+00:00", snapshot_time=1700000000.0,
                    storage_type="s3")


@pytest.mark.parametrize("code", sorted(ANSWERS))
def test_a_provider_full_answer_is_a_507_naming_the_bucket_and_the_bytes(s3, code):
    seaweed = s3["seaweed"]
    relay = S3Relay(seaweed.endpoint, code, _parts_from(1))
    try:
        store = S3Store(relay.endpoint, seaweed.access_key, seaweed.secret_key, s3["bucket"],
                        secure=False)
        store.check()
        assert store.free_bytes() is None
        store.stage_part("a" * 32, 0, io.BytesIO(os.urandom(PART)), PART)
        with pytest.raises(StorageFull) as full:
            store.stage_part("a" * 32, 1, io.BytesIO(b"x" * 1000), 1000)
        assert full.value.http_status == 507
        message = str(full.value)
        assert message.startswith(f"S3 bucket {s3['bucket']} on {relay.endpoint} is full:")
        assert f"part 1 of upload {'a' * 32} needs 1000 bytes ({code}:" in message
        assert store.free_bytes() == 0  # /health says full until a write succeeds again
        assert [p.index for p in store.staged_parts("a" * 32)] == [0]
        store.discard("a" * 32)  # what the client's abort does
        assert _leftovers(seaweed, s3["bucket"]) == []
        relay.refuse = lambda *args: False  # room again
        store.stage_part("b" * 32, 0, io.BytesIO(b"y" * 1000), 1000)
        assert store.free_bytes() is None
        store.discard("b" * 32)
    finally:
        relay.shutdown()


def test_a_commit_the_provider_has_no_room_for_is_a_507_and_can_be_retried(s3):
    seaweed = s3["seaweed"]
    relay = S3Relay(seaweed.endpoint, "QuotaExceeded", compose)
    try:
        store = S3Store(relay.endpoint, seaweed.access_key, seaweed.secret_key, s3["bucket"],
                        secure=False)
        store.check()
        data = os.urandom(PART + 1000)
        store.stage_part("c" * 32, 0, io.BytesIO(data[:PART]), PART)
        store.stage_part("c" * 32, 1, io.BytesIO(data[PART:]), 1000)
        manifest = _manifest(len(data))
        with pytest.raises(StorageFull, match=rf"the commit of {re.escape(manifest.key)} needs"
                                              rf" {len(data)} bytes \(QuotaExceeded:"):
            store.commit("c" * 32, manifest)
        client = seaweed.client()
        assert [o.object_name for o in client.list_objects(s3["bucket"], prefix="client1/",
                                                           recursive=True)] == []
        assert client._list_multipart_uploads(s3["bucket"], prefix="client1/").uploads == []
        relay.refuse = lambda *args: False
        assert store.commit("c" * 32, manifest).key == manifest.key  # kept staged: a retry
        got = client.get_object(s3["bucket"], manifest.key)
        assert got.read() == data
        got.close()
        assert _leftovers(seaweed, s3["bucket"]) == []
    finally:
        relay.shutdown()


def test_a_commit_whose_manifest_finds_no_room_leaves_no_object_and_can_be_retried(s3):
    """The compose made the object, then the provider refused its manifest (507): the object
    stayed, uncounted and unlisted (the abort sees no manifest), for ever."""
    seaweed = s3["seaweed"]
    relay = S3Relay(seaweed.endpoint, "XMinioStorageFull",
                    lambda method, path, headers: method == "PUT" and
                    path.split("?")[0].endswith(".manifest.json"))
    try:
        store = S3Store(relay.endpoint, seaweed.access_key, seaweed.secret_key, s3["bucket"],
                        secure=False)
        store.check()
        data = os.urandom(1000)
        store.stage_part("d" * 32, 0, io.BytesIO(data), len(data))
        manifest = dataclasses.replace(_manifest(len(data)),
                                       key="client1/tank_data_2023-11-14_22:13:20.zfs")
        with pytest.raises(StorageFull):
            store.commit("d" * 32, manifest)
        assert relay.refused  # the manifest's write, after the compose
        client = seaweed.client()
        assert [o.object_name for o in client.list_objects(s3["bucket"], prefix="client1/",
                                                           recursive=True)] == []
        relay.refuse = lambda *args: False
        assert store.commit("d" * 32, manifest) == manifest  # still staged: a retry
        assert store.read_manifest(manifest.key) == manifest
        assert _leftovers(seaweed, s3["bucket"]) == []
    finally:
        relay.shutdown()


def test_a_compose_a_stopped_server_left_unfinished_is_aborted_once_old(s3):
    """A server killed during a commit's compose left minio's multipart upload at the
    backup's key, holding the copied parts, listed nowhere: nothing ever aborted it."""
    import time as clock

    seaweed = s3["seaweed"]
    store = S3Store(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, s3["bucket"],
                    secure=False)
    store.check()
    client = seaweed.client()
    left = client._create_multipart_upload(s3["bucket"], "client1/tank_a_s1.zfs", {})
    staged = client._create_multipart_upload(s3["bucket"], f"{STAGING}{'e' * 32}/part-000000",
                                             {})
    assert store.sweep(3600, clock.time()) == []  # younger than the expiry: under way
    done = store.sweep(0, clock.time() + 5)
    assert done == ["aborted the unfinished compose of client1/tank_a_s1.zfs"], done
    pending = {u.upload_id for u in client._list_multipart_uploads(s3["bucket"]).uploads}
    assert left not in pending and staged in pending  # staging is its upload's own
    store.discard("e" * 32)


def test_a_backup_told_the_provider_is_full_stops_in_one_line_and_leaves_nothing(
        pool, s3, server_factory):
    seaweed = s3["seaweed"]
    relay = S3Relay(seaweed.endpoint, "QuotaExceeded", _parts_from(1))
    try:
        server = server_factory("s3", env={"S3_ENDPOINT": relay.endpoint})
        dataset = pool.create("data")
        rig.write_files(pool.mountpoint(dataset), seed=5, count=3, size=4 << 20)
        env = rig.clean_env({**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none"})
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"zfsmgr: error: server refused \(507\): S3 bucket {s3['bucket']}"
                            rf" on {relay.endpoint} is full: part 1 of upload [0-9a-f]{{32}}"
                            rf" needs \d+ bytes \(QuotaExceeded: The quota has been exceeded\.\)",
                            last), proc.stderr
        assert "retry" not in proc.stderr and "Traceback" not in proc.stderr
        assert time.monotonic() - started < 60
        assert relay.refused  # the relay did refuse the part
        assert _leftovers(seaweed, s3["bucket"]) == []  # the abort deleted part 0
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""
        health = request(server.url, "GET", "/health")[1]
        assert health["status"] == "full" and health["storage"]["s3"]["full"] is True

        relay.refuse = lambda *args: False  # room again: the same backup goes through
        proc = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert request(server.url, "GET", "/health")[1]["status"] == "healthy"
        assert "Traceback" not in server.log()
    finally:
        relay.shutdown()


def test_seaweedfs_over_its_bucket_quota_answers_a_fault_and_the_abort_still_frees(seaweed):
    """Measured on SeaweedFS 4.48: `s3.bucket.quota.enforce -apply` makes a bucket over its
    quota read-only; writes then get 500 InternalError (minio retries it, then gives up), which
    the store cannot tell from a fault (503, not 507); deletes still work."""
    bucket = f"zfsmgr-quota-{os.getpid()}"
    store = S3Store(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, bucket,
                    secure=False)
    store.check()
    store.stage_part("d" * 32, 0, io.BytesIO(os.urandom(PART)), PART)
    seaweed.shell(f"s3.bucket.quota -name={bucket} -op=set -sizeMB=1")
    # enforce compares the quota with the bucket's size in the master's topology, which the
    # volume server's heartbeat updates every few seconds; in two CI runs on a loaded machine
    # (2026-12-01, 2026-12-02) not within 90 s, nor 180 s, after 800 tests' buckets. Past
    # 60 s the test makes the bucket read-only as enforce does: the rule is the same.
    deadline = time.monotonic() + 60
    while "read only" not in seaweed.shell("s3.bucket.quota.enforce -apply"):
        if time.monotonic() > deadline:
            rule = seaweed.shell(f"fs.configure -locationPrefix=/buckets/{bucket}/"
                                 " -readOnly -apply")
            assert '"readOnly":  true' in rule, rule
            break
        time.sleep(2)
    with pytest.raises(StorageError) as refused:
        store.stage_part("d" * 32, 1, io.BytesIO(b"x" * 1000), 1000)
    assert not isinstance(refused.value, StorageFull) and refused.value.http_status == 503
    assert "500" in str(refused.value)
    store.discard("d" * 32)
    assert _leftovers(seaweed, bucket) == []


class _ListingFails:
    """minio's listings and bulk deletes are generators: S3 is asked as they are read."""

    def list_objects(self, *args, **kwargs):
        from urllib3.exceptions import MaxRetryError
        yield from ()
        raise MaxRetryError(None, "/bucket?list-type=2", "SlowDown")

    def remove_objects(self, *args, **kwargs):
        from minio.error import S3Error
        yield from ()
        raise S3Error(None, "AccessDenied", "no ListBucket", "/b", "r", "h")


@pytest.mark.parametrize("call", ["manifest_keys", "staged_uploads", "manifests", "listing"])
def test_a_listing_that_fails_while_read_is_a_storage_error(call):
    """The error came out of the generator after `_call` returned it: a raw urllib3 error (a
    500 with a traceback) where the store's error (503) was due."""
    store = S3Store("127.0.0.1:1", "ak", "SECRETSK", "bucket", secure=False)
    store.client = _ListingFails()
    args = {"manifest_keys": ("c1",), "manifests": ("c1",), "listing": ("p/",)}.get(call, ())
    with pytest.raises(StorageError) as err:
        list(getattr(store, call)(*args))
    assert "S3 list failed: MaxRetryError" in str(err.value) and "SECRETSK" not in str(err.value)


def test_a_bulk_delete_that_fails_while_read_is_a_storage_error():
    store = S3Store("127.0.0.1:1", "ak", "sk", "bucket", secure=False)
    store.client = _ListingFails()
    with pytest.raises(StorageError, match="S3 delete failed: AccessDenied"):
        list(store._call("delete", store.client.remove_objects, "bucket", []))
