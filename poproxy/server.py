"""The process's lifecycle: listeners, live sessions, reload, one ordered shutdown.

Owns: binding every configured listener, the connection caps at accept, a
`Session` per accepted connection, reloading the configuration on SIGHUP
without touching sessions in flight, dropping root after binding, and the
shutdown sequence with its single grace period. The same `Proxy` runs alone or
as one worker of `workers.py`'s supervisor, on the sockets it was handed. Must
never send a QUIT to a backend for a client, not even at shutdown: sessions
still relaying when the grace period ends are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from poproxy import policy, tls
from poproxy.admin import AdminServer
from poproxy.auth_http import AuthHttpClient
from poproxy.backends import BackendError, Backends
from poproxy.config import Address, Config, ConfigError, Listener
from poproxy.config import load as load_config
from poproxy.limits import AuthPenalty, ConnectionCounter, Networks, address_key
from poproxy.metrics import Metrics
from poproxy.session import Session, SessionContext

log = logging.getLogger("poproxy.server")

BACKLOG = 1024
ACCEPTS_PER_WAKEUP = 64  # accept in bursts, but let sessions run in between
ACCEPT_PAUSE = 0.5  # seconds without accepting when out of file descriptors
ROUTES_REFRESH_INTERVAL = 5.0  # seconds between looks at map files for changes
ABORT_TIMEOUT = 5.0  # seconds for aborted sessions to finish after the grace period


class ListenError(Exception):
    """A listener cannot be bound; the message names the config key."""


class PrivilegeError(Exception):
    """Root could not be dropped as configured; the message says why."""


@dataclass
class _Listening:
    context: SessionContext
    sock: socket.socket

    @property
    def listener(self) -> Listener:
        return self.context.listener


@dataclass
class Proxy:
    """Every listener of one configuration, and the sessions they accepted.

    Connections are accepted as raw sockets and handed to the session, which
    wraps them in a transport itself: on an implicit-TLS listener the TLS
    layer must see the ClientHello, which a plain transport would already
    have read.

    As worker `worker` of a supervisor (workers.py), it takes its listening
    sockets from `inherited` (keyed by `listener_identity`), binds any
    other with SO_REUSEPORT beside the other workers, and serves no admin
    endpoint: the supervisor does, for every worker.
    """

    config: Config
    certificates: tls.CertificateStore
    metrics: Metrics
    worker: int | None = None
    inherited: dict[tuple[str, Address, str], socket.socket] = field(default_factory=dict)
    backends: Backends = field(init=False)
    admin: AdminServer = field(init=False)
    connections: ConnectionCounter = field(init=False)
    penalty: AuthPenalty = field(init=False)
    trusted: Networks = field(init=False)
    auth_http: AuthHttpClient | None = field(init=False)
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    sessions: dict[asyncio.Task[None], Session] = field(default_factory=dict)
    stopping: bool = False
    _listening: list[_Listening] = field(default_factory=list)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _backend_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _watch: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.backends = Backends(
            self.config.backends, self.metrics, self.config.routes, self.config.source
        )
        settings = self.config.auth_http
        self.auth_http = AuthHttpClient(settings) if settings else None
        self.admin = AdminServer(self.metrics.registry, self.ready)
        self.connections = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)
        self.trusted = Networks(limits.trusted_networks)
        self.penalty = AuthPenalty(limits.auth_failure_delay, limits.auth_penalty_max, self.trusted)
        self.metrics.configure(self.config)
        if self.worker is None:
            # A worker's values are read from files, where a function cannot
            # go: it sets the gauge itself (workers.py).
            self.metrics.ready.set_function(lambda: 1 if self.ready() else 0)
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
        self._listening = await self._bind_all(self.config, self.config.listeners)
        for sock in self.inherited.values():
            sock.close()  # a listener this configuration does not have
        self.inherited.clear()
        if self.config.metrics is not None and self.worker is None:
            try:
                await self.admin.start(self.config.metrics.listen)
            except OSError as exc:
                self._close(self._listening)
                raise ListenError(
                    f"{self.config.source}: metrics.listen: cannot listen on"
                    f" {self.config.metrics.listen}: {_reason(exc)}"
                ) from None
        self._start_backend_tasks()
        self._watch_certificates()
        for listening in self._listening:
            self._open(listening)

    def _start_backend_tasks(self) -> None:
        """Health checks and map-file reloads of the current backends."""
        for task in self._backend_tasks:
            task.cancel()
        loop = asyncio.get_running_loop()
        self._backend_tasks = [
            loop.create_task(self.backends.run_checks()),
            loop.create_task(self.backends.refresh_routes(ROUTES_REFRESH_INTERVAL)),
        ]

    def _context(self, listener: Listener) -> SessionContext:
        return SessionContext(
            listener=listener,
            limits=self.config.limits,
            log=self.config.log,
            certificates=self.certificates,
            backends=self.backends,
            metrics=self.metrics,
            penalty=self.penalty,
            proxy_trusted=Networks(
                listener.proxy_protocol.trusted if listener.proxy_protocol else ()
            ),
            rekey=self._rekey,
            auth_http=self.auth_http,
        )

    async def _bind_all(
        self, settings: Config, listeners: tuple[Listener, ...]
    ) -> list[_Listening]:
        """Bind `listeners` (all or none: on a failure, close what was bound)."""
        bound: list[_Listening] = []
        for listener in listeners:
            sock = self.inherited.pop(listener_identity(listener), None)
            try:
                if sock is None:
                    sock = await _bind(listener.listen, reuse_port=self.worker is not None)
                else:
                    sock.setblocking(False)
            except OSError as exc:
                self._close(bound)
                index = settings.listeners.index(listener)
                raise ListenError(
                    f"{settings.source}: listeners[{index}].listen: cannot listen on"
                    f" {listener.listen}: {_reason(exc)}"
                ) from None
            bound.append(_Listening(self._context(listener), sock))
        return bound

    def _open(self, listening: _Listening) -> None:
        """Start accepting on a bound listener."""
        loop = asyncio.get_running_loop()
        loop.add_reader(listening.sock.fileno(), self._accept, listening)
        listener = listening.listener
        host, port = listening.sock.getsockname()[:2]
        self.addresses[listener.name] = (host, port)
        log.info("listening on %s (%s, tls=%s)", Address(host, port), listener.name, listener.tls)

    def _watch_certificates(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.config.tls.reload_interval > 0:
            watch = self.certificates.watch(self.config.tls.reload_interval)
            self._watch = asyncio.get_running_loop().create_task(watch)

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
            key = address_key(address[0])
            refused = self.connections.admit(key, exempt=address[0] in self.trusted)
            if refused is not None:
                self._refuse(listening, sock, refused)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start_session(listening.context, sock, (address[0], address[1]), key)

    def _refuse(self, listening: _Listening, sock: socket.socket, cap: str) -> None:
        """Over a cap: a plaintext port hears why; a TLS port just closes (before TLS)."""
        self.metrics.connections_refused.labels(listening.listener.name, cap).inc()
        with contextlib.suppress(OSError):
            if listening.listener.tls == "starttls":
                sock.send(policy.TOO_MANY_CONNECTIONS)
        sock.close()

    def _pause_accepting(self, listening: _Listening) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listening.sock.fileno())

        def resume() -> None:
            if listening.sock.fileno() >= 0:
                loop.add_reader(listening.sock.fileno(), self._accept, listening)

        loop.call_later(ACCEPT_PAUSE, resume)

    def _start_session(
        self, context: SessionContext, sock: socket.socket, client: tuple[str, int], key: str
    ) -> None:
        session = Session(context, sock, client, key)
        task = asyncio.get_running_loop().create_task(session.run())
        self.sessions[task] = session
        self._idle.clear()
        task.add_done_callback(self._session_done)

    def _rekey(self, session: Session) -> bool:
        """A PROXY header named the real client: count the session under it instead."""
        key = address_key(session.client[0])
        self.connections.release(session.connection_key)
        refused = self.connections.admit(key, exempt=session.client[0] in self.trusted)
        if refused is not None:
            # Still counted under the old key until the session ends.
            self.connections.admit(session.connection_key, exempt=True)
            self.metrics.connections_refused.labels(session.context.listener.name, refused).inc()
            return False
        session.connection_key = key
        return True

    def _session_done(self, task: asyncio.Task[None]) -> None:
        session = self.sessions.pop(task, None)
        if session is not None:
            self.connections.release(session.connection_key)
        if not self.sessions:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("session failed", exc_info=task.exception())

    async def reload(self, settings: Config) -> None:
        """Serve new sessions with `settings`; sessions in flight keep what they had.

        Everything new is built before anything is swapped: certificates that
        do not load or a listener that cannot be bound leave the running
        configuration in service (the caller logs why).
        """
        certificates = tls.CertificateStore(
            settings.tls, settings.source, self.metrics, self.certificates.ticket_keys
        )
        backends = Backends(settings.backends, self.metrics, settings.routes, settings.source)
        current = {listener_identity(item.listener): item for item in self._listening}
        wanted = {listener_identity(listener): listener for listener in settings.listeners}
        added = await self._bind_all(
            settings, tuple(listener for key, listener in wanted.items() if key not in current)
        )
        # From here on nothing can fail: swap.
        limits = settings.limits
        self.config = settings
        self.certificates = certificates
        self.backends = backends
        self.auth_http = AuthHttpClient(settings.auth_http) if settings.auth_http else None
        self.connections.max_total = limits.max_connections
        self.connections.max_per_address = limits.max_connections_per_ip
        self.trusted = Networks(limits.trusted_networks)
        self.penalty.reconfigure(limits.auth_failure_delay, limits.auth_penalty_max, self.trusted)
        self.metrics.configure(settings)
        removed = [listening for key, listening in current.items() if key not in wanted]
        for listening in removed:
            log.info("closing listener %s", listening.listener.name)
            self.addresses.pop(listening.listener.name, None)
        self._close(removed)
        kept = [listening for key, listening in current.items() if key in wanted]
        for listening in kept:
            listening.context = self._context(wanted[listener_identity(listening.listener)])
        for listening in added:
            listening.context = self._context(listening.listener)
            self._open(listening)
        self._listening = kept + added
        self._watch_certificates()
        self._start_backend_tasks()
        log.info("configuration reloaded from %s", settings.source)

    async def shutdown(self, grace: float | None = None) -> None:
        """The ordered shutdown (DESIGN.md, Decisions: Shutdown)."""
        grace = self.config.limits.shutdown_grace if grace is None else grace
        # 1. Report not ready (load balancers stop sending) and stop accepting:
        #    from now on new clients are refused by the kernel.
        self.stopping = True
        self._close(self._listening)
        for task in [*self._tasks, *self._backend_tasks, *([self._watch] if self._watch else [])]:
            task.cancel()
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

    def _close(self, listenings: list[_Listening]) -> None:
        loop = asyncio.get_running_loop()
        for listening in listenings:
            if listening.sock.fileno() >= 0:
                loop.remove_reader(listening.sock.fileno())
                listening.sock.close()


def listener_identity(listener: Listener) -> tuple[str, Address, str]:
    """A listener whose name, address and mode stay the same keeps its socket."""
    return (listener.name, listener.listen, listener.tls)


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def _bind(address: Address, *, reuse_port: bool = False) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    # An IPv6 listener is IPv6 only, so "0.0.0.0:995" and "[::]:995" can both be bound.
    sock = socket.create_server(sockaddr, family=family, backlog=BACKLOG, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


async def bind_workers(settings: Config, listener: Listener, count: int) -> list[socket.socket]:
    """`count` sockets on one listener's address with SO_REUSEPORT, one per worker.

    The kernel spreads new connections over them. With port 0 the first
    socket's port is taken for the others, so that all share one.
    """
    bound: list[socket.socket] = []
    address = listener.listen
    try:
        for _ in range(count):
            bound.append(await _bind(address, reuse_port=True))
            address = Address(address.host, bound[0].getsockname()[1])
    except OSError as exc:
        for sock in bound:
            sock.close()
        index = settings.listeners.index(listener)
        raise ListenError(
            f"{settings.source}: listeners[{index}].listen: cannot listen on"
            f" {listener.listen}: {_reason(exc)}"
        ) from None
    return bound


def check_privileges(settings: Config) -> tuple[int, int] | None:
    """The uid and gid to become after binding, or None to stay as we are.

    Raises PrivilegeError when started as root without a `user` (root stays
    only when asked for by name: `user: root`) or when the user or group
    does not exist. Changes nothing: safe for `check-config`.
    """
    if os.geteuid() != 0:
        return None
    if settings.user is None:
        raise PrivilegeError(
            f"{settings.source}: user: started as root, so a user to run as is required"
            " (user: root keeps root, which is not recommended)"
        )
    if settings.user == "root":
        return None
    try:
        account = pwd.getpwnam(settings.user)
    except KeyError:
        raise PrivilegeError(f"{settings.source}: user: no such user {settings.user!r}") from None
    try:
        gid = grp.getgrnam(settings.group).gr_gid if settings.group else account.pw_gid
    except KeyError:
        raise PrivilegeError(
            f"{settings.source}: group: no such group {settings.group!r}"
        ) from None
    return account.pw_uid, gid


def drop_privileges(settings: Config) -> None:
    """After binding: become `user`/`group` (see check_privileges)."""
    target = check_privileges(settings)
    if target is None:
        if os.geteuid() == 0:
            log.warning("running as root, as configured (user: root)")
        return
    uid, gid = target
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    log.info("dropped root: running as %s (uid %d, gid %d)", settings.user, uid, gid)


async def serve(
    proxy: Proxy,
    stop: asyncio.Event,
    path: Path | None = None,
    report: Callable[[str], None] | None = None,
) -> None:
    """Run until `stop` is set, then shut down in order; SIGHUP reloads `path`.

    `report` hears the sd_notify(3) states (READY=1, RELOADING=1, STOPPING=1):
    `notify` tells systemd; a worker tells its supervisor instead.
    """
    report = notify if report is None else report
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    reloading: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        await started.wait()  # a SIGHUP during start-up applies once it is done
        if proxy.stopping:
            return
        report(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if path is None:
                proxy.certificates.reload()
            else:
                settings = load_config(path)
                if proxy.worker is None and settings.workers != proxy.config.workers:
                    log.warning("workers: changed in %s; a restart applies it", path)
                await proxy.reload(settings)
        except (ConfigError, tls.CertificateError, BackendError, ListenError) as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
        finally:
            report("READY=1")

    def on_sighup() -> None:
        task = loop.create_task(reload())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    # Before anything is bound: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await proxy.start()
    drop_privileges(proxy.config)
    started.set()
    report("READY=1\nSTATUS=serving")
    await stop.wait()
    log.info("shutting down")
    report("STOPPING=1")
    await proxy.shutdown()


def notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are: sd_notify(3), without libsystemd.

    A datagram to $NOTIFY_SOCKET; nothing happens without one.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc.strerror or exc)
