"""A run sends two datasets at once where the server's share of requests for the client allows
(learnt from /status), never more than it allows (no 429, no stall); committed backups become
bases in batches (base.mark_bases) while the next ones stream."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import pytest

import rig
import test_server_api
from zfsmgr import settings
from zfsmgr.client.base import PROPS, Committed, hold_tag, mark_bases, server_tag
from zfsmgr.client.run import endings_at_once, uploads_at_once
from zfsmgr.zfs import Zfs

in_process_server = test_server_api.server  # the fixture: the server's app in-process


def test_uploads_at_once_follow_parallel_and_the_servers_share():
    assert uploads_at_once(0, {"client_max_requests": 4}) == 2  # the default: two
    assert uploads_at_once(0, {"client_max_requests": 2}) == 1
    assert uploads_at_once(0, {"client_max_requests": 12}) == 2
    assert uploads_at_once(5, {"client_max_requests": 12}) == 5
    assert uploads_at_once(5, {"client_max_requests": 5}) == 2  # never past the share
    assert uploads_at_once(3, {}) == 1  # a server that does not say: one at a time
    assert uploads_at_once(1, {"client_max_requests": 40}) == 1


def test_endings_overlap_only_where_both_shares_leave_room():
    share = {"client_max_requests": 4, "client_max_uploads": 4}
    assert endings_at_once(2, share) == 0  # the defaults: two streams take the requests
    assert endings_at_once(2, {**share, "client_max_requests": 5}) == 1
    assert endings_at_once(2, {**share, "client_max_requests": 8}) == 2  # one per stream
    assert endings_at_once(2, {**share, "client_max_requests": 40}) == 2
    assert endings_at_once(2, {"client_max_requests": 8, "client_max_uploads": 3}) == 1
    assert endings_at_once(4, {"client_max_requests": 8, "client_max_uploads": 4}) == 0
    assert endings_at_once(2, {"client_max_requests": 8}) == 0  # an older server: none
    assert endings_at_once(1, {"client_max_requests": 40, "client_max_uploads": 9}) == 0


def test_status_says_the_clients_share_and_the_default_leaves_room_for_two(
        in_process_server):
    from test_server_api import auth, call

    ctx, app = in_process_server
    status = json.loads(call(app, "GET", "/status", headers=auth("alice"))[1])
    assert settings.load("server", environ={}).threads == ctx.settings.threads == 12
    assert status["client_max_requests"] == ctx.client_max_requests == 4
    assert status["client_max_uploads"] == ctx.settings.client_max_uploads == 4
    assert uploads_at_once(0, status) == 2 and endings_at_once(2, status) == 0


def _opened_and_committed(log_text):
    """The server's log as a list of ('opened'|'committed', upload id), in order."""
    events = []
    for line in log_text.splitlines():
        for what in ("opened", "committed"):
            if f" {what}: client=" in line:
                events.append((what, line.split("upload ", 1)[1].split()[0]))
    return events


def _write(pool, datasets, seed):
    for i, dataset in enumerate(datasets):
        with open(pool.mountpoint(dataset) / f"data{seed}.bin", "wb") as out:
            out.write(os.urandom(700_000 + 10_000 * i))
    rig.sh("sync")


@pytest.mark.zfs
def test_a_run_sends_two_at_once_by_default_without_a_429(pool, server_factory, run_zfsmgr):
    server = server_factory("dir", env={"PART_SIZE": "128K"})  # the server's default share
    root = pool.create("host")
    children = [f"{root}/d{i}" for i in range(4)]
    for child in children:
        rig.sh("zfs", "create", child)
    env = {**server.client_env, "LOCAL_DATASET": root, "RECURSIVE": "true"}
    first = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    _write(pool, children, 1)
    second = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads(second.stdout)
    assert {d["dataset"]: d["status"] for d in report["datasets"]} == {
        **{c: "incremental" for c in children}, root: "unchanged"}
    log_text = server.log()
    assert " 429 " not in log_text and "retry" not in second.stderr
    events = _opened_and_committed(log_text)[-8:]  # the second run's four uploads
    assert [e for e, _ in events[:2]] == ["opened", "opened"], events  # two at once
    tag = server_tag(env["SERVER_URL"], env["CLIENT_ID"])
    for child in children:  # each marked as the base, the older one gone
        snaps = rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name,userrefs",
                       "-r", "-d", "1", child).split("\n")
        assert snaps[:-1] == [f"{child}@{report['snapshot']}\t1"], snaps
        assert rig.sh("zfs", "get", "-H", "-o", "value", "org.zfsmgr:bases",
                      f"{child}@{report['snapshot']}").strip() == tag


@pytest.mark.zfs
def test_parallel_past_the_servers_share_sends_what_it_allows(pool, server_factory,
                                                              run_zfsmgr):
    server = server_factory("dir", env={"PART_SIZE": "128K", "CLIENT_MAX_REQUESTS": "2"})
    root = pool.create("host")
    children = [f"{root}/d{i}" for i in range(3)]
    for child in children:
        rig.sh("zfs", "create", child)
    _write(pool, children, 1)
    env = {**server.client_env, "LOCAL_DATASET": " ".join(children), "PARALLEL": "4"}
    done = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("PARALLEL=4, but the server allows this client 2 requests at once: sending 1"
            " datasets at a time") in done.stderr
    log_text = server.log()
    assert " 429 " not in log_text and "retry" not in done.stderr
    events = [e for e, _ in _opened_and_committed(log_text)]
    assert events == ["opened", "committed"] * 3  # one at a time


@pytest.mark.zfs
def test_marking_in_a_batch_gives_each_dataset_its_own_error(pool):
    zfs = Zfs()
    tag = "0badcafe"
    names = [pool.create(n) for n in ("a", "b", "c")]
    for dataset in names:  # an older base, held for this server
        zfs.snapshot(f"{dataset}@zfsmgr_2020-01-01_00:00:00", {"kind": "backup"})
        zfs.hold(f"{dataset}@zfsmgr_2020-01-01_00:00:00", hold_tag(tag))
        zfs.set(f"{dataset}@zfsmgr_2020-01-01_00:00:00", "org.zfsmgr:bases", tag)
        zfs.snapshot(f"{dataset}@zfsmgr_2020-01-02_00:00:00", {"kind": "backup"})
    items = [Committed(d, zfs.snapshot_info(f"{d}@zfsmgr_2020-01-02_00:00:00", PROPS),
                       zfs.features(d), zfs.snapshots(d, PROPS)) for d in names]
    zfs.destroy(f"{names[1]}@zfsmgr_2020-01-02_00:00:00")  # gone before it is marked
    failed = mark_bases(zfs, items, tag)
    assert list(failed) == [names[1]] and "does not exist" in str(failed[names[1]])
    for dataset in (names[0], names[2]):
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name,userrefs",
                      "-r", "-d", "1", dataset).split("\n")[:-1] == [
            f"{dataset}@zfsmgr_2020-01-02_00:00:00\t1"]
    # the failed one keeps its older base as it was
    kept = rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name,userrefs", "-r", "-d",
                  "1", names[1]).split("\n")[:-1]
    assert kept == [f"{names[1]}@zfsmgr_2020-01-01_00:00:00\t1"]


@pytest.mark.zfs
def test_the_local_store_opens_two_uploads_of_a_new_client_at_once(pool, tmp_path):
    """Two uploads opened at once (a run's parallel sends) both create the client's parent
    dataset with `zfs create -p`; zfs-fuse's -p then fails for the one that comes second
    ("dataset already exists"). Played here by a zfs that makes the parent just before."""
    import gzip
    import uuid

    from test_stores import manifest
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    real = rig.sh("sh", "-c", "command -v zfs").strip()
    once = tmp_path / "raced"
    wrapper = tmp_path / "zfs"
    wrapper.write_text(f'''#!/bin/sh
case "$*" in
  "create -p "*" {base}/c1/"*) if [ ! -e {once} ]; then : > {once}
    {real} create -o mountpoint=none {base}/c1
    echo "cannot create '{base}/c1': dataset already exists" >&2; exit 1; fi;;
esac
exec {real} "$@"
''')
    wrapper.chmod(0o755)
    store = ZfsLocalStore(base, str(tmp_path / "staging"), zfs=Zfs(str(wrapper)))
    data = gzip.compress(b"x")
    store.begin(uuid.uuid4().hex, manifest("c1/tank_data_2024-02-13_14:30:00.zfs.gz", data,
                                           "a", kind="local"))
    assert once.exists()
    assert rig.sh("zfs", "list", "-H", "-o", "name", f"{base}/c1/tank_data").strip() == \
        f"{base}/c1/tank_data"


def _backup_here(monkeypatch, tmp_path, env) -> int:
    """`client backup --json` in this process (to spy on it), with `env`; its exit status."""
    import signal

    from zfsmgr import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    sigterm, root = signal.getsignal(signal.SIGTERM), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return cli.main(["client", "backup", "--json"])
    finally:  # what main set up for the process: later tests must not log to this one's stderr
        signal.signal(signal.SIGTERM, sigterm)
        root.handlers[:], root.level = handlers, level


def _backed_up_once(pool, server_factory, run_zfsmgr, max_requests: str, count: int):
    """(server, datasets, client env): `count` datasets backed up once to a server with
    CLIENT_MAX_REQUESTS=`max_requests`, then written to."""
    server = server_factory("dir", env={"PART_SIZE": "128K",
                                        "CLIENT_MAX_REQUESTS": max_requests})
    root = pool.create("host")
    children = [f"{root}/d{i}" for i in range(count)]
    for child in children:
        rig.sh("zfs", "create", child)
    env = {**server.client_env, "LOCAL_DATASET": " ".join(children)}
    assert run_zfsmgr(["client", "backup"], env=env).returncode == 0
    _write(pool, children, 1)
    return server, children, env


@pytest.mark.zfs
def test_the_next_send_starts_while_the_one_before_commits(pool, server_factory, run_zfsmgr,
                                                           monkeypatch, capsys, tmp_path):
    """One upload at a time: once a stream is read to its end, the next dataset's `zfs send`
    starts (before that upload's commit), and its upload takes that very send (one `zfs send`
    per dataset). The client runs in this process to see the order of its calls."""
    from zfsmgr import protocol
    from zfsmgr.remote import ServerClient

    server, children, env = _backed_up_once(pool, server_factory, run_zfsmgr, "2", 3)
    events, datasets = [], {}
    send, call = Zfs.send, ServerClient.call

    def spy_send(self, snapshot, *args, **kwargs):
        events.append(("send", snapshot.split("@")[0]))
        return send(self, snapshot, *args, **kwargs)

    def spy_call(self, method, path, payload=None, query=None):
        answer = call(self, method, path, payload, query)
        if path == protocol.UPLOAD:
            datasets[answer["upload_id"]] = payload["dataset"]
        elif path.endswith("/commit"):
            events.append(("commit", datasets[path.split("/")[2]]))
        return answer

    monkeypatch.setattr(Zfs, "send", spy_send)
    monkeypatch.setattr(ServerClient, "call", spy_call)
    assert _backup_here(monkeypatch, tmp_path, env) == 0
    report = json.loads(capsys.readouterr().out)
    assert {d["dataset"]: d["status"] for d in report["datasets"]} == {
        c: "incremental" for c in children}
    assert [e for e in events if e[0] == "send"] == [("send", c) for c in children], events
    for before, after in zip(children, children[1:]):
        assert events.index(("send", after)) < events.index(("commit", before)), events
    assert "zfs send" not in rig.sh("ps", "-eo", "args")  # no send left behind


@pytest.mark.zfs
def test_the_next_upload_streams_while_the_one_before_commits(pool, server_factory, run_zfsmgr,
                                                              monkeypatch, capsys, tmp_path):
    """With room in the server's shares, an upload whose stream is read opens the next
    dataset's upload before its own commit; never more than two streams flow and never more
    than four uploads are open (two each per share of /status: CLIENT_MAX_REQUESTS=6 is
    two streams of two requests and two endings of one). Each commit is slowed down here, so
    that without the overlap every next upload opens only after a commit."""
    import threading

    from zfsmgr import protocol
    from zfsmgr.remote import ServerClient

    server, children, env = _backed_up_once(pool, server_factory, run_zfsmgr, "6", 5)

    events, datasets, open_now, most = [], {}, set(), [0]
    guard, call = threading.Lock(), ServerClient.call

    def spy_call(self, method, path, payload=None, query=None):
        if path.endswith("/commit"):
            time.sleep(0.4)  # a slow commit
        answer = call(self, method, path, payload, query)
        with guard:
            if path == protocol.UPLOAD:
                datasets[answer["upload_id"]] = payload["dataset"]
                open_now.add(answer["upload_id"])
                most[0] = max(most[0], len(open_now))
                events.append(("open", payload["dataset"]))
            elif path.endswith("/commit") or path.endswith("/abort"):
                open_now.discard(path.split("/")[2])
                events.append(("commit", datasets[path.split("/")[2]]))
        return answer

    monkeypatch.setattr(ServerClient, "call", spy_call)
    assert _backup_here(monkeypatch, tmp_path, env) == 0
    report = json.loads(capsys.readouterr().out)
    assert {d["dataset"]: d["status"] for d in report["datasets"]} == {
        c: "incremental" for c in children}
    assert sorted(e for e in events if e[0] == "open") == [("open", c) for c in children]
    assert events.index(("open", children[2])) < min(  # before either commit
        events.index(("commit", children[0])), events.index(("commit", children[1]))), events
    assert 3 <= most[0] <= 4, (most, events)
    log_text = server.log()
    assert " 429 " not in log_text and " 409 " not in log_text
    tag = server_tag(env["SERVER_URL"], env["CLIENT_ID"])
    for child in children:  # each marked as the base, the older one gone
        snaps = rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                       child).split()
        assert snaps == [f"{child}@{report['snapshot']}"], snaps
        assert rig.sh("zfs", "get", "-H", "-o", "value", "org.zfsmgr:bases",
                      snaps[0]).strip() == tag
    assert "zfs send" not in rig.sh("ps", "-eo", "args")  # no send left behind


def test_the_marker_waits_for_a_batch_or_the_runs_end(monkeypatch):
    """Rounds of BATCH backups; the rest at close; one alone after BATCH_WAIT."""
    import threading

    from zfsmgr.client import marker as marker_module

    rounds, done = [], []
    monkeypatch.setattr(marker_module, "mark_bases",
                        lambda zfs, items, tag: rounds.append(len(items)) or {})
    monkeypatch.setattr(marker_module, "BATCH_WAIT", 60.0)
    marker = marker_module.Marker(None, "tag", lambda item, payload, exc: done.append(payload))
    for n in range(3):
        marker.add(Committed(f"p/d{n}", None, None), n)
    time.sleep(0.5)
    assert rounds == []  # waiting for a fourth
    marker.add(Committed("p/d3", None, None), 3)
    rig.wait_until(lambda: rounds == [4], 10, "a first round of four")
    assert done == [0, 1, 2, 3]
    for n in (4, 5):
        marker.add(Committed(f"p/d{n}", None, None), n)
    marker.close()  # the run's end: the rest at once
    assert rounds == [4, 2] and done == list(range(6))

    monkeypatch.setattr(marker_module, "BATCH_WAIT", 0.2)
    marked = threading.Event()
    marker = marker_module.Marker(None, "tag", lambda item, payload, exc: marked.set())
    marker.add(Committed("p/alone", None, None), 0)
    assert marked.wait(10)  # without close: a lone backup is not left unmarked for long
    marker.close()


@pytest.mark.zfs
def test_a_run_marks_its_bases_in_batches(pool, server_factory, run_zfsmgr, tmp_path):
    """Eight datasets: two rounds of `zfs hold`, `zfs set`, `zfs release`, not eight."""
    server = server_factory("dir", env={"PART_SIZE": "128K"})
    root = pool.create("host")
    children = [f"{root}/d{i}" for i in range(8)]
    for child in children:
        rig.sh("zfs", "create", child)
    log = tmp_path / "zfs-calls"
    wrapper = tmp_path / "zfs"
    zfs = shutil.which("zfs") or "/sbin/zfs"
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\nexec {zfs} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**server.client_env, "LOCAL_DATASET": " ".join(children), "ZFSMGR_ZFS": str(wrapper)}
    first = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert first.returncode == 0, first.stderr
    old = json.loads(first.stdout)["snapshot"]
    _write(pool, children, 1)
    log.unlink()
    done = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert done.returncode == 0, done.stderr
    assert {d["status"] for d in json.loads(done.stdout)["datasets"]} == {"incremental"}
    calls = [line.split() for line in log.read_text().splitlines()]
    verbs = [c[0] for c in calls]
    # each older base goes (zfs-fuse snapshots one dataset at a time: a set that straddled
    # two seconds is destroyed and made again, which adds destroys of new snapshots)
    retired = sorted(c[-1] for c in calls if c[0] == "destroy" and c[-1].endswith(f"@{old}"))
    assert verbs.count("send") == 8 and retired == [f"{c}@{old}" for c in children], calls
    for verb in ("hold", "set", "release"):
        assert 1 <= verbs.count(verb) <= 3, (verb, verbs)


def test_an_unexpected_error_in_one_upload_fails_that_dataset_only(pool, server_factory,
                                                                   monkeypatch, capsys,
                                                                   tmp_path):
    """An upload that failed with anything but zfsmgr's own errors (a server's answer of a
    shape nothing checked: a KeyError, a TypeError) ended the whole run, with no report and
    the datasets after it never sent; now it is that dataset's failure."""
    from zfsmgr import protocol
    from zfsmgr.remote import ServerClient

    server = server_factory("dir")
    root = pool.create("odd")
    children = [f"{root}/d{i}" for i in range(3)]
    for child in children:
        rig.sh("zfs", "create", child)
    call = ServerClient.call

    def odd_call(self, method, path, payload=None, query=None):
        answer = call(self, method, path, payload, query)
        if path == protocol.UPLOAD and payload["dataset"] == children[1]:
            del answer["upload_id"]  # a server that leaves it out
        return answer

    monkeypatch.setattr(ServerClient, "call", odd_call)
    env = {**server.client_env, "LOCAL_DATASET": " ".join(children), "PARALLEL": "1"}
    assert _backup_here(monkeypatch, tmp_path, env) == 1
    report = json.loads(capsys.readouterr().out)
    status = {d["dataset"]: (d["status"], d["message"]) for d in report["datasets"]}
    assert status[children[0]][0] == status[children[2]][0] == "full", status
    assert status[children[1]][0] == "failed" and "KeyError" in status[children[1]][1]
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r",
                  children[1]).strip() == ""  # its new snapshot went


def _quiet_and_busy(pool, server_factory, run_zfsmgr, tmp_path):
    """(env, quiet, busy, snapshots): two datasets backed up once, then new data in busy."""
    server = server_factory("dir")
    root = pool.create("host")
    quiet, busy = f"{root}/quiet", f"{root}/busy"
    for child in (quiet, busy):
        rig.sh("zfs", "create", child)
    env = {**server.client_env, "LOCAL_DATASET": f"{quiet} {busy}",
           "STATE_DIR": str(tmp_path / "state")}
    assert run_zfsmgr(["client", "backup"], env=env).returncode == 0
    _write(pool, [busy], 2)

    def snapshots():
        return {d: rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", "-d", "1",
                          d).split() for d in (quiet, busy)}
    return env, quiet, busy, snapshots


def _checkin_raises(monkeypatch, exc):
    from zfsmgr import protocol
    from zfsmgr.remote import ServerClient

    call = ServerClient.call

    def checkin_fails(self, method, path, payload=None, query=None):
        if path == protocol.CHECKIN:
            raise exc
        return call(self, method, path, payload, query)

    monkeypatch.setattr(ServerClient, "call", checkin_fails)


@pytest.mark.zfs
def test_a_checkin_the_server_never_gets_is_a_warning_and_the_run_goes_on(
        pool, server_factory, run_zfsmgr, monkeypatch, capsys, tmp_path):
    """The check-in of an unchanged dataset that could not reach the server (a timeout, a
    dropped connection) ended the run: the changed datasets were not sent, every new snapshot
    stayed behind and `--json` printed nothing."""
    from zfsmgr.errors import ServerUnreachable

    env, quiet, busy, snapshots = _quiet_and_busy(pool, server_factory, run_zfsmgr, tmp_path)
    before = snapshots()
    _checkin_raises(monkeypatch, ServerUnreachable("cannot reach the server: timed out"))
    status = _backup_here(monkeypatch, tmp_path, env)
    out, err = capsys.readouterr()
    assert status == 0, err
    report = json.loads(out)
    assert {d["dataset"]: d["status"] for d in report["datasets"]} == {
        quiet: "unchanged", busy: "incremental"}
    assert f"{quiet} unchanged, but the server did not record the check" in err
    after = snapshots()
    assert after[quiet] == before[quiet]  # its new snapshot is gone again
    assert len(after[busy]) == len(before[busy])  # the new base replaced the old one


@pytest.mark.zfs
def test_an_interrupt_before_the_first_stream_leaves_no_new_snapshot(
        pool, server_factory, run_zfsmgr, monkeypatch, capsys, tmp_path):
    """Ctrl-C or SIGTERM after the pool's snapshot and before any stream (here during the
    check-in of an unchanged dataset) left every new snapshot of the run behind."""
    env, quiet, busy, snapshots = _quiet_and_busy(pool, server_factory, run_zfsmgr, tmp_path)
    before = snapshots()
    _checkin_raises(monkeypatch, KeyboardInterrupt())
    assert _backup_here(monkeypatch, tmp_path, env) == 130
    assert "interrupted" in capsys.readouterr().err
    assert snapshots() == before


@pytest.mark.zfs
def test_a_compressor_that_fails_is_that_datasets_one_line_failure(pool, server_factory,
                                                                   run_zfsmgr, tmp_path):
    """zstd that failed (killed, out of memory, a broken package) was reported as "internal
    error: RuntimeError", a bug of zfsmgr's, with a hint to debug it."""
    server = server_factory("dir")
    dataset = pool.create("squeezed")
    rig.write_files(pool.mountpoint(dataset), seed=3, count=2, size=100_000)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "zstd"
    broken.write_text("#!/bin/sh\necho 'zstd: error 11 : Allocation error : not enough memory'"
                      " >&2\nexit 11\n")
    broken.chmod(0o755)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "zstd",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = run_zfsmgr(["client", "backup", "--json"], env=env)
    assert done.returncode == 1, done.stderr
    [outcome] = json.loads(done.stdout)["datasets"]
    assert outcome["status"] == "failed" and "internal error" not in outcome["message"]
    assert "exited with 11" in outcome["message"] and "not enough memory" in outcome["message"]
