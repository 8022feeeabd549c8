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

A backup snapshot carries the tag of the server its run sends it to from the start
(org.zfsmgr:server, set by the `zfs snapshot` itself): until it becomes a base, only that
server's runs adopt or remove it, so a run to the offsite server never destroys a backup the
onsite server committed just before its run died (FOREIGN_PATIENCE: one nobody adopts for a
week goes after all).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from zfsmgr.zfs import HOLD_TAG, PROPERTY_PREFIX, Features, Snapshot, Zfs, ZfsError

BACKUP_PREFIX = "zfsmgr_"  # backup snapshots and bookmarks: DS@zfsmgr_2024-02-13_14:30:00
PROP_KIND = "kind"  # org.zfsmgr:kind: "backup", or a snapshot type (hourly, daily, ...)
PROP_BASE = "base"  # org.zfsmgr:base=yes: an older release's base (any server)
PROP_BASES = "bases"  # org.zfsmgr:bases=<tag>,<tag>: the servers this snapshot is a base for
PROP_SERVER = "server"  # org.zfsmgr:server=<tag>: the server the run that made it sent it to
PROPS = (PROP_KIND, PROP_BASE, PROP_BASES, PROP_SERVER)  # what listings of snapshots ask for
FOREIGN_PATIENCE = 7 * 86400  # seconds another server's unadopted backup snapshot is left


def made_with(tag: str) -> Dict[str, str]:
    """The user properties a new backup snapshot is made with (`tag`: its server's)."""
    return {PROP_KIND: "backup", **({PROP_SERVER: tag} if tag else {})}


def pending_elsewhere(snap: Snapshot, tag: str, now: float) -> bool:
    """Whether a backup snapshot that is no base belongs to another server's run (one that
    may have committed it and died before marking it): not this run's to adopt or remove,
    unless that server left it for FOREIGN_PATIENCE."""
    made_for = snap.prop(PROP_SERVER)
    return bool(made_for) and made_for != tag and now - snap.creation < FOREIGN_PATIENCE


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


@dataclass(frozen=True)
class Committed:
    """A snapshot the server committed, to become server `tag`'s base (`snaps`/`marks`: its
    dataset's listings from before the commit, when the caller has them)."""

    dataset: str
    snapshot: Snapshot
    features: Features
    snaps: Optional[List[Snapshot]] = None
    marks: Optional[List[Snapshot]] = None


def mark_base(zfs: Zfs, dataset: str, snapshot: Snapshot, features: Features, tag: str = "",
              snaps: Optional[List[Snapshot]] = None,
              marks: Optional[List[Snapshot]] = None) -> None:
    """Make a committed snapshot server `tag`'s base and retire that server's previous bases
    (`snaps`/`marks`: listings from before this commit, when the caller has them)."""
    failed = mark_bases(zfs, [Committed(dataset, snapshot, features, snaps, marks)], tag)
    if failed:
        raise failed[dataset]


def mark_bases(zfs: Zfs, items: Sequence[Committed], tag: str = "") -> Dict[str, ZfsError]:
    """mark_base of each item, the zfs calls batched where one call takes many names: one
    `zfs hold` of every new snapshot (pools without bookmarks), one `zfs set` of the bases
    property, one `zfs release` per hold of the older bases; bookmarks and destroys one by one.
    A batched call that fails is made again item by item, so each dataset gets its own error:
    {dataset: error} of those that failed."""
    failed: Dict[str, ZfsError] = {}

    def each(action: Callable[[Committed], None], chosen: Sequence[Committed]) -> None:
        for item in chosen:
            if item.dataset not in failed:
                try:
                    action(item)
                except ZfsError as exc:
                    failed[item.dataset] = exc

    def batched(action_all: Callable[[List[Committed]], None],
                action: Callable[[Committed], None], chosen: Sequence[Committed]) -> None:
        chosen = [i for i in chosen if i.dataset not in failed]
        if len(chosen) < 2:
            return each(action, chosen)
        try:
            action_all(chosen)
        except ZfsError:
            each(action, chosen)  # whatever the batch did is done again, harmlessly

    hold = hold_tag(tag)
    each(lambda i: _bookmark(zfs, i, tag), [i for i in items if i.features.bookmarks])
    # without bookmarks the snapshot itself must survive until the next backup
    batched(lambda c: zfs.hold_all([i.snapshot.name for i in c], hold),
            lambda i: _hold_once(zfs, i.snapshot.name, hold),
            [i for i in items if not i.features.bookmarks])
    prop = PROPERTY_PREFIX + (PROP_BASES if tag else PROP_BASE)
    values: Dict[str, List[Committed]] = {}
    for item in items:
        values.setdefault(",".join(sorted(set(_tags(item.snapshot)) | {tag})) if tag else
                          "yes", []).append(item)
    for value, chosen in values.items():
        batched(lambda c: zfs.set_all([i.snapshot.name for i in c], prop, value),
                lambda i: zfs.set(i.snapshot.name, prop, value), chosen)
    old = {i.dataset: retiring(zfs, i.dataset, i.snapshot.short, tag, i.snaps)
           for i in items if i.dataset not in failed}
    releases = sorted({h for found in old.values() for r in found for h in r.holds})
    for release in releases:
        def one(i: Committed, release=release) -> None:
            for r in old[i.dataset]:
                if release in r.holds:
                    zfs.release(r.snap.name, release)
        batched(lambda c, release=release: zfs.release_all(
            [r.snap.name for i in c for r in old[i.dataset] if release in r.holds], release),
            one, [i for i in items if i.dataset in old])
    each(lambda i: finish_retiring(zfs, i.dataset, i.snapshot.short, i.features,
                                   old[i.dataset], tag, i.marks),
         [i for i in items if i.dataset in old])
    return failed


def _bookmark(zfs: Zfs, item: Committed, tag: str) -> None:
    mark = f"{item.dataset}#{item.snapshot.short}" + (f".{tag}" if tag else "")
    known = zfs.bookmarks(item.dataset) if item.marks is None else item.marks
    if not any(b.name == mark for b in known):
        zfs.bookmark(item.snapshot.name, mark)


def _hold_once(zfs: Zfs, snapshot: str, hold: str) -> None:
    """A hold, where a batch that failed may have put it already."""
    try:
        zfs.hold(snapshot, hold)
    except ZfsError as exc:
        if "tag already exists" not in exc.stderr:
            raise


@dataclass
class Retiring:
    """An older backup snapshot of a dataset whose base for server `tag` retires: the holds
    to release, then the servers it stays a base for (none: it is destroyed)."""

    snap: Snapshot
    holds: List[str]
    tags: List[str]
    legacy: bool


def retiring(zfs: Zfs, dataset: str, keep: str, tag: str = "",
             snaps: Optional[List[Snapshot]] = None) -> List[Retiring]:
    """The backup snapshots of `dataset` but `keep`, with what retiring tag's base takes."""
    found, now = [], time.time()
    for snap in backup_snapshots(zfs, dataset, snaps):
        if snap.short == keep:
            continue
        tags, legacy = _tags(snap), snap.prop(PROP_BASE) == "yes"
        if not tags and not legacy and pending_elsewhere(snap, tag, now):
            continue
        holds = []
        if tag in tags:
            holds.append(hold_tag(tag))
            tags.remove(tag)
        if legacy:
            holds.append(HOLD_TAG)
        found.append(Retiring(snap, holds, tags, legacy))
    return found


def finish_retiring(zfs: Zfs, dataset: str, keep: str, features: Features, old: List[Retiring],
                    tag: str = "", marks: Optional[List[Snapshot]] = None) -> List[str]:
    """After the holds of `old` are released: record the servers each stays a base for, or
    destroy it; destroy tag's (and older releases') older bookmarks; return what went."""
    gone = []
    for item in old:
        snap, tags = item.snap, item.tags
        if tags:  # still another server's base
            if tags != _tags(snap):
                zfs.set(snap.name, PROPERTY_PREFIX + PROP_BASES, ",".join(tags))
            if item.legacy:
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


def retire_old(zfs: Zfs, dataset: str, keep: str, features: Features, tag: str = "",
               snaps: Optional[List[Snapshot]] = None,
               marks: Optional[List[Snapshot]] = None) -> List[str]:
    """Release server `tag`'s (and older releases') older bases; destroy the backup
    snapshots no server needs any more; return what went."""
    old = retiring(zfs, dataset, keep, tag, snaps)
    for item in old:
        for hold in item.holds:
            zfs.release(item.snap.name, hold)
    return finish_retiring(zfs, dataset, keep, features, old, tag, marks)


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
