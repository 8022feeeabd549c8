"""The `local` store receives safely (zfs-fuse): properties a client sends never take effect,
replication streams and data that is not a zfs stream are refused before `zfs recv`, and
received datasets never mount on the server."""

from __future__ import annotations

import gzip
import os
import subprocess

import pytest

import hostile
import rig
from hostile import auth_of, request

pytestmark = [pytest.mark.zfs]


@pytest.fixture
def local_server(pool, server_factory):
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory("local", base_dataset=base)
    return server, base


def _source(pool, name="src"):
    dataset = pool.create(name)
    rig.write_files(pool.mountpoint(dataset), seed=4, count=2, size=100_000)
    rig.sh("zfs", "snapshot", f"{dataset}@a")
    guid = rig.sh("zfs", "get", "-Hp", "-o", "value", "guid", f"{dataset}@a").strip()
    return dataset, guid


def _open(server, guid, when=1700000000, dataset="tank/data", compression="none"):
    status, answer, _ = request(server.url, "POST", "/upload", {
        "dataset": dataset, "snapshot": f"s{when}", "type": "full", "compression": compression,
        "snapshot_time": when, "guid": guid}, auth_of(server.client_env))
    assert status == 200, answer
    return answer


def _received(base):
    out = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", base)
    return [n for n in out.splitlines() if n.count("/") > base.count("/") + 2 or "@" in n]


@pytest.mark.parametrize("flag", ["-p", "-R"])
def test_a_stream_with_properties_is_refused_before_zfs_recv(flag, pool, local_server,
                                                             tmp_path):
    server, base = local_server
    dataset, guid = _source(pool)
    target = tmp_path / "client-chose-this"
    rig.sh("zfs", "set", f"mountpoint={target}", dataset)
    rig.sh("zfs", "set", "org.evil:x=1", dataset)
    stream = subprocess.run(["zfs", "send", flag, f"{dataset}@a"], capture_output=True,
                            check=True).stdout
    session = _open(server, guid)
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{session['upload_id']}/0",
                                stream[:1 << 20], auth_of(server.client_env))
    assert status == 400, answer
    assert "replication or property stream" in answer["message"]
    assert _received(base) == []
    mounts = [line.split()[0] for line in open("/proc/mounts")]
    assert not [m for m in mounts if m.startswith(base + "/")]
    assert request(server.url, "POST", f"/upload-stream/{session['upload_id']}/abort", None,
                   auth_of(server.client_env))[0] == 200
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("body,compression", [
    (os.urandom(300_000), "none"), (gzip.compress(os.urandom(300_000)), "gzip"),
    (b"\x00" * 100, "none"), (b"hello", "none")], ids=["random", "gzip", "zeros", "short"])
def test_data_that_is_not_a_zfs_stream_is_400_and_never_reaches_zfs(body, compression,
                                                                    local_server):
    server, base = local_server
    session = _open(server, "", compression=compression)
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{session['upload_id']}/0",
                                body, auth_of(server.client_env))
    if status == 200:  # too short to judge yet: the commit finds it out, still before zfs
        declaration = {"sha256": "0" * 64, "parts_crc32": rig.parts_crc32([body]),
                       "stored_size": len(body), "raw_size": len(body)}
        status, answer = hostile.commit(server.url, auth_of(server.client_env), session,
                                        declaration)
    assert status == 400 and "not a zfs send stream" in answer["message"], answer
    assert "zfs recv" not in answer["message"]
    assert _received(base) == []


def _stored_full(server, pool, name):
    """A full backup of a new zfs-fuse dataset `name`, sent and committed: (status, answer)."""
    dataset, guid = _source(pool, name)
    stream = subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                            check=True).stdout
    session = _open(server, guid)
    statuses, declaration = hostile.send_parts(server.url, auth_of(server.client_env), session,
                                               stream)
    assert set(statuses) == {200}
    return hostile.commit(server.url, auth_of(server.client_env), session, declaration)


def test_a_received_dataset_never_mounts(pool, local_server):
    server, base = local_server
    status, answer = _stored_full(server, pool, "plain")
    assert status == 200, answer
    chain = answer["manifest"]["extra"]["zfs_snapshot"].split("@")[0]
    values = rig.sh("zfs", "get", "-H", "-o", "value", "canmount,mountpoint,mounted", chain)
    assert values.split() == ["off", "none", "no"]


def test_a_stream_of_another_snapshot_or_kind_is_refused(pool, local_server):
    server, base = local_server
    dataset, guid = _source(pool, "other")
    stream = subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                            check=True).stdout
    session = _open(server, str(int(guid) ^ 1))
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{session['upload_id']}/0",
                                stream, auth_of(server.client_env))
    assert status == 400 and "declared" in answer["message"], answer
    assert _received(base) == []


def test_names_beyond_zfs_limits_are_400(local_server):
    server, base = local_server
    status, answer, _ = request(server.url, "POST", "/upload", {
        "dataset": "tank/" + "d" * 150, "snapshot": "s" * 90, "type": "full",
        "compression": "none", "snapshot_time": 1700000000}, auth_of(server.client_env))
    assert status == 400 and "at most 255" in answer["message"], answer
    status, answer, _ = request(server.url, "POST", "/upload", {
        "dataset": "tank/" + "d" * 200, "snapshot": "s" * 100, "type": "full",
        "compression": "none", "snapshot_time": 1700000000}, auth_of(server.client_env))
    assert status == 400, answer


def _datasets(base):
    return rig.sh("zfs", "list", "-H", "-o", "name", "-r", base).split()


def test_a_volume_stream_is_refused_before_zfs_recv(pool, local_server):
    """A volume received on the backup server is a block device there, which udev, LVM or
    md may probe, and its commit failed anyway (a 503 after the whole stream: `canmount`
    does not apply to volumes). zfs-fuse has no volumes: the head of a file system's stream
    is made a volume's (drr_begin's type, at byte 32, 3)."""
    server, base = local_server
    dataset, guid = _source(pool, "vol")
    stream = bytearray(subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                                      check=True).stdout)
    assert stream[32] == 2  # DMU_OST_ZFS, little-endian
    stream[32] = 3  # DMU_OST_ZVOL
    session = _open(server, guid)
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{session['upload_id']}/0",
                                bytes(stream[:1 << 20]), auth_of(server.client_env))
    assert status == 400 and "the stream is of a volume" in answer["message"], answer
    assert _received(base) == []


def test_a_stream_with_data_after_its_end_is_400_and_leaves_nothing(pool, local_server):
    """zfs recv exits 0 at the end record; what came after it hit a broken pipe: a 503 with
    no message, and the received snapshot stayed (without a manifest, outside the quota)
    until the upload expired."""
    server, base = local_server
    dataset, guid = _source(pool, "trail")
    stream = subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                            check=True).stdout
    session = _open(server, guid)
    statuses, declaration = hostile.send_parts(server.url, auth_of(server.client_env), session,
                                               stream + os.urandom(3 << 20))  # after the end
    if statuses[-1] == 200:  # a loaded machine: the receive met the end after the last part
        statuses.append(hostile.commit(server.url, auth_of(server.client_env), session,
                                       declaration)[0])  # was taken: the commit says so
    assert statuses[-1] == 400 and set(statuses[:-1]) == {200}, statuses
    assert _received(base) == []
    assert request(server.url, "POST", f"/upload-stream/{session['upload_id']}/abort", None,
                   auth_of(server.client_env))[0] == 200
    assert _received(base) == []
    assert "Traceback" not in server.log()


def test_data_after_the_end_that_the_receive_meets_at_the_commit_leaves_nothing(
        pool, server_factory, tmp_path):
    """The receive met the end of the stream only after its last part was taken (here a
    `zfs recv` slow to start; a loaded machine does the same): the commit said 400, and the
    snapshot received stayed, without a manifest and outside the quota, until the expiry."""
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    zfs = rig.sh("sh", "-c", "command -v zfs").strip()
    slow = tmp_path / "zfs"
    slow.write_text(f'#!/bin/sh\ncase "$1" in recv|receive) sleep 2;; esac\nexec {zfs} "$@"\n')
    slow.chmod(0o755)
    server = server_factory("local", base_dataset=base, env={"ZFSMGR_ZFS": str(slow)})
    dataset, guid = _source(pool, "late")
    stream = subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                            check=True).stdout
    session = _open(server, guid)
    statuses, declaration = hostile.send_parts(server.url, auth_of(server.client_env), session,
                                               stream + os.urandom(3 << 20))
    assert set(statuses) == {200}, statuses  # all taken before the receive began
    status, answer = hostile.commit(server.url, auth_of(server.client_env), session,
                                    declaration)
    assert status == 400 and "goes on after its end" in answer["message"], answer
    assert _received(base) == []
    assert "Traceback" not in server.log()


def test_a_second_full_backup_of_a_committed_snapshot_is_409(pool, local_server):
    server, base = local_server
    assert _stored_full(server, pool, "twice")[0] == 200
    status, answer, _ = request(server.url, "POST", "/upload", {
        "dataset": "tank/data", "snapshot": "s1700000000", "type": "full",
        "compression": "none", "snapshot_time": 1700000007}, auth_of(server.client_env))
    assert status == 409 and "already holds a committed backup" in answer["message"], answer


def test_uploads_that_never_commit_leave_no_datasets(local_server):
    """Each POST /upload made its chain's container, and nothing removed it: a client could
    make datasets without end (each slows the server's listings), even with opens refused
    for their names' length."""
    server, base = local_server
    alice = auth_of(server.client_env)
    assert hostile.open_upload(server.url, alice, dataset="tank/first")  # makes its home
    home = set(_datasets(base))
    for n in range(4):
        status, answer, _ = request(server.url, "POST", "/upload", {
            "dataset": f"tank/long{n}" + "d" * 180, "snapshot": "s" * 80, "type": "full",
            "compression": "none", "snapshot_time": 1700000000}, alice)
        assert status == 400 and "at most 255" in answer["message"], answer
        session = hostile.open_upload(server.url, alice, dataset=f"tank/gone{n}")
        assert request(server.url, "POST", f"/upload-stream/{session['upload_id']}/abort",
                       None, alice)[0] == 200
    assert set(_datasets(base)) - home == set()


def test_a_delete_that_zfs_refuses_keeps_the_snapshot_held(pool, local_server):
    """The retain hold was released before the destroy: when zfs refused it (a clone here;
    on OpenZFS also a download's running `zfs send`), the backup stayed without its hold, and
    a plain `zfs destroy` by anyone could then remove it."""
    from zfsmgr.errors import StorageError
    from zfsmgr.protocol import Manifest
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    server, base = local_server
    status, answer = _stored_full(server, pool, "held")
    assert status == 200, answer
    manifest = Manifest.from_dict(answer["manifest"])
    snapshot = manifest.extra["zfs_snapshot"]
    rig.sh("zfs", "clone", "-o", "mountpoint=none", snapshot, f"{pool.name}/clone")
    store = ZfsLocalStore(base, str(server.workdir))
    with pytest.raises(StorageError):
        store.delete(manifest)
    assert rig.sh("zfs", "get", "-Hp", "-o", "value", "userrefs", snapshot).strip() == "1"
    rig.sh("zfs", "destroy", f"{pool.name}/clone")
    store.delete(manifest)
    assert _received(base) == []
