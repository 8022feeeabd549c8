"""A run reads the server's manifests of its own datasets only (GET /snapshots?dataset=…, in
batches), so a client whose catalog is larger than a client reads (protocol.MAX_ANSWER) still
backs up; an answer over that cap is a one-line error, not "unreachable"."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

import rig
import test_server_api
from zfsmgr import protocol
from zfsmgr.client import catalog
from zfsmgr.errors import AnswerTooLarge

in_process_server = test_server_api.server  # the fixture: the server's app in-process
LONG = "tank/" + "archive" * 20  # manifests of ~800 bytes: 24,000 are 19 MB


def fill_catalog(path, client_id, count):
    from zfsmgr.server.catalog import _INSERT, _row
    from zfsmgr.server.database import Database

    db = Database(str(path))
    t0 = 1_600_000_000
    with db.transaction() as conn:
        conn.executemany(_INSERT, (_row(protocol.Manifest(
            key=protocol.build_key(client_id, f"{LONG}/d{n % 40}", protocol.format_timestamp(
                datetime.fromtimestamp(t0 + n, timezone.utc)), "gzip"),
            client_id=client_id, dataset=f"{LONG}/d{n % 40}", snapshot=f"zfsmgr_{n}",
            type="full", parent=None, compression="gzip", raw_size=1 << 20,
            stored_size=1 << 19, sha256="ab" * 32, created="2020-09-13T12:00:00Z",
            snapshot_time=float(t0 + n), guid=str(10**15 + n), storage_type="dir", parts=1))
            for n in range(count)))
    db.close()


@pytest.mark.zfs
def test_a_huge_catalog_of_other_datasets_does_not_stop_a_run(pool, server_factory,
                                                              tmp_path):
    db = tmp_path / "catalog.db"
    fill_catalog(db, "client1", 24_000)
    srv = server_factory("dir", env={"CATALOG_DB": str(db)})
    whole = rig.run_zfsmgr(["restore", "list"], env=srv.client_env)  # reads it whole
    assert whole.returncode == 1, whole.stdout + whole.stderr
    lines = whole.stderr.strip().splitlines()
    assert lines == [f"zfsmgr: error: the answer of {srv.url} to GET /snapshots is larger"
                     " than 16 MiB, more than a client reads"], whole.stderr
    dataset = pool.create("data")
    rig.write_files(pool.mountpoint(dataset), seed=1, count=2, size=50_000)
    env = {**srv.client_env, "LOCAL_DATASET": dataset}
    first = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    rig.write_files(pool.mountpoint(dataset), seed=2, count=1, size=50_000)
    second = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [d["type"] for d in json.loads(second.stdout)["datasets"]] == ["incremental"]
    assert "unreachable" not in first.stderr + second.stderr


class FakeServer:
    """Pure logic: answers GET /snapshots as a server would, or as an older one (the last
    `dataset` only, naming none), or too large past `cap` manifests."""

    def __init__(self, held, older=False, cap=None):
        self.held, self.older, self.cap, self.asked = held, older, cap, []

    def call(self, method, path, query=()):
        names = [v for k, v in query]
        self.asked.append(names)
        if self.older:
            names = names[-1:]
        found = [m for m in self.held if m["dataset"] in names]
        if self.cap is not None and len(found) > self.cap:
            raise AnswerTooLarge("the answer of http://x to GET /snapshots is larger than"
                                 " 16 MiB, more than a client reads")
        return {"snapshots": found, **({} if self.older else {"datasets": query and names})}


def held(counts):
    return [{"dataset": d, "snapshot": f"s{i}", "type": "full", "snapshot_time": 1700000000 + i}
            for d, n in counts.items() for i in range(n)]


def test_batches_stay_within_the_query_limits():
    names = [f"tank/{'x' * 60}{n}" for n in range(130)]
    got = catalog.batches(names)
    assert [n for b in got for n in b] == names
    assert all(len(b) <= protocol.MAX_QUERY_DATASETS for b in got)
    assert all(sum(len(n) + 9 for n in b) <= catalog.URL_BUDGET for b in got)
    assert len(got) == 3  # 4000 bytes take 57 of these names
    assert catalog.batches([f"t/{n}" for n in range(250)]) == [
        [f"t/{n}" for n in range(i, min(i + 100, 250))] for i in (0, 100, 200)]


def test_an_older_server_is_asked_per_dataset_and_an_oversized_dataset_fails_alone():
    api = FakeServer(held({"t/a": 2, "t/b": 1, "t/c": 0}), older=True)
    found, failed = catalog.manifests(api, ["t/a", "t/b", "t/c"])
    assert {d: len(m) for d, m in found.items()} == {"t/a": 2, "t/b": 1, "t/c": 0}
    assert failed == {} and api.asked == [["t/a", "t/b", "t/c"], ["t/a"], ["t/b"], ["t/c"]]
    api = FakeServer(held({"t/a": 2, "t/b": 5, "t/c": 1, "t/d": 1}), cap=4)
    found, failed = catalog.manifests(api, ["t/a", "t/b", "t/c", "t/d"])
    assert list(failed) == ["t/b"]
    assert str(failed["t/b"]) == ("t/b: the answer of http://x to GET /snapshots is larger"
                                  " than 16 MiB, more than a client reads (its backups on"
                                  " the server: rotate them there)")
    assert {d: len(m) for d, m in found.items() if d not in failed} == {
        "t/a": 2, "t/c": 1, "t/d": 1}
    assert api.asked == [["t/a", "t/b", "t/c", "t/d"], ["t/a", "t/b"], ["t/a"], ["t/b"],
                         ["t/c", "t/d"]]


def test_the_server_answers_several_datasets_and_names_them(in_process_server):
    import urllib.parse

    from test_server_api import auth, call, upload

    _, app = in_process_server
    for n, dataset in enumerate(("tank/a", "tank/b", "tank/c", "tank/a")):
        assert upload(app, "alice", b"x" * 100, dataset=dataset, when=1700000000 + n)[0] == 200
    query = urllib.parse.urlencode([("dataset", "tank/a"), ("dataset", "tank/c"),
                                    ("dataset", "tank/none")])
    code, body, _ = call(app, "GET", "/snapshots", headers=auth("alice"), query=query)
    answer = json.loads(body)
    assert code == 200 and answer["datasets"] == ["tank/a", "tank/c", "tank/none"]
    assert [(m["dataset"], m["snapshot_time"]) for m in answer["snapshots"]] == [
        ("tank/a", 1700000000), ("tank/a", 1700000003), ("tank/c", 1700000002)]
    assert "datasets" not in json.loads(call(app, "GET", "/snapshots", headers=auth("alice"))[1])
    too_many = urllib.parse.urlencode([("dataset", f"tank/{n}") for n in range(101)])
    code, body, _ = call(app, "GET", "/snapshots", headers=auth("alice"), query=too_many)
    assert code == 400 and "at most 100 datasets" in json.loads(body)["message"]
    code, body, _ = call(app, "GET", "/snapshots", headers=auth("alice"),
                         query="dataset=tank/a&dataset=../etc")
    assert code == 400
