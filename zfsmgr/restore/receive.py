"""Receiving stored streams into ZFS: verified while they stream, undone when they fail.

`zfs recv` completes as soon as it has read the end record of a stream, so checking the sha256
after the last write would be too late. `receive_stream` always withholds the last chunk it has
decompressed until every stored byte has been read and matches the manifest: a damaged or
truncated object never reaches its end record, and `zfs recv` is killed instead.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence

from zfsmgr.errors import UsageError, ZfsmgrError
from zfsmgr.files import CHUNK
from zfsmgr.protocol import Manifest, validate_dataset
from zfsmgr.restore.listing import snapshot_id
from zfsmgr.restore.record import Records
from zfsmgr.restore.stream import Progress, StoredStream, plain, reported
from zfsmgr.runner import StreamingCommand
from zfsmgr.zfs import Zfs, ZfsError

# What `zfs recv` says about a stream that is damaged rather than refused.
_STREAM_TROUBLE = re.compile(r"invalid|checksum|corrupt|truncat|bad magic|unexpected end",
                             re.IGNORECASE)
_PROPERTY_TROUBLE = re.compile(r"propert", re.IGNORECASE)  # refused `-o` (not the stream)

StreamOpener = Callable[[Manifest, str], StoredStream]


def _write(recv: StreamingCommand, data: bytes, source: StoredStream) -> None:
    """Write to `zfs recv`; when it died of a damaged stream, blame the object by name."""
    try:
        recv.write(data)
    except ZfsError as exc:
        if _STREAM_TROUBLE.search(exc.stderr) and not _PROPERTY_TROUBLE.search(exc.stderr):
            source.blame()
        raise


def receive_stream(zfs: Zfs, source: StoredStream, dest: str, force: bool,
                   props: dict[str, str] | None = None) -> None:
    """Feed one stored stream into `zfs recv -u [-F] [-o prop=value...] dest`, checked as it
    passes."""
    decoded = plain(source)
    recv = zfs.receive(dest, force=force, unmounted=True, props=props)
    try:
        pending = b""
        while True:
            try:
                chunk = decoded.read(CHUNK)
            except (ValueError, RuntimeError) as exc:  # the codec rejected the stored bytes
                decoded.close()
                source.blame()
                raise ZfsmgrError(f"cannot decompress {source.key}: {exc}") from exc
            if not chunk:
                break
            if pending:
                _write(recv, pending, source)
            pending = chunk
        source.check()  # before the last chunk: a bad object must not complete the receive
        if pending:
            _write(recv, pending, source)
        recv.finish()
    except BaseException as exc:
        source.cancel()  # first: the codec's feeder may be waiting on a stalled download
        recv.kill()
        decoded.close()
        source.close()
        if isinstance(exc, ZfsError):
            raise ZfsmgrError(f"cannot receive {source.key} into {dest}:"
                              f" {_zfs_message(exc)}") from exc
        raise


def _zfs_message(exc: ZfsError) -> str:
    """zfs's own message with the command line that got it: `zfs recv -u …`: message."""
    return str(exc)


def receive_chain(zfs: Zfs, open_stream: StreamOpener, chain: Sequence[Manifest],
                  dest: str, props: dict[str, str] | None = None) -> None:
    """Receive every stream of `chain` into `dest` in order (`recv -F` after the first; the
    first with `-o` for each of `props`). When zfs refuses the first stream for its `-o`
    properties, it is received again without them (restore/record.py sets them afterwards,
    one by one)."""
    for index, manifest in enumerate(chain, start=1):
        label = f"[{index}/{len(chain)}] {snapshot_id(manifest.key)}"
        options = props if index == 1 else None
        try:
            with reported(open_stream(manifest, label), "received") as source:
                receive_stream(zfs, source, dest, force=index > 1, props=options)
        except ZfsmgrError as exc:
            refusal = _property_trouble(exc)
            if not options or refusal is None:
                raise
            if zfs.exists(f"{dest}@{manifest.snapshot}"):  # in: only a property failed
                sys.stderr.write(f"zfsmgr: warning: {dest}: {refusal}\n")
                continue
            if zfs.exists(dest):
                raise
            sys.stderr.write(f"zfsmgr: warning: zfs recv -o refused the recorded properties"
                             f" of {manifest.dataset} ({refusal}): receiving without them\n")
            with reported(open_stream(manifest, label), "received") as source:
                receive_stream(zfs, source, dest, force=False)


def _property_trouble(exc: ZfsmgrError) -> str | None:
    """zfs's complaint when a failed receive names a property, else None."""
    cause = exc.__cause__
    if not isinstance(cause, ZfsError) or not _PROPERTY_TROUBLE.search(cause.stderr):
        return None
    return _zfs_message(cause)


CONTAINED = ("mountpoint", "sharenfs", "sharesmb")  # the restoring host's, never a stream's
RENAME_ATTEMPTS = 5  # a second apart


class Target:
    """The dataset a restore lands in, and what the restore created on the way.

    A new target is received into directly (its missing parents are created with
    `zfs create -p`). An existing one is replaced only with `force`, and only after the whole
    chain has been received and verified under a temporary sibling name, so a failed restore
    leaves the existing dataset as it was. `undo()` destroys everything this restore created.
    """

    def __init__(self, zfs: Zfs, name: str, force: bool = False):
        self.zfs, self.name, self.force = zfs, validate_dataset(name), force
        self.receive_into = name
        self.replacing = False
        self.created: list[str] = []  # datasets made here, parents first

    def check(self) -> None:
        """Refuse a target this restore may not use (changes nothing)."""
        if "/" not in self.name:
            raise UsageError(f"{self.name} is a pool's root dataset: restore into a dataset"
                             f" below it, such as {self.name}/restored")
        pool = self.name.split("/")[0]
        if not self.zfs.exists(pool):
            raise ZfsmgrError(f"cannot restore into {self.name}: there is no pool {pool}")
        if self.zfs.exists(self.name) and not self.force:
            raise ZfsmgrError(f"{self.name} already exists: use --force to replace it"
                              " (it is left untouched)")

    def prepare(self) -> str:
        """Check the target and create what it needs; return the dataset to receive into."""
        self.check()
        if self.zfs.exists(self.name):
            self.replacing = True
            self.receive_into = f"{self.name}-zfsmgr-restore-{secrets.token_hex(3)}"
            return self.receive_into
        missing = []
        parent = self.name.rsplit("/", 1)[0]
        while "/" in parent and not self.zfs.exists(parent):
            missing.append(parent)
            parent = parent.rsplit("/", 1)[0]
        if missing:
            self.zfs.create(missing[0], parents=True)
            self.created.extend(reversed(missing))
        return self.receive_into

    def contain(self, dest: str, shown: str = "") -> None:
        """Where the restored dataset `dest` (`shown`: its name once in place, default the
        target's) mounts and what it shares are the restoring host's: a value its stream
        brought (`send -p`: the original host's `/home`, or any path a server chose) is
        dropped, so it mounts below its target and shares nothing. On zfs-fuse what a stream
        sets shows as `local`; restore itself never sets these."""
        values = self.zfs.props_with_source([dest], CONTAINED)[dest]
        for prop, (value, source) in values.items():
            if source in ("local", "received"):
                self.zfs.inherit(dest, prop)
                why = " (it mounts below its target)" if prop == "mountpoint" else ""
                sys.stderr.write(f"zfsmgr: warning: {shown or self.name}: the stream's"
                                 f" {prop}={value} is not used{why}\n")

    def received(self) -> None:
        """Note that `receive_into` is about to exist, so undo() removes it."""
        if self.receive_into not in self.created:
            self.created.append(self.receive_into)

    def commit(self) -> None:
        """Put the received dataset in place, replacing the old one with --force: the old one
        is moved aside first and destroyed only once the new one is in its place, so a
        replace that fails (a hold, a clone, a busy mount) leaves the old one as it was
        (destroying it first removed its children before zfs refused its held snapshot)."""
        if not self.replacing:
            return
        aside = f"{self.name}-zfsmgr-old-{secrets.token_hex(3)}"
        unmounted = self._set_aside(aside)
        try:
            self.zfs.rename(self.receive_into, self.name)
        except ZfsError as exc:
            try:
                self.zfs.rename(aside, self.name)
                for name in reversed(unmounted):
                    self.zfs.mount(name)
            except ZfsError as back:
                self.created.remove(self.receive_into)  # keep both copies for the admin
                raise ZfsmgrError(f"renaming {self.receive_into} to {self.name} failed"
                                  f" ({_zfs_message(exc)}), and so did putting the old one"
                                  f" back ({_zfs_message(back)}): the old one is {aside}, the"
                                  f" restored one {self.receive_into}") from exc
            raise ZfsmgrError(f"cannot put the restored {self.name} in place"
                              f" ({_zfs_message(exc)}): {self.name} is as it was") from exc
        try:
            self.zfs.destroy(aside, recursive=True)
        except ZfsError as exc:
            sys.stderr.write(f"zfsmgr: warning: the old {self.name} stays as {aside}"
                             f" ({_zfs_message(exc)}): destroy it once it is free\n")

    def _set_aside(self, aside: str) -> list:
        """Rename the old target to `aside` (unmounting its tree first where zfs renames no
        mounted dataset: zfs-fuse); the datasets unmounted (by their names before), deepest
        first. Nothing changed when it fails."""
        try:
            self.zfs.rename(self.name, aside)
            return []
        except ZfsError as exc:
            first = exc
        listing = self.zfs.props([self.name], ["mounted"], recursive_depth=-1)
        mounted = sorted((n for n, v in listing.items()
                          if "@" not in n and v.get("mounted") == "yes"),
                         key=lambda n: n.count("/"), reverse=True)
        done: list = []
        try:
            if not mounted:
                raise first
            for name in mounted:
                self.zfs.unmount(name)
                done.append(name)
            for attempt in range(RENAME_ATTEMPTS):  # zfs-fuse: busy a moment after an unmount
                try:
                    self.zfs.rename(self.name, aside)
                    break
                except ZfsError as exc:
                    if attempt == RENAME_ATTEMPTS - 1 or "busy" not in exc.stderr:
                        raise
                    time.sleep(1)
        except ZfsError as exc:
            for name in reversed(done):
                try:
                    self.zfs.mount(name)
                except ZfsError:
                    sys.stderr.write(f"zfsmgr: warning: could not mount {name} again\n")
            raise ZfsmgrError(f"cannot replace {self.name}: moving it aside failed"
                              f" ({_zfs_message(exc)}); it is as it was") from exc
        return done

    def undo(self) -> None:
        """Destroy what this restore created, newest first; report what could not be."""
        for name in reversed(self.created):
            try:
                self.zfs.destroy(name, recursive=name == self.receive_into, missing_ok=True)
            except ZfsError as exc:
                sys.stderr.write(f"zfsmgr: warning: could not remove {name}: {exc}\n")
        self.created.clear()

    def mount(self) -> str | None:
        """Mount the restored dataset where it would mount anyway; a warning text on failure."""
        props = self.zfs.props([self.name], ["canmount", "mountpoint", "mounted"])[self.name]
        if props.get("canmount") != "on" or props.get("mountpoint") in ("none", "legacy", "-"):
            return None
        if props.get("mounted") == "yes":
            return None
        path = props["mountpoint"]
        if os.path.ismount(path) or (os.path.isdir(path) and os.listdir(path)):
            # a mountpoint that came with the stream (send -p) may be the live dataset's
            return (f"{self.name} is restored but not mounted: its mountpoint {path} is in"
                    " use; see `zfsmgr restore mount`")
        try:
            self.zfs.mount(self.name)
        except ZfsError as exc:
            return (f"{self.name} is restored but not mounted ({_zfs_message(exc)}):"
                    " see `zfsmgr restore mount`")
        return None


def restore_chain(zfs: Zfs, open_stream: StreamOpener, chain: Sequence[Manifest],
                  target: Target) -> None:
    """Receive `chain` into `target` with its property record (restore/record.py); on any
    failure remove everything it created."""
    records = Records(zfs, target.name)
    dest = target.prepare()
    try:
        target.received()
        receive_chain(zfs, open_stream, chain, dest, records.on_receive(chain, target.name))
        records.settle(dest, chain, target.name)
        target.contain(dest)
        target.commit()
    except BaseException:
        target.undo()
        raise
    for warning in records.warnings + [target.mount()]:
        if warning:
            sys.stderr.write(f"zfsmgr: warning: {warning}\n")


def progress_opener(client, stream=None, identity: str = "") -> StreamOpener:
    """Open each stream of a chain with a progress line on `stream` (stderr by default);
    `identity` is the age key file that opens encrypted ones."""
    def open_stream(manifest: Manifest, label: str) -> StoredStream:
        return StoredStream(client, manifest, progress=Progress(label, stream=stream),
                            identity=identity)
    return open_stream
