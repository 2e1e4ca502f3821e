"""Real mail clients through poproxy to real POP3 servers: every backend x every client.

Each cell (a backend, a client) is checked four ways, a test each:

* keep: the client, in keep mode, receives every message byte for byte as the backend stores
  it, once the backend's serving rule (pop3_servers, ``Rules``) and the client's storing rule
  (clients, ``Client.rule``) are applied; the mailbox is unchanged afterwards;
* delete: the same in delete mode, and the mailbox is empty after the client's QUIT;
* killed: the client, in delete mode, is SIGKILLed in the middle of the 5 MB message (the
  tap between poproxy and the backend holds the download there): every message is still on
  the backend, including those it had sent DELE for;
* no_tls: the client with TLS turned off cannot log in, and the backend sees no connection.

The backend runs for the whole module (one per parameter); poproxy is started per test, in
front of the backend's tap. With TLS turned off, a client configured for POP3S (port 995)
talks plaintext to the POP3S port, and one configured for STLS to the STLS port.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from support.pop3_servers import Pop3Backend, Tap
from support.proxy import Certificates, RunningProxy, proxy_config, running_proxy

from .clients import CLIENTS, Client, Result, Target, run, start
from .conftest import matrix_check
from .messages import MESSAGES

pytestmark = pytest.mark.interop

HOLD_AFTER = 1_000_000  # bytes of the backend's: inside the 5 MB message, the fourth
HOLD_TIMEOUT = 60.0  # until the client's download reaches them
PLAINTEXT_HINT_AFTER = 0.25  # seconds; poproxy's default is 2 s

ALL_CLIENTS = list(CLIENTS)
CLIENTS_WITHOUT_TLS = [key for key, client in CLIENTS.items() if not client.no_tls_unsupported]


@dataclass(frozen=True)
class Mailbox:
    stored: list[bytes]  # as the backend stores them, in POP3 order
    served: list[bytes]  # what RETR gives for each, un-dot-stuffed


@pytest.fixture
def mailbox(backend: Pop3Backend, tap: Tap) -> Mailbox:
    """The backend's mailbox, filled afresh with the fixed messages."""
    tap.wait_idle()
    backend.wait_sessions_closed()
    backend.fill([message for _, message in MESSAGES])
    stored = backend.stored()
    assert len(stored) == len(MESSAGES), f"{backend.key} stored {len(stored)} messages"
    return Mailbox(stored, [backend.served(message) for message in stored])


@pytest_asyncio.fixture
async def proxy(
    certificates: Certificates, tap: Tap, mailbox: Mailbox
) -> AsyncIterator[RunningProxy]:
    """poproxy as the suite runs it (support.proxy), in front of the backend's tap; only the
    POP3S listener tells a plaintext client to use TLS sooner than its default 2 s."""
    settings = proxy_config(certificates.files, [tap.address])
    listeners = tuple(
        dataclasses.replace(listener, plaintext_hint_after=PLAINTEXT_HINT_AFTER)
        for listener in settings.listeners
    )
    async with running_proxy(dataclasses.replace(settings, listeners=listeners)) as server:
        yield RunningProxy(server)


@pytest.fixture
def target(
    proxy: RunningProxy, certificates: Certificates, backend: Pop3Backend, mailbox: Mailbox
) -> Target:
    return Target(
        implicit=proxy.implicit,
        starttls=proxy.starttls,
        ca_file=certificates.ca_file,
        user=backend.user,
        password=backend.password,
        count=len(mailbox.stored),
    )


def same_messages(got: list[bytes], expected: list[bytes]) -> str | None:
    """None when equal; else a short account of the first difference (no 5 MB diffs)."""
    if len(got) != len(expected):
        return f"{len(got)} messages, not {len(expected)} (sizes {[len(m) for m in got]})"
    for number, (have, want) in enumerate(zip(got, expected, strict=True), start=1):
        if have == want:
            continue
        offset = next(
            (i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b),
            min(len(have), len(want)),
        )
        return (
            f"message {number}: {len(have)} bytes, expected {len(want)}; first difference at "
            f"byte {offset}: got {have[max(0, offset - 30) : offset + 30]!r}, expected "
            f"{want[max(0, offset - 30) : offset + 30]!r}"
        )
    return None


async def settle(tap: Tap, backend: Pop3Backend) -> None:
    """Wait until the backend has ended every session poproxy opened to it."""
    await asyncio.to_thread(tap.wait_idle)
    await asyncio.to_thread(backend.wait_sessions_closed)


def expected_for(client: Client, mailbox: Mailbox) -> list[bytes]:
    return [client.delivered(served) for served in mailbox.served]


async def download(
    client: Client, target: Target, workdir: Path, *, delete: bool
) -> tuple[Result, list[bytes]]:
    result = await run(client.invocation(target, workdir, delete=delete))
    assert result.returncode == 0, result.describe()
    return result, client.messages(workdir, result)


@matrix_check("keep")
@pytest.mark.asyncio
@pytest.mark.parametrize("client", ALL_CLIENTS)
async def test_keep(
    client: str, backend: Pop3Backend, tap: Tap, mailbox: Mailbox, target: Target, tmp_path: Path
) -> None:
    mail_client = CLIENTS[client]
    result, messages = await download(mail_client, target, tmp_path, delete=False)
    difference = same_messages(messages, expected_for(mail_client, mailbox))
    assert difference is None, f"{difference}\n{result.describe()}"
    await settle(tap, backend)
    assert backend.stored() == mailbox.stored, "keep mode changed the mailbox"


@matrix_check("delete")
@pytest.mark.asyncio
@pytest.mark.parametrize("client", ALL_CLIENTS)
async def test_delete(
    client: str, backend: Pop3Backend, tap: Tap, mailbox: Mailbox, target: Target, tmp_path: Path
) -> None:
    mail_client = CLIENTS[client]
    result, messages = await download(mail_client, target, tmp_path, delete=True)
    difference = same_messages(messages, expected_for(mail_client, mailbox))
    assert difference is None, f"{difference}\n{result.describe()}"
    await settle(tap, backend)
    left = backend.stored()
    assert left == [], f"{len(left)} messages left on the backend after QUIT"


@matrix_check("killed")
@pytest.mark.asyncio
@pytest.mark.parametrize("client", ALL_CLIENTS)
async def test_killed(
    client: str, backend: Pop3Backend, tap: Tap, mailbox: Mailbox, target: Target, tmp_path: Path
) -> None:
    mail_client = CLIENTS[client]
    tap.hold_after(HOLD_AFTER)
    running = await start(mail_client.invocation(target, tmp_path, delete=True))
    try:
        held = await asyncio.to_thread(tap.held.wait, HOLD_TIMEOUT)
        running.kill()
        result = await running.finish()
        if not held:
            pytest.fail(f"the download never got {HOLD_AFTER} bytes far:\n{result.describe()}")
        # Still holding: the backend is blocked in the middle of the 5 MB message, as behind
        # a full socket buffer, when poproxy learns that the client is gone and drops the
        # backend connection (the tap resets it for poproxy).
        await settle(tap, backend)
    finally:
        tap.release()
    if mail_client.deletes_as_it_goes:
        # It had retrieved messages 1 to 3 and sent DELE for them: no QUIT, no deletion.
        assert b"DELE 1\r\n" in tap.sent[-1], bytes(tap.sent[-1][-300:])
    left = backend.stored()
    assert left == mailbox.stored, f"{len(left)} of {len(mailbox.stored)} messages left"


@matrix_check("no_tls")
@pytest.mark.asyncio
@pytest.mark.parametrize("client", CLIENTS_WITHOUT_TLS)
async def test_no_tls(
    client: str, backend: Pop3Backend, tap: Tap, mailbox: Mailbox, target: Target, tmp_path: Path
) -> None:
    mail_client = CLIENTS[client]
    connections = tap.connections
    invocation = mail_client.invocation(target, tmp_path, delete=True, tls=False)
    result = await run(invocation)
    if mail_client.exit_status_reports_failure:
        assert result.returncode != 0, result.describe()
    assert mail_client.messages(tmp_path, result) == [], result.describe()
    assert tap.connections == connections, "poproxy opened a backend connection"
    await settle(tap, backend)
    assert backend.stored() == mailbox.stored
