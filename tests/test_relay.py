"""The relay's flow control and closing rules, over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from poproxy.channel import Channel
from poproxy.relay import Relay, RelayEnd

BIG = 32 * 1024 * 1024  # far above every buffer in the path


@asynccontextmanager
async def connected_pair() -> AsyncIterator[tuple[asyncio.Transport, socket.socket]]:
    """A transport on the proxy's side and the blocking socket of its peer."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(Channel, ours)
    try:
        yield transport, theirs
    finally:
        transport.abort()
        theirs.close()


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    def receive() -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(min(1 << 20, size - len(data)))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    return await asyncio.to_thread(receive)


@pytest.mark.asyncio
async def test_slow_client_pauses_the_backend_and_memory_stays_bounded() -> None:
    async with (
        connected_pair() as (client, client_peer),
        connected_pair() as (
            backend,
            backend_peer,
        ),
    ):
        relay = Relay(client, backend, idle_timeout=60)
        relay.start(b"", b"", client_lost=False, backend_lost=False)
        payload = bytes(range(256)) * (BIG // 256)
        backend_peer.setblocking(False)
        sent = 0
        loop = asyncio.get_running_loop()
        # The client reads nothing: once the socket buffers fill, the relay
        # must stop reading from the backend, so the backend's sends block.
        async with asyncio.timeout(10):
            while sent < len(payload):
                try:
                    sent += backend_peer.send(payload[sent : sent + 65536])
                except BlockingIOError:
                    # Give the relay a chance to move bytes; if it is paused,
                    # this never makes room and the loop below ends.
                    writable = loop.create_future()
                    loop.add_writer(backend_peer.fileno(), writable.set_result, None)
                    try:
                        async with asyncio.timeout(0.5):
                            await writable
                    except TimeoutError:
                        break
                    finally:
                        loop.remove_writer(backend_peer.fileno())
        assert sent < len(payload), "the backend was never paused"
        assert client.get_write_buffer_size() <= 4 * 1024 * 1024
        # Now the client reads: everything the backend sent arrives intact.
        backend_peer.setblocking(True)
        client_peer.settimeout(10)
        received = await recv_exactly(client_peer, sent)
        assert received == payload[:sent]
        assert relay.backend.count == sent


@pytest.mark.asyncio
async def test_client_reset_aborts_the_backend_without_sending_anything() -> None:
    async with (
        connected_pair() as (client, client_peer),
        connected_pair() as (
            backend,
            backend_peer,
        ),
    ):
        relay = Relay(client, backend, idle_timeout=60)
        relay.start(b"DELE 1\r\n", b"", client_lost=False, backend_lost=False)
        backend_peer.settimeout(5)
        assert await recv_exactly(backend_peer, 8) == b"DELE 1\r\n"
        client_peer.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        client_peer.close()  # RST
        async with asyncio.timeout(5):
            result = await relay.wait()
        assert result.end in (RelayEnd.CLIENT_RESET, RelayEnd.CLIENT_CLOSED)
        # The backend sees the end of the stream and not one byte more: no QUIT.
        assert await asyncio.to_thread(backend_peer.recv, 100) == b""
