"""The open-upload limit per client is counted in the transaction that records a session, so
concurrent opens (threads of one server, or two servers on one catalog) never exceed it."""

from __future__ import annotations

import threading

from zfsmgr.server.database import Database
from zfsmgr.server.sessions import Session, SessionTable


def _session(n: int, client: str = "alice") -> Session:
    return Session(upload_id=f"{n:032x}", client_id=client, key=f"{client}/tank_data_{n}.zfs",
                   storage_type="dir", dataset="tank/data", snapshot=f"s{n}", type="full",
                   parent=None, compression="none", guid="", parent_guid="", raw_send=False,
                   compressed_send=False, snapshot_time=1700000000.0 + n, estimated_size=0,
                   part_base=1 << 20, part_every=1000, created=0.0)


def test_a_client_gets_no_session_past_its_limit_and_others_are_not_counted(tmp_path):
    table = SessionTable(Database(str(tmp_path / "catalog.db")))
    assert [table.add(_session(n), 0.0, max_open=2) for n in range(3)] == [True, True, False]
    assert table.add(_session(9, client="bob"), 0.0, max_open=2)  # bob's own count
    assert table.add(_session(1), 1.0, max_open=2)  # touching an open one is no new session
    assert len(table.of_client("alice")) == 2


def test_concurrent_opens_through_two_connections_stop_at_the_limit(tmp_path):
    path = str(tmp_path / "catalog.db")
    tables = [SessionTable(Database(path)), SessionTable(Database(path))]
    results, start = [], threading.Barrier(8)

    def opener(i: int) -> None:
        start.wait()
        for n in range(i * 10, i * 10 + 10):
            results.append(tables[i % 2].add(_session(n), 0.0, max_open=4))

    threads = [threading.Thread(target=opener, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 4 and len(results) == 80
    assert len(tables[0].of_client("alice")) == 4
