"""One client connection, from accept to close, on asyncio.

Owns: feeding client bytes to the policy and performing its actions, the
TLS handshake (at once on implicit listeners, after STLS on starttls ones),
the login timeout, the failed-login delay, the backend login, and handing
both connections to the relay. Must never let a byte received before TLS be
read after it (the STLS switch below has no await between discarding and
starting TLS), never log a credential, and never send a client an
exception's text.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, MutableMapping
from dataclasses import dataclass
from typing import Any, NoReturn

from poproxy import config, policy, tls
from poproxy.backends import BackendConnection, Backends, BackendUnavailable, LoginRejected
from poproxy.channel import Channel
from poproxy.logs import FIELDS, Value, event, show_user
from poproxy.metrics import (
    REFUSED_COMMANDS,
    CloseReason,
    Direction,
    HandshakeResult,
    LoginResult,
    Metrics,
)
from poproxy.policy import (
    ClientPolicy,
    Close,
    Login,
    Phase,
    PolicySettings,
    Refusal,
    Reply,
    StartTls,
)
from poproxy.pop3 import LineBuffer, LineTooLong, ResponseCode
from poproxy.relay import Relay, RelayEnd

log = logging.getLogger("poproxy.session")
auth_log = logging.getLogger("poproxy.auth")

_session_ids = itertools.count(1)

_CLOSE_REASONS = {
    policy.CloseReason.QUIT: CloseReason.QUIT,
    policy.CloseReason.PROTOCOL_ERROR: CloseReason.PROTOCOL_ERROR,
    policy.CloseReason.LINE_TOO_LONG: CloseReason.PROTOCOL_ERROR,
    policy.CloseReason.AUTH_FAILURES: CloseReason.AUTH_FAILURES,
    policy.CloseReason.TIMEOUT: CloseReason.TIMEOUT,
    policy.CloseReason.SHUTDOWN: CloseReason.SHUTDOWN,
}

_RELAY_ENDS = {
    RelayEnd.CLIENT_CLOSED: CloseReason.CLIENT_CLOSED,
    RelayEnd.CLIENT_RESET: CloseReason.CLIENT_RESET,
    RelayEnd.BACKEND_CLOSED: CloseReason.BACKEND_CLOSED,
    RelayEnd.IDLE_TIMEOUT: CloseReason.TIMEOUT,
    RelayEnd.ABORTED: CloseReason.SHUTDOWN,
}

_LOGIN_RESULTS = {
    None: LoginResult.AUTH_FAILED,
    ResponseCode.AUTH: LoginResult.AUTH_FAILED,
    ResponseCode.IN_USE: LoginResult.IN_USE,
    ResponseCode.LOGIN_DELAY: LoginResult.LOGIN_DELAY,
    ResponseCode.SYS_TEMP: LoginResult.TEMP_FAIL,
    ResponseCode.SYS_PERM: LoginResult.PERM_FAIL,
}


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Adds the session id to every line, so one session's lines can be joined."""

    def __init__(self, logger: logging.Logger, session_id: str) -> None:
        super().__init__(logger, {FIELDS: {"session": session_id}})

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, Any]:
        kwargs["extra"] = self.extra
        return msg, kwargs


class _Ended(Exception):
    """The session is over before login; `reason` says why."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass(frozen=True)
class SessionContext:
    """What every session of one listener shares."""

    listener: config.Listener
    limits: config.Limits
    log: config.LogSettings
    tls_context: ssl.SSLContext
    backends: Backends
    metrics: Metrics


class Session:
    """Runs one client connection; `run()` returns when both sides are closed."""

    def __init__(self, context: SessionContext, sock: socket.socket, peer: str) -> None:
        self.context = context
        self.limits = context.limits
        self.metrics = context.metrics
        self.sock = sock
        self.peer = peer
        self.channel = Channel()
        self.id = f"{next(_session_ids):x}"
        self.policy = ClientPolicy(
            tls_active=False,
            settings=PolicySettings(
                max_errors=self.limits.max_errors,
                max_auth_failures=self.limits.max_auth_failures,
            ),
        )
        self.lines = LineBuffer(self.limits.max_line)
        self.relay: Relay | None = None
        self.handshaking = False
        self.started = time.monotonic()
        self.log = SessionLog(log, self.id)
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False
        self._user: bytes | None = None
        self._backend: BackendConnection | None = None
        self._tls: dict[str, Value] = {"tls_version": None, "tls_cipher": None, "sni": None}
        self._relayed = (0, 0)

    @property
    def in_transaction(self) -> bool:
        return self.relay is not None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        listener = self.context.listener.name
        self.metrics.connections.labels(listener).inc()
        active = self.metrics.connections_active.labels(listener)
        active.inc()
        reason = CloseReason.CLIENT_CLOSED
        try:
            if self._shutting_down:
                self.sock.close()
                reason = CloseReason.SHUTDOWN
                return
            backend = await self._authorization_phase()
            reason = await self._transaction_phase(backend)
        except _Ended as ended:
            reason = ended.reason
            self._close_client()
        except BaseException:
            # Cancelled (or a bug): cut both sides, sending nothing.
            reason = CloseReason.SHUTDOWN if self._shutting_down else CloseReason.CLIENT_RESET
            self.abort()
            raise
        finally:
            active.dec()
            self._end(reason)

    # --- shutdown (called by the server) ---------------------------------

    def shutdown(self) -> None:
        """Server shutdown starts: sessions not logged in end now.

        Sessions in TRANSACTION state go on until `abort()` at the end of the
        grace period (DESIGN.md, Decisions: Shutdown).
        """
        if self.in_transaction or self.policy.phase is Phase.CLOSED:
            return
        self._shutting_down = True
        if self.handshaking and self._task is not None:
            # Mid-handshake there is no way to send a reply: stop the task,
            # which closes the connection.
            self._task.cancel()
            return
        if self.channel.transport is None:
            return  # not started yet: run() sees the flag and closes the socket
        close = self.policy.shutting_down()
        self.channel.write(close.reply)
        self._close_client()

    def abort(self) -> None:
        """The grace period is over: cut both sides, sending nothing."""
        if self.relay is not None:
            self.relay.abort()
        else:
            self._abort_client()

    # --- AUTHORIZATION ------------------------------------------------------

    async def _authorization_phase(self) -> BackendConnection:
        """Everything before login, bounded as a whole by the login timeout."""
        try:
            async with asyncio.timeout(self.limits.login_timeout):
                await self._connect()
                self.channel.write(self.policy.greeting())
                return await self._commands()
        except TimeoutError:
            if not self.handshaking and not self.channel.closed:
                self.channel.write(self.policy.timed_out().reply)
            raise _Ended(CloseReason.TIMEOUT) from None

    async def _connect(self) -> None:
        """Wrap the accepted socket in a transport; on implicit TLS, do the handshake."""
        loop = asyncio.get_running_loop()
        channel = self.channel
        if self.context.listener.tls == "starttls":
            await loop.connect_accepted_socket(lambda: channel, self.sock)
        else:
            # The protocol is our `channel`, whatever the pair returned says
            # (uvloop returns its internal TLS protocol there).
            await self._handshake(
                loop.connect_accepted_socket(
                    lambda: channel,
                    self.sock,
                    ssl=self.context.tls_context,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                )
            )
        if self._shutting_down:
            # Shutdown began while the connection was being set up.
            self._perform_close(self.policy.shutting_down())

    async def _handshake(self, handshake: Awaitable[object]) -> None:
        """Run a TLS handshake, count it, and note what it negotiated."""
        listener = self.context.listener.name
        started = time.monotonic()
        self.handshaking = True
        try:
            await handshake
        except (OSError, EOFError) as exc:
            timed_out = "taking longer than" in str(exc)  # asyncio's and uvloop's wording
            result = HandshakeResult.TIMEOUT if timed_out else HandshakeResult.FAILURE
            self.metrics.tls_handshakes.labels(listener, result.value).inc()
            # Scanners fail handshakes all day: debug level, no traceback.
            self.log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            raise _Ended(CloseReason.TLS_ERROR) from None
        finally:
            self.handshaking = False
            self.metrics.tls_handshake_duration.labels(listener).observe(time.monotonic() - started)
        self.metrics.tls_handshakes.labels(listener, HandshakeResult.SUCCESS.value).inc()
        transport = self.channel.connected()
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            version = ssl_object.version()
            cipher = ssl_object.cipher()
            self._tls = {
                "tls_version": version,
                "tls_cipher": cipher[0] if cipher else None,
                "sni": tls.server_name(ssl_object),
            }
            self.metrics.tls_versions.labels(listener, version or "unknown").inc()
        self.policy.tls_started()

    async def _commands(self) -> BackendConnection:
        while True:
            try:
                line = self.lines.next_line()
            except LineTooLong:
                self._perform_close(self.policy.line_too_long())
            if line is None:
                data = await self.channel.read()
                if not data:
                    if self._shutting_down:
                        raise _Ended(CloseReason.SHUTDOWN)
                    if self.channel.error is not None:
                        raise _Ended(CloseReason.CLIENT_RESET)
                    raise _Ended(CloseReason.CLIENT_CLOSED)
                self.lines.feed(data)
                continue
            action = self.policy.receive_line(line)
            match action:
                case Reply():
                    self._note_refusal(action)
                    self.channel.write(action.data)
                    await self.channel.drain()
                case Close():
                    self._perform_close(action)
                case StartTls():
                    await self._starttls(action)
                case Login():
                    backend = await self._login(action)
                    if backend is not None and self._shutting_down:
                        # The client was told to go away while the login ran.
                        backend.transport.abort()
                        raise _Ended(CloseReason.SHUTDOWN)
                    if backend is not None:
                        return backend

    def _perform_close(self, close: Close) -> NoReturn:
        self.channel.write(close.reply)
        raise _Ended(_CLOSE_REASONS[close.reason])

    def _note_refusal(self, reply: Reply) -> None:
        if reply.refusal is Refusal.PLAINTEXT_LOGIN:
            verb = reply.verb.decode("ascii", "replace")
            if verb in REFUSED_COMMANDS:
                listener = self.context.listener.name
                self.metrics.plaintext_auth_refused.labels(listener, verb).inc()
            self.log.info("refused %s before TLS from %s", verb, self.peer)

    async def _starttls(self, action: StartTls) -> None:
        # RFC 2595 section 4 and CVE-2011-0411: bytes that came after the STLS
        # line were sent in plaintext and must never be read as commands. Stop
        # reading, drop everything buffered, answer, and hand the transport to
        # TLS, with no await in between: nothing can arrive in the gap, and what
        # arrives later goes into the TLS layer (where it breaks the handshake).
        self.channel.pause_reading()
        dropped = self.lines.take_pending() + self.channel.take()
        listener = self.context.listener.name
        self.metrics.starttls.labels(listener).inc()
        if dropped:
            self.metrics.starttls_injection.labels(listener).inc()
            self.metrics.starttls_injection_bytes.labels(listener).inc(len(dropped))
            self.log.warning(
                "dropped %d bytes pipelined after STLS from %s (command injection?)",
                len(dropped),
                self.peer,
            )
        self.channel.write(action.reply)
        await self._start_tls()

    async def _start_tls(self) -> None:
        transport = self.channel.connected()
        loop = asyncio.get_running_loop()
        upgrade = loop.start_tls(
            transport,
            self.channel,
            self.context.tls_context,
            server_side=True,
            ssl_handshake_timeout=self.limits.handshake_timeout,
        )

        async def switch() -> None:
            tls_transport = await upgrade
            if tls_transport is None:
                raise ConnectionAbortedError("TLS upgrade returned no transport")
            self.channel.switch_transport(tls_transport)

        try:
            await self._handshake(switch())
        except _Ended:
            transport.abort()
            raise

    async def _login(self, login: Login) -> BackendConnection | None:
        """Log in to a backend; None when refused (the client may try again)."""
        self._user = login.user
        pool = self.context.backends.route(login.user)
        code: ResponseCode | None
        try:
            backend = await pool.login(login.user, login.password)
        except LoginRejected as rejected:
            code = rejected.code
            result = _LOGIN_RESULTS.get(code, LoginResult.AUTH_FAILED)
        except BackendUnavailable:
            self.log.warning("backend %s unavailable for a login from %s", pool.name, self.peer)
            code = ResponseCode.SYS_TEMP
            result = LoginResult.BACKEND_UNAVAILABLE
        else:
            self.metrics.logins.labels(LoginResult.SUCCESS.value).inc()
            self._backend = backend
            self.policy.login_succeeded()
            return backend
        self.metrics.logins.labels(result.value).inc()
        self._log_failed_login(result)
        if result is LoginResult.AUTH_FAILED:
            # Slows down guessing; unknown user and wrong password wait alike.
            await asyncio.sleep(self.limits.auth_failure_delay)
        match self.policy.login_failed(code):
            case Close() as close:
                self._perform_close(close)
            case Reply() as reply:
                self.channel.write(reply.data)
        return None

    def _log_failed_login(self, result: LoginResult) -> None:
        # A stable line with the real client address: backends only ever see
        # the proxy's, so fail2ban and friends must read this one.
        client, _, port = self.peer.rpartition(":")
        fields: dict[str, Value] = {
            "client": client.strip("[]"),
            "client_port": int(port) if port.isdigit() else None,
            "listener": self.context.listener.name,
            "user": show_user(self._user, self.context.log.user),
            "result": result.value,
            "session": self.id,
        }
        event(auth_log, logging.WARNING, "login failed", fields)

    # --- TRANSACTION --------------------------------------------------------

    async def _transaction_phase(self, backend: BackendConnection) -> CloseReason:
        client = self.channel.connected()
        # The backend's +OK is the answer to the client's PASS or AUTH.
        self.channel.write(backend.reply)
        self.relay = Relay(client, backend.transport, idle_timeout=self.limits.idle_timeout)
        self.relay.start(
            to_backend=self.lines.take_pending() + self.channel.take(),
            to_client=backend.pending + backend.channel.take(),
            client_lost=self.channel.lost,
            backend_lost=backend.channel.lost,
        )
        result = await self.relay.wait()
        self._relayed = (result.client_to_backend, result.backend_to_client)
        relayed = self.metrics.relayed_bytes
        relayed.labels(Direction.CLIENT_TO_BACKEND.value).inc(result.client_to_backend)
        relayed.labels(Direction.BACKEND_TO_CLIENT.value).inc(result.backend_to_client)
        if result.client_quit and result.end in (RelayEnd.BACKEND_CLOSED, RelayEnd.CLIENT_CLOSED):
            return CloseReason.QUIT
        return _RELAY_ENDS[result.end]

    # --- closing ------------------------------------------------------------

    def _close_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.close()

    def _abort_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.abort()

    def _end(self, reason: CloseReason) -> None:
        """Count the session's end and write its one log line."""
        duration = time.monotonic() - self.started
        self.metrics.sessions_closed.labels(reason.value).inc()
        self.metrics.session_duration.observe(duration)
        client, _, port = self.peer.rpartition(":")
        backend = self._backend
        local = backend.transport.get_extra_info("sockname") if backend else None
        fields: dict[str, Value] = {
            "session": self.id,
            "listener": self.context.listener.name,
            "client": client.strip("[]"),
            "client_port": int(port) if port.isdigit() else None,
            **self._tls,
            "user": show_user(self._user, self.context.log.user),
            "backend": backend.backend if backend else None,
            "backend_server": str(backend.server) if backend else None,
            # The proxy's port toward the backend: joins our line to the backend's log.
            "backend_local_port": local[1] if local else None,
            "outcome": reason.value,
            "bytes_client_to_backend": self._relayed[0],
            "bytes_backend_to_client": self._relayed[1],
            "duration_seconds": round(duration, 3),
        }
        event(log, logging.INFO, "session end", fields)
