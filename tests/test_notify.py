"""Push notifications against a local HTTP receiver: the client's HEALTHCHECK_URL pings and the
server's NOTIFY_URL webhook (stale, recovered, upload verification failed)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import rig

pytestmark = [pytest.mark.zfs]


class Receiver:
    """An HTTP server on loopback recording every request: (method, path, body)."""

    def __init__(self):
        self.requests = []
        received = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                received.append(("POST", self.path, self.rfile.read(length).decode()))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [r for r in list(self.requests) if predicate(r)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"nothing arrived; got {self.requests}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_healthcheck_start_success_then_start_fail(pool, server_factory, run_zfsmgr,
                                                   receiver):
    server = server_factory("dir")
    dataset = pool.create("data")
    check = receiver.url + "/ping/3f9a-secret-uuid"
    env = {**server.client_env, "LOCAL_DATASET": dataset, "HEALTHCHECK_URL": check,
           "BACKUP_UNCHANGED": "true"}  # each run sends, though nothing is written between
    done = run_zfsmgr(["client", "backup"], env=env, check=True)
    assert [(m, p) for m, p, _ in receiver.requests] == [
        ("POST", "/ping/3f9a-secret-uuid/start"), ("POST", "/ping/3f9a-secret-uuid")]
    assert "backup " in receiver.requests[1][2] and "full" in receiver.requests[1][2]
    assert "secret-uuid" not in done.stderr + done.stdout

    receiver.requests.clear()
    entries = json.loads((server.workdir / "clients.json").read_text())
    entries[0]["enabled"] = False
    (server.workdir / "clients.json").write_text(json.dumps(entries))
    failed = run_zfsmgr(["client", "backup"], env=env)
    assert failed.returncode == 1
    assert [(m, p) for m, p, _ in receiver.requests] == [
        ("POST", "/ping/3f9a-secret-uuid/start"), ("POST", "/ping/3f9a-secret-uuid/fail")]
    assert "disabled" in receiver.requests[1][2] and "failed" in receiver.requests[1][2]

    receiver.close()  # an unreachable switch costs a warning, not the backup
    entries[0]["enabled"] = True
    (server.workdir / "clients.json").write_text(json.dumps(entries))
    unreachable = run_zfsmgr(["client", "backup"], env=env)
    assert unreachable.returncode == 0, unreachable.stderr
    assert "healthcheck ping/start to 127.0.0.1 failed" in unreachable.stderr
    assert "secret-uuid" not in unreachable.stderr


def _post(url, path, body, key, raw=False):
    request = urllib.request.Request(url + path, data=body if raw else json.dumps(body).encode(),
                                     method="POST", headers={"X-Client-ID": "client1",
                                                             "X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_webhook_on_stale_recovered_and_failed_verification(pool, server_factory, run_zfsmgr,
                                                            receiver):
    server = server_factory("dir", env={"NOTIFY_URL": receiver.url + "/hook/T0KEN",
                                        "STALE_CHECK_INTERVAL": "1s", "CHECK_WARN": "15s"})
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset, "BACKUP_UNCHANGED": "true"}
    run_zfsmgr(["client", "backup"], env=env, check=True)

    def event(name):
        return lambda r: r[1] == "/hook/T0KEN" and json.loads(r[2])["event"] == name

    stale = json.loads(receiver.wait_for(event("stale"))[0][2])
    assert (stale["client"], stale["dataset"]) == ("client1", dataset)
    assert stale["message"].endswith("s old (stale after 15s)"), stale["message"]
    assert stale["text"].startswith(f"zfsmgr: client1:{dataset} stale:")
    run_zfsmgr(["client", "backup"], env=env, check=True)
    recovered = json.loads(receiver.wait_for(event("recovered"))[0][2])
    assert recovered["dataset"] == dataset
    assert len([r for r in receiver.requests if event("stale")(r)]) == 1  # once per change

    key = server.client_env["API_KEY"]
    code, opened = _post(server.url, "/upload", {
        "dataset": dataset, "snapshot": "manual", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}, key)
    assert code == 200, opened
    part = f"/upload-stream/{opened['upload_id']}/0"
    assert _post(server.url, part, b"some bytes", key, raw=True)[0] == 200
    code, answer = _post(server.url, f"/upload-stream/{opened['upload_id']}/commit", {
        "sha256": hashlib.sha256(b"other bytes").hexdigest(), "stored_size": 10,
        "parts_crc32": rig.parts_crc32([b"other byte"])}, key)
    assert code == 409 and "part checksum mismatch" in answer["message"]
    failed = json.loads(receiver.wait_for(event("upload_verification_failed"))[0][2])
    assert failed["client"] == "client1" and "part checksum mismatch" in failed["message"]
    assert "T0KEN" not in server.log()


def test_one_failed_dataset_of_a_run_pings_fail(receiver, capsys):
    import logging

    from zfsmgr.client.healthcheck import pinged

    with pinged(receiver.url + "/c", "zfsmgr client backup") as run:
        run.note("backup tank/a: full")
        logging.getLogger("zfsmgr.client").warning("retry 1 in 1s")
        run.failed("tank/b: dataset does not exist")
    assert [p for _, p, _ in receiver.requests] == ["/c/start", "/c/fail"]
    body = receiver.requests[1][2]
    assert body.startswith("zfsmgr client backup: 1 failed")
    assert "retry 1 in 1s" in body and "error: tank/b: dataset does not exist" in body
    receiver.requests.clear()
    with pytest.raises(RuntimeError):
        with pinged(receiver.url + "/c?rid=7", "run"):
            raise RuntimeError("boom")
    assert [p for _, p, _ in receiver.requests] == ["/c/start?rid=7", "/c/fail?rid=7"]
    assert receiver.requests[1][2].endswith("error: boom")
    with pinged("", "no url") as run:  # nothing to ping
        run.note("x")


def test_a_garbled_webhook_answer_does_not_end_the_notifications():
    """http.client's BadStatusLine escaped the webhook's retries and ended the notifier's
    thread: every later event was queued for ever, never sent."""
    import socket

    from zfsmgr.server.notify import Notifier

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    got = []

    def serve():
        for n in range(10):
            try:
                conn, _ = listener.accept()
            except OSError:  # the test closed the listener: done
                return
            data = conn.recv(65536)
            while not data.endswith(b"}"):  # the headers and the JSON body may come apart
                data += conn.recv(65536)
            got.append(data)
            conn.sendall(b"garbage, not HTTP\r\n\r\n" if n == 0 else
                         b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    notifier = Notifier(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", timeout=5)
    notifier.send("verify_failed", "alice", "tank/a", "first")
    assert notifier.wait(10)
    notifier.send("stale", "bob", "tank/b", "second")
    assert notifier.wait(10), "the second event was never sent"
    assert len(got) == 3 and b'"client": "alice"' in got[1]  # its retry
    assert b'"client": "bob"' in got[2]
    listener.close()


def test_one_clients_events_neither_crowd_out_others_nor_ping_the_channel():
    """A client's failed verify reports (300 in a fraction of a second) filled the shared
    queue of 100: the next client's stale event was dropped. And its message went into the
    Slack-style `text` as it was: `<!channel>` pinged everyone, `<url|name>` disguised a link."""
    from zfsmgr.server.notify import PER_CLIENT, Notifier

    gate, got = threading.Event(), []

    class Slow(http.server.BaseHTTPRequestHandler):  # takes nothing until all were sent
        def do_POST(self):
            gate.wait(30)
            got.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    notifier = Notifier(f"http://127.0.0.1:{slow.server_address[1]}/hook")
    for n in range(300):
        notifier.send("verify_failed", "alice", "tank/a", f"{n} <!channel> <https://x|y> & co")
    for n in range(3):  # the same event again: one is waiting already
        notifier.send("stale", "bob", "tank/b", "no backup for 2 days")
    gate.set()
    assert notifier.wait(60)
    slow.shutdown()
    bodies = [json.loads(body) for body in got]
    assert [b["client"] for b in bodies].count("bob") == 1
    assert [b["client"] for b in bodies].count("alice") == PER_CLIENT  # the one sent first too
    text = next(b["text"] for b in bodies if b["client"] == "alice")
    assert "<" not in text and "&lt;!channel&gt; &lt;https://x|y&gt; &amp; co" in text
    assert next(b["message"] for b in bodies if b["client"] == "alice").endswith(
        "<!channel> <https://x|y> & co")  # the JSON field keeps it as written


def test_a_host_with_many_stale_datasets_gets_every_one_announced(receiver):
    """The cap on one client's waiting events held back the server's own stale events too,
    which are sent once per change: a host with 15 datasets gone stale got 10 alerts."""
    from zfsmgr.server.notify import PER_CLIENT, Notifier

    notifier = Notifier(receiver.url + "/hook")
    for n in range(PER_CLIENT + 5):
        notifier.send("stale", "web1", f"tank/d{n}", "no backup for 2 days")
    assert notifier.wait(60)
    assert len(receiver.requests) == PER_CLIENT + 5


def test_a_blocked_run_pings_nothing_and_a_garbled_switch_costs_a_warning(
        pool, server_factory, run_zfsmgr, receiver):
    """A run that found another at work pinged /start and /fail: the check went "down" while
    the first run was fine. A switch URL answered by something that is no HTTP server (an
    SSH banner) made the run an internal error before its backup."""
    import socket

    from zfsmgr.client.base import server_tag
    from zfsmgr.client.locks import RunLock

    server = server_factory("dir")
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset,
           "HEALTHCHECK_URL": receiver.url + "/ping/3f9a-secret-uuid"}
    tag = server_tag(env["SERVER_URL"], env["CLIENT_ID"])
    Path(env["STATE_DIR"]).mkdir(parents=True, exist_ok=True)
    with RunLock(Path(env["STATE_DIR"]), tag):
        blocked = run_zfsmgr(["client", "backup"], env=env)
    assert blocked.returncode == 3 and "in progress" in blocked.stderr, blocked.stderr
    assert receiver.requests == []

    banner = socket.socket()
    banner.bind(("127.0.0.1", 0))
    banner.listen(4)

    def answer():
        while True:
            try:
                conn, _ = banner.accept()
            except OSError:
                return
            # Read the request before the banner and the close: a close with the request
            # unread resets the connection, and the client saw that instead (URLError).
            with conn:
                conn.settimeout(10)
                request = b""
                try:
                    while b"\r\n\r\n" not in request:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        request += chunk
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                except OSError:
                    pass

    threading.Thread(target=answer, daemon=True).start()
    env["HEALTHCHECK_URL"] = f"http://127.0.0.1:{banner.getsockname()[1]}/ping/3f9a-secret-uuid"
    done = run_zfsmgr(["client", "backup"], env=env)
    banner.close()
    assert done.returncode == 0, done.stderr
    assert "healthcheck ping/start to 127.0.0.1 failed (BadStatusLine)" in done.stderr
    assert "secret-uuid" not in done.stderr
