"""Channel: the pre-login receive buffer, on a real socket pair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from poproxy.channel import Channel


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[Channel, socket.socket]]:
    """A Channel on one end of a connected socket pair; the test writes to the other."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    channel = Channel()
    await loop.connect_accepted_socket(lambda: channel, ours)
    try:
        yield channel, theirs
    finally:
        channel.connected().abort()
        theirs.close()


@pytest.mark.asyncio
async def test_read_with_a_deadline_times_out_when_nothing_comes(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, _ = pair
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await channel.read(started + 0.05)
    # It waited (uvloop's clock counts whole milliseconds).
    assert loop.time() - started >= 0.04
    assert not channel.closed


@pytest.mark.asyncio
async def test_read_returns_what_came_before_the_deadline(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, peer = pair
    loop = asyncio.get_running_loop()
    loop.call_soon(peer.send, b"+OK ready\r\n")
    assert await channel.read(loop.time() + 5) == b"+OK ready\r\n"
    # The deadline's timer went with the read: a later read still waits for data.
    loop.call_later(0.1, peer.send, b"more\r\n")
    assert await channel.read(loop.time() + 5) == b"more\r\n"


@pytest.mark.asyncio
async def test_read_returns_empty_when_the_peer_closes(
    pair: tuple[Channel, socket.socket],
) -> None:
    channel, peer = pair
    loop = asyncio.get_running_loop()
    peer.close()
    assert await channel.read(loop.time() + 5) == b""
    assert channel.closed
