"""Malformed input is a JSON 4xx, never a 5xx or a traceback, and nothing is stored unchecked
(in-process WSGI, the directory store)."""

from __future__ import annotations

import json
import logging

import pytest

from test_server_api import auth, call, server  # noqa: F401  (server is a fixture)

GOOD = {"dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000, "estimated_size": 10}


def _deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize("body", [
    _deep(5000), b'{"a":' * 3000 + b"1" + b"}" * 3000, b'{"x": ' + _deep(20) + b"}",
    json.dumps({**GOOD, "snapshot_time": float("nan")}).encode(),
    json.dumps({**GOOD, "snapshot_time": float("inf")}).encode(),
    b'{"dataset": "tank/data", "snapshot": "s1", "snapshot_time": -Infinity}',
    json.dumps({**GOOD, "snapshot_time": 1e20}).encode(),
    json.dumps({**GOOD, "snapshot_time": 1e400}).encode().replace(b"Infinity", b"1e400"),
    json.dumps({**GOOD, "snapshot_time": True}).encode(),
    json.dumps({**GOOD, "compression": {"a": 1}}).encode(),
    json.dumps({**GOOD, "compression": ["gzip"]}).encode(),
    json.dumps({**GOOD, "type": {"full": 1}}).encode(),
    json.dumps({**GOOD, "storage_type": ["dir"]}).encode(),
    json.dumps({**GOOD, "estimated_size": 10 ** 30}).encode(),
    json.dumps({**GOOD, "estimated_size": -5}).encode(),
    json.dumps({**GOOD, "estimated_size": "5"}).encode(),
    json.dumps({**GOOD, "guid": "1" * 60000}).encode(),
    json.dumps({**GOOD, "guid": "18446744073709551616"}).encode(),
    json.dumps({**GOOD, "parent_guid": {"x": 1}}).encode(),
    json.dumps({**GOOD, "raw_send": "yes"}).encode(),
    json.dumps({**GOOD, "dataset": "t" * 199, "snapshot": "s" * 199}).encode(),
    b"\xff\xfe{}", b"[1, 2]", b'"text"', b"1" * 5000, b"{" * 70000,
], ids=lambda body: body[:40].decode("latin-1"))
def test_malformed_upload_requests_are_400(server, body):  # noqa: F811
    ctx, app = server
    code, answer, headers = call(app, "POST", "/upload", body, auth("alice"))
    assert 400 <= code < 500, answer[:300]
    assert headers["Content-Type"] == "application/json"
    assert json.loads(answer)["success"] is False
    assert ctx.sessions.of_client("alice") == []


def _session(app) -> str:
    code, body, _ = call(app, "POST", "/upload", json.dumps(GOOD).encode(), auth("alice"))
    assert code == 200, body
    return json.loads(body)["upload_id"]


@pytest.mark.parametrize("commit", [
    {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": 3, "raw_size": -1},
    {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": -3},
    {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": 3.5},
    {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": True},
    {"sha256": ["0" * 64], "parts_crc32": "00000000-1", "stored_size": 3},
    {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": 10 ** 40},
])
def test_malformed_commits_are_400_and_keep_the_upload(server, commit):  # noqa: F811
    ctx, app = server
    upload_id = _session(app)
    assert call(app, "POST", f"/upload-stream/{upload_id}/0", b"abc", auth("alice"))[0] == 200
    code, answer, _ = call(app, "POST", f"/upload-stream/{upload_id}/commit",
                           json.dumps(commit).encode(), auth("alice"))
    assert code == 400, answer
    assert [s.upload_id for s in ctx.sessions.of_client("alice")] == [upload_id]


def test_parts_headers_and_ranges_that_are_malformed_are_4xx(server, caplog):  # noqa: F811
    ctx, app = server
    caplog.set_level(logging.INFO)
    upload_id = _session(app)
    part = f"/upload-stream/{upload_id}"
    wsgi = lambda text: text.encode("utf-8").decode("latin-1")  # as waitress hands them over
    checks = [
        ("POST", f"{part}/-1", b"abc", auth("alice")),
        ("POST", f"{part}/99999999999999999999", b"abc", auth("alice")),
        ("POST", f"{part}/0", b"abc", {**auth("alice"), "X-Upload-Segment": wsgi("\u0661")}),
        ("POST", f"{part}/0", b"abc", {**auth("alice"), "X-Upload-Segment": "9" * 5000}),
        ("GET", "/status", b"", {"X-Client-ID": "alice\xff\xfe", "X-API-Key": "\xe9\x00"}),
        ("GET", "/status", b"", {"X-Client-ID": wsgi("al\u00efce"), "X-API-Key": "x"}),
        ("GET", "/download", b"", {**auth("alice"), "Range": "bytes=" + "9" * 5000 + "-"}),
        ("GET", "/download", b"", {**auth("alice"), "Range": "bytes=-5"}),
        ("POST", "/rotate", json.dumps({"dry_run": {"x": 1}}).encode(), auth("alice")),
        ("POST", f"{part}/resume", json.dumps({"token": "t", "from_part": -1}).encode(),
         auth("alice")),
        ("POST", f"{part}/resume", json.dumps({"token": "t" * 10000, "from_part": 0}).encode(),
         auth("alice")),
    ]
    for method, path, body, headers in checks:
        query = "key=alice/tank_data_2023-11-14_22:13:20.zfs" if path == "/download" else ""
        code, answer, hdrs = call(app, method, path, body, headers, query=query)
        assert 400 <= code < 500, (path, headers, answer[:200])
        assert json.loads(answer)["success"] is False
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


def test_client_faults_on_parts_are_409_not_503(server):  # noqa: F811
    """A resent earlier part, or a part ahead of the stream, is the client's fault: 409 with
    the parts the server holds (on main: 503, which clients retry for minutes)."""
    ctx, app = server
    upload_id = _session(app)
    for index in range(3):  # parts of the schedule's size (PART_SIZE=1K)
        assert call(app, "POST", f"/upload-stream/{upload_id}/{index}", b"a" * 1024,
                    auth("alice"))[0] == 200
    code, answer, _ = call(app, "POST", f"/upload-stream/{upload_id}/0", b"abc", auth("alice"))
    assert code == 409 and json.loads(answer)["parts_held"] == 3
    code, answer, _ = call(app, "POST", f"/upload-stream/{upload_id}/7", b"abc", auth("alice"))
    assert code == 409 and json.loads(answer)["parts_held"] == 3


def test_only_the_last_part_may_be_short(server):  # noqa: F811
    """Parts of one byte were taken by the ten thousand, and each made the store rewrite its
    record of them all (CPU with the square of their count, on a server the fleet shares):
    a part after a short one is 400 now, and the short one may still end the upload."""
    ctx, app = server
    upload_id = _session(app)
    path = f"/upload-stream/{upload_id}/{{}}"
    assert call(app, "POST", path.format(0), b"a" * 1024, auth("alice"))[0] == 200
    assert call(app, "POST", path.format(1), b"b", auth("alice"))[0] == 200
    code, answer, _ = call(app, "POST", path.format(2), b"c", auth("alice"))
    assert code == 400 and "only the last part" in json.loads(answer)["message"], answer
    assert [p.size for p in ctx.store_named("dir").staged_parts(upload_id)] == [1024, 1]
    assert call(app, "POST", path.format(1), b"b" * 1024, auth("alice"))[0] == 200  # resent
    assert call(app, "POST", path.format(2), b"c", auth("alice"))[0] == 200
