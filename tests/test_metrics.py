"""GET /metrics after real backups on zfs-fuse, and the verify report it exports."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest

import rig

pytestmark = [pytest.mark.zfs]

SAMPLE = re.compile(r'^([a-z_]+)(\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+]+)$')


def scrape(url, token=None):
    """The samples of /metrics as {(name, frozenset(labels)): value}; checks every line."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers),
                                timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in typed, f"TYPE twice for {name}"
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not exposition format: {line!r}"
        assert match.group(1) in typed, f"sample before its TYPE: {line!r}"
        labels = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def status_of(url, token=None):
    try:
        scrape(url, token)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_after_backups_and_a_verify(pool, server_factory, run_zfsmgr):
    server = server_factory("dir", quota=1 << 30, env={"METRICS_TOKEN": "scrape-secret"})
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    assert status_of(server.url) == 401
    assert status_of(server.url, "wrong") == 401
    before = time.time()
    for seed in range(2):
        rig.write_files(pool.mountpoint(dataset), seed=seed, count=2)
        run_zfsmgr(["client", "backup"], env=env, check=True)
        time.sleep(1.1)
    listing = json.loads(run_zfsmgr(["restore", "list", "--json"], env=env, check=True).stdout)
    manifests = sorted((e["manifest"] if "manifest" in e else e for e in listing),
                       key=lambda m: m["snapshot_time"])
    m = scrape(server.url, "scrape-secret")
    labels = {"client": "client1", "dataset": dataset}
    success = value(m, "zfsmgr_backup_last_success_timestamp_seconds", **labels)
    assert before - 1 <= success <= time.time() + 1
    assert value(m, "zfsmgr_backup_newest_snapshot_timestamp_seconds", **labels) == \
        manifests[-1]["snapshot_time"]
    assert value(m, "zfsmgr_backup_oldest_snapshot_timestamp_seconds", **labels) == \
        manifests[0]["snapshot_time"]
    assert value(m, "zfsmgr_backup_chain_length", **labels) == 2
    assert value(m, "zfsmgr_backup_count", **labels) == 2
    stored = sum(x["stored_size"] for x in manifests)
    assert value(m, "zfsmgr_stored_bytes", **labels) == stored
    assert value(m, "zfsmgr_client_quota_bytes", client="client1") == 1 << 30
    assert value(m, "zfsmgr_uploads_total", client="client1", result="committed") == 2
    assert value(m, "zfsmgr_uploads_total", client="client1", result="failed") == 0
    assert value(m, "zfsmgr_upload_bytes_total", client="client1") == stored
    assert value(m, "zfsmgr_rotation_deleted_total", client="client1") == 0
    assert value(m, "zfsmgr_backup_last_failure_timestamp_seconds", **labels) is None
    assert value(m, "zfsmgr_verify_last_success_timestamp_seconds", **labels) is None
    assert any(k[0] == "zfsmgr_build_info" for k in m)

    run_zfsmgr(["restore", "verify", "--all"], env=env, check=True)
    m = scrape(server.url, "scrape-secret")
    verified = value(m, "zfsmgr_verify_last_success_timestamp_seconds", **labels)
    assert verified is not None and verified >= success

    newest = server.storage_dir / manifests[-1]["key"]  # a damaged backup fails verify
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert run_zfsmgr(["restore", "verify", "--all"], env=env).returncode == 5
    m = scrape(server.url, "scrape-secret")
    assert value(m, "zfsmgr_verify_last_failure_timestamp_seconds", **labels) >= verified
    assert value(m, "zfsmgr_verify_last_success_timestamp_seconds", **labels) == verified
    assert "scrape-secret" not in server.log()


def test_metrics_off_without_a_token_open_with_no_auth(server_factory, pyz):
    closed = server_factory("dir")
    assert status_of(closed.url) == 403
    opened = server_factory("dir", env={"METRICS_NO_AUTH": "true"})
    m = scrape(opened.url)
    assert value(m, "zfsmgr_client_enabled", client="client1") == 1
    assert value(m, "zfsmgr_uploads_total", client="client1", result="committed") == 0
