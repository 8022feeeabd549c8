"""One contract test class, run against every storage backend on real parts."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import pytest

import rig
from zfsmgr.errors import ValidationError
from zfsmgr.protocol import Manifest
from zfsmgr.storage.base import NotFound, StorageError
from zfsmgr.storage.directory import DirectoryStore


def _read(reader) -> bytes:
    out = []
    while True:
        chunk = reader.read(1 << 16)
        if not chunk:
            break
        out.append(chunk)
    reader.close()
    return b"".join(out)


@pytest.fixture(params=["dir", pytest.param("s3", marks=pytest.mark.s3),
                        pytest.param("local", marks=pytest.mark.zfs)])
def backend(request, tmp_path):
    """A store of each backend; `store.spec` rebuilds it in another process (a restart)."""
    kind = request.param
    if kind == "dir":
        spec = ("zfsmgr.storage.directory:DirectoryStore", [str(tmp_path / "store")])
    elif kind == "s3":
        s3 = request.getfixturevalue("s3")
        spec = ("zfsmgr.storage.s3:S3Store",
                [s3["endpoint"], s3["access_key"], s3["secret_key"], s3["bucket"], False])
    else:
        pool = request.getfixturevalue("pool")
        base = f"{pool.name}/srv"
        rig.sh("zfs", "create", "-o", "mountpoint=none", base)
        spec = ("zfsmgr.storage.zfslocal:ZfsLocalStore", [base, str(tmp_path / "staging")])
    store = _build(spec)
    store.check()
    store.spec = spec
    yield store


def _build(spec):
    module, name = spec[0].split(":")
    return getattr(importlib.import_module(module), name)(*spec[1])


@pytest.fixture
def streams(request):
    """A full and an incremental gzip'd zfs send stream from a real zfs-fuse dataset."""
    pool = request.getfixturevalue("pool")
    ds = pool.create(f"src{uuid.uuid4().hex[:4]}")
    rig.write_files(pool.mountpoint(ds), seed=1, count=2)
    rig.sh("zfs", "snapshot", f"{ds}@a")
    rig.write_files(pool.mountpoint(ds), seed=2, count=2)
    rig.sh("zfs", "snapshot", f"{ds}@b")
    full = subprocess.run(["zfs", "send", f"{ds}@a"], capture_output=True, check=True).stdout
    inc = subprocess.run(["zfs", "send", "-i", f"{ds}@a", f"{ds}@b"], capture_output=True,
                         check=True).stdout
    return ds, gzip.compress(full, 1, mtime=0), gzip.compress(inc, 1, mtime=0), pool


@pytest.fixture
def payload(backend, request):
    """(full, incremental) stored bytes for the backend: a real zfs send stream where the
    store receives it (`local`), synthetic bytes where it only keeps them (dir, S3: no zfs)."""
    if backend.receives_streams:
        _, full, inc, _ = request.getfixturevalue("streams")
        return full, inc
    rng = random.Random(7)
    full = gzip.compress(rng.randbytes(13 << 20), 1, mtime=0)  # over two 5 MiB S3 parts
    inc = gzip.compress(rng.randbytes(300_000) + b"text " * 50_000, 1, mtime=0)
    return full, inc


def manifest(key, data, snapshot, parent=None, kind="dir"):
    return Manifest(key=key, client_id="c1", dataset="tank/data", snapshot=snapshot,
                    type="incremental" if parent else "full", parent=parent,
                    compression="gzip", raw_size=len(gzip.decompress(data)),
                    stored_size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    created="2024-02-13T14:30:00+00:00", snapshot_time=1707834600.0,
                    storage_type=kind)


def stage(store, upload_id, data, part=1 << 20, first=0):
    parts = [data[i:i + part] for i in range(0, len(data), part)] if part else [data]
    for index, chunk in enumerate(parts[first:], start=first):
        info = store.stage_part(upload_id, index, io.BytesIO(chunk), len(chunk))
        assert info.crc32 == f"{zlib.crc32(chunk):08x}" and info.size == len(chunk)
    return parts


FULL_KEY = "c1/tank_data_2024-02-13_14:30:00.zfs.gz"
# stages two parts in a process of its own, which then ends without any cleanup (os._exit)
RESTART = """
import io, json, os, sys
sys.path.insert(0, sys.argv[1])
from importlib import import_module
from zfsmgr.protocol import Manifest
spec, upload_id, path, size = json.loads(sys.argv[2])
module, name = spec[0].split(":")
store = getattr(import_module(module), name)(*spec[1])
store.check()
data = open(path, "rb").read()
store.begin(upload_id, Manifest.from_dict(json.loads(sys.argv[3])))
for index in (0, 1):
    chunk = data[index * size:(index + 1) * size]
    store.stage_part(upload_id, index, io.BytesIO(chunk), len(chunk))
os._exit(0)
"""


def _part_size(store) -> int:
    return max(store.min_part_size, 64 << 10)


class TestStoreContract:
    """What every Store must do (zfsmgr.storage.base)."""

    def test_staged_parts_survive_and_commit_publishes(self, backend, payload):
        full, _ = payload
        upload_id = uuid.uuid4().hex
        m = manifest(FULL_KEY, full, "a", kind=backend.kind)
        backend.begin(upload_id, m)
        parts = stage(backend, upload_id, full, _part_size(backend))
        assert [p.index for p in backend.staged_parts(upload_id)] == list(range(len(parts)))
        assert list(backend.manifests("c1")) == []  # nothing visible before commit
        m = backend.commit(upload_id, m)
        assert backend.staged_parts(upload_id) == []
        assert [x.key for x in backend.manifests("c1")] == [m.key]
        download = backend.open(m)
        data = _read(download.reader)
        assert download.info == backend.describe(m)
        if backend.receives_streams:  # a fresh full send of the received snapshot
            assert data[:16] == gzip.decompress(full)[:16]
            assert (download.info.sha256, download.info.size, download.info.ranged) == \
                ("", None, False) and download.info.self_contained
        else:
            assert data == full
            assert download.info.sha256 == m.sha256 and download.info.size == len(full)
            download = backend.open(m, 100)
            assert _read(download.reader) == full[100:] and download.length == len(full) - 100
            assert download.info.ranged

    def test_a_restarted_store_continues_what_the_last_process_staged(self, backend, payload,
                                                                      tmp_path):
        full, _ = payload
        upload_id, size = uuid.uuid4().hex, _part_size(backend)
        m = manifest(FULL_KEY, full, "a", kind=backend.kind)
        (tmp_path / "stream").write_bytes(full)
        subprocess.run([sys.executable, "-c", RESTART, str(rig.ROOT),
                        json.dumps([list(backend.spec), upload_id, str(tmp_path / "stream"),
                                    size]), json.dumps(m.to_dict())], check=True, timeout=300)
        restarted = _build(backend.spec)  # a new server process: nothing in memory
        restarted.check()
        held = restarted.staged_parts(upload_id)
        if backend.receives_streams:
            # the receive died with the process: zfs kept a resume token, or it starts over
            assert held == [] or restarted.resume_token(upload_id)
            if held:  # resuming takes a `zfs send -t` stream (the OpenZFS tier): start over
                restarted.discard(upload_id)
                restarted.begin(upload_id, m)
            first = 0
        else:
            assert [(p.index, p.size, p.crc32) for p in held] == [
                (i, size, f"{zlib.crc32(full[i * size:(i + 1) * size]):08x}") for i in (0, 1)]
            first = 2
        assert upload_id in dict(restarted.staged_uploads())
        stage(restarted, upload_id, full, size, first=first)
        m = restarted.commit(upload_id, m)
        data = _read(restarted.open(m).reader)
        assert data == full if not backend.receives_streams else \
            data[:16] == gzip.decompress(full)[:16]

    def test_incremental_on_its_parent_then_delete(self, backend, payload, request):
        full, inc = payload
        keys = []
        for snapshot, data, parent, stamp in (("a", full, None, "14:30:00"),
                                              ("b", inc, "a", "15:30:00")):
            upload_id = uuid.uuid4().hex
            m = manifest(f"c1/tank_data_2024-02-13_{stamp}.zfs.gz", data, snapshot, parent,
                         backend.kind)
            backend.begin(upload_id, m)
            stage(backend, upload_id, data, 0)
            keys.append(backend.commit(upload_id, m))
        assert [m.snapshot for m in sorted(backend.manifests("c1"), key=lambda m: m.key)] == \
            ["a", "b"]
        data = _read(backend.open(keys[1]).reader)
        if backend.receives_streams:  # the newest restores alone, from its own full send
            pool = request.getfixturevalue("pool")
            subprocess.run(["zfs", "recv", "-u", f"{pool.name}/check"], input=data, check=True)
            assert backend.describe(keys[1]).self_contained
        else:  # the stored bytes, as they came; the incremental needs its parent
            assert data == inc and _read(backend.open(keys[0]).reader) == full
            assert not backend.describe(keys[1]).self_contained
        backend.delete(keys[1])
        backend.delete(keys[0])
        backend.delete(keys[0])  # gone already: not an error
        assert list(backend.manifests("c1")) == []
        with pytest.raises(NotFound):
            backend.open(keys[0]).reader.read(1)

    def test_discard_leaves_nothing(self, backend, payload):
        full, _ = payload
        upload_id = uuid.uuid4().hex
        backend.begin(upload_id, manifest(FULL_KEY, full, "a", kind=backend.kind))
        stage(backend, upload_id, full[:200_000], 0)
        assert upload_id in dict(backend.staged_uploads())
        backend.discard(upload_id)
        assert backend.staged_parts(upload_id) == []
        assert upload_id not in dict(backend.staged_uploads())
        backend.discard(upload_id)  # unknown: ignored

    def test_parts_must_arrive_in_order_and_last_may_be_resent(self, backend, payload):
        full, _ = payload
        upload_id = uuid.uuid4().hex
        chunk = full[:6 << 20] if backend.kind == "s3" else full[:1000]
        backend.begin(upload_id, manifest(FULL_KEY, full, "a", kind=backend.kind))
        backend.stage_part(upload_id, 0, io.BytesIO(chunk), len(chunk))
        with pytest.raises(StorageError, match="out of order"):
            backend.stage_part(upload_id, 2, io.BytesIO(b"x"), 1)
        backend.stage_part(upload_id, 0, io.BytesIO(chunk), len(chunk))  # resend
        assert len(backend.staged_parts(upload_id)) == 1
        with pytest.raises(StorageError):
            backend.stage_part(upload_id, 1, io.BytesIO(b"short"), 10)  # truncated body
        backend.discard(upload_id)


def test_directory_store_keys_cannot_escape(tmp_path):
    store = DirectoryStore(str(tmp_path / "root"))
    for key in ("../x", "/etc/passwd", "c1/../../x", ".uploads/abc"):
        with pytest.raises(StorageError):
            store._path(key)


def test_expiry_discards_abandoned_uploads_and_incomplete_multipart(backend, tmp_path):
    uploads = rig.uploads(tmp_path)
    orphan = uuid.uuid4().hex  # staged data whose session file was lost
    if backend.kind == "local":  # a receive prepared for a session that is gone
        backend.begin(orphan, manifest("c1/tank_data_2024-02-13_14:30:00.zfs.gz",
                                       gzip.compress(b""), "a", kind="local"))
    else:
        backend.stage_part(orphan, 0, io.BytesIO(b"x" * 1000), 1000)
    pending = None
    if backend.kind == "s3":  # a part upload that died half way: only a multipart upload
        from zfsmgr.storage.s3 import STAGING

        pending = uuid.uuid4().hex
        key = f"{STAGING}{pending}/part-000000"
        backend.client._create_multipart_upload(backend.bucket, key, {})
    assert orphan in dict(backend.staged_uploads())
    assert uploads.expire({backend.kind: backend}) == []  # young: kept
    expired = uploads.expire({backend.kind: backend}, now=time.time() + 7200)
    assert orphan in expired and (pending is None or pending in expired)
    assert backend.staged_uploads() == []


def test_staged_parts_lost_to_a_power_cut_are_dropped_not_committed(tmp_path):
    """Parts are not fsync'd one by one: after a power cut the list may name bytes the disk
    lost. The next server process reads the staged data back against the CRC-32s, keeps the
    intact parts and takes the rest again."""
    data = gzip.compress(random.Random(5).randbytes(240_000), 1, mtime=0)  # four parts
    store = DirectoryStore(str(tmp_path / "store"))
    upload_id = uuid.uuid4().hex
    parts = stage(store, upload_id, data, 64 << 10)
    staged = tmp_path / "store" / ".uploads" / upload_id / "data"
    with open(staged, "r+b") as damaged:  # part 2's bytes never reached the disk
        damaged.seek(2 * (64 << 10) + 5)
        damaged.write(b"\0" * 100)
    assert [p.index for p in store.staged_parts(upload_id)] == [0, 1, 2, 3]  # this process
    restarted = DirectoryStore(str(tmp_path / "store"))  # wrote them: it vouches for them
    assert [p.index for p in restarted.staged_parts(upload_id)] == [0, 1]
    for index in (2, 3):
        restarted.stage_part(upload_id, index, io.BytesIO(parts[index]), len(parts[index]))
    m = restarted.commit(upload_id, manifest("c1/tank_data_2024-02-13_14:30:00.zfs.gz", data, "a"))
    reader = restarted.open(m).reader
    assert _read(reader) == data


def test_a_committed_object_does_not_stay_in_the_page_cache(tmp_path):
    """Stored streams are written once and read rarely: the directory store drops their pages
    once they are on disk, so they do not crowd the server's memory (fincore, util-linux)."""
    assert shutil.which("fincore"), "fincore (util-linux) is needed to see the page cache"
    rig.WORK.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pagecache-", dir=rig.WORK))  # on disk, not /tmp
    kind = _filesystem(root)
    assert kind not in ("tmpfs", "ramfs"), f"{root} is on {kind}: its pages never leave memory"
    try:
        data = gzip.compress(random.Random(6).randbytes(24 << 20), 1, mtime=0)
        store = DirectoryStore(str(root / "store"))
        upload_id = uuid.uuid4().hex
        stage(store, upload_id, data, 4 << 20)  # the last window may be dirty still
        m = store.commit(upload_id, manifest("c1/tank_data_2024-02-13_14:30:00.zfs.gz", data,
                                             "a"))
        stored = root / "store" / m.key
        assert _cached_bytes(stored) == 0
        reader = store.open(m).reader
        assert _read(reader) == data
        assert _cached_bytes(stored) > 0  # the check can see cached pages at all
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount, fstype = fields[4], fields[fields.index("-") + 1]
        if (str(path) + "/").startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind


def _cached_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.zfs
def test_local_store_refuses_a_damaged_stream_and_leaves_nothing(pool, tmp_path, streams):
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    _, full, _, _ = streams
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    store = ZfsLocalStore(base, str(tmp_path / "staging"))
    store.check()
    upload_id = uuid.uuid4().hex
    m = manifest("c1/tank_data_2024-02-13_14:30:00.zfs.gz", full, "a", kind="local")
    store.begin(upload_id, m)
    damaged = bytearray(full)
    damaged[len(damaged) // 2] ^= 0xFF  # gzip's CRC or zfs's checksum catches it
    # gzip's CRC or zfs's checksums: the sender's stream is bad (400, before: 503)
    with pytest.raises(ValidationError, match="does not decompress|refused the stream"):
        stage(store, upload_id, bytes(damaged), 64 << 10)
        store.commit(upload_id, m)
    store.discard(upload_id)
    assert store.staged_uploads() == [] and list(store.manifests()) == []
    left = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", base).split()
    assert [name for name in left if name.endswith("/a") or "@" in name] == []


@pytest.mark.parametrize("kind", ["dir", pytest.param("local", marks=pytest.mark.zfs)])
def test_a_part_sent_twice_still_commits(kind, tmp_path, request):
    """The client resends a part whose answer it lost: the server keeps one copy, and the
    commit's part checksum matches."""
    from zfsmgr.server.clients import ClientConfig
    from zfsmgr.server.uploads import Conflict
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    if kind == "local":
        _, full, _, pool = request.getfixturevalue("streams")
    else:  # the directory store keeps bytes: synthetic ones will do, no zfs needed
        full = gzip.compress(random.Random(8).randbytes(200_000), 1, mtime=0)
    if kind == "local":
        rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/srv")
        store = ZfsLocalStore(f"{pool.name}/srv", str(tmp_path / "staging"))
    else:
        store = DirectoryStore(str(tmp_path / "store"))
    store.check()
    uploads = rig.uploads(tmp_path)
    half = uploads.part_base = (len(full) + 1) // 2  # two parts, the first of the schedule's
    client = ClientConfig("c1", "0" * 64)
    session = uploads.open(client, store, {"dataset": "tank/data", "snapshot": "a",
                                           "type": "full", "compression": "gzip",
                                           "snapshot_time": 1707834600.0})
    assert session.part_base == half
    pieces = [full[:half], full[half:]]
    for index in (0, 0, 1, 1):  # each part twice
        uploads.put_part(client, store, session, index, io.BytesIO(pieces[index]),
                         len(pieces[index]), segment=0)
    with pytest.raises(Conflict, match="belongs to the stream from part 3"):
        uploads.put_part(client, store, session, 2, io.BytesIO(b"x"), 1, segment=3)
    manifest = uploads.commit(client, store, session, {
        "sha256": hashlib.sha256(full).hexdigest(), "stored_size": len(full),
        "raw_size": len(gzip.decompress(full)),
        "parts_crc32": rig.parts_crc32(pieces)})
    assert manifest.parts == 2 and [m.key for m in store.manifests("c1")] == [manifest.key]


@pytest.mark.zfs
def test_local_store_begins_the_first_uploads_of_a_new_client_at_once(pool, tmp_path,
                                                                      streams):
    """A run's parallel datasets open their first uploads together: each needs the client's
    home, and `zfs create -p` of it by two at once failed one ("dataset already exists")."""
    import threading

    from zfsmgr.storage.zfslocal import ZfsLocalStore

    _, full, _, _ = streams
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/srv")
    store = ZfsLocalStore(f"{pool.name}/srv", str(tmp_path / "staging"))
    store.check()
    for client in ("c1", "c2", "c3"):
        start, failed = threading.Barrier(4), []

        def begin(i):
            m = manifest(f"{client}/tank_d{i}_2024-02-13_14:30:00.zfs.gz", full, "a",
                         kind="local")
            m = dataclasses.replace(m, client_id=client, dataset=f"tank/d{i}")
            start.wait()
            try:
                store.begin(uuid.uuid4().hex, m)
            except Exception as exc:  # noqa: BLE001 - the test reports any
                failed.append(exc)

        threads = [threading.Thread(target=begin, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failed == []
        homes = rig.sh("zfs", "list", "-H", "-o", "name", "-d", "1",
                       f"{pool.name}/srv/{client}").split()
        assert len(homes) == 5, homes  # the client's home and a chain folder per dataset


@pytest.mark.zfs
def test_local_store_refuses_an_incremental_that_would_fork_its_chain(pool, tmp_path, streams):
    """A base older than the chain's newest backup: a clear 409, never `recv -F` (which would
    destroy the newer, committed backups)."""
    from zfsmgr.storage.base import Unsupported
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    _, full, inc, _ = streams
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/srv")
    store = ZfsLocalStore(f"{pool.name}/srv", str(tmp_path / "staging"))
    store.check()
    for snapshot, data, parent, stamp in (("a", full, None, "14:30:00"),
                                          ("b", inc, "a", "15:30:00")):
        upload_id = uuid.uuid4().hex
        m = manifest(f"c1/tank_data_2024-02-13_{stamp}.zfs.gz", data, snapshot, parent, "local")
        store.begin(upload_id, m)
        stage(store, upload_id, data, 0)
        store.commit(upload_id, m)
    fork = manifest("c1/tank_data_2024-02-13_16:30:00.zfs.gz", inc, "c", "a", "local")
    with pytest.raises(Unsupported, match="newer than the base a"):
        store.begin(uuid.uuid4().hex, fork)
    assert [m.snapshot for m in sorted(store.manifests("c1"), key=lambda m: m.key)] == ["a", "b"]


def test_local_store_reads_one_manifest_from_its_dataset_alone(pool, tmp_path, streams):
    """read_manifest (an abort, an expiry, a commit asked again) listed the client's whole
    home: every dataset's chains, and one damaged manifest anywhere failed them all. It reads
    the key's dataset only."""
    import dataclasses

    from zfsmgr.storage.zfschains import MANIFEST_PROP
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    _, full, _, _ = streams
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/srv")
    store = ZfsLocalStore(f"{pool.name}/srv", str(tmp_path / "staging"))
    store.check()
    mine = manifest(FULL_KEY, full, "a", kind="local")
    other = dataclasses.replace(mine, key="c1/tank_aaa_2024-02-13_14:30:00.zfs.gz",
                                dataset="tank/aaa")
    for m in (other, mine):
        upload_id = uuid.uuid4().hex
        store.begin(upload_id, m)
        stage(store, upload_id, full, 0)
        store.commit(upload_id, m)
    [damaged] = [n for n in rig.sh("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r",
                                   f"{pool.name}/srv").split() if "/tank_aaa/" in n]
    rig.sh("zfs", "set", f"{MANIFEST_PROP}={{", damaged)
    with pytest.raises(StorageError, match="unreadable"):
        list(store.manifests("c1"))  # the damage is there for whoever lists the home
    assert store.read_manifest(FULL_KEY).snapshot == "a"
    with pytest.raises(NotFound):
        store.read_manifest("c1/tank_data_2024-02-13_15:30:00.zfs.gz")


@pytest.mark.zfs
def test_local_store_lists_the_backups_of_a_home_deep_below_its_base(pool, tmp_path, streams):
    """A client whose `dataset` is two levels below ZFS_BASE_DATASET (backup/hosts/web1): the
    listing of every client (`server reindex`, the catalog's refresh) reached four levels from
    the base, one short of its snapshots, and its backups vanished from the catalog."""
    import dataclasses

    from zfsmgr.storage.zfslocal import ZfsLocalStore

    _, full, _, _ = streams
    base = f"{pool.name}/srv"
    rig.sh("zfs", "create", "-o", "mountpoint=none", base)
    rig.sh("zfs", "create", "-p", "-o", "mountpoint=none", f"{base}/hosts/web1")
    rig.sh("zfs", "create", "-o", "mountpoint=none", f"{pool.name}/elsewhere")
    homes = {"web1": f"{base}/hosts/web1", "far": f"{pool.name}/elsewhere"}
    store = ZfsLocalStore(base, str(tmp_path / "staging"), homes=lambda: homes)
    store.check()
    mine = manifest(FULL_KEY, full, "a", kind="local")
    committed = [dataclasses.replace(mine, client_id=client, key=client + FULL_KEY[2:])
                 for client in ("web1", "far", "c1")]
    for m in committed:
        upload_id = uuid.uuid4().hex
        store.begin(upload_id, m)
        stage(store, upload_id, full, 0)
        store.commit(upload_id, m)
    listed = [m.key for m in store.manifests()]
    assert sorted(listed) == sorted(m.key for m in committed)  # each once
    assert [m.key for m in store.manifests("web1")] == [committed[0].key]
