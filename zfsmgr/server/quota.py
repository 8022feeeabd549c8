"""A client's quota, counted over its committed backups and its open uploads.

What an open upload holds is reserved in the session's row (`SessionTable.reserve`) as its
parts are admitted, so one transaction over the client's rows checks a part. In a store that
several servers share, what the uploads open through the other servers hold is in the store
(`Store.reserve`/`reservations`, one listing of that client's prefix), so it counts too; the
check and the reservation of a part are not one step across servers, so two servers racing may
both admit a part, and the commit (under the client's lease, which counts committed bytes
only) is the hard limit. A reservation left by a server that died stops counting at the upload
expiry.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Optional

from zfsmgr.errors import QuotaExceeded, StorageError
from zfsmgr.progress import human
from zfsmgr.server.clients import ClientConfig
from zfsmgr.server.rotation import FREES_SPACE
from zfsmgr.server.sessions import Session, SessionTable
from zfsmgr.storage.base import Store

log = logging.getLogger("zfsmgr.server.uploads")

VERSION_TRIES = 3  # countings outside the transaction before one inside it


class Quota:
    """The quota checks of one server's uploads."""

    def __init__(self, table: SessionTable, usage: Callable[[str], int], expiry: float,
                 version: Callable[[str], Hashable] = lambda client_id: None):
        self.table, self.expiry = table, expiry
        # how the quota is counted and room made; the server context plugs in its own.
        # `version`: what changes when a client's committed backups do (a cheap read)
        self.usage, self.version = usage, version
        self.make_room: Optional[Callable[[ClientConfig, int, Optional[str]], None]] = None

    def fit(self, client: ClientConfig, needed: int, parent_key: Optional[str],
            upload_id: str = "", staged: int = 0, store: Optional[Store] = None) -> None:
        """`check`, after the server's make_room (AUTO_ROTATE) had its chance to free
        space for what is in progress and needed; `parent_key` (the new backup's base) is
        never deleted for it. In a store shared by servers, the uploads open through the
        others count too (Store.reservations), and with `upload_id` this one's is recorded."""
        elsewhere = self._elsewhere(client, store, upload_id)
        if self.make_room is not None and client.max_size_bytes:
            others = self.table.reserved(client.client_id, besides=upload_id)
            self.make_room(client, others + elsewhere + staged + needed, parent_key)
        self.check(client, needed, upload_id, staged, elsewhere=elsewhere)
        if upload_id and store is not None and store.shared and client.max_size_bytes:
            store.reserve(client.client_id, upload_id, staged + needed)

    def _elsewhere(self, client: ClientConfig, store: Optional[Store], upload_id: str) -> int:
        """Bytes the client's uploads open through other servers hold in a shared store."""
        if store is None or not store.shared or not client.max_size_bytes:
            return 0
        mine = {s.upload_id for s in self.table.of_client(client.client_id)} | {upload_id}
        return sum(size for held, size in store.reservations(
            client.client_id, self.expiry).items() if held not in mine)

    def check(self, client: ClientConfig, needed: int, upload_id: str = "", staged: int = 0,
              others_count: bool = True, elsewhere: int = 0) -> None:
        """Raise QuotaExceeded unless `needed` more bytes fit; with `upload_id`, reserve them.

        Committed backups (as `usage` counts them) and what every other open upload of the
        client holds count, read in the transaction that records this upload's new
        reservation (`staged + needed`). Not `others_count`: the other uploads do not (a commit
        to a store shared by servers, each of which admitted parts seeing only its own)."""
        if not client.max_size_bytes:
            return
        # The usage may ask the store (`zfs get used` for the `local` store, seconds on a busy
        # pool): it is counted before the transaction, which holds every write of the server,
        # and taken only if the client's backups did not change meanwhile (else counted again;
        # after a few tries, inside the transaction after all).
        for attempt in range(VERSION_TRIES + 1):
            last = attempt == VERSION_TRIES
            seen = self.version(client.client_id)
            used = None if last else self.usage(client.client_id)
            with self.table.db.transaction():
                if used is None:
                    used = self.usage(client.client_id)
                elif self.version(client.client_id) != seen:
                    continue  # a commit or a deletion came in between: count again
                others = elsewhere + (self.table.reserved(client.client_id, besides=upload_id)
                                      if others_count else 0)
                if used + others + staged + needed > client.max_size_bytes:
                    raise QuotaExceeded(
                        f"quota exceeded for {client.client_id}: used {human(used)} + in"
                        f" progress {human(others + staged)} + needed {human(needed)} > quota"
                        f" {human(client.max_size_bytes)}; {FREES_SPACE}")
                if upload_id:
                    self.table.reserve(upload_id, staged + needed)
                return

    @staticmethod
    def release(store: Store, session: Session) -> None:
        """The upload ended: its reservation in a shared store goes."""
        if store.shared:  # best effort: a reservation left behind stops counting at expiry
            try:
                store.unreserve(session.client_id, session.upload_id)
            except StorageError as exc:
                log.warning("reservation of upload %s stays until it expires: %s",
                            session.upload_id, exc)
