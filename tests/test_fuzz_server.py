"""The abuse suite: hypothesis generates hostile requests over every route and sends them to a
real server process on each store (dir, S3 on SeaweedFS, local on zfs-fuse). After each batch:
no 5xx, no traceback in the log, /health answers within a second, the catalog and the quota are
as they were, and nothing is left in the store. The counts are printed."""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import sqlite3
import struct
import subprocess
import time
import urllib.parse
import zlib

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import hostile
import rig
from hostile import auth_of

BATCHES, PER_BATCH = 50, 20  # 1,000 requests per store
OTHER_KEY = "fuzz-other-client-key"
WORDS = ["../../etc/passwd", "-rf", "\x00", "a" * 300, "tank/" + "d" * 250, "%2e%2e%2f", "@x",
         "#b", " ", "tank/data", "s1", "\u00e9\u2603", "\udcff"[:0] + "\x7f", "NaN", "1e400",
         "0" * 5000, "client1/tank_data_2023-11-14_22:13:20.zfs", "gzip", "none", "full"]
texts = st.one_of(st.sampled_from(WORDS), st.text(max_size=80))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)), max_leaves=8)

UPLOAD = {"dataset": "tank/data", "snapshot": "s2", "type": "full", "compression": "none",
          "snapshot_time": 1700000500, "estimated_size": 1000, "guid": "", "parent": None,
          "raw_send": False, "compressed_send": False, "storage_type": ""}
COMMIT = {"sha256": "0" * 64, "parts_crc32": "00000000-1", "stored_size": 3, "raw_size": 3}
RESUME = {"token": "1-abc", "from_part": 0}
SHAPES = {"/upload": UPLOAD, "commit": COMMIT, "resume": RESUME, "/rotate": {"dry_run": True},
          "/verify-report": {"results": [{"key": "x", "ok": True}]}}


def mutated(shape: dict):
    """`shape` with some fields replaced by hostile values and some dropped."""
    return st.fixed_dictionaries({k: st.one_of(st.just(v), values) for k, v in shape.items()}
                                 ).flatmap(lambda d: st.sets(st.sampled_from(sorted(d)))
                                           .map(lambda drop: {k: v for k, v in d.items()
                                                              if k not in drop}))


def zfs_like(compound: bool) -> bytes:
    head = struct.pack("<IIQQQIIQQ", 0, 0, 0x2F5BACBAC, 2 if compound else 1, 0, 2, 0, 7, 0)
    return head + b"fuzz@x".ljust(256, b"\0") + b"\x01" * 400


bodies = st.one_of(
    st.none(), st.binary(max_size=2000),
    values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(list(SHAPES)).flatmap(
        lambda name: mutated(SHAPES[name]).map(lambda d: json.dumps(d).encode())),
    st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),
    st.just(b'{"a": "' + b"x" * 70000 + b'"}'), st.booleans().map(zfs_like))

ROUTES = [("GET", "/health"), ("POST", "/upload"), ("GET", "/upload-stream/{id}"),
          ("POST", "/upload-stream/{id}/{n}"), ("POST", "/upload-stream/{id}/{n}"),
          ("POST", "/upload-stream/{id}/commit"), ("POST", "/upload-stream/{id}/abort"),
          ("POST", "/upload-stream/{id}/resume"), ("GET", "/status"), ("GET", "/snapshots"),
          ("GET", "/download"), ("POST", "/rotate"), ("GET", "/rotation-policy"),
          ("POST", "/verify-report"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/{junk}")]


@st.composite
def hostile_request(draw, live_id: str):
    proper, route = draw(st.sampled_from(ROUTES))
    upload_id = draw(st.one_of(st.just(live_id), st.just("0" * 32), texts))
    index = draw(st.one_of(st.integers(-3, 60), st.just(10 ** 30), texts))
    path = route.format(id=urllib.parse.quote(upload_id, safe=""),
                        n=urllib.parse.quote(str(index), safe=""),
                        junk=urllib.parse.quote(draw(texts), safe=""))
    query = draw(st.dictionaries(st.sampled_from(["key", "dataset", "client_id", "api_key"]),
                                 texts, max_size=2))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    method = draw(st.sampled_from([proper] * 6 + ["POST", "GET", "PUT", "DELETE", "HEAD"]))
    who = draw(st.sampled_from(["me"] * 6 + ["wrong", "none", "other", "garbage"]))
    headers = {}
    for name in ("X-Upload-Segment", "Range", "Content-Type"):
        if draw(st.booleans()):
            headers[name] = clean(draw(texts))
    body = draw(bodies) if method == "POST" or draw(st.integers(0, 4)) == 0 else None
    return method, path, who, headers, body


def clean(text: str) -> str:
    """A header value http.client will send: no CR, LF or NUL; encoded as UTF-8 bytes seen
    as latin-1, so non-ASCII arrives as the bytes it is."""
    return text.encode("utf-8", "replace").decode("latin-1").translate(
        {ord(c): None for c in "\r\n\x00"}).strip()


def send(url: str, method: str, path: str, headers: dict, body) -> int:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
    except (ConnectionError, http.client.RemoteDisconnected):
        return 0  # the server closed a refused request's connection while it was sent
    finally:
        conn.close()
    route = path.split("?", 1)[0]
    if response.status >= 400 and method != "HEAD" and route not in ("/", "/metrics"):
        answer = json.loads(data)  # every refusal is JSON
        assert answer["success"] is False, (method, path, data[:200])
    return response.status


class Store:
    """What the checks look at in each kind of store."""

    def __init__(self, kind: str, server, base: str = ""):
        self.kind, self.server, self.base = kind, server, base

    def leftovers(self) -> list:
        if self.kind == "dir":
            staging = self.server.storage_dir / ".uploads"
            return sorted(p.name for p in staging.iterdir()) if staging.exists() else []
        if self.kind == "s3":
            s3 = self.server.s3["seaweed"].client()
            bucket = self.server.s3["bucket"]
            return [o.object_name for o in s3.list_objects(bucket, prefix=".zfsmgr-uploads/",
                                                           recursive=True)]
        state = self.server.storage_dir / ".uploads-local"
        found = sorted(p.name for p in state.glob("*.json")) if state.exists() else []
        names = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", self.base)
        return found + [n for n in names.splitlines()
                        if "@" in n or n.count("/") > self.base.count("/") + 2]


def _seed(kind, server, pool) -> None:
    """One committed backup, so that 'the catalog is unchanged' means something."""
    me = auth_of(server.client_env)
    data = b"seed" * 2000
    if kind == "local":
        dataset = pool.create("seed")
        rig.write_files(pool.mountpoint(dataset), seed=1, count=1, size=50_000)
        rig.sh("zfs", "snapshot", f"{dataset}@s")
        data = subprocess.run(["zfs", "send", f"{dataset}@s"], capture_output=True,
                              check=True).stdout
    session = hostile.open_upload(server.url, me, when=1600000000)
    statuses, declaration = hostile.send_parts(server.url, me, session, data)
    assert set(statuses) == {200}
    declaration["sha256"] = hashlib.sha256(data).hexdigest()
    assert hostile.commit(server.url, me, session, declaration)[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dir", pytest.param("s3", marks=pytest.mark.s3),
                                  pytest.param("local", marks=pytest.mark.zfs)])
def test_hostile_requests_never_hurt_the_server(kind, request, server_factory, capsys):
    pool, base = None, ""
    if kind == "local":
        pool = request.getfixturevalue("pool")
        base = f"{pool.name}/srv"
        rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    policy = {"keep_hourly": 1000, "keep_daily": 1000, "keep_weekly": 1000,
              "keep_monthly": 1000}
    server = server_factory(kind, quota=64 << 20, base_dataset=base, rotation_policy=policy,
                            extra_clients=[hostile.client_entry("other", OTHER_KEY, 1 << 20,
                                                                kind)],
                            env={"THREADS": "8", "MIN_RETAIN_DAYS": "3650"})
    _seed(kind, server, pool)
    store = Store(kind, server, base)
    me = auth_of(server.client_env)
    auth = {"me": me, "wrong": {**me, "X-API-Key": "wrong"}, "none": {},
            "other": {"X-Client-ID": "other", "X-API-Key": OTHER_KEY},
            "garbage": {"X-Client-ID": "\xff\xfe\x80", "X-API-Key": "\xe9" * 70}}
    baseline = (request_json(server, "/snapshots", me), request_json(server, "/status", me))
    held = store.leftovers()  # the seeded backup (local: its chain and snapshot)
    counts: collections.Counter = collections.Counter()

    @seed(zlib.crc32(kind.encode()))  # reproducible, and each store gets its own requests
    @settings(max_examples=BATCHES, deadline=None, database=None,
              phases=[Phase.generate],  # a live server is state: replaying would not shrink
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def batch(data):
        live = hostile.open_upload(server.url, me, when=1700000000 + counts["batches"])
        counts["batches"] += 1
        for _ in range(PER_BATCH):
            method, path, who, headers, body = data.draw(hostile_request(live["upload_id"]))
            status = send(server.url, method, path, {**headers, **auth[who]}, body)
            counts["requests"] += 1
            counts[status] += 1
            assert status < 500, (method, path, who, headers, (body or b"")[:300])
        for upload_id, client_id in open_uploads(server):  # the batch's own and any it opened
            owner = auth["me" if client_id == me["X-Client-ID"] else "other"]
            hostile.request(server.url, "POST", f"/upload-stream/{upload_id}/abort", None, owner)
        started = time.monotonic()
        assert hostile.request(server.url, "GET", "/health", timeout=1.0)[0] == 200
        assert time.monotonic() - started < 1.0
        log = server.log()
        assert "Traceback" not in log and "internal error" not in log
        assert (request_json(server, "/snapshots", me),
                request_json(server, "/status", me)) == baseline
        assert open_uploads(server) == [] and store.leftovers() == held

    batch()
    with capsys.disabled():
        statuses = {k: v for k, v in sorted(counts.items(), key=str) if isinstance(k, int)}
        print(f"\nfuzz {kind}: {counts['requests']} hostile requests in {counts['batches']}"
              f" batches; statuses {statuses} (0: connection closed on a refused body)")
    assert counts["requests"] >= BATCHES * PER_BATCH


def request_json(server, path: str, headers: dict):
    """What the catalog and the quota say: the backups, or the usage."""
    status, answer, _ = hostile.request(server.url, "GET", path, None, headers)
    assert status == 200, answer
    if path == "/status":  # a hostile upload's failure is an event (last_failure): not state
        datasets = {name: {k: v for k, v in entry.items() if not k.startswith("last_")
                           or k == "last_backup"}
                    for name, entry in (answer.get("datasets") or {}).items()}
        return {**{k: answer.get(k) for k in ("used_bytes", "quota_bytes", "snapshot_count")},
                "datasets": datasets}
    return answer["snapshots"]


def open_uploads(server) -> list:
    """(upload id, client id) of every upload the server's database holds open."""
    with sqlite3.connect(f"file:{server.workdir / 'metadata.db'}?mode=ro", uri=True) as db:
        return list(db.execute("SELECT upload_id, client_id FROM sessions"))
