"""Byte-level POP3 clients for tests: exact writes, reads bounded by timeouts."""

from __future__ import annotations

import asyncio
import poplib
import socket
import ssl
import struct
from types import TracebackType

TIMEOUT = 5.0  # seconds any single read or connect may take in a test


class RawClient:
    """A POP3 client that writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, address: tuple[str, int], context: ssl.SSLContext | None = None
    ) -> RawClient:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                address[0],
                address[1],
                ssl=context,
                server_hostname="localhost" if context else None,
            )
        return cls(reader, writer)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        """One line, with its line ending; b"" at the end of the stream."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.readline()

    async def command(self, data: bytes) -> bytes:
        await self.send(data)
        return await self.line()

    async def multiline(self) -> list[bytes]:
        """The rest of a multi-line response after its first line, un-dot-stuffed."""
        lines: list[bytes] = []
        while True:
            line = await self.line()
            assert line, "stream ended inside a multi-line response"
            if line == b".\r\n":
                return lines
            lines.append(line[1:] if line.startswith(b"..") else line)

    async def starttls(self, context: ssl.SSLContext) -> None:
        async with asyncio.timeout(TIMEOUT):
            await self.writer.start_tls(context, server_hostname="localhost")

    async def at_eof(self) -> bool:
        """True when the peer closed: the next read returns nothing."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read(1) == b""

    def reset(self) -> None:
        """Drop the connection with a TCP reset, as a crashed client's kernel would."""
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger on, timeout 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            async with asyncio.timeout(TIMEOUT):
                await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def poplib_ssl(address: tuple[str, int], context: ssl.SSLContext) -> poplib.POP3_SSL:
    return poplib.POP3_SSL(address[0], address[1], context=context, timeout=TIMEOUT)


def poplib_stls(address: tuple[str, int], context: ssl.SSLContext) -> poplib.POP3:
    client = poplib.POP3(address[0], address[1], timeout=TIMEOUT)
    client.stls(context)
    return client
