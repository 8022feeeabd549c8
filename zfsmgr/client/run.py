"""One `client backup` run over every selected dataset of the host.

One lock for the run (per server) and one per dataset; one listing per pool; one atomic
`zfs snapshot` per pool naming every selected dataset of it (client/poolsnapshot.py: one name
for the pool, and the same in every pool as a rule, so a run is recognisable), then one stream
and chain per dataset. A dataset that fails
is reported and the others go on; when the server cannot be reached, the rest of the run is
skipped (each would wait minutes for it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from zfsmgr import protocol
from zfsmgr.client import catalog, changes, record
from zfsmgr.client.backup import (Backup, free_snapshot_name, latest_second,
                                  wait_for_a_new_second)
from zfsmgr.client.base import Committed
from zfsmgr.client.inventory import Pool, list_pools
from zfsmgr.client.marker import Marker
from zfsmgr.client.locks import DatasetLock
from zfsmgr.client.poolsnapshot import snapshot_pool
from zfsmgr.client.selection import Choice, parse_list, select, under
from zfsmgr.client.upload import Result, summary
from zfsmgr.crypt import Encryption
from zfsmgr.errors import ExitStatus, ServerUnreachable, ZfsmgrError
from zfsmgr.progress import Progress, human
from zfsmgr.zfs import Snapshot, Zfs

log = logging.getLogger("zfsmgr.client")
AUTO_PARALLEL = 2  # uploads at once by default: a second hides the first's fixed costs
REQUESTS_PER_UPLOAD = 2  # a streaming upload: part n+1 arrives while the server stores part n
REQUESTS_PER_ENDING = 1  # an upload past its stream: its last part stored, then its commit


@dataclass
class Outcome:
    """What the run did with one dataset: sent, unchanged or failed."""

    dataset: str
    status: str
    message: str = ""
    result: Optional[Result] = None
    exit_status: int = ExitStatus.OK

    def as_dict(self) -> dict:
        out = {"dataset": self.dataset, "status": self.status, "message": self.message}
        if self.result:
            out.update(self.result.as_dict())
        return out

    def line(self) -> str:
        if self.result:
            return summary(self.result)
        return f"{self.dataset}: {self.status}: {self.message}"


class Cancellable(Progress):
    """A progress line whose transfer stops (KeyboardInterrupt in its thread) once the run is
    cancelled: a parallel upload ends at its next chunk, as a single one does on Ctrl-C."""

    def __init__(self, label: str, total: Optional[int], cancelled: threading.Event):
        super().__init__(label, total)
        self.cancelled = cancelled

    def update(self, done: int) -> None:
        if self.cancelled.is_set():
            raise KeyboardInterrupt
        super().update(done)


@dataclass
class Report:
    """The whole run."""

    outcomes: List[Outcome] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    pools: Dict[str, str] = field(default_factory=dict)  # pool: the name of its new snapshots

    @property
    def snapshot(self) -> str:
        """The run's snapshot name: one for every pool, as a rule; '' when the pools' differ
        (a pool whose snapshots landed in a later second took that second's name)."""
        names = set(self.pools.values())
        return names.pop() if len(names) == 1 else ""

    @property
    def failed(self) -> List[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def exit_status(self) -> int:
        """0 when every dataset succeeded; else the failures' status when they agree, 1."""
        codes = {o.exit_status for o in self.failed}
        return ExitStatus.OK if not codes else codes.pop() if len(codes) == 1 \
            else ExitStatus.ERROR

    def as_dict(self) -> dict:
        sent = [o.result for o in self.outcomes if o.result]
        return {"snapshot": self.snapshot, "snapshots": self.pools,
                "datasets": [o.as_dict() for o in self.outcomes],
                "notes": self.notes, "sent": len(sent),
                "unchanged": sum(o.status == "unchanged" for o in self.outcomes),
                "failed": len(self.failed), "raw_size": sum(r.raw_size for r in sent),
                "stored_size": sum(r.stored_size for r in sent),
                "exit_status": int(self.exit_status())}

    def total_line(self) -> str:
        d = self.as_dict()
        return (f"{len(self.outcomes)} datasets: {d['sent']} sent ({human(d['raw_size'])} as"
                f" {human(d['stored_size'])}), {d['unchanged']} unchanged, {d['failed']}"
                " failed")


@dataclass
class Options:
    """The settings a run uses."""

    roots: List[str]
    recursive: bool = False
    excludes: List[str] = field(default_factory=list)
    compression: str = "gzip"
    level: int = 1
    storage_type: str = ""
    send_properties: bool = True
    backup_unchanged: bool = False
    tag: str = ""
    parallel: int = 0  # 0: AUTO_PARALLEL where the server's share allows

    @classmethod
    def from_settings(cls, settings, tag: str) -> "Options":
        roots = [protocol.validate_dataset(r) for r in parse_list(settings.local_dataset)]
        return cls(roots, settings.recursive, parse_list(settings.exclude_datasets),
                   settings.compress, settings.compress_level, settings.storage_type,
                   settings.send_properties, settings.backup_unchanged, tag,
                   settings.parallel)


def uploads_at_once(parallel: int, status: dict) -> int:
    """How many datasets to send at once: PARALLEL (0: AUTO_PARALLEL), at most what the
    client's share of requests in the server allows (`client_max_requests` of /status, two
    per upload: part n+1 arrives while the server stores part n; beyond the share it answers
    429 and the upload backs off). A server that does not say allows one."""
    share = status.get("client_max_requests")
    allowed = max(1, share // REQUESTS_PER_UPLOAD) if isinstance(share, int) else 1
    wanted = parallel or AUTO_PARALLEL
    if parallel and wanted > allowed:
        log.info("PARALLEL=%d, but the server allows this client %s requests at once: sending"
                 " %d datasets at a time", parallel, share, allowed)
    return min(wanted, allowed)


def endings_at_once(workers: int, status: dict) -> int:
    """How many uploads past the end of their stream (the server storing the last part, then
    the commit) may go on while `workers` others stream, at most one per stream: what the
    client's shares in the server leave room for, of requests (`client_max_requests` of
    /status: two per streaming upload, one per ending) and of open uploads
    (`client_max_uploads`). None where the server does not say its share of uploads (each
    upload ends before the next starts) and with one upload at a time (PARALLEL=1).

    Each dataset's upload waits for the server to store its last part (the server takes a
    part once its whole body is in) and to commit: some 50-100 ms in which its stream stands
    still, paid by every dataset of a run."""
    share, uploads = status.get("client_max_requests"), status.get("client_max_uploads")
    if workers < 2 or not isinstance(share, int) or not isinstance(uploads, int):
        return 0
    return max(0, min(workers, (share - REQUESTS_PER_UPLOAD * workers) // REQUESTS_PER_ENDING,
                      uploads - workers))


def plan(zfs: Zfs, options: Options):
    """(pools, choices): the listing and the verdict on every dataset, as `client datasets`
    shows them."""
    pools = list_pools(zfs, options.roots, options.recursive)
    candidates = [d.candidate() for p in pools.values() for d in p.datasets.values()]
    return pools, select(candidates, options.roots, options.recursive, options.excludes)


class Run:
    """A backup run of every selected dataset to one server."""

    def __init__(self, api, zfs: Zfs, options: Options, state_dir: Path, mode: str = "auto",
                 report: Callable[[Outcome], None] = lambda outcome: None,
                 sleep: Optional[Callable[[float], None]] = None,
                 encryption: Encryption = Encryption()):
        self.api, self.zfs, self.options, self.mode = api, zfs, options, mode
        self.encryption = encryption
        self.cancelled = threading.Event()
        self.state_dir, self.report_one = state_dir, report
        self.sleep = sleep or self._pause
        self.report = Report()
        self.workers = 1  # uploads at once: uploads_at_once, from the server's /status
        self.endings = 0  # uploads ending meanwhile (endings_at_once, from /status)
        self._fresh: Dict[str, Snapshot] = {}  # the new snapshots and bases, listed again
        self._snapshotting: tuple = ([], "")  # (datasets, name) of a pool's snapshot under way

    def _done(self, outcome: Outcome) -> None:
        self.report.outcomes.append(outcome)
        self.report_one(outcome)

    def _fail(self, dataset: str, exc: BaseException) -> None:
        self._done(Outcome(dataset, "failed", str(exc), None,
                           getattr(exc, "exit_status", ExitStatus.ERROR)))

    def execute(self) -> Report:
        """Run it; the report says what happened to each dataset."""
        pools, choices = plan(self.zfs, self.options)
        history = changes.history_path(self.state_dir, self.options.tag, self.options.roots)
        listed = {name: set(pool.datasets) for name, pool in pools.items()}
        self.report.notes = changes.compare(changes.load_history(history), choices, listed)
        for note in self.report.notes:
            log.info("%s", note)
        chosen = [c for c in choices if c.selected or c.failed]
        if not chosen:
            raise ZfsmgrError("no dataset selected: see `zfsmgr client datasets`")
        status = self.api.call("GET", protocol.STATUS)
        self.workers = uploads_at_once(self.options.parallel, status)
        self.endings = endings_at_once(self.workers, status)
        on_server, unreadable = catalog.manifests(self.api, [c.name for c in chosen
                                                             if c.selected])
        for name, exc in unreadable.items():
            self._fail(name, exc)
        chosen = [c for c in chosen if c.name not in unreadable]
        with contextlib.ExitStack() as locks:
            prepared = self._prepare(pools, chosen, on_server, status, locks)
            self._snapshot_and_send(pools, prepared, on_server)
        changes.save_history(history, choices)
        order = {c.name: i for i, c in enumerate(choices)}
        self.report.outcomes.sort(key=lambda o: order.get(o.dataset, 0))
        return self.report

    def _prepare(self, pools: Dict[str, Pool], chosen: List[Choice], on_server, status,
                 locks: contextlib.ExitStack) -> Dict[str, Backup]:
        prepared: Dict[str, Backup] = {}
        for choice in chosen:
            if not choice.selected:
                self._fail(choice.name, ZfsmgrError(f"dataset {choice.name} {choice.reason}"
                                                    if choice.reason == "does not exist" else
                                                    f"{choice.name}: {choice.reason}"))
                continue
            pool = pools[choice.name.split("/")[0]]
            info = pool.datasets[choice.name]
            store = self.options.storage_type or status.get("storage_type")
            if info.values.get("type") == "volume" and store == "local":
                self._fail(choice.name, ZfsmgrError(
                    f"{choice.name} is a volume, and the server's local store keeps file"
                    " systems only: back it up to a dir or s3 store (STORAGE_TYPE), or leave"
                    " it out (EXCLUDE_DATASETS, or org.zfsmgr:backup=off)"))
                continue
            try:
                locks.enter_context(DatasetLock(self.state_dir, choice.name))
                o = self.options
                backup = Backup(self.api, self.zfs, choice.name, o.compression, o.level,
                                o.storage_type, sleep=self.sleep,
                                encryption=self.encryption, send_properties=o.send_properties,
                                tag=o.tag, progress=self._progress)
                backup.compression_property = info.values.get("compression", "-")
                backup.prepare(self.mode, pool.features_of(choice.name),
                               on_server.get(choice.name, []), status, info.snaps,
                               info.marks if pool.features.bookmarks else None)
                prepared[choice.name] = backup
            except ZfsmgrError as exc:
                self._fail(choice.name, exc)
        return prepared

    def _snapshot_and_send(self, pools: Dict[str, Pool], prepared: Dict[str, Backup],
                           on_server) -> None:
        if not prepared:
            return
        taken = {s.short for b in prepared.values() for s in b.snaps}
        latest = max(latest_second(on_server.get(n, []), b.snaps) for n, b in prepared.items())
        wait_for_a_new_second(latest, self.sleep)
        short = free_snapshot_name(taken)
        new: Dict[str, Snapshot] = {}  # filled pool by pool
        try:
            self._snapshot_pools(pools, prepared, short, taken, new)
            todo = self._changed(new, prepared, pools)
            record.attach(self.zfs, todo)  # one `zfs get` per pool, where streams go without -p
        except BaseException:  # an interrupt before any stream: none of them stays behind
            for name, snap in new.items():
                if self.zfs.exists(snap.name):
                    prepared[name].discard(snap)
            members, name_taken = self._snapshotting  # a pool's `zfs snapshot` under way:
            for name in members:  # it ended first (runner.execute); its name is this run's
                if name not in new and self.zfs.exists(f"{name}@{name_taken}"):
                    self.zfs.destroy(f"{name}@{name_taken}")
            raise
        self._send_all(todo)

    def _snapshot_pools(self, pools: Dict[str, Pool], prepared: Dict[str, Backup], short: str,
                        taken: set, new: Dict[str, Snapshot]) -> None:
        """One atomic snapshot per pool of its prepared datasets; what was made goes into
        `new` as it is made."""
        for pool in pools.values():
            members = [n for n in prepared if n.split("/")[0] == pool.name]
            if not members:
                continue
            bases = [prepared[n].base.name for n in members
                     if prepared[n].base and not prepared[n].base.is_bookmark]
            self._snapshotting = (members, short)
            taken_here = snapshot_pool(self.zfs, pool, members, short, taken, bases,
                                       lambda name, snap: prepared[name].discard(snap),
                                       self.options.tag)
            self._snapshotting = ([], "")
            for name, exc in taken_here.failed.items():
                self._fail(name, exc)
            if taken_here.made:  # the next pool tries the same name (its second, often)
                self.report.pools[pool.name] = short = taken_here.short
            self._fresh.update(taken_here.listed)
            new.update(taken_here.made)

    def _changed(self, new: Dict[str, Snapshot], prepared: Dict[str, Backup],
                 pools: Dict[str, Pool]) -> List[tuple]:
        """The (dataset, backup, snapshot) to send; the new snapshots of the unchanged ones
        are reported and destroyed."""
        todo, unchanged = [], []
        for name, backup in prepared.items():
            snap = new.get(name)
            if snap is None:
                continue
            if self._unchanged(backup, snap, pools[name.split("/")[0]]):
                unchanged.append(name)
            else:
                todo.append((name, backup, snap))
        self._discard_unchanged(unchanged, new, prepared, pools)
        return todo

    def _discard_unchanged(self, unchanged: List[str], new: Dict[str, Snapshot],
                           prepared: Dict[str, Backup], pools: Dict[str, Pool]) -> None:
        """Destroy the snapshots nothing needs: one `zfs destroy -r DS@snap` for a subtree
        whose new snapshots are all unneeded and that has no dataset this run left out (whose
        snapshot of that name, made by another run, `-r` would destroy too), else one by
        one."""
        gone, done = set(unchanged), set()
        for name in sorted(unchanged):  # parents first
            if name in done:
                continue
            below = [n for n in new if under(n, name)]
            whole = pools[name.split("/")[0]].whole_subtree(name, list(new))
            if len(below) > 1 and whole and all(n in gone for n in below):
                try:  # the run's snapshot name is new: only this run's snapshots carry it
                    self.zfs.destroy(new[name].name, recursive=True)
                    done.update(below)
                    continue
                except ZfsmgrError as exc:
                    log.info("%s: %s; removing them one by one", new[name].name, exc)
            prepared[name].discard(new[name])
            done.add(name)

    def _send_all(self, todo: List[tuple]) -> None:
        """Send each (dataset, backup, snapshot), `options.parallel` at a time; a Marker
        marks the committed ones as bases while the next stream (a dataset's outcome comes
        once its base is marked). Once the server is unreachable the datasets not started yet
        are skipped; an interrupt stops the uploads under way at their next chunk (each
        removes its snapshot) and skips the rest; what was committed is still marked.

        When an upload has read its stream to the end, the `zfs send` of the next dataset
        to start begins (Backup.send_early): its first data is there when that upload opens,
        instead of each dataset waiting for its send to start after the commit before. Where
        the server's shares leave room (`self.endings`), that upload opens then too: the
        upload before waits for its last part's answer and its commit meanwhile, on a thread
        of its own, and at most `self.workers` streams flow at once, in the order of `todo`."""
        stop, why = threading.Event(), []
        lock, started, early = threading.Lock(), set(), set()
        turn = threading.Condition()
        streams = {"next": 0, "flowing": 0}  # the next index to stream; streams flowing

        def start_next() -> None:
            with lock:  # `one` takes its item under the lock: never started twice
                ahead = range(len(started), min(len(todo), len(started) + self.workers))
                upcoming = [j for j in ahead if j not in started and j not in early]
                if not upcoming or stop.is_set():
                    return
                early.add(upcoming[0])
                try:
                    todo[upcoming[0]][1].send_early(todo[upcoming[0]][2])
                except ZfsmgrError as exc:  # its upload starts it again, and reports
                    log.debug("starting the next send early: %s", exc)

        def marked(item: Committed, result, exc: Optional[ZfsmgrError]) -> None:
            self._done(Outcome(item.dataset, result.type, "", result) if exc is None else
                       Outcome(item.dataset, "failed", f"{exc}", None,
                               getattr(exc, "exit_status", ExitStatus.ERROR)))

        marker = Marker(self.zfs, self.options.tag, marked)

        def streaming(index: int) -> Callable[[], None]:
            """Wait for `index`'s turn to stream (or the run's stop); the function that
            ends it, once (with one thread per stream it never waits)."""
            with turn:
                while not stop.is_set() and (streams["next"] != index or
                                             streams["flowing"] >= self.workers):
                    turn.wait(0.1)  # 0.1: a stop set elsewhere is seen
                streams["next"], streams["flowing"] = index + 1, streams["flowing"] + 1
            ended = []

            def end() -> None:
                with turn:
                    if not ended:
                        ended.append(True)
                        streams["flowing"] -= 1
                        turn.notify_all()
            return end

        def one(index: int) -> None:
            end = streaming(index)

            def at_end() -> None:  # the stream is read: the next send starts, then its upload
                start_next()
                end()
            try:
                upload(index, at_end)
            finally:
                end()

        def upload(index: int, at_end: Callable[[], None]) -> None:
            name, backup, snap = todo[index]
            with lock:
                started.add(index)
            if stop.is_set():
                backup.discard(snap)
                self._fail(name, why[0] if why else ZfsmgrError("skipped: interrupted"))
                return
            try:
                result = backup.upload(snap, at_end=at_end)
                marker.add(backup.committed(snap), result)
            except ServerUnreachable as exc:
                why.append(ServerUnreachable(f"skipped: {exc}"))
                stop.set()
                self._fail(name, exc)
            except ZfsmgrError as exc:
                self._fail(name, exc)
            except Exception as exc:  # noqa: BLE001 (a bug, or an answer nothing checked)
                log.debug("%s failed", name, exc_info=True)  # the others still go
                self._fail(name, ZfsmgrError(f"internal error: {type(exc).__name__}: {exc}"
                                             " (ZFSMGR_DEBUG=1 or -v shows where)"))

        workers = max(1, min(self.workers, len(todo)))
        try:
            if workers == 1:
                for index in range(len(todo)):
                    try:
                        one(index)
                    except BaseException:
                        stop.set()  # as in parallel: each of the rest removes its snapshot
                        for rest in range(index + 1, len(todo)):
                            one(rest)
                        raise
                return
            with concurrent.futures.ThreadPoolExecutor(workers + self.endings) as pool:
                futures = [pool.submit(one, index) for index in range(len(todo))]
                try:
                    for future in futures:
                        future.result()
                except BaseException:
                    stop.set()
                    self.cancelled.set()
                    raise
        finally:
            marker.close()

    def _pause(self, seconds: float) -> None:
        """The run's sleep (an upload's wait before its retry): ends at once, with
        KeyboardInterrupt, once the run is cancelled. A parallel upload waiting out a server
        that went away heard no Ctrl-C or SIGTERM for its 7.5 minutes of retries (a signal
        reaches the main thread only), and the run could not end before it."""
        if self.cancelled.wait(seconds):
            raise KeyboardInterrupt

    def _progress(self, label: str, total: Optional[int]) -> Progress:
        return Cancellable(label, total, self.cancelled)

    def _unchanged(self, backup: Backup, snap: Snapshot, pool: Pool) -> bool:
        """Whether to skip the new snapshot (reported; _discard_unchanged destroys it): nothing
        changed since this server's base."""
        if self.options.backup_unchanged or backup.base is None or backup.mode == "full":
            return False
        snaps = [self._fresh.get(s.name, s) for s in backup.snaps] + [snap]
        if not changes.unchanged(snap, backup.base, snaps, backup.marks or [],
                                 pool.features.modern):
            return False
        self._done(Outcome(backup.dataset, "unchanged",
                           f"nothing written since {backup.base.name}: no backup sent"
                           " (BACKUP_UNCHANGED=true sends one anyway)"))
        self.api.checkin(backup.dataset, backup.base.snapshot)  # so it is not called stale
        return True
