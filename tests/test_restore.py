"""`zfsmgr restore` end to end: real zfs-fuse pools, real servers (dir, S3, local ZFS) from the
.pyz, backups made by `zfsmgr client backup`; plus in-process tests of the download and receive
plumbing (resumed downloads, the withheld last chunk) against a small HTTP server of our own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import rig

from zfsmgr import protocol
from zfsmgr.errors import IntegrityError, ServerUnreachable
from zfsmgr.protocol import Manifest
from zfsmgr.remote import ServerClient
from zfsmgr.restore.receive import receive_stream
from zfsmgr.restore.stream import Progress, StoredStream
from zfsmgr.zfs import Zfs

# --- in-process plumbing ----------------------------------------------------------------------

BODY = bytes(range(256)) * 4096 * 3  # 3 MiB
KEY = "client1/tank_data_2024-02-13_14:30:00.zfs"


def plain_manifest(body: bytes = BODY, storage: str = "dir", sha: str | None = None) -> Manifest:
    return Manifest(key=KEY, client_id="client1", dataset="tank/data", snapshot="s1",
                    type="full", parent=None, compression="none", raw_size=len(body),
                    stored_size=len(body), sha256=sha or hashlib.sha256(body).hexdigest(),
                    created="2024-02-13T14:30:00+00:00", snapshot_time=1707834600.0,
                    storage_type=storage)


class FlakyServer:
    """Serves /download of one body; the first `breaks` responses stop after `cut` bytes.

    `local=True` answers like the server's local ZFS store: chunked, no checksum or size, and a
    resumed request gets 200 with the body from the asked offset (which X-Stream-Offset names).
    """

    def __init__(self, body: bytes, breaks: int = 1, cut: int = 1 << 20, sha: str | None = None,
                 length_lies: bool = False, local: bool = False):
        self.body, self.breaks, self.cut, self.ranges = body, breaks, cut, []
        self.sha = hashlib.sha256(body).hexdigest() if sha is None else sha
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, data: bytes) -> None:
                if local and data:
                    data = b"%x\r\n%s\r\n" % (len(data), data)
                self.wfile.write(data)

            def do_GET(self):
                header = self.headers.get("Range")
                owner.ranges.append(header)
                start = int(header.split("=")[1].rstrip("-")) if header else 0
                rest = owner.body[start:]
                self.send_response(206 if start and not local else 200)
                self.send_header("X-Compression", "none")
                self.send_header("X-Content-SHA256", "" if local else owner.sha)
                self.send_header("X-Stored-Size", "" if local else str(len(owner.body)))
                self.send_header(protocol.HEADER_OFFSET, str(start))
                if local:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    length = len(rest) - 1 if length_lies else len(rest)
                    self.send_header("Content-Length", str(length))
                if start and not local:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(owner.body) - 1}/{len(owner.body)}")
                self.end_headers()
                if owner.breaks > 0:
                    owner.breaks -= 1
                    self.send(rest[:owner.cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send(rest)
                if local:
                    self.wfile.write(b"0\r\n\r\n")

        class Quiet(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client dropping a connection on purpose is not news

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.client = ServerClient(f"http://127.0.0.1:{self.httpd.server_port}", "client1", "k")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def flaky():
    servers = []

    def make(*args, **kwargs):
        servers.append(FlakyServer(*args, **kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def read_all(stream: StoredStream) -> bytes:
    out = io.BytesIO()
    while True:
        chunk = stream.read(1 << 16)
        if not chunk:
            return out.getvalue()
        out.write(chunk)


def test_broken_download_resumes_from_the_byte_reached(flaky):
    server = flaky(BODY, breaks=2, cut=700_000)
    sleeps = []
    stream = StoredStream(server.client, plain_manifest(), sleep=sleeps.append)
    assert read_all(stream) == BODY
    stream.check()
    assert server.ranges == [None, "bytes=700000-", "bytes=1400000-"]
    assert sleeps == [0.5, 0.5]  # each resume made progress, so the backoff starts over


def test_broken_local_download_resumes_too(flaky):
    server = flaky(BODY, breaks=1, cut=1_000_000, local=True)
    stream = StoredStream(server.client, plain_manifest(storage="local"), sleep=lambda s: None)
    assert read_all(stream) == BODY
    stream.check()  # nothing to compare with: zfs recv checks the stream itself
    assert not stream.verifiable
    # http.client drops the partial chunk it was reading when the connection broke
    assert len(server.ranges) == 2 and server.ranges[0] is None
    assert 0 < int(server.ranges[1][6:-1]) <= 1_000_000


def test_download_that_never_recovers_gives_up_with_backoff(flaky):
    server = flaky(BODY, breaks=100, cut=0)
    sleeps = []
    stream = StoredStream(server.client, plain_manifest(), sleep=sleeps.append, retries=3)
    with pytest.raises(ServerUnreachable, match="byte 0"):
        read_all(stream)
    assert sleeps == [0.5, 1.0, 2.0]


def test_wrong_sha256_is_an_integrity_error_naming_the_key(flaky):
    server = flaky(BODY, breaks=0, sha="ab" * 32)
    stream = StoredStream(server.client, plain_manifest(sha="ab" * 32))
    read_all(stream)
    with pytest.raises(IntegrityError, match=KEY):
        stream.check()


def test_length_contradicting_the_manifest_fails_at_once(flaky):
    server = flaky(BODY, breaks=0, length_lies=True)
    with pytest.raises(IntegrityError, match="manifest records"):
        StoredStream(server.client, plain_manifest())


class FakeRecv:
    """Stands in for `zfs recv`: records what it is fed and whether it was killed."""

    def __init__(self):
        self.data, self.killed, self.finished = bytearray(), False, False

    def write(self, data):
        self.data += data

    def finish(self):
        self.finished = True

    def kill(self):
        self.killed = True


class FakeZfs:
    def __init__(self):
        self.recv = FakeRecv()

    def receive(self, target, force=False, unmounted=True, props=None):
        return self.recv


def test_damaged_stream_never_reaches_its_end(flaky):
    damaged = bytearray(BODY)
    damaged[len(damaged) // 2] ^= 1
    server = flaky(bytes(damaged), breaks=0, sha=hashlib.sha256(BODY).hexdigest())
    zfs = FakeZfs()
    with pytest.raises(IntegrityError, match=KEY):
        receive_stream(zfs, StoredStream(server.client, plain_manifest()), "tank/r", False)
    assert zfs.recv.killed and not zfs.recv.finished
    assert 0 < len(zfs.recv.data) < len(BODY)  # the tail, with the end record, was withheld


def test_good_stream_is_received_whole(flaky):
    server = flaky(BODY, breaks=1, cut=1_500_000)
    zfs = FakeZfs()
    receive_stream(zfs, StoredStream(server.client, plain_manifest(), sleep=lambda s: None),
                   "tank/r", False)
    assert zfs.recv.finished and not zfs.recv.killed and bytes(zfs.recv.data) == BODY


class StallingServer:
    """Serves /download of a zstd body: the first `sent` bytes, then nothing more, with the
    connection held open until the test ends (a server hung mid-stream)."""

    def __init__(self, body: bytes, sent: int, then_hang: bool = False):
        """`then_hang`: the first answer stops after `sent` bytes and closes; the client's
        reconnection then gets no answer at all."""
        self.gets, self.release = 0, threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.gets += 1
                if then_hang and owner.gets > 1:
                    owner.release.wait(120)  # the reconnection's answer never comes
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("X-Compression", "zstd")
                self.send_header("X-Content-SHA256", hashlib.sha256(body).hexdigest())
                self.send_header("X-Stored-Size", str(len(body)))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:sent])
                self.wfile.flush()
                if not then_hang:
                    owner.release.wait(120)
                self.close_connection = True

        class Quiet(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        # a read waits 60 s for a byte; before the fix, an interrupt waited for that, a
        # reconnection and another 60 s
        self.client = ServerClient(f"http://127.0.0.1:{self.httpd.server_port}", "client1",
                                   "k", timeout=60)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _interrupted_after(seconds: float, action) -> float:
    """Run `action` with a KeyboardInterrupt (as cli turns SIGTERM into) raised in this thread
    after `seconds`; how long it took to unwind."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGALRM, interrupt)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with pytest.raises(KeyboardInterrupt):
            action()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
    return time.monotonic() - started


@pytest.mark.parametrize("how", ["receive", "save as gzip"])
def test_an_interrupt_stops_a_zstd_restore_hung_on_the_network_at_once(how, tmp_path):
    """zstd decodes in a child fed by a thread that reads the download. When the server hung,
    an interrupt's cleanup joined that thread, which waited out the read timeout, reconnected
    and waited again: about 12 minutes with the real timeout and retries."""
    from zfsmgr.restore.save import write_stream

    body = subprocess.run(["zstd", "-q", "-c"], input=os.urandom(4 << 20), check=True,
                          capture_output=True).stdout
    server = StallingServer(body, sent=len(body) // 2)
    try:
        manifest = dataclasses.replace(plain_manifest(body), compression="zstd")
        stream = StoredStream(server.client, manifest, retries=1)
        zfs = FakeZfs()
        if how == "receive":
            took = _interrupted_after(1.5, lambda: receive_stream(zfs, stream, "tank/r", False))
            assert zfs.recv.killed and not zfs.recv.finished
            assert 0 < len(zfs.recv.data) < 4 << 20
        else:
            took = _interrupted_after(
                1.5, lambda: write_stream(stream, tmp_path / "s.zfs.gz.tmp", "gzip"))
        assert took < 30, f"the interrupt took {took:.1f} s to unwind"
        assert server.gets == 1  # no reconnection after the interrupt
        with pytest.raises(Exception, match="stopped at byte"):
            stream.read(1)
    finally:
        server.close()


def test_an_interrupt_stops_a_zstd_restore_waiting_for_a_reconnection_at_once():
    """The first connection broke mid-stream and the reconnection got no answer: no socket
    was known to cut off, so the interrupt waited the whole read timeout for it."""
    body = subprocess.run(["zstd", "-q", "-c"], input=os.urandom(4 << 20), check=True,
                          capture_output=True).stdout
    server = StallingServer(body, sent=len(body) // 2, then_hang=True)
    try:
        manifest = dataclasses.replace(plain_manifest(body), compression="zstd")
        stream = StoredStream(server.client, manifest, retries=1, sleep=lambda s: None)
        zfs = FakeZfs()
        took = _interrupted_after(2.0, lambda: receive_stream(zfs, stream, "tank/r", False))
        assert server.gets == 2  # it was reconnecting
        assert took < 30, f"the interrupt took {took:.1f} s to unwind"
        assert zfs.recv.killed and not zfs.recv.finished
    finally:
        server.close()


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_a_line_on_a_tty_and_one_summary_otherwise():
    ticks = iter([0.0, 1.0, 2.0])
    tty = Tty()
    progress = Progress("[1/1] x", total=4 << 20, stream=tty, clock=lambda: next(ticks))
    progress.advance(2 << 20)
    progress.finish("received")
    assert tty.getvalue().startswith("\r[1/1] x: 2.0 MiB of 4.0 MiB at 2.0 MiB/s, 50%, ETA 1s")
    assert tty.getvalue().endswith("received, 2.0 MiB in 2.0s (1.0 MiB/s)\x1b[K\n")
    log = io.StringIO()
    ticks = iter([0.0, 1.0, 4.0])
    progress = Progress("[1/1] x", stream=log, clock=lambda: next(ticks))
    progress.advance(4 << 20)
    progress.finish("done")
    assert log.getvalue() == "[1/1] x: done, 4.0 MiB in 4.0s (1.0 MiB/s)\n"


# --- end to end on zfs-fuse -------------------------------------------------------------------

BACKENDS = ["dir", "s3", "local"]


@pytest.fixture
def rpool(zfs_daemon):
    """A zfs-fuse pool of our own (prefix zrst)."""
    pool = rig.Pool(prefix="zrst")
    yield pool
    pool.destroy()


class Backups:
    """A source dataset backed up three times (full, incremental, incremental)."""

    def __init__(self, pool, server, run):
        self.pool, self.server, self.run_zfsmgr = pool, server, run
        self.source = pool.create("data")
        self.env = {**server.client_env, "LOCAL_DATASET": self.source}
        self.trees = []  # file digests after backup 1, 2, 3 (list numbers 3, 2, 1)
        folder = pool.mountpoint(self.source)
        for round_ in (1, 2, 3):
            rig.write_files(folder, round_, count=3, size=150_000)
            if round_ == 3:
                (folder / "f1_0.bin").unlink()  # deletions must replay too
                os.sync()
            if self.trees:
                time.sleep(1.1)  # a new snapshot name (seconds) for each backup
            self.run_zfsmgr(["client", "backup"], env=self.env, check=True)
            self.trees.append(rig.tree_digest(folder))

    def restore(self, *args, check=False):
        return self.run_zfsmgr(["restore", *args], env=self.server.client_env, check=check)

    def tree_of_number(self, number: int) -> dict:
        return self.trees[len(self.trees) - number]

    def tree(self, dataset: str) -> dict:
        return rig.tree_digest(self.pool.mountpoint(dataset))

    def listing(self) -> list:
        return json.loads(self.restore("list", "--json", check=True).stdout)

    def object_path(self, number: int) -> Path:
        key = self.listing()[number - 1]["key"]
        return self.server.storage_dir / key


@pytest.fixture(params=BACKENDS)
def backups(request, rpool, server_factory, run_zfsmgr):
    storage = request.param
    base = ""
    if storage == "local":
        base = f"{rpool.name}/server"
        rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory(storage=storage, base_dataset=base)
    return Backups(rpool, server, run_zfsmgr)


def datasets(pool) -> set:
    return set(rig.sh("zfs", "list", "-H", "-o", "name", "-r", pool.name).split())


@pytest.mark.zfs
def test_list_numbers_newest_first(backups):
    rows = backups.listing()
    assert [r["number"] for r in rows] == [1, 2, 3]
    assert [r["type"] for r in rows] == ["incremental", "incremental", "full"]
    assert rows[0]["parent"] == rows[1]["snapshot"] and rows[1]["parent"] == rows[2]["snapshot"]
    table = backups.restore("list", check=True).stdout.splitlines()
    assert table[0].split() == ["#", "Snapshot", "ID", "Timestamp", "Size", "Type", "Dataset"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2", "3"]
    assert table[1].split()[1] == rows[0]["id"] == rows[0]["key"].rsplit(".zfs", 1)[0]
    only = json.loads(backups.restore("list", "--json", "--dataset", "nopool/none",
                                      check=True).stdout)
    assert only == []


@pytest.mark.zfs
def test_restore_each_number_and_latest(backups):
    pool = backups.pool.name
    for number in (1, 2, 3):
        target = f"{pool}/restored/n{number}"  # the parent is created too
        done = backups.restore("restore", str(number), target)
        assert done.returncode == 0, done.stderr
        assert backups.tree(target) == backups.tree_of_number(number), number
    done = backups.restore("latest", f"{pool}/latest", "--source-dataset", backups.source)
    assert done.returncode == 0, done.stderr
    assert backups.tree(f"{pool}/latest") == backups.trees[-1]


@pytest.mark.zfs
def test_existing_dataset_needs_force(backups):
    pool = backups.pool.name
    target = f"{pool}/target"
    backups.restore("restore", "3", target, check=True)
    before = backups.tree(target)
    assert before == backups.trees[0]
    refused = backups.restore("restore", "1", target)
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert backups.tree(target) == before
    done = backups.restore("restore", "1", target, "--force")
    assert done.returncode == 0, done.stderr
    assert backups.tree(target) == backups.trees[-1]
    assert {d for d in datasets(backups.pool) if d.startswith(target)} == {target}
    done = backups.restore("latest", target, "-f")
    assert done.returncode == 0, done.stderr
    assert backups.tree(target) == backups.trees[-1]


@pytest.mark.zfs
def test_a_force_that_cannot_replace_leaves_the_old_dataset_whole(backups):
    """--force destroyed the old dataset before its replacement went in: when zfs refused
    (here a held snapshot of it), its children were gone already and the restored copy was
    undone too: neither the old tree nor the restore. The old one is moved aside first now,
    the restored one put in its place, and the old one destroyed last; what zfs keeps of it
    (the held snapshot) stays, renamed, and the warning says where."""
    pool = backups.pool.name
    target = f"{pool}/kept"
    backups.restore("restore", "3", target, check=True)
    rig.sh("zfs", "create", f"{target}/child")
    rig.sh("zfs", "snapshot", f"{target}/child@keep")
    rig.sh("zfs", "snapshot", f"{target}@mine")
    rig.sh("zfs", "hold", "mine", f"{target}@mine")
    before = datasets(backups.pool)
    done = backups.restore("restore", "1", target, "--force")
    assert done.returncode == 0, done.stderr
    assert backups.tree(target) == backups.trees[-1]
    old = [d for d in datasets(backups.pool) if "-zfsmgr-old-" in d]
    assert len(old) == 1 and f"the old {target} stays as {old[0]}" in done.stderr, done.stderr
    assert {d for d in before if d.startswith(target)} == {target, f"{target}/child"}
    assert {d for d in datasets(backups.pool) if d.startswith(target + "/")} == set()
    rig.sh("zfs", "release", "mine", f"{old[0]}@mine")  # the user's hold was kept
    rig.wait_until(lambda: not rig.sh("zfs", "destroy", "-r", old[0], check=False)
                   and old[0] not in datasets(backups.pool), 30, "the old copy destroyed",
                   interval=1)  # zfs-fuse: busy a moment after the renames


@pytest.mark.zfs
def test_save_then_gunzip_into_zfs_recv(backups, tmp_path):
    pool = backups.pool.name
    saved = tmp_path / "latest.zfs.gz"
    local = backups.listing()[0]["storage_type"] == "local"
    number = "1" if local else "3"  # a self-contained stream: local serves any backup whole
    done = backups.restore("save", number, str(saved))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "a-folder"  # --force over a directory: it downloaded it all, then
    folder.mkdir()  # failed as an internal error
    done = backups.restore("save", number, str(folder), "--force")
    assert done.returncode == 2 and "is a directory" in done.stderr, done.stderr
    assert "saved" not in done.stderr and list(tmp_path.glob(".a-folder*")) == []
    _gunzip_into(saved, f"{pool}/fromfile")
    assert backups.tree(f"{pool}/fromfile") == backups.tree_of_number(int(number))
    # the whole chain of the newest backup, received in the order of the names
    done = backups.restore("save", "1", str(tmp_path / "chain"), "--chain")
    assert done.returncode == 0, done.stderr
    parts = sorted(tmp_path.glob("chain.*.zfs.gz"))
    assert len(parts) == (1 if local else 3)
    for part in parts:
        _gunzip_into(part, f"{pool}/fromchain")
    assert backups.tree(f"{pool}/fromchain") == backups.trees[-1]
    assert not list(tmp_path.glob(".*.tmp"))


def _gunzip_into(path: Path, dataset: str) -> None:
    gunzip = subprocess.Popen(["gunzip", "-c", str(path)], stdout=subprocess.PIPE)
    recv = subprocess.run(["zfs", "recv", "-F", dataset], stdin=gunzip.stdout, check=False,
                          capture_output=True)
    gunzip.stdout.close()
    assert gunzip.wait() == 0 and recv.returncode == 0, recv.stderr


@pytest.mark.zfs
def test_verify_all_and_receive_into_scratch(backups):
    pool = backups.pool.name
    before = datasets(backups.pool)
    done = backups.restore("verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all well" in done.stdout
    done = backups.restore("verify", "1", "--receive", f"{pool}/scratch/check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert datasets(backups.pool) == before  # the scratch dataset and its parent are gone
    reports = backups.server.log().count("verify report")
    # a scratch on no pool: the host's mistake, not a failed backup for the server to record
    done = backups.restore("verify", "1", "--receive", "nopool/scratch")
    assert done.returncode == 1 and "there is no pool nopool" in done.stderr, done.stderr
    assert backups.server.log().count("verify report") == reports


@pytest.mark.zfs
def test_mount_errors_and_success(backups):
    pool = backups.pool
    backups.restore("restore", "1", f"{pool.name}/m", check=True)
    there = pool.dir / "view"
    done = backups.restore("mount", f"{pool.name}/m", str(there))
    assert done.returncode == 0, done.stderr
    assert rig.tree_digest(there) == backups.trees[-1]
    busy = pool.dir / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    done = backups.restore("mount", f"{pool.name}/m", str(busy))
    assert done.returncode == 1 and "busy" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = backups.restore("mount", f"{pool.name}/absent", str(pool.dir / "other"))
    assert done.returncode == 1 and "no dataset" in done.stderr


# --- damage -----------------------------------------------------------------------------------

def flip_byte(backups: Backups, number: int) -> str:
    """Flip one byte in the middle of stored backup `number`; return its key."""
    row = backups.listing()[number - 1]
    if row["storage_type"] == "dir":
        path = backups.server.storage_dir / row["key"]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        s3 = backups.server.s3
        client = s3["seaweed"].client()
        response = client.get_object(s3["bucket"], row["key"])
        data = bytearray(response.read())
        response.close()
        data[len(data) // 2] ^= 0x01
        client.put_object(s3["bucket"], row["key"], io.BytesIO(bytes(data)), len(data))
    return row["key"]


@pytest.fixture(params=["dir", "s3"])
def stored_backups(request, rpool, server_factory, run_zfsmgr):
    return Backups(rpool, server_factory(storage=request.param), run_zfsmgr)


@pytest.mark.zfs
def test_flipped_byte_is_reported_by_name_and_leaves_nothing(stored_backups):
    backups = stored_backups
    pool = backups.pool.name
    key = flip_byte(backups, 2)  # the middle of the chain: the full base is received first
    before = datasets(backups.pool)
    done = backups.restore("restore", "1", f"{pool}/new/bad")
    assert done.returncode == 5, done.stderr
    assert key in done.stderr and "damaged" in done.stderr
    assert datasets(backups.pool) == before  # neither the target nor its parent stay
    done = backups.restore("verify")
    assert done.returncode == 5 and key in done.stdout + done.stderr
    done = backups.restore("verify", "2", "--receive", f"{pool}/scratch")
    assert done.returncode == 5 and key in done.stdout + done.stderr
    assert datasets(backups.pool) == before
    done = backups.restore("save", "2", str(backups.pool.dir / "bad.zfs.gz"))
    assert done.returncode == 5 and key in done.stderr
    assert not (backups.pool.dir / "bad.zfs.gz").exists()
    assert not list(backups.pool.dir.glob(".bad*"))
    done = backups.restore("verify", "3")  # the full base alone is fine
    assert done.returncode == 0, done.stdout + done.stderr
    done = backups.restore("restore", "3", f"{pool}/good")
    assert done.returncode == 0, done.stderr
    assert backups.tree(f"{pool}/good") == backups.trees[0]
    # --force over it with the damaged chain: the existing dataset is kept as it was
    done = backups.restore("restore", "1", f"{pool}/good", "--force")
    assert done.returncode == 5 and key in done.stderr
    assert backups.tree(f"{pool}/good") == backups.trees[0]
    assert {d for d in datasets(backups.pool) if "good" in d} == {f"{pool}/good"}


@pytest.mark.zfs
def test_missing_link_is_refused_before_receiving(rpool, server_factory, run_zfsmgr):
    backups = Backups(rpool, server_factory(storage="dir"), run_zfsmgr)
    row = backups.listing()[1]
    (backups.server.storage_dir / (row["key"] + ".manifest.json")).unlink()
    (backups.server.storage_dir / row["key"]).unlink()
    backups.run_zfsmgr(["server", "reindex"], env=backups.server.env,
                       cwd=backups.server.workdir, check=True)
    before = datasets(rpool)
    done = backups.restore("restore", "1", f"{rpool.name}/gap")
    assert done.returncode == 5
    assert f"{row['dataset']}@{row['snapshot']}" in done.stderr
    assert "[1/" not in done.stderr  # no stream was started
    assert datasets(rpool) == before
    # the running server and a new process (the timer's `server rotate`) share one catalog
    rig.write_files(rpool.mountpoint(backups.source), 4, count=1, size=50_000)
    time.sleep(1.1)
    backups.run_zfsmgr(["client", "backup"], env=backups.env, check=True)
    clients = backups.run_zfsmgr(["server", "clients", "--json"], env=backups.server.env,
                                 cwd=backups.server.workdir, check=True)
    counted = json.loads(clients.stdout)["clients"][0]["backups"]
    assert counted == len(backups.listing()) == 3


@pytest.mark.zfs
def test_zfs_recv_never_completes_a_stream_that_fails_its_checksum(rpool, flaky):
    """An intact zfs stream whose stored sha256 does not match: no dataset may appear, even
    without any clean-up, because `zfs recv` never gets the stream's end."""
    source = rpool.create("src")
    rig.write_files(rpool.mountpoint(source), 7, count=2, size=1_500_000)
    rig.sh("zfs", "snapshot", f"{source}@s1")
    stream = subprocess.run(["zfs", "send", f"{source}@s1"], capture_output=True,
                            check=True).stdout
    assert len(stream) > 2 * (1 << 20)  # more than one chunk: some of it does reach zfs recv
    server = flaky(stream, breaks=0, sha="0" * 64)
    manifest = plain_manifest(stream, sha="0" * 64)
    with pytest.raises(IntegrityError, match=KEY):
        receive_stream(Zfs(), StoredStream(server.client, manifest), f"{rpool.name}/r", False)
    for _ in range(40):  # zfs-fuse tears an aborted receive down in its daemon
        if f"{rpool.name}/r" not in datasets(rpool):
            break
        time.sleep(0.25)
    assert f"{rpool.name}/r" not in datasets(rpool)
    # the same bytes with the right checksum go through
    server = flaky(stream, breaks=0)
    receive_stream(Zfs(), StoredStream(server.client, plain_manifest(stream)),
                   f"{rpool.name}/r", False)
    assert rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r",
                  f"{rpool.name}/r").split() == [f"{rpool.name}/r@s1"]
