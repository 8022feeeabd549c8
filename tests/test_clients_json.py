"""clients.json as the seed writes it: `dataset` is the server-side home, `allowed_datasets`
restricts sources, a bad entry refuses that client alone, a broken file keeps the last good one,
and a ZFS_BASE_DATASET that does not exist is a warning until a client needs it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path

import pytest

import rig
from test_server_api import call, upload
from zfsmgr import settings
from zfsmgr.server.app import make_app
from zfsmgr.server.clients import ClientConfig, ClientRegistry, Forbidden, Unauthorized
from zfsmgr.server.context import ServerContext

KEY = "secret123"  # the seed's example key
HASH = hashlib.sha256(KEY.encode()).hexdigest()


def entry(client_id, **fields):
    return {"client_id": client_id, "api_key": HASH, "max_size_bytes": 0, "enabled": True,
            "storage_type": "dir", **fields}


def write(path, entries):
    path.write_text(json.dumps(entries) if not isinstance(entries, str) else entries)
    stat = path.stat()  # a rewrite within the same mtime tick must still be seen
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


@pytest.mark.parametrize("bad, why", [
    ({"api_key": "hashed_key"}, "api_key must be the 64-hex SHA-256"),
    ({"enabled": "false"}, 'enabled must be true or false, not "false"'),
    ({"enabled": 0}, "enabled must be true or false, not 0"),
    ({"storage_type": "ftp"}, "storage_type 'ftp' is not s3, local or dir"),
    ({"max_size_bytes": "100G"}, "max_size_bytes must be a whole number"),
    ({"allowed_datasets": "tank/data"}, "allowed_datasets must be a list"),
])
def test_one_bad_entry_refuses_that_client_alone(tmp_path, caplog, bad, why):
    path = tmp_path / "clients.json"
    write(path, [entry("good1"), entry("bad", **bad), entry("good2")])
    registry = ClientRegistry(str(path))
    caplog.set_level(logging.WARNING)
    assert {c.client_id for c in registry.all()} == {"good1", "good2"}
    assert registry.authenticate("good2", KEY).client_id == "good2"
    with pytest.raises(Forbidden, match="entry for bad is invalid: ") as refused:
        registry.authenticate("bad", KEY)
    if "api_key" not in bad:  # the key's holder learns why; anyone else only that it is
        assert why in str(refused.value)
    # a wrong key learns nothing of the entry, not even that there is one (unless it holds
    # no key hash: then only that it is invalid)
    with pytest.raises(Forbidden if "api_key" in bad else Unauthorized,
                       match="invalid: the server log says why" if "api_key" in bad else
                       "unknown client or wrong API key"):
        registry.authenticate("bad", "another key")
    [warning] = registry.warnings()
    assert "entry 2 is refused: client bad: " + why in warning
    assert why in caplog.text


def test_enabled_false_and_true_are_the_only_switches(tmp_path):
    path = tmp_path / "clients.json"
    write(path, [entry("off", enabled=False), entry("on", enabled=True), entry("default")])
    registry = ClientRegistry(str(path))
    with pytest.raises(Forbidden, match="disabled"):
        registry.authenticate("off", KEY)
    assert registry.authenticate("on", KEY).enabled and registry.authenticate("default", KEY)
    assert registry.warnings() == []


def test_a_syntax_error_keeps_the_last_good_configuration(tmp_path, caplog):
    path = tmp_path / "clients.json"
    write(path, [entry("client1")])
    registry = ClientRegistry(str(path))
    assert registry.authenticate("client1", KEY)
    caplog.set_level(logging.ERROR)
    write(path, '[{"client_id": "client1", "api_key": ')  # an editor saved half a file
    assert registry.authenticate("client1", KEY).client_id == "client1"
    [warning] = registry.warnings()
    assert "is not usable" in warning and "last good configuration (1 clients)" in warning
    assert "last good configuration" in caplog.text
    write(path, [entry("client2")])  # fixed: the new file counts, the warning goes
    with pytest.raises(Unauthorized):
        registry.authenticate("client1", KEY)
    assert registry.authenticate("client2", KEY) and registry.warnings() == []


def test_allowed_datasets_cover_children_only():
    client = ClientConfig("c", HASH, allowed_datasets=("tank/data", "pool2"))
    assert client.may_back_up("tank/data") and client.may_back_up("tank/data/sub")
    assert client.may_back_up("pool2/x/y")
    assert not client.may_back_up("tank/database") and not client.may_back_up("tank")
    assert ClientConfig("c", HASH).may_back_up("anything/at/all")


@pytest.fixture
def seed_server(tmp_path, monkeypatch):
    """In-process server whose clients.json is the seed's entry (dataset backup/client1)."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "clients.json", [
        entry("client1", dataset="backup/client1", max_size_bytes=107374182400),
        entry("client2", dataset="backup/client2", allowed_datasets=["tank/data"])])
    ctx = ServerContext(settings.load("server", environ={
        "STORAGE_DIR": str(tmp_path / "b"), "PART_SIZE": "1K",
        "ZFS_BASE_DATASET": "nosuchpool/backup"}))
    return ctx, make_app(ctx)


def test_dataset_is_the_home_not_a_restriction(seed_server, monkeypatch):
    ctx, app = seed_server
    import test_server_api

    monkeypatch.setitem(test_server_api.KEYS, "client1", KEY)
    monkeypatch.setitem(test_server_api.KEYS, "client2", KEY)
    code, body, _ = upload(app, "client1", b"x" * 3000, dataset="tank/data")
    assert code == 200, body  # the seed's example backs up tank/data next to backup/client1
    code, body, _ = upload(app, "client2", b"y" * 100, dataset="tank/data/child")
    assert code == 200, body
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/other", "snapshot": "s", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}).encode(), {"X-Client-ID": "client2", "X-API-Key": KEY})
    assert code == 403 and b"may only back up tank/data (allowed_datasets)" in body


def test_a_missing_base_dataset_is_a_warning_until_a_client_needs_local(seed_server):
    ctx, app = seed_server
    code, body, _ = call(app, "GET", "/health")
    report = json.loads(body)
    assert code == 200 and report["status"] == "warning", report
    assert report["storage"]["local"] == {
        "ok": False, "needed": False,
        "error": "ZFS_BASE_DATASET nosuchpool/backup does not exist"}
    assert any("local storage is unusable" in w for w in report["warnings"])
    clients = json.loads((ctx.clients.path).read_text())
    clients[0]["storage_type"] = "local"
    write(ctx.clients.path, clients)
    code, body, _ = call(app, "GET", "/health")
    assert code == 503 and json.loads(body)["storage"]["local"]["needed"] is True
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}).encode(), {"X-Client-ID": "client1", "X-API-Key": KEY})
    assert code == 503
    assert json.loads(body)["message"] == "ZFS_BASE_DATASET nosuchpool/backup does not exist"
    code, body, _ = call(app, "GET", "/status", headers={"X-Client-ID": "client2",
                                                         "X-API-Key": KEY})
    assert code == 200  # the dir client is untouched


def test_reindex_and_health_of_a_real_server_with_a_missing_base(tmp_path, run_zfsmgr):
    write(tmp_path / "clients.json", [entry("client1", dataset="backup/client1"),
                                      entry("broken", api_key="hashed_key")])
    env = {"STORAGE_DIR": str(tmp_path / "b"), "ZFS_BASE_DATASET": "nosuchpool/backup",
           "PORT": str(rig.free_port()), "HOST": "127.0.0.1"}
    done = run_zfsmgr(["server", "reindex"], env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "local: skipped, unusable and no client uses it" in done.stderr
    server = rig.ServerProcess(tmp_path, env).start()
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=5) as answer:
            report = json.loads(answer.read())
        assert report["success"] is True and report["status"] == "warning"
        # /health is open to all: what is wrong, and with which client, only in the log
        assert "clients.json: 1 problem; `zfsmgr server clients` and the server log say" \
            " which" in report["warnings"]
        assert "broken" not in json.dumps(report)
        assert "entry 2 is refused" in server.log()
        write(tmp_path / "clients.json", "[{")
        with urllib.request.urlopen(server.url + "/health", timeout=5) as answer:
            report = json.loads(answer.read())
        assert "clients.json: 1 problem; `zfsmgr server clients` and the server log say" \
            " which" in report["warnings"]
        assert "last good configuration" in server.log()
        request = urllib.request.Request(server.url + "/status", headers={
            "X-Client-ID": "client1", "X-API-Key": KEY})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert json.loads(answer.read())["client_id"] == "client1"
    finally:
        server.stop()


@pytest.mark.zfs
@pytest.mark.parametrize("where", ["under the base", "elsewhere"])
def test_local_store_receives_under_the_clients_dataset_and_counts_pool_space(
        where, pool, server_factory, run_zfsmgr):
    base = f"{pool.name}/backup"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    home = f"{base}/client1" if where == "under the base" else f"{pool.name}/other/client1"
    server = server_factory("local", base_dataset=base, client_fields={"dataset": home})
    source = pool.create("data")
    (pool.mountpoint(source) / "zeros").write_bytes(bytes(8 << 20))  # gzip: ~8 KiB
    os.sync()
    env = {**server.client_env, "LOCAL_DATASET": source}
    run_zfsmgr(["client", "backup"], env=env, check=True)
    names = rig.sh("zfs", "list", "-H", "-o", "name", "-r", "-t", "all", home).split()
    token = source.replace("/", "_")
    [chain] = [n for n in names if n.startswith(f"{home}/{token}/zfsmgr_") and "@" not in n]
    assert f"{chain}@{chain.rsplit('/', 1)[1]}" in names
    status = json.loads(run_zfsmgr(["client", "status", "--json"], env=env,
                                   check=True).stdout)
    used = int(rig.sh("zfs", "get", "-Hp", "-o", "value", "used", chain))
    assert status["used_bytes"] == used > 8 << 20  # the pool's space, not the gzip's
    listing = json.loads(run_zfsmgr(["restore", "list", "--json"], env=env,
                                    check=True).stdout)
    assert listing[0]["stored_size"] < 1 << 20
    server.stop()  # reindex builds the catalog anew: the home outside BASE is found too
    done = run_zfsmgr(["server", "reindex"], env=server.env, cwd=server.workdir)
    assert done.returncode == 0 and "local: 1 backups" in done.stdout, done.stderr
    server.start()
    target = f"{pool.name}/restored"
    run_zfsmgr(["restore", "restore", "1", target], env=env, check=True)
    assert int(rig.sh("zfs", "get", "-Hp", "-o", "value", "referenced", target)) > 8 << 20


def test_add_client_dataset_is_the_home_and_allowed_datasets_restrict(run_zfsmgr, tmp_path):
    done = run_zfsmgr(["server", "add-client", "web1", "--dataset", "backup/web1",
                       "--allowed-dataset", "tank/data", "--allowed-dataset", "tank/home"],
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [added] = json.loads((tmp_path / "clients.json").read_text())
    assert added["dataset"] == "backup/web1"
    assert added["allowed_datasets"] == ["tank/data", "tank/home"]
    registry = ClientRegistry(str(tmp_path / "clients.json"))
    [client] = registry.all()
    assert client.dataset == "backup/web1" and client.may_back_up("tank/home/alice")
    assert not client.may_back_up("backup/web1") and registry.warnings() == []
    bad = run_zfsmgr(["server", "add-client", "web2", "--allowed-dataset", "../x"],
                     cwd=tmp_path)
    assert bad.returncode == 2 and "invalid dataset" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: sudo in a server's folder")
def test_admin_commands_run_as_root_leave_the_servers_files_to_the_server(run_zfsmgr):
    """`sudo zfsmgr server set-quota …` in the working directory of a server that runs as its
    own user (`systemd-unit --user zfsmgr`) replaced clients.json with a file of root's, mode
    0600: the running server could no longer read it, and after a restart had no clients."""
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile

    nobody = pwd.getpwnam("nobody")
    rig.WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="owned-", dir=rig.WORK))
    try:
        os.chmod(rig.WORK, 0o755)
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        for command in (["add-client", "web1", "--quota", "10G"], ["set-quota", "web1", "20G"],
                        ["disable", "web1"], ["enable", "web1"], ["rotate-key", "web1"]):
            done = run_zfsmgr(["server", *command], cwd=folder)
            assert done.returncode == 0, (command, done.stderr)
            info = (folder / "clients.json").stat()
            assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == \
                (nobody.pw_uid, nobody.pw_gid, 0o600), command
            assert not (folder / "metadata.db").exists(), command  # no catalog needed
        run_zfsmgr(["server", "clients"], cwd=folder, check=True)  # this one opens it
        run_zfsmgr(["server", "rotate", "--dry-run"], cwd=folder, check=True)  # STORAGE_DIR
        for made in folder.iterdir():
            assert made.stat().st_uid == nobody.pw_uid, made
        assert (folder / "backups").is_dir()
        # while root holds the catalog open (or is killed holding it), its -wal and -shm are
        # the server's too: SQLite gives them the database file's owner
        from zfsmgr.server.database import Database

        (folder / "metadata.db").unlink()
        held = Database(str(folder / "metadata.db"))
        try:
            for suffix in ("", "-wal", "-shm"):
                made = folder / f"metadata.db{suffix}"
                assert made.stat().st_uid == nobody.pw_uid, made
        finally:
            held.close()
        # the server's user reads what root wrote
        as_nobody = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", sys.executable, "-I", "-S", str(rig.PYZ), "server", "clients",
             "--json"], cwd=folder, capture_output=True, text=True, env=rig.clean_env({}),
            timeout=60)
        assert as_nobody.returncode == 0, as_nobody.stderr
        [listed] = json.loads(as_nobody.stdout)["clients"]
        assert listed["client_id"] == "web1" and listed["quota_bytes"] == 20 << 30
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_admin_input_is_one_line_and_changes_nothing(run_zfsmgr, tmp_path):
    """400 digits made OverflowError tracebacks (argparse's `type=` let it through), and
    rotate-key wrote clients.json before failing, so the new key it never printed was in
    force; a clients.json of `{}` or `[null]` was an internal error for add-client."""
    added = run_zfsmgr(["server", "add-client", "web1"], cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    before = (tmp_path / "clients.json").read_bytes()
    for command in (["set-quota", "web1", "9" * 400], ["add-client", "web2", "--quota", "9" * 400],
                    ["rotate-key", "web1", "--grace", "9" * 400]):
        done = run_zfsmgr(["server", *command], cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr)
        last = done.stderr.strip().splitlines()[-1]  # after argparse's usage lines
        assert "Traceback" not in done.stderr and last.startswith("zfsmgr: error: ")
        assert "at most" in last, done.stderr
        assert (tmp_path / "clients.json").read_bytes() == before, command
    for text in ("{}", "[null]", "[{]"):
        (tmp_path / "clients.json").write_text(text)
        done = run_zfsmgr(["server", "add-client", "web3"], cwd=tmp_path)
        assert done.returncode != 0 and "internal error" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert (tmp_path / "clients.json").read_text() == text


def test_rotate_key_keeps_its_promise_and_mends_the_seeds_placeholder(run_zfsmgr, tmp_path):
    """A second rotation within the grace ended the first old key at once, though the first
    rotation had said it works until then; on the seed's `"api_key": "hashed_key"` entry it
    kept the placeholder as previous_api_key, which made the entry refused."""
    write(tmp_path / "clients.json", [{**entry("client1"), "api_key": "hashed_key"}])
    mended = run_zfsmgr(["server", "rotate-key", "client1"], cwd=tmp_path)
    assert mended.returncode == 0 and "nothing kept" in mended.stdout, mended.stderr
    assert ClientRegistry(str(tmp_path / "clients.json")).warnings() == []
    assert "previous_api_key" not in json.loads((tmp_path / "clients.json").read_text())[0]
    first = run_zfsmgr(["server", "rotate-key", "client1"], cwd=tmp_path)
    assert first.returncode == 0 and "the old one works until" in first.stdout
    kept = (tmp_path / "clients.json").read_bytes()
    again = run_zfsmgr(["server", "rotate-key", "client1"], cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr, again.stderr
    assert (tmp_path / "clients.json").read_bytes() == kept
    forced = run_zfsmgr(["server", "rotate-key", "client1", "--force"], cwd=tmp_path)
    assert forced.returncode == 0 and "the old one works until" in forced.stdout
