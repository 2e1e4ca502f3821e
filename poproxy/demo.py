"""The embedded default for `poproxy demo`: an in-memory POP3 backend with sample mail
and a throwaway certificate.

It owns `MailboxServer`, a small plaintext POP3 server (RFC 1939 plus CAPA from RFC 2449)
over mailboxes held in memory, which the demo and the test suite use as a backend, with the
observation hooks and fault injection the tests need. It must never be used as a real mail
server: it keeps mail in memory only, speaks plaintext, and records every command line it
receives, PASS lines included. It logs nothing.
"""

import asyncio
import dataclasses
import datetime
import hmac
import ipaddress
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from poproxy import config, tls
from poproxy.metrics import Metrics
from poproxy.server import Proxy

SAMPLE_MESSAGES: tuple[bytes, ...] = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Hello\r\n"
    b"Message-ID: <hello@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"this is a plain message.\r\n",
    # Lines starting with "." are dot-stuffed on the wire (RFC 1939 section 3).
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: Dots\r\n"
    b"Message-ID: <dots@example.org>\r\n"
    b"\r\n"
    b"The next lines start with dots:\r\n"
    b". leading dot\r\n"
    b"..two dots\r\n"
    b".signature follows\r\n",
    b"From: Carol <carol@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: Greetings\r\n"
    b"Message-ID: <utf8@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "Grüße aus Köln — ✓\r\n".encode(),
)

GREETING = b"+OK demo POP3 ready\r\n"
CAPABILITIES = (b"TOP", b"UIDL", b"USER", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE")
MAX_LINE = 8192  # bytes buffered without a line end before the connection is dropped
STOP_TIMEOUT = 5.0  # seconds stop() waits for aborted connections to report their end


@dataclass
class Mailbox:
    """One user's maildrop. `locked` is held by the session in TRANSACTION state."""

    password: bytes = field(repr=False)
    messages: list[bytes]
    uids: list[bytes] = field(default_factory=list)
    locked: bool = False
    next_uid: int = 1

    def assign_uids(self) -> None:
        """Give messages appended since the last login a unique id (RFC 1939 section 7)."""
        while len(self.uids) < len(self.messages):
            self.uids.append(b"demo-%d" % self.next_uid)
            self.next_uid += 1


def dot_stuffed(message: bytes) -> bytes:
    """A multi-line response body: final CRLF ensured, "." doubled, terminator added."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def top(message: bytes, lines: int) -> bytes:
    """The header, the blank line and the first `lines` body lines (RFC 1939 section 7)."""
    head, separator, body = message.partition(b"\r\n\r\n")
    if not separator:
        return message
    body_lines = body.removesuffix(b"\r\n").split(b"\r\n") if body else []
    return head + separator + b"".join(line + b"\r\n" for line in body_lines[:lines])


class MailboxServer:
    """A plaintext POP3 server over `mailboxes`, keyed by user name."""

    def __init__(
        self,
        mailboxes: dict[bytes, Mailbox],
        *,
        login_error: bytes | None = None,
        die_mid_retr: bool = False,
    ) -> None:
        self.mailboxes = mailboxes
        self.login_error = login_error  # if set, the exact reply line to every PASS
        self.die_mid_retr = die_mid_retr  # if set, RETR sends half the message and aborts
        self.address: tuple[str, int] = ("", 0)
        self.received: list[bytes] = []  # every command line, without its line end
        self.connections = 0
        self.sessions_closed = 0
        self.quit_count = 0  # QUITs received in TRANSACTION state
        self._sessions: set[_Session] = set()
        self._closed = asyncio.Event()  # set and replaced each time a session ends
        self._listener: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: _Session(self), host, port)
        self.address = self._listener.sockets[0].getsockname()[:2]
        return self.address

    async def stop(self) -> None:
        """Stop accepting, abort open connections and wait until each has ended."""
        if self._listener is not None:
            self._listener.close()
        for session in list(self._sessions):
            session.abort()
        async with asyncio.timeout(STOP_TIMEOUT):
            while self._sessions:
                await self._closed.wait()
            if self._listener is not None:
                await self._listener.wait_closed()

    async def wait_sessions_closed(self, count: int) -> None:
        """Return once `count` sessions in all have ended; the caller bounds the wait."""
        while self.sessions_closed < count:
            await self._closed.wait()

    def _session_ended(self, session: "_Session") -> None:
        self._sessions.discard(session)
        self.sessions_closed += 1
        self._closed.set()
        self._closed = asyncio.Event()


class _Session(asyncio.Protocol):
    """One connection. AUTHORIZATION until a PASS succeeds (`mailbox` set): TRANSACTION."""

    transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(self, server: MailboxServer) -> None:
        self.server = server
        self.pending = b""  # bytes received after the last complete line
        self.user: bytes | None = None  # named by USER, waiting for PASS
        self.mailbox: Mailbox | None = None
        self.deleted: set[int] = set()  # indexes marked by DELE, removed only at QUIT
        self.quitting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.server._sessions.add(self)
        self.transport.write(GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed without QUIT: no UPDATE state, DELE marks are forgotten (RFC 1939 section 6).
        if self.mailbox is not None:
            self.mailbox.locked = False
        self.server._session_ended(self)

    def abort(self) -> None:
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        self.pending += data
        # Pipelined commands are answered in order (RFC 2449 section 6.6).
        while b"\n" in self.pending:
            line, _, self.pending = self.pending.partition(b"\n")
            line = line.removesuffix(b"\r")  # a bare LF is tolerated
            self.server.received.append(line)
            reply = self.reply(line)
            if transport.is_closing():  # die_mid_retr aborted the connection
                return
            transport.write(reply)
            if self.quitting:
                transport.close()  # after the queued reply is sent
                return
        if len(self.pending) > MAX_LINE:
            transport.write(b"-ERR line too long\r\n")
            transport.close()

    def reply(self, line: bytes) -> bytes:
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if verb == b"CAPA":  # valid in both states (RFC 2449 section 5)
            return b"+OK capability list follows\r\n" + dot_stuffed(b"\r\n".join(CAPABILITIES))
        if self.mailbox is None:
            return self.authorization(verb, argument)
        return self.transaction(self.mailbox, verb, argument.split())

    def authorization(self, verb: bytes, argument: bytes) -> bytes:
        match verb:
            case b"USER" if argument:
                self.user = argument
                return b"+OK send PASS\r\n"
            case b"PASS" if self.server.login_error is not None:
                return self.server.login_error
            case b"PASS" if self.user is not None:
                # PASS takes the rest of the line: a password may contain spaces.
                mailbox = self.server.mailboxes.get(self.user)
                self.user = None
                if mailbox is None or not hmac.compare_digest(mailbox.password, argument):
                    return b"-ERR [AUTH] invalid credentials\r\n"
                if mailbox.locked:  # RFC 2449 section 8.1.1
                    return b"-ERR [IN-USE] mailbox locked\r\n"
                mailbox.locked = True
                mailbox.assign_uids()
                self.mailbox = mailbox
                return b"+OK mailbox ready\r\n"
            case b"QUIT":
                self.quitting = True
                return b"+OK bye\r\n"
        return b"-ERR unknown command or bad sequence\r\n"

    def transaction(self, mailbox: Mailbox, verb: bytes, args: list[bytes]) -> bytes:
        live = [i for i in range(len(mailbox.messages)) if i not in self.deleted]
        index = self.message_index(mailbox, args[0]) if args else None
        match verb, len(args):
            case (b"STAT", 0):
                return b"+OK %d %d\r\n" % (len(live), sum(len(mailbox.messages[i]) for i in live))
            case (b"LIST" | b"UIDL", 0):
                return (
                    b"+OK listing follows\r\n" + b"".join(listing(mailbox, verb, live)) + b".\r\n"
                )
            case (b"LIST" | b"UIDL", 1) if index is not None:
                return b"+OK " + listing(mailbox, verb, [index])[0]
            case (b"TOP", 2) if index is not None and args[1].isdigit():
                body = top(mailbox.messages[index], int(args[1]))
                return b"+OK top of message follows\r\n" + dot_stuffed(body)
            case (b"RETR", 1) if index is not None:
                message = mailbox.messages[index]
                reply = b"+OK %d octets\r\n" % len(message) + dot_stuffed(message)
                if self.server.die_mid_retr:
                    self.transport.write(reply[: len(reply) // 2])
                    self.transport.abort()
                return reply
            case (b"DELE", 1) if index is not None:
                self.deleted.add(index)
                return b"+OK message %d deleted\r\n" % (index + 1)
            case (b"RSET", 0):
                self.deleted.clear()
                return b"+OK\r\n"
            case (b"NOOP", 0):
                return b"+OK\r\n"
            case (b"QUIT", 0):
                # UPDATE state (RFC 1939 section 6): only now are DELE marks carried out.
                for i in sorted(self.deleted, reverse=True):
                    del mailbox.messages[i], mailbox.uids[i]
                self.deleted.clear()
                self.server.quit_count += 1
                self.quitting = True
                return b"+OK bye\r\n"
            case (b"LIST" | b"UIDL" | b"TOP" | b"RETR" | b"DELE", _) if args:
                return b"-ERR no such message\r\n"
        return b"-ERR unknown command or bad arguments\r\n"

    def message_index(self, mailbox: Mailbox, argument: bytes) -> int | None:
        """The list index of message number `argument`, if it exists and is not deleted."""
        if not argument.isdigit():
            return None
        index = int(argument) - 1
        if not 0 <= index < len(mailbox.messages) or index in self.deleted:
            return None
        return index


def listing(mailbox: Mailbox, verb: bytes, indexes: list[int]) -> list[bytes]:
    """Scan listing lines for LIST (sizes) or UIDL (unique ids), RFC 1939 section 5 and 7."""
    if verb == b"UIDL":
        return [b"%d %s\r\n" % (i + 1, mailbox.uids[i]) for i in indexes]
    return [b"%d %d\r\n" % (i + 1, len(mailbox.messages[i])) for i in indexes]


# --- `poproxy demo` -----------------------------------------------------------

DEMO_USER = b"alice"
DEMO_PASSWORD = b"wonderland"
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def make_certificate(directory: Path) -> config.CertificateFiles:
    """A throwaway self-signed ECDSA P-256 certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poproxy demo")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    files = config.CertificateFiles(
        cert=directory / "demo.crt", key=directory / "demo.key", key_path="tls.certificates[0]"
    )
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.key.touch(mode=0o600)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def demo_settings(
    path: Path | None, certificate: config.CertificateFiles, backend: config.Address
) -> config.Config:
    """The demo configuration with the throwaway certificate and in-memory backend."""
    settings = config.load(path or DEMO_CONFIG)
    return dataclasses.replace(
        settings,
        tls=dataclasses.replace(settings.tls, certificates=(certificate,)),
        backends=tuple(
            dataclasses.replace(backend_settings, servers=(backend,))
            for backend_settings in settings.backends
        ),
    )


async def run_demo(
    path: Path | None, stop: asyncio.Event, out: Callable[[str], None] = print
) -> None:
    """Run the in-memory backend and the proxy in front of it until `stop` is set."""
    backend = MailboxServer({DEMO_USER: Mailbox(DEMO_PASSWORD, list(SAMPLE_MESSAGES))})
    host, port = await backend.start()
    with tempfile.TemporaryDirectory(prefix="poproxy-demo-") as directory:
        certificate = make_certificate(Path(directory))
        settings = demo_settings(path, certificate, config.Address(host, port))
        metrics = Metrics()
        certificates = tls.CertificateStore(settings.tls, settings.source, metrics)
        proxy = Proxy(settings, certificates, metrics)
        try:
            await proxy.start()
            out(_instructions(settings, proxy.addresses, certificate.cert))
            await stop.wait()
            await proxy.shutdown()
        finally:
            await backend.stop()


def _instructions(settings: config.Config, addresses: dict[str, tuple[str, int]], ca: Path) -> str:
    user, password = DEMO_USER.decode(), DEMO_PASSWORD.decode()
    lines = [f"poproxy demo: user {user}, password {password}, {len(SAMPLE_MESSAGES)} messages."]
    for listener in settings.listeners:
        host, port = addresses[listener.name]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if listener.tls == "implicit":
            lines += [
                f"\n{listener.name}: POP3S (implicit TLS) on {where}",
                f"  curl --cacert {ca} -u {user}:{password} pop3s://{where}/2",
                f"  openssl s_client -quiet -CAfile {ca} -connect {where}",
            ]
        else:
            lines += [
                f"\n{listener.name}: POP3 with STLS on {where}",
                f"  curl --ssl-reqd --cacert {ca} -u {user}:{password} pop3://{where}/2",
                f"  openssl s_client -quiet -starttls pop3 -CAfile {ca} -connect {where}",
            ]
    lines.append(
        "\nIn openssl s_client type: USER alice, PASS wonderland, LIST, RETR 2, QUIT."
        "\nCtrl-C stops the demo."
    )
    return "\n".join(lines)
