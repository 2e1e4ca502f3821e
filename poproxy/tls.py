"""TLS toward clients: server SSLContexts built from the configuration.

Owns: protocol versions, cipher choice, ALPN, loading and checking the
certificate files (they parse, the key matches the certificate), and reading
their names and expiry dates with `cryptography`. Must never log key material
or accept TLS below 1.2 (RFC 8996, RFC 9325 section 3.1.1).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from poproxy.config import CertificateFiles, TlsSettings

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


def server_context(settings: TlsSettings, source: str) -> ssl.SSLContext:
    """A server context with every configured certificate, checked first."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[settings.min_version]
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    # No compression (CRIME, RFC 9325 section 3.3); no renegotiation (its CPU
    # cost is a denial of service, section 3.5); the server picks the suite.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.sni_callback = _remember_server_name
    for files in settings.certificates:
        inspect_certificate(files, source)
        try:
            # One RSA and one ECDSA pair may both be loaded: OpenSSL keeps one
            # certificate per key type and serves what the client supports.
            context.load_cert_chain(files.cert, files.key)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"{source}: {files.key_path}: cannot load {files.cert}: {_reason(exc)}"
            ) from None
    return context


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


def _remember_server_name(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
) -> None:
    # The name the client asked for (SNI), kept on the connection for its log line.
    if name is not None:
        setattr(ssl_object, _SERVER_NAME, name)


def server_name(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SNI name the client sent, if any."""
    name = getattr(ssl_object, _SERVER_NAME, None)
    return name if isinstance(name, str) else None


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
