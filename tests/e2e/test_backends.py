"""Backends in a DMZ: routes, map files, inbound PROXY, auth_http, TLS toward a backend."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from pathlib import Path

import pytest
from support.auth_http_server import Raw, running_auth_http
from support.clients import RawClient
from support.fake_backend import running_backend
from support.proxy import Certificates, proxy_config, running_proxy

from poproxy import config, proxy_protocol
from poproxy.auth_http import AuthHttpSettings
from poproxy.demo import Mailbox, MailboxServer
from poproxy.logs import FIELDS
from poproxy.routing import Route

ONE = b"Subject: from a\r\n\r\nbackend a\r\n"
TWO = b"Subject: from b\r\n\r\nbackend b\r\n"


def two_backends(
    certificates: Certificates, a: MailboxServer, b: MailboxServer, **changes: object
) -> config.Config:
    settings = proxy_config(certificates.files, [a.address])
    backends = (
        config.Backend("mail-a", (config.Address(*a.address),)),
        config.Backend("mail-b", (config.Address(*b.address),)),
    )
    return dataclasses.replace(settings, backends=backends, **changes)  # type: ignore[arg-type]


async def first_message(address: tuple[str, int], context: ssl.SSLContext, user: bytes) -> bytes:
    async with await RawClient.connect(address, context) as client:
        await client.line()
        await client.send(b"USER " + user + b"\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n")
        await client.line()
        status = await client.line()
        assert status.startswith(b"+OK"), status
        assert (await client.line()).startswith(b"+OK")
        return b"".join(await client.multiline())


def mailboxes(message: bytes, *users: bytes) -> dict[bytes, Mailbox]:
    return {user: Mailbox(b"pw", [message]) for user in users}


@pytest.mark.asyncio
async def test_routes_pick_the_backend_first_match_wins(
    certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    users = (b"alice@example.org", b"bob@example.net", b"legacy-carol", b"dave")
    async with (
        running_backend(mailboxes(ONE, *users)) as a,
        running_backend(mailboxes(TWO, *users, b"bob")) as b,
    ):
        routes = (
            Route(kind="users", values=("ALICE@example.org",), backend="mail-b"),
            Route(kind="domains", values=("example.net",), backend="mail-b",
                  rewrite_user="strip_domain"),
            Route(kind="match", pattern="^legacy-", backend="mail-b"),
        )  # fmt: skip
        async with running_proxy(two_backends(certificates, a, b, routes=routes)) as proxy:
            address = proxy.addresses["pop3s"]
            assert await first_message(address, client_context, b"alice@example.org") == TWO
            assert await first_message(address, client_context, b"bob@example.net") == TWO
            assert await first_message(address, client_context, b"legacy-carol") == TWO
            assert await first_message(address, client_context, b"dave") == ONE  # default
        assert b"USER bob" in b.received  # the domain was stripped for mail-b


@pytest.mark.asyncio
async def test_map_file_routes_change_without_restart(
    tmp_path: Path, certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    map_file = tmp_path / "users.map"
    map_file.write_text("alice mail-b\n")
    async with (
        running_backend(mailboxes(ONE, b"alice")) as a,
        running_backend(mailboxes(TWO, b"alice")) as b,
    ):
        routes = (Route(kind="map_file", map_file=map_file),)
        async with running_proxy(two_backends(certificates, a, b, routes=routes)) as proxy:
            address = proxy.addresses["pop3s"]
            assert await first_message(address, client_context, b"alice") == TWO
            map_file.write_text("# moved back\nalice mail-a\n")
            assert proxy.backends.router.refresh() == []  # what the 5 s poll does
            assert await first_message(address, client_context, b"alice") == ONE
            # A broken file keeps the table in service.
            map_file.write_text("alice\n")
            assert proxy.backends.router.refresh()
            assert await first_message(address, client_context, b"alice") == ONE


@pytest.mark.asyncio
async def test_inbound_proxy_header_from_a_trusted_balancer_names_the_client(
    certificates: Certificates, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_backend() as backend:
        settings = proxy_config(certificates.files, [backend.address])
        inbound = config.InboundProxyProtocol(trusted=("127.0.0.0/8",))
        listener = dataclasses.replace(settings.listeners[1], proxy_protocol=inbound)
        settings = dataclasses.replace(settings, listeners=(listener,))
        async with running_proxy(settings) as proxy:
            address = proxy.addresses["pop3"]
            header = proxy_protocol.build_v2(("203.0.113.9", 40000), ("192.0.2.1", 110))
            async with await RawClient.connect(address) as client:
                await client.send(header)
                assert await client.line() == b"+OK POP3 ready\r\n"
                await client.command(b"STLS\r\n")
                await client.starttls(client_context)
                await client.send(b"USER alice\r\nPASS wrong\r\n")
                await client.line()
                assert (await client.line()).startswith(b"-ERR [AUTH]")
            # The failed-login line (what fail2ban reads) names 203.0.113.9.
            failed = [r for r in caplog.records if r.getMessage() == "login failed"]
            assert getattr(failed[0], FIELDS)["client"] == "203.0.113.9"
            # No header: closed before a byte of POP3.
            async with await RawClient.connect(address) as client:
                await client.send(b"CAPA\r\n")
                assert await client.at_eof()


@pytest.mark.asyncio
async def test_inbound_proxy_header_from_an_untrusted_peer_is_refused(
    certificates: Certificates,
) -> None:
    async with running_backend() as backend:
        settings = proxy_config(certificates.files, [backend.address])
        inbound = config.InboundProxyProtocol(trusted=("192.0.2.0/24",))
        listener = dataclasses.replace(settings.listeners[1], proxy_protocol=inbound)
        async with running_proxy(dataclasses.replace(settings, listeners=(listener,))) as proxy:
            header = proxy_protocol.build_v1(("203.0.113.9", 40000), ("192.0.2.1", 110))
            async with await RawClient.connect(proxy.addresses["pop3"]) as client:
                await client.send(header)
                assert await client.at_eof()
        assert backend.connections == 0


@pytest.mark.asyncio
async def test_auth_http_routes_users_and_its_timeout_gives_sys_temp(
    certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    async with running_backend(mailboxes(TWO, b"alice", b"bob")) as b:
        table: dict[bytes, tuple[str, int] | str | Raw] = {
            b"alice": b.address,
            b"mallory": "Invalid login or password",
        }
        hold = asyncio.Event()
        async with running_backend(mailboxes(ONE, b"alice")) as a, running_auth_http(table) as auth:
            settings = dataclasses.replace(
                two_backends(certificates, a, b), auth_http=AuthHttpSettings(auth.url, timeout=0.5)
            )
            async with running_proxy(settings) as proxy:
                address = proxy.addresses["pop3s"]
                assert await first_message(address, client_context, b"alice") == TWO
                request = auth.requests[-1]
                assert request.value("Auth-User") == b"alice"
                assert request.value("Auth-Protocol") == b"pop3"
                assert request.value("Client-IP") == b"127.0.0.1"
                async with await RawClient.connect(address, client_context) as client:
                    await client.line()
                    await client.send(b"USER mallory\r\nPASS pw\r\n")
                    await client.line()
                    assert await client.line() == b"-ERR [AUTH] Authentication failed\r\n"
        async with running_auth_http(table, hold=hold) as slow:
            settings = dataclasses.replace(
                two_backends(certificates, b, b), auth_http=AuthHttpSettings(slow.url, timeout=0.3)
            )
            async with running_proxy(settings) as proxy:
                async with await RawClient.connect(proxy.addresses["pop3s"], client_context) as c:
                    await c.line()
                    await c.send(b"USER alice\r\nPASS pw\r\n")
                    await c.line()
                    assert (await c.line()).startswith(b"-ERR [SYS/TEMP]")
                hold.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["implicit", "starttls"])
async def test_tls_toward_a_backend_is_verified(
    certificates: Certificates, client_context: ssl.SSLContext, mode: str
) -> None:
    """The backend here is a second poproxy (TLS in front of the in-memory server)."""
    async with running_backend(mailboxes(ONE, b"alice")) as backend:
        inner_settings = proxy_config(certificates.files, [backend.address])
        async with running_proxy(inner_settings) as inner:
            port = inner.addresses["pop3s" if mode == "implicit" else "pop3"]
            good = config.Backend(
                "tls", (config.Address(*port),), tls=mode, ca=certificates.ca_file,  # type: ignore[arg-type]
                server_name="localhost",
            )  # fmt: skip
            outer = dataclasses.replace(inner_settings, backends=(good,))
            async with running_proxy(outer) as proxy:
                address = proxy.addresses["pop3s"]
                assert await first_message(address, client_context, b"alice") == ONE
            # A name the certificate does not carry: refused, the client hears SYS/TEMP.
            wrong = dataclasses.replace(good, server_name="mail.example.com")
            async with running_proxy(dataclasses.replace(outer, backends=(wrong,))) as proxy:
                async with await RawClient.connect(proxy.addresses["pop3s"], client_context) as c:
                    await c.line()
                    await c.send(b"USER alice\r\nPASS pw\r\n")
                    await c.line()
                    assert (await c.line()).startswith(b"-ERR [SYS/TEMP]")
