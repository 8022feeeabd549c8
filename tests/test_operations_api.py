"""The operations routes in-process: /verify-report, /metrics' access and labels, outcomes."""

from __future__ import annotations

import json

from test_server_api import auth, call, server, upload  # noqa: F401 (server is a fixture)

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
