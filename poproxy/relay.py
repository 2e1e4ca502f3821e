"""The TRANSACTION-state byte pump between a client and its backend.

Owns: moving bytes both ways unparsed, flow control (when one side's write
buffer is above its high-water mark, reading from the other side pauses),
the idle timeout, byte counts, and how each side's end closes the other.
Must never send anything of its own to either side, and above all never a
QUIT to the backend: a client that goes away before QUIT must leave the
backend outside UPDATE state, so no DELE is committed (RFC 1939 section 6).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass


class RelayEnd(enum.Enum):
    """Why the relay ended, from the proxy's point of view."""

    CLIENT_CLOSED = "client_closed"  # the client closed cleanly (after QUIT, usually)
    CLIENT_RESET = "client_reset"  # the client's connection broke (reset, TLS error)
    BACKEND_CLOSED = "backend_closed"  # the backend ended the session (after QUIT, usually)
    IDLE_TIMEOUT = "idle_timeout"
    ABORTED = "aborted"  # the proxy cut the session (shutdown grace period over)


@dataclass(frozen=True)
class RelayResult:
    end: RelayEnd
    client_to_backend: int
    backend_to_client: int
    client_quit: bool  # the client's last bytes were a QUIT command


class _Side(asyncio.Protocol):
    """One direction's reader: what arrives on `transport` goes to `peer`."""

    def __init__(self, relay: Relay, transport: asyncio.Transport, peer: asyncio.Transport) -> None:
        self.relay = relay
        self.transport = transport
        self.peer = peer
        self.count = 0
        self.lost = False
        self.last = b""  # the latest chunk, to see whether the session ended with QUIT

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.last = data
        self.relay.last_activity = self.relay.loop.time()
        if not self.peer.is_closing():  # the peer's loss is reported in a moment
            self.peer.write(data)

    def eof_received(self) -> bool:
        return False  # close: POP3 does not half-close

    def pause_writing(self) -> None:
        # Our transport is full: stop reading what would be written to it.
        if not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)


class Relay:
    """Pumps bytes between two transports until both are closed."""

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        idle_timeout: float,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = idle_timeout
        self.last_activity = self.loop.time()
        self.client = _Side(self, client, backend)
        self.backend = _Side(self, backend, client)
        self.end: RelayEnd | None = None
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None

    def start(
        self, to_backend: bytes, to_client: bytes, *, client_lost: bool, backend_lost: bool
    ) -> None:
        """Take both transports over.

        `to_backend` and `to_client` are bytes received before the switch
        (DESIGN rule 7: commands pipelined behind the login go first, in
        order). A side whose connection was already lost is ended at once:
        asyncio will not report that loss again to the new protocol.
        """
        self.client.transport.set_protocol(self.client)
        self.backend.transport.set_protocol(self.backend)
        if to_backend and not backend_lost:
            self.client.data_received(to_backend)
        if to_client and not client_lost:
            self.backend.data_received(to_client)
        self._idle_timer = self.loop.call_later(self.idle_timeout, self._check_idle)
        for side, lost in ((self.client, client_lost), (self.backend, backend_lost)):
            if lost:
                side.connection_lost(None)
                continue
            side.transport.resume_reading()
            if side.transport.get_write_buffer_size() > side.transport.get_write_buffer_limits()[1]:
                side.pause_writing()

    async def wait(self) -> RelayResult:
        await asyncio.shield(self._done)
        end = self.end or RelayEnd.ABORTED  # always set before _done; typed for mypy
        # Only the end of the last chunk is looked at, once: no per-line work.
        tail = self.client.last[-7:].upper()
        client_quit = tail in (b"QUIT\r\n", b"QUIT\n") or tail.endswith(
            (b"\nQUIT\r\n", b"\nQUIT\n")
        )
        return RelayResult(end, self.client.count, self.backend.count, client_quit)

    def abort(self) -> None:
        """Cut both sides now, sending nothing (shutdown grace period over)."""
        self._finish(RelayEnd.ABORTED)
        self.client.transport.abort()
        self.backend.transport.abort()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if side is self.client:
            if self.end is None:
                self._finish(RelayEnd.CLIENT_RESET if exc else RelayEnd.CLIENT_CLOSED)
            if exc is None:
                # Everything forwarded so far is what the client sent: let it
                # reach the backend, then end. No QUIT is added: without one
                # the backend never enters UPDATE state.
                self.backend.transport.close()
            else:
                self.backend.transport.abort()
        else:
            if self.end is None:
                self._finish(RelayEnd.BACKEND_CLOSED)
            # Flush what the backend sent, then TLS close_notify and close.
            self.client.transport.close()
        if self.client.lost and self.backend.lost and not self._done.done():
            self._done.set_result(None)

    def _finish(self, end: RelayEnd) -> None:
        if self.end is None:
            self.end = end
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _check_idle(self) -> None:
        # RFC 1939 section 3: an autologout timer ends the session without
        # entering UPDATE state: the backend is cut, no QUIT is sent.
        remaining = self.last_activity + self.idle_timeout - self.loop.time()
        if remaining > 0:
            self._idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self._idle_timer = None
        self._finish(RelayEnd.IDLE_TIMEOUT)
        self.backend.transport.abort()
        self.client.transport.close()
