"""Many datasets per run on real OpenZFS 2.3: one atomic `zfs snapshot a@s b@s`, per-server
bookmark bases for onsite + offsite, `written` for unchanged datasets, properties sent with
`-p` (an encrypted dataset too) and a tree restored property by property."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rig  # noqa: E402
from test_zfsmgr_openzfs import mounted_files, sh, write  # noqa: E402

PROPS = ("compression", "recordsize", "atime", "org.example:owner")


def props(dataset):
    out = sh("zfs", "get", "-H", "-o", "property,value", ",".join(PROPS), dataset)
    return dict(line.split("\t") for line in out.splitlines())


def run_json(run_zfsmgr, env, *command):
    done = run_zfsmgr(["client", *(command or ("backup",)), "--json"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    time.sleep(1.1)
    return json.loads(done.stdout)


def kinds(report):
    return {d["dataset"]: d["status"] for d in report["datasets"]}


def tree(pool):
    root = f"{pool}/host"
    sh("zfs", "create", "-o", "compression=gzip-3", root)
    sh("zfs", "create", "-o", "recordsize=32K", f"{root}/a")
    sh("zfs", "create", "-o", "org.example:owner=ann", "-o", "compression=zle", f"{root}/a/x")
    for i, d in enumerate((root, f"{root}/a", f"{root}/a/x")):
        write(f"{pool.mountpoint}{d[len(str(pool)):]}", seed=i, size=100_000)
    return root, [root, f"{root}/a", f"{root}/a/x"]


def test_one_atomic_snapshot_per_bookmarks_per_server_and_unchanged(openzfs_pool,
                                                                    server_factory,
                                                                    run_zfsmgr, tmp_path):
    onsite, offsite = server_factory("dir"), server_factory("dir")
    root, chosen = tree(openzfs_pool)
    state = str(tmp_path / "state")

    def env(server):
        return {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true",
                "STATE_DIR": state}

    first = run_json(run_zfsmgr, env(onsite))
    assert set(kinds(first).values()) == {"full"}
    # one `zfs snapshot` for the pool: every new snapshot has the same createtxg
    txgs = {sh("zfs", "get", "-Hp", "-o", "value", "createtxg",
               f"{d}@{first['snapshot']}").strip() for d in chosen}
    assert len(txgs) == 1
    seen = {"onsite": [], "offsite": []}
    for turn in range(4):
        name, server = ("offsite", offsite) if turn % 2 == 0 else ("onsite", onsite)
        for d in chosen:
            write(sh("zfs", "get", "-H", "-o", "value", "mountpoint", d).strip(),
                  seed=50 + turn, size=30_000)
        seen[name].append(set(kinds(run_json(run_zfsmgr, env(server))).values()))
    assert seen == {"offsite": [{"full"}, {"incremental"}],
                    "onsite": [{"incremental"}, {"incremental"}]}
    marks = sh("zfs", "list", "-H", "-o", "name", "-t", "bookmark", "-r", root).split()
    for d in chosen:
        mine = [m for m in marks if m.startswith(d + "#")]
        assert len(mine) == 2 and len({m.rsplit(".", 1)[1] for m in mine}) == 2, mine
    # nothing held: bookmarks carry the chains; local rotation may destroy every snapshot
    snaps = sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", root).split()
    assert all(sh("zfs", "get", "-H", "-o", "value", "userrefs", s).strip() == "0"
               for s in snaps)
    for s in snaps:
        sh("zfs", "destroy", s)
    for d in chosen:
        write(sh("zfs", "get", "-H", "-o", "value", "mountpoint", d).strip(), seed=90,
              size=20_000)
    assert set(kinds(run_json(run_zfsmgr, env(offsite))).values()) == {"incremental"}
    # nothing written since: `written` says so, nothing is sent and no snapshot stays
    quiet = run_json(run_zfsmgr, env(offsite))
    assert set(kinds(quiet).values()) == {"unchanged"}
    assert not sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r",
                  root).count(quiet["snapshot"] or "none")


def test_properties_travel_and_the_tree_restores_property_by_property(
        openzfs_pool, server_factory, run_zfsmgr, tmp_path):
    server = server_factory("dir")
    root, chosen = tree(openzfs_pool)
    keyfile = tmp_path / "key"
    keyfile.write_text("correct horse battery staple\n")
    secret = f"{root}/secret"
    sh("zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
       "-o", f"keylocation=file://{keyfile}", "-o", "org.example:owner=bob",
       "-o", "recordsize=64K", secret)
    write(f"{openzfs_pool.mountpoint}/host/secret", seed=9, size=50_000)
    chosen.append(secret)
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}
    run_json(run_zfsmgr, env)
    for d in chosen:
        write(sh("zfs", "get", "-H", "-o", "value", "mountpoint", d).strip(), seed=31,
              size=20_000)
    assert set(kinds(run_json(run_zfsmgr, env)).values()) == {"incremental"}
    expected = {d: (props(d), mounted_files(d)) for d in chosen}
    target = f"{openzfs_pool}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr
    copy_of_secret = target + secret[len(root):]
    # a raw -p stream: received without the key, its properties with it
    assert sh("zfs", "get", "-H", "-o", "value", "keystatus", copy_of_secret).strip() == \
        "unavailable"
    sh("zfs", "load-key", "-L", f"file://{keyfile}", copy_of_secret)
    for d in chosen:  # parents first: each mounted before its parent's files are compared
        rig.sh("zfs", "mount", target + d[len(root):], check=False)
    for d in chosen:
        copy = target + d[len(root):]
        got = props(copy)
        assert got == expected[d][0], (d, got)
        assert mounted_files(copy) == expected[d][1], d
    # the stored stream itself carries them: plain zfs recv of the full stream gets them too
    assert props(f"{target}/a/x")["org.example:owner"] == "ann"


def test_the_local_store_gets_plain_streams_and_restore_applies_their_record(
        openzfs_pool, server_factory, run_zfsmgr):
    base = f"{openzfs_pool}/srv"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory("local", base_dataset=base)
    root, chosen = tree(openzfs_pool)
    sh("zfs", "set", "atime=off", f"{root}/a")
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}
    assert set(kinds(run_json(run_zfsmgr, env)).values()) == {"full"}
    held = sh("zfs", "list", "-H", "-o", "name", "-r", base).split()[1:]
    assert len(held) > len(chosen)
    # the server received plain streams and applied nothing of the client's
    for name in held:
        assert sh("zfs", "get", "-H", "-o", "value", "mountpoint,mounted", name).split() == \
            ["none", "no"], name
        own = sh("zfs", "get", "-H", "-s", "local,received", "-o", "property", "all",
                 name).split()
        assert not set(own) & set(PROPS), (name, own)
        if sh("zfs", "list", "-H", "-t", "snapshot", "-d", "1", "-o", "name", name).strip():
            assert sh("zfs", "get", "-H", "-o", "value", "canmount", name).strip() == "off"
    # the record went with each backup instead
    rows = json.loads(run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                 check=True).stdout)
    records = {r["dataset"]: r["properties"] for r in rows}
    assert records == {root: {"compression": "gzip-3"},
                       f"{root}/a": {"atime": "off", "recordsize": "32768"},
                       f"{root}/a/x": {"compression": "zle", "org.example:owner": "ann"}}
    expected = {d: (props(d), mounted_files(d)) for d in chosen}
    target = f"{openzfs_pool}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr and "refused" not in done.stderr, done.stderr
    for d in chosen:  # parents first: each mounted before its parent's files are compared
        rig.sh("zfs", "mount", target + d[len(root):], check=False)
    for d in chosen:
        copy = target + d[len(root):]
        assert props(copy) == expected[d][0], (d, props(copy))
        assert mounted_files(copy) == expected[d][1], d
    # set on the restored datasets themselves (recv -o with the full stream), as on the source
    sources = sh("zfs", "get", "-H", "-o", "source", "compression,recordsize",
                 f"{target}/a/x").splitlines()
    assert sources[0] == "local" and sources[1] == f"inherited from {target}/a", sources
    # and the data was written with them: set after the receive, gzip-3 would cover no block
    ratios = {sh("zfs", "get", "-H", "-o", "value", "compressratio", d).strip()
              for d in (root, target)}
    assert len(ratios) == 1, ratios


def test_a_record_recv_o_refuses_is_set_one_by_one_and_a_refused_property_warns(
        openzfs_pool, server_factory, run_zfsmgr):
    import hostile

    server = server_factory("dir")
    auth = hostile.auth_of(server.client_env)
    source = f"{openzfs_pool}/src"
    sh("zfs", "create", source)
    write(f"{openzfs_pool.mountpoint}/src", seed=4, size=200_000)
    records = {"tank/bad": {"compression": "gzip-2", "checksum": "nope",
                            "org.example:owner": "eve"},
               "tank/quota": {"compression": "gzip", "refquota": "64K"}}
    for when, (dataset, record) in enumerate(records.items(), start=1767225600):
        snap = f"{source}@zfsmgr_{when}"
        sh("zfs", "snapshot", snap)
        stream = subprocess.run(["zfs", "send", snap], check=True, capture_output=True).stdout
        status, session, _ = hostile.request(server.url, "POST", "/upload", {
            "dataset": dataset, "snapshot": f"zfsmgr_{when}", "type": "full",
            "compression": "none", "snapshot_time": when, "estimated_size": len(stream),
            "properties": record}, auth)
        assert status == 200, session
        statuses, declaration = hostile.send_parts(server.url, auth, session, stream)
        assert set(statuses) == {200} and hostile.commit(server.url, auth, session,
                                                         declaration)[0] == 200
    expected = mounted_files(source)
    for dataset, record in records.items():
        target = f"{openzfs_pool}/{dataset.split('/')[1]}"
        done = run_zfsmgr(["restore", "latest", target, "--source-dataset", dataset],
                          env=server.client_env)
        assert done.returncode == 0, done.stderr
        warned = [line for line in done.stderr.splitlines() if "warning" in line]
        bad = "checksum=nope" if dataset == "tank/bad" else "refquota=64K"
        assert any(bad in line for line in warned), done.stderr
        got = props(target)
        assert got["compression"] == record["compression"], got
        if dataset == "tank/bad":  # zfs checks -o values before it takes any data
            assert got["org.example:owner"] == "eve"
            assert "zfs recv -o refused the recorded properties" in done.stderr, done.stderr
        assert mounted_files(target) == expected


def test_typed_snapshots_of_the_selection_are_one_atomic_snapshot(
        openzfs_pool, server_factory, run_zfsmgr):
    server = server_factory("dir", rotation_policy={"keep_hourly": 0, "keep_daily": 1,
                                                    "keep_weekly": 0, "keep_monthly": 0})
    root, chosen = tree(openzfs_pool)
    sh("zfs", "create", f"{root}/skip")
    sh("zfs", "set", "org.zfsmgr:backup=off", f"{root}/skip")
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}
    made = run_json(run_zfsmgr, env, "snapshot", "daily")["created"]
    assert sorted(n.split("@")[0] for n in made) == sorted(chosen)
    # one `zfs snapshot a@s b@s ...`: one name, one transaction group for the whole selection
    assert len({n.split("@")[1] for n in made}) == 1
    assert len({sh("zfs", "get", "-Hp", "-o", "value", "createtxg", n).strip()
                for n in made}) == 1
    assert sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{root}/skip") == ""
    second = run_json(run_zfsmgr, env, "snapshot", "daily")
    assert sorted(d["snapshot"] for d in second["destroyed"]) == sorted(made)
    assert len({sh("zfs", "get", "-Hp", "-o", "value", "createtxg", n).strip()
                for n in second["created"]}) == 1
    plan = run_json(run_zfsmgr, env, "rotate", "--dry-run")
    assert plan["destroyed"] == [] and sorted(plan["kept"]) == sorted(second["created"])


def _volume_bytes(volume, size):
    """The first `size` bytes of a volume's device (udev makes it a moment late)."""
    device = Path("/dev/zvol") / volume
    deadline = time.monotonic() + 30
    while not device.exists() and time.monotonic() < deadline:
        subprocess.run(["udevadm", "settle"], capture_output=True)
        time.sleep(0.2)
    with open(device, "rb") as dev:
        return dev.read(size)


def test_a_volume_of_the_tree_restores_from_a_dir_store_and_a_local_store_refuses_it_first(
        openzfs_pool, server_factory, run_zfsmgr):
    """RECURSIVE selects volumes too. A dir store takes the volume's stream and it restores
    byte for byte; the local store keeps file systems only, so the client fails the volume
    before taking its snapshot (it used to snapshot it, stream it and be refused with a 400
    each run), while the file systems of the same run are backed up."""
    root = f"{openzfs_pool}/vh"
    sh("zfs", "create", root)
    sh("zfs", "create", "-V", "4M", "-o", "volblocksize=16K", f"{root}/vol")
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    device = Path("/dev/zvol") / root / "vol"
    _volume_bytes(f"{root}/vol", 0)
    with open(device, "r+b") as dev:
        dev.write(data)
        dev.flush()
        os.fsync(dev.fileno())
    env = {"LOCAL_DATASET": root, "RECURSIVE": "true"}
    onsite = server_factory("dir")
    assert kinds(run_json(run_zfsmgr, {**onsite.client_env, **env})) == {
        root: "full", f"{root}/vol": "full"}
    target = f"{openzfs_pool}/vback"
    done = run_zfsmgr(["restore", "latest", target, "--source-dataset", f"{root}/vol"],
                      env=onsite.client_env)
    assert done.returncode == 0, done.stderr
    assert sh("zfs", "get", "-H", "-o", "value", "type", target).strip() == "volume"
    assert _volume_bytes(target, len(data)) == data

    snaps = sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{root}/vol")
    base = f"{openzfs_pool}/srv"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    local = server_factory("local", base_dataset=base)
    done = run_zfsmgr(["client", "backup", "--json"], env={**local.client_env, **env})
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert kinds(report) == {root: "full", f"{root}/vol": "failed"}
    [failed] = [d for d in report["datasets"] if d["status"] == "failed"]
    assert "is a volume" in failed["message"] and "EXCLUDE_DATASETS" in failed["message"]
    # no snapshot taken of it, no stream sent: the server holds the file system only
    assert sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{root}/vol") == snaps
    assert "vol" not in sh("zfs", "list", "-H", "-o", "name", "-r", base)
