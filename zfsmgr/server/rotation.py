"""Which stored backups the server deletes: retention plus quota, never breaking a chain.

Pure: given the manifests, the policy and `now`, it returns what to delete and why. An
incremental depends on its parent, so nothing another kept backup needs is ever deleted; a
backup whose download restores alone (`Manifest.self_contained`, which the server sets from its
store: the `local` store's downloads are full sends) depends on nothing, so any may go.
`min_retain_days` is a floor under both retention and quota: a backup the server committed
fewer days ago is kept with its bases, whatever the policy and however many backups came after
it. It counts from the server's commit time (`created`), never from the client's snapshot time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Dict, List, Optional

from zfsmgr.protocol import Manifest
from zfsmgr.retention import Item, RetentionPolicy, plan

FREES_SPACE = ("free space with `zfsmgr client rotate-remote`, or set AUTO_ROTATE=true on the"
               " server, or raise max_size_bytes")


@dataclass
class RotationPlan:
    """The outcome: kept and deleted manifests, a reason per key, and whether quota fits."""

    keep: List[Manifest] = field(default_factory=list)
    delete: List[Manifest] = field(default_factory=list)
    reasons: Dict[str, str] = field(default_factory=dict)
    enough: bool = True
    used_after: int = 0  # what the kept backups take
    freed_bytes: int = 0  # what the deleted ones took
    over_bytes: int = 0  # how far over the quota (plus what is needed) the kept ones remain
    quota: int = 0  # what it was planned against: the quota, the bytes needed, and what each
    needed: int = 0  # backup takes in its store (deletion.apply settles `enough` again with
    sizes: Dict[str, int] = field(default_factory=dict)  # them when some backup stays)

    def settle(self, stays: List[Manifest]) -> "RotationPlan":
        """The plan once `stays`, planned for deletion, is kept after all."""
        keys = {m.key for m in stays}
        size = sum(self.sizes.get(m.key, m.stored_size) for m in stays)
        used = self.used_after + size
        return replace(self, delete=[m for m in self.delete if m.key not in keys],
                       keep=self.keep + list(stays), freed_bytes=self.freed_bytes - size,
                       used_after=used, enough=not self.quota or used + self.needed <= self.quota,
                       over_bytes=max(0, used + self.needed - self.quota) if self.quota else 0)


def parent_key(manifest: Manifest, backups: List[Manifest]) -> Optional[str]:
    """The key of the backup this one is an incremental on (None: it restores alone)."""
    if manifest.restores_alone:
        return None
    for other in backups:
        if other.dataset == manifest.dataset and other.snapshot == manifest.parent:
            return other.key
    return None


def committed_at(manifest: Manifest) -> float:
    """When the server committed a backup, epoch seconds (0 when its manifest cannot say)."""
    try:  # "Z": Python before 3.11 reads only "+00:00"; 0 would void MIN_RETAIN_DAYS
        return datetime.fromisoformat(manifest.created.replace("Z", "+00:00")).timestamp()
    except (AttributeError, TypeError, ValueError):
        return 0.0


def plan_rotation(backups: List[Manifest], policy: Optional[RetentionPolicy], now: float,
                  quota: int = 0, needed: int = 0, keep: Optional[str] = None,
                  min_retain_days: float = 0,
                  sizes: Optional[Dict[str, int]] = None,
                  bases: Optional[Dict[str, str]] = None) -> RotationPlan:
    """Retention first; then, while the kept backups and `needed` bytes exceed `quota`, whole
    chains, oldest first, never the newest chain of a dataset nor the chain of `keep` or of
    `bases` (key: why, the keys open uploads are based on: deletion refuses them); nothing
    committed within `min_retain_days` of `now` goes.

    `sizes` is what each backup takes in its store (default: its stored size)."""
    policy = policy or RetentionPolicy()
    floor = now - min_retain_days * 86400
    young = {m.key for m in backups if min_retain_days and committed_at(m) > floor}
    bases = bases or {}
    held = set(bases) | ({keep} if keep else set())
    size = {m.key: m.stored_size for m in backups}
    size.update(sizes or {})
    by_key = {m.key: m for m in backups}
    parents = {m.key: parent_key(m, backups) for m in backups}
    newest = {}
    for m in backups:
        if m.dataset not in newest or m.snapshot_time >= by_key[newest[m.dataset]].snapshot_time:
            newest[m.dataset] = m.key
    items = []
    for dataset_backups in _group(backups).values():
        items += [Item(m.key, m.snapshot_time, None, parents[m.key],
                       protected=m.key in young or m.key in held
                       or m.key == newest[m.dataset])
                  for m in dataset_backups]
    result = RotationPlan(quota=quota, needed=needed, sizes=size)
    decisions = {}
    for dataset_backups in _group(backups).values():  # retention per dataset
        names = {m.key for m in dataset_backups}
        for d in plan([i for i in items if i.name in names], policy, now):
            decisions[d.name] = d
    doomed = {k for k, d in decisions.items() if not d.keep}
    result.reasons = {k: bases[k] if k in bases else
                      f"committed less than {min_retain_days:g} days ago (MIN_RETAIN_DAYS)"
                      if k in young else d.reason for k, d in decisions.items()}
    used = sum(size[m.key] for m in backups if m.key not in doomed)
    if quota:
        children: Dict[str, List[str]] = {}
        for key, parent in parents.items():
            if parent:
                children.setdefault(parent, []).append(key)
        for root in sorted((m for m in backups if not parents[m.key]),
                           key=lambda m: m.snapshot_time):
            if used + needed <= quota:
                break
            chain = _descendants(root.key, children)
            if any(k in held or k in young or newest[by_key[k].dataset] == k for k in chain):
                continue
            for k in chain - doomed:
                used -= size[k]
                doomed.add(k)
                result.reasons[k] = "old chain removed to free quota"
        result.enough = used + needed <= quota
        result.over_bytes = max(0, used + needed - quota)
    result.used_after = used
    result.freed_bytes = sum(size[k] for k in doomed)
    # children before parents, so a chain is never left without its base mid-way
    order = sorted(backups, key=lambda m: -m.snapshot_time)
    result.delete = [m for m in order if m.key in doomed]
    result.keep = [m for m in backups if m.key not in doomed]
    return result


def _group(backups: List[Manifest]) -> Dict[str, List[Manifest]]:
    groups: Dict[str, List[Manifest]] = {}
    for m in backups:
        groups.setdefault(m.dataset, []).append(m)
    return groups


def _descendants(root: str, children: Dict[str, List[str]]) -> set:
    found, todo = set(), [root]
    while todo:
        key = todo.pop()
        if key not in found:
            found.add(key)
            todo += children.get(key, [])
    return found
