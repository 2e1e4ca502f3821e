"""The HAProxy PROXY protocol, versions 1 and 2, without I/O.

Owns: reading the header a trusted load balancer puts in front of a
connection (the client's real address, and in version 2 optional TLVs such as
the ALPN and SNI it saw), and building the same header for a backend that
accepts it. The specification is HAProxy's doc/proxy-protocol.txt (revision
2020/03/05); "spec 2.1" below means its section 2.1.

Must never import asyncio, ssl or socket, read a clock, await, or raise on any
input: every format problem is an `Invalid` value. It never decides whether
to trust a header: spec 5 says a receiver must only expect one where it is
configured to, and accept it only from known proxies. The caller enforces
both; here every byte string is either a header, a prefix of one, or Invalid,
never "no header" (spec 2: the receiver "MUST not try to guess whether the
protocol header is present or not").

How the first bytes are classified (spec 2.2, end: "Identifying the protocol
version is easy"):

- `NeedMore`: a prefix of a header; `size` is a lower bound on the total
  bytes needed, never more than the shortest header that could still follow,
  so a caller that waits for `size` bytes never waits for bytes a valid sender
  would not send (on a POP3 port the server speaks first, so the client sends
  nothing after the header until the greeting).
- `Invalid`: not a header. Decided as early as the bytes allow: a first byte
  other than "P" (version 1) or CR (version 2) is Invalid at once, and so is
  any byte that no valid header could have at its place, as far as this
  parser can tell without the rest of the field.
- `Header`: a complete header; `length` is how many bytes it occupies, and
  the caller consumes exactly that many. What follows (POP3 commands, a TLS
  ClientHello) is not looked at.

Deliberate strictness: in a version 1 line every byte is printable ASCII
(spec 2.1: "one line of US-ASCII text"), so a lone CR or LF can never end it
(spec 2.1: "The receiver must not tolerate a single CR or LF character");
version 2 accepts only TCP over IPv4 or IPv6, plus UNSPEC, for the PROXY
command (a POP3 proxy has no use for UDP or AF_UNIX addresses), and refuses a
header longer than MAX_V2_LENGTH. PP2_TYPE_CRC32C is returned as a TLV, not
verified (spec 2.2.3 binds only a receiver that supports the checksum).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# --- Version 1: one line of text (spec 2.1) -----------------------------------

V1_SIGNATURE = b"PROXY "  # "PROXY" and "exactly one space"
CRLF = b"\r\n"
# Spec 2.1: "If the CRLF sequence is not found in the first 107 characters,
# the receiver should declare the line invalid" (the worst case is an UNKNOWN
# line carrying two full-length IPv6 addresses and two 5-digit ports).
V1_MAX_LENGTH = 107
# Spec 2.1: the shortest line, "PROXY UNKNOWN\r\n", is 15 bytes.
V1_MIN_LENGTH = 15
V1_TCP4 = b"TCP4"
V1_TCP6 = b"TCP6"
# Spec 2.1: "For "UNKNOWN", the rest of the line before the CRLF may be
# omitted by the sender, and the receiver must ignore anything presented
# before the CRLF is found"; the receiver "SHOULD accept the connection and
# use the real connection's parameters".
V1_UNKNOWN = b"UNKNOWN"
V1_PROTOCOLS = (V1_TCP4, V1_TCP6, V1_UNKNOWN)
# Spec 2.1: after the protocol come the source address, the destination
# address, the source port and the destination port, each after one space.
V1_TCP_FIELDS = 5  # the protocol and those four
V1_PORT_FIELDS = (3, 4)  # which of the fields are ports
# What each address field may hold, to refuse a wrong byte before the field
# ends. IPv4: dotted decimal. IPv6: hexadecimal groups, and dotted decimal for
# an embedded IPv4 address ("::ffff:192.0.2.1", which glibc's inet_ntop
# writes and HAProxy therefore sends). Never "%": no scope identifiers.
V1_IPV4_CHARACTERS = frozenset(b"0123456789.")
V1_IPV6_CHARACTERS = frozenset(b"0123456789abcdefABCDEF:.")
V1_IPV4_MAX = len("255.255.255.255")
V1_IPV6_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")
V1_PORT_MAX = len("65535")
DIGITS = frozenset(b"0123456789")
MAX_PORT = 65535

# --- Version 2: binary (spec 2.2) ---------------------------------------------

# Spec 2.2: "a constant 12 bytes block containing the protocol signature".
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Spec 2.2: the signature, the version and command byte, the family and
# protocol byte, and a 2-byte big-endian length of what follows: "the length
# of the protocol header in bytes is always exactly 16 + this value".
V2_FIXED_LENGTH = 16
V2_VERSION = 0x2  # spec 2.2: "the receiver must only accept this value"
# Spec 2.2, the low four bits of byte 13. "Receivers must drop connections
# presenting unexpected values here."
COMMAND_LOCAL = 0x0  # a health check by the proxy itself: use the real endpoints
COMMAND_PROXY = 0x1  # relayed: the addresses below are the original endpoints
# Spec 2.2, byte 14: address family (high four bits) and transport protocol
# (low four bits), and the size of the address block each one implies.
FAMILY_UNSPEC = 0x00  # "The receiver should ignore address information."
FAMILY_TCP4 = 0x11  # TCP over IPv4: 2 * 4 address bytes + 2 * 2 port bytes
FAMILY_TCP6 = 0x21  # TCP over IPv6: 2 * 16 address bytes + 2 * 2 port bytes
ADDRESS_BLOCK = {FAMILY_UNSPEC: 0, FAMILY_TCP4: 12, FAMILY_TCP6: 36}
# The most bytes a version 2 header may carry after its fixed 16: the largest
# address block (AF_UNIX, 2 * 108 bytes) and 1 KiB of TLVs, far more than
# HAProxy sends (SSL details, ALPN, SNI, a unique ID of at most 128 bytes).
# The 16-bit length field allows 65535, but every pending connection buffers
# its header before the header can be judged, and a connection that has not
# yet said who it is should cost little memory.
MAX_V2_LENGTH = 1024 + 216
MAX_V2_HEADER = V2_FIXED_LENGTH + MAX_V2_LENGTH
# The most bytes parse() ever looks at: a caller never needs to buffer more.
MAX_HEADER = max(V1_MAX_LENGTH, MAX_V2_HEADER)
# Spec 2.2: a TLV is a type byte and a 2-byte big-endian length of its value.
TLV_HEADER = 3
MAX_TLV_VALUE = 0xFFFF
# The 16-bit length field of the fixed header.
MAX_V2_WIRE_LENGTH = 0xFFFF

# Spec 2.2, registered TLV types.
PP2_TYPE_ALPN = 0x01  # spec 2.2.1: the ALPN protocol in use, e.g. b"pop3"
PP2_TYPE_AUTHORITY = 0x02  # spec 2.2.2: the host name the client asked for (SNI)
PP2_TYPE_CRC32C = 0x03  # spec 2.2.3: CRC32c of the whole header
PP2_TYPE_NOOP = 0x04  # spec 2.2.4: padding, "should be ignored when parsed"
PP2_TYPE_UNIQUE_ID = 0x05  # spec 2.2.5: an opaque connection ID, at most 128 bytes
PP2_TYPE_SSL = 0x20  # spec 2.2.6: client byte, verify uint32, then sub-TLVs:
PP2_SUBTYPE_SSL_VERSION = 0x21  # the TLS version, e.g. b"TLSv1.3"
PP2_SUBTYPE_SSL_CN = 0x22  # the client certificate's subject CN
PP2_SUBTYPE_SSL_CIPHER = 0x23  # e.g. b"ECDHE-RSA-AES128-GCM-SHA256"
PP2_SUBTYPE_SSL_SIG_ALG = 0x24  # the server certificate's signature algorithm
PP2_SUBTYPE_SSL_KEY_ALG = 0x25  # the server certificate's key algorithm
PP2_TYPE_NETNS = 0x30  # spec 2.2.7: a network namespace name
# Spec 2.2.6: bits of the PP2_TYPE_SSL client byte.
PP2_CLIENT_SSL = 0x01  # the client connected over TLS
PP2_CLIENT_CERT_CONN = 0x02  # it presented a certificate on this connection
PP2_CLIENT_CERT_SESS = 0x04  # it presented one at least once in this TLS session
# Spec 2.2.8: reserved type ranges.
PP2_TYPE_MIN_CUSTOM = 0xE0  # application-specific, up to 0xEF
PP2_TYPE_MAX_CUSTOM = 0xEF

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# RFC 4291 section 2.5.5.2: ::ffff:0:0/96 holds IPv4 addresses as IPv6 ones.
IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


@dataclass(frozen=True)
class NeedMore:
    """A prefix of a header: parse again once at least `size` bytes are buffered."""

    size: int


@dataclass(frozen=True)
class Invalid:
    """Not a PROXY protocol header; the caller closes the connection (spec 2.1)."""

    reason: str


@dataclass(frozen=True)
class Header:
    """A complete header, `length` bytes long from the first byte received.

    `local` is True for a version 2 LOCAL command, a version 2 PROXY command
    with the UNSPEC family, and a version 1 UNKNOWN line: then `source` and
    `destination` are None and the caller uses the real connection's
    addresses (spec 2.1 and 2.2). Otherwise both are (address, port), the
    address in its canonical text form (RFC 5952 for IPv6, with an IPv4-mapped
    address written "::ffff:192.0.2.1" as RFC 5952 section 5 recommends).
    `tlvs` is the version 2 (type, value) pairs in the order sent, NOOPs and
    unknown types included; always empty for version 1 and local headers
    (spec 2.2: a LOCAL receiver must "discard the protocol block").
    """

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes) -> NeedMore | Invalid | Header:
    """Classify the first bytes of a connection from a trusted proxy; never raises.

    `data` is everything received so far, from the first byte; only the first
    MAX_HEADER bytes are looked at.
    """
    data = bytes(data[:MAX_HEADER])
    if not data:
        return NeedMore(V1_MIN_LENGTH)
    # Spec 2.2: version 2 starts with CR, version 1 with "P"; nothing else is
    # a header.
    if data[0] == V1_SIGNATURE[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    return Invalid("the first byte starts neither a v1 nor a v2 header")


# --- Version 1 -----------------------------------------------------------------


def _parse_v1(data: bytes) -> NeedMore | Invalid | Header:
    end = data.find(CRLF, 0, V1_MAX_LENGTH)
    if end < 0:
        return _judge_v1_prefix(data)
    line = data[:end]
    if any(not 0x20 <= byte <= 0x7E for byte in line):
        return Invalid("a v1 header byte outside printable ASCII (a lone CR or LF?)")
    if not line.startswith(V1_SIGNATURE):
        return Invalid('a v1 header that does not start with "PROXY "')
    # Spec 2.1: fields separated by "exactly one space", so splitting on
    # single spaces turns any extra space into an empty, invalid field.
    fields = line[len(V1_SIGNATURE) :].split(b" ")
    protocol = fields[0]
    if protocol not in V1_PROTOCOLS:
        return Invalid("a v1 protocol other than TCP4, TCP6 or UNKNOWN")
    length = end + len(CRLF)
    if protocol == V1_UNKNOWN:
        return Header(version=1, local=True, source=None, destination=None, length=length)
    if len(fields) != V1_TCP_FIELDS:
        return Invalid("a v1 line without exactly two addresses and two ports")
    source = _v1_address(protocol, fields[1])
    destination = _v1_address(protocol, fields[2])
    source_port = _v1_port(fields[3])
    destination_port = _v1_port(fields[4])
    if source is None or destination is None:
        return Invalid(f"a v1 address that is not {protocol.decode()}")
    if source_port is None or destination_port is None:
        return Invalid("a v1 port that is not a decimal in 0..65535 without leading zeros")
    return Header(
        version=1,
        local=False,
        source=(source, source_port),
        destination=(destination, destination_port),
        length=length,
    )


def _judge_v1_prefix(data: bytes) -> NeedMore | Invalid:
    """Whether bytes without a CRLF can still become a version 1 line."""
    if data.endswith(b"\r"):
        # The CR can only be the first half of the CRLF: the line before it
        # must be complete and valid.
        as_line = _parse_v1(data[:-1] + CRLF)
        return as_line if isinstance(as_line, Invalid) else NeedMore(len(data) + 1)
    needed = max(len(data) + len(CRLF), V1_MIN_LENGTH)
    if needed > V1_MAX_LENGTH:
        return Invalid(f"no CRLF within the first {V1_MAX_LENGTH} bytes of a v1 header")
    if any(not 0x20 <= byte <= 0x7E for byte in data):
        return Invalid("a v1 header byte outside printable ASCII (a lone CR or LF?)")
    if not data.startswith(V1_SIGNATURE):
        if V1_SIGNATURE.startswith(data):
            return NeedMore(needed)
        return Invalid('a v1 header that does not start with "PROXY "')
    fields = data[len(V1_SIGNATURE) :].split(b" ")
    protocol = fields[0]
    if len(fields) == 1:
        if any(known.startswith(protocol) for known in V1_PROTOCOLS):
            return NeedMore(needed)
        return Invalid("a v1 protocol other than TCP4, TCP6 or UNKNOWN")
    if protocol not in V1_PROTOCOLS:
        return Invalid("a v1 protocol other than TCP4, TCP6 or UNKNOWN")
    if protocol == V1_UNKNOWN:
        return NeedMore(needed)
    if len(fields) > V1_TCP_FIELDS:
        return Invalid("a v1 line with more than two addresses and two ports")
    # Judge every finished field, and whether the one still arriving (the
    # last) could yet become valid.
    *finished, arriving = fields[1:]
    for position, field in enumerate(finished, start=1):
        if position in V1_PORT_FIELDS:
            if _v1_port(field) is None:
                return Invalid("a v1 port that is not a decimal in 0..65535 without leading zeros")
        elif _v1_address(protocol, field) is None:
            return Invalid(f"a v1 address that is not {protocol.decode()}")
    arriving_is_port = len(fields) - 1 in V1_PORT_FIELDS
    if arriving_is_port and not _v1_port_prefix(arriving):
        return Invalid("a v1 port that is not a decimal in 0..65535 without leading zeros")
    if not arriving_is_port and not _v1_address_prefix(protocol, arriving):
        return Invalid(f"a v1 address that is not {protocol.decode()}")
    return NeedMore(needed)


def _v1_port(field: bytes) -> int | None:
    # Spec 2.1: a decimal integer in [0..65535]; "Heading zeroes are not
    # permitted in front of numbers in order to avoid any possible confusion
    # with octal numbers."
    if not field or not _v1_port_prefix(field):
        return None
    port = int(field)
    return port if port <= MAX_PORT else None


def _v1_address(protocol: bytes, field: bytes) -> str | None:
    # Spec 2.1: "The advertised protocol family dictates what format to use".
    # The character check keeps out what ipaddress would also take (a scope
    # identifier); ipaddress refuses leading zeros in IPv4 octets, as spec
    # 2.1 requires, and any IPv6 address whose groups are not 128 bits.
    if not _v1_address_prefix(protocol, field):
        return None
    text = field.decode("ascii")
    ip: IPAddress
    try:
        ip = ipaddress.IPv4Address(text) if protocol == V1_TCP4 else ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return _text(ip)


def _v1_port_prefix(field: bytes) -> bool:
    """Whether `field` is, or can still grow into, a valid port."""
    if not DIGITS.issuperset(field) or len(field) > V1_PORT_MAX:
        return False
    return not (field.startswith(b"0") and len(field) > 1)


def _v1_address_prefix(protocol: bytes, field: bytes) -> bool:
    """Whether `field` is made of what an address of the family can hold."""
    if protocol == V1_TCP4:
        return V1_IPV4_CHARACTERS.issuperset(field) and len(field) <= V1_IPV4_MAX
    return V1_IPV6_CHARACTERS.issuperset(field) and len(field) <= V1_IPV6_MAX


# --- Version 2 -----------------------------------------------------------------


def _parse_v2(data: bytes) -> NeedMore | Invalid | Header:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        return Invalid("bytes that start like, but are not, the v2 signature")
    if len(data) <= len(V2_SIGNATURE):
        return NeedMore(V2_FIXED_LENGTH)

    # Byte 13: the version in the high four bits, the command in the low four.
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != V2_VERSION:
        return Invalid(f"v2 signature with protocol version {version}")
    if command not in (COMMAND_LOCAL, COMMAND_PROXY):
        return Invalid(f"v2 command {command}, neither LOCAL nor PROXY")
    if len(data) < 14:
        return NeedMore(V2_FIXED_LENGTH)
    # Byte 14: spec 2.2 says a LOCAL receiver "must use the real connection
    # endpoints and discard the protocol block including the family which is
    # ignored", so the family matters only for PROXY.
    family = data[13]
    if command == COMMAND_PROXY and family not in ADDRESS_BLOCK:
        return Invalid(f"v2 family and protocol 0x{family:02x}, not TCP over IPv4 or IPv6")
    if len(data) < V2_FIXED_LENGTH:
        return NeedMore(V2_FIXED_LENGTH)

    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        return Invalid(f"a v2 header of {length} bytes after the fixed 16, over {MAX_V2_LENGTH}")
    address_block = ADDRESS_BLOCK.get(family, 0) if command == COMMAND_PROXY else 0
    if length < address_block:
        return Invalid(f"a v2 length of {length}, short of the {address_block}-byte addresses")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return NeedMore(total)

    # Spec 2.2: for LOCAL, and for UNSPEC, the receiver uses the real
    # endpoints and ignores the address information. UNSPEC has no address
    # size, so nothing after the fixed header can be located: all skipped.
    if command == COMMAND_LOCAL or family == FAMILY_UNSPEC:
        return Header(version=2, local=True, source=None, destination=None, length=total)

    # Spec 2.2: source address, destination address, source port,
    # destination port, all in network byte order.
    size = 4 if family == FAMILY_TCP4 else 16
    addresses = data[V2_FIXED_LENGTH : V2_FIXED_LENGTH + address_block]
    source: IPAddress
    destination: IPAddress
    if family == FAMILY_TCP4:
        source = ipaddress.IPv4Address(addresses[:size])
        destination = ipaddress.IPv4Address(addresses[size : 2 * size])
    else:
        source = ipaddress.IPv6Address(addresses[:size])
        destination = ipaddress.IPv6Address(addresses[size : 2 * size])
    source_port = int.from_bytes(addresses[2 * size : 2 * size + 2], "big")
    destination_port = int.from_bytes(addresses[2 * size + 2 :], "big")

    tlvs = _parse_tlvs(data[V2_FIXED_LENGTH + address_block : total])
    if isinstance(tlvs, Invalid):
        return tlvs
    return Header(
        version=2,
        local=False,
        source=(_text(source), source_port),
        destination=(_text(destination), destination_port),
        length=total,
        tlvs=tlvs,
    )


def _parse_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...] | Invalid:
    # Spec 2.2: the bytes after the addresses are TLVs: a type byte, a 2-byte
    # length, the value. A receiver "may choose to skip over and ignore" them,
    # but a TLV cut short means the length field and the TLVs disagree, and
    # two readers could then disagree on where the header ends: refuse.
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < TLV_HEADER:
            return Invalid("a truncated TLV header at the end of a v2 header")
        kind = block[offset]
        size = int.from_bytes(block[offset + 1 : offset + TLV_HEADER], "big")
        start = offset + TLV_HEADER
        if start + size > len(block):
            return Invalid(f"a TLV of type 0x{kind:02x} overruns the v2 header")
        tlvs.append((kind, block[start : start + size]))
        offset = start + size
    return tuple(tlvs)


# --- Addresses -------------------------------------------------------------------


def _text(ip: IPAddress) -> str:
    """The canonical text of an address, the same on every Python version.

    Python 3.13 changed str() of an IPv4-mapped IPv6 address; this pins the
    RFC 5952 section 5 form, "::ffff:192.0.2.1", which is also what glibc's
    inet_ntop gives for a dual-stack socket's IPv4 peer.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _v1_text(ip: IPAddress) -> str:
    """An address as spec 2.1 writes it: hexadecimal groups only for IPv6.

    Spec 2.1 describes IPv6 as "series of sets of 4 hexadecimal digits ...
    with the acceptance of one double colon sequence", so a mapped address is
    sent as ::ffff:c000:201, which every receiver can read. Compressed as
    RFC 5952 section 4.2 says: the longest run of two or more zero groups,
    the first of equal runs.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    packed = ip.packed
    groups = [int.from_bytes(packed[index : index + 2], "big") for index in range(0, 16, 2)]
    best_start, best_length = 0, 0
    run_start, run_length = 0, 0
    for index, group in enumerate(groups):
        if group:
            run_length = 0
            continue
        if run_length == 0:
            run_start = index
        run_length += 1
        if run_length > best_length:
            best_start, best_length = run_start, run_length
    if best_length < 2:
        return ":".join(f"{group:x}" for group in groups)
    head = ":".join(f"{group:x}" for group in groups[:best_start])
    tail = ":".join(f"{group:x}" for group in groups[best_start + best_length :])
    return f"{head}::{tail}"


def _endpoints(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[IPAddress, int, IPAddress, int]:
    """Both endpoints as addresses of one family, with checked ports.

    When the families differ (a dual-stack listener, an IPv4 backend), the
    IPv4 address is written as IPv4-mapped IPv6 (RFC 4291 section 2.5.5.2):
    both headers carry one family for both addresses (spec 2.1 and 2.2).
    """
    source_ip, source_port = _endpoint(source)
    destination_ip, destination_port = _endpoint(destination)
    if source_ip.version != destination_ip.version:
        source_ip, destination_ip = _as_ipv6(source_ip), _as_ipv6(destination_ip)
    return source_ip, source_port, destination_ip, destination_port


def _endpoint(endpoint: tuple[str, int]) -> tuple[IPAddress, int]:
    host, port = endpoint
    ip = ipaddress.ip_address(host)  # ValueError for anything but an IP address
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # A scope ("fe80::1%eth0") means something only on this host, and
        # neither header format can carry it.
        ip = ipaddress.IPv6Address(ip.packed)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise ValueError(f"port {port!r} is not an integer in 0..{MAX_PORT}")
    return ip, port


def _as_ipv6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(IPV4_MAPPED_PREFIX + ip.packed)


# --- Building --------------------------------------------------------------------


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A version 1 line (spec 2.1) for a connection from `source` to `destination`.

    TCP4 when both addresses are IPv4, otherwise TCP6. Raises ValueError for
    an address that is not an IP address or a port outside 0..65535: that is
    the caller's bug, never the peer's.
    """
    source_ip, source_port, destination_ip, destination_port = _endpoints(source, destination)
    protocol = "TCP4" if source_ip.version == 4 else "TCP6"
    line = (
        f"PROXY {protocol} {_v1_text(source_ip)} {_v1_text(destination_ip)}"
        f" {source_port} {destination_port}\r\n"
    )
    return line.encode("ascii")


def build_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A version 2 PROXY header (spec 2.2): TCP over IPv4, or over IPv6 if either is IPv6.

    `tlvs` are (type, value) pairs appended in order. Raises ValueError for a
    bad address or port (as build_v1), a type outside 0..255, a value over
    65535 bytes, or a header whose length does not fit its 16-bit field.
    parse() refuses headers longer than MAX_V2_HEADER; a backend may too.
    """
    source_ip, source_port, destination_ip, destination_port = _endpoints(source, destination)
    family = FAMILY_TCP4 if source_ip.version == 4 else FAMILY_TCP6
    body = bytearray(source_ip.packed + destination_ip.packed)
    body += source_port.to_bytes(2, "big") + destination_port.to_bytes(2, "big")
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind} is not a byte")
        if len(value) > MAX_TLV_VALUE:
            raise ValueError(f"a TLV value of {len(value)} bytes, over {MAX_TLV_VALUE}")
        body += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if len(body) > MAX_V2_WIRE_LENGTH:
        raise ValueError(f"a v2 header of {len(body)} bytes after the fixed 16")
    version_command = V2_VERSION << 4 | COMMAND_PROXY
    return (
        V2_SIGNATURE + bytes([version_command, family]) + len(body).to_bytes(2, "big") + bytes(body)
    )
