"""The auth_http client against a real HTTP service on 127.0.0.1, and its answer parser."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from support.auth_http_server import Raw, running_auth_http

from poproxy.auth_http import (
    MAX_ANSWER_HEAD,
    AuthHttpClient,
    AuthHttpError,
    AuthHttpSettings,
    AuthRequest,
    Refused,
    Route,
    escape,
    parse_answer,
)

ALICE = b"alice"
PASSWORD = b"wonderland"
BOUND = 10  # seconds: the most any test may wait for anything


def login(
    user: bytes = ALICE,
    password: bytes = PASSWORD,
    *,
    attempt: int = 1,
    client_host: str | None = None,
    tls: bool = False,
    tls_protocol: str | None = None,
    tls_cipher: str | None = None,
) -> AuthRequest:
    return AuthRequest(
        user=user,
        password=password,
        attempt=attempt,
        client_ip="192.0.2.7",
        client_host=client_host,
        tls=tls,
        tls_protocol=tls_protocol,
        tls_cipher=tls_cipher,
    )


def client(url: str, *, timeout: float = 5.0, max_in_flight: int = 100) -> AuthHttpClient:
    return AuthHttpClient(AuthHttpSettings(url=url, timeout=timeout, max_in_flight=max_in_flight))


def ok(*headers: str) -> bytes:
    return ("HTTP/1.0 200 OK\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode()


@contextmanager
def refusing_port() -> Iterator[int]:
    """A bound port nobody listens on: connecting is refused, and no one can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- answers ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_ok_answer_routes_to_the_backend() -> None:
    async with running_auth_http({ALICE: ("192.0.2.10", 1110)}) as service:
        async with asyncio.timeout(BOUND):
            answer = await client(service.url).ask(login())
    assert answer == Route(server="192.0.2.10", port=1110)


@pytest.mark.asyncio
async def test_ok_answer_may_rewrite_user_and_password() -> None:
    answer = ok(
        "Auth-Status: OK",
        "Auth-Server: mail.example.org",
        "Auth-Port: 110",
        "Auth-User: alice@example.org",
        "Auth-Pass: s3cret",
    )
    async with running_auth_http({ALICE: Raw(answer)}) as service:
        async with asyncio.timeout(BOUND):
            route = await client(service.url).ask(login())
    assert route == Route("mail.example.org", 110, b"alice@example.org", b"s3cret")
    assert "s3cret" not in repr(route)


@pytest.mark.asyncio
async def test_refusal_carries_its_text_and_auth_wait() -> None:
    async with running_auth_http({}, wait="3") as service:
        async with asyncio.timeout(BOUND):
            answer = await client(service.url).ask(login())
    assert answer == Refused(message="Invalid login or password", wait=3.0)
    assert isinstance(answer, Refused) and not answer.ask_again


@pytest.mark.asyncio
async def test_refusal_without_auth_wait_has_no_wait() -> None:
    async with running_auth_http({ALICE: "Account locked"}) as service:
        async with asyncio.timeout(BOUND):
            answer = await client(service.url).ask(login())
    assert answer == Refused(message="Account locked", wait=None, error_code=None)


@pytest.mark.asyncio
async def test_wait_status_asks_again_later() -> None:
    async with running_auth_http({ALICE: "WAIT"}, wait="2") as service:
        async with asyncio.timeout(BOUND):
            answer = await client(service.url).ask(login())
    assert isinstance(answer, Refused)
    assert answer.ask_again and answer.wait == 2.0


@pytest.mark.asyncio
async def test_answer_without_auth_server_is_an_error() -> None:
    answer = ok("Auth-Status: OK", "Auth-Port: 110")
    async with running_auth_http({ALICE: Raw(answer)}) as service:
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match="lacks Auth-Server or Auth-Port"):
                await client(service.url).ask(login())


@pytest.mark.asyncio
@pytest.mark.parametrize("status", ["302 Found", "500 Internal Server Error", "401 Unauthorized"])
async def test_http_status_other_than_200_is_an_error(status: str) -> None:
    # A redirect is not followed: a Location could send the password elsewhere.
    answer = (
        f"HTTP/1.1 {status}\r\nLocation: http://192.0.2.66/\r\n"
        "Auth-Status: OK\r\nAuth-Server: 192.0.2.66\r\nAuth-Port: 110\r\n\r\n"
    ).encode()
    async with running_auth_http({ALICE: Raw(answer)}) as service:
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match=f"HTTP status {status[:3]}"):
                await client(service.url).ask(login())


@pytest.mark.asyncio
async def test_body_cannot_add_headers() -> None:
    answer = ok("Auth-Status: OK", "Auth-Server: 192.0.2.10", "Auth-Port: 110")
    answer += b"Auth-Server: 192.0.2.66\r\n\r\n" + b"x" * (4 * MAX_ANSWER_HEAD)
    async with running_auth_http({ALICE: Raw(answer)}) as service:
        async with asyncio.timeout(BOUND):
            route = await client(service.url).ask(login())
    assert route == Route("192.0.2.10", 110)


@pytest.mark.asyncio
async def test_answer_arriving_one_byte_at_a_time_is_read() -> None:
    answer = ok("Auth-Status: OK", "Auth-Server: 192.0.2.10", "Auth-Port: 110") + b"body"
    async with running_auth_http({ALICE: Raw(answer, one_byte_at_a_time=True)}) as service:
        async with asyncio.timeout(BOUND):
            route = await client(service.url).ask(login())
    assert route == Route("192.0.2.10", 110)


@pytest.mark.asyncio
async def test_oversized_answer_head_is_an_error() -> None:
    answer = ok("Auth-Status: OK", *[f"X-Padding-{i}: {'x' * 100}" for i in range(200)])
    assert len(answer) > MAX_ANSWER_HEAD
    async with running_auth_http({ALICE: Raw(answer)}) as service:
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match="exceeds"):
                await client(service.url).ask(login())


@pytest.mark.asyncio
async def test_answer_cut_short_is_an_error() -> None:
    async with running_auth_http(
        {ALICE: Raw(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n")}
    ) as service:
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match="ended before its headers"):
                await client(service.url).ask(login())


# --- transport -------------------------------------------------------------


@pytest.mark.asyncio
async def test_service_that_never_answers_times_out() -> None:
    never = asyncio.Event()
    async with running_auth_http({ALICE: ("192.0.2.10", 110)}, hold=never) as service:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match=r"did not answer within 0\.2s"):
                await client(service.url, timeout=0.2).ask(login())
        assert loop.time() - started < BOUND / 2
        assert len(service.requests) == 1


@pytest.mark.asyncio
async def test_connection_refused_is_an_error() -> None:
    with refusing_port() as port:
        async with asyncio.timeout(BOUND):
            with pytest.raises(AuthHttpError, match="unreachable"):
                await client(f"http://127.0.0.1:{port}/auth").ask(login())


@pytest.mark.asyncio
async def test_more_than_max_in_flight_fails_at_once() -> None:
    release = asyncio.Event()
    async with running_auth_http({ALICE: ("192.0.2.10", 110)}, hold=release) as service:
        auth = client(service.url, max_in_flight=1)
        async with asyncio.timeout(BOUND):
            first = asyncio.create_task(auth.ask(login()))
            await service.received.wait()
            assert auth.in_flight == 1
            with pytest.raises(
                AuthHttpError, match=r"max_in_flight \(1\) requests already pending"
            ):
                await auth.ask(login())
            assert len(service.requests) == 1  # the refused one never connected
            release.set()
            assert await first == Route("192.0.2.10", 110)
        assert auth.in_flight == 0


@pytest.mark.asyncio
async def test_in_flight_count_recovers_after_errors() -> None:
    with refusing_port() as port:
        auth = client(f"http://127.0.0.1:{port}/auth", max_in_flight=1)
        async with asyncio.timeout(BOUND):
            for _ in range(3):
                with pytest.raises(AuthHttpError, match="unreachable"):
                    await auth.ask(login())
    assert auth.in_flight == 0


@pytest.mark.asyncio
async def test_errors_never_carry_the_password() -> None:
    secret = b"hunter2-secret"
    failures: list[AuthHttpError] = []
    never = asyncio.Event()
    broken = Raw(ok("Auth-Status: OK", "Auth-Pass: hunter2-secret"))
    async with (
        running_auth_http({ALICE: broken}) as malformed,
        running_auth_http({}, hold=never) as silent,
    ):
        with refusing_port() as port:
            urls = [malformed.url, silent.url, f"http://127.0.0.1:{port}/"]
            async with asyncio.timeout(BOUND):
                for url in urls:
                    with pytest.raises(AuthHttpError) as caught:
                        await client(url, timeout=0.2).ask(login(password=secret))
                    failures.append(caught.value)
    for failure in failures:
        for text in (str(failure), repr(failure), repr(failure.__cause__)):
            assert "hunter2" not in text


# --- the request -----------------------------------------------------------


@pytest.mark.asyncio
async def test_request_carries_nginx_headers() -> None:
    async with running_auth_http({b"al ice%": ("192.0.2.10", 110)}) as service:
        request = login(
            b"al ice%",
            "pässword 1".encode(),
            attempt=3,
            client_host="client.example.net",
            tls=True,
            tls_protocol="TLSv1.3",
            tls_cipher="TLS_AES_128_GCM_SHA256",
        )
        async with asyncio.timeout(BOUND):
            await client(service.url + "?realm=mail").ask(request)
    [sent] = service.requests
    assert sent.request_line == b"GET /auth?realm=mail HTTP/1.0"
    host, port = service.address
    assert sent.value("Host") == f"{host}:{port}".encode()
    assert sent.value("Auth-Method") == b"plain"
    assert sent.value("Auth-User") == b"al%20ice%25"
    assert sent.value("Auth-Pass") == b"p%C3%A4ssword%201"
    assert sent.value("Auth-Protocol") == b"pop3"
    assert sent.value("Auth-Login-Attempt") == b"3"
    assert sent.value("Client-IP") == b"192.0.2.7"
    assert sent.value("Client-Host") == b"client.example.net"
    assert sent.value("Auth-SSL") == b"on"
    assert sent.value("Auth-SSL-Protocol") == b"TLSv1.3"
    assert sent.value("Auth-SSL-Cipher") == b"TLS_AES_128_GCM_SHA256"


@pytest.mark.asyncio
async def test_plaintext_request_has_no_tls_or_client_host_headers() -> None:
    async with running_auth_http({ALICE: ("192.0.2.10", 110)}) as service:
        async with asyncio.timeout(BOUND):
            await client(service.url).ask(login())
    [sent] = service.requests
    for name in ("Auth-SSL", "Auth-SSL-Protocol", "Auth-SSL-Cipher", "Client-Host"):
        assert sent.values(name) == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("user", "password"),
    [
        (b"alice\r\nAuth-User: admin", PASSWORD),
        (ALICE, b"x\r\nAuth-Pass: y\r\n\r\nGET /evil HTTP/1.0"),
        (b"alice\nX: 1", b"pw\rX: 2"),
    ],
)
async def test_header_injection_through_user_or_password_is_escaped(
    user: bytes, password: bytes
) -> None:
    async with running_auth_http({}) as service:
        async with asyncio.timeout(BOUND):
            await client(service.url).ask(login(user, password))
    [sent] = service.requests
    assert sent.value("Auth-User") == escape(user)
    assert sent.value("Auth-Pass") == escape(password)
    names = [name for name, _ in sent.headers]
    assert len(names) == len(set(names)) == 7  # Host, Auth-*, Client-IP: nothing smuggled in
    # The head's only CR and LF bytes are the line ends we put there.
    lines = sent.head.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)


@pytest.mark.asyncio
async def test_hostile_client_host_cannot_inject_headers() -> None:
    # Reverse DNS is attacker-controlled (nginx CVE-2026-28753).
    async with running_auth_http({ALICE: ("192.0.2.10", 110)}) as service:
        async with asyncio.timeout(BOUND):
            await client(service.url).ask(login(client_host="evil\r\nAuth-User: admin"))
    [sent] = service.requests
    assert sent.value("Auth-User") == ALICE
    assert sent.value("Client-Host") == b"evil%0D%0AAuth-User:%20admin"


def test_escape_matches_nginx_mail_auth_for_every_byte() -> None:
    every = bytes(range(256))
    escaped = escape(every)
    assert escape(b"alice@example.org") == b"alice@example.org"
    assert escape(b"a b%c") == b"a%20b%25c"
    assert all(0x21 <= b <= 0x7E for b in escaped)
    assert escaped.count(b"%") == 256 - (0x7E - 0x21 + 1) + 1


def test_repr_of_request_hides_the_password() -> None:
    request = login(password=b"hunter2-secret")
    assert "hunter2-secret" not in repr(request)
    assert "hunter2-secret" not in str(request)
    assert "alice" in repr(request)


# --- settings --------------------------------------------------------------


def test_https_url_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"auth_http: only http:// URLs are supported"):
        AuthHttpSettings(url="https://auth.example.org/auth")


@pytest.mark.parametrize(
    "url",
    ["", "ftp://h/", "http:///auth", "http://user:pw@h/", "http://h:0/", "http://h/a b"],
)
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="auth_http"):
        AuthHttpSettings(url=url)


@pytest.mark.parametrize(("timeout", "max_in_flight"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_unusable_limits_are_refused(timeout: float, max_in_flight: int) -> None:
    with pytest.raises(ValueError, match="auth_http"):
        AuthHttpSettings(url="http://127.0.0.1/", timeout=timeout, max_in_flight=max_in_flight)


# --- the answer parser, fed whole ------------------------------------------


def test_answer_with_bare_lf_lines_is_read() -> None:
    head = b"HTTP/1.0 200 OK\nAuth-Status: OK\nAuth-Server: ::1\nAuth-Port: 1110\n\n"
    assert parse_answer(head) == Route("::1", 1110)


def test_header_names_are_case_insensitive_and_values_trimmed() -> None:
    head = ok("auth-status:   Go away  ", "AUTH-WAIT: 1.5", "Auth-Error-Code: 535 5.7.8")
    assert parse_answer(head) == Refused("Go away", 1.5, "535 5.7.8")


@pytest.mark.parametrize(
    ("head", "complaint"),
    [
        (ok("Auth-Server: 192.0.2.1", "Auth-Port: 110"), "lacks Auth-Status"),
        (ok("Auth-Status: OK", "Auth-Server: 192.0.2.1"), "lacks Auth-Server or Auth-Port"),
        (ok("Auth-Status: OK", "Auth-Server: bad host", "Auth-Port: 110"), "Auth-Server"),
        (ok("Auth-Status: OK", "Auth-Server: 192.0.2.1", "Auth-Port: 0"), "Auth-Port"),
        (ok("Auth-Status: OK", "Auth-Server: 192.0.2.1", "Auth-Port: 70000"), "Auth-Port"),
        (ok("Auth-Status: OK", "Auth-Server: 192.0.2.1", "Auth-Port: +110"), "Auth-Port"),
        (ok("Auth-Status: no", "Auth-Wait: soon"), "Auth-Wait"),
        (ok("Auth-Status: no", "Auth-Wait: -1"), "Auth-Wait"),
        (ok("Auth-Status: WAIT"), "WAIT lacks Auth-Wait"),
        (ok("Auth-Status: OK", "Auth-Status: Go away"), "repeats Auth-Status"),
        (
            ok("Auth-Status: OK", "Auth-Server: 192.0.2.1", "Auth-Server: 192.0.2.66"),
            "repeats Auth-Server",
        ),
        (b"HTTP/1.0 200 OK\r\nAuth-Status: no\rAuth-Wait: 0\r\n\r\n", "control character"),
        (b"HTTP/1.0 200 OK\r\nAuth-Status: no\x00\r\n\r\n", "control character"),
        (b"HTTP/1.0 200 OK\r\nAuth-Status OK\r\n\r\n", "malformed header"),
        (b"HTTP/1.0 200 OK\r\n Auth-Status: OK\r\n\r\n", "malformed header"),
        (b"ICY 200 OK\r\nAuth-Status: OK\r\n\r\n", "status line"),
        (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n", "ended before"),
    ],
)
def test_malformed_answers_are_errors(head: bytes, complaint: str) -> None:
    with pytest.raises(AuthHttpError, match=complaint):
        parse_answer(head)
