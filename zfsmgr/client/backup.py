"""`client backup` of one dataset: check the base, snapshot, send (client/upload.py), mark the
base for this server.

A run over many datasets (client/run.py) drives the same phases for each: `prepare` (stale
snapshots, chain limits, the base) from listings it made once per pool, one atomic snapshot per
pool, then `send` per dataset. `run` does all of it for a single dataset.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable, List, Optional

from zfsmgr import protocol
from zfsmgr.client.base import (BACKUP_PREFIX, PROP_BASE, PROP_BASES, PROP_SERVER, PROPS, Base,
                                Committed, backup_snapshots, find_bases, made_with, mark_base,
                                pending_elsewhere)
from zfsmgr.client import record
from zfsmgr.client.upload import Result, Uploader
from zfsmgr.errors import UsageError, ZfsmgrError
from zfsmgr.zfs import Features, Snapshot, Zfs

log = logging.getLogger("zfsmgr.client")
AHEAD_SECONDS = 5  # a newest second further ahead than this is a clock, not a quick re-run


def free_snapshot_name(taken: set, now: Optional[datetime] = None) -> str:
    """`zfsmgr_<UTC stamp>`, one second later while that name is in `taken`."""
    moment = now or datetime.now(timezone.utc)
    while True:
        name = BACKUP_PREFIX + protocol.format_timestamp(moment)
        if name not in taken:
            return name
        moment = datetime.fromtimestamp(moment.timestamp() + 1, timezone.utc)


def new_snapshot_name(zfs: Zfs, dataset: str, now: Optional[datetime] = None) -> str:
    """`DS@zfsmgr_<UTC stamp>`, one second later if that name is taken."""
    return f"{dataset}@{free_snapshot_name({s.short for s in zfs.snapshots(dataset)}, now)}"


def wait_for_a_new_second(latest: int, sleep=time.sleep) -> None:
    """Keys carry the snapshot's creation second: never reuse one (a quick re-run). A second
    further ahead than AHEAD_SECONDS is no quick re-run but a clock that was once ahead (or a
    server's listing that says so): waiting for it held the run, and its locks, for years;
    the new snapshot's name is free anyway (free_snapshot_name)."""
    ahead = latest - time.time()
    if ahead > AHEAD_SECONDS:
        log.warning("the newest snapshot or backup is dated %d s ahead of this host's clock:"
                    " not waiting for that second", ahead)
        return
    while time.time() < latest + 1:
        sleep(latest + 1 - time.time() + 0.01)


def latest_second(on_server: List[dict], snaps: List[Snapshot]) -> int:
    """The newest creation second among the dataset's snapshots and its backups."""
    return max([s.creation for s in snaps] + [int(m["snapshot_time"]) for m in on_server],
               default=0)


def named_by_its_creation(snap: Snapshot) -> bool:
    """Whether a backup snapshot's name is its creation second (the key's timestamp)."""
    made = datetime.fromtimestamp(snap.creation, timezone.utc)
    return snap.short == BACKUP_PREFIX + protocol.format_timestamp(made)


def name_by_creation(zfs: Zfs, snap: Snapshot) -> Snapshot:
    """The snapshot renamed to its creation second when it landed in a later second than its
    name says (a slow or loaded pool: each `zfs` call may take more than a second), so the
    storage key, built from the creation time, carries the snapshot's own name. A name that is
    taken already leaves the snapshot as it is (the caller makes a new one)."""
    if named_by_its_creation(snap):
        return snap
    made = datetime.fromtimestamp(snap.creation, timezone.utc)
    dataset = snap.name.split("@", 1)[0]
    wanted = f"{dataset}@{BACKUP_PREFIX}{protocol.format_timestamp(made)}"
    if zfs.exists(wanted):
        return snap
    zfs.rename(snap.name, wanted)
    return zfs.snapshot_info(wanted, PROPS)


def in_catalog(base: Base, on_server: List[dict]) -> bool:
    """Whether the server holds the backup of the snapshot `base` stands for."""
    return any(m["snapshot"] == base.snapshot and (not m.get("guid") or m["guid"] == base.guid)
               for m in on_server)


class Backup(Uploader):
    """Backups of one dataset to one server (`tag`: that server's name in bases)."""

    features: Features
    base: Optional[Base] = None
    mode = "auto"
    snaps: List[Snapshot]
    marks: Optional[List[Snapshot]] = None

    def __init__(self, *args, tag: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag

    def choose_base(self, mode: str, features: Features, on_server: List[dict],
                    snaps: Optional[List[Snapshot]] = None,
                    marks: Optional[List[Snapshot]] = None) -> Optional[Base]:
        """This server's newest base that its catalog confirms (any server's base will do:
        an incremental needs only that the server holds its parent)."""
        if mode == "full":
            return None
        bases = find_bases(self.zfs, self.dataset, features, snaps, marks)
        confirmed = next((b for b in bases if in_catalog(b, on_server)), None)
        if confirmed is not None:
            return confirmed
        if not bases:
            problem = f"no incremental base for {self.dataset}: run a full backup first"
        else:
            problem = (f"the base {bases[0].name} is not in the server's catalog"
                       " (deleted or rotated there, or sent to another server)")
        if mode == "incremental":
            raise UsageError(problem)
        if bases:
            log.warning("%s; sending a full backup", problem)
        return None

    def chain_too_long(self, on_server: List[dict], status: dict) -> bool:
        """True when the server's chain limits say the next backup must be full."""
        limit, age = status.get("max_incrementals") or 0, status.get("max_chain_age_days") or 0
        if not on_server or not (limit or age):
            return False
        since_full = 0
        for manifest in reversed(on_server):
            if manifest["type"] == "full":
                if age and time.time() - manifest["snapshot_time"] > age * 86400:
                    return True
                break
            since_full += 1
        return bool(limit) and since_full >= limit

    def cleanup_stale(self, features: Features, on_server: List[dict],
                      snaps: Optional[List[Snapshot]] = None,
                      marks: Optional[List[Snapshot]] = None) -> List[Snapshot]:
        """Adopt or remove backup snapshots left by an interrupted run; return the dataset's
        snapshots (with PROPS) as they are afterwards.

        One `zfs get -r` serves the whole run up to the new snapshot: on a dataset with
        thousands of snapshots each listing takes seconds."""
        if snaps is None:
            snaps = self.zfs.snapshots(self.dataset, PROPS)
        bases = find_bases(self.zfs, self.dataset, features, snaps, marks)
        newest = bases[0].snapshot if bases else ""
        # a backup made for this server waits behind this server's bases only: another
        # server's newer base does not make it any less this server's to adopt
        mine = next((b.snapshot for b in bases if b.tag in (self.tag, "")), "")
        stored = {(m["snapshot"], m.get("guid") or "") for m in on_server}
        changed = False
        now = time.time()
        for snap in backup_snapshots(self.zfs, self.dataset, snaps):
            ours = bool(self.tag) and snap.prop(PROP_SERVER) == self.tag
            if snap.prop(PROP_BASE) == "yes" or snap.prop(PROP_BASES) or \
                    snap.short <= (mine if ours else newest):
                continue
            if pending_elsewhere(snap, self.tag, now):
                log.info("leaving %s to the runs of the server it was made for", snap.name)
                continue
            # a manifest without a guid (an older writer) stands for its snapshot's name, as
            # in_catalog takes it: a committed backup is never removed as an interrupted one
            if (snap.short, snap.guid) in stored or (snap.short, "") in stored:
                log.info("adopting %s: the server committed it", snap.name)
                mark_base(self.zfs, self.dataset, snap, features, self.tag)
            else:
                log.info("removing %s left by an interrupted backup", snap.name)
                self.zfs.destroy(snap.name)
            changed = True
        return self.zfs.snapshots(self.dataset, PROPS) if changed else snaps

    def prepare(self, mode: str, features: Features, on_server: List[dict],
                status: Optional[dict], snaps: Optional[List[Snapshot]] = None,
                marks: Optional[List[Snapshot]] = None) -> None:
        """Everything before the snapshot: stale snapshots, chain limits, the base."""
        self.features, self.marks = features, marks
        if self.send_properties and (
                not features.modern or (status or {}).get("storage_type") == "local"):
            # zfs-fuse's `send -p` takes a temporary hold that a killed send never releases
            # (the snapshot stays undestroyable), and the local store, which receives into
            # zfs, refuses property (compound) streams: the properties go as a record instead
            # (client/record.py)
            log.debug("%s: sending without -p, with a property record", self.dataset)
            self.send_properties, self.records_properties = False, True
        self.snaps = self.cleanup_stale(features, on_server, snaps, marks)
        if self.snaps is not snaps:
            self.marks = None  # listed again where needed
        if mode == "auto" and status is not None and self.chain_too_long(on_server, status):
            log.info("%s: the chain reached the server's limit: sending a full backup",
                     self.dataset)
            mode = "full"
        self.mode = mode
        self.base = self.choose_base(mode, features, on_server, self.snaps, self.marks)

    def send(self, snap: Snapshot) -> Result:
        """Send the new snapshot from the prepared base, then make it this server's base."""
        result = self.upload(snap)
        self.mark(snap)
        return result

    def upload(self, snap: Snapshot, at_end: Optional[Callable[[], None]] = None) -> Result:
        """Send the new snapshot from the prepared base (`at_end`: called once its stream is
        read); a failed send destroys the snapshot (the next run starts clean), except while
        the server is committing it (interrupted, or no longer waited for)."""
        try:
            return self._upload(snap, self.base, self.features, fallback=self.mode == "auto",
                                at_end=at_end)
        except BaseException:
            if not self.commit_pending:  # else the next run adopts it (cleanup_stale)
                self.discard(snap)
            raise

    def send_early(self, snap: Snapshot) -> None:
        """Start the new snapshot's `zfs send` before its upload (Uploader.start_early)."""
        self.start_early(snap, self.base, self.features)

    def mark(self, snap: Snapshot) -> None:
        """Make the committed snapshot this server's base (until then, or if this fails, the
        next run adopts it: cleanup_stale)."""
        mark_base(self.zfs, self.dataset, snap, self.features, self.tag, self.snaps, self.marks)

    def committed(self, snap: Snapshot) -> Committed:
        """The committed snapshot, for base.mark_bases (marked with others)."""
        return Committed(self.dataset, snap, self.features, self.snaps, self.marks)

    def discard(self, snap: Snapshot, attempts: int = 3) -> None:
        """Destroy a snapshot that was not sent, patiently (zfs-fuse keeps it busy a moment
        after a killed send); if it stays, the next run removes it (cleanup_stale)."""
        self.drop_early()
        for attempt in range(attempts):
            try:
                self.zfs.destroy(snap.name)
                return
            except ZfsmgrError as exc:
                if attempt == attempts - 1:
                    log.warning("could not remove %s (the next run will): %s", snap.name, exc)
                    return
                self.sleep(1)

    def run(self, mode: str = "auto") -> Result:
        """Back up this one dataset: 'auto', 'full' or 'incremental'."""
        if not self.zfs.exists(self.dataset):
            raise UsageError(f"dataset {self.dataset} does not exist")
        on_server = self.server_backups()
        status = self.api.call("GET", protocol.STATUS)
        self.prepare(mode, self.zfs.features(self.dataset), on_server, status)
        wait_for_a_new_second(latest_second(on_server, self.snaps), self.sleep)
        snap = self._new_snapshot()
        record.attach(self.zfs, [(self.dataset, self, snap)])
        return self.send(snap)

    def _new_snapshot(self) -> Snapshot:
        """Create `DS@zfsmgr_<stamp>` whose creation second is its stamp, so the storage key
        (built from the creation time) carries the snapshot's own timestamp; a snapshot that
        landed in a later second takes that second's name, or is made again."""
        for _ in range(5):
            name = new_snapshot_name(self.zfs, self.dataset)
            self.zfs.snapshot(name, made_with(self.tag))
            snap = name_by_creation(self.zfs, self.zfs.snapshot_info(name, PROPS))
            if named_by_its_creation(snap):
                return snap
            self.zfs.destroy(snap.name)
        raise ZfsmgrError(f"the clock of {self.dataset}'s pool disagrees with this host's:"
                          " cannot name a snapshot by its creation time")
