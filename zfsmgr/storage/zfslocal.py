"""The `local` store's receive path: the server `zfs recv`s each upload into a chain of the
client's home dataset (zfschains.py lays the chains out, lists, reads and deletes them).

Uploads are not staged: each part is piped into a live `zfs recv` as it arrives (see
receiver.py), and a small JSON file per upload records the target and the parts taken. Where
the pool supports it the receive is `recv -s`: if the server dies mid-stream, the state of the
upload offers the target's `receive_resume_token`, the client answers with `zfs send -t`, and
the receive continues where zfs stopped. Without resumable receive (or once an upload is
abandoned) the partial receive is dropped (`recv -A`) and the stream is sent again. A receive
that no commit published leaves nothing behind: no snapshot, no change to its chain. A commit
stores the manifest on the received snapshot and puts the retain hold on it.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

from zfsmgr.errors import Conflict, ZfsNotFound
from zfsmgr.files import CHUNK, write_atomic
from zfsmgr.protocol import ZFS_MAX_NAME, Manifest, ValidationError, validate_upload_id
from zfsmgr.progress import human
from zfsmgr.storage.base import (CountingReader, NeedsFullBackup, NotFound, OutOfOrder, PartInfo,
                                 QuotaExceeded, StorageError, StorageFull)
from zfsmgr.storage.receiver import LiveReceive
from zfsmgr.storage.sendstream import check_head
from zfsmgr.storage.zfschains import (MANIFEST_PROP, NO_TOKEN, RETAIN_TAG, ReceivedChains,
                                      chain_of, zfs_failures_are_storage_errors)
from zfsmgr.zfs import Zfs, ZfsError, zfs_from_settings

log = logging.getLogger("zfsmgr.storage.local")
_CREATING = threading.Lock()  # chain containers are created one at a time
DISCARDED_KEPT = 512
FULL_SLACK = 1 << 20  # a receive out of space this close to the home's quota reached it


@zfs_failures_are_storage_errors
class ZfsLocalStore(ReceivedChains):
    """Backups received into a local ZFS dataset tree."""

    kind = "local"
    receives_streams = True

    def __init__(self, base: str, staging_dir: str, zfs: Optional[Zfs] = None,
                 homes: Optional[Callable[[], Dict[str, str]]] = None):
        """`homes()`: as ReceivedChains; upload state lives under `staging_dir`."""
        super().__init__(base, zfs, homes)
        self._resumable: Optional[bool] = None
        self.state_dir = Path(staging_dir) / ".uploads-local"
        self._live: Dict[str, LiveReceive] = {}
        # uploads discarded lately: a part racing an abort must not start a receive. Only
        # parts already past the state check can race, so the last few hundred are enough.
        self._discarded: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._bounds: Dict[str, str] = {}  # home: the zfs quota this server set on it

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
            owned = frozenset(chain_of(st["target"]) for st in self._states().values())
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
        dataset = chain_of(target)
        if not self._resumable or not self.zfs.exists(dataset):
            return None
        token = self.zfs.get(dataset, "receive_resume_token")
        return None if token in NO_TOKEN else token

    def _ensure_container(self, container: str) -> None:
        """Create the datasets a chain lives in, once: two uploads of one client begin at
        the same moment (a run's parallel datasets), and `zfs create -p` of the same missing
        parent by both fails one with "dataset already exists"."""
        with _CREATING:
            if self.zfs.exists(container):
                return
            for attempt in range(2):
                try:
                    self.zfs.create(container, parents=True,
                                    props={"mountpoint": "none", "canmount": "off"})
                    return
                except ZfsError as exc:
                    if self.zfs.exists(container):  # made meanwhile (another server): fine
                        return
                    if attempt or "already exists" not in exc.stderr:
                        raise  # (else only a parent was made meanwhile: create the rest)

    def bound(self, client_id: str, max_bytes: int) -> None:
        home, wanted = self.home(client_id), str(max_bytes) if max_bytes else "0"
        if self._bounds.get(home) == wanted:
            return
        self._ensure_container(home)
        if self.zfs.get(home, "quota") != wanted:
            self.zfs.set(home, "quota", wanted if max_bytes else "none")
            log.info("zfs quota of %s set to %s (the client's max_size_bytes)", home,
                     human(max_bytes) if max_bytes else "none")
        self._bounds[home] = wanted

    def _full(self, target: str, exc: StorageFull, received: int) -> StorageError:
        """`exc` (zfs recv out of space, after `received` bytes of stream) as what it is: the
        client's home at its zfs quota (413), or the pool full (507). zfs says "out of space"
        for both, and has freed the partial receive by now: the quota is what the home held
        and the stream brought."""
        home = chain_of(target).rsplit("/", 2)[0]
        try:
            values = self.zfs.props([home], ["quota", "used"])[home]
            quota, used = int(values["quota"]), int(values["used"])
        except (ZfsError, ValueError, KeyError):
            return exc
        if quota and used + received >= quota - FULL_SLACK:
            return QuotaExceeded(f"quota exceeded: the backups in {home} reached its zfs quota"
                                 f" of {human(quota)} (max_size_bytes) while receiving"
                                 f" {target}; nothing of it stays")
        return exc

    # -- the upload protocol ---------------------------------------------------------------

    def begin(self, upload_id: str, manifest: Manifest) -> None:
        """Choose the receiving dataset now, so a stream with no base fails before any part.
        Names are checked before any is made (a name past ZFS's limit made `zfs list` fail
        with "invalid dataset name": a 503)."""
        container = self._container(manifest)
        if manifest.type == "full":
            target = f"{container}/{manifest.snapshot}@{manifest.snapshot}"
            _short_enough(target)
            self._ensure_container(container)
        else:  # its chain, under a container that exists (else: NeedsFullBackup)
            _short_enough(f"{container}/{manifest.snapshot}")
            target = f"{self._chain_for(manifest)}@{manifest.snapshot}"
            _short_enough(target)
        if self.zfs.exists(target) and self.zfs.get(target, MANIFEST_PROP) not in NO_TOKEN:
            raise Conflict(f"{target} already holds a committed backup")
        published = [s for s in self.zfs.snapshots(chain_of(target), ["manifest"])
                     if s.prop("manifest")] if manifest.type == "incremental" else []
        if published and published[-1].short != manifest.parent:
            raise NeedsFullBackup(f"{chain_of(target)} holds backups newer than the base"
                                  f" {manifest.parent} of this incremental: send a full backup")
        state = {"target": target, "compression": manifest.compression, "parts": [],
                 "segment": 0, "resuming": False, "token": "",
                 "new_dataset": manifest.type == "full", "guid": manifest.guid,
                 "parent_guid": manifest.parent_guid}
        self._save(upload_id, state)  # what an older session left goes when part 0 arrives

    def _drop_container(self, state: dict) -> None:
        """Destroy the container of a discarded upload's chain when it holds no chain (made
        by `begin` for an upload that never committed: each open made one that stayed)."""
        container = chain_of(state["target"]).rsplit("/", 1)[0]
        with _CREATING:
            if self.zfs.exists(container) and list(self.zfs.props(
                    [container], ["name"], recursive_depth=1)) == [container]:
                self.zfs.destroy(container)

    def _drop_unpublished(self, state: dict) -> None:
        """Clear what a receive left that no manifest published: a partial receive (recv -A),
        a received snapshot with no manifest, and the changes it made to its chain."""
        target, chain = state["target"], chain_of(state["target"])
        self.abandon_partial(chain)
        if self.zfs.exists(target) and self.zfs.get(target, MANIFEST_PROP) in NO_TOKEN:
            self.zfs.destroy(target)
        if not self.zfs.exists(chain):
            return
        left = self.zfs.snapshots(chain)
        if left:
            self.zfs.rollback(left[-1].name)  # zfs recv -F would do it, but also destroy more
        elif state.get("new_dataset"):
            try:  # a full receive killed without recv -s
                self.zfs.destroy(chain, recursive=True)
            except ZfsNotFound:  # the receive that failed took it away itself meanwhile
                pass

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
        self._refused(upload_id, state, live)  # since this request found the parts
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
        except BaseException as exc:
            self._stop(upload_id)  # part of a part went in: only the resume token can tell
            if isinstance(exc, StorageFull):
                raise self._full(state["target"], exc, live.raw_bytes) from None
            if isinstance(exc, ValidationError):  # not a stream the store takes: nothing of
                try:  # it stays (a whole stream with more after it was received already)
                    self._drop_unpublished(state)
                except ZfsError as also:
                    log.warning("upload %s: %s", upload_id, also)
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
            if state["new_dataset"]:  # its empty container may have gone with an abort
                self._ensure_container(chain_of(state["target"]).rsplit("/", 1)[0])
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
        self._refused(upload_id, state, live)
        if state["parts"] and not state["resuming"] and (live is None or not live.alive) \
                and not self._token(state["target"]):
            self._stop(upload_id)  # the receive died and left nothing to resume: start over
            self._drop_unpublished(state)
            state.update(parts=[], segment=0, token="")
            self._save(upload_id, state)
            log.info("upload %s: the interrupted receive cannot be resumed; it starts over",
                     upload_id)
        return [PartInfo(**p) for p in state["parts"]]

    def _refused(self, upload_id: str, state: dict, live: Optional[LiveReceive]) -> None:
        """The receive refused the stream after its part was taken (data after the end of a
        whole stream): the client's, said once (400); the upload starts over, empty."""
        if live is not None and isinstance(live.error, ValidationError):
            self._stop(upload_id)
            self._drop_unpublished(state)
            state.update(parts=[], segment=0, token="")
            self._save(upload_id, state)
            raise live.error

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
            self._drop_container(state)
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

    def commit(self, upload_id, manifest):
        state = self._state(upload_id)
        target = state["target"]
        live = self._live.get(upload_id)
        if live is None:
            raise StorageError(f"the receive of upload {upload_id} was interrupted:"
                               " ask for its state and resume or start again")
        try:
            live.finish()
        except StorageFull as exc:
            raise self._full(target, exc, live.raw_bytes) from None
        except ValidationError:  # found only now (more after a whole stream, say, where the
            try:  # receive met its end after the last part was taken): the 400 leaves
                self._drop_unpublished(state)  # nothing received behind, as at a part
            except ZfsError as also:
                log.warning("upload %s: %s", upload_id, also)
            raise
        finally:
            self._live.pop(upload_id, None)
        if state["new_dataset"]:  # whatever it holds never mounts on the server
            self.zfs.set(chain_of(target), "canmount", "off")
        extra = {**manifest.extra, "zfs_snapshot": target}
        if state["segment"]:
            extra["resumed_at_part"] = state["segment"]
        stored = Manifest.from_dict({**manifest.to_dict(), "extra": extra})
        self.zfs.set(target, MANIFEST_PROP, json.dumps(stored.to_dict(), separators=(",", ":")))
        self.zfs.hold(target, RETAIN_TAG)  # a plain `zfs destroy` now fails: only delete() frees
        os.unlink(self._state_path(upload_id))
        return stored


def _short_enough(name: str) -> None:
    if len(name) > ZFS_MAX_NAME:
        raise ValidationError(f"the backup would be received as {name[:60]}... ({len(name)}"
                              f" characters); ZFS names are at most {ZFS_MAX_NAME}: use a"
                              " shorter dataset or snapshot name")
