"""A run's pool-wide snapshot on zfs-fuse is named by its creation second even when zfs takes
it in a later second than the client named it (renamed on every member, one name for the
pool), and each dataset gets exactly one outcome when snapshots are made again."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone

import pytest

import rig
from test_many_datasets import server_snapshots
from zfsmgr import protocol

pytestmark = [pytest.mark.zfs]


def slow_zfs(folder, rules):
    """A zfs wrapper (ZFSMGR_ZFS): `rules` is shell run before a real zfs call, with the
    arguments in "$*" (e.g. sleep before a snapshot, fail one once)."""
    real = subprocess.run(["sh", "-c", "command -v zfs"], capture_output=True,
                          text=True).stdout.strip() or "/sbin/zfs"
    wrapper = folder / "zfs"
    wrapper.write_text(f"#!/bin/sh\n{rules}\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def created_second(snapshot):
    epoch = int(rig.sh("zfs", "get", "-Hp", "-o", "value", "creation", snapshot))
    return "zfsmgr_" + protocol.format_timestamp(datetime.fromtimestamp(epoch, timezone.utc))


def backup_json(env, expect=0):
    done = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
    assert done.returncode == expect, done.stdout + done.stderr
    return json.loads(done.stdout), done.stderr


def test_a_late_pool_snapshot_is_renamed_to_its_creation_second_on_every_member(
        pool, server_factory, tmp_path):
    server = server_factory("dir")
    root = pool.create("host")
    members = [root] + [f"{root}/{c}" for c in ("a", "a/x", "b")]
    for child in members[1:]:
        rig.sh("zfs", "create", child)
    # every snapshot lands at least a second after the client named it
    wrapper = slow_zfs(tmp_path, 'case "$1" in snapshot) sleep 1.3;; esac')
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true",
           "ZFSMGR_ZFS": wrapper}
    report, err = backup_json(env)
    name = report["snapshot"]
    assert report["snapshots"] == {pool.name: name} and report["sent"] == 4
    assert "were taken in a later second: renamed" in err
    for dataset in members:  # one name on every member, its creation second
        assert created_second(f"{dataset}@{name}") == name
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                      dataset).split() == [f"{dataset}@{name}"]
    assert {d["snapshot"] for d in report["datasets"]} == {f"{d}@{name}" for d in members}
    stored = server_snapshots(server)
    assert sorted(m["dataset"] for m in stored) == sorted(members)
    assert {m["snapshot"] for m in stored} == {name}
    assert {"zfsmgr_" + protocol.parse_key(m["key"]).timestamp for m in stored} == {name}
    rig.write_files(pool.mountpoint(f"{root}/a"), seed=3, count=1, size=20_000)
    again, _ = backup_json({**env, "BACKUP_UNCHANGED": "true"})  # from the renamed bases
    assert {d["type"] for d in again["datasets"]} == {"incremental"}
    assert created_second(f"{root}/a@{again['snapshot']}") == again["snapshot"]


def test_each_dataset_gets_one_outcome_when_the_pool_is_snapshotted_again(
        pool, server_factory, tmp_path):
    server = server_factory("dir")
    a, b, c = (pool.create(n) for n in ("a", "b", "c"))
    once = tmp_path / "failed-once"
    slow = tmp_path / "slept-once"
    # zfs-fuse snapshots a, b and c one call each: a fails the first time; c lands a second
    # after b (the pool's snapshots span two seconds: made again under a new name)
    wrapper = slow_zfs(tmp_path, f'''case "$*" in
  "snapshot "*" {a}@"*) if [ ! -e {once} ]; then : > {once}
    echo "cannot create snapshot '{a}@x': injected failure" >&2; exit 1; fi;;
  "snapshot "*" {c}@"*) if [ ! -e {slow} ]; then : > {slow}; sleep 1.3; fi;;
esac''')
    env = {**server.client_env, "LOCAL_DATASET": f"{a} {b} {c}", "ZFSMGR_ZFS": wrapper}
    report, err = backup_json(env, expect=1)
    assert slow.exists() and once.exists()
    assert [(d["dataset"], d["status"]) for d in report["datasets"]] == [
        (a, "failed"), (b, "full"), (c, "full")]
    assert "injected failure" in report["datasets"][0]["message"]
    assert report["failed"] == 1 and report["sent"] == 2
    name = report["snapshot"]
    for dataset in (b, c):  # made again: one snapshot each, named by its creation second
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                      dataset).split() == [f"{dataset}@{name}"]
        assert created_second(f"{dataset}@{name}") == name
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                  a).strip() == ""
    assert sorted(m["dataset"] for m in server_snapshots(server)) == [b, c]
