"""Retention on real parts: local typed-snapshot rotation, server rotation, quota, chains."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import time

import pytest

import rig
from zfsmgr import protocol
from zfsmgr.remote import ServerClient, ServerError
from zfsmgr.zfs import Zfs

pytestmark = [pytest.mark.zfs]


def snapshots(dataset):
    out = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset)
    return [line.split("@", 1)[1] for line in out.splitlines() if line]


def test_local_rotation_touches_only_zfsmgr_typed_snapshots(pool, server_factory, run_zfsmgr):
    policy = {"keep_hourly": 1, "keep_daily": 1, "keep_weekly": 1, "keep_monthly": 1}
    server = server_factory("dir", rotation_policy=policy)
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset, "KEEP_HOURLY": "24"}
    run_zfsmgr(["client", "backup"], env=env, check=True)  # the held backup base
    rig.sh("zfs", "snapshot", f"{dataset}@users-own")
    made = []
    for i in range(4):
        out = run_zfsmgr(["client", "snapshot", "hourly"], env=env, check=True).stdout
        made.append(out.split("created ", 1)[1].split("\n")[0].split("@")[1])
        if i == 0:
            rig.sh("zfs", "hold", "mine", f"{dataset}@{made[0]}")  # a user's hold
        time.sleep(1.1)
    left = snapshots(dataset)
    # `snapshot hourly` rotates hourlies at once under the server's keep_hourly=1, which wins
    # over the client's KEEP_HOURLY=24: the newest stays, the held one stays, the rest went
    assert made[3] in left and made[0] in left
    assert made[1] not in left and made[2] not in left
    assert "users-own" in left
    assert any(s.startswith("zfsmgr_20") for s in left)  # the backup base
    # typed snapshots left by earlier runs go on `rotate`; a dry run only lists them
    rig.sh("zfs", "snapshot", "-o", "org.zfsmgr:kind=daily",
           f"{dataset}@zfsmgr_daily_2020-01-01_00:00:00")
    rig.sh("zfs", "snapshot", "-o", "org.zfsmgr:kind=daily",
           f"{dataset}@zfsmgr_daily_2020-01-02_00:00:00")
    dry = run_zfsmgr(["client", "rotate", "--dry-run"], env=env, check=True).stdout
    assert f"would destroy {dataset}@zfsmgr_daily_2020-01-01_00:00:00" in dry
    assert "zfsmgr_daily_2020-01-01_00:00:00" in snapshots(dataset)
    run_zfsmgr(["client", "rotate"], env=env, check=True)
    left = snapshots(dataset)
    assert "zfsmgr_daily_2020-01-01_00:00:00" not in left
    assert "zfsmgr_daily_2020-01-02_00:00:00" in left  # newest daily (both made this second)
    assert made[0] in left and "users-own" in left
    rig.sh("zfs", "release", "mine", f"{dataset}@{made[0]}")


def test_rotation_without_server_or_cached_policy_deletes_nothing(pool, run_zfsmgr, tmp_path):
    dataset = pool.create("data")
    env = {"CLIENT_ID": "c1", "API_KEY": "k", "SERVER_URL": "http://127.0.0.1:9",
           "LOCAL_DATASET": dataset, "STATE_DIR": str(tmp_path / "state"), "KEEP_HOURLY": "0"}
    for _ in range(2):
        run_zfsmgr(["client", "snapshot", "hourly"], env=env, check=True)
        time.sleep(1.1)
    result = run_zfsmgr(["client", "rotate"], env=env)
    assert result.returncode == 1 and "nothing rotated" in result.stderr
    assert len(snapshots(dataset)) == 2


def upload_stream(api, dataset, snapshot, data, when, parent=None, guid=""):
    """A minimal client: one upload of a real stream with a chosen snapshot time."""
    session = api.call("POST", protocol.UPLOAD, {
        "dataset": dataset, "snapshot": snapshot, "type": "incremental" if parent else "full",
        "parent": parent, "compression": "gzip", "snapshot_time": when,
        "estimated_size": len(data), "guid": guid})
    size = session["part_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    for index, piece in enumerate(pieces):
        api.put_part(session["upload_id"], index, [piece])
    return api.call("POST", protocol.UPLOAD_COMMIT.format(upload_id=session["upload_id"]), {
        "sha256": hashlib.sha256(data).hexdigest(), "stored_size": len(data), "raw_size": 0,
        "parts_crc32": rig.parts_crc32(pieces),
    })["manifest"]


def make_history(pool, api, chains=2, length=4, step=86400.0):
    """`chains` chains of a full + (length-1) incrementals, one snapshot a `step` apart."""
    dataset = pool.create("hist")
    mnt = pool.mountpoint(dataset)
    count = chains * length
    now = time.time()
    uploaded = []
    for i in range(count):
        rig.write_files(mnt, seed=100 + i, count=1, size=50_000)
        rig.sh("zfs", "snapshot", f"{dataset}@s{i}")
        parent = None if i % length == 0 else f"s{i - 1}"
        argv = ["zfs", "send"] + (["-i", f"{dataset}@{parent}"] if parent else []) + [
            f"{dataset}@s{i}"]
        stream = subprocess.run(argv, capture_output=True, check=True).stdout
        uploaded.append(upload_stream(api, dataset, f"s{i}", gzip.compress(stream, 1, mtime=0),
                                      now - (count - i) * step, parent))
    return dataset, uploaded


def restore_chain(api, pool, manifests, key, target):
    """Download the chain of `key` from the server and receive it."""
    by_snap = {m["snapshot"]: m for m in manifests}
    chain = [next(m for m in manifests if m["key"] == key)]
    while chain[0]["parent"]:
        chain.insert(0, by_snap[chain[0]["parent"]])
    subprocess.run(["zfs", "destroy", "-r", target], capture_output=True)
    for m in chain:
        download = api.download(m["key"])
        data = download.read(1 << 26)
        download.close()
        assert hashlib.sha256(data).hexdigest() == m["sha256"]
        subprocess.run(["zfs", "recv", "-u", "-F", target], input=gzip.decompress(data),
                       check=True, capture_output=True)


@pytest.mark.parametrize("storage", ["dir", pytest.param("s3", marks=pytest.mark.s3)])
def test_server_rotation_never_breaks_a_chain(storage, pool, server_factory):
    policy = {"keep_hourly": 0, "keep_daily": 3, "keep_weekly": 0, "keep_monthly": 0}
    server = server_factory(storage, rotation_policy=policy)
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    dataset, uploaded = make_history(pool, api)
    plan = api.call("POST", protocol.ROTATE, {"dry_run": True})
    assert len(api.call("GET", protocol.SNAPSHOTS)["snapshots"]) == 8  # dry run deleted nothing
    # keep_daily=3 keeps s5..s7; s4 (full) is their base; the whole first chain goes
    assert sorted(plan["deleted"]) == sorted(m["key"] for m in uploaded[:4])
    done = api.call("POST", protocol.ROTATE, {"dry_run": False})
    assert done["deleted"] == plan["deleted"]
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert [m["snapshot"] for m in left] == ["s4", "s5", "s6", "s7"]
    status = api.call("GET", protocol.STATUS)
    assert status["used_bytes"] == sum(m["stored_size"] for m in left)
    if storage == "dir":
        on_disk = sum(p.stat().st_size for p in server.storage_dir.rglob("*.zfs.gz"))
        assert on_disk == status["used_bytes"]
    for m in left:
        restore_chain(api, pool, left, m["key"], f"{pool.name}/r")
        assert rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot",
                      f"{pool.name}/r@{m['snapshot']}").strip()


def test_quota_auto_rotation_frees_old_chains_or_refuses(pool, server_factory):
    server = server_factory("dir", quota=10 << 20, env={"AUTO_ROTATE": "true"})
    api = ServerClient(server.url, server.client_env["CLIENT_ID"],
                       server.client_env["API_KEY"])
    dataset, uploaded = make_history(pool, api, chains=2, length=2)
    used = api.call("GET", protocol.STATUS)["used_bytes"]
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["max_size_bytes"] = used + 1000  # now full
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    rig.write_files(pool.mountpoint(dataset), seed=99, count=1, size=50_000)
    rig.sh("zfs", "snapshot", f"{dataset}@s9")
    stream = gzip.compress(subprocess.run(["zfs", "send", "-i", f"{dataset}@s3",
                                           f"{dataset}@s9"], capture_output=True,
                                          check=True).stdout, 1, mtime=0)
    upload_stream(api, dataset, "s9", stream, time.time(), parent="s3")
    left = [m["snapshot"] for m in api.call("GET", protocol.SNAPSHOTS)["snapshots"]]
    assert left == ["s2", "s3", "s9"]  # the old chain went; the new one's base stayed
    assert "rotation deleted" in server.log()
    clients[0]["max_size_bytes"] = 1000  # nothing deletable can make room
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    with pytest.raises(ServerError) as err:
        upload_stream(api, dataset, "s10", stream, time.time() + 1, parent="s9")
    assert err.value.status == 413 and "quota" in str(err.value)


def test_chain_limit_makes_the_next_backup_full(pool, server_factory, run_zfsmgr):
    server = server_factory("dir", client_fields={"max_incrementals": 2})
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    kinds = []
    for i in range(4):
        rig.write_files(pool.mountpoint(dataset), seed=i, count=1, size=20_000)
        out = run_zfsmgr(["client", "backup"], env=env, check=True).stdout
        kinds.append(out.split(": ", 1)[1].split(",", 1)[0])
        time.sleep(1.1)
    assert kinds == ["full", "incremental", "incremental", "full"]


def test_long_history_with_rotations_keeps_every_listed_snapshot_restorable(pool,
                                                                            server_factory):
    policy = {"keep_hourly": 0, "keep_daily": 4, "keep_weekly": 2, "keep_monthly": 1}
    server = server_factory("dir", rotation_policy=policy)
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    dataset = pool.create("long")
    mnt = pool.mountpoint(dataset)
    digests, count, chain_length = {}, 24, 6
    start = time.time() - count * 86400
    for i in range(count):
        digests[f"s{i}"] = rig.write_files(mnt, seed=200 + i, count=1, size=30_000)
        rig.sh("zfs", "snapshot", f"{dataset}@s{i}")
        parent = None if i % chain_length == 0 else f"s{i - 1}"
        argv = ["zfs", "send"] + (["-i", f"{dataset}@{parent}"] if parent else []) + [
            f"{dataset}@s{i}"]
        stream = subprocess.run(argv, capture_output=True, check=True).stdout
        upload_stream(api, dataset, f"s{i}", gzip.compress(stream, 1, mtime=0),
                      start + i * 86400, parent)
        if i % 5 == 4:  # rotations in between
            api.call("POST", protocol.ROTATE, {"dry_run": False})
    api.call("POST", protocol.ROTATE, {"dry_run": False})
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    names = [m["snapshot"] for m in left]
    # 4 days + 2 weeks + 1 month, plus the bases those need; the rest went whole
    assert f"s{count - 1}" in names and 6 <= len(names) < count, names
    by_snap = {m["snapshot"]: m for m in left}
    for m in left:  # every chain is whole
        assert m["parent"] is None or m["parent"] in by_snap
    status = api.call("GET", protocol.STATUS)
    assert status["used_bytes"] == sum(m["stored_size"] for m in left) == sum(
        p.stat().st_size for p in server.storage_dir.rglob("*.zfs.gz"))
    target = f"{pool.name}/check"
    for m in left:
        restore_chain(api, pool, left, m["key"], target)
        clone = f"{pool.name}/view"
        rig.sh("zfs", "clone", "-o", f"mountpoint={pool.dir}/view", f"{target}@{m['snapshot']}",
               clone)
        assert rig.tree_digest(pool.dir / "view") == digests[m["snapshot"]], m["snapshot"]
        subprocess.run(["zfs", "umount", clone], capture_output=True)
        Zfs().destroy(clone)  # retries zfs-fuse's transient "busy"


def test_typed_snapshots_started_at_once_are_all_made(pool, server_factory, run_zfsmgr):
    """cron starts `snapshot hourly`, `daily`, `weekly` and `monthly` at the same minute
    (midnight on the 1st): each took its datasets' locks without waiting, so three of the
    four failed, and so did `snapshot hourly` whenever a backup was running."""
    from pathlib import Path

    from zfsmgr.client.locks import DatasetLock

    server = server_factory("dir")
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    procs = [subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ),
                               "client", "snapshot", kind], env=rig.clean_env(env),
                              cwd=rig.WORK, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for kind in ("hourly", "daily", "weekly", "monthly")]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    kinds = {s.split("_")[1] for s in snapshots(dataset) if s.startswith("zfsmgr_")}
    assert kinds == {"hourly", "daily", "weekly", "monthly"}
    # a backup at work on the dataset: the snapshot is made, its rotation waits its turn
    time.sleep(1.1)  # typed snapshots are named by the second
    Path(env["STATE_DIR"]).mkdir(parents=True, exist_ok=True)
    with DatasetLock(Path(env["STATE_DIR"]), dataset):
        waiting = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ),
                                    "client", "snapshot", "hourly"], env=rig.clean_env(env),
                                   cwd=rig.WORK, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert waiting.poll() is None, waiting.stderr.read()  # waiting for the lock
    assert waiting.wait(60) == 0, waiting.stderr.read()
    assert sum(s.startswith("zfsmgr_hourly_") for s in snapshots(dataset)) >= 1


def test_a_typed_snapshot_zfs_will_not_destroy_is_reported_with_zfs_own_words(
        pool, server_factory, run_zfsmgr):
    """`rotate` turned a refused destroy (a clone, a missing `zfs allow destroy`) into a
    silent "kept": one `destroyed` line, exit 0, zfs's message nowhere."""
    policy = {"keep_hourly": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    server = server_factory("dir", rotation_policy=policy)
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    old = "zfsmgr_hourly_2020-01-01_00:00:00"
    rig.sh("zfs", "snapshot", "-o", "org.zfsmgr:kind=hourly", f"{dataset}@{old}")
    rig.sh("zfs", "snapshot", "-o", "org.zfsmgr:kind=hourly",
           f"{dataset}@zfsmgr_hourly_2020-01-02_00:00:00")  # the newest hourly stays
    rig.sh("zfs", "clone", f"{dataset}@{old}", f"{pool.name}/clone")
    done = run_zfsmgr(["client", "rotate", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [refused] = report["not_destroyed"]
    assert refused["snapshot"] == f"{dataset}@{old}"
    assert f"zfsmgr: warning: {dataset}@{old} destroy failed" in done.stderr
    assert "zfs destroy" in done.stderr  # the command line, and zfs's own message after it
    assert old in snapshots(dataset)
    rig.sh("zfs", "umount", f"{pool.name}/clone", check=False)  # zfs-fuse: busy while mounted
