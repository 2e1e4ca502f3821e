"""Whole POP3 sessions through the proxy with Python's poplib, over real TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import poplib
import ssl

import pytest
from support.clients import poplib_ssl, poplib_stls
from support.fake_backend import ALICE, ALICE_PASSWORD
from support.proxy import Certificates, RunningProxy, proxy_config

from poproxy import config, tls
from poproxy.demo import SAMPLE_MESSAGES, MailboxServer
from poproxy.metrics import Metrics
from poproxy.server import ListenError, Proxy


def lines_of(message: bytes) -> list[bytes]:
    """A message as poplib returns it: lines without CRLF."""
    return message.removesuffix(b"\r\n").split(b"\r\n")


def full_session(client: poplib.POP3) -> None:
    """STAT, LIST, UIDL, TOP, RETR (dot-stuffed lines too), DELE, RSET, DELE, QUIT."""
    client.user(ALICE.decode())
    client.pass_(ALICE_PASSWORD.decode())
    count, size = client.stat()
    assert count == len(SAMPLE_MESSAGES)
    assert size == sum(len(message) for message in SAMPLE_MESSAGES)
    _, listing, _ = client.list()
    assert [int(entry.split()[1]) for entry in listing] == [len(m) for m in SAMPLE_MESSAGES]
    _, uids, _ = client.uidl()
    assert len({entry.split()[1] for entry in uids}) == len(SAMPLE_MESSAGES)
    _, top, _ = client.top(2, 0)
    assert top == lines_of(SAMPLE_MESSAGES[1].split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    for number, message in enumerate(SAMPLE_MESSAGES, start=1):
        _, lines, _ = client.retr(number)
        assert lines == lines_of(message)
    client.dele(1)
    client.rset()
    client.dele(2)
    assert client.quit().startswith(b"+OK")


@pytest.mark.asyncio
async def test_pop3s_full_session(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    def session() -> None:
        full_session(poplib_ssl(proxy.implicit, client_context))

    await asyncio.to_thread(session)
    async with asyncio.timeout(5):
        await backend.wait_sessions_closed(1)
    # QUIT committed exactly the DELE that was not reset.
    assert backend.mailboxes[ALICE].messages == [SAMPLE_MESSAGES[0], SAMPLE_MESSAGES[2]]
    assert backend.quit_count == 1


@pytest.mark.asyncio
async def test_stls_full_session(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    def session() -> None:
        full_session(poplib_stls(proxy.starttls, client_context))

    await asyncio.to_thread(session)
    async with asyncio.timeout(5):
        await backend.wait_sessions_closed(1)
    assert backend.mailboxes[ALICE].messages == [SAMPLE_MESSAGES[0], SAMPLE_MESSAGES[2]]


@pytest.mark.asyncio
async def test_backend_sees_only_the_login_and_the_client_commands(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    def session() -> None:
        client = poplib_ssl(proxy.implicit, client_context)
        client.capa()  # answered by the proxy, not the backend
        client.user(ALICE.decode())
        client.pass_(ALICE_PASSWORD.decode())
        client.stat()
        client.quit()

    await asyncio.to_thread(session)
    async with asyncio.timeout(5):
        await backend.wait_sessions_closed(1)
    assert backend.received == [b"USER alice", b"PASS wonderland", b"STAT", b"QUIT"]


@pytest.mark.asyncio
async def test_ipv6_listener(backend: MailboxServer, certificates: Certificates) -> None:
    settings = proxy_config(certificates.files, [backend.address])
    settings = dataclasses.replace(
        settings, listeners=(config.Listener("v6", config.Address("::1", 0), "implicit"),)
    )
    metrics = Metrics()
    proxy = Proxy(settings, tls.CertificateStore(settings.tls, settings.source, metrics), metrics)
    try:
        await proxy.start()
    except ListenError:
        pytest.skip("::1 is not configured on this machine")
    try:
        address = proxy.addresses["v6"]
        context = certificates.client_context()

        def session() -> list[bytes]:
            client = poplib.POP3_SSL(address[0], address[1], context=context, timeout=5)
            client.user(ALICE.decode())
            client.pass_(ALICE_PASSWORD.decode())
            _, lines, _ = client.retr(1)
            client.quit()
            return lines

        assert await asyncio.to_thread(session) == lines_of(SAMPLE_MESSAGES[0])
    finally:
        await proxy.shutdown(grace=0)
