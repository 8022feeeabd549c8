"""A client cron can run: zfs found outside cron's PATH, one-line errors with exit 2 for a
missing program or setting, -q, --json, --env-file after the command, fast failure of https
against plain http, an S3_USE_SSL hint, a busy port named, clean help text; `restore save`
never overwrites a file unasked."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

import rig
from zfsmgr import protocol
from zfsmgr.errors import MissingProgram
from zfsmgr.remote import ServerClient
from zfsmgr.runner import PROGRAM_DIRS, find_program, run


def test_zfs_is_found_in_sbin_when_path_lacks_it(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = find_program("zfs")
    assert os.path.dirname(found) in PROGRAM_DIRS and os.access(found, os.X_OK)
    with pytest.raises(MissingProgram) as missing:
        run(["zfs-not-installed", "list"])
    assert str(missing.value) == ("zfs-not-installed not found (looked in PATH and /sbin,"
                                  " /usr/sbin, /usr/local/sbin, /usr/local/bin): is it installed?")
    assert missing.value.exit_status == 2


def test_a_missing_zfs_is_one_line_and_exit_2(run_zfsmgr, tmp_path):
    env = {"CLIENT_ID": "c1", "API_KEY": "k", "SERVER_URL": "http://127.0.0.1:9",
           "LOCAL_DATASET": "tank/data", "STATE_DIR": str(tmp_path), "ZFSMGR_ZFS": "zfs-gone"}
    done = run_zfsmgr(["client", "backup"], env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("zfsmgr: error: zfs-gone not found (looked in PATH and /sbin,"
                           " /usr/sbin, /usr/local/sbin, /usr/local/bin): is it installed?\n")


def test_a_ca_file_that_does_not_exist_is_a_settings_error(run_zfsmgr, tmp_path):
    env = {"CLIENT_ID": "c1", "API_KEY": "k", "SERVER_URL": "https://127.0.0.1:9",
           "LOCAL_DATASET": "tank/data", "CA_FILE": str(tmp_path / "nope.pem")}
    done = run_zfsmgr(["client", "status"], env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("zfsmgr: error: CA_FILE=") and "no such file" in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("setting", ["CA_FILE", "STATE_DIR"])
def test_a_ca_file_or_state_dir_that_cannot_serve_is_a_settings_error(run_zfsmgr, tmp_path,
                                                                      setting):
    """A CA_FILE holding no certificate (an internal SSLError) and a STATE_DIR that cannot be a
    directory (an internal NotADirectoryError) exited 1 with a traceback's last line."""
    (tmp_path / "note.txt").write_text("not a certificate\n")
    value = str(tmp_path / "note.txt") if setting == "CA_FILE" else str(tmp_path / "note.txt/x")
    env = {"CLIENT_ID": "c1", "API_KEY": "k", "SERVER_URL": "https://127.0.0.1:9",
           "LOCAL_DATASET": "tank/data", setting: value}
    done = run_zfsmgr(["client", "backup"], env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"zfsmgr: error: {setting}=") and "internal" not in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_https_against_a_plain_http_server_fails_fast_and_says_so(server_factory, run_zfsmgr):
    server = server_factory("dir")
    env = {**server.client_env, "SERVER_URL": server.url.replace("http:", "https:"),
           "LOCAL_DATASET": "tank/data"}
    started = time.monotonic()
    done = run_zfsmgr(["client", "status"], env=env, timeout=60)
    took = time.monotonic() - started
    assert done.returncode in (2, 4), done.stderr
    assert "plain http" in done.stderr and "http://" in done.stderr
    assert took < 15, took


def test_quiet_json_and_env_file_after_the_command(server_factory, run_zfsmgr, tmp_path):
    server = server_factory("dir")
    api = ServerClient(server.url, server.client_env["CLIENT_ID"],
                       server.client_env["API_KEY"])
    upload(api, b"some bytes" * 100, time.time() - 3600)
    env_file = tmp_path / "client.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        **server.client_env, "LOCAL_DATASET": "tank/data"}.items()))
    quiet = run_zfsmgr(["client", "status", "--env-file", str(env_file), "-q"])
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    loud = run_zfsmgr(["client", "status", f"--env-file={env_file}"])
    assert loud.returncode == 0 and "client client1 (dir storage)" in loud.stdout
    plan = run_zfsmgr(["client", "rotate-remote", "--dry-run", "--json", "--env-file",
                       str(env_file)])
    assert plan.returncode == 0, plan.stderr
    result = json.loads(plan.stdout)
    assert result["dry_run"] is True and result["deleted"] == [] and len(result["kept"]) == 1
    failing = run_zfsmgr(["client", "status", "-q", "--env-file", str(tmp_path / "missing")])
    assert failing.returncode == 2 and failing.stdout == ""
    assert failing.stderr == f"zfsmgr: error: env file {tmp_path / 'missing'} does not exist\n"


def test_help_and_usage_lines_read_cleanly(run_zfsmgr):
    client = run_zfsmgr(["client", "help"]).stdout
    assert "backup            backup" not in client and "    backup\n" not in client
    assert client.count("\n  backup ") == 1 and "rotate-remote [--dry-run] [--json]" in client
    usage = run_zfsmgr(["restore", "save"])
    assert usage.returncode == 2
    assert usage.stderr.splitlines()[0].startswith("usage: zfsmgr restore save ")
    bad = run_zfsmgr(["client", "snapshot", "yearly"])
    assert bad.stderr.splitlines()[0].startswith("usage: zfsmgr client snapshot ")
    top = run_zfsmgr(["help"]).stdout
    assert top.startswith("usage: zfsmgr [--env-file PATH] [-q] [-v]")


def test_a_busy_port_is_one_line_naming_it_and_waitress_has_a_version(server_factory,
                                                                      run_zfsmgr, tmp_path):
    server = server_factory("dir")
    assert "(waitress 3." in server.log()
    (tmp_path / "clients.json").write_text("[]")
    done = run_zfsmgr(["server"], env={"PORT": str(server.port), "HOST": "127.0.0.1",
                                       "STORAGE_DIR": str(tmp_path / "b")}, cwd=tmp_path,
                      timeout=60)
    assert done.returncode == 2
    assert f"zfsmgr: error: cannot listen on 127.0.0.1:{server.port}: Address already in use" \
        in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.s3
def test_s3_use_ssl_against_plain_http_suggests_turning_it_off(s3, run_zfsmgr, tmp_path):
    (tmp_path / "clients.json").write_text("[]")
    env = {"S3_ENABLED": "true", "S3_ENDPOINT": s3["endpoint"], "S3_USE_SSL": "true",
           "S3_ACCESS_KEY": s3["access_key"], "S3_SECRET_KEY": s3["secret_key"],
           "S3_BUCKET": s3["bucket"], "PORT": str(rig.free_port()), "HOST": "127.0.0.1",
           "STORAGE_DIR": str(tmp_path / "b")}
    done = run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert "set S3_USE_SSL=false" in done.stderr, done.stderr
    assert s3["secret_key"] not in done.stderr


def upload(api, data, when, snapshot="zfsmgr_2024-02-13_14:30:00"):
    """One stored backup (any bytes do for the directory store)."""
    stored = gzip.compress(data, mtime=0)
    session = api.call("POST", protocol.UPLOAD, {
        "dataset": "tank/data", "snapshot": snapshot, "type": "full", "compression": "gzip",
        "snapshot_time": when, "estimated_size": len(stored)})
    api.put_part(session["upload_id"], 0, [stored])
    return api.call("POST", protocol.UPLOAD_COMMIT.format(upload_id=session["upload_id"]), {
        "sha256": hashlib.sha256(stored).hexdigest(), "stored_size": len(stored),
        "raw_size": len(data), "parts_crc32": rig.parts_crc32([stored])})["manifest"]


def test_restore_save_refuses_an_existing_file_without_force(server_factory, run_zfsmgr,
                                                             tmp_path):
    server = server_factory("dir")
    api = ServerClient(server.url, server.client_env["CLIENT_ID"],
                       server.client_env["API_KEY"])
    upload(api, b"precious" * 1000, time.time() - 60)
    target = tmp_path / "backup.zfs.gz"
    target.write_bytes(b"someone's file")
    refused = run_zfsmgr(["restore", "save", "1", str(target)], env=server.client_env)
    assert refused.returncode == 2
    assert refused.stderr.endswith(f"zfsmgr: error: {target} exists: pass --force to"
                                   " overwrite it\n")
    assert target.read_bytes() == b"someone's file"
    done = run_zfsmgr(["restore", "save", "1", str(target), "--force"], env=server.client_env)
    assert done.returncode == 0, done.stderr
    assert gzip.decompress(target.read_bytes()) == b"precious" * 1000


def test_a_program_of_usr_local_bin_is_found_under_crons_path(monkeypatch):
    """FreeBSD's `pkg install age zstd` puts them in /usr/local/bin, which cron's PATH lacks:
    every ENCRYPT=age run failed there, and zstd fell back to gzip."""
    name = f"zfsmgr-probe-{os.getpid()}"
    path = f"/usr/local/bin/{name}"
    if not os.access("/usr/local/bin", os.W_OK):
        pytest.skip("/usr/local/bin is not writable here")
    with open(path, "w") as out:
        out.write("#!/bin/sh\necho found\n")
    try:
        os.chmod(path, 0o755)
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        assert find_program(name) == path
        assert run([name]).strip() == "found"
    finally:
        os.unlink(path)


def test_every_run_of_root_shares_its_state_dir_and_so_its_locks(tmp_path, monkeypatch):
    """The timer's unit set STATE_DIR=/var/lib/zfsmgr-client, a shell or cron run of root used
    ~/.local/state/zfsmgr: their locks never met, and a manual backup took the timer's
    snapshot for a leftover and aborted its upload. `~` was taken literally, and a relative
    STATE_DIR moved with the working directory."""
    from zfsmgr import settings as config
    from zfsmgr import systemd
    from zfsmgr.client.commands import ROOT_STATE_DIR, state_dir
    from zfsmgr.errors import SettingsError

    if os.geteuid() == 0:
        assert str(state_dir(config.load("client", environ={}))) == ROOT_STATE_DIR
    units = systemd.client_units("/usr/bin/python3", "/usr/local/bin/zfsmgr", "/etc/zfsmgr")
    service = units["zfsmgr-backup.service"]
    assert "StateDirectory=zfsmgr-client" in service and "STATE_DIR" not in service
    assert ROOT_STATE_DIR == "/var/lib/" + "zfsmgr-client"  # the unit's StateDirectory=
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir(config.load("client", environ={"STATE_DIR": "~/zs"})) == tmp_path / "zs"
    with pytest.raises(SettingsError, match="must be an absolute path"):
        state_dir(config.load("client", environ={"STATE_DIR": "zs"}))


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/p\u00efng-secret",
                                 "http://127.0.0.1:9/x\x01y"])
def test_a_url_http_client_would_refuse_is_a_settings_error(url):
    """A HEALTHCHECK_URL with a non-ASCII or a control character was an internal error
    (UnicodeEncodeError, InvalidURL), one of which quoted the URL's secret path."""
    from zfsmgr import settings as config
    from zfsmgr.errors import SettingsError

    with pytest.raises(SettingsError, match="printable ASCII") as refused:
        config.load("client", environ={"HEALTHCHECK_URL": url})
    assert "secret" not in str(refused.value) or "(hidden)" in str(refused.value)


def test_an_env_file_from_a_windows_editor_and_non_ascii_digits(tmp_path):
    """A .env saved with a byte-order mark lost its first key ("CLIENT_ID is not set"), and
    KEEP_HOURLY=² passed the digit check, then failed in int() with Python's message."""
    from zfsmgr import settings as config
    from zfsmgr.errors import SettingsError

    (tmp_path / ".env").write_bytes("\ufeffCLIENT_ID=c1\nKEEP_HOURLY=24\n".encode())
    loaded = config.load("client", env_file=str(tmp_path / ".env"), environ={})
    assert loaded.client_id == "c1" and loaded.keep_hourly == 24
    for odd in ("\u00b2", "\u0662\u0664", "\uff11"):
        with pytest.raises(SettingsError, match="KEEP_HOURLY") as refused:
            config.load("client", environ={"KEEP_HOURLY": odd})
        assert "invalid literal" not in str(refused.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a command as nobody")
def test_a_state_dir_or_unit_dir_it_cannot_write_is_one_line_not_an_internal_error(pyz):
    """A STATE_DIR of another user's (the lock's os.open) and `systemd-units --install` as a
    user were internal errors: PermissionError."""
    import subprocess
    import sys

    import shutil
    import tempfile

    rig.WORK.mkdir(parents=True, exist_ok=True)
    root_owned = Path(tempfile.mkdtemp(prefix="root-owned-", dir=rig.WORK))  # nobody may
    os.chmod(root_owned, 0o755)  # look in, not write
    env = {"PATH": "/usr/bin:/bin", "CLIENT_ID": "c1", "API_KEY": "k",
           "SERVER_URL": "http://127.0.0.1:9", "LOCAL_DATASET": "tank/data",
           "STATE_DIR": str(root_owned), "ZFSMGR_ZFS": "/bin/false"}
    for args in (["client", "backup"],
                 ["client", "systemd-units", "--install", "--unit-dir", str(root_owned)]):
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-I", "-S", str(pyz), *args], env=env,
                              cwd="/", capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("zfsmgr: error: cannot ") and "internal" not in \
            done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    shutil.rmtree(root_owned)
