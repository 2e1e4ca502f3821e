"""The first bytes a client sends on a TLS port, without I/O.

Owns: reading the bytes peeked (MSG_PEEK) from a new connection on a TLS port,
before the TLS library reads them, and deciding whether the client speaks TLS
at all and, if it does, what its ClientHello (RFC 8446 section 4.1.2, RFC 5246
section 7.4.1.2) offers: the server name (RFC 6066 section 3) and the ALPN
protocol list (RFC 7301 section 3.1). The ClientHello is reassembled from as
many handshake records as the client split it into, up to MAX_CLIENT_HELLO
bytes on the wire. The session uses the answer to refuse a client whose ALPN
list lacks "pop3" (ALPACA: RFC 7301 section 3.2, RFC 9325 section 3.8), to see
the SNI name, and to tell a plaintext client on a TLS port from a TLS one.

Must never import asyncio, ssl or socket, read a clock, await, or raise on any
input: every bounds or format problem is a `Malformed` value. It reads; it
never accepts a handshake: the TLS library still parses and verifies the same
bytes afterwards. Where the two could read the same bytes differently (two
ALPN or SNI extensions, bytes after a vector) this parser refuses, so what it
reports is what the library will act on; it is stricter than OpenSSL only on
SNI bytes outside printable ASCII.

How the first bytes are classified:

- `NotTls`: the first byte is not 22 (handshake content type) or the second is
  not 3 (the major version of SSL 3.0 and every TLS). One byte is enough to
  decide when it is not 0x16: every POP3 command, an HTTP request, a bare CRLF,
  and an SSLv2-format hello (high bit set; RFC 5246 appendix E.2, which cannot
  carry extensions, hence no ALPN) are NotTls.
- `Malformed`: the bytes start like a TLS handshake record (0x16 0x03) but do
  not hold a sane ClientHello. A peer that got this far speaks TLS, so it should
  get a TLS alert or a closed connection, never a plaintext -ERR line.
- `NeedMore`: not enough bytes yet; `size` is a lower bound on the total bytes
  needed, never more than the complete ClientHello records, never more than
  MAX_CLIENT_HELLO. Peek again once at least that many bytes are buffered.
- `ClientHello`: the complete ClientHello parsed. Bytes after its last record
  (a ChangeCipherSpec, early data, anything) are not looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 8446 section 5.1, RFC 5246 section 6.2.1: a record is a content type
# byte, a 2-byte legacy version and a 2-byte length.
RECORD_HEADER = 5
CONTENT_TYPE_HANDSHAKE = 22
# Every SSL 3.0 and TLS record version is 3.x. The minor byte is not checked:
# RFC 8446 section 5.1 says legacy_record_version "MUST be ignored for all
# purposes" (ClientHellos say 3.1 or 3.3), and OpenSSL ignores it there too.
VERSION_MAJOR = 3
# RFC 8446 section 5.1 and RFC 5246 section 6.2.1: "The length MUST NOT exceed
# 2^14" for a plaintext record, which is what a ClientHello travels in (the
# 2^14 + 256 and 2^14 + 2048 bounds are for protected records).
MAX_RECORD_PAYLOAD = 2**14
# RFC 8446 section 4: a handshake message is a type byte and a 3-byte length.
HANDSHAKE_HEADER = 4
HANDSHAKE_CLIENT_HELLO = 1
# The most bytes the caller ever has to peek: a 16 KiB ClientHello in up to four
# records. Real ones are a few hundred bytes to 2 KiB (post-quantum key shares);
# a larger or more finely fragmented one is refused rather than buffered.
MAX_CLIENT_HELLO = MAX_RECORD_PAYLOAD + 4 * RECORD_HEADER

# RFC 8446 section 4.1.2 / RFC 5246 section 7.4.1.2: the ClientHello vectors.
RANDOM_SIZE = 32
MAX_SESSION_ID = 32  # legacy_session_id<0..32>
# Extension types (IANA TLS ExtensionType Values).
EXTENSION_SERVER_NAME = 0  # RFC 6066 section 3
EXTENSION_ALPN = 16  # RFC 7301 section 3.1
NAME_TYPE_HOST_NAME = 0  # RFC 6066 section 3: the only name_type defined
# RFC 1035 section 2.3.4: a name is at most 255 octets; OpenSSL refuses longer
# host names too (TLSEXT_MAXLEN_host_name).
MAX_HOST_NAME = 255
_PRINTABLE_ASCII = re.compile(rb"[\x21-\x7e]+")

# RFC 7301 section 3.2: "In the event that the server supports no protocols
# that the client advertises, then the server SHALL respond with a fatal
# 'no_application_protocol' alert." This is that alert as one plaintext record
# (RFC 8446 section 6: type 21, version 3.3, length 2, level fatal (2),
# description no_application_protocol (120)), for a caller that refuses the
# handshake before the TLS library has read anything.
NO_APPLICATION_PROTOCOL_ALERT = bytes((21, 3, 3, 0, 2, 2, 120))


@dataclass(frozen=True)
class NeedMore:
    """Not enough bytes to decide; peek again once `size` bytes are buffered."""

    size: int


@dataclass(frozen=True)
class NotTls:
    """The first bytes cannot start a TLS handshake record: a plaintext client."""


@dataclass(frozen=True)
class Malformed:
    """A TLS handshake record that does not hold a sane ClientHello."""

    reason: str


@dataclass(frozen=True)
class ClientHello:
    """What a complete ClientHello offers.

    `server_name` is the RFC 6066 host_name, lower-cased, without a trailing
    dot, printable ASCII only (safe to log); None when the client sent no
    server_name extension (clients send none for an IP address). `alpn` is the
    offered protocol names in the client's order, decoded as latin-1 so that
    non-ASCII bytes stay distinct; None when the ALPN extension is absent,
    which is not the same as an ALPN list without "pop3".
    """

    server_name: str | None
    alpn: tuple[str, ...] | None


class _Violation(Exception):
    """Internal: the bytes break the format; inspect() turns this into Malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Reader:
    """A bounds-checked cursor over bytes: every overrun is a _Violation.

    Written for the path every connection takes: no message is formatted
    unless a bound is broken.
    """

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def at_end(self) -> bool:
        return self._offset >= len(self._data)

    def take(self, size: int, what: str, suffix: str = "") -> bytes:
        offset = self._offset
        end = offset + size
        if end > len(self._data):
            raise _Violation(f"{what}{suffix} overruns its enclosing block")
        self._offset = end
        return self._data[offset:end]

    def uint(self, size: int, what: str, suffix: str = "") -> int:
        return int.from_bytes(self.take(size, what, suffix), "big")

    def vector(self, length_size: int, what: str, minimum: int, maximum: int) -> bytes:
        """A length-prefixed vector, RFC 8446 section 3.4 `<minimum..maximum>`."""
        length = self.uint(length_size, what, " length")
        if not minimum <= length <= maximum:
            raise _Violation(f"{what} length {length} outside {minimum}..{maximum}")
        return self.take(length, what)

    def expect_end(self, what: str) -> None:
        if not self.at_end:
            raise _Violation(f"bytes after {what}")


def inspect(data: bytes) -> NeedMore | NotTls | Malformed | ClientHello:
    """Classify the bytes a client sent first on a TLS port; never raises.

    `data` is everything peeked so far, from the first byte of the connection.
    """
    try:
        return _inspect(data)
    except _Violation as violation:
        return Malformed(violation.reason)


def _inspect(data: bytes) -> NeedMore | NotTls | ClientHello:
    if not data:
        return NeedMore(RECORD_HEADER)
    if data[0] != CONTENT_TYPE_HANDSHAKE or (len(data) > 1 and data[1] != VERSION_MAJOR):
        return NotTls()

    handshake = bytearray()  # the handshake bytes received so far, records unwrapped
    promised = 0  # handshake bytes the records seen so far carry once complete
    message_end: int | None = None  # HANDSHAKE_HEADER + ClientHello length, once known
    offset = 0  # where the current record starts
    while True:
        header = data[offset : offset + RECORD_HEADER]
        if offset > 0:
            # RFC 8446 section 5.1: "Handshake messages MUST NOT be interleaved
            # with other record types": every fragment is a handshake record.
            if header[:1] and header[0] != CONTENT_TYPE_HANDSHAKE:
                raise _Violation("a non-handshake record inside the ClientHello")
            if header[1:2] and header[1] != VERSION_MAJOR:
                raise _Violation("a ClientHello record whose version is not 3.x")
        if len(header) < RECORD_HEADER:
            if offset == 0:
                return NeedMore(RECORD_HEADER)
            # This header and, in one more record at best, the missing bytes.
            missing = (HANDSHAKE_HEADER if message_end is None else message_end) - promised
            return NeedMore(offset + RECORD_HEADER + min(missing, MAX_RECORD_PAYLOAD))
        length = int.from_bytes(header[3:5], "big")
        # RFC 8446 section 5.1: "Implementations MUST NOT send zero-length
        # fragments of Handshake types".
        if length == 0:
            raise _Violation("a zero-length handshake record")
        if length > MAX_RECORD_PAYLOAD:
            raise _Violation(f"a record of {length} bytes, over 2^14")
        end = offset + RECORD_HEADER + length
        if end > MAX_CLIENT_HELLO:
            raise _Violation(f"a ClientHello over {MAX_CLIENT_HELLO} bytes")
        handshake += data[offset + RECORD_HEADER : end]
        promised += length

        # The handshake header can be judged before the rest arrives.
        if handshake and handshake[0] != HANDSHAKE_CLIENT_HELLO:
            raise _Violation(f"handshake message type {handshake[0]}, not ClientHello")
        if len(handshake) >= HANDSHAKE_HEADER:
            message_end = HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")
            # The ClientHello is the client's only handshake message before
            # the server answers, and in TLS 1.3 it must end on a record
            # boundary before early data (RFC 8446 section 5.1).
            if promised > message_end:
                raise _Violation("handshake bytes after the ClientHello in its record")
            if promised < message_end:
                # The rest needs at least one more record per 2^14 bytes.
                remaining = message_end - promised
                records = -(-remaining // MAX_RECORD_PAYLOAD)
                if end + records * RECORD_HEADER + remaining > MAX_CLIENT_HELLO:
                    raise _Violation(f"a ClientHello over {MAX_CLIENT_HELLO} bytes")

        if len(data) < end:
            return NeedMore(end)
        if message_end is not None and promised == message_end:
            return _parse_client_hello(bytes(handshake[HANDSHAKE_HEADER:]))
        offset = end


def _parse_client_hello(body: bytes) -> ClientHello:
    # RFC 8446 section 4.1.2 (RFC 5246 section 7.4.1.2 is the same shape).
    reader = _Reader(body)
    legacy_version = reader.take(2, "legacy_version")
    if legacy_version[0] != VERSION_MAJOR:
        raise _Violation("a ClientHello legacy_version that is not 3.x")
    reader.take(RANDOM_SIZE, "random")
    reader.vector(1, "legacy_session_id", 0, MAX_SESSION_ID)
    cipher_suites = reader.vector(2, "cipher_suites", 2, 2**16 - 2)
    if len(cipher_suites) % 2:
        raise _Violation("an odd cipher_suites length")
    reader.vector(1, "legacy_compression_methods", 1, 2**8 - 1)
    # RFC 5246 section 7.4.1.2: an SSL 3.0-style ClientHello may end here,
    # without an extensions block.
    if reader.at_end:
        return ClientHello(server_name=None, alpn=None)
    # extensions<8..2^16-1> in TLS 1.3, but a TLS 1.2 client may send an empty
    # block (RFC 5246 section 7.4.1.2: <0..2^16-1>).
    extensions = reader.vector(2, "extensions", 0, 2**16 - 1)
    reader.expect_end("the extensions block")

    # Each extension is a 2-byte type and a 2-byte length before its data.
    # Indexing by hand: this loop runs a dozen times for every connection.
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] | None = None
    offset, end = 0, len(extensions)
    while offset < end:
        if end - offset < 4:
            what = "extension type" if end - offset < 2 else "extension_data length"
            raise _Violation(f"{what} overruns its enclosing block")
        extension_type = extensions[offset] << 8 | extensions[offset + 1]
        data_end = offset + 4 + (extensions[offset + 2] << 8 | extensions[offset + 3])
        if data_end > end:
            raise _Violation("extension_data overruns its enclosing block")
        # RFC 8446 section 4.2, RFC 5246 section 7.4.1.4: "There MUST NOT be
        # more than one extension of the same type". Two ALPN or SNI lists
        # would let this parser and the TLS library read different ones.
        if extension_type in seen:
            raise _Violation(f"extension {extension_type} sent twice")
        seen.add(extension_type)
        if extension_type == EXTENSION_SERVER_NAME:
            server_name = _parse_server_name(extensions[offset + 4 : data_end])
        elif extension_type == EXTENSION_ALPN:
            alpn = _parse_alpn(extensions[offset + 4 : data_end])
        offset = data_end
    return ClientHello(server_name=server_name, alpn=alpn)


def _parse_server_name(data: bytes) -> str:
    # RFC 6066 section 3: ServerNameList server_name_list<1..2^16-1>, each entry
    # a name_type byte and, for host_name, HostName<1..2^16-1>. host_name is the
    # only name_type defined, an unknown one has no known length, and "The
    # ServerNameList MUST NOT contain more than one name of the same
    # name_type": so the list is exactly one host_name entry (OpenSSL agrees).
    reader = _Reader(data)
    names = _Reader(reader.vector(2, "server_name_list", 1, 2**16 - 1))
    reader.expect_end("the server_name_list")
    name_type = names.uint(1, "name_type")
    if name_type != NAME_TYPE_HOST_NAME:
        raise _Violation(f"server_name entry of name_type {name_type}")
    host_name = names.vector(2, "HostName", 1, 2**16 - 1)
    names.expect_end("the host_name entry")
    if len(host_name) > MAX_HOST_NAME:
        raise _Violation(f"a {len(host_name)}-byte HostName, over {MAX_HOST_NAME}")
    # RFC 6066 section 3: "HostName" is ASCII (A-labels for IDNs). Anything
    # outside printable ASCII (NUL, spaces, CR/LF, UTF-8) is refused, which also
    # keeps the name safe to log.
    if not _PRINTABLE_ASCII.fullmatch(host_name):
        raise _Violation("a HostName with bytes outside printable ASCII")
    # A trailing dot names the same host (RFC 6066 section 3 says "without a
    # trailing dot", some clients send it anyway); DNS names are
    # case-insensitive (RFC 4343).
    name = host_name.decode("ascii").lower()
    name = name.removesuffix(".")
    if not name:
        raise _Violation("an empty HostName")
    return name


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    # RFC 7301 section 3.1: ProtocolNameList protocol_name_list<2..2^16-1>,
    # each ProtocolName<1..2^8-1>; "Empty strings MUST NOT be included".
    reader = _Reader(data)
    names = _Reader(reader.vector(2, "protocol_name_list", 2, 2**16 - 1))
    reader.expect_end("the protocol_name_list")
    protocols: list[str] = []
    while not names.at_end:
        # latin-1 maps every byte to one code point: "pop3" is found only when
        # the client sent exactly those four bytes.
        protocols.append(names.vector(1, "ProtocolName", 1, 2**8 - 1).decode("latin-1"))
    return tuple(protocols)
