"""Metrics over real HTTP move by exactly what happened; health answers; session log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.clients import RawClient
from support.proxy import RunningProxy, StartProxy

from poproxy.demo import MailboxServer
from poproxy.logs import JsonFormatter, LogfmtFormatter
from poproxy.metrics import Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def http_get(address: tuple[str, int], path: str, raw: bytes | None = None) -> bytes:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(*address)
        writer.write(raw if raw is not None else f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    return response


async def scrape(address: tuple[str, int]) -> Samples:
    response = await http_get(address, "/metrics")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def login(address: tuple[str, int], context: ssl.SSLContext | None) -> RawClient:
    client = await RawClient.connect(address, context)
    await client.line()
    if context is None:
        await client.command(b"STLS\r\n")
        assert context is None
    return client


@pytest.mark.asyncio
async def test_counters_move_by_exactly_what_happened(
    start_proxy: StartProxy,
    backend: MailboxServer,
    client_context: ssl.SSLContext,
    metrics: Metrics,
) -> None:
    proxy = await start_proxy([backend.address], metrics_listen=("127.0.0.1", 0))
    dead = await start_proxy([("127.0.0.1", free_port())], metrics_listen=("127.0.0.1", 0))
    admin = proxy.proxy.admin.address
    before = await scrape(admin)

    # 2 good sessions: one POP3S, one STLS, each QUIT through the relay.
    for address, context in ((proxy.implicit, client_context), (proxy.starttls, None)):
        client = await RawClient.connect(address, context)
        async with client:
            await client.line()
            if context is None:
                await client.command(b"STLS\r\n")
                await client.starttls(client_context)
            await client.send(b"USER alice\r\nPASS wonderland\r\nSTAT\r\nQUIT\r\n")
            while await client.line():
                pass
    # 3 plaintext logins refused (USER, PASS, AUTH), then STLS with an injected line.
    async with await RawClient.connect(proxy.starttls) as client:
        await client.line()
        await client.send(b"USER a\r\nPASS b\r\nAUTH PLAIN\r\n")
        for _ in range(3):
            await client.line()
        await client.send(b"STLS\r\nCAPA\r\n")
        await client.line()
        await client.starttls(client_context)
        await client.command(b"QUIT\r\n")
    # 1 failed handshake: a TLS record that holds no ClientHello.
    async with await RawClient.connect(proxy.implicit) as client:
        await client.send(b"\x16\x03\x01\x00\x08" + b"\x02" * 8)
        assert await client.at_eof()
    # 1 client reset after login.
    client = await RawClient.connect(proxy.implicit, client_context)
    await client.line()
    await client.send(b"USER alice\r\nPASS wonderland\r\n")
    await client.line()
    await client.line()
    client.reset()
    # 1 wrong password.
    async with await RawClient.connect(proxy.implicit, client_context) as client:
        await client.line()
        await client.send(b"USER alice\r\nPASS nope\r\nQUIT\r\n")
        while await client.line():
            pass
    # 1 login against a dead backend (a second proxy, counting into the same registry).
    async with await RawClient.connect(dead.implicit, client_context) as client:
        await client.line()
        await client.send(b"USER alice\r\nPASS wonderland\r\nQUIT\r\n")
        while await client.line():
            pass

    async with asyncio.timeout(5):
        await proxy.proxy.idle()
        await dead.proxy.idle()
    after = await scrape(admin)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("poproxy_connections_total", listener="pop3s") == 5
    assert moved("poproxy_connections_total", listener="pop3") == 2
    assert value(after, "poproxy_connections_active", listener="pop3s") == 0
    assert value(after, "poproxy_connections_active", listener="pop3") == 0
    assert moved("poproxy_tls_handshakes_total", listener="pop3s", result="success") == 4
    assert moved("poproxy_tls_handshakes_total", listener="pop3s", result="failure") == 1
    assert moved("poproxy_tls_handshakes_total", listener="pop3", result="success") == 2
    assert moved("poproxy_tls_versions_total", listener="pop3s", version="TLSv1.3") == 4
    assert moved("poproxy_starttls_total", listener="pop3") == 2
    assert moved("poproxy_starttls_injection_total", listener="pop3") == 1
    assert moved("poproxy_starttls_injection_bytes_total", listener="pop3") == len(b"CAPA\r\n")
    for command in ("USER", "PASS", "AUTH"):
        assert moved("poproxy_plaintext_auth_refused_total", listener="pop3", command=command) == 1
    assert moved("poproxy_plaintext_auth_refused_total", listener="pop3", command="APOP") == 0
    assert moved("poproxy_logins_total", result="success") == 3
    assert moved("poproxy_logins_total", result="auth_failed") == 1
    assert moved("poproxy_logins_total", result="backend_unavailable") == 1
    assert moved("poproxy_sessions_closed_total", reason="quit") == 5
    assert moved("poproxy_sessions_closed_total", reason="tls_error") == 1
    assert moved("poproxy_sessions_closed_total", reason="client_reset") == 1
    assert moved("poproxy_sessions_closed_total", reason="client_closed") == 0
    assert moved("poproxy_session_duration_seconds_count") == 7
    assert moved("poproxy_relayed_bytes_total", direction="client_to_backend") > 0
    assert moved("poproxy_relayed_bytes_total", direction="backend_to_client") > 0
    assert moved("poproxy_backend_connect_duration_seconds_count", backend="test") == 4
    dead_server = f"127.0.0.1:{dead.proxy.config.backends[0].servers[0].port}"
    assert value(after, "poproxy_backend_up", backend="test", server=dead_server) == 0
    assert moved("poproxy_backend_connect_failures_total", backend="test", server=dead_server) == 1
    assert value(after, "poproxy_build_info", version="0.1.0") == 1
    cert = str(proxy.proxy.config.tls.certificates[0].cert)
    assert value(after, "poproxy_certificate_expiry_timestamp_seconds", certificate=cert) > 0
    # No label value anywhere is a user name or an address of a client.
    labels = {label for (_, pairs) in after for (_, label) in pairs}
    assert not {"alice", "127.0.0.1"} & labels


@pytest.mark.asyncio
async def test_health_endpoints(
    start_proxy: StartProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    proxy = await start_proxy([backend.address], metrics_listen=("127.0.0.1", 0))
    admin = proxy.proxy.admin.address
    assert (await http_get(admin, "/healthz")).startswith(b"HTTP/1.1 200 OK")
    assert (await http_get(admin, "/readyz")).startswith(b"HTTP/1.1 200 OK")
    assert (await http_get(admin, "/nope")).startswith(b"HTTP/1.1 404")
    assert (await http_get(admin, "", raw=b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 405"
    )
    assert (await http_get(admin, "", raw=b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    huge = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20_000
    assert (await http_get(admin, "", raw=huge)).startswith(b"HTTP/1.1 431")
    # During shutdown /readyz fails at once. A logged-in client keeps the
    # shutdown in its grace period; a waiting one is told when it starts.
    reading = await RawClient.connect(proxy.implicit, client_context)
    await reading.line()
    await reading.send(b"USER alice\r\nPASS wonderland\r\n")
    await reading.line()
    await reading.line()
    waiting = await RawClient.connect(proxy.starttls)
    await waiting.line()
    shutdown = asyncio.create_task(proxy.proxy.shutdown(grace=5))
    try:
        assert (await waiting.line()).startswith(b"-ERR [SYS/TEMP]")
        assert (await http_get(admin, "/readyz")).startswith(b"HTTP/1.1 503")
        assert (await http_get(admin, "/healthz")).startswith(b"HTTP/1.1 200")
    finally:
        await waiting.close()
        reading.reset()
        async with asyncio.timeout(10):
            await shutdown


@pytest.mark.asyncio
async def test_readyz_fails_while_the_only_backend_is_down(
    start_proxy: StartProxy, client_context: ssl.SSLContext
) -> None:
    proxy = await start_proxy([("127.0.0.1", free_port())], metrics_listen=("127.0.0.1", 0))
    admin = proxy.proxy.admin.address
    assert (await http_get(admin, "/readyz")).startswith(b"HTTP/1.1 200")  # untried: usable
    async with await RawClient.connect(proxy.implicit, client_context) as client:
        await client.line()
        await client.send(b"USER alice\r\nPASS wonderland\r\n")
        await client.line()
        assert (await client.line()).startswith(b"-ERR [SYS/TEMP]")
    assert (await http_get(admin, "/readyz")).startswith(b"HTTP/1.1 503")


@pytest.mark.asyncio
async def test_a_silent_scraper_is_dropped(start_proxy: StartProxy, backend: MailboxServer) -> None:
    proxy = await start_proxy([backend.address], metrics_listen=("127.0.0.1", 0))
    reader, writer = await asyncio.open_connection(*proxy.proxy.admin.address)
    try:
        async with asyncio.timeout(10):
            assert (await reader.read()).startswith(b"HTTP/1.1 408")
    finally:
        writer.close()
        await writer.wait_closed()


def capture(formatter: logging.Formatter) -> tuple[list[str], Callable[[], None]]:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(formatter)
    root = logging.getLogger("poproxy")
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)

    def remove() -> None:
        root.removeHandler(handler)
        root.setLevel(previous)

    return lines, remove


async def one_session(proxy: RunningProxy, context: ssl.SSLContext, password: bytes) -> None:
    async with await RawClient.connect(proxy.implicit, context) as client:
        await client.line()
        await client.send(b"USER alice\r\nPASS " + password + b"\r\nQUIT\r\n")
        while await client.line():
            pass
    async with asyncio.timeout(5):
        await proxy.proxy.idle()


@pytest.mark.asyncio
async def test_session_end_line_in_logfmt(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    lines, remove = capture(LogfmtFormatter())
    try:
        await one_session(proxy, client_context, b"wonderland")
    finally:
        remove()
    [line] = [line for line in lines if 'msg="session end"' in line]
    fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
    assert fields["logger"] == "poproxy.session"
    assert fields["listener"] == "pop3s"
    assert fields["client"] == "127.0.0.1"
    assert fields["tls_version"] == "TLSv1.3"
    assert fields["tls_cipher"].startswith("TLS_")
    assert fields["sni"] == "localhost"
    assert fields["user"] == "alice"
    assert fields["backend"] == "test"
    assert int(fields["backend_local_port"]) > 0
    assert fields["outcome"] == "quit"
    assert int(fields["bytes_backend_to_client"]) > 0


@pytest.mark.asyncio
async def test_failed_login_line_in_json_with_hashed_user(
    start_proxy: StartProxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    proxy = await start_proxy([backend.address], log_user="hash")
    lines, remove = capture(JsonFormatter())
    try:
        await one_session(proxy, client_context, b"wrong")
    finally:
        remove()
    records = [json.loads(line) for line in lines]
    [failed] = [record for record in records if record["msg"] == "login failed"]
    assert failed["logger"] == "poproxy.auth"
    assert failed["client"] == "127.0.0.1"
    assert failed["result"] == "auth_failed"
    assert failed["user"].startswith("sha256:")
    assert "alice" not in json.dumps(records)
