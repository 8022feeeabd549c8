"""A tree backed up in runs comes back whole: `restore --recursive`, `latest --all`,
`list --tree`; and onsite + offsite servers alternate with incrementals on both."""

from __future__ import annotations

import json
import time

import pytest

import rig
from test_many_datasets import (backup_json, env_for, hold_of, make_tree, restore_run,
                                statuses, tree_server, zfs)

pytestmark = [pytest.mark.zfs]


def files(pool, dataset):
    """The files of a (mounted) dataset, without its children's."""
    rig.sh("zfs", "mount", dataset, check=False)
    top = pool.mountpoint(dataset)
    below = zfs("list", "-H", "-o", "name", "-r", "-d", "1", dataset).split()[1:]
    children = [pool.mountpoint(c) for c in below]
    return {k: v for k, v in rig.tree_digest(top).items()
            if not any((top / k).is_relative_to(c) for c in children)}


def datasets_under(name):
    return zfs("list", "-H", "-o", "name", "-r", name).split()


@pytest.mark.parametrize("storage", ["dir", pytest.param("s3", marks=pytest.mark.s3), "local"])
def test_a_tree_restores_whole_with_recursive_and_all(storage, pool, server_factory,
                                                      run_zfsmgr):
    server = tree_server(storage, pool, server_factory)
    root = make_tree(pool)
    env = env_for(server, root)
    first = backup_json(run_zfsmgr, env)
    a_before = files(pool, f"{root}/a")
    time.sleep(1.1)
    rig.write_files(pool.mountpoint(f"{root}/a"), seed=77, count=1, size=40_000)
    second = backup_json(run_zfsmgr, env)
    assert statuses(second)[f"{root}/a"] == "incremental"
    chosen = [root, f"{root}/a", f"{root}/a/x", f"{root}/b", f"{root}/c/on"]
    expected = {d: files(pool, d) for d in chosen}

    tree = run_zfsmgr(["restore", "list", "--tree"], env=server.client_env, check=True).stdout
    assert tree.count(f"{len(chosen)} datasets") == 1 and "1 datasets" in tree

    target = f"{pool.name}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env, check=True)
    assert f"restored {len(chosen)} datasets into {target}" in done.stdout, done.stderr
    restored = {target + d[len(root):] for d in chosen}
    assert set(datasets_under(target)) == restored | {f"{target}/c"}  # c: a placeholder
    for d in chosen:
        assert files(pool, target + d[len(root):]) == expected[d], d
    assert zfs("get", "-H", "-o", "value", "canmount", f"{target}/c").strip() == "off"

    # --force replaces the whole tree, and only the tree
    rig.write_files(pool.mountpoint(f"{target}/a"), seed=5, count=1, size=1000)
    again = run_zfsmgr(["restore", "latest", target, "--recursive", "--force",
                        "--source-dataset", root], env=server.client_env)
    assert again.returncode == 0, again.stderr
    assert files(pool, f"{target}/a") == expected[f"{root}/a"]
    assert set(datasets_under(target)) == restored | {f"{target}/c"}
    refused = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset",
                          root], env=server.client_env)
    assert refused.returncode == 1 and "already exists" in refused.stderr

    # restore N --recursive: the tree as that run left it
    then = f"{pool.name}/then"
    restore_run(run_zfsmgr, server, root, first["snapshot"], then)
    assert files(pool, f"{then}/a") == a_before != expected[f"{root}/a"]
    assert files(pool, f"{then}/a/x") == expected[f"{root}/a/x"]

    # disaster recovery: every dataset of the client under one target
    every = f"{pool.name}/dr"
    done = run_zfsmgr(["restore", "latest", "--all", every], env=server.client_env)
    assert done.returncode == 0, done.stderr
    for d in chosen:
        assert files(pool, f"{every}/{d}") == expected[d], d


def test_onsite_and_offsite_alternate_with_incrementals(pool, server_factory, run_zfsmgr):
    onsite, offsite = server_factory("dir"), server_factory("dir")
    root = pool.create("host")
    zfs("create", f"{root}/child")
    kinds = {"onsite": [], "offsite": []}
    for turn in range(5):
        for d in (root, f"{root}/child"):
            rig.write_files(pool.mountpoint(d), seed=100 + turn, count=1, size=20_000)
        name, server = ("onsite", onsite) if turn % 2 == 0 else ("offsite", offsite)
        env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true",
               "STATE_DIR": str(pool.dir / "state")}  # one host: one state directory
        report = backup_json(run_zfsmgr, env)
        kinds[name].append(sorted(set(statuses(report).values())))
        time.sleep(1.1)
    assert kinds == {"onsite": [["full"], ["incremental"], ["incremental"]],
                     "offsite": [["full"], ["incremental"]]}
    for server in (onsite, offsite):
        done = json.loads(run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                     check=True).stdout)
        newest = {}
        for row in done:  # newest first
            newest.setdefault(row["dataset"], row)
        assert set(newest) == {root, f"{root}/child"}
    # each server's base is its own; the other's stays
    bases = json.loads(run_zfsmgr(["client", "bookmarks", "--json"], env={
        **onsite.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}, check=True).stdout)
    assert len({b["server"] for b in bases if b["name"].startswith(root + "@")}) == 2


def test_a_backup_committed_by_a_dying_run_waits_for_its_own_server(
        pool, server_factory, run_zfsmgr, tmp_path):
    """The onsite run committed a backup and died before making it a base (here: its `zfs
    hold` fails). The offsite run that came next took it for an interrupted backup of its own
    and destroyed it, so onsite's next run could not adopt it. Every backup snapshot now says
    which server its run sent it to: the offsite run leaves it, onsite's adopts it."""
    onsite, offsite = server_factory("dir"), server_factory("dir")
    dataset = pool.create("host")
    real = rig.sh("sh", "-c", "command -v zfs").strip()
    no_hold = tmp_path / "zfs"
    no_hold.write_text(f"#!/bin/sh\n[ \"$1\" = hold ] && {{ echo \"cannot hold: pool I/O\""
                       f" >&2; exit 1; }}\nexec {real} \"$@\"\n")
    no_hold.chmod(0o755)

    def run(server, seed, expect=0, **extra):
        rig.write_files(pool.mountpoint(dataset), seed=seed, count=1, size=20_000)
        report = backup_json(run_zfsmgr, {**server.client_env, "LOCAL_DATASET": dataset,
                                          "STATE_DIR": str(pool.dir / "state"), **extra},
                             expect)
        time.sleep(1.1)
        return report["datasets"][0]

    assert run(onsite, 1)["status"] == "full" and run(offsite, 2)["status"] == "full"
    dying = run(onsite, 3, expect=1, ZFSMGR_ZFS=str(no_hold))
    assert dying["status"] == "failed" and "cannot hold" in dying["message"], dying
    committed = json.loads(run_zfsmgr(["restore", "list", "--json"], env=onsite.client_env,
                                      check=True).stdout)[0]["snapshot"]

    def snapshots():
        return zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", dataset).split()

    assert f"{dataset}@{committed}" in snapshots()
    assert run(offsite, 4)["status"] == "incremental"
    assert f"{dataset}@{committed}" in snapshots()  # left to onsite
    after = run(onsite, 5)
    assert after["status"] == "incremental", after
    newest = json.loads(run_zfsmgr(["restore", "list", "--json"], env=onsite.client_env,
                                   check=True).stdout)[0]
    assert newest["parent"] == committed, newest  # from the adopted backup, not the older base


def test_a_damaged_stream_leaves_the_old_tree_as_it_was(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    root = make_tree(pool)
    env = env_for(server, root, EXCLUDE_DATASETS=f"{root}/skip {root}/c")
    backup_json(run_zfsmgr, env)
    target = f"{pool.name}/back"
    run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
               env=server.client_env, check=True)
    before = {d: files(pool, d) for d in datasets_under(target)}
    rows = json.loads(run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                 check=True).stdout)
    damaged = next(r for r in rows if r["dataset"] == f"{root}/a/x")
    path = server.storage_dir / damaged["key"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--force",
                       "--source-dataset", root], env=server.client_env)
    assert done.returncode == 5, done.stderr
    assert damaged["key"] in done.stderr
    assert {d: files(pool, d) for d in datasets_under(target)} == before
    assert not [d for d in zfs("list", "-H", "-o", "name", "-r", pool.name).split()
                if "zfsmgr-restore" in d]  # the temporary tree is gone


@pytest.mark.parametrize("how", ["single", "recursive", "all"])
def test_a_streams_mountpoint_never_decides_where_a_restore_mounts(
        how, pool, server_factory, run_zfsmgr, tmp_path):
    """A `send -p` stream carries the original dataset's mountpoint: the restored dataset
    mounted there (a server could choose ~/.ssh, and plant authorized_keys), and kept it for
    the next `zfs mount -a`. It mounts below its target now, and shares nothing; so does each
    dataset of a tree restore (`--recursive`, `--all`: they kept the stream's), whose missing
    parents are empty canmount=off placeholders (`zfs create -p` mounted all but the last)."""
    import gzip
    import subprocess

    from test_rotation_e2e import upload_stream
    from zfsmgr.remote import ServerClient

    server = server_factory("dir")
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/deep")
    source = pool.create("deep/withmount")
    victim = tmp_path / "victim" / ".ssh"
    rig.sh("zfs", "set", f"mountpoint={victim}", source)
    (victim / "authorized_keys").write_text("ssh-ed25519 AAAA planted\n")
    rig.sh("zfs", "snapshot", f"{source}@zfsmgr_2023-11-14_22:13:20")
    stream = subprocess.run(["zfs", "send", "-p", f"{source}@zfsmgr_2023-11-14_22:13:20"],
                            capture_output=True, check=True).stdout
    rig.sh("zfs", "set", "mountpoint=none", source)  # the original is gone from there
    assert not (victim / "authorized_keys").exists()
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    upload_stream(api, source, "zfsmgr_2023-11-14_22:13:20", gzip.compress(stream, 1),
                  1700000000)
    target = f"{pool.name}/restored"
    restored, args = target, ["--source-dataset", source, target]
    if how == "recursive":
        args.append("--recursive")
    elif how == "all":
        restored, args = f"{target}/{source}", ["--all", target]
    done = run_zfsmgr(["restore", "latest", *args], env=server.client_env)
    assert done.returncode == 0, done.stderr
    assert "the stream's mountpoint" in done.stderr
    assert not (victim / "authorized_keys").exists()
    value, where = rig.sh("zfs", "get", "-H", "-o", "value,source", "mountpoint",
                          restored).split("\t")
    assert value == f"{pool.mountpoint(pool.name)}/{restored.split('/', 1)[1]}", (value, where)
    assert "default" in where or "inherited" in where, where
    assert (pool.mountpoint(restored) / "authorized_keys").exists()  # the data is all there
    placeholders = datasets_under(target)[:-1] if how == "all" else []
    assert len(placeholders) == (3 if how == "all" else 0)  # target, target/POOL, .../deep
    for each in placeholders:
        assert zfs("get", "-H", "-o", "value", "canmount", each).strip() == "off", each


def test_a_stream_zfs_refuses_is_named_with_the_command_line(pool, server_factory, run_zfsmgr):
    """The error said zfs's words ("invalid stream") without the command that got them."""
    import gzip
    import os

    from test_rotation_e2e import upload_stream
    from zfsmgr.remote import ServerClient

    server = server_factory("dir")
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    upload_stream(api, "tank/junk", "zfsmgr_2023-11-14_22:13:20",
                  gzip.compress(os.urandom(4096), 1), 1700000000)
    target = f"{pool.name}/junk"
    done = run_zfsmgr(["restore", "latest", "--source-dataset", "tank/junk", target],
                      env=server.client_env)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "`zfs recv" in last and target in last and "failed (exit" in last, last
    assert not rig.sh("zfs", "list", "-H", "-o", "name", "-r", pool.name).count(target)


def test_a_restored_tree_names_the_datasets_its_run_may_not_have_had(pool, server_factory,
                                                                     run_zfsmgr):
    """`restore latest --recursive` takes each descendant's newest backup: for a dataset
    destroyed since, its last one. The manifests cannot tell that from a dataset the run found
    unchanged; the server's check-ins can: the first is restored with a warning, the second
    without."""
    server = tree_server("dir", pool, server_factory)
    root = make_tree(pool)
    env = env_for(server, root)
    first = backup_json(run_zfsmgr, env)
    zfs("release", hold_of(server), f"{root}/b@{first['snapshot']}")  # zfs-fuse: a held base
    rig.sh("zfs", "umount", f"{root}/b", check=False)  # zfs-fuse: a mounted one is busy
    zfs("destroy", "-r", f"{root}/b")
    time.sleep(1.1)
    rig.write_files(pool.mountpoint(f"{root}/a"), seed=78, count=1, size=40_000)
    second = backup_json(run_zfsmgr, env)
    assert statuses(second)[f"{root}/a"] == "incremental"
    assert statuses(second)[f"{root}/a/x"] == "unchanged"
    target = f"{pool.name}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "may have been destroyed" in line]
    assert len(warned) == 1 and warned[0].startswith(f"zfsmgr: warning: {root}/b: "), warned
    assert f"{target}/b" in datasets_under(target)  # restored all the same: nothing is lost


def test_a_restored_tree_names_a_dataset_whose_upload_failed_in_its_run(pool, server_factory,
                                                                        run_zfsmgr):
    """A descendant whose upload failed in the run restored (here: over the client's quota)
    has only an older backup: it was restored from that without a word (the server had heard
    of it, so it was not "gone"). Now its warning says its upload failed; the datasets that
    were unchanged at that run (checked in) get none."""
    server = server_factory("dir", quota=3 << 20)
    root = make_tree(pool)
    env = env_for(server, root, PARALLEL="1", COMPRESS="none")
    backup_json(run_zfsmgr, env)
    time.sleep(1.1)
    rig.write_files(pool.mountpoint(f"{root}/a"), seed=91, count=1, size=40_000)
    rig.write_files(pool.mountpoint(f"{root}/a/x"), seed=92, count=1, size=4 << 20)
    second = backup_json(run_zfsmgr, env, expect=1)
    got = statuses(second)
    assert got[f"{root}/a"] == "incremental" and got[f"{root}/a/x"] == "failed", got
    assert got[f"{root}/b"] == "unchanged", got
    target = f"{pool.name}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("zfsmgr: warning:")]
    assert len(warned) == 1, done.stderr
    assert warned[0].startswith(f"zfsmgr: warning: {root}/a/x: its newest backup to restore")
    assert "its upload failed in that run or after it" in warned[0], warned
    assert f"{target}/a/x" in datasets_under(target)  # restored all the same, as it was
