"""SIGHUP on a running `poproxy run`: the edited file applies; a broken one is refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from support.clients import RawClient
from support.notify import NotifySocket
from support.proxy import Certificates

from poproxy.demo import MailboxServer

CONFIG = """
user: root
listeners:
  - name: pop3s
    listen: "127.0.0.1:0"
    tls: implicit
{extra}
tls:
  certificates:
    - cert: {cert}
      key: {key}
backends:
  - name: test
    servers: ["{backend}"]
"""
EXTRA = """  - name: added
    listen: "127.0.0.1:0"
    tls: starttls"""


async def line_with(stream: asyncio.StreamReader, text: bytes) -> bytes:
    async with asyncio.timeout(10):
        while text not in (line := await stream.readline()):
            assert line, f"poproxy exited before logging {text!r}"
    return line


@pytest.mark.asyncio
async def test_sighup_applies_the_edited_file_and_refuses_a_broken_one(
    tmp_path: Path, backend: MailboxServer, certificates: Certificates
) -> None:
    path = tmp_path / "poproxy.yaml"
    values = {
        "cert": certificates.files.cert,
        "key": certificates.files.key,
        "backend": f"{backend.address[0]}:{backend.address[1]}",
    }
    path.write_text(CONFIG.format(extra="", **values))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poproxy", "run", "-c", str(path), stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        await line_with(process.stderr, b"pop3s, tls=implicit")
        # A broken file: the running configuration stays.
        path.write_text("listeners: [")
        process.send_signal(signal.SIGHUP)
        await line_with(process.stderr, b"reload failed")
        # The edited file: a listener is added.
        path.write_text(CONFIG.format(extra=EXTRA, **values))
        process.send_signal(signal.SIGHUP)
        line = await line_with(process.stderr, b"(added, tls=starttls)")
        port = int(line.split(b"listening on 127.0.0.1:")[1].split()[0])
        await line_with(process.stderr, b"configuration reloaded")
        async with await RawClient.connect(("127.0.0.1", port)) as client:
            assert await client.line() == b"+OK POP3 ready\r\n"
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


@pytest.mark.asyncio
async def test_systemd_hears_ready_reloading_and_stopping(
    tmp_path: Path, backend: MailboxServer, certificates: Certificates
) -> None:
    """Type=notify: READY=1 once serving, RELOADING=1 then READY=1 on SIGHUP, STOPPING=1."""
    path = tmp_path / "poproxy.yaml"
    path.write_text(
        CONFIG.format(
            extra="",
            cert=certificates.files.cert,
            key=certificates.files.key,
            backend=f"{backend.address[0]}:{backend.address[1]}",
        )
    )
    notify = NotifySocket(tmp_path / "notify")
    message = notify.message
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poproxy", "run", "-c", str(path),
        stderr=asyncio.subprocess.DEVNULL, env=notify.environment,
    )  # fmt: skip
    try:
        assert (await message()).startswith("READY=1")
        process.send_signal(signal.SIGHUP)
        assert (await message()).startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert await message() == "READY=1"
        process.send_signal(signal.SIGTERM)
        assert await message() == "STOPPING=1"
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        notify.close()
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
