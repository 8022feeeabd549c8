"""Pure tests of the restore side: which streams rebuild a snapshot, and the numbered list."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from zfsmgr.errors import ExitStatus, UsageError
from zfsmgr.protocol import Manifest
from zfsmgr.restore import listing
from zfsmgr.restore.chain import BrokenChain, chain_for, leaves, parent_of
from zfsmgr.restore.save import chain_names, wanted_codec
from zfsmgr.storage import registry

BASE_TIME = 1707834600.0  # 2024-02-13 14:30:00 UTC


def manifest(snapshot: str, parent: str | None = None, minutes: int = 0, dataset="tank/data",
             storage="dir", guid="", parent_guid="", size=1000, compression="gzip") -> Manifest:
    """A manifest as the server lists it; the key's timestamp follows `minutes`."""
    when = BASE_TIME + minutes * 60
    stamp = datetime.fromtimestamp(when, timezone.utc)  # noqa: UP017
    ext = {"gzip": ".zfs.gz", "zstd": ".zfs.zst", "none": ".zfs"}[compression]
    key = f"client1/{dataset.replace('/', '_')}_{stamp:%Y-%m-%d_%H:%M:%S}{ext}"
    found = Manifest(key=key, client_id="client1", dataset=dataset, snapshot=snapshot,
                     type="incremental" if parent else "full", parent=parent,
                     compression=compression, raw_size=size * 2, stored_size=size,
                     sha256="0" * 64, created=f"2024-02-13T14:{minutes:02d}:30+00:00",
                     snapshot_time=when, guid=guid, parent_guid=parent_guid,
                     storage_type=storage)
    # as GET /snapshots lists it: marked self-contained where its store says so
    store = registry.BY_KIND[storage].load()
    return replace(found, self_contained=store.describe(found).self_contained)


def snaps(chain) -> list:
    return [m.snapshot for m in chain]


# --- chain_for --------------------------------------------------------------------------------

def test_full_backup_is_its_own_chain():
    full = manifest("s1")
    assert chain_for([full], full) == [full]


def test_incrementals_replay_from_their_full_base_in_order():
    full, inc1, inc2 = manifest("s1"), manifest("s2", "s1", 1), manifest("s3", "s2", 2)
    everything = [inc2, full, inc1]  # order of the listing does not matter
    assert chain_for(everything, inc2) == [full, inc1, inc2]
    assert chain_for(everything, inc1) == [full, inc1]
    assert chain_for(everything, full) == [full]


def test_missing_link_is_named_before_anything_happens():
    full, inc2 = manifest("s1"), manifest("s3", "s2", 2, parent_guid="77")
    with pytest.raises(BrokenChain) as caught:
        chain_for([full, inc2], inc2)
    message = str(caught.value)
    assert "tank/data@s2" in message and inc2.key in message and "77" in message
    assert caught.value.exit_status == ExitStatus.VERIFY_FAILED


def test_missing_full_base_is_named():
    inc1 = manifest("s2", "s1", 1)
    with pytest.raises(BrokenChain, match="tank/data@s1"):
        chain_for([inc1], inc1)


def test_incremental_without_parent_name_is_refused():
    broken = manifest("s2", "s1", 1)
    broken = Manifest.from_dict({**broken.to_dict(), "parent": None})
    with pytest.raises(BrokenChain, match="records no parent"):
        chain_for([broken], broken)


def test_branches_sharing_a_parent_each_follow_their_own_line():
    full = manifest("s1")
    left, right = manifest("a2", "s1", 1), manifest("b2", "s1", 2)
    left3 = manifest("a3", "a2", 3)
    everything = [full, left, right, left3]
    assert chain_for(everything, left3) == [full, left, left3]
    assert chain_for(everything, right) == [full, right]
    assert {m.key for m in leaves(everything)} == {left3.key, right.key}


def test_parent_must_come_from_the_same_source_dataset():
    other = manifest("s1", dataset="tank/other")
    inc = manifest("s2", "s1", 1)
    with pytest.raises(BrokenChain):
        chain_for([other, inc], inc)


def test_guid_picks_the_right_parent_among_namesakes():
    # Two fulls of a snapshot named s1 (the dataset was recreated): the guid decides.
    old = manifest("s1", guid="111")
    new = manifest("s1", minutes=1, guid="222")
    inc = manifest("s2", "s1", 2, parent_guid="111")
    assert chain_for([old, new, inc], inc) == [old, inc]
    wrong = manifest("s2", "s1", 2, parent_guid="333")
    with pytest.raises(BrokenChain, match="333"):
        chain_for([old, new, wrong], wrong)


def test_parent_newer_than_child_is_not_a_parent():
    inc = manifest("s2", "s1", 1)
    later = manifest("s1", minutes=5)
    assert parent_of([later, inc], inc) is None


def test_local_storage_download_is_self_contained():
    full = manifest("s1", storage="local")
    inc1 = manifest("s2", "s1", 1, storage="local")
    inc2 = manifest("s3", "s2", 2, storage="local")
    assert chain_for([full, inc1, inc2], inc2) == [inc2]
    assert chain_for([inc2], inc2) == [inc2]  # even with its parents rotated away


def test_chain_stops_at_a_local_parent():
    base = manifest("s2", "s1", 1, storage="local")
    inc = manifest("s3", "s2", 2)
    assert chain_for([base, inc], inc) == [base, inc]


# --- list -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    (1024 ** 2, "1.0 MiB"), (int(1.2 * 1024 ** 3), "1.2 GiB"), (3 * 1024 ** 4, "3.0 TiB"),
])
def test_human_sizes(size, text):
    assert listing.human_size(size) == text


def test_snapshot_id_drops_the_extension():
    assert listing.snapshot_id("client1/tank_data_2024-02-13_14:30:00.zfs.gz") == \
        "client1/tank_data_2024-02-13_14:30:00"
    assert listing.snapshot_id("c/t_2024-02-13_14:30:00.zfs.zst") == "c/t_2024-02-13_14:30:00"
    assert listing.snapshot_id("c/t_2024-02-13_14:30:00.zfs") == "c/t_2024-02-13_14:30:00"


def test_numbers_count_from_the_newest():
    full, inc1, inc2 = manifest("s1"), manifest("s2", "s1", 1), manifest("s3", "s2", 2)
    rows = listing.numbered([full, inc1, inc2])
    assert [(n, m.snapshot) for n, m in rows] == [(1, "s3"), (2, "s2"), (3, "s1")]
    assert listing.pick(rows, 3) is full


def test_pick_out_of_range_is_a_usage_error():
    rows = listing.numbered([manifest("s1")])
    with pytest.raises(UsageError, match="1 to 1"):
        listing.pick(rows, 2)
    with pytest.raises(UsageError, match="no backups"):
        listing.pick([], 1)


def test_filter_by_dataset_keeps_numbers():
    a = manifest("s1", dataset="tank/a")
    b = manifest("s1", minutes=1, dataset="tank/b")
    rows = listing.only_dataset(listing.numbered([a, b]), "tank/a")
    assert [(n, m.dataset) for n, m in rows] == [(2, "tank/a")]


def test_table_layout():
    full = manifest("s1", size=int(1.2 * 1024 ** 3))
    inc = manifest("s2", "s1", 61, size=2048)
    lines = listing.format_table(listing.numbered([full, inc])).splitlines()
    assert lines[0].split() == ["#", "Snapshot", "ID", "Timestamp", "Size", "Type", "Dataset"]
    assert lines[1].split() == ["1", "client1/tank_data_2024-02-13_15:31:00", "2024-02-13",
                                "15:31", "2.0", "KiB", "incremental", "tank/data"]
    assert lines[2].split() == ["2", "client1/tank_data_2024-02-13_14:30:00", "2024-02-13",
                                "14:30", "1.2", "GiB", "full", "tank/data"]
    # columns line up: every row's timestamp starts where the header's does
    column = lines[0].index("Timestamp")
    assert all(line[column:column + 10] == "2024-02-13" for line in lines[1:])


def test_json_rows_carry_numbers_and_manifests():
    full, inc = manifest("s1"), manifest("s2", "s1", 1)
    rows = json.loads(json.dumps(listing.as_json(listing.numbered([full, inc]))))
    assert [r["number"] for r in rows] == [1, 2]
    assert rows[0]["id"] == listing.snapshot_id(inc.key)
    assert rows[0]["parent"] == "s1" and rows[1]["type"] == "full"
    assert Manifest.from_dict(rows[1]) == full


def test_timestamp_is_utc_to_the_minute():
    assert listing.timestamp_text(manifest("s1")) == "2024-02-13 14:30"


# --- save file names --------------------------------------------------------------------------

def test_save_codec_follows_the_file_name():
    assert wanted_codec("x.zfs.gz") == "gzip"
    assert wanted_codec("x.gz") == "gzip"
    assert wanted_codec("x.zst") == "zstd"
    assert wanted_codec("x.zfs") == "none"
    assert wanted_codec("backup") is None


def test_chain_files_are_numbered_in_receive_order():
    full, inc1 = manifest("s1"), manifest("s2", "s1", 1)
    assert chain_names("/tmp/b.zfs.gz", [full, inc1], "gzip") == [
        "/tmp/b.01-s1.zfs.gz", "/tmp/b.02-s2.zfs.gz"]
    assert chain_names("/tmp/b", [full, inc1], None) == ["/tmp/b.01-s1.zfs.gz",
                                                         "/tmp/b.02-s2.zfs.gz"]
    assert chain_names("b.zfs", [full], "none") == ["b.01-s1.zfs"]


def test_an_encrypted_backup_is_saved_only_under_a_name_that_says_so(tmp_path):
    """`save N FILE.zfs.gz` of a gzip + age backup wrote age's ciphertext under a name that
    says gzip: gunzip said "not in gzip format". The name must end in .zfs.gz.age; nothing
    is downloaded before."""
    from zfsmgr.restore.save import save

    secret = replace(manifest("s1"), key=manifest("s1").key + ".age", encryption="age")
    opened = []
    with pytest.raises(UsageError, match=r"save it to a name ending in \.zfs\.gz\.age"):
        save(lambda m, label: opened.append(m), [secret], str(tmp_path / "x.zfs.gz"), False)
    assert opened == [] and list(tmp_path.iterdir()) == []
