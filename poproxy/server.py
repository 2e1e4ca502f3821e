"""The process's lifecycle: listeners, live sessions, one ordered shutdown.

Owns: binding every configured listener, accepting connections and starting
a `Session` for each, tracking the sessions, and the shutdown sequence with
its single grace period. Must never send a QUIT to a backend for a client,
not even at shutdown: sessions still relaying when the grace period ends
are cut.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
from dataclasses import dataclass, field

from poproxy import config, tls
from poproxy.admin import AdminServer
from poproxy.backends import Backends
from poproxy.metrics import Metrics
from poproxy.session import Session, SessionContext

log = logging.getLogger("poproxy.server")

BACKLOG = 1024
ACCEPTS_PER_WAKEUP = 64  # accept in bursts, but let sessions run in between
ACCEPT_PAUSE = 0.5  # seconds without accepting when out of file descriptors
BACKEND_RECHECK_INTERVAL = 5.0  # seconds between probes of backend servers that failed
ABORT_TIMEOUT = 5.0  # seconds for aborted sessions to finish after the grace period


class ListenError(Exception):
    """A listener cannot be bound; the message names the config key."""


@dataclass
class _Listening:
    context: SessionContext
    sock: socket.socket


@dataclass
class Proxy:
    """Every listener of one configuration, and the sessions they accepted.

    Connections are accepted as raw sockets and handed to the session, which
    wraps them in a transport itself: on an implicit-TLS listener the TLS
    layer must see the ClientHello, which a plain transport would already
    have read.
    """

    config: config.Config
    tls_context: ssl.SSLContext
    metrics: Metrics
    backends: Backends = field(init=False)
    admin: AdminServer = field(init=False)
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    sessions: dict[asyncio.Task[None], Session] = field(default_factory=dict)
    stopping: bool = False
    _listening: list[_Listening] = field(default_factory=list)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _recheck: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.backends = Backends(self.config.backends, self.metrics)
        self.admin = AdminServer(self.metrics, self.ready)
        self.metrics.configure(self.config)
        self.metrics.ready.set_function(lambda: 1 if self.ready() else 0)
        for files in self.config.tls.certificates:
            info = tls.inspect_certificate(files, self.config.source)
            self.metrics.certificate_expiry.labels(str(files.cert)).set(info.not_after.timestamp())
        self._idle.set()

    async def idle(self) -> None:
        """Wait until no session is running."""
        await self._idle.wait()

    def ready(self) -> bool:
        """Every listener bound, every backend has a usable server, not stopping."""
        bound = len(self._listening) == len(self.config.listeners)
        return bound and not self.stopping and self.backends.all_usable

    async def start(self) -> None:
        """Bind every listener; on a failure close what was bound and raise ListenError."""
        for index, listener in enumerate(self.config.listeners):
            try:
                sock = await _bind(listener.listen)
            except OSError as exc:
                self._close_listeners()
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(
                    f"{self.config.source}: listeners[{index}].listen: cannot listen on"
                    f" {listener.listen}: {reason}"
                ) from None
            context = SessionContext(
                listener=listener,
                limits=self.config.limits,
                log=self.config.log,
                tls_context=self.tls_context,
                backends=self.backends,
                metrics=self.metrics,
            )
            self._listening.append(_Listening(context, sock))
            self.addresses[listener.name] = sock.getsockname()[:2]
        if self.config.metrics is not None:
            try:
                await self.admin.start(self.config.metrics.listen)
            except OSError as exc:
                self._close_listeners()
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(
                    f"{self.config.source}: metrics.listen: cannot listen on"
                    f" {self.config.metrics.listen}: {reason}"
                ) from None
        loop = asyncio.get_running_loop()
        self._recheck = loop.create_task(self._recheck_backends())
        for listening in self._listening:
            loop.add_reader(listening.sock.fileno(), self._accept, listening)
            listener = listening.context.listener
            host, port = self.addresses[listener.name]
            log.info(
                "listening on %s (%s, tls=%s)",
                config.Address(host, port),
                listener.name,
                listener.tls,
            )

    def _accept(self, listening: _Listening) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, address = listening.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of resources: stop accepting for a moment instead of
                    # spinning; the kernel queues new clients meanwhile.
                    log.error("cannot accept connections: %s", exc.strerror)
                    self._pause_accepting(listening)
                    return
                continue  # the client gave up before accept (ECONNABORTED and such)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start_session(listening.context, sock, _peer(address))

    def _pause_accepting(self, listening: _Listening) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listening.sock.fileno())
        loop.call_later(
            ACCEPT_PAUSE, lambda: loop.add_reader(listening.sock.fileno(), self._accept, listening)
        )

    async def _recheck_backends(self) -> None:
        while True:
            await asyncio.sleep(BACKEND_RECHECK_INTERVAL)
            for pool in self.backends.pools.values():
                await pool.recheck()

    def _start_session(self, context: SessionContext, sock: socket.socket, peer: str) -> None:
        session = Session(context, sock, peer)
        task = asyncio.get_running_loop().create_task(session.run())
        self.sessions[task] = session
        self._idle.clear()
        task.add_done_callback(self._session_done)

    def _session_done(self, task: asyncio.Task[None]) -> None:
        self.sessions.pop(task, None)
        if not self.sessions:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("session failed", exc_info=task.exception())

    async def shutdown(self, grace: float | None = None) -> None:
        """The ordered shutdown (DESIGN.md, Decisions: Shutdown)."""
        grace = self.config.limits.shutdown_grace if grace is None else grace
        # 1. Report not ready (load balancers stop sending) and stop accepting:
        #    from now on new clients are refused by the kernel.
        self.stopping = True
        self._close_listeners()
        if self._recheck is not None:
            self._recheck.cancel()
        # 2. Sessions not logged in get -ERR [SYS/TEMP] and are closed now;
        #    nothing of theirs has reached a backend, so nothing is lost.
        for session in list(self.sessions.values()):
            session.shutdown()
        # 3. Sessions in TRANSACTION may finish (the client's QUIT commits its
        #    DELEs) until the grace period ends.
        if self.sessions:
            log.info("waiting up to %.0fs for %d sessions", grace, len(self.sessions))
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        # 4. Grace over: cut both sides of what is left, sending nothing; a
        #    backend that sees no QUIT commits nothing (RFC 1939 section 6).
        for session in list(self.sessions.values()):
            session.abort()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=ABORT_TIMEOUT)
        # 5. Last, the operators' endpoint: it answered "not ready" until now.
        self.admin.close()

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for listening in self._listening:
            if listening.sock.fileno() >= 0:
                loop.remove_reader(listening.sock.fileno())
                listening.sock.close()


async def _bind(address: config.Address) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    # An IPv6 listener is IPv6 only, so "0.0.0.0:995" and "[::]:995" can both be bound.
    sock = socket.create_server(sockaddr, family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


def _peer(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(proxy: Proxy, stop: asyncio.Event) -> None:
    """Run until `stop` is set, then shut down in order."""
    await proxy.start()
    await stop.wait()
    log.info("shutting down")
    await proxy.shutdown()
