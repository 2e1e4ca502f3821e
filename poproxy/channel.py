"""A connection's bytes collected for a coroutine, until the relay takes over.

Owns: the receive buffer of a client or backend connection during
AUTHORIZATION, its read flow control, and waiting for writes to drain. It is
an `asyncio.Protocol` rather than a StreamReader so that the session sees and
controls every buffered byte (at STLS the buffer is discarded, STYLE rule 3)
and so that the relay can take the transport over with `set_protocol`
without copying a stream's internals. Must never parse POP3.
"""

from __future__ import annotations

import asyncio
from typing import cast


class Channel(asyncio.Protocol):
    """Buffers received bytes; `read()` waits for them."""

    def __init__(self, high_water: int = 64 * 1024) -> None:
        self.transport: asyncio.Transport | None = None
        self.high_water = high_water
        self.closed = False  # the peer ended the stream or the connection broke
        self.lost = False  # asyncio reported connection_lost: no callback follows
        self.error: BaseException | None = None
        self._buffer = bytearray()
        self._reading_paused = False
        self._writing_paused = False
        self._readable: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self.high_water and not self._reading_paused:
            # Memory stays bounded: the coroutine resumes reading when it
            # has taken the bytes.
            self._reading_paused = True
            self.connected().pause_reading()
        wake(self._readable)

    def eof_received(self) -> bool:
        self.closed = True
        wake(self._readable)
        return False  # close our side too: POP3 has no use for half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True
        self.error = exc
        wake(self._readable)
        wake(self._drained)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        wake(self._drained)

    # --- for the coroutine -------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    async def read(self, deadline: float | None = None) -> bytes:
        """Wait for bytes and return all of them; b"" when the stream ended.

        Calling it means the caller is ready for more: reading resumes if
        it was paused. With a `deadline` (the loop's clock) it raises
        TimeoutError when nothing came by then: one timer, where
        `asyncio.timeout` would cost a context manager per reply line.
        """
        if self._reading_paused and not self.closed:
            self._reading_paused = False
            self.connected().resume_reading()
        while not self._buffer and not self.closed:
            loop = asyncio.get_running_loop()
            self._readable = waiter = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                self._readable = None
                if timer is not None:
                    timer.cancel()
        return self.take()

    def take(self) -> bytes:
        """Return and forget whatever is buffered now, without waiting."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def pause_reading(self) -> None:
        """Stop reading until the next `read()` or `switch_transport()`."""
        if not self._reading_paused and not self.closed:
            self._reading_paused = True
            self.connected().pause_reading()

    def switch_transport(self, transport: asyncio.Transport) -> None:
        """TLS is on: from now on the bytes come, decrypted, through `transport`."""
        self.transport = transport
        self._reading_paused = False
        self._writing_paused = False

    def write(self, data: bytes) -> None:
        transport = self.connected()
        if not self.closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self._writing_paused and not self.closed:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def connected(self) -> asyncio.Transport:
        """The transport; only valid once asyncio has connected the channel."""
        if self.transport is None:
            raise RuntimeError("Channel used before connection_made")
        return self.transport


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Let whoever waits on `waiter` go on (once; later calls do nothing)."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
