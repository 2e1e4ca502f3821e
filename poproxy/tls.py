"""TLS toward clients: server SSLContexts built from the configuration.

Owns: protocol versions, cipher choice, ALPN, loading and checking the
certificate files (they parse, the key matches the certificate), and reading
their names and expiry dates with `cryptography`, and the session ticket keys
that every context of a process (and every worker) shares. Must never log key
material or accept TLS below 1.2 (RFC 8996, RFC 9325 section 3.1.1).
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import datetime
import functools
import hashlib
import logging
import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from poproxy.config import CertificateFiles, TlsSettings
from poproxy.metrics import Metrics

log = logging.getLogger("poproxy.tls")

# Mozilla "intermediate" (v5.7) for TLS 1.2: forward-secret AEAD suites only
# (RFC 9325 section 4.1). TLS 1.3 suites are OpenSSL's defaults, all fine.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)

# RFC 9325 section 3.8 and the IANA registry: "pop3" is POP3's ALPN id.
ALPN_PROTOCOLS = ["pop3"]

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertificateError(Exception):
    """A certificate or key cannot be used; the message names the config key."""


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator wants to know about a loaded certificate."""

    names: tuple[str, ...]
    not_after: datetime.datetime


EXPIRY_WARNING = datetime.timedelta(days=14)  # warn in the log from this long before expiry


def _base_context(settings: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[settings.min_version]
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    # No compression (CRIME, RFC 9325 section 3.3); no renegotiation (its CPU
    # cost is a denial of service, section 3.5); the server picks the suite.
    # Session tickets stay on: a client that polls every few minutes resumes
    # instead of paying for a full handshake. One TLS 1.3 ticket per
    # connection, not OpenSSL's two: a mail client opens one connection per
    # account at a time, and each ticket costs an encryption and a record
    # (about a tenth of a TLS connection's CPU, bench/RESULTS.md).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.num_tickets = 1
    return context


@dataclass(frozen=True)
class Loaded:
    """One configured certificate as loaded."""

    files: CertificateFiles
    info: CertificateInfo


class Certificates:
    """One generation of certificates: a context per set of names, the first is the default.

    Certificates with the same names share a context, so an RSA and an
    ECDSA certificate for one host both serve, each to the clients that
    support it. With SNI the context whose names match is chosen (wildcards
    cover one left-most label, RFC 6125 section 6.4.3); without SNI, or
    with no match, the first certificate's context serves. Given
    `ticket_keys`, every context issues and accepts tickets under them;
    `tickets_shared` says whether that worked.
    """

    def __init__(
        self, settings: TlsSettings, source: str, ticket_keys: bytes | None = None
    ) -> None:
        self.sni_strict = settings.sni == "strict"
        self.tickets_shared = ticket_keys is not None
        self.loaded = [
            Loaded(files, inspect_certificate(files, source)) for files in settings.certificates
        ]
        by_names: dict[tuple[str, ...], ssl.SSLContext] = {}
        for loaded in self.loaded:
            names = tuple(sorted(name.lower() for name in loaded.info.names))
            context = by_names.get(names)
            if context is None:
                context = by_names[names] = _base_context(settings)
                context.sni_callback = self._choose
                if self.tickets_shared and ticket_keys is not None:
                    self.tickets_shared = set_ticket_keys(context, ticket_keys)
            try:
                context.load_cert_chain(loaded.files.cert, loaded.files.key)
            except (OSError, ssl.SSLError) as exc:
                raise CertificateError(
                    f"{source}: {loaded.files.key_path}: cannot load {loaded.files.cert}:"
                    f" {_reason(exc)}"
                ) from None
        self.by_names = by_names
        self.default = next(iter(by_names.values()))

    def select(self, name: str) -> ssl.SSLContext | None:
        """The context for an SNI name, or None when no certificate names it."""
        name = name.lower().rstrip(".")
        for names, context in self.by_names.items():
            if any(_name_matches(pattern, name) for pattern in names):
                return context
        return None

    def _choose(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> int | None:
        if name is None:
            return None
        # The name the client asked for, kept on the connection for its log line.
        setattr(ssl_object, _SERVER_NAME, name)
        context = self.select(name)
        if context is None:
            # RFC 9325 section 3.7 (and ALPACA): refuse a name we do not serve.
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME if self.sni_strict else None
        if context is not ssl_object.context:
            ssl_object.context = context
        return None


class CertificateStore:
    """The certificates in service, reloaded when their files change.

    A reload builds a complete new generation and swaps it in for new
    handshakes only; connections in flight keep theirs. Bad new files leave
    the old generation in service.
    """

    def __init__(
        self,
        settings: TlsSettings,
        source: str,
        metrics: Metrics | None = None,
        ticket_keys: bytes | None = None,
    ) -> None:
        self.settings = settings  # certificates are re-read; the rest holds until restart
        self.source = source
        self.metrics = metrics
        self._fingerprint = self._read_fingerprint()
        self.certificates = Certificates(settings, source, ticket_keys)
        # Kept for every later generation, so that tickets survive reloads;
        # dropped (with one warning) when this process cannot set them.
        self.ticket_keys = ticket_keys if self.certificates.tickets_shared else None
        if ticket_keys is not None and self.ticket_keys is None:
            log.warning(
                "cannot set TLS session ticket keys: each TLS context keeps its own, so a"
                " ticket resumes only in the process and certificate generation that issued it"
            )
        self._report()

    @property
    def current(self) -> ssl.SSLContext:
        """The context to start a new handshake with."""
        return self.certificates.default

    def changed(self) -> bool:
        """Whether any certificate or key file reads differently from the loaded ones."""
        return self._read_fingerprint() != self._fingerprint

    def reload(self) -> bool:
        """Load the files again; True when the new certificates are in service."""
        fingerprint = self._read_fingerprint()
        try:
            certificates = Certificates(self.settings, self.source, self.ticket_keys)
        except CertificateError as exc:
            log.error("certificate reload failed, the old certificates stay in service: %s", exc)
            self._count("failure")
            self._fingerprint = fingerprint  # report a bad file once, not every interval
            return False
        self.certificates = certificates
        self._fingerprint = fingerprint
        self._count("success")
        self._report()
        log.info("certificates reloaded")
        return True

    async def watch(self, interval: float) -> None:
        """Poll the files every `interval`: Kubernetes swaps Secret volumes by symlink,
        which inode watches miss, so the paths are read again instead."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload()

    def _read_fingerprint(self) -> bytes:
        digest = hashlib.sha256()
        for files in self.settings.certificates:
            for path in (files.cert, files.key):
                try:
                    digest.update(path.read_bytes())
                except OSError as exc:
                    digest.update(f"unreadable {exc.errno}".encode())
        return digest.digest()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.certificate_reloads.labels(result).inc()

    def _report(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for loaded in self.certificates.loaded:
            if self.metrics is not None:
                self.metrics.certificate_expiry.labels(str(loaded.files.cert)).set(
                    loaded.info.not_after.timestamp()
                )
            left = loaded.info.not_after - now
            if left < EXPIRY_WARNING:
                log.warning(
                    "certificate %s (%s) expires %s, in %d days",
                    loaded.files.cert,
                    ", ".join(loaded.info.names),
                    f"{loaded.info.not_after:%Y-%m-%d %H:%M}Z",
                    left.days,
                )


# --- Session ticket keys -------------------------------------------------------
#
# RFC 5077 tickets (and TLS 1.3's, RFC 8446 section 4.6.1) are encrypted by the
# server with keys OpenSSL makes per SSL_CTX. Python's ssl module cannot set
# them, so contexts of different processes (workers) or generations (reloads)
# cannot read each other's tickets. set_ticket_keys sets them through OpenSSL's
# SSL_CTX_set_tlsext_ticket_keys, a macro for SSL_CTX_ctrl, with checks that
# turn any mismatch into "not set" rather than a crash or a corrupted context.

TICKET_KEYS_LENGTH = 80  # OpenSSL 1.1+: 16 bytes of key name, 32 of HMAC key, 32 of AES key
SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def new_ticket_keys() -> bytes:
    """Fresh random ticket keys, to share between the contexts of one lifetime."""
    return os.urandom(TICKET_KEYS_LENGTH)


@dataclass(frozen=True)
class _LibSsl:
    ctrl: Any  # long SSL_CTX_ctrl(SSL_CTX *, int, long, void *)
    get_options: Any  # uint64_t SSL_CTX_get_options(const SSL_CTX *)


@functools.cache
def _libssl() -> _LibSsl | None:
    """OpenSSL's functions as the running `_ssl` module links them, or None."""
    if sys.implementation.name != "cpython":
        return None  # the SSL_CTX pointer's place below is CPython's
    try:
        library = ctypes.CDLL(_ssl.__file__)
        ctrl, get_options = library.SSL_CTX_ctrl, library.SSL_CTX_get_options
    except (OSError, AttributeError, TypeError):
        return None  # no shared _ssl module, or OpenSSL linked in statically and hidden
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    return _LibSsl(ctrl, get_options)


def _ssl_ctx(context: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of a context: in CPython's PySSLContext, the first
    field after PyObject_HEAD (Modules/_ssl.c)."""
    if type(context).__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        return None
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    return pointer or None


def set_ticket_keys(context: ssl.SSLContext, keys: bytes) -> bool:
    """Make `context` issue and accept session tickets under `keys`; False when it cannot.

    Before writing, the pointer is checked to be this context's SSL_CTX (its
    options, read through OpenSSL, are the context's) and OpenSSL to expect
    keys of this length; after, the keys are read back. Any doubt: False,
    and the context keeps the keys OpenSSL made for it.
    """
    if len(keys) != TICKET_KEYS_LENGTH:
        raise ValueError(f"ticket keys are {TICKET_KEYS_LENGTH} bytes, not {len(keys)}")
    library = _libssl()
    pointer = _ssl_ctx(context)
    if library is None or pointer is None:
        return False
    if library.get_options(pointer) != int(context.options):
        return False
    # With no buffer, the ctrl answers the key length this OpenSSL uses.
    if library.ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, None) != TICKET_KEYS_LENGTH:
        return False
    if library.ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), keys) != 1:
        return False
    check = ctypes.create_string_buffer(TICKET_KEYS_LENGTH)
    if library.ctrl(pointer, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, len(check), check) != 1:
        return False
    return check.raw == keys


def server_context(settings: TlsSettings, source: str) -> ssl.SSLContext:
    """The default context of freshly loaded certificates (for checks and tools)."""
    return Certificates(settings, source).default


def _name_matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    # "*.example.org" matches "mail.example.org", not "example.org" or "a.b.example.org".
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:]
    return False


def inspect_certificate(files: CertificateFiles, source: str) -> CertificateInfo:
    """Read a certificate and its key; check they parse and belong together."""
    where = f"{source}: {files.key_path}"
    try:
        cert_pem = files.cert.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{where}.cert: cannot read {files.cert}: {exc.strerror}") from None
    try:
        key_pem = files.key.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{where}.key: cannot read {files.key}: {exc.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError(f"{where}.cert: {files.cert} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(
            f"{where}.key: {files.key} holds no unencrypted PEM private key"
        ) from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise CertificateError(
            f"{where}.key: {files.key} does not match the certificate in {files.cert}"
        )
    return CertificateInfo(names=certificate_names(leaf), not_after=leaf.not_valid_after_utc)


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """DNS names and IP addresses from the SAN, else the subject's common name."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(attribute.value) for attribute in common)
    dns = san.get_values_for_type(x509.DNSName)
    addresses = [str(address) for address in san.get_values_for_type(x509.IPAddress)]
    return (*dns, *addresses)


_SERVER_NAME = "poproxy_server_name"


def server_name(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SNI name the client sent, if any."""
    name = getattr(ssl_object, _SERVER_NAME, None)
    return name if isinstance(name, str) else None


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
