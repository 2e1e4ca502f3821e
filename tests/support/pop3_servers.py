"""Run legacy POP3 servers from Debian packages on 127.0.0.1, for the interop matrix.

Owns five backends behind one interface (:class:`Pop3Backend`): Dovecot (through
tests/support/dovecot.py), popa3d, Courier, Cyrus and GNU Mailutils; and :class:`Tap`, the
relay the matrix puts between poproxy and a backend to see every connection the backend gets.
Must never change the system: no user is added to /etc/passwd, nothing is written under /etc,
/var or /run, nothing binds anything but 127.0.0.1, no systemd, and only the processes started
here are signalled (each in its own process group).

Where the packages come from: popa3d, courier-pop and cyrus-pop3d conflict with each other and
with dovecot-pop3d (``Conflicts: pop3-server``), so ``make interop-deps`` does not install
them: tools/interop_debs.py unpacks them, with cyrus-common and mailutils-pop3d, into
build/interop/debs/<package>/ (POPROXY_INTEROP_DEBS moves it) and installs what they depend
on (Courier's authdaemon among them) the usual way. No maintainer script runs, so no daemon
is ever started on port 110 by an install.

How they run: every server but Dovecot runs in a private mount namespace (a
:class:`Sandbox`: ``unshare --mount``, entered with ``nsenter``) in which

* ``/usr`` and ``/etc`` have the unpacked packages laid over them, read-only (overlayfs), so
  each binary finds its helpers, libraries and PAM service where it was built to look;
* ``/etc/passwd``, ``/etc/group`` and ``/etc/shadow`` are the test's: the host's users plus
  ``alice`` and the servers' own users (``popa3d``, ``cyrus``), with uids free on the host;
  the shadow file holds only the test users' hashes. popa3d, Courier (authpam) and Mailutils
  only check passwords with PAM or shadow: this gives them a user with a known password
  without creating a system user;
* ``/run`` is an empty tmpfs, with the test's data directory bound on ``/run/pop3test`` (the
  servers drop root and could not traverse pytest's 0700 directories); popa3d's spool is
  bound on ``/var/mail``.

The namespace is held by a ``sh`` that waits on a pipe from this process (it exits when
the test run does, however that ends); the servers in it are stopped by their launcher, each
in its own process group. popa3d is inetd-style and runs under
:class:`InetdListener`, a thread that accepts and runs one popa3d per connection with the
socket as its stdin and stdout; the others are daemons on a free port.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from support.dovecot import MAIL_USER, Dovecot, process_group_members, running_dovecot
from support.interop import interop_unavailable, require_program

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
DEBS_ENV = "POPROXY_INTEROP_DEBS"
DEFAULT_DEBS = REPO / "build" / "interop" / "debs"
DATA_MOUNT = "/run/pop3test"  # where a sandboxed server sees the test's data directory

USER = "alice"
PASSWORD = "wonderland"  # a test account that exists only in the sandboxes

# Timeouts, in seconds.
READY_TIMEOUT = 20.0  # from the start of a server until it greets
STOP_GRACE = 10.0  # from SIGTERM until a process group has gone
IDLE_TIMEOUT = 20.0  # until a backend has closed every connection the tap opened to it
POP3_TIMEOUT = 10.0  # one read or write of the launchers' own POP3 and LMTP sessions
BIND_ATTEMPTS = 3  # a free port may be taken between our probe and the server's bind
SENT_RECORD_MAX = 1 << 20  # the tap keeps this much of what poproxy sends per connection

_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+\Z")  # what mount options and configs can carry
_FIRST_UID = 61000  # sandbox users get the first free uids from here


class ServerError(RuntimeError):
    """A server did not start, or did something a launcher cannot go on from."""


def debs_dir() -> Path:
    return Path(os.environ.get(DEBS_ENV) or DEFAULT_DEBS)


def unpacked(package: str) -> Path:
    """The tree tools/interop_debs.py unpacked ``package`` into; skip (or fail) without it."""
    tree = debs_dir() / package
    if not (tree / "DEBIAN" / "control").is_file():
        interop_unavailable(f"{package} is not unpacked in {debs_dir()} (make interop-deps)")
    return tree


def package_version(package: str) -> str:
    """The Debian version of an unpacked package, else of an installed one."""
    control = debs_dir() / package / "DEBIAN" / "control"
    if control.is_file():
        for line in control.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _safe(path: Path | str) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ValueError(f"path {text!r} has characters a mount option or config cannot carry")
    return text


# --- processes -----------------------------------------------------------------------------


def _stop_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group ``process`` leads (it was started in a new session), then
    SIGKILL whatever is left of it after ``grace`` seconds."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()
            if not process_group_members(process.pid):
                return
            time.sleep(0.02)
    raise ServerError(f"process group {process.pid} outlived SIGKILL")


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # exited
        return ""


def _wait_sessions_gone(
    group: subprocess.Popen[bytes], names: frozenset[str], timeout: float = IDLE_TIMEOUT
) -> None:
    """Return once no process called one of ``names`` (other than the group's leader, the
    daemon itself) is left in the process group of ``group``: one runs per POP3 session."""
    deadline = time.monotonic() + timeout
    while sessions := [
        pid
        for pid in process_group_members(group.pid)
        if pid != group.pid and _command_name(pid) in names
    ]:
        if time.monotonic() > deadline:
            raise ServerError(f"POP3 session processes {sessions} still running")
        time.sleep(0.01)


def _wait_greeting(
    port: int,
    processes: Sequence[subprocess.Popen[bytes]],
    deadline: float,
    describe: Callable[[], str],
    expect: bytes = b"+OK",
) -> None:
    """Return once ``HOST:port`` greets with ``expect``; raise if a process exits first."""
    backoff = 0.01
    while True:
        for process in processes:
            if process.poll() is not None:
                raise ServerError(f"exited with status {process.returncode}:\n{describe()}")
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                greeting = sock.makefile("rb").readline(512)
        except OSError:
            greeting = b""
        if greeting.startswith(expect):
            return
        if time.monotonic() > deadline:
            raise ServerError(f"no greeting on port {port} in time:\n{describe()}")
        time.sleep(backoff)
        backoff = min(backoff * 2, 0.2)


# --- the mount namespace -------------------------------------------------------------------


@dataclass
class Sandbox:
    """A private mount namespace with read-only layers over system directories, a tmpfs on
    /run and bind mounts into it; commands run in it through :meth:`command`.

    ``layers`` maps a directory (``/usr``) to the directories laid over it, topmost first.
    ``binds`` maps a source directory or file to a path under /run (created) or to an
    existing path elsewhere.
    """

    layers: Mapping[str, Sequence[Path]]
    binds: Sequence[tuple[Path, str]] = ()
    _holder: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        unshare = require_program("unshare")
        require_program("nsenter")
        lines = ["set -e"]
        for target, lowers in self.layers.items():
            present = [_safe(lower) for lower in lowers if lower.is_dir()]
            stack = ":".join([*present, _safe(target)])
            lines.append(f"mount -t overlay poproxy-test -o ro,lowerdir={stack} {target}")
        lines.append("mount -t tmpfs -o mode=0755 poproxy-test /run")
        lines.append("mkdir /run/lock")
        for source, target in self.binds:
            if target.startswith("/run/"):
                kind = "-d" if source.is_dir() else "-f"
                make = f"mkdir -p {target}" if kind == "-d" else f": > {target}"
                lines.append(f"[ {kind} {target} ] || {make}")
            lines.append(f"mount --bind {_safe(source)} {_safe(target)}")
        lines.append("echo ready")
        # Hold the namespace until this process closes the pipe (or dies).
        lines.append("read -r _ || true")
        self._holder = subprocess.Popen(
            [
                unshare,
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                "\n".join(lines),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._holder.stdout is not None
        ready, _, _ = select.select([self._holder.stdout], [], [], READY_TIMEOUT)
        line = self._holder.stdout.readline() if ready else b""
        if line != b"ready\n":
            error = b""
            if self._holder.poll() is not None and self._holder.stderr is not None:
                error = self._holder.stderr.read()
            self.stop()
            raise ServerError(f"the mount namespace did not come up: {error.decode()!r}")

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        if self._holder is None:
            raise ServerError("the sandbox is not started")
        return ["nsenter", f"--target={self._holder.pid}", "--mount", "--", *argv]

    def stop(self) -> None:
        holder, self._holder = self._holder, None
        if holder is None:
            return
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
        try:
            holder.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            _stop_group(holder)
            holder.wait()


# --- inetd ---------------------------------------------------------------------------------


class InetdListener:
    """Listen on 127.0.0.1 and run ``command`` for each connection, the socket as its stdin
    and stdout, the way inetd runs a ``nowait`` service."""

    def __init__(self, command: Sequence[str], log_path: Path) -> None:
        self.command = list(command)
        self.log_path = log_path
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self._children: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="inetd", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with self.log_path.open("ab") as log:
            while True:
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    return  # closed by stop()
                with conn, self._lock:
                    if self._closing:
                        return
                    self._children.append(
                        subprocess.Popen(
                            self.command,
                            stdin=conn.fileno(),
                            stdout=conn.fileno(),
                            stderr=log,
                            start_new_session=True,
                        )
                    )

    def running(self) -> list[subprocess.Popen[bytes]]:
        with self._lock:
            self._children = [child for child in self._children if child.poll() is None]
            return list(self._children)

    def wait_sessions_closed(self, timeout: float = IDLE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                raise ServerError(f"sessions still running after {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        with self._lock:
            self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._sock.close()
        self._thread.join(STOP_GRACE)
        for child in self.running():
            _stop_group(child)
            child.wait()


# --- the tap -------------------------------------------------------------------------------


class Tap:
    """A TCP relay on 127.0.0.1 in front of one backend: poproxy connects here.

    It counts the connections the backend gets (a login refused before TLS must not open
    one), records what poproxy sends on each, knows when it has closed every connection to
    the backend, and can stop passing the backend's bytes on after ``hold_after`` bytes, so
    that a test can kill a client in the middle of a download.

    It keeps TCP's meaning of a close. When poproxy closes its side, the tap passes on what
    poproxy sent and then its end of stream; if the backend then still sends, or the tap
    still holds bytes of the backend's, the tap resets the backend connection, as poproxy's
    kernel would have done for a closed socket that gets (or has unread) data. So a backend
    that has a pipelined QUIT in its buffer behind a RETR that poproxy stopped reading never
    gets to act on it, exactly as without the tap.
    """

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self._sock.listen(16)
        self.address: tuple[str, int] = (HOST, self._sock.getsockname()[1])
        self.connections = 0  # accepted in all
        self.sent: list[bytearray] = []  # per connection: what poproxy sent the backend
        self._open = 0
        self._changed = threading.Condition()
        self._hold_after: int | None = None
        self.held = threading.Event()  # set when the held bytes are reached
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tap", daemon=True)
        self._thread.start()

    def hold_after(self, count: int) -> None:
        """Pass at most ``count`` bytes of the backend's to poproxy on the next connection,
        until :meth:`release` (or until poproxy closes that connection)."""
        self.held.clear()
        self._release.clear()
        self._hold_after = count

    def release(self) -> None:
        self._hold_after = None
        self._release.set()

    def wait_idle(self, timeout: float = IDLE_TIMEOUT) -> None:
        """Return once every connection to the backend is closed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._open == 0, timeout):
                raise ServerError(f"{self._open} backend connections still open after {timeout}s")

    def stop(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(STOP_GRACE)

    def _serve(self) -> None:
        while True:
            try:
                front, _ = self._sock.accept()
            except OSError:
                return
            try:
                back = socket.create_connection(self.backend, timeout=POP3_TIMEOUT)
            except OSError:
                front.close()
                continue
            back.settimeout(None)
            connection = _TapConnection(front, back, self._hold_after, self)
            with self._changed:
                self.connections += 1
                self._open += 1
                self.sent.append(connection.sent)
            threading.Thread(target=connection.run, daemon=True).start()

    def _closed(self) -> None:
        with self._changed:
            self._open -= 1
            self._changed.notify_all()


class _TapConnection:
    def __init__(
        self, front: socket.socket, back: socket.socket, hold: int | None, tap: Tap
    ) -> None:
        self.front, self.back, self.hold, self.tap = front, back, hold, tap
        self.sent = bytearray()
        self.front_gone = threading.Event()  # poproxy closed or reset its side

    def run(self) -> None:
        upstream = threading.Thread(target=self._upstream, daemon=True)
        upstream.start()
        try:
            self._downstream()
        finally:
            upstream.join()
            self.front.close()
            self.back.close()
            self.tap._closed()

    def _upstream(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.front.recv(65536):
                if len(self.sent) < SENT_RECORD_MAX:
                    self.sent += data
                self.back.sendall(data)
        self.front_gone.set()
        with contextlib.suppress(OSError):
            self.back.shutdown(socket.SHUT_WR)

    def _downstream(self) -> None:
        passed = 0
        while True:
            try:
                data = self.back.recv(65536)
            except OSError:
                break
            if not data:  # the backend ended the session
                with contextlib.suppress(OSError):
                    self.front.shutdown(socket.SHUT_WR)
                return
            if self.hold is not None and passed + len(data) >= self.hold:
                data, rest = data[: self.hold - passed], data[self.hold - passed :]
                if not self._send(data):
                    break
                passed += len(data)
                self.tap.held.set()
                while not self.tap._release.wait(0.02):
                    if self.front_gone.is_set():
                        self._reset_back()
                        return
                self.hold = None
                data = rest
            if not self._send(data):
                break
            passed += len(data)
        self._reset_back()

    def _send(self, data: bytes) -> bool:
        """Pass bytes of the backend's on; False once poproxy has gone."""
        if self.front_gone.is_set():
            return False
        try:
            self.front.sendall(data)
        except OSError:
            return False
        return True

    def _reset_back(self) -> None:
        with contextlib.suppress(OSError):
            self.back.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.back.close()  # with linger 0: a reset


# --- backends ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """What a backend does to a message: how the test stores it, how the server serves it."""

    storage: str  # how the fixed messages are put into the backend's store
    serving: str  # what a client receives (after un-dot-stuffing) for the stored bytes


class Pop3Backend(abc.ABC):
    """A running POP3 server with one mailbox, ``USER``/``PASSWORD``, on ``host``:``port``."""

    key: ClassVar[str]  # short id: "dovecot"
    title: ClassVar[str]  # "Dovecot"
    package: ClassVar[str]  # the Debian package its POP3 server comes from
    rules: ClassVar[Rules]

    host: str = HOST
    port: int = 0
    user: str = USER
    password: str = PASSWORD

    @classmethod
    def version(cls) -> str:
        """The Debian version of the package its POP3 server comes from."""
        return package_version(cls.package)

    @abc.abstractmethod
    def fill(self, messages: Sequence[bytes]) -> None:
        """Empty the mailbox, then store ``messages`` so that POP3 numbers them in order."""

    @abc.abstractmethod
    def stored(self) -> list[bytes]:
        """The messages in the mailbox as the backend stores them, in POP3 order."""

    @staticmethod
    @abc.abstractmethod
    def served(stored: bytes) -> bytes:
        """What RETR gives a client, un-dot-stuffed, for a message stored as ``stored``."""

    def wait_sessions_closed(self) -> None:  # noqa: B027  (optional: most need nothing)
        """Return once no POP3 session is running any more, where that can be seen."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def session(self, commands: Sequence[bytes]) -> list[bytes]:
        """Log in directly (not through poproxy), send each command and QUIT, and read the
        whole session to its end: each reply (multi-line ones whole, still dot-stuffed)."""
        multiline = (b"CAPA", b"LIST", b"UIDL", b"RETR", b"TOP")
        with socket.create_connection((self.host, self.port), timeout=POP3_TIMEOUT) as sock:
            reader = sock.makefile("rb")
            replies = [reader.readline()]
            login = [f"USER {self.user}".encode(), f"PASS {self.password}".encode()]
            for command in [*login, *commands, b"QUIT"]:
                sock.sendall(command + b"\r\n")
                reply = reader.readline()
                if not reply.startswith(b"+OK"):
                    raise ServerError(f"{self.key}: {command!r} answered {reply!r}")
                if command.split(b" ")[0].upper() in multiline and (
                    b" " not in command or not command.upper().startswith((b"LIST", b"UIDL"))
                ):
                    while (line := reader.readline()) != b".\r\n":
                        if not line:
                            raise ServerError(f"{self.key}: the reply to {command!r} broke off")
                        reply += line
                replies.append(reply)
            while reader.read(4096):  # until the server closes: after its UPDATE state
                pass
        self.wait_sessions_closed()
        return replies

    def count(self) -> int:
        """The number of messages, as STAT tells it in a direct session."""
        return int(self.session([b"STAT"])[3].split()[1])

    def dele_all(self) -> None:
        """DELE every message in a direct session; its QUIT commits that."""
        count = self.count()
        self.session([b"DELE %d" % n for n in range(1, count + 1)])


def crlf(message: bytes) -> bytes:
    """Every line ending as CRLF: lone LFs get a CR (CRLF stays as it is)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def lf(message: bytes) -> bytes:
    """Every CRLF line ending as a lone LF."""
    return message.replace(b"\r\n", b"\n")


def final_newline(message: bytes, newline: bytes = b"\r\n") -> bytes:
    return message if message.endswith(b"\n") else message + newline


def served_as_crlf(stored: bytes) -> bytes:
    return final_newline(crlf(stored))


def _write_maildir(
    maildir: Path, messages: Sequence[bytes], uid: int, gid: int, generation: int
) -> None:
    """Replace every message of a Maildir with ``messages``, under names (and mtimes) that
    sort in order and were never used before in this Maildir."""
    maildir.mkdir(mode=0o700, exist_ok=True)
    os.chown(maildir, uid, gid)
    for sub in ("cur", "new", "tmp"):
        directory = maildir / sub
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, uid, gid)
        for path in directory.iterdir():
            path.unlink()
    base = int(time.time()) - 3600
    for index, message in enumerate(messages, start=1):
        path = maildir / "new" / f"{generation:04d}{index:02d}.poproxy-test"
        path.write_bytes(message)
        os.chown(path, uid, gid)
        path.chmod(0o600)
        os.utime(path, (base + index, base + index))


def _maildir_messages(maildir: Path) -> list[bytes]:
    files = [p for sub in ("cur", "new") for p in (maildir / sub).iterdir() if p.is_file()]
    return [path.read_bytes() for path in sorted(files, key=lambda p: p.name)]


class DovecotBackend(Pop3Backend):
    key = "dovecot"
    title = "Dovecot"
    package = "dovecot-pop3d"
    rules = Rules(
        storage="Maildir, one file per message, the source bytes as they are (CRLF, bare LF).",
        serving="Each bare LF becomes CRLF; a message without a final newline gets CRLF.",
    )

    def __init__(self, dovecot: Dovecot) -> None:
        self.dovecot = dovecot
        self.host, self.port = dovecot.host, dovecot.port
        mail_user = pwd.getpwnam(MAIL_USER)
        self._uid, self._gid = mail_user.pw_uid, mail_user.pw_gid
        self._generation = 0

    def fill(self, messages: Sequence[bytes]) -> None:
        self._generation += 1
        maildir = self.dovecot.maildir(self.user)
        _write_maildir(maildir, messages, self._uid, self._gid, self._generation)

    def stored(self) -> list[bytes]:
        return _maildir_messages(self.dovecot.maildir(self.user))

    @staticmethod
    def served(stored: bytes) -> bytes:
        return served_as_crlf(stored)

    def wait_sessions_closed(self) -> None:
        self.dovecot.wait_sessions_closed()

    def stop(self) -> None:
        self.dovecot.stop()


@dataclass
class _SandboxUsers:
    """The passwd, group and shadow files of a sandbox: the host's users plus ours."""

    names: Sequence[str]
    uids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        taken = {entry.pw_uid for entry in pwd.getpwall()} | {
            int(line.split(":")[2])
            for line in Path("/etc/group").read_text().splitlines()
            if line.count(":") >= 3
        }
        uid = _FIRST_UID
        for name in self.names:
            while uid in taken:
                uid += 1
            self.uids[name] = uid
            taken.add(uid)

    def write(self, etc: Path, passwords: Mapping[str, str], homes: Mapping[str, str]) -> None:
        passwd = Path("/etc/passwd").read_text().rstrip("\n").split("\n")
        group = Path("/etc/group").read_text().rstrip("\n").split("\n")
        shadow = []
        for name, uid in self.uids.items():
            home = homes.get(name, "/nonexistent")
            passwd.append(f"{name}:x:{uid}:{uid}::{home}:/usr/sbin/nologin")
            group.append(f"{name}:x:{uid}:")
            hashed = _sha512_crypt(passwords[name]) if name in passwords else "*"
            shadow.append(f"{name}:{hashed}:19000:0:99999:7:::")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "passwd").write_text("\n".join(passwd) + "\n")
        (etc / "group").write_text("\n".join(group) + "\n")
        (etc / "shadow").write_text("\n".join(shadow) + "\n")
        for name in ("passwd", "group"):
            (etc / name).chmod(0o644)
        (etc / "shadow").chmod(0o640)


def _sha512_crypt(password: str) -> str:
    # Python's crypt module is deprecated (and warns); openssl is required by the matrix.
    openssl = require_program("openssl")
    result = subprocess.run(
        [openssl, "passwd", "-6", "-stdin"],
        input=password.encode(),
        capture_output=True,
        check=True,
    )
    return result.stdout.decode().strip()


class SandboxedBackend(Pop3Backend):
    """A server that runs in a :class:`Sandbox`, with its data under ``root / "data"``."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        _safe(root)
        self.root = root
        self.data = root / "data"  # /run/pop3test in the sandbox
        self.data.mkdir(mode=0o755, exist_ok=True)
        self.data.chmod(0o755)
        self.log_path = root / "server.log"
        self.sandbox: Sandbox | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        self._generation = 0

    def _start_sandbox(
        self, layers: Mapping[str, Sequence[Path]], binds: Sequence[tuple[Path, str]]
    ) -> Sandbox:
        self.sandbox = Sandbox(layers, [(self.data, DATA_MOUNT), *binds])
        self.sandbox.start()
        return self.sandbox

    def _spawn(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        assert self.sandbox is not None
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                self.sandbox.command(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._processes.append(process)
        return process

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        for process in reversed(self._processes):
            _stop_group(process)
            process.wait()
        self._processes.clear()
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None


class Popa3dBackend(SandboxedBackend):
    key = "popa3d"
    title = "popa3d"
    package = "popa3d"
    rules = Rules(
        storage=(
            "mbox /var/mail/alice with LF line ends: for each message a From_ line, the source "
            "with CRLF stored as LF (popa3d would serve a stored CRLF as CR CR LF), a newline "
            "if it has none, and an empty line. A stored message is what lies between its "
            "From_ line and that empty line."
        ),
        serving="Each LF becomes CRLF.",
    )

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        tree = unpacked(self.package)
        users = _SandboxUsers(["popa3d", self.user])
        self._uid = users.uids[self.user]
        layer = root / "layer"
        users.write(layer / "etc", {self.user: self.password}, {"popa3d": "/var/lib/popa3d"})
        (layer / "var-lib" / "popa3d").mkdir(parents=True, exist_ok=True)  # its chroot
        self.spool = self.data / "mail"
        self.spool.mkdir(mode=0o755, exist_ok=True)
        self.mbox = self.spool / self.user
        self.fill([])
        sandbox = self._start_sandbox(
            {
                "/usr": [tree / "usr"],
                "/etc": [layer / "etc", tree / "etc"],
                "/var/lib": [layer / "var-lib"],
            },
            [(self.spool, "/var/mail")],
        )
        self.inetd = InetdListener(sandbox.command(["/usr/sbin/popa3d"]), self.log_path)
        self.port = self.inetd.port
        _wait_greeting(self.port, [], time.monotonic() + READY_TIMEOUT, self.log_tail)

    def fill(self, messages: Sequence[bytes]) -> None:
        # A From_ line per message, with its own delivery time as an MDA writes it: popa3d
        # derives the UIDL from it and the header.
        mbox = b"".join(
            b"From sender@example.org Thu Jan  1 00:%02d:%02d 2026\n" % divmod(index, 60)
            + final_newline(lf(message), b"\n")
            + b"\n"
            for index, message in enumerate(messages)
        )
        self.mbox.write_bytes(mbox)
        os.chown(self.mbox, self._uid, self._uid)
        self.mbox.chmod(0o600)
        # Delivered a while ago: popa3d waits a second before it reads a mailbox that was
        # modified in the current second (a change in that second could go unnoticed).
        past = time.time() - 60
        os.utime(self.mbox, (past, past))

    def stored(self) -> list[bytes]:
        text = self.mbox.read_bytes()
        if not text:
            return []
        if not text.startswith(b"From "):
            raise ServerError(f"{self.mbox} does not start with a From_ line")
        # Each From_ line but the first follows an empty line, which belongs to no message;
        # so does the empty line at the end of the file.
        text = text[:-1] if text.endswith(b"\n\n") else text
        return re.split(rb"(?:\A|(?<=\n)\n)From [^\n]*\n", text)[1:]

    @staticmethod
    def served(stored: bytes) -> bytes:
        return crlf(stored)

    def wait_sessions_closed(self) -> None:
        self.inetd.wait_sessions_closed()

    def stop(self) -> None:
        self.inetd.stop()
        super().stop()


class CourierBackend(SandboxedBackend):
    key = "courier"
    title = "Courier"
    package = "courier-pop"
    rules = Rules(
        storage=(
            "Maildir, one file per message, with LF line ends: CRLF sources are stored with LF, "
            "as a Unix delivery agent stores them (pop3d would serve a stored CRLF as CR CR LF)."
        ),
        serving="Each LF becomes CRLF; a message without a final newline gets CRLF.",
    )
    LIBEXEC = "/usr/lib/courier/courier"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        tree = unpacked(self.package)
        require_program("/usr/lib/courier/courier-authlib/authdaemond")
        require_program("/usr/sbin/couriertcpd")
        users = _SandboxUsers([self.user])
        self._uid = users.uids[self.user]
        home = self.data / "home" / self.user
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, self._uid, self._uid)
        home.chmod(0o700)
        self.maildir = home / "Maildir"
        layer = root / "layer"
        users.write(
            layer / "etc", {self.user: self.password}, {self.user: f"{DATA_MOUNT}/home/{self.user}"}
        )
        (layer / "etc" / "courier").mkdir(exist_ok=True)
        (layer / "etc" / "courier" / "authdaemonrc").write_text(
            'authmodulelist="authpam"\ndaemons=2\nauthdaemonvar=/run/courier/authdaemon\n'
            'DEBUG_LOGIN=0\nDEFAULTOPTIONS=""\nLOGGEROPTS=""\n'
        )
        self.fill([])
        authdaemon = self.data / "authdaemon"
        authdaemon.mkdir(exist_ok=True)
        self._start_sandbox(
            {"/usr": [tree / "usr"], "/etc": [layer / "etc", tree / "etc"]},
            [(authdaemon, "/run/courier/authdaemon")],
        )
        self._spawn(["/usr/lib/courier/courier-authlib/authdaemond"])
        self._start_pop3d()

    def _start_pop3d(self) -> None:
        env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "POP3AUTH": "",
            "POP3AUTH_TLS": "",
            "POP3_PROXY": "0",
            "POP3_STARTTLS": "NO",
            "MAILDIRPATH": "Maildir",
        }
        for _attempt in range(BIND_ATTEMPTS):
            port = free_port()
            process = self._spawn(
                [
                    "/usr/sbin/couriertcpd",
                    f"-address={HOST}",
                    "-nodnslookup",
                    "-noidentlookup",
                    "-maxprocs=20",
                    "-maxperip=20",
                    str(port),
                    f"{self.LIBEXEC}/courierpop3login",
                    f"{self.LIBEXEC}/courierpop3d",
                    "Maildir",
                ],
                env,
            )
            try:
                _wait_greeting(port, [process], time.monotonic() + READY_TIMEOUT, self.log_tail)
            except ServerError:
                if process.poll() is None:
                    raise
                self._processes.remove(process)
                continue
            self.port = port
            self._daemon = process
            return
        raise ServerError(f"couriertcpd found no free port:\n{self.log_tail()}")

    def wait_sessions_closed(self) -> None:
        # comm is cut at 15 characters: courierpop3login shows as "courierpop3logi".
        _wait_sessions_gone(self._daemon, frozenset({"courierpop3logi", "courierpop3d"}))

    def fill(self, messages: Sequence[bytes]) -> None:
        self._generation += 1
        _write_maildir(
            self.maildir, [lf(m) for m in messages], self._uid, self._uid, self._generation
        )

    def stored(self) -> list[bytes]:
        return _maildir_messages(self.maildir)

    @staticmethod
    def served(stored: bytes) -> bytes:
        return served_as_crlf(stored)


class CyrusBackend(SandboxedBackend):
    key = "cyrus"
    title = "Cyrus"
    package = "cyrus-pop3d"
    rules = Rules(
        storage=(
            "Delivered over LMTP to lmtpd (bare LF sent as CRLF, a final CRLF added, as an MTA "
            "sends them); Cyrus stores one file per message, adding Return-Path, Received, "
            "X-Sieve, X-Cyrus-Session-Id, Message-ID and Date header lines."
        ),
        serving="As stored (Cyrus stores CRLF line ends only).",
    )
    BIN = "/usr/lib/cyrus/bin"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        common = unpacked("cyrus-common")
        tree = unpacked(self.package)
        db_load = require_program("db_load")
        users = _SandboxUsers(["cyrus"])
        self._uid = users.uids["cyrus"]
        layer = root / "layer"
        users.write(layer / "etc", {}, {"cyrus": DATA_MOUNT})
        for sub in ("conf", "spool", "sieve"):
            (self.data / sub).mkdir(exist_ok=True)
        # The sasldb (Berkeley DB hash) that auxprop checks the password against: the key is
        # user NUL realm NUL "userPassword"; the realm is the servername.
        sasldb = self.data / "sasldb2"
        subprocess.run(
            [db_load, "-T", "-t", "hash", str(sasldb)],
            input=f"{self.user}\\00localhost\\00userPassword\n{self.password}\n".encode(),
            check=True,
        )
        for path in [self.data, *self.data.rglob("*")]:
            os.chown(path, self._uid, self._uid)
        sasldb.chmod(0o600)
        self.lmtp_port = 0
        self._filled = False
        for _attempt in range(BIND_ATTEMPTS):
            port, lmtp_port = free_port(), free_port()
            self._write_config(layer / "etc", port, lmtp_port)
            self._start_sandbox(
                {"/usr": [tree / "usr", common / "usr"], "/etc": [layer / "etc"]}, []
            )
            process = self._spawn([f"{self.BIN}/master", "-p", f"{DATA_MOUNT}/master.pid", "-D"])
            try:
                _wait_greeting(port, [process], time.monotonic() + READY_TIMEOUT, self.log_tail)
                _wait_greeting(
                    lmtp_port, [process], time.monotonic() + READY_TIMEOUT, self.log_tail, b"220"
                )
            except ServerError:
                if process.poll() is None:
                    raise
                self.stop()  # and try other ports, in a new namespace
                continue
            self.port, self.lmtp_port = port, lmtp_port
            self._master = process
            return
        raise ServerError(f"Cyrus found no free port:\n{self.log_tail()}")

    def wait_sessions_closed(self) -> None:
        # "pop3d -U 1": a pop3d process serves one connection, then exits.
        _wait_sessions_gone(self._master, frozenset({"pop3d"}))

    def _write_config(self, etc: Path, port: int, lmtp_port: int) -> None:
        (etc / "imapd.conf").write_text(
            f"""\
# Written by tests/support/pop3_servers.py; seen as /etc/imapd.conf in the sandbox only.
configdirectory: {DATA_MOUNT}/conf
defaultpartition: default
partition-default: {DATA_MOUNT}/spool
sievedir: {DATA_MOUNT}/sieve
servername: localhost
cyrus_user: cyrus
admins: cyrus
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {DATA_MOUNT}/sasldb2
sasl_mech_list: PLAIN
autocreate_post: 1
autocreate_quota: 0
expunge_mode: immediate
# The tests deliver the same messages (same Message-ID) again and again.
duplicatesuppression: 0
"""
        )
        (etc / "cyrus.conf").write_text(
            f"""\
# Written by tests/support/pop3_servers.py; seen as /etc/cyrus.conf in the sandbox only.
START {{
  recover cmd="{self.BIN}/ctl_cyrusdb -r"
}}
SERVICES {{
  pop3 cmd="{self.BIN}/pop3d -U 1" listen="{HOST}:{port}" prefork=0
  lmtp cmd="{self.BIN}/lmtpd -a" listen="{HOST}:{lmtp_port}" prefork=0
}}
EVENTS {{
}}
"""
        )

    def fill(self, messages: Sequence[bytes]) -> None:
        if self._filled:  # before the first delivery there is no mailbox to log in to
            self.dele_all()
        self._filled = True
        with smtplib.LMTP(HOST, self.lmtp_port, timeout=POP3_TIMEOUT) as lmtp:
            for message in messages:
                refused = lmtp.sendmail("sender@example.org", [self.user], served_as_crlf(message))
                if refused:
                    raise ServerError(f"lmtpd refused a message: {refused!r}")

    def stored(self) -> list[bytes]:
        """The message files (``<uid>.``) of the messages POP3 lists: Cyrus unlinks the files
        of expunged messages lazily, when some process next closes the mailbox."""
        if not self._filled:
            return []
        listing = self.session([b"UIDL"])[3].split(b"\r\n")[1:]
        # Cyrus's UIDL is UIDVALIDITY.UID.
        uids = [line.split()[1].rsplit(b".", 1)[-1].decode() for line in listing if line]
        files = {
            path.name[:-1]: path
            for path in (self.data / "spool").rglob("*.")
            if path.is_file() and path.name[:-1].isdigit()
        }
        return [files[uid].read_bytes() for uid in uids]

    @staticmethod
    def served(stored: bytes) -> bytes:
        return stored


class MailutilsBackend(SandboxedBackend):
    key = "mailutils"
    title = "GNU Mailutils"
    package = "mailutils-pop3d"
    rules = Rules(
        storage=(
            "Maildir with LF line ends only: CRLF sources are stored with LF, as a Unix MDA "
            "stores them (pop3d 3.15 empties a message whose lines end in CRLF: it finds no "
            "end of header and rewrites the file with nothing but its X-UIDL line). pop3d "
            "adds an X-UIDL header to each message file the first time it opens the mailbox; "
            "the launcher opens it once after filling it, so the stored bytes include it."
        ),
        serving="Each LF becomes CRLF; a message without a final newline gets CRLF.",
    )

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        tree = unpacked(self.package)
        users = _SandboxUsers([self.user])
        self._uid = users.uids[self.user]
        layer = root / "layer"
        users.write(layer / "etc", {self.user: self.password}, {})
        mail = self.data / "mail"
        mail.mkdir(mode=0o755, exist_ok=True)
        self.maildir = mail / self.user
        self.maildir.mkdir(exist_ok=True)
        os.chown(self.maildir, self._uid, self._uid)
        self.fill_raw([])
        self._start_sandbox({"/usr": [tree / "usr"], "/etc": [layer / "etc", tree / "etc"]}, [])
        for _attempt in range(BIND_ATTEMPTS):
            port = free_port()
            config = self.data / "pop3d.conf"
            config.write_text(
                f"""\
# Written by tests/support/pop3_servers.py.
logging {{ syslog no; }};
mode daemon;
foreground yes;
auth {{ authentication system; authorization system; }};
mailbox {{ mailbox-pattern "maildir://{DATA_MOUNT}/mail/${{user}}"; }};
mandatory-locking {{ enable no; }};
server {HOST}:{port} {{ }};
"""
            )
            process = self._spawn(["/usr/sbin/pop3d", f"--config-file={DATA_MOUNT}/pop3d.conf"])
            try:
                _wait_greeting(port, [process], time.monotonic() + READY_TIMEOUT, self.log_tail)
            except ServerError:
                if process.poll() is None:
                    raise
                self._processes.remove(process)
                continue
            self.port = port
            self._daemon = process
            return
        raise ServerError(f"Mailutils pop3d found no free port:\n{self.log_tail()}")

    def wait_sessions_closed(self) -> None:
        # The daemon forks a pop3d per connection.
        _wait_sessions_gone(self._daemon, frozenset({"pop3d"}))

    def fill_raw(self, messages: Sequence[bytes]) -> None:
        self._generation += 1
        _write_maildir(self.maildir, messages, self._uid, self._uid, self._generation)
        for name in (".mu-prop",):
            with contextlib.suppress(FileNotFoundError):
                (self.maildir / name).unlink()

    def fill(self, messages: Sequence[bytes]) -> None:
        self.fill_raw([lf(message) for message in messages])
        # Let pop3d add its X-UIDL lines now rather than during the test's session.
        self.session([b"UIDL"])

    def stored(self) -> list[bytes]:
        return _maildir_messages(self.maildir)

    @staticmethod
    def served(stored: bytes) -> bytes:
        return served_as_crlf(stored)


BACKENDS: dict[str, type[Pop3Backend]] = {
    backend.key: backend
    for backend in (DovecotBackend, Popa3dBackend, CourierBackend, CyrusBackend, MailutilsBackend)
}


@contextlib.contextmanager
def running_backend(key: str, root: Path) -> Iterator[Pop3Backend]:
    """Start the backend ``key`` with its data under ``root``; stopped when the block ends."""
    backend: Pop3Backend
    if key == DovecotBackend.key:
        with running_dovecot(root, {USER: (PASSWORD, [])}, name="matrix") as dovecot:
            backend = DovecotBackend(dovecot)
            yield backend
        return
    if os.geteuid() != 0:
        interop_unavailable(f"the {key} launcher needs root: mount namespaces, other users")
    cls = BACKENDS[key]
    assert issubclass(cls, SandboxedBackend)
    server = cls(root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
