"""zfsmgr on real OpenZFS 2.3: bookmarks, estimates, raw and compressed sends, resumed
receives (`recv -s` + `send -t`) and discarded ones (`recv -A`).

Runs inside the VM tier (tests/openzfs/run-tier.sh); the server and client are the .pyz the host
built, started as real processes, exactly as on a user's machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pytest  # noqa: E402
import rig  # noqa: E402


def sh(*argv, input=None):
    proc = subprocess.run(list(argv), capture_output=True, input=input)
    assert proc.returncode == 0, f"{argv}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def write(folder, seed, size=300_000):
    return rig.write_files(Path(folder), seed=seed, count=2, size=size)


def mounted_files(dataset):
    if sh("zfs", "get", "-H", "-o", "value", "mounted", dataset).strip() != "yes":
        sh("zfs", "mount", dataset)
    return rig.tree_digest(Path(sh("zfs", "get", "-H", "-o", "value", "mountpoint",
                                   dataset).strip()))


def backup(run_zfsmgr, server, dataset, *extra, check=True):
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    result = run_zfsmgr(["client", *(extra or ("backup",))], env=env, check=check)
    time.sleep(1.1)
    return result


def listing(server):
    from zfsmgr.remote import ServerClient

    api = ServerClient(server.url, server.client_env["CLIENT_ID"], server.client_env["API_KEY"])
    return api, api.call("GET", "/snapshots")["snapshots"]


def receive_stored(server, api, manifests, target, key_load=None):
    """Download every stored stream and receive it with plain zfs recv (gunzip if gzip)."""
    for m in manifests:
        download = api.download(m["key"])
        data = b"".join(iter(lambda: download.read(1 << 20), b""))
        download.close()
        assert hashlib.sha256(data).hexdigest() == m["sha256"]
        stream = gzip.decompress(data) if m["compression"] == "gzip" else data
        sh("zfs", "recv", "-u", "-F", target, input=stream)


def test_bookmark_is_the_base_and_survives_destroying_the_snapshot(openzfs_pool, server_factory,
                                                                   run_zfsmgr):
    server = server_factory("dir")
    dataset = f"{openzfs_pool}/data"
    sh("zfs", "create", dataset)
    mnt = f"{openzfs_pool.mountpoint}/data"
    expected = [write(mnt, 1)]
    backup(run_zfsmgr, server, dataset)
    bases = json.loads(backup(run_zfsmgr, server, dataset, "bookmarks", "--json").stdout)
    assert [b["type"] for b in bases] == ["bookmark"], bases
    sent = bases[0]["name"].replace("#", "@").rsplit(".", 1)[0]  # DS#snap.<server tag>
    assert sh("zfs", "get", "-H", "-o", "value", "userrefs", sent).strip() == "0"  # no hold
    sh("zfs", "destroy", sent)  # local rotation may destroy it: the bookmark carries the chain
    expected.append(write(mnt, 2))
    out = backup(run_zfsmgr, server, dataset).stdout
    assert ": incremental," in out, out
    api, manifests = listing(server)
    assert [m["type"] for m in manifests] == ["full", "incremental"]
    target = f"{openzfs_pool}/restored"
    receive_stored(server, api, manifests, target)
    assert mounted_files(target) == expected[-1]
    bases = json.loads(backup(run_zfsmgr, server, dataset, "bookmarks", "--json").stdout)
    assert len(bases) == 1 and bases[0]["name"].endswith(
        f"{manifests[-1]['snapshot']}.{bases[0]['server']}")


def test_send_estimate_feeds_the_quota_check(openzfs_pool, server_factory, run_zfsmgr):
    server = server_factory("dir", quota=200_000)
    dataset = f"{openzfs_pool}/data"
    sh("zfs", "create", "-o", "compression=off", dataset)
    write(f"{openzfs_pool.mountpoint}/data", 3, size=400_000)
    refused = backup(run_zfsmgr, server, dataset, check=False)
    assert refused.returncode == 1, refused.stderr
    assert "quota exceeded" in refused.stderr and "needed" in refused.stderr
    assert "estimate=0" not in server.log()
    line = next(x for x in server.log().splitlines() if "upload" in x and "estimate=" in x) \
        if "estimate=" in server.log() else ""
    assert line == "" or int(line.rsplit("estimate=", 1)[1].split()[0]) > 400_000
    assert sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""


def test_encrypted_dataset_is_sent_raw_and_restores_without_the_key(openzfs_pool,
                                                                    server_factory,
                                                                    run_zfsmgr, tmp_path):
    server = server_factory("dir")
    keyfile = tmp_path / "key"
    keyfile.write_text("correct horse battery staple\n")
    dataset = f"{openzfs_pool}/secret"
    sh("zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
       "-o", f"keylocation=file://{keyfile}", dataset)
    mnt = f"{openzfs_pool.mountpoint}/secret"
    marker = b"PLAINTEXT-MARKER-" * 4096
    Path(mnt, "plain.txt").write_bytes(marker)
    expected = [rig.tree_digest(Path(mnt))]
    backup(run_zfsmgr, server, dataset)
    expected.append(write(mnt, 4))
    expected[-1] = rig.tree_digest(Path(mnt))
    backup(run_zfsmgr, server, dataset)
    api, manifests = listing(server)
    assert all(m["raw_send"] and m["compression"] == "none" for m in manifests)
    stored = (server.storage_dir / manifests[0]["key"]).read_bytes()
    assert b"PLAINTEXT-MARKER" not in stored  # ciphertext at rest
    target = f"{openzfs_pool}/copy"
    receive_stored(server, api, manifests, target)
    assert sh("zfs", "get", "-H", "-o", "value", "keystatus", target).strip() == "unavailable"
    sh("zfs", "load-key", "-L", f"file://{keyfile}", target)
    assert mounted_files(target) == expected[-1]


# a public key (its secret was thrown away): the guest has no age, and needs none here
AGE_RECIPIENT = "age1hnahuxlm5f30dul4fae55ll6q79frx24e3ra52chltdz02m5k4js9t9j6f"


def test_encrypt_age_never_wraps_a_raw_send(openzfs_pool, server_factory, run_zfsmgr, tmp_path):
    """ENCRYPT=age on a natively encrypted dataset: the raw send is ciphertext already and is
    stored as zfs sent it (no age file, so no age binary needed), restorable without zfsmgr."""
    server = server_factory("dir")
    keyfile = tmp_path / "key"
    keyfile.write_text("correct horse battery staple\n")
    dataset = f"{openzfs_pool}/sealed"
    sh("zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
       "-o", f"keylocation=file://{keyfile}", dataset)
    mnt = f"{openzfs_pool.mountpoint}/sealed"
    env = {**server.client_env, "LOCAL_DATASET": dataset, "ENCRYPT": "age",
           "AGE_RECIPIENTS": AGE_RECIPIENT}
    write(mnt, 5)
    run_zfsmgr(["client", "backup"], env=env, check=True)
    time.sleep(1.1)
    expected = write(mnt, 6)
    run_zfsmgr(["client", "backup"], env=env, check=True)
    api, manifests = listing(server)
    assert [m["type"] for m in manifests] == ["full", "incremental"]
    for m in manifests:
        assert m["raw_send"] and m["encryption"] == "" and m["key"].endswith(".zfs")
        stored = (server.storage_dir / m["key"]).read_bytes()
        assert not stored.startswith(b"age-encryption.org")
        assert struct.unpack_from("<Q", stored, 8)[0] == 0x2F5BACBAC  # a zfs stream
    target = f"{openzfs_pool}/sealed-copy"
    receive_stored(server, api, manifests, target)
    sh("zfs", "load-key", "-L", f"file://{keyfile}", target)
    assert mounted_files(target) == rig.tree_digest(Path(mnt)) == expected


def test_compressed_send_is_not_compressed_twice(openzfs_pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    dataset = f"{openzfs_pool}/lz4"
    sh("zfs", "create", "-o", "compression=lz4", dataset)
    mnt = f"{openzfs_pool.mountpoint}/lz4"
    Path(mnt, "text").write_bytes(b"compressible line of text\n" * 200_000)
    expected = rig.tree_digest(Path(mnt))
    backup(run_zfsmgr, server, dataset)
    api, manifests = listing(server)
    m = manifests[0]
    assert m["compressed_send"] is True and m["compression"] == "none"
    assert m["key"].endswith(".zfs")
    assert m["stored_size"] < 5_200_000 // 4  # lz4 blocks as stored, not re-expanded
    target = f"{openzfs_pool}/back"
    receive_stored(server, api, manifests, target)
    assert mounted_files(target) == expected


def _local_store(pool, tmp_path):
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    base = f"{pool}/srv"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    store = ZfsLocalStore(base, str(tmp_path))
    store.check()
    return store, base


def _full_stream(pool, seed):
    source = f"{pool}/src{seed}"
    sh("zfs", "create", source)
    write(f"{pool.mountpoint}/src{seed}", seed, size=3_000_000)
    sh("zfs", "snapshot", f"{source}@s1")
    stream = subprocess.run(["zfs", "send", f"{source}@s1"], capture_output=True,
                            check=True).stdout
    return source, stream


def _manifest(data, stream):
    from zfsmgr.protocol import Manifest

    return Manifest(key="c1/tank_data_2024-02-13_14:30:00.zfs.gz", client_id="c1",
                    dataset="tank/data", snapshot="s1", type="full", parent=None,
                    compression="gzip", raw_size=len(stream), stored_size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(), created="2024-02-13T14:30:00+00:00",
                    snapshot_time=1.0, storage_type="local")


def _stage(store, upload_id, data, first=0, part=256 << 10):
    import io

    pieces = [data[i:i + part] for i in range(0, len(data), part)]
    for number, piece in enumerate(pieces, first):
        store.stage_part(upload_id, number, io.BytesIO(piece), len(piece))
    return len(pieces)


def _kill_receive(target):
    """What a dying server does to its `zfs recv`: it stops mid-stream. Returns the resume
    token once the receive has ended and the token no longer changes."""
    killed = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"recv" in argv and target.encode() in argv:
            os.kill(int(cmdline.parent.name), signal.SIGKILL)
            killed.append(cmdline.parent)
    dataset = target.split("@")[0]
    deadline = time.time() + 30
    while any(_running(proc) for proc in killed) and time.time() < deadline:
        time.sleep(0.1)  # the kernel ends the receive (and saves its state) as it exits
    sh("zpool", "sync", dataset.split("/")[0])
    token = ""
    while time.time() < deadline:
        probe = subprocess.run(["zfs", "get", "-H", "-o", "value", "receive_resume_token",
                                dataset], capture_output=True, text=True)
        seen = probe.stdout.strip() if probe.returncode == 0 else ""
        if seen not in ("-", "") and seen == token:  # the same twice: settled
            return token
        token = seen
        time.sleep(0.5)
    raise AssertionError(f"no settled resume token on {dataset}")


def _running(proc: Path) -> bool:
    """Whether a process still runs (a zombie has ended)."""
    try:
        return "\nState:\tZ" not in (proc / "status").read_text()
    except OSError:
        return False


def _interrupted_upload(pool, tmp_path, seed):
    """A local-store upload whose receive died half way, as the restarted server sees it."""
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    store, base = _local_store(pool, tmp_path)
    source, stream = _full_stream(pool, seed)
    data = gzip.compress(stream, 1, mtime=0)
    upload_id = uuid.uuid4().hex
    store.begin(upload_id, _manifest(data, stream))
    half = _stage(store, upload_id, data[:len(data) // 2])
    time.sleep(2)  # let zfs take what was handed over
    chain = f"{base}/c1/tank_data/s1"
    token = _kill_receive(f"{chain}@s1")
    restarted = ZfsLocalStore(base, str(tmp_path))
    restarted.check()  # its startup sweep keeps the partial receive an upload owns
    return SimpleNamespace(store=restarted, base=base, chain=chain, source=source,
                           stream=stream, data=data, upload_id=upload_id, half=half,
                           token=token)


def test_local_store_resumes_an_interrupted_receive_with_send_t(openzfs_pool, tmp_path):
    up = _interrupted_upload(openzfs_pool, tmp_path, 5)
    assert up.store.resume_token(up.upload_id) == up.token
    assert len(up.store.staged_parts(up.upload_id)) == up.half
    up.store.resume(up.upload_id, up.token, up.half)
    rest = subprocess.run(["zfs", "send", "-t", up.token], capture_output=True,
                          check=True).stdout
    assert 0 < len(rest) < len(up.stream)  # only what the receive did not have
    _stage(up.store, up.upload_id, gzip.compress(rest, 1, mtime=0), first=up.half)
    stored = up.store.commit(up.upload_id, _manifest(up.data, up.stream))
    assert stored.extra == {"zfs_snapshot": f"{up.chain}@s1", "resumed_at_part": up.half}
    assert sh("zfs", "get", "-H", "-o", "value", "guid", f"{up.chain}@s1") == \
        sh("zfs", "get", "-H", "-o", "value", "guid", f"{up.source}@s1")
    assert sh("zfs", "get", "-H", "-o", "value", "receive_resume_token", up.chain).strip() \
        == "-"
    # the server never mounts what it received (canmount=off): an admin looking does
    assert sh("zfs", "get", "-H", "-o", "value", "canmount", up.chain).strip() == "off"
    sh("zfs", "set", "canmount=on", up.chain)
    sh("zfs", "set", f"mountpoint={openzfs_pool.mountpoint}/received", up.chain)
    assert mounted_files(up.chain) == rig.tree_digest(Path(f"{openzfs_pool.mountpoint}/src5"))


def test_local_store_discards_an_abandoned_receive_with_recv_A(openzfs_pool, tmp_path):
    from zfsmgr.storage.zfslocal import ZfsLocalStore

    up = _interrupted_upload(openzfs_pool, tmp_path, 6)
    # the client never comes back: expiry discards the upload and its partial receive
    uploads = rig.uploads(tmp_path, expiry_seconds=60)
    assert uploads.expire({"local": up.store}, now=time.time() + 120) == [up.upload_id]
    assert subprocess.run(["zfs", "list", up.chain], capture_output=True).returncode != 0
    assert up.store.staged_uploads() == []
    container = up.chain.rsplit("/", 1)[0]  # it held no chain but this one: it went too
    assert subprocess.run(["zfs", "list", container], capture_output=True).returncode != 0
    # a partial receive no upload owns (its state was lost) goes at startup
    sh("zfs", "create", "-p", "-o", "mountpoint=none", f"{up.base}/c1/tank_data")
    other = f"{up.base}/c1/tank_data/s9"
    proc = subprocess.run(["zfs", "recv", "-s", "-u", f"{other}@s1"],
                          input=up.stream[:len(up.stream) // 2], capture_output=True)
    assert proc.returncode != 0
    assert sh("zfs", "get", "-H", "-o", "value", "receive_resume_token", other).strip() != "-"
    ZfsLocalStore(up.base, str(tmp_path)).check()
    assert subprocess.run(["zfs", "list", other], capture_output=True).returncode != 0


SLOW_SEND = """#!/usr/bin/python3
import os, subprocess, sys, time
zfs = "/usr/sbin/zfs" if os.path.exists("/usr/sbin/zfs") else "/sbin/zfs"
args = sys.argv[1:]
if OLD and args[:1] == ["get"] and "encryption" in args:  # as zfs-fuse answers
    sys.exit("bad property list: invalid property 'encryption'")
if args[:1] != ["send"] or any(a.startswith("-n") for a in args) or ("-t" in args
                                                                  and not SLOW_T):
    os.execv(zfs, [zfs] + args)
proc = subprocess.Popen([zfs] + args, stdout=subprocess.PIPE)
started, sent = time.monotonic(), 0
for chunk in iter(lambda: proc.stdout.read(1 << 18), b""):
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    sent += len(chunk)
    time.sleep(max(0.0, sent / RATE - (time.monotonic() - started)))
sys.exit(proc.wait())
"""


@pytest.mark.parametrize("client_zfs", ["openzfs", "without-send-t"])
def test_server_killed_mid_receive_is_resumed_with_send_t(client_zfs, openzfs_pool,
                                                          server_factory, tmp_path):
    """The server keeps a resumable receive; a client whose zfs cannot `send -t` (zfs-fuse,
    old releases) has it discarded and sends the stream again."""
    base = f"{openzfs_pool}/backups"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory("local", base_dataset=base)
    dataset = f"{openzfs_pool}/big"
    sh("zfs", "create", dataset)
    expected = rig.write_files(Path(f"{openzfs_pool.mountpoint}/big"), seed=31, count=4,
                               size=12_000_000)
    slow = tmp_path / "zfs"  # the client's first send trickles, so the kill lands mid-stream
    slow.write_text(SLOW_SEND.replace("RATE", str(4 << 20)).replace(
        "OLD", str(client_zfs != "openzfs")).replace("SLOW_T", "False"))
    slow.chmod(0o755)
    env = {**server.client_env, "LOCAL_DATASET": dataset, "ZFSMGR_ZFS": str(slow)}
    client = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                              env=rig.clean_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    states = server.storage_dir / ".uploads-local"

    def six_parts_received() -> bool:
        held = [json.loads(p.read_text()) for p in states.glob("*.json")] \
            if states.is_dir() else []
        if client.poll() is not None:  # it ended: the parts will not come
            raise AssertionError(f"the client exited {client.returncode} before six parts"
                                 f" arrived: {client.stderr.read()[-2000:]}")
        return bool(held and len(held[0]["parts"]) >= 6)
    try:  # a client that retries (429/409 under load) regenerates its slow stream: be patient
        rig.wait_until(six_parts_received, 300, "the server received six parts", interval=0.1)
    except AssertionError as exc:
        if client.poll() is None:
            client.kill()
        raise AssertionError(f"{exc}; client (exit {client.wait()}):"
                             f" {client.stderr.read()[-3000:]}; server: {server.log()[-3000:]}")
    time.sleep(1)
    server.kill()
    assert "committed" not in server.log()
    server.start()
    out, err = client.communicate(timeout=600)
    assert client.returncode == 0, err
    if client_zfs == "openzfs":
        assert "resuming the server's receive with zfs send -t" in err, err
        assert "resumes with zfs send -t" in server.log()
    else:
        assert "has no send -t: starting the upload again" in err, err
        assert "resumes with zfs send -t" not in server.log()
    assert ": full," in out
    assert set(sh("zfs", "get", "-H", "-r", "-t", "filesystem", "-o", "value",
                  "receive_resume_token", base).split()) == {"-"}  # no partial receive left
    target = f"{openzfs_pool}/restored/big"
    restored = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "restore", "latest",
                               target], env=rig.clean_env(server.client_env),
                              capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    assert mounted_files(target) == expected


def test_backup_rotate_restore_cycle_with_local_store_on_openzfs(openzfs_pool, server_factory,
                                                                 run_zfsmgr):
    base = f"{openzfs_pool}/backups"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    policy = {"keep_hourly": 1, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
    server = server_factory("local", base_dataset=base, rotation_policy=policy)
    dataset = f"{openzfs_pool}/data"
    sh("zfs", "create", dataset)
    mnt = f"{openzfs_pool.mountpoint}/data"
    expected = []
    for seed in range(3):
        expected.append(write(mnt, 10 + seed))
        backup(run_zfsmgr, server, dataset)
    api, manifests = listing(server)
    assert [m["type"] for m in manifests] == ["full", "incremental", "incremental"]
    out = backup(run_zfsmgr, server, dataset, "rotate-remote").stdout
    assert "deleted 2 backups" in out, out  # local ZFS: any snapshot may go
    api, left = listing(server)
    assert len(left) == 1 and left[0]["snapshot"] == manifests[-1]["snapshot"]
    target = f"{openzfs_pool}/restored/data"  # the restore tool creates the parent
    restored = run_zfsmgr(["restore", "latest", target], env=server.client_env)
    assert restored.returncode == 0, restored.stderr
    assert mounted_files(target) == expected[-1]
    verified = run_zfsmgr(["restore", "verify", "--all"], env=server.client_env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # and the chain continues: the next backup is an incremental on the kept snapshot
    expected.append(write(mnt, 20))
    assert ": incremental," in backup(run_zfsmgr, server, dataset).stdout


class Proxy:
    """A TCP relay to the server whose connections the test can cut (a flaky network)."""

    def __init__(self, port: int):
        self.target, self.conns, self.lock = port, [], threading.Lock()
        self.armed = threading.Event()  # cut the next upload body too, part way through
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                near, _ = self.sock.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                near.close()
                continue
            with self.lock:
                self.conns += [near, far]
            for a, b, upstream in ((near, far, True), (far, near, False)):
                threading.Thread(target=self._pump, args=(a, b, upstream), daemon=True).start()

    def _pump(self, a, b, upstream):
        relayed = 0
        try:
            for data in iter(lambda: a.recv(1 << 16), b""):
                b.sendall(data)
                relayed += len(data)
                if upstream and relayed > (256 << 10) and self.armed.is_set():
                    self.armed.clear()
                    break
        except OSError:
            pass
        for end in (a, b):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Break every open connection, and the next upload body, whichever is in flight (on
        a loaded machine the client may be between parts at this moment)."""
        self.armed.set()
        with self.lock:
            conns, self.conns = self.conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()
        self.cut()
        self.armed.clear()


def _wait_for_state(folder, done, timeout=180, client=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [json.loads(p.read_text()) for p in folder.glob("*.json")] \
            if folder.is_dir() else []
        if states and done(states[0]):
            return states[0]
        if client is not None and client.poll() is not None:
            break  # the client ended: the state will not move any more
        time.sleep(0.1)
    ended = "" if client is None or client.poll() is None else \
        f"; the client exited {client.returncode}: {client.stderr.read()[-2000:]}"
    raise AssertionError(f"upload state never got there: {states}{ended}")


def test_a_dropped_connection_during_a_resumed_stream_sends_it_again(
        openzfs_pool, server_factory, tmp_path):
    """After a send -t resume, the network (not the server) fails: the server's receive is
    still running, so the client regenerates the same send -t stream and skips the parts the
    server already took, instead of starting the whole upload again."""
    base = f"{openzfs_pool}/backups"
    sh("zfs", "create", "-o", "mountpoint=none", base)
    server = server_factory("local", base_dataset=base)
    proxy = Proxy(server.port)
    dataset = f"{openzfs_pool}/big"
    sh("zfs", "create", dataset)
    expected = rig.write_files(Path(f"{openzfs_pool.mountpoint}/big"), seed=41, count=4,
                               size=12_000_000)
    slow = tmp_path / "zfs"
    slow.write_text(SLOW_SEND.replace("RATE", str(4 << 20)).replace("OLD", "False")
                    .replace("SLOW_T", "True"))
    slow.chmod(0o755)
    env = {**server.client_env, "SERVER_URL": proxy.url, "LOCAL_DATASET": dataset,
           "ZFSMGR_ZFS": str(slow)}
    client = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                              env=rig.clean_env(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        states = server.storage_dir / ".uploads-local"
        _wait_for_state(states, lambda st: len(st["parts"]) >= 6, client=client)
        time.sleep(1)
        server.kill()
        server.start()
        _wait_for_state(states, lambda st: st["segment"] and not st["resuming"]
                        and len(st["parts"]) >= st["segment"] + 3, client=client)
        proxy.cut()
        out, err = client.communicate(timeout=600)
    finally:
        proxy.close()
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err
    assert "sending the resumed stream again from part" in err, err
    assert server.log().count("resumes with zfs send -t") == 1
    assert "starting the upload again" not in err
    target = f"{openzfs_pool}/restored/big"
    restored = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "restore", "latest",
                               target], env=rig.clean_env(server.client_env),
                              capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    assert mounted_files(target) == expected


def test_vm_python_runs_the_pyz_with_no_site_packages():
    out = subprocess.run([sys.executable, "-I", "-S", str(rig.PYZ), "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("zfsmgr ")
