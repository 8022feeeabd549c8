"""Change over time, as pure functions: has a dataset changed since its base, and how does this
run's selection differ from the last one's (new, destroyed, excluded, renamed)?
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

from zfsmgr.client.base import Base
from zfsmgr.client.selection import Choice
from zfsmgr.zfs import Snapshot


def _number(snap: Snapshot, prop: str) -> Optional[int]:
    value = snap.native(prop)
    return int(value) if value.isdigit() else None


def unchanged(new: Snapshot, base: Base, snaps: Sequence[Snapshot], marks: Sequence[Snapshot],
              modern: bool) -> bool:
    """Whether nothing was written to the dataset between `base` and the `new` snapshot.

    `snaps`: the dataset's snapshots (with `used`, `referenced` and, on OpenZFS, `written`)
    listed after `new` was taken, `new` among them. OpenZFS: every snapshot after the base's
    own snapshot wrote 0 bytes (`written`). zfs-fuse has no `written`: the base must be the
    snapshot right before `new`, with the same `referenced` and no space of its own (`used`
    0: every block it holds is still in `new`; a change of any file or of metadata frees a
    block the base keeps). Anything else counts as changed.
    """
    ordered = sorted(snaps, key=lambda s: s.createtxg)
    own = next((s for s in ordered if s.guid == base.guid), None)
    if own is None and not modern:
        return False
    if own is not None:
        txg = own.createtxg
    else:
        txg = next((m.createtxg for m in marks if m.guid == base.guid), None)
        if txg is None:
            return False
    after = [s for s in ordered if s.createtxg > txg]
    if not after or after[-1].guid != new.guid:
        return False
    if modern:
        # the first snapshot after a bookmark-only base counts from an older snapshot: its
        # `written` may include older changes, so this errs towards "changed"
        return own is not None and all(_number(s, "written") == 0 for s in after)
    return (len(after) == 1 and _number(own, "used") == 0
            and _number(own, "referenced") == _number(new, "referenced") is not None)


def history_path(state_dir: Path, tag: str, roots: Sequence[str] = ()) -> Path:
    """Where the last run's selection for server `tag` and LOCAL_DATASET `roots` is
    remembered: two cron lines backing up different datasets to one server each keep their
    own (one shared history called the other's datasets destroyed on every run)."""
    if not roots:
        return state_dir / f"selection-{tag}.json"
    digest = hashlib.sha256("\n".join(sorted(roots)).encode()).hexdigest()[:8]
    return state_dir / f"selection-{tag}-{digest}.json"


def load_history(path: Path) -> Optional[Dict[str, str]]:
    """{dataset: guid} of the last run, None before the first one (or if unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_history(path: Path, choices: Sequence[Choice]) -> None:
    """Remember this run's selection (atomically)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({c.name: c.guid for c in choices if c.selected}, indent=1))
    tmp.replace(path)


def compare(previous: Optional[Dict[str, str]], choices: Sequence[Choice],
            listed: Optional[Dict[str, Set[str]]] = None) -> List[str]:
    """What changed in the selection since the last run, one sentence each (reported once:
    the caller saves the new selection afterwards). `listed`: each pool listed this run, with
    its datasets: a dataset outside this run's selection is "destroyed" only if its pool was
    listed without it."""
    if previous is None:
        return []
    now = {c.name: c for c in choices}
    chosen = {c.name: c.guid for c in choices if c.selected}
    by_guid = {guid: name for name, guid in chosen.items() if guid}
    notes = []
    for name, guid in sorted(previous.items()):
        if name in chosen:
            continue
        if guid and by_guid.get(guid) and by_guid[guid] not in previous:
            notes.append(f"{name} was renamed to {by_guid[guid]} (same guid): its chain"
                         f" starts again under the new name with a full backup; the backups"
                         f" of {name} stay on the server")
        elif name in now:
            notes.append(f"{name} is no longer backed up ({now[name].reason}); its backups"
                         " stay on the server")
        elif listed is not None and name.split("/")[0] in listed and \
                name not in listed[name.split("/")[0]]:
            notes.append(f"{name} was destroyed since the last run; its backups stay on the"
                         " server")
        elif listed is not None and name.split("/")[0] in listed:
            notes.append(f"{name} is no longer backed up (outside LOCAL_DATASET); its backups"
                         " stay on the server")
        else:
            notes.append(f"{name} is no longer backed up (outside LOCAL_DATASET, or"
                         " destroyed); its backups stay on the server")
    renamed_to = {by_guid.get(g) for g in previous.values() if g}
    for name in sorted(chosen):
        if name not in previous and name not in renamed_to:
            notes.append(f"{name} is new: it starts with a full backup")
    return notes
