"""Unit tests for poproxy.proxy_protocol: the PROXY protocol header, v1 and v2.

Sans-IO: no sockets, no event loop. The parser sees a growing prefix of the
connection, so "byte by byte" means every prefix: each one short of the whole
asks for more without overshooting the header, the whole parses, and trailing
data (POP3 commands, a TLS ClientHello, another header) changes neither the
result nor its `length` (STYLE rule 11). Refusals are checked at the byte that
decides them: an Invalid prefix stays Invalid whatever follows.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl

import pytest

from poproxy.proxy_protocol import (
    MAX_HEADER,
    MAX_V2_HEADER,
    MAX_V2_LENGTH,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Header,
    Invalid,
    NeedMore,
    build_v1,
    build_v2,
    parse,
)

Result = NeedMore | Invalid | Header
ANY_IPV4 = str(ipaddress.IPv4Address(0))


@functools.cache
def client_hello() -> bytes:
    """The ClientHello the stdlib's TLS client sends first, from its outgoing BIO."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["pop3"])
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="mail.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def trailers() -> list[bytes]:
    """What follows the header on a connection: the client's first bytes, or junk."""
    return [
        b"\r\n",
        b"CAPA\r\n",
        b"USER alice\r\nPASS secret\r\n",
        client_hello(),
        b"PROXY TCP4 203.0.113.9 192.0.2.1 1 2\r\n",
        V2_SIGNATURE + b"\x20\x00\x00\x00",
        b"\x00" * 300,
    ]


# --- helpers: feeding ---------------------------------------------------------


def tr(data: bytes, expected: Header) -> None:
    """Every prefix short of `data` asks for more within bounds; the whole parses."""
    assert expected.length == len(data)
    for end in range(len(data)):
        result = parse(data[:end])
        assert isinstance(result, NeedMore), (end, result)
        assert end < result.size <= len(data), (end, result)
    assert parse(data) == expected
    for trailer in trailers():
        assert parse(data + trailer) == expected, trailer
    assert peek_loop(data + b"+OK\r\n") == expected


def peek_loop(stream: bytes) -> Result:
    """What the caller does: read exactly NeedMore.size bytes until decided."""
    size = 0
    for _ in range(len(stream) + 1):
        result = parse(stream[:size])
        if not isinstance(result, NeedMore):
            return result
        assert result.size > size, "NeedMore must always ask for more"
        assert result.size <= MAX_HEADER
        size = result.size
    raise AssertionError("the read loop did not end")


def refused(data: bytes, decided_at: int, reason: str = "") -> None:
    """Prefixes shorter than `decided_at` ask for more; from there on, Invalid."""
    for end in range(decided_at):
        assert isinstance(parse(data[:end]), NeedMore), (end, parse(data[:end]))
    for end in range(decided_at, len(data) + 1):
        result = parse(data[:end])
        assert isinstance(result, Invalid), (end, result)
        assert reason in result.reason, result.reason
    for trailer in trailers():
        assert isinstance(parse(data + trailer), Invalid), trailer


def invalid(data: bytes, reason: str = "") -> None:
    """The whole input, and the same with trailing data, is Invalid for `reason`."""
    for candidate in (data, *(data + trailer for trailer in trailers())):
        result = parse(candidate)
        assert isinstance(result, Invalid), (candidate, result)
        assert reason in result.reason, result.reason


def v2(command: int, family: int, body: bytes, *, length: int | None = None) -> bytes:
    """A v2 header from its parts; `length` overrides the length field."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + size.to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


IPV4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (49152).to_bytes(2, "big") + b"\x00\x6e"
IPV6_BLOCK = (
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + (49152).to_bytes(2, "big")
    + b"\x03\xe3"
)


# --- version 1: round trips and real lines -------------------------------------


class TestV1RoundTrip:
    @pytest.mark.parametrize(
        ("source", "destination", "line", "parsed_source", "parsed_destination"),
        [
            (
                ("192.0.2.1", 49152),
                ("198.51.100.7", 110),
                b"PROXY TCP4 192.0.2.1 198.51.100.7 49152 110\r\n",
                ("192.0.2.1", 49152),
                ("198.51.100.7", 110),
            ),
            (
                ("2001:db8::1", 49152),
                ("2001:db8::2", 995),
                b"PROXY TCP6 2001:db8::1 2001:db8::2 49152 995\r\n",
                ("2001:db8::1", 49152),
                ("2001:db8::2", 995),
            ),
            # Mixed families: the IPv4 side becomes IPv4-mapped IPv6, written
            # in hexadecimal groups on the wire (spec 2.1), read back in the
            # RFC 5952 section 5 form.
            (
                ("192.0.2.1", 49152),
                ("2001:db8::2", 110),
                b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 49152 110\r\n",
                ("::ffff:192.0.2.1", 49152),
                ("2001:db8::2", 110),
            ),
            (
                ("2001:db8::1", 0),
                ("198.51.100.7", 65535),
                b"PROXY TCP6 2001:db8::1 ::ffff:c633:6407 0 65535\r\n",
                ("2001:db8::1", 0),
                ("::ffff:198.51.100.7", 65535),
            ),
            # A scope means nothing to the receiver and cannot be written.
            (
                ("fe80::1%eth0", 1),
                ("fe80::2", 2),
                b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n",
                ("fe80::1", 1),
                ("fe80::2", 2),
            ),
        ],
    )
    def test_build_then_parse(
        self,
        source: tuple[str, int],
        destination: tuple[str, int],
        line: bytes,
        parsed_source: tuple[str, int],
        parsed_destination: tuple[str, int],
    ) -> None:
        assert build_v1(source, destination) == line
        tr(line, Header(1, False, parsed_source, parsed_destination, len(line)))

    @pytest.mark.parametrize(
        "address",
        [
            "::",
            "::1",
            "1::",
            "2001:db8::1:0:0:1",  # two equal zero runs: the first is compressed
            "2001:db8:0:1:1:1:1:1",  # a single zero group is never "::"
            "2001:0:0:1::1",  # the longest run wins
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:0:c000:201",  # not IPv4-mapped: stays hexadecimal
            "64:ff9b::c000:201",
        ],
    )
    def test_ipv6_text_is_rfc5952(self, address: str) -> None:
        # The builder compresses by itself (Python 3.13 changed str() for
        # mapped addresses); for the rest it must agree with ipaddress.
        line = build_v1((address, 1), ("::1", 2))
        assert line == f"PROXY TCP6 {address} ::1 1 2\r\n".encode()
        assert parse(line) == Header(1, False, (address, 1), ("::1", 2), len(line))

    def test_ipv4_mapped_both_sides(self) -> None:
        line = build_v1(("::ffff:192.0.2.1", 1), ("::ffff:198.51.100.7", 2))
        assert line == b"PROXY TCP6 ::ffff:c000:201 ::ffff:c633:6407 1 2\r\n"

    @pytest.mark.parametrize(
        ("source", "destination"),
        [
            (("mail.example.org", 1), ("192.0.2.1", 2)),
            (("192.0.2.1", 1), ("", 2)),
            (("192.0.2.256", 1), ("192.0.2.1", 2)),
            (("192.0.2.1", -1), ("192.0.2.1", 2)),
            (("192.0.2.1", 1), ("192.0.2.1", 65536)),
        ],
    )
    def test_bad_endpoints_are_the_callers_bug(
        self, source: tuple[str, int], destination: tuple[str, int]
    ) -> None:
        with pytest.raises(ValueError, match=r"."):
            build_v1(source, destination)
        with pytest.raises(ValueError, match=r"."):
            build_v2(source, destination)


class TestV1RealLines:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            # spec 2.1, the example before an HTTP request
            (
                b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
                Header(1, False, ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
            ),
            # spec 2.1, the longest TCP4 line: 56 bytes
            (
                b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
                Header(1, False, ("255.255.255.255", 65535), ("255.255.255.255", 65535), 56),
            ),
            # spec 2.1, the longest TCP6 line: 104 bytes, upper and lower case
            (
                b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                b" FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF 65535 65535\r\n",
                Header(
                    1,
                    False,
                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                    104,
                ),
            ),
            # HAProxy through glibc's inet_ntop writes a mapped address dotted
            (
                b"PROXY TCP6 ::ffff:203.0.113.9 2001:db8::25 40000 995\r\n",
                Header(1, False, ("::ffff:203.0.113.9", 40000), ("2001:db8::25", 995), 54),
            ),
            # an uncompressed IPv6 address is read in its canonical form
            (
                b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 ::1 1 0\r\n",
                Header(1, False, ("2001:db8::1", 1), ("::1", 0), 60),
            ),
            (
                b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
                Header(1, False, (ANY_IPV4, 0), (ANY_IPV4, 0), 32),
            ),
            # spec 2.1, UNKNOWN: short form, and the 107-byte worst case
            (b"PROXY UNKNOWN\r\n", Header(1, True, None, None, 15)),
            (
                b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
                Header(1, True, None, None, V1_MAX_LENGTH),
            ),
        ],
    )
    def test_real_line(self, line: bytes, expected: Header) -> None:
        tr(line, expected)

    def test_unknown_ignores_the_rest_of_the_line(self) -> None:
        # Spec 2.1: "the receiver must ignore anything presented before the
        # CRLF", as long as it is printable (a tab or NUL is refused below).
        line = b"PROXY UNKNOWN 192.0.2.1  not-an-address 99999 x\r\n"
        tr(line, Header(1, True, None, None, len(line)))

    def test_unknown_is_local(self) -> None:
        header = parse(b"PROXY UNKNOWN\r\nCAPA\r\n")
        assert isinstance(header, Header)
        assert header.local
        assert header.source is None
        assert header.destination is None
        assert header.length == 15


# --- version 1: refusals --------------------------------------------------------


class TestV1Invalid:
    @pytest.mark.parametrize(
        "line",
        [
            b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"Proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
            # extra spaces, anywhere
            b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2  1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1  2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
            b" PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY\tTCP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
            # addresses
            b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",  # octal-looking octet
            b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1.5 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 3221225985 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 localhost 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n",  # the family dictates the format
            b"PROXY TCP4 192.0.2.1 ::ffff:192.0.2.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP6 2001:db8::g ::1 1 2\r\n",
            b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n",
            b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
            b"PROXY TCP6 [::1] ::1 1 2\r\n",
            # ports
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 080 2\r\n",  # octal-looking port
            b"PROXY TCP4 192.0.2.1 192.0.2.2 00 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 0x50\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 1_0\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 110000\r\n",
            # line ends: a lone CR or LF never ends the line (spec 2.1)
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n\r\n",
            b"PROXY UNKNOWN\n\r\n",
            b"PROXY UNKNOWN\r\r\n",
            b"PROXY UNKNOWN \x00\r\n",
            b"PROXY UNKNOWN \xff\r\n",
            b"PROXY UNKNOWN whatever the sender\tsays\r\n",
        ],
    )
    def test_refused(self, line: bytes) -> None:
        invalid(line)

    def test_no_crlf_within_107_bytes(self) -> None:
        # 106 bytes without a CR can never end within 107: refused at once.
        line = b"PROXY UNKNOWN " + b"f" * 92
        assert len(line) == 106
        refused(line + b"\r\n", 106, "107")

    def test_crlf_straddling_byte_107(self) -> None:
        line = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
        assert len(line) == V1_MAX_LENGTH
        assert parse(line) == Header(1, True, None, None, V1_MAX_LENGTH)
        longer = b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n"
        invalid(longer, "107")

    @pytest.mark.parametrize(
        ("data", "decided_at"),
        [
            # the first byte is neither "P" nor CR: refused at once
            (b"USER alice\r\n", 1),
            (b"CAPA\r\n", 1),
            (b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", 1),
            (b"GET / HTTP/1.1\r\n", 1),
            (b"\x16\x03\x01\x00\x05", 1),  # a TLS record
            (b"\n", 1),
            (b"\x00", 1),
            (b" PROXY UNKNOWN\r\n", 1),
            # "P" and then anything but "ROXY "
            (b"PASS secret\r\n", 2),
            (b"PROXYTCP4\r\n", 6),
            (b"PROXY\r\n", 6),  # the CR cannot end a line this short
            # the protocol
            (b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", 10),
            (b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n", 8),  # "U" may start UNKNOWN
            (b"PROXY UNKNOWNX\r\n", 14),
            (b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", 7),
            # an address: a wrong character at once, a wrong value at its space
            (b"PROXY TCP4 192.0.2.1x 192.0.2.2 1 2\r\n", 21),
            (b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n", 12),
            (b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n", 23),
            (b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", 22),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", 19),
            # a port: a leading zero or a sixth digit at once
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 080 2\r\n", 33),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 110000\r\n", 39),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 2\r\n", 37),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", 35),
            # a CR is only ever the end of a complete line
            (b"PROXY TCP4 192.0.2.1\r\n", 21),
            (b"PROXY UNKNOWN\rX\r\n", 15),
            (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", 35),
        ],
    )
    def test_refused_as_early_as_possible(self, data: bytes, decided_at: int) -> None:
        refused(data, decided_at)


# --- version 2: round trips and real headers ------------------------------------


class TestV2RoundTrip:
    @pytest.mark.parametrize(
        ("source", "destination", "family", "parsed_source", "parsed_destination"),
        [
            (("192.0.2.1", 49152), ("198.51.100.7", 110), 0x11, None, None),
            (("2001:db8::1", 49152), ("2001:db8::2", 995), 0x21, None, None),
            (
                ("192.0.2.1", 49152),
                ("2001:db8::2", 995),
                0x21,
                ("::ffff:192.0.2.1", 49152),
                None,
            ),
            (
                ("2001:db8::1", 0),
                ("198.51.100.7", 65535),
                0x21,
                None,
                ("::ffff:198.51.100.7", 65535),
            ),
        ],
    )
    def test_build_then_parse(
        self,
        source: tuple[str, int],
        destination: tuple[str, int],
        family: int,
        parsed_source: tuple[str, int] | None,
        parsed_destination: tuple[str, int] | None,
    ) -> None:
        data = build_v2(source, destination)
        assert data[:12] == V2_SIGNATURE
        assert data[12:14] == bytes([0x21, family])
        expected = Header(
            2, False, parsed_source or source, parsed_destination or destination, len(data)
        )
        tr(data, expected)

    def test_exact_bytes(self) -> None:
        assert build_v2(("192.0.2.1", 49152), ("198.51.100.7", 110)) == v2(0x21, 0x11, IPV4_BLOCK)
        assert build_v2(("2001:db8::1", 49152), ("2001:db8::2", 995)) == v2(0x21, 0x21, IPV6_BLOCK)

    def test_tlvs_round_trip(self) -> None:
        # What HAProxy's send-proxy-v2-ssl sends, with ALPN, SNI and an ID.
        ssl_value = (
            bytes([PP2_CLIENT_SSL])
            + (0).to_bytes(4, "big")
            + tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")
            + tlv(PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384")
        )
        tlvs = (
            (PP2_TYPE_ALPN, b"pop3"),
            (PP2_TYPE_AUTHORITY, b"mail.example.org"),
            (PP2_TYPE_SSL, ssl_value),
            (PP2_TYPE_UNIQUE_ID, bytes(range(128))),
            (PP2_TYPE_NOOP, b""),
            (0xE0, b"custom"),
            (PP2_TYPE_ALPN, b"again"),  # order and repeats kept as sent
        )
        data = build_v2(("2001:db8::1", 49152), ("2001:db8::2", 995), tlvs)
        assert data == v2(0x21, 0x21, IPV6_BLOCK + b"".join(tlv(k, v) for k, v in tlvs))
        tr(data, Header(2, False, ("2001:db8::1", 49152), ("2001:db8::2", 995), len(data), tlvs))

    @pytest.mark.parametrize(
        "tlvs",
        [
            ((256, b""),),
            ((-1, b""),),
            ((PP2_TYPE_NOOP, bytes(65536)),),
            ((PP2_TYPE_NOOP, bytes(40000)), (PP2_TYPE_NOOP, bytes(40000))),
        ],
    )
    def test_bad_tlvs_are_the_callers_bug(self, tlvs: tuple[tuple[int, bytes], ...]) -> None:
        with pytest.raises(ValueError, match=r"."):
            build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs)

    def test_haproxy_capture(self) -> None:
        # HAProxy's send-proxy-v2 in front of an HTTP request, as captured by
        # netcat: 0d0a0d0a 000d0a51 5549540a 21 11 000c, then the addresses.
        data = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050") + (
            b"GET / HTTP/1.1\r\nHost: localhost:8080\r\n\r\n"
        )
        assert parse(data) == Header(2, False, ("172.19.0.1", 42578), ("172.19.0.3", 80), 28)
        tr(data[:28], Header(2, False, ("172.19.0.1", 42578), ("172.19.0.3", 80), 28))

    def test_length_may_exceed_the_addresses_for_tlvs_only(self) -> None:
        data = v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_NOOP, bytes(3)))
        header = parse(data)
        assert isinstance(header, Header)
        assert header.tlvs == ((PP2_TYPE_NOOP, bytes(3)),)
        assert header.length == 16 + 12 + 6


class TestV2Local:
    @pytest.mark.parametrize(
        ("family", "body"),
        [
            (0x00, b""),  # what senders send (spec 2.2)
            (0x11, IPV4_BLOCK),  # "must not assume zero is presented for LOCAL"
            (0x21, IPV6_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"x")),
            (0x11, b""),  # the family is ignored, so is its address size
            (0x31, bytes(216)),  # AF_UNIX stream
            (0x12, bytes(12)),  # UDP
            (0xFF, b"\x01"),  # even a family no spec defines
            (0x11, IPV4_BLOCK + b"\x01"),  # not parsed, so no TLV to be truncated
        ],
    )
    def test_local_uses_the_real_endpoints(self, family: int, body: bytes) -> None:
        data = v2(0x20, family, body)
        tr(data, Header(2, True, None, None, len(data)))

    def test_proxy_with_unspec_is_local(self) -> None:
        # Spec 2.2: for UNSPEC "the receiver is free to accept the connection
        # anyway and use the real endpoints addresses"; the bytes after the
        # fixed header have no defined layout and are skipped.
        for body in (b"", IPV4_BLOCK, b"\x01\x02"):
            data = v2(0x21, 0x00, body)
            tr(data, Header(2, True, None, None, len(data)))


# --- version 2: refusals --------------------------------------------------------


class TestV2Invalid:
    def test_prefixes_of_the_fixed_header_need_16_bytes(self) -> None:
        data = v2(0x21, 0x11, IPV4_BLOCK)
        assert parse(b"") == NeedMore(15)  # "PROXY UNKNOWN\r\n" is shorter
        for end in range(1, 16):
            assert parse(data[:end]) == NeedMore(16), end
        assert parse(data[:16]) == NeedMore(28)

    @pytest.mark.parametrize(
        ("data", "decided_at"),
        [
            # the signature, byte by byte
            (b"\r\r", 2),
            (b"\r\n\r\n\x01", 5),
            (b"\r\n\r\nPROXY", 5),
            (b"\r\n\r\n\x00\r\nquit\n\x21\x11\x00\x0c", 8),
            (b"\r\n\r\n\x00\r\nQUIT\r\x21\x11\x00\x0c", 12),
            (b"\r\nCAPA\r\n", 3),
        ],
    )
    def test_signature(self, data: bytes, decided_at: int) -> None:
        refused(data, decided_at, "signature")

    @pytest.mark.parametrize("version_command", [0x00, 0x01, 0x11, 0x10, 0x31, 0xF1])
    def test_wrong_version(self, version_command: int) -> None:
        refused(v2(version_command, 0x11, IPV4_BLOCK), 13, "version")

    @pytest.mark.parametrize("version_command", [0x22, 0x2F, 0x23])
    def test_wrong_command(self, version_command: int) -> None:
        refused(v2(version_command, 0x11, IPV4_BLOCK), 13, "command")

    @pytest.mark.parametrize("family", [0x12, 0x22, 0x31, 0x32, 0x01, 0x10, 0x13, 0x41, 0xFF])
    def test_proxy_refuses_families_other_than_tcp(self, family: int) -> None:
        refused(v2(0x21, family, bytes(216)), 14, "family")

    @pytest.mark.parametrize(
        ("family", "length"),
        [(0x11, 0), (0x11, 11), (0x21, 12), (0x21, 35)],
    )
    def test_truncated_address_block(self, family: int, length: int) -> None:
        # The length field alone says the addresses cannot fit: refused at 16.
        refused(v2(0x21, family, bytes(length)), 16, "addresses")

    def test_oversized_length(self) -> None:
        # Refused on the length field alone, before buffering what it promises.
        refused(v2(0x21, 0x11, bytes(20), length=MAX_V2_LENGTH + 1), 16, "over")
        refused(v2(0x20, 0x00, bytes(20), length=0xFFFF), 16, "over")

    def test_largest_accepted(self) -> None:
        padding = tlv(PP2_TYPE_NOOP, bytes(MAX_V2_LENGTH - 12 - 3))
        data = v2(0x21, 0x11, IPV4_BLOCK + padding)
        assert len(data) == MAX_V2_HEADER
        header = parse(data + b"CAPA\r\n")
        assert isinstance(header, Header)
        assert header.length == MAX_V2_HEADER

    @pytest.mark.parametrize(
        "tlvs",
        [
            b"\x01",  # a type byte and no length
            b"\x01\x00",
            b"\x01\x00\x05pop3",  # the value overruns the header
            tlv(PP2_TYPE_ALPN, b"pop3") + b"\x04\x00",
            tlv(PP2_TYPE_ALPN, b"pop3")[:-1],
        ],
    )
    def test_truncated_tlv(self, tlvs: bytes) -> None:
        data = v2(0x21, 0x11, IPV4_BLOCK + tlvs)
        refused(data, len(data), "TLV")


# --- trailing data and the caller's loop ----------------------------------------


class TestTrailingData:
    @pytest.mark.parametrize(
        "header",
        [
            build_v1(("192.0.2.1", 49152), ("198.51.100.7", 995)),
            build_v1(("2001:db8::1", 49152), ("2001:db8::2", 995)),
            b"PROXY UNKNOWN\r\n",
            build_v2(("192.0.2.1", 49152), ("198.51.100.7", 995)),
            build_v2(("2001:db8::1", 49152), ("2001:db8::2", 995), ((PP2_TYPE_ALPN, b"pop3"),)),
            v2(0x20, 0x00, b""),
        ],
    )
    def test_same_header_and_length(self, header: bytes) -> None:
        expected = parse(header)
        assert isinstance(expected, Header)
        assert expected.length == len(header)
        for trailer in trailers():
            assert parse(header + trailer) == expected
            assert (header + trailer)[expected.length :] == trailer

    def test_a_tls_clienthello_after_the_header(self) -> None:
        hello = client_hello()
        data = build_v2(("203.0.113.9", 40000), ("192.0.2.1", 995)) + hello
        header = parse(data)
        assert isinstance(header, Header)
        assert data[header.length :] == hello

    def test_a_clienthello_alone_is_not_a_header(self) -> None:
        refused(client_hello()[:40], 1, "first byte")

    def test_only_the_first_max_header_bytes_are_read(self) -> None:
        line = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
        assert parse(line + bytes(10 * MAX_HEADER)) == parse(line)


# --- fuzz: no input raises, and every answer is final --------------------------


SEEDS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.7 49152 110\r\n",
    b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.7 49152 995\r\n",
    b"PROXY UNKNOWN\r\n",
    build_v2(("192.0.2.1", 49152), ("198.51.100.7", 110)),
    build_v2(("2001:db8::1", 1), ("2001:db8::2", 2), ((PP2_TYPE_ALPN, b"pop3"), (0x20, b"x"))),
    v2(0x20, 0x00, b""),
    v2(0x21, 0x00, b"\x00\x01"),
]
MUTATIONS = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]
INSERTED = [b" ", b"\r", b"\n", b"\x00", b"0", b":", b".", b"\xff"]


def check(data: bytes) -> None:
    """Any answer is well formed, and more bytes never change a decision."""
    result = parse(data)
    match result:
        case NeedMore(size):
            assert len(data) < size <= MAX_HEADER, (data, result)
        case Invalid(reason):
            assert reason
            assert isinstance(parse(data + b"\r\n"), Invalid), data
            assert isinstance(parse(data + b"PROXY UNKNOWN\r\n"), Invalid), data
        case Header():
            assert 0 < result.length <= len(data)
            assert result.local == (result.source is None) == (result.destination is None)
            assert parse(data[: result.length]) == result
            assert parse(data + b"\r\nCAPA\r\n") == result


class TestFuzz:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_flip_every_byte(self, seed: bytes) -> None:
        data = seed + b"CAPA\r\n"
        for index in range(len(data)):
            for mask in MUTATIONS:
                mutated = bytearray(data)
                mutated[index] ^= mask
                check(bytes(mutated))

    @pytest.mark.parametrize("seed", SEEDS)
    def test_every_truncation_and_insertion(self, seed: bytes) -> None:
        for end in range(len(seed) + 1):
            check(seed[:end])
            for byte in INSERTED:
                check(seed[:end] + byte + seed[end:])
            check(seed[:end] + seed[end + 1 :])

    def test_every_two_byte_start(self) -> None:
        for first in range(256):
            for second in range(256):
                check(bytes([first, second]))

    def test_v2_every_version_command_and_family(self) -> None:
        for version_command in range(256):
            for family in range(256):
                check(v2(version_command, family, IPV6_BLOCK + tlv(PP2_TYPE_NOOP, b"")))

    def test_v2_every_short_length(self) -> None:
        for family in (0x00, 0x11, 0x21):
            for command in (0x20, 0x21):
                for length in range(64):
                    check(v2(command, family, bytes(64), length=length))
