"""Backends: choosing a server, connecting to it, replaying the login.

Owns: backend pools and their servers, round-robin balancing with failover
to the next server when one cannot be reached, the connect and reply
timeouts, and the USER/PASS replay whose outcome goes back to the policy.
Must never log a password, never show a backend's free text to a client
(only its response code travels), and never send anything after a
successful login: from then on the relay owns the connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

from poproxy import config
from poproxy.channel import Channel
from poproxy.metrics import Metrics
from poproxy.pop3 import CRLF, LineBuffer, LineTooLong, ResponseCode, Status

log = logging.getLogger("poproxy.backends")

# RFC 2449 section 4: a response's first line is at most 512 octets; a
# legacy server may be sloppy, so allow more but keep it bounded.
MAX_REPLY_LINE = 4096


class BackendUnavailable(Exception):
    """No server of the backend could be reached or would greet us."""


class LoginRejected(Exception):
    """The backend refused the credentials; `code` is its RFC 2449/3206 code."""

    def __init__(self, code: ResponseCode | None) -> None:
        super().__init__(code.value.decode() if code else "no response code")
        self.code = code


class _Unusable(Exception):
    """This server failed before the login was tried; another may do."""


@dataclass
class BackendConnection:
    """A backend connection whose login succeeded."""

    channel: Channel
    transport: asyncio.Transport
    backend: str  # the configured backend's name
    server: config.Address
    reply: bytes  # the backend's +OK to PASS, passed on to the client
    pending: bytes  # bytes the backend sent after that line (normally none)


class Pool:
    """The servers of one configured backend, tried in round-robin order."""

    def __init__(self, backend: config.Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.name = backend.name
        self.metrics = metrics
        # Whether the last attempt to use each server worked (passive health):
        # a configured server counts as usable until it fails.
        self.usable = dict.fromkeys(backend.servers, True)
        self._next = itertools.cycle(range(len(backend.servers)))

    def servers_in_order(self) -> list[config.Address]:
        """Every server once, starting with the next one in the rotation."""
        start = next(self._next)
        servers = self.backend.servers
        return [*servers[start:], *servers[:start]]

    async def login(self, user: bytes, password: bytes) -> BackendConnection:
        """Connect to a server and replay USER/PASS.

        Raises LoginRejected when a server answered the credentials with
        -ERR, and BackendUnavailable when no server got that far.
        """
        for server in self.servers_in_order():
            try:
                channel = await self._connect(server)
            except _Unusable as exc:
                log.warning("backend %s server %s unusable: %s", self.name, server, exc)
                self._mark(server, usable=False)
                continue
            try:
                connection = await self._login(channel, server, user, password)
            except _Unusable as exc:
                log.warning("backend %s server %s failed during login: %s", self.name, server, exc)
                self._mark(server, usable=False)
                _close(channel)
                continue
            except LoginRejected:
                self._mark(server, usable=True)
                _end_authorization(channel)
                raise
            except BaseException:
                _abort(channel)
                raise
            self._mark(server, usable=True)
            return connection
        raise BackendUnavailable(f"no server of backend {self.name} is usable")

    async def recheck(self) -> None:
        """Probe each server marked unusable: a +OK greeting makes it usable again.

        The probe ends with QUIT in AUTHORIZATION state, which commits
        nothing (RFC 1939 section 6).
        """
        for server in [server for server, usable in self.usable.items() if not usable]:
            try:
                channel = await self._connect(server)
            except _Unusable:
                continue
            try:
                greeting = await self._status(channel, LineBuffer(MAX_REPLY_LINE))
            except _Unusable:
                _close(channel)
                continue
            _end_authorization(channel)
            if greeting.ok:
                log.info("backend %s server %s is usable again", self.name, server)
                self._mark(server, usable=True)

    @property
    def has_usable_server(self) -> bool:
        return any(self.usable.values())

    def _mark(self, server: config.Address, *, usable: bool) -> None:
        self.usable[server] = usable
        self.metrics.backend_up.labels(self.name, str(server)).set(1 if usable else 0)
        if not usable:
            self.metrics.backend_connect_failures.labels(self.name, str(server)).inc()

    async def _connect(self, server: config.Address) -> Channel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.backend.connect_timeout):
                _, channel = await loop.create_connection(Channel, server.host, server.port)
        except TimeoutError:
            raise _Unusable("connect timeout") from None
        except OSError as exc:
            raise _Unusable(exc.strerror or str(exc)) from None
        self.metrics.backend_connect_duration.labels(self.name).observe(loop.time() - started)
        return channel

    async def _login(
        self, channel: Channel, server: config.Address, user: bytes, password: bytes
    ) -> BackendConnection:
        lines = LineBuffer(MAX_REPLY_LINE)
        greeting = await self._status(channel, lines)
        if not greeting.ok:
            raise _Unusable("greeting is not +OK")
        channel.write(b"USER " + user + CRLF)
        status = await self._status(channel, lines)
        if not status.ok:
            raise LoginRejected(status.code)
        channel.write(b"PASS " + password + CRLF)
        status, line = await self._status_line(channel, lines)
        if not status.ok:
            raise LoginRejected(status.code)
        return BackendConnection(
            channel=channel,
            transport=channel.connected(),
            backend=self.name,
            server=server,
            reply=line + CRLF,
            pending=lines.take_pending() + channel.take(),
        )

    async def _status(self, channel: Channel, lines: LineBuffer) -> Status:
        status, _ = await self._status_line(channel, lines)
        return status

    async def _status_line(self, channel: Channel, lines: LineBuffer) -> tuple[Status, bytes]:
        """Read one status line, however it is split across reads."""
        try:
            async with asyncio.timeout(self.backend.reply_timeout):
                while True:
                    line = lines.next_line()
                    if line is not None:
                        break
                    data = await channel.read()
                    if not data:
                        raise _Unusable("connection closed")
                    lines.feed(data)
        except TimeoutError:
            raise _Unusable("reply timeout") from None
        except LineTooLong:
            raise _Unusable("reply line too long") from None
        status = Status.parse(line)
        if status is None:
            raise _Unusable("reply is not +OK or -ERR")
        return status, line


class Backends:
    """Every configured backend, and which one serves a user."""

    def __init__(self, backends: tuple[config.Backend, ...], metrics: Metrics) -> None:
        self.pools = {backend.name: Pool(backend, metrics) for backend in backends}
        self._default = self.pools[backends[0].name]

    @property
    def all_usable(self) -> bool:
        """Every backend has at least one server that worked last time (or is untried)."""
        return all(pool.has_usable_server for pool in self.pools.values())

    def route(self, user: bytes) -> Pool:
        # Until per-user routes exist every user goes to the first backend.
        return self._default


def _end_authorization(channel: Channel) -> None:
    # QUIT in AUTHORIZATION state never enters UPDATE (RFC 1939 section 6):
    # it is a polite end to a refused login and commits nothing.
    channel.write(b"QUIT" + CRLF)
    _close(channel)


def _close(channel: Channel) -> None:
    if channel.transport is not None:
        channel.transport.close()


def _abort(channel: Channel) -> None:
    if channel.transport is not None:
        channel.transport.abort()
