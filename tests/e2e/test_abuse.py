"""Abuse resistance: connection caps, slow clients, guessing, and reload without loss."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import pytest
from support.clients import TIMEOUT, RawClient
from support.fake_backend import running_backend
from support.proxy import Certificates, StartProxy, proxy_config

from poproxy import config, tls
from poproxy.demo import SAMPLE_MESSAGES, Mailbox, MailboxServer
from poproxy.metrics import Metrics
from poproxy.server import ListenError, Proxy

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"


async def connect_from(source: str, address: tuple[str, int]) -> RawClient:
    """A plain connection from a chosen loopback address (127.0.0.0/8 is all ours)."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(*address, local_addr=(source, 0))
    return RawClient(reader, writer)


class TestConnectionCaps:
    @pytest.mark.asyncio
    async def test_per_address_cap_refuses_with_sys_temp_and_counts(
        self, start_proxy: StartProxy, backend: MailboxServer, metrics: Metrics
    ) -> None:
        proxy = await start_proxy([backend.address], max_connections_per_ip=3)
        held = [await connect_from("127.0.0.2", proxy.starttls) for _ in range(3)]
        for client in held:
            assert await client.line() == b"+OK POP3 ready\r\n"
        over = await connect_from("127.0.0.2", proxy.starttls)
        assert await over.line() == TOO_MANY
        assert await over.at_eof()
        # Another address is not affected.
        other = await connect_from("127.0.0.3", proxy.starttls)
        assert await other.line() == b"+OK POP3 ready\r\n"
        # On the implicit-TLS port the refusal is a close, before any TLS.
        tls_over = await connect_from("127.0.0.2", proxy.implicit)
        assert await tls_over.at_eof()
        # A slot frees up when a connection ends.
        await held[0].close()
        async with asyncio.timeout(5):
            while True:
                again = await connect_from("127.0.0.2", proxy.starttls)
                line = await again.line()
                await again.close()
                if line == b"+OK POP3 ready\r\n":
                    break
        for client in [*held[1:], over, other, tls_over]:
            await client.close()
        refused = metrics.registry.get_sample_value(
            "poproxy_connections_refused_total",
            {"listener": "pop3", "reason": "max_connections_per_ip"},
        )
        assert refused is not None and refused >= 1

    @pytest.mark.asyncio
    async def test_total_cap_applies_across_addresses(
        self, start_proxy: StartProxy, backend: MailboxServer
    ) -> None:
        proxy = await start_proxy([backend.address], max_connections=4)
        held = [await connect_from(f"127.0.0.{n}", proxy.starttls) for n in range(10, 14)]
        for client in held:
            await client.line()
        over = await connect_from("127.0.0.20", proxy.starttls)
        assert await over.line() == TOO_MANY
        for client in [*held, over]:
            await client.close()

    @pytest.mark.asyncio
    async def test_trusted_networks_skip_the_per_address_cap(
        self, start_proxy: StartProxy, backend: MailboxServer
    ) -> None:
        proxy = await start_proxy(
            [backend.address], max_connections_per_ip=1, trusted_networks=("127.0.0.0/24",)
        )
        held = [await connect_from("127.0.0.5", proxy.starttls) for _ in range(3)]
        for client in held:
            assert await client.line() == b"+OK POP3 ready\r\n"
            await client.close()


@pytest.mark.asyncio
async def test_slowloris_hits_the_login_timeout_counted_from_connect(
    start_proxy: StartProxy, backend: MailboxServer
) -> None:
    proxy = await start_proxy([backend.address], login_timeout=1.0)
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        reply = asyncio.create_task(client.line())
        # One byte every 0.2 s: each is activity, none completes a line.
        sent = 0
        for byte in b"CAPABILITIES-NEVER-END":
            await client.send(bytes([byte]))
            sent += 1
            done, _ = await asyncio.wait({reply}, timeout=0.2)
            if done:
                break
        assert reply.done(), "the proxy never ended the session"
        assert reply.result() == b"-ERR Login timeout, closing connection\r\n"
        assert sent >= 4  # the dribble did not reset the timer


@pytest.mark.asyncio
async def test_guessing_client_does_not_slow_a_good_client(
    start_proxy: StartProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    """The failure delay holds only the guessing session; the loop keeps serving."""
    proxy = await start_proxy([backend.address], auth_failure_delay=3.0)
    guesser = await RawClient.connect(proxy.implicit, client_context)
    await guesser.line()
    await guesser.send(b"USER alice\r\nPASS guess1\r\n")
    assert await guesser.line() == b"+OK Send PASS\r\n"
    verdict = asyncio.create_task(guesser.line())  # held back for 3 s
    good = await RawClient.connect(proxy.implicit, client_context)
    async with good:
        await good.line()
        await good.send(b"USER bob\r\nPASS builder\r\nSTAT\r\nQUIT\r\n")
        await good.line()
        assert (await good.line()).startswith(b"+OK")
        assert (await good.line()).startswith(b"+OK 1 ")
    # The good client is done while the guesser still waits for its answer.
    assert not verdict.done()
    async with asyncio.timeout(10):
        assert await verdict == b"-ERR [AUTH] Authentication failed\r\n"
    await guesser.close()


class TestReload:
    @pytest.mark.asyncio
    async def test_reload_mid_retr_loses_no_session_and_applies_to_new_ones(
        self, certificates: Certificates, client_context: ssl.SSLContext
    ) -> None:
        big = b"Subject: big\r\n\r\n" + b"".join(
            b"%07d " % n + b"y" * 90 + b"\r\n" for n in range(50_000)
        )
        mailboxes = {b"alice": Mailbox(b"wonderland", [big, *SAMPLE_MESSAGES])}
        async with running_backend(mailboxes) as backend:
            settings = proxy_config(certificates.files, [backend.address])
            metrics = Metrics()
            proxy = Proxy(settings, tls.CertificateStore(settings.tls, "t", metrics), metrics)
            await proxy.start()
            try:
                client = await RawClient.connect(proxy.addresses["pop3s"], client_context)
                await client.line()
                await client.send(b"USER alice\r\nPASS wonderland\r\nRETR 1\r\n")
                await client.line()
                await client.line()
                assert (await client.line()).startswith(b"+OK")
                first = await client.line()  # the download is under way
                # Reload: drop the STLS listener, add another, change a limit.
                new = dataclasses.replace(
                    settings,
                    listeners=(
                        settings.listeners[0],
                        config.Listener("extra", config.Address("127.0.0.1", 0), "starttls"),
                    ),
                    limits=dataclasses.replace(settings.limits, max_errors=1),
                )
                await proxy.reload(new)
                body = [first, *await client.multiline()]
                assert b"".join(body) == big
                async with client:
                    assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
                assert "pop3" not in proxy.addresses
                async with await RawClient.connect(proxy.addresses["extra"]) as fresh:
                    await fresh.line()
                    # max_errors: 1 applies to the new session.
                    assert await fresh.command(b"XYZZY\r\n") == (
                        b"-ERR Too many errors, closing connection\r\n"
                    )
            finally:
                await proxy.shutdown(grace=0)

    @pytest.mark.asyncio
    async def test_a_reload_that_cannot_bind_keeps_everything(
        self, start_proxy: StartProxy, backend: MailboxServer
    ) -> None:
        proxy = await start_proxy([backend.address])
        taken = proxy.implicit
        settings = proxy.proxy.config
        bad = dataclasses.replace(
            settings,
            listeners=(
                *settings.listeners,
                config.Listener("clash", config.Address(*taken), "implicit"),
            ),
            limits=dataclasses.replace(settings.limits, max_errors=1),
        )
        with pytest.raises(ListenError):
            await proxy.proxy.reload(bad)
        assert proxy.proxy.config is settings
        async with await RawClient.connect(proxy.starttls) as client:
            await client.line()
            assert await client.command(b"XYZZY\r\n") == b"-ERR Unknown command\r\n"
