"""The server's API in-process (WSGI): auth, isolation, validation, quota, reindex."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import logging
import os
import sys
import sqlite3
import urllib.parse
import zlib
from pathlib import Path

import pytest

import rig
from zfsmgr import settings
from zfsmgr.server.app import make_app
from zfsmgr.server.clients import add_client
from zfsmgr.server.context import ServerContext

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key", "carol": "carol-key"}


def call(app, method, path, body=b"", headers=None, query="", stream=None):
    """One request to the app: (status, body, headers); `stream`: (file, length), the body
    read from that file as the server reads it."""
    source, length = stream or (io.BytesIO(body), len(body))
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "SERVER_NAME": "t", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "wsgi.input": source, "CONTENT_LENGTH": str(length),
               "wsgi.errors": io.StringIO()}
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    status = {}

    def start(code, hdrs, exc_info=None):
        status["code"], status["headers"] = int(code.split()[0]), dict(hdrs)

    chunks = app(environ, start)
    data = b"".join(chunks)
    if hasattr(chunks, "close"):
        chunks.close()
    return status["code"], data, status["headers"]


def auth(client):
    return {"X-Client-ID": client, "X-API-Key": KEYS[client]}


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clients = [{"client_id": c, "api_key": hashlib.sha256(k.encode()).hexdigest(),
                "max_size_bytes": 10_000, "enabled": c != "carol", "storage_type": "dir"}
               for c, k in KEYS.items()]
    clients[0]["rotation_policy"] = {"keep_hourly": 1, "keep_daily": 2, "keep_weekly": 3,
                                     "keep_monthly": 4}
    (tmp_path / "clients.json").write_text(json.dumps(clients))
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b"),
                                                         "PART_SIZE": "1K"}))
    return ctx, make_app(ctx)


def upload(app, client, data, dataset="tank/data", when=1700000000, **extra):
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": dataset, "snapshot": f"zfsmgr_{when}", "type": "full",
        "compression": "none", "snapshot_time": when, "estimated_size": len(data),
        **extra}).encode(), auth(client))
    assert code == 200, body
    session = json.loads(body)
    size = session["part_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    for index, piece in enumerate(pieces):
        code, body, headers = call(app, "POST", f"/upload-stream/{session['upload_id']}/{index}",
                                   piece, auth(client))
        assert code == 200, body
        assert json.loads(body)["crc32"] == f"{zlib.crc32(piece):08x}"
    code, body, _ = call(app, "POST", f"/upload-stream/{session['upload_id']}/commit",
                         json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                     "parts_crc32": rig.parts_crc32(pieces),
                                     "stored_size": len(data), "raw_size": len(data)}).encode(),
                         auth(client))
    return code, json.loads(body), session


def test_wrong_key_unknown_client_and_disabled(server):
    _, app = server
    wrong = {"X-Client-ID": "alice", "X-API-Key": "nope"}
    assert call(app, "GET", "/status", headers=wrong)[0] == 401
    unknown = {"X-Client-ID": "mallory", "X-API-Key": "x"}
    assert call(app, "GET", "/status", headers=unknown)[0] == 401
    assert call(app, "GET", "/status")[0] == 401
    # disabled: carol may still list (and restore), not upload
    assert call(app, "GET", "/status", headers=auth("carol"))[0] == 200
    code, body, headers = call(app, "POST", "/upload", b"{}", headers=auth("carol"))
    assert code == 403 and json.loads(body)["success"] is False
    assert "disabled" in json.loads(body)["message"]
    assert headers["Content-Type"] == "application/json"


def test_rotation_policy_seed_query_form_and_headers(server):
    _, app = server
    code, body, _ = call(app, "GET", "/rotation-policy",
                         query="client_id=alice&api_key=alice-secret-key")
    assert code == 200
    assert json.loads(body) == {"success": True, "message": "Server-managed rotation policy",
                                "rotation_policy": {"keep_hourly": 1, "keep_daily": 2,
                                                    "keep_weekly": 3, "keep_monthly": 4},
                                "server_managed": True}
    code, body, _ = call(app, "GET", "/rotation-policy", headers=auth("bob"))
    assert json.loads(body)["server_managed"] is False


def test_upload_commit_and_isolation(server, caplog):
    ctx, app = server
    caplog.set_level(logging.INFO)
    data = bytes(range(256)) * 10
    code, body, session = upload(app, "alice", data)
    assert code == 200, body
    key = body["manifest"]["key"]
    assert key == "alice/tank_data_2023-11-14_22:13:20.zfs"
    code, got, headers = call(app, "GET", "/download", headers=auth("alice"), query=f"key={key}")
    assert code == 200 and got == data
    code, got, _ = call(app, "GET", "/download", headers={**auth("alice"), "Range": "bytes=100-"},
                        query=f"key={key}")
    assert code == 206 and got == data[100:]
    # bob sees nothing of alice's, whatever he asks for
    assert call(app, "GET", "/download", headers=auth("bob"), query=f"key={key}")[0] == 404
    assert json.loads(call(app, "GET", "/snapshots", headers=auth("bob"))[1])["snapshots"] == []
    assert call(app, "GET", f"/upload-stream/{session['upload_id']}", headers=auth("bob"))[0] \
        == 404
    for bad in ("../alice/x", "/etc/passwd", "bob/../alice/" + key.split("/")[1],
                "alice%2F..%2F..%2Fetc", "bob/\x00"):
        assert call(app, "GET", "/download", headers=auth("bob"), query=f"key={bad}")[0] in (
            400, 404)
    for secret in KEYS.values():
        assert secret not in caplog.text


@pytest.mark.parametrize("field,value", [("dataset", "../../etc"), ("dataset", "/abs"),
                                         ("snapshot", "a/../b"), ("snapshot", "x\x00"),
                                         ("dataset", "t" * 500), ("compression", "lzma")])
def test_bad_names_are_refused_and_nothing_written(server, tmp_path, field, value):
    _, app = server
    request = {"dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "gzip",
               "snapshot_time": 1700000000, field: value}
    code, body, _ = call(app, "POST", "/upload", json.dumps(request).encode(), auth("alice"))
    assert code == 400 and json.loads(body)["success"] is False
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").rglob("*.zfs*"))


def test_quota_refused_up_front_and_mid_stream(server, tmp_path):
    ctx, app = server
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000, "estimated_size": 20_000}).encode(), auth("alice"))
    assert code == 413 and "quota" in json.loads(body)["message"]
    # no estimate (zfs-fuse): the part that crosses the quota stops and discards the upload
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000}).encode(), auth("alice"))
    session = json.loads(body)
    codes = [call(app, "POST", f"/upload-stream/{session['upload_id']}/{i}", b"x" * 1024,
                  auth("alice"))[0] for i in range(11)]
    assert codes[:9] == [200] * 9 and codes[9] == 413 and codes[10] == 404
    assert ctx.catalog.list("alice") == []
    assert not list((tmp_path / "b").rglob("data"))


def open_session(app, dataset="tank/data", snapshot="s1", when=1700000000, **extra):
    """alice's POST /upload of a full backup: (status, answer)."""
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": dataset, "snapshot": snapshot, "type": "full", "compression": "none",
        "snapshot_time": when, **extra}).encode(), auth("alice"))
    return code, json.loads(body)


def _upload_of_abc(app) -> str:
    """alice opens an upload and sends one part, b"abc"; the upload's commit path."""
    upload_id = open_session(app)[1]["upload_id"]
    assert call(app, "POST", f"/upload-stream/{upload_id}/0", b"abc", auth("alice"))[0] == 200
    return f"/upload-stream/{upload_id}/commit"


def test_a_commit_without_a_valid_part_checksum_is_refused_and_keeps_the_upload(server):
    ctx, app = server
    commit = _upload_of_abc(app)
    for checksum in (None, "", "zz-1", "0000000-1", "00000000-x", "00000000-1\n"):
        code, body, _ = call(app, "POST", commit, json.dumps({
            "sha256": "0" * 64, "stored_size": 3, "parts_crc32": checksum}).encode(),
            auth("alice"))
        assert code == 400 and "parts_crc32 must be" in json.loads(body)["message"], checksum
    code, body, _ = call(app, "POST", commit, json.dumps({
        "sha256": hashlib.sha256(b"abc").hexdigest(), "stored_size": 3,
        "parts_crc32": rig.parts_crc32([b"abc"])}).encode(), auth("alice"))
    assert code == 200, body
    assert [m.sha256 for m in ctx.catalog.list("alice")] == [hashlib.sha256(b"abc").hexdigest()]


def test_part_checksum_mismatch_discards(server, tmp_path):
    """The parts the server holds are not the parts the client sent: nothing is published."""
    ctx, app = server
    commit = _upload_of_abc(app)
    code, body, _ = call(app, "POST", commit, json.dumps({
        "sha256": "0" * 64, "stored_size": 3, "parts_crc32": rig.parts_crc32([b"abd"])}).encode(),
        auth("alice"))
    assert code == 409 and "part checksum mismatch" in json.loads(body)["message"]
    assert ctx.catalog.list("alice") == []
    assert not list((tmp_path / "b").rglob("data"))


def test_add_client_is_picked_up_without_restart_and_reindex(server, tmp_path):
    ctx, app = server
    raw = add_client(str(tmp_path / "clients.json"), "dave", quota=1 << 20, storage="dir")
    assert call(app, "GET", "/status", headers={"X-Client-ID": "dave", "X-API-Key": raw})[0] \
        == 200
    stored = json.loads((tmp_path / "clients.json").read_text())
    assert raw not in json.dumps(stored)
    upload(app, "alice", b"hello world" * 10)
    before = ctx.catalog.list("alice")
    ctx.db.close()
    (tmp_path / "metadata.db").unlink()
    from zfsmgr.server.commands import reindex

    assert reindex(ctx) == 0
    assert ctx.catalog.list("alice") == before


def test_a_checkin_needs_a_backup_of_the_client_to_be_unchanged_from(server):
    ctx, app = server
    assert upload(app, "alice", b"a" * 3000)[0] == 200

    def checkin(client, body):
        code, answer, _ = call(app, "POST", "/checkin", json.dumps(body).encode(), auth(client))
        return code, json.loads(answer)

    code, answer = checkin("alice", {"dataset": "tank/data", "snapshot": "zfsmgr_1700000000"})
    assert code == 200 and answer["checked_at"] <= time.time(), answer
    assert ctx.ledger.view()["datasets"]["alice"]["tank/data"]["last_checked"] == \
        answer["checked_at"]
    for body in ({"dataset": "tank/data", "snapshot": "zfsmgr_1"}, {"dataset": "tank/other"}):
        assert checkin("alice", body)[0] == 404  # no such backup: nothing recorded
    assert checkin("bob", {"dataset": "tank/data", "snapshot": "zfsmgr_1700000000"})[0] == 404
    assert checkin("alice", {"dataset": "../x", "snapshot": "s"})[0] == 400
    assert "bob" not in ctx.ledger.view()["datasets"]


def test_an_abort_while_a_part_is_being_staged_waits_for_it_and_removes_everything(
        server, tmp_path):
    """A client interrupted mid-part aborts while its part is still being staged: the abort
    removed the staging under it (503 and a session left open for a day, which cost the
    client's next run one of its uploads: 409, once in CI)."""
    ctx, app = server
    upload_id = open_session(app)[1]["upload_id"]
    reading, go_on = threading.Event(), threading.Event()

    class SlowBody(io.RawIOBase):
        def __init__(self, data):
            self.data = data

        def readable(self):
            return True

        def read(self, size=-1):
            reading.set()
            go_on.wait(10)
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk

    answers = {}

    def part():
        environ_body = SlowBody(b"x" * 1000)
        answers["part"] = call(app, "POST", f"/upload-stream/{upload_id}/0",
                               headers=auth("alice"), stream=(environ_body, 1000))[0]

    def abort():
        answers["abort"] = call(app, "POST", f"/upload-stream/{upload_id}/abort", b"",
                                auth("alice"))[0]

    staging = threading.Thread(target=part)
    staging.start()
    assert reading.wait(10)  # the part is being staged
    aborting = threading.Thread(target=abort)
    aborting.start()
    time.sleep(0.3)
    go_on.set()
    staging.join(10)
    aborting.join(10)
    assert answers["abort"] == 200
    assert answers["part"] in (200, 404)
    assert not (tmp_path / "b" / ".uploads" / upload_id).exists()
    assert call(app, "GET", f"/upload-stream/{upload_id}", b"", auth("alice"))[0] == 404


def test_an_upload_left_by_a_run_that_died_gives_way_to_the_next_upload_of_its_dataset(server):
    """A killed run leaves its uploads open (a day, the expiry); counted against the client's
    limit (4), two killed runs of two datasets at once left the third run nothing to open. The
    client, holding the dataset's lock, says `supersede`: its older uploads of it are dead."""
    ctx, app = server

    def open_upload(dataset, when, **extra):
        return open_session(app, dataset, f"zfsmgr_{when}", when, **extra)

    left = [open_upload(f"tank/d{n}", 1700000000)[1]["upload_id"] for n in range(4)]
    assert call(app, "POST", f"/upload-stream/{left[0]}/0", b"abc", auth("alice"))[0] == 200
    code, answer = open_upload("tank/other", 1700000100)
    assert code == 409 and "4 open uploads" in answer["message"]  # the limit holds
    code, answer = open_upload("tank/d0", 1700000100)  # not said: both could be live
    assert code == 409 and "4 open uploads" in answer["message"]
    code, answer = open_upload("tank/d0", 1700000100, supersede="yes")
    assert code == 400 and answer["message"] == "supersede must be true or false"
    code, answer = open_upload("tank/d0", 1700000100, supersede=True)  # its next run
    assert code == 200, answer
    assert call(app, "GET", f"/upload-stream/{left[0]}", b"", auth("alice"))[0] == 404
    assert call(app, "GET", f"/upload-stream/{left[1]}", b"", auth("alice"))[0] == 200
    assert len(ctx.uploads.table.of_client("alice")) == 4


def test_an_abort_wakes_a_part_waiting_for_its_turn(server, monkeypatch):
    """Part 2 arrives while part 1 has not begun: it waits for it (PART_WAIT). An abort
    meanwhile wakes it: it finds the upload gone at once instead of waiting out PART_WAIT."""
    from zfsmgr.server import uploads

    monkeypatch.setattr(uploads, "PART_WAIT", 3600.0)
    ctx, app = server
    upload_id = open_session(app)[1]["upload_id"]
    assert call(app, "POST", f"/upload-stream/{upload_id}/0", b"a" * 100, auth("alice"))[0] == 200
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(call(
        app, "POST", f"/upload-stream/{upload_id}/2", b"c" * 100, auth("alice"))[0]))
    waiting.start()
    time.sleep(0.3)  # part 2 waits for part 1
    assert waiting.is_alive()
    assert call(app, "POST", f"/upload-stream/{upload_id}/abort", b"", auth("alice"))[0] == 200
    waiting.join(30)
    assert not waiting.is_alive() and answers and answers[0] in (404, 409), answers


def _part_and_commit(app, session: dict, data: bytes):
    """Send `data` as one part of an open session and commit it: (part status, commit)."""
    path = f"/upload-stream/{session['upload_id']}"
    status = call(app, "POST", f"{path}/0", data, auth("alice"))[0]
    code, body, _ = call(app, "POST", f"{path}/commit", json.dumps({
        "sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32([data]),
        "stored_size": len(data), "raw_size": len(data)}).encode(), auth("alice"))
    return status, (code, json.loads(body))


def test_two_first_uploads_of_datasets_with_one_token_get_two_keys(server):
    """tank/a_b and tank/a/b both make the token tank_a_b. Their first backups, open at once
    (one `zfs snapshot -r`, PARALLEL=2), got one key, and opening the second aborted the
    first as if it were a retry; the second gets the hashed token now, and both commit."""
    ctx, app = server
    first = open_session(app, "tank/a_b", "zfsmgr_1", 1700000000)[1]
    second = open_session(app, "tank/a/b", "zfsmgr_1", 1700000000)[1]
    assert first["key"] == "alice/tank_a_b_2023-11-14_22:13:20.zfs"
    assert second["key"].startswith("alice/tank_a_b-") and second["key"] != first["key"]
    assert _part_and_commit(app, first, b"first")[1][0] == 200
    assert _part_and_commit(app, second, b"second")[1][0] == 200
    stored = {m.dataset: m.key for m in ctx.catalog.list("alice")}
    assert stored == {"tank/a_b": first["key"], "tank/a/b": second["key"]}
    again = open_session(app, "tank/a/b", "zfsmgr_2", 1700000100)[1]  # keeps its token
    assert again["key"].startswith(second["key"].split("_2023")[0] + "_")


def test_opens_of_one_key_that_race_leave_one_upload_to_commit(server):
    """Opens of one dataset@snapshot at once: a retry replaces an older open one, and
    two that race can no longer both be recorded (both committed to one key before, and the
    catalog could list the sha256 of the stream that lost)."""
    ctx, app = server
    barrier = threading.Barrier(4)  # alice's share of requests at once
    answers = []

    def race():
        barrier.wait()
        answers.append(open_session(app, "tank/data", "zfsmgr_1", 1700000000))

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {code for code, _ in answers} <= {200, 409, 429}, answers
    assert all("at the same time" in a["message"] for code, a in answers if code == 409)
    assert len(ctx.uploads.table.of_client("alice")) == 1
    results = [_part_and_commit(app, a, f"stream {i}".encode())
               for i, (code, a) in enumerate(answers) if code == 200]
    committed = [r for r in results if r[1][0] == 200]
    assert len(committed) == 1, results
    (entry,) = ctx.catalog.list("alice")
    stored = (Path(ctx.settings.storage_dir) / entry.key).read_bytes()
    winner = committed[0][1][1]["manifest"]
    assert hashlib.sha256(stored).hexdigest() == entry.sha256 == winner["sha256"]


def test_a_part_sent_again_never_lowers_what_an_upload_holds(server):
    """The reservation of an upload was what lay before the part plus the part: sending part
    0 again (1 byte; the store refuses it, 409) set it to 1 byte while 9 KiB stayed staged,
    and a second upload could stage 9 KiB more on a 10,000-byte quota."""
    ctx, app = server
    first = open_session(app, "tank/a", "zfsmgr_1", 1700000000)[1]
    for index in range(9):
        path = f"/upload-stream/{first['upload_id']}/{index}"
        assert call(app, "POST", path, b"a" * 1024, auth("alice"))[0] == 200
    again = call(app, "POST", f"/upload-stream/{first['upload_id']}/0", b"x", auth("alice"))
    assert again[0] == 409, again
    second = open_session(app, "tank/b", "zfsmgr_1", 1700000000)[1]
    code, body, _ = call(app, "POST", f"/upload-stream/{second['upload_id']}/0", b"b" * 1024,
                         auth("alice"))
    assert code == 413, body
    assert ctx.uploads.table.reserved("alice") >= 9 * 1024


def test_an_incremental_that_is_its_own_parent_is_400(server):
    """It was accepted and committed: its own base, so rotation could never delete it."""
    _, app = server
    assert upload(app, "alice", b"full", dataset="tank/data", when=1700000000)[0] == 200
    code, answer = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000,
                                type="incremental", parent="zfsmgr_1700000000")
    assert code == 400 and "names itself as its parent" in answer["message"], answer


def test_a_commit_the_catalog_cannot_record_leaves_nothing_stored(server, monkeypatch):
    """The store had published the backup when recording it failed (SQLite: "database or
    disk is full"): the object stayed unlisted, outside the quota, and the commit was a 500.
    Now it is a 507 naming the catalog, nothing stays, and sending it again succeeds."""
    ctx, app = server
    real, calls = ctx.catalog.add, []

    def full_once(manifest):
        calls.append(manifest.key)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        real(manifest)

    monkeypatch.setattr(ctx.catalog, "add", full_once)
    code, answer, session = upload(app, "alice", b"z" * 3000, dataset="tank/full")
    assert code == 507 and "catalog" in answer["message"] and "no room" in answer["message"]
    left = [p for p in Path(ctx.settings.storage_dir).rglob("*") if p.is_file()]
    assert not [p for p in left if "tank_full" in p.name], left
    assert ctx.catalog.list("alice") == [] and ctx.uploads.table.of_client("alice") == []
    code, answer, _ = upload(app, "alice", b"z" * 3000, dataset="tank/full")
    assert code == 200, answer
    assert [m.dataset for m in ctx.catalog.list("alice")] == ["tank/full"]


def test_the_longest_dataset_names_commit_to_the_directory_store(server):
    """Datasets of up to 200 characters are taken, but from about 154 the commit's temporary
    file names passed 255 bytes: a 503 ("File name too long") after the whole stream, again
    at every retry. Here at 200 characters, zstd and age, and a token made unique by its
    hash, the longest key there is."""
    ctx, app = server
    long_a = "tank/" + "d" * 191 + "_e_f"
    long_b = "tank/" + "d" * 191 + "/e/f"
    assert len(long_a) == len(long_b) == 200
    for dataset in (long_a, long_b):
        code, answer, _ = upload(app, "alice", b"s" * 100, dataset=dataset,
                                 compression="zstd", encryption="age")
        assert code == 200, answer
    keys = sorted(m.key for m in ctx.catalog.list("alice"))
    assert max(len(k.rsplit("/", 1)[1] + ".manifest.json") for k in keys) == 255
    assert all((Path(ctx.settings.storage_dir) / k).is_file() for k in keys)


def test_an_upload_that_cannot_be_discarded_does_not_stop_the_others_expiring(
        server, monkeypatch, caplog):
    """One failing discard ended the whole expiry pass (and the janitor's only other chance
    was ten minutes later), so every abandoned upload after it stayed."""
    ctx, app = server
    ids = [open_session(app, f"tank/d{n}", "zfsmgr_1", 1700000000)[1]["upload_id"]
           for n in range(3)]
    for upload_id in ids:
        assert call(app, "POST", f"/upload-stream/{upload_id}/0", b"p" * 100,
                    auth("alice"))[0] == 200
    store = ctx.store_named("dir")
    real = store.discard

    def stuck(upload_id):
        if upload_id == ids[0]:
            raise OSError(16, "Device or resource busy")
        real(upload_id)

    monkeypatch.setattr(store, "discard", stuck)
    later = time.time() + 10 ** 7
    with caplog.at_level(logging.INFO):
        assert sorted(ctx.uploads.expire(ctx.stores(), now=later)) == sorted(ids[1:])
    assert f"abandoned upload {ids[0]} stays until the next cleanup" in caplog.text
    monkeypatch.setattr(store, "discard", real)
    assert ctx.uploads.expire(ctx.stores(), now=later) == [ids[0]]
    assert store.staged_uploads() == []


def test_a_resume_after_the_upload_ended_brings_nothing_back(server, monkeypatch):
    """A resume that waited for its lock while a commit or abort ended the upload recorded the
    session again (INSERT OR REPLACE): a ghost open upload holding one of the client's four
    until it expired."""
    from zfsmgr.errors import NotFound

    ctx, app = server
    answer = open_session(app, "tank/r", "zfsmgr_1", 1700000000)[1]
    session = ctx.uploads.get("alice", answer["upload_id"])
    store = ctx.store_named("dir")
    monkeypatch.setattr(store, "resume", lambda *args: None)  # a store that resumes (local)
    assert call(app, "POST", f"/upload-stream/{answer['upload_id']}/abort", b"",
                auth("alice"))[0] == 200
    with pytest.raises(NotFound):
        ctx.uploads.resume(store, session, {"token": "1-abc", "from_part": 0})
    assert ctx.uploads.table.of_client("alice") == []


@pytest.mark.parametrize("first_read", ["fails", "empty"])
def test_a_download_whose_first_read_fails_or_is_empty_gives_its_slot_back(server,
                                                                           monkeypatch,
                                                                           first_read):
    """bottle peeks at a body's first item and, when reading it fails or there is none, never
    closes the body: the client's share of worker threads stayed taken, and after four such
    downloads every request of the client was a 429."""
    from dataclasses import replace as swap

    ctx, app = server
    key = upload(app, "alice", b"d" * 3000, dataset="tank/dl")[1]["manifest"]["key"]
    store, closed = ctx.store_named("dir"), []

    class Reader:
        def read(self, size):
            if first_read == "fails":
                raise OSError(5, "Input/output error")
            return b""

        def close(self):
            closed.append(True)

    real_open = store.open
    monkeypatch.setattr(store, "open", lambda m, offset=0: swap(real_open(m, offset),
                                                                reader=Reader()))
    for _ in range(6):
        code, body, _ = call(app, "GET", "/download", headers=auth("alice"),
                             query=urllib.parse.urlencode({"key": key}))
        assert code == (500 if first_read == "fails" else 200), body
    assert len(closed) == 6
    assert call(app, "GET", "/status", headers=auth("alice"))[0] == 200  # before: 429


def test_a_part_past_the_most_an_upload_has_is_400(server):
    """S3 composes at most S3_MAX_PARTS parts: past them the commit failed (minio's
    ValueError, a 500) after the whole stream; now the part itself is refused."""
    ctx, app = server
    upload_id = open_session(app, "tank/many", "zfsmgr_1", 1700000000)[1]["upload_id"]
    ctx.uploads.max_parts = 3  # after the open: its schedule stays that of 10,000 parts
    for index in range(3):
        assert call(app, "POST", f"/upload-stream/{upload_id}/{index}", b"m" * 1024,
                    auth("alice"))[0] == 200
    code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/3", b"m", auth("alice"))
    assert code == 400 and "at most 3 parts" in json.loads(body)["message"], body


def test_a_stream_larger_than_the_store_keeps_is_413_at_its_open_or_its_part(
        server, monkeypatch, tmp_path):
    """S3 keeps at most 5 TiB in one object, but the part schedule carries up to 9.8 TiB:
    minio's compose refused the rest at the commit, after the whole stream, with a 500."""
    import minio.helpers

    from zfsmgr.storage.directory import DirectoryStore
    from zfsmgr.storage.s3 import S3Store

    assert S3Store.max_object_size == minio.helpers.MAX_MULTIPART_OBJECT_SIZE
    ctx, app = server
    monkeypatch.setattr(DirectoryStore, "max_object_size", 2500)  # as small as a test needs
    code, body = open_session(app, "tank/big", "zfsmgr_1", 1700000000, estimated_size=2501)
    assert code == 413 and "more than the dir store keeps" in body["message"], body
    code, session = open_session(app, "tank/big", "zfsmgr_2", 1700000100)  # no estimate
    assert code == 200, session
    upload_id = session["upload_id"]
    for index in range(2):
        assert call(app, "POST", f"/upload-stream/{upload_id}/{index}", b"m" * 1024,
                    auth("alice"))[0] == 200
    code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/2", b"m" * 1024,
                         auth("alice"))
    assert code == 413 and "with part 2, the upload is 3.0 KiB" in json.loads(body)["message"]
    assert call(app, "GET", f"/upload-stream/{upload_id}", b"", auth("alice"))[0] == 404
    assert not list((tmp_path / "b").rglob("data"))  # what it staged is gone


def test_refused_requests_do_not_make_every_health_a_store_check(server, monkeypatch):
    """Every authenticated POST cleared /health's cache, whatever its answer: one client
    sending cheap 400s turned a flood of /health into one store check (a zfs command, an S3
    call) each."""
    ctx, app = server
    checks = []
    report = ctx.health_report
    monkeypatch.setattr(ctx, "health_report", lambda: checks.append(1) or report())
    app = make_app(ctx)  # its cache wraps the counting report
    for _ in range(50):
        assert call(app, "POST", "/checkin", b"{}", auth("alice"))[0] == 400
        assert call(app, "GET", "/health")[0] == 200
    assert len(checks) <= 2, len(checks)  # once, and again if the 2 s passed meanwhile
    seen = len(checks)
    assert upload(app, "alice", b"payload")[0] == 200  # a change: the next one is fresh
    call(app, "GET", "/health")
    assert len(checks) == seen + 1


def test_a_part_of_an_incremental_reads_one_row_not_the_datasets_history(server, monkeypatch):
    """The open and each part asked for the base's key by reading and checking every backup of
    the dataset: ~1 s a part at 20,000 backups, growing with the history."""
    ctx, app = server
    assert upload(app, "alice", b"base")[0] == 200
    assert upload(app, "alice", b"second", when=1700000100, type="incremental",
                  parent="zfsmgr_1700000000")[0] == 200

    def whole_history(*args, **kwargs):
        raise AssertionError("a part read the dataset's whole history")

    monkeypatch.setattr(ctx.catalog, "list_json", whole_history)
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "zfsmgr_1700000200", "type": "incremental",
        "parent": "zfsmgr_1700000100", "compression": "none", "snapshot_time": 1700000200,
        "estimated_size": 5}).encode(), auth("alice"))
    assert code == 200, body
    session = json.loads(body)
    status, (code, answer) = _part_and_commit(app, session, b"third")
    assert status == 200 and code == 200, answer


def test_the_quota_counts_a_clients_usage_outside_the_servers_write_lock(server, monkeypatch):
    """For the `local` store the usage is `zfs get used` over the client's chains; counted in
    the transaction that checks a part, it held every write of every client meanwhile (past
    SQLite's busy timeout: 500s). It is counted before, and used unless a commit or deletion
    of the client's came in between (then counted again)."""
    ctx, app = server
    inside = []
    counted = ctx.used_bytes
    monkeypatch.setattr(ctx.uploads.quota, "usage",
                        lambda client_id: inside.append(ctx.db.connection().in_transaction)
                        or counted(client_id))
    assert upload(app, "alice", b"abc")[0] == 200
    assert inside and not any(inside), inside
    # a backup committed between the counting and the check: counted again, and it counts
    inside.clear()
    versions = iter([(0,), (1,), (1,), (1,)])
    monkeypatch.setattr(ctx.uploads.quota, "version", lambda client_id: next(versions))
    ctx.uploads.quota.check(ctx.clients.get("alice"), 1)
    assert inside == [False, False]
    # changing all the time: after VERSION_TRIES countings, one inside the transaction
    inside.clear()
    ticks = iter(range(100))
    monkeypatch.setattr(ctx.uploads.quota, "version", lambda client_id: next(ticks))
    ctx.uploads.quota.check(ctx.clients.get("alice"), 1)
    assert inside == [False, False, False, True]


@pytest.mark.parametrize("then", ["commit again", "expiry", "abort"])
def test_a_server_stopped_between_the_stores_commit_and_the_catalog_hides_nothing(
        server, tmp_path, monkeypatch, then):
    """Killed after the store published a backup and before the catalog listed it, the
    server left a stored backup no listing showed and no quota counted, until a reindex: the
    client's commit asked again found no parts (409), the expiry and an abort discarded only
    the staging. Now a commit asked again, or the expiry, records it; an abort removes it."""
    ctx, app = server
    data = b"the whole stream"
    code, session = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000)
    assert code == 200, session
    path = f"/upload-stream/{session['upload_id']}"
    assert call(app, "POST", f"{path}/0", data, auth("alice"))[0] == 200

    def killed(*args):
        raise SystemExit("the server stopped here")

    monkeypatch.setattr(ctx.uploads, "_record", killed)
    commit = json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                         "parts_crc32": rig.parts_crc32([data]), "stored_size": len(data),
                         "raw_size": len(data)}).encode()
    with pytest.raises(SystemExit):
        call(app, "POST", f"{path}/commit", commit, auth("alice"))
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    ctx = ServerContext(settings.load("server", environ={"STORAGE_DIR": str(tmp_path / "b"),
                                                         "PART_SIZE": "1K"}))  # restarted
    app = make_app(ctx)
    stored = [p for p in (tmp_path / "b").rglob("*.zfs") if ".zfsmgr" not in str(p)]
    assert len(stored) == 1 and ctx.catalog.list("alice") == []
    if then == "commit again":
        code, body, _ = call(app, "POST", f"{path}/commit", commit, auth("alice"))
        assert code == 200, body
    elif then == "expiry":
        ctx.store_named("dir")  # as the janitor makes every usable store
        assert ctx.uploads.expire(ctx.stores(), now=time.time() + 10 ** 6) == \
            [session["upload_id"]]
    else:
        assert call(app, "POST", f"{path}/abort", b"", auth("alice"))[0] == 200
    listed = [m.key for m in ctx.catalog.list("alice")]
    assert listed == ([] if then == "abort" else [session["key"]])
    assert stored[0].exists() == (then != "abort")
    assert not ctx.sessions.exists(session["upload_id"])


def test_the_dir_stores_leftovers_of_a_stopped_server_are_mended(server, tmp_path, monkeypatch):
    """A server killed between the commit's two renames left the object and its manifest
    under a temporary name; one killed in a deletion left an object without a manifest.
    Nothing ever removed either: space no quota counted, for ever."""
    from zfsmgr.storage import directory

    ctx, app = server
    data = b"the whole stream"
    code, session = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000)
    path = f"/upload-stream/{session['upload_id']}"
    assert call(app, "POST", f"{path}/0", data, auth("alice"))[0] == 200
    renames = []
    real = os.replace

    def killed_at_the_second(src, dst):
        renames.append(dst)
        if len(renames) == 3:  # the manifest's own temp, the stream, then the manifest
            raise SystemExit("the server stopped here")
        return real(src, dst)

    monkeypatch.setattr(directory.os, "replace", killed_at_the_second)
    with pytest.raises(SystemExit):
        call(app, "POST", f"{path}/commit", json.dumps({
            "sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32([data]),
            "stored_size": len(data), "raw_size": len(data)}).encode(), auth("alice"))
    monkeypatch.undo()
    folder = tmp_path / "b" / "alice"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    orphan = folder / "tank_data_2023-01-01_00:00:00.zfs"  # a deletion stopped halfway
    orphan.write_bytes(b"x" * 1000)
    assert ctx.uploads.expire(ctx.stores(), now=time.time() + 10 ** 6) == \
        [session["upload_id"]]
    assert [m.key for m in ctx.catalog.list("alice")] == [session["key"]]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [session["key"].split("/")[1],
                     session["key"].split("/")[1] + ".manifest.json"], names


def half_committed(app, monkeypatch):
    """An upload whose commit stopped between the dir store's two renames (the stream
    published, its manifest under a temporary name): (session, its path, the commit body)."""
    from zfsmgr.storage import directory

    data = b"the whole stream"
    code, session = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000)
    path = f"/upload-stream/{session['upload_id']}"
    assert call(app, "POST", f"{path}/0", data, auth("alice"))[0] == 200
    commit = json.dumps({
        "sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32([data]),
        "stored_size": len(data), "raw_size": len(data)}).encode()
    renames, real = [], os.replace

    def killed_at_the_manifest(src, dst):
        renames.append(dst)
        if len(renames) == 3:  # the manifest's own temp, the stream, then the manifest
            raise SystemExit("the server stopped here")
        return real(src, dst)

    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(directory.os, "replace", killed_at_the_manifest)
        call(app, "POST", f"{path}/commit", commit, auth("alice"))
    return session, path, commit


def test_the_sweep_removes_an_aborted_half_commit_and_no_other_folder(server, tmp_path,
                                                                      monkeypatch):
    """The sweep finished any commit left between its two renames, also one whose upload the
    client had aborted since: published, and never recorded. And it walked every folder of
    STORAGE_DIR: the local store's upload states (`.uploads-local`), `lost+found`."""
    ctx, app = server
    session, path, _ = half_committed(app, monkeypatch)
    assert call(app, "POST", f"{path}/abort", b"", auth("alice"))[0] == 200
    # the abort itself removes it: the sweep would come a day later (UPLOAD_EXPIRY)
    assert sorted(p.name for p in (tmp_path / "b" / "alice").iterdir()) == []
    others = [tmp_path / "b" / ".uploads-local" / ("a" * 32 + ".json"),
              tmp_path / "b" / "lost+found" / "#1234"]
    for other in others:
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_text("{}")
    ctx.uploads.expire(ctx.stores(), now=time.time() + 10 ** 6)
    assert ctx.catalog.list("alice") == []
    assert sorted(p.name for p in (tmp_path / "b" / "alice").iterdir()) == []
    assert all(other.exists() for other in others)


def test_a_commit_asked_again_after_a_dir_half_commit_is_recorded(
        server, tmp_path, monkeypatch):
    """A server stopped between the dir store's two renames: the client, asking the commit
    again, got 404 "no staged data" (the stream was published, its manifest still under a
    temporary name) and sent the whole backup again; the half-commit stayed until the sweep.
    The commit asked again now finishes it and records it."""
    ctx, app = server
    session, path, commit = half_committed(app, monkeypatch)
    code, body, _ = call(app, "POST", f"{path}/commit", commit, auth("alice"))
    assert code == 200, body
    assert [m.key for m in ctx.catalog.list("alice")] == [session["key"]]
    name = session["key"].split("/")[1]
    assert sorted(p.name for p in (tmp_path / "b" / "alice").iterdir()) == \
        [name, name + ".manifest.json"]


def test_status_says_when_the_server_last_heard_of_each_dataset(server):
    """`restore --recursive` asks whether a run that sent nothing for a dataset had it: a
    check-in of "unchanged", or a failed upload, says it did."""
    ctx, app = server
    assert upload(app, "alice", b"base")[0] == 200
    code, body, _ = call(app, "POST", "/checkin", json.dumps({
        "dataset": "tank/data", "snapshot": "zfsmgr_1700000000"}).encode(), auth("alice"))
    assert code == 200, body
    checked = json.loads(body)["checked_at"]
    entry = json.loads(call(app, "GET", "/status", headers=auth("alice"))[1])["datasets"][
        "tank/data"]
    assert entry["last_checked"] == checked and entry["last_failure"] is None


def test_an_abort_goes_through_when_the_store_cannot_say_if_it_committed(server, monkeypatch):
    """An abort looks for a backup its commit may have left in the store; a zfs error while
    looking (the local store lists the client's home) made the abort a 503, and the upload
    held one of the client's slots until it expired."""
    from zfsmgr.errors import ZfsError

    ctx, app = server
    code, session = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000)
    store = ctx.store_named("dir")

    def hiccup(key):
        raise ZfsError(["zfs", "get", "-r"], 1, "cannot open 'tank': pool I/O is suspended")

    monkeypatch.setattr(store, "read_manifest", hiccup)
    path = f"/upload-stream/{session['upload_id']}"
    assert call(app, "POST", f"{path}/abort", b"", auth("alice"))[0] == 200
    assert not ctx.sessions.exists(session["upload_id"])


def test_a_stream_sent_again_after_a_commit_the_catalog_has_since_is_done_not_a_conflict(
        server, tmp_path, monkeypatch):
    """A server stopped after the store's commit, before its answer; with S3, the restarted
    server's listing then put the backup in the catalog. The client, finding no parts, sent
    the stream again and committed: 409 "already exists", and the run failed."""
    ctx, app = server
    data = b"the whole stream"
    code, session = open_session(app, "tank/data", "zfsmgr_1700000000", 1700000000)
    path = f"/upload-stream/{session['upload_id']}"
    assert call(app, "POST", f"{path}/0", data, auth("alice"))[0] == 200
    commit = json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                         "parts_crc32": rig.parts_crc32([data]), "stored_size": len(data),
                         "raw_size": len(data)}).encode()
    with monkeypatch.context() as patched, pytest.raises(SystemExit):
        patched.setattr(ctx.uploads, "_record", lambda *args: sys.exit("stopped here"))
        call(app, "POST", f"{path}/commit", commit, auth("alice"))
    store = ctx.store_named("dir")
    ctx.catalog.add(store.marked(store.read_manifest(session["key"])))  # as S3's listing
    assert call(app, "POST", f"{path}/0", data, auth("alice"))[0] == 200  # sent again
    code, body, _ = call(app, "POST", f"{path}/commit", commit, auth("alice"))
    assert code == 200, body
    assert json.loads(body)["manifest"]["key"] == session["key"]
    assert [m.key for m in ctx.catalog.list("alice")] == [session["key"]]
    assert not ctx.sessions.exists(session["upload_id"])
    code, body, _ = call(app, "POST", f"{path}/commit", commit, auth("alice"))
    assert code == 404  # the upload is over


def test_a_checkin_reads_one_row_not_the_datasets_history(server, monkeypatch):
    """POST /checkin, sent for every unchanged dataset of every run, read and checked every
    backup of the dataset to find its base."""
    ctx, app = server
    assert upload(app, "alice", b"base")[0] == 200

    def whole_history(*args, **kwargs):
        raise AssertionError("a check-in read the dataset's whole history")

    monkeypatch.setattr(ctx.catalog, "list_json", whole_history)
    body = {"dataset": "tank/data", "snapshot": "zfsmgr_1700000000"}
    assert call(app, "POST", "/checkin", json.dumps(body).encode(), auth("alice"))[0] == 200
    body["snapshot"] = "zfsmgr_1"
    assert call(app, "POST", "/checkin", json.dumps(body).encode(), auth("alice"))[0] == 404


def test_a_store_check_that_hangs_holds_up_no_client_of_another_store(
        server, monkeypatch, tmp_path):
    """A /health checking a store that takes minutes to answer (an unreachable S3 endpoint,
    a hung pool), asked by anyone reaching the port, held the lock every request takes to find
    its store, and the cache that every client's part and commit clears: each client of every
    store waited as long."""
    from zfsmgr.errors import StorageError
    from zfsmgr.storage import registry
    from zfsmgr.storage.directory import DirectoryStore

    ctx, app = server
    checking, answer = threading.Event(), threading.Event()

    class Hanging(DirectoryStore):
        @classmethod
        def from_settings(cls, settings, homes=dict):
            return cls(str(tmp_path / "hanging"))

        def check(self):
            checking.set()
            answer.wait(60)
            raise StorageError("the endpoint did not answer")

    class Backend:
        kind = "hanging"

        def load(self):
            return Hanging

    monkeypatch.setitem(registry.BY_KIND, "hanging", Backend())
    monkeypatch.setattr(ctx, "configured_kinds", lambda: ["dir", "hanging"])
    assert upload(app, "alice", b"first")[0] == 200  # the dir store is made and checked
    health = threading.Thread(target=call, args=(app, "GET", "/health"))
    health.start()
    try:
        assert checking.wait(10)
        answers = []

        def bob():
            answers.append(call(app, "GET", "/status", headers=auth("bob"))[0])
            answers.append(upload(app, "bob", b"his data")[0])  # clears /health's cache

        other = threading.Thread(target=bob)
        other.start()
        other.join(20)
        assert not other.is_alive(), "bob waited for the check of a store he does not use"
        assert answers == [200, 200]
    finally:
        answer.set()
        health.join(60)
    code, body, _ = call(app, "GET", "/health")
    assert code == 200 and "hanging storage is unusable" in body.decode()


def test_two_rotations_at_once_count_each_deletion_once(server, monkeypatch):
    """Two rotations of one client planned at the same moment (a client's POST /rotate and
    the cron's `server rotate`; a dir or local store has no lease to hold one back): both
    reported, and the ledger counted, every deletion twice."""
    ctx, app = server
    day = 86400
    for n in range(4):  # alice keeps 2 dailies (and 1 hourly): two of these four go
        assert upload(app, "alice", b"d" * 100, when=1700000000 + n * day)[0] == 200
    planned = threading.Barrier(2, timeout=30)
    plan = ctx.plan

    def both_plan_first(*args, **kwargs):
        result = plan(*args, **kwargs)
        planned.wait()  # neither deletes before the other has planned
        return result

    monkeypatch.setattr(ctx, "plan", both_plan_first)
    answers = []

    def rotate():
        code, body, _ = call(app, "POST", "/rotate", json.dumps({"dry_run": False}).encode(),
                             auth("alice"))
        answers.append((code, json.loads(body)))

    threads = [threading.Thread(target=rotate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [code for code, _ in answers] == [200, 200], answers
    deleted = [key for _, body in answers for key in body["deleted"]]
    assert len(deleted) == 2 and len(set(deleted)) == 2, answers  # each once, in all
    assert sum(body["freed_bytes"] for _, body in answers) == 200
    assert ctx.ledger.counters()["alice"]["rotation_deleted"] == 2
