"""A full disk is a clean, recoverable state: the directory store's disk is a small zfs-fuse
dataset with a quota."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest

import hostile
import rig
from hostile import auth_of, request

pytestmark = [pytest.mark.zfs]


@pytest.fixture
def small_disk(pool):
    """A 24 MiB disk (a zfs-fuse dataset with a quota); yields its mountpoint."""
    dataset = f"{pool.name}/store"
    rig.sh("zfs", "create", "-o", "quota=24M", dataset)
    yield pool.mountpoint(dataset)


def fill(folder, name="filler") -> int:
    """Write a filler file until the disk refuses; its size."""
    size = 0
    out = open(folder / name, "wb", buffering=0)
    try:
        while True:
            out.write(os.urandom(256 << 10))
            os.fsync(out.fileno())
            size += 256 << 10
    except OSError:
        pass
    finally:
        try:
            out.close()
        except OSError:
            pass
    return size


def test_a_client_told_507_stops_at_once_and_leaves_nothing(pool, small_disk, server_factory):
    server = server_factory("dir", env={"STORAGE_DIR": str(small_disk), "PART_SIZE": "4M"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=9, count=4, size=8 << 20)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                          env=rig.clean_env(env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zfsmgr: error: server refused (507): directory store")
    assert str(small_disk) in last and "is full" in last and "needs" in last
    assert "retry" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60
    assert not list((small_disk / ".uploads").glob("*"))  # the abort gave the space back
    assert not list(small_disk.rglob("*.zfs*"))
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""
    assert request(server.url, "GET", "/health")[0] == 200


def test_a_full_store_serves_aborts_expires_and_takes_room_again(small_disk, server_factory):
    server = server_factory("dir", env={"STORAGE_DIR": str(small_disk)})
    alice = auth_of(server.client_env)
    data = os.urandom(300_000)
    staged = hostile.open_upload(server.url, alice, when=1700000000)   # will expire
    waiting = hostile.open_upload(server.url, alice, when=1700000100)  # will commit
    statuses, _ = hostile.send_parts(server.url, alice, staged, data)
    assert statuses == [200]
    statuses, declaration = hostile.send_parts(server.url, alice, waiting, data)
    assert statuses == [200]
    assert fill(small_disk) > 0

    # a commit that runs out of space: 507, no object, the upload kept for a retry
    status, answer = hostile.commit(server.url, alice, waiting, declaration)
    assert status == 507 and str(small_disk) in answer["message"], answer
    assert not list(small_disk.rglob("*.zfs")) and not list(small_disk.rglob("*.json.*tmp"))
    assert request(server.url, "GET", "/status", None, alice)[1]["snapshot_count"] == 0

    # the server restarts with the store full; the janitor expires the abandoned upload
    server.stop()
    with sqlite3.connect(server.workdir / "metadata.db") as db:  # idle for three days
        db.execute("UPDATE sessions SET touched = ? WHERE upload_id = ?",
                   (time.time() - 3 * 86400, staged["upload_id"]))
    server.start()
    status, health, _ = request(server.url, "GET", "/health")
    assert status == 200 and health["status"] == "full"
    assert health["storage"]["dir"]["full"] is True
    deadline = time.time() + 10
    while time.time() < deadline and (small_disk / ".uploads" / staged["upload_id"]).exists():
        time.sleep(0.1)
    assert not (small_disk / ".uploads" / staged["upload_id"]).exists()

    # a new part gets 507 naming the store and what it needs; its abort frees everything
    fill(small_disk, "filler2")  # the expired upload's room
    other = hostile.open_upload(server.url, alice, when=1700000200)
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{other['upload_id']}/0",
                                b"z" * 100_000, alice)
    assert status == 507 and "needs 100000 bytes" in answer["message"], answer
    assert request(server.url, "POST", f"/upload-stream/{other['upload_id']}/abort", None,
                   alice)[0] == 200
    assert not (small_disk / ".uploads" / other["upload_id"]).exists()

    # room again: the same commit succeeds, and new uploads work; nothing was disabled
    (small_disk / "filler").unlink()
    (small_disk / "filler2").unlink()
    status, answer = hostile.commit(server.url, alice, waiting, declaration)
    assert status == 200, answer
    assert request(server.url, "GET", "/health")[1]["status"] == "healthy"
    fresh = hostile.open_upload(server.url, alice, when=1700000300)
    statuses, declaration = hostile.send_parts(server.url, alice, fresh, data)
    assert statuses == [200] and hostile.commit(server.url, alice, fresh, declaration)[0] == 200
    listing = request(server.url, "GET", "/snapshots", None, alice)[1]["snapshots"]
    assert len(listing) == 2
    assert "Traceback" not in server.log()


@pytest.fixture
def small_tmp(tmp_path):
    """A 16 MiB tmpfs (what /tmp often is); yields its path."""
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(spool)], check=True)
    yield spool
    subprocess.run(["umount", "-l", str(spool)], check=True)


def test_a_full_temporary_directory_is_a_507_and_the_server_serves_on(
        small_tmp, server_factory):
    """Waitress spools request bodies past 512 KiB to TMPDIR: full, it dropped the connection
    (the client saw a reset and retried for minutes); the body is now read to its end and
    answered 507, and the next part, once there is room, is taken."""
    spool = small_tmp
    server = server_factory("dir", env={"TMPDIR": str(spool), "PART_SIZE": "4M"})
    alice = auth_of(server.client_env)
    session = hostile.open_upload(server.url, alice)
    data = os.urandom(8 << 20)
    assert session["part_size"] == 4 << 20
    statuses, _ = hostile.send_parts(server.url, alice, session, data[:4 << 20])
    assert statuses == [200]  # spooled there (Python picks TMPDIR once, if it can write there)
    assert fill(spool) > 0
    status, answer, _ = request(server.url, "POST", f"/upload-stream/{session['upload_id']}/1",
                                data[4 << 20:], alice)
    assert status == 507, answer
    assert answer["message"] == ("the server has no room for request bodies now (its temporary"
                                 " directory is full): retry later")
    assert request(server.url, "GET", "/status", None, alice)[0] == 200
    os.remove(spool / "filler")
    statuses, declaration = hostile.send_parts(server.url, alice, session, data)
    assert statuses == [200, 200]
    assert hostile.commit(server.url, alice, session, declaration)[0] == 200
    log = server.log_path.read_text()
    assert f"request bodies spooled in {spool}, at most " in log, log
    assert f"/upload-stream/{session['upload_id']}/1: 507, the request body could not be" \
           f" spooled: {spool} is full (No space left on device)" in log, log
    assert "uncaptured" not in log and "Traceback" not in log, log


def test_a_tmpdir_python_passes_over_is_said_at_startup(server_factory, tmp_path):
    missing = tmp_path / "no-such-dir"
    server = server_factory("dir", env={"TMPDIR": str(missing)})
    log = server.log_path.read_text()
    assert f"TMPDIR={missing} cannot be written to: request bodies are spooled in /tmp" \
           " instead" in log, log
