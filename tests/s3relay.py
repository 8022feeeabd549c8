"""A relay in front of SeaweedFS that plays what a real provider does and SeaweedFS does not:
the error answers of a full provider (real S3 error documents, which the minio client parses),
and a slow server-side copy."""

from __future__ import annotations

import http.client
import http.server
import threading
import time

ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
             '<Message>{message}</Message><Resource>{path}</Resource>'
             '<RequestId>relay</RequestId></Error>')
ANSWERS = {  # what providers answer a write they have no room for
    "QuotaExceeded": (403, "The quota has been exceeded."),
    "XMinioStorageFull": (507, "Storage backend has reached its minimum free drive threshold."
                               " Please delete a few objects to proceed."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed object size."),
}


class S3Relay(http.server.ThreadingHTTPServer):
    """Passes S3 requests on to SeaweedFS, except the writes `refuse(method, path, headers)`
    picks, which get the S3 error `code`: the provider is full for them. The requests
    `slow(method, path, headers)` picks are held back `delay` seconds first (then passed on, or
    refused): a provider's server-side copy of a large object."""

    daemon_threads = True

    def __init__(self, upstream: str, code: str = "QuotaExceeded", refuse=None, slow=None,
                 delay: float = 0.0):
        host, port = upstream.split(":")
        self.upstream, self.code, self.refused, self.held = (host, int(port)), code, [], []
        self.refuse = refuse or (lambda method, path, headers: False)
        self.slow, self.delay = slow or (lambda method, path, headers: False), delay
        super().__init__(("127.0.0.1", 0), _Relay)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Relay(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.server.slow(self.command, self.path, self.headers):
            self.server.held.append(f"{self.command} {self.path}")
            time.sleep(self.server.delay)
        if self.server.refuse(self.command, self.path, self.headers):
            self.server.refused.append(f"{self.command} {self.path}")
            status, message = ANSWERS[self.server.code]
            self._answer(status, [("Content-Type", "application/xml")], ERROR_XML.format(
                code=self.server.code, message=message, path=self.path.split("?")[0]).encode())
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:  # the Host header goes on as it came: the request is signed with it
            upstream.request(self.command, self.path, body=body or None,
                             headers=dict(self.headers.items()))
            answer = upstream.getresponse()
            data = answer.read()
            headers = [(k, v) for k, v in answer.getheaders()
                       if k.lower() not in ("content-length", "connection", "transfer-encoding")]
            length = answer.getheader("Content-Length") if self.command == "HEAD" else None
        finally:
            upstream.close()
        self._answer(answer.status, headers, data, length)

    def _answer(self, status, headers, data, length=None):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


def compose(method, path, headers) -> bool:
    """UploadPartCopy: the server-side copy of a commit."""
    return method == "PUT" and "x-amz-copy-source" in {k.lower() for k in headers}
