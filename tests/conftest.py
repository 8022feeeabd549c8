"""Fixtures on real parts: zfs-fuse pools, SeaweedFS, zfsmgr servers started from the .pyz.

In CI (CI=true) a missing zfs-fuse or SeaweedFS is an error, never a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import rig  # noqa: E402

IN_CI = os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every test runs: a skip, whatever its reason, is a failure."""
    yield from rig.skip_is_failure(item, call)


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """A test that runs `cli.main` in-process sets up the root logger on the stderr pytest
    captured for it; later tests' log lines then hit that closed stream ("Logging error")."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def _unavailable(what: str, exc: Exception):
    if IN_CI:
        pytest.fail(f"{what} is required in CI: {exc}")
    pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def pyz():
    """dist/zfsmgr.pyz, built once per session (in the VM: the one the host built)."""
    if os.environ.get("ZFSMGR_IN_VM") == "1":  # read-only checkout, no network
        assert rig.PYZ.exists(), "build dist/zfsmgr.pyz on the host before the VM tier"
        return rig.PYZ
    subprocess.run([sys.executable, str(rig.ROOT / "build_zipapp.py")], check=True,
                   capture_output=True)
    return rig.PYZ


@pytest.fixture(scope="session")
def zfs_daemon():
    try:
        rig.WORK.mkdir(parents=True, exist_ok=True)
        rig.ensure_zfs_daemon()
    except Exception as exc:  # noqa: BLE001
        _unavailable("zfs-fuse", exc)


@pytest.fixture
def zpool(zfs_daemon):
    """A fresh file-backed zfs-fuse pool; yields its name."""
    pool = rig.Pool()
    yield pool.name
    pool.destroy()


@pytest.fixture
def pool(zfs_daemon):
    """Like zpool, but the rig.Pool object (mountpoints, helpers)."""
    p = rig.Pool()
    yield p
    p.destroy()


@pytest.fixture(scope="session")
def seaweed():
    rig.WORK.mkdir(parents=True, exist_ok=True)
    try:
        server = rig.Seaweed()
    except Exception as exc:  # noqa: BLE001
        _unavailable("SeaweedFS", exc)
    yield server
    server.stop()


@pytest.fixture
def s3(seaweed):
    """SeaweedFS with a fresh bucket name (the server creates it)."""
    return {"endpoint": seaweed.endpoint, "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key, "bucket": f"zfsmgr-{uuid.uuid4().hex[:12]}",
            "seaweed": seaweed}


@pytest.fixture
def run_zfsmgr(pyz):
    return rig.run_zfsmgr


@pytest.fixture
def server_factory(pyz, tmp_path, request):
    """Start zfsmgr servers: server_factory(storage="dir"|"s3"|"local", quota=0, ...)."""
    servers = []

    def make(storage="dir", quota=0, client_id="client1", enabled=True, extra_clients=(),
             env=None, rotation_policy=None, client_fields=None, base_dataset="",
             tls=None):
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        key = secrets.token_hex(16)
        entry = {"client_id": client_id, "api_key": hashlib.sha256(key.encode()).hexdigest(),
                 "max_size_bytes": quota, "dataset": "", "enabled": enabled,
                 "storage_type": storage}
        if rotation_policy:
            entry["rotation_policy"] = rotation_policy
        entry.update(client_fields or {})
        (workdir / "clients.json").write_text(json.dumps([entry, *extra_clients]))
        server_env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1",
                      "STORAGE_DIR": str(workdir / "backups"), "PART_SIZE": "1M"}
        if storage == "s3":
            s3 = request.getfixturevalue("s3")
            server_env.update({"S3_ENABLED": "true", "S3_ENDPOINT": s3["endpoint"],
                               "S3_ACCESS_KEY": s3["access_key"],
                               "S3_SECRET_KEY": s3["secret_key"], "S3_BUCKET": s3["bucket"],
                               "S3_USE_SSL": "false"})
        if storage == "local":
            server_env["ZFS_BASE_DATASET"] = base_dataset
        server_env.update(env or {})
        if tls is not None:  # a rig.TestCA: the server speaks HTTPS with a certificate of it
            cert, key_file = tls.issue()
            server_env.update({"TLS_CERT": str(cert), "TLS_KEY": str(key_file)})
        server = rig.ServerProcess(workdir, server_env,
                                   ca_file=str(tls.cert) if tls else "").start()
        server.storage_dir = workdir / "backups"
        server.client_env = {"CLIENT_ID": client_id, "API_KEY": key, "SERVER_URL": server.url,
                             "STATE_DIR": str(workdir / f"state-{client_id}")}
        if tls is not None:
            server.client_env["CA_FILE"] = str(tls.cert)
        server.s3 = request.getfixturevalue("s3") if storage == "s3" else None
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
        shutil.rmtree(server.workdir / "backups", ignore_errors=True)
