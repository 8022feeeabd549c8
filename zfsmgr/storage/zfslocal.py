"""The `local` store: the server `zfs recv`s each backup into the client's home dataset.

A client's home is its `dataset` in clients.json (the seed's `backup/client1`), else
`ZFS_BASE_DATASET/<client>`. Each chain (a full stream and the incrementals on it) lives in its
own dataset `HOME/<dataset token>/<first snapshot>`, so a second full backup never has to destroy
an older chain. The manifest is kept as a user property of the received snapshot, so the
catalog can be rebuilt from the pool alone. Downloads are full `zfs send` streams of the
snapshot, which stay valid whatever older snapshots rotation has removed.

Uploads are not staged: each part is piped into a live `zfs recv` as it arrives (see
receiver.py), and a small JSON file per upload records the target and the parts taken. Where
the pool supports it the receive is `recv -s`: if the server dies mid-stream, the state of the
upload offers the target's `receive_resume_token`, the client answers with `zfs send -t`, and
the receive continues where zfs stopped. Without resumable receive (or once an upload is
abandoned) the partial receive is dropped (`recv -A`) and the stream is sent again.

Every committed snapshot carries the user hold `zfsmgr-retain`, so that a `zfs destroy` by
hand, a script or another tool fails; only the server's own deletion (rotation, admin delete)
releases it first.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

from zfsmgr.files import CHUNK, write_atomic
from zfsmgr.protocol import ZFS_MAX_NAME, Manifest, ValidationError, parse_key, validate_upload_id
from zfsmgr.storage.base import (CountingReader, Download, NeedsFullBackup, NotFound,
                                 OutOfOrder, PartInfo, StorageError, Store, StreamInfo)
from zfsmgr.storage.receiver import LiveReceive
from zfsmgr.storage.sendstream import check_head
from zfsmgr.zfs import PROPERTY_PREFIX, Zfs, ZfsError, zfs_from_settings

log = logging.getLogger("zfsmgr.storage.local")
MANIFEST_PROP = PROPERTY_PREFIX + "manifest"
RETAIN_TAG = "zfsmgr-retain"  # the hold on every committed snapshot; only delete() releases it
NO_TOKEN = ("-", "")
DISCARDED_KEPT = 512


def _storage_failure(func):
    """A zfs failure escaping the store is a StorageError (503), with zfs's own message."""
    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def generate(*args, **kwargs):
            try:
                yield from func(*args, **kwargs)
            except ZfsError as exc:
                raise StorageError(f"local store: {exc}") from exc
        return generate

    @functools.wraps(func)
    def call(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ZfsError as exc:
            raise StorageError(f"local store: {exc}") from exc
    return call


def _zfs_failures_are_storage_errors(cls):
    """Wrap every method of the Store interface that `cls` defines with _storage_failure."""
    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_") and hasattr(Store, name):
            setattr(cls, name, _storage_failure(value))
    return cls


class _SendBody:
    """A running `zfs send` as a closable reader that reports failure."""

    def __init__(self, command):
        self.command, self.done = command, False

    @_storage_failure
    def read(self, size: int = CHUNK) -> bytes:
        data = self.command.read(CHUNK if size is None or size < 0 else size)
        if not data and not self.done:
            self.done = True
            self.command.finish()  # raises ZfsError if the send failed
        return data

    def close(self) -> None:
        if not self.done:
            self.command.kill()


@_zfs_failures_are_storage_errors
class ZfsLocalStore(Store):
    """Backups received into a local ZFS dataset tree."""

    kind = "local"
    receives_streams = True

    def __init__(self, base: str, staging_dir: str, zfs: Optional[Zfs] = None,
                 homes: Optional[Callable[[], Dict[str, str]]] = None):
        """`homes()`: {client id: home dataset} of the clients that have their own (the
        `dataset` of clients.json); the others live under BASE/<client>."""
        if not base:
            raise StorageError("ZFS_BASE_DATASET is not set")
        self.base, self.zfs = base, zfs or Zfs()
        self._homes = homes or dict
        self._resumable: Optional[bool] = None
        self.state_dir = Path(staging_dir) / ".uploads-local"
        self._live: Dict[str, LiveReceive] = {}
        # uploads discarded lately: a part racing an abort must not start a receive. Only
        # parts already past the state check can race, so the last few hundred are enough.
        self._discarded: "collections.OrderedDict[str, None]" = collections.OrderedDict()

    @classmethod
    def from_settings(cls, settings, homes=dict) -> "ZfsLocalStore":
        """The store of ZFS_BASE_DATASET and the clients' homes (its upload state under
        STORAGE_DIR), run with the ZFSMGR_ZFS program."""
        return cls(settings.zfs_base_dataset, settings.storage_dir, zfs_from_settings(settings),
                   homes=homes)

    def check(self) -> None:
        if not self.zfs.exists(self.base):
            raise StorageError(f"ZFS_BASE_DATASET {self.base} does not exist")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._resumable is None:
            self._resumable = self.zfs.features(self.base).resumable_recv
            owned = frozenset(_dataset(st["target"]) for st in self._states().values())
            self.abandon_partial(self.base, recursive=True, keep=owned)

    def abandon_partial(self, root: str, recursive: bool = False,
                        keep: frozenset = frozenset()) -> List[str]:
        """`zfs recv -A` every partially received dataset under `root` not in `keep`."""
        if not self._resumable or not self.zfs.exists(root):
            return []
        found = self.zfs.props([root], ["receive_resume_token"],
                               recursive_depth=4 if recursive else 0)
        cleared = []
        for name, props in found.items():
            if "@" in name or name in keep or props.get("receive_resume_token",
                                                        "-") in NO_TOKEN:
                continue
            self.zfs.abort_receive(name)
            log.info("discarded the partial receive into %s (recv -A)", name)
            cleared.append(name)
        return cleared

    # -- upload state: one small JSON file per upload --------------------------------------

    def _state_path(self, upload_id: str) -> Path:
        return self.state_dir / f"{validate_upload_id(upload_id)}.json"

    def _state(self, upload_id: str) -> dict:
        try:
            return json.loads(self._state_path(upload_id).read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no upload {upload_id} on the local store") from None
        except ValueError as exc:
            raise StorageError(f"state of upload {upload_id} is unreadable: {exc}") from None

    def _save(self, upload_id: str, state: dict) -> None:
        if upload_id in self._discarded:
            raise NotFound(f"upload {upload_id} was discarded")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._state_path(upload_id), json.dumps(state).encode(), durable=False)

    def _states(self) -> Dict[str, dict]:
        found = {}
        for path in self.state_dir.glob("*.json") if self.state_dir.is_dir() else []:
            try:
                found[path.stem] = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
        return found

    def _token(self, target: str) -> Optional[str]:
        dataset = _dataset(target)
        if not self._resumable or not self.zfs.exists(dataset):
            return None
        token = self.zfs.get(dataset, "receive_resume_token")
        return None if token in NO_TOKEN else token

    # -- the upload protocol ---------------------------------------------------------------

    def begin(self, upload_id: str, manifest: Manifest) -> None:
        """Choose the receiving dataset now, so a stream with no base fails before any part."""
        container = self._container(manifest)
        if not self.zfs.exists(container):
            self.zfs.create(container, parents=True,
                            props={"mountpoint": "none", "canmount": "off"})
        target = f"{self._chain_for(manifest)}@{manifest.snapshot}"
        if len(target) > ZFS_MAX_NAME:
            raise ValidationError(f"the backup would be received as {target[:60]}... ("
                                  f"{len(target)} characters); ZFS names are at most"
                                  f" {ZFS_MAX_NAME}: use a shorter dataset or snapshot name")
        if self.zfs.exists(target) and self.zfs.get(target, MANIFEST_PROP) not in NO_TOKEN:
            raise StorageError(f"{target} already holds a committed backup")
        published = [s for s in self.zfs.snapshots(_dataset(target), ["manifest"])
                     if s.prop("manifest")] if manifest.type == "incremental" else []
        if published and published[-1].short != manifest.parent:
            raise NeedsFullBackup(f"{_dataset(target)} holds backups newer than the base"
                                  f" {manifest.parent} of this incremental: send a full backup")
        state = {"target": target, "compression": manifest.compression, "parts": [],
                 "segment": 0, "resuming": False, "token": "",
                 "new_dataset": manifest.type == "full", "guid": manifest.guid,
                 "parent_guid": manifest.parent_guid}
        self._save(upload_id, state)  # what an older session left goes when part 0 arrives

    def _drop_unpublished(self, state: dict) -> None:
        """Clear what a receive left that no manifest published: a partial receive (recv -A),
        a received snapshot with no manifest, and the changes it made to its chain."""
        target, chain = state["target"], _dataset(state["target"])
        self.abandon_partial(chain)
        if self.zfs.exists(target) and self.zfs.get(target, MANIFEST_PROP) in NO_TOKEN:
            self.zfs.destroy(target)
        if not self.zfs.exists(chain):
            return
        left = self.zfs.snapshots(chain)
        if left:
            self.zfs.rollback(left[-1].name)  # zfs recv -F would do it, but also destroy more
        elif state.get("new_dataset"):
            self.zfs.destroy(chain, recursive=True)  # a full receive killed without recv -s

    def stage_part(self, upload_id, index, source, size):
        state = self._state(upload_id)
        parts = [PartInfo(**p) for p in state["parts"]]
        if index < len(parts):  # a resend of a part the receive already took
            reader = CountingReader(source, size)
            for _ in iter(lambda: reader.read(CHUNK), b""):
                pass
            if (reader.size, reader.crc32) != (parts[index].size, parts[index].crc32):
                raise OutOfOrder(f"part {index} differs from the part already received",
                                 len(parts))
            return parts[index]
        if index > len(parts):
            raise OutOfOrder(f"part {index} out of order: {len(parts)} parts"
                             " were received", len(parts))
        live = self._live.get(upload_id)
        started = live is None or not live.alive
        if started:
            live = self._start(upload_id, state, index)
        reader = CountingReader(source, size)
        try:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                live.write(chunk)
            if reader.size != size:
                raise StorageError(f"part {index} ended after {reader.size} of {size} bytes")
            if started:  # a stream that is not a plain zfs substream is refused here (400)
                live.await_head()
        except BaseException:
            self._stop(upload_id)  # part of a part went in: only the resume token can tell
            raise
        part = PartInfo(index, size, reader.crc32)
        state["parts"].append(part.__dict__)
        self._save(upload_id, state)
        return part

    def _start(self, upload_id: str, state: dict, index: int) -> LiveReceive:
        """Start the receive: from the beginning, or resuming from the token."""
        self._stop(upload_id)
        if state["resuming"] and index == state["segment"]:
            state["resuming"] = False
            self._save(upload_id, state)
            log.info("upload %s: resuming the receive into %s from its resume token",
                     upload_id, state["target"])
        elif index != 0:
            raise StorageError(f"the receive of upload {upload_id} was interrupted:"
                               " ask for its state and resume or start again")
        else:
            self._drop_unpublished(state)
        check = functools.partial(check_head, incremental=not state["new_dataset"],
                                  guid=state.get("guid", ""),
                                  parent_guid=state.get("parent_guid", ""),
                                  resumed=bool(state["segment"]))
        live = LiveReceive(self.zfs, state["target"], state["compression"],
                           resumable=bool(self._resumable), check=check)
        self._live[upload_id] = live
        if upload_id in self._discarded:  # discard() ran meanwhile: it set this flag first
            self._stop(upload_id)
            raise NotFound(f"upload {upload_id} was discarded")
        return live

    def _stop(self, upload_id: str) -> None:
        live = self._live.pop(upload_id, None)
        if live is not None:
            live.kill()

    def staged_parts(self, upload_id):
        try:
            state = self._state(upload_id)
        except NotFound:
            return []
        live = self._live.get(upload_id)
        if state["parts"] and not state["resuming"] and (live is None or not live.alive) \
                and not self._token(state["target"]):
            self._stop(upload_id)  # the receive died and left nothing to resume: start over
            self._drop_unpublished(state)
            state.update(parts=[], segment=0, token="")
            self._save(upload_id, state)
            log.info("upload %s: the interrupted receive cannot be resumed; it starts over",
                     upload_id)
        return [PartInfo(**p) for p in state["parts"]]

    def resume_token(self, upload_id: str) -> Optional[str]:
        live = self._live.get(upload_id)
        if live is not None and live.alive:
            return None
        try:
            state = self._state(upload_id)
        except NotFound:
            return None
        return None if state["resuming"] else self._token(state["target"])

    def resume(self, upload_id: str, token: str, from_part: int) -> None:
        state = self._state(upload_id)
        if state["resuming"] and (state["token"], state["segment"]) == (token, from_part):
            return  # the client did not get the first answer
        if from_part != len(state["parts"]):
            raise StorageError(f"the resumed stream must start at part {len(state['parts'])}")
        if self.resume_token(upload_id) != token:
            raise StorageError(f"{token[:16]}... is not the resume token of upload {upload_id}")
        self._stop(upload_id)
        state.update(segment=from_part, resuming=True, token=token)
        self._save(upload_id, state)

    def discard(self, upload_id):
        self._discarded[validate_upload_id(upload_id)] = None
        while len(self._discarded) > DISCARDED_KEPT:
            self._discarded.popitem(last=False)
        self._stop(upload_id)
        try:
            state = self._state(upload_id)
        except NotFound:
            return
        try:  # zfs may have finished the receive before the commit refused it: no leak
            self._drop_unpublished(state)
        except ZfsError as exc:
            log.warning("upload %s: %s", upload_id, exc)
        try:
            os.unlink(self._state_path(upload_id))
        except FileNotFoundError:
            pass

    def staged_uploads(self):
        if not self.state_dir.is_dir():
            return []
        return [(p.stem, p.stat().st_mtime) for p in self.state_dir.glob("*.json")]

    def home(self, client_id: str) -> str:
        """The dataset that holds a client's chains."""
        return self._homes().get(client_id) or f"{self.base}/{client_id}"

    def _container(self, manifest: Manifest) -> str:
        return f"{self.home(manifest.client_id)}/{parse_key(manifest.key).dataset_token}"

    def _snapshots(self, root: str) -> Dict[str, Dict[str, str]]:
        """Every snapshot under `root` with its guid and manifest property."""
        if not self.zfs.exists(root):
            return {}
        found = self.zfs.props([root], ["guid", MANIFEST_PROP], recursive_depth=4)
        return {name: props for name, props in found.items() if "@" in name}

    def _chain_for(self, manifest: Manifest) -> str:
        """The dataset that receives this stream: a new chain, or the chain of its parent."""
        container = self._container(manifest)
        if manifest.type == "full":
            return f"{container}/{manifest.snapshot}"
        for name, props in self._snapshots(container).items():
            dataset, snap = name.split("@", 1)
            if snap == manifest.parent and (not manifest.parent_guid
                                            or props.get("guid") == manifest.parent_guid):
                return dataset
        raise NeedsFullBackup(f"the base {manifest.dataset}@{manifest.parent} of this"
                              " incremental is not on the server: send a full backup")

    def commit(self, upload_id, manifest):
        state = self._state(upload_id)
        target = state["target"]
        live = self._live.get(upload_id)
        if live is None:
            raise StorageError(f"the receive of upload {upload_id} was interrupted:"
                               " ask for its state and resume or start again")
        try:
            live.finish()
        finally:
            self._live.pop(upload_id, None)
        if state["new_dataset"]:  # whatever it holds never mounts on the server
            self.zfs.set(_dataset(target), "canmount", "off")
        extra = {**manifest.extra, "zfs_snapshot": target}
        if state["segment"]:
            extra["resumed_at_part"] = state["segment"]
        stored = Manifest.from_dict({**manifest.to_dict(), "extra": extra})
        self.zfs.set(target, MANIFEST_PROP, json.dumps(stored.to_dict(), separators=(",", ":")))
        self.zfs.hold(target, RETAIN_TAG)  # a plain `zfs destroy` now fails: only delete() frees
        os.unlink(self._state_path(upload_id))
        return stored

    def _located(self, manifest: Manifest) -> str:
        target = manifest.extra.get("zfs_snapshot", "")
        inside = any(target.startswith(root + "/") for root in
                     (self.base, self.home(manifest.client_id)))
        if not inside or not self.zfs.exists(target):
            raise NotFound(f"{manifest.key} is missing from {self.home(manifest.client_id)}")
        return target

    def footprint(self, manifests: Iterable[Manifest]) -> Dict[str, int]:
        """What each backup takes on the pool (zfs `used`): a chain's datasets `used` is split
        so that its snapshots count their own `used` and the newest counts the rest; so the
        backups of a chain add up to what destroying the chain frees."""
        chains: Dict[str, List[Manifest]] = {}
        for manifest in manifests:
            target = manifest.extra.get("zfs_snapshot", "")
            chains.setdefault(_dataset(target), []).append(manifest)
        sizes = {}
        for chain, members in chains.items():
            try:
                used = {name: int(props["used"]) for name, props in self.zfs.props(
                    [chain], ["used"], recursive_depth=1).items()}
            except (ZfsError, ValueError, KeyError):
                used = {}
            members.sort(key=lambda m: m.snapshot_time)
            own = [used.get(m.extra.get("zfs_snapshot", ""), 0) for m in members]
            for manifest, size in zip(members, own):
                sizes[manifest.key] = size
            if chain in used:
                sizes[members[-1].key] = max(0, used[chain] - sum(own[:-1]))
        return sizes

    @classmethod
    def describe(cls, manifest):
        """A fresh full `zfs send` of the snapshot: it restores alone whatever rotation removed,
        has no stored size or sha256 (zfs checks its own records), and an offset is skipped."""
        return StreamInfo(size=None, sha256="", compression="none", ranged=False,
                          self_contained=True)

    def open(self, manifest, offset=0):
        body = _SendBody(self.zfs.send(self._located(manifest)))
        skip = offset
        while skip > 0:  # a resumed download: the send stream is deterministic
            chunk = body.read(min(CHUNK, skip))
            if not chunk:
                break
            skip -= len(chunk)
        return Download(body, None, self.describe(manifest))

    def manifests(self, client_id=None):
        if client_id:
            roots = [self.home(client_id)]
        else:  # BASE, and the homes of clients whose `dataset` lies outside it
            roots = [self.base] + sorted({h for h in self._homes().values()
                                          if h and not h.startswith(self.base + "/")})
        for root in roots:
            for name, props in sorted(self._snapshots(root).items()):
                value = props.get(MANIFEST_PROP, "-")
                if value in ("-", ""):
                    continue
                try:
                    manifest = Manifest.from_dict(json.loads(value))
                except ValueError as exc:
                    raise StorageError(f"manifest on {name} is unreadable: {exc}") from exc
                if not client_id or manifest.client_id == client_id:
                    yield manifest

    def delete(self, manifest):
        try:
            target = self._located(manifest)
        except NotFound:  # gone already: what delete wants
            return
        self.zfs.release(target, RETAIN_TAG)
        self._destroy(target)

    def _destroy(self, target: str) -> None:
        """Destroy a snapshot, and its chain dataset once no snapshot is left in it."""
        self.zfs.destroy(target, missing_ok=True)
        chain = target.split("@", 1)[0]
        if not [s for s in self._snapshots(chain) if s.startswith(chain + "@")]:
            self.zfs.destroy(chain)


def _dataset(target: str) -> str:
    """The dataset that holds a receive's partial state: the target without its snapshot."""
    return target.split("@", 1)[0]
