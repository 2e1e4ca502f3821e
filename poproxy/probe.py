"""`poproxy probe`: a POP3 server's TLS set-up, checked from the client's side.

Owns: the checks an operator runs against one POP3 port (which TLS it speaks
and what the usual port mix-ups get, TLS versions and cipher, the
certificate, logins before TLS, STARTTLS command injection, ALPN, an optional
login and STAT), the report as text or JSON, and its exit status. Each check
is a function from what was observed to a `Check`, without I/O; the I/O is in
the small async helpers below them, every wait bounded by the probe's
timeout, every network error a reason string in a check, never a traceback.

Must never send a password before TLS, nor over TLS whose certificate failed
the trust or name check; never send PASS in the plaintext check (USER alone
shows whether the server would take one); never touch mail (STAT and QUIT
only, so no DELE is ever committed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import enum
import getpass
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvloop
from cryptography import x509

from poproxy.pop3 import CRLF, LineBuffer, LineTooLong
from poproxy.tls import certificate_names

# --- Settings ----------------------------------------------------------------

DEFAULT_TIMEOUT = 10.0  # seconds any single connect, handshake or reply may take
# Auto mode: a POP3 server greets at once (RFC 1939 section 4); a TLS server
# says nothing until the ClientHello. Silence this long means "try TLS".
GREETING_WAIT = 1.5
# How long a mail client set up without SSL/TLS waits on a TLS port for an
# answer before the check calls it silence (poproxy answers after 2 s).
MIXUP_WAIT = 5.0
CLOSE_WAIT = 2.0  # for the server's side of a TLS close, then the connection is cut
EXPIRY_WARNING = datetime.timedelta(days=14)  # as poproxy's own certificate warning
MAX_REPLY_LINE = 8192
# RFC 8314 section 3.3: 995 is POP3S; RFC 1939 section 3: 110 is POP3 (with STLS).
DEFAULT_PORTS = {"tls": 995, "starttls": 110, "auto": 995}
CREDENTIAL_VARIABLE = "POPROXY_PROBE_PASSWORD"  # where --user finds the password

# The plaintext login check sends this user name and never a PASS: an +OK to
# USER already says that the server would take the password in the clear.
PROBE_USER = b"probe-nonexistent"
# SASL mechanisms that carry the password itself (RFC 4616 PLAIN, the LOGIN
# draft): offered before TLS they expose it. RFC 2595 section 2.3, RFC 8314.
CLEARTEXT_SASL = ("PLAIN", "LOGIN")
# RFC 9325 section 3.8, RFC 7301: POP3's ALPN id, and one from another protocol
# (ALPACA: an HTTPS client redirected here must be refused).
ALPN_POP3 = "pop3"
ALPN_FOREIGN = "http/1.1"
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (1.1.0 and later; the ssl module has no
# name for it): verify the chain without its dates, so that an expired
# certificate fails the expiry check, not the trust check.
VERIFY_NO_CHECK_TIME = 0x200000
# OpenSSL's reasons when this machine, not the server, cannot make a handshake.
LOCAL_TLS_REASONS = frozenset({"NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE"})

Requested = Literal["auto", "tls", "starttls"]


# --- Results ---------------------------------------------------------------


class Result(enum.Enum):
    PASS = "pass"  # noqa: S105 (a check result, not a password)
    WARN = "warn"
    FAIL = "fail"
    INFO = "info"  # reported, never counted toward the exit status


class Mode(enum.Enum):
    """What the port turned out to speak."""

    IMPLICIT = "implicit"  # TLS from the first byte (POP3S, RFC 8314)
    STARTTLS = "starttls"  # a plaintext greeting, then STLS (RFC 2595 section 4)
    PLAINTEXT = "plaintext"  # a plaintext greeting and no working STLS
    UNKNOWN = "unknown"  # no connection, or neither of the above


@dataclass(frozen=True)
class Check:
    """One line of the report: what was found and, unless it passed, how to fix it."""

    name: str
    result: Result
    detail: str
    fix: str | None = None


EXIT_STATUS = {Result.FAIL: 2, Result.WARN: 1}


@dataclass(frozen=True)
class Report:
    target: str
    mode: Mode
    checks: tuple[Check, ...]

    @property
    def exit_status(self) -> int:
        """0 when everything passed, 1 with a warning, 2 with a failure."""
        return max((EXIT_STATUS.get(check.result, 0) for check in self.checks), default=0)

    def as_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "mode": self.mode.value,
            "checks": [
                {
                    "name": check.name,
                    "result": check.result.value,
                    "detail": check.detail,
                    "fix": check.fix,
                }
                for check in self.checks
            ],
        }

    def text(self) -> str:
        width = max((len(check.name) for check in self.checks), default=0)
        lines = [f"poproxy probe {self.target}: {MODE_TEXT[self.mode]}"]
        for check in self.checks:
            lines.append(f"{check.result.value.upper():4}  {check.name:{width}}  {check.detail}")
            if check.fix:
                lines.append(f"{'':4}  {'':{width}}  fix: {check.fix}")
        counts = [
            f"{sum(check.result is result for check in self.checks)} {result.value}"
            for result in (Result.PASS, Result.WARN, Result.FAIL)
        ]
        lines.append(f"{', '.join(counts)}: exit status {self.exit_status}")
        return "\n".join(lines)


MODE_TEXT = {
    Mode.IMPLICIT: "implicit TLS (POP3S)",
    Mode.STARTTLS: "POP3 with STLS",
    Mode.PLAINTEXT: "plaintext POP3",
    Mode.UNKNOWN: "not identified",
}


# --- What was observed -------------------------------------------------------


@dataclass(frozen=True)
class TlsSession:
    """A completed handshake."""

    version: str  # "TLSv1.3"
    cipher: str
    alpn: str | None  # the protocol the server selected
    certificate: bytes  # the server's certificate, DER; b"" when it sent none


@dataclass(frozen=True)
class Refused:
    """The server did not complete the handshake."""

    reason: str


@dataclass(frozen=True)
class Untested:
    """No handshake was tried to the end: the connection or this machine failed."""

    reason: str
    local: bool = False  # this machine's OpenSSL cannot offer what was asked


Handshake = TlsSession | Refused | Untested


@dataclass(frozen=True)
class Plaintext:
    """What the port says before TLS."""

    greeting: bytes
    capabilities: tuple[str, ...] | None  # None: CAPA was refused
    user_reply: bytes  # the answer to USER probe-nonexistent


@dataclass(frozen=True)
class Heard:
    """What a client that sends nothing got within the wait."""

    data: bytes
    closed: bool


@dataclass(frozen=True)
class Injection:
    """`STLS` and `CAPA` in one write, then QUIT inside TLS."""

    before_tls: bytes  # bytes after the STLS +OK line, still in plaintext
    replies: tuple[bytes, ...]  # every line received inside TLS, up to the close


@dataclass(frozen=True)
class LoggedIn:
    messages: int
    octets: int


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


# --- Checks, without I/O ---------------------------------------------------


def connect_check(target: str, reason: str) -> Check:
    return Check(
        "connect",
        Result.FAIL,
        f"cannot connect to {target}: {reason}",
        "check the host name, the port and any firewall between here and the server",
    )


def implicit_mode_check() -> Check:
    return Check("mode", Result.PASS, "implicit TLS: the handshake comes first, as on port 995")


def implicit_failed_check(requested: Requested, reason: str, heard: Heard | None) -> Check:
    if requested == "auto":
        said = printable(heard.data) if heard and heard.data else "nothing"
        detail = f"neither a POP3 greeting (it said {said}) nor a TLS handshake: {reason}"
        fix = "check that this port serves POP3"
    else:
        detail = f"no POP3 over TLS: {reason}"
        fix = "if this is a STLS port (usually 110), probe it with --starttls"
    return Check("mode", Result.FAIL, detail, fix)


def no_greeting_check(reason: str) -> Check:
    return Check(
        "mode",
        Result.FAIL,
        f"no POP3 greeting: {reason}",
        "an implicit TLS port (usually 995) says nothing first: probe it with --tls",
    )


def starttls_mode_check(plaintext: Plaintext, stls: str | None) -> Check:
    """`stls`: None when STLS started TLS, else why it did not."""
    listed = plaintext.capabilities is not None and "STLS" in plaintext.capabilities
    if stls is not None:
        why = "CAPA does not list STLS" if not listed else "STLS is listed"
        return Check(
            "mode",
            Result.FAIL,
            f"plaintext POP3 without TLS ({why}; {stls}): passwords cross the network in the clear",
            "offer STLS on this port and implicit TLS on port 995 (RFC 2595, RFC 8314)",
        )
    if not listed:
        return Check(
            "mode",
            Result.WARN,
            "STLS works, but CAPA before TLS does not list it: clients that look will not use it",
            "list STLS in the CAPA answer before TLS (RFC 2595 section 4)",
        )
    return Check("mode", Result.PASS, "plaintext greeting, STLS listed in CAPA and accepted")


def plaintext_client_check(heard: Heard, waited: float) -> Check:
    """A mail client set up without SSL/TLS on an implicit TLS port."""
    name = "port-mixup"
    if heard.data.startswith(b"+OK"):
        return Check(
            name,
            Result.INFO,
            f"this port greets a client without SSL/TLS too ({printable(heard.data)}):"
            " probe it with --starttls for that side",
        )
    if heard.data.startswith(b"-ERR"):
        return Check(
            name,
            Result.PASS,
            f"a client without SSL/TLS on this port is told: {printable(heard.data)}",
        )
    fix = (
        "optional: answer it with an -ERR line saying to turn SSL/TLS on"
        " (poproxy: listeners[].plaintext_hint_after)"
    )
    if heard.data:
        detail = (
            f"a client without SSL/TLS on this port gets {len(heard.data)} bytes that are not"
            " POP3 and shows a protocol error"
        )
    elif heard.closed:
        detail = "a client without SSL/TLS on this port is disconnected without a word"
    else:
        detail = (
            f"a client without SSL/TLS on this port hears nothing for {waited:g} s"
            " and ends with a timeout"
        )
    return Check(name, Result.INFO, detail, fix)


def tls_client_check(outcome: Handshake) -> Check:
    """A mail client set to implicit SSL/TLS on a plaintext (STLS) port."""
    name = "port-mixup"
    match outcome:
        case TlsSession():
            return Check(name, Result.PASS, "a client set to SSL/TLS on this port is served TLS")
        case Refused(reason) | Untested(reason):
            return Check(
                name,
                Result.INFO,
                f"a client set to SSL/TLS (not STARTTLS) on this port fails: {reason}",
                "optional: serve a handshake that starts at once as POP3S"
                " (poproxy: listeners[].implicit_tls_window)",
            )


def capabilities_check(name: str, capabilities: tuple[str, ...] | None) -> Check:
    if capabilities is None:
        return Check(name, Result.INFO, "CAPA refused")
    return Check(name, Result.INFO, ", ".join(capabilities) or "empty")


def login_capabilities(capabilities: Sequence[str]) -> tuple[str, ...]:
    """The CAPA lines that let a client send a password as it is: USER, SASL PLAIN/LOGIN."""
    found: list[str] = []
    for line in capabilities:
        words = line.upper().split()
        if words[:1] == ["USER"]:  # RFC 2449 section 6.8
            found.append("USER")
        elif words[:1] == ["SASL"]:  # RFC 2449 section 6.3
            mechanisms = [word for word in words[1:] if word in CLEARTEXT_SASL]
            if mechanisms:
                found.append(" ".join(["SASL", *mechanisms]))
    return tuple(found)


def login_offered_check(plaintext: Plaintext | None) -> Check:
    name = "login-offered-before-tls"
    if plaintext is None:
        return Check(name, Result.PASS, "implicit TLS: nothing is offered before TLS")
    if plaintext.capabilities is None:
        return Check(name, Result.PASS, "CAPA refused before TLS: no login offered")
    offered = login_capabilities(plaintext.capabilities)
    if not offered:
        return Check(name, Result.PASS, "CAPA before TLS offers no USER, SASL PLAIN or LOGIN")
    return Check(
        name,
        Result.FAIL,
        f"CAPA before TLS offers {', '.join(offered)}: clients may send passwords in the clear",
        "offer logins only after STLS (RFC 2595 section 4; Dovecot: disable_plaintext_auth = yes,"
        " in 2.4 auth_allow_cleartext = no)",
    )


def login_accepted_check(plaintext: Plaintext | None) -> Check:
    name = "login-accepted-before-tls"
    if plaintext is None:
        return Check(name, Result.PASS, "implicit TLS: no command is read before TLS")
    reply = printable(plaintext.user_reply)
    if not plaintext.user_reply.startswith(b"+OK"):
        return Check(name, Result.PASS, f"USER before TLS refused: {reply}")
    return Check(
        name,
        Result.FAIL,
        f"USER before TLS accepted ({reply}): the server would take a password in the clear",
        "refuse USER, PASS, APOP and AUTH before TLS (RFC 2595 section 2.3, RFC 8314 section 3)",
    )


def legacy_version_check(label: str, outcome: Handshake) -> Check:
    """TLS 1.0 or 1.1: accepted is a failure (RFC 8996)."""
    name = f"tls-{label}"
    match outcome:
        case TlsSession(cipher=cipher):
            return Check(
                name,
                Result.FAIL,
                f"TLS {label} accepted (cipher {cipher})",
                "accept TLS 1.2 and 1.3 only (RFC 8996; poproxy: tls.min_version)",
            )
        case Refused(reason):
            return Check(name, Result.PASS, f"TLS {label} refused ({reason})")
        case Untested(reason, local=True):
            return Check(name, Result.INFO, f"not tested: this machine cannot offer it ({reason})")
        case Untested(reason):
            return Check(name, Result.WARN, f"not tested: {reason}", "run the probe again")


def tls12_check(outcome: Handshake, tls13: Handshake) -> Check:
    name = "tls-1.2"
    match outcome:
        case TlsSession(cipher=cipher):
            return Check(name, Result.PASS, f"TLS 1.2 accepted ({cipher})")
        case Refused(reason) if isinstance(tls13, TlsSession):
            return Check(
                name, Result.INFO, f"TLS 1.2 refused ({reason}): clients need TLS 1.3 here"
            )
        case Refused(reason) | Untested(reason):
            return Check(
                name,
                Result.WARN,
                f"TLS 1.2 not accepted: {reason}",
                "accept TLS 1.2 (RFC 9325 section 3.1.1)",
            )


def tls13_check(outcome: Handshake) -> Check:
    name = "tls-1.3"
    match outcome:
        case TlsSession():
            return Check(name, Result.PASS, "TLS 1.3 accepted")
        case Untested(reason, local=True):
            return Check(name, Result.INFO, f"not tested: this machine cannot offer it ({reason})")
        case Refused(reason) | Untested(reason):
            return Check(
                name,
                Result.WARN,
                f"TLS 1.3 not accepted: {reason}",
                "turn TLS 1.3 on (RFC 9325 section 3.1.1: SHOULD support it)",
            )


def cipher_check(session: TlsSession, tls12: Handshake) -> Check:
    """Forward secrecy and an AEAD cipher (RFC 9325 section 4.2; TLS 1.3 has only those).

    `session` is what a default client gets; `tls12` what a TLS 1.2 client gets.
    """
    sessions = [session]
    if isinstance(tls12, TlsSession) and tls12 != session:
        sessions.append(tls12)
    parts, weak = [], False
    for each in sessions:
        problem = cipher_weakness(each)
        weak = weak or problem is not None
        parts.append(f"{each.version} {each.cipher}" + (f" ({problem})" if problem else ""))
    if not weak:
        return Check("cipher", Result.PASS, "; ".join(parts))
    return Check(
        "cipher",
        Result.WARN,
        "; ".join(parts),
        "prefer ECDHE with AES-GCM or ChaCha20-Poly1305 (RFC 9325 section 4.2)",
    )


def cipher_weakness(session: TlsSession) -> str | None:
    if session.version == "TLSv1.3":
        return None
    forward_secret = session.cipher.startswith(("ECDHE-", "DHE-"))
    aead = any(part in session.cipher for part in ("GCM", "CHACHA20", "CCM"))
    missing = [what for what, ok in (("forward secrecy", forward_secret), ("AEAD", aead)) if not ok]
    return f"without {' and '.join(missing)}" if missing else None


def trust_check(error: str | None, ca: Path | None) -> Check:
    """`error`: None when the chain verified, else OpenSSL's reason."""
    store = f"the CA in {ca}" if ca else "this machine's CA store"
    if error is None:
        return Check("certificate-trust", Result.PASS, f"the chain leads to {store}")
    fix = (
        "serve the certificate issued by that CA, with its intermediates after it"
        if ca
        else "serve a certificate from a public CA with its intermediates after it;"
        " for a private CA, probe with --ca FILE"
    )
    return Check("certificate-trust", Result.FAIL, f"not trusted by {store}: {error}", fix)


def name_matches(names: Sequence[str], name: str) -> bool:
    """RFC 6125 section 6.4: an exact name, or a wildcard for one left-most label.

    An IP address matches only an IP address entry (RFC 6125 section 1.7.2).
    """
    name = name.lower().removesuffix(".")
    address = _address(name.strip("[]"))
    for pattern in names:
        pattern = pattern.lower().removesuffix(".")
        pattern_address = _address(pattern)
        if address is not None or pattern_address is not None:
            if address == pattern_address:
                return True
            continue  # an IP address and a DNS name never match each other
        if pattern == name:
            return True
        # "*.example.org" matches "mail.example.org", not "example.org" or "a.b.example.org".
        if pattern.startswith("*.") and "." in name and name.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def name_check(certificate: x509.Certificate, name: str) -> Check:
    names = certificate_names(certificate)
    shown = ", ".join(names) or "no names"
    if name_matches(names, name):
        return Check("certificate-name", Result.PASS, f"{name} is in the certificate ({shown})")
    return Check(
        "certificate-name",
        Result.FAIL,
        f"{name} is not in the certificate (it names {shown})",
        f"serve a certificate that names {name}, or probe with --servername and the name"
        " clients use",
    )


def expiry_check(certificate: x509.Certificate, now: datetime.datetime) -> Check:
    name = "certificate-expiry"
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now < not_before:
        ahead = not_before - now
        return Check(
            name,
            Result.FAIL,
            f"not valid before {_when(not_before)}, {_duration(ahead)} from now by this"
            " machine's clock",
            "if the certificate was just issued, check this machine's clock (date -u) and"
            " the server's; clients with a correct clock refuse it until then",
        )
    left = not_after - now
    if left <= datetime.timedelta(0):
        return Check(
            name,
            Result.FAIL,
            f"expired {_when(not_after)}, {_duration(-left)} ago",
            "renew the certificate and reload the server",
        )
    if left < EXPIRY_WARNING:
        return Check(
            name,
            Result.WARN,
            f"expires {_when(not_after)}, in {_duration(left)}",
            "renew the certificate now; check that automatic renewal runs",
        )
    return Check(name, Result.PASS, f"expires {_when(not_after)}, in {left.days} days")


def certificate_unreadable_checks(reason: str) -> list[Check]:
    return [
        Check(
            check,
            Result.FAIL,
            f"cannot read the server's certificate: {reason}",
            "serve a valid X.509 certificate",
        )
        for check in ("certificate-trust", "certificate-name", "certificate-expiry")
    ]


def alpn_pop3_check(outcome: Handshake) -> Check:
    name = "alpn-pop3"
    fix = "select pop3 when a client offers it (RFC 9325 section 3.8)"
    match outcome:
        case TlsSession(alpn="pop3"):
            return Check(name, Result.PASS, "offered pop3: selected")
        case TlsSession(alpn=None):
            return Check(name, Result.WARN, "offered pop3: no protocol selected", fix)
        case TlsSession(alpn=other):
            return Check(name, Result.WARN, f"offered pop3: {other} selected", fix)
        case Refused(reason) | Untested(reason):
            return Check(name, Result.WARN, f"offered pop3: handshake failed ({reason})", fix)


def alpn_foreign_check(outcome: Handshake) -> Check:
    name = "alpn-foreign"
    match outcome:
        case Refused(reason):
            return Check(name, Result.PASS, f"offered only {ALPN_FOREIGN}: refused ({reason})")
        case Untested(reason):
            return Check(name, Result.WARN, f"not tested: {reason}", "run the probe again")
        case TlsSession(alpn=selected):
            return Check(
                name,
                Result.WARN,
                f"offered only {ALPN_FOREIGN}: accepted (selected {selected or 'nothing'}),"
                " so a cross-protocol attack (ALPACA) can reach this server",
                "refuse an ALPN list without pop3 with a no_application_protocol alert"
                " (RFC 7301 section 3.2; poproxy: tls.alpn: strict)",
            )


def injection_check(outcome: Injection | Refused | Untested) -> Check:
    """CVE-2011-0411 class: plaintext pipelined after STLS must never be answered."""
    name = "starttls-injection"
    fix = (
        "discard every byte received after the STLS line before the handshake"
        " (RFC 2595 section 4; CVE-2011-0411)"
    )
    match outcome:
        case Untested(reason):
            return Check(name, Result.WARN, f"not tested: {reason}", "run the probe again")
        case Refused(reason) if "wrong version number" in reason.lower():
            # What the TLS layer says when plaintext comes where a ServerHello belongs.
            return Check(
                name,
                Result.FAIL,
                f"after STLS and CAPA in one write, plaintext came instead of TLS ({reason}):"
                " CAPA was answered before TLS",
                fix,
            )
        case Refused(reason):
            return Check(
                name,
                Result.PASS,
                f"after STLS and CAPA in one write the handshake failed ({reason}):"
                " nothing was answered",
            )
        case Injection(before_tls=before) if before:
            return Check(
                name,
                Result.FAIL,
                f"after STLS and CAPA in one write, CAPA was answered in plaintext:"
                f" {printable(before)}",
                fix,
            )
        case Injection(replies=replies):
            statuses = [line for line in replies if line.startswith((b"+OK", b"-ERR"))]
            if len(statuses) > 1:
                return Check(
                    name,
                    Result.FAIL,
                    "CAPA sent in plaintext together with STLS was answered inside TLS"
                    f" ({printable(statuses[0])}): an attacker can inject commands",
                    fix,
                )
            return Check(
                name, Result.PASS, "CAPA sent in plaintext together with STLS was not answered"
            )


def login_check(user: str, outcome: LoggedIn | str) -> Check:
    if isinstance(outcome, LoggedIn):
        return Check(
            "login",
            Result.PASS,
            f"logged in as {user} over verified TLS: {outcome.messages} messages,"
            f" {outcome.octets} octets",
        )
    return Check(
        "login",
        Result.FAIL,
        f"login as {user}: {outcome}",
        "check the user name and password; the probe logs in only over verified TLS",
    )


def parse_stat(line: bytes) -> LoggedIn | None:
    """`+OK nn mm` (RFC 1939 section 5, STAT): the message count and size."""
    words = line.split()
    if len(words) >= 3 and words[0] == b"+OK" and words[1].isdigit() and words[2].isdigit():
        return LoggedIn(int(words[1]), int(words[2]))
    return None


def printable(data: bytes, limit: int = 160) -> str:
    """Server text made safe for a terminal and a log: printable ASCII, one line, bounded."""
    text = "".join(
        chr(byte) if 0x20 <= byte <= 0x7E else "?" for byte in data.rstrip(b"\r\n")[:limit]
    )
    return text + "..." if len(data.rstrip(b"\r\n")) > limit else text


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M}Z"


def _duration(span: datetime.timedelta) -> str:
    if span.days >= 2:
        return f"{span.days} days"
    hours = span.total_seconds() / 3600
    return f"{hours:.0f} hours" if hours >= 1 else f"{span.total_seconds() / 60:.0f} minutes"


def parse_target(text: str, requested: Requested) -> tuple[str, int]:
    """HOST, HOST:PORT, [IPv6] or [IPv6]:PORT; the port defaults by mode."""
    port = DEFAULT_PORTS[requested]
    host = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: no closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = _port(number, text)
    if not host:
        raise ValueError(f"{text!r}: no host")
    return host, port


def _port(number: str, text: str) -> int:
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return int(number)


# --- I/O ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    requested: Requested = "auto"
    server_name: str | None = None  # None: the host
    ca: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    credentials: Credentials | None = None

    @property
    def name(self) -> str:
        """The name the certificate must carry, also sent as SNI (not for an IP address)."""
        return self.server_name or self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ProbeError(Exception):
    """A network step failed; the message is the reason shown in a check."""


class ConnectFailed(ProbeError):
    """No TCP connection."""


class HandshakeFailed(ProbeError):
    """The TLS handshake did not complete; `local`: this machine could not offer it."""

    def __init__(self, reason: str, local: bool = False) -> None:
        super().__init__(reason)
        self.local = local


def reason(exc: BaseException, timeout: float) -> str:
    """One line about a network error, never a traceback."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or exc.reason or str(exc)
    if isinstance(exc, ssl.SSLError):
        # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)": the
        # words, without the C source position.
        text = re.sub(r"^\[[^]]*\] *| *\(_ssl\.c:\d+\)$", "", str(exc))
        return f"TLS: {text or exc.reason or type(exc).__name__}"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "the server closed the connection"
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror  # "Name or service not known"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)  # "Connection refused", not the loop's own wording
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Connection:
    """One TCP connection: POP3 lines in plaintext, then optionally TLS.

    The plaintext part reads the socket itself into a `LineBuffer`, so the
    bytes received after a line (pipelined answers, a server's injection
    reply) are explicit when TLS starts, instead of staying in a stream
    reader's buffer to be read as if they came inside TLS.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.lines = LineBuffer(MAX_REPLY_LINE)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @classmethod
    async def open(cls, target: Target) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(target.timeout):
                addresses = await loop.getaddrinfo(
                    target.host, target.port, type=socket.SOCK_STREAM
                )
                error: OSError = OSError("no address")
                for family, kind, protocol, _, address in addresses:
                    sock = socket.socket(family, kind, protocol)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, address)
                    except OSError as exc:
                        sock.close()
                        error = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    return cls(sock, target.timeout)
                raise error
        except (TimeoutError, OSError, ValueError) as exc:
            # ValueError: a host name getaddrinfo cannot encode.
            raise ConnectFailed(reason(exc, target.timeout)) from None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _receive(self) -> bytes:
        if self.reader is None:
            return await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        return await self.reader.read(65536)

    async def read_line(self) -> bytes | None:
        """The next line without its end; None when the server closed first."""
        try:
            async with asyncio.timeout(self.timeout):
                while (line := self.lines.next_line()) is None:
                    data = await self._receive()
                    if not data:
                        return None
                    self.lines.feed(data)
                return line
        except LineTooLong:
            raise ProbeError(f"a reply line over {MAX_REPLY_LINE} bytes") from None
        except (TimeoutError, OSError, EOFError) as exc:
            raise ProbeError(reason(exc, self.timeout)) from None

    async def line(self) -> bytes:
        line = await self.read_line()
        if line is None:
            raise ProbeError("the server closed the connection")
        return line

    async def multiline(self) -> tuple[bytes, ...]:
        """The rest of a multi-line response (RFC 1939 section 3), un-dot-stuffed."""
        lines: list[bytes] = []
        while (line := await self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return tuple(lines)

    async def send(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                if self.writer is None:
                    await asyncio.get_running_loop().sock_sendall(self.sock, data)
                else:
                    self.writer.write(data)
                    await self.writer.drain()
        except (TimeoutError, OSError) as exc:
            raise ProbeError(reason(exc, self.timeout)) from None

    async def command(self, data: bytes) -> bytes:
        await self.send(data + CRLF)
        return await self.line()

    async def start_tls(
        self, context: ssl.SSLContext, server_name: str
    ) -> tuple[TlsSession, bytes]:
        """Hand the socket to TLS; return the session and the plaintext left unread."""
        leftover = self.lines.take_pending()
        try:
            async with asyncio.timeout(self.timeout):
                self.reader, self.writer = await asyncio.open_connection(
                    sock=self.sock,
                    ssl=context,
                    server_hostname=server_name,
                    ssl_handshake_timeout=self.timeout,
                )
        except (TimeoutError, OSError, EOFError, ValueError) as exc:
            # ValueError: a server name the ssl module cannot send.
            local = isinstance(exc, ssl.SSLError) and exc.reason in LOCAL_TLS_REASONS
            raise HandshakeFailed(reason(exc, self.timeout), local) from None
        ssl_object = self.writer.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            raise HandshakeFailed("no TLS session after the handshake")
        cipher = ssl_object.cipher()
        session = TlsSession(
            version=ssl_object.version() or "unknown",
            cipher=cipher[0] if cipher else "unknown",
            alpn=ssl_object.selected_alpn_protocol(),
            certificate=ssl_object.getpeercert(binary_form=True) or b"",
        )
        return session, leftover

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                async with asyncio.timeout(min(self.timeout, CLOSE_WAIT)):
                    await self.writer.wait_closed()
            except (TimeoutError, OSError, EOFError):
                self.writer.transport.abort()
        self.sock.close()  # a no-op once the transport has taken the socket


def client_context(
    *,
    version: ssl.TLSVersion | None = None,
    alpn: str | None = None,
    ca: Path | None = None,
    verify: bool = False,
    check_name: bool = False,
) -> ssl.SSLContext:
    """A client context; without `verify` it only looks at what the server offers."""
    if verify:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.check_hostname = check_name
        if not check_name:
            context.verify_flags |= VERIFY_NO_CHECK_TIME
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        # The certificate is judged by its own checks (trust, name, expiry),
        # each against a verifying context or the certificate itself.
        context.verify_mode = ssl.CERT_NONE
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            # To see whether the server still accepts TLS 1.0 or 1.1 the
            # client must offer them: OpenSSL needs security level 0 for
            # their SHA-1 signatures, and the ssl module warns on the names.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = version
            context.maximum_version = version
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return context


async def open_tls(
    target: Target, mode: Mode, context: ssl.SSLContext
) -> tuple[Connection, TlsSession]:
    """Connect, send STLS first in STARTTLS mode, and do the handshake."""
    connection = await Connection.open(target)
    try:
        if mode is Mode.STARTTLS:
            greeting = await connection.line()
            if not greeting.startswith(b"+OK"):
                raise ProbeError(f"greeting {printable(greeting)}")
            answer = await connection.command(b"STLS")
            if not answer.startswith(b"+OK"):
                raise ProbeError(f"STLS refused: {printable(answer)}")
        session, _ = await connection.start_tls(context, target.name)
    except BaseException:
        await connection.close()
        raise
    return connection, session


async def handshake(target: Target, mode: Mode, context: ssl.SSLContext) -> Handshake:
    """One handshake with `context`, then close."""
    try:
        connection, session = await open_tls(target, mode, context)
    except HandshakeFailed as exc:
        return Untested(str(exc), local=True) if exc.local else Refused(str(exc))
    except ProbeError as exc:
        return Untested(str(exc))
    await connection.close()
    return session


async def version_handshake(target: Target, mode: Mode, version: ssl.TLSVersion) -> Handshake:
    supported = {
        ssl.TLSVersion.TLSv1: ssl.HAS_TLSv1,
        ssl.TLSVersion.TLSv1_1: ssl.HAS_TLSv1_1,
        ssl.TLSVersion.TLSv1_2: ssl.HAS_TLSv1_2,
        ssl.TLSVersion.TLSv1_3: ssl.HAS_TLSv1_3,
    }
    if not supported[version]:
        return Untested(f"OpenSSL {ssl.OPENSSL_VERSION} was built without it", local=True)
    try:
        context = client_context(version=version)
    except (ValueError, ssl.SSLError) as exc:
        return Untested(str(exc), local=True)
    return await handshake(target, mode, context)


async def listen(target: Target, wait: float) -> Heard:
    """Connect and say nothing, as a client waiting for a greeting; report what came."""
    async with await Connection.open(target) as connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(wait):
                data = await loop.sock_recv(connection.sock, MAX_REPLY_LINE)
        except TimeoutError:
            return Heard(b"", closed=False)
        except OSError:
            return Heard(b"", closed=True)
        return Heard(data, closed=not data)


async def plaintext_phase(target: Target) -> Plaintext:
    """Greeting, CAPA and `USER probe-nonexistent` before TLS; never PASS."""
    async with await Connection.open(target) as connection:
        greeting = await connection.line()
        if not greeting.startswith(b"+OK"):
            raise ProbeError(f"it said {printable(greeting)}")
        capabilities: tuple[str, ...] | None = None
        if (await connection.command(b"CAPA")).startswith(b"+OK"):
            capabilities = tuple(printable(line) for line in await connection.multiline())
        user_reply = await connection.command(b"USER " + PROBE_USER)
        with contextlib.suppress(ProbeError):
            await connection.command(b"QUIT")
    return Plaintext(greeting, capabilities, user_reply)


async def capabilities_after_tls(
    target: Target, mode: Mode
) -> tuple[TlsSession, tuple[str, ...] | None]:
    """The handshake every later check builds on, and CAPA inside TLS."""
    connection, session = await open_tls(target, mode, client_context())
    async with connection:
        if mode is Mode.IMPLICIT:
            greeting = await connection.line()
            if not greeting.startswith(b"+OK"):
                raise ProbeError(f"greeting inside TLS: {printable(greeting)}")
        # RFC 2595 section 4: no new greeting after STLS; CAPA is asked again.
        capabilities: tuple[str, ...] | None = None
        if (await connection.command(b"CAPA")).startswith(b"+OK"):
            capabilities = tuple(printable(line) for line in await connection.multiline())
        with contextlib.suppress(ProbeError):
            await connection.command(b"QUIT")
    return session, capabilities


async def injection(target: Target) -> Injection | Refused | Untested:
    """STLS and CAPA in one write, the handshake, QUIT: every line that comes back."""
    try:
        connection = await Connection.open(target)
    except ProbeError as exc:
        return Untested(str(exc))
    async with connection:
        try:
            greeting = await connection.line()
            if not greeting.startswith(b"+OK"):
                return Untested(f"greeting {printable(greeting)}")
            # One write, so one segment on the wire: the server has both lines
            # in its buffer when it answers STLS.
            await connection.send(b"STLS" + CRLF + b"CAPA" + CRLF)
            answer = await connection.line()
            if not answer.startswith(b"+OK"):
                return Untested(f"STLS refused: {printable(answer)}")
        except ProbeError as exc:
            return Untested(str(exc))
        if connection.lines.pending:
            # More plaintext after the +OK: CAPA answered before TLS.
            return Injection(connection.lines.take_pending(), ())
        try:
            _, before_tls = await connection.start_tls(client_context(), target.name)
        except ProbeError as exc:
            return Refused(str(exc))
        replies: list[bytes] = []
        # QUIT gets one answer; an injected CAPA's answer would come before it.
        with contextlib.suppress(ProbeError):
            await connection.send(b"QUIT" + CRLF)
            while (line := await connection.read_line()) is not None:
                replies.append(line)
    return Injection(before_tls, tuple(replies))


async def log_in(
    target: Target, mode: Mode, credentials: Credentials, capabilities: tuple[str, ...] | None
) -> LoggedIn | str:
    """USER/PASS (or AUTH PLAIN), STAT, QUIT, over fully verified TLS only."""
    user, password = credentials.user.encode(), credentials.password.encode()
    if any(byte in b"\r\n\0" for byte in user + password):
        return "the user name or password contains a line break or NUL"
    try:
        context = client_context(ca=target.ca, verify=True, check_name=True)
        connection, _ = await open_tls(target, mode, context)
    except (ProbeError, OSError) as exc:  # OSError: the CA file (ssl.SSLError is one)
        return f"no verified TLS: {exc if isinstance(exc, ProbeError) else reason(exc, 0)}"
    async with connection:
        try:
            if mode is Mode.IMPLICIT:
                await connection.line()  # the greeting
            offered = login_capabilities(capabilities or ())
            plain = any(entry.split()[:1] == ["SASL"] and "PLAIN" in entry for entry in offered)
            if "USER" in offered or not plain:
                if not (reply := await connection.command(b"USER " + user)).startswith(b"+OK"):
                    return f"USER refused: {printable(reply)}"
                reply = await connection.command(b"PASS " + password)
            else:
                # RFC 5034 section 4 with an initial response, RFC 4616: \0user\0password.
                response = base64.b64encode(b"\0" + user + b"\0" + password)
                reply = await connection.command(b"AUTH PLAIN " + response)
            if not reply.startswith(b"+OK"):
                return f"login refused: {printable(reply)}"
            stat = await connection.command(b"STAT")
            with contextlib.suppress(ProbeError):
                await connection.command(b"QUIT")
        except ProbeError as exc:
            return str(exc)
    return parse_stat(stat) or f"STAT answered {printable(stat)}"


# --- The probe -------------------------------------------------------------


async def probe(target: Target, now: datetime.datetime | None = None) -> Report:
    """Run every check against `target`; network trouble becomes failed checks."""
    name = str(target)
    heard: Heard | None = None
    if target.requested == "auto":
        try:
            heard = await listen(target, min(GREETING_WAIT, target.timeout))
        except ProbeError as exc:
            return Report(name, Mode.UNKNOWN, (connect_check(name, str(exc)),))
        mode = Mode.STARTTLS if heard.data.startswith(b"+OK") else Mode.IMPLICIT
    else:
        mode = Mode.IMPLICIT if target.requested == "tls" else Mode.STARTTLS

    checks: list[Check] = []
    plaintext: Plaintext | None = None
    if mode is Mode.STARTTLS:
        try:
            plaintext = await plaintext_phase(target)
        except ConnectFailed as exc:
            return Report(name, Mode.UNKNOWN, (connect_check(name, str(exc)),))
        except ProbeError as exc:
            return Report(name, Mode.UNKNOWN, (no_greeting_check(str(exc)),))

    async with asyncio.TaskGroup() as tasks:
        # The slow check (it waits as long as a patient client) runs beside the rest.
        if mode is Mode.IMPLICIT:
            wait = min(MIXUP_WAIT, target.timeout)
            mixup = tasks.create_task(_plaintext_client(target, wait))
        else:
            mixup = tasks.create_task(_tls_client(target))
        try:
            session, after = await capabilities_after_tls(target, mode)
            stls_problem = None
        except ConnectFailed as exc:
            mixup.cancel()
            return Report(name, Mode.UNKNOWN, (connect_check(name, str(exc)),))
        except ProbeError as exc:
            if plaintext is None:
                mixup.cancel()
                if target.requested == "auto" and await _greets(target):
                    # A plaintext server slower to greet than GREETING_WAIT.
                    return await probe(dataclasses.replace(target, requested="starttls"), now)
                return Report(
                    name, Mode.UNKNOWN, (implicit_failed_check(target.requested, str(exc), heard),)
                )
            session, after, stls_problem = None, None, str(exc)

        if plaintext is None:
            checks.append(implicit_mode_check())
        else:
            checks.append(starttls_mode_check(plaintext, stls_problem))
        checks.append(await mixup)
        if plaintext is not None:
            checks.append(capabilities_check("capa-before-tls", plaintext.capabilities))
        checks += [login_offered_check(plaintext), login_accepted_check(plaintext)]
        if session is None:
            if target.credentials is not None:
                checks.append(login_check(target.credentials.user, "not attempted: no TLS"))
            return Report(name, Mode.PLAINTEXT, tuple(checks))
        checks += await _tls_checks(target, mode, session, now)
        checks.append(capabilities_check("capa-after-tls", after))
        if target.credentials is not None:
            verified = all(
                check.result is Result.PASS
                for check in checks
                if check.name in ("certificate-trust", "certificate-name")
            )
            outcome = (
                await log_in(target, mode, target.credentials, after)
                if verified
                else "not attempted: the certificate failed the trust or name check"
            )
            checks.append(login_check(target.credentials.user, outcome))
    return Report(name, mode, tuple(checks))


async def _greets(target: Target) -> bool:
    """Whether the port sends a POP3 greeting within the whole timeout."""
    with contextlib.suppress(ProbeError):
        return (await listen(target, target.timeout)).data.startswith(b"+OK")
    return False


async def _plaintext_client(target: Target, wait: float) -> Check:
    try:
        return plaintext_client_check(await listen(target, wait), wait)
    except ProbeError as exc:
        return Check("port-mixup", Result.WARN, f"not tested: {exc}", "run the probe again")


async def _tls_client(target: Target) -> Check:
    return tls_client_check(await handshake(target, Mode.IMPLICIT, client_context()))


async def _tls_checks(
    target: Target, mode: Mode, session: TlsSession, now: datetime.datetime | None
) -> list[Check]:
    versions: dict[ssl.TLSVersion, Handshake] = {}
    for version in (
        ssl.TLSVersion.TLSv1,
        ssl.TLSVersion.TLSv1_1,
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_3,
    ):
        versions[version] = await version_handshake(target, mode, version)
    checks = [
        legacy_version_check("1.0", versions[ssl.TLSVersion.TLSv1]),
        legacy_version_check("1.1", versions[ssl.TLSVersion.TLSv1_1]),
        tls12_check(versions[ssl.TLSVersion.TLSv1_2], versions[ssl.TLSVersion.TLSv1_3]),
        tls13_check(versions[ssl.TLSVersion.TLSv1_3]),
        cipher_check(session, versions[ssl.TLSVersion.TLSv1_2]),
    ]

    try:
        certificate = x509.load_der_x509_certificate(session.certificate)
    except ValueError as exc:
        checks += certificate_unreadable_checks(str(exc) or "not DER")
    else:
        try:
            verifying = client_context(ca=target.ca, verify=True)
        except (OSError, ssl.SSLError) as exc:
            verified: Handshake = Untested(f"cannot load the CAs: {reason(exc, target.timeout)}")
        else:
            verified = await handshake(target, mode, verifying)
        match verified:
            case TlsSession():
                checks.append(trust_check(None, target.ca))
            case Refused(why) | Untested(why):
                checks.append(trust_check(why, target.ca))
        checks.append(name_check(certificate, target.name))
        checks.append(expiry_check(certificate, now or datetime.datetime.now(datetime.UTC)))

    checks.append(alpn_pop3_check(await handshake(target, mode, client_context(alpn=ALPN_POP3))))
    checks.append(
        alpn_foreign_check(await handshake(target, mode, client_context(alpn=ALPN_FOREIGN)))
    )
    if mode is Mode.STARTTLS:
        checks.append(injection_check(await injection(target)))
    return checks


# --- The command -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Connect to a POP3 server and check its TLS: implicit TLS or STLS, TLS versions,"
        " certificate, logins before TLS, STARTTLS injection, ALPN. Each check passes, warns"
        " or fails; exit status 0, 1 or 2 accordingly."
    )
    parser.add_argument("target", metavar="HOST[:PORT]", help="the POP3 server to check")
    modes = parser.add_mutually_exclusive_group()
    for flag, mode, text in (
        ("--auto", "auto", "find out whether the port speaks TLS or STLS (default; port 995)"),
        ("--tls", "tls", "implicit TLS, POP3S (default port 995)"),
        ("--starttls", "starttls", "plaintext POP3, then STLS (default port 110)"),
    ):
        modes.add_argument(flag, dest="mode", action="store_const", const=mode, help=text)
    parser.set_defaults(mode="auto")
    parser.add_argument(
        "--ca", type=Path, metavar="FILE", help="PEM file of the CAs to trust (default: system)"
    )
    parser.add_argument(
        "--servername",
        metavar="NAME",
        help="the name the certificate must carry, also sent as SNI (default: HOST)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--user",
        help=f"after TLS, log in and STAT; the password comes from {CREDENTIAL_VARIABLE}"
        " or a prompt",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for each connect, handshake and reply (default {DEFAULT_TIMEOUT:g})",
    )


def run_command(arguments: argparse.Namespace) -> int:
    """`poproxy probe`: the report on stdout, 0/1/2 for pass/warn/fail."""
    try:
        host, port = parse_target(arguments.target, arguments.mode)
        if not arguments.timeout > 0:
            raise ValueError("--timeout must be more than 0")
        if arguments.servername is not None and (
            not arguments.servername or arguments.servername.startswith(".")
        ):
            raise ValueError(f"--servername {arguments.servername!r}: not a host name")
        if arguments.ca is not None:
            _check_ca(arguments.ca)
        credentials = _credentials(arguments.user) if arguments.user else None
    except ValueError as exc:
        print(f"poproxy probe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # at the password prompt
        return 130
    target = Target(
        host=host,
        port=port,
        requested=arguments.mode,
        server_name=arguments.servername,
        ca=arguments.ca,
        timeout=arguments.timeout,
        credentials=credentials,
    )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            report = runner.run(probe(target))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report.as_json()) if arguments.json else report.text())
    return report.exit_status


def _check_ca(path: Path) -> None:
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--ca {path}: {reason(exc, 0)}") from None


def _credentials(user: str) -> Credentials:
    """The password from the environment or a prompt: never from the command line."""
    password = os.environ.get(CREDENTIAL_VARIABLE)
    if password is None:
        if not sys.stdin.isatty():
            raise ValueError(f"--user needs the password in {CREDENTIAL_VARIABLE} or a terminal")
        try:
            password = getpass.getpass(f"password for {user}: ")
        except EOFError:
            raise ValueError("no password given") from None
    return Credentials(user, password)
