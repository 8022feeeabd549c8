"""The one runner for external commands (`zfs`, `zpool`, `zstd`): argument lists, stderr
drained, errors with argv and the command's own message.

Every child process of zfsmgr starts here: `execute`/`run` for short commands, `spawn` for
pipelines (StreamingCommand for `zfs send`/`recv`, compress.py's zstd filter). A missing
program and a command that does not answer within its timeout are a ZfsError like any other
failure; a failure because the named dataset, snapshot or pool does not exist is a ZfsNotFound.
Programs named without a '/' are looked up on PATH and then in /sbin, /usr/sbin and
/usr/local/sbin (cron's and sudo's PATH often lack them).

Works with current OpenZFS and with zfs-fuse (no bookmarks, no `send -nvP/-c/-w/-t`, no
`list -p`): features are probed per pool/dataset, never assumed.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO, Dict, Iterable, List, Mapping, Optional, Sequence

from zfsmgr.errors import MissingProgram, ZfsError, ZfsNotFound

PROPERTY_PREFIX = "org.zfsmgr:"  # user properties: lower case, as zfs-fuse requires
HOLD_TAG = "zfsmgr"
SBIN_DIRS = ("/sbin", "/usr/sbin", "/usr/local/sbin")
TIMEOUT = 600.0  # seconds a short command may take
_MISSING = re.compile(r"does not exist|no such pool|could not find any snapshots")
# zfs-fuse settles a killed recv/mount late: until then a destroy may see these for a moment.
_SETTLING = re.compile(r"busy|already exists")
_SETTLING_DATASET = re.compile(r"busy|already exists|dependent clones")  # a %recv clone
DESTROY_PATIENCE = 5.0  # seconds a destroy waits for zfs to settle
ARGV_LIMIT = 100_000  # bytes of one command line; Linux allows 2 MiB, keep well below


def find_program(name: str) -> str:
    """The path to run for `name`: as given when it holds a '/', else found on PATH, else in
    /sbin, /usr/sbin or /usr/local/sbin; the bare name when it is nowhere."""
    if "/" in name:
        return name
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN_DIRS:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return name


def program_available(name: str) -> bool:
    """Whether `find_program(name)` names a program that exists."""
    path = find_program(name)
    return os.path.isfile(path) and os.access(path, os.X_OK)


def spawn(argv: Sequence[str], **popen) -> subprocess.Popen:
    """Start a child (the only Popen of zfsmgr); a program that cannot start is a ZfsError."""
    argv = list(argv)
    try:
        return subprocess.Popen(argv, executable=find_program(argv[0]), **popen)
    except FileNotFoundError as exc:  # one line, exit 2: nothing to retry, install it
        raise MissingProgram(argv[0], SBIN_DIRS) from exc
    except OSError as exc:
        raise ZfsError(argv, 127, f"{argv[0]}: {exc.strerror}") from exc


@dataclass(frozen=True)
class Completed:
    """What a short command did."""

    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    def error(self) -> ZfsError:
        """The ZfsError of this (failed) run: ZfsNotFound when the target does not exist."""
        message = self.stderr or self.stdout
        kind = ZfsNotFound if _MISSING.search(message) else ZfsError
        return kind(self.argv, self.returncode, message)


def execute(argv: Sequence[str], stdin_data: Optional[bytes] = None,
            timeout: float = TIMEOUT) -> Completed:
    """Run a short command to its end, whatever its exit code; ZfsError only when it cannot
    start or does not finish within `timeout` seconds (it is killed then)."""
    argv = list(argv)
    proc = spawn(argv, stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: a wrapper's children hold the pipes
        proc.communicate()
        raise ZfsError(argv, -9, f"no answer within {timeout:g} seconds: killed") from None
    return Completed(argv, proc.returncode, out.decode("utf-8", "replace"),
                     err.decode("utf-8", "replace"))


def run(argv: Sequence[str], check: bool = True, stdin_data: Optional[bytes] = None,
        timeout: float = TIMEOUT) -> str:
    """Run a short command, return its stdout; raise ZfsError (ZfsNotFound when the target
    does not exist) on a non-zero exit."""
    done = execute(argv, stdin_data, timeout)
    if check and done.returncode != 0:
        raise done.error()
    return done.stdout


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
        self.proc = spawn(self.argv, stderr=subprocess.PIPE, **kwargs)
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
        result: Dict[str, Dict[str, tuple]] = {}
        for line in run(argv).splitlines():
            name, prop, value, source = line.split("\t", 3)
            result.setdefault(name, {})[prop] = (value, source)
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
        run([self.zfs, "set", f"{prop}={value}", name])

    def snapshots(self, dataset: str, user_props: Sequence[str] = ()) -> List[Snapshot]:
        """Snapshots of one dataset (not its children), oldest first."""
        props = snapshot_props(user_props)
        found = self.props([dataset], props, recursive_depth=1)
        snaps = [snapshot_from(name, values, props) for name, values in found.items()
                 if name.startswith(dataset + "@")]
        return sorted(snaps, key=lambda s: s.createtxg)

    def snapshot_info(self, name: str, user_props: Sequence[str] = ()) -> Snapshot:
        """One snapshot, as `snapshots` lists it."""
        props = snapshot_props(user_props)
        return snapshot_from(name, self.props([name], props)[name], props)

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
        split into several calls only where one command line would be too long."""
        argv = [self.zfs, "snapshot"] + (["-r"] if recursive else [])
        for key, value in (props or {}).items():
            argv += ["-o", f"{PROPERTY_PREFIX}{key}={value}"]
        batch: List[str] = []
        for name in names:
            if batch and sum(len(a) + 1 for a in argv + batch) + len(name) > ARGV_LIMIT:
                run(argv + batch)
                batch = []
            batch.append(name)
        if batch:
            run(argv + batch)

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

    def rename(self, old: str, new: str) -> None:
        """Rename a dataset."""
        run([self.zfs, "rename", old, new])

    def mount(self, dataset: str) -> None:
        """Mount a filesystem at its mountpoint."""
        run([self.zfs, "mount", dataset])

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
                resumable: bool = False) -> StreamingCommand:
        """Start `zfs recv` into `target`; write the stream to the returned context manager."""
        argv = [self.zfs, "recv"] + (["-F"] if force else []) + (["-u"] if unmounted else [])
        argv += (["-s"] if resumable else []) + [target]
        return StreamingCommand(argv, "w")


def snapshot_props(user_props: Sequence[str], extra: Sequence[str] = ()) -> List[str]:
    """What a listing asks for to build Snapshots: their identity, `extra` zfs properties
    and zfsmgr's user properties `user_props`."""
    return ["guid", "createtxg", "creation", "userrefs", *extra] + [
        PROPERTY_PREFIX + p for p in user_props]


def snapshot_from(name: str, values: Dict[str, str], props: Sequence[str]) -> Snapshot:
    """A Snapshot from one entry of a `props` listing that asked for `props`."""
    userrefs = values.get("userrefs", "-")
    return Snapshot(name, values["guid"], int(values["createtxg"]), int(values["creation"]),
                    int(userrefs) if userrefs.isdigit() else 0,
                    {k: values.get(k, "-") for k in props[4:]})


def zfs_from_settings(settings) -> Zfs:
    """The Zfs of the ZFSMGR_ZFS / ZFSMGR_ZPOOL settings (tests point these at other programs)."""
    return Zfs(settings.get("ZFSMGR_ZFS") or "zfs", settings.get("ZFSMGR_ZPOOL") or "zpool")
