"""The one runner for `zfs`/`zpool`: argument lists, stderr drained, errors with argv and message.

Works with current OpenZFS and with zfs-fuse (no bookmarks, no `send -nvP/-c/-w/-t`, no
`list -p`): features are probed per pool/dataset, never assumed.
"""

from __future__ import annotations

import collections
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO, Dict, Iterable, List, Optional, Sequence

from zfsmgr.errors import ZfsError, ZfsNotFound  # noqa: F401 (ZfsError: imported from here)

PROPERTY_PREFIX = "org.zfsmgr:"  # user properties: lower case, as zfs-fuse requires
HOLD_TAG = "zfsmgr"


def run(argv: Sequence[str], check: bool = True, stdin_data: Optional[bytes] = None) -> str:
    """Run a short command, return its stdout; raise ZfsError on a non-zero exit."""
    try:
        proc = subprocess.run(list(argv), input=stdin_data, capture_output=True, timeout=600)
    except FileNotFoundError as exc:
        raise ZfsError(argv, 127, f"{argv[0]}: command not found") from exc
    if check and proc.returncode != 0:
        raise ZfsError(argv, proc.returncode, proc.stderr.decode("utf-8", "replace")
                       or proc.stdout.decode("utf-8", "replace"))
    return proc.stdout.decode("utf-8", "replace")


class _StderrDrain(threading.Thread):
    """Reads a child's stderr as it runs, keeping the last lines only."""

    def __init__(self, stream: IO[bytes]):
        super().__init__(daemon=True)
        self.stream, self.lines = stream, collections.deque(maxlen=50)

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            self.lines.append(line.decode("utf-8", "replace").rstrip())
        self.stream.close()

    def text(self) -> str:
        self.join(timeout=5)
        return "\n".join(self.lines)


class StreamingCommand:
    """A `zfs send` (reading) or `zfs recv` (writing) child; always reaped on exit.

    Use as a context manager. Leaving the block normally waits for the child and raises
    ZfsError if it failed; leaving it with an exception kills the child first.
    """

    def __init__(self, argv: Sequence[str], mode: str):
        self.argv = list(argv)
        kwargs = {"stdout": subprocess.PIPE} if mode == "r" else {
            "stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL}
        try:
            self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, **kwargs)
        except FileNotFoundError as exc:
            raise ZfsError(argv, 127, f"{argv[0]}: command not found") from exc
        self.stream = self.proc.stdout if mode == "r" else self.proc.stdin
        self._stderr = _StderrDrain(self.proc.stderr)
        self._stderr.start()

    def __enter__(self) -> "StreamingCommand":
        return self

    def read(self, size: int) -> bytes:
        """Read up to `size` bytes of the child's stdout."""
        return self.stream.read(size)

    def write(self, data: bytes) -> None:
        """Write to the child's stdin."""
        try:
            self.stream.write(data)
        except BrokenPipeError:
            self.finish()
            raise ZfsError(self.argv, self.proc.returncode or 1, self._stderr.text()) from None

    def finish(self) -> None:
        """Close our end, wait for the child, raise ZfsError if it failed."""
        if self.stream and not self.stream.closed:
            try:
                self.stream.close()
            except BrokenPipeError:
                pass
        code = self.proc.wait()
        if code != 0:
            raise ZfsError(self.argv, code, self._stderr.text())

    def kill(self) -> None:
        """Stop the child and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            if self.stream and not self.stream.closed:
                self.stream.close()
        except OSError:
            pass
        self.proc.wait()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.kill()
        else:
            self.finish()


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
        value = (self.props or {}).get(PROPERTY_PREFIX + name, "-")
        return "" if value == "-" else value


@dataclass(frozen=True)
class Features:
    """What the host's zfs can do for one dataset."""

    bookmarks: bool = False
    send_estimate: bool = False  # send -nvP
    compressed_send: bool = False  # send -c
    raw_send: bool = False  # send -w (dataset is encrypted)
    resumable_recv: bool = False  # recv -s / send -t


class Zfs:
    """Typed wrappers around the zfs commands zfsmgr uses."""

    def __init__(self, zfs: str = "zfs", zpool: str = "zpool"):
        self.zfs, self.zpool = zfs, zpool

    def props(self, targets: Sequence[str], props: Iterable[str],
              recursive_depth: int = 0) -> Dict[str, Dict[str, str]]:
        """Raw property values by name: {target: {prop: value}} (`-` when unset)."""
        argv = [self.zfs, "get", "-Hp"]
        if recursive_depth:
            argv += ["-r", "-d", str(recursive_depth)]
        argv += ["-o", "name,property,value", ",".join(props), *targets]
        result: Dict[str, Dict[str, str]] = {}
        for line in run(argv).splitlines():
            name, prop, value = line.split("\t", 2)
            result.setdefault(name, {})[prop] = value
        return result

    def exists(self, name: str) -> bool:
        """Whether a dataset or snapshot exists."""
        argv = [self.zfs, "list", "-H", "-o", "name"]
        if "@" in name:
            argv += ["-t", "snapshot"]
        proc = subprocess.run(argv + [name], capture_output=True)
        return proc.returncode == 0

    def get(self, name: str, prop: str) -> str:
        """One property's raw value."""
        return self.props([name], [prop])[name][prop]

    def set(self, name: str, prop: str, value: str) -> None:
        """Set a property."""
        run([self.zfs, "set", f"{prop}={value}", name])

    def snapshots(self, dataset: str, user_props: Sequence[str] = ()) -> List[Snapshot]:
        """Snapshots of one dataset (not its children), oldest first."""
        props = _snapshot_props(user_props)
        found = self.props([dataset], props, recursive_depth=1)
        snaps = [_snapshot(name, values, props) for name, values in found.items()
                 if name.startswith(dataset + "@")]
        return sorted(snaps, key=lambda s: s.createtxg)

    def snapshot_info(self, name: str, user_props: Sequence[str] = ()) -> Snapshot:
        """One snapshot, as `snapshots` lists it."""
        props = _snapshot_props(user_props)
        return _snapshot(name, self.props([name], props)[name], props)

    def bookmarks(self, dataset: str) -> List[Snapshot]:
        """Bookmarks of one dataset, oldest first (empty where bookmarks are unsupported)."""
        proc = subprocess.run([self.zfs, "list", "-H", "-o", "name,guid,createtxg,creation",
                               "-p", "-t", "bookmark", "-d", "1", dataset], capture_output=True)
        if proc.returncode != 0:
            return []
        marks = []
        for line in proc.stdout.decode().splitlines():
            name, guid, txg, creation = line.split("\t")
            marks.append(Snapshot(name, guid, int(txg), int(creation)))
        return sorted(marks, key=lambda s: s.createtxg)

    def snapshot(self, name: str, props: Optional[Dict[str, str]] = None) -> None:
        """Create a snapshot, with user properties set atomically."""
        argv = [self.zfs, "snapshot"]
        for key, value in (props or {}).items():
            argv += ["-o", f"{PROPERTY_PREFIX}{key}={value}"]
        run(argv + [name])

    def destroy(self, name: str, recursive: bool = False) -> None:
        """Destroy a dataset/snapshot/bookmark, retrying a few seconds while zfs says busy."""
        argv = [self.zfs, "destroy"] + (["-r"] if recursive else []) + [name]
        for delay in (0.2, 0.5, 1.0, 2.0, None):  # zfs-fuse settles a killed recv/mount late
            try:
                run(argv)
                return
            except ZfsError as exc:
                if delay is None or not ("busy" in exc.stderr or "already exists" in exc.stderr):
                    raise
                time.sleep(delay)

    def rollback(self, snapshot: str) -> None:
        """Return a dataset to its latest snapshot (discarding changes made since)."""
        run([self.zfs, "rollback", snapshot])

    def hold(self, snapshot: str, tag: str = HOLD_TAG) -> None:
        """Put a user hold on a snapshot."""
        run([self.zfs, "hold", tag, snapshot])

    def release(self, snapshot: str, tag: str = HOLD_TAG) -> None:
        """Release a user hold; a missing hold is not an error."""
        try:
            run([self.zfs, "release", tag, snapshot])
        except ZfsError as exc:
            if "no such tag" not in exc.stderr and "does not exist" not in exc.stderr:
                raise

    def bookmark(self, snapshot: str, bookmark: str) -> None:
        """Create bookmark `pool/ds#name` of a snapshot."""
        run([self.zfs, "bookmark", snapshot, bookmark])

    def features(self, dataset: str) -> Features:
        """Probe what this host's zfs supports for `dataset` (no side effects)."""
        pool = dataset.split("/")[0]
        marks = subprocess.run([self.zfs, "list", "-H", "-o", "name", "-t", "bookmark", pool],
                               capture_output=True).returncode == 0
        if marks:
            state = subprocess.run([self.zpool, "get", "-H", "-o", "value", "feature@bookmarks",
                                    pool], capture_output=True).stdout.decode().strip()
            marks = state in ("enabled", "active")
        enc = subprocess.run([self.zfs, "get", "-H", "-o", "value", "encryption", dataset],
                             capture_output=True)
        modern = enc.returncode == 0  # OpenZFS >= 0.8: -nvP, -c, -w, -t, recv -s
        encrypted = modern and enc.stdout.decode().strip() not in ("off", "-", "")
        return Features(bookmarks=marks, send_estimate=modern, compressed_send=modern,
                        raw_send=encrypted, resumable_recv=modern)

    def send_argv(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
                  compressed: bool = False, estimate: bool = False) -> List[str]:
        """The `zfs send` command line for a full or incremental stream."""
        argv = [self.zfs, "send"]
        if estimate:
            argv.append("-nvP")
        if raw:
            argv.append("-w")
        elif compressed:
            argv.append("-c")
        if base:
            argv += ["-i", base]
        return argv + [snapshot]

    def estimate(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
                 compressed: bool = False) -> Optional[int]:
        """Size estimate from `send -nvP` (None where unsupported)."""
        argv = self.send_argv(snapshot, base, raw, compressed, estimate=True)
        proc = subprocess.run(argv, capture_output=True)
        if proc.returncode != 0:
            return None
        text = proc.stdout.decode() + "\n" + proc.stderr.decode()  # older releases: stderr
        for line in text.splitlines():
            fields = line.split("\t")
            if fields[0] == "size" and len(fields) == 2 and fields[1].strip().isdigit():
                return int(fields[1])
        return None

    def send(self, snapshot: str, base: Optional[str] = None, raw: bool = False,
             compressed: bool = False) -> StreamingCommand:
        """Start `zfs send`; read the stream from the returned context manager."""
        return StreamingCommand(self.send_argv(snapshot, base, raw, compressed), "r")

    def send_resume(self, token: str) -> StreamingCommand:
        """Start `zfs send -t token`: the rest of an interrupted stream, flags included."""
        return StreamingCommand([self.zfs, "send", "-t", token], "r")

    def resumed_bytes(self, token: str) -> int:
        """How many bytes of the stream the receiver already has, from `send -nvt` (0: unknown)."""
        proc = subprocess.run([self.zfs, "send", "-nv", "-t", token], capture_output=True)
        for line in (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines():
            name, _, value = line.strip().partition(" = ")
            if name == "bytes":
                try:
                    return int(value.strip(), 0)
                except ValueError:
                    return 0
        return 0

    def receive(self, target: str, force: bool = False, unmounted: bool = True,
                resumable: bool = False) -> StreamingCommand:
        """Start `zfs recv` into `target`; write the stream to the returned context manager."""
        argv = [self.zfs, "recv"] + (["-F"] if force else []) + (["-u"] if unmounted else [])
        argv += (["-s"] if resumable else []) + [target]
        return StreamingCommand(argv, "w")


def _snapshot_props(user_props: Sequence[str]) -> List[str]:
    return ["guid", "createtxg", "creation", "userrefs"] + [
        PROPERTY_PREFIX + p for p in user_props]


def _snapshot(name: str, values: Dict[str, str], props: List[str]) -> Snapshot:
    userrefs = values.get("userrefs", "-")
    return Snapshot(name, values["guid"], int(values["createtxg"]), int(values["creation"]),
                    int(userrefs) if userrefs.isdigit() else 0,
                    {k: values.get(k, "-") for k in props[4:]})


def zfs_from_env() -> Zfs:
    """A Zfs using ZFSMGR_ZFS / ZFSMGR_ZPOOL when set (tests point these at other binaries)."""
    return Zfs(os.environ.get("ZFSMGR_ZFS", "zfs"), os.environ.get("ZFSMGR_ZPOOL", "zpool"))
