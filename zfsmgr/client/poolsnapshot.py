"""A run's snapshot of one pool: one atomic `zfs snapshot` of every selected dataset of the
pool, named by its creation second (the storage key's timestamp), one name for the whole pool.

OpenZFS takes every name in one command; zfs-fuse takes one `zfs snapshot -r` per whole
subtree and one call per other dataset. When the pool's snapshots all landed in one later
second than their name says (a slow or loaded pool), they are renamed to that second, as
client/backup.py's `name_by_creation` does for a single dataset: one `zfs rename -r` per whole
subtree, one rename per other dataset. Only when they landed in different seconds (zfs-fuse's
separate calls across a second boundary), or the renaming fails, are they destroyed and made
again under a new name.

A member whose `zfs snapshot` fails is reported once (in `failed`) and not tried again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Sequence, Tuple

from zfsmgr import protocol
from zfsmgr.client.backup import (free_snapshot_name, named_by_its_creation,
                                  wait_for_a_new_second)
from zfsmgr.client.base import BACKUP_PREFIX, made_with
from zfsmgr.client.inventory import Pool
from zfsmgr.client.selection import under
from zfsmgr.errors import ZfsmgrError
from zfsmgr.zfs import Snapshot, Zfs, snapshot_from, split_sources

log = logging.getLogger("zfsmgr.client")
ATTEMPTS = 5  # snapshots made again at most this often before the pool's members fail


@dataclass
class PoolSnapshot:
    """What snapshotting one pool gave: the name its new snapshots carry, the new snapshot of
    each member, the members that failed (each once), and the fresh listing of the new
    snapshots and of the `also_list` names."""

    short: str = ""
    made: Dict[str, Snapshot] = field(default_factory=dict)
    failed: Dict[str, ZfsmgrError] = field(default_factory=dict)
    listed: Dict[str, Snapshot] = field(default_factory=dict)


def subtrees(pool: Pool, members: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(tops, rest): the members whose whole subtree is selected and that are below no other
    such member (`zfs snapshot -r`/`rename -r` takes exactly their subtree), and the members
    below none of them."""
    whole = [m for m in members if pool.whole_subtree(m, members)]
    tops = [m for m in whole if not any(o != m and under(m, o) for o in whole)]
    rest = [m for m in members if not any(under(m, t) for t in tops)]
    return tops, rest


def _covered(members: Sequence[str], names: Sequence[str], recursive: bool) -> List[str]:
    return [m for m in members if any(m == n or (recursive and under(m, n)) for n in names)]


def snapshot_pool(zfs: Zfs, pool: Pool, members: List[str], short: str, taken: set,
                  also_list: Sequence[str], discard: Callable[[str, Snapshot], None],
                  tag: str = "") -> PoolSnapshot:
    """Snapshot the pool's `members` as `short` (a name not in `taken`) for server `tag`,
    named by their creation second in the end; `discard(member, snapshot)` removes a
    snapshot made again."""
    result = PoolSnapshot()
    for _ in range(ATTEMPTS):
        done = _snapshot(zfs, pool, members, short, result.failed, tag)
        members = [m for m in members if m not in result.failed]
        if not done:
            return result
        names = {n: f"{n}@{short}" for n in done}
        listed = _list(zfs, pool, names, also_list)
        made = {n: listed[names[n]] for n in done}
        seconds = {s.creation for s in made.values()}
        wanted = BACKUP_PREFIX + protocol.format_timestamp(
            datetime.fromtimestamp(max(seconds), timezone.utc))
        if len(seconds) == 1 and wanted != short and wanted not in taken:
            names.update({n: f"{n}@{wanted}" for n in _rename(zfs, pool, done, short, wanted)})
            listed = _list(zfs, pool, names, also_list)
            made = {n: listed[names[n]] for n in done}
        if all(named_by_its_creation(s) for s in made.values()):
            result.short, result.made, result.listed = made[done[0]].short, made, listed
            return result
        log.info("%s: the snapshots %s were taken at %s: made again", pool.name, short,
                 ", ".join(sorted(s.short for s in made.values())))
        for name, snap in made.items():
            discard(name, snap)
        taken = taken | {short} | {s.short for s in made.values()}
        # the next name is the second after every one seen, once that second has come: a
        # name ahead of the clock would be ahead of the snapshot's creation too, every time
        wait_for_a_new_second(max(seconds))
        short = free_snapshot_name(taken)
    for name in members:
        result.failed[name] = ZfsmgrError(f"the clock of pool {pool.name} disagrees with this"
                                          " host's: cannot name a snapshot by its creation"
                                          " time")
    return result


def _snapshot(zfs: Zfs, pool: Pool, members: List[str], short: str,
              failed: Dict[str, ZfsmgrError], tag: str) -> List[str]:
    """Take the snapshots (zfs-fuse: one `zfs snapshot -r` per whole subtree, else one per
    dataset); the members taken, the others' errors into `failed`."""
    props = made_with(tag)
    if pool.features.modern:
        batches = [(list(members), False)]
    else:
        tops, rest = subtrees(pool, members)
        batches = [([t], True) for t in tops] + [([m], False) for m in rest]
        if len(batches) > 1:
            log.info("%s: zfs-fuse takes one snapshot at a time: %d snapshots instead of"
                     " one atomic one", pool.name, len(batches))
    done: List[str] = []
    for names, recursive in batches:
        covered = _covered(members, names, recursive)
        try:
            zfs.snapshot_many([f"{n}@{short}" for n in names], props, recursive)
            done += covered
        except ZfsmgrError as exc:
            failed.update({name: exc for name in covered})
    return done


def _rename(zfs: Zfs, pool: Pool, done: List[str], short: str, wanted: str) -> List[str]:
    """Rename the new snapshots `short` to `wanted` (one `zfs rename -r` per whole subtree:
    only this run's snapshots carry its new name); the members renamed."""
    log.info("%s: the snapshots %s were taken in a later second: renamed %s", pool.name,
             short, wanted)
    tops, rest = subtrees(pool, done)
    renamed: List[str] = []
    for names, recursive in [([t], True) for t in tops] + [([m], False) for m in rest]:
        try:
            zfs.rename(f"{names[0]}@{short}", f"{names[0]}@{wanted}", recursive=recursive)
            renamed += _covered(done, names, recursive)
        except ZfsmgrError as exc:
            log.warning("cannot rename %s@%s: %s", names[0], short, exc)
    return renamed


def _list(zfs: Zfs, pool: Pool, names: Dict[str, str], also_list: Sequence[str]
          ) -> Dict[str, Snapshot]:
    """One `zfs get` of the new snapshots (`names`: member → snapshot) and of `also_list`."""
    listed = zfs.props_with_source(list(names.values()) + list(also_list), pool.snapshot_props)
    return {n: snapshot_from(n, *split_sources(pairs), props=pool.snapshot_props)
            for n, pairs in listed.items()}
