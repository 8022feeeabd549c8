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


class FailingParts(http.server.ThreadingHTTPServer):
    """A proxy to a zfsmgr server that answers every upload part with a 503 (a store that is
    down) and passes everything else on; it records the paths it saw."""

    daemon_threads = True

    def __init__(self, upstream_port: int):
        self.upstream_port, self.seen = upstream_port, []
        super().__init__(("127.0.0.1", 0), _Relay)


class _Relay(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _any(self):
        self.server.seen.append(f"{self.command} {self.path}")
        if re.fullmatch(r"/upload-stream/[0-9a-f]{32}/[0-9]+", self.path):
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
    proxy = FailingParts(server.port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=5, count=2)
    env = {**server.client_env, "LOCAL_DATASET": dataset,
           "SERVER_URL": f"http://127.0.0.1:{proxy.server_address[1]}"}
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
