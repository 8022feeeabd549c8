"""The fleet view (/metrics, `server check`, the status page) from the catalog's per-dataset
totals: the same facts as the manifests give, at a cost that follows the datasets reported and
their chains, not the backups stored."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import types
import urllib.request

from hypothesis import HealthCheck, given, settings, strategies as st

import hostile
from zfsmgr.protocol import Manifest
from zfsmgr.server.catalog import Catalog
from zfsmgr.server.clients import ClientConfig
from zfsmgr.server.database import MIGRATIONS, Database
from zfsmgr.server.fleet import catalog_facts, facts_of, fleet
from zfsmgr.server.ledger import Ledger

T0 = 1_600_000_000


def manifest(client: str, dataset: str, n: int, kind: str = "", parent: int = -1,
             size: int = 1000, self_contained: bool = False, key: str = "") -> Manifest:
    """Backup number n of client's dataset (a full one every 5 unless `kind` says)."""
    kind = kind or ("full" if n % 5 == 0 else "incremental")
    parent = n - 1 if parent < 0 else parent
    stamp = time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime(T0 + n * 60))
    return Manifest(
        key=key or f"{client}/{dataset.replace('/', '_')}_{stamp}.zfs.gz", client_id=client,
        dataset=dataset,
        snapshot=f"s{n}", type=kind, parent=None if kind == "full" else f"s{parent}",
        compression="gzip", raw_size=size * 2, stored_size=size, sha256="ab" * 32,
        created=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(T0 + n * 60 + 7)),
        snapshot_time=float(T0 + n * 60), storage_type="dir", self_contained=self_contained)


def by_catalog(catalog: Catalog, client: str):
    return {f.dataset: f for f in catalog_facts(catalog, client)}


def by_manifests(catalog: Catalog, client: str):
    groups = {}
    for m in catalog.list(client):
        groups.setdefault(m.dataset, []).append(m)
    return {d: facts_of(d, g) for d, g in groups.items()}


entries = st.lists(st.tuples(
    st.sampled_from(["c1", "c2"]), st.sampled_from(["tank/a", "tank/b", "pool/x/y"]),
    st.integers(0, 30), st.sampled_from(["", "full", "incremental"]), st.integers(-1, 30),
    st.integers(0, 10_000), st.booleans(), st.booleans()), max_size=40)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries, st.lists(st.integers(0, 39), max_size=10), st.booleans())
def test_the_catalogs_facts_are_those_of_its_manifests(tmp_path_factory, added, removed,
                                                       reindex):
    """Adds (some replacing a key with another size or dataset), removals and a reindex: the
    trigger-kept totals and the indexed lookups give what the manifests give."""
    db = Database(str(tmp_path_factory.mktemp("facts") / "catalog.db"))
    catalog = Catalog(db)
    made = []
    for client, dataset, n, kind, parent, size, alone, same_key in added:
        stamp = time.strftime("%Y-%m-%d_%H:%M:%S", time.gmtime(T0 + n * 60))
        m = manifest(client, dataset, n, kind, parent, size, alone,
                     key=f"{client}/shared_{stamp}.zfs.gz" if same_key else "")
        catalog.add(m)
        made.append(m)
    for index in removed:
        if index < len(made):
            catalog.remove(made[index].client_id, made[index].key)
    if reindex:
        kept = [m for c in ("c1", "c2") for m in catalog.list(c)]
        catalog.replace(kept)
    for client in ("c1", "c2"):
        assert by_catalog(catalog, client) == by_manifests(catalog, client)
    db.close()


def test_an_older_catalog_gets_its_totals_when_it_is_upgraded(tmp_path):
    path = tmp_path / "catalog.db"
    with sqlite3.connect(path) as conn:  # a catalog of the previous schema, with backups
        for script in MIGRATIONS[:4]:
            conn.executescript(script)
        conn.execute("PRAGMA user_version = 4")
        for n in range(12):
            m = manifest("c1", "tank/a" if n % 3 else "tank/b", n, size=100 + n)
            conn.execute("INSERT INTO backups (client_id, key, dataset, snapshot, snapshot_time,"
                         " created, stored_size, storage_type, manifest) VALUES"
                         " (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (m.client_id, m.key, m.dataset, m.snapshot, m.snapshot_time,
                          m.created, m.stored_size, m.storage_type, json.dumps(m.to_dict())))
    catalog = Catalog(Database(str(path)))
    facts = by_catalog(catalog, "c1")
    assert facts == by_manifests(catalog, "c1")
    assert (facts["tank/a"].backups, facts["tank/b"].backups) == (8, 4)
    assert facts["tank/b"].stored_bytes == 100 + 103 + 106 + 109


def _steps(catalog: Catalog, clients) -> int:
    """SQLite virtual machine steps (in tens) of the fleet view of `clients`, as /metrics,
    `server check` and the status page build it: a measure of the rows it reads."""
    ctx = types.SimpleNamespace(
        catalog=catalog, ledger=Ledger(catalog.db),
        settings=types.SimpleNamespace(check_warn=3600.0, check_crit=7200.0),
        clients=types.SimpleNamespace(all=lambda: [ClientConfig(c, "0" * 64) for c in clients]))
    conn = catalog.db.connection()
    count = [0]

    def tick():
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, 10)
    try:
        found = fleet(ctx)
    finally:
        conn.set_progress_handler(None, 0)
    assert len(found) == len(clients)
    return count[0]


def _fill(catalog: Catalog, clients, backups: int) -> None:
    with catalog.db.transaction() as conn:
        for client in clients:
            for n in range(backups):
                m = manifest(client, "tank/data", n)
                conn.execute("INSERT INTO backups (client_id, key, dataset, snapshot,"
                             " snapshot_time, created, stored_size, storage_type, manifest)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (m.client_id, m.key, m.dataset, m.snapshot, m.snapshot_time,
                              m.created, m.stored_size, m.storage_type,
                              json.dumps(m.to_dict())))


def test_the_facts_cost_follows_the_datasets_not_the_backups(tmp_path):
    """20 clients with 21 backups each against 20 with 1,001: the same datasets and chain
    lengths (a full every 5), so the same work, though the second holds 48 times the rows."""
    clients = [f"c{n:02d}" for n in range(20)]
    small, large = Catalog(Database(str(tmp_path / "small.db"))), \
        Catalog(Database(str(tmp_path / "large.db")))
    _fill(small, clients, 21)
    _fill(large, clients, 1001)
    assert by_catalog(large, "c07")["tank/data"].backups == 1001
    assert by_catalog(large, "c07") == by_manifests(large, "c07")
    few, many = _steps(small, clients), _steps(large, clients)
    print(f"VM steps/10: {few} for 420 backups, {many} for 20,020")
    assert many < 1.5 * few, (few, many)


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def _wait_for(url: str, name: str, want, timeout: float = 15.0) -> dict:
    """A scrape whose `name` is `want` (the answer is kept 2 s, or until a client writes)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = _scrape(url)
        if samples.get(name) == want or time.monotonic() > deadline:
            return samples
        time.sleep(0.3)


def test_metrics_of_a_fleet_are_right_before_and_after_backups_and_deletions(
        tmp_path, server_factory, run_zfsmgr):
    """A real server over a catalog of 300 clients × 50 backups (15,000 rows): its numbers,
    then after a new backup, a deletion and a whole client's backups gone."""
    others = [f"f{n:03d}" for n in range(300)]
    extra = [hostile.client_entry(c, f"key-{c}") for c in others]
    server = server_factory("dir", extra_clients=extra, env={"METRICS_NO_AUTH": "true"})
    catalog = Catalog(Database(str(server.workdir / "metadata.db")))  # as a reindex writes
    _fill(catalog, others, 50)
    catalog.db.close()
    url = server.url

    def gauge(name, client, dataset="tank/data"):
        return samples.get(f'{name}{{client="{client}",dataset="{dataset}"}}')

    samples = _scrape(url)
    assert gauge("zfsmgr_backup_count", "f123") == 50
    assert gauge("zfsmgr_stored_bytes", "f123") == 50 * 1000
    assert gauge("zfsmgr_backup_chain_length", "f123") == 5  # s45 (full) .. s49
    assert gauge("zfsmgr_backup_newest_snapshot_timestamp_seconds", "f123") == T0 + 49 * 60
    assert gauge("zfsmgr_backup_oldest_snapshot_timestamp_seconds", "f123") == T0
    assert gauge("zfsmgr_backup_last_success_timestamp_seconds", "f123") == T0 + 49 * 60 + 7
    assert sum(1 for k in samples if k.startswith("zfsmgr_backup_count{")) == 300

    # client1 makes a backup over HTTP: it appears
    alice = hostile.auth_of(server.client_env)
    data = os.urandom(200_000)
    session = hostile.open_upload(url, alice, when=T0 + 10_000, dataset="tank/data")
    statuses, declaration = hostile.send_parts(url, alice, session, data)
    assert statuses == [200] * len(statuses)
    status, answer = hostile.commit(url, alice, session, declaration)
    assert status == 200, answer
    samples = _wait_for(url, 'zfsmgr_backup_count{client="client1",dataset="tank/data"}', 1)
    assert gauge("zfsmgr_backup_count", "client1") == 1
    assert gauge("zfsmgr_stored_bytes", "client1") == len(data)
    assert gauge("zfsmgr_backup_chain_length", "client1") == 1

    # the admin deletes f123's newest backup (no backup is based on it), then all of f200's
    key = manifest("f123", "tank/data", 49).key
    done = run_zfsmgr(["server", "delete", key], env=server.env, cwd=server.workdir)
    assert done.returncode == 0, done.stderr
    done = run_zfsmgr(["server", "forget", "f200", "tank/data"], env=server.env,
                      cwd=server.workdir)
    assert done.returncode == 0, done.stderr
    samples = _wait_for(url, 'zfsmgr_backup_count{client="f123",dataset="tank/data"}', 49)
    assert gauge("zfsmgr_backup_count", "f123") == 49
    assert gauge("zfsmgr_stored_bytes", "f123") == 49 * 1000
    assert gauge("zfsmgr_backup_chain_length", "f123") == 4
    assert gauge("zfsmgr_backup_newest_snapshot_timestamp_seconds", "f123") == T0 + 48 * 60
    assert gauge("zfsmgr_backup_count", "f200") is None  # no backup left: no series
    assert gauge("zfsmgr_backup_count", "f201") == 50
    assert sum(1 for k in samples if k.startswith("zfsmgr_backup_count{")) == 300
    with sqlite3.connect(server.workdir / "metadata.db") as db:
        totals = dict(((c, d), (n, b)) for c, d, n, b in
                      db.execute("SELECT * FROM dataset_totals"))
        rows = dict(((c, d), (n, b)) for c, d, n, b in db.execute(
            "SELECT client_id, dataset, COUNT(*), SUM(stored_size) FROM backups"
            " GROUP BY client_id, dataset"))
    assert totals == rows
    assert "Traceback" not in server.log()
