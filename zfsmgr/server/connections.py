"""Waitress's connections: how many the server keeps, and how long one may take to say what it
wants.

Waitress keeps at most `connection_limit` connections (100 by default) and closes one only after
`channel_timeout` seconds without a byte (300: a part's body may stall that long while the
client's `zfs send` is slow). So 100 sockets that never sent a request, or that send their
headers a byte at a time, locked every client out for five minutes, without a key. Here:

- the limit follows the open-file limit, which is raised to its hard limit first: each
  connection takes a descriptor, and its body spooled to a file another;
- a connection has HEADER_SECONDS from its first byte (or from its opening, when it sends
  none) to finish the headers of a request; past that it is closed. Once a request's headers
  are in, `channel_timeout` applies as before, to its body and to the quiet between requests.
"""

from __future__ import annotations

import logging

log = logging.getLogger("zfsmgr.server")

HEADER_SECONDS = 10  # from the first byte of a request to the end of its headers
CHECK_SECONDS = 2  # how often connections are looked at (waitress's cleanup_interval)
MOST = 4000  # connections at most, however many descriptors there are
SPARE = 256  # descriptors kept for the stores, the catalog, zfs and the logs


def connection_limit() -> int:
    """Raise the soft open-file limit to the hard one; the connections that leaves room for
    (two descriptors each), at least waitress's 100."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 2 * MOST + SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    if soft == resource.RLIM_INFINITY:
        return MOST
    return max(100, min(MOST, (soft - SPARE) // 2))


def waiting_for_headers(channel, now: float) -> bool:
    """Whether `channel` has spent more than HEADER_SECONDS on the headers of its request (or,
    a new connection, without sending any)."""
    if channel.requests:  # a request is being served: it is not waiting for headers
        return False
    request = channel.request
    if request is None:  # between requests: new ones (none served) get HEADER_SECONDS
        return not getattr(channel, "served", False) and \
            getattr(channel, "creation_time", now) < now - HEADER_SECONDS
    if request.headers_finished:
        return False
    return getattr(request, "began", now) < now - HEADER_SECONDS


def watch(server) -> None:
    """Close, at waitress's maintenance (every CHECK_SECONDS: its `cleanup_interval`), the
    connections `waiting_for_headers`."""
    original = server.maintenance

    def maintenance(now: float) -> None:
        original(now)
        late = [c for c in list(server.active_channels.values())
                if not c.will_close and waiting_for_headers(c, now)]
        for channel in late:
            channel.will_close = True
        if late:
            log.info("closed %d connections that sent no complete request headers within %d s",
                     len(late), HEADER_SECONDS)

    server.maintenance = maintenance
