"""Unit tests for poproxy.policy: the AUTHORIZATION rules of DESIGN.md, one class per rule.

Sans-IO: lines go in, actions come out. Security regressions are named after
the attack. Performing the actions (sending, discarding bytes at STLS, the
backend login) is the session's job and is tested in tests/e2e.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from poproxy.policy import (
    CAPABILITIES_AFTER_TLS,
    CONTINUE,
    GREETING,
    LINE_TOO_LONG,
    LOGIN_FAILED,
    LOGIN_PASSWORD_PROMPT,
    LOGIN_TIMEOUT,
    LOGIN_USERNAME_PROMPT,
    SHUTTING_DOWN,
    TLS_REQUIRED,
    TOO_MANY_ERRORS,
    Action,
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
from poproxy.pop3 import Command, LineBuffer, LineTooLong, ResponseCode, Status, ok

# Generous, so that tests about one rule are not cut short by the error limit.
RELAXED = PolicySettings(max_errors=1000, max_auth_failures=1000)


# --- helpers ----------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(authcid: bytes, password: bytes, authzid: bytes = b"") -> bytes:
    """An RFC 4616 PLAIN response, base64-encoded."""
    return b64(authzid + b"\0" + authcid + b"\0" + password)


def before_tls(settings: PolicySettings = RELAXED) -> ClientPolicy:
    """A client on a starttls listener that has not issued STLS yet."""
    return ClientPolicy(tls_active=False, settings=settings)


def upgraded(settings: PolicySettings = RELAXED) -> ClientPolicy:
    """A client on a starttls listener after STLS and the handshake."""
    policy = ClientPolicy(tls_active=False, settings=settings)
    assert isinstance(policy.receive_line(b"STLS"), StartTls)
    policy.tls_started()
    return policy


def implicit(settings: PolicySettings = RELAXED) -> ClientPolicy:
    """A client on an implicit-TLS listener: TLS from the first byte."""
    return ClientPolicy(tls_active=True, settings=settings)


@pytest.fixture(params=["implicit", "after_stls"])
def tls_policy(request: pytest.FixtureRequest) -> ClientPolicy:
    """A policy with TLS on, reached both ways."""
    return implicit() if request.param == "implicit" else upgraded()


def phase(policy: ClientPolicy) -> Phase:
    # A call, so that mypy does not keep a narrowed phase across receive_line().
    return policy.phase


def as_reply(action: Action) -> Reply:
    assert isinstance(action, Reply), action
    return action


def is_error(action: Action) -> bool:
    return isinstance(action, Reply) and action.data.startswith(b"-ERR ")


def error_reply(action: Action) -> Reply:
    reply = as_reply(action)
    assert reply.data.startswith(b"-ERR "), reply
    assert reply.data.endswith(b"\r\n")
    return reply


def multiline_body(data: bytes) -> list[bytes]:
    """The lines of a multi-line response, without the status and the final dot."""
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert lines[-2:] == [b".", b""]
    return lines[1:-2]


def run(policy: ClientPolicy, *lines: bytes) -> list[Action]:
    return [policy.receive_line(line) for line in lines]


def run_segment(policy: ClientPolicy, buffer: LineBuffer, segment: bytes) -> list[Action]:
    """Feed one received segment and answer its lines until one needs the session."""
    buffer.feed(segment)
    actions: list[Action] = []
    while (line := buffer.next_line()) is not None:
        action = policy.receive_line(line)
        actions.append(action)
        if not isinstance(action, Reply):
            break  # StartTls, Login and Close stop the reading (session.py)
    return actions


# Not base64 (strict: no missing padding, no data after it, no foreign bytes).
MALFORMED = [b"not-base64!", b"YWxpY2U", b"====", b"YWxpY2U=garbage", b"=YWxp", b"*x", b"\xff"]
# As a line of its own, a SASL response may also hold a space.
MALFORMED_LINES = [*MALFORMED, b"YW xp"]

# --- Rule 1 -------------------------------------------------------------------

PLAINTEXT_LOGIN_LINES = [
    b"USER alice",
    b"user alice",
    b"USER",
    b"PASS hunter2",
    b"pass correct horse battery staple",
    b"PASS",
    b"APOP mrose c4c9334bac560ecc979e58001b3e22fb",
    b"apop",
    b"AUTH PLAIN " + plain(b"alice", b"hunter2"),
    b"auth plain " + plain(b"alice", b"hunter2"),
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"Auth Login " + b64(b"alice"),
    b"AUTH",
    b"auth",
]


class TestRule1NoLoginBeforeTls:
    """Before TLS only CAPA, STLS and QUIT; login commands get [AUTH] TLS required."""

    @pytest.mark.parametrize("line", PLAINTEXT_LOGIN_LINES)
    def test_plaintext_login_command_is_refused(self, line: bytes) -> None:
        policy = before_tls()
        action = policy.receive_line(line)
        verb = Command.parse(line).verb
        assert action == Reply(TLS_REQUIRED, Refusal.PLAINTEXT_LOGIN, verb)
        assert policy.phase is Phase.AUTHORIZATION

    def test_tls_required_text(self) -> None:
        # DESIGN rule 1: -ERR [AUTH] stating that TLS is required.
        assert TLS_REQUIRED.startswith(b"-ERR [AUTH] ")
        assert b"TLS" in TLS_REQUIRED
        assert b"STLS" in TLS_REQUIRED
        assert TLS_REQUIRED.endswith(b"\r\n")

    def test_plaintext_credentials_never_become_a_login(self) -> None:
        policy = before_tls()
        actions = run(
            policy,
            b"USER alice",
            b"PASS hunter2",
            b"AUTH PLAIN " + plain(b"alice", b"hunter2"),
            b"AUTH PLAIN",
            plain(b"alice", b"hunter2"),
            b"AUTH LOGIN",
            b64(b"alice"),
            b64(b"hunter2"),
            b"PASS hunter2",
        )
        assert not any(isinstance(action, Login) for action in actions)
        for action in actions:
            assert b"hunter2" not in as_reply(action).data
        assert policy.phase is Phase.AUTHORIZATION

    def test_plaintext_sasl_refusal_does_not_start_an_exchange(self) -> None:
        # "AUTH PLAIN" before TLS must not leave the machine waiting for a
        # SASL response: the next line is a command again.
        policy = before_tls()
        policy.receive_line(b"AUTH PLAIN")
        assert policy.phase is Phase.AUTHORIZATION
        assert as_reply(policy.receive_line(b"CAPA")).data.startswith(b"+OK")

    def test_capa_is_allowed(self) -> None:
        assert as_reply(before_tls().receive_line(b"CAPA")).data.startswith(b"+OK")

    def test_stls_is_allowed(self) -> None:
        assert isinstance(before_tls().receive_line(b"STLS"), StartTls)

    def test_quit_is_allowed(self) -> None:
        assert before_tls().receive_line(b"QUIT") == Close(ok("Bye"), CloseReason.QUIT)

    @pytest.mark.parametrize("line", [b"XYZZY", b"HELO example.com", b"", b"GET / HTTP/1.1"])
    def test_unknown_command_is_an_error(self, line: bytes) -> None:
        reply = error_reply(before_tls().receive_line(line))
        assert reply.data == b"-ERR Unknown command\r\n"
        assert reply.refusal is Refusal.PROTOCOL

    @pytest.mark.parametrize("verb", [b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"UIDL"])
    def test_transaction_command_is_an_error(self, verb: bytes) -> None:
        reply = error_reply(before_tls().receive_line(verb))
        assert reply.data == b"-ERR Not logged in\r\n"
        assert reply.refusal is Refusal.PROTOCOL

    def test_too_many_errors_closes(self) -> None:
        policy = before_tls(PolicySettings(max_errors=3))
        assert is_error(policy.receive_line(b"XYZZY"))
        assert is_error(policy.receive_line(b"NOOP"))
        assert policy.receive_line(b"XYZZY") == Close(
            TOO_MANY_ERRORS, CloseReason.PROTOCOL_ERROR, Refusal.PROTOCOL, b"XYZZY"
        )
        assert policy.phase is Phase.CLOSED

    def test_plaintext_login_attempts_count_as_errors(self) -> None:
        # A client that keeps trying to log in without TLS is sent away.
        policy = before_tls(PolicySettings(max_errors=2))
        assert as_reply(policy.receive_line(b"USER alice")).data == TLS_REQUIRED
        action = policy.receive_line(b"PASS hunter2")
        # The refusal that closes is still a refused plaintext login (for the counters).
        assert action == Close(
            TOO_MANY_ERRORS, CloseReason.PROTOCOL_ERROR, Refusal.PLAINTEXT_LOGIN, b"PASS"
        )

    def test_allowed_commands_do_not_count_as_errors(self) -> None:
        policy = before_tls(PolicySettings(max_errors=1))
        for _ in range(5):
            assert isinstance(policy.receive_line(b"CAPA"), Reply)
        assert policy.errors == 0


# --- Rule 2 -------------------------------------------------------------------


class TestRule2Capa:
    """CAPA lists STLS and no login before TLS; USER and SASL after, and no STLS."""

    def test_before_tls_lists_stls_and_no_login(self) -> None:
        lines = multiline_body(as_reply(before_tls().receive_line(b"CAPA")).data)
        assert b"STLS" in lines
        assert b"USER" not in lines
        assert not any(line.startswith(b"SASL") for line in lines)

    def test_before_tls_lists_the_extensions(self) -> None:
        lines = multiline_body(as_reply(before_tls().receive_line(b"capa")).data)
        for extension in (b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE"):
            assert extension in lines

    def test_after_tls_lists_login_and_no_stls(self, tls_policy: ClientPolicy) -> None:
        lines = multiline_body(as_reply(tls_policy.receive_line(b"CAPA")).data)
        assert b"USER" in lines
        assert b"SASL PLAIN LOGIN" in lines
        assert b"STLS" not in lines
        for extension in (b"TOP", b"UIDL", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE"):
            assert extension in lines

    def test_after_tls_is_the_table(self, tls_policy: ClientPolicy) -> None:
        lines = multiline_body(as_reply(tls_policy.receive_line(b"CAPA")).data)
        assert lines == list(CAPABILITIES_AFTER_TLS)

    def test_capa_is_a_terminated_multiline_response(self) -> None:
        data = as_reply(before_tls().receive_line(b"CAPA")).data
        assert data.startswith(b"+OK")
        assert data.endswith(b"\r\n.\r\n")

    def test_capa_keeps_the_phase(self) -> None:
        policy = before_tls()
        policy.receive_line(b"CAPA")
        assert policy.phase is Phase.AUTHORIZATION


# --- Rule 3 -------------------------------------------------------------------


class TestRule3Stls:
    """STLS: +OK, then TLS; a fresh state after the handshake; -ERR once TLS is on."""

    @pytest.mark.parametrize("line", [b"STLS", b"stls", b"Stls"])
    def test_stls_starts_tls(self, line: bytes) -> None:
        policy = before_tls()
        action = policy.receive_line(line)
        assert action == StartTls(ok("Begin TLS negotiation"))
        assert policy.phase is Phase.STARTING_TLS

    def test_stls_with_an_argument_is_an_error(self) -> None:
        policy = before_tls()
        assert is_error(policy.receive_line(b"STLS now"))
        assert policy.phase is Phase.AUTHORIZATION
        assert not policy.tls_active

    def test_stls_when_tls_is_on_is_an_error(self, tls_policy: ClientPolicy) -> None:
        # RFC 2595 section 4: STLS after a successful negotiation is refused.
        reply = error_reply(tls_policy.receive_line(b"STLS"))
        assert reply.refusal is Refusal.PROTOCOL
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_tls_started_makes_tls_active(self) -> None:
        policy = before_tls()
        policy.receive_line(b"STLS")
        policy.tls_started()
        assert policy.tls_active
        assert policy.phase is Phase.AUTHORIZATION

    def test_starttls_command_injection_pipelined_bytes_stay_pending(self) -> None:
        # CVE-2011-0411 style: plaintext pipelined behind STLS must not be
        # answered. The policy stops at StartTls; the bytes behind it are still
        # pending in the buffer, for the session to discard at the switch.
        policy = before_tls()
        buffer = LineBuffer(8192)
        actions = run_segment(policy, buffer, b"STLS\r\nUSER evil\r\nPASS evil\r\n")
        assert actions == [StartTls(ok("Begin TLS negotiation"))]
        assert buffer.take_pending() == b"USER evil\r\nPASS evil\r\n"

    def test_starttls_command_injection_lines_while_starting_tls_are_refused(self) -> None:
        # Should a line reach the policy between STLS and the handshake
        # anyway, it is refused and never becomes a login.
        policy = before_tls()
        policy.receive_line(b"STLS")
        for line in (b"USER evil", b"PASS evil", b"AUTH PLAIN " + plain(b"evil", b"evil")):
            action = policy.receive_line(line)
            assert is_error(action)
            assert not isinstance(action, Login)
        policy.tls_started()
        action = policy.receive_line(b"PASS evil")
        assert error_reply(action).data == b"-ERR Send USER first\r\n"

    def test_starttls_command_injection_user_before_tls_is_forgotten(self) -> None:
        # A USER injected in plaintext must not combine with the victim's PASS
        # sent over TLS (RFC 2595 section 4: nothing learnt before TLS is kept).
        policy = before_tls()
        policy.receive_line(b"USER evil")
        policy.receive_line(b"STLS")
        policy.tls_started()
        action = policy.receive_line(b"PASS victims-password")
        assert not isinstance(action, Login)
        assert error_reply(action).data == b"-ERR Send USER first\r\n"

    def test_tls_started_forgets_a_user_name_whatever_set_it(self) -> None:
        # White-box on purpose: rule 1 already stops USER before TLS, so the
        # reset in tls_started() is defence in depth and cannot be reached
        # through receive_line(). Plant a user name and check it is dropped.
        policy = before_tls()
        policy.receive_line(b"STLS")
        policy._user = b"evil"
        policy.tls_started()
        assert policy._user is None
        assert not isinstance(policy.receive_line(b"PASS victims-password"), Login)

    def test_starttls_command_injection_user_in_starting_tls_is_forgotten(self) -> None:
        policy = before_tls()
        policy.receive_line(b"STLS")
        policy.receive_line(b"USER evil")
        policy.tls_started()
        assert not isinstance(policy.receive_line(b"PASS victims-password"), Login)

    def test_starttls_command_injection_sasl_state_is_forgotten(self) -> None:
        policy = before_tls()
        policy.receive_line(b"AUTH LOGIN " + b64(b"evil"))
        policy.receive_line(b"STLS")
        policy.tls_started()
        # The next line is a command, not the password of an injected AUTH LOGIN.
        action = policy.receive_line(b64(b"victims-password"))
        assert error_reply(action).data == b"-ERR Unknown command\r\n"

    def test_capa_after_upgrade_shows_login(self) -> None:
        lines = multiline_body(as_reply(upgraded().receive_line(b"CAPA")).data)
        assert b"USER" in lines
        assert b"STLS" not in lines


# --- Rule 4 -------------------------------------------------------------------


class TestRule4Credentials:
    """USER+PASS, AUTH PLAIN, AUTH LOGIN; APOP refused; malformed base64 refused."""

    # USER / PASS

    def test_user_pass_logs_in(self, tls_policy: ClientPolicy) -> None:
        assert tls_policy.receive_line(b"USER alice") == Reply(ok("Send PASS"))
        assert tls_policy.receive_line(b"PASS hunter2") == Login(b"alice", b"hunter2")
        assert tls_policy.phase is Phase.LOGGING_IN

    def test_user_pass_lower_case(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"user alice")
        assert tls_policy.receive_line(b"pass hunter2") == Login(b"alice", b"hunter2")

    def test_password_keeps_spaces(self, tls_policy: ClientPolicy) -> None:
        # RFC 1939 section 7: a password may contain spaces.
        tls_policy.receive_line(b"USER alice")
        action = tls_policy.receive_line(b"PASS correct horse  battery staple")
        assert action == Login(b"alice", b"correct horse  battery staple")

    def test_user_reply_is_the_same_for_every_name(self, tls_policy: ClientPolicy) -> None:
        # Nothing is checked before PASS: USER cannot probe for accounts.
        first = tls_policy.receive_line(b"USER alice")
        second = tls_policy.receive_line(b"USER no-such-user")
        assert first == second == Reply(ok("Send PASS"))

    def test_pass_without_user_is_an_error(self, tls_policy: ClientPolicy) -> None:
        reply = error_reply(tls_policy.receive_line(b"PASS hunter2"))
        assert reply.data == b"-ERR Send USER first\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_pass_consumes_the_user(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        assert is_error(tls_policy.receive_line(b"PASS"))  # empty password
        assert error_reply(tls_policy.receive_line(b"PASS x")).data == (b"-ERR Send USER first\r\n")

    @pytest.mark.parametrize("line", [b"USER", b"USER alice bob", b"USER " + b"a" * 256])
    def test_invalid_user_name_is_an_error(self, tls_policy: ClientPolicy, line: bytes) -> None:
        assert is_error(tls_policy.receive_line(line))
        assert not isinstance(tls_policy.receive_line(b"PASS hunter2"), Login)

    def test_backend_command_injection_via_user_control_bytes(
        self, tls_policy: ClientPolicy
    ) -> None:
        # A CR inside the line survives framing; replayed as "USER a\rDELE 1"
        # it could split into two commands on a lenient backend.
        assert is_error(tls_policy.receive_line(b"USER alice\rDELE 1"))
        assert not isinstance(tls_policy.receive_line(b"PASS hunter2"), Login)

    def test_backend_command_injection_via_pass_cr(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        action = tls_policy.receive_line(b"PASS hunter2\rDELE 1")
        assert is_error(action)
        assert tls_policy.phase is Phase.AUTHORIZATION

    # AUTH PLAIN

    def test_auth_plain_with_initial_response(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", b"hunter2"))
        assert action == Login(b"alice", b"hunter2")
        assert tls_policy.phase is Phase.LOGGING_IN

    def test_auth_plain_lower_case(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(b"auth plain " + plain(b"alice", b"hunter2"))
        assert action == Login(b"alice", b"hunter2")

    def test_auth_plain_with_continuation(self, tls_policy: ClientPolicy) -> None:
        assert tls_policy.receive_line(b"AUTH PLAIN") == Reply(CONTINUE)
        assert CONTINUE == b"+ \r\n"
        assert tls_policy.phase is Phase.SASL_PLAIN
        action = tls_policy.receive_line(plain(b"alice", b"hunter2"))
        assert action == Login(b"alice", b"hunter2")

    def test_auth_plain_password_keeps_spaces(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", b"two words"))
        assert action == Login(b"alice", b"two words")

    def test_auth_plain_empty_initial_response_is_malformed(self, tls_policy: ClientPolicy) -> None:
        # RFC 5034 section 4: "=" is an empty response, which PLAIN cannot be.
        reply = error_reply(tls_policy.receive_line(b"AUTH PLAIN ="))
        assert reply.data == b"-ERR Malformed SASL response\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize("line", [b"=", b""])
    def test_auth_plain_empty_continuation_is_malformed(
        self, tls_policy: ClientPolicy, line: bytes
    ) -> None:
        tls_policy.receive_line(b"AUTH PLAIN")
        reply = error_reply(tls_policy.receive_line(line))
        assert reply.data == b"-ERR Malformed SASL response\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_auth_plain_star_cancels(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"AUTH PLAIN")
        reply = error_reply(tls_policy.receive_line(b"*"))
        assert reply.data == b"-ERR Authentication cancelled\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION
        # The next line is a command again.
        assert as_reply(tls_policy.receive_line(b"CAPA")).data.startswith(b"+OK")

    def test_auth_plain_other_authzid_is_refused(self, tls_policy: ClientPolicy) -> None:
        # Acting as another user cannot be replayed with USER/PASS.
        action = tls_policy.receive_line(
            b"AUTH PLAIN " + plain(b"alice", b"hunter2", authzid=b"admin")
        )
        reply = error_reply(action)
        assert reply.data == b"-ERR Authorization identity not supported\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_auth_plain_same_authzid_is_accepted(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(
            b"AUTH PLAIN " + plain(b"alice", b"hunter2", authzid=b"alice")
        )
        assert action == Login(b"alice", b"hunter2")

    @pytest.mark.parametrize(
        "decoded",
        [b"alice\0hunter2", b"\0alice\0hunter2\0extra", b"no nul at all", b"\0\0"],
    )
    def test_auth_plain_wrong_shape_is_refused(
        self, tls_policy: ClientPolicy, decoded: bytes
    ) -> None:
        assert is_error(tls_policy.receive_line(b"AUTH PLAIN " + b64(decoded)))
        assert tls_policy.phase is Phase.AUTHORIZATION

    # AUTH LOGIN

    def test_auth_login_without_initial_response(self, tls_policy: ClientPolicy) -> None:
        assert tls_policy.receive_line(b"AUTH LOGIN") == Reply(LOGIN_USERNAME_PROMPT)
        assert base64.b64decode(LOGIN_USERNAME_PROMPT[2:-2]) == b"Username:"
        assert phase(tls_policy) is Phase.SASL_LOGIN_USER
        assert tls_policy.receive_line(b64(b"alice")) == Reply(LOGIN_PASSWORD_PROMPT)
        assert base64.b64decode(LOGIN_PASSWORD_PROMPT[2:-2]) == b"Password:"
        assert phase(tls_policy) is Phase.SASL_LOGIN_PASSWORD
        assert tls_policy.receive_line(b64(b"hunter2")) == Login(b"alice", b"hunter2")
        assert phase(tls_policy) is Phase.LOGGING_IN

    def test_auth_login_with_initial_response(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(b"AUTH LOGIN " + b64(b"alice"))
        assert action == Reply(LOGIN_PASSWORD_PROMPT)
        assert tls_policy.receive_line(b64(b"two words")) == Login(b"alice", b"two words")

    def test_auth_login_lower_case(self, tls_policy: ClientPolicy) -> None:
        assert tls_policy.receive_line(b"auth login") == Reply(LOGIN_USERNAME_PROMPT)

    @pytest.mark.parametrize("stage", ["user", "password"])
    def test_auth_login_star_cancels(self, tls_policy: ClientPolicy, stage: str) -> None:
        tls_policy.receive_line(b"AUTH LOGIN")
        if stage == "password":
            tls_policy.receive_line(b64(b"alice"))
        reply = error_reply(tls_policy.receive_line(b"*"))
        assert reply.data == b"-ERR Authentication cancelled\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION
        # The cancelled user name is not kept for a later PASS.
        assert not isinstance(tls_policy.receive_line(b"PASS hunter2"), Login)

    def test_auth_login_empty_password_is_refused(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"AUTH LOGIN " + b64(b"alice"))
        assert is_error(tls_policy.receive_line(b"="))
        assert tls_policy.phase is Phase.AUTHORIZATION

    # Malformed base64 (rule 4)

    @pytest.mark.parametrize("encoded", MALFORMED)
    def test_malformed_base64_plain_initial(self, tls_policy: ClientPolicy, encoded: bytes) -> None:
        reply = error_reply(tls_policy.receive_line(b"AUTH PLAIN " + encoded))
        assert reply.data == b"-ERR Malformed SASL response\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize("encoded", MALFORMED_LINES)
    def test_malformed_base64_plain_continuation(
        self, tls_policy: ClientPolicy, encoded: bytes
    ) -> None:
        tls_policy.receive_line(b"AUTH PLAIN")
        assert error_reply(tls_policy.receive_line(encoded)).data == (
            b"-ERR Malformed SASL response\r\n"
        )
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize("encoded", MALFORMED_LINES)
    def test_malformed_base64_login_user(self, tls_policy: ClientPolicy, encoded: bytes) -> None:
        tls_policy.receive_line(b"AUTH LOGIN")
        assert is_error(tls_policy.receive_line(encoded))
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize("encoded", MALFORMED)
    def test_malformed_base64_login_initial_user(
        self, tls_policy: ClientPolicy, encoded: bytes
    ) -> None:
        assert is_error(tls_policy.receive_line(b"AUTH LOGIN " + encoded))
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize("encoded", MALFORMED_LINES)
    def test_malformed_base64_login_password(
        self, tls_policy: ClientPolicy, encoded: bytes
    ) -> None:
        tls_policy.receive_line(b"AUTH LOGIN " + b64(b"alice"))
        assert is_error(tls_policy.receive_line(encoded))
        assert tls_policy.phase is Phase.AUTHORIZATION

    # Command injection into the backend's USER/PASS lines

    @pytest.mark.parametrize(
        ("user", "password"),
        [
            (b"alice", b"hunter2\r\nDELE 1"),
            (b"alice", b"hunter2\nDELE 1"),
            (b"alice", b"hunter2\rDELE 1"),
            (b"alice\r\nDELE 1", b"hunter2"),
            (b"alice\n", b"hunter2"),
            (b"alice bob", b"hunter2"),  # would be two USER arguments
            (b"alice\x7f", b"hunter2"),
            (b"alice\t", b"hunter2"),
            (b"", b"hunter2"),
            (b"alice", b""),
        ],
    )
    def test_backend_command_injection_via_auth_plain(
        self, tls_policy: ClientPolicy, user: bytes, password: bytes
    ) -> None:
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(user, password))
        reply = error_reply(action)
        assert reply.data == b"-ERR Invalid credentials syntax\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize(
        ("user", "password"),
        [
            (b"alice", b"hunter2\r\nDELE 1"),
            (b"alice", b"hunter2\nDELE 1"),
            (b"alice", b"hunter2\rDELE 1"),
            (b"alice", b"hunter2\0"),
            (b"alice", b"\0"),
            (b"alice\r\nDELE 1", b"hunter2"),
            (b"alice\0", b"hunter2"),
            (b"alice\n", b"hunter2"),
            (b"alice bob", b"hunter2"),
        ],
    )
    def test_backend_command_injection_via_auth_login(
        self, tls_policy: ClientPolicy, user: bytes, password: bytes
    ) -> None:
        tls_policy.receive_line(b"AUTH LOGIN " + b64(user))
        action = tls_policy.receive_line(b64(password))
        reply = error_reply(action)
        assert reply.data == b"-ERR Invalid credentials syntax\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_backend_command_injection_nul_in_plain_password(
        self, tls_policy: ClientPolicy
    ) -> None:
        # A NUL in the password splits the PLAIN message into four fields.
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", b"hun\0ter2"))
        assert is_error(action)

    def test_password_may_hold_other_bytes(self, tls_policy: ClientPolicy) -> None:
        # Only CR, LF and NUL can break the replayed PASS line.
        password = "pässwörd\t!".encode()
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", password))
        assert action == Login(b"alice", password)

    # APOP and the mechanism list

    def test_apop_is_refused_after_tls(self, tls_policy: ClientPolicy) -> None:
        action = tls_policy.receive_line(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb")
        reply = error_reply(action)
        assert reply.refusal is Refusal.PROTOCOL
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_bare_auth_lists_the_mechanisms(self, tls_policy: ClientPolicy) -> None:
        data = as_reply(tls_policy.receive_line(b"AUTH")).data
        assert multiline_body(data) == [b"PLAIN", b"LOGIN"]
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize(
        "line", [b"AUTH CRAM-MD5", b"AUTH XOAUTH2 dG9rZW4=", b"AUTH GSSAPI", b"AUTH EXTERNAL ="]
    )
    def test_unsupported_mechanism_is_an_error(self, tls_policy: ClientPolicy, line: bytes) -> None:
        reply = error_reply(tls_policy.receive_line(line))
        assert reply.data == b"-ERR Unsupported SASL mechanism\r\n"
        assert tls_policy.phase is Phase.AUTHORIZATION

    def test_auth_with_too_many_arguments_is_an_error(self, tls_policy: ClientPolicy) -> None:
        assert is_error(tls_policy.receive_line(b"AUTH PLAIN abc= def="))


# --- Rule 5 -------------------------------------------------------------------


class TestRule5Lines:
    """CRLF or a bare LF; a line longer than max_line gets -ERR and a close."""

    def test_line_too_long_closes(self) -> None:
        policy = before_tls()
        buffer = LineBuffer(255)
        with pytest.raises(LineTooLong):
            run_segment(policy, buffer, b"USER " + b"a" * 300 + b"\r\n")
        assert policy.line_too_long() == Close(LINE_TOO_LONG, CloseReason.LINE_TOO_LONG)
        assert LINE_TOO_LONG.startswith(b"-ERR ")
        assert policy.phase is Phase.CLOSED

    def test_bare_lf_is_tolerated(self, tls_policy: ClientPolicy) -> None:
        actions = run_segment(tls_policy, LineBuffer(255), b"USER alice\nPASS hunter2\n")
        assert actions == [Reply(ok("Send PASS")), Login(b"alice", b"hunter2")]


# --- Rule 6 -------------------------------------------------------------------


class TestRule6Pipelining:
    """Commands pipelined in one segment are answered in order, before login too."""

    def test_before_tls_in_order(self) -> None:
        policy = before_tls()
        actions = run_segment(policy, LineBuffer(8192), b"CAPA\r\nNOOP\r\nUSER a\r\nSTLS\r\n")
        assert len(actions) == 4
        assert as_reply(actions[0]).data.startswith(b"+OK Capability")
        assert as_reply(actions[1]).data == b"-ERR Not logged in\r\n"
        assert as_reply(actions[2]).data == TLS_REQUIRED
        assert isinstance(actions[3], StartTls)

    def test_after_tls_in_order(self, tls_policy: ClientPolicy) -> None:
        actions = run_segment(
            tls_policy, LineBuffer(8192), b"CAPA\r\nUSER alice\r\nPASS hunter2\r\n"
        )
        assert len(actions) == 3
        assert as_reply(actions[0]).data.startswith(b"+OK Capability")
        assert actions[1:] == [Reply(ok("Send PASS")), Login(b"alice", b"hunter2")]

    def test_sasl_exchange_pipelined(self, tls_policy: ClientPolicy) -> None:
        segment = b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"hunter2") + b"\r\n"
        actions = run_segment(tls_policy, LineBuffer(8192), segment)
        assert actions == [
            Reply(LOGIN_USERNAME_PROMPT),
            Reply(LOGIN_PASSWORD_PROMPT),
            Login(b"alice", b"hunter2"),
        ]


# --- Rule 7 -------------------------------------------------------------------


class TestRule7AfterLogin:
    """After the login the relay takes over; bytes behind the login line are kept."""

    def test_bytes_after_the_login_line_are_kept_in_order(self, tls_policy: ClientPolicy) -> None:
        buffer = LineBuffer(8192)
        actions = run_segment(
            tls_policy, buffer, b"USER alice\r\nPASS hunter2\r\nSTAT\r\nLIST\r\nRE"
        )
        assert actions[-1] == Login(b"alice", b"hunter2")
        tls_policy.login_succeeded()
        assert tls_policy.phase is Phase.TRANSACTION
        assert buffer.take_pending() == b"STAT\r\nLIST\r\nRE"

    def test_failed_login_then_pipelined_lines_are_commands(self, tls_policy: ClientPolicy) -> None:
        buffer = LineBuffer(8192)
        actions = run_segment(tls_policy, buffer, b"USER alice\r\nPASS wrong\r\nSTAT\r\n")
        assert actions[-1] == Login(b"alice", b"wrong")
        assert tls_policy.login_failed(ResponseCode.AUTH) == Reply(LOGIN_FAILED[ResponseCode.AUTH])
        assert tls_policy.phase is Phase.AUTHORIZATION
        assert run_segment(tls_policy, buffer, b"") == [
            Reply(b"-ERR Not logged in\r\n", Refusal.PROTOCOL, b"STAT")
        ]

    def test_lines_while_logging_in_are_refused(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS hunter2")
        action = tls_policy.receive_line(b"USER mallory")
        assert is_error(action)
        assert tls_policy.phase is Phase.LOGGING_IN

    def test_lines_in_transaction_are_not_handled(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS hunter2")
        tls_policy.login_succeeded()
        assert is_error(tls_policy.receive_line(b"STAT"))


# --- Login outcomes -----------------------------------------------------------


class TestLoginFailed:
    """A refused login: a fixed text with the backend's code, never its wording."""

    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (None, b"-ERR [AUTH] Authentication failed\r\n"),
            (ResponseCode.AUTH, b"-ERR [AUTH] Authentication failed\r\n"),
            (ResponseCode.IN_USE, b"-ERR [IN-USE] Mailbox in use by another session\r\n"),
            (ResponseCode.LOGIN_DELAY, b"-ERR [LOGIN-DELAY] Logged in too recently\r\n"),
            (ResponseCode.SYS_TEMP, b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n"),
            (ResponseCode.SYS_PERM, b"-ERR [SYS/PERM] Mailbox unavailable\r\n"),
        ],
    )
    def test_fixed_text_keeps_the_code(
        self, tls_policy: ClientPolicy, code: ResponseCode | None, expected: bytes
    ) -> None:
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS hunter2")
        assert tls_policy.login_failed(code) == Reply(expected)
        assert tls_policy.phase is Phase.AUTHORIZATION

    @pytest.mark.parametrize(
        "backend_line",
        [
            b"-ERR [AUTH] no such user alice@example.com",
            b"-ERR [IN-USE] alice's maildrop locked by pid 4711",
            b"-ERR [SYS/TEMP/DB] postgres at 10.0.0.9 down",
            b"-ERR user alice unknown",
        ],
    )
    def test_backend_user_enumeration_text_never_reaches_the_client(
        self, tls_policy: ClientPolicy, backend_line: bytes
    ) -> None:
        # The backend's wording can tell whether a user exists: only its code
        # goes through (RFC 2449 section 8).
        status = Status.parse(backend_line)
        assert status is not None
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS hunter2")
        reply = as_reply(tls_policy.login_failed(status.code))
        assert reply.data == LOGIN_FAILED[status.code]
        for word in (b"alice", b"4711", b"10.0.0.9", b"postgres", b"unknown"):
            assert word not in reply.data

    def test_user_is_forgotten_after_a_failure(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS wrong")
        tls_policy.login_failed(ResponseCode.AUTH)
        assert not isinstance(tls_policy.receive_line(b"PASS hunter2"), Login)

    def test_login_again_after_a_failure(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", b"wrong"))
        tls_policy.login_failed(None)
        action = tls_policy.receive_line(b"AUTH PLAIN " + plain(b"alice", b"hunter2"))
        assert action == Login(b"alice", b"hunter2")

    @pytest.mark.parametrize("code", [None, ResponseCode.AUTH])
    def test_max_auth_failures_closes(self, code: ResponseCode | None) -> None:
        policy = implicit(PolicySettings(max_auth_failures=3))
        outcomes: list[Action] = []
        for _ in range(3):
            policy.receive_line(b"USER alice")
            assert isinstance(policy.receive_line(b"PASS wrong"), Login)
            outcomes.append(policy.login_failed(code))
        failed = LOGIN_FAILED[ResponseCode.AUTH]
        # The failure itself is the last reply; then the connection ends.
        assert outcomes == [
            Reply(failed),
            Reply(failed),
            Close(failed, CloseReason.AUTH_FAILURES),
        ]
        assert policy.phase is Phase.CLOSED

    @pytest.mark.parametrize(
        "code", [ResponseCode.IN_USE, ResponseCode.SYS_TEMP, ResponseCode.LOGIN_DELAY]
    )
    def test_transient_failure_is_not_an_auth_failure(self, code: ResponseCode) -> None:
        # A locked maildrop or an unreachable backend says nothing about the
        # password; it must not lock the user out.
        policy = implicit(PolicySettings(max_auth_failures=2))
        for _ in range(5):
            policy.receive_line(b"USER alice")
            policy.receive_line(b"PASS hunter2")
            assert policy.login_failed(code) == Reply(LOGIN_FAILED[code])
        assert policy.auth_failures == 0
        assert policy.phase is Phase.AUTHORIZATION

    def test_login_succeeded_enters_transaction(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        tls_policy.receive_line(b"PASS hunter2")
        tls_policy.login_succeeded()
        assert tls_policy.phase is Phase.TRANSACTION


# --- QUIT, greeting, closes ---------------------------------------------------


class TestQuitAndCloses:
    @pytest.mark.parametrize("tls", [False, True])
    @pytest.mark.parametrize("line", [b"QUIT", b"quit"])
    def test_quit_closes(self, tls: bool, line: bytes) -> None:
        policy = implicit() if tls else before_tls()
        assert policy.receive_line(line) == Close(b"+OK Bye\r\n", CloseReason.QUIT)
        assert policy.phase is Phase.CLOSED

    def test_quit_during_user_pass(self, tls_policy: ClientPolicy) -> None:
        tls_policy.receive_line(b"USER alice")
        assert tls_policy.receive_line(b"QUIT") == Close(ok("Bye"), CloseReason.QUIT)

    def test_greeting_names_no_product(self) -> None:
        assert before_tls().greeting() == GREETING == b"+OK POP3 ready\r\n"

    def test_timed_out(self) -> None:
        policy = before_tls()
        assert policy.timed_out() == Close(LOGIN_TIMEOUT, CloseReason.TIMEOUT)
        assert policy.phase is Phase.CLOSED

    def test_shutting_down(self) -> None:
        policy = before_tls()
        assert policy.shutting_down() == Close(SHUTTING_DOWN, CloseReason.SHUTDOWN)
        assert SHUTTING_DOWN.startswith(b"-ERR [SYS/TEMP] ")


# --- secrets ----------------------------------------------------------------------


def _session_lines(password: bytes) -> Iterator[bytes]:
    yield b"USER alice"
    yield b"PASS " + password
    yield b"AUTH PLAIN " + plain(b"alice", password)
    yield b"AUTH PLAIN"
    yield plain(b"alice", password)
    yield b"AUTH LOGIN " + b64(b"alice")
    yield b64(password)


class TestSecretsNeverInRepr:
    """STYLE rule 6: over a whole session, no repr shows the password."""

    def test_login_repr_hides_the_password(self) -> None:
        login = Login(b"alice", b"hunter2")
        assert "hunter2" not in repr(login)
        assert "alice" in repr(login)

    def test_whole_session_reprs_hide_the_password(self) -> None:
        password = b"hunter2 with spaces"
        secrets = [
            password.decode(),
            b64(password).decode(),
            plain(b"alice", password).decode(),
        ]
        shown: list[str] = []
        policy = upgraded()
        for line in _session_lines(password):
            if policy.phase is Phase.AUTHORIZATION:
                shown.append(repr(Command.parse(line)))
            action = policy.receive_line(line)
            shown.append(repr(action))
            if isinstance(action, Login):
                assert action.password == password
                shown.append(repr(policy.login_failed(ResponseCode.AUTH)))
        for text in shown:
            for secret in secrets:
                assert secret not in text
                assert secret.upper() not in text
