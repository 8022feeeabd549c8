"""Append-only clients: they upload, list, download and restore, but never delete; the server
rotates for them (`zfsmgr server rotate`), never under MIN_RETAIN_DAYS."""

from __future__ import annotations

import json
import sys
import time

import pytest

import rig
from test_rotation_e2e import make_history, restore_chain, upload_stream
from zfsmgr import protocol
from zfsmgr.protocol import Manifest
from zfsmgr.remote import ServerClient, ServerError
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.rotation import plan_rotation

pytestmark = [pytest.mark.zfs]
POLICY = {"keep_hourly": 0, "keep_daily": 3, "keep_weekly": 0, "keep_monthly": 0}


def api_of(server):
    return ServerClient(server.url, server.client_env["CLIENT_ID"],
                        server.client_env["API_KEY"])


def server_rotate(run_zfsmgr, server, *args, env=None):
    return run_zfsmgr(["server", "rotate", *args], env={**server.env, **(env or {})},
                      cwd=server.workdir)


def test_append_only_client_cannot_delete_and_the_server_rotates(pool, server_factory,
                                                                 run_zfsmgr):
    server = server_factory("dir", rotation_policy=POLICY,
                            client_fields={"append_only": True})
    api = api_of(server)
    dataset, uploaded = make_history(pool, api)
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    refused = run_zfsmgr(["client", "rotate-remote"], env=env)
    assert refused.returncode == 1
    assert "(403)" in refused.stderr and "append-only" in refused.stderr
    with pytest.raises(ServerError) as err:
        api.call("POST", protocol.ROTATE, {"dry_run": False})
    assert err.value.status == 403
    dry = run_zfsmgr(["client", "rotate-remote", "--dry-run"], env=env, check=True).stdout
    assert dry.count("would delete") == 5  # four keys and the summary line
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert len(left) == 8  # nothing went
    listing = run_zfsmgr(["restore", "list"], env=env, check=True).stdout
    assert listing.count("client1/") == 8
    restore_chain(api, pool, left, uploaded[3]["key"], f"{pool.name}/r")  # download works
    restored = run_zfsmgr(["restore", "latest", f"{pool.name}/cli"], env=env)
    assert restored.returncode == 0, restored.stderr

    # the server's rotation: the floor first (everything was committed just now) ...
    floor = server_rotate(run_zfsmgr, server, "--client", "client1",
                          env={"MIN_RETAIN_DAYS": "1"})
    assert floor.returncode == 0, floor.stderr
    assert "deleted 0," in floor.stdout
    assert len(api.call("GET", protocol.SNAPSHOTS)["snapshots"]) == 8
    plan = server_rotate(run_zfsmgr, server, "--dry-run")
    assert "client1: would delete 4," in plan.stdout
    # ... then the policy: the first chain goes whole
    done = server_rotate(run_zfsmgr, server)
    assert done.returncode == 0, done.stderr
    assert "client1: deleted 4, kept 4" in done.stdout
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert [m["snapshot"] for m in left] == ["s4", "s5", "s6", "s7"]
    assert sorted(p.name for p in (server.storage_dir / "client1").glob("*.zfs.gz")) == \
        sorted(m["key"].split("/")[1] for m in left)
    unknown = server_rotate(run_zfsmgr, server, "--client", "nobody")
    assert unknown.returncode == 2 and "no client nobody" in unknown.stderr


def test_server_rotate_applies_the_quota_too(pool, server_factory, run_zfsmgr):
    keep_all = {"keep_hourly": 0, "keep_daily": 100, "keep_weekly": 0, "keep_monthly": 0}
    server = server_factory("dir", rotation_policy=keep_all, client_fields={"append_only": True})
    api = api_of(server)
    dataset, uploaded = make_history(pool, api, chains=2, length=2)
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["max_size_bytes"] = sum(m["stored_size"] for m in uploaded[2:]) + 100
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    done = server_rotate(run_zfsmgr, server, "--client", "client1")
    assert done.returncode == 0, done.stderr
    assert "client1: deleted 2," in done.stdout  # the old chain, to fit the quota
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert [m["key"] for m in left] == [m["key"] for m in uploaded[2:]]


def test_server_default_and_per_client_override(pool, server_factory, run_zfsmgr):
    server = server_factory("dir", rotation_policy=POLICY, env={"APPEND_ONLY": "true"},
                            client_fields={"append_only": False})
    api = api_of(server)
    make_history(pool, api, chains=1, length=2)
    assert api.call("POST", protocol.ROTATE, {"dry_run": False})["success"]  # override
    clients = json.loads((server.workdir / "clients.json").read_text())
    del clients[0]["append_only"]  # the server's default now applies (re-read at once)
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    with pytest.raises(ServerError) as err:
        api.call("POST", protocol.ROTATE, {"dry_run": False})
    assert err.value.status == 403
    clients[0]["append_only"] = "yes"
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    with pytest.raises(ServerError) as err:
        api.call("GET", protocol.STATUS)
    assert "append_only must be true or false" in err.value.server_message


def test_full_quota_refuses_uploads_instead_of_rotating_history(pool, server_factory):
    server = server_factory("dir", quota=10 << 20, env={"AUTO_ROTATE": "true"},
                            client_fields={"append_only": True})
    api = api_of(server)
    dataset, uploaded = make_history(pool, api, chains=2, length=2)
    used = api.call("GET", protocol.STATUS)["used_bytes"]
    clients = json.loads((server.workdir / "clients.json").read_text())
    clients[0]["max_size_bytes"] = used + 1000  # full
    (server.workdir / "clients.json").write_text(json.dumps(clients))
    junk = b"\x1f\x8b" + bytes(20_000)
    with pytest.raises(ServerError) as err:
        upload_stream(api, dataset, "junk", junk, time.time())
    assert err.value.status == 413 and "quota" in err.value.server_message
    left = api.call("GET", protocol.SNAPSHOTS)["snapshots"]
    assert [m["key"] for m in left] == [m["key"] for m in uploaded]
    assert "rotation deleted" not in server.log()


def _manifest(i: int, created: float, parent=None, size=100) -> Manifest:
    stamp = time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime(1_700_000_000 + i * 3600))
    return Manifest(key=f"c/tank_{stamp}.zfs.gz", client_id="c", dataset="tank",
                    snapshot=f"s{i}", type="incremental" if parent else "full",
                    parent=parent, compression="gzip", raw_size=size, stored_size=size,
                    sha256="0" * 64, snapshot_time=1_700_000_000 + i * 3600,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(created)))


def test_min_retain_days_survives_a_flood_of_junk_uploads():
    now = 1_800_000_000.0
    real = [_manifest(0, now - 3 * 86400), _manifest(1, now - 2 * 86400, "s0"),
            _manifest(2, now - 3600, "s1")]
    # a hostile client floods with fresh junk fulls that claim far newer snapshot times
    junk = [_manifest(10 + i, now - 60) for i in range(20)]
    policy = RetentionPolicy(keep_hourly=1, keep_daily=0, keep_weekly=0, keep_monthly=0)
    plan = plan_rotation(real + junk, policy, now, quota=1000, min_retain_days=7)
    assert plan.delete == []  # nothing is younger than the floor allows to delete
    assert not plan.enough
    assert "MIN_RETAIN_DAYS" in plan.reasons[real[0].key]
    without = plan_rotation(real + junk, policy, now, quota=1000)
    assert {m.key for m in real} <= {m.key for m in without.delete}
    # past the floor, the policy applies again, and a chain still goes whole or not at all
    later = plan_rotation(real + junk, policy, now, quota=0, min_retain_days=2.5)
    assert [m.key for m in later.delete] == []  # s0 is past the floor, but s1, s2 need it
    assert "base of" in later.reasons[real[0].key]


def test_the_server_units_rotate_daily_and_reload_the_certificate(pyz, tmp_path):
    from test_systemd import settings_of, verify

    rig.run_zfsmgr(["server", "systemd-unit", "--install", "--unit-dir", str(tmp_path),
                    "--workdir", "/var/lib/zfsmgr"], check=True)
    server = settings_of((tmp_path / "zfsmgr-server.service").read_text())
    assert "ExecReload=/bin/kill -HUP $MAINPID" in server  # TLS_CERT is read again
    rotate = settings_of((tmp_path / "zfsmgr-rotate.service").read_text())
    assert f"ExecStart={sys.executable} -I -S {pyz} server rotate" in rotate
    for wanted in ("Type=oneshot", "WorkingDirectory=/var/lib/zfsmgr", "ProtectSystem=strict",
                   "ReadWritePaths=/var/lib/zfsmgr", "NoNewPrivileges=yes"):
        assert wanted in rotate, wanted
    timer = settings_of((tmp_path / "zfsmgr-rotate.timer").read_text())
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer
    verify(tmp_path / "zfsmgr-server.service", tmp_path / "zfsmgr-rotate.service",
           tmp_path / "zfsmgr-rotate.timer")
