#!/usr/bin/env python3
"""Catalog benchmark (a script, not a test): prints figures, asserts nothing.

    python3 tests/bench/catalog_bench.py [--clients 1000] [--backups 1000] [--requests 300]
                                         [--committers 50] [--cases latency,concurrent]

latency: a generated catalog of CLIENTS × BACKUPS entries, served by `zfsmgr server` (the .pyz,
directory store) over HTTP; p50/p99 of GET /status (a random client each time), GET /snapshots
(one client's BACKUPS entries), POST /upload and a commit (one part of 1 KiB), and the server's
RSS after them; the same on an empty catalog (the clients, no backups) and on a catalog of that
one client's backups alone, for comparison.
metrics: the fleet view of CLIENTS × BACKUPS (what /metrics, `server check` and the status page
build): in this process from the catalog's per-dataset totals, and as before from every
client's manifests, for comparison; and the server's first (uncached) GET /metrics.
concurrent: COMMITTERS clients, two uploaders each, commit 1 KiB backups against a quota of ten
of them at once: commits per second, and a check of the catalog and the store (nothing lost or
doubled, no quota exceeded).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import rig  # noqa: E402
from zfsmgr.protocol import Manifest  # noqa: E402
from zfsmgr.server.catalog import _INSERT, _row  # noqa: E402
from zfsmgr.server.database import Database  # noqa: E402

CASES = ("latency", "concurrent", "metrics")
T0 = 1_600_000_000


def key_of(n: int) -> str:
    return f"bench-key-{n:06d}"


def write_clients(workdir: Path, count: int, quota: int = 0) -> None:
    (workdir / "clients.json").write_text(json.dumps([
        {"client_id": f"c{n:05d}", "api_key": hashlib.sha256(key_of(n).encode()).hexdigest(),
         "max_size_bytes": quota, "enabled": True, "storage_type": "dir"}
        for n in range(count)]))


def manifest(client: str, n: int) -> Manifest:
    stamp = time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime(T0 + n * 3600))
    return Manifest(key=f"{client}/tank_data_{stamp}.zfs.gz", client_id=client,
                    dataset="tank/data", snapshot=f"zfsmgr_hourly_{n}", type="full" if n % 24
                    == 0 else "incremental", parent=None if n % 24 == 0 else
                    f"zfsmgr_hourly_{n - 1}", compression="gzip", raw_size=1 << 20,
                    stored_size=1 << 19, sha256="ab" * 32,
                    created=f"2020-09-13T12:00:{n % 60:02d}Z",
                    snapshot_time=float(T0 + n * 3600), guid=str(10**15 + n),
                    parent_guid=str(10**15 + n - 1), storage_type="dir", parts=1)


def generate(db_path: Path, clients, backups: int) -> float:
    """Fill a catalog database directly (as an import or a reindex would); seconds taken."""
    started = time.monotonic()
    db = Database(str(db_path))
    with db.transaction() as conn:
        for client in clients:
            conn.executemany(_INSERT, (_row(manifest(client, n)) for n in range(backups)))
    db.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - started


class Api:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method, path, client_n, body=b""):
        headers = {"X-Client-ID": f"c{client_n:05d}", "X-API-Key": key_of(client_n)}
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        took = time.perf_counter() - started  # the server's time, not this client's parsing
        return response.status, json.loads(data), took


def upload(api: Api, client_n: int, when: float, data: bytes):
    """Open, send one part, commit: (status, seconds) of the open and of the commit."""
    status, opened, t_open = api.call("POST", "/upload", client_n, json.dumps({
        "dataset": "tank/data", "snapshot": f"b{when}", "type": "full", "compression": "none",
        "snapshot_time": when}).encode())
    if status != 200:
        return (status, t_open), (status, 0.0)
    upload_id = opened["upload_id"]
    status, _, _ = api.call("POST", f"/upload-stream/{upload_id}/0", client_n, data)
    if status != 200:
        return (200, t_open), (status, 0.0)
    status, _, t_commit = api.call("POST", f"/upload-stream/{upload_id}/commit", client_n,
                                   json.dumps({"sha256": hashlib.sha256(data).hexdigest(),
                                               "stored_size": len(data),
                                               "parts_crc32": rig.parts_crc32([data])}).encode())
    return (200, t_open), (status, t_commit)


def start_server(workdir: Path, threads: int = 8, **settings: str) -> rig.ServerProcess:
    env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1", "THREADS": str(threads),
           "STORAGE_DIR": str(workdir / "backups"), "PART_SIZE": "1M",
           "CONFIG_FILE": str(workdir / "clients.json"),
           "METADATA_FILE": str(workdir / "metadata.json"), **settings}
    return rig.ServerProcess(workdir, env).start()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


def direct(path: Path, count: int) -> dict:
    """The catalog's own share, in this process: one client's queries, and a commit's
    transaction (the row in, the session out) without the store's writes and fsyncs."""
    from zfsmgr.server.catalog import Catalog

    catalog, times = Catalog(Database(str(path))), {"db-query": [], "db-commit": []}
    for i in range(count):
        started = time.perf_counter()
        catalog.used_bytes("c00000")
        catalog.summary("c00000")
        catalog.has_snapshot("c00000", "tank/data", "zfsmgr_hourly_500")
        times["db-query"].append(time.perf_counter() - started)
        started = time.perf_counter()
        with catalog.db.transaction():
            catalog.add(manifest("c00000", 10**6 + i))
            catalog.db.connection().execute("DELETE FROM sessions WHERE upload_id = ?", ("x",))
        times["db-commit"].append(time.perf_counter() - started)
    catalog.db.close()
    return times


def latency_case(args, label: str, workdir: Path, fill_clients, backups: int) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_clients(workdir, args.clients)
    seconds = generate(workdir / "metadata.db", fill_clients, backups)
    size = (workdir / "metadata.db").stat().st_size
    started = time.monotonic()
    server = start_server(workdir)
    startup = time.monotonic() - started
    try:
        api, rng, data = Api(server.port), random.Random(1), b"x" * 1024
        timings = {"status": [], "snapshots": [], "upload": [], "commit": []}
        for _ in range(20):  # warm up
            api.call("GET", "/status", rng.randrange(args.clients))
        for i in range(args.requests):
            timings["status"].append(api.call("GET", "/status",
                                              rng.randrange(args.clients))[2])
            timings["snapshots"].append(api.call("GET", "/snapshots", 0)[2])
            (s1, t_open), (s2, t_commit) = upload(api, 0, T0 + 10**8 + i, data)
            assert s1 == 200 and s2 == 200, (s1, s2)
            timings["upload"].append(t_open)
            timings["commit"].append(t_commit)
        rss = rss_mib(server.proc.pid)
    finally:
        server.stop()
    timings.update(direct(workdir / "metadata.db", args.requests))
    row = {"catalog": label, "entries": len(fill_clients) * backups, "db_mib": size / 2**20,
           "generate_s": seconds, "start_s": startup, "rss_mib": rss}
    for name, values in timings.items():
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = pct(values, 50), pct(values, 99)
    print(f"{label:>22}: {row['entries']:>8} entries, db {row['db_mib']:7.1f} MiB"
          f" (generated {seconds:5.1f}s, server up in {startup:4.1f}s), RSS {rss:6.1f} MiB",
          flush=True)
    print("    " + "  ".join(f"{n} p50 {row[n + '_p50_ms']:5.1f} / p99 {row[n + '_p99_ms']:5.1f}"
                             " ms" for n in timings), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return row


def concurrent_case(args, workdir: Path) -> dict:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_clients(workdir, args.committers, quota=10 * 1024)
    server = start_server(workdir, threads=16)
    results, lock = [], threading.Lock()
    barrier = threading.Barrier(args.committers * 2)

    def uploader(client_n: int, half: int):
        api, data = Api(server.port), os.urandom(1024)
        barrier.wait()
        for i in range(6):
            _, (status, _) = upload(api, client_n, T0 + half * 100 + i, data)
            with lock:
                results.append((client_n, status))

    threads = [threading.Thread(target=uploader, args=(n, h)) for n in range(args.committers)
               for h in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    server.stop()
    db = Database(str(workdir / "metadata.db"))
    ok = sum(1 for _, s in results if s == 200)
    refused = sum(1 for _, s in results if s == 413)
    problems = []
    for n in range(args.committers):
        client = f"c{n:05d}"
        rows = db.query("SELECT key, stored_size FROM backups WHERE client_id = ?", (client,))
        stored = list((workdir / "backups" / client).glob("*.manifest.json"))
        committed = sum(1 for c, s in results if c == n and s == 200)
        if len(rows) != committed or len(stored) != committed:
            problems.append(f"{client}: {committed} commits, {len(rows)} rows, {len(stored)}"
                            " manifests")
        if sum(r[1] for r in rows) > 10 * 1024:
            problems.append(f"{client}: quota exceeded")
    print(f"concurrent: {args.committers} clients x 2 uploaders x 6: {ok} commits, {refused}"
          f" refused at the quota, others {len(results) - ok - refused}, in {wall:.1f}s ="
          f" {ok / wall:.1f} commits/s; catalog vs store: "
          f"{'consistent' if not problems else problems[:5]}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"commits": ok, "refused": refused, "seconds": wall, "commits_per_s": ok / wall,
            "problems": problems}


def metrics_case(args, workdir: Path, clients) -> dict:
    """The fleet view's cost, from the totals and from every manifest (the view before)."""
    import types
    import urllib.request

    from zfsmgr.server import fleet
    from zfsmgr.server.catalog import Catalog
    from zfsmgr.server.clients import ClientConfig
    from zfsmgr.server.ledger import Ledger

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    write_clients(workdir, args.clients)
    generate(workdir / "metadata.db", clients, args.backups)
    catalog = Catalog(Database(str(workdir / "metadata.db")))
    configs = [ClientConfig(c, "0" * 64) for c in clients]
    ctx = types.SimpleNamespace(catalog=catalog, ledger=Ledger(catalog.db),
                                settings=types.SimpleNamespace(check_warn=3600.0,
                                                               check_crit=7200.0),
                                clients=types.SimpleNamespace(all=lambda: configs))

    def every_manifest():
        view = ctx.ledger.view()
        return [row for c in configs for row in fleet.rows(
            [c], {c.client_id: [fleet._stored(e) for e in catalog.list_dicts(c.client_id)]},
            view, 3600.0, 7200.0)]

    figures = {"label": f"metrics {args.clients} x {args.backups}"}
    for name, build in (("totals_ms", lambda: fleet.fleet(ctx)), ("every_row_ms", every_manifest)):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            build()
            times.append(time.perf_counter() - started)
        figures[name] = round(min(times) * 1000, 1)
    catalog.db.close()
    server = start_server(workdir, METRICS_NO_AUTH="true")
    started = time.perf_counter()
    with urllib.request.urlopen(server.url + "/metrics", timeout=600) as answer:
        size = len(answer.read())
    figures["scrape_ms"] = round((time.perf_counter() - started) * 1000, 1)
    figures["scrape_bytes"] = size
    server.stop()
    print(json.dumps(figures), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--backups", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="of each kind")
    parser.add_argument("--committers", type=int, default=50)
    parser.add_argument("--workdir", default="/var/tmp/zfsmgr-catalog-bench")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    if not rig.PYZ.exists():
        import subprocess

        subprocess.run([sys.executable, str(rig.ROOT / "build_zipapp.py")], check=True)
    work = Path(args.workdir)
    clients = [f"c{n:05d}" for n in range(args.clients)]
    rows = []
    if "latency" in cases:
        rows.append(latency_case(args, "empty", work / "empty", [], 0))
        rows.append(latency_case(args, f"1 x {args.backups}", work / "one", clients[:1],
                                 args.backups))
        rows.append(latency_case(args, f"{args.clients} x {args.backups}", work / "full",
                                 clients, args.backups))
    if "concurrent" in cases:
        rows.append(concurrent_case(args, work / "concurrent"))
    if "metrics" in cases:
        rows.append(metrics_case(args, work / "metrics", clients))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
