"""Typed snapshots (hourly/daily/weekly/monthly) and their local rotation.

Only zfsmgr's own typed snapshots are ever destroyed: never a user's snapshot, never the backup
base, never a snapshot with a hold or a clone. Which ones go is decided by zfsmgr.retention.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

from zfsmgr import protocol
from zfsmgr.client.base import BACKUP_PREFIX, PROP_BASE, PROP_KIND, PROPS
from zfsmgr.retention import SNAPSHOT_TYPES, Item, RetentionPolicy, plan
from zfsmgr.zfs import Zfs, ZfsError


def typed_name(dataset: str, kind: str, now: Optional[datetime] = None) -> str:
    """`DS@zfsmgr_daily_2024-02-13_14:30:00`: recognisable and sortable."""
    stamp = protocol.format_timestamp(now or datetime.now(timezone.utc))
    return f"{dataset}@{BACKUP_PREFIX}{kind}_{stamp}"


def create(zfs: Zfs, dataset: str, kind: str) -> str:
    """Create one typed snapshot."""
    return create_many(zfs, [dataset], kind)[0]


def create_many(zfs: Zfs, datasets: Sequence[str], kind: str,
                modern: Optional[Dict[str, bool]] = None) -> List[str]:
    """The same typed snapshot of every dataset: one atomic `zfs snapshot` per pool where
    `modern[pool]` (OpenZFS takes several names), else one per dataset (zfs-fuse). All or
    none: when one fails, the ones made before it are destroyed again."""
    if kind not in SNAPSHOT_TYPES:
        raise protocol.ValidationError(f"snapshot type must be one of {', '.join(SNAPSHOT_TYPES)}")
    now = datetime.now(timezone.utc)
    names = [typed_name(dataset, kind, now) for dataset in datasets]
    for name in names:
        if zfs.exists(name):
            raise ZfsError(["zfs", "snapshot", name], 1, f"snapshot {name} already exists")
    by_pool: Dict[str, List[str]] = {}
    for name in names:
        by_pool.setdefault(name.split("/")[0].split("@")[0], []).append(name)
    made: List[str] = []
    try:
        for pool, members in by_pool.items():
            for batch in [members] if (modern or {}).get(pool) else [[m] for m in members]:
                zfs.snapshot_many(batch, {PROP_KIND: kind})  # undoes its own, if it fails
                made += batch
    except ZfsError as exc:
        raise zfs.undo_snapshots(made, exc) from None
    return names


def rotation_plan(zfs: Zfs, dataset: str, policy: RetentionPolicy, kinds=SNAPSHOT_TYPES,
                  now: Optional[float] = None) -> List[Tuple[str, bool, str]]:
    """(snapshot, keep, reason) for zfsmgr's typed snapshots of the given kinds."""
    snaps = [s for s in zfs.snapshots(dataset, PROPS)
             if s.prop(PROP_KIND) in kinds and s.short.startswith(BACKUP_PREFIX)]
    items = [Item(s.name, float(s.creation), s.prop(PROP_KIND),
                  protected=s.userrefs > 0 or s.prop(PROP_BASE) == "yes") for s in snaps]
    held = {s.name: s.userrefs for s in snaps}
    decisions = plan(items, policy, time.time() if now is None else now)
    out = []
    for d in decisions:
        reason = d.reason
        if d.reason == "protected":
            reason = "held" if held[d.name] else "backup base"
        out.append((d.name, d.keep, reason))
    return out


DESTROY_FAILED = "kept: destroy failed"


def rotate(zfs: Zfs, dataset: str, policy: RetentionPolicy, kinds=SNAPSHOT_TYPES,
           dry_run: bool = False) -> List[Tuple[str, bool, str]]:
    """Destroy what the plan drops (unless dry_run); a clone or new hold skips the snapshot."""
    result = []
    for name, keep, reason in rotation_plan(zfs, dataset, policy, kinds):
        if not keep and not dry_run:
            try:
                zfs.destroy(name)
            except ZfsError as exc:
                keep, reason = True, f"{DESTROY_FAILED} ({exc})"  # with zfs's command line
        result.append((name, keep, reason))
    return result
