"""No password and no AUTH payload, plain or base64, reaches any log line at any level."""

from __future__ import annotations

import base64
import logging
import ssl

import pytest
from support.clients import RawClient
from support.proxy import RunningProxy

from poproxy.demo import MailboxServer
from poproxy.logs import JsonFormatter, LogfmtFormatter

SECRET = b"s3cret pass phrase"
GOOD = b"wonderland"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


SESSIONS = [
    # Refused before TLS: the password is on the wire but must not be logged.
    (
        False,
        b"USER alice\r\nPASS " + SECRET + b"\r\nAUTH PLAIN " + b64(b"\0alice\0" + SECRET) + b"\r\n",
    ),
    (True, b"USER alice\r\nPASS " + SECRET + b"\r\n"),
    (True, b"AUTH PLAIN " + b64(b"\0alice\0" + SECRET) + b"\r\n"),
    (True, b"AUTH PLAIN\r\n" + b64(b"alice\0alice\0" + SECRET) + b"\r\n"),
    (True, b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(SECRET) + b"\r\n"),
    (True, b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(SECRET) + b"\r\n"),
    (True, b"AUTH PLAIN " + b64(b"\0alice\0" + SECRET + b"\r\nX") + b"\r\n"),
    (True, b"USER alice\r\nPASS " + GOOD + b"\r\nSTAT\r\nQUIT\r\n"),
    (True, b"AUTH PLAIN " + b64(b"\0alice\0" + GOOD) + b"\r\nQUIT\r\n"),
]


@pytest.mark.asyncio
async def test_no_secret_in_any_log_record(
    proxy: RunningProxy,
    backend: MailboxServer,
    client_context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for tls, script in SESSIONS:
        address = proxy.implicit if tls else proxy.starttls
        async with await RawClient.connect(address, client_context if tls else None) as client:
            await client.line()
            await client.send(script + b"XYZZY\r\n")
            # Read until the proxy has answered everything: the last reply is
            # to XYZZY, or the connection ends after QUIT.
            while (line := await client.line()) and not line.startswith(b"-ERR Unknown"):
                pass
    await proxy.proxy.shutdown(grace=0)
    # Every record as each output format writes it, fields and all.
    text = "\n".join(
        formatter.format(record)
        for record in caplog.records
        for formatter in (LogfmtFormatter(), JsonFormatter())
    )
    assert "session end" in text  # the log was captured at all
    assert "login failed" in text
    forbidden = [SECRET, GOOD, *(b64(b"\0alice\0" + p) for p in (SECRET, GOOD)), b64(SECRET)]
    forbidden += [b64(b"alice\0alice\0" + SECRET), b64(b"\0alice\0" + SECRET + b"\r\nX")]
    for secret in forbidden:
        assert secret.decode() not in text
