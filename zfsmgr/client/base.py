"""The incremental base: what the next backup is sent from.

Only a backup the server has committed becomes a base. Where the pool has bookmarks, the base is
a bookmark `DS#zfsmgr_<stamp>` of the sent snapshot, so rotation may destroy the snapshot; where
it has not (zfs-fuse, old pools), the sent snapshot is kept under a `zfs hold zfsmgr` and marked
with the user property org.zfsmgr:base, and released when the next backup commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from zfsmgr.zfs import HOLD_TAG, PROPERTY_PREFIX, Features, Snapshot, Zfs, ZfsError

BACKUP_PREFIX = "zfsmgr_"  # backup snapshots and bookmarks: DS@zfsmgr_2024-02-13_14:30:00
PROP_KIND = "kind"  # org.zfsmgr:kind: "backup", or a snapshot type (hourly, daily, ...)
PROP_BASE = "base"  # org.zfsmgr:base=yes: a held snapshot that is the incremental base
PROPS = (PROP_KIND, PROP_BASE)  # what listings of snapshots ask for


@dataclass(frozen=True)
class Base:
    """Where the next incremental starts."""

    name: str  # DS@snap or DS#bookmark, as `zfs send -i` takes it
    snapshot: str  # the short name of the snapshot it stands for (the server's key for it)
    guid: str
    is_bookmark: bool


def backup_snapshots(zfs: Zfs, dataset: str,
                     snaps: Optional[List[Snapshot]] = None) -> List[Snapshot]:
    """zfsmgr's own backup snapshots of the dataset, oldest first (from `snaps`, a listing
    with PROPS the caller already has, when given)."""
    if snaps is None:
        snaps = zfs.snapshots(dataset, PROPS)
    return [s for s in snaps if s.prop(PROP_KIND) == "backup"]


def find_base(zfs: Zfs, dataset: str, features: Features,
              snaps: Optional[List[Snapshot]] = None) -> Optional[Base]:
    """The newest base zfsmgr keeps for this dataset, if any (`snaps`: as backup_snapshots)."""
    candidates: List[Base] = []
    if features.bookmarks:
        candidates += [Base(b.name, b.short, b.guid, True) for b in zfs.bookmarks(dataset)
                       if b.short.startswith(BACKUP_PREFIX)]
    if snaps is None:
        snaps = zfs.snapshots(dataset, PROPS)
    held = [s for s in snaps if s.prop(PROP_BASE) == "yes"]
    if held:
        newest = held[-1]
        candidates.append(Base(newest.name, newest.short, newest.guid, False))
    if not candidates:
        return None
    # prefer a held snapshot over a bookmark of the same point (send -i snap is cheaper)
    return sorted(candidates, key=lambda b: (b.snapshot, not b.is_bookmark))[-1]


def mark_base(zfs: Zfs, dataset: str, snapshot: Snapshot, features: Features) -> None:
    """Make a committed snapshot the base and retire the previous bases."""
    if features.bookmarks:
        mark = f"{dataset}#{snapshot.short}"
        if not any(b.name == mark for b in zfs.bookmarks(dataset)):
            zfs.bookmark(snapshot.name, mark)
    else:  # without bookmarks the snapshot itself must survive until the next backup
        zfs.hold(snapshot.name, HOLD_TAG)
    zfs.set(snapshot.name, PROPERTY_PREFIX + PROP_BASE, "yes")
    retire_old(zfs, dataset, keep=snapshot.short, features=features)


def retire_old(zfs: Zfs, dataset: str, keep: str, features: Features) -> List[str]:
    """Release and destroy older backup snapshots and bookmarks; return what went."""
    gone = []
    for snap in backup_snapshots(zfs, dataset):
        if snap.short == keep:
            continue
        was_base = snap.prop(PROP_BASE) == "yes"
        if was_base:
            zfs.release(snap.name, HOLD_TAG)
        try:
            zfs.destroy(snap.name)
            gone.append(snap.name)
        except ZfsError:  # held by someone else or cloned: leave it, it is not ours to force,
            if was_base:  # but no longer a base (until then, the newer base wins anyway)
                zfs.inherit(snap.name, PROPERTY_PREFIX + PROP_BASE)
    if features.bookmarks:
        for mark in zfs.bookmarks(dataset):
            if mark.short.startswith(BACKUP_PREFIX) and mark.short != keep:
                zfs.destroy(mark.name)
                gone.append(mark.name)
    return gone


def list_bases(zfs: Zfs, dataset: str, features: Features) -> List[dict]:
    """Every base zfsmgr keeps (bookmarks and held snapshots), for `client bookmarks`."""
    found = []
    if features.bookmarks:
        found += [{"name": b.name, "type": "bookmark", "guid": b.guid, "created": b.creation}
                  for b in zfs.bookmarks(dataset) if b.short.startswith(BACKUP_PREFIX)]
    found += [{"name": s.name, "type": "held snapshot", "guid": s.guid, "created": s.creation,
               "holds": s.userrefs}
              for s in zfs.snapshots(dataset, PROPS) if s.prop(PROP_BASE) == "yes" and s.userrefs]
    return sorted(found, key=lambda e: e["created"])
