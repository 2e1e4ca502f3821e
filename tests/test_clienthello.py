"""Unit tests for poproxy.clienthello: the ClientHello peeked on a TLS port.

Sans-IO: no sockets, no event loop. Real ClientHellos come from the stdlib's
OpenSSL client through memory BIOs, generated at test time. The parser only
ever sees a growing prefix of the connection (that is what MSG_PEEK returns),
so "byte by byte" here means every prefix: each one short of the whole must ask
for more without overshooting, the whole must parse, and trailing data must
not change the result (STYLE rule 11).
"""

from __future__ import annotations

import functools
import itertools
import ssl

import pytest
import trustme

from poproxy.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_RECORD_PAYLOAD,
    NO_APPLICATION_PROTOCOL_ALERT,
    ClientHello,
    Malformed,
    NeedMore,
    NotTls,
    inspect,
)

Result = NeedMore | NotTls | Malformed | ClientHello

# What may follow a ClientHello in the client's first flight, or arrive glued
# to it: a TLS 1.3 compatibility ChangeCipherSpec, early data, junk, plaintext.
TRAILERS = [
    b"\x00",
    b"\x14\x03\x03\x00\x01\x01",
    b"\x17\x03\x03\x00\x05hello",
    b"USER alice\r\n",
    b"\x16\x03\x01\x00\x00",
]


# --- helpers: real ClientHellos -----------------------------------------------


@functools.cache
def real_hello(
    server_hostname: str = "mail.example.org",
    alpn: tuple[str, ...] | None = None,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The ClientHello the stdlib client sends, taken from its outgoing BIO."""
    context = ssl.create_default_context()
    context.maximum_version = maximum
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_message(hello: bytes) -> bytes:
    """The handshake message inside a one-record ClientHello."""
    assert hello[0] == 0x16
    length = int.from_bytes(hello[3:5], "big")
    assert len(hello) == 5 + length, "the stdlib sent more than one record"
    return hello[5:]


def record(payload: bytes, content_type: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    return bytes([content_type]) + version + len(payload).to_bytes(2, "big") + payload


def reframe(message: bytes, *cuts: int) -> bytes:
    """Split a handshake message into one record per piece between the cuts."""
    bounds = [0, *cuts, len(message)]
    return b"".join(record(message[start:end]) for start, end in itertools.pairwise(bounds))


# --- helpers: synthetic ClientHellos ------------------------------------------


def vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def extension(extension_type: int, data: bytes) -> bytes:
    return extension_type.to_bytes(2, "big") + vector(2, data)


def sni(name: bytes, name_type: int = 0) -> bytes:
    return extension(0, vector(2, bytes([name_type]) + vector(2, name)))


def alpn(*names: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, name) for name in names)))


def hello_body(
    extensions: bytes | None = b"",
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"",
    cipher_suites: bytes = b"\x13\x01\x00\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body (RFC 8446 section 4.1.2); extensions None leaves the block out."""
    body = (
        version
        + bytes(32)
        + vector(1, session_id)
        + vector(2, cipher_suites)
        + vector(1, compression)
    )
    return body if extensions is None else body + vector(2, extensions)


def wire(body: bytes, message_type: int = 1) -> bytes:
    """A handshake message of this type around `body`, in one record."""
    return record(bytes([message_type]) + len(body).to_bytes(3, "big") + body)


# --- helpers: feeding ---------------------------------------------------------


def tr(data: bytes, expected: ClientHello) -> None:
    """Every prefix short of `data` asks for more within bounds; the whole parses."""
    for end in range(len(data)):
        result = inspect(data[:end])
        assert isinstance(result, NeedMore), (end, result)
        assert end < result.size <= len(data), (end, result)
    assert inspect(data) == expected
    for trailer in TRAILERS:
        assert inspect(data + trailer) == expected, trailer
    assert peek_loop(data) == expected


def peek_loop(data: bytes) -> Result:
    """What the caller does: peek exactly NeedMore.size bytes until decided."""
    size = 0
    for _ in range(len(data) + 1):
        result = inspect(data[:size])
        if not isinstance(result, NeedMore):
            return result
        assert result.size > size, "NeedMore must always ask for more"
        assert result.size <= MAX_CLIENT_HELLO
        size = result.size
    raise AssertionError("the peek loop did not end")


def tr_refused(data: bytes, expected: type[NotTls | Malformed], decided_at: int) -> None:
    """Shorter prefixes than `decided_at` ask for more; from there on, `expected`."""
    for end in range(decided_at):
        assert isinstance(inspect(data[:end]), NeedMore), end
    for end in range(decided_at, len(data) + 1):
        assert isinstance(inspect(data[:end]), expected), (end, inspect(data[:end]))
    for trailer in TRAILERS:
        assert isinstance(inspect(data + trailer), expected), trailer


def malformed(data: bytes, reason: str) -> None:
    """The whole input, and the same with trailing data, is Malformed for `reason`."""
    for candidate in (data, data + b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"):
        result = inspect(candidate)
        assert isinstance(result, Malformed), result
        assert reason in result.reason, result.reason


# --- real ClientHellos from the stdlib -----------------------------------------


class TestRealClientHellos:
    @pytest.mark.parametrize(
        "maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"]
    )
    @pytest.mark.parametrize(
        ("offered", "expected"),
        [
            (None, None),
            (("pop3",), ("pop3",)),
            (("http/1.1",), ("http/1.1",)),
            (("h2", "pop3"), ("h2", "pop3")),
        ],
    )
    def test_alpn_and_sni(
        self,
        maximum: ssl.TLSVersion,
        offered: tuple[str, ...] | None,
        expected: tuple[str, ...] | None,
    ) -> None:
        data = real_hello("mail.example.org", offered, maximum)
        tr(data, ClientHello(server_name="mail.example.org", alpn=expected))

    @pytest.mark.parametrize("address", ["127.0.0.1", "::1", "192.0.2.7"])
    def test_no_sni_for_an_ip_address(self, address: str) -> None:
        tr(real_hello(address, ("pop3",)), ClientHello(server_name=None, alpn=("pop3",)))

    def test_sni_is_lower_cased(self) -> None:
        data = real_hello("MAIL.Example.ORG")
        assert inspect(data) == ClientHello(server_name="mail.example.org", alpn=None)

    def test_the_stdlib_sends_one_record(self) -> None:
        # The fragmentation tests below rely on re-framing this one record.
        for data in (real_hello(), real_hello(alpn=("pop3",))):
            assert len(handshake_message(data)) + 5 == len(data)


# --- fragmentation across handshake records ------------------------------------


class TestFragmentedClientHello:
    @pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 40, 100, -10, -1])
    def test_two_records(self, cut: int) -> None:
        message = handshake_message(real_hello(alpn=("h2", "pop3")))
        expected = ClientHello(server_name="mail.example.org", alpn=("h2", "pop3"))
        tr(reframe(message, cut % len(message)), expected)

    def test_many_small_records(self) -> None:
        message = handshake_message(real_hello(alpn=("pop3",)))
        data = reframe(message, *range(64, len(message), 64))
        assert data.count(b"\x16\x03\x01") >= len(message) // 64
        tr(data, ClientHello(server_name="mail.example.org", alpn=("pop3",)))

    def test_one_byte_records_of_the_handshake_header(self) -> None:
        message = handshake_message(real_hello())
        tr(reframe(message, 1, 2, 3), ClientHello(server_name="mail.example.org", alpn=None))

    def test_openssl_accepts_the_reframed_hello(self) -> None:
        # The re-framing is legal TLS, not an artefact of this parser: a real
        # server reads it and answers with its ServerHello.
        ca = trustme.CA()
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mail.example.org").configure_cert(server_context)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = server_context.wrap_bio(incoming, outgoing, server_side=True)
        message = handshake_message(real_hello(alpn=("pop3",)))
        incoming.write(reframe(message, 3, len(message) // 2))
        with pytest.raises(ssl.SSLWantReadError):
            server.do_handshake()
        assert outgoing.read()[:1] == b"\x16"

    def test_non_handshake_record_in_the_middle(self) -> None:
        message = handshake_message(real_hello())
        data = record(message[:50]) + record(message[50:], content_type=0x15)
        tr_refused(data, Malformed, 56)

    def test_continuation_record_with_wrong_version(self) -> None:
        message = handshake_message(real_hello())
        data = record(message[:50]) + record(message[50:], version=b"\x02\x00")
        tr_refused(data, Malformed, 57)

    def test_record_carries_bytes_after_the_clienthello(self) -> None:
        message = handshake_message(real_hello())
        malformed(record(message + b"\x01\x00\x00\x00"), "after the ClientHello")

    def test_clienthello_over_the_cap(self) -> None:
        # A legal 0xffffff-byte handshake length is refused at its header,
        # before anyone buffers 16 MiB.
        data = record(b"\x01\xff\xff\xff" + bytes(100))
        tr_refused(data, Malformed, 9)
        assert "over" in str(inspect(data))

    def test_largest_single_record(self) -> None:
        # A 2^14-byte record (padding extension 21) is allowed and within the cap.
        fixed = len(hello_body(sni(b"mail.example.org") + extension(21, b"")))
        padding = extension(21, bytes(MAX_RECORD_PAYLOAD - 4 - fixed))
        data = wire(hello_body(sni(b"mail.example.org") + padding))
        assert len(data) == 5 + MAX_RECORD_PAYLOAD <= MAX_CLIENT_HELLO
        tr(data, ClientHello(server_name="mail.example.org", alpn=None))

    @pytest.mark.parametrize(
        ("length", "verdict"),
        [
            # A 4-byte first record (9 bytes on the wire) announcing `length`
            # more bytes: one more record carries up to 2^14 of them, a longer
            # rest needs a third record header, and the total must fit the cap.
            (MAX_RECORD_PAYLOAD, NeedMore(9 + 5 + MAX_RECORD_PAYLOAD)),
            (MAX_RECORD_PAYLOAD + 1, NeedMore(9 + 5 + MAX_RECORD_PAYLOAD)),
            (MAX_CLIENT_HELLO - 9 - 2 * 5, NeedMore(9 + 5 + MAX_RECORD_PAYLOAD)),
            (MAX_CLIENT_HELLO - 9 - 2 * 5 + 1, Malformed),
            (MAX_CLIENT_HELLO, Malformed),
        ],
    )
    def test_cap_counts_the_record_headers(
        self, length: int, verdict: NeedMore | type[Malformed]
    ) -> None:
        first = record(b"\x01" + length.to_bytes(3, "big"))
        assert len(first) == 9
        result = inspect(first)
        if isinstance(verdict, NeedMore):
            assert result == verdict
            assert result.size <= MAX_CLIENT_HELLO
        else:
            assert isinstance(result, Malformed), result
            assert "over" in result.reason


# --- plaintext clients on a TLS port --------------------------------------------


class TestNotTls:
    @pytest.mark.parametrize(
        "data",
        [
            b"U",
            b"USER alice\r\n",
            b"CAPA\r\n",
            b"STLS\r\n",
            b"GET / HTTP/1.1\r\n",
            b"\r\n",
            b"\x00",
            b"\x15\x03\x03\x00\x02\x02\x28",  # an alert, not a handshake
            b"\x17\x03\x03\x00\x01\x00",  # application data
            b"\x80\x2e\x01\x00\x02",  # an SSLv2-format hello (RFC 5246 appendix E.2)
        ],
    )
    def test_decided_by_the_first_byte(self, data: bytes) -> None:
        tr_refused(data, NotTls, 1)

    @pytest.mark.parametrize("data", [b"\x16\x01", b"\x16\x00\x00", b"\x16\x16\x03\x01"])
    def test_wrong_version_major_is_not_tls(self, data: bytes) -> None:
        tr_refused(data, NotTls, 2)

    def test_handshake_type_and_major_3_need_the_record_header(self) -> None:
        assert inspect(b"") == NeedMore(5)
        assert inspect(b"\x16") == NeedMore(5)
        assert inspect(b"\x16\x03\x01\x02") == NeedMore(5)
        assert inspect(b"\x16\x03\x01\x02\x00") == NeedMore(5 + 512)

    def test_any_record_minor_version_is_tls(self) -> None:
        body = hello_body(alpn(b"pop3"))
        for minor in (0, 1, 3, 4, 0xFF):
            data = bytes([0x16, 3, minor]) + wire(body)[3:]
            assert inspect(data) == ClientHello(server_name=None, alpn=("pop3",))


# --- synthetic ClientHellos: what is parsed ------------------------------------


class TestParsedFields:
    def test_sslv3_style_hello_without_extensions(self) -> None:
        tr(
            wire(hello_body(None, version=b"\x03\x00", cipher_suites=b"\x00\x2f")),
            ClientHello(server_name=None, alpn=None),
        )

    def test_empty_extensions_block(self) -> None:
        tr(wire(hello_body(b"")), ClientHello(server_name=None, alpn=None))

    def test_trailing_dot_and_case_removed(self) -> None:
        data = wire(hello_body(sni(b"Mail.Example.ORG.") + alpn(b"pop3")))
        tr(data, ClientHello(server_name="mail.example.org", alpn=("pop3",)))

    def test_non_ascii_alpn_stays_distinct(self) -> None:
        data = wire(hello_body(alpn(b"pop3\xff", b"p\xf6p3", b"pop3")))
        tr(data, ClientHello(server_name=None, alpn=("pop3\xff", "p\xf6p3", "pop3")))

    def test_unknown_extensions_skipped(self) -> None:
        extensions = extension(0xFAFA, b"") + sni(b"a.example") + extension(43, b"\x02\x03\x04")
        tr(wire(hello_body(extensions)), ClientHello(server_name="a.example", alpn=None))

    def test_session_id_and_long_suites(self) -> None:
        data = wire(hello_body(alpn(b"pop3"), session_id=bytes(32), cipher_suites=bytes(200)))
        tr(data, ClientHello(server_name=None, alpn=("pop3",)))


# --- security regressions, named after the attack -----------------------------


class TestSecurityRegressions:
    def test_alpaca_cross_protocol_http_client_is_visible(self) -> None:
        # ALPACA: a browser redirected to the POP3S port offers http/1.1 only;
        # the caller must see a list without "pop3" and refuse (RFC 7301
        # section 3.2, RFC 9325 section 3.8).
        result = inspect(real_hello(alpn=("http/1.1",)))
        assert isinstance(result, ClientHello)
        assert result.alpn is not None
        assert "pop3" not in result.alpn

    def test_alpaca_absent_alpn_differs_from_empty_match(self) -> None:
        result = inspect(real_hello())
        assert isinstance(result, ClientHello)
        assert result.alpn is None

    def test_alpaca_duplicate_alpn_extension_parser_differential(self) -> None:
        # Two ALPN lists: this parser and the TLS library could read different
        # ones, so the hello is refused (RFC 8446 section 4.2).
        malformed(wire(hello_body(alpn(b"pop3") + alpn(b"http/1.1"))), "sent twice")

    def test_duplicate_sni_extension(self) -> None:
        malformed(wire(hello_body(sni(b"a.example") + sni(b"b.example"))), "sent twice")

    def test_alpaca_pop3_hidden_past_the_list_end(self) -> None:
        # A list length that stops before "pop3" must not let it be read.
        names = vector(1, b"http/1.1") + vector(1, b"pop3")
        forged = extension(16, len(vector(1, b"http/1.1")).to_bytes(2, "big") + names)
        malformed(wire(hello_body(forged)), "after the protocol_name_list")

    @pytest.mark.parametrize(
        "name", [b"mail.example.org\x00.evil", b"mail\r\nINJECTED", b"m\xc3\xa4il.example", b"a b"]
    )
    def test_sni_log_injection(self, name: bytes) -> None:
        malformed(wire(hello_body(sni(name))), "printable ASCII")

    def test_no_application_protocol_alert_ends_a_real_client(self) -> None:
        # The alert bytes are what OpenSSL understands as RFC 7301 section 3.2's
        # fatal no_application_protocol, for TLS 1.2 and 1.3 clients alike.
        for maximum in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = ssl.create_default_context()
            context.maximum_version = maximum
            context.set_alpn_protocols(["http/1.1"])
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_hostname="mail.example.org")
            with pytest.raises(ssl.SSLWantReadError):
                tls.do_handshake()
            incoming.write(NO_APPLICATION_PROTOCOL_ALERT)
            with pytest.raises(ssl.SSLError, match="no application protocol"):
                tls.do_handshake()


# --- malformed ClientHellos -----------------------------------------------------


class TestMalformed:
    def test_handshake_type_not_clienthello(self) -> None:
        # ServerHello (2): decided as soon as the type byte is in.
        tr_refused(wire(hello_body(b""), message_type=2), Malformed, 6)

    def test_zero_length_record(self) -> None:
        tr_refused(b"\x16\x03\x01\x00\x00", Malformed, 5)

    @pytest.mark.parametrize("length", [MAX_RECORD_PAYLOAD + 1, 2**14 + 257, 0xFFFF])
    def test_record_over_2_14(self, length: int) -> None:
        data = b"\x16\x03\x01" + length.to_bytes(2, "big") + b"\x01"
        tr_refused(data, Malformed, 5)

    def test_handshake_length_shorter_than_the_body(self) -> None:
        body = hello_body(alpn(b"pop3"))
        message = b"\x01" + (len(body) - 3).to_bytes(3, "big") + body
        malformed(record(message), "after the ClientHello")

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (b"", "legacy_version"),
            (hello_body(b"", version=b"\x02\x00"), "legacy_version"),
            (b"\x03\x03" + bytes(20), "random"),
            (hello_body(b"", session_id=bytes(33)), "legacy_session_id length 33"),
            (b"\x03\x03" + bytes(32) + b"\x20" + bytes(5), "legacy_session_id overruns"),
            (hello_body(b"", cipher_suites=b""), "cipher_suites length 0"),
            (hello_body(b"", cipher_suites=b"\x13\x01\x00"), "odd cipher_suites"),
            (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x40\x13\x01", "cipher_suites overruns"),
            (hello_body(b"", compression=b""), "legacy_compression_methods length 0"),
            (hello_body(None) + b"\x00", "extensions length overruns"),
            (hello_body(None) + b"\x00\x10" + bytes(4), "extensions overruns"),
            (hello_body(b"") + b"\x00", "after the extensions block"),
            (hello_body(b"\x00\x10\x00\x05\x00\x03"), "extension_data overruns"),
            (hello_body(b"\x00"), "extension type overruns"),
        ],
    )
    def test_bounds(self, body: bytes, reason: str) -> None:
        malformed(wire(body), reason)

    def test_extension_block_shorter_than_declared(self) -> None:
        extensions = sni(b"mail.example.org") + alpn(b"pop3")
        body = hello_body(extensions)
        # Cut the last extension short: the block and the message lengths
        # still say the same, but the extension overruns the block.
        declared = body[: -len(extensions) - 2] + vector(2, extensions[:-2])
        malformed(wire(declared), "overruns")

    @pytest.mark.parametrize(
        ("extensions", "reason"),
        [
            (extension(16, b""), "protocol_name_list length overruns"),
            (extension(16, b"\x00\x00"), "protocol_name_list length 0"),
            (alpn(b""), "protocol_name_list length 1"),
            (alpn(b"pop3", b""), "ProtocolName length 0"),
            (extension(16, b"\x00\x05\x08pop3"), "ProtocolName overruns"),
            (extension(0, b""), "server_name_list length overruns"),
            (extension(0, b"\x00\x00"), "server_name_list length 0"),
            (sni(b"mail.example.org", name_type=1), "name_type 1"),
            (sni(b""), "HostName length 0"),
            (sni(b"."), "empty HostName"),
            (sni(b"a" * 256), "256-byte HostName"),
            (
                extension(0, vector(2, b"\x00" + vector(2, b"a.example") + b"\x00\x00\x01b")),
                "after the host_name entry",
            ),
        ],
    )
    def test_extension_contents(self, extensions: bytes, reason: str) -> None:
        malformed(wire(hello_body(extensions)), reason)


# --- robustness: never raise -----------------------------------------------------


class TestNeverRaises:
    @pytest.mark.parametrize("fragmented", [False, True], ids=["one-record", "three-records"])
    def test_every_byte_flipped_and_every_truncation(self, fragmented: bool) -> None:
        data = real_hello(alpn=("h2", "pop3"))
        if fragmented:
            message = handshake_message(data)
            data = reframe(message, 2, len(message) // 2)
        results: set[type[Result]] = set()
        for index in range(len(data)):
            for mask in (0xFF, 0x01, 0x80):
                mutated = bytearray(data)
                mutated[index] ^= mask
                results.add(type(checked(bytes(mutated))))
            results.add(type(checked(data[:index])))
            results.add(type(checked(data[:index] + data[index + 1 :])))
            results.add(type(checked(data[:index] + b"\xff" + data[index:])))
        assert results == {NeedMore, NotTls, Malformed, ClientHello}

    def test_every_single_byte_and_every_short_length(self) -> None:
        for byte in range(256):
            checked(bytes([byte]))
            checked(b"\x16\x03\x01" + bytes([byte, byte]) + b"\x01\xff\xff")
            checked(wire(bytes([byte]) * 64))


def checked(data: bytes) -> Result:
    result = inspect(data)
    assert isinstance(result, NeedMore | NotTls | Malformed | ClientHello)
    if isinstance(result, NeedMore):
        assert len(data) < result.size <= MAX_CLIENT_HELLO
    return result
