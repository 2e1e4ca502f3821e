"""Bad input, vanishing clients, failing backends: a clear -ERR or a clean close, no loss."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import ssl

import pytest
from support.clients import RawClient
from support.fake_backend import ALICE, running_backend
from support.proxy import Certificates, RunningProxy, StartProxy, proxy_config, running_proxy

from poproxy.demo import SAMPLE_MESSAGES, MailboxServer

LOGIN = b"USER alice\r\nPASS wonderland\r\n"


async def logged_in(proxy: RunningProxy, context: ssl.SSLContext) -> RawClient:
    client = await RawClient.connect(proxy.implicit, context)
    await client.line()
    await client.send(LOGIN)
    assert await client.line() == b"+OK Send PASS\r\n"
    assert (await client.line()).startswith(b"+OK")
    return client


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class TestClientGoneBeforeQuit:
    """RFC 1939 section 6: without QUIT the backend never enters UPDATE; no DELE is committed."""

    @pytest.mark.asyncio
    async def test_reset_after_dele_keeps_the_message(
        self, proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
    ) -> None:
        client = await logged_in(proxy, client_context)
        assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
        client.reset()
        async with asyncio.timeout(5):
            await backend.wait_sessions_closed(1)
        assert backend.quit_count == 0
        assert b"QUIT" not in backend.received
        assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES)

    @pytest.mark.asyncio
    async def test_clean_close_after_dele_keeps_the_message(
        self, proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
    ) -> None:
        client = await logged_in(proxy, client_context)
        assert (await client.command(b"DELE 2\r\n")).startswith(b"+OK")
        await client.close()
        async with asyncio.timeout(5):
            await backend.wait_sessions_closed(1)
        assert backend.quit_count == 0
        assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES)

    @pytest.mark.asyncio
    async def test_idle_timeout_keeps_the_message(
        self, start_proxy: StartProxy, backend: MailboxServer, client_context: ssl.SSLContext
    ) -> None:
        proxy = await start_proxy([backend.address], idle_timeout=0.3)
        client = await logged_in(proxy, client_context)
        async with client:
            assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
            assert await client.at_eof()  # the proxy ends the idle session
        async with asyncio.timeout(5):
            await backend.wait_sessions_closed(1)
        assert backend.quit_count == 0
        assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES)

    @pytest.mark.asyncio
    async def test_quit_commits(
        self, proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
    ) -> None:
        client = await logged_in(proxy, client_context)
        async with client:
            assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
            assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
            assert await client.at_eof()
        async with asyncio.timeout(5):
            await backend.wait_sessions_closed(1)
        assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES[1:])


class TestBackendFailures:
    @pytest.mark.asyncio
    async def test_backend_down_gives_sys_temp_and_the_proxy_stays_up(
        self, start_proxy: StartProxy, client_context: ssl.SSLContext
    ) -> None:
        proxy = await start_proxy([("127.0.0.1", free_port())])
        for _ in range(2):
            async with await RawClient.connect(proxy.implicit, client_context) as client:
                await client.line()
                await client.send(LOGIN)
                await client.line()
                assert await client.line() == (
                    b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n"
                )
                # Still in AUTHORIZATION: the client may try again or quit.
                assert await client.command(b"QUIT\r\n") == b"+OK Bye\r\n"

    @pytest.mark.asyncio
    async def test_a_backend_that_never_answers_times_out_with_sys_temp(
        self, certificates: Certificates, client_context: ssl.SSLContext
    ) -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # no greeting, ever

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        settings = proxy_config(certificates.files, [server.sockets[0].getsockname()[:2]])
        backend = dataclasses.replace(settings.backends[0], reply_timeout=0.2)
        settings = dataclasses.replace(settings, backends=(backend,))
        try:
            async with running_proxy(settings) as running:
                client = await RawClient.connect(running.addresses["pop3s"], client_context)
                async with client:
                    await client.line()
                    await client.send(LOGIN)
                    await client.line()
                    async with asyncio.timeout(5):
                        assert await client.line() == (
                            b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n"
                        )
                    assert await client.command(b"QUIT\r\n") == b"+OK Bye\r\n"
                assert len(accepted) == 1
        finally:
            for writer in accepted:
                writer.close()
            server.close()

    @pytest.mark.asyncio
    async def test_next_server_is_tried_when_one_is_down(
        self, start_proxy: StartProxy, backend: MailboxServer, client_context: ssl.SSLContext
    ) -> None:
        proxy = await start_proxy([("127.0.0.1", free_port()), backend.address])
        for _ in range(2):  # round robin starts once at each server
            client = await logged_in(proxy, client_context)
            async with client:
                assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
        assert backend.connections == 2

    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        ("backend_reply", "client_reply"),
        [
            (
                b"-ERR [IN-USE] alice is being read by pid 4242\r\n",
                b"-ERR [IN-USE] Mailbox in use by another session\r\n",
            ),
            (
                b"-ERR [LOGIN-DELAY] wait 600s, alice\r\n",
                b"-ERR [LOGIN-DELAY] Logged in too recently\r\n",
            ),
            (
                b"-ERR [SYS/TEMP/DISK] disk full on /var/mail\r\n",
                b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n",
            ),
            (b"-ERR [SYS/PERM] account locked\r\n", b"-ERR [SYS/PERM] Mailbox unavailable\r\n"),
            (b"-ERR no such user alice\r\n", b"-ERR [AUTH] Authentication failed\r\n"),
        ],
    )
    async def test_backend_refusal_keeps_the_code_and_hides_the_text(
        self,
        start_proxy: StartProxy,
        client_context: ssl.SSLContext,
        backend_reply: bytes,
        client_reply: bytes,
    ) -> None:
        async with running_backend(login_error=backend_reply) as backend:
            proxy = await start_proxy([backend.address])
            async with await RawClient.connect(proxy.implicit, client_context) as client:
                await client.line()
                await client.send(LOGIN)
                await client.line()
                assert await client.line() == client_reply

    @pytest.mark.asyncio
    async def test_wrong_password_and_unknown_user_look_the_same(
        self, proxy: RunningProxy, client_context: ssl.SSLContext
    ) -> None:
        replies = []
        for login in (b"USER alice\r\nPASS wrong\r\n", b"USER nobody\r\nPASS wonderland\r\n"):
            async with await RawClient.connect(proxy.implicit, client_context) as client:
                await client.line()
                await client.send(login)
                replies.append((await client.line(), await client.line()))
        assert replies[0] == replies[1]
        assert replies[0][1] == b"-ERR [AUTH] Authentication failed\r\n"

    @pytest.mark.asyncio
    async def test_backend_dying_mid_retr_flushes_what_it_sent_and_closes(
        self, start_proxy: StartProxy, client_context: ssl.SSLContext
    ) -> None:
        async with running_backend(die_mid_retr=True) as backend:
            proxy = await start_proxy([backend.address])
            client = await logged_in(proxy, client_context)
            async with client:
                await client.send(b"RETR 1\r\n")
                received = b""
                while chunk := await client.line():
                    received += chunk
        # What the backend sent before dying reached the client, then a close.
        assert received.startswith(b"+OK")
        assert SAMPLE_MESSAGES[0][:20] in received
        assert not received.endswith(b"\r\n.\r\n")

    @pytest.mark.asyncio
    async def test_too_many_failed_logins_close_the_connection(
        self, proxy: RunningProxy, client_context: ssl.SSLContext
    ) -> None:
        async with await RawClient.connect(proxy.implicit, client_context) as client:
            await client.line()
            for _ in range(3):
                await client.send(b"USER alice\r\nPASS wrong\r\n")
                await client.line()
                assert await client.line() == b"-ERR [AUTH] Authentication failed\r\n"
            assert await client.at_eof()


class TestBadInput:
    @pytest.mark.asyncio
    async def test_100kb_line_without_crlf_is_refused_and_closed(
        self, proxy: RunningProxy, backend: MailboxServer
    ) -> None:
        async with await RawClient.connect(proxy.starttls) as client:
            await client.line()
            client.writer.write(b"A" * 100_000)
            assert await client.line() == b"-ERR Line too long, closing connection\r\n"
            assert await client.at_eof()
        assert backend.connections == 0

    @pytest.mark.asyncio
    async def test_binary_garbage_gets_errors_then_a_close(self, proxy: RunningProxy) -> None:
        async with await RawClient.connect(proxy.starttls) as client:
            await client.line()
            await client.send(bytes(range(256)) * 4 + b"\r\n" + b"\xff\xfe\x00\r\n" * 10)
            replies = []
            while line := await client.line():
                replies.append(line)
            assert replies[-1] == b"-ERR Too many errors, closing connection\r\n"
            assert all(reply.startswith(b"-ERR") for reply in replies)

    @pytest.mark.asyncio
    async def test_malformed_sasl_is_an_error_not_a_crash(
        self, proxy: RunningProxy, client_context: ssl.SSLContext
    ) -> None:
        async with await RawClient.connect(proxy.implicit, client_context) as client:
            await client.line()
            assert await client.command(b"AUTH PLAIN !!notbase64\r\n") == (
                b"-ERR Malformed SASL response\r\n"
            )
            injected = base64.b64encode(b"\0alice\0pw\r\nDELE 1")
            assert await client.command(b"AUTH PLAIN " + injected + b"\r\n") == (
                b"-ERR Invalid credentials syntax\r\n"
            )
            assert await client.command(b"QUIT\r\n") == b"+OK Bye\r\n"

    @pytest.mark.asyncio
    async def test_login_timeout_closes_a_silent_client(
        self, start_proxy: StartProxy, backend: MailboxServer
    ) -> None:
        proxy = await start_proxy([backend.address], login_timeout=0.3)
        async with await RawClient.connect(proxy.starttls) as client:
            assert await client.line() == b"+OK POP3 ready\r\n"
            assert await client.line() == b"-ERR Login timeout, closing connection\r\n"
            assert await client.at_eof()

    @pytest.mark.asyncio
    async def test_stalled_tls_handshake_is_closed(
        self, start_proxy: StartProxy, backend: MailboxServer
    ) -> None:
        proxy = await start_proxy([backend.address], handshake_timeout=0.3)
        async with await RawClient.connect(proxy.implicit) as client:
            # A TLS record header announcing 512 bytes that never come.
            await client.send(b"\x16\x03\x01\x02\x00")
            assert await client.at_eof()

    @pytest.mark.asyncio
    async def test_garbage_on_the_implicit_port_fails_the_handshake_quietly(
        self, proxy: RunningProxy, client_context: ssl.SSLContext, caplog: pytest.LogCaptureFixture
    ) -> None:
        async with await RawClient.connect(proxy.implicit) as client:
            # A TLS handshake record holding no ClientHello.
            await client.send(b"\x16\x03\x01\x00\x08" + b"\x02" * 8)
            assert await client.at_eof()
        # The proxy still serves TLS clients, and logged no traceback.
        good = await logged_in(proxy, client_context)
        await good.close()
        assert not any(record.exc_info for record in caplog.records)
