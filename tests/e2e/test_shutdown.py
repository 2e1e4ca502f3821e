"""The ordered shutdown: AUTHORIZATION sessions end now, TRANSACTION ones get the grace period."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import ssl
import sys
from pathlib import Path

import pytest
from support.clients import RawClient
from support.fake_backend import ALICE
from support.proxy import Certificates, RunningProxy

from poproxy.demo import SAMPLE_MESSAGES, MailboxServer

SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down, try again later\r\n"


async def logged_in(address: tuple[str, int], context: ssl.SSLContext) -> RawClient:
    client = await RawClient.connect(address, context)
    await client.line()
    await client.send(b"USER alice\r\nPASS wonderland\r\n")
    await client.line()
    assert (await client.line()).startswith(b"+OK")
    return client


@pytest.mark.asyncio
async def test_sessions_not_logged_in_are_told_and_closed(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        shutdown = asyncio.create_task(proxy.proxy.shutdown(grace=5))
        assert await client.line() == SHUTTING_DOWN
        assert await client.at_eof()
        async with asyncio.timeout(5):
            await shutdown
    with pytest.raises(OSError):
        await RawClient.connect(proxy.starttls)


@pytest.mark.asyncio
async def test_transaction_may_finish_within_the_grace_period(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    reading = await logged_in(proxy.implicit, client_context)
    waiting = await RawClient.connect(proxy.starttls)
    await waiting.line()
    shutdown = asyncio.create_task(proxy.proxy.shutdown(grace=5))
    # Shutdown has started once the waiting client is told so.
    assert await waiting.line() == SHUTTING_DOWN
    await waiting.close()
    async with reading:
        assert (await reading.command(b"DELE 1\r\n")).startswith(b"+OK")
        assert (await reading.command(b"QUIT\r\n")).startswith(b"+OK")
    async with asyncio.timeout(5):
        await shutdown
    assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES[1:])


@pytest.mark.asyncio
async def test_grace_over_cuts_without_quit(
    proxy: RunningProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    client = await logged_in(proxy.implicit, client_context)
    async with client:
        assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
        async with asyncio.timeout(5):
            await proxy.proxy.shutdown(grace=0)
        assert await client.at_eof()
    async with asyncio.timeout(5):
        await backend.wait_sessions_closed(1)
    assert backend.quit_count == 0
    assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES)


@pytest.mark.asyncio
async def test_sigterm_drains_a_running_process(
    tmp_path: Path,
    backend: MailboxServer,
    certificates: Certificates,
    client_context: ssl.SSLContext,
) -> None:
    """`poproxy run` under SIGTERM: the logged-in client finishes, then the process exits 0."""
    config_file = tmp_path / "poproxy.yaml"
    config_file.write_text(
        f"""
listeners:
  - name: pop3s
    listen: "127.0.0.1:0"
    tls: implicit
tls:
  certificates:
    - cert: {certificates.files.cert}
      key: {certificates.files.key}
backends:
  - name: test
    servers: ["{backend.address[0]}:{backend.address[1]}"]
limits:
  shutdown_grace: 10s
user: nobody
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "poproxy",
        "run",
        "-c",
        str(config_file),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(10):
            while b"listening on" not in (line := await process.stderr.readline()):
                assert line, "poproxy exited before listening"
        port = int(line.split(b"listening on 127.0.0.1:")[1].split()[0])
        client = await logged_in(("127.0.0.1", port), client_context)
        if os.geteuid() == 0:
            # Started as root, it serves as the configured user.
            status = await asyncio.to_thread(Path(f"/proc/{process.pid}/status").read_text)
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(pwd.getpwnam("nobody").pw_uid)] * 4
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while b"waiting up to" not in (line := await process.stderr.readline()):
                assert line, "poproxy exited before draining"
        async with client:
            assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
            assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
    assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES[1:])
