"""Outcomes of uploads and verifications: recorded in the ledger, and pushed to NOTIFY_URL.

The webhook is a JSON POST per event, sent by one background thread (a slow receiver never
slows an upload; at most 100 events wait, later ones are dropped with a warning):

    {"event": "stale" | "recovered" | "upload_verification_failed" | "verify_failed",
     "client": "web1", "dataset": "tank/db", "message": "...", "text": "zfsmgr: ...",
     "time": "2026-12-01T08:00:00+00:00", "timestamp": 1795939200.0,
     "server": "<hostname>", "version": "<zfsmgr version>"}

`text` makes Slack- and Mattermost-style incoming webhooks show the event as it is; what a
client wrote in it (a verify report's message) is escaped (`&`, `<`, `>`), so it cannot ping a
channel (`<!channel>`) or show a link under another name. The URL is a secret (webhook URLs
carry tokens): it is never logged, only its host.

A client's events cannot crowd out the others': at most PER_CLIENT of the events one client's
requests cause (failed verifications) wait at once, and an event the same as one already
waiting (event, client, dataset and message) is not queued again. The server's own `stale`
and `recovered` are not capped: each is sent once per change, never again.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import sqlite3
import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import Callable, Optional, Set

from zfsmgr import __version__
from zfsmgr.errors import VerificationFailed
from zfsmgr.server.fleet import CRITICAL, OK, STALE, age_text
from zfsmgr.server.ledger import Ledger

log = logging.getLogger("zfsmgr.server.notify")
RETRY_DELAYS = (1.0, 5.0)
QUEUED = 100  # events waiting, in all
PER_CLIENT = 10  # of them, the events one client's requests caused, at most
CAUSED_BY_CLIENTS = ("verify_failed", "upload_verification_failed")  # the server's own stale
# and recovered events are never held back: one is sent per change of state, never again


def _escaped(text: str) -> str:
    """Text shown as it is by Slack-style `text` (its three control characters escaped)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Notifier:
    """Posts events to one webhook URL from a background thread (nothing without a URL)."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url, timeout
        self.host = urllib.parse.urlsplit(url).hostname if url else ""
        self._queue: "queue.Queue[Optional[dict]]" = queue.Queue(maxsize=QUEUED)
        self._thread: Optional[threading.Thread] = None
        self._guard = threading.Lock()
        self._waiting: Set[tuple] = set()  # (event, client, dataset, message) queued

    def send(self, event: str, client: str, dataset: str, message: str) -> None:
        """Queue one event (returns at once)."""
        if not self.url:
            return
        now = time.time()
        body = {"event": event, "client": client, "dataset": dataset, "message": message,
                "text": _escaped(f"zfsmgr: {client}:{dataset} {event.replace('_', ' ')}:"
                                 f" {message}"),
                "time": datetime.fromtimestamp(now, timezone.utc).replace(
                    microsecond=0).isoformat(),
                "timestamp": now, "server": socket.gethostname(), "version": __version__}
        alike = (event, client, dataset, message)
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
                self._thread.start()
            if alike in self._waiting:
                return  # the one waiting says it already
            if event in CAUSED_BY_CLIENTS and sum(
                    1 for waiting in self._waiting
                    if waiting[1] == client and waiting[0] in CAUSED_BY_CLIENTS) >= PER_CLIENT:
                log.warning("notifications: %d of %s's wait already; dropped its %s event for"
                            " %s", PER_CLIENT, client, event, dataset)
                return
            try:
                self._queue.put_nowait(body)
            except queue.Full:
                log.warning("notification queue full: dropped %s event for %s:%s", event,
                            client, dataset)
                return
            self._waiting.add(alike)

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until every queued event was sent or given up; True if it finished in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            try:
                self._post(body)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one event
                log.warning("webhook to %s: %s event not sent (%s)", self.host, body["event"],
                            type(exc).__name__)
            finally:
                with self._guard:
                    self._waiting.discard((body["event"], body["client"], body["dataset"],
                                           body["message"]))
                self._queue.task_done()

    def _post(self, body: dict) -> None:
        data = json.dumps(body).encode()
        for attempt, delay in enumerate((0.0,) + RETRY_DELAYS):
            time.sleep(delay)
            request = urllib.request.Request(self.url, data=data, method="POST", headers={
                "Content-Type": "application/json", "User-Agent": f"zfsmgr/{__version__}"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read(65536)
                log.info("notified %s: %s for %s:%s", self.host, body["event"], body["client"],
                         body["dataset"])
                return
            except (OSError, http.client.HTTPException) as exc:  # a garbled answer too
                why = f"HTTP {exc.code}" if isinstance(exc, urllib.error.HTTPError) \
                    else type(exc).__name__
                level = logging.WARNING if attempt == len(RETRY_DELAYS) else logging.INFO
                log.log(level, "webhook to %s failed (%s), attempt %d of %d", self.host, why,
                        attempt + 1, len(RETRY_DELAYS) + 1)


class Outcomes:
    """What the server records and announces when an upload or a verification ends."""

    def __init__(self, ledger: Ledger, notifier: Notifier,
                 known: Callable[[str, str], bool] = lambda client_id, dataset: True):
        self.ledger, self.notifier = ledger, notifier
        # whether the client has a backup of the dataset: only such datasets get a row of
        # events (the status page shows no other), else any name a client opens and aborts
        # would add one, for ever
        self.known = known

    def _dataset(self, client_id: str, dataset: str) -> str:
        try:  # bookkeeping: a catalog error here must not replace the request's own answer
            return dataset if dataset and self.known(client_id, dataset) else ""
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not look up %s:%s in the catalog: %s", client_id, dataset, exc)
            return ""

    def _safely(self, what: str, action, *args) -> None:
        try:
            action(*args)
        except (OSError, sqlite3.Error) as exc:  # bookkeeping: never fail a backup over it
            log.warning("could not record %s in the ledger: %s", what, exc)

    def committed(self, client_id: str, dataset: str, stored_bytes: int) -> None:
        """An upload became a visible backup."""
        self._safely("a commit", self.ledger.record_upload, client_id, dataset, "committed",
                     stored_bytes)

    def failed(self, client_id: str, dataset: str, error: Exception) -> None:
        """An upload was refused or failed; a failed verification is also announced."""
        self._safely("a failed upload", self.ledger.record_upload, client_id,
                     self._dataset(client_id, dataset), "failed", 0, str(error))
        if isinstance(error, VerificationFailed):
            self.notifier.send("upload_verification_failed", client_id, dataset, str(error))

    def aborted(self, client_id: str, dataset: str) -> None:
        """The client gave an upload up (its send failed or it was interrupted)."""
        self._safely("an aborted upload", self.ledger.record_upload, client_id,
                     self._dataset(client_id, dataset), "aborted", 0,
                     "the client aborted the upload")

    def verified(self, client_id: str, dataset: str, ok: bool, message: str) -> None:
        """A restore tool reported a verification of a dataset's backups."""
        self._safely("a verification", self.ledger.record_verify, client_id, dataset, ok,
                     message)
        if not ok:
            self.notifier.send("verify_failed", client_id, dataset, message)


def watch(ctx, stop: threading.Event) -> None:
    """Every STALE_CHECK_INTERVAL, announce the datasets that went stale or fresh again."""
    from zfsmgr.server.fleet import fleet

    while not stop.wait(ctx.settings.stale_check_interval):
        try:
            stale_pass(fleet(ctx), ctx.ledger, ctx.notifier, time.time())
        except Exception as exc:  # keep serving; say why the pass failed
            log.warning("looking for stale datasets failed: %s", exc)


def stale_pass(rows, ledger: Ledger, notifier: Notifier, now: float) -> int:
    """Announce datasets that went stale (or fresh again) since the last pass; return how many
    events were sent. Disabled clients and clients that never backed up are not announced."""
    sent = 0
    for row in rows:
        state = row.state(now)
        if state not in (OK, STALE, CRITICAL):
            continue
        stale = state != OK
        if ledger.mark_stale(row.client_id, row.dataset, stale):
            age = row.age(now) or 0.0
            if stale:
                notifier.send("stale", row.client_id, row.dataset,
                              f"newest backup is {age_text(age)} old (stale after"
                              f" {age_text(row.warn)})")
            else:
                notifier.send("recovered", row.client_id, row.dataset,
                              f"newest backup is {age_text(age)} old")
            sent += 1
    return sent
