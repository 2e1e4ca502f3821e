"""No credential is accepted before TLS, and none of it reaches a backend (RFC 2595 section 2.3)."""

from __future__ import annotations

import base64
import ssl

import pytest
from support.clients import RawClient
from support.proxy import RunningProxy

from poproxy.demo import MailboxServer

TLS_REQUIRED = b"-ERR [AUTH] TLS required before login: issue STLS first\r\n"
PLAIN_IR = base64.b64encode(b"\0alice\0wonderland")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "command",
    [
        b"USER alice\r\n",
        b"PASS wonderland\r\n",
        b"APOP alice 0123456789abcdef0123456789abcdef\r\n",
        b"AUTH PLAIN " + PLAIN_IR + b"\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH\r\n",
        b"user alice\r\n",
    ],
)
async def test_login_commands_are_refused_before_stls(
    proxy: RunningProxy, backend: MailboxServer, command: bytes
) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        assert await client.line() == b"+OK POP3 ready\r\n"
        assert await client.command(command) == TLS_REQUIRED
        # The session goes on: the client may still upgrade.
        assert await client.command(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
    assert backend.connections == 0


@pytest.mark.asyncio
async def test_user_then_pass_before_tls_never_reaches_a_backend(
    proxy: RunningProxy, backend: MailboxServer
) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        await client.send(b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
        assert await client.line() == TLS_REQUIRED
        assert await client.line() == TLS_REQUIRED
        assert await client.line() == b"+OK Bye\r\n"
        assert await client.at_eof()
    assert backend.connections == 0
    assert backend.received == []


@pytest.mark.asyncio
async def test_capa_before_tls_offers_stls_and_no_login(proxy: RunningProxy) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        assert await client.command(b"CAPA\r\n") == b"+OK Capability list follows\r\n"
        capabilities = await client.multiline()
    assert b"STLS\r\n" in capabilities
    assert not any(line.startswith((b"USER", b"SASL")) for line in capabilities)


@pytest.mark.asyncio
async def test_capa_after_stls_offers_login_and_no_stls(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        await client.command(b"STLS\r\n")
        await client.starttls(client_context)
        assert await client.command(b"CAPA\r\n") == b"+OK Capability list follows\r\n"
        capabilities = await client.multiline()
    assert b"USER\r\n" in capabilities
    assert b"SASL PLAIN LOGIN\r\n" in capabilities
    assert b"STLS\r\n" not in capabilities


@pytest.mark.asyncio
async def test_capa_on_implicit_tls_offers_login_and_no_stls(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    async with await RawClient.connect(proxy.implicit, client_context) as client:
        assert await client.line() == b"+OK POP3 ready\r\n"
        await client.command(b"CAPA\r\n")
        capabilities = await client.multiline()
        assert b"USER\r\n" in capabilities
        assert b"STLS\r\n" not in capabilities
        # RFC 2595 section 4: STLS when TLS is already on is an error.
        assert await client.command(b"STLS\r\n") == b"-ERR TLS already active\r\n"


@pytest.mark.asyncio
async def test_second_stls_is_refused(proxy: RunningProxy, client_context: ssl.SSLContext) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        await client.command(b"STLS\r\n")
        await client.starttls(client_context)
        assert await client.command(b"STLS\r\n") == b"-ERR TLS already active\r\n"


@pytest.mark.asyncio
async def test_client_that_never_upgrades_cannot_log_in(
    proxy: RunningProxy, backend: MailboxServer
) -> None:
    """Every way to log in fails until the errors close the connection."""
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        await client.send(
            b"USER a\r\nPASS b\r\nAUTH PLAIN " + PLAIN_IR + b"\r\nAPOP a b\r\nUSER a\r\n"
        )
        replies = [await client.line() for _ in range(5)]
        assert replies[:4] == [TLS_REQUIRED] * 4
        assert replies[4] == b"-ERR Too many errors, closing connection\r\n"
        assert await client.at_eof()
    assert backend.connections == 0


@pytest.mark.asyncio
async def test_transaction_commands_before_login_are_refused(
    proxy: RunningProxy, client_context: ssl.SSLContext, backend: MailboxServer
) -> None:
    async with await RawClient.connect(proxy.implicit, client_context) as client:
        await client.line()
        assert await client.command(b"STAT\r\n") == b"-ERR Not logged in\r\n"
        assert await client.command(b"RETR 1\r\n") == b"-ERR Not logged in\r\n"
        assert await client.command(b"XYZZY\r\n") == b"-ERR Unknown command\r\n"
    assert backend.connections == 0
