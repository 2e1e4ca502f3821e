"""A client of nginx's mail `auth_http` protocol: ask an HTTP service where a login goes.

Owns: building the request (nginx's header names, with the login and
password %-escaped as nginx's NGX_ESCAPE_MAIL_AUTH does), one HTTP/1.0 GET
over plain TCP per question, reading a bounded answer head, and turning it
into a `Route` or a `Refused`. Everything that goes wrong on the way is an
`AuthHttpError`; the session decides what the client is told.

Must never log or put into an exception a password (the request's and the
route's reprs hide it), block the loop (the whole exchange runs under one
`asyncio.timeout` and the in-flight count fails fast instead of queueing),
or follow a redirect (any HTTP status but 200 is an error).

Protocol reference: https://nginx.org/en/docs/mail/ngx_mail_auth_http_module.html
and nginx `src/mail/ngx_mail_auth_http_module.c`. Where nginx is lax we are
strict, because the answer decides where a password is sent: nginx ignores
the HTTP status, lets a repeated header win silently and treats a missing
Auth-Status as OK; here each of those is an `AuthHttpError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_ANSWER_HEAD = 16 * 1024  # bytes of status line and headers; the body is never read
READ_CHUNK = 4096

# Auth-Status values with a meaning of their own; any other text is a refusal
# that nginx sends to a POP3 client as "-ERR <text>".
STATUS_OK = "OK"
STATUS_WAIT = "WAIT"  # "ask again after Auth-Wait seconds" (nginx 0.5.0)

# Bytes sent as they are in a header value: printable ASCII except "%" (the
# escape character itself). Space, CR, LF, other controls and every byte
# above 0x7e become %XX, so no value can end a header line or the head.
# nginx escapes only space, "%" and controls in Auth-User/Auth-Pass
# (ngx_string.c, `mail_auth`); we escape a superset, and escape every value,
# because Client-Host comes from reverse DNS and is attacker-controlled
# (CVE-2026-28753).
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2 token
_PORT = re.compile(r"[0-9]{1,5}")
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")  # RFC 1123 section 2.1

# Answer headers we read; a second copy of any of them is an error.
_READ_HEADERS = frozenset(
    {
        "auth-status",
        "auth-server",
        "auth-port",
        "auth-user",
        "auth-pass",
        "auth-wait",
        "auth-error-code",
    }
)


class AuthHttpError(Exception):
    """The auth service could not be asked or gave no usable answer.

    The text names what went wrong and may reach the log; it never holds a
    password and must never be sent to a client.
    """


@dataclass(frozen=True)
class AuthHttpSettings:
    url: str  # http://host[:port]/path[?query]
    timeout: float = 5.0  # seconds for the whole exchange: connect, send, answer head
    max_in_flight: int = 100  # questions pending at once; one more fails at once

    def __post_init__(self) -> None:
        _parse_url(self.url)
        if not self.timeout > 0:
            raise ValueError("auth_http: timeout must be positive")
        if self.max_in_flight < 1:
            raise ValueError("auth_http: max_in_flight must be at least 1")


@dataclass(frozen=True, kw_only=True)
class AuthRequest:
    """One login to ask about; `repr` leaves the password out (STYLE rule 6)."""

    user: bytes
    password: bytes = field(repr=False)
    method: str = "plain"  # nginx: plain, apop, cram-md5, external
    protocol: str = "pop3"
    attempt: int  # Auth-Login-Attempt: 1 for the session's first login
    client_ip: str
    client_host: str | None = None
    tls: bool = False
    tls_protocol: str | None = None
    tls_cipher: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        """nginx's request headers in nginx's order, every value escaped."""
        fields: list[tuple[str, bytes | str]] = [
            ("Auth-Method", self.method),
            ("Auth-User", self.user),
            ("Auth-Pass", self.password),
            ("Auth-Protocol", self.protocol),
            ("Auth-Login-Attempt", str(self.attempt)),
            ("Client-IP", self.client_ip),
        ]
        if self.client_host:
            fields.append(("Client-Host", self.client_host))
        if self.tls:
            fields.append(("Auth-SSL", "on"))
            if self.tls_protocol:
                fields.append(("Auth-SSL-Protocol", self.tls_protocol))
            if self.tls_cipher:
                fields.append(("Auth-SSL-Cipher", self.tls_cipher))
        return [
            (name, escape(value if isinstance(value, bytes) else value.encode()))
            for name, value in fields
        ]


@dataclass(frozen=True)
class Route:
    """Auth-Status: OK. Log in to `server`:`port`; `user`/`password` replace the client's."""

    server: str  # an IP literal or a host name
    port: int
    user: bytes | None = None
    password: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Refused:
    """Auth-Status other than OK: `message` is for the client, after `wait` seconds if given."""

    message: str
    wait: float | None = None
    error_code: str | None = None  # Auth-Error-Code as given, e.g. "535 5.7.8" (SMTP)

    @property
    def ask_again(self) -> bool:
        """Auth-Status: WAIT: no verdict yet; ask again after `wait` seconds."""
        return self.message == STATUS_WAIT


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    request_target: str  # path and query, as sent after GET
    host_header: str

    @property
    def where(self) -> str:
        return self.host_header


class AuthHttpClient:
    """Asks the auth service configured in `settings`; safe to share between sessions."""

    def __init__(self, settings: AuthHttpSettings) -> None:
        self.settings = settings
        self._target = _parse_url(settings.url)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def ask(self, request: AuthRequest) -> Route | Refused:
        where = self._target.where
        if self._in_flight >= self.settings.max_in_flight:
            # Fail fast: a slow auth service must not grow a queue of sessions
            # each holding a password.
            raise AuthHttpError(
                f"auth_http server {where}: "
                f"max_in_flight ({self._in_flight}) requests already pending"
            )
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.settings.timeout):
                head = await self._exchange(request)
        except TimeoutError:
            raise AuthHttpError(
                f"auth_http server {where} did not answer within {self.settings.timeout:g}s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise AuthHttpError(f"auth_http server {where} unreachable: {reason}") from exc
        finally:
            self._in_flight -= 1
        return parse_answer(head)

    async def _exchange(self, request: AuthRequest) -> bytes:
        reader, writer = await asyncio.open_connection(self._target.host, self._target.port)
        try:
            writer.write(_request_head(self._target, request))
            await writer.drain()
            return await _read_head(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def escape(value: bytes) -> bytes:
    """%-encode every byte outside 0x21-0x7e, and "%" itself."""
    return b"".join(bytes((b,)) if b in _SAFE else b"%%%02X" % b for b in value)


def _request_head(target: _Target, request: AuthRequest) -> bytes:
    lines = [
        f"GET {target.request_target} HTTP/1.0".encode("ascii"),
        f"Host: {target.host_header}".encode("ascii"),
    ]
    lines += [name.encode("ascii") + b": " + value for name, value in request.headers()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def parse_answer(head: bytes) -> Route | Refused:
    """The verdict in an answer head: status line, headers and the blank line ending them."""
    lines = [line.removesuffix(b"\r") for line in head.split(b"\n")]
    if len(lines) < 3 or lines[-2:] != [b"", b""]:
        raise AuthHttpError("auth_http answer ended before its headers did")
    for line in lines:
        # A bare CR, NUL or other control byte has no business in the head,
        # and Auth-Status text goes to the client (RFC 9112 section 2.2).
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in line):
            raise AuthHttpError("auth_http answer has a control character in its head")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise AuthHttpError("auth_http answer has no HTTP/1.x status line")
    if status[1] != b"200":
        # Redirects included: we never follow one.
        raise AuthHttpError(f"auth_http answer has HTTP status {status[1].decode()}, not 200")
    fields: dict[str, bytes] = {}
    for line in lines[1:-2]:
        name, colon, value = line.partition(b":")
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            raise AuthHttpError("auth_http answer has a malformed header line")
        key = name.decode("ascii").lower()
        if key not in _READ_HEADERS:
            continue
        if key in fields:
            raise AuthHttpError(f"auth_http answer repeats {name.decode('ascii')}")
        fields[key] = value.strip(b" \t")
    return _verdict(fields)


def _verdict(fields: dict[str, bytes]) -> Route | Refused:
    status = _text(fields.get("auth-status"))
    if not status:
        raise AuthHttpError("auth_http answer lacks Auth-Status")
    if status == STATUS_OK:
        server, port = _text(fields.get("auth-server")), _text(fields.get("auth-port"))
        if not server or not port:
            raise AuthHttpError("auth_http answer lacks Auth-Server or Auth-Port")
        return Route(
            server=_server(server),
            port=_port(port),
            user=fields.get("auth-user") or None,
            password=fields.get("auth-pass") or None,
        )
    wait_text = _text(fields.get("auth-wait"))
    wait = _seconds(wait_text) if wait_text else None
    if status == STATUS_WAIT and wait is None:
        # nginx would ask again at once, forever; we call it a broken answer.
        raise AuthHttpError("auth_http answer WAIT lacks Auth-Wait")
    return Refused(
        message=status, wait=wait, error_code=_text(fields.get("auth-error-code")) or None
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _server(text: str) -> str:
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(text))
    if len(text) > 254 or _HOSTNAME.fullmatch(text) is None:
        raise AuthHttpError("auth_http answer has an invalid Auth-Server")
    return text


def _port(text: str) -> int:
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise AuthHttpError("auth_http answer has an invalid Auth-Port")
    return int(text)


def _seconds(text: str) -> float:
    if _SECONDS.fullmatch(text) is None:
        raise AuthHttpError("auth_http answer has an invalid Auth-Wait")
    return float(text)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    buffer = bytearray()
    while True:
        end = _head_end(buffer)
        if end is not None or len(buffer) > MAX_ANSWER_HEAD:
            if end is None or end > MAX_ANSWER_HEAD:
                raise AuthHttpError(f"auth_http answer head exceeds {MAX_ANSWER_HEAD} bytes")
            return bytes(buffer[:end])
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            raise AuthHttpError("auth_http answer ended before its headers did")
        buffer += chunk


def _head_end(buffer: bytearray) -> int | None:
    """Where the blank line ending the head ends (CRLF or bare LF lines, as nginx takes)."""
    ends = [
        found + len(blank) for blank in (b"\n\r\n", b"\n\n") if (found := buffer.find(blank)) >= 0
    ]
    return min(ends, default=None)


def _parse_url(url: str) -> _Target:
    if not url or any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise ValueError("auth_http: the URL must be printable ASCII without spaces")
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        raise ValueError("auth_http: only http:// URLs are supported")
    if parts.username is not None or parts.password is not None:
        raise ValueError("auth_http: the URL must not carry a user or password")
    host = parts.hostname
    if not host:
        raise ValueError("auth_http: the URL has no host")
    port = 80 if parts.port is None else parts.port  # ValueError above 65535
    if port == 0:
        raise ValueError("auth_http: the URL has port 0")
    netloc = parts.netloc
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(host=host, port=port, request_target=request_target, host_header=netloc)
