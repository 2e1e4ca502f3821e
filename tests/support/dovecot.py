"""Run a real Dovecot POP3 server on 127.0.0.1 for interop tests.

Owns a temporary dovecot.conf, the users' passwd-file and Maildirs, and the one process group
it starts. Must never read or change the system configuration (/etc/dovecot), use systemd,
bind anything but 127.0.0.1, or signal a process outside the group it started.

Dovecot refuses to run mail processes as root, so the Maildirs belong to ``nobody`` and the
pop3 processes run as ``nobody``. pytest's tmp_path lies under directories of mode 0700 that
``nobody`` cannot traverse; rather than loosen them, each pop3 process chroots into the mail
directory before it drops privileges (the ``/./`` in the userdb home marks the chroot, see
https://doc.dovecot.org/2.3/configuration_manual/chrooting/), and the auth process, which
reads the passwd-file, runs as root.

Every launch gets its own directory under tmp_path (named after ``name``), port and base_dir,
so several Dovecots can run side by side. ``haproxy=True`` makes the POP3 listener demand a
PROXY protocol v1/v2 header on every connection; ``trusted_networks`` are the networks whose
clients Dovecot trusts to send XCLIENT (None: no network, and no [XCLIENT] in the greeting).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import pytest

from support.interop import interop_unavailable, require_program

DOVECOT_PROGRAM = "/usr/sbin/dovecot"
HOST = "127.0.0.1"

# Timeouts, in seconds.
READY_TIMEOUT = 20.0  # start-up: from exec until the POP3 greeting arrives
GREETING_ATTEMPT_TIMEOUT = 2.0  # one readiness probe: connect and read the greeting
STOP_GRACE = 10.0  # shutdown: from SIGTERM until the master has exited
KILL_TIMEOUT = 5.0  # after SIGKILL: until the process group is gone
LOG_TIMEOUT = 5.0  # until a login Dovecot has reported to its client shows in its log
_CONNECT_BACKOFF_MAX = 0.1  # pause between refused connects while Dovecot binds
_LOG_BACKOFF_MAX = 0.05  # pause between reads of the log while a line is due

BIND_ATTEMPTS = 3  # the free port may be taken between our probe and Dovecot's bind
# A restart must bind the same port again: Dovecot sets SO_REUSEADDR, so only another
# program that took the port while Dovecot was down makes it fail; retried, then given up.
RESTART_BIND_ATTEMPTS = 5
_RESTART_BACKOFF = 0.05

DEFAULT_TRUSTED_NETWORKS = "127.0.0.0/8"
# Who may send the PROXY header when haproxy=True: the proxy under test, on loopback.
HAPROXY_TRUSTED_NETWORKS = "127.0.0.0/8"
# PROXY protocol v2 (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt §2.2):
# signature, version 2 + command LOCAL, family UNSPEC, no addresses. Dovecot then keeps the
# connection's own addresses; the readiness probe sends it before reading the greeting.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_LOCAL_HEADER = PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"

# Dovecot's own users, created by the Debian package (dovecot-core).
INTERNAL_USER = "dovecot"
LOGIN_USER = "dovenull"
MAIL_USER = "nobody"

# base_dir holds Unix sockets (longest: "replication-notify-fifo", "token-login/tokenlogin");
# sun_path has 108 bytes, so a deep tmp_path moves base_dir to a short directory in /tmp.
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_RESERVE = 40

_USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")
_NETWORKS = re.compile(r"[0-9A-Fa-f.:/]+(?:[ ,]+[0-9A-Fa-f.:/]+)*\Z")
_UNSAFE_PASSWORD = re.compile(r"[:\x00-\x1f\x7f]")
_UNSAFE_PATH = re.compile(r"[\s\"'\\#{}$%]")
_ADDRESS_IN_USE = "Address already in use"
_LOGIN_MARK = "Login: user="
_REMOTE_IP = re.compile(r"\brip=([^,\s]+)")

Users: TypeAlias = Mapping[str, tuple[str, Sequence[bytes]]]


class DovecotError(RuntimeError):
    """Dovecot did not start or stop; the message ends with the tail of its log."""


class _AddressInUse(Exception):
    """Dovecot could not bind the port we picked: pick another one."""


@dataclass
class Dovecot:
    """A Dovecot serving POP3 on ``host``:``port``: stopped by :meth:`stop`, started again,
    on the same port and with the same configuration, by :meth:`start`."""

    host: str
    port: int
    root: Path
    log_path: Path
    name: str
    haproxy: bool
    trusted_networks: str | None
    _program: str = field(repr=False)
    _token: str = field(repr=False)
    _uid: int = field(repr=False)
    _gid: int = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _stderr_path: Path | None = field(default=None, repr=False)
    _log_offset: int = field(default=0, repr=False)
    _scratch_dir: Path | None = field(default=None, repr=False)
    _starts: int = field(default=0, repr=False)

    @property
    def pid(self) -> int:
        """The master's PID, which is also its process group id (the last one, if stopped)."""
        if self._process is None:
            raise DovecotError("Dovecot was never started")
        return self._process.pid

    @property
    def mail_root(self) -> Path:
        return self.root / "mail"

    def maildir(self, user: str) -> Path:
        return self.mail_root / user / "Maildir"

    def message_files(self, user: str) -> list[Path]:
        """The user's stored messages (cur/ and new/), in delivery order."""
        maildir = self.maildir(user)
        files = [p for sub in ("cur", "new") for p in (maildir / sub).iterdir() if p.is_file()]
        # Names start with the delivery index; Dovecot only appends ":2,<flags>" in cur/.
        return sorted(files, key=lambda p: p.name)

    def log_tail(self, lines: int = 40) -> str:
        """The end of what this Dovecot wrote to its log and to stderr since its last start."""
        parts = []
        with contextlib.suppress(FileNotFoundError):
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                parts.extend(log.read().decode("utf-8", "replace").splitlines()[-lines:])
        if self._stderr_path is not None:
            with contextlib.suppress(FileNotFoundError):
                stderr = self._stderr_path.read_bytes().decode("utf-8", "replace")
                parts.extend(f"stderr: {line}" for line in stderr.splitlines()[-lines:])
        return "\n".join(parts) if parts else "(Dovecot wrote nothing)"

    def login_lines(self) -> list[str]:
        """Every successful login Dovecot has logged so far, across restarts, oldest first.

        Dovecot 2.3 logs them at info level, e.g. ``pop3-login: Info: Login: user=<alice>,
        method=PLAIN, rip=203.0.113.7, lip=127.0.0.1, mpid=..., session=<...>``. A login
        the client has seen may not be here yet: see :meth:`wait_login_lines`.
        """
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if _LOGIN_MARK in line]

    def remote_ips(self) -> list[str]:
        """The ``rip=`` (client address as Dovecot saw it) of each of :meth:`login_lines`."""
        return [m.group(1) for line in self.login_lines() if (m := _REMOTE_IP.search(line))]

    def wait_login_lines(self, count: int, timeout: float = LOG_TIMEOUT) -> list[str]:
        """:meth:`login_lines`, once there are at least ``count`` of them.

        Dovecot gives no signal for this: the pop3-login process (one per connection)
        writes the line into its pipe to Dovecot's log process, which appends it to the log
        in its own time, possibly after the client has read "+OK Logged in.". So this
        reads the log again after short pauses, for at most ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        backoff = 0.005
        while len(lines := self.login_lines()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DovecotError(
                    f"Dovecot logged {len(lines)} logins, not {count}, in {timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _LOG_BACKOFF_MAX)
        return lines

    def processes(self) -> list[int]:
        """PIDs of live processes (not zombies) in the process group Dovecot started in."""
        if self._process is None:
            return []
        return process_group_members(self._process.pid)

    def session_processes(self) -> list[int]:
        """PIDs of the pop3 processes: one per logged-in session, gone when it ends."""
        return [pid for pid in self.processes() if _command_name(pid) == "pop3"]

    def wait_sessions_closed(self, timeout: float = STOP_GRACE) -> None:
        """Return once every POP3 session open now has ended, e.g. after a client vanished.

        Dovecot runs each session in its own pop3 process, which exits when the session
        ends; a pidfd reports that exit.
        """
        deadline = time.monotonic() + timeout
        for pid in self.session_processes():
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                if not _wait_readable(pidfd, max(0.0, deadline - time.monotonic())):
                    raise DovecotError(f"POP3 session process {pid} still runs after {timeout}s")
            finally:
                os.close(pidfd)

    def stop(self) -> None:
        """Stop the master and everything in its process group; safe to call twice."""
        process = self._process
        if process is not None and process.returncode is None:
            # A pidfd reports the master's exit without reaping it: until it is reaped its
            # PID, which is also the process group id, cannot be reused, so the killpg
            # below can only reach processes that this Dovecot started.
            pidfd = os.pidfd_open(process.pid)
            try:
                _send(pidfd, signal.SIGTERM)  # Dovecot's orderly shutdown: about 1 s
                if not _wait_readable(pidfd, STOP_GRACE):
                    _send(pidfd, signal.SIGKILL)
                    if not _wait_readable(pidfd, KILL_TIMEOUT):
                        raise DovecotError(f"Dovecot pid {process.pid} survived SIGKILL")
                # Dovecot 2.3's master sends its log process SIGQUIT and exits without
                # reaping it; a killed master leaves all its children. End them here.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            finally:
                os.close(pidfd)
            process.wait(timeout=KILL_TIMEOUT)
        if process is not None:
            # Until the whole group is gone, a pop3-login process may hold the port.
            _wait_group_gone(process.pid, KILL_TIMEOUT)
        if self._scratch_dir is not None:
            shutil.rmtree(self._scratch_dir, ignore_errors=True)
            self._scratch_dir = None

    def start(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """Start again after :meth:`stop`: same port, users, mail and configuration.

        Returns once Dovecot sends its greeting, as at launch. Raises DovecotError when it
        is still running, or when it cannot bind its port again (another program took it).
        """
        if self._process is not None and self._process.returncode is None:
            raise DovecotError(f"Dovecot pid {self._process.pid} still runs: stop() it first")
        deadline = time.monotonic() + ready_timeout
        for attempt in range(1, RESTART_BIND_ATTEMPTS + 1):
            try:
                self._run(deadline)
            except _AddressInUse:
                if attempt < RESTART_BIND_ATTEMPTS and time.monotonic() < deadline:
                    # Retry pacing, not synchronisation: the port's holder is not ours.
                    time.sleep(min(_RESTART_BACKOFF, max(0.0, deadline - time.monotonic())))
                continue
            return
        raise DovecotError(
            f"Dovecot could not bind {self.host}:{self.port} again in "
            f"{RESTART_BIND_ATTEMPTS} attempts:\n{self.log_tail()}"
        )

    def restart(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """:meth:`stop`, then :meth:`start`: a backend that goes down and comes back."""
        self.stop()
        self.start(ready_timeout)

    async def astop(self) -> None:
        """:meth:`stop` for async code: it waits for processes, so it runs in a thread."""
        await asyncio.to_thread(self.stop)

    async def astart(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """:meth:`start` for async code."""
        await asyncio.to_thread(self.start, ready_timeout)

    async def arestart(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """:meth:`restart` for async code."""
        await asyncio.to_thread(self.restart, ready_timeout)

    def _run(self, deadline: float) -> None:
        """Start the master on ``port`` and wait for its greeting; stop it if that fails.

        Raises _AddressInUse when the port is taken.
        """
        self._starts += 1
        base_dir = self._new_base_dir()
        conf_path = self.root / "dovecot.conf"
        conf_path.write_text(
            _config(
                port=self.port,
                token=self._token,
                base_dir=base_dir,
                state_dir=self.root / "state",
                log_path=self.log_path,
                mail_root=self.mail_root,
                passwd_path=self.root / "passwd",
                uid=self._uid,
                gid=self._gid,
                haproxy=self.haproxy,
                trusted_networks=self.trusted_networks,
            )
        )
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._stderr_path = self.root / f"dovecot-{self._starts}.stderr"
        with self._stderr_path.open("wb") as stderr:
            # A new session makes the master's PID its process group id: stop() kills only
            # that group. -F keeps the master in the foreground, so it is our child.
            process = subprocess.Popen(
                [self._program, "-F", "-c", str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        self._process = process
        try:
            _wait_until_ready(self, process, deadline)
        except BaseException:
            self.stop()
            raise

    def _new_base_dir(self) -> Path:
        """A base_dir no earlier start has used: nothing stale (master.pid, sockets) in it."""
        base_dir = self.root / f"run-{self._starts}"
        if len(str(base_dir)) + _SOCKET_NAME_RESERVE <= _SOCKET_PATH_MAX:
            return base_dir
        self._scratch_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir="/tmp"))
        return self._scratch_dir / "run"


def launch_dovecot(
    tmp_path: Path,
    users: Users,
    *,
    ready_timeout: float = READY_TIMEOUT,
    name: str = "dovecot",
    haproxy: bool = False,
    trusted_networks: str | None = DEFAULT_TRUSTED_NETWORKS,
) -> Dovecot:
    """Start Dovecot serving POP3 to ``users`` (name -> (password, messages)).

    Each message is stored as given in the user's Maildir/new. Everything lives in a new
    directory ``<tmp_path>/<name>-XXXX``, so one tmp_path holds several Dovecots.
    ``haproxy``: every connection must start with a PROXY v1/v2 header, sent from
    127.0.0.0/8. ``trusted_networks``: Dovecot's login_trusted_networks, whose clients may
    send XCLIENT (announced as "[XCLIENT]" in the greeting); None for none.

    Skips the test when Dovecot is missing or we are not root (fails instead when
    POPROXY_REQUIRE_INTEROP=1).
    """
    program = _check_requirements()
    return _launch(program, tmp_path, users, ready_timeout, name, haproxy, trusted_networks)


async def start_dovecot(
    tmp_path: Path,
    users: Users,
    *,
    ready_timeout: float = READY_TIMEOUT,
    name: str = "dovecot",
    haproxy: bool = False,
    trusted_networks: str | None = DEFAULT_TRUSTED_NETWORKS,
) -> Dovecot:
    """:func:`launch_dovecot` for async code; stop it with ``await dovecot.astop()``."""
    program = _check_requirements()  # pytest.skip belongs in the test's own thread
    return await asyncio.to_thread(
        _launch, program, tmp_path, users, ready_timeout, name, haproxy, trusted_networks
    )


@contextlib.contextmanager
def running_dovecot(
    tmp_path: Path,
    users: Users,
    *,
    ready_timeout: float = READY_TIMEOUT,
    name: str = "dovecot",
    haproxy: bool = False,
    trusted_networks: str | None = DEFAULT_TRUSTED_NETWORKS,
) -> Iterator[Dovecot]:
    """:func:`launch_dovecot`, stopped when the block ends."""
    dovecot = launch_dovecot(
        tmp_path,
        users,
        ready_timeout=ready_timeout,
        name=name,
        haproxy=haproxy,
        trusted_networks=trusted_networks,
    )
    try:
        yield dovecot
    finally:
        dovecot.stop()


def _check_requirements() -> str:
    program = require_program(DOVECOT_PROGRAM)
    if os.geteuid() != 0:
        interop_unavailable(
            "the Dovecot launcher needs root: Dovecot switches mail processes to another user"
        )
    for name in (INTERNAL_USER, LOGIN_USER, MAIL_USER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.fail(
                f"system user {name!r} is missing; the Debian dovecot-core package creates "
                f"{INTERNAL_USER!r} and {LOGIN_USER!r} (reinstall it)",
                pytrace=False,
            )
    return program


def _launch(
    program: str,
    tmp_path: Path,
    users: Users,
    ready_timeout: float,
    name: str,
    haproxy: bool,
    trusted_networks: str | None,
) -> Dovecot:
    if _UNSAFE_PATH.search(str(tmp_path)):
        raise ValueError(f"tmp_path {tmp_path} has characters dovecot.conf cannot carry")
    if not _INSTANCE_NAME.match(name):
        raise ValueError(f"name {name!r} is not a short plain name")
    if trusted_networks is not None and not _NETWORKS.match(trusted_networks):
        raise ValueError(
            f"trusted_networks {trusted_networks!r} is not a list of addresses or CIDR "
            "networks (None for no trusted network)"
        )
    tmp_path.mkdir(parents=True, exist_ok=True)  # tmp_path / "a" for a second instance
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path))
    mail_user = pwd.getpwnam(MAIL_USER)
    uid, gid = mail_user.pw_uid, mail_user.pw_gid
    _write_maildirs(root / "mail", users, uid, gid)
    _write_passwd(root / "passwd", users)
    (root / "state").mkdir()

    dovecot = Dovecot(
        host=HOST,
        port=0,  # chosen per attempt below
        root=root,
        log_path=root / "dovecot.log",
        name=name,
        haproxy=haproxy,
        trusted_networks=trusted_networks,
        _program=program,
        _token=secrets.token_hex(6),
        _uid=uid,
        _gid=gid,
    )
    deadline = time.monotonic() + ready_timeout
    for _attempt in range(BIND_ATTEMPTS):
        dovecot.port = _free_port()
        try:
            dovecot._run(deadline)
        except _AddressInUse:
            continue
        return dovecot
    raise DovecotError(f"Dovecot found no free port on {HOST} in {BIND_ATTEMPTS} attempts")


def _write_maildirs(mail_root: Path, users: Users, uid: int, gid: int) -> None:
    mail_root.mkdir(mode=0o755)  # the chroot: root's, so nobody can replace it
    for user, (_password, messages) in users.items():
        if not _USER_NAME.match(user):
            raise ValueError(f"user name {user!r} is not a plain lowercase name")
        home = mail_root / user
        maildir = home / "Maildir"
        for directory in (home, maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
            directory.mkdir(mode=0o700)
            os.chown(directory, uid, gid)
        for index, message in enumerate(messages, start=1):
            # Dovecot assigns UIDs (and so POP3 message numbers) in the order of the
            # leading number of Maildir file names.
            path = maildir / "new" / f"{index:06d}.poproxy-test"
            path.write_bytes(message)
            os.chown(path, uid, gid)
            path.chmod(0o600)


def _write_passwd(path: Path, users: Users) -> None:
    lines = []
    for user, (password, _messages) in users.items():
        if _UNSAFE_PASSWORD.search(password):
            raise ValueError(f"password for {user!r} has a colon or control character")
        lines.append(f"{user}:{{PLAIN}}{password}::::::\n")
    path.write_text("".join(lines))
    path.chmod(0o600)


def _config(
    *,
    port: int,
    token: str,
    base_dir: Path,
    state_dir: Path,
    log_path: Path,
    mail_root: Path,
    passwd_path: Path,
    uid: int,
    gid: int,
    haproxy: bool,
    trusted_networks: str | None,
) -> str:
    if trusted_networks is None:
        trusted = "# No login_trusted_networks: no client may send XCLIENT, none is announced."
    else:
        # Clients from here may send XCLIENT (announced as "[XCLIENT]" in the greeting).
        trusted = f"login_trusted_networks = {trusted_networks}"
    if haproxy:
        haproxy_trusted = f"haproxy_trusted_networks = {HAPROXY_TRUSTED_NETWORKS}"
        # Every connection must start with a PROXY v1/v2 header from haproxy_trusted_networks.
        listener_haproxy = "\n    haproxy = yes"
    else:
        haproxy_trusted = "# No haproxy listener."
        listener_haproxy = ""
    return f"""\
# Written by tests/support/dovecot.py for one test. Self-contained: includes no system file.
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log_path}
info_log_path = {log_path}
protocols = pop3
listen = {HOST}
ssl = no
# Plaintext USER/PASS over loopback: the proxy in front is what adds TLS.
disable_plaintext_auth = no
auth_mechanisms = plain login
{trusted}
{haproxy_trusted}
# The token proves the greeting comes from this Dovecot and not from whoever took the port.
login_greeting = Dovecot ready ({token}).
default_internal_user = {INTERNAL_USER}
default_login_user = {LOGIN_USER}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
valid_chroot_dirs = {mail_root}
mail_location = maildir:~/Maildir
pop3_uidl_format = %g

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd_path}
}}
userdb {{
  driver = static
  # "/./" marks the chroot: pop3 runs in {mail_root} as uid {uid}, home /<user>.
  args = uid={uid} gid={gid} home={mail_root}/./%u
}}

service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {port}{listener_haproxy}
  }}
}}
service auth {{
  # The passwd-file lies under tmp_path, whose 0700 parents only root can traverse.
  user = root
}}
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_until_ready(dovecot: Dovecot, process: subprocess.Popen[bytes], deadline: float) -> None:
    """Return once Dovecot sends its greeting; raise with its log tail if it never does."""
    backoff = 0.005
    last_error: OSError | None = None
    while True:
        returncode = process.poll()
        if returncode is not None:
            tail = dovecot.log_tail()
            if _ADDRESS_IN_USE in tail:
                raise _AddressInUse
            raise DovecotError(f"Dovecot exited with status {returncode}:\n{tail}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DovecotError(
                f"Dovecot sent no greeting in time (last error: {last_error!r}):\n"
                f"{dovecot.log_tail()}"
            )
        try:
            greeting = _read_greeting(
                dovecot.host,
                dovecot.port,
                min(remaining, GREETING_ATTEMPT_TIMEOUT),
                # A haproxy listener says nothing until the PROXY header has arrived.
                preamble=PROXY_V2_LOCAL_HEADER if dovecot.haproxy else b"",
            )
        except OSError as exc:
            # Refused: Dovecot has not bound the port yet. Timeout or reset: we may have
            # reached another program that held the port before Dovecot failed to bind it.
            # Either way the next turn checks whether Dovecot still runs.
            last_error = exc
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _CONNECT_BACKOFF_MAX)
            continue
        if greeting.startswith(b"+OK") and dovecot._token.encode() in greeting:
            return
        raise _AddressInUse  # another server answered on the port we picked


def _read_greeting(host: str, port: int, timeout: float, *, preamble: bytes = b"") -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if preamble:
            sock.sendall(preamble)
        greeting = b""
        while not greeting.endswith(b"\n") and len(greeting) < 512:
            chunk = sock.recv(512)
            if not chunk:
                break
            greeting += chunk
        return greeting


def _send(pidfd: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited already: nothing to signal
        signal.pidfd_send_signal(pidfd, signum)


def _wait_readable(fd: int, timeout: float) -> bool:
    """Wait for a pidfd to report its process's exit."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # exited
        return ""


def process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after "(comm)": state ppid pgrp ... (proc(5)); comm may hold spaces.
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        # A zombie has exited already: the master's orphans are reaped by PID 1, late.
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> None:
    # No event reports the end of a process group whose members are not our children,
    # so this polls /proc, bounded; it only waits after a master had to be killed.
    deadline = time.monotonic() + timeout
    backoff = 0.005
    while members := process_group_members(pgid):
        if time.monotonic() >= deadline:
            raise DovecotError(f"Dovecot processes {members} outlived their master")
        time.sleep(backoff)
        backoff = min(backoff * 2, 0.1)
