"""MailboxServer over real loopback sockets: poplib (run in a thread) and raw byte clients."""

import asyncio
import poplib
from collections.abc import Callable
from typing import TypeVar, cast

import pytest
from support.fake_backend import ALICE, ALICE_PASSWORD, BOB, BOB_PASSWORD, running_backend

from poproxy.demo import SAMPLE_MESSAGES, Mailbox, MailboxServer, dot_stuffed, top

CLIENT_TIMEOUT = 5.0  # seconds: poplib's socket timeout and the bound on every wait here

T = TypeVar("T")


async def in_thread(
    session: Callable[[poplib.POP3], T],
    server: MailboxServer,
    user: bytes = ALICE,
    password: bytes = ALICE_PASSWORD,
) -> T:
    """Log in with poplib in a thread, run `session`, then close the socket."""

    def run() -> T:
        client = poplib.POP3(*server.address, timeout=CLIENT_TIMEOUT)
        try:
            client.user(user.decode())
            client.pass_(password.decode())
            return session(client)
        finally:
            client.close()

    async with asyncio.timeout(CLIENT_TIMEOUT):
        return await asyncio.to_thread(run)


def as_bytes(lines: list[bytes]) -> bytes:
    """poplib's un-dot-stuffed lines back into the message, CRLF-terminated."""
    return b"".join(line + b"\r\n" for line in lines)


@pytest.mark.asyncio
async def test_login_stat_and_quit() -> None:
    async with running_backend() as server:
        stat = await in_thread(lambda client: (client.stat(), client.quit()), server)
    assert stat == ((3, sum(map(len, SAMPLE_MESSAGES))), b"+OK bye")
    assert server.connections == 1
    assert server.quit_count == 1


@pytest.mark.asyncio
async def test_capa_lists_the_extensions() -> None:
    async with running_backend() as server:
        capa = await in_thread(lambda client: client.capa(), server)
    assert set(capa) == {"TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"}


@pytest.mark.asyncio
async def test_list_and_uidl() -> None:
    async with running_backend() as server:
        listing, one, uidl, uid_two = await in_thread(
            # typeshed types LIST with an argument as multi-line; it is a single line.
            lambda client: (
                client.list(),
                cast(bytes, client.list(2)),
                client.uidl(),
                client.uidl(2),
            ),
            server,
        )
    sizes = [b"%d %d" % (n, len(message)) for n, message in enumerate(SAMPLE_MESSAGES, 1)]
    assert listing[1] == sizes
    assert one == b"+OK " + sizes[1]
    uids = [line.split()[1] for line in uidl[1]]
    assert len(set(uids)) == 3
    assert uid_two == b"+OK 2 " + uids[1]


@pytest.mark.asyncio
async def test_retr_returns_every_message_byte_for_byte() -> None:
    async with running_backend() as server:
        retrieved = await in_thread(lambda client: [client.retr(n)[1] for n in (1, 2, 3)], server)
    assert [as_bytes(lines) for lines in retrieved] == list(SAMPLE_MESSAGES)
    assert b". leading dot" in retrieved[1]
    assert b"..two dots" in retrieved[1]
    assert "Grüße aus Köln — ✓".encode() in retrieved[2]


@pytest.mark.asyncio
async def test_top_returns_headers_and_first_body_lines() -> None:
    async with running_backend() as server:
        response, lines, _ = await in_thread(lambda client: client.top(2, 2), server)
    head = SAMPLE_MESSAGES[1].partition(b"\r\n\r\n")[0]
    assert response.startswith(b"+OK")
    assert (
        as_bytes(lines)
        == head + b"\r\n\r\n" + b"The next lines start with dots:\r\n. leading dot\r\n"
    )


def test_dot_stuffing_and_missing_final_crlf() -> None:
    assert dot_stuffed(b".a\r\nb\r\n..c\r\n") == b"..a\r\nb\r\n...c\r\n.\r\n"
    assert dot_stuffed(b"no final line end") == b"no final line end\r\n.\r\n"
    assert dot_stuffed(b"") == b".\r\n"
    assert top(b"H: v\r\n\r\nA\r\nB\r\n", 0) == b"H: v\r\n\r\n"
    assert top(b"H: v\r\n\r\nA\r\nB\r\n", 9) == b"H: v\r\n\r\nA\r\nB\r\n"


@pytest.mark.asyncio
async def test_dele_then_quit_removes_the_message() -> None:
    async with running_backend() as server:
        await in_thread(lambda client: (client.dele(1), client.quit()), server)
        assert server.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES[1:])
        stat = await in_thread(lambda client: client.stat(), server)
    assert stat == (2, sum(map(len, SAMPLE_MESSAGES[1:])))


@pytest.mark.asyncio
async def test_dele_then_close_without_quit_keeps_the_message() -> None:
    async with running_backend() as server:
        await in_thread(lambda client: client.dele(1), server)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await server.wait_sessions_closed(1)
        mailbox = server.mailboxes[ALICE]
        assert mailbox.messages == list(SAMPLE_MESSAGES)
        assert not mailbox.locked
        assert server.quit_count == 0


@pytest.mark.asyncio
async def test_rset_unmarks_deleted_messages() -> None:
    async with running_backend() as server:
        stats = await in_thread(
            lambda client: (client.dele(1), client.stat(), client.rset(), client.stat()), server
        )
    assert stats[1][0] == 2
    assert stats[3][0] == 3


@pytest.mark.asyncio
@pytest.mark.parametrize(("user", "password"), [(ALICE, BOB_PASSWORD), (b"nobody", b"x")])
async def test_bad_credentials_are_refused_with_auth_code(user: bytes, password: bytes) -> None:
    async with running_backend() as server:
        with pytest.raises(poplib.error_proto) as refused:
            await in_thread(lambda client: None, server, user, password)
        assert await in_thread(lambda client: client.noop(), server) == b"+OK"
    assert refused.value.args == (b"-ERR [AUTH] invalid credentials",)


@pytest.mark.asyncio
async def test_second_session_finds_the_mailbox_in_use() -> None:
    async with running_backend() as server:

        def second_login(first: poplib.POP3) -> bytes:
            with pytest.raises(poplib.error_proto) as refused:
                in_use = poplib.POP3(*server.address, timeout=CLIENT_TIMEOUT)
                try:
                    in_use.user(ALICE.decode())
                    in_use.pass_(ALICE_PASSWORD.decode())
                finally:
                    in_use.close()
            return bytes(refused.value.args[0])

        assert await in_thread(second_login, server) == b"-ERR [IN-USE] mailbox locked"


@pytest.mark.asyncio
async def test_pipelined_commands_are_answered_in_order() -> None:
    async with running_backend() as server, asyncio.timeout(CLIENT_TIMEOUT):
        reader, writer = await asyncio.open_connection(*server.address)
        # One write, one segment; a bare LF is tolerated.
        writer.write(
            b"CAPA\r\nUSER bob\r\nPASS builder\r\nSTAT\r\nLIST 1\r\nNOOP\nRETR 9\r\n"
            b"BOGUS\r\nQUIT\r\nNOOP\r\n"
        )
        await writer.drain()
        replies = await reader.read()
        writer.close()
        await writer.wait_closed()
    size = len(server.mailboxes[BOB].messages[0])
    assert replies == (
        b"+OK demo POP3 ready\r\n"
        b"+OK capability list follows\r\n"
        b"TOP\r\nUIDL\r\nUSER\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n.\r\n"
        b"+OK send PASS\r\n"
        b"+OK mailbox ready\r\n"
        b"+OK 1 %d\r\n"
        b"+OK 1 %d\r\n"
        b"+OK\r\n"
        b"-ERR no such message\r\n"
        b"-ERR unknown command or bad arguments\r\n"
        b"+OK bye\r\n" % (size, size)
    )
    assert server.received[:3] == [b"CAPA", b"USER bob", b"PASS " + BOB_PASSWORD]


@pytest.mark.asyncio
async def test_retr_sends_dot_stuffed_lines_on_the_wire() -> None:
    async with running_backend() as server, asyncio.timeout(CLIENT_TIMEOUT):
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"USER alice\r\nPASS wonderland\r\nRETR 2\r\nQUIT\r\n")
        replies = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert (
        b"\r\n.. leading dot\r\n...two dots\r\n..signature follows\r\n.\r\n+OK bye\r\n" in replies
    )


@pytest.mark.asyncio
async def test_login_error_answers_every_pass() -> None:
    reply = b"-ERR [IN-USE] something backend-specific\r\n"
    async with running_backend(login_error=reply) as server:
        with pytest.raises(poplib.error_proto) as refused:
            await in_thread(lambda client: None, server)
    assert refused.value.args == (reply.rstrip(b"\r\n"),)


@pytest.mark.asyncio
async def test_die_mid_retr_breaks_the_client() -> None:
    async with running_backend(die_mid_retr=True) as server:
        with pytest.raises((poplib.error_proto, OSError)):
            await in_thread(lambda client: client.retr(1), server)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await server.wait_sessions_closed(1)
        assert server.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES)


@pytest.mark.asyncio
async def test_stop_aborts_open_connections() -> None:
    mailboxes = {ALICE: Mailbox(password=ALICE_PASSWORD, messages=[])}
    async with running_backend(mailboxes) as server, asyncio.timeout(CLIENT_TIMEOUT):
        reader, writer = await asyncio.open_connection(*server.address)
        assert await reader.readline() == b"+OK demo POP3 ready\r\n"
        await server.stop()
        assert server.sessions_closed == 1
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
        writer.close()
