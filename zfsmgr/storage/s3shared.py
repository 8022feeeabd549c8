"""One bucket, several servers: the S3 store's conditional writes, client leases, change markers
and quota reservations.

Servers sharing a bucket settle races on one client with a lease object per client, created
with `If-None-Match: *`, renewed while held, and taken over (once it has expired) or released
with `If-Match: <etag>`, so the bucket itself decides who holds it. Whether the service
enforces these preconditions is probed once (`probe_conditional`); where it does not, leases
are only local and the server must run alone. A change marker per client is rewritten after
every change to its manifests, so another server learns with one HEAD request whether its
cached rows of that client are stale.
Each open upload of a client with a quota keeps what it holds (staged, or being staged) in
`.zfsmgr-reserved/<client>/<upload id>`, so each server's quota check counts the parts staged
through the others, listing that one client's prefix; a reservation its server left behind (it
died) stops counting once older than the upload expiry, and is deleted then.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from zfsmgr.errors import PreconditionFailed  # noqa: F401 (imported from here)
from zfsmgr.storage.base import NotFound, StorageError

log = logging.getLogger("zfsmgr.storage.s3")

LEASES = ".zfsmgr-leases/"
CHANGES = ".zfsmgr-changes/"
RESERVED = ".zfsmgr-reserved/"
LEASE_SECONDS = 900.0  # a lease's life: renewed while held, so this is how soon a dead
# holder's lease is taken over
LEASE_WAIT = 120.0  # how long a request waits for another server's lease before a 503


def holder_name() -> str:
    """This server process, as named in the leases it holds."""
    return f"{socket.gethostname()}:{secrets.token_hex(4)}"


class Coordination:
    """Leases and change markers of one S3 store (`store` gives put/get/head/delete calls)."""

    def __init__(self, store):
        self.store = store
        self.holder = holder_name()
        self.conditional: Optional[bool] = None  # unknown until probed
        self._locks: Dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def probe_conditional(self) -> bool:
        """Whether the service refuses a second `If-None-Match: *` write (once per process)."""
        if self.conditional is not None:
            return self.conditional
        key = f"{LEASES}.probe-{secrets.token_hex(8)}"
        try:
            self.store.put_small(key, b"1", {"If-None-Match": "*"})
            try:
                self.store.put_small(key, b"2", {"If-None-Match": "*"})
                self.conditional = False
            except PreconditionFailed:
                self.conditional = True
        finally:
            self.store.delete_key(key)
        if self.conditional:
            log.info("S3 bucket %s enforces conditional writes: servers sharing it settle"
                     " each client's commits and rotations with a lease object",
                     self.store.bucket)
        else:
            log.warning("S3 bucket %s does not enforce conditional writes (If-None-Match):"
                        " run only ONE zfsmgr server on this bucket", self.store.bucket)
        return self.conditional

    def _local(self, client_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(client_id, threading.Lock())

    @contextmanager
    def lease(self, client_id: str) -> Iterator[None]:
        """Hold the client's lease: no other server commits or rotates for it meanwhile."""
        with self._local(client_id):  # one thread of this process asks the bucket
            if not self.probe_conditional():
                yield
                return
            held = _Renewal(self, client_id, self._acquire(client_id))
            try:
                yield
            finally:
                etag = held.stop()
                try:
                    self.store.delete_key(f"{LEASES}{client_id}", {"If-Match": f'"{etag}"'})
                except StorageError as exc:  # expired and taken over: the taker cleans up
                    log.warning("lease of %s was not released: %s", client_id, exc)

    def renew(self, client_id: str, etag: str) -> str:
        """Push the held lease's expiry LEASE_SECONDS ahead again; its new ETag."""
        body = json.dumps({"holder": self.holder, "until": time.time() + LEASE_SECONDS})
        return self.store.put_small(f"{LEASES}{client_id}", body.encode(),
                                    {"If-Match": f'"{etag}"'})

    def _acquire(self, client_id: str) -> str:
        key = f"{LEASES}{client_id}"
        deadline = time.monotonic() + LEASE_WAIT
        while True:
            body = json.dumps({"holder": self.holder,
                               "until": time.time() + LEASE_SECONDS}).encode()
            try:
                return self.store.put_small(key, body, {"If-None-Match": "*"})
            except PreconditionFailed:
                pass
            try:
                etag, data = self.store.get_small_etag(key)
                held = json.loads(data)
                # one of this process's own (a release that failed, a write whose answer was
                # lost and that was sent again): no thread of it holds the lease, since one at
                # a time asks (the local lock), so it is taken back, not waited out for 15 min
                mine = held.get("holder") == self.holder
                if mine or float(held.get("until", 0)) < time.time():  # or its holder died
                    log.warning("lease of %s %s: taking it over", client_id,
                                "left by this server" if mine else
                                f"held by {held.get('holder')} expired")
                    return self.store.put_small(key, body, {"If-Match": f'"{etag}"'})
            except NotFound:
                continue  # released meanwhile: try again at once
            except PreconditionFailed:
                pass  # another server took it over first
            except (ValueError, AttributeError):
                held = {}
            if time.monotonic() > deadline:
                raise StorageError(f"client {client_id} is busy on another server (lease held"
                                   f" by {held.get('holder', '?')}): try again later")
            time.sleep(random.uniform(0.02, 0.1))

    def marker(self, client_id: str) -> str:
        """The client's change marker as it is now ("none" before the first change)."""
        try:
            return self.store.head_etag(f"{CHANGES}{client_id}")
        except NotFound:
            return "none"

    def mark_changed(self, client_id: str) -> str:
        """Say that the client's manifests changed; returns the new marker."""
        return self.store.put_small(f"{CHANGES}{client_id}", json.dumps(
            {"by": self.holder, "at": time.time(), "n": secrets.token_hex(8)}).encode())

    def reserve(self, client_id: str, upload_id: str, amount: int) -> None:
        """Record what an upload holds against the client's quota."""
        self.store.put_small(f"{RESERVED}{client_id}/{upload_id}", json.dumps(
            {"bytes": amount, "by": self.holder}).encode())

    def reservations(self, client_id: str, max_age: float) -> Dict[str, int]:
        """{upload id: bytes} of the client's recorded reservations younger than `max_age`."""
        prefix, found = f"{RESERVED}{client_id}/", {}
        for name, stamp in self.store.listing(prefix):
            if time.time() - stamp > max_age:  # its upload was left to expire
                self.store.delete_key(name)
                continue
            try:
                found[name[len(prefix):]] = int(json.loads(self.store.get_small_etag(name)[1])
                                                ["bytes"])
            except NotFound:  # its upload ended meanwhile
                continue
            except (ValueError, KeyError, TypeError):
                log.warning("reservation %s is unreadable: not counted", name)
        return found

    def unreserve(self, client_id: str, upload_id: str) -> None:
        """Drop an upload's reservation (absent is fine)."""
        self.store.delete_key(f"{RESERVED}{client_id}/{upload_id}")


class _Renewal:
    """Keeps a held lease from expiring while its holder works (a compose of thousands of
    parts can outlast LEASE_SECONDS: then another server took the lease over, and rotated
    or committed for the client in the middle of it): renewed every third of its time."""

    def __init__(self, coordination: Coordination, client_id: str, etag: str):
        self.coordination, self.client_id, self.etag = coordination, client_id, etag
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{client_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                self.etag = self.coordination.renew(self.client_id, self.etag)
            except (PreconditionFailed, NotFound):
                log.error("lease of %s was taken over by another server while held",
                          self.client_id)
                return
            except StorageError as exc:  # tried again at the next third
                log.warning("lease of %s was not renewed: %s", self.client_id, exc)

    def stop(self) -> str:
        """Stop renewing; the lease's ETag as it is now."""
        self._stop.set()
        self._thread.join()
        return self.etag
