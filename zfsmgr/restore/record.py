"""Putting a backup's property record back: the properties of a dataset whose stream was sent
without them (zfsmgr/properties.py), on the dataset a restore received it into.

Where the host's zfs has `zfs recv -o` (OpenZFS), the record goes with the chain's full stream,
so the data is written with the recorded `compression`, `recordsize` and the rest; zfs-fuse
has no `-o`, so there each property is set after the chain is in (new writes follow it). Then
every recorded property not in place as the dataset's own value is set one by one, and one
that the host's zfs refuses (an unknown property, a value it does not take, a quota below
what the data uses) is a warning naming it: the restore stands. What a record may hold, and so
what a restore never applies (mountpoints, shares, `zoned`), is zfsmgr/properties.py's
`NOT_RECORDED`; a record that holds anything else it refuses is not trusted: those entries are
left out, with a warning. Nothing here mounts anything (`Target.mount` decides, as before).
"""

from __future__ import annotations

from collections.abc import Sequence

from zfsmgr import properties
from zfsmgr.protocol import Manifest
from zfsmgr.zfs import Zfs, ZfsError


class Records:
    """The property records of one restore's chains, applied on one host (`warnings`: what
    was not applied, for the end of the restore)."""

    def __init__(self, zfs: Zfs, target: str):
        self.zfs, self.pool = zfs, target.split("/")[0]
        self.warnings: list[str] = []
        self._with_receive: bool | None = None

    def wanted(self, chain: Sequence[Manifest], shown: str) -> dict[str, str]:
        """The record of the chain's restored snapshot (the last), less what a restore never
        applies; {} when it has none (its stream carried the properties, or none were sent)."""
        found = chain[-1].properties if chain else None
        if not isinstance(found, dict):
            return {}
        chosen = {}
        for name, value in found.items():
            why = properties.refusal(name, value)
            if why:
                warning = f"{shown}: a recorded property is not applied: {why}"
                if warning not in self.warnings:  # on_receive and settle both ask
                    self.warnings.append(warning)
            else:
                chosen[name] = value
        return chosen

    def on_receive(self, chain: Sequence[Manifest], shown: str) -> dict[str, str] | None:
        """What to give the chain's full stream with `zfs recv -o`: the record, where this
        host's zfs takes `-o`; else None (settle sets them afterwards)."""
        wanted = self.wanted(chain, shown)
        if not wanted:
            return None
        if self._with_receive is None:
            self._with_receive = self.zfs.pool_features(self.pool).modern
        return wanted if self._with_receive else None

    def settle(self, dataset: str, chain: Sequence[Manifest], shown: str) -> None:
        """Set each recorded property that `dataset` (received, not mounted) does not have as
        its own value yet; one zfs refuses is a warning naming it."""
        wanted = self.wanted(chain, shown)
        if not wanted:
            return
        try:
            have = self.zfs.own_properties([dataset]).get(dataset, {})
        except ZfsError:
            have = {}
        for name, value in wanted.items():
            if have.get(name, ("", ""))[0] == value:
                continue
            try:
                self.zfs.set(dataset, name, value)
            except ZfsError as exc:
                lines = [line for line in exc.stderr.splitlines() if line.strip()]
                self.warnings.append(f"{shown}: the recorded property {name}={value} is not"
                                     f" applied: {lines[-1] if lines else exc}")
