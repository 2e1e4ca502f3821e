"""The Dovecot launcher serves what it was given, keeps RFC 1939 deletion rules, and cleans up.

Talks to Dovecot directly with poplib, without the proxy: these tests pin down the backend
that the interop tests put behind poproxy.
"""

from __future__ import annotations

import contextlib
import poplib
from collections.abc import Iterator
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


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with running_dovecot(tmp_path, {USER: (PASSWORD, MESSAGES)}) as server:
        yield server


@contextlib.contextmanager
def logged_in(dovecot: Dovecot) -> Iterator[poplib.POP3]:
    """A TRANSACTION-state session; closed without QUIT unless the test sends QUIT."""
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=POP3_TIMEOUT)
    try:
        pop.user(USER)
        pop.pass_(PASSWORD)
        yield pop
    finally:
        pop.close()  # no QUIT: after pop.quit() this only finds nothing left to close


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
