"""The `local` store: the server `zfs recv`s each backup into ZFS_BASE_DATASET/<client>/...

Each chain (a full stream and the incrementals on it) lives in its own dataset
`BASE/<client>/<dataset token>/<first snapshot>`, so a second full backup never has to destroy
an older chain. The manifest is kept as a user property of the received snapshot, so the
catalog can be rebuilt from the pool alone. Downloads are full `zfs send` streams of the
snapshot, which stay valid whatever older snapshots rotation has removed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

from zfsmgr.compress import decompressor
from zfsmgr.protocol import Manifest, dataset_token
from zfsmgr.storage.base import CHUNK, NotFound, StorageError, Store
from zfsmgr.storage.directory import Staging
from zfsmgr.zfs import PROPERTY_PREFIX, Zfs, ZfsError, run

log = logging.getLogger("zfsmgr.storage.local")
MANIFEST_PROP = PROPERTY_PREFIX + "manifest"


class _SendBody:
    """A running `zfs send` as a closable reader that reports failure."""

    def __init__(self, command):
        self.command, self.done = command, False

    def read(self, size: int = CHUNK) -> bytes:
        data = self.command.read(CHUNK if size is None or size < 0 else size)
        if not data and not self.done:
            self.done = True
            self.command.finish()  # raises ZfsError if the send failed
        return data

    def close(self) -> None:
        if not self.done:
            self.command.kill()


class ZfsLocalStore(Store):
    """Backups received into a local ZFS dataset tree."""

    kind = "local"

    def __init__(self, base: str, staging_dir: str, zfs: Optional[Zfs] = None):
        if not base:
            raise StorageError("ZFS_BASE_DATASET is not set")
        self.base, self.zfs = base, zfs or Zfs()
        self._resumable: Optional[bool] = None
        self.staging = Staging(Path(staging_dir) / ".uploads-local")

    def check(self) -> None:
        if not self.zfs.exists(self.base):
            raise StorageError(f"ZFS_BASE_DATASET {self.base} does not exist")
        self.staging.root.mkdir(parents=True, exist_ok=True)
        if self._resumable is None:
            self._resumable = self.zfs.features(self.base).resumable_recv
            self.abandon_partial(self.base, recursive=True)

    def abandon_partial(self, root: str, recursive: bool = False) -> List[str]:
        """`zfs recv -A` every partially received dataset under `root` (an interrupted commit).

        The staged stream is still on disk, so a commit is simply received again; a resume
        token would need the client's `zfs send -t`, which the staging protocol makes moot.
        """
        if not self._resumable or not self.zfs.exists(root):
            return []
        found = self.zfs.props([root], ["receive_resume_token"],
                               recursive_depth=4 if recursive else 0)
        cleared = []
        for name, props in found.items():
            if "@" not in name and props.get("receive_resume_token", "-") not in ("-", ""):
                run([self.zfs.zfs, "recv", "-A", name])
                log.info("discarded the partial receive into %s (recv -A)", name)
                cleared.append(name)
        return cleared

    def stage_part(self, upload_id, index, source, size):
        return self.staging.stage(upload_id, index, source, size)

    def staged_parts(self, upload_id):
        return self.staging.parts(upload_id)

    def read_staged(self, upload_id, index):
        return self.staging.read(upload_id, index)

    def discard(self, upload_id):
        self.staging.discard(upload_id)

    def staged_uploads(self):
        return self.staging.uploads()

    def _container(self, manifest: Manifest) -> str:
        return f"{self.base}/{manifest.client_id}/{dataset_token(manifest.dataset)}"

    def _snapshots(self, root: str) -> Dict[str, Dict[str, str]]:
        """Every snapshot under `root` with its guid and manifest property."""
        if not self.zfs.exists(root):
            return {}
        found = self.zfs.props([root], ["guid", MANIFEST_PROP], recursive_depth=3)
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
        raise StorageError(f"the base {manifest.dataset}@{manifest.parent} of this incremental"
                           " is not on the server: send a full backup")

    def commit(self, upload_id, manifest):
        container = self._container(manifest)
        if not self.zfs.exists(container):
            _create_container(self.zfs, container)
        target = f"{self._chain_for(manifest)}@{manifest.snapshot}"
        if self.zfs.exists(target):  # left by a commit that died before its manifest
            if self.zfs.get(target, MANIFEST_PROP) not in ("-", ""):
                raise StorageError(f"{target} already holds a committed backup")
            self.zfs.destroy(target)
        chain = target.split("@", 1)[0]
        self.abandon_partial(chain)
        data = self.staging.data_path(upload_id)
        try:
            with open(data, "rb") as raw, self.zfs.receive(
                    target, force=True, resumable=bool(self._resumable)) as recv:
                stream = decompressor(manifest.compression, raw)
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    recv.write(chunk)
        except ZfsError as exc:
            self.abandon_partial(chain)
            raise StorageError(f"cannot receive {manifest.key} into {target}: {exc}") from exc
        except ValueError as exc:
            raise StorageError(f"cannot receive {manifest.key}: {exc}") from exc
        stored = Manifest.from_dict({**manifest.to_dict(),
                                     "extra": {**manifest.extra, "zfs_snapshot": target}})
        self.zfs.set(target, MANIFEST_PROP, json.dumps(stored.to_dict(), separators=(",", ":")))
        self.staging.discard(upload_id)
        return stored

    def _located(self, manifest: Manifest) -> str:
        target = manifest.extra.get("zfs_snapshot", "")
        if not target.startswith(self.base + "/") or not self.zfs.exists(target):
            raise NotFound(f"{manifest.key} is missing from {self.base}")
        return target

    def open(self, manifest, offset=0):
        body = _SendBody(self.zfs.send(self._located(manifest)))
        skip = offset
        while skip > 0:  # a resumed download: the send stream is deterministic
            chunk = body.read(min(CHUNK, skip))
            if not chunk:
                break
            skip -= len(chunk)
        return body, None

    def manifests(self, client_id=None):
        root = f"{self.base}/{client_id}" if client_id else self.base
        for name, props in sorted(self._snapshots(root).items()):
            value = props.get(MANIFEST_PROP, "-")
            if value not in ("-", ""):
                try:
                    yield Manifest.from_dict(json.loads(value))
                except ValueError as exc:
                    raise StorageError(f"manifest on {name} is unreadable: {exc}") from exc

    def delete(self, manifest):
        target = self._located(manifest)
        self.zfs.destroy(target)
        chain = target.split("@", 1)[0]
        if not [s for s in self._snapshots(chain) if s.startswith(chain + "@")]:
            self.zfs.destroy(chain)

    def object_size(self, key: str) -> Optional[int]:
        """Not meaningful for ZFS: the stream is regenerated on download."""
        return None


def _create_container(zfs: Zfs, name: str) -> None:
    run([zfs.zfs, "create", "-p", "-o", "mountpoint=none", "-o", "canmount=off", name])
