"""The in-memory POP3 backend (`poproxy.demo.MailboxServer`) as an async context manager.

Each use gets fresh mailboxes, a server on 127.0.0.1 port 0, and a stop at exit.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from poproxy.demo import SAMPLE_MESSAGES, Mailbox, MailboxServer

ALICE = b"alice"
ALICE_PASSWORD = b"wonderland"
BOB = b"bob"
BOB_PASSWORD = b"builder"
BOB_MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: Tea\r\n\r\n"
    b"Tea at four?\r\n"
)


def default_mailboxes() -> dict[bytes, Mailbox]:
    return {
        ALICE: Mailbox(password=ALICE_PASSWORD, messages=list(SAMPLE_MESSAGES)),
        BOB: Mailbox(password=BOB_PASSWORD, messages=[BOB_MESSAGE]),
    }


@asynccontextmanager
async def running_backend(
    mailboxes: dict[bytes, Mailbox] | None = None,
    *,
    login_error: bytes | None = None,
    die_mid_retr: bool = False,
) -> AsyncIterator[MailboxServer]:
    """A started MailboxServer (its `address` is set); the faults are MailboxServer's."""
    server = MailboxServer(
        default_mailboxes() if mailboxes is None else mailboxes,
        login_error=login_error,
        die_mid_retr=die_mid_retr,
    )
    await server.start(host="127.0.0.1", port=0)
    try:
        yield server
    finally:
        await server.stop()
