"""Backends made of real Dovecot servers: health checks, failover, user_hash, the client's
address passed on (PROXY v2, XCLIENT), and capabilities learnt from the backends."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.clients import TIMEOUT, RawClient
from support.dovecot import Dovecot, running_dovecot
from support.proxy import Certificates, proxy_config, running_proxy

from poproxy import config
from poproxy.policy import LOGIN_CAPABILITY_LINES, OWN_CAPABILITIES

pytestmark = pytest.mark.interop

USERS = {
    "alice": ("wonderland", [b"Subject: a\r\n\r\nfor alice\r\n"]),
    "bob": ("builder", [b"Subject: b\r\n\r\nfor bob\r\n"]),
}
FAST_CHECKS = config.HealthCheck(interval=0.2, timeout=2.0, rise=2, fall=1)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Dovecot, Dovecot]]:
    with ExitStack() as stack:
        a = stack.enter_context(running_dovecot(tmp_path / "a", USERS, name="a"))
        b = stack.enter_context(running_dovecot(tmp_path / "b", USERS, name="b"))
        yield a, b


def backend_of(*servers: Dovecot, **settings: object) -> config.Backend:
    addresses = tuple(config.Address(server.host, server.port) for server in servers)
    return config.Backend("mail", addresses, **settings)  # type: ignore[arg-type]


async def login(
    address: tuple[str, int], context: ssl.SSLContext, user: str, source: str = "127.0.0.1"
) -> bytes:
    """Log in from `source`, STAT, QUIT; the reply to PASS."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            *address, ssl=context, server_hostname="localhost", local_addr=(source, 0)
        )
    async with RawClient(reader, writer) as client:
        await client.line()
        password = USERS[user][0]
        await client.send(f"USER {user}\r\nPASS {password}\r\nSTAT\r\nQUIT\r\n".encode())
        await client.line()
        reply = await client.line()
        while await client.line():
            pass
        return reply


@pytest.mark.asyncio
async def test_a_stopped_server_is_skipped_and_comes_back_after_rise_checks(
    pair: tuple[Dovecot, Dovecot], certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    a, b = pair
    settings = dataclasses.replace(
        proxy_config(certificates.files, []),
        backends=(backend_of(a, b, health_check=FAST_CHECKS),),
    )
    async with running_proxy(settings) as proxy:
        pool = proxy.backends.pools["mail"]
        address = proxy.addresses["pop3s"]
        await asyncio.to_thread(a.stop)
        async with asyncio.timeout(10):
            await pool.wait_until(f"{a.host}:{a.port}", usable=False)
        assert proxy.ready()  # b is up: the backend can serve
        before = len(b.login_lines())
        for _ in range(4):
            assert (await login(address, client_context, "alice")).startswith(b"+OK")
        # Every login went to b, none was refused for a's sake.
        assert len(await asyncio.to_thread(b.wait_login_lines, before + 4)) == before + 4
        await asyncio.to_thread(a.start)
        async with asyncio.timeout(10):
            await pool.wait_until(f"{a.host}:{a.port}", usable=True)
        assert pool.servers[f"{a.host}:{a.port}"].good >= FAST_CHECKS.rise


@pytest.mark.asyncio
async def test_user_hash_keeps_a_user_on_one_server(
    pair: tuple[Dovecot, Dovecot], certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    a, b = pair
    settings = dataclasses.replace(
        proxy_config(certificates.files, []), backends=(backend_of(a, b, balance="user_hash"),)
    )
    async with running_proxy(settings) as proxy:
        for _ in range(5):
            assert (await login(proxy.addresses["pop3s"], client_context, "alice")).startswith(
                b"+OK"
            )
    counts = sorted([len(a.login_lines()), len(b.login_lines())])
    assert counts == [0, 5]


@pytest.mark.asyncio
async def test_proxy_v2_makes_dovecot_log_the_client_address(
    tmp_path: Path, certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    with running_dovecot(tmp_path, USERS, haproxy=True) as dovecot:
        settings = dataclasses.replace(
            proxy_config(certificates.files, []),
            backends=(backend_of(dovecot, proxy_protocol="v2", health_check=FAST_CHECKS),),
        )
        async with running_proxy(settings) as proxy:
            # The health checks speak PROXY v2 LOCAL; the server stays up.
            pool = proxy.backends.pools["mail"]
            async with asyncio.timeout(10):
                await pool.next_verdict()
            assert pool.has_usable_server
            reply = await login(proxy.addresses["pop3s"], client_context, "bob", "127.0.0.5")
            assert reply.startswith(b"+OK")
        lines = await asyncio.to_thread(dovecot.wait_login_lines, 1)
        assert "rip=127.0.0.5" in lines[-1]


@pytest.mark.asyncio
@pytest.mark.parametrize(("xclient", "expected"), [("auto", "127.0.0.6"), ("off", "127.0.0.1")])
async def test_xclient_makes_dovecot_log_the_client_address(
    tmp_path: Path,
    certificates: Certificates,
    client_context: ssl.SSLContext,
    xclient: str,
    expected: str,
) -> None:
    with running_dovecot(tmp_path, USERS) as dovecot:
        settings = dataclasses.replace(
            proxy_config(certificates.files, []), backends=(backend_of(dovecot, xclient=xclient),)
        )
        async with running_proxy(settings) as proxy:
            reply = await login(proxy.addresses["pop3s"], client_context, "alice", "127.0.0.6")
            assert reply.startswith(b"+OK")
        lines = await asyncio.to_thread(dovecot.wait_login_lines, 1)
        assert f"rip={expected}," in lines[-1]


@pytest.mark.asyncio
async def test_capa_after_tls_is_what_dovecot_offers_minus_what_the_proxy_owns(
    tmp_path: Path, certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    with running_dovecot(tmp_path, USERS) as dovecot:
        # What Dovecot itself answers to CAPA.
        async with await RawClient.connect((dovecot.host, dovecot.port)) as direct:
            await direct.line()
            await direct.command(b"CAPA\r\n")
            dovecot_lines = {line.strip().upper() for line in await direct.multiline()}
        settings = dataclasses.replace(
            proxy_config(certificates.files, []),
            backends=(backend_of(dovecot, health_check=FAST_CHECKS),),
        )
        async with running_proxy(settings) as proxy:
            pool = proxy.backends.pools["mail"]
            async with asyncio.timeout(10):
                while proxy.backends.extensions() is None:
                    await pool.next_verdict()
            async with await RawClient.connect(proxy.addresses["pop3s"], client_context) as c:
                await c.line()
                await c.command(b"CAPA\r\n")
                offered = [line.strip() for line in await c.multiline()]
    own = {b"USER", b"SASL", b"STLS", b"IMPLEMENTATION", b"RESP-CODES", b"AUTH-RESP-CODE"}
    learnt = {line for line in dovecot_lines if line.split(b" ")[0] not in own}
    assert set(offered) == {*LOGIN_CAPABILITY_LINES, *OWN_CAPABILITIES, *learnt}
    assert b"STLS" not in offered
