"""Upload sessions: authorize, stage parts, verify, commit atomically, abort, expire.

A session is a row of the server's database (zfsmgr.server.sessions); the parts themselves are
staged by the client's store (so S3 uploads never sit on the server's disk). A backup becomes
visible only when `commit` has checked everything staged against the client's declaration (the
size, and the CRC-32 of every part as the store took it, combined as S3 combines part
checksums), stored it at its key with its manifest, and recorded it in the catalog. The sha256
of the whole stream, which restore checks, is the client's: it hashes while it sends, so the
server, shared by the fleet, hashes nothing twice. After a `local` receive was resumed with `zfs
send -t`, the check covers the parts since the resume (`Session.segment`); the bytes zfs took
before were checked by `zfs recv` itself, record by record.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from zfsmgr import properties, protocol
from zfsmgr.errors import (CommitUnderWay, Conflict, Forbidden, NeedsFullBackup, NotFound,
                           OutOfOrder, QuotaExceeded, TooLargeForStore, TooManyUploads,
                           Unsupported, VerificationFailed, ZfsmgrError)
from zfsmgr.progress import human
from zfsmgr.protocol import Manifest
from zfsmgr.server.catalog import Catalog
from zfsmgr.server.clients import ClientConfig
from zfsmgr.server.quota import Quota
from zfsmgr.server.sessions import Session, SessionTable
from zfsmgr.storage.base import PartInfo, Store

log = logging.getLogger("zfsmgr.server.uploads")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_PARTS_CHECKSUM = re.compile(r"[0-9a-fA-F]{8}-[0-9]{1,6}")
PART_WAIT = 2.0  # seconds a part waits for the one before it to start (two are in flight)
KEPT_FAILURES = 1000  # failed commits remembered for their clients' look at the upload's state


class Uploads:
    """All upload sessions of one server."""

    def __init__(self, table: SessionTable, catalog: Catalog, part_base: int, max_parts: int,
                 expiry_seconds: float, max_open: int = 4,
                 adopt: Optional[Callable[[str, str], Optional[Session]]] = None):
        self.table = table
        self.max_open = max_open
        self.catalog = catalog
        self.adopt = adopt  # finds a session another server opened, in a store both share
        self.part_base, self.max_parts, self.expiry = part_base, max_parts, expiry_seconds
        self._lock = threading.Lock()
        self._session_locks: Dict[str, threading.Condition] = {}
        self._committing: Dict[str, float] = {}  # upload id: when its commit took the lock
        self._commit_failed: Dict[str, Tuple[str, ZfsmgrError]] = {}  # id: (client, why)
        self.quota = Quota(table, catalog.used_bytes, expiry_seconds)

    def _session_lock(self, upload_id: str) -> threading.Condition:
        with self._lock:
            return self._session_locks.setdefault(upload_id, threading.Condition())

    @contextmanager
    def _commit_lock(self, session: Session) -> Iterator[None]:
        """The session's lock, for a commit: `state` answers at once meanwhile that the upload
        is committing (an S3 compose of terabytes outlasts any request timeout), and afterwards
        why the commit failed, where the upload stays open (a client that stopped waiting for
        the answer learns it there)."""
        upload_id = session.upload_id
        with self._session_lock(upload_id):
            self._committing[upload_id] = time.monotonic()
            self._commit_failed.pop(upload_id, None)
            try:
                yield
            except ZfsmgrError as exc:
                self._commit_failed[upload_id] = (session.client_id, exc)
                while len(self._commit_failed) > KEPT_FAILURES:
                    self._commit_failed.pop(next(iter(self._commit_failed)))
                raise
            finally:
                self._committing.pop(upload_id, None)

    def commit_failure(self, client_id: str, upload_id: str) -> Optional[ZfsmgrError]:
        """Why this client's last commit of the upload failed, if it did (the upload may be
        gone: a checksum mismatch discards it)."""
        client, exc = self._commit_failed.get(upload_id, ("", None))
        return exc if client == client_id else None

    def schedule(self, store: Store, estimate: int) -> Tuple[int, int]:
        """(base part size, growth interval) that carries `estimate` bytes comfortably."""
        base = max(self.part_base, store.min_part_size)
        every = max(1, self.max_parts // 10)
        while estimate and base < protocol.MAX_PART_SIZE and protocol.schedule_capacity(
                base, every, self.max_parts) < 2 * estimate:
            base *= 2
        return base, every

    def open(self, client: ClientConfig, store: Store, request: dict) -> Session:
        """Validate an upload request and open its session."""
        dataset = protocol.validate_dataset(request.get("dataset"))
        if not client.may_back_up(dataset):
            raise Forbidden(f"client {client.client_id} may only back up"
                            f" {', '.join(client.allowed_datasets)} (allowed_datasets)")
        snapshot = protocol.validate_snapshot(request.get("snapshot"))
        protocol.validate_snapshot_name(dataset, snapshot)
        kind = protocol.validate_choice(request.get("type", "full"), "type",
                                        protocol.BACKUP_TYPES)
        parent, parent_key = request.get("parent"), None
        if kind == "incremental":
            parent = protocol.validate_snapshot(parent)
            if parent == snapshot:  # it would be its own base, which rotation never deletes
                raise protocol.ValidationError(f"the incremental {snapshot} names itself as"
                                               " its parent")
            parent_key = self._base_key(client.client_id, dataset, parent)
            if parent_key is None:
                raise NeedsFullBackup(f"the base {dataset}@{parent} of this incremental is not"
                                      " on the server: send a full backup")
        else:
            parent = None
        compression = protocol.validate_choice(request.get("compression", "gzip"),
                                               "compression", protocol.COMPRESSIONS)
        encryption = protocol.validate_choice(request.get("encryption") or "", "encryption",
                                              ("",) + tuple(protocol.ENCRYPTIONS))
        if encryption and store.receives_streams:
            raise Unsupported(f"the {store.kind} store receives streams into zfs: it cannot take"
                              " an encrypted one (use another store, or ENCRYPT=none)")
        if encryption and request.get("raw_send"):
            raise protocol.ValidationError("a raw send is encrypted already: it is never"
                                           " wrapped again")
        snapshot_time = protocol.validate_epoch(request.get("snapshot_time"))
        record = properties.validate(request.get("properties"))  # kept, never applied
        flags = {name: request.get(name, False) for name in ("raw_send", "compressed_send")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise protocol.ValidationError("raw_send and compressed_send must be true or false")
        stamp = protocol.format_timestamp(datetime.fromtimestamp(snapshot_time, timezone.utc))
        opened = self.table.of_client(client.client_id)
        taken = self.catalog.tokens(client.client_id)
        for other in opened:  # an open upload's dataset holds its token too (a first backup)
            taken.setdefault(other.dataset, protocol.parse_key(other.key).dataset_token)
        try:
            token = protocol.unique_token(dataset, taken)
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        key = protocol.build_key(client.client_id, dataset, stamp, compression, token=token,
                                 encryption=encryption)
        if self.catalog.has_key(client.client_id, key):
            raise Conflict(f"a backup stored as {key} already exists")
        estimate = protocol.validate_count(request.get("estimated_size") or 0, "estimated_size")
        guid = protocol.validate_guid(request.get("guid"))
        parent_guid = protocol.validate_guid(request.get("parent_guid"), "parent_guid")
        supersede = request.get("supersede", False)
        if not isinstance(supersede, bool):
            raise protocol.ValidationError("supersede must be true or false")
        for other in opened:
            if other.key == key and other.dataset == dataset:  # a retry replaces a stale one
                self.abort(other, store)
            elif supersede and other.dataset == dataset and other.storage_type == store.kind \
                    and other.upload_id not in self._committing:  # a commit ends on its own
                # the client holds the dataset's lock (zfsmgr's does, one run at a time): an
                # open upload of it is one a run left when it died (killed, or its abort
                # failed), which held one of the client's uploads until it expired
                log.info("upload %s of %s (%s) left by an earlier run: aborted", other.upload_id,
                         dataset, other.snapshot)
                self.abort(other, store)
        _fits_the_store(store, estimate, "the estimated size")
        self.quota.fit(client, estimate, parent_key, store=store)
        if len(self.table.of_client(client.client_id)) >= self.max_open:
            raise self._too_many(client)
        store.bound(client.client_id, client.max_size_bytes)
        base, every = self.schedule(store, estimate)
        session = Session(
            upload_id=secrets.token_hex(16), client_id=client.client_id, key=key,
            storage_type=store.kind, dataset=dataset, snapshot=snapshot, type=kind,
            parent=parent, compression=compression, encryption=encryption,
            guid=guid, parent_guid=parent_guid, raw_send=flags["raw_send"],
            compressed_send=flags["compressed_send"], snapshot_time=snapshot_time,
            estimated_size=estimate, properties=record,
            part_base=base, part_every=every, created=time.time())
        if not self.table.add(session, time.time(), max_open=self.max_open):
            raise self._too_many(client)  # another open of this client came first
        try:
            if store.shared:
                store.save_session(session.upload_id, session.to_json())
            store.begin(session.upload_id, _manifest(session, store, raw_size=0, stored_size=0,
                                                     sha256="", parts=0))
        except BaseException:
            self.abort(session, store)
            raise
        return session

    def _too_many(self, client: ClientConfig) -> TooManyUploads:
        return TooManyUploads(f"client {client.client_id} has {self.max_open} open uploads, the"
                              f" most it may have: finish or abort one (abandoned ones expire"
                              f" after {self.expiry / 3600:g} h)")

    def resume(self, store: Store, session: Session, request: dict) -> Session:
        """The client continues an interrupted receive with `zfs send -t`, from a given part."""
        token, from_part = request.get("token"), request.get("from_part")
        if not isinstance(token, str) or not 0 < len(token) <= 4096 or \
                not token.isascii() or not token.isprintable():
            raise protocol.ValidationError("resume needs the token and from_part")
        protocol.validate_count(from_part, "from_part", protocol.MAX_PART_INDEX)
        with self._session_lock(session.upload_id):
            # a commit or abort that came first ended it: recording it again would bring back
            # a session with nothing behind it, holding one of the client's uploads
            session = self.get(session.client_id, session.upload_id)
            store.resume(session.upload_id, token, from_part)
            session = replace(session, segment=from_part, resumed_with=token)
            self.table.add(session, time.time())
            if store.shared:
                store.save_session(session.upload_id, session.to_json())
        return session

    def state(self, store: Store, session: Session) -> dict:
        """What the server holds of an upload, read under its lock (a store may tidy up);
        while its commit runs, that it is committing, at once: waiting for the lock held each
        of the client's polls, and a server thread, for as long as the commit took."""
        since = self._committing.get(session.upload_id)
        if since is not None:  # no parts to send again: the client waits for the commit
            return {"parts": [], "received": 0, "resume_token": "", "segment": 0,
                    "resumed_with": "", "committing": True,
                    "committing_for": round(time.monotonic() - since, 1)}
        with self._session_lock(session.upload_id):
            session = self.get(session.client_id, session.upload_id)
            parts = store.staged_parts(session.upload_id)
            state = {"parts": [p.__dict__ for p in parts],
                     "received": sum(p.size for p in parts),
                     "resume_token": store.resume_token(session.upload_id),
                     "segment": session.segment, "resumed_with": session.resumed_with}
            failed = self.commit_failure(session.client_id, session.upload_id)
            if failed is not None:
                state["commit_failed"] = {"status": failed.http_status, "message": str(failed)}
            return state

    def _parent_key(self, session: Session) -> Optional[str]:
        return self._base_key(session.client_id, session.dataset, session.parent) \
            if session.parent else None

    def _base_key(self, client_id: str, dataset: str, parent: str) -> Optional[str]:
        """The key of the backup an incremental builds on (the first of dataset@parent): one
        indexed row, since every part asks (reading the dataset's whole history cost ~1 s a
        part at 20,000 backups, and grew with it)."""
        first = self.catalog.first_of_snapshot(client_id, dataset, parent)
        return first["key"] if first else None

    def held(self, client_id: str, upload_id: str) -> Optional[Session]:
        """An open session of this client in this server's own table, None otherwise: never
        adopts, never asks a store (the gate runs on waitress's one network thread)."""
        session = self.table.get(protocol.validate_upload_id(upload_id))
        return session if session is not None and session.client_id == client_id else None

    def get(self, client_id: str, upload_id: str) -> Session:
        """An open session of this client (NotFound for anyone else's)."""
        session = self.table.get(protocol.validate_upload_id(upload_id))
        if session is None and self.adopt is not None:
            session = self.adopt(client_id, upload_id)
            if session is not None and session.client_id == client_id:
                self.table.add(session, time.time())
        if session is None or session.client_id != client_id:
            raise NotFound(f"no open upload {upload_id}")
        return session

    def put_part(self, client: ClientConfig, store: Store, session: Session, index: int,
                 body: BinaryIO, size: int, segment: Optional[int] = None) -> PartInfo:
        """Stage one part; parts arrive in order, and the last one may be sent again.

        A part may arrive while the one before it is being staged (clients keep two in flight)
        and then waits for it; the one before may also be a moment late (its request started
        first but its thread was slower), so the part waits at most PART_WAIT seconds for it to
        begin. Any other part ahead of the stream is refused at once (OutOfOrder, 409, with the
        parts held), so no request holds a thread waiting for another. `segment` is the
        client's idea of where its current stream starts (0, or the part a `zfs send -t` stream
        began at): a part of an earlier attempt is refused."""
        if index >= self.max_parts:  # S3 composes at most S3_MAX_PARTS (its compose fails)
            raise protocol.ValidationError(f"part {index}: an upload has at most"
                                           f" {self.max_parts} parts (S3_MAX_PARTS)")
        limit = protocol.part_size(index, session.part_base, session.part_every)
        if size > limit:
            raise protocol.ValidationError(f"part {index} is {size} bytes; at most {limit}")
        if size <= 0:
            raise protocol.ValidationError("a part must not be empty")
        turn = self._session_lock(session.upload_id)
        with turn:
            parts = self._wait_for_turn(turn, store, session, index)
            session = self.get(session.client_id, session.upload_id)  # a resume may have run
            if segment is not None and segment != session.segment:
                raise Conflict(f"part {index} belongs to the stream from part {segment}; the"
                               f" upload now continues from part {session.segment}")
            if 0 < index == len(parts):  # each part costs the store a record of them all:
                # tiny ones by the thousand would cost CPU with the square of their count
                short, due = parts[-1].size, protocol.part_size(index - 1, session.part_base,
                                                                session.part_every)
                if short < due:
                    raise protocol.ValidationError(
                        f"part {index - 1} was {short} bytes, less than its {due}: only the"
                        " last part of an upload may be shorter than its schedule")
            staged = sum(p.size for p in parts[:index])
            try:
                _fits_the_store(store, staged + size, f"with part {index}, the upload")
            except TooLargeForStore:  # it can never commit: what it staged goes at once
                self.abort(session, store)
                raise
            # the upload's reservation never drops below what it holds: a part sent again
            # (refused by the store, or replacing one) must not free room for another upload
            held = max(size, sum(p.size for p in parts[index:]))
            try:  # an upload without an estimate (an incremental on zfs-fuse) is measured here
                self.quota.fit(client, held, self._parent_key(session), session.upload_id,
                               staged, store)
            except QuotaExceeded:
                self.abort(session, store)
                raise
            part = store.stage_part(session.upload_id, index, body, size)
            self._touch(session)
            turn.notify_all()
            return part

    def _wait_for_turn(self, turn: threading.Condition, store: Store, session: Session,
                       index: int) -> List[PartInfo]:
        """The staged parts, once part `index` may be staged: at once, or when the part before
        it has landed (its staging holds `turn`; it must begin within PART_WAIT seconds); else
        OutOfOrder."""
        deadline = time.monotonic() + PART_WAIT
        while True:
            parts = store.staged_parts(session.upload_id)
            left = deadline - time.monotonic()
            if index <= len(parts):
                return parts
            if index > len(parts) + 1 or left <= 0:
                raise OutOfOrder(f"part {index} is ahead of the stream: the server holds"
                                 f" {len(parts)} parts of upload {session.upload_id}",
                                 len(parts))
            turn.wait(left)

    def _touch(self, session: Session) -> None:
        if not self.table.touch(session.upload_id, time.time()):
            raise NotFound(f"upload {session.upload_id} was aborted")

    def commit(self, client: ClientConfig, store: Store, session: Session,
               request: dict,
               retain: Callable[[], Optional[datetime]] = lambda: None) -> Manifest:
        """Verify the staged parts against the client's size and part checksum, then publish
        them with the client's sha256 of the stream (where the store locks objects, `retain`
        extends the retention of the chain's bases and says until when the backup is kept)."""
        sha256, stored_size = request.get("sha256"), request.get("stored_size")
        raw_size, checksum = request.get("raw_size", 0), request.get("parts_crc32")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise protocol.ValidationError("sha256 must be 64 hex digits")
        if not isinstance(checksum, str) or not _PARTS_CHECKSUM.fullmatch(checksum):
            raise protocol.ValidationError("parts_crc32 must be 8 hex digits, a dash and the"
                                           " number of parts")
        protocol.validate_count(stored_size, "stored_size")
        protocol.validate_count(raw_size, "raw_size")
        with self._commit_lock(session):
            store.finish_commit(session.upload_id, session.key)  # one a stopped server began
            parts = store.staged_parts(session.upload_id)
            sent = sum(p.size for p in parts[session.segment:])  # since the last send -t
            if not parts:  # a commit asked again: the first may have reached the store only
                done = self._stored_already(store, session)
                if done is not None and done.sha256 == sha256.lower() and \
                        done.stored_size == stored_size:
                    with store.client_lease(client.client_id):
                        self._record_found(store, session, done)
                    return done
            if len(parts) <= session.segment or sent != stored_size:
                raise VerificationFailed(
                    f"the server holds {sent} bytes in {len(parts) - session.segment} parts,"
                    f" the client sent {stored_size}")
            total = sum(p.size for p in parts)
            held = protocol.parts_checksum(p.crc32 for p in parts[session.segment:])
            if held != checksum.lower():
                self.abort(session, store)
                raise VerificationFailed(
                    f"part checksum mismatch for {session.key}: the server holds {held}, the"
                    f" client sent {checksum}; the upload was discarded")
            manifest = _manifest(session, store, raw_size=raw_size, stored_size=total,
                                 sha256=sha256.lower(), parts=len(parts))
            retain_until = retain()  # once all is checked: a malformed commit locks nothing
            if retain_until is not None:
                manifest = replace(manifest, extra={**manifest.extra, "retain_until":
                                                    retain_until.isoformat()})
            with store.client_lease(client.client_id):  # servers sharing the store: one at once
                self.catalog.refresh(store, client.client_id)
                same = self._same_as_recorded(client, session, manifest)
                if same is not None:  # the stream sent again after a commit whose server
                    self.abort(session, store)  # stopped before answering (S3's listing
                    return same  # shows it): done already, not a conflict
                self._recheck(client, store, session)
                self.quota.check(client, 0, session.upload_id, total,
                                 others_count=not store.shared)
                manifest = store.marked(store.commit(session.upload_id, manifest))
                self._record(store, session, manifest)
            self.quota.release(store, session)
            return manifest

    def _record(self, store: Store, session: Session, manifest: Manifest) -> None:
        """Make a committed backup visible and its upload no longer open, in one transaction
        that checks again that its base is in the catalog (a deletion that raced the commit);
        without it, the stored backup is deleted and NeedsFullBackup raised."""
        try:
            with self.table.db.transaction():
                if session.parent and not self.catalog.has_snapshot(
                        session.client_id, session.dataset, session.parent):
                    raise NeedsFullBackup(f"the base {session.dataset}@{session.parent} of this"
                                          " incremental was deleted while it committed: send a"
                                          " full backup")
                self.catalog.add(manifest)
                self._forget(session)
        except NeedsFullBackup:
            store.delete(manifest)
            self._forget(session)
            raise
        except BaseException as exc:  # the catalog refused (a full disk): not listed, so not
            # stored either (it would take space no quota counts, until a reindex found it)
            log.error("commit of %s could not be recorded (%s): the stored backup is removed;"
                      " the client sends it again", session.key, exc)
            store.delete(manifest)
            try:
                self._forget(session)
                self.quota.release(store, session)
            except Exception as also:  # the session expires instead
                log.error("upload %s stays open until it expires: %s", session.upload_id, also)
            raise

    def _stored_already(self, store: Store, session: Session) -> Optional[Manifest]:
        """The backup of an upload whose commit reached the store but not the catalog (the
        server stopped in between), None when there is none: one manifest read, for a commit
        asked again with no parts staged, an abort, an expiry."""
        if self.catalog.has_key(session.client_id, session.key):
            return None
        try:
            store.finish_commit(session.upload_id, session.key)
            manifest = store.read_manifest(session.key)
        except ZfsmgrError as exc:  # NotFound: not committed; else (a store or zfs error) it
            if not isinstance(exc, NotFound):  # stays for the next look, or reindex, to find
                log.warning("upload %s: could not look for its committed backup: %s",
                            session.upload_id, exc)
            return None
        if (manifest.client_id, manifest.dataset, manifest.snapshot) != \
                (session.client_id, session.dataset, session.snapshot):
            return None
        return store.marked(manifest)

    def _record_found(self, store: Store, session: Session, done: Manifest) -> None:
        """Record the backup `_stored_already` found, and end its upload."""
        self._record(store, session, done)
        self.quota.release(store, session)
        log.info("upload %s was committed before the server stopped; recorded now",
                 session.upload_id)

    def settle(self, session: Session, store: Store) -> None:
        """An abandoned upload (expired): recorded if its commit reached the store before the
        server stopped (it was checked whole then; a base deleted since removes it again),
        else discarded."""
        with self._session_lock(session.upload_id):
            done = self._stored_already(store, session)  # its parts may be listed still
            if done is not None:
                try:
                    self._record_found(store, session, done)
                except NeedsFullBackup:  # _record removed it
                    pass
                return
        self.abort(session, store)

    def _same_as_recorded(self, client: ClientConfig, session: Session,
                          manifest: Manifest) -> Optional[Manifest]:
        """The recorded backup of this upload's key, if it is this very stream (same sha256
        and size)."""
        if not self.catalog.has_key(client.client_id, session.key):
            return None
        recorded = self.catalog.find(client.client_id, session.key)
        return recorded if (recorded.sha256, recorded.stored_size) == \
            (manifest.sha256, manifest.stored_size) else None

    def _recheck(self, client: ClientConfig, store: Store, session: Session) -> None:
        """What `open` checked may have changed since (another server, a rotation)."""
        if self.catalog.has_key(client.client_id, session.key):
            self.abort(session, store)
            raise Conflict(f"a backup stored as {session.key} already exists")
        if session.parent and not self.catalog.has_snapshot(client.client_id, session.dataset,
                                                            session.parent):
            self.abort(session, store)
            raise NeedsFullBackup(f"the base {session.dataset}@{session.parent} of this"
                                  " incremental was deleted meanwhile: send a full backup")

    def _forget(self, session: Session) -> None:
        """The upload ended (committed, aborted, expired): nothing of it stays in memory."""
        self.table.remove(session.upload_id)
        with self._lock:  # a request still holding the old lock finds the session gone
            self._session_locks.pop(session.upload_id, None)

    def abort_for_client(self, session: Session, store: Store) -> None:
        """The client's abort: refused (CommitUnderWay) while the upload commits, which waited
        for the commit, the whole of an S3 compose, and then did nothing (or the client, told
        nothing within its timeout, destroyed the snapshot the commit stored)."""
        if session.upload_id in self._committing:
            raise CommitUnderWay(f"upload {session.upload_id} is committing: it cannot be"
                                 " aborted now (its state says how the commit ends)")
        self.abort(session, store)

    def abort(self, session: Session, store: Store) -> None:
        """Discard an upload and everything staged for it, once a part being staged for it
        has landed (removed under a part being staged, the staging stayed: 503, and the
        session stayed open until it expired, taking one of the client's uploads)."""
        turn = self._session_lock(session.upload_id)
        with turn:
            done = self._stored_already(store, session)  # a commit that reached the store
            if done is not None:  # only (the server stopped): the client gave it up
                store.delete(done)
            store.discard(session.upload_id)
            self._forget(session)
            turn.notify_all()  # a part waiting for its turn finds the upload gone at once
        self.quota.release(store, session)

    def expire(self, stores: Dict[str, Store], now: Optional[float] = None) -> List[str]:
        """Abort sessions idle longer than the expiry, and staged data with no session."""
        now = time.time() if now is None else now
        expired = []
        for store in stores.values():  # first: a commit it finishes is recorded below
            try:
                for line in store.sweep(self.expiry, now, self.table.exists):
                    log.warning("%s store: %s", store.kind, line)
            except Exception as exc:  # noqa: BLE001 (the next pass tries it again)
                log.warning("%s store: cleanup stopped: %s", store.kind, exc)
        activity: Dict[str, Dict[str, float]] = {}  # a shared store's, per upload
        for session in self.table.idle(now - self.expiry):
            store = stores.get(session.storage_type)
            if store is None:
                continue
            if store.shared:  # its parts may be arriving through another server
                if store.kind not in activity:
                    activity[store.kind] = dict(store.staged_uploads())
                if now - activity[store.kind].get(session.upload_id, 0.0) <= self.expiry:
                    self.table.touch(session.upload_id, now)
                    continue
            if self._expire(session.upload_id, lambda: self.settle(session, store)):
                expired.append(session.upload_id)
        for store in stores.values():
            for upload_id, stamp in store.staged_uploads():
                if now - stamp > self.expiry and not self.table.exists(upload_id) and \
                        self._expire(upload_id, lambda: store.discard(upload_id)) and \
                        upload_id not in expired:  # its staging, left by a recorded commit
                    expired.append(upload_id)
        return expired

    @staticmethod
    def _expire(upload_id: str, discard: Callable[[], None]) -> bool:
        """Discard one abandoned upload; one that fails is logged and the others go on."""
        try:
            discard()
        except Exception as exc:  # noqa: BLE001 (the next pass tries it again)
            log.warning("abandoned upload %s stays until the next cleanup: %s", upload_id, exc)
            return False
        log.info("expired abandoned upload %s", upload_id)
        return True


def _fits_the_store(store: Store, size: int, what: str) -> None:
    """Refuse (413) a stream larger than the store keeps as one object, before it is sent (at
    the open, from its estimate) or as it passes the limit (a part): S3's compose refused it
    at the commit, after terabytes, with a 500."""
    limit = store.max_object_size
    if limit is not None and size > limit:
        raise TooLargeForStore(f"{what} is {human(size)}, more than the {store.kind} store"
                               f" keeps as one object ({human(limit)})")


def _manifest(session: Session, store: Store, **sizes) -> Manifest:
    """The manifest of a session's backup, with the given sizes, sha256 and part count."""
    return Manifest(
        key=session.key, client_id=session.client_id, dataset=session.dataset,
        snapshot=session.snapshot, type=session.type, parent=session.parent,
        compression=session.compression, encryption=session.encryption,
        created=protocol.now_iso(),
        snapshot_time=session.snapshot_time, guid=session.guid,
        parent_guid=session.parent_guid, raw_send=session.raw_send,
        compressed_send=session.compressed_send, storage_type=store.kind,
        properties=session.properties, **sizes)
