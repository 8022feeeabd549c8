"""Client administration against a running server: every change takes effect without restart."""

from __future__ import annotations

import json
import re
import time

import pytest

import rig

pytestmark = [pytest.mark.zfs]


def admin(server, *args):
    return rig.run_zfsmgr(["server", *args], env=server.env, cwd=server.workdir)


def backups(run_zfsmgr, env):
    return json.loads(run_zfsmgr(["restore", "list", "--json"], env=env, check=True).stdout)


def test_disable_rotate_key_quota_delete_forget_remove(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset,
           "BACKUP_UNCHANGED": "true"}  # the refused run below would send nothing otherwise
    for seed in range(2):
        rig.write_files(pool.mountpoint(dataset), seed=seed, count=2)
        run_zfsmgr(["client", "backup"], env=env, check=True)
    listed = json.loads(admin(server, "clients", "--json").stdout)["clients"]
    assert [(c["client_id"], c["enabled"], c["backups"], c["datasets"]) for c in listed] == \
        [("client1", True, 2, [dataset])]
    assert "client1" in admin(server, "clients").stdout

    # disabled: no upload, but the backups stay listable and verifiable
    assert admin(server, "disable", "client1").returncode == 0
    refused = run_zfsmgr(["client", "backup"], env=env)
    assert refused.returncode == 1 and "disabled" in refused.stderr
    assert len(backups(run_zfsmgr, env)) == 2
    run_zfsmgr(["restore", "verify", "--all"], env=env, check=True)
    assert admin(server, "enable", "client1").returncode == 0
    run_zfsmgr(["client", "backup"], env=env, check=True)

    # a new key; the old one works until the grace period ends
    rotated_at = time.time()
    rotated = admin(server, "rotate-key", "client1", "--grace", "12s")
    assert rotated.returncode == 0, rotated.stderr
    new_key = re.search(r"^API_KEY=(\S+)$", rotated.stdout, re.M).group(1)
    new_env = {**env, "API_KEY": new_key}
    assert new_key not in (server.workdir / "clients.json").read_text()
    assert run_zfsmgr(["client", "status"], env=env).returncode == 0
    assert run_zfsmgr(["client", "status"], env=new_env).returncode == 0
    assert time.time() < rotated_at + 12, "the machine is too slow for this grace period"
    time.sleep(max(0.0, rotated_at + 12.5 - time.time()))
    old = run_zfsmgr(["client", "status"], env=env)
    assert old.returncode == 1 and "401" in old.stderr
    assert run_zfsmgr(["client", "status"], env=new_env).returncode == 0
    env = new_env

    assert admin(server, "set-quota", "client1", "1K").returncode == 0
    over = run_zfsmgr(["client", "backup"], env=env)
    assert over.returncode == 1 and "quota" in over.stderr
    assert admin(server, "set-quota", "client1", "0").returncode == 0

    # delete: never a base another backup needs
    held = sorted(backups(run_zfsmgr, env), key=lambda m: m["snapshot_time"])
    assert [m["type"] for m in held] == ["full", "incremental", "incremental"]
    base = admin(server, "delete", held[0]["key"])
    assert base.returncode == 2 and held[1]["key"] in base.stderr
    assert admin(server, "delete", held[2]["key"]).returncode == 0
    assert [m["key"] for m in backups(run_zfsmgr, env)] == [held[1]["key"], held[0]["key"]]
    assert not (server.storage_dir / held[2]["key"]).exists()
    assert admin(server, "delete", "client1/nope_2020-01-01_00:00:00.zfs.gz").returncode == 2

    # remove-client: refused while backups exist
    refused = admin(server, "remove-client", "client1")
    assert refused.returncode == 2 and "--delete-backups" in refused.stderr
    forgot = admin(server, "forget", "client1", dataset)
    assert forgot.returncode == 0 and "2 backups" in forgot.stdout
    assert backups(run_zfsmgr, env) == []
    run_zfsmgr(["client", "backup-full"], env=env, check=True)
    removed = admin(server, "remove-client", "client1", "--delete-backups")
    assert removed.returncode == 0, removed.stderr
    assert run_zfsmgr(["client", "status"], env=env).returncode == 1
    assert json.loads((server.workdir / "clients.json").read_text()) == []
    assert not [p for p in server.storage_dir.rglob("*") if p.is_file() and ".zfs" in p.name]
    unknown = admin(server, "enable", "client1")
    assert unknown.returncode == 2 and "no client client1" in unknown.stderr
