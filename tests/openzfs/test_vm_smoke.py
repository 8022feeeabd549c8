"""Smoke tests of the OpenZFS 2.3 features zfsmgr relies on, on a real pool in the VM.

They prove the harness works and pin down the formats zfsmgr parses: bookmarks,
`zfs send -nvP` estimates, incremental send from a bookmark, raw encrypted send,
resumable receive, compressed send.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.openzfs

MiB = 1024 * 1024
CHUNK = 1 * MiB


def zfs(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `zfs ARGS...`; on failure the assertion shows argv, status and stderr."""
    proc = subprocess.run(
        ["zfs", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert proc.returncode == 0, (
            f"zfs {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def prop(dataset: str, name: str) -> str:
    return zfs("get", "-Hp", "-o", "value", name, dataset).stdout.strip()


def write_random(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        f.writelines(os.urandom(MiB) for _ in range(mib))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def mountpoint(dataset: str) -> Path:
    return Path(prop(dataset, "mountpoint"))


def pipe(
    send_args: list[str], recv_args: list[str], limit: int | None = None, timeout: float = 300
):
    """`zfs send ... | zfs recv ...`; with `limit`, the sender is killed after that many bytes.

    Returns (send status, recv status, recv stderr, bytes passed). The stream is
    copied in bounded chunks; stderr goes to temporary files so no pipe can fill up.
    """
    with tempfile.TemporaryFile() as send_err, tempfile.TemporaryFile() as recv_err:
        sender = subprocess.Popen(
            ["zfs", "send", *send_args], stdout=subprocess.PIPE, stderr=send_err
        )
        receiver = subprocess.Popen(
            ["zfs", "recv", *recv_args], stdin=subprocess.PIPE, stderr=recv_err, bufsize=0
        )
        passed = 0
        try:
            while limit is None or passed < limit:
                want = CHUNK if limit is None else min(CHUNK, limit - passed)
                block = sender.stdout.read(want)
                if not block:
                    break
                receiver.stdin.write(block)
                passed += len(block)
        finally:
            receiver.stdin.close()
            if limit is not None:
                sender.kill()  # interrupted mid-stream, as a dropped connection would
            sender.stdout.close()
            send_rc = sender.wait(timeout=timeout)
            recv_rc = receiver.wait(timeout=timeout)
        recv_err.seek(0)
        return send_rc, recv_rc, recv_err.read().decode(errors="replace"), passed


def stream_size(*send_args: str) -> int:
    """Bytes of a real `zfs send` stream, counted in bounded chunks."""
    proc = subprocess.Popen(
        ["zfs", "send", *send_args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    total = 0
    while block := proc.stdout.read(CHUNK):
        total += len(block)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0, f"zfs send {send_args} failed"
    return total


def parse_estimate(stdout: str) -> tuple[list[list[str]], int]:
    """Lines of `zfs send -nvP` split on tabs, and the value of its `size` line."""
    rows = [line.split("\t") for line in stdout.splitlines() if line]
    sizes = [int(row[1]) for row in rows if row[0] == "size"]
    assert len(sizes) == 1, f"expected one 'size\\t<bytes>' line in {stdout!r}"
    return rows, sizes[0]


def test_pool_fixture_is_real_openzfs(openzfs_pool, openzfs_version):
    assert openzfs_version["userland"].startswith("2.3.")
    assert zfs("list", "-H", "-o", "name,mountpoint", str(openzfs_pool)).stdout.split() == [
        openzfs_pool.name,
        openzfs_pool.mountpoint,
    ]
    assert Path(openzfs_pool.mountpoint).is_dir()


def test_bookmark_create_and_list(openzfs_pool):
    fs = f"{openzfs_pool}/src"
    zfs("create", fs)
    write_random(mountpoint(fs) / "a", 1)
    zfs("snapshot", f"{fs}@s1")
    zfs("bookmark", f"{fs}@s1", f"{fs}#b1")

    out = zfs("list", "-Hp", "-t", "bookmark", "-o", "name,guid,createtxg", "-r", fs).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    assert [row[0] for row in rows] == [f"{fs}#b1"]
    # a bookmark carries the guid and txg of its snapshot: that is what an incremental needs
    assert rows[0][1] == prop(f"{fs}@s1", "guid")
    assert rows[0][2] == prop(f"{fs}@s1", "createtxg")

    # the listing zfsmgr uses: bookmarks report `used` as "-"
    listing = zfs("list", "-Hp", "-o", "name,creation,used", "-t", "all", "-r", fs).stdout
    by_name = {line.split("\t")[0]: line.split("\t") for line in listing.splitlines()}
    assert set(by_name) == {fs, f"{fs}@s1", f"{fs}#b1"}
    assert by_name[f"{fs}#b1"][2] == "-"
    assert by_name[f"{fs}@s1"][1].isdigit() and by_name[f"{fs}@s1"][2].isdigit()


def test_send_estimate_is_tab_separated_on_stdout(openzfs_pool):
    fs = f"{openzfs_pool}/src"
    zfs("create", fs)
    write_random(mountpoint(fs) / "a", 4)
    zfs("snapshot", f"{fs}@s1")
    zfs("bookmark", f"{fs}@s1", f"{fs}#b1")
    write_random(mountpoint(fs) / "b", 2)
    zfs("snapshot", f"{fs}@s2")

    full = zfs("send", "-nvP", f"{fs}@s1")
    rows, size = parse_estimate(full.stdout)
    assert rows[0][:2] == ["full", f"{fs}@s1"] and int(rows[0][2]) == size
    assert 4 * MiB <= size < 6 * MiB
    assert "size" not in full.stderr  # 2.3 prints the estimate on stdout, older releases on stderr

    incr = zfs("send", "-nvP", "-i", f"{fs}#b1", f"{fs}@s2")
    rows, size = parse_estimate(incr.stdout)
    assert rows[0][0] == "incremental" and rows[0][-1] == str(size)
    assert rows[0][-2] == f"{fs}@s2"
    assert 2 * MiB <= size < 4 * MiB


def test_incremental_send_from_bookmark(openzfs_pool):
    src, dst = f"{openzfs_pool}/src", f"{openzfs_pool}/dst"
    zfs("create", src)
    write_random(mountpoint(src) / "a", 2)
    zfs("snapshot", f"{src}@s1")
    zfs("bookmark", f"{src}@s1", f"{src}#b1")
    assert pipe([f"{src}@s1"], [dst])[:2] == (0, 0)

    # the source keeps only the bookmark: the incremental must still work from it
    zfs("destroy", f"{src}@s1")
    write_random(mountpoint(src) / "b", 2)
    zfs("snapshot", f"{src}@s2")
    send_rc, recv_rc, err, _ = pipe(["-i", "#b1", f"{src}@s2"], [dst])  # short form of src#b1
    assert (send_rc, recv_rc) == (0, 0), err

    snaps = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", dst).stdout.split()
    assert snaps == [f"{dst}@s1", f"{dst}@s2"]
    for name in ("a", "b"):
        assert digest(mountpoint(src) / name) == digest(mountpoint(dst) / name)


def test_raw_send_of_encrypted_dataset_receives_without_key(openzfs_pool):
    keyfile = Path(f"/var/tmp/{openzfs_pool}.key")
    keyfile.write_text("correct horse battery staple\n")
    keyfile.chmod(0o600)
    enc, copy = f"{openzfs_pool}/enc", f"{openzfs_pool}/copy"
    zfs(
        "create",
        "-o",
        "encryption=aes-256-gcm",
        "-o",
        "keyformat=passphrase",
        "-o",
        f"keylocation=file://{keyfile}",
        enc,
    )
    write_random(mountpoint(enc) / "secret", 2)
    zfs("snapshot", f"{enc}@e1")

    send_rc, recv_rc, err, _ = pipe(["-w", f"{enc}@e1"], [copy])
    assert (send_rc, recv_rc) == (0, 0), err
    assert prop(copy, "encryption") == "aes-256-gcm"
    assert prop(copy, "keystatus") == "unavailable"
    assert prop(copy, "mounted") == "no"
    # a non-raw send needs the key: refused while the copy is locked
    assert zfs("send", f"{copy}@e1", check=False).returncode != 0

    zfs("load-key", "-L", f"file://{keyfile}", copy)
    assert prop(copy, "keystatus") == "available"
    zfs("mount", copy)
    assert digest(mountpoint(enc) / "secret") == digest(mountpoint(copy) / "secret")
    keyfile.unlink()


def test_resumable_receive(openzfs_pool):
    src, dst, aborted = f"{openzfs_pool}/big", f"{openzfs_pool}/resumed", f"{openzfs_pool}/aborted"
    zfs("create", src)
    write_random(mountpoint(src) / "f", 16)
    zfs("snapshot", f"{src}@r1")

    send_rc, recv_rc, err, passed = pipe([f"{src}@r1"], ["-s", dst], limit=6 * MiB)
    assert passed == 6 * MiB
    assert recv_rc != 0
    assert "zfs send -t" in err  # the receiver tells how to resume
    token = prop(dst, "receive_resume_token")
    assert token.startswith("1-"), token

    estimate = zfs("send", "-nvP", "-t", token).stdout
    assert "resume token contents" in estimate
    _, remaining = parse_estimate(estimate)
    assert remaining < 16 * MiB

    send_rc, recv_rc, err, _ = pipe(["-t", token], ["-s", dst])
    assert (send_rc, recv_rc) == (0, 0), err
    assert prop(dst, "receive_resume_token") == "-"
    assert digest(mountpoint(src) / "f") == digest(mountpoint(dst) / "f")

    _, recv_rc, _, _ = pipe([f"{src}@r1"], ["-s", aborted], limit=3 * MiB)
    assert recv_rc != 0
    assert prop(aborted, "receive_resume_token").startswith("1-")
    zfs("recv", "-A", aborted)
    assert zfs("list", aborted, check=False).returncode != 0  # partial state discarded


def test_compressed_send(openzfs_pool):
    src, dst = f"{openzfs_pool}/comp", f"{openzfs_pool}/comprecv"
    zfs("create", "-o", "compression=lz4", src)
    line = b"a compressible line of text for zfs send -c, repeated\n"
    with open(mountpoint(src) / "text", "wb") as f:
        f.writelines(line * (MiB // len(line)) for _ in range(16))
    zfs("snapshot", f"{src}@c1")

    plain, compressed = stream_size(f"{src}@c1"), stream_size("-c", f"{src}@c1")
    assert compressed < plain / 4, (plain, compressed)
    _, size = parse_estimate(zfs("send", "-nvPc", f"{src}@c1").stdout)
    assert size < plain / 4

    send_rc, recv_rc, err, _ = pipe(["-c", f"{src}@c1"], [dst])
    assert (send_rc, recv_rc) == (0, 0), err
    assert digest(mountpoint(src) / "text") == digest(mountpoint(dst) / "text")
