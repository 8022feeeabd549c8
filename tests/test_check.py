"""`zfsmgr server check`: the Nagios convention on a real catalog, thresholds in seconds."""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request

import pytest

import rig
from zfsmgr.remote import ServerClient
from zfsmgr.server.check import CRITICAL, OK, UNKNOWN, WARNING, evaluate
from zfsmgr.server.fleet import DatasetRow, age_text

pytestmark = [pytest.mark.zfs]


def check(server, *args):
    return rig.run_zfsmgr(["server", "check", *args], env=server.env, cwd=server.workdir)


def test_ok_then_warning_then_critical_as_thresholds_pass(pool, server_factory, run_zfsmgr):
    idle = {"client_id": "idle", "api_key": hashlib.sha256(b"k").hexdigest(),
            "enabled": False}
    server = server_factory("dir", extra_clients=[idle])
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    never = check(server)
    assert never.returncode == CRITICAL
    assert never.stdout.startswith("CRITICAL: 1/1 datasets stale: client1:(no backup) never")
    assert "idle" not in never.stdout  # disabled: not reported

    run_zfsmgr(["client", "backup"], env=env, check=True)
    fine = check(server, "--warn", "1h", "--crit", "2h")
    assert fine.returncode == OK, fine.stdout
    assert fine.stdout.startswith("OK: 1 datasets backed up")
    perf = re.search(rf"\| 'client1:{dataset}'=(\d+)s;3600;7200;0$", fine.stdout.strip())
    assert perf and int(perf.group(1)) < 600
    assert len(fine.stdout.strip().splitlines()) == 1

    time.sleep(2.2)
    late = check(server, "--warn", "1s", "--crit", "1h")
    assert late.returncode == WARNING
    assert late.stdout.startswith(f"WARNING: 1/1 datasets stale: client1:{dataset} ")
    gone = check(server, "--warn", "1s", "--crit", "2s")
    assert gone.returncode == CRITICAL
    assert gone.stdout.startswith(f"CRITICAL: 1/1 datasets stale: client1:{dataset} ")
    assert check(server, "--client", "client1", "--dataset", dataset, "--warn", "1s",
                 "--crit", "2s").returncode == CRITICAL

    # the client's own thresholds in clients.json win for that client
    entries = json.loads((server.workdir / "clients.json").read_text())
    entries[0].update(check_warn="1h", check_crit=7200)
    (server.workdir / "clients.json").write_text(json.dumps(entries))
    own = check(server, "--warn", "1s", "--crit", "2s")
    assert own.returncode == OK and ";3600;7200;0" in own.stdout
    # a refused entry is not monitored at all: the check says so
    (server.workdir / "clients.json").write_text(json.dumps(
        entries + [{"client_id": "broken", "api_key": "short"}]))
    refused = check(server, "--warn", "1s", "--crit", "2s")
    assert refused.returncode == WARNING, refused.stdout
    assert refused.stdout.startswith("WARNING: 1 datasets backed up")
    assert "entry 3 is refused" in refused.stdout and "api_key" in refused.stdout
    listed = json.loads(rig.run_zfsmgr(["server", "clients", "--json"], env=server.env,
                                       cwd=server.workdir).stdout)
    assert [c["client_id"] for c in listed["clients"]] == ["client1", "idle"]
    assert "entry 3 is refused" in listed["problems"][0]
    (server.workdir / "clients.json").write_text(json.dumps(entries))

    assert check(server, "--client", "nobody").returncode == UNKNOWN
    assert check(server, "--client", "idle").returncode == UNKNOWN
    server.stop()
    for name in ("metadata.db-wal", "metadata.db-shm"):
        (server.workdir / name).unlink(missing_ok=True)
    (server.workdir / "metadata.db").write_bytes(b"not a database" * 100)
    broken = check(server)
    assert broken.returncode == UNKNOWN and broken.stdout.startswith("UNKNOWN: ")


def _row(dataset, newest, warn=100.0, crit=200.0, enabled=True):
    return DatasetRow("c", dataset, enabled, 1 if newest else 0, 1, 0, 0, 0, newest, newest,
                      newest, None, "", None, None, warn, crit)


def test_evaluate_lists_critical_first_and_caps_the_line():
    now = 10_000.0
    rows = [_row(f"p/d{i}", now - 150) for i in range(12)] + [_row("p/old", now - 500)]
    status, line = evaluate(rows, now)
    assert status == CRITICAL
    assert line.startswith("CRITICAL: 13/13 datasets stale: c:p/old 8m, c:p/d0 2m")
    assert "and 3 more |" in line
    assert evaluate([_row("p/x", now - 150, enabled=False)], now)[0] == UNKNOWN
    assert [age_text(s) for s in (59, 150, 3600 * 5.14, 86400 * 2.3)] == \
        ["59s", "2m", "5.1h", "2.3d"]


def test_unusable_settings_are_unknown_not_a_usage_error(pyz, tmp_path):
    done = rig.run_zfsmgr(["server", "check"], env={"PORT": "abc"}, cwd=tmp_path)
    assert done.returncode == UNKNOWN
    assert done.stdout.startswith("UNKNOWN: cannot check: PORT='abc'")


def test_an_unchanged_dataset_that_checks_in_is_not_stale(pool, server_factory, run_zfsmgr):
    """BACKUP_UNCHANGED=false: a run that finds nothing written sends no backup; it tells the
    server so (POST /checkin), and the dataset's age counts from that check: `server check`
    stays OK while the client runs, and goes CRITICAL once it stops."""
    server = server_factory("dir", env={"METRICS_NO_AUTH": "true"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=1)
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    run_zfsmgr(["client", "backup"], env=env, check=True)
    limits = ("--warn", "3s", "--crit", "6s")
    for _ in range(2):  # each run past the warning age of the newest backup
        time.sleep(3.3)
        again = run_zfsmgr(["client", "backup"], env=env, check=True)
        assert ": unchanged: " in again.stdout and "warning" not in again.stderr, again
        fine = check(server, *limits)
        assert fine.returncode == OK, fine.stdout  # before: WARNING, then CRITICAL
    api = ServerClient(server.url, "client1", env["API_KEY"])
    assert len(api.call("GET", "/snapshots")["snapshots"]) == 1
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    checked = re.search(r'^zfsmgr_backup_last_checked_timestamp_seconds\{[^}]*\} (\S+)$', text,
                        re.M)
    assert checked and time.time() - 10 < float(checked.group(1)) <= time.time(), text
    time.sleep(6.3)  # the client stops checking in
    gone = check(server, *limits)
    assert gone.returncode == CRITICAL
    assert gone.stdout.startswith(f"CRITICAL: 1/1 datasets stale: client1:{dataset} ")
