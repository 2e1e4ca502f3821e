"""The TLS front door: versions, strict ALPN, SNI, resumption, rotation, port mix-ups."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import poplib
import socket
import ssl
import warnings
from pathlib import Path
from typing import cast

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.clients import RawClient
from support.proxy import Certificates, RunningProxy, StartProxy, proxy_config

from poproxy import config, tls
from poproxy.demo import MailboxServer
from poproxy.metrics import Metrics
from poproxy.server import Proxy


def handshake(
    address: tuple[str, int], context: ssl.SSLContext, server_name: str = "localhost"
) -> ssl.SSLSocket:
    """A TLS connection on which the greeting was read (so TLS 1.3 tickets arrived)."""
    raw = socket.create_connection(address, timeout=5)
    try:
        sock = context.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    greeting = sock.recv(100)
    assert greeting.startswith(b"+OK")
    return sock


async def in_thread(
    address: tuple[str, int], context: ssl.SSLContext, server_name: str = "localhost"
) -> ssl.SSLSocket:
    return await asyncio.to_thread(handshake, address, context, server_name)


def peer_names(sock: ssl.SSLSocket) -> list[str]:
    certificate = sock.getpeercert()
    assert certificate is not None
    names = cast(tuple[tuple[str, str], ...], certificate.get("subjectAltName", ()))
    return [value for kind, value in names if kind == "DNS"]


class TestVersions:
    @pytest.mark.asyncio
    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
    async def test_tls_12_and_13_work(
        self, proxy: RunningProxy, client_context: ssl.SSLContext, version: ssl.TLSVersion
    ) -> None:
        client_context.minimum_version = client_context.maximum_version = version
        sock = await in_thread(proxy.implicit, client_context)
        with sock:
            expected = "TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3"
            assert sock.version() == expected

    @pytest.mark.asyncio
    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
    async def test_tls_10_and_11_are_refused(
        self, proxy: RunningProxy, client_context: ssl.SSLContext, version: ssl.TLSVersion
    ) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # as they should be
            client_context.minimum_version = client_context.maximum_version = version
        client_context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            (await in_thread(proxy.implicit, client_context)).close()


class TestAlpn:
    @pytest.mark.asyncio
    async def test_pop3_is_selected(
        self, proxy: RunningProxy, client_context: ssl.SSLContext
    ) -> None:
        client_context.set_alpn_protocols(["h2", "pop3"])
        with await in_thread(proxy.implicit, client_context) as sock:
            assert sock.selected_alpn_protocol() == "pop3"

    @pytest.mark.asyncio
    async def test_no_alpn_is_accepted(
        self, proxy: RunningProxy, client_context: ssl.SSLContext
    ) -> None:
        with await in_thread(proxy.implicit, client_context) as sock:
            assert sock.selected_alpn_protocol() is None

    @pytest.mark.asyncio
    @pytest.mark.parametrize("listener", ["implicit", "starttls"])
    async def test_foreign_alpn_alone_is_refused_alpaca(
        self,
        proxy: RunningProxy,
        client_context: ssl.SSLContext,
        metrics: Metrics,
        listener: str,
    ) -> None:
        """ALPACA: a TLS connection meant for a web server must not reach POP3."""
        client_context.set_alpn_protocols(["http/1.1"])
        if listener == "implicit":
            with pytest.raises(ssl.SSLError, match=r"(?i)no.application.protocol"):
                (await in_thread(proxy.implicit, client_context)).close()
        else:
            async with await RawClient.connect(proxy.starttls) as client:
                await client.line()
                assert await client.command(b"STLS\r\n") == b"+OK Begin TLS negotiation\r\n"
                with pytest.raises(ssl.SSLError, match=r"(?i)no.application.protocol"):
                    await client.starttls(client_context)
        name = "pop3s" if listener == "implicit" else "pop3"
        refused = metrics.registry.get_sample_value(
            "poproxy_tls_handshakes_total", {"listener": name, "result": "alpn_refused"}
        )
        assert refused == 1

    @pytest.mark.asyncio
    async def test_lenient_alpn_lets_a_foreign_list_through(
        self, backend: MailboxServer, certificates: Certificates
    ) -> None:
        settings = proxy_config(certificates.files, [backend.address])
        settings = dataclasses.replace(
            settings, tls=dataclasses.replace(settings.tls, alpn="lenient")
        )
        metrics = Metrics()
        proxy = Proxy(settings, tls.CertificateStore(settings.tls, "t", metrics), metrics)
        await proxy.start()
        try:
            context = certificates.client_context()
            context.set_alpn_protocols(["http/1.1"])
            with await in_thread(proxy.addresses["pop3s"], context) as sock:
                assert sock.selected_alpn_protocol() is None
        finally:
            await proxy.shutdown(grace=0)


def issue(ca: trustme.CA, directory: Path, stem: str, *names: str) -> config.CertificateFiles:
    leaf = ca.issue_cert(*names)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return config.CertificateFiles(cert=cert, key=key, key_path=f"tls.certificates[{stem}]")


async def sni_proxy(
    tmp_path: Path, ca: trustme.CA, backend: MailboxServer, sni: str
) -> tuple[Proxy, Metrics]:
    first = issue(ca, tmp_path, "first", "mail.example.org", "localhost")
    second = issue(ca, tmp_path, "second", "*.example.net")
    settings = dataclasses.replace(
        proxy_config(first, [backend.address]),
        tls=config.TlsSettings(certificates=(first, second), sni=sni),  # type: ignore[arg-type]
    )
    metrics = Metrics()
    proxy = Proxy(settings, tls.CertificateStore(settings.tls, "t", metrics), metrics)
    await proxy.start()
    return proxy, metrics


class TestSni:
    @pytest.mark.asyncio
    async def test_sni_picks_the_matching_certificate(
        self, tmp_path: Path, backend: MailboxServer
    ) -> None:
        ca = trustme.CA()
        proxy, _ = await sni_proxy(tmp_path, ca, backend, "lenient")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        try:
            address = proxy.addresses["pop3s"]
            with await in_thread(address, context, "pop.example.net") as sock:
                assert peer_names(sock) == ["*.example.net"]
            with await in_thread(address, context, "mail.example.org") as sock:
                assert peer_names(sock) == ["mail.example.org", "localhost"]
            # No match, lenient: the first certificate serves (and fails the
            # client's name check, as it should).
            with pytest.raises(ssl.SSLCertVerificationError):
                (await in_thread(address, context, "other.example.com")).close()
        finally:
            await proxy.shutdown(grace=0)

    @pytest.mark.asyncio
    async def test_strict_sni_refuses_an_unknown_name(
        self, tmp_path: Path, backend: MailboxServer
    ) -> None:
        ca = trustme.CA()
        proxy, _ = await sni_proxy(tmp_path, ca, backend, "strict")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        try:
            address = proxy.addresses["pop3s"]
            with pytest.raises(ssl.SSLError, match=r"(?i)unrecognized.name"):
                (await in_thread(address, context, "other.example.com")).close()
            with await in_thread(address, context, "mail.example.org") as sock:
                assert sock.version() is not None
        finally:
            await proxy.shutdown(grace=0)


@pytest.mark.asyncio
async def test_a_second_connection_resumes_the_tls_session(
    proxy: RunningProxy, client_context: ssl.SSLContext
) -> None:
    def resume() -> tuple[bool, bool]:
        with handshake(proxy.implicit, client_context) as first:
            session = first.session
            first_reused = first.session_reused
        raw = socket.create_connection(proxy.implicit, timeout=5)
        with client_context.wrap_socket(
            raw, server_hostname="localhost", session=session
        ) as second:
            second.recv(100)
            return bool(first_reused), bool(second.session_reused)

    assert await asyncio.to_thread(resume) == (False, True)


class TestRotation:
    @pytest.mark.asyncio
    async def test_symlink_swap_serves_the_new_certificate_and_keeps_open_sessions(
        self, tmp_path: Path, backend: MailboxServer, start_proxy: StartProxy
    ) -> None:
        ca = trustme.CA()
        # Kubernetes Secret volumes: the file names are symlinks into a
        # directory that is swapped at once.
        old = tmp_path / "v1"
        new = tmp_path / "v2"
        old.mkdir()
        new.mkdir()
        issue(ca, old, "tls", "localhost", "old.example.org")
        issue(ca, new, "tls", "localhost", "new.example.org")
        (tmp_path / "data").symlink_to(old)
        files = config.CertificateFiles(
            cert=tmp_path / "data" / "tls.crt",
            key=tmp_path / "data" / "tls.key",
            key_path="tls.certificates[0]",
        )
        settings = proxy_config(files, [backend.address])
        metrics = Metrics()
        store = tls.CertificateStore(settings.tls, "t", metrics)
        proxy = Proxy(settings, store, metrics)
        await proxy.start()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        try:
            address = proxy.addresses["pop3s"]
            open_session = await RawClient.connect(address, context)
            await open_session.line()
            await open_session.send(b"USER alice\r\nPASS wonderland\r\n")
            await open_session.line()
            assert (await open_session.line()).startswith(b"+OK")
            with await in_thread(address, context) as sock:
                assert "old.example.org" in peer_names(sock)
            # The swap: a new symlink renamed over the old one.
            (tmp_path / "data.new").symlink_to(new)
            os.replace(tmp_path / "data.new", tmp_path / "data")
            assert store.changed()
            assert store.reload()
            with await in_thread(address, context) as sock:
                assert "new.example.org" in peer_names(sock)
            # The session that was open goes on.
            async with open_session:
                assert (await open_session.command(b"STAT\r\n")).startswith(b"+OK 3 ")
            reloads = metrics.registry.get_sample_value(
                "poproxy_certificate_reloads_total", {"result": "success"}
            )
            assert reloads == 1
        finally:
            await proxy.shutdown(grace=0)

    @pytest.mark.asyncio
    async def test_bad_new_files_keep_the_old_certificate(
        self, tmp_path: Path, backend: MailboxServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        ca = trustme.CA()
        files = issue(ca, tmp_path, "tls", "localhost")
        settings = proxy_config(files, [backend.address])
        metrics = Metrics()
        store = tls.CertificateStore(settings.tls, "t", metrics)
        proxy = Proxy(settings, store, metrics)
        await proxy.start()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        try:
            # A key that belongs to another certificate.
            files.key.write_bytes(ca.issue_cert("localhost").private_key_pem.bytes())
            assert store.changed()
            assert not store.reload()
            assert "certificate reload failed" in caplog.text
            with await in_thread(proxy.addresses["pop3s"], context) as sock:
                assert sock.version() is not None
            failures = metrics.registry.get_sample_value(
                "poproxy_certificate_reloads_total", {"result": "failure"}
            )
            assert failures == 1
            assert not store.changed()  # reported once, not at every poll
        finally:
            await proxy.shutdown(grace=0)

    @pytest.mark.asyncio
    async def test_the_watcher_reloads_changed_files(
        self, tmp_path: Path, backend: MailboxServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ca = trustme.CA()
        files = issue(ca, tmp_path, "tls", "localhost", "old.example.org")
        settings = proxy_config(files, [backend.address])
        settings = dataclasses.replace(
            settings, tls=dataclasses.replace(settings.tls, reload_interval=0.05)
        )
        metrics = Metrics()
        store = tls.CertificateStore(settings.tls, "t", metrics)
        reloaded = asyncio.Event()
        original = store.reload

        def reload() -> bool:
            result = original()
            reloaded.set()
            return result

        monkeypatch.setattr(store, "reload", reload)
        proxy = Proxy(settings, store, metrics)
        await proxy.start()
        try:
            issue(ca, tmp_path, "tls", "localhost", "new.example.org")
            async with asyncio.timeout(5):
                await reloaded.wait()
            assert "new.example.org" in store.certificates.loaded[0].info.names
        finally:
            await proxy.shutdown(grace=0)


class TestPortMixups:
    @pytest.mark.asyncio
    # poplib leaves its socket open when the greeting is an error.
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
    async def test_plaintext_client_on_the_tls_port_is_told_to_turn_tls_on(
        self, start_proxy: StartProxy, backend: MailboxServer, metrics: Metrics
    ) -> None:
        proxy = await start_proxy([backend.address])
        hint_after = proxy.proxy.config.listeners[0].plaintext_hint_after
        assert hint_after == 2.0

        def connect() -> None:
            poplib.POP3(*proxy.implicit, timeout=10)

        with pytest.raises(poplib.error_proto, match="needs SSL/TLS"):
            await asyncio.to_thread(connect)
        mixups = metrics.registry.get_sample_value(
            "poproxy_port_mixups_total", {"listener": "pop3s", "kind": "plaintext_on_tls_port"}
        )
        assert mixups == 1

    @pytest.mark.asyncio
    async def test_plaintext_command_on_the_tls_port_gets_the_hint_at_once(
        self, proxy: RunningProxy
    ) -> None:
        async with await RawClient.connect(proxy.implicit) as client:
            await client.send(b"CAPA\r\n")
            assert b"needs SSL/TLS (POP3S)" in await client.line()
            assert await client.at_eof()

    @pytest.mark.asyncio
    async def test_tls_client_on_the_starttls_port_gets_a_working_session(
        self,
        proxy: RunningProxy,
        backend: MailboxServer,
        client_context: ssl.SSLContext,
        metrics: Metrics,
    ) -> None:
        def session() -> int:
            client = poplib.POP3_SSL(*proxy.starttls, context=client_context, timeout=5)
            client.user("alice")
            client.pass_("wonderland")
            count, _ = client.stat()
            client.quit()
            return count

        assert await asyncio.to_thread(session) == 3
        mixups = metrics.registry.get_sample_value(
            "poproxy_port_mixups_total", {"listener": "pop3", "kind": "tls_on_starttls_port"}
        )
        assert mixups == 1


class TestCertificates:
    @pytest.mark.asyncio
    @pytest.mark.parametrize(
        ("cipher", "key_class"),
        [
            ("ECDHE-RSA-AES128-GCM-SHA256", rsa.RSAPublicKey),
            ("ECDHE-ECDSA-AES128-GCM-SHA256", ec.EllipticCurvePublicKey),
        ],
    )
    async def test_rsa_and_ecdsa_for_the_same_names_each_serve_their_clients(
        self, tmp_path: Path, backend: MailboxServer, cipher: str, key_class: type
    ) -> None:
        ca = trustme.CA()
        files = []
        for stem, key_type in (("rsa", trustme.KeyType.RSA), ("ecdsa", trustme.KeyType.ECDSA)):
            leaf = ca.issue_cert("localhost", key_type=key_type)
            cert, key = tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            key.write_bytes(leaf.private_key_pem.bytes())
            files.append(config.CertificateFiles(cert, key, f"tls.certificates[{stem}]"))
        settings = dataclasses.replace(
            proxy_config(files[0], [backend.address]),
            tls=config.TlsSettings(certificates=tuple(files)),
        )
        metrics = Metrics()
        proxy = Proxy(settings, tls.CertificateStore(settings.tls, "t", metrics), metrics)
        await proxy.start()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        # TLS 1.2 with one suite: its signature algorithm decides the certificate.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(cipher)
        try:
            with await in_thread(proxy.addresses["pop3s"], context) as sock:
                der = sock.getpeercert(binary_form=True)
            assert der is not None
            assert isinstance(x509.load_der_x509_certificate(der).public_key(), key_class)
        finally:
            await proxy.shutdown(grace=0)

    def test_a_certificate_near_expiry_is_warned_about(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        ca = trustme.CA()
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5)
        leaf = ca.issue_cert("localhost", not_after=soon)
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        settings = config.TlsSettings(
            certificates=(config.CertificateFiles(cert, key, "tls.certificates[0]"),)
        )
        metrics = Metrics()
        tls.CertificateStore(settings, "t", metrics)
        assert "expires" in caplog.text and "in 4 days" in caplog.text
        expiry = metrics.registry.get_sample_value(
            "poproxy_certificate_expiry_timestamp_seconds", {"certificate": str(cert)}
        )
        assert expiry == pytest.approx(soon.replace(microsecond=0).timestamp(), abs=1)
