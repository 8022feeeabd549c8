"""The OpenZFS-only branches against a fake `zfs` that answers as OpenZFS 2.3 or zfs-fuse do.

The same branches run for real in the VM tier (tests/openzfs); these pin the parsing and the
decisions without a VM.
"""

from __future__ import annotations

import textwrap

import pytest

from zfsmgr.client.backup import Backup
from zfsmgr.client.base import Base, find_base
from zfsmgr.zfs import Features, Snapshot, Zfs, ZfsError


def fake(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


OPENZFS = """
case "$*" in
  "list -H -o name -t bookmark tank") exit 0 ;;
  "get -H -o value feature@bookmarks tank") echo active ;;
  "get -H -o value encryption tank/secret") echo aes-256-gcm ;;
  "get -H -o value encryption tank/data") echo off ;;
  "get -H -o value encryption tank") echo off ;;
  "send -nvP -w tank/secret@s2") printf 'full\\ttank/secret@s2\\t4096\\nsize\\t4096\\n' ;;
  "send -nvP -i tank/data#b1 tank/data@s2")
      printf 'incremental\\tb1\\ttank/data@s2\\t123456\\nsize\\t123456\\n' ;;
  "send -nvP tank/old@s1") printf 'full\\ttank/old@s1\\t77\\n' ; printf 'size\\t77\\n' >&2 ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"""

ZFS_FUSE = """
case "$1 $2" in
  "list -H") echo "invalid type 'bookmark'" >&2; exit 2 ;;
  "get -H") echo "bad property list: invalid property 'encryption'" >&2; exit 2 ;;
  "send -nvP") echo "invalid option 'n'" >&2; exit 2 ;;
  *) exit 2 ;;
esac
"""


def test_features_on_openzfs(tmp_path):
    zfs = Zfs(fake(tmp_path, "zfs", OPENZFS), fake(tmp_path, "zpool", OPENZFS))
    assert zfs.features("tank/secret") == Features(True, True, True, True, True, True)
    assert zfs.features("tank/data").raw_send is False
    assert zfs.features("tank/data").bookmarks is True


def test_features_on_zfs_fuse(tmp_path):
    zfs = Zfs(fake(tmp_path, "zfs", ZFS_FUSE), fake(tmp_path, "zpool", ZFS_FUSE))
    assert zfs.features("tank/data") == Features()
    assert zfs.estimate("tank/data@s1") is None


def test_estimates_parse_stdout_and_old_stderr(tmp_path):
    zfs = Zfs(fake(tmp_path, "zfs", OPENZFS))
    assert zfs.estimate("tank/data@s2", "tank/data#b1") == 123456
    assert zfs.estimate("tank/secret@s2", raw=True) == 4096
    assert zfs.estimate("tank/old@s1") == 77


def test_send_command_lines():
    zfs = Zfs()
    expected = ["zfs", "send", "-w", "-i", "t/d#b1", "t/d@s2"]
    assert zfs.send_argv("t/d@s2", "t/d#b1", raw=True) == expected
    assert zfs.send_argv("t/d@s2", compressed=True) == ["zfs", "send", "-c", "t/d@s2"]
    assert zfs.send_argv("t/d@s2", "t/d@s1", properties=True) == [
        "zfs", "send", "-p", "-i", "t/d@s1", "t/d@s2"]


def test_errors_carry_the_command_line_and_zfs_message(tmp_path):
    zfs = Zfs(fake(tmp_path, "zfs", "echo \"cannot open 'x': dataset does not exist\" >&2\n"
                                    "exit 1\n"))
    with pytest.raises(ZfsError) as err:
        zfs.set("tank/x", "org.zfsmgr:base", "yes")
    assert "`" + zfs.zfs + " set org.zfsmgr:base=yes tank/x` failed (exit 1)" in str(err.value)
    assert "dataset does not exist" in str(err.value)


class FakeZfs:
    """Just enough of Zfs for the base and request logic."""

    def __init__(self, snaps, marks, compression="off"):
        self.snaps, self.marks, self.compression = snaps, marks, compression
        self.zfs = "zfs"

    def snapshots(self, dataset, props=()):
        return self.snaps

    def bookmarks(self, dataset):
        return self.marks

    def get(self, name, prop):
        return {"compression": self.compression, "referenced": "1000"}[prop]

    def estimate(self, snapshot, base=None, raw=False, compressed=False, properties=False):
        self.asked = (snapshot, base, raw, compressed)
        return 5000


def snap(name, guid, txg, props=None):
    return Snapshot(name, guid, txg, txg, 0, props or {})


def test_the_bookmark_is_the_base_once_the_snapshot_is_gone():
    marks = [snap("tank/d#zfsmgr_2024-01-01_00:00:00", "11", 5)]
    zfs = FakeZfs([snap("tank/d@mine", "99", 9)], marks)
    base = find_base(zfs, "tank/d", Features(bookmarks=True))
    assert base == Base("tank/d#zfsmgr_2024-01-01_00:00:00", "zfsmgr_2024-01-01_00:00:00", "11",
                        True)
    assert find_base(zfs, "tank/d", Features(bookmarks=False)) is None


def test_a_held_snapshot_is_preferred_over_its_own_bookmark():
    marks = [snap("tank/d#zfsmgr_2024-01-01_00:00:00", "11", 5)]
    held = snap("tank/d@zfsmgr_2024-01-01_00:00:00", "11", 5, {"org.zfsmgr:base": "yes"})
    base = find_base(FakeZfs([held], marks), "tank/d", Features(bookmarks=True))
    assert base.name == "tank/d@zfsmgr_2024-01-01_00:00:00" and not base.is_bookmark


def test_raw_send_request_and_estimate_use_the_bookmark():
    zfs = FakeZfs([], [])
    backup = Backup(api=None, zfs=zfs, dataset="tank/secret", compression="gzip", level=1)
    features = Features(bookmarks=True, send_estimate=True, compressed_send=True,
                        raw_send=True, resumable_recv=True)
    base = Base("tank/secret#b1", "b1", "11", True)
    request = backup._request(snap("tank/secret@s2", "22", 7), base, features, "none")
    assert zfs.asked == ("tank/secret@s2", "tank/secret#b1", True, False)
    assert request["raw_send"] is True and request["estimated_size"] == 5000
    assert request["type"] == "incremental" and request["parent"] == "b1"
    assert request["parent_guid"] == "11"


def test_compressed_send_only_where_the_pool_compresses():
    features = Features(send_estimate=True, compressed_send=True)
    lz4 = Backup(api=None, zfs=FakeZfs([], [], "lz4"), dataset="t/d", compression="gzip",
                 level=1)
    off = Backup(api=None, zfs=FakeZfs([], [], "off"), dataset="t/d", compression="gzip",
                 level=1)
    assert lz4._compressed(features) is True and off._compressed(features) is False
    assert lz4._request(snap("t/d@s", "1", 1), None, features, "none")["compressed_send"]


def test_one_snapshot_call_names_every_dataset_until_the_line_is_too_long(
        tmp_path, monkeypatch):
    import zfsmgr.zfs as zfs_module

    calls = tmp_path / "calls"
    zfs = Zfs(fake(tmp_path, "zfs", f'echo "$@" >> {calls}\n'))
    names = [f"tank/d{i:03d}@zfsmgr_x" for i in range(30)]
    zfs.snapshot_many(names, {"kind": "backup"})
    [line] = calls.read_text().splitlines()
    assert line.split() == ["snapshot", "-o", "org.zfsmgr:kind=backup", *names]
    calls.unlink()
    monkeypatch.setattr(zfs_module, "ARGV_LIMIT", 200)
    zfs.snapshot_many(names, {"kind": "backup"})
    lines = [line.split()[3:] for line in calls.read_text().splitlines()]
    assert len(lines) > 1 and [n for batch in lines for n in batch] == names
    assert all(len(" ".join(batch)) < 200 for batch in lines)


def test_a_committed_backup_whose_manifest_has_no_guid_is_adopted_not_removed():
    """cleanup_stale matched snapshot and guid exactly, so a committed backup listed without
    a guid (an older writer; in_catalog takes it by name) was destroyed as interrupted."""
    done = []

    class Marking(FakeZfs):
        def destroy(self, name):
            done.append(("destroy", name))

        def hold_all(self, names, tag):
            done.append(("hold", tuple(names)))

        def hold(self, name, tag):
            done.append(("hold", (name,)))

        def set_all(self, names, prop, value):
            done.append(("set", tuple(names)))

        def set(self, name, prop, value):
            done.append(("set", (name,)))

    left = snap("tank/d@zfsmgr_2024-01-01_00:00:00", "42", 5, {"org.zfsmgr:kind": "backup"})
    backup = Backup(api=None, zfs=Marking([left], []), dataset="tank/d", compression="gzip",
                    level=1, tag="0badc0de")
    backup.cleanup_stale(Features(), [{"snapshot": "zfsmgr_2024-01-01_00:00:00", "guid": ""}],
                         [left])
    assert ("destroy", left.name) not in done and ("hold", (left.name,)) in done, done


def test_a_property_value_with_line_breaks_is_read_whole():
    """A user property set with a newline in it broke the listing (ValueError: not enough
    values to unpack) and with it the whole run."""
    from zfsmgr.zfs import parse_get

    text = ("tank/a\torg.example:note\tline one\nline two\nthree\tlocal\n"
            "tank/a\tcompression\tlz4\tinherited from tank\n")
    assert parse_get(text) == {"tank/a": {"org.example:note": ("line one\nline two\nthree",
                                                               "local"),
                                          "compression": ("lz4", "inherited from tank")}}
