"""Errors carry their own exit and HTTP status; stores turn only backend trouble into
StorageError; the client retries only answers worth retrying."""

from __future__ import annotations

import json
import textwrap

import pytest

from zfsmgr import errors
from zfsmgr.errors import (Conflict, Forbidden, NeedsFullBackup, NotFound, QuotaExceeded,
                           ServerError, StorageError, Unauthorized, Unsupported,
                           ValidationError, ZfsError, ZfsmgrError)


@pytest.mark.parametrize("kind, status", [
    (ValidationError, 400), (errors.UsageError, 400), (errors.SettingsError, 400),
    (Unauthorized, 401), (Forbidden, 403), (NotFound, 404), (Conflict, 409),
    (Unsupported, 409), (NeedsFullBackup, 409), (QuotaExceeded, 413), (StorageError, 503),
    (ZfsmgrError, 500), (errors.IntegrityError, 500), (errors.BrokenChain, 500)])
def test_each_error_class_carries_its_http_status(kind, status):
    assert kind.http_status == status


def test_every_error_class_is_defined_in_errors_and_has_both_statuses():
    classes = [v for v in vars(errors).values()
               if isinstance(v, type) and issubclass(v, ZfsmgrError)]
    assert len(classes) >= 20
    for cls in classes:
        assert cls.__module__ == "zfsmgr.errors"
        assert isinstance(cls.http_status, int) and isinstance(cls.exit_status, int)


def test_the_modules_that_raise_them_reexport_the_same_classes():
    from zfsmgr.remote import ServerError as remote_error
    from zfsmgr.restore.chain import BrokenChain
    from zfsmgr.storage import base
    from zfsmgr.zfs import ZfsError as zfs_error

    assert base.NotFound is NotFound and base.StorageError is StorageError
    assert remote_error is ServerError and zfs_error is ZfsError
    assert BrokenChain is errors.BrokenChain


@pytest.mark.parametrize("status, retry", [(500, False), (501, False), (400, False),
                                           (404, False), (409, False), (413, False),
                                           (502, True), (503, True), (504, True),
                                           (429, True), (408, True)])
def test_the_client_retries_only_what_may_pass(status, retry):
    assert ServerError(status, "x").transient is retry


def _fake_zfs(tmp_path, body):
    path = tmp_path / "zfs"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_a_zfs_failure_escaping_the_local_store_is_a_storage_error(tmp_path):
    from zfsmgr.protocol import Manifest
    from zfsmgr.storage.zfslocal import ZfsLocalStore
    from zfsmgr.zfs import Zfs

    zfs = Zfs(_fake_zfs(tmp_path, """
        case "$1" in
          destroy) echo "cannot destroy 'tank/b/c@s': permission denied" >&2; exit 1 ;;
          *) echo "$*" ;;
        esac
        """))
    store = ZfsLocalStore("tank/b", str(tmp_path / "state"), zfs=zfs)
    manifest = Manifest("c/tank_data_2024-01-01_00:00:00.zfs", "c", "tank/data", "s", "full",
                        None, "none", 1, 1, "", "", 0.0, storage_type="local",
                        extra={"zfs_snapshot": "tank/b/c@s"})
    with pytest.raises(StorageError) as err:
        store.delete(manifest)
    assert err.value.http_status == 503
    assert "permission denied" in str(err.value) and "zfs destroy tank/b/c@s" in str(err.value)
    assert isinstance(err.value.__cause__, ZfsError)


def test_the_s3_store_turns_transport_errors_into_storage_errors_and_nothing_else():
    from urllib3.exceptions import MaxRetryError

    from zfsmgr.storage.s3 import S3Store

    store = S3Store("127.0.0.1:9", "a", "b", "bucket", secure=False)

    def unreachable():
        raise MaxRetryError(None, "/bucket", "connection refused")

    with pytest.raises(StorageError, match="connection refused"):
        store._call("bucket check", unreachable)
    with pytest.raises(StorageError, match="S3 get x failed"):
        store._call("get x", lambda: (_ for _ in ()).throw(ConnectionResetError("reset")))
    with pytest.raises(ZeroDivisionError):  # our own bug stays a bug
        store._call("bucket check", lambda: 1 / 0)
    with pytest.raises(TypeError):
        store._call("bucket check", store.client.bucket_exists)  # wrong call: no bucket


def test_the_server_answers_each_error_with_its_own_status(tmp_path, monkeypatch):
    from test_server_api import call

    from zfsmgr import settings
    from zfsmgr.server.app import make_app
    from zfsmgr.server.clients import ClientConfig
    from zfsmgr.server.context import ServerContext

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clients.json").write_text("[]")
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b")}))
    app = make_app(ctx)
    code, body, _ = call(app, "GET", "/status")
    assert code == 401 and json.loads(body)["success"] is False
    monkeypatch.setattr(ctx.clients, "authenticate", lambda *a: ClientConfig("a", "0" * 64))

    def fail(kind):
        def status(client):
            raise kind("the store is down")
        return status
    for kind in (StorageError, QuotaExceeded, NotFound, Conflict, NeedsFullBackup):
        monkeypatch.setattr(ctx, "status", fail(kind))
        code, body, _ = call(app, "GET", "/status", headers={"X-Client-ID": "a",
                                                             "X-API-Key": "k"})
        assert code == kind.http_status, kind
        assert json.loads(body)["message"] == "the store is down"
        assert json.loads(body).get("full_backup_required") is (
            True if kind is NeedsFullBackup else None)
    monkeypatch.setattr(ctx, "status", lambda client: {}["bug"])
    code, body, _ = call(app, "GET", "/status", headers={"X-Client-ID": "a", "X-API-Key": "k"})
    assert code == 500 and json.loads(body)["message"] == "internal server error: KeyError"


def test_no_error_class_of_zfsmgr_is_defined_outside_errors_py():
    import ast
    from pathlib import Path

    ours = {name for name, v in vars(errors).items()
            if isinstance(v, type) and issubclass(v, Exception)}
    package = Path(errors.__file__).parent
    outside = []
    for path in package.rglob("*.py"):
        if path.name == "errors.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id in ours for b in node.bases):
                outside.append(f"{path.relative_to(package)}: {node.name}")
    assert outside == []
