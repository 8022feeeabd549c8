"""The `local` store's pool full: a receive that runs out of room is a 507 naming the store,
leaves no partial chain and no snapshot on the client, and the same backup succeeds once there
is room (the directory store's disk full is tests/test_disk_full.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

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
