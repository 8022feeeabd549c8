"""The client under interruption, over TLS, and S3 uploads whose parts grow."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import logging
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time

import pytest

import rig
from zfsmgr.errors import ServerError, ServerUnreachable, ZfsmgrError
from zfsmgr.progress import Progress
from zfsmgr.remote import ServerClient

pytestmark = [pytest.mark.zfs]


def _snapshots(dataset):
    out = rig.sh("zfs", "list", "-H", "-o", "name,userrefs", "-t", "snapshot", "-r", dataset)
    return [line.split("\t") for line in out.splitlines() if line]


def _backup_under_way(server, env) -> subprocess.Popen:
    """`client backup` started, once two of its parts reached the server."""
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rig.wait_until(lambda: server.log().count("/upload-stream/") >= 2, 60,
                   "two parts reached the server")
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_backup_leaves_nothing_and_the_next_run_works(sig, pool, server_factory,
                                                                  run_zfsmgr):
    server = server_factory("dir", env={"PART_SIZE": "128K"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=3, count=40, size=500_000)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "gzip",
           "COMPRESS_LEVEL": "9"}
    proc = _backup_under_way(server, env)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert _snapshots(dataset) == []  # the new snapshot was destroyed
    assert not list(server.storage_dir.rglob("*.zfs.gz"))
    assert not [p for p in (server.storage_dir / ".uploads").glob("*")] if (
        server.storage_dir / ".uploads").exists() else True
    done = run_zfsmgr(["client", "backup"], env=env, check=True)
    assert ": full," in done.stdout


def test_a_run_killed_mid_upload_leaves_an_upload_the_next_run_aborts(pool, server_factory,
                                                                      run_zfsmgr):
    """kill -9 (the OOM killer, a stop timeout): no abort reaches the server, the upload stays
    open for a day and, with CLIENT_MAX_UPLOADS=1, every later run was refused (409). The
    next run, holding the dataset's lock, supersedes it."""
    server = server_factory("dir", env={"PART_SIZE": "128K", "CLIENT_MAX_UPLOADS": "1"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=5, count=40, size=500_000)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "gzip",
           "COMPRESS_LEVEL": "9"}
    proc = _backup_under_way(server, env)
    proc.kill()
    proc.communicate(timeout=60)
    left = [line.split()[5] for line in server.log().splitlines() if " opened: " in line]
    assert len(left) == 1
    time.sleep(1.1)  # a later second: a new key (the same key would replace it anyway)
    done = run_zfsmgr(["client", "backup"], env=env, check=True)
    assert ": full," in done.stdout
    assert f"upload {left[0]} of {dataset} (" in server.log()
    assert "left by an earlier run: aborted" in server.log()
    assert not (server.storage_dir / ".uploads" / left[0]).exists()
    assert len(_snapshots(dataset)) == 1  # the killed run's snapshot went too (cleanup_stale)


def test_s3_upload_with_tiny_growing_parts(pool, server_factory, run_zfsmgr):
    # PART_SIZE 5M (S3's minimum) and S3_MAX_PARTS=20: parts double every 2 parts
    server = server_factory("s3", env={"PART_SIZE": "5M", "S3_MAX_PARTS": "20"})
    dataset = pool.create("data")
    mnt = pool.mountpoint(dataset)
    import os

    (mnt / "big").write_bytes(os.urandom(24 << 20))
    os.sync()
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "false"}
    run_zfsmgr(["client", "backup"], env=env, check=True)
    api = ServerClient(server.url, env["CLIENT_ID"], env["API_KEY"])
    manifest = api.call("GET", "/snapshots")["snapshots"][0]
    assert manifest["parts"] == 4  # 5 + 5 + 10 + the rest (> 4 MiB)
    download = api.download(manifest["key"])
    data = b"".join(iter(lambda: download.read(1 << 20), b""))
    download.close()
    subprocess.run(["zfs", "recv", "-u", f"{pool.name}/copy"], input=data, check=True)
    client = server.s3["seaweed"].client()
    staged = list(client.list_objects(server.s3["bucket"], prefix=".zfsmgr-uploads/",
                                      recursive=True))
    assert staged == []  # staging objects removed after compose


def test_server_sigterm_keeps_uploads_resumable(pool, server_factory):
    server = server_factory("dir")
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    session = api.call("POST", "/upload", {"dataset": "tank/data", "snapshot": "s1",
                                           "type": "full", "compression": "none",
                                           "snapshot_time": 1700000000})
    api.put_part(session["upload_id"], 0, [b"x" * 1000])
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    server.start()
    state = api.call("GET", f"/upload-stream/{session['upload_id']}")
    assert state["received"] == 1000 and len(state["parts"]) == 1
    assert api.call("GET", "/status")["snapshot_count"] == 0


def test_a_commit_in_flight_at_sigterm_finishes_and_the_server_exits_cleanly(
        server_factory, tmp_path):
    """SIGTERM while a worker still serves a request: the request gets its grace period and
    the log no traceback (closing the server from the signal handler raced such a worker: it
    wrote to the closed trigger, EBADF, one CI failure in five)."""
    catalog = tmp_path / "catalog.db"
    server = server_factory("dir", env={"CATALOG_DB": str(catalog)})
    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    session = api.call("POST", "/upload", {"dataset": "tank/data", "snapshot": "s1",
                                           "type": "full", "compression": "none",
                                           "snapshot_time": 1700000000})
    data = b"x" * 1000
    api.put_part(session["upload_id"], 0, [data])
    holder = sqlite3.connect(str(catalog), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the commit's catalog write waits for this
    answers = []

    def commit():
        try:
            answers.append(api.call("POST", f"/upload-stream/{session['upload_id']}/commit", {
                "sha256": hashlib.sha256(data).hexdigest(),
                "parts_crc32": rig.parts_crc32([data]), "stored_size": len(data),
                "raw_size": len(data)}))
        except ZfsmgrError as exc:  # the answer may be cut by the exit: the commit stands
            answers.append(exc)

    committing = threading.Thread(target=commit)
    committing.start()
    time.sleep(1.0)  # the commit is in a worker, waiting for the catalog
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    holder.execute("COMMIT")
    holder.close()
    assert server.proc.wait(20) == 0
    committing.join(30)
    assert answers
    log = server.log_path.read_text()
    assert "Traceback" not in log and "Bad file descriptor" not in log, log
    server.start()
    assert api.call("GET", "/status")["snapshot_count"] == 1


def test_progress_line_on_a_tty_and_silence_otherwise():
    stream = io.StringIO()
    ticks = iter([0.0, 2.0, 3.0])
    progress = Progress("backup x", total=1000, stream=stream, live=True,
                        clock=lambda: next(ticks))
    progress.update(500)
    progress.finish()
    shown = stream.getvalue()
    assert "backup x: 500 B of 1000 B at 250 B/s, 50%, ETA 2s" in shown
    quiet = io.StringIO()
    progress = Progress("backup x", total=1000, stream=quiet, live=False)
    progress.update(500)
    progress.finish()
    assert quiet.getvalue() == ""


@pytest.fixture
def tls_server(tmp_path):
    """An https server with a self-signed certificate answering /status."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, dict(self.headers)))
            body = json.dumps({"success": True, "message": "ok"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://localhost:{httpd.server_address[1]}", cert, seen
    httpd.shutdown()


def test_https_verifies_certificates_and_keeps_the_key_out_of_urls(tls_server):
    url, cert, seen = tls_server
    with pytest.raises(ZfsmgrError, match="CA_FILE"):
        ServerClient(url, "c1", "raw-secret").call("GET", "/status")
    assert ServerClient(url, "c1", "raw-secret", ca_file=str(cert)).call("GET", "/status")
    path, headers = seen[-1]
    assert "raw-secret" not in path and headers["X-API-Key"] == "raw-secret"


def test_plain_http_to_a_remote_host_warns_once(capsys):
    ServerClient("http://192.0.2.10:8080", "c1", "k")
    ServerClient("http://192.0.2.10:8080", "c1", "k")
    ServerClient("http://127.0.0.1:8080", "c1", "k")
    assert capsys.readouterr().err.count("plain http") == 1


def test_a_client_killed_outright_is_cleaned_up_by_the_next_run(pool, server_factory,
                                                                run_zfsmgr):
    server = server_factory("dir", env={"PART_SIZE": "64K"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=5, count=30, size=500_000)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none"}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rig.wait_until(lambda: server.log().count("/upload-stream/") >= 3, 60,
                   "three parts reached the server", interval=0.01)
    proc.kill()  # like a reboot: no chance to clean up
    proc.wait()
    assert "committed" not in server.log()
    stray = _snapshots(dataset)
    assert len(stray) == 1 and stray[0][1] == "0"  # left behind, not held
    stray_guid = rig.sh("zfs", "get", "-H", "-o", "value", "guid", stray[0][0]).strip()
    done = run_zfsmgr(["client", "backup"], env=env, check=True)
    assert ": full," in done.stdout
    left = _snapshots(dataset)
    assert len(left) == 1 and left[0][1] == "1"  # only the new, committed, held base
    assert rig.sh("zfs", "get", "-H", "-o", "value", "guid", left[0][0]).strip() != stray_guid
    api = ServerClient(server.url, env["CLIENT_ID"], env["API_KEY"])
    assert len(api.call("GET", "/snapshots")["snapshots"]) == 1


def test_add_client_prints_the_key_once_and_stores_only_its_hash(run_zfsmgr, tmp_path):
    added = run_zfsmgr(["server", "add-client", "web1", "--quota", "100G", "--storage", "dir"],
                       env={"CONFIG_FILE": str(tmp_path / "clients.json")}, check=True)
    key = added.stdout.split("API_KEY=", 1)[1].split()[0]
    entry = json.loads((tmp_path / "clients.json").read_text())[0]
    assert entry["client_id"] == "web1" and entry["max_size_bytes"] == 100 << 30
    assert key not in (tmp_path / "clients.json").read_text()
    import hashlib

    assert entry["api_key"] == hashlib.sha256(key.encode()).hexdigest()
    again = run_zfsmgr(["server", "add-client", "web1"],
                       env={"CONFIG_FILE": str(tmp_path / "clients.json")})
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = run_zfsmgr(["server", "add-client", "../evil"],
                     env={"CONFIG_FILE": str(tmp_path / "clients.json")})
    assert bad.returncode == 2 and "invalid client id" in bad.stderr


def test_an_answer_cut_off_by_a_dying_server_is_retried_not_refused():
    """A 200 whose body never fully arrives is a broken connection (retried), not a refusal."""
    import socket

    from zfsmgr.errors import ServerUnreachable
    from zfsmgr.remote import ServerClient

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_half():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50\r\n\r\n{\"success\": tr")
        conn.close()

    thread = threading.Thread(target=answer_half)
    thread.start()
    api = ServerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", "c1", "k")
    with pytest.raises(ServerUnreachable, match="broke"):
        api.call("GET", "/status")
    thread.join()
    listener.close()


@pytest.mark.parametrize("storage", ["dir", "local"])
def test_a_commit_whose_answer_is_lost_counts_as_committed(storage, pool, server_factory):
    """The server commits, the connection breaks before the answer: the retry finds the session
    gone, looks in the catalog and reports success instead of destroying the snapshot."""
    from zfsmgr.client.backup import Backup
    from zfsmgr.errors import ServerUnreachable
    from zfsmgr.zfs import Zfs

    base = ""
    if storage == "local":
        base = f"{pool.name}/srvbase"
        rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory(storage, base_dataset=base)
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=3, count=2)

    class LosesCommitAnswer(ServerClient):
        lost = 0

        def call(self, method, path, payload=None, query=None):
            answer = super().call(method, path, payload, query)
            if path.endswith("/commit") and not self.lost:
                self.lost += 1
                raise ServerUnreachable("connection broke: the answer never came")
            return answer

    env = server.client_env
    api = LosesCommitAnswer(env["SERVER_URL"], env["CLIENT_ID"], env["API_KEY"])
    result = Backup(api, Zfs(), dataset, "gzip", 1, sleep=lambda _: None).run("auto")
    assert api.lost == 1 and result.type == "full"
    listing = api.call("GET", "/snapshots")["snapshots"]
    assert [m["key"] for m in listing] == [result.key]
    assert rig.sh("zfs", "list", "-H", "-o", "name", result.snapshot).strip() == result.snapshot


def test_a_server_that_cannot_take_the_incremental_gets_a_full_backup(pool, server_factory):
    """The catalog the client checked said the base is there, the server says otherwise when the
    upload opens (rotated meanwhile, another server): `backup` sends a full backup instead,
    `backup-incremental` fails with the server's one-line reason."""
    from zfsmgr.client.backup import Backup
    from zfsmgr.remote import ServerError
    from zfsmgr.zfs import Zfs

    first, second = server_factory("dir"), server_factory("dir")
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=4, count=2)

    def api(server):
        env = server.client_env
        return ServerClient(env["SERVER_URL"], env["CLIENT_ID"], env["API_KEY"])

    Backup(api(first), Zfs(), dataset, "gzip", 1, sleep=lambda _: None).run("auto")
    stale = api(first).call("GET", "/snapshots")["snapshots"]

    class StaleCatalog(Backup):
        def server_backups(self):
            return stale  # what the client saw a moment before

    with pytest.raises(ServerError, match="send a full backup") as refused:
        StaleCatalog(api(second), Zfs(), dataset, "gzip", 1,
                     sleep=lambda _: None).run("incremental")
    assert refused.value.status == 409 and refused.value.payload["full_backup_required"]
    result = StaleCatalog(api(second), Zfs(), dataset, "gzip", 1,
                          sleep=lambda _: None).run("auto")
    assert result.type == "full"
    assert [m["type"] for m in api(second).call("GET", "/snapshots")["snapshots"]] == ["full"]


def test_a_part_damaged_on_the_way_is_caught_and_sent_again(pool, server_factory, caplog):
    """Bytes flipped after the client hashed them: the server's CRC-32 of the part differs
    from the client's, the upload starts again, and what is published is the stream as zfs
    sent it."""
    import hashlib

    from zfsmgr.client.backup import Backup
    from zfsmgr.zfs import Zfs

    server = server_factory("dir", env={"PART_SIZE": "64K"})
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=6, count=4, size=100_000)

    class FlipsAByte(ServerClient):
        flipped = 0

        def send_part(self, upload_id, index, chunks, segment=0):
            if index == 1 and not self.flipped:
                self.flipped += 1
                chunks = self._flip(chunks)
            return super().send_part(upload_id, index, chunks, segment)

        @staticmethod
        def _flip(chunks):
            for number, chunk in enumerate(chunks):
                yield bytes([chunk[0] ^ 0x40]) + chunk[1:] if number == 0 else chunk

    env = server.client_env
    api = FlipsAByte(env["SERVER_URL"], env["CLIENT_ID"], env["API_KEY"])
    with caplog.at_level(logging.WARNING, logger="zfsmgr.client"):
        result = Backup(api, Zfs(), dataset, "none", 1, sleep=lambda _: None).run("auto")
    assert api.flipped == 1
    assert "part 1 arrived damaged" in caplog.text and "starting the upload again" in caplog.text
    [manifest] = api.call("GET", "/snapshots")["snapshots"]
    stored = next(server.workdir.rglob("*.zfs")).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(stored).hexdigest()
    sent = subprocess.run(["zfs", "send", result.snapshot], capture_output=True,
                          check=True).stdout
    assert stored == sent


@pytest.fixture
def answering(tmp_path):
    """A plain http server answering every GET with the body and status the test sets."""
    answer = {"status": 200, "body": b"{}"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(answer["status"])
            self.send_header("Content-Length", str(len(answer["body"])))
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", answer
    httpd.shutdown()


@pytest.mark.parametrize("body", [b"[1, 2, 3]", b"7", b"[" * 100_000 + b"]" * 100_000,
                                  b'{"success": "yes"}'])
def test_an_answer_that_is_no_json_object_is_a_server_error(answering, body):
    """A list, a number or JSON nested 100,000 deep was an internal error (AttributeError,
    RecursionError): a traceback's worth of exit 1 instead of the server's fault named."""
    url, answer = answering
    answer["body"] = body
    with pytest.raises(ServerError):
        ServerClient(url, "c1", "k").call("GET", "/status")


def test_a_servers_message_is_shown_on_one_line_and_cut(answering):
    url, answer = answering
    answer["status"], answer["body"] = 500, json.dumps(
        {"success": False, "message": "bad\n\x1b[31mred" + "x" * 100_000}).encode()
    with pytest.raises(ServerError) as err:
        ServerClient(url, "c1", "k").call("GET", "/status")
    text = str(err.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 400, text[:500]


@pytest.mark.parametrize("key,value", [("API_KEY", "abc\ndef-SECRETKEY"),
                                       ("API_KEY", "s\u00e9cret\u2713"),
                                       ("CLIENT_ID", "host\r\nX-Evil: 1")])
def test_header_settings_that_http_cannot_send_are_settings_errors(key, value, tmp_path,
                                                                   monkeypatch):
    """dotenv expands `\\n` in a quoted value: http.client refused the header and quoted it,
    the key included, in an internal error (and HEALTHCHECK_URL's /fail got it too)."""
    from zfsmgr import settings
    from zfsmgr.errors import SettingsError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as err:
        settings.load("client", environ={key: value})
    assert f"{key}=" in str(err.value) and "SECRETKEY" not in str(err.value)
    with pytest.raises(ZfsmgrError) as sent:  # and never quoted when it is sent anyway
        ServerClient("http://127.0.0.1:9", "c1", value).call("GET", "/status")
    assert "SECRETKEY" not in str(sent.value)


def test_a_newest_second_far_ahead_is_not_waited_for(caplog):
    """A server's listing (or a clock once ahead) dated years ahead put `client backup` to
    sleep until then, holding its locks; a quick re-run still waits for the next second."""
    from zfsmgr.client.backup import wait_for_a_new_second

    slept = []

    def sleep(seconds):
        slept.append(seconds)
        if seconds > 60:
            raise AssertionError(f"would sleep {seconds:.0f} s")

    with caplog.at_level(logging.WARNING):
        wait_for_a_new_second(int(time.time()) + 3 * 365 * 86400, sleep=sleep)
    assert slept == [] and "ahead of this host's clock" in caplog.text
    wait_for_a_new_second(int(time.time()), sleep=lambda s: (slept.append(s), time.sleep(s)))
    assert slept and sum(slept) <= 1.1


class _Listing:
    def __init__(self, snapshots):
        self.snapshots = snapshots

    def call(self, method, path, payload=None, query=None):
        return {"success": True, "datasets": [v for _, v in query], "snapshots": self.snapshots}


def _manifest(dataset, when):
    return {"key": f"c1/{dataset.replace('/', '_')}_2023-11-14_22:13:20.zfs", "client_id": "c1",
            "dataset": dataset, "snapshot": "zfsmgr_1", "type": "full", "parent": None,
            "snapshot_time": when, "created": "2023-11-14T22:13:20+00:00", "stored_size": 1,
            "raw_size": 1, "sha256": "0" * 64, "compression": "none", "parts": 1}


@pytest.mark.parametrize("bad", ["yesterday", None, float("inf"), True])
def test_a_malformed_listing_fails_its_datasets_alone(bad):
    """A `snapshot_time` of "yesterday" was a ValueError in the middle of the run (every
    dataset stopped, no report); now that dataset fails, in one line, and the others go on."""
    from zfsmgr.client import catalog

    listing = [_manifest("tank/a", 1700000000), _manifest("tank/b", bad)]
    found, failed = catalog.manifests(_Listing(listing), ["tank/a", "tank/b"])
    assert [m["dataset"] for m in found["tank/a"]] == ["tank/a"] and found["tank/b"] == []
    assert "listing of tank/b's backups is malformed" in str(failed["tank/b"])
    found, failed = catalog.manifests(_Listing([1, 2]), ["tank/a", "tank/b"])
    assert found == {"tank/a": [], "tank/b": []} and set(failed) == {"tank/a", "tank/b"}
    found, failed = catalog.manifests(_Listing("nope"), ["tank/a"])
    assert set(failed) == {"tank/a"}


@pytest.mark.parametrize("bad", [{"keep_hourly": -1}, {"keep_hourly": "24"}, [1]])
def test_a_malformed_policy_from_the_server_is_neither_used_nor_cached(bad, tmp_path,
                                                                       monkeypatch):
    """It was cached first and failed after (an internal error in `client rotate`), and the
    cache was then used whenever the server was down; now it is the server's fault, in one
    line (the caller rotates nothing), and the cache keeps the last good one."""
    from zfsmgr import settings
    from zfsmgr.client import commands
    from zfsmgr.errors import ServerUnreachable

    monkeypatch.chdir(tmp_path)
    loaded = settings.load("client", environ={"STATE_DIR": str(tmp_path), "CLIENT_ID": "c1",
                                              "API_KEY": "k", "SERVER_URL": "http://h:1",
                                              "LOCAL_DATASET": "tank/a"})
    answers = [{"success": True, "server_managed": True,
                "rotation_policy": {"keep_hourly": 3}},
               {"success": True, "server_managed": True, "rotation_policy": bad}]

    class Api:
        def call(self, method, path, payload=None, query=None):
            if not answers:
                raise ServerUnreachable("cannot reach http://h:1")
            return answers.pop(0)

    monkeypatch.setattr(commands, "_api", lambda s: Api())
    assert commands.policy_for(loaded).keep_hourly == 3
    with pytest.raises(ServerError, match="rotation policy is malformed"):
        commands.policy_for(loaded)
    assert commands.policy_for(loaded).keep_hourly == 3  # down: the last good one
    (tmp_path / "policy-c1.json").write_text("[1]")
    with pytest.raises(ServerUnreachable, match="cached policy"):
        commands.policy_for(loaded)


@pytest.fixture
def scripted():
    """A plain http server answering each request with the next of a script of (status,
    body, headers), or dripping its body a byte every 0.3 s for ("drip", n)."""
    script, seen = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.command, self.path))
            status, body, headers = script.pop(0) if script else (500, b"{}", {})
            if status == "drip":
                self.send_response(200)
                self.send_header("Content-Length", str(body))
                self.end_headers()
                for _ in range(body):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script, seen
    httpd.shutdown()


BUSY = (429, b'{"success": false, "message": "busy"}', {"Retry-After": "3"})
FINE = (200, b'{"success": true, "message": "ok"}', {})


def test_requests_that_change_nothing_are_asked_again_while_the_server_is_busy(scripted):
    """A 429 or 503 to GET /status or /snapshots ended `client backup` and `restore latest`
    at once (the README said the client retries); now such a request waits (Retry-After, else
    1, 2, 4 s) and asks again, four times in all; a request that changes something never."""
    url, script, seen = scripted
    api = ServerClient(url, "c1", "k")
    waits = []
    api.sleep = waits.append
    script[:] = [BUSY, (503, b'{"success": false, "message": "down"}', {}), FINE]
    assert api.call("GET", "/status")["message"] == "ok"
    assert waits == [3.0, 2]
    script[:] = [BUSY] * 4
    with pytest.raises(ServerError, match=r"\(429\)"):
        api.call("GET", "/snapshots")
    assert len(waits) == 5 and len(seen) == 7
    script[:] = [BUSY, FINE]
    with pytest.raises(ServerError):
        api.call("POST", "/upload", {"dataset": "tank/a"})
    assert len(seen) == 8


def test_an_answer_dripped_a_byte_at_a_time_ends_within_the_timeout(scripted):
    url, script, _ = scripted
    script[:] = [("drip", 100, {})]
    started = time.monotonic()
    with pytest.raises(ServerUnreachable, match="took more than 1 s"):
        ServerClient(url, "c1", "k", timeout=1.0).call("GET", "/status")
    assert time.monotonic() - started < 5


COMMITTING = (200, b'{"success": true, "message": "upload open", "parts": [], "committing": true,'
                   b' "committing_for": 12.5}', {})
HELD = (200, b'{"success": true, "message": "upload open", "parts": [{"index": 0, "size": 5,'
             b' "crc32": "0badf00d"}]}', {})


def test_a_commit_under_way_is_waited_for_with_growing_pauses_then_given_up(scripted, caplog,
                                                                            monkeypatch):
    """While the server says the upload is committing, the client asks again after 2, 5, 10,
    30 s, then every 60 s, saying so once; after COMMIT_PATIENCE it stops waiting, in one
    line (the real, slow S3 compose: test_slow_commit.py)."""
    from zfsmgr.client import upload
    url, script, seen = scripted
    waits = []
    uploader = upload.Uploader(ServerClient(url, "c1", "k"), None, "tank/a", "none", 1,
                               sleep=waits.append)
    session = {"upload_id": "0" * 32}
    script[:] = [COMMITTING] * 7 + [HELD]
    with caplog.at_level(logging.INFO, logger="zfsmgr.client"):
        state = uploader._state(session)
    assert state["parts"][0]["crc32"] == "0badf00d" and "committing" not in state
    assert waits == [2, 5, 10, 30, 60, 60, 60]
    assert seen == [("GET", f"/upload-stream/{'0' * 32}")] * 8
    said = [r.getMessage() for r in caplog.records if "still committing" in r.getMessage()]
    assert said == [f"the server is still committing upload {'0' * 32} of tank/a (for 12.5 s):"
                    " waiting for it"]

    monkeypatch.setattr(upload, "COMMIT_PATIENCE", 0.3)
    uploader.sleep = lambda seconds: time.sleep(0.2)
    session = {"upload_id": "1" * 32}
    script[:] = [COMMITTING, COMMITTING, (500, b'{"success": false, "message": "blip"}', {})]
    with pytest.raises(ServerError, match="blip"):  # the run's retry asks again after it:
        uploader._state(session)  # the patience goes on, it does not start again
    script[:] = [COMMITTING] * 3
    with pytest.raises(ZfsmgrError, match=rf"^the server is still committing upload {'1' * 32}"
                                          r" of tank/a after [0-9.e-]+ h: no longer waiting"
                                          r" for it$"):
        uploader._state(session)
    assert len(seen) == 12
