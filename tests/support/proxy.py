"""Running poproxy in tests: a configuration on loopback port 0 and a handle on it."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trustme

from poproxy import config, tls
from poproxy.metrics import Metrics
from poproxy.server import Proxy

# Fast limits for tests: no failure delay, short grace.
TEST_LIMITS = config.Limits(auth_failure_delay=0.0, shutdown_grace=2.0)


def proxy_config(
    certificate: config.CertificateFiles,
    backend_servers: list[tuple[str, int]],
    metrics_listen: tuple[str, int] | None = None,
    log_user: str = "plain",
    **limits: Any,
) -> config.Config:
    """Two listeners on 127.0.0.1 port 0: `pop3s` (implicit TLS) and `pop3` (STLS)."""
    metrics = config.MetricsSettings(config.Address(*metrics_listen)) if metrics_listen else None
    return config.Config(
        listeners=(
            config.Listener("pop3s", config.Address("127.0.0.1", 0), "implicit"),
            config.Listener("pop3", config.Address("127.0.0.1", 0), "starttls"),
        ),
        tls=config.TlsSettings(certificates=(certificate,)),
        backends=(
            config.Backend(
                "test",
                tuple(config.Address(host, port) for host, port in backend_servers),
                connect_timeout=2.0,
                reply_timeout=5.0,
            ),
        ),
        limits=dataclasses.replace(TEST_LIMITS, **limits),
        log=config.LogSettings(user=log_user),  # type: ignore[arg-type]
        metrics=metrics,
        source="test.yaml",
    )


@dataclass(frozen=True)
class Certificates:
    """A test CA and the server certificate it issued, as files."""

    ca: trustme.CA
    files: config.CertificateFiles
    ca_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@dataclass
class RunningProxy:
    proxy: Proxy

    @property
    def implicit(self) -> tuple[str, int]:
        return self.proxy.addresses["pop3s"]

    @property
    def starttls(self) -> tuple[str, int]:
        return self.proxy.addresses["pop3"]


class StartProxy(Protocol):
    async def __call__(
        self, backend_servers: list[tuple[str, int]], **limits: Any
    ) -> RunningProxy: ...


@asynccontextmanager
async def running_proxy(settings: config.Config) -> AsyncIterator[Proxy]:
    """A proxy for `settings`, with a fresh registry, shut down at the end."""
    metrics = Metrics()
    proxy = Proxy(settings, tls.CertificateStore(settings.tls, settings.source, metrics), metrics)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.shutdown(grace=0)
