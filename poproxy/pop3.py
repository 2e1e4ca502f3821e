"""The POP3 wire format (RFC 1939, RFC 2449, RFC 3206), without I/O.

Owns: CRLF line framing with a length limit and explicit pending bytes, client
`Command` parsing, status lines with their RFC 2449 response codes, and CAPA
building. Must never import asyncio, ssl or socket, read a clock, or await:
the session feeds bytes in and acts on what comes out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

CRLF = b"\r\n"

# RFC 2449 section 4: a command line, CRLF included, is at most 255 octets; a
# server that accepts longer lines (AUTH PLAIN initial responses grow) is fine.
RFC2449_MAX_COMMAND = 255

# Verbs whose arguments are secrets: they never appear in a repr or a log line.
SECRET_VERBS = frozenset({b"PASS", b"APOP", b"AUTH"})


class LineTooLong(Exception):
    """The peer sent more than the allowed bytes without ending the line."""


class LineBuffer:
    """Splits a byte stream into lines, keeping whatever follows explicitly.

    `feed()` appends received bytes; `next_line()` returns one line without its
    terminator, or None when no full line is buffered. A bare LF ends a line
    too (RFC 1939 wants CRLF; tolerant parsing costs nothing here). Bytes that
    were received but not yet returned as lines are `pending` and can be taken
    or discarded as a whole, which is how STLS drops pipelined plaintext
    (RFC 2595 section 4) and how bytes pipelined behind a login reach the backend.
    """

    __slots__ = ("_buffer", "_scanned", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes known to hold no LF

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """Return the next complete line, or None; raise LineTooLong past the limit."""
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned >= self.max_line:
                raise LineTooLong
            return None
        if end + 1 > self.max_line:
            raise LineTooLong
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line[:-1] if line.endswith(b"\r") else line

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as lines."""
        return len(self._buffer)

    def take_pending(self) -> bytes:
        """Return and forget every byte not yet returned as a line."""
        data = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return data


@dataclass(frozen=True)
class Command:
    """One client command line: an upper-cased verb and its argument text.

    The repr hides the arguments of PASS, APOP and AUTH so that no password or
    SASL payload can reach a log line through this type (STYLE rule 6).
    """

    verb: bytes
    argument: bytes = field(default=b"", repr=False)

    @classmethod
    def parse(cls, line: bytes) -> Command:
        # RFC 1939 section 3: keyword, then arguments separated by single
        # spaces. PASS keeps everything after the first space (section 7: a
        # password may contain spaces), so split only once.
        # A tab separates too: otherwise "PASS\tsecret" would be one verb,
        # and the redaction below would not recognise it.
        separators = [index for index in (line.find(b" "), line.find(b"\t")) if index >= 0]
        end = min(separators, default=len(line))
        return cls(line[:end].upper(), line[end + 1 :])

    @property
    def arguments(self) -> list[bytes]:
        return self.argument.split()

    def __repr__(self) -> str:
        verb = self.verb.decode("ascii", "replace")
        if self.verb in SECRET_VERBS:
            arguments = self.arguments
            # AUTH shows its mechanism, never the initial response.
            shown = (
                arguments[0].decode("ascii", "replace")
                if self.verb == b"AUTH" and arguments
                else ""
            )
            return f"Command({verb} {shown}***)" if shown else f"Command({verb} ***)"
        argument = self.argument.decode("ascii", "replace")
        return f"Command({verb} {argument})" if argument else f"Command({verb})"


class ResponseCode(enum.Enum):
    """Extended response codes a proxy must pass on (RFC 2449 section 8, RFC 3206)."""

    AUTH = b"AUTH"  # RFC 3206 section 5: the credentials are wrong
    IN_USE = b"IN-USE"  # RFC 2449 section 8.1.2: the maildrop is locked
    LOGIN_DELAY = b"LOGIN-DELAY"  # RFC 2449 section 8.1.1: logged in too recently
    SYS_TEMP = b"SYS/TEMP"  # RFC 3206 section 4: transient failure, try later
    SYS_PERM = b"SYS/PERM"  # RFC 3206 section 4: permanent failure


@dataclass(frozen=True)
class Status:
    """A first response line: +OK or -ERR, an optional response code, and text."""

    ok: bool
    code: ResponseCode | None
    text: bytes

    @classmethod
    def parse(cls, line: bytes) -> Status | None:
        """Parse a status line; None when the line is not +OK/-ERR at all."""
        if line.startswith(b"+OK"):
            ok, rest = True, line[3:]
        elif line.startswith(b"-ERR"):
            ok, rest = False, line[4:]
        else:
            return None
        rest = rest.lstrip(b" ")
        code = None
        if rest.startswith(b"["):
            closing = rest.find(b"]")
            if closing > 0:
                # Hierarchical codes (RFC 2449 section 8): "SYS/TEMP/X" is a SYS/TEMP.
                name = rest[1:closing].upper()
                for known in ResponseCode:
                    if name == known.value or name.startswith(known.value + b"/"):
                        code = known
                        break
                rest = rest[closing + 1 :].lstrip(b" ")
        return cls(ok, code, rest)


def ok(text: str = "") -> bytes:
    """An +OK line, terminated."""
    return b"+OK " + text.encode() + CRLF if text else b"+OK" + CRLF


def err(text: str, code: ResponseCode | None = None) -> bytes:
    """An -ERR line with an optional response code, terminated."""
    prefix = b"-ERR [" + code.value + b"] " if code else b"-ERR "
    return prefix + text.encode() + CRLF


def multiline(first: bytes, lines: list[bytes]) -> bytes:
    """A multi-line response (RFC 1939 section 3), dot-stuffing every line."""
    body = b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)
    return first + body + b"." + CRLF


def capa(capabilities: list[bytes]) -> bytes:
    """The CAPA response (RFC 2449 section 5) listing the given capability lines."""
    return multiline(ok("Capability list follows"), capabilities)
