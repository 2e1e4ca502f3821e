"""The mail clients of the matrix: how each is run, and what it does to a message it stores.

Each :class:`Client` turns a :class:`Target` (poproxy's two ports, the test CA, the account)
into an :class:`Invocation` of the real program, in keep or delete mode, with TLS or, for the
refusal check, with TLS turned off; and reads back the messages the program delivered, in the
order it delivered them. Every program runs in its own process group, so that a test can kill
it with everything it started (fetchmail's MDA, getmail's delivery shell).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import ClassVar, Literal

from support.interop import require_program

Tls = Literal["implicit", "starttls"]

RUN_TIMEOUT = 90.0  # one client run, 5 MB message included
SERVER_NAME = "localhost"  # the name the test certificate carries as CN and SAN

# Stores the message on stdin as the next numbered file in the directory $1: the MDA of
# fetchmail and getmail.
DELIVER_SCRIPT = """\
#!/bin/sh
set -e
n=$(ls "$1" | wc -l)
cat > "$1/$(printf %04d "$n")"
"""


@dataclass(frozen=True)
class Target:
    """What a client is told: where poproxy listens, whom to trust, which account."""

    implicit: tuple[str, int]
    starttls: tuple[str, int]
    ca_file: Path
    user: str
    password: str
    count: int  # messages in the mailbox: curl and the openssl script fetch them by number

    def address(self, tls: Tls) -> tuple[str, int]:
        return self.implicit if tls == "implicit" else self.starttls


@dataclass
class Invocation:
    argv: list[str]
    stdin: bytes = b""
    # Or a POP3 dialogue on stdin and stdout, one command at a time, each sent when the
    # reply to the one before is complete (after a greeting first if ``greeting``).
    dialogue: list[bytes] | None = None
    greeting: bool = False
    env: dict[str, str] | None = None
    pty: bool = False  # run on a pseudo-terminal (mutt's curses)


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    def describe(self) -> str:
        out = self.stdout[-1500:].decode("utf-8", "replace")
        err = self.stderr[-1500:].decode("utf-8", "replace")
        return f"exit status {self.returncode}\nstdout: ...{out}\nstderr: ...{err}"


def crlf_to_lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


class Client(abc.ABC):
    key: ClassVar[str]  # "curl-pop3s"
    program: ClassVar[str]  # "curl"
    title: ClassVar[str]  # column heading
    tls: ClassVar[Tls]
    # How the client stores what it received (the served message, un-dot-stuffed).
    rule: ClassVar[str] = "As received, byte for byte."
    # Whether its delete mode sends DELE for a message right after retrieving it (rather
    # than all at the end): then the kill check also proves that DELE without QUIT is lost.
    deletes_as_it_goes: ClassVar[bool] = False
    # Whether it can be run with TLS turned off at all; if not, why.
    no_tls_unsupported: ClassVar[str | None] = None
    # Whether its exit status tells a failed login (mutt's does not).
    exit_status_reports_failure: ClassVar[bool] = True

    @classmethod
    def version(cls) -> str:
        return _version(cls.program)

    def delivered(self, served: bytes) -> bytes:
        """What the client stores for a message it received as ``served``."""
        return served

    @abc.abstractmethod
    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation: ...

    @abc.abstractmethod
    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        """The messages the run delivered, in the order it retrieved them."""


def _numbered_files(directory: Path) -> list[bytes]:
    if not directory.is_dir():
        return []
    return [path.read_bytes() for path in sorted(directory.iterdir())]


@cache
def _version(program: str) -> str:
    if program == "poplib":
        return f"Python {sys.version.split()[0]}"
    path = require_program(program)
    argv = {
        "curl": [path, "--version"],
        "fetchmail": [path, "--version"],
        "getmail": [path, "--version"],
        "openssl": [path, "version"],
        "mutt": [path, "-v"],
    }[program]
    output = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    text = output.stdout + output.stderr
    patterns = {
        "curl": r"^curl (\S+)",
        "fetchmail": r"This is fetchmail release ([^\s+]+)",
        "getmail": r"^getmail (\S+)",
        "openssl": r"^OpenSSL (\S+)",
        "mutt": r"^Mutt (\S+)",
    }
    match = re.search(patterns[program], text, re.MULTILINE)
    return f"{program} {match.group(1)}" if match else f"{program} (version unknown)"


# --- Python poplib -------------------------------------------------------------------------

POPLIB_SCRIPT = """\
import json, pathlib, poplib, ssl, sys
a = json.loads(sys.argv[1])
host, port = a["address"]
if a["tls"] == "implicit":
    context = ssl.create_default_context(cafile=a["ca"])
    client = poplib.POP3_SSL(host, port, context=context, timeout=30)
else:
    client = poplib.POP3(host, port, timeout=30)
    if a["tls"] == "starttls":
        client.stls(ssl.create_default_context(cafile=a["ca"]))
client.user(a["user"])
client.pass_(a["password"])
count = client.stat()[0]
out = pathlib.Path(a["out"])
for number in range(1, count + 1):
    _, lines, _ = client.retr(number)
    (out / f"{number:04d}").write_bytes(b"".join(line + b"\\r\\n" for line in lines))
    if a["delete"]:
        client.dele(number)
client.quit()
"""


class Poplib(Client):
    program = "poplib"
    rule = "Lines as poplib returns them (un-dot-stuffed, without line ends), joined by CRLF."
    deletes_as_it_goes = True  # the script sends DELE after each RETR

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        out = workdir / "out"
        out.mkdir()
        arguments = {
            "address": target.address(self.tls),
            "tls": self.tls if tls else "none",
            "ca": str(target.ca_file),
            "user": target.user,
            "password": target.password,
            "out": str(out),
            "delete": delete,
        }
        return Invocation([sys.executable, "-c", POPLIB_SCRIPT, json.dumps(arguments)])

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        return _numbered_files(workdir / "out")


class PoplibPop3s(Poplib):
    key = "poplib-pop3s"
    title = "poplib POP3_SSL"
    tls = "implicit"


class PoplibStls(Poplib):
    key = "poplib-stls"
    title = "poplib stls()"
    tls = "starttls"


# --- curl ----------------------------------------------------------------------------------


class Curl(Client):
    program = "curl"
    rule = "As received (one RETR per URL, each written to its own file)."

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        out = workdir / "out"
        out.mkdir()
        host, port = target.address(self.tls)
        scheme = "pop3s" if self.tls == "implicit" and tls else "pop3"
        common = ["--max-time", "60", "-u", f"{target.user}:{target.password}"]
        if tls:
            common += ["--cacert", str(target.ca_file)]
            if self.tls == "starttls":
                common.append("--ssl-reqd")
        # With TLS off, one message is enough: curl would try (and fail) each URL in turn.
        count = target.count if tls else 1
        urls = [f"{scheme}://{host}:{port}/{n}" for n in range(1, count + 1)]
        argv = [require_program("curl"), "--silent", "--show-error", *common]
        for number, url in enumerate(urls, start=1):
            argv += [url, "-o", str(out / f"{number:04d}")]
        if delete and tls:
            # A second transfer group on the same connection: DELE each message; curl's QUIT
            # at the end commits them.
            argv += ["--next", *common, "--request", "DELE", "--head", *urls]
        return Invocation(argv)

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        return _numbered_files(workdir / "out")


class CurlPop3s(Curl):
    key = "curl-pop3s"
    title = "curl pop3s://"
    tls = "implicit"


class CurlStls(Curl):
    key = "curl-stls"
    title = "curl pop3:// --ssl-reqd"
    tls = "starttls"


# --- fetchmail -----------------------------------------------------------------------------


class Fetchmail(Client):
    program = "fetchmail"
    rule = (
        "As received: the MDA (a shell script) writes each message to a file; `set invisible` "
        "keeps fetchmail from adding a Received line, `no stripcr` keeps the CRs, "
        "`no rewrite` leaves the addresses alone."
    )
    deletes_as_it_goes = True

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        out = workdir / "out"
        out.mkdir()
        deliver = workdir / "deliver.sh"
        deliver.write_text(DELIVER_SCRIPT)
        deliver.chmod(0o755)
        host, port = target.address(self.tls)
        if not tls:
            security = "sslproto '' no sslcertck"
        else:
            security = (
                f'sslproto "TLS1.2+" sslcertck sslcertfile "{target.ca_file}" '
                f'sslcommonname "{SERVER_NAME}"'
            )
            if self.tls == "implicit":
                security = "ssl " + security
        rc = workdir / "fetchmailrc"
        rc.write_text(
            f"""\
set no syslog
set no bouncemail
set invisible
poll {host} service {port} protocol pop3 auth password timeout 30
  user "{target.user}" there with password "{target.password}" is "root" here
  {security}
  fetchall {"nokeep" if delete else "keep"} no rewrite no stripcr
  mda "{deliver} {out}"
"""
        )
        rc.chmod(0o600)
        env = {**os.environ, "HOME": str(workdir), "FETCHMAILHOME": str(workdir)}
        return Invocation([require_program("fetchmail"), "--nodetach", "-f", str(rc)], env=env)

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        return _numbered_files(workdir / "out")


class FetchmailPop3s(Fetchmail):
    key = "fetchmail-pop3s"
    title = "fetchmail ssl"
    tls = "implicit"


class FetchmailStls(Fetchmail):
    key = "fetchmail-stls"
    title = "fetchmail STLS"
    tls = "starttls"


# --- getmail6 ------------------------------------------------------------------------------

_RETURN_PATH = re.compile(rb"^Return-Path:[ \t]*(.*?)\r?\n(?![ \t])", re.IGNORECASE | re.MULTILINE)


class GetmailPop3s(Client):
    key = "getmail-pop3s"
    program = "getmail"
    title = "getmail6 POP3-SSL"
    tls = "implicit"
    rule = (
        "getmail re-writes the message through Python's email package: a `Return-Path:` line "
        "first (the message's own address, else `<unknown>`; any other Return-Path line is "
        "removed), then the message with LF line ends (received, delivered_to: off)."
    )
    deletes_as_it_goes = True

    def delivered(self, served: bytes) -> bytes:
        header_end = served.find(b"\r\n\r\n")
        header = served[: header_end + 2] if header_end >= 0 else served
        match = _RETURN_PATH.search(header)
        address = b"unknown"
        if match:
            address = match.group(1).strip().strip(b"<>") or b"unknown"
            served = served[: match.start()] + served[match.end() :]
        return b"Return-Path: <" + address + b">\n" + crlf_to_lf(served)

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        out = workdir / "out"
        out.mkdir()
        state = workdir / "getmail"
        state.mkdir()
        deliver = workdir / "deliver.sh"
        deliver.write_text(DELIVER_SCRIPT)
        host, port = target.address(self.tls)
        if tls:
            retriever = (
                f"type = SimplePOP3SSLRetriever\nca_certs = {target.ca_file}\n"
                f"ssl_cert_hostname = {SERVER_NAME}\n"
            )
        else:
            retriever = "type = SimplePOP3Retriever\n"
        rc = workdir / "getmailrc"
        rc.write_text(
            f"""\
[retriever]
{retriever}server = {host}
port = {port}
username = {target.user}
password = {target.password}
timeout = 30

[destination]
type = MDA_external
path = /bin/sh
arguments = ("{deliver}", "{out}")
unixfrom = false
# The tests run as root; the MDA is the test's own script.
allow_root_commands = true

[options]
read_all = true
delete = {"true" if delete else "false"}
received = false
delivered_to = false
message_log_syslog = false
verbose = 0
"""
        )
        return Invocation([require_program("getmail"), f"--rcfile={rc}", f"--getmaildir={state}"])

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        return _numbered_files(workdir / "out")


# --- openssl s_client ----------------------------------------------------------------------


class Openssl(Client):
    program = "openssl"
    rule = (
        "A POP3 session typed into it one command at a time (USER, PASS, RETR each message, "
        "DELE each in delete mode, QUIT), each sent when the reply to the one before is "
        "complete; the RETR replies are read from its output and un-dot-stuffed."
    )
    deletes_as_it_goes = True
    no_tls_unsupported = "s_client always speaks TLS: there is no way to turn it off."

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        if not tls:
            raise ValueError(self.no_tls_unsupported)
        host, port = target.address(self.tls)
        argv = [require_program("openssl"), "s_client", "-quiet", "-connect", f"{host}:{port}"]
        if self.tls == "starttls":
            argv += ["-starttls", "pop3"]
        argv += [
            "-CAfile", str(target.ca_file), "-verify_return_error",
            "-verify_hostname", SERVER_NAME, "-servername", SERVER_NAME,
        ]  # fmt: skip
        script = [f"USER {target.user}", f"PASS {target.password}"]
        for number in range(1, target.count + 1):
            script.append(f"RETR {number}")
            if delete:
                script.append(f"DELE {number}")
        script.append("QUIT")
        (workdir / "script").write_text("".join(line + "\r\n" for line in script))
        # One command at a time, like a person at the keyboard: a pipelined QUIT would reach
        # the server before a kill could stop it. (-quiet implies -ign_eof: s_client reads
        # on after its input ends, until the server closes after QUIT.)
        return Invocation(
            argv,
            dialogue=[line.encode() for line in script],
            greeting=self.tls == "implicit",
        )

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        """Follow the script: a status line per command, and after a RETR's +OK the message
        up to the line ".", un-dot-stuffed."""
        commands = (workdir / "script").read_bytes().splitlines()
        lines = iter(result.stdout.splitlines(keepends=True))
        if self.tls == "implicit":
            next(lines, None)  # the greeting (with -starttls, s_client reads it itself)
        messages: list[bytes] = []
        for command in commands:
            status = next(lines, b"")
            if not (command.startswith(b"RETR ") and status.startswith(b"+OK")):
                continue
            body: list[bytes] = []
            for line in lines:
                if line == b".\r\n":
                    messages.append(b"".join(body))
                    break
                body.append(line[1:] if line.startswith(b".") else line)
        return messages


class OpensslPop3s(Openssl):
    key = "openssl-pop3s"
    title = "openssl s_client"
    tls = "implicit"


class OpensslStls(Openssl):
    key = "openssl-stls"
    title = "openssl s_client -starttls pop3"
    tls = "starttls"


# --- mutt ----------------------------------------------------------------------------------


class Mutt(Client):
    program = "mutt"
    rule = (
        "`<fetch-mail>` into a Maildir spool: each message with LF line ends (mutt stores "
        "local mail the Unix way)."
    )
    exit_status_reports_failure = False  # it shows the error on its screen, then quits

    def delivered(self, served: bytes) -> bytes:
        return crlf_to_lf(served)

    def invocation(
        self, target: Target, workdir: Path, *, delete: bool, tls: bool = True
    ) -> Invocation:
        spool = workdir / "spool"
        for sub in ("cur", "new", "tmp"):
            (spool / sub).mkdir(parents=True)
        host, port = target.address(self.tls)
        scheme = "pops" if self.tls == "implicit" and tls else "pop"
        rc = workdir / "muttrc"
        rc.write_text(
            f"""\
set pop_host="{scheme}://{target.user}@{host}:{port}"
set pop_pass="{target.password}"
set pop_delete={"yes" if delete else "no"}
set pop_last=no
set pop_reconnect=no
set spoolfile="{spool}"
set folder="{workdir}"
set mbox_type=Maildir
set certificate_file="{target.ca_file}"
set ssl_verify_host=yes
set ssl_starttls={"yes" if tls else "no"}
set ssl_force_tls={"yes" if tls else "no"}
set quit=yes
set move=no
set mail_check_stats=no
set header_cache=""
set sleep_time=0
"""
        )
        env = {**os.environ, "HOME": str(workdir), "TERM": "xterm", "LC_ALL": "C.UTF-8"}
        argv = [require_program("mutt"), "-n", "-F", str(rc), "-e", "push <fetch-mail><quit>"]
        return Invocation(argv, env=env, pty=True)

    def messages(self, workdir: Path, result: Result) -> list[bytes]:
        spool = workdir / "spool"
        files = [p for sub in ("cur", "new") for p in (spool / sub).glob("*") if p.is_file()]

        def order(path: Path) -> tuple[int, int]:
            # mutt names them TIME.PID_N.HOST, N counting up within the run.
            match = re.match(r"(\d+)\.\d+_(\d+)\.", path.name)
            return (int(match.group(1)), int(match.group(2))) if match else (0, 0)

        return [path.read_bytes() for path in sorted(files, key=order)]


class MuttPop3s(Mutt):
    key = "mutt-pops"
    title = "mutt pops://"
    tls = "implicit"


class MuttStls(Mutt):
    key = "mutt-stls"
    title = "mutt pop:// ssl_starttls"
    tls = "starttls"


CLIENTS: dict[str, Client] = {
    client.key: client
    for client in (
        PoplibPop3s(),
        PoplibStls(),
        CurlPop3s(),
        CurlStls(),
        FetchmailPop3s(),
        FetchmailStls(),
        GetmailPop3s(),
        OpensslPop3s(),
        OpensslStls(),
        MuttPop3s(),
        MuttStls(),
    )
}


# --- running them --------------------------------------------------------------------------


@dataclass
class Running:
    """A client started in its own process group."""

    process: asyncio.subprocess.Process
    _pty_master: int | None = None
    _output: bytearray = field(default_factory=bytearray)
    _tasks: list[asyncio.Task[bytes]] = field(default_factory=list)

    def kill(self) -> None:
        """SIGKILL the client and everything it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def finish(self) -> Result:
        """Wait for the client to end, at most RUN_TIMEOUT seconds (then kill it)."""
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                if self._tasks:
                    stdout, stderr = await asyncio.gather(*self._tasks)
                    await self.process.wait()
                elif self._pty_master is None:
                    stdout, stderr = await self.process.communicate()
                else:
                    await self.process.wait()
                    stdout, stderr = bytes(self._output), b""
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise
        finally:
            self._close_pty()
        assert self.process.returncode is not None
        return Result(self.process.returncode, stdout, stderr)

    def _close_pty(self) -> None:
        if self._pty_master is not None:
            asyncio.get_running_loop().remove_reader(self._pty_master)
            os.close(self._pty_master)
            self._pty_master = None


async def _converse(process: asyncio.subprocess.Process, invocation: Invocation) -> bytes:
    """Hold the POP3 dialogue of ``invocation``; everything read from stdout."""
    assert process.stdin is not None and process.stdout is not None
    assert invocation.dialogue is not None
    output = bytearray()

    async def line() -> bytes:
        assert process.stdout is not None
        data = await process.stdout.readline()
        output.extend(data)
        return data

    try:
        if invocation.greeting:
            await line()
        for command in invocation.dialogue:
            process.stdin.write(command + b"\r\n")
            await process.stdin.drain()
            status = await line()
            if not status:
                break
            verb, _, argument = command.partition(b" ")
            multiline = verb.upper() in (b"RETR", b"TOP", b"CAPA") or (
                verb.upper() in (b"LIST", b"UIDL") and not argument
            )
            if multiline and status.startswith(b"+OK"):
                while (data := await line()) not in (b".\r\n", b""):
                    pass
                if not data:
                    break
        process.stdin.close()
        while await line():
            pass
    except ConnectionError:  # killed
        pass
    return bytes(output)


async def start(invocation: Invocation) -> Running:
    if invocation.dialogue is not None:
        process = await asyncio.create_subprocess_exec(
            *invocation.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=invocation.env,
            start_new_session=True,
        )
        assert process.stderr is not None
        tasks = [
            asyncio.create_task(_converse(process, invocation)),
            asyncio.create_task(process.stderr.read()),
        ]
        return Running(process, _tasks=tasks)
    if not invocation.pty:
        process = await asyncio.create_subprocess_exec(
            *invocation.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=invocation.env,
            start_new_session=True,
        )
        assert process.stdin is not None
        process.stdin.write(invocation.stdin)
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()
        return Running(process)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = await asyncio.create_subprocess_exec(
            *invocation.argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=invocation.env,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    running = Running(process, master)
    os.set_blocking(master, False)

    def drain() -> None:
        try:
            running._output += os.read(master, 65536)
        except OSError:  # EIO once the program has closed the terminal
            asyncio.get_running_loop().remove_reader(master)

    asyncio.get_running_loop().add_reader(master, drain)
    return running


async def run(invocation: Invocation) -> Result:
    return await (await start(invocation)).finish()
