"""Backends: servers, their health, connecting to them, replaying the login.

Owns: backend pools and their servers, balancing with failover to the next
server when one cannot be reached, active health checks (connect, +OK
greeting, CAPA, QUIT) and passive ones (a failed connect marks a server down
at once), the capabilities each server announces, the client's address
passed on (PROXY protocol header or XCLIENT), TLS or STLS toward a backend,
the connect and reply timeouts, and the USER/PASS replay whose outcome goes
back to the policy. Must never log a password, never show a backend's free
text to a client (only its response code travels), never retry a rejected
login on another server, and never send anything after a successful login:
from then on the relay owns the connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from poproxy import config, proxy_protocol
from poproxy.channel import Channel
from poproxy.metrics import Metrics
from poproxy.pop3 import CRLF, LineBuffer, LineTooLong, ResponseCode, Status
from poproxy.routing import Balancer, Route, Router

log = logging.getLogger("poproxy.backends")

# RFC 2449 section 4: a response's first line is at most 512 octets; a
# legacy server may be sloppy, so allow more but keep it bounded.
MAX_REPLY_LINE = 4096
MAX_CAPABILITIES = 64  # CAPA lines kept per server
RECHECK_INTERVAL = 5.0  # seconds between probes of failed servers without health_check
MAX_DIRECT_POOLS = 1000  # map-file and auth_http servers remembered

# Extensions a client may rely on after login only if every server has them
# (RFC 2449 section 6). Login methods and STLS are the proxy's business.
PROXY_OWN = frozenset({b"USER", b"SASL", b"STLS", b"IMPLEMENTATION", b"RESP-CODES"})
PROXY_OWN |= {b"AUTH-RESP-CODE", b"UTF8", b"LANG", b"XCLIENT", b"APOP"}

# PROXY protocol v2 LOCAL: "this connection is the proxy's own" (health checks).
PROXY_V2_LOCAL = proxy_protocol.V2_SIGNATURE + b"\x20\x00\x00\x00"


class BackendError(Exception):
    """A backend's settings cannot be used (a CA file that does not load)."""


class BackendUnavailable(Exception):
    """No server of the backend could be reached or would greet us."""


class LoginRejected(Exception):
    """The backend refused the credentials; `code` is its RFC 2449/3206 code."""

    def __init__(self, code: ResponseCode | None) -> None:
        super().__init__(code.value.decode() if code else "no response code")
        self.code = code


class _Unusable(Exception):
    """This server failed before the login was tried; another may do."""


@dataclass(frozen=True)
class ClientInfo:
    """Who the client is, for the PROXY header or XCLIENT toward the backend."""

    source: tuple[str, int]  # the client's address (from its PROXY header, if any)
    destination: tuple[str, int]  # the address it connected to


@dataclass
class ServerState:
    """What the pool knows of one server."""

    address: config.Address
    weight: int
    usable: bool = True  # a configured server counts as usable until it fails
    active: int = 0  # sessions relaying through it now
    good: int = 0  # consecutive good checks
    bad: int = 0  # consecutive bad checks
    capabilities: frozenset[bytes] | None = None  # its CAPA lines, once a check saw them

    @property
    def key(self) -> str:
        return str(self.address)


@dataclass
class BackendConnection:
    """A backend connection whose login succeeded."""

    channel: Channel
    transport: asyncio.Transport
    pool: Pool
    server: config.Address
    reply: bytes  # the backend's +OK to PASS, passed on to the client
    pending: bytes  # bytes the backend sent after that line (normally none)

    @property
    def backend(self) -> str:
        return self.pool.name


@dataclass
class _Exchange:
    """One connection to a server, with its line framing."""

    channel: Channel
    lines: LineBuffer = field(default_factory=lambda: LineBuffer(MAX_REPLY_LINE))


class Pool:
    """The servers of one configured backend."""

    def __init__(
        self, backend: config.Backend, metrics: Metrics, *, source: str = "", index: int = 0
    ) -> None:
        self.backend = backend
        self.name = backend.name
        self.metrics = metrics
        # Map-file and auth_http servers are not configured: no series of their own,
        # or an auth service could grow the metrics without bound.
        self.tracked = bool(source)
        self.servers = {
            address.__str__(): ServerState(address, backend.weight(index))
            for index, address in enumerate(backend.servers)
        }
        self.balancer = Balancer(
            backend.balance, tuple((state.key, state.weight) for state in self.servers.values())
        )
        self.tls_context: ssl.SSLContext | None = None
        if backend.tls != "off":
            # Verification on: a CA file when given, else the system's store.
            cafile = str(backend.ca) if backend.ca else None
            try:
                self.tls_context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise BackendError(
                    f"{source}: backends[{index}].ca: cannot load {backend.ca}: {reason}"
                ) from None
            self.tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._waiters: list[asyncio.Future[None]] = []

    # --- health ------------------------------------------------------------

    @property
    def has_usable_server(self) -> bool:
        return any(state.usable for state in self.servers.values())

    async def wait_until(self, server: str, *, usable: bool) -> None:
        """Return once `server` is (or becomes) usable or not; the caller bounds the wait."""
        while self.servers[server].usable != usable:
            await self.next_verdict()

    async def next_verdict(self) -> None:
        """Return after the next check or login attempt has judged a server."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _mark(self, state: ServerState, *, usable: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if state.usable != usable:
            log.warning(
                "backend %s server %s is %s", self.name, state.key, "up" if usable else "down"
            )
        state.usable = usable
        if self.tracked:
            self.metrics.backend_up.labels(self.name, state.key).set(1 if usable else 0)

    def _failed(self, state: ServerState) -> None:
        # Passive: a server that fails a real login attempt is down at once.
        state.good = 0
        if self.tracked:
            self.metrics.backend_connect_failures.labels(self.name, state.key).inc()
        self._mark(state, usable=False)

    async def run_checks(self) -> None:
        """Check every server for ever: actively when configured, else probe failed ones."""
        check = self.backend.health_check
        while True:
            await asyncio.sleep(check.interval if check else RECHECK_INTERVAL)
            states = [s for s in self.servers.values() if check is not None or not s.usable]
            # All at once: one slow server must not hold up the others.
            await asyncio.gather(*(self._check(state) for state in states))

    async def _check(self, state: ServerState) -> None:
        """Connect, read the +OK greeting, ask CAPA, QUIT (no mailbox is opened)."""
        check = self.backend.health_check
        timeout = check.timeout if check else self.backend.connect_timeout
        exchange: _Exchange | None = None
        try:
            async with asyncio.timeout(timeout):
                exchange = await self._open(state, None, observe=False)
                exchange.channel.write(b"CAPA" + CRLF)
                capabilities = await self._capabilities(exchange)
        except (_Unusable, TimeoutError):
            state.good = 0
            state.bad += 1
            if exchange is not None:
                _abort(exchange.channel)
            if check is None or state.bad >= check.fall:
                self._mark(state, usable=False)
            return
        except BaseException:
            if exchange is not None:
                _abort(exchange.channel)  # cancelled at shutdown
            raise
        _end_authorization(exchange.channel)
        state.bad = 0
        state.good += 1
        state.capabilities = capabilities
        if state.usable or check is None or state.good >= check.rise:
            self._mark(state, usable=True)

    async def _capabilities(self, exchange: _Exchange) -> frozenset[bytes] | None:
        status = await self._status(exchange)
        if not status.ok:
            return frozenset()  # an RFC 1939-only server: no extensions at all
        found: set[bytes] = set()
        while (line := await self._line(exchange)) != b".":
            if len(found) < MAX_CAPABILITIES:
                found.add(line.removeprefix(b".").strip().upper())
        return frozenset(found)

    # --- login -------------------------------------------------------------

    async def login(
        self,
        user: bytes,
        password: bytes,
        client: ClientInfo | None,
        only: config.Address | None = None,
    ) -> BackendConnection:
        """Connect to a server and replay USER/PASS.

        Raises LoginRejected when a server answered the credentials with
        -ERR (never retried elsewhere), and BackendUnavailable when no server
        got that far. `only` restricts the attempt to one server.
        """
        if only is not None:
            states = [self.servers[str(only)]]
        else:
            order = self.balancer.order(
                user, lambda key: self.servers[key].usable, lambda key: self.servers[key].active
            )
            # A session never goes to a server marked down while another is up.
            states = [self.servers[key] for key in order]
            usable = [state for state in states if state.usable]
            states = usable or states
        for state in states:
            try:
                exchange = await self._open(state, client, observe=True)
                connection = await self._login(exchange, state, user, password)
            except _Unusable as exc:
                log.warning("backend %s server %s unusable: %s", self.name, state.key, exc)
                self._failed(state)
                continue
            self._mark(state, usable=True)
            state.active += 1
            return connection
        raise BackendUnavailable(f"no server of backend {self.name} is usable")

    def release(self, server: config.Address) -> None:
        """A session that logged in through `server` has ended."""
        state = self.servers.get(str(server))
        if state is not None and state.active > 0:
            state.active -= 1

    async def _open(
        self, state: ServerState, client: ClientInfo | None, *, observe: bool
    ) -> _Exchange:
        """Connect, announce the client, read the greeting, and start TLS as configured."""
        backend = self.backend
        server = state.address
        server_name = backend.server_name or server.host
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(backend.connect_timeout):
                _, channel = await loop.create_connection(Channel, server.host, server.port)
        except TimeoutError:
            raise _Unusable("connect timeout") from None
        except OSError as exc:
            raise _Unusable(exc.strerror or str(exc)) from None
        if observe:  # logins only, not health checks
            self.metrics.backend_connect_duration.labels(self.name).observe(loop.time() - started)
        exchange = _Exchange(channel)
        try:
            if backend.proxy_protocol != "off":
                # First on the wire, before any TLS: the receiver reads it in the clear.
                channel.write(_proxy_header(backend.proxy_protocol, client))
            if backend.tls == "implicit":
                await self._start_tls(exchange, server_name)
            greeting, greeting_line = await self._status_line(exchange)
            if not greeting.ok:
                raise _Unusable("greeting is not +OK")
            if backend.tls == "starttls":
                await self._starttls(exchange, server_name)
            if client is not None and backend.xclient == "auto" and b"[XCLIENT]" in greeting_line:
                # Dovecot's POP3 XCLIENT: honoured only from its trusted networks,
                # which is what the [XCLIENT] in its greeting says we are.
                host, port = client.source
                exchange.channel.write(b"XCLIENT ADDR=%s PORT=%d" % (host.encode(), port) + CRLF)
                status = await self._status(exchange)
                if not status.ok:
                    log.debug("backend %s server %s refused XCLIENT", self.name, state.key)
        except BaseException:
            _abort(exchange.channel)
            raise
        return exchange

    async def _starttls(self, exchange: _Exchange, server_name: str) -> None:
        exchange.channel.write(b"STLS" + CRLF)
        status = await self._status(exchange)
        if not status.ok:
            raise _Unusable("STLS refused")
        if exchange.lines.pending or exchange.channel.take():
            # Bytes after the +OK, before TLS: a response injection attempt.
            raise _Unusable("data after the STLS answer")
        await self._start_tls(exchange, server_name)

    async def _start_tls(self, exchange: _Exchange, server_name: str) -> None:
        """TLS on the connection as it is, the server's certificate verified."""
        if self.tls_context is None:
            raise _Unusable("no TLS context")
        loop = asyncio.get_running_loop()
        transport = exchange.channel.connected()
        exchange.channel.pause_reading()
        try:
            tls_transport = await loop.start_tls(
                transport, exchange.channel, self.tls_context, server_hostname=server_name
            )
        except (OSError, ssl.SSLError) as exc:
            raise _Unusable(f"TLS with the backend failed: {exc}") from None
        if tls_transport is None:
            raise _Unusable("TLS with the backend failed")
        exchange.channel.switch_transport(tls_transport)

    async def _login(
        self, exchange: _Exchange, state: ServerState, user: bytes, password: bytes
    ) -> BackendConnection:
        try:
            exchange.channel.write(b"USER " + user + CRLF)
            status = await self._status(exchange)
            if status.ok:
                exchange.channel.write(b"PASS " + password + CRLF)
                status, line = await self._status_line(exchange)
        except BaseException:
            _abort(exchange.channel)
            raise
        if not status.ok:
            _end_authorization(exchange.channel)
            raise LoginRejected(status.code)
        return BackendConnection(
            channel=exchange.channel,
            transport=exchange.channel.connected(),
            pool=self,
            server=state.address,
            reply=line + CRLF,
            pending=exchange.lines.take_pending() + exchange.channel.take(),
        )

    async def _status(self, exchange: _Exchange) -> Status:
        status, _ = await self._status_line(exchange)
        return status

    async def _status_line(self, exchange: _Exchange) -> tuple[Status, bytes]:
        line = await self._line(exchange)
        status = Status.parse(line)
        if status is None:
            raise _Unusable("reply is not +OK or -ERR")
        return status, line

    async def _line(self, exchange: _Exchange) -> bytes:
        """Read one line, however it is split across reads."""
        deadline = None
        try:
            while (line := exchange.lines.next_line()) is None:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.backend.reply_timeout
                data = await exchange.channel.read(deadline)
                if not data:
                    raise _Unusable("connection closed")
                exchange.lines.feed(data)
        except TimeoutError:
            raise _Unusable("reply timeout") from None
        except LineTooLong:
            raise _Unusable("reply line too long") from None
        return line


class Backends:
    """Every configured backend, and which one serves a user."""

    def __init__(
        self,
        backends: tuple[config.Backend, ...],
        metrics: Metrics,
        routes: tuple[Route, ...] = (),
        source: str = "<config>",
    ) -> None:
        self.metrics = metrics
        self.pools = {
            backend.name: Pool(backend, metrics, source=source, index=index)
            for index, backend in enumerate(backends)
        }
        self.first = self.pools[backends[0].name]
        self.router = Router(routes, tuple(self.pools))
        for problem in self.router.refresh():  # map files are read now, then when changed
            log.error("routes: %s", problem)
        self._direct: dict[config.Address, Pool] = {}
        self._extensions: tuple[tuple[frozenset[bytes], ...], tuple[bytes, ...] | None] = ((), None)

    def route(self, user: bytes) -> tuple[Pool, config.Address | None, bytes]:
        """The pool for `user`, a single server when a map file names one, and the
        user name to send (after `rewrite_user`)."""
        result = self.router.route(user)
        if result.server is not None:
            server = config.Address(*result.server)
            return self.direct(server), server, result.user
        pool = self.pools[result.backend] if result.backend else self.first
        return pool, None, result.user

    async def refresh_routes(self, interval: float) -> None:
        """Re-read changed map files every `interval`; a bad file keeps the old table."""
        while True:
            await asyncio.sleep(interval)
            for problem in self.router.refresh():
                log.error("routes: %s", problem)

    @property
    def all_usable(self) -> bool:
        """Every backend has at least one server that is not marked down."""
        return all(pool.has_usable_server for pool in self.pools.values())

    def direct(self, server: config.Address) -> Pool:
        """A pool of one server named by a map file or auth_http, with the first
        backend's settings (timeouts, PROXY protocol, TLS)."""
        pool = self._direct.get(server)
        if pool is None:
            template = self.first.backend
            settings = config.Backend(
                name=template.name,
                servers=(server,),
                connect_timeout=template.connect_timeout,
                reply_timeout=template.reply_timeout,
                proxy_protocol=template.proxy_protocol,
                xclient=template.xclient,
                tls=template.tls,
                ca=template.ca,
                server_name=template.server_name,
            )
            if len(self._direct) >= MAX_DIRECT_POOLS:
                self._direct.pop(next(iter(self._direct)))  # the oldest goes
            pool = self._direct[server] = Pool(settings, self.metrics)
        return pool

    def extensions(self) -> tuple[bytes, ...] | None:
        """Capabilities every server that answered a check has, minus the proxy's own.

        None while no server has answered: the policy then uses its
        conservative list.
        """
        known = tuple(
            state.capabilities
            for pool in self.pools.values()
            for state in pool.servers.values()
            if state.capabilities is not None
        )
        if known != self._extensions[0]:  # every session asks; checks rarely change it
            lines = None
            if known:
                common = frozenset.intersection(*known)
                lines = tuple(
                    sorted(line for line in common if line.split(b" ", 1)[0] not in PROXY_OWN)
                )
            self._extensions = known, lines
        return self._extensions[1]

    async def run_checks(self) -> None:
        await asyncio.gather(*(pool.run_checks() for pool in self.pools.values()))


def _proxy_header(version: str, client: ClientInfo | None) -> bytes:
    if client is None:
        # The proxy's own connection (a health check): no client to name.
        return PROXY_V2_LOCAL if version == "v2" else b"PROXY UNKNOWN" + CRLF
    build = proxy_protocol.build_v2 if version == "v2" else proxy_protocol.build_v1
    return build(client.source, client.destination)


def _end_authorization(channel: Channel) -> None:
    # QUIT in AUTHORIZATION state never enters UPDATE (RFC 1939 section 6):
    # it is a polite end to a refused login or a check, and commits nothing.
    channel.write(b"QUIT" + CRLF)
    if channel.transport is not None:
        channel.transport.close()


def _abort(channel: Channel) -> None:
    if channel.transport is not None:
        channel.transport.abort()
