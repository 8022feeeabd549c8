"""Which datasets a run backs up, and why: a pure function over what zfs lists.

Rules, in order, for each dataset named in LOCAL_DATASET and (with RECURSIVE=true) each of
their descendant filesystems and volumes:
1. a dataset at or below an EXCLUDE_DATASETS entry is left out, with its whole subtree;
2. the user property `org.zfsmgr:backup` as zfs resolves it (inherited like any property):
   `off` leaves a dataset out, `on` includes it, also below a parent that is `off`;
3. otherwise it is included: named in LOCAL_DATASET, or a descendant of one.
A name zfsmgr cannot use in a storage key is left out, saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from zfsmgr import protocol
from zfsmgr.zfs import PROPERTY_PREFIX

BACKUP_PROPERTY = PROPERTY_PREFIX + "backup"
OFF, ON = ("off", "false", "no", "0"), ("on", "true", "yes", "1")


@dataclass(frozen=True)
class Candidate:
    """A dataset as zfs lists it."""

    name: str
    type: str = "filesystem"  # filesystem or volume
    backup: str = "-"  # the effective org.zfsmgr:backup value ('-' when unset)
    source: str = "-"  # zfs's source column: local, inherited from X, default, -
    guid: str = ""


@dataclass(frozen=True)
class Choice:
    """One dataset's verdict."""

    name: str
    selected: bool
    reason: str
    guid: str = ""
    failed: bool = False  # wanted, but cannot be backed up (missing, a name zfsmgr cannot use)

    def as_dict(self) -> dict:
        return {"dataset": self.name, "selected": self.selected, "reason": self.reason,
                "guid": self.guid}


def parse_list(text: Optional[str]) -> List[str]:
    """Names separated by commas and/or whitespace, duplicates dropped, order kept."""
    names: List[str] = []
    for name in re.split(r"[\s,]+", text or ""):
        name = name.rstrip("/")  # before the test: `tank/data tank/data/` is one dataset
        if name and name not in names:
            names.append(name)
    return names


def under(name: str, parent: str) -> bool:
    """Whether `name` is `parent` or one of its descendants."""
    return name == parent or name.startswith(parent + "/")


def _property_reason(c: Candidate) -> str:
    where = "set here" if c.source == "local" else c.source
    return f"{BACKUP_PROPERTY}={c.backup} ({where})"


def select(candidates: Iterable[Candidate], roots: Sequence[str], recursive: bool,
           excludes: Sequence[str] = ()) -> List[Choice]:
    """The verdict on every candidate that belongs to the selection, sorted by name.

    `candidates` may hold more than the roots and their subtrees (a pool's whole listing);
    those outside are ignored. A root missing from `candidates` is a Choice with
    selected=False and reason "does not exist".
    """
    by_name: Dict[str, Candidate] = {c.name: c for c in candidates}
    out: Dict[str, Choice] = {}
    for root in roots:
        if root not in by_name:
            out[root] = Choice(root, False, "does not exist", failed=True)
    for c in by_name.values():
        root = next((r for r in roots if c.name == r or (recursive and under(c.name, r))), None)
        if root is None or c.type not in ("filesystem", "volume"):
            continue
        out[c.name] = _verdict(c, root, excludes)
    return [out[name] for name in sorted(out)]


def _verdict(c: Candidate, root: str, excludes: Sequence[str]) -> Choice:
    excluded_by = next((e for e in excludes if under(c.name, e)), None)
    if excluded_by is not None:
        what = "in" if excluded_by == c.name else f"below {excluded_by}, in"
        return Choice(c.name, False, f"{what} EXCLUDE_DATASETS", c.guid)
    value = c.backup.strip().lower()
    if value in OFF:
        return Choice(c.name, False, _property_reason(c), c.guid)
    try:  # wanted: one zfsmgr cannot name fails the run (silently left out, it was never
        protocol.validate_dataset(c.name)  # backed up, and the run said all was well)
    except protocol.ValidationError as exc:
        return Choice(c.name, False, f"name not usable: {exc} (leave it out with"
                      " EXCLUDE_DATASETS or org.zfsmgr:backup=off)", c.guid, failed=True)
    if value in ON:
        return Choice(c.name, True, _property_reason(c), c.guid)
    if value not in ("", "-"):
        return Choice(c.name, True, f"{_property_reason(c)} is neither on nor off: backed up",
                      c.guid)
    if c.name == root:
        return Choice(c.name, True, "named in LOCAL_DATASET", c.guid)
    return Choice(c.name, True, f"below {root} (RECURSIVE=true)", c.guid)


def selected(choices: Iterable[Choice]) -> List[str]:
    """The names a run backs up."""
    return [c.name for c in choices if c.selected]
