"""An HTTP proxy in front of moto that does what real S3 stores do and moto does not: refuse a
body whose Content-MD5 does not match (400 BadDigest). It can also damage request bodies on
their way (`corrupt`), as a flaky link or a faulty middlebox would, and it records which
requests carried a Content-MD5."""

from __future__ import annotations

import base64
import hashlib
import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BAD_DIGEST = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>BadDigest</Code><Message>The '
              b'Content-MD5 you specified did not match what we received.</Message></Error>')
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect"}


@dataclass
class Seen:
    method: str
    path: str
    length: int
    md5: str | None
    refused: bool


class S3CheckProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen: list[Seen] = []
        self._corrupt: list = [b"", 0]  # marker, how many more bodies to damage
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def corrupt(self, marker: bytes, times: int = 1) -> None:
        """Flip a byte of `marker` in the next `times` request bodies that contain it."""
        with self._lock:
            self._corrupt = [marker, times]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _damage(self, body: bytes) -> bytes:
        with self._lock:
            marker, left = self._corrupt
            if left <= 0 or not marker or marker not in body:
                return body
            self._corrupt[1] -= 1
        at = body.index(marker)
        return body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1:]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)

        body = self._damage(h.rfile.read(length) if length else b"")
        md5 = h.headers.get("Content-MD5")
        refused = md5 is not None and base64.b64encode(hashlib.md5(body).digest()).decode() != md5
        self.seen.append(Seen(h.command, h.path, length, md5, refused))
        if refused:
            h.send_response(400)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(BAD_DIGEST)))
            h.end_headers()
            h.wfile.write(BAD_DIGEST)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP}
            upstream.request(h.command, h.path, body=body if length else None, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            h.send_response(resp.status)
            for k, v in resp.getheaders():  # a HEAD keeps the object's length
                if k.lower() not in HOP and (k.lower() != "content-length" or h.command == "HEAD"):
                    h.send_header(k, v)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            upstream.close()
