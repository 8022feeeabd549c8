"""The client cleans up: interrupted at any moment, even while it waits to retry, it aborts its
open upload; told the store is full (507) it stops at once with a clear error."""

from __future__ import annotations

import http.client
import http.server
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import rig

pytestmark = [pytest.mark.zfs]


class Relay(http.server.ThreadingHTTPServer):
    """A proxy to a zfsmgr server that passes requests on and records the paths it saw; with
    `fail_parts` it answers every upload part with a 503 (a store that is down), with
    `open_delay` it holds the server's answer to POST /upload back that many seconds (the
    session is open on the server meanwhile)."""

    daemon_threads = True

    def __init__(self, upstream_port: int, fail_parts: bool = True, open_delay: float = 0.0):
        self.upstream_port, self.seen = upstream_port, []
        self.fail_parts, self.open_delay = fail_parts, open_delay
        super().__init__(("127.0.0.1", 0), _Relay)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Relay(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _any(self):
        self.server.seen.append(f"{self.command} {self.path}")
        if self.server.fail_parts and re.fullmatch(r"/upload-stream/[0-9a-f]{32}/[0-9]+",
                                                   self.path):
            body = b'{"success": false, "message": "storage unavailable"}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        if self.server.open_delay and (self.command, self.path) == ("POST", "/upload"):
            self.server.seen.append("answered POST /upload")
            time.sleep(self.server.open_delay)
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "connection", "date", "server"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = _any


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_while_waiting_to_retry_aborts_the_upload(sig, pool, server_factory):
    server = server_factory("dir")
    proxy = Relay(server.port)
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=5, count=2)
    env = {**server.client_env, "LOCAL_DATASET": dataset,
           "SERVER_URL": proxy.url}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rig.wait_until(lambda: sum("/upload-stream/" in p for p in proxy.seen) >= 2, 60,
                   "two parts went through the proxy")
    time.sleep(0.3)  # the client sleeps 2 s before its second retry
    assert proc.poll() is None
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    proxy.shutdown()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "retry 2" in err
    assert any(p.endswith("/abort") for p in proxy.seen), proxy.seen
    with sqlite3.connect(server.workdir / "metadata.db") as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0, \
            "the upload session stayed open"
    assert not list((server.storage_dir / ".uploads").glob("*")) \
        if (server.storage_dir / ".uploads").exists() else True
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""


def _open_sessions(server) -> int:
    with sqlite3.connect(server.workdir / "metadata.db") as db:
        return db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]


def _backup_through(proxy, server, dataset):
    env = {**server.client_env, "LOCAL_DATASET": dataset, "SERVER_URL": proxy.url}
    return subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_while_opening_the_upload_aborts_the_session_it_opened(
        sig, pool, server_factory):
    """The signal lands while POST /upload is in flight (the server has opened the session,
    its answer is on the way): the client waits for the answer and aborts that session."""
    server = server_factory("dir")
    proxy = Relay(server.port, fail_parts=False, open_delay=2.0)
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=7, count=2)
    proc = _backup_through(proxy, server, dataset)
    rig.wait_until(lambda: "answered POST /upload" in proxy.seen, 60,
                   "the server answered POST /upload")
    assert _open_sessions(server) == 1  # open on the server, its id not yet at the client
    proc.send_signal(sig)
    started = time.monotonic()
    out, err = proc.communicate(timeout=60)
    proxy.shutdown()
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 10
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "zfsmgr: interrupted"
    assert not [p for p in proxy.seen if re.fullmatch(r"POST /upload-stream/\w+/\d+", p)]
    assert any(p.endswith("/abort") for p in proxy.seen), proxy.seen  # no part, the abort
    assert _open_sessions(server) == 0, "the upload session stayed open"
    uploads = server.storage_dir / ".uploads"
    assert not uploads.exists() or not list(uploads.glob("*"))
    assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""


def test_a_held_interrupt_waits_for_the_answer_a_bounded_time_and_a_second_breaks_in(
        pool, server_factory):
    from zfsmgr.client.interrupts import PATIENCE

    server = server_factory("dir")
    proxy = Relay(server.port, fail_parts=False, open_delay=120.0)
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=8, count=1)
    for second in (False, True):
        before = proxy.seen.count("answered POST /upload")
        proc = _backup_through(proxy, server, dataset)
        rig.wait_until(lambda: proxy.seen.count("answered POST /upload") > before, 60,
                       "POST /upload is in flight")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if second:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - started
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == "zfsmgr: interrupted"
        if second:  # asked twice: it stops at once
            assert took < 3, took
        else:  # no answer within PATIENCE: it gives up waiting (the session is left to expire)
            assert PATIENCE - 1 < took < PATIENCE + 5, took
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""
    proxy.shutdown()


def test_a_part_out_of_step_is_mended_from_the_parts_the_server_holds(pool, server_factory):
    """A part sent ahead of the stream gets a 409 naming the parts held; the client asks for
    the upload's state, sends the stream from there, and the backup completes."""
    from zfsmgr.client.backup import Backup
    from zfsmgr.remote import ServerClient
    from zfsmgr.zfs import Zfs

    server = server_factory("dir", env={"PART_SIZE": "64K"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=6, count=3, size=200_000)

    class SkipsAPart(ServerClient):
        skipped = 0

        def send_part(self, upload_id, index, chunks, segment=0):
            if index == 2 and not self.skipped:
                self.skipped += 1
                index = 3  # as a buggy client might
            return super().send_part(upload_id, index, chunks, segment)

    env = server.client_env
    api = SkipsAPart(env["SERVER_URL"], env["CLIENT_ID"], env["API_KEY"])
    result = Backup(api, Zfs(), dataset, "none", 1, sleep=lambda _: None).run("full")
    assert api.skipped == 1 and result.type == "full"
    assert "409" in server.log() and "Traceback" not in server.log()
    listing = api.call("GET", "/snapshots")["snapshots"]
    assert [m["key"] for m in listing] == [result.key]
