"""The Dovecot launcher serves what it was given, keeps RFC 1939 deletion rules, and cleans up.

Talks to Dovecot directly with poplib and plain sockets, without the proxy: these tests pin
down the backend that the interop tests put behind poproxy, including how Dovecot 2.3 takes
a client's address from a PROXY protocol header or from XCLIENT, and what it logs.
"""

from __future__ import annotations

import contextlib
import poplib
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.dovecot import Dovecot, running_dovecot

pytestmark = pytest.mark.interop

USER = "alice"
PASSWORD = "wonderland"
POP3_TIMEOUT = 5.0  # every poplib read and write

# CRLF lines, some starting with "." so that Dovecot must dot-stuff them (RFC 1939 §3).
MESSAGE_DOTS = (
    b"From: Carol <carol@example.org>\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)
# LF lines of 8-bit UTF-8: stored as given, served as CRLF lines.
MESSAGE_UTF8 = (
    "From: Dana <dana@example.org>\n"
    "Subject: utf-8\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "Grüße aus Köln — naïve café ✓\n"
).encode()
MESSAGES = [MESSAGE_DOTS, MESSAGE_UTF8]

# Documentation addresses (RFC 5737): clients the proxy would speak for.
PROXIED_IP = "203.0.113.7"
XCLIENT_IP = "203.0.113.8"
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with running_dovecot(tmp_path, {USER: (PASSWORD, MESSAGES)}) as server:
        yield server


@pytest.fixture
def haproxy_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with running_dovecot(tmp_path, {USER: (PASSWORD, MESSAGES)}, haproxy=True) as server:
        yield server


@contextlib.contextmanager
def logged_in(
    dovecot: Dovecot, user: str = USER, password: str = PASSWORD
) -> Iterator[poplib.POP3]:
    """A TRANSACTION-state session; closed without QUIT unless the test sends QUIT."""
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=POP3_TIMEOUT)
    try:
        pop.user(user)
        pop.pass_(password)
        yield pop
    finally:
        pop.close()  # no QUIT: after pop.quit() this only finds nothing left to close


class LineClient:
    """POP3 over a plain socket, for what poplib cannot send: bytes before the greeting,
    and commands it does not know (XCLIENT). Every read waits at most POP3_TIMEOUT."""

    def __init__(self, dovecot: Dovecot, preamble: bytes = b"") -> None:
        self.sock = socket.create_connection((dovecot.host, dovecot.port), timeout=POP3_TIMEOUT)
        try:
            self.sock.sendall(preamble)
        except BaseException:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")

    def reply(self) -> bytes:
        line = self.reader.readline(512)
        assert line.endswith(b"\r\n"), f"no complete reply line: {line!r}"
        return line

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def log_in(self) -> None:
        assert self.command(f"USER {USER}").startswith(b"+OK")
        assert self.command(f"PASS {PASSWORD}") == b"+OK Logged in.\r\n"

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@contextlib.contextmanager
def line_client(dovecot: Dovecot, preamble: bytes = b"") -> Iterator[LineClient]:
    client = LineClient(dovecot, preamble)
    try:
        yield client
    finally:
        client.close()


def proxy_v2_header(source: str, source_port: int, destination: str, port: int) -> bytes:
    """PROXY protocol v2, by hand: command PROXY over TCP/IPv4 (proxy-protocol.txt §2.2)."""
    addresses = socket.inet_aton(source) + socket.inet_aton(destination)
    addresses += struct.pack("!HH", source_port, port)
    assert len(addresses) == 12
    # 0x21: version 2, command PROXY. 0x11: AF_INET, STREAM. Then the address block's length.
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 12) + addresses


def proxy_v1_header(source: str, source_port: int, destination: str, port: int) -> bytes:
    """PROXY protocol v1: one text line (proxy-protocol.txt §2.1)."""
    return f"PROXY TCP4 {source} {destination} {source_port} {port}\r\n".encode()


def fetch_all(dovecot: Dovecot, user: str, password: str) -> list[bytes]:
    """The user's messages as served: CRLF lines, dot-stuffing removed."""
    with logged_in(dovecot, user, password) as pop:
        count, _ = pop.stat()
        messages = [
            b"".join(line + b"\r\n" for line in pop.retr(number)[1])
            for number in range(1, count + 1)
        ]
        pop.quit()
    return messages


def test_retr_serves_messages_as_stored(dovecot: Dovecot) -> None:
    with logged_in(dovecot) as pop:
        _, listing, _ = pop.list()
        assert len(listing) == len(MESSAGES)
        for number, message in enumerate(MESSAGES, start=1):
            _, lines, _ = pop.retr(number)
            # poplib has removed the dot-stuffing and the CRLFs.
            assert lines == message.splitlines()
        _, uidls, _ = pop.uidl()
        # pop3_uidl_format = %g: a Maildir message's UIDL is its base file name.
        assert uidls == [b"1 000001.poproxy-test", b"2 000002.poproxy-test"]
        pop.quit()


def test_dele_then_quit_removes_the_file(dovecot: Dovecot) -> None:
    with logged_in(dovecot) as pop:
        pop.dele(1)
        pop.quit()  # RFC 1939 §6: UPDATE state, the deletion happens now

    files = dovecot.message_files(USER)
    assert [path.read_bytes() for path in files] == [MESSAGE_UTF8]


def test_dele_without_quit_keeps_the_file(dovecot: Dovecot) -> None:
    with logged_in(dovecot) as pop:
        pop.dele(1)
    # The connection closed without QUIT: RFC 1939 §6 says no UPDATE state, nothing deleted.
    dovecot.wait_sessions_closed()

    files = dovecot.message_files(USER)
    assert [path.read_bytes() for path in files] == MESSAGES
    with logged_in(dovecot) as pop:
        assert pop.stat()[0] == len(MESSAGES)
        pop.quit()


def test_stop_leaves_no_process(dovecot: Dovecot) -> None:
    with logged_in(dovecot):
        running = dovecot.processes()
        assert dovecot.pid in running
        assert dovecot.session_processes()
        # Stopped with a session open: Dovecot must take the session's process down too.
        dovecot.stop()

    # processes() scans all of /proc for the group, so it covers every PID in `running`.
    assert dovecot.processes() == []
    dovecot.stop()  # again, as the fixture will: nothing left to do


def test_instances_run_side_by_side(tmp_path: Path) -> None:
    mailboxes = {
        name: (f"{name}pw", [f"Subject: for {name}\r\n\r\nbody {name}\r\n".encode()])
        for name in ("amy", "ben", "cat")
    }
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(running_dovecot(where, {name: mailboxes[name]}, name=name))
            # A sub-directory that does not exist yet works as well as tmp_path itself.
            for name, where in (("amy", tmp_path), ("ben", tmp_path), ("cat", tmp_path / "c"))
        }
        assert len({server.port for server in servers.values()}) == len(servers)
        assert len({server.root for server in servers.values()}) == len(servers)

        for name, server in servers.items():
            password, messages = mailboxes[name]
            assert fetch_all(server, name, password) == messages

        servers["ben"].stop()
        assert servers["ben"].processes() == []
        for name in ("amy", "cat"):
            password, messages = mailboxes[name]
            assert fetch_all(servers[name], name, password) == messages


def test_greeting_announces_xclient_to_trusted_networks(dovecot: Dovecot) -> None:
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=POP3_TIMEOUT)
    try:
        assert b"[XCLIENT]" in pop.getwelcome()
        pop.quit()
    finally:
        pop.close()


def test_no_trusted_networks_means_no_xclient(tmp_path: Path) -> None:
    users = {USER: (PASSWORD, MESSAGES)}
    with running_dovecot(tmp_path, users, trusted_networks=None) as server:
        with line_client(server) as client:
            greeting = client.reply()
            assert greeting.startswith(b"+OK")
            assert b"[XCLIENT]" not in greeting
            # Dovecot 2.3 answers +OK even so: only the greeting tells that it was ignored.
            reply = client.command(f"XCLIENT ADDR={XCLIENT_IP} PORT=4242")
            assert reply == b"+OK You are not from trusted IP - ignoring\r\n"
            client.log_in()
            assert client.command("QUIT").startswith(b"+OK")
        server.wait_login_lines(1)
        assert server.remote_ips() == ["127.0.0.1"]


def test_xclient_from_trusted_network_sets_the_logged_address(dovecot: Dovecot) -> None:
    with line_client(dovecot) as client:
        assert b"[XCLIENT]" in client.reply()
        assert client.command(f"XCLIENT ADDR={XCLIENT_IP} PORT=4242") == b"+OK Updated\r\n"
        client.log_in()
        assert client.command("QUIT").startswith(b"+OK")

    [line] = dovecot.wait_login_lines(1)
    assert f"user=<{USER}>" in line
    assert f"rip={XCLIENT_IP}," in line
    assert dovecot.remote_ips() == [XCLIENT_IP]


def test_xclient_with_a_bad_port_is_refused(dovecot: Dovecot) -> None:
    with line_client(dovecot) as client:
        client.reply()
        assert client.command(f"XCLIENT ADDR={XCLIENT_IP} PORT=99999") == (
            b"-ERR Invalid parameters\r\n"
        )


@pytest.mark.parametrize("header", [proxy_v2_header, proxy_v1_header])
def test_haproxy_header_sets_the_logged_address(
    haproxy_dovecot: Dovecot, header: Callable[[str, int, str, int], bytes]
) -> None:
    preamble = header(PROXIED_IP, 40000, haproxy_dovecot.host, haproxy_dovecot.port)
    with line_client(haproxy_dovecot, preamble) as client:
        greeting = client.reply()
        assert greeting.startswith(b"+OK")
        # Dovecot judges trust by the address in the header: 203.0.113.7 is not trusted.
        assert b"[XCLIENT]" not in greeting
        client.log_in()
        assert client.command("QUIT").startswith(b"+OK")

    [line] = haproxy_dovecot.wait_login_lines(1)
    assert f"rip={PROXIED_IP}," in line
    assert haproxy_dovecot.remote_ips() == [PROXIED_IP]


def test_haproxy_listener_closes_a_connection_without_header(haproxy_dovecot: Dovecot) -> None:
    with line_client(haproxy_dovecot, f"USER {USER}\r\n".encode()) as client:
        received = b""
        with contextlib.suppress(ConnectionResetError):  # Dovecot leaves our USER unread
            while chunk := client.sock.recv(512):  # EOF ends it; a timeout would fail it
                received += chunk
    assert received == b""  # not even a greeting
    assert haproxy_dovecot.login_lines() == []


def test_restart_keeps_the_port_and_serves_again(dovecot: Dovecot) -> None:
    port, pid = dovecot.port, dovecot.pid
    with logged_in(dovecot) as pop:
        pop.dele(1)
        pop.quit()

    dovecot.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((dovecot.host, port), timeout=POP3_TIMEOUT).close()

    dovecot.start()
    assert dovecot.port == port
    assert dovecot.pid != pid
    # Same mail: the deletion committed before the restart stays.
    assert fetch_all(dovecot, USER, PASSWORD) == [MESSAGE_UTF8.replace(b"\n", b"\r\n")]

    dovecot.restart()
    assert dovecot.port == port
    with logged_in(dovecot) as pop:
        assert pop.stat()[0] == 1
        pop.quit()
    # The log, and so login_lines(), covers every run.
    assert len(dovecot.wait_login_lines(3)) == 3
