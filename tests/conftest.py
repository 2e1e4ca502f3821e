"""Shared fixtures: uvloop for every test, certificates made per test, a running proxy.

Network fixtures bind 127.0.0.1 port 0 and stop through the proxy's own
shutdown; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trustme
import uvloop
from support.fake_backend import running_backend
from support.proxy import Certificates, RunningProxy, StartProxy, proxy_config

from poproxy import config, tls
from poproxy.demo import MailboxServer
from poproxy.metrics import Metrics
from poproxy.server import Proxy


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # The proxy runs on uvloop in production; so do the tests.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    """A fresh CA and a server certificate for 127.0.0.1, ::1 and localhost."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "::1", "localhost")
    cert, key, ca_file = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.crt"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    files = config.CertificateFiles(cert=cert, key=key, key_path="tls.certificates[0]")
    return Certificates(ca=ca, files=files, ca_file=ca_file)


@pytest.fixture
def client_context(certificates: Certificates) -> ssl.SSLContext:
    return certificates.client_context()


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[MailboxServer]:
    async with running_backend() as server:
        yield server


@pytest.fixture
def metrics() -> Metrics:
    """A fresh registry per test (STYLE rule 12)."""
    return Metrics()


@pytest_asyncio.fixture
async def start_proxy(certificates: Certificates, metrics: Metrics) -> AsyncIterator[StartProxy]:
    """Start proxies in front of given backend addresses; all are shut down at the end."""
    started: list[Proxy] = []

    async def start(backend_servers: list[tuple[str, int]], **limits: Any) -> RunningProxy:
        settings = proxy_config(certificates.files, backend_servers, **limits)
        store = tls.CertificateStore(settings.tls, settings.source, metrics)
        proxy = Proxy(settings, store, metrics)
        await proxy.start()
        started.append(proxy)
        return RunningProxy(proxy)

    yield start
    for proxy in started:
        async with asyncio.timeout(10):
            await proxy.shutdown(grace=0)


@pytest_asyncio.fixture
async def proxy(start_proxy: StartProxy, backend: MailboxServer) -> RunningProxy:
    """A proxy in front of the in-memory backend."""
    return await start_proxy([backend.address])
