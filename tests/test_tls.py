"""Session ticket keys (tls.set_ticket_keys): set, read back, and shared between contexts.

Handshakes run over memory BIOs, without sockets: a client and a server `SSLObject` pass
each other's bytes until both are done.
"""

from __future__ import annotations

import ctypes
import logging
import ssl

import pytest
from support.proxy import Certificates

from poproxy import config, tls

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def settings(certificates: Certificates) -> config.TlsSettings:
    return config.TlsSettings(certificates=(certificates.files,))


def server(certificates: Certificates, keys: bytes | None) -> ssl.SSLContext:
    return tls.Certificates(settings(certificates), "test.yaml", keys).default


def read_keys(context: ssl.SSLContext) -> bytes:
    library, pointer = tls._libssl(), tls._ssl_ctx(context)
    assert library is not None and pointer is not None
    buffer = ctypes.create_string_buffer(tls.TICKET_KEYS_LENGTH)
    assert library.ctrl(pointer, tls.SSL_CTRL_GET_TLSEXT_TICKET_KEYS, len(buffer), buffer) == 1
    return buffer.raw


def handshake(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
) -> ssl.SSLObject:
    """A whole handshake, and the tickets the server sends after it; the client's end."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(
        to_client, from_client, server_hostname="localhost", session=session
    )
    served = server_context.wrap_bio(to_server, from_server, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", served)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if all(done.values()) and not from_server.pending and not from_client.pending:
            break
    assert all(done.values())
    # TLS 1.3 tickets come after the handshake: the client reads them with the first data.
    served.write(b"+OK POP3 ready\r\n")
    to_client.write(from_server.read())
    assert client.read(100) == b"+OK POP3 ready\r\n"
    return client


@pytest.fixture
def client_context(certificates: Certificates) -> ssl.SSLContext:
    return certificates.client_context()


def test_keys_are_set_and_read_back(certificates: Certificates) -> None:
    keys = tls.new_ticket_keys()
    context = server(certificates, None)
    assert read_keys(context) != keys
    assert tls.set_ticket_keys(context, keys)
    assert read_keys(context) == keys


def test_keys_of_the_wrong_length_are_refused(certificates: Certificates) -> None:
    with pytest.raises(ValueError, match="80 bytes, not 48"):
        tls.set_ticket_keys(server(certificates, None), bytes(48))


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["TLSv1.2", "TLSv1.3"])
def test_a_ticket_resumes_on_another_context_with_the_same_keys(
    certificates: Certificates, client_context: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    client_context.maximum_version = version
    keys = tls.new_ticket_keys()
    first = handshake(server(certificates, keys), client_context)
    assert first.version() == version.name.replace("v1_", "v1.")
    assert not first.session_reused
    ticket = first.session
    assert ticket is not None and ticket.has_ticket
    # Another generation (a reload) or another worker: the same keys, so it resumes.
    assert handshake(server(certificates, keys), client_context, ticket).session_reused
    # Other keys, as each context made its own before: a full handshake.
    other = handshake(server(certificates, tls.new_ticket_keys()), client_context, ticket)
    assert not other.session_reused
    assert not handshake(server(certificates, None), client_context, ticket).session_reused


def test_a_context_that_is_not_the_one_pointed_at_is_left_alone(
    certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard: when the pointer is not the context's own SSL_CTX (here another
    context's, with other options), nothing is written."""
    target, other = server(certificates, None), server(certificates, None)
    other.options |= ssl.OP_NO_TICKET
    before = read_keys(other)
    pointer = tls._ssl_ctx(other)
    monkeypatch.setattr(tls, "_ssl_ctx", lambda context: pointer)
    assert not tls.set_ticket_keys(target, tls.new_ticket_keys())
    monkeypatch.undo()
    assert read_keys(other) == before


def test_without_openssl_functions_the_store_warns_once_and_serves(
    certificates: Certificates,
    client_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tls, "_libssl", lambda: None)
    with caplog.at_level(logging.WARNING, logger="poproxy.tls"):
        store = tls.CertificateStore(settings(certificates), "test.yaml", None, b"k" * 80)
        assert store.reload()
    assert store.ticket_keys is None
    assert [record.getMessage() for record in caplog.records] == [
        "cannot set TLS session ticket keys: each TLS context keeps its own, so a ticket"
        " resumes only in the process and certificate generation that issued it"
    ]
    assert not handshake(store.current, client_context).session_reused


def test_tickets_survive_a_certificate_reload(
    certificates: Certificates, client_context: ssl.SSLContext
) -> None:
    store = tls.CertificateStore(settings(certificates), "test.yaml", None, tls.new_ticket_keys())
    ticket = handshake(store.current, client_context).session
    before = store.current
    assert store.reload()
    assert store.current is not before
    assert handshake(store.current, client_context, ticket).session_reused
