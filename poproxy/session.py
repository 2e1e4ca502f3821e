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
import enum
import itertools
import logging
import socket
import ssl
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, NoReturn

from poproxy import config
from poproxy.backends import BackendConnection, Backends, BackendUnavailable, LoginRejected
from poproxy.channel import Channel
from poproxy.policy import (
    ClientPolicy,
    Close,
    CloseReason,
    Login,
    Phase,
    PolicySettings,
    Refusal,
    Reply,
    StartTls,
)
from poproxy.pop3 import LineBuffer, LineTooLong, ResponseCode
from poproxy.relay import Relay

log = logging.getLogger("poproxy.session")

_session_ids = itertools.count(1)


class Outcome(enum.Enum):
    """How a session ended, for its log line."""

    QUIT = "quit"
    CLIENT_GONE = "client_gone"  # closed or reset before logging in
    TLS_ERROR = "tls_error"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    AUTH_FAILURES = "auth_failures"
    SHUTDOWN = "shutdown"
    RELAYED = "relayed"  # logged in; the relay's end says more


_CLOSE_OUTCOMES = {
    CloseReason.QUIT: Outcome.QUIT,
    CloseReason.PROTOCOL_ERROR: Outcome.PROTOCOL_ERROR,
    CloseReason.LINE_TOO_LONG: Outcome.PROTOCOL_ERROR,
    CloseReason.AUTH_FAILURES: Outcome.AUTH_FAILURES,
    CloseReason.TIMEOUT: Outcome.TIMEOUT,
    CloseReason.SHUTDOWN: Outcome.SHUTDOWN,
}


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session id, so one session's lines can be joined."""

    def __init__(self, logger: logging.Logger, session_id: str) -> None:
        super().__init__(logger, {"session": session_id})
        self.prefix = f"session={session_id} "

    def process(self, msg: object, kwargs: MutableMapping[str, Any]) -> tuple[object, Any]:
        return self.prefix + str(msg), kwargs


class _Ended(Exception):
    """The session is over before login; `outcome` says why."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


@dataclass(frozen=True)
class SessionContext:
    """What every session of one listener shares."""

    listener: config.Listener
    limits: config.Limits
    tls_context: ssl.SSLContext
    backends: Backends


class Session:
    """Runs one client connection; `run()` returns when both sides are closed."""

    def __init__(self, context: SessionContext, sock: socket.socket, peer: str) -> None:
        self.context = context
        self.limits = context.limits
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
        self._backend_server: config.Address | None = None
        self._tls_version: str | None = None
        self._dropped_after_stls = 0

    @property
    def in_transaction(self) -> bool:
        return self.relay is not None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        if self._shutting_down:
            self.sock.close()
            return
        outcome = Outcome.CLIENT_GONE
        detail = ""
        try:
            backend = await self._authorization_phase()
            outcome = Outcome.RELAYED
            detail = await self._transaction_phase(backend)
        except _Ended as ended:
            outcome = ended.outcome
            self._close_client()
        except BaseException:
            # Cancelled (or a bug): cut both sides, sending nothing.
            if self._shutting_down:
                outcome = Outcome.SHUTDOWN
            self.abort()
            raise
        finally:
            self._log_end(outcome, detail)

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
            raise _Ended(Outcome.TIMEOUT) from None

    async def _connect(self) -> None:
        """Wrap the accepted socket in a transport; on implicit TLS, do the handshake."""
        loop = asyncio.get_running_loop()
        channel = self.channel
        if self.context.listener.tls == "starttls":
            await loop.connect_accepted_socket(lambda: channel, self.sock)
            return
        self.handshaking = True
        try:
            # The protocol is our `channel`, whatever the pair returned says
            # (uvloop returns its internal TLS protocol there).
            await loop.connect_accepted_socket(
                lambda: channel,
                self.sock,
                ssl=self.context.tls_context,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        except (OSError, EOFError) as exc:
            # Scanners fail handshakes all day: debug level, no traceback.
            self.log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            raise _Ended(Outcome.TLS_ERROR) from None
        finally:
            self.handshaking = False
        self._tls_started()

    def _tls_started(self) -> None:
        transport = self.channel.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        self._tls_version = ssl_object.version() if ssl_object is not None else None
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
                    raise _Ended(Outcome.CLIENT_GONE)
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
                        raise _Ended(Outcome.SHUTDOWN)
                    if backend is not None:
                        return backend

    def _perform_close(self, close: Close) -> NoReturn:
        self.channel.write(close.reply)
        raise _Ended(_CLOSE_OUTCOMES[close.reason])

    def _note_refusal(self, reply: Reply) -> None:
        if reply.refusal is Refusal.PLAINTEXT_LOGIN:
            verb = reply.verb.decode("ascii", "replace")
            self.log.info("refused %s before TLS from %s", verb, self.peer)

    async def _starttls(self, action: StartTls) -> None:
        # RFC 2595 section 4 and CVE-2011-0411: bytes that came after the STLS
        # line were sent in plaintext and must never be read as commands. Stop
        # reading, drop everything buffered, answer, and hand the transport to
        # TLS, with no await in between: nothing can arrive in the gap, and what
        # arrives later goes into the TLS layer (where it breaks the handshake).
        self.channel.pause_reading()
        dropped = self.lines.take_pending() + self.channel.take()
        if dropped:
            self._dropped_after_stls += len(dropped)
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
        self.handshaking = True
        try:
            tls_transport = await loop.start_tls(
                transport,
                self.channel,
                self.context.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        except (OSError, EOFError) as exc:
            # Scanners fail handshakes all day: debug level, no traceback.
            self.log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            transport.abort()
            raise _Ended(Outcome.TLS_ERROR) from None
        finally:
            self.handshaking = False
        if tls_transport is None:
            transport.abort()
            raise _Ended(Outcome.TLS_ERROR)
        self.channel.switch_transport(tls_transport)
        self._tls_started()

    async def _login(self, login: Login) -> BackendConnection | None:
        """Log in to a backend; None when refused (the client may try again)."""
        self._user = login.user
        pool = self.context.backends.route(login.user)
        code: ResponseCode | None
        try:
            backend = await pool.login(login.user, login.password)
        except LoginRejected as rejected:
            code = rejected.code
        except BackendUnavailable:
            self.log.warning("backend %s unavailable for a login from %s", pool.name, self.peer)
            code = ResponseCode.SYS_TEMP
        else:
            self._backend_server = backend.server
            self.policy.login_succeeded()
            return backend
        self.log.info(
            "login failed for user %r from %s (%s)",
            login.user.decode("utf-8", "replace"),
            self.peer,
            code.value.decode() if code else "AUTH",
        )
        if code in (None, ResponseCode.AUTH):
            # Slows down guessing; unknown user and wrong password wait alike.
            await asyncio.sleep(self.limits.auth_failure_delay)
        match self.policy.login_failed(code):
            case Close() as close:
                self._perform_close(close)
            case Reply() as reply:
                self.channel.write(reply.data)
        return None

    # --- TRANSACTION --------------------------------------------------------

    async def _transaction_phase(self, backend: BackendConnection) -> str:
        client = self.channel.connected()
        # The backend's +OK is the answer to the client's PASS or AUTH.
        if not self.channel.closed:
            self.channel.write(backend.reply)
        self.relay = Relay(client, backend.transport, idle_timeout=self.limits.idle_timeout)
        self.relay.start(
            to_backend=self.lines.take_pending() + self.channel.take(),
            to_client=backend.pending + backend.channel.take(),
            client_lost=self.channel.lost,
            backend_lost=backend.channel.lost,
        )
        result = await self.relay.wait()
        return (
            f"end={result.end.value} client_to_backend={result.client_to_backend}"
            f" backend_to_client={result.backend_to_client}"
        )

    # --- closing ------------------------------------------------------------

    def _close_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.close()

    def _abort_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.abort()

    def _log_end(self, outcome: Outcome, detail: str) -> None:
        user = self._user.decode("utf-8", "replace") if self._user else "-"
        self.log.info(
            "session end listener=%s client=%s tls=%s user=%r backend=%s outcome=%s %s"
            " duration=%.3f",
            self.context.listener.name,
            self.peer,
            self._tls_version or "-",
            user,
            self._backend_server or "-",
            outcome.value,
            detail,
            time.monotonic() - self.started,
        )
