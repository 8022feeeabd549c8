"""The gate: what waitress checks once a request's headers are in, before it reads the body.

Waitress reads (and past 512 KiB spools to disk) a whole request body before the application
runs, so refusing a body in the application is too late. The gate runs on waitress's request
parser as soon as the headers have arrived and refuses, with a JSON error and the connection
closed, before a byte of the body is stored:
- a client that fails authentication (401/403);
- a client that already has its share of request bodies arriving (429, `Retry-After`);
- a body on a route that takes none, a JSON body over protocol.MAX_JSON_BODY, a part larger
  than its session's schedule allows, a part of an upload that is not the client's (404).
A body that grows past its limit while chunked is cut off at the limit (413). So the disk one
client can fill with spooled bodies is at most its share times its part size. The share of
worker threads is counted apart (`Shares`, taken by the application while it works on a request
and given back before the answer is written, so a client that sends its next request as soon as
it has an answer never finds its own last request still counted).

Errors of waitress's own parser (bad framing, oversized headers) are answered as JSON too. A
spool that runs out of space (the temporary directory, TMPDIR, is full) stops storing the body
but reads it to its end and answers 507, instead of waitress dropping the connection.
This hooks waitress's HTTPChannel/HTTPRequestParser (waitress 3.0, vendored and pinned).
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import re
import tempfile
import threading
import time
import urllib.parse
from typing import Dict, Optional, Tuple

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import Error

from zfsmgr import protocol
from zfsmgr.errors import TooBusy, ZfsmgrError

log = logging.getLogger("zfsmgr.server")
_PART = re.compile(r"/upload-stream/([^/]+)/([0-9]{1,6})")
_JSON_ROUTES = (re.compile(r"/upload"), re.compile(r"/rotate"), re.compile(r"/verify-report"),
                re.compile(r"/checkin"),
                re.compile(r"/upload-stream/[^/]+/(commit|resume)"))
# routes without a client's key: their own token (metrics), the admin's (status page), none
_OPEN = (protocol.HEALTH, protocol.METRICS, protocol.STATUS_PAGE)


class Shares:
    """How many requests each client has in one stage of the server, at most `limit` each."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self._lock = threading.Lock()
        self._count: Dict[str, int] = {}

    def take(self, client_id: str) -> None:
        """Count one more request of the client, or raise TooBusy."""
        with self._lock:
            count = self._count.get(client_id, 0)
            if count >= self.limit:
                raise TooBusy(f"client {client_id} has {count} {self.what} in progress, the"
                              " most it may have at once: retry shortly")
            self._count[client_id] = count + 1

    def give(self, client_id: str) -> None:
        """One request of the client left this stage."""
        with self._lock:
            left = self._count.get(client_id, 0) - 1
            if left > 0:
                self._count[client_id] = left
            else:
                self._count.pop(client_id, None)


class Refusal(Error):
    """A waitress error answered as the API's JSON error."""

    def __init__(self, code: int, message: str, headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code, self.reason = code, http.client.responses.get(code, "Error")
        self.headers = list(headers)

    def to_response(self, ident=None):
        body = json.dumps(protocol.error(self.body)).encode()
        return (f"{self.code} {self.reason}",
                [("Content-Type", "application/json"), *self.headers], body)


class _Spool:
    """Waitress's buffer of a request body arriving, except that a full disk ends the
    writing, not the request: the rest of the body is read and dropped (so the client, still
    sending, hears the answer), the spooled part given back at once."""

    full: Optional[OSError] = None

    def __init__(self, buffer):
        self._buffer = buffer

    def append(self, data: bytes) -> None:
        if self.full is not None:
            return
        try:
            self._buffer.append(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.full = exc
            self._buffer.close()  # the temporary file goes, and its room with it

    def __len__(self) -> int:
        return len(self._buffer)

    def __getattr__(self, name):
        return getattr(self._buffer, name)


class _Limits:
    """A stand-in for waitress's Adjustments with one request's own body limit."""

    def __init__(self, adj, max_body: int):
        self._adj, self.max_request_body_size = adj, max_body

    def __getattr__(self, name):
        return getattr(self._adj, name)


class Gate:
    """Decides on a request from its method, path and headers; counts each client's bodies
    from the moment they pass until they have arrived (or their connection closed)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.receiving = Shares(ctx.client_max_requests, "request bodies arriving")

    def admit(self, method: str, path: str, query: str, headers: Dict[str, str],
              chunked: bool = False) -> Tuple[Optional[str], Optional[int], Optional[Refusal]]:
        """(client id whose body is counted, body limit, refusal): a refusal ends the request
        at once. `chunked`: the parser's own verdict (waitress takes Transfer-Encoding out of
        the headers it hands on)."""
        chunked = chunked or headers.get("TRANSFER_ENCODING", "").lower().endswith("chunked")
        try:
            length = int(headers.get("CONTENT_LENGTH", "0") or 0)
        except ValueError:
            length = 0  # waitress refuses it itself
        limit = self._body_limit(method, path)
        if limit == 0 and (length or chunked):
            return None, None, Refusal(413, f"{method} {path} takes no request body")
        if path in _OPEN:
            return None, limit, None
        client_id = headers.get("X_CLIENT_ID")
        key = headers.get("X_API_KEY")
        if client_id is None and path == protocol.ROTATION_POLICY:
            args = urllib.parse.parse_qs(query)
            client_id = (args.get("client_id") or [None])[0]
            key = (args.get("api_key") or [None])[0]
        try:
            client = self.ctx.clients.authenticate(client_id, key, write=False)  # app: 403s
        except ZfsmgrError as exc:
            return None, None, Refusal(exc.http_status, str(exc))
        part = _PART.fullmatch(path)
        if part and method == "POST":
            limit = self._part_limit(client.client_id, part.group(1), int(part.group(2)))
            if isinstance(limit, Refusal):
                return None, None, limit
        if limit and length > limit:
            return None, None, Refusal(413, f"request body of {length} bytes: at most {limit}"
                                            f" on {path}")
        if not (length or chunked):
            return None, limit, None
        try:
            self.receiving.take(client.client_id)
        except TooBusy as exc:
            return None, None, Refusal(429, str(exc), (("Retry-After", "1"),))
        return client.client_id, limit, None

    def _body_limit(self, method: str, path: str) -> int:
        """The largest body a route takes (0: none; parts are checked against their session)."""
        if method != "POST":
            return 0
        if any(r.fullmatch(path) for r in _JSON_ROUTES):
            return protocol.MAX_JSON_BODY
        if _PART.fullmatch(path):
            return protocol.MAX_PART_SIZE
        return 0

    def _part_limit(self, client_id: str, upload_id: str, index: int):
        """The part's limit from this server's own table of sessions; storage is never asked
        here (this is waitress's one network thread). An id it does not hold passes with the
        largest part size only where another server may have opened it in a shared store (the
        worker thread adopts it, or answers 404); elsewhere it is refused (404) at once."""
        try:
            session = self.ctx.uploads.held(client_id, upload_id)
        except ZfsmgrError as exc:
            return Refusal(exc.http_status, str(exc))
        if session is not None:
            return protocol.part_size(index, session.part_base, session.part_every)
        if self.ctx.may_adopt(client_id):
            return protocol.MAX_PART_SIZE
        return Refusal(404, f"no open upload {upload_id}")


def channel_class(gate: Gate, base=HTTPChannel):
    """A waitress channel class (derived from `base`: plain or TLS) whose requests pass `gate`
    before their bodies are read."""

    class GatedParser(HTTPRequestParser):
        counted: Optional[str] = None

        def __init__(self, adj):
            super().__init__(adj)
            self.began = time.time()  # its first bytes came (connections.py times headers)

        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            client_id, limit, refusal = gate.admit(self.command, self.path, self.query,
                                                   self.headers, bool(self.chunked))
            self.counted = client_id
            if refusal is not None:
                log.info("%s %s %d refused before the body: %s", self.command, self.path,
                         refusal.code, refusal.body)
                self.error, self.completed, self.body_rcv = refusal, True, None
                self.content_length, self.expect_continue = 0, False  # no "100 Continue"
            elif limit:  # chunked: the framing counts too, ~10 bytes per chunk
                self.adj = _Limits(self.adj, limit + limit // 64 + (64 << 10))
            if self.body_rcv is not None:
                self.body_rcv.buf = _Spool(self.body_rcv.buf)

        def received(self, data):
            consumed = super().received(data)
            spool = getattr(self.body_rcv, "buf", None)
            if self.completed and self.error is None and getattr(spool, "full", None):
                log.error("%s %s: 507, the request body could not be spooled: %s is full (%s)",
                          self.command, self.path, tempfile.gettempdir(), spool.full.strerror)
                self.error = Refusal(507, "the server has no room for request bodies now (its"
                                          " temporary directory is full): retry later")
            if self.error is not None and not isinstance(self.error, Refusal):
                self.error = Refusal(self.error.code, f"{self.error.reason}: {self.error.body}")
            if self.completed:
                self.uncount()
            return consumed

        def uncount(self):
            if self.counted is not None:
                gate.receiving.give(self.counted)
                self.counted = None

        def close(self):
            super().close()
            self.uncount()

    class GatedChannel(base):
        parser_class = GatedParser
        served = False  # a request's headers came in full (connections.py)

        def received(self, data):
            done = super().received(data)
            if self.requests or (self.request is not None and self.request.headers_finished):
                self.served = True
            return done

        def handle_close(self):
            self.released()
            super().handle_close()

        def released(self):
            """Give back the count of a body cut off mid-way (waitress never closes it);
            TLSChannel calls this on the closes that bypass handle_close."""
            request = self.request
            if request is not None and hasattr(request, "uncount"):
                request.uncount()
            getattr(super(), "released", lambda: None)()

    return GatedChannel
