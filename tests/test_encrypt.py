"""ENCRYPT=age on real parts: the host encrypts to a public key, the store holds only age files
(no plaintext anywhere), restore decrypts with AGE_IDENTITY_FILE, and so does `age -d` alone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid

import pytest

import rig
from zfsmgr import protocol
from zfsmgr.remote import ServerClient, ServerError

pytestmark = [pytest.mark.zfs]


@pytest.fixture
def age_key(tmp_path):
    """(identity file, recipient) made by age-keygen."""
    identity = tmp_path / "age-key.txt"
    rig.sh("age-keygen", "-o", str(identity))
    return identity, rig.sh("age-keygen", "-y", str(identity)).strip()


def marked_files(folder, marker: bytes, seed: int) -> dict:
    """Files whose text carries `marker`, plus the rig's mixed content."""
    (folder / f"secret{seed}.txt").write_bytes((marker + b" is plaintext\n") * 2000)
    return rig.write_files(folder, seed=seed, count=2, size=60_000)


def contents(pool, dataset) -> dict:
    """The digest of a received dataset's files (mounted under the pool's folder)."""
    name = dataset.split("/")[-1]
    rig.sh("zfs", "set", f"mountpoint={pool.dir}/{name}", dataset)
    rig.sh("zfs", "mount", dataset, check=False)  # zfs-fuse mounts on set, OpenZFS may not
    return rig.tree_digest(pool.dir / name)


def stored_objects(server):
    """(name, bytes) of every object the server's store holds, manifests included."""
    if server.s3 is None:
        return [(p.relative_to(server.storage_dir).as_posix(), p.read_bytes())
                for p in server.storage_dir.rglob("*") if p.is_file()]
    client = server.s3["seaweed"].client()
    found = []
    for obj in client.list_objects(server.s3["bucket"], recursive=True):
        response = client.get_object(server.s3["bucket"], obj.object_name)
        found.append((obj.object_name, response.read()))
        response.close()
        response.release_conn()
    return found


@pytest.mark.parametrize("storage", ["dir", pytest.param("s3", marks=pytest.mark.s3)])
def test_age_chain_restores_with_zfsmgr_and_with_age_alone(storage, pool, server_factory,
                                                           run_zfsmgr, age_key, tmp_path):
    identity, recipient = age_key
    server = server_factory(storage)
    dataset = pool.create("data")
    mnt = pool.mountpoint(dataset)
    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}".encode()
    env = {**server.client_env, "LOCAL_DATASET": dataset, "ENCRYPT": "age",
           "AGE_RECIPIENTS": recipient, "COMPRESS": "none"}
    digests = [marked_files(mnt, marker, 1)]
    run_zfsmgr(["client", "backup"], env=env, check=True)
    digests.append(marked_files(mnt, marker, 2))
    out = run_zfsmgr(["client", "backup"], env={**env, "COMPRESS": "gzip"}, check=True).stdout
    assert ": incremental," in out
    api = ServerClient(server.url, env["CLIENT_ID"], env["API_KEY"])
    manifests = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert [m["encryption"] for m in manifests] == ["age", "age"]
    assert manifests[0]["key"].endswith(".zfs.age")
    assert manifests[1]["key"].endswith(".zfs.gz.age")
    objects = dict(stored_objects(server))
    for m in manifests:
        body = objects[m["key"]]
        assert body.startswith(b"age-encryption.org/v1\n")
        assert hashlib.sha256(body).hexdigest() == m["sha256"]  # of the ciphertext
        stored_manifest = json.loads(objects[protocol.manifest_key(m["key"])])
        assert stored_manifest["encryption"] == "age"  # plaintext metadata
        assert stored_manifest["dataset"] == dataset and stored_manifest["snapshot"]
    for name, body in objects.items():
        assert marker not in body, name
    # restore needs the key, and then restores the whole chain
    restore_env = {**server.client_env}
    refused = run_zfsmgr(["restore", "latest", f"{pool.name}/r"], env=restore_env)
    assert refused.returncode == 2 and "AGE_IDENTITY_FILE" in refused.stderr, refused.stderr
    assert subprocess.run(["zfs", "list", f"{pool.name}/r"], capture_output=True).returncode

    restore_env["AGE_IDENTITY_FILE"] = str(identity)
    run_zfsmgr(["restore", "latest", f"{pool.name}/r"], env=restore_env, check=True)
    assert contents(pool, f"{pool.name}/r") == digests[1]
    verify = run_zfsmgr(["restore", "verify", "--all"], env=server.client_env)  # no key
    assert verify.returncode == 0, verify.stderr
    # without zfsmgr: age -d, then gunzip (or nothing for the uncompressed full), zfs recv
    manual = f"{pool.name}/manual"
    for m in manifests:
        path = tmp_path / m["key"].split("/")[1]
        path.write_bytes(objects[m["key"]])
        plain = subprocess.run(["age", "-d", "-i", str(identity), str(path)],
                               capture_output=True, check=True).stdout
        if m["compression"] == "gzip":
            plain = subprocess.run(["gunzip"], input=plain, capture_output=True,
                                   check=True).stdout
        subprocess.run(["zfs", "recv", "-u", "-F", manual], input=plain, check=True,
                       capture_output=True)
    assert contents(pool, manual) == digests[1]


def test_without_encryption_the_marker_is_in_the_store(pool, server_factory, run_zfsmgr):
    """The control: the same backup without ENCRYPT leaves the marker readable."""
    server = server_factory("dir")
    dataset = pool.create("data")
    marker = f"PLAINTEXT-MARKER-{uuid.uuid4().hex}".encode()
    marked_files(pool.mountpoint(dataset), marker, 1)
    run_zfsmgr(["client", "backup"], env={**server.client_env, "LOCAL_DATASET": dataset,
                                          "COMPRESS": "none"}, check=True)
    assert any(marker in body for _, body in stored_objects(server))


def test_bad_settings_and_the_local_store_refuse(pool, server_factory, run_zfsmgr, age_key):
    _, recipient = age_key
    dataset = pool.create("data")
    server = server_factory("dir")
    env = {**server.client_env, "LOCAL_DATASET": dataset, "ENCRYPT": "age"}
    missing = run_zfsmgr(["client", "backup"], env=env)
    assert missing.returncode == 2 and "AGE_RECIPIENTS" in missing.stderr
    bad = run_zfsmgr(["client", "backup"], env={**env, "AGE_RECIPIENTS": "-o /etc/passwd"})
    assert bad.returncode == 2 and "AGE_RECIPIENTS" in bad.stderr
    rig.sh("zfs", "create", f"{pool.name}/srv")
    local = server_factory("local", base_dataset=f"{pool.name}/srv")
    api = ServerClient(local.url, local.client_env["CLIENT_ID"], local.client_env["API_KEY"])
    with pytest.raises(ServerError) as err:
        api.call("POST", protocol.UPLOAD, {
            "dataset": dataset, "snapshot": "s1", "type": "full", "compression": "gzip",
            "snapshot_time": 1_700_000_000, "estimated_size": 1000, "encryption": "age"})
    assert err.value.status == 409 and "encrypted" in err.value.server_message
    assert api.call("GET", protocol.SNAPSHOTS)["snapshots"] == []


def test_a_raw_send_is_never_wrapped_twice(server_factory, age_key):
    """A natively encrypted dataset's raw send is ciphertext already: the client leaves it as
    it is, and the server refuses a request that would wrap it."""
    from zfsmgr.client.backup import Backup
    from zfsmgr.crypt import Encryption
    from zfsmgr.zfs import Features

    _, recipient = age_key
    sealing = Encryption("age", (recipient,))
    backup = Backup(None, None, "tank/data", "gzip", 1, encryption=sealing)
    assert backup._sealing(Features(raw_send=True)).label == ""
    assert backup._sealing(Features(raw_send=False)).label == "age"
    server = server_factory("dir")
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    with pytest.raises(ServerError) as err:
        api.call("POST", protocol.UPLOAD, {
            "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
            "snapshot_time": 1_700_000_000, "estimated_size": 1000, "raw_send": True,
            "encryption": "age"})
    assert err.value.status == 400 and "never wrapped again" in err.value.server_message


def test_an_interrupted_encrypted_upload_starts_again(pool, server_factory, age_key, caplog,
                                                      tmp_path):
    """age seals each run with a new key, so the parts the server holds can never match a
    regenerated stream: after a broken connection the upload starts again, and what is
    published decrypts to the stream zfs sent."""
    import logging

    from zfsmgr.client.backup import Backup
    from zfsmgr.crypt import Encryption
    from zfsmgr.errors import ServerUnreachable
    from zfsmgr.zfs import Zfs

    identity, recipient = age_key
    server = server_factory("dir", env={"PART_SIZE": "64K"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=8, count=3, size=100_000)

    class BreaksOnce(ServerClient):
        broken = 0

        def send_part(self, upload_id, index, chunks, segment=0):
            if index == 2 and not self.broken:
                self.broken += 1
                raise ServerUnreachable("connection reset (test)")
            return super().send_part(upload_id, index, chunks, segment)

    env = server.client_env
    api = BreaksOnce(env["SERVER_URL"], env["CLIENT_ID"], env["API_KEY"])
    with caplog.at_level(logging.INFO, logger="zfsmgr.client"):
        result = Backup(api, Zfs(), dataset, "none", 1, sleep=lambda _: None,
                        encryption=Encryption("age", (recipient,))).run("auto")
    assert api.broken == 1 and "starting it again" in caplog.text
    [manifest] = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    stored = next(server.storage_dir.rglob("*.zfs.age")).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == manifest["sha256"]
    plain = subprocess.run(["age", "-d", "-i", str(identity)], input=stored,
                           capture_output=True, check=True).stdout
    sent = subprocess.run(["zfs", "send", result.snapshot], capture_output=True,
                          check=True).stdout
    assert plain == sent
    assert len(list(server.storage_dir.rglob("*.zfs.age"))) == 1
