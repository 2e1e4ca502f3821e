"""`poproxy probe` against poproxy itself, the plaintext backend, and fake servers.

poproxy on both ports passes every check; the in-memory backend (plaintext,
USER before TLS, no STLS) fails the right ones; certificates made per test
fail the trust, name and expiry checks; a fake server that keeps the bytes
pipelined after STLS (what Python 3.11's `StreamWriter.start_tls` does unless
the server discards them) fails the STARTTLS injection check.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from support.fake_backend import ALICE_PASSWORD
from support.proxy import Certificates, RunningProxy, proxy_config, running_proxy

from poproxy import config
from poproxy import probe as probe_module
from poproxy.demo import MailboxServer
from poproxy.probe import (
    Check,
    Credentials,
    Injection,
    Mode,
    Report,
    Result,
    Target,
    expiry_check,
    injection_check,
    login_capabilities,
    name_matches,
    parse_target,
    probe,
)

TIMEOUT = 5.0  # each network wait of a probe in these tests

# Every check a probe of a STLS port reports, in order.
STARTTLS_CHECKS = [
    "mode",
    "port-mixup",
    "capa-before-tls",
    "login-offered-before-tls",
    "login-accepted-before-tls",
    "tls-1.0",
    "tls-1.1",
    "tls-1.2",
    "tls-1.3",
    "cipher",
    "certificate-trust",
    "certificate-name",
    "certificate-expiry",
    "alpn-pop3",
    "alpn-foreign",
    "starttls-injection",
    "capa-after-tls",
]


def by_name(report: Report) -> dict[str, Check]:
    return {check.name: check for check in report.checks}


def failing(report: Report) -> set[str]:
    return {check.name for check in report.checks if check.result is Result.FAIL}


def assert_all_pass(report: Report) -> None:
    problems = [c for c in report.checks if c.result not in (Result.PASS, Result.INFO)]
    assert problems == []
    assert report.exit_status == 0


def target(address: tuple[str, int], certificates: Certificates | None, **fields: Any) -> Target:
    """The probe's target; `certificates` gives --ca, None probes against the system store."""
    fields.setdefault("timeout", TIMEOUT)
    ca = certificates.ca_file if certificates else None
    return Target(host=address[0], port=address[1], ca=ca, **fields)


# --- poproxy passes ------------------------------------------------------------


@pytest.mark.asyncio
async def test_implicit_port_passes_everything(
    proxy: RunningProxy, certificates: Certificates
) -> None:
    report = await probe(target(proxy.implicit, certificates))  # auto: finds implicit TLS
    assert report.mode is Mode.IMPLICIT
    assert_all_pass(report)
    checks = by_name(report)
    assert "port-mixup" in checks
    assert "This port needs SSL/TLS" in checks["port-mixup"].detail
    assert checks["tls-1.0"].detail.startswith("TLS 1.0 refused")
    assert checks["alpn-pop3"].detail == "offered pop3: selected"
    assert "refused" in checks["alpn-foreign"].detail
    assert "USER" in checks["capa-after-tls"].detail
    assert "starttls-injection" not in checks  # no plaintext phase to inject into


@pytest.mark.asyncio
async def test_starttls_port_passes_and_hides_user_before_tls(
    proxy: RunningProxy, certificates: Certificates
) -> None:
    report = await probe(target(proxy.starttls, certificates))  # auto: finds STLS
    assert report.mode is Mode.STARTTLS
    assert_all_pass(report)
    assert [check.name for check in report.checks] == STARTTLS_CHECKS
    checks = by_name(report)
    before = checks["capa-before-tls"].detail.split(", ")
    assert "STLS" in before
    assert "USER" not in before
    assert not any(line.startswith("SASL") for line in before)
    assert "USER" in checks["capa-after-tls"].detail.split(", ")
    assert checks["login-accepted-before-tls"].detail.startswith("USER before TLS refused")
    # poproxy drops what was pipelined behind STLS (test_starttls_injection.py).
    assert checks["starttls-injection"].result is Result.PASS
    # A client set to implicit TLS on the STLS port is served TLS (implicit_tls_window).
    assert checks["port-mixup"].result is Result.PASS


@pytest.mark.asyncio
async def test_login_reports_the_mailbox_and_touches_no_mail(
    proxy: RunningProxy, certificates: Certificates, backend: MailboxServer
) -> None:
    password = ALICE_PASSWORD.decode()
    credentials = Credentials("alice", password)
    report = await probe(target(proxy.starttls, certificates, credentials=credentials))
    assert_all_pass(report)
    login = by_name(report)["login"]
    assert login.result is Result.PASS
    assert "3 messages" in login.detail
    assert password not in json.dumps(report.as_json()) + report.text() + repr(credentials)
    # STAT and QUIT only: nothing was retrieved or deleted.
    verbs = {line.split(b" ")[0].upper() for line in backend.received}
    assert verbs <= {b"USER", b"PASS", b"STAT", b"QUIT", b"CAPA"}
    assert len(backend.mailboxes[b"alice"].messages) == 3


@pytest.mark.asyncio
async def test_login_is_not_attempted_over_unverified_tls(
    proxy: RunningProxy, backend: MailboxServer
) -> None:
    credentials = Credentials("alice", ALICE_PASSWORD.decode())
    report = await probe(target(proxy.implicit, None, credentials=credentials))  # no --ca
    login = by_name(report)["login"]
    assert login.result is Result.FAIL
    assert "not attempted" in login.detail
    assert not any(line.startswith(b"PASS") for line in backend.received)


# --- Failures ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_plaintext_backend_fails(backend: MailboxServer) -> None:
    """The in-memory backend: USER before TLS and no STLS."""
    report = await probe(target(backend.address, None))
    assert report.mode is Mode.PLAINTEXT
    assert report.exit_status == 2
    assert failing(report) == {"mode", "login-offered-before-tls", "login-accepted-before-tls"}
    checks = by_name(report)
    assert "CAPA does not list STLS" in checks["mode"].detail
    assert "USER" in checks["login-offered-before-tls"].detail
    assert "+OK" in checks["login-accepted-before-tls"].detail
    assert not any(name.startswith(("tls-", "certificate-")) for name in checks)
    # USER only, never a PASS, in plaintext.
    assert b"USER probe-nonexistent" in backend.received
    assert not any(line.upper().startswith(b"PASS") for line in backend.received)


def issue_files(
    tmp_path: Path,
    ca: trustme.CA,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> config.CertificateFiles:
    leaf = ca.issue_cert("localhost", not_before=not_before, not_after=not_after)
    cert, key = tmp_path / "leaf.crt", tmp_path / "leaf.key"
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return config.CertificateFiles(cert=cert, key=key, key_path="tls.certificates[0]")


@pytest.mark.asyncio
async def test_expired_certificate_fails_the_expiry_check(
    tmp_path: Path, certificates: Certificates, backend: MailboxServer
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    files = issue_files(
        tmp_path,
        certificates.ca,
        not_before=now - datetime.timedelta(days=90),
        not_after=now - datetime.timedelta(days=3),
    )
    async with running_proxy(proxy_config(files, [backend.address])) as server:
        report = await probe(
            target(
                server.addresses["pop3s"], certificates, requested="tls", server_name="localhost"
            )
        )
    assert report.exit_status == 2
    assert failing(report) == {"certificate-expiry"}
    expiry = by_name(report)["certificate-expiry"]
    assert expiry.detail.startswith("expired ")
    assert expiry.fix is not None
    # Trust is judged without the dates: the chain itself is fine.
    assert by_name(report)["certificate-trust"].result is Result.PASS


def test_certificate_not_yet_valid_hints_at_the_clock(certificates: Certificates) -> None:
    certificate = x509.load_pem_x509_certificate(certificates.files.cert.read_bytes())
    early = certificate.not_valid_before_utc - datetime.timedelta(hours=5)
    check = expiry_check(certificate, early)
    assert check.result is Result.FAIL
    assert "not valid before" in check.detail
    assert check.fix is not None and "clock" in check.fix
    soon = certificate.not_valid_after_utc - datetime.timedelta(days=3)
    assert expiry_check(certificate, soon).result is Result.WARN


@pytest.mark.asyncio
async def test_name_mismatch_fails(proxy: RunningProxy, certificates: Certificates) -> None:
    report = await probe(
        target(proxy.implicit, certificates, requested="tls", server_name="other.example")
    )
    assert report.exit_status == 2
    assert failing(report) == {"certificate-name"}
    assert "other.example is not in the certificate" in by_name(report)["certificate-name"].detail


@pytest.mark.asyncio
async def test_untrusted_ca_fails(proxy: RunningProxy) -> None:
    report = await probe(target(proxy.starttls, None, requested="starttls"))
    assert report.exit_status == 2
    assert failing(report) == {"certificate-trust"}
    assert "this machine's CA store" in by_name(report)["certificate-trust"].detail


@pytest.mark.asyncio
async def test_nothing_listening_is_a_connect_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = sock.getsockname()[:2]  # closed again: nothing listens there
    report = await probe(target(address, None, requested="starttls"))
    assert report.mode is Mode.UNKNOWN
    assert [(c.name, c.result) for c in report.checks] == [("connect", Result.FAIL)]
    assert "Connection refused" in report.checks[0].detail


# --- Fake servers: STARTTLS injection, TLS 1.0 -------------------------------------


@asynccontextmanager
async def fake_pop3(
    context: ssl.SSLContext, *, implicit: bool = False, greeting_delay: float = 0.0
) -> AsyncIterator[tuple[str, int]]:
    """A minimal POP3 server, STLS done the naive way.

    After `+OK` to STLS it calls `StreamWriter.start_tls` on the same reader:
    on Python 3.11 whatever the client pipelined behind STLS stays buffered
    and is then read as if it had come inside TLS. That is the bug the probe
    looks for (CVE-2011-0411 class).
    """
    handlers: set[asyncio.Task[None]] = set()

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = implicit
        try:
            if greeting_delay:
                await asyncio.sleep(greeting_delay)  # a server that looks up the client first
            writer.write(b"+OK fake POP3 ready\r\n")
            while line := await reader.readline():
                verb = line.strip().upper()
                if verb == b"STLS" and not tls:
                    writer.write(b"+OK begin TLS\r\n")
                    await writer.drain()
                    await writer.start_tls(context)  # keeps the buffered bytes: the bug
                    tls = True
                elif verb == b"CAPA":
                    capability = b"USER" if tls else b"STLS"
                    writer.write(b"+OK capability list follows\r\n" + capability + b"\r\n.\r\n")
                elif verb == b"QUIT":
                    writer.write(b"+OK bye\r\n")
                    break
                else:
                    writer.write(b"-ERR not here\r\n")
                await writer.drain()
        except (OSError, EOFError):
            pass  # the probe's refused and aborted handshakes
        finally:
            writer.close()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(session(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context if implicit else None)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def server_context(certificates: Certificates, legacy: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.files.cert, certificates.files.key)
    if legacy:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
    return context


@pytest.mark.asyncio
async def test_starttls_injection_is_detected(certificates: Certificates) -> None:
    async with fake_pop3(server_context(certificates)) as address:
        report = await probe(target(address, certificates, requested="starttls"))
    check = by_name(report)["starttls-injection"]
    assert check.result is Result.FAIL
    assert "answered inside TLS" in check.detail
    assert report.exit_status == 2
    # The rest of this server is fine: STLS listed, no login before TLS.
    assert by_name(report)["login-offered-before-tls"].result is Result.PASS


@pytest.mark.asyncio
async def test_auto_mode_waits_for_a_slow_greeting(
    certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Silence at first means TLS; a handshake that meets a late +OK means STLS after all."""
    monkeypatch.setattr(probe_module, "GREETING_WAIT", 0.05)
    async with fake_pop3(server_context(certificates), greeting_delay=0.2) as address:
        report = await probe(target(address, certificates))
    assert report.mode is Mode.STARTTLS
    assert by_name(report)["mode"].result is Result.PASS


@pytest.mark.asyncio
async def test_tls_1_0_accepted_fails(certificates: Certificates) -> None:
    async with fake_pop3(server_context(certificates, legacy=True), implicit=True) as address:
        # A short timeout: this server is silent to plaintext clients (port-mixup waits).
        report = await probe(target(address, certificates, requested="tls", timeout=1.0))
    checks = by_name(report)
    assert report.mode is Mode.IMPLICIT
    if checks["tls-1.0"].result is Result.INFO:
        pytest.skip(f"this OpenSSL cannot offer TLS 1.0: {checks['tls-1.0'].detail}")
    assert checks["tls-1.0"].result is Result.FAIL
    assert checks["tls-1.0"].detail.startswith("TLS 1.0 accepted")
    # No ALPN on this server: pop3 is not selected, and http/1.1 is not refused.
    assert checks["alpn-pop3"].result is Result.WARN
    assert checks["alpn-foreign"].result is Result.WARN
    assert "ALPACA" in checks["alpn-foreign"].detail


# --- The command ---------------------------------------------------------------


async def run_probe(*arguments: str, password: str | None = None) -> tuple[int, bytes, bytes]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("POPROXY")}
    if password is not None:
        environment["POPROXY_PROBE_PASSWORD"] = password
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poproxy", "probe", *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
    )  # fmt: skip
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


@pytest.mark.asyncio
async def test_json_output_and_exit_status(proxy: RunningProxy, certificates: Certificates) -> None:
    status, stdout, stderr = await run_probe(
        where(proxy.implicit), "--tls", "--ca", str(certificates.ca_file), "--json"
    )
    assert (status, stderr) == (0, b"")
    document = json.loads(stdout)
    assert document["target"] == where(proxy.implicit)
    assert document["mode"] == "implicit"
    names = [check["name"] for check in document["checks"]]
    assert "certificate-expiry" in names and "alpn-foreign" in names
    for check in document["checks"]:
        assert set(check) == {"name", "result", "detail", "fix"}
        assert check["result"] in ("pass", "info")


@pytest.mark.asyncio
async def test_command_logs_in_with_the_password_from_the_environment(
    proxy: RunningProxy, certificates: Certificates
) -> None:
    password = ALICE_PASSWORD.decode()
    status, stdout, stderr = await run_probe(
        where(proxy.starttls), "--starttls", "--ca", str(certificates.ca_file),
        "--servername", "localhost", "--user", "alice",
        password=password,
    )  # fmt: skip
    assert (status, stderr) == (0, b"")
    assert b"logged in as alice over verified TLS: 3 messages" in stdout
    assert password.encode() not in stdout


@pytest.mark.asyncio
async def test_command_exit_statuses_without_tracebacks(
    proxy: RunningProxy, backend: MailboxServer
) -> None:
    # No --ca: the certificate is not trusted, a failure.
    status, stdout, stderr = await run_probe(where(proxy.implicit), "--tls")
    assert (status, stderr) == (2, b"")
    assert b"FAIL  certificate-trust" in stdout
    # The plaintext backend.
    status, stdout, stderr = await run_probe(where(backend.address), "--timeout", "3")
    assert (status, stderr) == (2, b"")
    assert b"FAIL  login-accepted-before-tls" in stdout
    # --user without a password and without a terminal to ask on.
    status, stdout, stderr = await run_probe(where(backend.address), "--user", "alice")
    assert status == 2
    assert b"POPROXY_PROBE_PASSWORD" in stderr
    assert stdout == b""


# --- Parsing, without I/O ---------------------------------------------------------


def test_parse_target() -> None:
    assert parse_target("mail.example.org", "tls") == ("mail.example.org", 995)
    assert parse_target("mail.example.org", "starttls") == ("mail.example.org", 110)
    assert parse_target("127.0.0.1:1110", "auto") == ("127.0.0.1", 1110)
    assert parse_target("[::1]:995", "auto") == ("::1", 995)
    assert parse_target("[::1]", "starttls") == ("::1", 110)
    assert parse_target("::1", "tls") == ("::1", 995)
    for bad in ("host:0", "host:x", "[::1", "[::1]x", ":995"):
        with pytest.raises(ValueError):
            parse_target(bad, "auto")


def test_login_capabilities() -> None:
    assert login_capabilities(["STLS", "TOP", "SASL CRAM-MD5"]) == ()
    assert login_capabilities(["USER", "SASL PLAIN LOGIN XOAUTH2"]) == (
        "USER",
        "SASL PLAIN LOGIN",
    )


def test_name_matches() -> None:
    assert name_matches(["*.example.org"], "mail.example.org")
    assert not name_matches(["*.example.org"], "a.b.example.org")
    assert not name_matches(["*.example.org"], "example.org")
    assert name_matches(["Mail.Example.org"], "mail.example.org.")
    assert name_matches(["::1"], "[::1]")
    assert not name_matches(["127.0.0.1"], "localhost")
    assert not name_matches(["localhost"], "127.0.0.1")


def test_injection_check_counts_the_replies() -> None:
    quit_only = Injection(b"", (b"+OK bye",))
    assert injection_check(quit_only).result is Result.PASS
    answered = Injection(b"", (b"+OK capability list follows", b"USER", b".", b"+OK bye"))
    assert injection_check(answered).result is Result.FAIL
    in_plaintext = Injection(b"+OK capability list follows\r\n", (b"+OK bye",))
    assert injection_check(in_plaintext).result is Result.FAIL
