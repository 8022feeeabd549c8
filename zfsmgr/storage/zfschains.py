"""The received chains of the `local` store: where they live on the pool, and everything
done to them once committed: listing their manifests, their footprint, reading them back
(`zfs send`) and deleting them.

A client's home is its `dataset` in clients.json (the seed's `backup/client1`), else
`ZFS_BASE_DATASET/<client>`. Each chain (a full stream and the incrementals on it) lives in its
own dataset `HOME/<dataset token>/<first snapshot>`, so a second full backup never has to destroy
an older chain. The manifest is kept as the user property `org.zfsmgr:manifest` of the received
snapshot, so the catalog can be rebuilt from the pool alone. Downloads are full `zfs send`
streams of the snapshot, which stay valid whatever older snapshots rotation has removed.

Every committed snapshot carries the user hold `zfsmgr-retain`, so that a `zfs destroy` by
hand, a script or another tool fails; only `delete` (rotation, admin delete) releases it first.
The receive path (uploads into these chains) is zfslocal.py's.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Callable, Dict, Iterable, Iterator, List, Optional

from zfsmgr.files import CHUNK
from zfsmgr.protocol import Manifest, parse_key
from zfsmgr.storage.base import Download, NeedsFullBackup, NotFound, StorageError, Store, StreamInfo
from zfsmgr.zfs import PROPERTY_PREFIX, Zfs, ZfsError

MANIFEST_PROP = PROPERTY_PREFIX + "manifest"
RETAIN_TAG = "zfsmgr-retain"  # the hold on every committed snapshot; only delete() releases it
NO_TOKEN = ("-", "")  # zfs's "unset" for a property


def storage_failure(func):
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


def zfs_failures_are_storage_errors(cls):
    """Wrap every method of the Store interface that `cls` defines with storage_failure."""
    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_") and hasattr(Store, name):
            setattr(cls, name, storage_failure(value))
    return cls


class SendBody:
    """A running `zfs send` as a closable reader that reports failure."""

    def __init__(self, command):
        self.command, self.done = command, False

    @storage_failure
    def read(self, size: int = CHUNK) -> bytes:
        data = self.command.read(CHUNK if size is None or size < 0 else size)
        if not data and not self.done:
            self.done = True
            self.command.finish()  # raises ZfsError if the send failed
        return data

    def close(self) -> None:
        if not self.done:
            self.command.kill()


# BASE/<client>/<dataset token>/<chain>@<snapshot>: a listing from BASE reaches the snapshots
# of the homes one level below it
LISTED_DEPTH = 4


def _one_below(home: str, base: str) -> bool:
    return home.startswith(base + "/") and "/" not in home[len(base) + 1:]


@zfs_failures_are_storage_errors
class ReceivedChains(Store):
    """The committed side of the local store: chains received under each client's home."""

    def __init__(self, base: str, zfs: Optional[Zfs] = None,
                 homes: Optional[Callable[[], Dict[str, str]]] = None):
        """`homes()`: {client id: home dataset} of the clients that have their own (the
        `dataset` of clients.json); the others live under BASE/<client>."""
        if not base:
            raise StorageError("ZFS_BASE_DATASET is not set")
        self.base, self.zfs = base, zfs or Zfs()
        self._homes = homes or dict

    def home(self, client_id: str) -> str:
        """The dataset that holds a client's chains."""
        return self._homes().get(client_id) or f"{self.base}/{client_id}"

    def _container(self, manifest: Manifest) -> str:
        return f"{self.home(manifest.client_id)}/{parse_key(manifest.key).dataset_token}"

    def _snapshots(self, root: str) -> Dict[str, Dict[str, str]]:
        """Every snapshot under `root` with its guid and manifest property."""
        if not self.zfs.exists(root):
            return {}
        found = self.zfs.props([root], ["guid", MANIFEST_PROP], recursive_depth=LISTED_DEPTH)
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
            chains.setdefault(chain_of(target), []).append(manifest)
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
        body = SendBody(self.zfs.send(self._located(manifest)))
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
        else:  # BASE, and the homes its listing (LISTED_DEPTH) does not reach: outside it,
            # or more than one level below it (a `dataset` of backup/hosts/web1)
            roots = [self.base] + sorted({h for h in self._homes().values()
                                          if h and h != self.base and not
                                          _one_below(h, self.base)})
        seen = set()
        for root in roots:
            for manifest in self._manifests_under(root):
                if (not client_id or manifest.client_id == client_id) and \
                        manifest.key not in seen:
                    seen.add(manifest.key)
                    yield manifest

    def _manifests_under(self, root: str) -> Iterator[Manifest]:
        for name, props in sorted(self._snapshots(root).items()):
            value = props.get(MANIFEST_PROP, "-")
            if value in ("-", ""):
                continue
            try:
                yield Manifest.from_dict(json.loads(value))
            except ValueError as exc:
                raise StorageError(f"manifest on {name} is unreadable: {exc}") from exc

    def read_manifest(self, key):
        """The chains of the key's dataset only, where the listing of the client's home would
        read every dataset's."""
        parsed = parse_key(key)
        for manifest in self._manifests_under(
                f"{self.home(parsed.client_id)}/{parsed.dataset_token}"):
            if manifest.key == key:
                return manifest
        raise NotFound(f"no manifest for {key}")

    def delete(self, manifest):
        try:
            target = self._located(manifest)
        except NotFound:  # gone already: what delete wants
            return
        self.zfs.release(target, RETAIN_TAG)
        try:
            self._destroy(target)
        except ZfsError:  # busy (a download's zfs send on OpenZFS), cloned: it stays, held
            if self.zfs.exists(target):
                self.zfs.hold(target, RETAIN_TAG)
            raise

    def _destroy(self, target: str) -> None:
        """Destroy a snapshot, and its chain dataset once no snapshot is left in it."""
        self.zfs.destroy(target, missing_ok=True)
        chain = target.split("@", 1)[0]
        if not [s for s in self._snapshots(chain) if s.startswith(chain + "@")]:
            self.zfs.destroy(chain)


def chain_of(target: str) -> str:
    """The chain dataset of a received snapshot (and of a receive's partial state): the
    target without its snapshot."""
    return target.split("@", 1)[0]
