"""Talking to the backup server: JSON calls, streamed part uploads, ranged downloads.

Used by both `client` and `restore`. The raw API key travels only in a header.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import sys
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

from zfsmgr import protocol
from zfsmgr.errors import (AnswerTooLarge, ServerError, ServerUnreachable, SettingsError,
                           ZfsmgrError)
from zfsmgr.logformat import one_line

HANDSHAKE_TIMEOUT = 8.0  # seconds for connect + TLS handshake
MESSAGE_SHOWN = 300  # characters of a server's error message shown (the rest is the server's)
CALL_ATTEMPTS = 4  # of a request that changes nothing, while the server says it is busy
MAX_RETRY_WAIT = 10.0  # seconds between them at most, whatever Retry-After says
# what a proxy (nginx) answers when the zfsmgr server behind it is down or does not answer;
# zfsmgr itself never does
GATEWAY_DOWN = frozenset({502, 504})


_warned = set()


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Download:
    """An open download: read(n), headers, close(); abort() from another thread."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 sock: Optional[socket.socket] = None):
        self.conn, self.response = conn, response
        self.headers = response.headers
        self.status = response.status
        self._sock = sock  # http.client drops conn.sock once a response will close

    def read(self, size: int) -> bytes:
        return self.response.read(size)

    def abort(self) -> None:
        """Shut the connection down, from any thread: a read blocked on it (a codec's feeder
        thread, waiting on a stalled server) returns at once, where close() would not wake it.
        The socket's own shutdown, under TLS too: the session is being dropped anyway."""
        if self._sock is not None:
            shut_down(self._sock)

    def close(self) -> None:
        self.response.close()
        self.conn.close()


def shut_down(sock: socket.socket) -> None:
    """Shut a socket down from any thread (a read blocked on it returns): the socket's own
    shutdown, under TLS too, since the session is dropped anyway."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _framed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Chunked transfer encoding without copying each chunk (http.client's concatenates)."""
    for chunk in chunks:
        if chunk:
            yield b"%X\r\n" % len(chunk)
            yield chunk
            yield b"\r\n"
    yield b"0\r\n\r\n"


class ServerClient:
    """One server, one client identity."""

    def __init__(self, url: str, client_id: str, api_key: str, ca_file: str = "",
                 timeout: float = 120.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ZfsmgrError(f"SERVER_URL {protocol.redact_url(url)!r} is not an http(s) URL")
        self.url, self.scheme, self.host = url, parsed.scheme, parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.prefix = parsed.path.rstrip("/")
        self.client_id, self._key, self.timeout = client_id, api_key, timeout
        self.sleep = time.sleep  # between the attempts of `call` (tests replace it)
        self._context = None
        if self.scheme == "https":
            try:
                self._context = ssl.create_default_context(cafile=ca_file or None)
            except ssl.SSLError as exc:  # a file that holds no certificate (PEM)
                raise SettingsError(f"CA_FILE={ca_file} holds no certificate this host can"
                                    f" read (PEM): {exc.reason or exc}") from None
        elif not _is_loopback(self.host) and self.host not in _warned:
            _warned.add(self.host)
            sys.stderr.write(f"zfsmgr: warning: {url} is plain http: the API key and backups"
                             " travel unencrypted\n")

    def _connect(self) -> http.client.HTTPConnection:
        if self._context is not None:
            return self._tls_connect()
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _tls_connect(self) -> http.client.HTTPSConnection:
        """Connect and shake hands within HANDSHAKE_TIMEOUT: an https URL pointing at a plain
        http server (which waits for a request line that never comes) fails in seconds,
        saying so, instead of after the request timeout."""
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=HANDSHAKE_TIMEOUT,
                                           context=self._context)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise ZfsmgrError(f"cannot verify the certificate of {self.url}:"
                              f" {exc.verify_message} (set CA_FILE for a private CA)") from None
        except ssl.SSLError as exc:
            conn.close()
            if any(sign in str(exc) for sign in ("WRONG_VERSION_NUMBER", "wrong version",
                                                 "record layer", "http request")):
                raise SettingsError(f"SERVER_URL {self.url} is https, but the server answers"
                                    " plain http: use http:// (or put TLS in front of it)"
                                    ) from None
            raise ServerUnreachable(f"TLS with {self.url} failed: {exc}") from None
        except socket.timeout:
            conn.close()
            raise ServerUnreachable(f"{self.url}: no TLS handshake within"
                                    f" {HANDSHAKE_TIMEOUT:g}s; if the server is plain http,"
                                    " use http:// in SERVER_URL") from None
        except OSError as exc:
            conn.close()
            raise ServerUnreachable(f"cannot reach {self.url}: {exc or type(exc).__name__}") \
                from None
        conn.sock.settimeout(self.timeout)
        return conn

    def _headers(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        headers = {protocol.HEADER_CLIENT_ID: self.client_id, protocol.HEADER_API_KEY: self._key,
                   "User-Agent": "zfsmgr", "Accept": "application/json"}
        headers.update(extra or {})
        return headers

    def _send(self, method: str, path: str, body: Any = None,
              headers: Optional[Dict[str, str]] = None, chunked: bool = False,
              on_socket: Optional[Callable[[socket.socket], None]] = None):
        """(connection, response, socket); `on_socket` learns the socket once the request is
        sent, before the answer is waited for (a thread that must be able to cut it off)."""
        conn = self._connect()
        try:
            conn.request(method, self.prefix + path, body=body, headers=self._headers(headers),
                         encode_chunked=chunked)
            sock = conn.sock
            if on_socket is not None and sock is not None:
                on_socket(sock)
            return conn, conn.getresponse(), sock
        except (ValueError, UnicodeError):  # a header value http.client refuses (it quotes
            conn.close()  # the value, the key, in its message)
            raise ZfsmgrError("CLIENT_ID or API_KEY cannot be sent in an HTTP header: printable"
                              " ASCII only") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise ZfsmgrError(f"cannot verify the certificate of {self.url}:"
                                  f" {exc.verify_message} (set CA_FILE for a private CA)") from None
            raise ServerUnreachable(f"cannot reach {self.url}: {exc or type(exc).__name__}") \
                from None

    def _decode(self, response: http.client.HTTPResponse, what: str = "request") -> dict:
        """The JSON answer, read within `timeout` seconds in all (a server that drips it a
        byte at a time kept each read within the socket's timeout, and the client waiting)."""
        deadline, parts, size = time.monotonic() + self.timeout, [], 0
        while True:
            if time.monotonic() > deadline:
                raise ServerUnreachable(f"{self.url} took more than {self.timeout:g} s to"
                                        f" answer {what}")
            chunk = response.read1(65536)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > protocol.MAX_ANSWER:  # not a broken connection: the rest is unread
                raise AnswerTooLarge(f"the answer of {self.url} to {what} is larger than"
                                     f" {protocol.MAX_ANSWER >> 20} MiB, more than a client"
                                     " reads")
        raw = b"".join(parts)
        if response.length:  # read(n) returns short at EOF instead of raising IncompleteRead
            raise http.client.IncompleteRead(raw, response.length)
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            data = {"success": False, "message": raw[:200].decode("utf-8", "replace").strip()}
        if not isinstance(data, dict):
            data = {"success": False, "message": f"a malformed answer (JSON, but no object)"
                                                 f" from {self.url} to {what}"}
        message = one_line(str(data.get("message") or response.reason))
        if len(message) > MESSAGE_SHOWN:
            message = message[:MESSAGE_SHOWN] + "..."
        if response.status >= 400 or data.get("success") is not True:
            error = ServerError(response.status, message, data)
            wait = response.getheader("Retry-After") or ""
            error.retry_after = float(wait) if wait.isdigit() else None
            raise error
        return data

    def call(self, method: str, path: str, payload: Optional[dict] = None,
             query: Union[Dict[str, str], Sequence[Tuple[str, str]], None] = None) -> dict:
        """A JSON request; returns the decoded success body or raises ServerError
        (AnswerTooLarge past protocol.MAX_ANSWER). A request that changes nothing (a GET, a
        check-in) is asked again, CALL_ATTEMPTS times in all, while the server answers that
        it is busy or in trouble (429, 502, 503, 504), after its Retry-After or 1, 2, 4 s."""
        attempts = CALL_ATTEMPTS if method == "GET" or path == protocol.CHECKIN else 1
        for attempt in range(attempts):
            try:
                return self._call_once(method, path, payload, query)
            except ServerError as exc:
                if exc.status in GATEWAY_DOWN and attempt == attempts - 1:
                    raise ServerUnreachable(
                        f"{exc} (a proxy in front of the server at {self.url} cannot reach"
                        " it)") from None  # unreachable it is: exit 4, the cached policy
                if not exc.transient or attempt == attempts - 1:
                    raise
                wait = getattr(exc, "retry_after", None) or 2 ** attempt
            self.sleep(min(wait, MAX_RETRY_WAIT))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _call_once(self, method: str, path: str, payload: Optional[dict],
                   query: Union[Dict[str, str], Sequence[Tuple[str, str]], None]) -> dict:
        what = f"{method} {path}"
        if query:
            path += "?" + urllib.parse.urlencode(query)
        body = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn, response, _ = self._send(method, path, body, headers)
        try:
            return self._decode(response, what)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerUnreachable(f"connection to {self.url} broke: {exc}") from None
        finally:
            conn.close()

    def put_part(self, upload_id: str, index: int, chunks: Iterable[bytes],
                 segment: int = 0) -> dict:
        """Stream one upload part (chunked transfer, bounded memory); its answer."""
        return self.send_part(upload_id, index, chunks, segment)()

    def send_part(self, upload_id: str, index: int, chunks: Iterable[bytes], segment: int = 0
                  ) -> Callable[[], dict]:
        """Send one part's body now; the returned function waits for the server's answer
        (so the next part can go out while the server stores this one). `segment` is the part
        the stream being sent starts at (0, or where a `zfs send -t` stream took over)."""
        path = protocol.UPLOAD_PART.format(upload_id=upload_id, index=index)
        conn = self._connect()
        try:
            conn.request("POST", self.prefix + path, body=_framed(chunks), headers=self._headers({
                "Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked",
                protocol.HEADER_SEGMENT: str(segment)}))
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ServerUnreachable(f"cannot reach {self.url}: {exc or type(exc).__name__}") \
                from None

        def answer() -> dict:
            try:
                return self._decode(conn.getresponse())
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(f"connection to {self.url} broke: {exc}") from None
            finally:
                conn.close()
        return answer

    def checkin(self, dataset: str, snapshot: str) -> None:
        """Tell the server `dataset` was checked and nothing was written since its backup
        `snapshot` (an unchanged dataset sends no backup, and would look stale). A refusal
        (a server without POST /checkin) or a server out of reach is a warning on stderr;
        the run goes on (the uploads find out for themselves)."""
        try:
            self.call("POST", protocol.CHECKIN, {"dataset": dataset, "snapshot": snapshot})
        except (ServerError, ServerUnreachable) as exc:
            sys.stderr.write(f"zfsmgr: warning: {dataset} unchanged, but the server did not"
                             f" record the check: {exc}\n")

    def download(self, key: str, offset: int = 0,
                 on_socket: Optional[Callable[[socket.socket], None]] = None) -> Download:
        """Open the stored stream of `key` from byte `offset` (`on_socket`: see _send)."""
        path = protocol.DOWNLOAD + "?" + urllib.parse.urlencode({"key": key})
        conn, response, sock = self._send("GET", path, headers={"Range": f"bytes={offset}-"}
                                          if offset else None, on_socket=on_socket)
        if response.status >= 400:
            try:
                self._decode(response)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(f"connection to {self.url} broke: {exc}") from None
            finally:
                conn.close()
        return Download(conn, response, sock)
