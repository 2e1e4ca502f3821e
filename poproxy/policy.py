"""The AUTHORIZATION state as poproxy plays it for the client, without I/O.

Owns: which command is allowed in which phase, the rule that no credential is
accepted before TLS, STLS, the SASL PLAIN and LOGIN exchanges, and collecting
the credentials that the session replays to a backend. Must never import
asyncio, ssl or socket, read a clock, or await: it takes client lines and
login outcomes and returns actions for `session.py` to perform.

A reviewer checks "no authentication before TLS" by reading the tables below
and `ClientPolicy._command`.
"""

from __future__ import annotations

import binascii
import enum
from dataclasses import dataclass, field

from poproxy.pop3 import Command, ResponseCode, capa, err, multiline, ok

# --- Tables ----------------------------------------------------------------

# Before TLS only these verbs do anything. RFC 2595 section 2.3: a server
# that implements STARTTLS MUST be configurable to refuse every clear-text
# login command; RFC 8314 section 3 and RFC 9325 section 3.2 make that the
# only sane policy. QUIT is always allowed (RFC 1939 section 6).
ALLOWED_BEFORE_TLS = frozenset({b"CAPA", b"STLS", b"QUIT"})

# The commands that carry or start credentials: refused before TLS with
# [AUTH] (RFC 3206 section 5) and never passed to a backend.
LOGIN_VERBS = frozenset({b"USER", b"PASS", b"APOP", b"AUTH"})

# RFC 1939 section 5: valid only in TRANSACTION state, so before login they are
# answered here with an error instead of "unknown command".
TRANSACTION_VERBS = frozenset(
    {b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"TOP", b"UIDL", b"LAST"}
)

# What CAPA shows once TLS is on (RFC 2449 section 5). The login methods are
# the proxy's own; the rest are extensions every mainstream POP3 server
# offers, kept conservative until backends are asked for theirs.
LOGIN_CAPABILITY_LINES = (
    b"USER",  # RFC 2449 section 6.8
    b"SASL PLAIN LOGIN",  # RFC 5034 section 4, RFC 4616, draft-murchison-sasl-login
)
# Used in the proxy's own answers, whatever the backends do.
OWN_CAPABILITIES = (b"RESP-CODES", b"AUTH-RESP-CODE")  # RFC 2449 section 6.9, RFC 3206 s. 6
# Until health checks have asked the backends (backends.py), the extensions
# every mainstream POP3 server offers.
DEFAULT_EXTENSIONS = (
    b"TOP",
    b"UIDL",
    b"PIPELINING",  # answered in order before login too (RFC 2449 section 6.6)
)
CAPABILITIES_AFTER_TLS = (
    *LOGIN_CAPABILITY_LINES,
    *DEFAULT_EXTENSIONS,
    *OWN_CAPABILITIES,
)

# Before TLS: STLS and never a way to log in (RFC 2595 section 4: the server
# MAY advertise different capabilities after STLS; clients must re-issue CAPA).
LOGIN_CAPABILITIES = frozenset({b"USER", b"SASL PLAIN LOGIN"})
CAPABILITIES_BEFORE_TLS = (
    b"STLS",
    *(c for c in CAPABILITIES_AFTER_TLS if c not in LOGIN_CAPABILITIES),
)

SASL_MECHANISMS = (b"PLAIN", b"LOGIN")

# Fixed texts. A backend's own wording is never shown (it can tell whether a
# user exists); only its response code is kept (RFC 2449 section 8, RFC 3206).
GREETING = ok("POP3 ready")
TLS_REQUIRED = err("TLS required before login: issue STLS first", ResponseCode.AUTH)
LOGIN_FAILED = {
    None: err("Authentication failed", ResponseCode.AUTH),
    ResponseCode.AUTH: err("Authentication failed", ResponseCode.AUTH),
    ResponseCode.IN_USE: err("Mailbox in use by another session", ResponseCode.IN_USE),
    ResponseCode.LOGIN_DELAY: err("Logged in too recently", ResponseCode.LOGIN_DELAY),
    ResponseCode.SYS_TEMP: err("Temporary failure, try again later", ResponseCode.SYS_TEMP),
    ResponseCode.SYS_PERM: err("Mailbox unavailable", ResponseCode.SYS_PERM),
}
PLAINTEXT_ON_TLS_PORT = err(
    "This port needs SSL/TLS (POP3S): turn SSL/TLS on in your mail client,"
    " or use port 110 with STARTTLS",
    ResponseCode.SYS_PERM,
)
TOO_MANY_CONNECTIONS = err("Too many connections, try again later", ResponseCode.SYS_TEMP)
SHUTTING_DOWN = err("Server shutting down, try again later", ResponseCode.SYS_TEMP)
LOGIN_TIMEOUT = err("Login timeout, closing connection")
LINE_TOO_LONG = err("Line too long, closing connection")
TOO_MANY_ERRORS = err("Too many errors, closing connection")

# SASL LOGIN prompts, base64 of "Username:" and "Password:".
LOGIN_USERNAME_PROMPT = b"+ VXNlcm5hbWU6\r\n"
LOGIN_PASSWORD_PROMPT = b"+ UGFzc3dvcmQ6\r\n"
CONTINUE = b"+ \r\n"


# --- Actions ---------------------------------------------------------------


class Refusal(enum.Enum):
    """Why a command was refused, for the session's counters and log."""

    PLAINTEXT_LOGIN = "plaintext_login"  # a login command before TLS
    PROTOCOL = "protocol"  # unknown command, bad syntax, wrong phase


@dataclass(frozen=True)
class Reply:
    """Send these bytes to the client."""

    data: bytes
    refusal: Refusal | None = None
    verb: bytes = b""


@dataclass(frozen=True)
class StartTls:
    """Send `reply`, drop every byte received after the STLS line, start TLS."""

    reply: bytes


@dataclass(frozen=True)
class Login:
    """Credentials are complete: log in to a backend with USER/PASS."""

    user: bytes
    password: bytes = field(repr=False)


class CloseReason(enum.Enum):
    QUIT = "quit"
    PROTOCOL_ERROR = "protocol_error"
    AUTH_FAILURES = "auth_failures"
    LINE_TOO_LONG = "line_too_long"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Close:
    """Send `reply` (if any) and close the client connection."""

    reply: bytes
    reason: CloseReason
    refusal: Refusal | None = None  # the command that reached max_errors, if refused
    verb: bytes = b""


Action = Reply | StartTls | Login | Close


class Phase(enum.Enum):
    AUTHORIZATION = enum.auto()  # commands (RFC 1939 section 4)
    SASL_PLAIN = enum.auto()  # waiting for the PLAIN response (RFC 5034 section 4)
    SASL_LOGIN_USER = enum.auto()  # waiting for the LOGIN user name
    SASL_LOGIN_PASSWORD = enum.auto()  # waiting for the LOGIN password
    STARTING_TLS = enum.auto()  # STLS answered; nothing is read until TLS is on
    LOGGING_IN = enum.auto()  # credentials handed to a backend, outcome pending
    TRANSACTION = enum.auto()  # the backend accepted: the relay owns the connection
    CLOSED = enum.auto()


@dataclass(frozen=True)
class PolicySettings:
    max_errors: int = 5
    max_auth_failures: int = 3
    # The extensions every backend server announced; None: not known yet.
    extensions: tuple[bytes, ...] | None = None


class ClientPolicy:
    """The client's AUTHORIZATION state machine (DESIGN.md, rules 1-7)."""

    def __init__(self, *, tls_active: bool, settings: PolicySettings) -> None:
        self.tls_active = tls_active
        self.settings = settings
        self.phase = Phase.AUTHORIZATION
        self.errors = 0
        self.auth_failures = 0
        self._user: bytes | None = None  # from USER, or the SASL LOGIN user name

    # --- inputs --------------------------------------------------------

    def receive_line(self, line: bytes) -> Action:
        """One complete client line (without its line ending)."""
        match self.phase:
            case Phase.AUTHORIZATION:
                return self._command(Command.parse(line))
            case Phase.SASL_PLAIN:
                return self._sasl_plain(line)
            case Phase.SASL_LOGIN_USER | Phase.SASL_LOGIN_PASSWORD:
                return self._sasl_login(line)
            case _:
                # The session stops reading in every other phase; a line here
                # is a bug in the caller, answered like any protocol error.
                return self._error("Command not allowed now")

    def tls_started(self) -> None:
        """TLS is on. RFC 2595 section 4: nothing learnt before it is kept."""
        self.tls_active = True
        self.phase = Phase.AUTHORIZATION
        self._user = None

    def login_succeeded(self) -> None:
        self.phase = Phase.TRANSACTION

    def login_failed(self, code: ResponseCode | None) -> Action:
        """The backend refused the login, or could not be reached (SYS/TEMP)."""
        self.phase = Phase.AUTHORIZATION
        self._user = None
        reply = LOGIN_FAILED.get(code, LOGIN_FAILED[None])
        if code in (None, ResponseCode.AUTH):
            self.auth_failures += 1
            if self.auth_failures >= self.settings.max_auth_failures:
                # The failure itself is the last reply; then the connection ends.
                return self._close(reply, CloseReason.AUTH_FAILURES)
        return Reply(reply)

    def line_too_long(self) -> Close:
        return self._close(LINE_TOO_LONG, CloseReason.LINE_TOO_LONG)

    def timed_out(self) -> Close:
        return self._close(LOGIN_TIMEOUT, CloseReason.TIMEOUT)

    def shutting_down(self) -> Close:
        return self._close(SHUTTING_DOWN, CloseReason.SHUTDOWN)

    # --- AUTHORIZATION commands ----------------------------------------

    def greeting(self) -> bytes:
        # No product name or version: the proxy gives scanners nothing to match.
        return GREETING

    def capabilities(self) -> tuple[bytes, ...]:
        extensions = self.settings.extensions
        if extensions is None:
            return CAPABILITIES_AFTER_TLS if self.tls_active else CAPABILITIES_BEFORE_TLS
        common = (*extensions, *OWN_CAPABILITIES)
        return (*LOGIN_CAPABILITY_LINES, *common) if self.tls_active else (b"STLS", *common)

    def _command(self, command: Command) -> Action:
        verb = command.verb
        if not self.tls_active and verb not in ALLOWED_BEFORE_TLS:
            if verb in LOGIN_VERBS:
                # Rule 1: refused with [AUTH]; the credential goes nowhere.
                return self._error_reply(TLS_REQUIRED, Refusal.PLAINTEXT_LOGIN, verb)
            return self._unknown(verb)
        match verb:
            case b"CAPA":
                return Reply(capa(list(self.capabilities())))
            case b"QUIT":
                return self._close(ok("Bye"), CloseReason.QUIT)
            case b"STLS":
                if self.tls_active:
                    return self._error("TLS already active")  # RFC 2595 section 4
                if command.argument:
                    return self._error("STLS takes no argument")
                self.phase = Phase.STARTING_TLS
                return StartTls(ok("Begin TLS negotiation"))
            case b"USER":
                return self._user_command(command)
            case b"PASS":
                return self._pass_command(command)
            case b"APOP":
                # APOP needs the backend's greeting timestamp, which a proxy that
                # greets the client itself cannot offer; it is MD5 anyway.
                return self._error("APOP not supported, use USER/PASS or AUTH")
            case b"AUTH":
                return self._auth_command(command)
            case _:
                return self._unknown(verb)

    def _unknown(self, verb: bytes) -> Reply | Close:
        if verb in TRANSACTION_VERBS:
            return self._error("Not logged in", verb)
        return self._error("Unknown command", verb)

    def _user_command(self, command: Command) -> Action:
        user = command.argument
        if not _valid_user(user):
            self._user = None
            return self._error("Invalid user name")
        self._user = user
        # The same answer for every name: nothing is checked until PASS, so the
        # reply cannot tell whether a user exists.
        return Reply(ok("Send PASS"))

    def _pass_command(self, command: Command) -> Action:
        user, self._user = self._user, None
        if user is None:
            return self._error("Send USER first")
        return self._login(user, command.argument)

    def _auth_command(self, command: Command) -> Action:
        arguments = command.arguments
        if not arguments:
            # Bare AUTH lists the mechanisms: not in RFC 5034, but clients expect it.
            return Reply(multiline(ok("Mechanisms follow"), list(SASL_MECHANISMS)))
        if len(arguments) > 2:
            return self._error("Too many arguments")
        mechanism = arguments[0].upper()
        initial = arguments[1] if len(arguments) == 2 else None
        match mechanism:
            case b"PLAIN":
                if initial is None:
                    self.phase = Phase.SASL_PLAIN
                    return Reply(CONTINUE)
                return self._plain_response(initial)
            case b"LOGIN":
                if initial is None:
                    self.phase = Phase.SASL_LOGIN_USER
                    return Reply(LOGIN_USERNAME_PROMPT)
                return self._login_username(initial)
            case _:
                return self._error("Unsupported SASL mechanism")

    # --- SASL ----------------------------------------------------------

    def _sasl_plain(self, line: bytes) -> Action:
        self.phase = Phase.AUTHORIZATION
        if line == b"*":
            return self._error("Authentication cancelled")  # RFC 5034 section 4
        return self._plain_response(line)

    def _plain_response(self, encoded: bytes) -> Action:
        # RFC 4616 section 2: [authzid] NUL authcid NUL passwd.
        decoded = _b64decode(encoded)
        parts = decoded.split(b"\0") if decoded is not None else []
        if len(parts) != 3:
            return self._error("Malformed SASL response")
        authzid, user, password = parts
        if authzid and authzid != user:
            # Acting as another user cannot be replayed with USER/PASS.
            return self._error("Authorization identity not supported")
        return self._login(user, password)

    def _sasl_login(self, line: bytes) -> Action:
        if line == b"*":
            self.phase = Phase.AUTHORIZATION
            self._user = None
            return self._error("Authentication cancelled")
        if self.phase is Phase.SASL_LOGIN_USER:
            return self._login_username(line)
        self.phase = Phase.AUTHORIZATION
        user, self._user = self._user, None
        password = _b64decode(line)
        if user is None or password is None:
            return self._error("Malformed SASL response")
        return self._login(user, password)

    def _login_username(self, encoded: bytes) -> Action:
        user = _b64decode(encoded)
        if user is None:
            self.phase = Phase.AUTHORIZATION
            return self._error("Malformed SASL response")
        self._user = user
        self.phase = Phase.SASL_LOGIN_PASSWORD
        return Reply(LOGIN_PASSWORD_PROMPT)

    # --- helpers -------------------------------------------------------

    def _login(self, user: bytes, password: bytes) -> Action:
        # The credentials are replayed as USER/PASS lines: anything that could
        # end or split such a line (CR, LF, NUL) would inject a command.
        if not _valid_user(user) or not _valid_password(password):
            self.phase = Phase.AUTHORIZATION
            return self._error("Invalid credentials syntax")
        self.phase = Phase.LOGGING_IN
        return Login(user, password)

    def _error(self, text: str, verb: bytes = b"") -> Reply | Close:
        return self._error_reply(err(text), Refusal.PROTOCOL, verb)

    def _error_reply(self, reply: bytes, refusal: Refusal, verb: bytes) -> Reply | Close:
        self.errors += 1
        if self.errors >= self.settings.max_errors:
            self.phase = Phase.CLOSED
            return Close(TOO_MANY_ERRORS, CloseReason.PROTOCOL_ERROR, refusal, verb)
        return Reply(reply, refusal, verb)

    def _close(self, reply: bytes, reason: CloseReason) -> Close:
        self.phase = Phase.CLOSED
        return Close(reply, reason)


def _b64decode(data: bytes) -> bytes | None:
    if data == b"=":
        return b""  # RFC 5034 section 4: "=" is an empty initial response
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        return None


def _valid_user(user: bytes) -> bool:
    # A user name travels as the single argument of USER: no spaces, no controls.
    return 0 < len(user) <= 255 and all(0x20 < byte != 0x7F for byte in user)


def _valid_password(password: bytes) -> bool:
    # RFC 1939 section 7: a password may contain spaces, never a line ending.
    return 0 < len(password) <= 1024 and not any(byte in b"\r\n\0" for byte in password)
