"""Typed wrappers around the zfs commands zfsmgr uses (Zfs), the Snapshot and Features they
report, and feature probing; every command goes through the one runner (runner.py).

Works with current OpenZFS and with zfs-fuse (no bookmarks, no `send -nvP/-c/-w/-t`, no
`list -p`): features are probed per pool/dataset, never assumed. A failure is a ZfsError
carrying the command line and zfs's own message; ZfsNotFound when the target does not exist.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from zfsmgr.errors import ZfsError, ZfsNotFound
from zfsmgr.runner import StreamingCommand, execute, run

PROPERTY_PREFIX = "org.zfsmgr:"  # user properties: lower case, as zfs-fuse requires
HOLD_TAG = "zfsmgr"
# zfs-fuse settles a killed recv/mount late: until then a destroy may see these for a moment.
_SETTLING = re.compile(r"busy|already exists")
_SETTLING_DATASET = re.compile(r"busy|already exists|dependent clones")  # a %recv clone
DESTROY_PATIENCE = 5.0  # seconds a destroy waits for zfs to settle
ARGV_LIMIT = 100_000  # bytes of one command line; Linux allows 2 MiB, keep well below


def _batches(argv: Sequence[str], names: Sequence[str]) -> List[List[str]]:
    """`names` in runs that fit one command line after `argv` (none for no names)."""
    batches: List[List[str]] = []
    length = base = sum(len(a) + 1 for a in argv)
    for name in names:
        if not batches or length + len(name) + 1 > ARGV_LIMIT:
            batches.append([])
            length = base
        batches[-1].append(name)
        length += len(name) + 1
    return batches


@dataclass(frozen=True)
class Snapshot:
    """A snapshot (or bookmark) as zfs reports it."""

    name: str  # full name: pool/ds@snap or pool/ds#bm
    guid: str
    createtxg: int
    creation: int  # epoch seconds
    userrefs: int = 0
    props: Optional[Dict[str, str]] = None

    @property
    def short(self) -> str:
        """The part after '@' or '#'."""
        return self.name.split("@" if "@" in self.name else "#", 1)[1]

    def prop(self, name: str) -> str:
        """A zfsmgr user property of this snapshot, '' when unset."""
        return self.native(PROPERTY_PREFIX + name)

    def native(self, name: str) -> str:
        """A property the listing asked for (`used`, `written`...), '' when unset/unknown."""
        value = (self.props or {}).get(name, "-")
        return "" if value == "-" else value


@dataclass(frozen=True)
class Features:
    """What the host's zfs can do for one dataset."""

    bookmarks: bool = False
    send_estimate: bool = False  # send -nvP
    compressed_send: bool = False  # send -c
    raw_send: bool = False  # send -w (dataset is encrypted)
    resumable_recv: bool = False  # recv -s / send -t
    modern: bool = False  # OpenZFS >= 0.8: `written`, `encryption`, `zfs snapshot a@s b@s`


class Zfs:
    """Typed wrappers around the zfs commands zfsmgr uses."""

    def __init__(self, zfs: str = "zfs", zpool: str = "zpool"):
        self.zfs, self.zpool = zfs, zpool

    def props(self, targets: Sequence[str], props: Iterable[str],
              recursive_depth: int = 0) -> Dict[str, Dict[str, str]]:
        """Raw property values by name: {target: {prop: value}} (`-` when unset);
        recursive_depth -1 lists everything below the targets (`-r`)."""
        return {name: {p: v for p, (v, _) in values.items()} for name, values in
                self.props_with_source(targets, props, recursive_depth).items()}

    def props_with_source(self, targets: Sequence[str], props: Iterable[str],
                          recursive_depth: int = 0) -> Dict[str, Dict[str, tuple]]:
        """As `props`, each value with zfs's source column: {target: {prop: (value, source)}}.

        With recursion the listing holds the targets' descendants and their snapshots (one
        call per pool serves a whole run: zfs-fuse's `zfs get` has no `-t`)."""
        argv = [self.zfs, "get", "-Hp"]
        if recursive_depth > 0:
            argv += ["-r", "-d", str(recursive_depth)]
        elif recursive_depth < 0:
            argv.append("-r")
        argv += ["-o", "name,property,value,source", ",".join(props), *targets]
        return parse_get(run(argv))

    def own_properties(self, datasets: Sequence[str]) -> Dict[str, Dict[str, tuple]]:
        """The properties set on each dataset itself, as `send -p` would send them: {dataset:
        {prop: (value, source)}} with source `local` or `received` (one `zfs get -s` for all
        of them; no descendants, no snapshots). A value that holds a tab stays whole; a line
        broken by a newline in a value is left out."""
        argv = [self.zfs, "get", "-Hp", "-s", "local,received", "-o",
                "name,property,value,source", "all"]
        wanted = set(datasets)
        result: Dict[str, Dict[str, tuple]] = {}
        listed = "".join(run(argv + batch) for batch in _batches(argv, datasets))
        for line in listed.splitlines():
            fields = line.split("\t")
            if len(fields) < 4 or fields[0] not in wanted or \
                    fields[-1] not in ("local", "received"):
                continue
            result.setdefault(fields[0], {}).setdefault(
                fields[1], ("\t".join(fields[2:-1]), fields[-1]))
        return result

    def exists(self, name: str) -> bool:
        """Whether a dataset or snapshot exists; ZfsError when zfs fails for another reason."""
        argv = [self.zfs, "list", "-H", "-o", "name"]
        if "@" in name:
            argv += ["-t", "snapshot"]
        try:
            run(argv + [name])
        except ZfsNotFound:
            return False
        return True

    def get(self, name: str, prop: str) -> str:
        """One property's raw value."""
        return self.props([name], [prop])[name][prop]

    def set(self, name: str, prop: str, value: str) -> None:
        """Set a property."""
        self.set_all([name], prop, value)

    def set_all(self, names: Sequence[str], prop: str, value: str) -> None:
        """Set a property on every name (one `zfs set` takes many)."""
        self._each([self.zfs, "set", f"{prop}={value}"], names)

    def _each(self, argv: List[str], names: Sequence[str],
              harmless: Callable[[ZfsError], bool] = lambda exc: False) -> None:
        """Run `argv + names`, split into several calls only where one command line would
        be too long; a failure that is `harmless` is no error."""
        for batch in _batches(argv, names):
            try:
                run(argv + batch)
            except ZfsError as exc:
                if not harmless(exc):
                    raise

    def snapshots(self, dataset: str, user_props: Sequence[str] = ()) -> List[Snapshot]:
        """Snapshots of one dataset (not its children), oldest first."""
        props = snapshot_props(user_props)
        found = self.props_with_source([dataset], props, recursive_depth=1)
        snaps = [snapshot_from(name, *split_sources(pairs), props=props) for name, pairs in
                 found.items() if name.startswith(dataset + "@")]
        return sorted(snaps, key=lambda s: s.createtxg)

    def snapshot_info(self, name: str, user_props: Sequence[str] = ()) -> Snapshot:
        """One snapshot, as `snapshots` lists it."""
        props = snapshot_props(user_props)
        return snapshot_from(name, *split_sources(self.props_with_source([name], props)[name]),
                             props=props)

    def bookmarks(self, dataset: str, recursive: bool = False) -> List[Snapshot]:
        """Bookmarks of one dataset (or of its whole subtree), oldest first (empty where
        bookmarks are unsupported)."""
        depth = ["-r"] if recursive else ["-d", "1"]
        done = execute([self.zfs, "list", "-H", "-o", "name,guid,createtxg,creation", "-p",
                        "-t", "bookmark", *depth, dataset])
        if done.returncode != 0:
            return []
        marks = []
        for line in done.stdout.splitlines():
            name, guid, txg, creation = line.split("\t")
            marks.append(Snapshot(name, guid, int(txg), int(creation)))
        return sorted(marks, key=lambda s: s.createtxg)

    def snapshot(self, name: str, props: Optional[Dict[str, str]] = None,
                 recursive: bool = False) -> None:
        """Create a snapshot (`-r`: of the whole subtree, atomically), with user properties
        set atomically."""
        self.snapshot_many([name], props, recursive)

    def snapshot_many(self, names: Sequence[str], props: Optional[Dict[str, str]] = None,
                      recursive: bool = False) -> None:
        """One atomic `zfs snapshot` of every name (OpenZFS takes several; zfs-fuse one),
        split into several calls only where one command line would be too long. All or
        none: when a later call fails, the snapshots the earlier ones made are destroyed."""
        argv = [self.zfs, "snapshot"] + (["-r"] if recursive else [])
        for key, value in (props or {}).items():
            argv += ["-o", f"{PROPERTY_PREFIX}{key}={value}"]
        made: List[str] = []
        for batch in _batches(argv, names):
            try:
                run(argv + batch)
            except ZfsError as exc:
                raise self.undo_snapshots(made, exc, recursive) from None
            made += batch

    def undo_snapshots(self, made: Sequence[str], exc: ZfsError,
                       recursive: bool = False) -> ZfsError:
        """Destroy the snapshots `made` before `exc` stopped the rest of a set (`recursive`:
        each name's whole subtree, as `zfs snapshot -r` made it); `exc`, saying what became
        of them, to raise."""
        kept = []
        for name in reversed(made):
            try:
                self.destroy(name, recursive=recursive, missing_ok=True)
            except ZfsError:
                kept.append(name)
        if not made:
            return exc
        note = (f"({len(made)} snapshot(s) of the same set, made before it, destroyed again)"
                if not kept else f"(made before it and could not be destroyed again:"
                f" {', '.join(reversed(kept))})")
        cls = type(exc) if type(exc) in (ZfsError, ZfsNotFound) else ZfsError
        return cls(exc.argv, exc.returncode, f"{exc.stderr}\n{note}")

    def destroy(self, name: str, recursive: bool = False, missing_ok: bool = False,
                patience: float = DESTROY_PATIENCE) -> None:
        """Destroy a dataset/snapshot/bookmark (with `missing_ok`, one that is gone already is
        no error), retrying for up to `patience` seconds while zfs calls it busy.

        zfs-fuse settles a killed receive or mount a moment late; for a dataset, "dependent
        clones" is then its half-received clone. A snapshot's clones are real: no waiting."""
        argv = [self.zfs, "destroy"] + (["-r"] if recursive else []) + [name]
        settling = _SETTLING if "@" in name or "#" in name else _SETTLING_DATASET
        deadline, delay = time.monotonic() + patience, 0.2
        while True:
            try:
                run(argv)
                return
            except ZfsNotFound:
                if missing_ok:
                    return
                raise
            except ZfsError as exc:
                if not settling.search(exc.stderr) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def create(self, name: str, parents: bool = False,
               props: Optional[Mapping[str, str]] = None) -> None:
        """Create a filesystem (with `parents`, its missing parents too), with properties."""
        argv = [self.zfs, "create"] + (["-p"] if parents else [])
        for key, value in (props or {}).items():
            argv += ["-o", f"{key}={value}"]
        run(argv + [name])

    def rename(self, old: str, new: str, recursive: bool = False) -> None:
        """Rename a dataset or snapshot (`-r`: a snapshot of every descendant too)."""
        run([self.zfs, "rename"] + (["-r"] if recursive else []) + [old, new])

    def mount(self, dataset: str) -> None:
        """Mount a filesystem at its mountpoint."""
        run([self.zfs, "mount", dataset])

    def unmount(self, dataset: str) -> None:
        """Unmount a filesystem (fails while it is in use)."""
        run([self.zfs, "unmount", dataset])

    def inherit(self, name: str, prop: str) -> None:
        """Clear a property set locally (a user property disappears)."""
        run([self.zfs, "inherit", prop, name])

    def abort_receive(self, dataset: str) -> None:
        """Discard the partial state of an interrupted resumable receive (`zfs recv -A`)."""
        run([self.zfs, "recv", "-A", dataset])

    def rollback(self, snapshot: str) -> None:
        """Return a dataset to its latest snapshot (discarding changes made since)."""
        run([self.zfs, "rollback", snapshot])

    def hold(self, snapshot: str, tag: str = HOLD_TAG) -> None:
        """Put a user hold on a snapshot."""
        self.hold_all([snapshot], tag)

    def hold_all(self, snapshots: Sequence[str], tag: str = HOLD_TAG) -> None:
        """Put a user hold on every snapshot (one `zfs hold` takes many)."""
        self._each([self.zfs, "hold", tag], snapshots)

    def release(self, snapshot: str, tag: str = HOLD_TAG) -> None:
        """Release a user hold; a missing hold is not an error."""
        self.release_all([snapshot], tag)

    def release_all(self, snapshots: Sequence[str], tag: str = HOLD_TAG) -> None:
        """Release a user hold of every snapshot (one `zfs release` takes many, and goes on
        past a snapshot without it); a missing hold is not an error."""
        def missing(exc: ZfsError) -> bool:
            lines = [line for line in exc.stderr.splitlines() if line.strip()]
            return bool(lines) and all("no such tag" in line or "does not exist" in line
                                       for line in lines)

        self._each([self.zfs, "release", tag], snapshots, missing)

    def bookmark(self, snapshot: str, bookmark: str) -> None:
        """Create bookmark `pool/ds#name` of a snapshot."""
        run([self.zfs, "bookmark", snapshot, bookmark])

    def features(self, dataset: str) -> Features:
        """Probe what this host's zfs supports for `dataset` (no side effects)."""
        pool = self.pool_features(dataset.split("/")[0])
        if not pool.send_estimate:
            return pool
        enc = execute([self.zfs, "get", "-H", "-o", "value", "encryption", dataset])
        return dataclasses.replace(pool, raw_send=enc.stdout.strip() not in ("off", "-", ""))

    def pool_features(self, pool: str) -> Features:
        """What this host's zfs supports on `pool`, except raw sends (per dataset)."""
        marks = execute([self.zfs, "list", "-H", "-o", "name", "-t", "bookmark", pool]
                        ).returncode == 0
        if marks:
            state = execute([self.zpool, "get", "-H", "-o", "value", "feature@bookmarks", pool]
                            ).stdout.strip()
            marks = state in ("enabled", "active")
        modern = execute([self.zfs, "get", "-H", "-o", "value", "encryption", pool]
                         ).returncode == 0
        # OpenZFS >= 0.8: -nvP, -c, -w, -t, recv -s, `written`, several names per snapshot
        return Features(bookmarks=marks, send_estimate=modern, compressed_send=modern,
                        resumable_recv=modern, modern=modern)

    def send_argv(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
                  compressed: bool = False, estimate: bool = False,
                  properties: bool = False) -> List[str]:
        """The `zfs send` command line for a full or incremental stream (`-p`: with the
        dataset's properties)."""
        argv = [self.zfs, "send"]
        if estimate:
            argv.append("-nvP")
        if properties:
            argv.append("-p")
        if raw:
            argv.append("-w")
        elif compressed:
            argv.append("-c")
        if base:
            argv += ["-i", base]
        return argv + [snapshot]

    def estimate(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
                 compressed: bool = False, properties: bool = False) -> Optional[int]:
        """Size estimate from `send -nvP` (None where unsupported)."""
        argv = self.send_argv(snapshot, base, raw, compressed, estimate=True,
                              properties=properties)
        done = execute(argv)
        if done.returncode != 0:
            return None
        text = done.stdout + "\n" + done.stderr  # older releases: stderr
        for line in text.splitlines():
            fields = line.split("\t")
            if fields[0] == "size" and len(fields) == 2 and fields[1].strip().isdigit():
                return int(fields[1])
        return None

    def send(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
             compressed: bool = False, properties: bool = False) -> StreamingCommand:
        """Start `zfs send`; read the stream from the returned context manager."""
        return StreamingCommand(self.send_argv(snapshot, base, raw, compressed,
                                               properties=properties), "r")

    def send_resume(self, token: str) -> StreamingCommand:
        """Start `zfs send -t token`: the rest of an interrupted stream, flags included."""
        return StreamingCommand([self.zfs, "send", "-t", token], "r")

    def resumed_bytes(self, token: str) -> int:
        """How many bytes of the stream the receiver already has, from `send -nvt` (0: unknown)."""
        done = execute([self.zfs, "send", "-nv", "-t", token])
        for line in (done.stdout + done.stderr).splitlines():
            name, _, value = line.strip().partition(" = ")
            if name == "bytes":
                try:
                    return int(value.strip(), 0)
                except ValueError:
                    return 0
        return 0

    def receive(self, target: str, force: bool = False, unmounted: bool = True,
                resumable: bool = False,
                props: Optional[Dict[str, str]] = None) -> StreamingCommand:
        """Start `zfs recv` into `target` (`props`: set on it with `-o`, OpenZFS only); write
        the stream to the returned context manager."""
        argv = [self.zfs, "recv"] + (["-F"] if force else []) + (["-u"] if unmounted else [])
        argv += (["-s"] if resumable else [])
        for name, value in (props or {}).items():
            argv += ["-o", f"{name}={value}"]
        argv.append(target)
        return StreamingCommand(argv, "w")


def snapshot_props(user_props: Sequence[str], extra: Sequence[str] = ()) -> List[str]:
    """What a listing asks for to build Snapshots: their identity, `extra` zfs properties
    and zfsmgr's user properties `user_props`."""
    return ["guid", "createtxg", "creation", "userrefs", *extra] + [
        PROPERTY_PREFIX + p for p in user_props]


def snapshot_from(name: str, values: Dict[str, str], sources: Optional[Dict[str, str]] = None,
                  props: Sequence[str] = ()) -> Snapshot:
    """A Snapshot from one entry of a `props` listing that asked for `props`. With the
    listing's `sources`, zfsmgr's marks (org.zfsmgr:kind, base, bases) count only where they
    were set on the snapshot itself: one inherited from its dataset (a restored dataset whose
    properties said so) would make every snapshot of it look like a zfsmgr backup, which
    cleanup destroys."""
    userrefs = values.get("userrefs", "-")
    marks = {k: values.get(k, "-") for k in props[4:]}
    if sources is not None:
        marks = {k: v if not k.startswith(PROPERTY_PREFIX) or sources.get(k) == "local"
                 else "-" for k, v in marks.items()}
    return Snapshot(name, values["guid"], int(values["createtxg"]), int(values["creation"]),
                    int(userrefs) if userrefs.isdigit() else 0, marks)


def parse_get(text: str) -> Dict[str, Dict[str, tuple]]:
    """{name: {prop: (value, source)}} of `zfs get -H -o name,property,value,source`. A value
    may hold line breaks (a user property set so): zfs prints them as they are, so a line
    short of its four columns goes on in the next one."""
    result: Dict[str, Dict[str, tuple]] = {}
    pending = ""
    for line in text.splitlines():
        fields = (pending + line).split("\t", 3)
        if len(fields) < 4:
            pending += line + "\n"
            continue
        pending = ""
        name, prop, value, source = fields
        result.setdefault(name, {})[prop] = (value, source)
    return result


def split_sources(pairs: Dict[str, tuple]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """({prop: value}, {prop: source}) of one entry of props_with_source."""
    return {p: v for p, (v, _) in pairs.items()}, {p: src for p, (_, src) in pairs.items()}


def zfs_from_settings(settings) -> Zfs:
    """The Zfs of the ZFSMGR_ZFS / ZFSMGR_ZPOOL settings (tests point these at other programs)."""
    return Zfs(settings.get("ZFSMGR_ZFS") or "zfs", settings.get("ZFSMGR_ZPOOL") or "zpool")
