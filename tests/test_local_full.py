"""The `local` store's pool full: a receive that runs out of room is a 507 naming the store,
leaves no partial chain and no snapshot on the client, and the same backup succeeds once there
is room (the directory store's disk full is tests/test_disk_full.py)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest

import hostile
import rig
from hostile import request

pytestmark = [pytest.mark.zfs]


def _backup(server, dataset):
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none"}
    return subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                          env=rig.clean_env(env), capture_output=True, text=True, timeout=300)


def test_a_full_local_store_is_a_507_that_leaves_nothing_and_a_retry_succeeds(
        pool, server_factory):
    base = f"{pool.name}/backup"
    rig.sh("zfs", "create", "-o", "mountpoint=none", "-o", "quota=6M", base)
    server = server_factory("local", base_dataset=base, env={"PART_SIZE": "2M"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=5, count=3, size=6 << 20)
    full = _backup(server, dataset)
    assert full.returncode == 1, full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert "(507)" in last and "local store is full" in last, full.stderr
    assert "Traceback" not in full.stderr
    left = rig.sh("zfs", "list", "-H", "-o", "name", "-r", base).split()
    # no partial chain: only the containers of the client's chains stay, empty
    assert all(name.count("/") <= base.count("/") + 2 for name in left), left
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", base).strip() == ""
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""
    assert request(server.url, "GET", "/health")[0] == 200
    rig.sh("zfs", "set", "quota=none", base)
    again = _backup(server, dataset)
    assert again.returncode == 0, again.stderr
    status = request(server.url, "GET", "/status", None, {
        "X-Client-ID": server.client_env["CLIENT_ID"],
        "X-API-Key": server.client_env["API_KEY"]})[1]
    assert status["snapshot_count"] == 1


def test_a_stream_that_zfs_stores_larger_than_sent_cannot_pass_the_quota(pool, server_factory):
    """The quota counted the bytes sent: 60 MiB of zeros, from a dataset without compression,
    gzip'd to a few hundred KiB by a client that declared no estimate, were received as
    60 MiB on a 5 MiB quota (and so one client could fill the pool). The client's home now
    has that zfs quota: a 413, nothing stays, and once the quota is raised it goes in."""
    base = f"{pool.name}/backup"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory("local", base_dataset=base, quota=5 << 20, env={"PART_SIZE": "2M"})
    dataset = pool.create("zeros")
    rig.sh("zfs", "set", "compression=off", dataset)
    with open(f"{pool.mountpoint(dataset)}/zeros", "wb") as out:
        for _ in range(60):
            out.write(bytes(1 << 20))
    rig.sh("zfs", "snapshot", f"{dataset}@a")
    stream = gzip.compress(subprocess.run(["zfs", "send", f"{dataset}@a"], capture_output=True,
                                          check=True).stdout, 1)
    assert len(stream) < 1 << 20
    alice = hostile.auth_of(server.client_env)

    def store():
        session = hostile.open_upload(server.url, alice, compression="gzip")  # no estimate
        statuses, declaration = hostile.send_parts(server.url, alice, session, stream)
        if statuses[-1] != 200:
            return statuses[-1], session
        return hostile.commit(server.url, alice, session, declaration)[0], session

    status, session = store()
    assert status == 413, status
    home = f"{base}/{server.client_env['CLIENT_ID']}"
    assert rig.sh("zfs", "get", "-Hp", "-o", "value", "quota", home).strip() == str(5 << 20)
    request(server.url, "POST", f"/upload-stream/{session['upload_id']}/abort", None, alice)
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", base).strip() == ""
    assert int(rig.sh("zfs", "get", "-Hp", "-o", "value", "used", home)) < 1 << 20
    assert "zfs quota" in server.log() and "Traceback" not in server.log()
    raised = rig.run_zfsmgr(["server", "set-quota", server.client_env["CLIENT_ID"], "100M"],
                            env=server.env, cwd=server.workdir)
    assert raised.returncode == 0, raised.stderr
    assert store()[0] == 200
    assert rig.sh("zfs", "get", "-Hp", "-o", "value", "quota", home).strip() == str(100 << 20)
