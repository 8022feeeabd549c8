"""The one runner for external commands (zfsmgr/runner.py) and the typed zfs commands on it
(zfsmgr/zfs.py), against small fake programs.

What the fakes stand for runs for real on zfs-fuse in the other tests; these pin the runner's
own decisions: missing programs, timeouts, "does not exist" against "failed", one retry loop.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from zfsmgr import runner, settings
from zfsmgr.errors import ZfsError, ZfsNotFound
from zfsmgr.zfs import Zfs, zfs_from_settings

PACKAGE = Path(__file__).resolve().parent.parent / "zfsmgr"


def fake(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_only_the_runner_starts_processes():
    """No module but runner.py calls subprocess (compress.py's zstd goes through
    runner.spawn)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runner.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "subprocess" and node.attr in (
                        "run", "Popen", "call", "check_call", "check_output"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("system", "popen") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_no_module_builds_zfs_command_lines_of_its_own():
    """Typed commands are methods of Zfs: nobody else hands raw zfs argv to the runner."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "zfs.py" and path.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(run|execute|spawn)\(\s*\[[\w.]*\.(zfs|zpool)\b", line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert found == []


def test_a_missing_program_is_a_clear_zfs_error(tmp_path):
    zfs = Zfs(str(tmp_path / "no-such-zfs"))
    with pytest.raises(ZfsError) as err:
        zfs.snapshots("tank/data")
    assert err.value.returncode == 127 and "not found" in str(err.value)
    with pytest.raises(ZfsError, match="not found"):
        zfs.send("tank/data@s")


def test_a_command_that_does_not_answer_is_killed_at_its_timeout(tmp_path):
    slow = fake(tmp_path, "zfs", "sleep 30\n")
    started = time.monotonic()
    with pytest.raises(ZfsError) as err:
        runner.run([slow, "list"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert "no answer within 0.5 seconds" in str(err.value) and "zfs list" in str(err.value)


def test_an_interrupt_lets_a_short_command_end_first_and_leaves_none_running(tmp_path):
    """A short command runs in a session of its own (Ctrl-C does not reach it): an interrupt
    left it running behind zfsmgr's cleanup, and what it made (a snapshot) appeared after."""
    import signal
    import threading

    made = tmp_path / "made"
    slow = fake(tmp_path, "zfs", f"sleep 1\ntouch {made}\n")
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        runner.run([slow, "snapshot", "p/a@s"])
    assert made.exists()  # it ended before the interrupt went on
    children = subprocess.run(["pgrep", "-f", str(slow)], capture_output=True, text=True)
    assert children.stdout.strip() == ""


def test_does_not_exist_is_told_apart_from_failed(tmp_path):
    zfs = Zfs(fake(tmp_path, "zfs", """
        case "$*" in
          *gone*) echo "cannot open '$5': dataset does not exist" >&2; exit 1 ;;
          *here*) echo "$5" ;;
          *) echo "internal error: daemon not running" >&2; exit 1 ;;
        esac
        """))
    assert zfs.exists("tank/here") is True
    assert zfs.exists("tank/gone") is False
    with pytest.raises(ZfsError) as err:  # a failure is not "it is not there"
        zfs.exists("tank/other")
    assert not isinstance(err.value, ZfsNotFound) and "daemon not running" in str(err.value)
    with pytest.raises(ZfsNotFound):
        zfs.get("tank/gone", "guid")


def test_programs_missing_from_path_are_found_in_sbin(tmp_path, monkeypatch):
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    fake(sbin, "zfs", "echo found-in-sbin\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(runner, "PROGRAM_DIRS", ("/nonexistent", str(sbin)))
    assert runner.find_program("zfs") == str(sbin / "zfs")
    assert runner.run(["zfs", "version"]).strip() == "found-in-sbin"
    assert runner.program_available("zfs") and not runner.program_available("zpool")
    assert runner.find_program("/abs/zfs") == "/abs/zfs"  # a path is taken as it is
    with pytest.raises(ZfsError) as err:  # the error names the program and where it looked
        runner.run(["zpool", "list"])
    assert "zpool not found" in str(err.value) and str(sbin) in str(err.value)


def test_typed_commands_have_their_own_methods(tmp_path):
    log = tmp_path / "argv"
    zfs = Zfs(fake(tmp_path, "zfs", f'echo "$*" >> {log}\n'))
    zfs.create("tank/a/b", parents=True, props={"mountpoint": "none", "canmount": "off"})
    zfs.create("tank/c")
    zfs.rename("tank/c", "tank/d")
    zfs.mount("tank/d")
    zfs.inherit("tank/d@s", "org.zfsmgr:base")
    zfs.abort_receive("tank/a/b")
    assert log.read_text().splitlines() == [
        "create -p -o mountpoint=none -o canmount=off tank/a/b", "create tank/c",
        "rename tank/c tank/d", "mount tank/d", "inherit org.zfsmgr:base tank/d@s",
        "recv -A tank/a/b"]


def test_destroy_waits_for_zfs_to_settle_in_one_loop(tmp_path):
    count = tmp_path / "count"
    count.write_text("0")
    zfs = Zfs(fake(tmp_path, "zfs", f"""
        n=$(($(cat {count}) + 1)); echo $n > {count}
        case "$*" in
          *gone*) echo "cannot open 'x': dataset does not exist" >&2; exit 1 ;;
          *clone*) echo "cannot destroy 'x': filesystem has dependent clones" >&2; exit 1 ;;
          *@held*) echo "cannot destroy 'x': snapshot has dependent clones" >&2; exit 1 ;;
        esac
        if [ $n -lt 3 ]; then echo "cannot destroy 'x': dataset is busy" >&2; exit 1; fi
        """))
    zfs.destroy("tank/busy")  # busy twice, then gone
    assert count.read_text().strip() == "3"
    zfs.destroy("tank/gone", missing_ok=True)
    with pytest.raises(ZfsNotFound):
        zfs.destroy("tank/gone")
    count.write_text("10")
    started = time.monotonic()
    with pytest.raises(ZfsError, match="dependent clones"):  # a snapshot's clones are real
        zfs.destroy("tank/x@held")
    assert count.read_text().strip() == "11" and time.monotonic() - started < 1
    started = time.monotonic()
    with pytest.raises(ZfsError, match="dependent clones"):  # a recv clone settles, or not
        zfs.destroy("tank/clone", patience=1.0)
    assert 0.5 < time.monotonic() - started < 3 and int(count.read_text()) > 12


def test_zfsmgr_zfs_is_a_setting_of_every_role_and_the_server_uses_it(tmp_path, monkeypatch):
    from zfsmgr.server.context import ServerContext

    program = fake(tmp_path, "myzfs", 'echo "$*" >> ' + str(tmp_path / "argv") + "\n")
    for role in (settings.SERVER, settings.CLIENT, settings.RESTORE):
        loaded = settings.load(role, environ={"ZFSMGR_ZFS": program})
        assert zfs_from_settings(loaded).zfs == program
    assert zfs_from_settings(settings.load("server", environ={})).zfs == "zfs"
    monkeypatch.chdir(tmp_path)
    ctx = ServerContext(settings.load("server", environ={
        "ZFSMGR_ZFS": program, "ZFS_BASE_DATASET": "tank/backups",
        "STORAGE_DIR": str(tmp_path / "b")}))
    store = ctx.store_named("local")  # check() asks the configured program
    assert store.zfs.zfs == program
    assert "list -H -o name tank/backups" in (tmp_path / "argv").read_text()
