"""poproxy in front of a real Dovecot, with real clients: poplib, curl and openssl s_client.

Every message must arrive byte for byte as Dovecot stores it (after POP3's
un-dot-stuffing), DELE must be committed by the client's QUIT and by nothing
else.
"""

from __future__ import annotations

import asyncio
import poplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from support.clients import RawClient, poplib_ssl, poplib_stls
from support.dovecot import Dovecot, running_dovecot
from support.interop import require_program
from support.proxy import Certificates, RunningProxy, StartProxy

pytestmark = pytest.mark.interop

USER = "alice"
PASSWORD = "wonderland"

MESSAGES = [
    b"From: Carol <carol@example.org>\r\nSubject: dots\r\n\r\n"
    b".leading dot\r\n.\r\n..two\r\nend\r\n",
    "From: Dana <dana@example.org>\r\nSubject: utf-8\r\nContent-Type: text/plain; charset=utf-8"
    "\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln — naïve café ✓\r\n".encode(),
    # Large enough that the relay's flow control has work to do.
    b"From: Erin <erin@example.org>\r\nSubject: big\r\n\r\n"
    + b"".join(b"line %06d " % n + b"x" * 60 + b"\r\n" for n in range(30_000)),
]


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    with running_dovecot(tmp_path, {USER: (PASSWORD, MESSAGES)}) as server:
        yield server


@pytest_asyncio.fixture
async def proxy(start_proxy: StartProxy, dovecot: Dovecot) -> RunningProxy:
    return await start_proxy([(dovecot.host, dovecot.port)])


def fetch_all(client: poplib.POP3) -> list[bytes]:
    client.user(USER)
    client.pass_(PASSWORD)
    count, _ = client.stat()
    messages = []
    for number in range(1, count + 1):
        _, lines, _ = client.retr(number)
        messages.append(b"".join(line + b"\r\n" for line in lines))
    client.quit()
    return messages


@pytest.mark.asyncio
async def test_poplib_pop3s_downloads_byte_for_byte(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    messages = await asyncio.to_thread(
        lambda: fetch_all(poplib_ssl(proxy.implicit, client_context))
    )
    assert messages == MESSAGES


@pytest.mark.asyncio
async def test_poplib_stls_downloads_byte_for_byte(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    messages = await asyncio.to_thread(
        lambda: fetch_all(poplib_stls(proxy.starttls, client_context))
    )
    assert messages == MESSAGES


async def curl(*arguments: str) -> tuple[int, bytes, bytes]:
    program = require_program("curl")
    process = await asyncio.create_subprocess_exec(
        program,
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


@pytest.mark.asyncio
@pytest.mark.parametrize("number", [1, 2, 3])
async def test_curl_pop3s_downloads_byte_for_byte(
    proxy: RunningProxy, certificates: Certificates, number: int
) -> None:
    host, port = proxy.implicit
    status, body, stderr = await curl(
        "--cacert", str(certificates.ca_file), "-u", f"{USER}:{PASSWORD}",
        f"pop3s://{host}:{port}/{number}",
    )  # fmt: skip
    assert status == 0, stderr
    assert body == MESSAGES[number - 1]


@pytest.mark.asyncio
async def test_curl_pop3_with_ssl_reqd_downloads_byte_for_byte(
    proxy: RunningProxy, certificates: Certificates
) -> None:
    host, port = proxy.starttls
    status, body, stderr = await curl(
        "--ssl-reqd", "--cacert", str(certificates.ca_file), "-u", f"{USER}:{PASSWORD}",
        f"pop3://{host}:{port}/2",
    )  # fmt: skip
    assert status == 0, stderr
    assert body == MESSAGES[1]


@pytest.mark.asyncio
async def test_curl_without_tls_cannot_log_in(proxy: RunningProxy, dovecot: Dovecot) -> None:
    host, port = proxy.starttls
    status, body, _ = await curl("-u", f"{USER}:{PASSWORD}", f"pop3://{host}:{port}/1")
    assert status != 0
    assert body == b""
    assert "Login: user=<alice>" not in dovecot.log_tail(200)


@pytest.mark.asyncio
async def test_openssl_s_client_starttls_session(
    proxy: RunningProxy, certificates: Certificates
) -> None:
    program = require_program("openssl")
    host, port = proxy.starttls
    process = await asyncio.create_subprocess_exec(
        program, "s_client", "-quiet", "-starttls", "pop3", "-verify_return_error",
        "-CAfile", str(certificates.ca_file), "-connect", f"{host}:{port}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    script = f"USER {USER}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()
    async with asyncio.timeout(20):
        stdout, stderr = await process.communicate(script)
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == b"+OK Send PASS"
    assert lines[1].startswith(b"+OK")
    assert lines[2].startswith(b"+OK 3 ")


async def logged_in(proxy: RunningProxy, context: ssl.SSLContext) -> RawClient:
    client = await RawClient.connect(proxy.implicit, context)
    await client.line()
    await client.send(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    await client.line()
    assert (await client.line()).startswith(b"+OK")
    return client


@pytest.mark.asyncio
async def test_dele_then_client_reset_leaves_the_message_on_dovecot(
    proxy: RunningProxy, dovecot: Dovecot, client_context: ssl.SSLContext
) -> None:
    client = await logged_in(proxy, client_context)
    assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
    client.reset()
    await asyncio.to_thread(dovecot.wait_sessions_closed)
    assert [path.read_bytes() for path in dovecot.message_files(USER)] == MESSAGES


@pytest.mark.asyncio
async def test_dele_then_quit_removes_the_message_from_dovecot(
    proxy: RunningProxy, dovecot: Dovecot, client_context: ssl.SSLContext
) -> None:
    client = await logged_in(proxy, client_context)
    async with client:
        assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
        assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
        assert await client.at_eof()
    await asyncio.to_thread(dovecot.wait_sessions_closed)
    assert [path.read_bytes() for path in dovecot.message_files(USER)] == MESSAGES[1:]


@pytest.mark.asyncio
async def test_wrong_password_is_refused_with_fixed_text(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    async with await RawClient.connect(proxy.implicit, client_context) as client:
        await client.line()
        await client.send(f"USER {USER}\r\nPASS wrong\r\n".encode())
        await client.line()
        assert await client.line() == b"-ERR [AUTH] Authentication failed\r\n"
