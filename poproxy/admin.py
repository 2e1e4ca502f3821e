"""The operators' HTTP endpoint: /metrics, /healthz, /readyz.

Owns: a deliberately tiny HTTP/1.1 responder (one GET or HEAD per
connection, then close) with a bounded request size and a read timeout, so
that a slow or hostile scraper costs one small buffer for a few seconds.
Must never serve anything but these three paths, and never block the
proxy: each request is answered from memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from poproxy import config

log = logging.getLogger("poproxy.admin")

MAX_REQUEST = 8192  # bytes of request line and headers
READ_TIMEOUT = 5.0  # seconds to send the whole request

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class AdminServer:
    """Serves a metrics registry and the health answers.

    The registry is a `Metrics` object's, or, with `workers` > 1, the
    supervisor's, which collects what every worker wrote (workers.py).
    """

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self.registry = registry
        self.ready = ready
        self.address: tuple[str, int] = ("", 0)
        self._server: asyncio.Server | None = None

    async def start(self, listen: config.Address) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Request(self), listen.host, listen.port, reuse_address=True
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        log.info("metrics and health on http://%s/", config.Address(*self.address))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def respond(self, method: str, target: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = target.split("?", 1)[0]
        match path:
            case "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
            case "/healthz":
                return 200, "text/plain", b"ok\n"
            case "/readyz":
                if self.ready():
                    return 200, "text/plain", b"ready\n"
                return 503, "text/plain", b"not ready\n"
            case _:
                return 404, "text/plain", b"not found\n"


class _Request(asyncio.Protocol):
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(READ_TIMEOUT, self._send, "GET", 408, b"timeout\n")

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            end = self.buffer.find(b"\n\n")
        if end < 0 or end > MAX_REQUEST:
            if len(self.buffer) > MAX_REQUEST:
                self._send("GET", 431, b"request too large\n")
            return
        request_line = bytes(self.buffer.split(b"\n", 1)[0]).rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._send("GET", 400, b"bad request\n")
            return
        method, target = parts[0].decode("ascii", "replace"), parts[1].decode("ascii", "replace")
        status, content_type, body = self.server.respond(method, target)
        self._send(method, status, body, content_type)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _send(
        self, method: str, status: int, body: bytes, content_type: str = "text/plain"
    ) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        self.transport.write(head if method == "HEAD" else head + body)
        self.transport.close()
