"""Unit tests for poproxy.pop3: framing, commands, status lines, builders.

Sans-IO: no sockets, no event loop. Every framing test feeds its input whole,
one byte at a time, and in two chunks at every split point (h11's `tr()`),
and checks that the same lines and the same pending bytes come out.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from poproxy.pop3 import (
    CRLF,
    RFC2449_MAX_COMMAND,
    Command,
    LineBuffer,
    LineTooLong,
    ResponseCode,
    Status,
    capa,
    err,
    multiline,
    ok,
)

# A small limit keeps the "every split point" runs short; the limit logic does
# not depend on its size.
MAX_LINE = 16


# --- helpers ----------------------------------------------------------------


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every way the tests feed `data`: whole, byte by byte, two chunks at each split."""
    yield [data]
    yield [data[index : index + 1] for index in range(len(data))]
    for index in range(1, len(data)):
        yield [data[:index], data[index:]]


def feed_all(buffer: LineBuffer, chunks: list[bytes]) -> list[bytes]:
    """Feed chunk by chunk, draining complete lines after each, as the session does."""
    lines: list[bytes] = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (line := buffer.next_line()) is not None:
            lines.append(line)
    return lines


def tr(data: bytes, lines: list[bytes], pending: bytes = b"", max_line: int = MAX_LINE) -> None:
    """Feed `data` in every split; the same lines and pending bytes must come out."""
    for chunks in splits(data):
        buffer = LineBuffer(max_line)
        assert feed_all(buffer, chunks) == lines, chunks
        assert buffer.pending == len(pending), chunks
        assert buffer.take_pending() == pending, chunks
        assert buffer.pending == 0


def tr_too_long(data: bytes, max_line: int = MAX_LINE) -> None:
    """Feed `data` in every split; LineTooLong must be raised in each."""
    for chunks in splits(data):
        with pytest.raises(LineTooLong):
            feed_all(LineBuffer(max_line), chunks)


# --- LineBuffer: framing ---------------------------------------------------


class TestLineBufferFraming:
    def test_one_crlf_line(self) -> None:
        tr(b"CAPA\r\n", [b"CAPA"])

    def test_several_lines_in_one_segment(self) -> None:
        tr(b"CAPA\r\nUSER alice\r\nQUIT\r\n", [b"CAPA", b"USER alice", b"QUIT"])

    def test_bare_lf_ends_a_line(self) -> None:
        tr(b"CAPA\nQUIT\n", [b"CAPA", b"QUIT"])

    def test_crlf_and_bare_lf_mixed(self) -> None:
        tr(b"CAPA\nUSER a\r\nQUIT\n", [b"CAPA", b"USER a", b"QUIT"])

    def test_empty_lines(self) -> None:
        tr(b"\r\n\n\r\n", [b"", b"", b""])

    def test_lone_cr_does_not_end_a_line(self) -> None:
        # Only LF ends a line; a CR inside it is data and is kept.
        tr(b"PASS a\rb\r\n", [b"PASS a\rb"])

    def test_only_the_last_cr_is_stripped(self) -> None:
        tr(b"NOOP\r\r\n", [b"NOOP\r"])

    def test_nothing_fed(self) -> None:
        tr(b"", [])

    def test_partial_line_is_pending(self) -> None:
        tr(b"USER ali", [], b"USER ali")

    def test_cr_without_lf_is_pending(self) -> None:
        tr(b"CAPA\r", [], b"CAPA\r")

    def test_trailing_data_after_lines_is_pending(self) -> None:
        tr(b"CAPA\r\nSTLS\r\nUSER evil\r\nPA", [b"CAPA", b"STLS", b"USER evil"], b"PA")

    def test_next_line_returns_none_until_the_line_ends(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        for byte in b"CAPA\r":
            buffer.feed(bytes([byte]))
            assert buffer.next_line() is None
        buffer.feed(b"\n")
        assert buffer.next_line() == b"CAPA"
        assert buffer.next_line() is None
        assert buffer.pending == 0


class TestLineBufferPending:
    """take_pending returns exactly the bytes after the last returned line."""

    def test_take_pending_after_one_of_several_lines(self) -> None:
        # The STLS case: the session reads one line, then drops what follows.
        data = b"STLS\r\nUSER evil\r\nPASS evil\r\n"
        for chunks in splits(data):
            buffer = LineBuffer(MAX_LINE)
            for chunk in chunks:
                buffer.feed(chunk)
            assert buffer.next_line() == b"STLS"
            assert buffer.pending == len(b"USER evil\r\nPASS evil\r\n")
            assert buffer.take_pending() == b"USER evil\r\nPASS evil\r\n"
            assert buffer.pending == 0
            assert buffer.next_line() is None

    def test_take_pending_keeps_order_and_bare_lf(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"PASS x\r\nSTAT\nLIST 1\r\nRETR")
        assert buffer.next_line() == b"PASS x"
        assert buffer.take_pending() == b"STAT\nLIST 1\r\nRETR"

    def test_take_pending_when_empty(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        assert buffer.take_pending() == b""
        buffer.feed(b"CAPA\r\n")
        assert buffer.next_line() == b"CAPA"
        assert buffer.take_pending() == b""

    def test_take_pending_returns_bytes_not_a_view(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"abc")
        taken = buffer.take_pending()
        buffer.feed(b"xyz")
        assert type(taken) is bytes
        assert taken == b"abc"

    def test_buffer_works_after_take_pending(self) -> None:
        # After a scan found no LF, taking the pending bytes must reset the
        # scan position, or the next line would be missed.
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"abcdefgh")
        assert buffer.next_line() is None
        assert buffer.take_pending() == b"abcdefgh"
        buffer.feed(b"\n")
        assert buffer.next_line() == b""
        buffer.feed(b"QUIT\r\n")
        assert buffer.next_line() == b"QUIT"

    def test_scan_position_resets_after_a_line(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"CAPA")
        assert buffer.next_line() is None
        buffer.feed(b"\r\nQ")
        assert buffer.next_line() == b"CAPA"
        assert buffer.next_line() is None
        buffer.feed(b"UIT\n")
        assert buffer.next_line() == b"QUIT"


# --- LineBuffer: the length limit ----------------------------------------------


class TestLineBufferLimit:
    """max_line counts the whole line, terminator included (RFC 2449 section 4)."""

    def test_crlf_line_exactly_at_the_limit(self) -> None:
        line = b"x" * (MAX_LINE - 2)
        tr(line + CRLF, [line])

    def test_crlf_line_one_over_the_limit(self) -> None:
        tr_too_long(b"x" * (MAX_LINE - 1) + CRLF)

    def test_bare_lf_line_exactly_at_the_limit(self) -> None:
        line = b"x" * (MAX_LINE - 1)
        tr(line + b"\n", [line])

    def test_bare_lf_line_one_over_the_limit(self) -> None:
        tr_too_long(b"x" * MAX_LINE + b"\n")

    def test_unterminated_line_that_can_still_fit(self) -> None:
        # MAX_LINE - 1 bytes plus a bare LF is still a legal line.
        data = b"x" * (MAX_LINE - 1)
        tr(data, [], data)

    def test_unterminated_line_that_can_no_longer_fit(self) -> None:
        # MAX_LINE bytes and no LF yet: whatever comes, the line is too long.
        tr_too_long(b"x" * MAX_LINE)

    def test_unterminated_line_with_cr_at_the_limit(self) -> None:
        tr_too_long(b"x" * (MAX_LINE - 1) + b"\r")

    def test_every_line_may_reach_the_limit(self) -> None:
        line = b"y" * (MAX_LINE - 2)
        tr((line + CRLF) * 3, [line, line, line])

    def test_long_line_after_a_good_one(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"CAPA\r\n" + b"x" * (MAX_LINE - 1) + CRLF)
        assert buffer.next_line() == b"CAPA"
        with pytest.raises(LineTooLong):
            buffer.next_line()

    def test_long_partial_line_after_a_good_one(self) -> None:
        buffer = LineBuffer(MAX_LINE)
        buffer.feed(b"CAPA\r\n" + b"x" * MAX_LINE)
        assert buffer.next_line() == b"CAPA"
        with pytest.raises(LineTooLong):
            buffer.next_line()

    def test_good_line_then_partial_line_over_several_feeds(self) -> None:
        # The limit applies to the current line, not to all bytes ever fed.
        buffer = LineBuffer(MAX_LINE)
        for _ in range(10):
            buffer.feed(b"x" * (MAX_LINE - 2))
            assert buffer.next_line() is None
            buffer.feed(CRLF)
            assert buffer.next_line() == b"x" * (MAX_LINE - 2)

    def test_rfc2449_minimum_command_length(self) -> None:
        line = b"AUTH PLAIN " + b"A" * (RFC2449_MAX_COMMAND - len(b"AUTH PLAIN ") - 2)
        tr(line + CRLF, [line], max_line=RFC2449_MAX_COMMAND)
        tr_too_long(line + b"A" + CRLF, max_line=RFC2449_MAX_COMMAND)

    def test_100kb_line_without_crlf_in_chunks_raises_at_the_limit(self) -> None:
        # Memory stays bounded: the buffer never grows past one chunk beyond
        # the limit before LineTooLong.
        max_line, chunk = 8192, 1000
        data = b"A" * 100_000
        buffer = LineBuffer(max_line)
        fed = 0
        with pytest.raises(LineTooLong):
            for start in range(0, len(data), chunk):
                buffer.feed(data[start : start + chunk])
                fed += chunk
                buffer.next_line()
        assert max_line <= fed < max_line + chunk
        assert buffer.pending == fed

    def test_100kb_line_without_crlf_byte_by_byte_raises_at_the_limit(self) -> None:
        max_line = 8192
        buffer = LineBuffer(max_line)
        fed = 0
        with pytest.raises(LineTooLong):
            for _ in range(100_000):
                buffer.feed(b"A")
                fed += 1
                buffer.next_line()
        assert fed == max_line


# --- Command ------------------------------------------------------------------


class TestCommandParse:
    @pytest.mark.parametrize(
        ("line", "verb", "argument"),
        [
            (b"CAPA", b"CAPA", b""),
            (b"capa", b"CAPA", b""),
            (b"Stls", b"STLS", b""),
            (b"user alice", b"USER", b"alice"),
            (b"USER Alice", b"USER", b"Alice"),  # the argument keeps its case
            (b"RETR 1", b"RETR", b"1"),
            (b"top 1 10", b"TOP", b"1 10"),
            (b"auth plain AGFsaWNlAHNlY3JldA==", b"AUTH", b"plain AGFsaWNlAHNlY3JldA=="),
            (b"", b"", b""),
        ],
    )
    def test_verb_is_upper_cased(self, line: bytes, verb: bytes, argument: bytes) -> None:
        command = Command.parse(line)
        assert command.verb == verb
        assert command.argument == argument

    def test_pass_keeps_spaces_in_the_password(self) -> None:
        # RFC 1939 section 7: the password may contain spaces.
        command = Command.parse(b"PASS correct horse  battery staple")
        assert command.verb == b"PASS"
        assert command.argument == b"correct horse  battery staple"

    def test_arguments_split_on_whitespace(self) -> None:
        assert Command.parse(b"TOP 1 10").arguments == [b"1", b"10"]
        assert Command.parse(b"CAPA").arguments == []

    def test_is_frozen(self) -> None:
        command = Command.parse(b"USER alice")
        with pytest.raises(AttributeError):
            command.verb = b"PASS"  # type: ignore[misc]


class TestCommandRepr:
    """STYLE rule 6: a secret cannot reach a log line through a Command."""

    @pytest.mark.parametrize(
        ("line", "secret"),
        [
            (b"PASS hunter2", b"hunter2"),
            (b"pass hunter2", b"hunter2"),
            (b"PASS correct horse battery", b"horse"),
            (b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", b"c4c9334bac560ecc979e58001b3e22fb"),
            (b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=", b"AGFsaWNlAGh1bnRlcjI="),
            (b"auth plain AGFsaWNlAGh1bnRlcjI=", b"AGFsaWNlAGh1bnRlcjI="),
            (b"AUTH LOGIN YWxpY2U=", b"YWxpY2U="),
        ],
    )
    def test_secret_argument_never_in_repr(self, line: bytes, secret: bytes) -> None:
        command = Command.parse(line)
        shown = secret.decode()
        for text in (repr(command), str(command), f"{command!r}", repr([command])):
            assert shown not in text
            assert shown.upper() not in text
            assert "***" in text

    def test_pass_repr(self) -> None:
        assert repr(Command.parse(b"PASS hunter2")) == "Command(PASS ***)"

    def test_apop_hides_the_user_and_digest(self) -> None:
        text = repr(Command.parse(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb"))
        assert "mrose" not in text
        assert text.startswith("Command(APOP")

    def test_auth_shows_the_mechanism_not_the_initial_response(self) -> None:
        text = repr(Command.parse(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI="))
        assert "PLAIN" in text
        assert "AGFsaWNl" not in text

    def test_auth_without_initial_response_shows_the_mechanism(self) -> None:
        assert "LOGIN" in repr(Command.parse(b"AUTH LOGIN"))

    def test_bare_auth_repr_does_not_crash(self) -> None:
        # Regression: a bare AUTH (answered with the mechanism list) once made
        # the repr index an empty argument list and raise IndexError.
        assert repr(Command.parse(b"AUTH")) == "Command(AUTH ***)"
        assert repr(Command.parse(b"auth")) == "Command(AUTH ***)"

    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"USER alice", "Command(USER alice)"),
            (b"user alice", "Command(USER alice)"),
            (b"STAT", "Command(STAT)"),
            (b"RETR 1", "Command(RETR 1)"),
            (b"TOP 1 10", "Command(TOP 1 10)"),
            (b"CAPA", "Command(CAPA)"),
        ],
    )
    def test_other_commands_show_their_arguments(self, line: bytes, expected: str) -> None:
        assert repr(Command.parse(line)) == expected


# --- Status ---------------------------------------------------------------------


class TestStatusParse:
    @pytest.mark.parametrize(
        ("line", "is_ok", "code", "text"),
        [
            (b"+OK", True, None, b""),
            (b"+OK 2 320", True, None, b"2 320"),
            (
                b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
                True,
                None,
                b"POP3 server ready <1896.697170952@dbc.mtview.ca.us>",
            ),
            (b"-ERR", False, None, b""),
            (b"-ERR no such message", False, None, b"no such message"),
            (b"-ERR [AUTH] bad password", False, ResponseCode.AUTH, b"bad password"),
            (b"-ERR [IN-USE] locked", False, ResponseCode.IN_USE, b"locked"),
            (b"-ERR [LOGIN-DELAY] wait", False, ResponseCode.LOGIN_DELAY, b"wait"),
            (b"-ERR [SYS/TEMP] later", False, ResponseCode.SYS_TEMP, b"later"),
            (b"-ERR [SYS/PERM] gone", False, ResponseCode.SYS_PERM, b"gone"),
            (b"+OK [IN-USE] odd but parsed", True, ResponseCode.IN_USE, b"odd but parsed"),
            (b"-ERR [AUTH]", False, ResponseCode.AUTH, b""),
            (b"-ERR[AUTH]no spaces", False, ResponseCode.AUTH, b"no spaces"),
        ],
    )
    def test_status_line(
        self, line: bytes, is_ok: bool, code: ResponseCode | None, text: bytes
    ) -> None:
        assert Status.parse(line) == Status(is_ok, code, text)

    @pytest.mark.parametrize(
        ("line", "code"),
        [
            # RFC 2449 section 8: codes are hierarchical; a sub-code is its parent.
            (b"-ERR [SYS/TEMP/SOMETHING] x", ResponseCode.SYS_TEMP),
            (b"-ERR [SYS/PERM/QUOTA/HARD] x", ResponseCode.SYS_PERM),
            (b"-ERR [AUTH/EXPIRED] x", ResponseCode.AUTH),
            (b"-ERR [IN-USE/OTHER] x", ResponseCode.IN_USE),
        ],
    )
    def test_hierarchical_code(self, line: bytes, code: ResponseCode) -> None:
        status = Status.parse(line)
        assert status is not None
        assert status.code is code
        assert status.text == b"x"

    @pytest.mark.parametrize(
        ("line", "code"),
        [
            (b"-ERR [auth] x", ResponseCode.AUTH),
            (b"-ERR [sys/temp] x", ResponseCode.SYS_TEMP),
            (b"-ERR [In-Use] x", ResponseCode.IN_USE),
            (b"-ERR [Sys/Temp/Something] x", ResponseCode.SYS_TEMP),
        ],
    )
    def test_code_is_case_insensitive(self, line: bytes, code: ResponseCode) -> None:
        status = Status.parse(line)
        assert status is not None
        assert status.code is code

    @pytest.mark.parametrize(
        "line",
        [
            b"-ERR [SYS] x",
            b"-ERR [AUTHENTICATION] x",  # a prefix is not a parent code
            b"-ERR [SYS/TEMPORARY] x",
            b"-ERR [XYZZY] x",
            b"-ERR [] x",
        ],
    )
    def test_unknown_code_is_none(self, line: bytes) -> None:
        status = Status.parse(line)
        assert status is not None
        assert not status.ok
        assert status.code is None
        assert status.text == b"x"

    def test_unclosed_bracket_is_text(self) -> None:
        assert Status.parse(b"-ERR [AUTH bad") == Status(False, None, b"[AUTH bad")

    @pytest.mark.parametrize(
        "line",
        [b"", b"OK", b"+ok", b"-err x", b"+ VXNlcm5hbWU6", b"* OK", b" +OK", b"ERR", b"\x00+OK"],
    )
    def test_garbage_is_none(self, line: bytes) -> None:
        assert Status.parse(line) is None


# --- builders -----------------------------------------------------------------


class TestBuilders:
    def test_ok(self) -> None:
        assert ok() == b"+OK\r\n"
        assert ok("Bye") == b"+OK Bye\r\n"

    def test_err(self) -> None:
        assert err("No such message") == b"-ERR No such message\r\n"
        assert err("Authentication failed", ResponseCode.AUTH) == (
            b"-ERR [AUTH] Authentication failed\r\n"
        )
        assert err("later", ResponseCode.SYS_TEMP) == b"-ERR [SYS/TEMP] later\r\n"

    def test_err_round_trips_through_status(self) -> None:
        for code in ResponseCode:
            line = err("text", code)
            assert line.endswith(CRLF)
            assert Status.parse(line[:-2]) == Status(False, code, b"text")

    def test_multiline_dot_stuffs(self) -> None:
        # RFC 1939 section 3: a line starting with "." gets one more ".".
        assert multiline(b"+OK\r\n", [b"a", b".b", b"..", b"."]) == (
            b"+OK\r\na\r\n..b\r\n...\r\n..\r\n.\r\n"
        )

    def test_multiline_dot_inside_a_line_is_left_alone(self) -> None:
        assert multiline(b"+OK\r\n", [b"a.b", b" ."]) == b"+OK\r\na.b\r\n .\r\n.\r\n"

    def test_multiline_empty(self) -> None:
        assert multiline(b"+OK\r\n", []) == b"+OK\r\n.\r\n"

    def test_multiline_round_trip(self) -> None:
        lines = [b"From: a", b".", b"..x", b"", b"end."]
        received = feed_all(LineBuffer(1024), [multiline(b"+OK\r\n", lines)])
        assert received[0] == b"+OK"
        assert received[-1] == b"."
        unstuffed = [line[1:] if line.startswith(b".") else line for line in received[1:-1]]
        assert unstuffed == lines

    def test_capa(self) -> None:
        assert capa([b"TOP", b"USER", b"SASL PLAIN LOGIN"]) == (
            b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
        )

    def test_capa_empty(self) -> None:
        assert capa([]) == b"+OK Capability list follows\r\n.\r\n"


def test_tab_separated_pass_is_still_redacted() -> None:
    command = Command.parse(b"PASS\tsecret word")
    assert command.verb == b"PASS"
    assert command.argument == b"secret word"
    assert "secret" not in repr(command)
