"""Sending one snapshot: stream `zfs send` → compress → server in parts, commit.

Memory stays bounded: the stream passes in 1 MiB chunks, parts go out with chunked transfer.
A dropped connection or a restarted server is retried with backoff; the deterministic stream is
regenerated and the parts the server already holds are skipped after checking their CRC-32.
Every part's answer carries the CRC-32 of what the server took, checked here; the commit sends
the parts' combined checksum, which the server checks, and the sha256 of the whole stream
(hashed here while sending), which restore checks. When the server's `local`
store kept a resumable receive, the rest of the stream is `zfs send -t <token>` instead.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from zfsmgr import protocol
from zfsmgr.client.base import Base
from zfsmgr.client.interrupts import Held
from zfsmgr.client.readahead import Counter, ReadAhead, chain, take
from zfsmgr.compress import LEVELS, compressor, zstd_available
from zfsmgr.crypt import Encryption, age_binary
from zfsmgr.files import CHUNK
from zfsmgr.errors import ServerError, ServerUnreachable, StreamChanged, ZfsmgrError
from zfsmgr.progress import Progress, human
from zfsmgr.remote import ServerClient
from zfsmgr.runner import StreamingCommand
from zfsmgr.storage.base import crc32_hex
from zfsmgr.zfs import Features, Snapshot, Zfs

log = logging.getLogger("zfsmgr.client")
RETRY_DELAYS = (1, 2, 4, 8, 15, 30, 30, 60, 60, 120, 120)  # ~7.5 minutes in all
COMMIT_PATIENCE = 6 * 3600  # seconds a commit the server says is under way is waited for
COMMIT_POLLS = (2, 5, 10, 30, 60)  # seconds between the looks at it, then 60 each


@dataclass
class Sent:
    """One stream sent as parts: what commit declares."""

    raw_size: int
    stored_size: int
    sha256: str
    parts_crc32: str

    def commit_request(self) -> dict:
        return {"sha256": self.sha256, "parts_crc32": self.parts_crc32,
                "raw_size": self.raw_size, "stored_size": self.stored_size}


@dataclass
class Result:
    """What one backup did."""

    key: str
    type: str
    raw_size: int
    stored_size: int
    seconds: float
    snapshot: str

    def as_dict(self) -> dict:
        return {"key": self.key, "type": self.type, "raw_size": self.raw_size,
                "stored_size": self.stored_size, "seconds": round(self.seconds, 3),
                "snapshot": self.snapshot}


class Uploader:
    """Sends snapshots of one dataset to the server (`send_properties`: `zfs send -p`;
    `properties`: the property record of a stream sent without them, zfsmgr/properties.py)."""

    records_properties = False  # this dataset's streams go without -p, with a record
    commit_pending = ""  # an upload the server was committing when this run stopped waiting
    properties: Optional[dict] = None
    _early: Optional[Tuple[tuple, StreamingCommand]] = None  # a send started ahead: start_early

    def __init__(self, api: ServerClient, zfs: Zfs, dataset: str, compression: str, level: int,
                 storage_type: str = "", progress: Optional[Callable[..., Progress]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 encryption: Encryption = Encryption(), send_properties: bool = True):
        self.api, self.zfs, self.dataset = api, zfs, protocol.validate_dataset(dataset)
        self.compression, self.level, self.storage_type = compression, level, storage_type
        self.encryption = encryption
        self.make_progress = progress or (lambda label, total: Progress(label, total))
        self.sleep, self.send_properties = sleep, send_properties
        self._commit_deadlines: Dict[str, float] = {}  # upload id: when waiting for it ends

    def server_backups(self) -> List[dict]:
        """The server's manifests for this dataset."""
        return self.api.call("GET", protocol.SNAPSHOTS, query={"dataset": self.dataset})[
            "snapshots"]

    def _compressed(self, features: Features) -> bool:
        """Send blocks as the pool stores them (-c) when it compresses: no double work
        (`self.compression_property`: the dataset's `compression`, when already listed)."""
        if not hasattr(self, "_use_c"):
            known = getattr(self, "compression_property", None)
            self._use_c = features.compressed_send and not features.raw_send and (
                known or self.zfs.get(self.dataset, "compression")) not in ("off", "-")
        return self._use_c

    def _request(self, snap: Snapshot, base: Optional[Base], features: Features,
                 codec: str) -> dict:
        estimate = None
        if features.send_estimate:
            estimate = self.zfs.estimate(snap.name, base.name if base else None,
                                         raw=features.raw_send,
                                         compressed=self._compressed(features),
                                         properties=self.send_properties)
        if estimate is None and base is None:
            estimate = int(self.zfs.get(snap.name, "referenced"))
        return {"dataset": self.dataset, "snapshot": snap.short,
                "type": "incremental" if base else "full",
                "parent": base.snapshot if base else None, "compression": codec,
                "guid": snap.guid, "parent_guid": base.guid if base else "",
                "raw_send": features.raw_send, "compressed_send": self._compressed(features),
                "snapshot_time": snap.creation, "estimated_size": estimate or 0,
                "storage_type": self.storage_type,
                "encryption": self._sealing(features).label, "properties": self.properties,
                "supersede": True}  # this run holds the dataset's lock: older uploads are dead

    def _send_args(self, snap: Snapshot, base: Optional[Base], features: Features) -> tuple:
        return (snap.name, base.name if base else None, features.raw_send,
                self._compressed(features), self.send_properties)

    def start_early(self, snap: Snapshot, base: Optional[Base], features: Features) -> None:
        """Start the `zfs send` of an upload that has not opened yet, so that its stream is
        flowing when it does (a run starts the next dataset's send while the last part and
        the commit of the one before are under way). The upload takes it if it sends that
        same stream; whatever is not taken is killed when the upload ends (drop_early)."""
        self.drop_early()
        args = self._send_args(snap, base, features)
        self._early = (args, self._spawn_send(args))

    def drop_early(self) -> None:
        """Kill a send started ahead that no upload took."""
        early, self._early = self._early, None
        if early is not None:
            early[1].kill()

    def _start_send(self, snap: Snapshot, base: Optional[Base],
                    features: Features) -> StreamingCommand:
        args = self._send_args(snap, base, features)
        early, self._early = self._early, None
        if early is not None:
            if early[0] == args:
                return early[1]
            early[1].kill()  # the base changed since (a full backup was required)
        return self._spawn_send(args)

    def _spawn_send(self, args: tuple) -> StreamingCommand:
        name, base, raw, compressed, properties = args
        return self.zfs.send(name, base, raw=raw, compressed=compressed, properties=properties)

    def _sealing(self, features: Features) -> Encryption:
        """ENCRYPT, except for a raw send: that is ciphertext already, never wrapped twice."""
        return Encryption() if features.raw_send else self.encryption

    def _upload(self, snap: Snapshot, base: Optional[Base], features: Features,
                fallback: bool = False, at_end: Optional[Callable[[], None]] = None) -> Result:
        """Send `snap` from `base` and commit it (`at_end`: called once the stream is read to
        its end, while its last part and the commit are still to come)."""
        try:
            return self._send_and_commit(snap, base, features, fallback, at_end)
        finally:
            self.drop_early()

    def _send_and_commit(self, snap: Snapshot, base: Optional[Base], features: Features,
                         fallback: bool, at_end: Optional[Callable[[], None]]) -> Result:
        # ciphertext won't shrink, and -c blocks are compressed already
        codec = "none" if features.raw_send or self._compressed(features) else self.compression
        if codec == "zstd" and not zstd_available():
            log.warning("COMPRESS=zstd but this host has no zstd binary: using gzip")
            codec = "gzip"  # at most its own highest level (COMPRESS_LEVEL was zstd's)
        if self._sealing(features).label:
            age_binary()  # missing: a one-line error before any upload opens
        request = self._request(snap, base, features, codec)
        try:
            session = self._open(request)
        except ServerError as exc:
            if not (base and fallback and exc.payload.get(protocol.FULL_BACKUP_REQUIRED)):
                raise
            log.warning("%s; sending a full backup", exc.server_message)
            request = self._request(snap, None, features, codec)
            session = self._open(request)
            base = None
        started = time.monotonic()
        attempt, restarted = 0, False
        try:  # whatever ends this (an error, Ctrl-C or SIGTERM, even mid-wait): abort
            while True:
                try:
                    state = {"parts": []} if attempt == 0 else self._state(session)
                    if state["parts"] and self._sealing(features).label:
                        # age seals with a fresh key each run: held parts never match again
                        log.info("an encrypted upload cannot skip what the server holds:"
                                 " starting it again")
                        self._abort(session)
                        session, state = self._open(request), {"parts": []}
                    if state.get("resume_token") or state.get("segment"):
                        sent = self._resume(state, features, codec, session,
                                            request["estimated_size"])
                    else:
                        sent = self._stream(self._start_send(snap, base, features),
                                            f"backup {snap.name}", codec, session,
                                            state["parts"], 0, request["estimated_size"],
                                            self._sealing(features), at_end)
                    manifest = self.api.call(
                        "POST", protocol.UPLOAD_COMMIT.format(upload_id=session["upload_id"]),
                        sent.commit_request())["manifest"]
                    return Result(manifest["key"], manifest["type"], sent.raw_size,
                                  sent.stored_size, time.monotonic() - started, snap.name)
                except StreamChanged as exc:
                    if restarted:
                        raise
                    log.warning("%s: starting the upload again", exc)
                    self._abort(session)
                    session, attempt, restarted = self._open(request), 0, True
                except (ServerUnreachable, ServerError) as exc:
                    if attempt and isinstance(exc, ServerError) and exc.status == 404:
                        done = self._committed(snap)  # a commit whose answer was lost
                        if done is not None:
                            return Result(done["key"], done["type"], done["raw_size"],
                                          done["stored_size"], time.monotonic() - started,
                                          snap.name)
                    if not _worth_retrying(exc) or attempt >= len(RETRY_DELAYS):
                        raise
                    delay = RETRY_DELAYS[attempt]
                    attempt += 1
                    log.warning("%s; retry %d in %ds", exc, attempt, delay)
                    self.sleep(delay)
        except BaseException:
            self._abort(session)
            raise

    def _state(self, session: dict) -> dict:
        """What the server holds of the upload, once no commit of it is under way there. A
        commit that outlasts REQUEST_TIMEOUT (an S3 compose of terabytes takes many minutes) is
        waited for, up to COMMIT_PATIENCE, while the server says it is committing: retried as a
        lost answer, it used up the retries and the run destroyed a snapshot the server went
        on to store. A commit that failed meanwhile is that commit's error (ServerError), as
        if it had been answered."""
        path = protocol.UPLOAD_SESSION.format(upload_id=session["upload_id"])
        deadline = self._commit_deadlines.setdefault(  # the same after a look that failed
            session["upload_id"], time.monotonic() + COMMIT_PATIENCE)  # and was retried
        polls = 0
        while True:
            state = self.api.call("GET", path)
            failed = state.get("commit_failed")
            if isinstance(failed, dict):  # what the commit would have answered: its error
                raise ServerError(int(failed.get("status") or 500),
                                  str(failed.get("message") or "the commit failed"))
            if not state.get("committing"):
                return state
            if time.monotonic() > deadline:
                raise ZfsmgrError(f"the server is still committing upload {session['upload_id']}"
                                  f" of {self.dataset} after {COMMIT_PATIENCE / 3600:g} h: no"
                                  " longer waiting for it")
            if polls == 0:
                log.info("the server is still committing upload %s of %s (for %s s): waiting"
                         " for it", session["upload_id"], self.dataset,
                         state.get("committing_for", "?"))
            self.sleep(COMMIT_POLLS[min(polls, len(COMMIT_POLLS) - 1)])
            polls += 1

    def _committed(self, snap: Snapshot) -> Optional[dict]:
        """The server's manifest of this very snapshot, if a commit made it already."""
        for manifest in self.server_backups():
            if manifest["snapshot"] == snap.short and manifest.get("guid") in ("", snap.guid):
                log.info("the server committed %s before its answer was lost", snap.name)
                return manifest
        return None

    def _open(self, request: dict) -> dict:
        """POST /upload with interrupts held until its answer is in (client/interrupts.py),
        so that an interrupted run still aborts the session it opened (both within the
        held interrupt's patience)."""
        with Held() as held:
            session = self.api.call("POST", protocol.UPLOAD, request)
            if held.signum:
                self._abort(session)
        if held.signum:
            raise KeyboardInterrupt
        return session

    def _abort(self, session: dict) -> None:
        """Discard the upload on the server; one it is committing stays (commit_pending: its
        snapshot too, for the next run to adopt once committed, or remove)."""
        try:
            self.api.call("POST", protocol.UPLOAD_ABORT.format(upload_id=session["upload_id"]))
        except ZfsmgrError as exc:
            if isinstance(exc, ServerError) and exc.payload.get("committing"):
                self.commit_pending = session["upload_id"]
                log.warning("upload %s of %s is committing on the server: its snapshot stays"
                            " for the next run, which keeps it as the base once the server"
                            " lists its backup", session["upload_id"], self.dataset)
                return
            log.info("could not abort upload %s: %s", session["upload_id"], exc)

    def _resume(self, state: dict, features: Features, codec: str, session: dict,
                estimate: int) -> Sent:
        """The server's receive was interrupted and kept its state: continue it with
        `zfs send -t`, or start the upload again where this host's zfs cannot."""
        if not features.resumable_recv:
            raise StreamChanged("the server holds a partial receive, but this host's zfs has"
                                " no send -t")
        if state.get("resume_token"):  # a new segment from where zfs stopped
            token, first, held = state["resume_token"], len(state["parts"]), []
            self.api.call("POST",
                          protocol.UPLOAD_RESUME.format(upload_id=session["upload_id"]),
                          {"token": token, "from_part": first})
            log.info("resuming the server's receive with zfs send -t")
        else:  # the resumed stream is still being received: send it again, skip what it has
            token, first = state["resumed_with"], state["segment"]
            held = state["parts"][first:]
            log.info("sending the resumed stream again from part %d", first)
        done = self.zfs.resumed_bytes(token)
        log.info("the server's receive already has %s", human(done))
        sent = self._stream(
            self.zfs.send_resume(token), f"backup {self.dataset} (resumed)", codec, session,
            held, first, max(0, estimate - done))
        sent.raw_size += done
        return sent

    def _stream(self, send, label, codec, session, held, first, estimate,
                sealing: Encryption = Encryption(),
                at_end: Optional[Callable[[], None]] = None) -> Sent:
        """Send the stream of `send` once as parts from `first` on, skipping (and checking)
        the parts the server holds."""
        total, crcs = hashlib.sha256(), []
        progress = self.make_progress(label, estimate or None)
        with send:
            counted = Counter(send)
            level = min(self.level, LEVELS[codec][1]) if codec in LEVELS else self.level
            with compressor(codec, counted, level=level) as compressed, \
                    sealing.seal(compressed) as sealed:  # age, or as it is
                stream = ReadAhead(sealed)
                try:
                    stored = self._send_parts(stream, session, held, first, total, crcs,
                                              counted, progress, at_end)
                finally:
                    stream.close()
        progress.finish()
        return Sent(counted.count, stored, total.hexdigest(), protocol.parts_checksum(crcs))

    def _send_parts(self, stream, session, held, first, total, crcs, counted, progress,
                    at_end: Optional[Callable[[], None]] = None):
        """Upload the stream as parts `first`, first+1, ..., skipping (after checking) the
        parts the server holds; the sha256 of the stream goes into `total`, the CRC-32 of each
        part into `crcs`.

        Two parts are in flight: part n+1 is sent while the server stores part n. Each answer
        must confirm the size and CRC-32 of what was sent.
        """
        index, stored, pending, sizes = first, 0, None, []

        def check(number: int, answer, size: int, crc: int) -> None:
            reply, mine = answer(), crc32_hex(crc)
            if (reply.get("size"), reply.get("crc32")) != (size, mine):
                # the server holds it and the next one: the upload starts again (once)
                raise StreamChanged(f"part {number} arrived damaged (the server took"
                                    f" {reply.get('size')} bytes with CRC-32"
                                    f" {reply.get('crc32')}; sent were {size} with {mine})")
            sizes.append(size)
            crcs.append(mine)

        while True:
            size = protocol.part_size(index, session["part_size"],
                                      session["part_growth_every"])
            if index - first < len(held):
                have = held[index - first]
                crc, size_seen = 0, 0
                for chunk in take(stream, have["size"]):
                    crc = zlib.crc32(chunk, crc)
                    total.update(chunk)
                    size_seen += len(chunk)
                stored += size_seen
                if crc32_hex(crc) != have["crc32"] or size_seen != have["size"]:
                    raise StreamChanged(f"part {index} regenerated differently")
                crcs.append(have["crc32"])
            else:
                head = stream.read(min(CHUNK, size))
                if not head:
                    if at_end is not None:
                        at_end()
                    break
                sent = [0, 0]  # bytes, CRC-32

                def body(head=head, size=size, sent=sent) -> Iterator[bytes]:
                    for chunk in chain(head, take(stream, size - len(head))):
                        total.update(chunk)
                        sent[0] += len(chunk)
                        sent[1] = zlib.crc32(chunk, sent[1])
                        progress.update(counted.count)
                        yield chunk

                answer = self.api.send_part(session["upload_id"], index, body(), first)
                if pending is not None:
                    check(*pending)
                pending = (index, answer, sent[0], sent[1])
            index += 1
            progress.update(counted.count)
        if pending is not None:
            check(*pending)
        return stored + sum(sizes)


def _worth_retrying(exc: ZfsmgrError) -> bool:
    """A dropped connection, server trouble, a busy server, or parts out of step with the
    server (a 409 naming the parts it holds: the retry asks for them and goes on from there)."""
    if isinstance(exc, ServerUnreachable):
        return True
    return isinstance(exc, ServerError) and (
        exc.transient or (exc.status == 409 and "parts_held" in exc.payload))


def summary(result: Result) -> str:
    """The one line cron mails."""
    rate = result.raw_size / max(result.seconds, 1e-6)
    return (f"backup {result.snapshot}: {result.type}, {human(result.raw_size)} sent as"
            f" {human(result.stored_size)} in {result.seconds:.1f}s ({human(rate)}/s)"
            f" -> {result.key}")
