"""One run over a tree of datasets on zfs-fuse: selection, exclusions, atomic snapshots, a
dataset created and one destroyed between runs, a failing dataset, unchanged datasets."""

from __future__ import annotations

import fcntl
import json
import os
import time
import urllib.parse

import pytest

import rig

pytestmark = [pytest.mark.zfs]


def zfs(*args):
    return rig.sh("zfs", *args)


def make_tree(pool):
    """root/{a/{x},b,skip/{deep},c(off)/{on(on)}}, with properties to carry."""
    root = pool.create("host")
    for child in ("a", "a/x", "b", "skip", "skip/deep", "c", "c/on"):
        zfs("create", f"{root}/{child}")
    zfs("set", "org.zfsmgr:backup=off", f"{root}/c")
    zfs("set", "org.zfsmgr:backup=on", f"{root}/c/on")
    zfs("set", "compression=gzip-3", f"{root}/a")
    zfs("set", "recordsize=16K", f"{root}/b")
    zfs("set", "org.example:owner=ann", f"{root}/a/x")
    for i, child in enumerate(("", "/a", "/a/x", "/b", "/c/on")):
        rig.write_files(pool.mountpoint(root + child), seed=10 + i, count=2, size=50_000)
    return root


def tree_server(storage, pool, server_factory):
    """A server of `storage` for a tree's backups (`local`: receiving under POOL/srvbase)."""
    base = ""
    if storage == "local":
        base = f"{pool.name}/srvbase"
        zfs("create", "-o", "mountpoint=none", base)
    return server_factory(storage, base_dataset=base)


def restore_run(run_zfsmgr, server, root, snapshot, target):
    """`restore N TARGET --recursive` of `root`'s backup of `snapshot` (N from `restore
    list`): the tree as that run left it."""
    rows = json.loads(run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                 check=True).stdout)
    number = next(r["number"] for r in rows if r["dataset"] == root
                  and r["snapshot"] == snapshot)
    done = run_zfsmgr(["restore", "restore", str(number), target, "--recursive"],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr


def env_for(server, root, **extra):
    return {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true",
            "EXCLUDE_DATASETS": f"{root}/skip", **extra}


def backup_json(run_zfsmgr, env, expect=0):
    done = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert done.returncode == expect, done.stdout + done.stderr
    return json.loads(done.stdout)


def statuses(report):
    return {d["dataset"]: d["status"] for d in report["datasets"]}


def test_a_tree_in_one_run_then_changes_over_time(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    root = make_tree(pool)
    env = env_for(server, root)
    shown = json.loads(run_zfsmgr(["client", "datasets", "--json"], env=env,
                                  check=True).stdout)
    verdict = {d["dataset"]: d["selected"] for d in shown}
    assert verdict == {root: True, f"{root}/a": True, f"{root}/a/x": True, f"{root}/b": True,
                       f"{root}/skip": False, f"{root}/skip/deep": False, f"{root}/c": False,
                       f"{root}/c/on": True}
    reasons = {d["dataset"]: d["reason"] for d in shown}
    assert reasons[f"{root}/skip/deep"] == f"below {root}/skip, in EXCLUDE_DATASETS"
    assert "inherited" not in reasons[f"{root}/c"] and "off" in reasons[f"{root}/c"]
    text = run_zfsmgr(["client", "datasets"], env=env, check=True).stdout
    assert f"{root}/skip\tleft out\tin EXCLUDE_DATASETS" in text

    first = backup_json(run_zfsmgr, env)
    chosen = [d for d, s in verdict.items() if s]
    assert statuses(first) == {d: "full" for d in chosen}
    assert first["failed"] == 0 and first["sent"] == len(chosen)
    # one snapshot name for the whole run; nothing on the excluded datasets
    assert {d["snapshot"] for d in first["datasets"]} == {f"{d}@{first['snapshot']}"
                                                          for d in chosen}
    for left_out in ("skip", "skip/deep", "c"):
        assert zfs("list", "-H", "-t", "snapshot", "-r", "-d", "1", "-o", "name",
                   f"{root}/{left_out}").strip() == ""
    # what the server holds: one chain per dataset
    catalog = {m["dataset"] for m in server_snapshots(server)}
    assert catalog == set(chosen)

    time.sleep(1.1)
    rig.write_files(pool.mountpoint(f"{root}/a"), seed=99, count=1, size=30_000)
    zfs("create", f"{root}/a/new")
    rig.write_files(pool.mountpoint(f"{root}/a/new"), seed=98, count=1, size=30_000)
    zfs("release", hold_of(server), f"{root}/b@{first['snapshot']}")  # zfs-fuse: a held base
    rig.sh("zfs", "umount", f"{root}/b", check=False)  # zfs-fuse: a mounted one is busy
    zfs("destroy", "-r", f"{root}/b")
    second = backup_json(run_zfsmgr, env)
    got = statuses(second)
    assert got[f"{root}/a"] == "incremental" and got[f"{root}/a/new"] == "full"
    # (the root changed: zfs removed b's mountpoint directory from it)
    assert got[f"{root}/a/x"] == "unchanged" and got[f"{root}/c/on"] == "unchanged"
    assert f"{root}/b" not in got
    notes = " | ".join(second["notes"])
    assert f"{root}/b was destroyed since the last run; its backups stay" in notes
    assert f"{root}/a/new is new" in notes
    # the unchanged datasets keep no new snapshot; the base stays
    snaps = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                f"{root}/a/x").split()
    assert snaps == [f"{root}/a/x@{first['snapshot']}"]
    assert any(m["dataset"] == f"{root}/b" for m in server_snapshots(server))

    time.sleep(1.1)
    third = backup_json(run_zfsmgr, {**env, "BACKUP_UNCHANGED": "true"})
    assert set(statuses(third).values()) == {"incremental"}
    assert third["notes"] == []  # reported once


def hold_of(server):
    from zfsmgr.client.base import hold_tag, server_tag

    env = server.client_env
    return hold_tag(server_tag(env["SERVER_URL"], env["CLIENT_ID"]))


def server_snapshots(server):
    import urllib.request

    env = server.client_env
    request = urllib.request.Request(env["SERVER_URL"] + "/snapshots", headers={
        "X-Client-ID": env["CLIENT_ID"], "X-API-Key": env["API_KEY"]})
    with urllib.request.urlopen(request) as answer:
        return json.loads(answer.read())["snapshots"]


def test_one_failing_dataset_does_not_stop_the_others(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    root = make_tree(pool)
    env = env_for(server, f"{root}/a, {root}/b {root}/missing", RECURSIVE="false",
                  EXCLUDE_DATASETS="")
    state = server.client_env["STATE_DIR"]
    os.makedirs(state, exist_ok=True)
    fd = os.open(os.path.join(state, "lock-" + urllib.parse.quote(f"{root}/b", safe="")),
                 os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another zfsmgr process is busy with b
    try:
        report = backup_json(run_zfsmgr, env, expect=1)
        text = run_zfsmgr(["client", "backup"], env=env)
    finally:
        os.close(fd)
    got = statuses(report)
    assert got == {f"{root}/a": "full", f"{root}/b": "failed", f"{root}/missing": "failed"}
    messages = {d["dataset"]: d["message"] for d in report["datasets"]}
    assert "another zfsmgr run is working on" in messages[f"{root}/b"]
    assert messages[f"{root}/missing"] == f"dataset {root}/missing does not exist"
    assert report["failed"] == 2 and report["exit_status"] == 1
    assert text.returncode == 1
    assert f"zfsmgr: error: {root}/b: another zfsmgr run" in text.stderr
    assert "2 of 3 datasets failed" in text.stderr
    assert "3 datasets: " in text.stdout
    # b has no snapshot left behind
    assert zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
               f"{root}/b").strip() == ""


def test_typed_snapshots_cover_the_selection(pool, server_factory, run_zfsmgr):
    server = server_factory("dir", rotation_policy={"keep_hourly": 0, "keep_daily": 1,
                                                    "keep_weekly": 0, "keep_monthly": 0})
    root = make_tree(pool)
    env = env_for(server, root)
    made = json.loads(run_zfsmgr(["client", "snapshot", "daily", "--json"], env=env,
                                 check=True).stdout)["created"]
    chosen = [root, f"{root}/a", f"{root}/a/x", f"{root}/b", f"{root}/c/on"]
    assert sorted(n.split("@")[0] for n in made) == chosen
    assert len({n.split("@")[1] for n in made}) == 1  # one name for all
    assert zfs("list", "-H", "-t", "snapshot", "-r", "-d", "1", "-o", "name",
               f"{root}/skip").strip() == ""
    time.sleep(1.1)
    second = json.loads(run_zfsmgr(["client", "snapshot", "daily", "--json"], env=env,
                                   check=True).stdout)
    # one daily bucket: the newer snapshot stands for it, every dataset's older one goes
    assert sorted(d["snapshot"] for d in second["destroyed"]) == sorted(made)
    assert len(second["created"]) == len(chosen) and not set(second["created"]) & set(made)
    plan = json.loads(run_zfsmgr(["client", "rotate", "--dry-run", "--json"], env=env,
                                 check=True).stdout)
    assert plan["destroyed"] == [] and sorted(plan["kept"]) == sorted(second["created"])


def test_a_typed_snapshot_that_fails_on_one_dataset_leaves_none(
        pool, server_factory, run_zfsmgr, tmp_path):
    """zfs-fuse makes a typed snapshot one dataset at a time: when a later one failed, the
    ones before it stayed, and the error did not say so. Now all or none: the others are
    destroyed again, and the one-line error says it. (The failure is injected into one real
    `zfs snapshot` call; every other call, the undoing destroys included, is the real zfs.)"""
    server = server_factory("dir")
    root = make_tree(pool)
    real = rig.sh("sh", "-c", "command -v zfs").strip()
    wrapper = tmp_path / "zfs"
    wrapper.write_text(f"#!/bin/sh\ncase \"$1 $*\" in\n  \"snapshot \"*{root}/b@*)"
                       " echo \"cannot create snapshot: out of space\" >&2; exit 1;;\nesac\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    done = run_zfsmgr(["client", "snapshot", "daily"], env=env_for(server, root,
                                                                   ZFSMGR_ZFS=str(wrapper)))
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert f"{root}/b@zfsmgr_daily_" in line and "out of space" in line, line
    assert "destroyed again" in line, line
    left = zfs("list", "-H", "-t", "snapshot", "-r", "-o", "name", root).split()
    assert [n for n in left if "zfsmgr_daily_" in n] == []


def test_a_snapshot_set_split_across_command_lines_is_all_or_none(pool, monkeypatch):
    """A set too long for one command line goes in several `zfs snapshot` calls; when a
    later call failed, the snapshots of the earlier ones stayed. On zfs-fuse, one name per
    call, the second naming a dataset that is not there."""
    import zfsmgr.zfs as zfs_module
    from zfsmgr.errors import ZfsError

    root = pool.create("split")
    zfs("create", f"{root}/a")
    monkeypatch.setattr(zfs_module, "ARGV_LIMIT", 1)  # one name per call
    with pytest.raises(ZfsError) as raised:
        zfs_module.Zfs().snapshot_many([f"{root}/a@set", f"{root}/gone@set"], {"kind": "x"})
    assert f"{root}/gone" in str(raised.value) and "destroyed again" in str(raised.value)
    assert zfs("list", "-H", "-t", "snapshot", "-r", "-o", "name", root).strip() == ""


@pytest.mark.parametrize("parallel", ["3", "1"])
def test_parallel_sends_and_an_interrupt_leaves_nothing(parallel, pool, server_factory,
                                                        run_zfsmgr):
    """One at a time, the datasets waiting their turn kept their new snapshots."""
    import signal
    import subprocess
    import sys

    server = server_factory("dir", env={"CLIENT_MAX_REQUESTS": "12", "PART_SIZE": "128K"})
    root = make_tree(pool)
    env = env_for(server, root, PARALLEL=parallel)
    first = backup_json(run_zfsmgr, env)
    assert set(statuses(first).values()) == {"full"} and first["sent"] == 5
    for child in ("a", "b", "c/on"):
        rig.write_files(pool.mountpoint(f"{root}/{child}"), seed=40, count=10, size=1_000_000)
    before = {d: zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1", d).split()
              for d in (f"{root}/a", f"{root}/b", f"{root}/c/on")}
    seen = server.log().count("/upload-stream/")
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env({**env, "COMPRESS": "gzip",
                                               "COMPRESS_LEVEL": "9"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and server.log().count("/upload-stream/") < seen + 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err + out
    assert "Traceback" not in err
    after = {d: zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1", d).split()
             for d in before}
    committed = {m["snapshot"] for m in server_snapshots(server)}
    stopped = [d for d in before if after[d] == before[d]]  # its new snapshot is gone
    assert stopped, out  # the signal came while sending
    for d in set(before) - set(stopped):  # finished before the signal: the new base
        assert after[d][-1].split("@")[1] in committed and f"backup {after[d][-1]}" in out
    again = backup_json(run_zfsmgr, env)
    for d in before:
        assert statuses(again)[d] == ("incremental" if d in stopped else "unchanged")


def test_an_interrupt_during_the_pools_snapshot_leaves_no_new_snapshot(
        pool, server_factory, tmp_path):
    """SIGTERM while the pool's `zfs snapshot` ran: zfs (in a session of its own) went on,
    and its snapshots appeared after the run's cleanup, for the next run to find."""
    import signal
    import subprocess
    import sys

    server = server_factory("dir")
    root = make_tree(pool)
    env = env_for(server, root)
    real = rig.sh("sh", "-c", "command -v zfs").strip()
    began = tmp_path / "snapshotting"
    slow = tmp_path / "zfs"
    slow.write_text(f'#!/bin/sh\ncase "$1" in snapshot) touch {began}; sleep 1;; esac\n'
                    f'exec {real} "$@"\n')
    slow.chmod(0o755)
    before = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", root).split()
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env({**env, "ZFSMGR_ZFS": str(slow)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.wait_until(began.exists, 60, "the pool's snapshot")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err + out
    time.sleep(2)  # a zfs left running would make its snapshot by now (the wrapper sleeps 1 s)
    assert zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", root).split() == before


def test_an_interrupt_ends_parallel_uploads_waiting_to_retry(pool, server_factory):
    """The server went away during two parallel uploads: each waited between its retries,
    deaf to Ctrl-C and SIGTERM (a signal reaches the main thread only), and the run could
    not end before their 7.5 minutes of retries were over."""
    import signal
    import subprocess
    import sys

    server = server_factory("dir", env={"CLIENT_MAX_REQUESTS": "4", "PART_SIZE": "128K"})
    root = pool.create("host")
    children = [f"{root}/d{i}" for i in range(2)]
    for child in children:
        zfs("create", child)
    env = {**server.client_env, "LOCAL_DATASET": " ".join(children)}
    assert rig.run_zfsmgr(["client", "backup"], env=env).returncode == 0
    for child in children:
        rig.write_files(pool.mountpoint(child), seed=41, count=8, size=1_000_000)
    before = {c: zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", c).split()
              for c in children}
    opened = server.log().count("opened: client=")
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env({**env, "COMPRESS": "gzip", "COMPRESS_LEVEL": "9"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.wait_until(lambda: server.log().count("opened: client=") >= opened + 2, 60,
                   "two uploads under way")
    server.kill()
    time.sleep(2)  # both are waiting to retry now
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err + out
    assert time.monotonic() - started < 30, err  # it was 7.5 minutes
    after = {c: zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", c).split()
             for c in children}
    assert after == before  # each removed its snapshot


def test_a_missing_dataset_is_named_when_rotation_cannot_ask_the_server(
        pool, run_zfsmgr, tmp_path):
    """With the server out of reach (no policy to rotate by), `snapshot TYPE` and `rotate`
    returned 1 before saying which dataset of LOCAL_DATASET does not exist: no reason."""
    here = pool.create("here")
    env = {"CLIENT_ID": "c1", "API_KEY": "k", "SERVER_URL": f"http://127.0.0.1:{rig.free_port()}",
           "LOCAL_DATASET": f"{here} {pool.name}/gone", "STATE_DIR": str(tmp_path / "state")}
    for command in (["client", "snapshot", "hourly"], ["client", "rotate"]):
        done = run_zfsmgr(command, env=env)
        assert done.returncode == 1, done.stderr
        assert f"dataset {pool.name}/gone does not exist" in done.stderr, (command, done.stderr)


def test_a_renamed_dataset_is_recognised_by_its_guid(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    root = pool.create("host")
    zfs("create", f"{root}/old")
    env = env_for(server, root)
    first = backup_json(run_zfsmgr, env)
    # zfs-fuse renames neither a mounted dataset nor one with a held snapshot
    rig.sh("zfs", "umount", f"{root}/old", check=False)
    zfs("release", hold_of(server), f"{root}/old@{first['snapshot']}")
    zfs("rename", f"{root}/old", f"{root}/new")
    zfs("hold", hold_of(server), f"{root}/new@{first['snapshot']}")
    report = backup_json(run_zfsmgr, env)
    assert statuses(report)[f"{root}/new"] == "full"
    notes = " | ".join(report["notes"])
    assert f"{root}/old was renamed to {root}/new (same guid)" in notes
    assert "destroyed" not in notes and f"{root}/new is new" not in notes


TWIN_SNAPSHOT = """#!/bin/sh
# zfs, and each `zfs snapshot` of this run's ROOT gives the excluded ROOT/a/out a snapshot of
# the same name too, as another run (to another server) in the same second would
for last; do :; done
"{zfs}" "$@" || exit $?
case "$1:$last" in
  snapshot:{root}@*) "{zfs}" snapshot "{root}/a/out@${{last#*@}}" 2>/dev/null || true ;;
esac
"""


def test_unchanged_snapshots_of_a_subtree_with_a_left_out_dataset_go_one_by_one(
        pool, server_factory, run_zfsmgr, tmp_path):
    """A subtree whose new snapshots were all unneeded went in one `zfs destroy -r`, which
    also destroyed the same-named snapshot of a dataset below it that the run leaves out (made
    by another run in the same second)."""
    server = server_factory("dir")
    root = pool.create("twin")
    for child in ("a", "a/b", "a/out"):
        zfs("create", f"{root}/{child}")
    env = env_for(server, root, EXCLUDE_DATASETS=f"{root}/a/out")
    backup_json(run_zfsmgr, env)  # the full backups
    wrapper = tmp_path / "zfs"
    wrapper.write_text(TWIN_SNAPSHOT.format(zfs=rig.sh("sh", "-c", "command -v zfs").strip(),
                                            root=root))
    wrapper.chmod(0o755)
    report = backup_json(run_zfsmgr, {**env, "ZFSMGR_ZFS": str(wrapper)})
    assert set(statuses(report).values()) == {"unchanged"}, report
    twins = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{root}/a/out").split()
    assert twins == [f"{root}/a/out@{report['snapshot']}"], twins
    mine = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", root).split()
    assert not [s for s in mine if s.endswith(report["snapshot"]) and "/out@" not in s]


def test_marks_a_dataset_inherits_make_no_snapshot_a_backup(pool, server_factory, run_zfsmgr):
    """A dataset restored from a record (or a `-p` stream) that said org.zfsmgr:kind=backup
    passed the mark to every snapshot of it: the next backup destroyed the user's own
    snapshot as "left by an interrupted backup". Marks count only set on the snapshot."""
    server = server_factory("dir")
    dataset = pool.create("marked")
    zfs("set", "org.zfsmgr:kind=backup", dataset)
    zfs("snapshot", f"{dataset}@important")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    report = backup_json(run_zfsmgr, env)
    assert statuses(report) == {dataset: "full"}, report
    snapshots = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", dataset).split()
    assert f"{dataset}@important" in snapshots
    again = backup_json(run_zfsmgr, env)  # and the chain goes on from zfsmgr's own base
    assert statuses(again) == {dataset: "unchanged"}, again
    assert f"{dataset}@important" in zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r",
                                         dataset).split()


def test_a_wanted_dataset_zfsmgr_cannot_name_fails_the_run(pool, server_factory, run_zfsmgr):
    """`tank/home/My Documents` (a space) is a valid ZFS name but no storage key: a run left
    it out without a word, said every dataset was sent and pinged success, so it was never
    backed up. Now it fails the run, naming the way out; left out on purpose, it is fine."""
    server = server_factory("dir")
    root = pool.create("home")
    zfs("create", f"{root}/my docs")
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}
    report = backup_json(run_zfsmgr, env, expect=1)
    got = {d["dataset"]: d for d in report["datasets"]}
    assert got[root]["status"] == "full"
    assert got[f"{root}/my docs"]["status"] == "failed"
    assert "name not usable" in got[f"{root}/my docs"]["message"]
    assert "org.zfsmgr:backup=off" in got[f"{root}/my docs"]["message"]
    zfs("set", "org.zfsmgr:backup=off", f"{root}/my docs")
    report = backup_json(run_zfsmgr, env, expect=0)
    assert f"{root}/my docs" not in {d["dataset"] for d in report["datasets"]}
