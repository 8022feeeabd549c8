"""What a run knows about its pools: one `zfs get` per pool lists the datasets below the
selection's roots and all their snapshots with every property the run needs, one `zfs list -t
bookmark` per root where the pool has bookmarks. No zfs call per snapshot or per dataset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from zfsmgr.client.base import PROPS
from zfsmgr.client.selection import BACKUP_PROPERTY, Candidate, under
from zfsmgr.zfs import (Features, Snapshot, Zfs, ZfsError, snapshot_from, snapshot_props,
                        split_sources)

DATASET_PROPS = ("type", "compression", BACKUP_PROPERTY)
SIZES = ("used", "referenced")
MODERN = ("written", "encryption")  # OpenZFS >= 0.8 only: zfs-fuse refuses the whole get
SNAPSHOT_PROPS = snapshot_props(PROPS, SIZES)
MODERN_SNAPSHOT_PROPS = snapshot_props(PROPS, SIZES + ("written",))


@dataclass
class Dataset:
    """One filesystem or volume with its snapshots (oldest first) and bookmarks."""

    name: str
    values: Dict[str, str]
    backup_source: str = "-"
    snaps: List[Snapshot] = field(default_factory=list)
    marks: List[Snapshot] = field(default_factory=list)

    def candidate(self) -> Candidate:
        return Candidate(self.name, self.values.get("type", "-"),
                         self.values.get(BACKUP_PROPERTY, "-"), self.backup_source,
                         self.values.get("guid", ""))


@dataclass
class Pool:
    """The listing of one pool under the selection's roots."""

    name: str
    features: Features
    datasets: Dict[str, Dataset]
    recursive: bool

    def features_of(self, dataset: str) -> Features:
        """The pool's features, with raw sends where the dataset is encrypted."""
        encryption = self.datasets[dataset].values.get("encryption", "-")
        return dataclasses.replace(self.features, raw_send=self.features.modern and
                                   encryption not in ("off", "-", ""))

    def whole_subtree(self, dataset: str, chosen: Sequence[str]) -> bool:
        """Whether `dataset` and every dataset below it (as far as this listing knows all of
        them) are in `chosen`: then `zfs snapshot -r` takes exactly those."""
        below = [d for d in self.datasets if under(d, dataset)]
        if not self.recursive and len(below) > 1:
            return False
        return all(d in chosen for d in below)

    @property
    def snapshot_props(self) -> List[str]:
        return MODERN_SNAPSHOT_PROPS if self.features.modern else SNAPSHOT_PROPS


def top_roots(roots: Sequence[str], recursive: bool) -> List[str]:
    """Roots not below another root (with recursion those list their subtree anyway)."""
    if not recursive:
        return list(roots)
    return [r for r in roots if not any(o != r and under(r, o) for o in roots)]


def list_pools(zfs: Zfs, roots: Sequence[str], recursive: bool) -> Dict[str, Pool]:
    """The listing of every pool the roots are in; a missing root is simply not listed."""
    by_pool: Dict[str, List[str]] = {}
    for root in top_roots(roots, recursive):
        by_pool.setdefault(root.split("/")[0], []).append(root)
    pools = {}
    for name, pool_roots in by_pool.items():
        if not _all_exist(zfs, pool_roots):
            pool_roots = [r for r in pool_roots if zfs.exists(r)]
        if pool_roots:
            pools[name] = list_pool(zfs, name, pool_roots, recursive)
    return pools


def _all_exist(zfs: Zfs, roots: Sequence[str]) -> bool:
    """One call answers the common case (every root exists)."""
    try:
        zfs.props(roots, ["type"])
        return True
    except ZfsError:
        return False


def list_pool(zfs: Zfs, pool: str, roots: Sequence[str], recursive: bool) -> Pool:
    """One pool's datasets and snapshots under `roots` (and their bookmarks)."""
    features = zfs.pool_features(pool)
    props = list(dict.fromkeys(DATASET_PROPS + tuple(SNAPSHOT_PROPS)))
    if features.modern:
        props += list(MODERN)
    listing = zfs.props_with_source(roots, props, -1 if recursive else 1)
    datasets: Dict[str, Dataset] = {}
    snaps: Dict[str, list] = {}
    snap_props = MODERN_SNAPSHOT_PROPS if features.modern else SNAPSHOT_PROPS
    for name, pairs in listing.items():
        values, sources = split_sources(pairs)
        if "@" in name:
            snaps.setdefault(name.split("@")[0], []).append(
                snapshot_from(name, values, sources, snap_props))
        else:
            datasets[name] = Dataset(name, values, pairs.get(BACKUP_PROPERTY, ("-", "-"))[1])
    for name, found in snaps.items():
        if name in datasets:
            datasets[name].snaps = sorted(found, key=lambda s: s.createtxg)
    if features.bookmarks:
        for root in roots:
            for mark in zfs.bookmarks(root, recursive=recursive):
                owner = datasets.get(mark.name.split("#")[0])
                if owner is not None:
                    owner.marks.append(mark)
    return Pool(pool, features, datasets, recursive)
