"""The backend registry: one line adds a store to every list and choice derived from it."""

from __future__ import annotations

import json

import pytest

from zfsmgr import settings
from zfsmgr.errors import SettingsError
from zfsmgr.storage import registry
from zfsmgr.storage.base import Store


class NullStore(Store):
    """A store that keeps nothing: enough to be built and checked by the server."""

    kind = "null"
    built_with = None

    def __init__(self, root):
        self.root = root

    @classmethod
    def from_settings(cls, s, homes=dict):
        NullStore.built_with = s.storage_dir
        return cls(s.storage_dir)

    def check(self):
        pass

    def stage_part(self, upload_id, index, source, size):
        raise NotImplementedError

    def staged_parts(self, upload_id):
        return []

    def commit(self, upload_id, manifest):
        raise NotImplementedError

    def discard(self, upload_id):
        pass

    def staged_uploads(self):
        return []

    def open(self, manifest, offset=0):
        raise NotImplementedError

    def manifests(self, client_id=None):
        return iter(())

    def delete(self, manifest):
        pass


def test_the_kinds_come_from_the_table_in_preference_order():
    assert registry.KINDS == ("s3", "local", "dir")
    assert registry.kinds_text() == "s3, local or dir"
    for backend in registry.BACKENDS:
        cls = backend.load()
        assert issubclass(cls, Store) and cls.kind == backend.kind


@pytest.fixture
def with_null(monkeypatch):
    """The registry with one more line, as a new backend would add it."""
    line = registry.Backend("null", f"{__name__}:NullStore", ("STORAGE_DIR",), ())
    backends = registry.BACKENDS[:-1] + (line, registry.BACKENDS[-1])
    monkeypatch.setattr(registry, "BACKENDS", backends)
    monkeypatch.setattr(registry, "KINDS", tuple(b.kind for b in backends))
    monkeypatch.setattr(registry, "BY_KIND", {b.kind: b for b in backends})
    return line


def test_one_registry_line_reaches_settings_clients_cli_and_server(with_null, tmp_path,
                                                                   monkeypatch):
    from zfsmgr import cli
    from zfsmgr.server.clients import ClientRegistry, _parse
    from zfsmgr.server.context import ServerContext

    assert settings.load("client", environ={"STORAGE_TYPE": "null"}).storage_type == "null"
    with pytest.raises(SettingsError, match="expected s3, local, null or dir"):
        settings.load("client", environ={"STORAGE_TYPE": "tape"})
    (tmp_path / "clients.json").write_text(json.dumps([
        {"client_id": "a", "api_key": "0" * 64, "storage_type": "null"}]))
    assert ClientRegistry(str(tmp_path / "clients.json")).get("a").storage_type == "null"
    (tmp_path / "clients.json").write_text(json.dumps([
        {"client_id": "a", "api_key": "0" * 64, "storage_type": "tape"}]))
    assert ClientRegistry(str(tmp_path / "clients.json")).get("a") is None  # skipped
    with pytest.raises(ValueError, match="'tape' is not s3, local, null or dir"):
        _parse({"client_id": "a", "api_key": "0" * 64, "storage_type": "tape"})
    args = cli.build_parser().parse_args(["server", "add-client", "x", "--storage", "null"])
    assert args.storage == "null"
    monkeypatch.chdir(tmp_path)
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "s")}))
    assert ctx.configured_kinds() == ["null", "dir"]
    assert isinstance(ctx.store_named("null"), NullStore)
    assert NullStore.built_with == str(tmp_path / "s")
    assert ctx.default_kind() == "dir"  # no default_by settings: only when asked for


def test_the_default_follows_the_table_and_probes_where_it_must(tmp_path, monkeypatch):
    from zfsmgr.server.context import ServerContext

    monkeypatch.chdir(tmp_path)

    def default(**env):
        env.setdefault("STORAGE_DIR", str(tmp_path / "s"))
        return ServerContext(settings.load("server", environ=env)).default_kind()
    assert default() == "dir"
    assert default(S3_ENABLED="true", S3_ENDPOINT="127.0.0.1:9") == "s3"  # never probed
    # local is the default only when usable: this base does not exist
    missing = str(tmp_path / "no-zfs")
    assert default(ZFS_BASE_DATASET="nopool/base", ZFSMGR_ZFS=missing) == "dir"
