"""HTTPS inside `zfsmgr server`: TLS terminated in waitress's own channels, one process.

Waitress stays the HTTP engine. Its listening server is subclassed only to make TLS channels:
each accepted connection gets an `ssl.SSLObject` over two memory BIOs, and the channel's
`recv`/`send` pass through it. The socket stays non-blocking in waitress's event loop, so a
slow or silent handshake costs no thread, and nothing is relayed through a second socket:
  - reading: the bytes the socket has go into the TLS object; every complete record is
    decrypted at once (a record left inside the TLS object would never wake the loop again);
    while the handshake runs there is nothing for HTTP, and the loop carries on;
  - writing: plaintext is encrypted and the ciphertext sent as far as the socket takes it;
    what it does not take waits in a buffer of at most `RAW_LIMIT`, and `send` reports 0
    (nothing taken) while it is full, so waitress's own back-pressure on the response still
    holds; the buffer drains when the socket is writable, and a closing channel first sends it.
waitress writes from request threads as well as from its loop, so each channel serialises its
TLS object and buffer with a lock (held for in-memory crypto and non-blocking sends only).

The certificate (TLS_CERT, PEM with its chain) and key (TLS_KEY) are read at start and again on
SIGHUP; a renewed certificate serves the next connections, and one that fails to load is logged
and the old one kept. TLS 1.2 is the minimum.
"""

from __future__ import annotations

import errno
import logging
import ssl
import threading
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from zfsmgr.errors import SettingsError

log = logging.getLogger("zfsmgr.server.tls")
RAW_LIMIT = 1 << 20  # ciphertext waiting for a slow client, per connection
CLOSE_GRACE = 30.0  # seconds a closing connection may take to send what it has left
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


class Certificate:
    """The server's TLS context, built from the PEM files and rebuilt by `reload()`."""

    def __init__(self, cert_file: str, key_file: str):
        self.cert_file, self.key_file = cert_file, key_file
        self.context = self._build()

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise SettingsError(f"TLS_CERT={self.cert_file} / TLS_KEY={self.key_file} cannot be"
                                f" loaded: {reason}") from None
        return context

    def reload(self) -> bool:
        """Read the files again; keep the old context (and say why) when they do not load."""
        try:
            self.context = self._build()
        except SettingsError as exc:
            log.error("certificate not reloaded, the old one stays: %s", exc)
            return False
        log.info("certificate reloaded from %s", self.cert_file)
        return True


class TLSChannel(HTTPChannel):
    """A waitress HTTP channel whose bytes pass through TLS."""

    def __init__(self, server, sock, addr, adj, map=None):
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = server.certificate.context
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._tls_lock = threading.Lock()
        self._raw = bytearray()  # ciphertext the socket has not taken yet
        self._closing_since = 0.0
        self._ready = False  # handshake done
        super().__init__(server, sock, addr, adj, map)

    # reading
    def handle_read(self):
        try:
            data, eof = self._receive(self.adj.recv_bytes)
        except (OSError, ssl.SSLError) as exc:
            log.info("TLS connection from %s failed: %s", self.addr and self.addr[0],
                     getattr(exc, "reason", None) or exc)
            self._close_now()
            return
        if data:
            self.last_activity = time.time()
            self.received(data)
        if eof:
            self.connected = False
            self.handle_close()

    def _receive(self, size: int):
        """(plaintext, the peer closed) from what the socket has now."""
        try:
            raw = self.socket.recv(size)
        except BlockingIOError:
            return b"", False
        with self._tls_lock:
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()
            plain, closed = [], not raw
            try:
                if not self._ready:
                    self._tls.do_handshake()
                    self._ready = True
                while True:
                    plain.append(self._tls.read(size))
                    if not plain[-1]:
                        closed = True
                        break
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or none
                closed = True
            finally:
                self._push()
            return b"".join(plain), closed

    def readable(self):
        return not self._closing_since and super().readable()

    # writing
    def send(self, data, do_close=True):
        with self._tls_lock:
            try:
                self._push()
                if len(self._raw) >= RAW_LIMIT or not self._ready:
                    return 0  # waitress keeps the data and tries again when writable
                taken = self._tls.write(data)
                self._push()
                return taken
            except (OSError, ssl.SSLError) as exc:
                log.info("TLS send to %s failed: %s", self.addr and self.addr[0], exc)
                self._raw.clear()
        if do_close:
            self._close_now()
        return 0

    def _push(self) -> None:
        """Send pending ciphertext as far as the socket takes it (lock held)."""
        pending = self._outgoing.read()
        if pending:
            self._raw += pending
        if self.socket is None:  # closed already: nothing can be sent any more
            self._raw.clear()
            return
        while self._raw:
            try:
                sent = self.socket.send(self._raw)
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    return
                raise
            if not sent:
                return
            del self._raw[:sent]

    def writable(self):
        return bool(self._raw) or (not self._closing_since and super().writable())

    def handle_write(self):
        with self._tls_lock:
            try:
                self._push()
            except OSError:
                self._raw.clear()
                self._close_now()
                return
        if self._closing_since:
            if not self._raw or time.time() - self._closing_since > CLOSE_GRACE:
                self._close_now()
            return
        super().handle_write()

    # closing
    def handle_close(self):
        """Close once the ciphertext the socket has not taken yet is sent (within a grace).
        Once closed, nothing: under poll() a reset connection reports its hang-up after the
        read that closed it, and that second close raised, out of waitress's loop."""
        if self.socket is None:
            return
        with self._tls_lock:
            try:
                if self._ready and not self._closing_since:
                    self._tls.unwrap()  # queue close_notify
            except (ssl.SSLError, OSError, ValueError):
                pass
            try:
                self._push()
            except OSError:
                self._raw.clear()
            waiting = bool(self._raw)
        if waiting and not self._closing_since:
            self._closing_since = time.time()
            self.connected = False
            return
        self._close_now()

    def _close_now(self) -> None:
        """Close at once; `released()` runs first (the gate gives back a half-read body)."""
        self._raw.clear()
        self.released()
        HTTPChannel.handle_close(self)

    def released(self) -> None:
        """The hook a channel subclass overrides to let go of what its request holds."""


class TLSServer(TcpWSGIServer):
    """waitress's TCP server, making TLS channels."""

    channel_class = TLSChannel

    def __init__(self, application, certificate: Certificate, adj: Adjustments):
        self.certificate = certificate
        super().__init__(application, adj=adj)

    def maintenance(self, now):
        super().maintenance(now)
        for channel in list(self.active_channels.values()):  # a peer that never reads
            closing = getattr(channel, "_closing_since", 0.0)
            if closing and now - closing > CLOSE_GRACE:
                channel._close_now()


def create_tls_server(application, certificate: Certificate, **adjustments) -> TLSServer:
    """A waitress server on HOST:PORT that speaks HTTPS (as waitress.create_server makes one
    that speaks HTTP, with the same adjustments)."""
    return TLSServer(application, certificate, Adjustments(url_scheme="https", **adjustments))
