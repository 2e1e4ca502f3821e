"""A tiny nginx-style auth_http service for tests, on 127.0.0.1 port 0.

It answers from a table keyed by the (unescaped) Auth-User, records every
request head so tests can assert on the headers, and can hold its answers
until an `asyncio.Event` is set (for timeout and in-flight tests; nothing
here sleeps). At exit the handlers still waiting are cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

MAX_REQUEST = 64 * 1024
REFUSAL = "Invalid login or password"  # nginx's documentation's example text


@dataclass(frozen=True)
class Raw:
    """An answer sent byte for byte, for malformed and oversized answers."""

    answer: bytes
    one_byte_at_a_time: bool = False  # a write and a drain per byte


# (server, port) routes, str refuses with that Auth-Status text, Raw is sent as is.
Answer = tuple[str, int] | str | Raw


@dataclass(frozen=True)
class RecordedRequest:
    request_line: bytes
    headers: list[tuple[bytes, bytes]]  # in the order received, names as sent
    head: bytes  # everything up to and including the blank line

    def values(self, name: str) -> list[bytes]:
        wanted = name.lower().encode("ascii")
        return [value for key, value in self.headers if key.lower() == wanted]

    def value(self, name: str) -> bytes:
        """The header's only value; fails when it is absent or repeated."""
        found = self.values(name)
        assert len(found) == 1, f"{name}: {found!r}"
        return found[0]


class AuthHttpServer:
    def __init__(
        self,
        table: Mapping[bytes, Answer],
        *,
        wait: str | None = None,
        hold: asyncio.Event | None = None,
    ) -> None:
        self.table = table
        self.wait = wait  # sent as Auth-Wait with every refusal
        self.hold = hold  # when given, answers wait until it is set
        self.requests: list[RecordedRequest] = []
        self.received = asyncio.Event()  # set at each recorded request
        self.address: tuple[str, int] = ("", 0)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/auth"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._handlers:
            task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(*self._handlers, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

    def answer_for(self, user: bytes) -> bytes:
        match self.table.get(user, REFUSAL):
            case Raw(answer=answer):
                return answer
            case (str() as server, int() as port):
                fields = ["Auth-Status: OK", f"Auth-Server: {server}", f"Auth-Port: {port}"]
            case str() as text:
                fields = [f"Auth-Status: {text}"]
                if self.wait is not None:
                    fields.append(f"Auth-Wait: {self.wait}")
        head = "HTTP/1.0 200 OK\r\n" + "".join(f"{line}\r\n" for line in fields) + "\r\n"
        return head.encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request = _parse(head)
            self.requests.append(request)
            self.received.set()
            if self.hold is not None:
                await self.hold.wait()
            user = unquote_to_bytes(request.values("Auth-User")[0])
            answer = self.answer_for(user)
            match self.table.get(user):
                case Raw(one_byte_at_a_time=True):
                    for index in range(len(answer)):
                        writer.write(answer[index : index + 1])
                        await writer.drain()
                case _:
                    writer.write(answer)
                    await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse(head: bytes) -> RecordedRequest:
    request_line, *lines = head.removesuffix(b"\r\n\r\n").split(b"\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" ")))
    return RecordedRequest(request_line=request_line, headers=headers, head=head)


@asynccontextmanager
async def running_auth_http(
    table: Mapping[bytes, Answer],
    *,
    wait: str | None = None,
    hold: asyncio.Event | None = None,
) -> AsyncIterator[AuthHttpServer]:
    """A started AuthHttpServer (`url` and `address` set), stopped at exit."""
    server = AuthHttpServer(table, wait=wait, hold=hold)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
