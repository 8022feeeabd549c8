"""The operations routes in-process: /verify-report, /metrics' access and labels, outcomes."""

from __future__ import annotations

import hashlib
import json

from test_server_api import KEYS, auth, call, server, upload  # noqa: F401 (server: a fixture)

from zfsmgr.server.metrics import render
from zfsmgr.server.fleet import rows as fleet_rows


def report(app, client, results):
    return call(app, "POST", "/verify-report", json.dumps({"results": results}).encode(),
                auth(client))


def test_verify_report_records_per_dataset_and_only_own_keys(server):  # noqa: F811 (the fixture)
    ctx, app = server
    good = upload(app, "alice", b"a" * 300, dataset="tank/a", when=1700000000)[1]
    bad = upload(app, "alice", b"b" * 300, dataset="tank/b", when=1700000100)[1]
    mine = upload(app, "bob", b"c" * 300, dataset="tank/c", when=1700000200)[1]
    code, body, _ = report(app, "alice", [
        {"key": good["manifest"]["key"], "ok": True, "message": ""},
        {"key": bad["manifest"]["key"], "ok": False, "message": "sha256 mismatch"},
        {"key": mine["manifest"]["key"], "ok": False, "message": "not alice's"},
        {"key": "alice/nothing_2020-01-01_00:00:00.zfs", "ok": True}])
    assert code == 200 and json.loads(body)["datasets"] == ["tank/a", "tank/b"]
    events = ctx.ledger.view()["datasets"]
    assert "last_verify_success" in events["alice"]["tank/a"]
    assert "last_verify_success" not in events["alice"]["tank/b"]
    assert "sha256 mismatch" in events["alice"]["tank/b"]["last_verify_message"]
    assert "bob" not in events or "last_verify_failure" not in events["bob"].get("tank/c", {})
    for bad_body in ([{"key": "x"}], [{"key": "x", "ok": "yes"}], "nope", [1]):
        code, body, _ = report(app, "alice", bad_body)
        assert code == 400, bad_body
    counters = ctx.ledger.view()["clients"]
    assert counters["alice"]["uploads"]["committed"] == 2
    assert counters["alice"]["upload_bytes"] == 600


def test_verify_reports_that_are_not_text_are_400_and_record_nothing(server):  # noqa: F811
    """A key that is no string was a 500 (TypeError: unhashable); a lone surrogate in a
    message passed JSON and failed in SQLite (500), after the datasets before it were
    recorded."""
    ctx, app = server
    first = upload(app, "alice", b"a" * 300, dataset="tank/a", when=1700000000)[1]
    second = upload(app, "alice", b"b" * 300, dataset="tank/b", when=1700000100)[1]
    keys = [first["manifest"]["key"], second["manifest"]["key"]]
    for results in ([{"key": [1], "ok": True}], [{"key": {"a": 1}, "ok": False}],
                    [{"key": 7, "ok": True}]):
        code, body, _ = report(app, "alice", results)
        assert code == 400 and "each result needs a key" in json.loads(body)["message"]
    raw = ('{"results": [{"key": "%s", "ok": false, "message": "bad"},'
           ' {"key": "%s", "ok": false, "message": "\\ud800"}]}' % tuple(keys)).encode()
    code, body, _ = call(app, "POST", "/verify-report", raw, auth("alice"))
    assert code == 400 and "surrogate" in json.loads(body)["message"]
    events = ctx.ledger.view()["datasets"].get("alice", {})
    assert all("last_verify_failure" not in events.get(d, {}) for d in ("tank/a", "tank/b"))


def test_disabled_client_may_report_a_verify_but_not_upload(server):  # noqa: F811 (the fixture)
    ctx, app = server
    assert report(app, "carol", [])[0] == 200
    code, body, _ = call(app, "POST", "/upload", b"{}", auth("carol"))
    assert code == 403


def test_metrics_routes_refuse_without_a_configured_token(server):  # noqa: F811 (the fixture)
    _, app = server
    code, body, _ = call(app, "GET", "/metrics")
    assert code == 403 and "METRICS_TOKEN" in json.loads(body)["message"]
    code, body, _ = call(app, "GET", "/")
    assert code == 403 and "ADMIN_API_KEY" in json.loads(body)["message"]


def test_label_values_are_escaped(server):  # noqa: F811 (the fixture)
    ctx, _ = server
    clients = ctx.clients.all()
    manifests = {"alice": []}
    text = render(clients, fleet_rows(clients, manifests, {"datasets": {}}, 60.0, 120.0),
                  {"alice": {"uploads": {"failed": 2}, "upload_bytes": 5}})
    assert 'zfsmgr_uploads_total{client="alice",result="failed"} 2' in text
    assert 'zfsmgr_client_enabled{client="carol"} 0' in text
    from zfsmgr.server.metrics import _labels
    assert _labels([("dataset", 'a"b\\c\nd')]) == '{dataset="a\\"b\\\\c\\nd"}'


def test_failures_aborts_and_rotation_are_counted(server):  # noqa: F811 (the fixture)
    ctx, app = server
    data = b"x" * 100
    code, body, session = upload(app, "alice", data, when=1700000000)
    assert code == 200
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s2", "type": "full", "compression": "none",
        "snapshot_time": 1700003600}).encode(), auth("alice"))
    upload_id = json.loads(body)["upload_id"]
    assert call(app, "POST", f"/upload-stream/{upload_id}/0", b"abc", auth("alice"))[0] == 200
    code, body, _ = call(app, "POST", f"/upload-stream/{upload_id}/commit", json.dumps({
        "sha256": "0" * 64, "stored_size": 3, "parts_crc32": "00000000-1"}).encode(),
        auth("alice"))
    assert code == 409
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s3", "type": "full", "compression": "none",
        "snapshot_time": 1700007200}).encode(), auth("alice"))
    upload_id = json.loads(body)["upload_id"]
    assert call(app, "POST", f"/upload-stream/{upload_id}/abort", b"", auth("alice"))[0] == 200
    code, body, _ = call(app, "POST", "/upload", json.dumps({
        "dataset": "tank/data", "snapshot": "s4", "type": "full", "compression": "none",
        "snapshot_time": 1700010800, "estimated_size": 10 ** 9}).encode(), auth("alice"))
    assert code == 413
    for when in (1700020000, 1700030000):  # alice keeps 1 hourly ... : rotation deletes some
        assert upload(app, "alice", data, when=when)[0] == 200
    code, body, _ = call(app, "POST", "/rotate", b"{}", auth("alice"))
    deleted = json.loads(body)["deleted"]
    view = ctx.ledger.view()
    counters = view["clients"]["alice"]
    assert counters["uploads"] == {"committed": 3, "failed": 2, "aborted": 1}
    assert counters["rotation_deleted"] == len(deleted) > 0
    events = view["datasets"]["alice"]["tank/data"]
    assert "quota exceeded" in events["last_failure_message"]
    assert events["last_failure"] >= events["last_success"] - 5


def test_a_failed_verify_report_is_pushed_to_the_webhook(tmp_path, monkeypatch):
    from test_notify import Receiver

    from zfsmgr import settings
    from zfsmgr.server.app import make_app
    from zfsmgr.server.context import ServerContext

    receiver = Receiver()
    try:
        monkeypatch.chdir(tmp_path)
        (tmp_path / "clients.json").write_text(json.dumps([{
            "client_id": "alice", "api_key": hashlib.sha256(KEYS["alice"].encode()).hexdigest(),
            "storage_type": "dir"}]))
        ctx = ServerContext(settings.load("server", environ={
            "STORAGE_DIR": str(tmp_path / "b"), "NOTIFY_URL": receiver.url + "/hook"}))
        app = make_app(ctx)
        stored = upload(app, "alice", b"y" * 50)[1]["manifest"]
        assert report(app, "alice", [{"key": stored["key"], "ok": False,
                                      "message": "sha256 mismatch"}])[0] == 200
        assert ctx.notifier.wait(20)
        (method, path, body), = receiver.requests
        event = json.loads(body)
        assert (path, event["event"], event["client"], event["dataset"]) == (
            "/hook", "verify_failed", "alice", "tank/data")
        assert "sha256 mismatch" in event["message"] and event["version"]
    finally:
        receiver.close()


def test_clients_json_problems_show_on_metrics_and_page(server):  # noqa: F811 (the fixture)
    from zfsmgr.server import page

    ctx, _ = server
    clients = ctx.clients.all()
    rows = fleet_rows(clients, {}, {"datasets": {}}, 60.0, 120.0)
    assert "\nzfsmgr_config_problems 2\n" in render(clients, rows, {}, problems=2)
    text = page.render(rows, problems=["clients.json entry 4 is refused: <bad>"])
    assert '<p class="problem">clients.json entry 4 is refused: &lt;bad&gt;</p>' in text
    assert [r.state(0.0) for r in rows] == ["never", "never", "disabled"]
