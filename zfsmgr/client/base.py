"""The incremental base: what the next backup is sent from, kept per server.

Only a backup the server has committed becomes a base. Each server has its own: its tag
(`server_tag`, from SERVER_URL and CLIENT_ID) is in the base's name, so a host that backs up
to an onsite and an offsite server alternately sends incrementals to both, and retiring one
server's old base never touches the other's. Where the pool has bookmarks, the base is a
bookmark `DS#zfsmgr_<stamp>.<tag>` of the sent snapshot, so rotation may destroy the snapshot;
where it has not (zfs-fuse, old pools), the sent snapshot is kept under a `zfs hold
zfsmgr-<tag>`. Either way the snapshot's user property org.zfsmgr:bases lists the tags it is
a base for, and it is destroyed when that list becomes empty.

Bases of older releases (bookmark `DS#zfsmgr_<stamp>`, property org.zfsmgr:base=yes, hold
`zfsmgr`) are used by whichever server holds them and retired at the next commit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional

from zfsmgr.zfs import HOLD_TAG, PROPERTY_PREFIX, Features, Snapshot, Zfs, ZfsError

BACKUP_PREFIX = "zfsmgr_"  # backup snapshots and bookmarks: DS@zfsmgr_2024-02-13_14:30:00
PROP_KIND = "kind"  # org.zfsmgr:kind: "backup", or a snapshot type (hourly, daily, ...)
PROP_BASE = "base"  # org.zfsmgr:base=yes: an older release's base (any server)
PROP_BASES = "bases"  # org.zfsmgr:bases=<tag>,<tag>: the servers this snapshot is a base for
PROPS = (PROP_KIND, PROP_BASE, PROP_BASES)  # what listings of snapshots ask for


def server_tag(server_url: str, client_id: str) -> str:
    """Eight hex digits naming one server (and client id) in bases: stable, not secret."""
    return hashlib.sha256(f"{server_url.rstrip('/').lower()} {client_id}".encode()
                          ).hexdigest()[:8]


@dataclass(frozen=True)
class Base:
    """Where the next incremental starts."""

    name: str  # DS@snap or DS#bookmark, as `zfs send -i` takes it
    snapshot: str  # the short name of the snapshot it stands for (the server's key for it)
    guid: str
    is_bookmark: bool
    tag: str = ""  # the server it was made for ('' for an older release's base)


def _tags(snap: Snapshot) -> List[str]:
    return [t for t in snap.prop(PROP_BASES).split(",") if t]


def _bookmark_base(mark: Snapshot) -> Base:
    short, _, tag = mark.short.partition(".")
    return Base(mark.name, short, mark.guid, True, tag)


def backup_snapshots(zfs: Zfs, dataset: str,
                     snaps: Optional[List[Snapshot]] = None) -> List[Snapshot]:
    """zfsmgr's own backup snapshots of the dataset, oldest first (from `snaps`, a listing
    with PROPS the caller already has, when given)."""
    if snaps is None:
        snaps = zfs.snapshots(dataset, PROPS)
    return [s for s in snaps if s.prop(PROP_KIND) == "backup"]


def find_bases(zfs: Zfs, dataset: str, features: Features,
               snaps: Optional[List[Snapshot]] = None,
               marks: Optional[List[Snapshot]] = None) -> List[Base]:
    """Every base zfsmgr keeps for this dataset, for any server, newest first; a held
    snapshot comes before its own bookmark (send -i snap is cheaper). `snaps`/`marks`: the
    listings the caller already has."""
    candidates: List[Base] = []
    if features.bookmarks:
        if marks is None:
            marks = zfs.bookmarks(dataset)
        candidates += [_bookmark_base(b) for b in marks if b.short.startswith(BACKUP_PREFIX)]
    if snaps is None:
        snaps = zfs.snapshots(dataset, PROPS)
    for s in snaps:
        tags = _tags(s) + ([""] if s.prop(PROP_BASE) == "yes" else [])
        candidates += [Base(s.name, s.short, s.guid, False, t) for t in tags]
    return sorted(candidates, key=lambda b: (b.snapshot, not b.is_bookmark), reverse=True)


def find_base(zfs: Zfs, dataset: str, features: Features,
              snaps: Optional[List[Snapshot]] = None,
              marks: Optional[List[Snapshot]] = None) -> Optional[Base]:
    """The newest base zfsmgr keeps for this dataset, if any (see find_bases)."""
    bases = find_bases(zfs, dataset, features, snaps, marks)
    return bases[0] if bases else None


def hold_tag(tag: str) -> str:
    """The hold a base for server `tag` keeps on its snapshot."""
    return f"{HOLD_TAG}-{tag}" if tag else HOLD_TAG


def mark_base(zfs: Zfs, dataset: str, snapshot: Snapshot, features: Features, tag: str = "",
              snaps: Optional[List[Snapshot]] = None,
              marks: Optional[List[Snapshot]] = None) -> None:
    """Make a committed snapshot server `tag`'s base and retire that server's previous bases
    (`snaps`/`marks`: listings from before this commit, when the caller has them)."""
    if features.bookmarks:
        mark = f"{dataset}#{snapshot.short}" + (f".{tag}" if tag else "")
        known = zfs.bookmarks(dataset) if marks is None else marks
        if not any(b.name == mark for b in known):
            zfs.bookmark(snapshot.name, mark)
    else:  # without bookmarks the snapshot itself must survive until the next backup
        zfs.hold(snapshot.name, hold_tag(tag))
    if tag:
        tags = sorted(set(_tags(snapshot)) | {tag})
        zfs.set(snapshot.name, PROPERTY_PREFIX + PROP_BASES, ",".join(tags))
    else:
        zfs.set(snapshot.name, PROPERTY_PREFIX + PROP_BASE, "yes")
    retire_old(zfs, dataset, keep=snapshot.short, features=features, tag=tag, snaps=snaps,
               marks=marks)


def retire_old(zfs: Zfs, dataset: str, keep: str, features: Features, tag: str = "",
               snaps: Optional[List[Snapshot]] = None,
               marks: Optional[List[Snapshot]] = None) -> List[str]:
    """Release server `tag`'s (and older releases') older bases; destroy the backup
    snapshots no server needs any more; return what went."""
    gone = []
    for snap in backup_snapshots(zfs, dataset, snaps):
        if snap.short == keep:
            continue
        tags, legacy = _tags(snap), snap.prop(PROP_BASE) == "yes"
        if tag in tags:
            zfs.release(snap.name, hold_tag(tag))
            tags.remove(tag)
        if legacy:
            zfs.release(snap.name, HOLD_TAG)
        if tags:  # still another server's base
            if tags != _tags(snap):
                zfs.set(snap.name, PROPERTY_PREFIX + PROP_BASES, ",".join(tags))
            if legacy:
                zfs.inherit(snap.name, PROPERTY_PREFIX + PROP_BASE)
            continue
        try:
            zfs.destroy(snap.name)
            gone.append(snap.name)
        except ZfsError:  # held by someone else or cloned: leave it, it is not ours to force,
            for prop in (PROP_BASE, PROP_BASES):  # but no longer a base
                if snap.prop(prop):
                    zfs.inherit(snap.name, PROPERTY_PREFIX + prop)
    if features.bookmarks:
        for mark in zfs.bookmarks(dataset) if marks is None else marks:
            base = _bookmark_base(mark)
            if mark.short.startswith(BACKUP_PREFIX) and base.snapshot != keep and \
                    base.tag in (tag, ""):
                zfs.destroy(mark.name)
                gone.append(mark.name)
    return gone


def list_bases(zfs: Zfs, dataset: str, features: Features) -> List[dict]:
    """Every base zfsmgr keeps (bookmarks and held snapshots), for `client bookmarks`."""
    found = []
    if features.bookmarks:
        found += [{"name": b.name, "type": "bookmark", "guid": b.guid, "created": b.creation,
                   "server": _bookmark_base(b).tag}
                  for b in zfs.bookmarks(dataset) if b.short.startswith(BACKUP_PREFIX)]
    for s in zfs.snapshots(dataset, PROPS):
        tags = _tags(s) + ([""] if s.prop(PROP_BASE) == "yes" else [])
        if tags and s.userrefs:
            found += [{"name": s.name, "type": "held snapshot", "guid": s.guid,
                       "created": s.creation, "holds": s.userrefs, "server": t} for t in tags]
    return sorted(found, key=lambda e: e["created"])
