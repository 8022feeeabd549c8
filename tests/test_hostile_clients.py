"""One client, hostile or buggy, against a real server process: it cannot starve the others,
take more than its share, exceed its quota by racing, or make the server spool bodies it
refuses."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import time

import pytest

import hostile
import rig
from hostile import auth_of, request

BOB = "bob-secret-key"


def _bob(server) -> dict:
    return {"X-Client-ID": "bob", "X-API-Key": BOB}


def test_parts_ahead_of_the_stream_do_not_starve_the_other_clients(server_factory):
    """The attack of the issue: eight tiny parts far ahead of the stream, with THREADS=8.
    They are refused at once (409 naming the parts held, or 429: more than the client's share
    of threads), and meanwhile /health, another client's /status and a whole upload of
    another client answer as quickly as ever."""
    server = server_factory("dir", env={"THREADS": "8"},
                            extra_clients=[hostile.client_entry("bob", BOB)])
    alice = auth_of(server.client_env)
    session = hostile.open_upload(server.url, alice)
    path = f"/upload-stream/{session['upload_id']}/{{}}"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        attack = [pool.submit(request, server.url, "POST", path.format(5 + i), b"x" * 100,
                              alice, 30) for i in range(8)]
        checks = [pool.submit(request, server.url, "GET", "/health", None, {}, 10),
                  pool.submit(request, server.url, "GET", "/status", None, _bob(server), 10)]
        statuses = [f.result() for f in attack]
        quick = [f.result() for f in checks]
    for status, answer, seconds in statuses:
        assert status in (409, 429), answer
        assert seconds < 10, seconds  # on main: each waited 300 s for its turn
        assert answer["success"] is False
    held = [a for s, a, _ in statuses if s == 409]
    assert held and all(a["parts_held"] == 0 for a in held)
    assert [s for s, _, _ in quick] == [200, 200]
    assert all(seconds < 5 for _, _, seconds in quick), quick  # before: 300 s and more
    other = hostile.open_upload(server.url, _bob(server), when=1700000100)
    statuses, declaration = hostile.send_parts(server.url, _bob(server), other, b"b" * 3000)
    assert statuses == [200] * len(statuses)
    assert hostile.commit(server.url, _bob(server), other, declaration)[0] == 200
    # alice's upload itself is intact: part 0 is still welcome
    assert request(server.url, "POST", path.format(0), b"a" * 100, alice)[0] == 200


def test_a_client_holds_at_most_its_share_of_requests_and_uploads(server_factory):
    server = server_factory("dir", env={"THREADS": "6", "CLIENT_MAX_UPLOADS": "3"})
    alice = auth_of(server.client_env)
    sessions = [hostile.open_upload(server.url, alice, when=1700000000 + i) for i in range(3)]
    status, answer, _ = request(server.url, "POST", "/upload", {
        "dataset": "tank/data", "snapshot": "s9", "type": "full", "compression": "none",
        "snapshot_time": 1700000900}, alice)
    assert status == 409 and "3 open uploads" in answer["message"]
    request(server.url, "POST", f"/upload-stream/{sessions[0]['upload_id']}/abort", None, alice)
    assert hostile.open_upload(server.url, alice, when=1700000901)["upload_id"]
    # more parallel requests than THREADS/3 = 2: the rest are refused with 429 at once
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: request(server.url, "POST", f"/upload-stream/"
                                                  f"{sessions[1]['upload_id']}/{40 + i}",
                                                  b"y" * 10, alice), range(8)))
    codes = sorted(s for s, _, _ in answers)
    assert set(codes) <= {409, 429}, codes
    retry = [a for s, a, _ in answers if s == 429]
    assert all("in progress" in a["message"] for a in retry)


def test_chunked_bodies_count_in_the_clients_share(server_factory):
    """Bodies still arriving count against CLIENT_MAX_REQUESTS, chunked ones too (they were
    not counted: waitress hides Transfer-Encoding from the gate)."""
    server = server_factory("dir", env={"THREADS": "6", "CLIENT_MAX_REQUESTS": "2"})
    alice = auth_of(server.client_env)
    host, port = server.url.split("//", 1)[1].split(":")
    head = (f"POST /rotate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"X-Client-ID: {alice['X-Client-ID']}\r\nX-API-Key: {alice['X-API-Key']}\r\n\r\n"
            "1\r\n{\r\n").encode()
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        for sock in held:
            sock.sendall(head)
        time.sleep(0.5)
        status, answer, _ = request(server.url, "POST", "/rotate", {"dry_run": True}, alice)
        assert status == 429, answer
        assert request(server.url, "GET", "/health")[0] == 200
    finally:
        for sock in held:
            sock.close()
    rig.wait_until(lambda: request(server.url, "POST", "/rotate", {"dry_run": True},
                                   alice)[0] == 200, 10, "the share given back")


def test_idle_and_slow_header_connections_cannot_lock_the_fleet_out(server_factory):
    """101 sockets that sent nothing, or half a request line, filled waitress's 100
    connections for five minutes, without a key: /health timed out. The limit now follows the
    open-file limit, and a connection gets 10 s (connections.HEADER_SECONDS) to finish its
    headers; a request whose headers are in keeps its body's time. 1,100 of them: waitress's
    select() loop ended the server ("filedescriptor out of range") past descriptor 1023."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    server = server_factory("dir")
    alice = auth_of(server.client_env)
    session = hostile.open_upload(server.url, alice)
    host, port = server.url.split("//", 1)[1].split(":")
    body = f"POST /upload-stream/{session['upload_id']}/0 HTTP/1.1\r\nHost: x\r\n" \
           f"Content-Length: 1000\r\nX-Client-ID: {alice['X-Client-ID']}\r\n" \
           f"X-API-Key: {alice['X-API-Key']}\r\n\r\n"
    slow_body = socket.create_connection((host, int(port)), timeout=30)
    slow_body.sendall(body.encode() + b"a" * 500)
    idle = []
    try:
        for n in range(1100):
            sock = socket.create_connection((host, int(port)), timeout=30)
            if n % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost")  # and never the rest
            idle.append(sock)
        status, answer, _ = request(server.url, "GET", "/health", timeout=8)
        assert status == 200, answer  # before: a timeout, with 101 idle sockets
        started = time.monotonic()
        for sock in idle:
            assert sock.recv(1024) == b"", "the server answered a request never sent"
        waited = time.monotonic() - started
        assert waited < 25, waited  # closed by the server, after HEADER_SECONDS
        slow_body.sendall(b"a" * 500)  # its headers were in: it was not closed meanwhile
        answer = slow_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    finally:
        for sock in idle + [slow_body]:
            sock.close()
    assert "connections that sent no complete request headers" in server.log()


def test_racing_uploads_never_take_a_client_past_its_quota(server_factory):
    """Three uploads of 4 MiB at once on a 10 MiB quota: the staged bytes of every open
    upload count, so at most two commit and the total stays within the quota (before, all
    three committed: 12 MiB)."""
    quota = 10 << 20
    server = server_factory("dir", quota=quota, env={"THREADS": "9", "PART_SIZE": "1M",
                                                     "CLIENT_MAX_REQUESTS": "9"})
    alice = auth_of(server.client_env)
    sessions = [hostile.open_upload(server.url, alice, when=1700000000 + i) for i in range(3)]
    data = [os.urandom(4 << 20) for _ in sessions]

    def upload(i):
        statuses, declaration = hostile.send_parts(server.url, alice, sessions[i], data[i])
        if statuses[-1] != 200:
            return statuses[-1]
        return hostile.commit(server.url, alice, sessions[i], declaration)[0]

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(upload, range(3)))
    assert 413 in results and set(results) <= {200, 413}, results
    assert results.count(200) >= 1  # two fit; how the parts interleave decides who gets there
    status, answer, _ = request(server.url, "GET", "/status", None, alice)
    assert answer["used_bytes"] == results.count(200) * (4 << 20) <= quota
    assert "Traceback" not in server.log()


def test_bodies_are_refused_before_they_are_read(server_factory):
    """A client failing authentication, a body on a route that takes none, and a part larger
    than its schedule get their answer after the headers: nothing of the body is read."""
    server = server_factory("dir", extra_clients=[hostile.client_entry("bob", BOB)])
    alice = auth_of(server.client_env)
    session = hostile.open_upload(server.url, alice)
    part = f"/upload-stream/{session['upload_id']}/0"
    me = f"X-Client-ID: {alice['X-Client-ID']}\r\nX-API-Key: {alice['X-API-Key']}\r\n\r\n"
    heads = {
        401: (f"POST {part} HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
              "X-Client-ID: alice\r\nX-API-Key: wrong\r\n\r\n"),
        413: (f"POST {part} HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
              + me),
        404: (f"POST {part} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              f"X-Client-ID: bob\r\nX-API-Key: {BOB}\r\n\r\n"),
    }
    heads[413.1] = "GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n" + me
    # waitress takes Transfer-Encoding out of the headers: these were read to the end (about
    # 1 GiB each into the spool, on /health without a key)
    heads[413.2] = "GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    heads[413.3] = "GET /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + me
    heads[401.1] = ("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    heads[401.2] = (f"POST {part} HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
                    "Expect: 100-continue\r\nX-Client-ID: alice\r\nX-API-Key: wrong\r\n\r\n")
    for code, head in heads.items():
        answer = hostile.headers_only(server.url, head.encode())
        assert answer.startswith(f"HTTP/1.1 {int(code)} ".encode()), (code, answer[:200])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["success"] is False and body["message"]
    log = server.log()
    assert "refused before the body" in log and alice["X-API-Key"] not in log
    # the upload is untouched and the server serves on
    assert request(server.url, "POST", part, b"a" * 100, alice)[0] == 200
    assert request(server.url, "GET", "/health")[0] == 200


@pytest.mark.s3
def test_a_small_s3_part_that_is_not_the_last_is_400_not_503(server_factory):
    """S3 composes only parts of 5 MiB but the last: on main the commit's compose failed with
    a 503, which clients retry for minutes."""
    server = server_factory("s3")
    alice = auth_of(server.client_env)
    session = hostile.open_upload(server.url, alice)
    part = f"/upload-stream/{session['upload_id']}/{{}}"
    assert request(server.url, "POST", part.format(0), b"a" * 1000, alice)[0] == 200
    status, answer, _ = request(server.url, "POST", part.format(1), b"b" * 1000, alice)
    assert status == 400 and "only the last part" in answer["message"], answer
    declaration = {"sha256": "0" * 64, "parts_crc32": rig.parts_crc32([b"a" * 1000]),
                   "stored_size": 1000, "raw_size": 1000}
    assert hostile.commit(server.url, alice, session, declaration)[0] == 200


SLOW_ZFS = """#!/bin/sh
# zfs, with `list` and `get` 2 s slow once FLAG exists (a store check that takes its time)
if [ -e FLAG ] && { [ "$1" = list ] || [ "$1" = get ]; }; then sleep 2; fi
exec zfs "$@"
"""


@pytest.mark.zfs
def test_parts_to_unknown_uploads_never_wait_for_a_store_check(pool, server_factory, tmp_path):
    """A flood of parts to random upload ids, from a client on the server's default store
    (`local`, probed): the gate answers them from the server's own table (404), never by
    checking the store on waitress's one network thread, so another client's /status stays
    quick while every zfs list/get takes 2 s."""
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    flag = tmp_path / "slow"
    wrapper = tmp_path / "zfs"
    wrapper.write_text(SLOW_ZFS.replace("FLAG", str(flag)))
    wrapper.chmod(0o755)
    server = server_factory("local", base_dataset=base, env={"ZFSMGR_ZFS": str(wrapper)},
                            client_fields={"storage_type": ""},
                            extra_clients=[hostile.client_entry("bob", BOB)])
    alice = auth_of(server.client_env)
    flag.touch()
    with concurrent.futures.ThreadPoolExecutor(6) as threads:
        def flood():
            answers = []
            for _ in range(6):
                status, _, _ = request(server.url, "POST",
                                       f"/upload-stream/{os.urandom(16).hex()}/0",
                                       b"x" * 65536, alice, 30)
                answers.append(status)
            return answers
        attack = [threads.submit(flood) for _ in range(3)]
        seconds = []
        while not all(f.done() for f in attack) or not seconds:
            status, _, took = request(server.url, "GET", "/status", None, _bob(server), 30)
            assert status == 200
            seconds.append(took)
        statuses = [s for f in attack for s in f.result()]
    assert set(statuses) == {404}, statuses
    assert max(seconds) < 1.0, seconds


@pytest.mark.zfs
def test_a_flood_of_health_checks_costs_one_store_check_per_interval(pool, server_factory,
                                                                     tmp_path):
    """/health needs no key; each one ran the store's check (zfs commands for `local`). Now
    the answer is kept OPEN_CACHE_SECONDS and the open routes share one client's share of
    threads: 60 at once run the check about once, and a client's /status answers meanwhile."""
    from zfsmgr.server.cache import OPEN_CACHE_SECONDS

    base = f"{pool.name}/backup"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    calls = tmp_path / "zfs-calls"
    wrapper = tmp_path / "zfs"
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec zfs \"$@\"\n")
    wrapper.chmod(0o755)
    # three /status at once fit the client's own share (CLIENT_MAX_REQUESTS defaults to 2)
    server = server_factory("local", base_dataset=base, env={"ZFSMGR_ZFS": str(wrapper),
                                                             "CLIENT_MAX_REQUESTS": "3"})
    count = lambda: len(calls.read_text().splitlines()) if calls.exists() else 0  # noqa: E731
    time.sleep(OPEN_CACHE_SECONDS + 0.1)
    before = count()
    assert request(server.url, "GET", "/health")[0] == 200
    one = count() - before  # what one check costs
    assert one >= 1
    time.sleep(OPEN_CACHE_SECONDS + 0.1)
    before, started = count(), time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(30) as workers:
        flood = [workers.submit(request, server.url, "GET", "/health", None, {}, 30)
                 for _ in range(60)]
        mine = [workers.submit(request, server.url, "GET", "/status", None,
                               auth_of(server.client_env), 30) for _ in range(3)]
        health = [f.result()[0] for f in flood]
        status = [f.result() for f in mine]
    elapsed = time.monotonic() - started
    assert set(health) <= {200, 429} and 200 in health, health
    assert [s for s, _, _ in status] == [200] * 3, status
    intervals = 1 + int(elapsed // OPEN_CACHE_SECONDS) + 1
    assert count() - before <= one * intervals, (count() - before, one, elapsed)
