"""A backup snapshot carries its creation second in its name (the storage key's timestamp), even
when zfs takes it in a later second than the client named it (a slow or loaded pool)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

import rig
from zfsmgr import protocol
from zfsmgr.client.backup import BACKUP_PREFIX, PROPS, name_by_creation, named_by_its_creation
from zfsmgr.zfs import Zfs

pytestmark = [pytest.mark.zfs]


def _stamp(epoch: float) -> str:
    return BACKUP_PREFIX + protocol.format_timestamp(datetime.fromtimestamp(epoch, timezone.utc))


def test_a_snapshot_named_for_an_earlier_second_takes_its_creation_second(pool):
    zfs = Zfs()
    dataset = pool.create("data")
    late = f"{dataset}@{_stamp(time.time() - 30)}"  # named 30 s before zfs takes it
    rig.sh("zfs", "snapshot", late)
    snap = zfs.snapshot_info(late, PROPS)
    assert not named_by_its_creation(snap)
    renamed = name_by_creation(zfs, snap)
    assert named_by_its_creation(renamed)
    assert renamed.short == _stamp(snap.creation) and renamed.guid == snap.guid
    assert not zfs.exists(late)


def test_a_taken_creation_name_leaves_the_snapshot_for_the_caller_to_make_again(pool):
    zfs = Zfs()
    dataset = pool.create("data")
    late = f"{dataset}@{_stamp(time.time() - 30)}"
    rig.sh("zfs", "snapshot", late)
    snap = zfs.snapshot_info(late, PROPS)
    rig.sh("zfs", "snapshot", f"{dataset}@{_stamp(snap.creation)}")  # its second's name is taken
    assert name_by_creation(zfs, snap).name == late
    assert zfs.exists(late)
