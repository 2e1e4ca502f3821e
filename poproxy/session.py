"""One client connection, from accept to close, on asyncio.

Owns: feeding client bytes to the policy and performing its actions, the
TLS handshake (at once on implicit listeners, after STLS on starttls ones),
the login timeout, the failed-login delay, the backend login, and handing
both connections to the relay. Must never let a byte received before TLS be
read after it (at STLS, reading is paused and the buffers dropped in one
step; no byte is read again until TLS owns the transport), never log a
credential, and never send a client an exception's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, NoReturn

from prometheus_client import Counter

from poproxy import config, policy, proxy_protocol, tls
from poproxy.auth_http import AuthHttpClient, AuthHttpError, AuthRequest
from poproxy.auth_http import Route as AuthRoute
from poproxy.backends import (
    BackendConnection,
    Backends,
    BackendUnavailable,
    ClientInfo,
    LoginRejected,
    Pool,
)
from poproxy.channel import Channel, wake
from poproxy.clienthello import MAX_CLIENT_HELLO, ClientHello, Malformed, NeedMore, NotTls
from poproxy.clienthello import inspect as inspect_client_hello
from poproxy.limits import AuthPenalty, Networks
from poproxy.logs import FIELDS, Value, event, show_user
from poproxy.metrics import (
    PLAINTEXT_ON_TLS_PORT,
    REFUSED_COMMANDS,
    TLS_ON_STARTTLS_PORT,
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

TLS_HANDSHAKE = b"\x16"  # the first byte of every TLS handshake record (RFC 8446 section 5.1)
# A fatal no_application_protocol alert (RFC 7301 section 3.2), as a TLS 1.2 record.
ALERT_NO_APPLICATION_PROTOCOL = b"\x15\x03\x03\x00\x02\x02\x78"
ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"  # RFC 6066 section 3
PEEK_RETRY = 0.005  # seconds between looks at a ClientHello that has partly arrived
# The first look at a new TLS connection takes this much, so that a whole
# ClientHello (about 0.5 KiB, 2 KiB with post-quantum key shares) is usually
# seen in one system call.
FIRST_PEEK = 4096
AUTH_HTTP_WAITS = 3  # times an auth_http WAIT is honoured before giving up
AUTH_HTTP_MAX_WAIT = 10.0  # seconds, whatever Auth-Wait says
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


class ListenerSeries:
    """The metric series one listener's sessions update, bound to their labels once.

    `labels()` is a locked dictionary lookup; a session would pay it about
    ten times.
    """

    def __init__(self, metrics: Metrics, listener: str) -> None:
        self.connections = metrics.connections.labels(listener)
        self.active = metrics.connections_active.labels(listener)
        self.handshakes = {
            result: metrics.tls_handshakes.labels(listener, result.value)
            for result in HandshakeResult
        }
        self.handshake_duration = metrics.tls_handshake_duration.labels(listener)
        self.logins = {result: metrics.logins.labels(result.value) for result in LoginResult}
        self.closed = {
            reason: metrics.sessions_closed.labels(reason.value) for reason in CloseReason
        }
        self.to_backend = metrics.relayed_bytes.labels(Direction.CLIENT_TO_BACKEND.value)
        self.to_client = metrics.relayed_bytes.labels(Direction.BACKEND_TO_CLIENT.value)
        self._tls_versions = metrics.tls_versions
        self._listener = listener
        self._versions: dict[str, Counter] = {}

    def tls_version(self, version: str) -> Counter:
        series = self._versions.get(version)
        if series is None:
            series = self._versions[version] = self._tls_versions.labels(self._listener, version)
        return series


@dataclass(frozen=True)
class SessionContext:
    """What every session of one listener shares."""

    listener: config.Listener
    limits: config.Limits
    log: config.LogSettings
    certificates: tls.CertificateStore
    backends: Backends
    metrics: Metrics
    penalty: AuthPenalty
    proxy_trusted: Networks  # who may send a PROXY header (listener.proxy_protocol)
    rekey: Callable[[Session], bool]  # count a session under its PROXY-given address
    auth_http: AuthHttpClient | None = None  # when set, it decides where logins go

    @functools.cached_property
    def series(self) -> ListenerSeries:
        return ListenerSeries(self.metrics, self.listener.name)


class Session:
    """Runs one client connection; `run()` returns when both sides are closed."""

    def __init__(
        self,
        context: SessionContext,
        sock: socket.socket,
        client: tuple[str, int],
        connection_key: str,
    ) -> None:
        self.context = context
        self.limits = context.limits
        self.metrics = context.metrics
        self.series = context.series
        self.loop = asyncio.get_running_loop()  # made where accept runs, on the loop
        self.sock = sock
        self.client = client  # the client's address: a PROXY header may replace it
        self.connection_key = connection_key  # what the connection caps count it under
        self._local: tuple[str, int] | None = None  # a PROXY header may set it
        self.channel = Channel()
        self.id = f"{next(_session_ids):x}"
        self.policy = ClientPolicy(
            tls_active=False,
            settings=PolicySettings(
                max_errors=self.limits.max_errors,
                max_auth_failures=self.limits.max_auth_failures,
                extensions=context.backends.extensions(),
            ),
        )
        self.lines = LineBuffer(self.limits.max_line)
        self.relay: Relay | None = None
        self.handshaking = False
        self.started = time.monotonic()
        self.log = SessionLog(log, self.id)
        self._task: asyncio.Task[None] | None = None
        self._handed_over = False  # the socket belongs to an asyncio transport now
        self._shutting_down = False
        self._user: bytes | None = None
        self._backend: BackendConnection | None = None
        self._tls: dict[str, Value] = {"tls_version": None, "tls_cipher": None, "sni": None}
        self._relayed = (0, 0)
        self._attempts = 0  # logins tried (auth_http's Auth-Login-Attempt)

    @property
    def peer(self) -> str:
        host, port = self.client
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def local(self) -> tuple[str, int]:
        """The address the client connected to (or the one a PROXY header named)."""
        if self._local is None:
            self._local = self.sock.getsockname()[:2]
        return self._local

    @property
    def in_transaction(self) -> bool:
        return self.relay is not None

    async def run(self) -> None:
        self._task = asyncio.current_task(self.loop)
        self.series.connections.inc()
        active = self.series.active
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
        """Wrap the accepted socket in a transport; on implicit TLS, do the handshake.

        Before that, the first bytes are peeked at (left in the socket for the
        TLS layer): they tell a client that speaks TLS from one that waits for
        a plaintext greeting, and show the ClientHello's ALPN list.
        """
        loop = self.loop
        listener = self.context.listener
        channel = self.channel
        self.handshaking = True  # until the transport exists, shutdown cancels us
        if listener.proxy_protocol is not None:
            await self._proxy_header(listener.proxy_protocol)
        if listener.tls == "starttls":
            window = listener.implicit_tls_window
            if window > 0 and (await self._peek(1, window))[:1] == TLS_HANDSHAKE:
                # TLS straight away on the STARTTLS port: serve it as POP3S.
                self.metrics.port_mixups.labels(listener.name, TLS_ON_STARTTLS_PORT).inc()
                await self._implicit_tls(hint_after=0)
            else:
                self._handed_over = True
                await loop.connect_accepted_socket(lambda: channel, self.sock)
                self.handshaking = False
        else:
            await self._implicit_tls(hint_after=listener.plaintext_hint_after)
        if self._shutting_down:
            # Shutdown began while the connection was being set up.
            self._perform_close(self.policy.shutting_down())

    async def _proxy_header(self, settings: config.InboundProxyProtocol) -> None:
        """Read the PROXY protocol header a trusted load balancer sends first.

        The spec (haproxy proxy-protocol.txt, section 2) wants it required,
        never guessed, and taken only from trusted peers: anything else is
        closed before a byte of POP3 or TLS is read.
        """
        if self.client[0] not in self.context.proxy_trusted:
            self.log.warning("PROXY header expected from %s, not trusted: closed", self.peer)
            raise _Ended(CloseReason.PROTOCOL_ERROR)
        loop = self.loop
        deadline = loop.time() + settings.timeout
        size = 8
        while True:
            data = await self._peek(size, deadline - loop.time())
            header = proxy_protocol.parse(data)
            if isinstance(header, proxy_protocol.Header):
                break
            if isinstance(header, proxy_protocol.Invalid) or len(data) < size:
                self.log.info("bad or missing PROXY header from %s: closed", self.peer)
                raise _Ended(CloseReason.PROTOCOL_ERROR)
            size = max(header.size, len(data) + 1)
        self.sock.recv(header.length)  # exactly the header: what follows is the client's
        if header.source is not None and header.destination is not None:
            self.client, self._local = header.source, header.destination
            if not self.context.rekey(self):
                self.log.info("connection cap reached for %s (PROXY header)", self.peer)
                raise _Ended(CloseReason.PROTOCOL_ERROR)

    async def _implicit_tls(self, hint_after: float) -> None:
        loop = self.loop
        listener = self.context.listener
        first = await self._peek(FIRST_PEEK, hint_after or self.limits.handshake_timeout, want=1)
        if hint_after and first[:1] != TLS_HANDSHAKE:
            # Nothing (a client waiting for a greeting) or plaintext: a mail
            # client set up without SSL/TLS. Tell its user, in words it shows.
            self.metrics.port_mixups.labels(listener.name, PLAINTEXT_ON_TLS_PORT).inc()
            self.log.info(
                "plaintext client %s on TLS port %s: told to use TLS", self.peer, listener.name
            )
            with contextlib.suppress(OSError):
                self.sock.send(policy.PLAINTEXT_ON_TLS_PORT)
            raise _Ended(CloseReason.TLS_ERROR)
        await self._check_client_hello(lambda data: self.sock.send(data), first)
        channel = self.channel
        self._handed_over = True
        # The protocol is our `channel`, whatever the pair returned says
        # (uvloop returns its internal TLS protocol there).
        await self._handshake(
            loop.connect_accepted_socket(
                lambda: channel,
                self.sock,
                ssl=self.context.certificates.current,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        )

    async def _check_client_hello(self, send: Callable[[bytes], object], seen: bytes = b"") -> None:
        """Refuse what the TLS policy refuses, with the alert RFC 9325 names.

        ALPN (ALPACA; RFC 9325 section 3.8, RFC 7301 section 3.2): a list
        without "pop3" is refused under `tls.alpn: strict`; Python's ssl module
        would only decline to pick one. SNI (RFC 9325 section 3.7): a name no
        certificate carries is refused under `tls.sni: strict`. The ClientHello
        is peeked at, left in the socket for the TLS layer; `seen` is what
        an earlier peek already saw of it.
        """
        settings = self.context.certificates.settings
        if settings.alpn != "strict" and settings.sni != "strict":
            return
        hello = await self._client_hello(seen)
        if not isinstance(hello, ClientHello):
            return  # the TLS layer rejects what is not a ClientHello
        alert = None
        if settings.alpn == "strict" and hello.alpn is not None and "pop3" not in hello.alpn:
            # No ALPN at all is fine: most mail clients send none.
            alert, why, result = ALERT_NO_APPLICATION_PROTOCOL, "ALPN", HandshakeResult.ALPN_REFUSED
        elif (
            settings.sni == "strict"
            and hello.server_name is not None
            and self.context.certificates.certificates.select(hello.server_name) is None
        ):
            alert, why, result = ALERT_UNRECOGNIZED_NAME, "SNI", HandshakeResult.SNI_REFUSED
        if alert is None:
            return
        self.series.handshakes[result].inc()
        self.log.info("refused TLS from %s: %s not served here", self.peer, why)
        with contextlib.suppress(OSError):
            send(alert)
        raise _Ended(CloseReason.TLS_ERROR)

    async def _client_hello(self, seen: bytes) -> NeedMore | NotTls | Malformed | ClientHello:
        """Peek until the ClientHello is complete, or the handshake time is up."""
        loop = self.loop
        deadline = loop.time() + self.limits.handshake_timeout
        if seen:
            result = inspect_client_hello(seen)
            if not isinstance(result, NeedMore):
                return result  # the usual case: the first look saw all of it
            size = max(result.size, len(seen) + 1)
        else:
            size = 5  # a record header first
        while True:
            data = await self._peek(size, deadline - loop.time())
            result = inspect_client_hello(data)
            if not isinstance(result, NeedMore) or len(data) < size:
                return result  # decided, or the time is up
            size = max(result.size, len(data) + 1)

    async def _peek(self, size: int, within: float, want: int | None = None) -> bytes:
        """Up to `size` bytes waiting in the socket, not consumed; waits at most `within` s
        for `want` of them (default: all `size`).

        Returns fewer bytes when the time is up first; b"" when nothing came.
        """
        want = size if want is None else want
        loop = self.loop
        deadline = loop.time() + within
        while True:
            try:
                data = self.sock.recv(size, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = b""
            except OSError:
                raise _Ended(CloseReason.CLIENT_RESET) from None
            else:
                if not data:
                    raise _Ended(CloseReason.CLIENT_CLOSED)
            if len(data) >= want:
                return data
            remaining = deadline - loop.time()
            if remaining <= 0:
                return data
            if data:
                # Part of it is there and the socket stays readable: a
                # readiness wait would spin, so give the rest a moment.
                await asyncio.sleep(min(PEEK_RETRY, remaining))
            else:
                await self._readable(remaining)

    async def _readable(self, within: float) -> None:
        """Wait until the socket is readable, at most `within` seconds."""
        loop = self.loop
        fd = self.sock.fileno()
        readable = loop.create_future()
        try:
            loop.add_reader(fd, wake, readable)
        except RuntimeError:
            # uvloop refuses readers on a socket its transport owns (after STLS).
            await asyncio.sleep(min(PEEK_RETRY, within))
            return
        timer = loop.call_later(within, wake, readable)
        try:
            await readable
        finally:
            timer.cancel()
            loop.remove_reader(fd)

    async def _handshake(self, handshake: Awaitable[object]) -> None:
        """Run a TLS handshake, count it, and note what it negotiated."""
        series = self.series
        started = time.monotonic()
        self.handshaking = True
        try:
            await handshake
        except (OSError, EOFError) as exc:
            timed_out = time.monotonic() - started >= self.limits.handshake_timeout
            result = HandshakeResult.TIMEOUT if timed_out else HandshakeResult.FAILURE
            series.handshakes[result].inc()
            # Scanners fail handshakes all day: debug level, no traceback.
            self.log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            raise _Ended(CloseReason.TLS_ERROR) from None
        except asyncio.CancelledError:
            # Cut by the login timeout or by shutdown: it did not complete.
            series.handshakes[HandshakeResult.TIMEOUT].inc()
            raise
        finally:
            self.handshaking = False
            series.handshake_duration.observe(time.monotonic() - started)
        series.handshakes[HandshakeResult.SUCCESS].inc()
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
            series.tls_version(version or "unknown").inc()
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
        self._note_refusal(close)
        self.channel.write(close.reply)
        raise _Ended(_CLOSE_REASONS[close.reason])

    def _note_refusal(self, action: Reply | Close) -> None:
        if action.refusal is Refusal.PLAINTEXT_LOGIN:
            verb = action.verb.decode("ascii", "replace")
            if verb in REFUSED_COMMANDS:
                listener = self.context.listener.name
                self.metrics.plaintext_auth_refused.labels(listener, verb).inc()
            self.log.info("refused %s before TLS from %s", verb, self.peer)

    async def _starttls(self, action: StartTls) -> None:
        # RFC 2595 section 4 and CVE-2011-0411: bytes that came after the STLS
        # line were sent in plaintext and must never be read as commands. Stop
        # reading and drop everything buffered in one step (no await between
        # them), answer, and keep reading paused until TLS owns the transport:
        # what arrives meanwhile stays in the socket for the TLS layer (where
        # plaintext breaks the handshake). The ClientHello peek only looks.
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
        # Reading stays paused until TLS owns the transport: the peek below
        # looks at the ClientHello in the socket without taking any byte.
        self.handshaking = True  # no plaintext reply may follow the +OK now
        await self._check_client_hello(self.channel.connected().write)
        await self._start_tls()

    async def _start_tls(self) -> None:
        transport = self.channel.connected()
        upgrade = self.loop.start_tls(
            transport,
            self.channel,
            self.context.certificates.current,
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
        self._attempts += 1
        code: ResponseCode | None
        try:
            pool, only, user, password = await self._route(login)
            client = ClientInfo(source=self.client, destination=self.local)
            backend = await pool.login(user, password, client, only)
        except LoginRejected as rejected:
            code = rejected.code
            result = _LOGIN_RESULTS.get(code, LoginResult.AUTH_FAILED)
        except BackendUnavailable as exc:
            self.log.warning("%s, for a login from %s", exc, self.peer)
            code = ResponseCode.SYS_TEMP
            result = LoginResult.BACKEND_UNAVAILABLE
        else:
            self.series.logins[LoginResult.SUCCESS].inc()
            self._backend = backend
            self.policy.login_succeeded()
            return backend
        self.series.logins[result].inc()
        self._log_failed_login(result)
        if result is LoginResult.AUTH_FAILED:
            # Slows down guessing; unknown user and wrong password wait alike.
            # The delay grows per address (limits.py); only this session waits.
            now = self.loop.time()
            delay = self.context.penalty.failed(self.client[0], login.user, login.password, now)
            await asyncio.sleep(delay)
        match self.policy.login_failed(code):
            case Close() as close:
                self._perform_close(close)
            case Reply() as reply:
                self.channel.write(reply.data)
        return None

    async def _route(self, login: Login) -> tuple[Pool, config.Address | None, bytes, bytes]:
        """Which pool (and maybe which server) serves this login, and with what credentials.

        With `auth_http` the operator's service decides (nginx's protocol);
        else the configured routes do.
        """
        auth = self.context.auth_http
        if auth is None:
            pool, only, user = self.context.backends.route(login.user)
            return pool, only, user, login.password
        ssl_object = self.channel.connected().get_extra_info("ssl_object")
        request = AuthRequest(
            user=login.user,
            password=login.password,
            attempt=self._attempts,
            client_ip=self.client[0],
            tls=ssl_object is not None,
            tls_protocol=self._tls["tls_version"] if ssl_object else None,  # type: ignore[arg-type]
            tls_cipher=self._tls["tls_cipher"] if ssl_object else None,  # type: ignore[arg-type]
        )
        for asked in range(1, AUTH_HTTP_WAITS + 1):
            try:
                answer = await auth.ask(request)
            except AuthHttpError as exc:
                self.log.warning("auth_http failed: %s", exc)
                raise BackendUnavailable("auth_http unavailable") from None
            if isinstance(answer, AuthRoute):
                server = config.Address(answer.server, answer.port)
                user = answer.user if answer.user is not None else login.user
                password = answer.password if answer.password is not None else login.password
                return self.context.backends.direct(server), server, user, password
            if not answer.ask_again:
                raise LoginRejected(ResponseCode.AUTH)
            if asked < AUTH_HTTP_WAITS:
                # Auth-Status: WAIT: ask again later, within reason.
                await asyncio.sleep(min(answer.wait or 1.0, AUTH_HTTP_MAX_WAIT))
        raise BackendUnavailable("auth_http kept answering WAIT")

    def _log_failed_login(self, result: LoginResult) -> None:
        # A stable line with the real client address: backends only ever see
        # the proxy's, so fail2ban and friends must read this one.
        fields: dict[str, Value] = {
            "client": self.client[0],
            "client_port": self.client[1],
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
        self.series.to_backend.inc(result.client_to_backend)
        self.series.to_client.inc(result.backend_to_client)
        if result.client_quit and result.end in (RelayEnd.BACKEND_CLOSED, RelayEnd.CLIENT_CLOSED):
            return CloseReason.QUIT
        return _RELAY_ENDS[result.end]

    # --- closing ------------------------------------------------------------

    def _close_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.close()
        elif not self._handed_over:
            # Take what the client sent, so that closing sends a FIN and not
            # a reset that could destroy a reply before it is read.
            with contextlib.suppress(OSError):
                self.sock.recv(MAX_CLIENT_HELLO)
            self.sock.close()

    def _abort_client(self) -> None:
        if self.channel.transport is not None:
            self.channel.transport.abort()
        elif not self._handed_over:
            self.sock.close()  # still ours: no transport was made from it

    def _end(self, reason: CloseReason) -> None:
        """Count the session's end and write its one log line."""
        duration = time.monotonic() - self.started
        self.series.closed[reason].inc()
        self.metrics.session_duration.observe(duration)
        backend = self._backend
        local = backend.transport.get_extra_info("sockname") if backend else None
        if backend is not None:
            backend.pool.release(backend.server)  # for least_connections
        fields: dict[str, Value] = {
            "session": self.id,
            "listener": self.context.listener.name,
            "client": self.client[0],
            "client_port": self.client[1],
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
