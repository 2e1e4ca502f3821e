"""STARTTLS command injection (CVE-2011-0411 class): plaintext pipelined behind STLS is dropped.

The injected bytes come in the same write (one TCP segment on loopback) as
STLS; after the handshake the proxy must not answer them, but must answer
what the client sends inside TLS.
"""

from __future__ import annotations

import ssl

import pytest
from support.clients import RawClient
from support.proxy import RunningProxy

from poproxy.demo import MailboxServer

STLS_OK = b"+OK Begin TLS negotiation\r\n"


async def stls_with_trailer(
    proxy: RunningProxy, context: ssl.SSLContext, stls: bytes, trailer: bytes
) -> RawClient:
    client = await RawClient.connect(proxy.starttls)
    assert await client.line() == b"+OK POP3 ready\r\n"
    await client.send(stls + trailer)
    assert await client.line() == STLS_OK
    await client.starttls(context)
    return client


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("stls", "trailer"),
    [
        (b"STLS\r\n", b"CAPA\r\n"),
        (b"STLS\r\n", b"USER injected\r\n"),
        (b"STLS\r\n", b"USER alice\r\nPASS wonderland\r\n"),
        (b"stls\r\n", b"CAPA\r\n"),
        (b"STLS\n", b"CAPA\n"),
        (b"STLS\r\n", b"X"),
    ],
)
async def test_starttls_command_injection_is_not_answered(
    proxy: RunningProxy,
    backend: MailboxServer,
    client_context: ssl.SSLContext,
    stls: bytes,
    trailer: bytes,
) -> None:
    client = await stls_with_trailer(proxy, client_context, stls, trailer)
    async with client:
        # The first reply inside TLS answers NOOP-like probing below, not the
        # injected line: a QUIT sent now gets "+OK Bye" as the very next line.
        assert await client.command(b"QUIT\r\n") == b"+OK Bye\r\n"
    assert backend.connections == 0


@pytest.mark.asyncio
async def test_injected_user_is_forgotten_after_tls(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    """A USER injected before TLS does not pair with a PASS sent inside it."""
    client = await stls_with_trailer(proxy, client_context, b"STLS\r\n", b"USER alice\r\n")
    async with client:
        assert await client.command(b"PASS wonderland\r\n") == b"-ERR Send USER first\r\n"
    assert backend.connections == 0


@pytest.mark.asyncio
async def test_command_right_after_the_handshake_is_answered(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    client = await stls_with_trailer(proxy, client_context, b"STLS\r\n", b"")
    async with client:
        await client.send(b"CAPA\r\n")
        assert await client.line() == b"+OK Capability list follows\r\n"
        assert b"USER\r\n" in await client.multiline()


@pytest.mark.asyncio
async def test_pipelined_login_inside_tls_works(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    """USER, PASS and STAT in one TLS record: answered in order (RFC 2449 PIPELINING)."""
    client = await stls_with_trailer(proxy, client_context, b"STLS\r\n", b"")
    async with client:
        await client.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
        assert await client.line() == b"+OK Send PASS\r\n"
        assert (await client.line()).startswith(b"+OK")
        assert (await client.line()).startswith(b"+OK 3 ")
        assert (await client.line()).startswith(b"+OK")
        assert await client.at_eof()
    assert backend.received[-2:] == [b"STAT", b"QUIT"]
