"""The Store interface every backend implements, and what it returns.

A Store keeps committed backup streams under storage keys, with a manifest beside each, and
stages the parts of uploads in progress so that they survive a server restart. Backends are
listed in zfsmgr/storage/registry.py; each keeps its quirks in its own module. Contracts:
- `stage_part` survives a server restart when it returns (after a power loss, `staged_parts`
  lists only the parts whose bytes survived) and is idempotent for the same index and bytes;
  the `local` store is the exception: it pipes parts into a live `zfs recv` and keeps no copy, so
  after a restart what survives is zfs's `receive_resume_token` (`resume_token`/`resume`);
- nothing staged is visible through `open`/`manifests` until `commit` returns;
- `commit` writes the object first and the manifest last, so a manifest always has its object;
- a missing key raises NotFound; any other failure of the backend raises StorageError (never
  the backend's own exception types); a bug in zfsmgr stays the exception it is.
Concurrency: one Store object serves every request thread of the server. Calls for different
uploads and backups run at the same time; for one upload the server serializes `stage_part`,
`staged_parts`, `resume` and `commit` (uploads.py holds the session's lock), but `discard` may
run while a part of that upload is being staged (an abort, the expiry): the part must then fail
(or be discarded with the rest), never bring the upload back.
Deleting: `delete` of a backup that is already gone, wholly or partly, is not an error (a
rotation and a reindex may race), and `discard` of an unknown upload does nothing.
Listing: `manifests` yields in no promised order; callers sort (the catalog by snapshot time).
Checking: `check` may create what the backend needs to work (the bucket, the root directory)
and tidy what a previous process of the server left behind that no open upload owns (the
`local` store drops partial receives on its first check); it never touches a committed backup
or an open upload, and it is cheap enough for `GET /health`, which calls it each time.
A store that several servers may use at once (`shared`: S3) also offers what they need to agree:
a change marker per client (`change_marker`/`mark_changed`), a lease per client
(`client_lease`), and the upload sessions themselves (`save_session`/`load_session`).
"""

from __future__ import annotations

import errno
import zlib
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import (BinaryIO, Callable, ContextManager, Dict, Iterable, Iterator, List,
                    Optional, Set, Tuple)

from zfsmgr.errors import (NeedsFullBackup, NotFound, OutOfOrder,  # noqa: F401 (re-exported)
                           QuotaExceeded, StorageError, StorageFull, Unsupported)
from zfsmgr.files import CHUNK
from zfsmgr.protocol import Manifest


def is_full(exc: OSError) -> bool:
    """Whether an OSError means the disk or its quota is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class PartInfo:
    """One staged part of an upload."""

    index: int
    size: int
    crc32: str  # 8 hex digits, of the bytes as the store took them: the client checks each
    # part's against its own, commit checks them combined (protocol.parts_checksum)


@dataclass(frozen=True)
class StreamInfo:
    """What a store's download of a backup is, known without opening it."""

    size: Optional[int]  # bytes of the whole stream; None: known only at its end
    sha256: str  # of the whole stream; "": none to check (zfs's own stream checksums do)
    compression: str  # the codec of the bytes as they come
    ranged: bool  # an offset is a byte range of fixed bytes (HTTP 206); False: the stream is
    # made anew and skipped up to the offset (HTTP 200, the body still starts at the offset)
    self_contained: bool  # restores alone; False: it applies on the stream of its parent


@dataclass(frozen=True)
class Download:
    """What `Store.open` returns: the stream from the offset asked, and what it is."""

    reader: BinaryIO  # read(n) and close()
    length: Optional[int]  # bytes from the offset to the end; None: unknown in advance
    info: StreamInfo


def crc32_hex(value: int) -> str:
    """A CRC-32 as 8 hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


class CountingReader:
    """Wraps a stream: counts and CRC-32s what is read, refusing more than `limit` bytes."""

    def __init__(self, source: BinaryIO, limit: int):
        self.source, self.limit = source, limit
        self.size, self.crc = 0, 0

    def read(self, size: int = CHUNK) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        data = self.source.read(min(size, self.limit - self.size)) if self.size < self.limit \
            else b""
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        return data

    @property
    def crc32(self) -> str:
        """The CRC-32 of what was read, as 8 hex digits."""
        return crc32_hex(self.crc)


class Store(ABC):
    """Where backups live. Keys are built by zfsmgr.protocol.build_key and already validated."""

    kind = ""  # its name in the registry (zfsmgr/storage/registry.py)
    min_part_size = 1  # the smallest upload part it takes (but the last)
    max_object_size: Optional[int] = None  # the largest stream it keeps (None: no limit)
    receives_streams = False  # True: it feeds uploads into `zfs recv`, so they must be plain
    # zfs streams (compressed or not), never opaque bytes such as an age file

    @classmethod
    @abstractmethod
    def from_settings(cls, settings, homes: Callable[[], Dict[str, str]]) -> "Store":
        """The store the server's settings describe (not checked yet). `homes()` gives the
        server-side dataset of each client that clients.json gives one (the `local` store
        receives there); stores without such a notion ignore it."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the backend is reachable and writable; a store that is
        only full passes (it can still serve, abort and delete, and takes data once there is
        room), and says so in `free_bytes`."""

    def bound(self, client_id: str, max_bytes: int) -> None:
        """Hold what the client's backups take in the store to `max_bytes` (0: no bound)
        where the store itself can: the `local` store sets the zfs `quota` of the client's
        home, for a stream that zfs stores larger than it was sent (one that compresses
        well, received where compression is off) would pass the quota the server counts in
        bytes sent. Elsewhere a backup takes what was sent, which the server counts."""

    def free_bytes(self) -> Optional[int]:
        """Room left for new data where the store can tell (None: it cannot, or no limit)."""
        return None

    @abstractmethod
    def stage_part(self, upload_id: str, index: int, source: BinaryIO, size: int) -> PartInfo:
        """Store part `index` (the next one, or a resend of the last) read from `source`."""

    @abstractmethod
    def staged_parts(self, upload_id: str) -> List[PartInfo]:
        """The parts staged so far, in order (empty for an unknown upload)."""

    def begin(self, upload_id: str, manifest: Manifest) -> None:
        """An upload opens (its manifest lacks sizes and sha256): prepare, or refuse early."""

    def resume_token(self, upload_id: str) -> Optional[str]:
        """A `zfs send -t` token to continue an interrupted upload from, where the store has one."""
        return None

    def resume(self, upload_id: str, token: str, from_part: int) -> None:
        """The client sends `zfs send -t token` as parts from `from_part` on."""
        raise Unsupported(f"{self.kind} storage does not resume from zfs resume tokens")

    retains = False  # whether `retain` locks backups (S3 Object Lock)

    def retain(self, manifest: Manifest, until: datetime) -> None:
        """Keep a committed backup from deletion until at least `until`, where the store can
        (S3 Object Lock); elsewhere nothing to do."""

    @abstractmethod
    def commit(self, upload_id: str, manifest: Manifest) -> Manifest:
        """Assemble the staged parts at manifest.key, write the manifest beside it, return it."""

    @abstractmethod
    def discard(self, upload_id: str) -> None:
        """Remove everything staged for an upload; unknown uploads are ignored."""

    @abstractmethod
    def staged_uploads(self) -> List[Tuple[str, float]]:
        """(upload_id, last-modified epoch) of every upload with staged data."""

    def sweep(self, max_age: float, now: float,
              is_open: Callable[[str], bool] = lambda upload_id: False) -> List[str]:
        """Mend what a server that stopped mid-step left in the published objects, once older
        than `max_age` seconds (a commit or a deletion under way is younger; `is_open` says
        whether an upload still has its session); what was done, one line each. Stores whose
        steps leave nothing half-done have nothing to do."""
        return []

    def finish_commit(self, upload_id: str, key: str) -> None:
        """Complete a commit of this upload that a server stopped halfway, so that
        read_manifest finds it (an abort then deletes it, a commit asked again or the expiry
        records it). Stores whose commit is one step have nothing to do."""

    @classmethod
    def describe(cls, manifest: Manifest) -> StreamInfo:
        """What a download of `manifest` from this kind of store is (no I/O): by default the
        stored bytes themselves, as the manifest records them."""
        return StreamInfo(size=manifest.stored_size, sha256=manifest.sha256,
                          compression=manifest.compression, ranged=True,
                          self_contained=manifest.type == "full")

    @classmethod
    def marked(cls, manifest: Manifest) -> Manifest:
        """`manifest` with `self_contained` as `describe` says (what the catalog records)."""
        return replace(manifest, self_contained=cls.describe(manifest).self_contained)

    @abstractmethod
    def open(self, manifest: Manifest, offset: int = 0) -> Download:
        """The stream of `manifest` from byte `offset`, described (`describe`)."""

    @abstractmethod
    def manifests(self, client_id: Optional[str] = None) -> Iterator[Manifest]:
        """Every manifest in storage (of one client), read from storage alone."""

    def footprint(self, manifests: Iterable[Manifest]) -> Dict[str, int]:
        """What each backup takes in this store, by key, as its quota counts it."""
        return {m.key: m.stored_size for m in manifests}

    @abstractmethod
    def delete(self, manifest: Manifest) -> None:
        """Remove a committed backup: manifest first, then its object; one already gone is
        not an error."""

    # Several servers on one store (only where `shared`; the others keep these defaults).
    shared = False

    def change_marker(self, client_id: str) -> str:
        """A token that changes whenever the client's manifests in this store change."""
        return ""

    def mark_changed(self, client_id: str) -> str:
        """After a change to the client's manifests: say so; returns the new marker."""
        return ""

    def client_lease(self, client_id: str) -> ContextManager[None]:
        """Held around a decision and the change it allows (commit, rotation) for a client:
        no other server that shares this store decides for that client meanwhile."""
        return nullcontext()

    def save_session(self, upload_id: str, text: str) -> None:
        """Keep an upload's session where every server sharing the store finds it."""

    def reserve(self, client_id: str, upload_id: str, amount: int) -> None:
        """Say, where every server sharing the store sees it, that an open upload of the
        client holds `amount` bytes against its quota (staged, or about to be)."""

    def reservations(self, client_id: str, max_age: float) -> Dict[str, int]:
        """{upload id: bytes} of the client's reservations, as any server recorded them, not
        older than `max_age` seconds (older ones are of uploads left to expire: dropped)."""
        return {}

    def unreserve(self, client_id: str, upload_id: str) -> None:
        """The upload ended (committed, aborted, expired): its reservation goes."""

    def load_session(self, upload_id: str) -> Optional[str]:
        """The session saved for an upload, None when there is none."""
        return None

    def manifest_keys(self, client_id: str) -> Set[str]:
        """The keys of a client's committed backups in storage."""
        return {m.key for m in self.manifests(client_id)}

    def read_manifest(self, key: str) -> Manifest:
        """The manifest stored for one key (NotFound when absent)."""
        client_id = key.split("/", 1)[0]
        for manifest in self.manifests(client_id):
            if manifest.key == key:
                return manifest
        raise NotFound(f"no manifest for {key}")
