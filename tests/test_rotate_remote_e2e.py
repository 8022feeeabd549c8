"""On real parts: a client over quota runs `rotate-remote` and ends under quota with every
listed backup restorable (each restored and its files compared); `tank/a_b` and `tank/a/b`
never share a key or a chain; a key carries its snapshot's own timestamp."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import time

import pytest

import rig
from zfsmgr import protocol
from zfsmgr.remote import ServerClient

pytestmark = [pytest.mark.zfs]
KEEP_DAILY = {"keep_hourly": 0, "keep_daily": 100, "keep_weekly": 0, "keep_monthly": 0}


@pytest.fixture
def local_base(pool):
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    return base


def make_server(store, server_factory, request, **kwargs):
    base = request.getfixturevalue("local_base") if store == "local" else ""
    return server_factory(store, base_dataset=base, **kwargs)


def upload(api, dataset, snapshot, stream, when, parent=None):
    """What a client sends, with a chosen snapshot time (history spread over days)."""
    stored = gzip.compress(stream, 1, mtime=0)
    session = api.call("POST", protocol.UPLOAD, {
        "dataset": dataset, "snapshot": snapshot, "type": "incremental" if parent else "full",
        "parent": parent, "compression": "gzip", "snapshot_time": when,
        "estimated_size": len(stored)})
    size = session["part_size"]
    pieces = [stored[i:i + size] for i in range(0, len(stored), size)]
    for index, piece in enumerate(pieces):
        api.put_part(session["upload_id"], index, [piece])
    return api.call("POST", protocol.UPLOAD_COMMIT.format(upload_id=session["upload_id"]), {
        "sha256": hashlib.sha256(stored).hexdigest(), "stored_size": len(stored),
        "raw_size": len(stream), "parts_crc32": rig.parts_crc32(pieces)})["manifest"]


def sent(stdout: str) -> dict:
    """The one dataset's outcome in `client backup --json`."""
    [outcome] = json.loads(stdout)["datasets"]
    assert outcome["status"] in ("full", "incremental") and outcome["key"], outcome
    return outcome


def files_of(pool, dataset):
    rig.sh("zfs", "set", f"mountpoint={pool.dir}/check-{dataset.replace('/', '_')}", dataset)
    subprocess.run(["zfs", "mount", dataset], capture_output=True)
    return rig.tree_digest(pool.mountpoint(dataset))


def restore_every_listed(pool, env, digests, run_zfsmgr):
    """Restore each backup the server lists into its own dataset and compare its files."""
    listing = json.loads(run_zfsmgr(["restore", "list", "--json"], env=env,
                                    check=True).stdout)
    for row in listing:
        target = f"{pool.name}/r{row['number']}"
        run_zfsmgr(["restore", "restore", str(row["number"]), target], env=env, check=True)
        assert files_of(pool, target) == digests[row["dataset"], row["snapshot"]], row["key"]
    return listing


@pytest.mark.parametrize("store", ["dir", "local"])
def test_rotate_remote_brings_a_client_under_quota_and_all_left_restores(
        store, pool, server_factory, run_zfsmgr, request):
    server = make_server(store, server_factory, request, rotation_policy=KEEP_DAILY)
    env = {**server.client_env, "LOCAL_DATASET": f"{pool.name}/data"}
    api = ServerClient(server.url, server.client_env["CLIENT_ID"],
                       server.client_env["API_KEY"])
    dataset = pool.create("data")
    mnt = pool.mountpoint(dataset)
    digests, start = {}, time.time() - 10 * 86400
    for i in range(9):  # three chains of a full and two incrementals, a day apart
        for old in mnt.glob("*"):  # each snapshot holds one file of its own
            old.unlink()
        digests[dataset, f"s{i}"] = rig.write_files(mnt, seed=300 + i, count=1, size=120_000)
        rig.sh("zfs", "snapshot", f"{dataset}@s{i}")
        parent = None if i % 3 == 0 else f"s{i - 1}"
        argv = ["zfs", "send"] + (["-i", f"{dataset}@{parent}"] if parent else []) + [
            f"{dataset}@s{i}"]
        stream = subprocess.run(argv, capture_output=True, check=True).stdout
        upload(api, dataset, f"s{i}", stream, start + i * 86400, parent)
    status = api.call("GET", protocol.STATUS)
    sizes = {m["snapshot"]: m for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]}
    assert len(sizes) == 9
    newest_chain = status["used_bytes"] * 4 // 10  # room for a bit more than one chain
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["max_size_bytes"] = newest_chain
    (server.workdir / "clients.json").write_text(json.dumps(clients))

    plan = json.loads(run_zfsmgr(["client", "rotate-remote", "--dry-run", "--json"], env=env,
                                 check=True).stdout)
    assert plan["dry_run"] and plan["deleted"] and plan["over_bytes"] == 0
    done = run_zfsmgr(["client", "rotate-remote"], env=env, check=True)
    assert "still" not in done.stdout, done.stdout
    status = api.call("GET", protocol.STATUS)
    assert 0 < status["used_bytes"] <= newest_chain, status
    left = [m["snapshot"] for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]]
    assert left[-3:] == ["s6", "s7", "s8"] and "s0" not in left, left  # oldest chains went
    if store == "dir":  # whole chains: every incremental left has its parent
        by_snap = {m["snapshot"]: m for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]}
        assert all(m["parent"] is None or m["parent"] in by_snap for m in by_snap.values())
    listing = restore_every_listed(pool, env, digests, run_zfsmgr)
    assert len(listing) == len(left)

    clients[0]["max_size_bytes"] = 1000  # nothing left may go: it says how far over it stays
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    over = run_zfsmgr(["client", "rotate-remote"], env=env, check=True).stdout
    assert "over the quota of 1000 B" in over, over
    assert [m["snapshot"] for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]][-1] == "s8"


@pytest.mark.parametrize("store", ["dir", "local"])
def test_datasets_with_the_same_key_token_never_collide(store, pool, server_factory,
                                                        run_zfsmgr, request):
    server = make_server(store, server_factory, request)
    flat = pool.create("a_b")
    rig.sh("zfs", "create", f"{pool.name}/a")
    nested = pool.create("a/b")
    digests, keys = {}, {}
    for dataset, seed in ((flat, 1), (nested, 2)):
        content = rig.write_files(pool.mountpoint(dataset), seed=seed, count=1, size=40_000)
        env = {**server.client_env, "LOCAL_DATASET": dataset}
        result = sent(run_zfsmgr(["client", "backup", "--json"], env=env, check=True).stdout)
        assert result["type"] == "full" and result["stored_size"] > 0
        digests[dataset, result["snapshot"].split("@", 1)[1]] = content
        keys[dataset] = result["key"]
        # the key's timestamp is the snapshot's: its name and its creation second
        stamp = protocol.parse_key(result["key"]).timestamp
        assert result["snapshot"] == f"{dataset}@zfsmgr_{stamp}"
        creation = int(rig.sh("zfs", "get", "-Hp", "-o", "value", "creation",
                              result["snapshot"]))
        assert time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime(creation)) == stamp
    token = f"{pool.name}_a_b"
    assert protocol.parse_key(keys[flat]).dataset_token == token  # the seed's shape
    assert protocol.parse_key(keys[nested]).dataset_token.startswith(token + "-")
    env = {**server.client_env, "LOCAL_DATASET": nested}
    rig.write_files(pool.mountpoint(nested), seed=3, count=1, size=20_000)
    again = sent(run_zfsmgr(["client", "backup", "--json"], env=env, check=True).stdout)
    assert again["type"] == "incremental"  # the nested dataset keeps its own token and chain
    assert protocol.parse_key(again["key"]).dataset_token == \
        protocol.parse_key(keys[nested]).dataset_token
    digests[nested, again["snapshot"].split("@", 1)[1]] = rig.tree_digest(
        pool.mountpoint(nested))
    listing = restore_every_listed(pool, env, digests, run_zfsmgr)
    assert sorted(m["dataset"] for m in listing) == sorted([flat, nested, nested])
    made = json.loads(run_zfsmgr(["client", "snapshot", "hourly", "--json"], env=env,
                                 check=True).stdout)
    assert made["created"].startswith(f"{nested}@zfsmgr_hourly_") and made["destroyed"] == []
    rotated = json.loads(run_zfsmgr(["client", "rotate", "--dry-run", "--json"], env=env,
                                    check=True).stdout)
    assert rotated["dry_run"] is True and made["created"] in rotated["kept"]


def test_auto_rotate_makes_room_for_a_real_incremental_without_an_estimate(
        pool, server_factory, run_zfsmgr):
    """zfs-fuse has no `send -nvP`: the client's incremental arrives with estimate 0, and the
    server makes room part by part (old chains go, the base stays)."""
    server = server_factory("dir", rotation_policy=KEEP_DAILY, env={"AUTO_ROTATE": "true"})
    api = ServerClient(server.url, server.client_env["CLIENT_ID"],
                       server.client_env["API_KEY"])
    dataset = pool.create("data")
    mnt = pool.mountpoint(dataset)
    start = time.time() - 10 * 86400
    for i in range(4):  # two old chains, days ago
        for old in mnt.glob("*"):
            old.unlink()
        rig.write_files(mnt, seed=400 + i, count=1, size=200_000)
        rig.sh("zfs", "snapshot", f"{dataset}@old{i}")
        parent = None if i % 2 == 0 else f"old{i - 1}"
        argv = ["zfs", "send"] + (["-i", f"{dataset}@{parent}"] if parent else []) + [
            f"{dataset}@old{i}"]
        stream = subprocess.run(argv, capture_output=True, check=True).stdout
        upload(api, dataset, f"old{i}", stream, start + i * 86400, parent)
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    for old in mnt.glob("*"):
        old.unlink()
    run_zfsmgr(["client", "backup"], env=env, check=True)  # a full: the newest chain
    used = api.call("GET", protocol.STATUS)["used_bytes"]
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["max_size_bytes"] = used + 50_000  # the next ~100 KB do not fit as things are
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    content = rig.write_files(mnt, seed=499, count=1, size=200_000)
    done = sent(run_zfsmgr(["client", "backup", "--json"], env=env, check=True).stdout)
    assert done["type"] == "incremental"
    left = [m["snapshot"] for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]]
    assert "old0" not in left and "old1" not in left  # the oldest chain made the room
    assert left[-1] == done["snapshot"].split("@", 1)[1] and len(left) >= 2  # with its base
    assert api.call("GET", protocol.STATUS)["used_bytes"] <= clients[0]["max_size_bytes"]
    assert "rotation deleted" in server.log()
    assert "type=incremental estimate=0" in server.log()  # made room as it streamed
    target = f"{pool.name}/check"
    run_zfsmgr(["restore", "restore", "1", target], env=env, check=True)
    assert files_of(pool, target) == content
