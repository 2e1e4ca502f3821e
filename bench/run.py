#!/usr/bin/env python3
"""CPU and memory of poproxy against nginx's mail proxy, HAProxy and stunnel.

Every system under test terminates TLS for the same plaintext POP3 backend on
127.0.0.1, runs pinned to CPU 1 and is measured from outside: its CPU time is
utime + stime from /proc/PID/stat (every process of its tree, every thread),
its memory VmRSS from /proc/PID/status. The load generator (asyncio clients
in this process, on uvloop) and the backend run on CPU 0. Each round starts
every system afresh, one after the other (the order rotates), so drift hits
all of them alike; the report gives the median over rounds, as a ratio to
nginx.

Workloads, per system and round:
  idle     N sessions logged in and held (client and backend side open):
           RSS growth per session.
  full     whole POP3S sessions at fixed concurrency: connect, full TLS 1.3
           handshake (ECDSA P-256), USER/PASS, STAT, LIST, RETR of a 4 KiB
           message, QUIT: proxy CPU ms per session.
  resumed  the same with the TLS session resumed from the previous
           session's ticket.
  stls     the same over STLS on the plaintext port (where supported).
  relay    logged-in sessions doing RETR of a 10 MiB message: proxy CPU s
           per GB (1e9 bytes of message) relayed.
  hello    TLS (full handshake), the greeting and QUIT, no login: what the
           TLS front door alone costs per connection.
  hello-resumed  the same, resumed from the previous connection's ticket.

Every reply is checked (STAT and LIST sizes, every message byte for byte), a
session that fails is counted as an error and not as work done.

Usage: .venv/bin/python bench/run.py --quick   (bench/README.md has the rest)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import ipaddress
import itertools
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
POPROXY = ROOT / ".venv" / "bin" / "poproxy"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
NGINX = "/usr/sbin/nginx"
NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
HAPROXY = "/usr/sbin/haproxy"
STUNNEL = "/usr/bin/stunnel4"

HOST = "127.0.0.1"
SERVER_NAME = "localhost"  # in the certificate; sent as SNI
USER_PREFIX = "bench"
PASSWORD = "benchpass"
SMALL_SIZE = 4096  # the message every session retrieves
BIG_SIZE = 10 * 1024 * 1024  # the message the relay workload retrieves
LOAD_CPU = 0  # this process (load generator, auth_http) and the backend
PROXY_CPU = 1  # the system under test
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STREAM_LIMIT = 32 * 1024 * 1024  # StreamReader buffer: room for a whole 10 MiB reply

# Seconds.
SESSION_TIMEOUT = 30.0  # one client session, from connect to EOF
START_TIMEOUT = 15.0  # a system under test, until its port accepts connections
STOP_TIMEOUT = 10.0  # after SIGTERM, before SIGKILL
SETTLE = 0.3  # quiet time before reading CPU counters, so closing work is counted
IDLE_SETTLE = 1.0  # after the last idle session logged in, before reading RSS
IDLE_OPEN_CONCURRENCY = 64
DOVECOT_IDLE_MAX = 90  # Dovecot's default process_limit is 100 (tests/support/dovecot.py)

SYSTEMS = ("nginx", "poproxy", "haproxy", "stunnel")
BASELINE = "nginx"
WORKLOADS = ("idle", "full", "resumed", "stls", "relay", "hello", "hello-resumed")
# Workloads that resume the TLS session of each client's previous session.
RESUMING = ("resumed", "hello-resumed")


class BenchError(Exception):
    """A reply was not what the session expected: the run is broken, not fast."""


class Unavailable(Exception):
    """A system cannot run here; the message says why."""


@dataclass(frozen=True)
class Plan:
    """How much load: every loop is bounded by a count and by a time."""

    rounds: int
    concurrency: int
    sessions: int  # per session window, at most
    window: float  # seconds per session window, at most
    relay_concurrency: int
    retrs: int  # 10 MiB RETRs per relay window, at most
    relay_window: float
    idle: int  # idle sessions held
    idle_window: float  # seconds to open them, at most
    warmup: int  # sessions before anything is measured


QUICK = Plan(
    rounds=3,
    concurrency=32,
    sessions=1500,
    window=2.5,
    relay_concurrency=4,
    retrs=24,
    relay_window=4.0,
    idle=2000,
    idle_window=30.0,
    warmup=64,
)
FULL = Plan(
    rounds=5,
    concurrency=32,
    sessions=4000,
    window=3.0,
    relay_concurrency=4,
    retrs=48,
    relay_window=8.0,
    idle=3000,
    idle_window=45.0,
    warmup=200,
)


# --- messages and certificates ------------------------------------------------


def make_message(size: int, label: str) -> bytes:
    """A deterministic message of exactly `size` bytes in CRLF lines; no line starts
    with "." (base64 text), so it crosses the wire without dot-stuffing."""
    header = (
        f"From: bench <bench@example.org>\r\nTo: bench <bench@example.org>\r\n"
        f"Subject: {label}\r\nMessage-ID: <{label}@example.org>\r\n\r\n"
    ).encode()
    body_size = size - len(header)
    text = hashlib.shake_256(label.encode()).hexdigest(body_size)[:body_size].encode()
    lines = [text[i : i + 76] for i in range(0, body_size, 78)]
    body = b"\r\n".join(lines)[: body_size - 2] + b"\r\n"
    message = header + body
    assert len(message) == size and b"\r\n." not in message
    return message


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path
    combined: Path  # certificate then key, for HAProxy


def make_certificates(directory: Path) -> Certificates:
    """A throwaway CA and an ECDSA P-256 server certificate for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "poproxy bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = Certificates(
        ca=directory / "ca.pem",
        cert=directory / "cert.pem",
        key=directory / "key.pem",
        combined=directory / "combined.pem",
    )
    files.ca.write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(leaf.public_bytes(pem))
    files.key.write_bytes(key_pem)
    files.combined.write_bytes(leaf.public_bytes(pem) + key_pem)
    files.key.chmod(0o600)
    files.combined.chmod(0o600)
    return files


class ClientContext(ssl.SSLContext):
    """A client context that offers `offer`, a saved TLS session, on its next connection.

    asyncio (and uvloop) create the TLS object with `wrap_bio` and no session
    argument; each client worker has its own context, so setting `offer`
    before connecting is race-free.
    """

    offer: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.offer
        )


def client_context(ca: Path) -> ClientContext:
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    return context


# --- the backend -------------------------------------------------------------


def serve_backend(port_file: Path) -> None:
    """The in-memory POP3 backend (poproxy.demo.MailboxServer), in its own process.

    Every user named bench<N> exists with PASSWORD and the two messages; each
    login gets a fresh mailbox, so no session waits for another's lock.
    """
    from poproxy.demo import Mailbox, MailboxServer

    messages = [make_message(SMALL_SIZE, "small"), make_message(BIG_SIZE, "big")]
    password = PASSWORD.encode()

    class AnyBenchUser(dict[bytes, Mailbox]):
        def get(  # type: ignore[override]
            self, key: bytes, default: Mailbox | None = None
        ) -> Mailbox | None:
            if key.startswith(USER_PREFIX.encode()):
                return Mailbox(password, list(messages))
            return default

    async def main() -> None:
        server = MailboxServer(AnyBenchUser())
        _host, port = await server.start(HOST, 0)
        temporary = port_file.with_suffix(".tmp")
        temporary.write_text(str(port))
        temporary.rename(port_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        while not stop.is_set():
            server.received.clear()  # it records every command line: keep it small
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
        await server.stop()

    uvloop.run(main())


@dataclass
class Backend:
    """The POP3 server behind every system; `stop` ends it."""

    description: str
    port: int
    stop: Callable[[], None]


def start_mailbox_backend(workdir: Path) -> Backend:
    port_file = workdir / "backend.port"
    log = (workdir / "backend.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve-backend", str(port_file)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"backend did not start; see {workdir / 'backend.log'}")
        time.sleep(0.05)
    return Backend(
        "poproxy.demo.MailboxServer (in-memory), separate process on CPU 0",
        int(port_file.read_text()),
        lambda: stop_process(process),
    )


def start_dovecot_backend(workdir: Path, workers: int, idle: int) -> Backend:
    """Dovecot with a user per client worker, and one per idle session (`Bench.idle`):
    Dovecot locks a POP3 mailbox to one session."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.dovecot import launch_dovecot

    small = make_message(SMALL_SIZE, "small")
    both = [small, make_message(BIG_SIZE, "big")]
    users = {f"{USER_PREFIX}{i}": (PASSWORD, both) for i in range(workers)}
    users.update({f"{USER_PREFIX}{workers + i}": (PASSWORD, [small]) for i in range(idle)})
    # No XCLIENT announced: poproxy would send it and nginx would not.
    dovecot = launch_dovecot(workdir / "dovecot", users, trusted_networks=None)
    return Backend("Dovecot (tests/support/dovecot.py) on CPU 0", dovecot.port, dovecot.stop)


# --- nginx's auth_http, answered in this process ------------------------------


async def start_auth_http(backend_port: int) -> asyncio.Server:
    """nginx asks where each login goes: always to the backend."""
    answer = (
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"
        f"Auth-Server: {HOST}\r\nAuth-Port: {backend_port}\r\n\r\n"
    ).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(SESSION_TIMEOUT):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, HOST, 0)


# --- processes: start, pin, measure, stop -------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[ppid].append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def cpu_ticks(pids: Sequence[int]) -> tuple[int, int]:
    """(utime, stime) of these processes (all their threads, alive or exited), in ticks."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def cpu_busy_ticks(cpu: int) -> int:
    """Ticks CPU `cpu` spent on anything but idle and iowait (steal included), /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return user + nice + system + irq + softirq + steal
    raise RuntimeError(f"cpu{cpu} missing from /proc/stat")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds between two readings."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    @classmethod
    def between(cls, before: tuple[int, int], after: tuple[int, int]) -> Cpu:
        return cls((after[0] - before[0]) / CLOCK_TICKS, (after[1] - before[1]) / CLOCK_TICKS)


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def pin(pids: Sequence[int], cpu: int) -> None:
    """Every thread of these processes to `cpu`; threads and children made later inherit it."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), {cpu})


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; only this one process, by its PID."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Running:
    """A system under test, started and pinned."""

    name: str
    process: subprocess.Popen[bytes]
    implicit_port: int
    starttls_port: int | None
    log: Path

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def cpu_ticks(self) -> tuple[int, int]:
        return cpu_ticks(self.pids())

    def counters(self) -> tuple[float, tuple[int, int], int]:
        """A reading for `Window`: the time, our CPU ticks, CPU 1's busy ticks."""
        return time.monotonic(), self.cpu_ticks(), cpu_busy_ticks(PROXY_CPU)

    def rss_kib(self) -> int:
        return rss_kib(self.pids())

    def stop(self) -> None:
        stop_process(self.process)


@dataclass(frozen=True)
class Window:
    """What two `Running.counters()` readings say about the time between them."""

    seconds: float
    cpu: Cpu
    others: float  # CPU 1 time used by other processes (and the hypervisor), seconds

    @classmethod
    def between(
        cls, before: tuple[float, tuple[int, int], int], after: tuple[float, tuple[int, int], int]
    ) -> Window:
        cpu = Cpu.between(before[1], after[1])
        busy = (after[2] - before[2]) / CLOCK_TICKS
        return cls(after[0] - before[0], cpu, max(0.0, busy - cpu.total))


@dataclass(frozen=True)
class Setup:
    """What every system needs to know to be configured."""

    workdir: Path
    certificates: Certificates
    backend_port: int
    auth_http_port: int
    max_connections: int


def launch(
    name: str, command: list[str], setup: Setup, implicit: int, starttls: int | None
) -> Running:
    log = setup.workdir / f"{name}.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, cwd=setup.workdir
        )
    running = Running(name, process, implicit, starttls, log)
    deadline = time.monotonic() + START_TIMEOUT
    for port in (implicit, starttls):
        while port is not None:
            if process.poll() is not None:
                raise Unavailable(f"{name} exited with status {process.returncode}: {tail(log)}")
            try:
                socket.create_connection((HOST, port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    running.stop()
                    raise Unavailable(f"{name} did not listen on {port}: {tail(log)}") from None
                time.sleep(0.05)
    pin(running.pids(), PROXY_CPU)
    return running


def tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def start_poproxy(setup: Setup, log_level: str, workers: int = 1) -> Running:
    implicit, starttls = free_port(), free_port()
    cfg = setup.workdir / "poproxy.yaml"
    # No `workers` line for one: bench/compare.py also runs trees older than the key.
    workers_line = f"workers: {workers}\n" if workers > 1 else ""
    cfg.write_text(
        f"""\
user: root
{workers_line}listeners:
  - {{name: pop3s, listen: "{HOST}:{implicit}", tls: implicit}}
  # 0s: the default 200ms window would delay every STLS greeting.
  - {{name: pop3, listen: "{HOST}:{starttls}", tls: starttls, implicit_tls_window: 0s}}
tls:
  certificates:
    - {{cert: {setup.certificates.cert}, key: {setup.certificates.key}}}
backends:
  - {{name: bench, servers: ["{HOST}:{setup.backend_port}"]}}
limits:
  max_connections: {setup.max_connections}
  trusted_networks: ["127.0.0.0/8"]   # one client address: no per-address cap
  shutdown_grace: 1s
log:
  level: {log_level}
"""
    )
    running = launch("poproxy", [str(POPROXY), "run", "-c", str(cfg)], setup, implicit, starttls)
    if workers > 1:
        # The supervisor's sockets take connections before the workers exist: wait
        # until every worker serves, then pin the whole tree again, workers included.
        deadline = time.monotonic() + START_TIMEOUT
        while b"workers serving" not in running.log.read_bytes():
            if running.process.poll() is not None or time.monotonic() > deadline:
                running.stop()
                raise Unavailable(f"poproxy workers did not start: {tail(running.log)}")
            time.sleep(0.05)
        pin(running.pids(), PROXY_CPU)
    return running


def start_nginx(setup: Setup, proxy_buffer: str | None) -> Running:
    if not Path(NGINX).exists():
        raise Unavailable(f"{NGINX} not installed (Debian package nginx)")
    if not NGINX_MAIL_MODULE.exists():
        raise Unavailable(f"{NGINX_MAIL_MODULE} missing (Debian package libnginx-mod-mail)")
    implicit, starttls = free_port(), free_port()
    certs = setup.certificates
    cfg = setup.workdir / "nginx.conf"
    cfg.write_text(
        f"""\
load_module {NGINX_MAIL_MODULE};
worker_processes 1;
worker_rlimit_nofile {setup.max_connections * 2 + 1024};
daemon off;
master_process on;
pid {setup.workdir}/nginx.pid;
error_log {setup.workdir}/nginx-error.log error;
events {{ worker_connections {setup.max_connections * 2 + 512}; }}
mail {{
    server_name {SERVER_NAME};
    auth_http {HOST}:{setup.auth_http_port}/auth;
    pop3_auth plain;
    ssl_certificate {certs.cert};
    ssl_certificate_key {certs.key};
    ssl_protocols TLSv1.2 TLSv1.3;
    {f"proxy_buffer {proxy_buffer};" if proxy_buffer else "# proxy_buffer: the default"}
    server {{ listen {HOST}:{implicit} ssl; protocol pop3; }}
    server {{ listen {HOST}:{starttls}; protocol pop3; starttls on; }}
}}
"""
    )
    command = [NGINX, "-p", str(setup.workdir), "-c", str(cfg), "-e", "nginx-error.log"]
    return launch("nginx", command, setup, implicit, starttls)


def start_haproxy(setup: Setup) -> Running:
    if not Path(HAPROXY).exists():
        raise Unavailable(f"{HAPROXY} not installed (Debian package haproxy)")
    implicit = free_port()
    cfg = setup.workdir / "haproxy.cfg"
    cfg.write_text(
        f"""\
global
    nbthread 1
    maxconn {setup.max_connections * 2 + 512}
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend pop3s
    bind {HOST}:{implicit} ssl crt {setup.certificates.combined}
    default_backend pop3
backend pop3
    server backend {HOST}:{setup.backend_port}
"""
    )
    return launch("haproxy", [HAPROXY, "-db", "-f", str(cfg)], setup, implicit, None)


def start_stunnel(setup: Setup) -> Running:
    if not Path(STUNNEL).exists():
        raise Unavailable(f"{STUNNEL} not installed (Debian package stunnel4)")
    implicit, starttls = free_port(), free_port()
    certs = setup.certificates
    service = f"connect = {HOST}:{setup.backend_port}\ncert = {certs.cert}\nkey = {certs.key}\n"
    cfg = setup.workdir / "stunnel.conf"
    cfg.write_text(
        f"""\
foreground = yes
pid =
syslog = no
[pop3s]
accept = {HOST}:{implicit}
{service}
[pop3]
accept = {HOST}:{starttls}
protocol = pop3
{service}
"""
    )
    return launch("stunnel", [STUNNEL, str(cfg)], setup, implicit, starttls)


# --- the client sessions --------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the backend serves to every bench user."""

    small: bytes
    big: bytes

    @property
    def stat(self) -> bytes:
        return b"+OK 2 %d" % (len(self.small) + len(self.big))

    @property
    def listing(self) -> bytes:
        return b"1 %d\r\n2 %d\r\n.\r\n" % (len(self.small), len(self.big))


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def reply(reader: asyncio.StreamReader, what: str) -> bytes:
    line = await reader.readuntil(b"\r\n")
    if not line.startswith(b"+OK"):
        raise BenchError(f"{what}: {line[:100]!r}")
    return line


async def command(streams: Streams, line: str, what: str) -> bytes:
    reader, writer = streams
    writer.write(line.encode() + b"\r\n")
    return await reply(reader, what)


async def retrieve(streams: Streams, number: int, message: bytes) -> None:
    """RETR `number` and check the message, byte for byte, and its terminator."""
    await command(streams, f"RETR {number}", "RETR")
    body = await streams[0].readexactly(len(message) + 3)
    if body[:-3] != message or body[-3:] != b".\r\n":
        raise BenchError(f"RETR {number}: wrong content ({len(body)} bytes)")


async def connect(target: Running, context: ClientContext, *, stls: bool, user: str) -> Streams:
    """Connect, TLS (implicit or after STLS), log in; the session is in TRANSACTION state."""
    if stls:
        assert target.starttls_port is not None
        reader, writer = await asyncio.open_connection(
            HOST, target.starttls_port, limit=STREAM_LIMIT
        )
        await reply(reader, "greeting")
        writer.write(b"STLS\r\n")
        await reply(reader, "STLS")
        await writer.start_tls(context, server_hostname=SERVER_NAME)
    else:
        reader, writer = await asyncio.open_connection(
            HOST, target.implicit_port, ssl=context, server_hostname=SERVER_NAME, limit=STREAM_LIMIT
        )
        await reply(reader, "greeting")
    streams = (reader, writer)
    await command(streams, f"USER {user}", "USER")
    await command(streams, f"PASS {PASSWORD}", "PASS")
    return streams


async def quit_session(streams: Streams) -> None:
    reader, writer = streams
    await command(streams, "QUIT", "QUIT")
    rest = await reader.read()  # until the proxy closes the connection
    if rest:
        raise BenchError(f"bytes after QUIT: {rest[:100]!r}")
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


async def hello_session(target: Running, context: ClientContext) -> ssl.SSLObject:
    """TLS and the greeting, then QUIT: what the TLS front end alone costs."""
    reader, writer = await asyncio.open_connection(
        HOST, target.implicit_port, ssl=context, server_hostname=SERVER_NAME, limit=STREAM_LIMIT
    )
    try:
        await reply(reader, "greeting")
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        await quit_session((reader, writer))
        return ssl_object
    finally:
        writer.transport.abort()  # a no-op after a clean QUIT


async def pop3_session(
    target: Running, context: ClientContext, expected: Expected, *, stls: bool, user: str
) -> ssl.SSLObject:
    """One whole session; returns its TLS object (version, resumption, ticket)."""
    streams = await connect(target, context, stls=stls, user=user)
    try:
        stat = await command(streams, "STAT", "STAT")
        if stat.rstrip() != expected.stat:
            raise BenchError(f"STAT: {stat!r}, expected {expected.stat!r}")
        await command(streams, "LIST", "LIST")
        listing = await streams[0].readuntil(b"\r\n.\r\n")
        if listing != expected.listing:
            raise BenchError(f"LIST: {listing!r}")
        await retrieve(streams, 1, expected.small)
        ssl_object: ssl.SSLObject = streams[1].get_extra_info("ssl_object")
        await quit_session(streams)
        return ssl_object
    finally:
        streams[1].transport.abort()  # a no-op after a clean QUIT


SESSION_ERRORS = (
    OSError,
    ssl.SSLError,
    EOFError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    TimeoutError,
    BenchError,
)


@dataclass
class Tally:
    """What a window did."""

    done: int = 0
    started: int = 0
    errors: int = 0
    resumed: int = 0
    first_error: str | None = None
    protocols: collections.Counter[str] = field(default_factory=collections.Counter)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(exc).__name__}: {exc}"


async def run_bounded(
    count: int, seconds: float, concurrency: int, one: Callable[[int], Awaitable[None]]
) -> Tally:
    """`concurrency` workers run `one(worker)` until `count` runs started or time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    tally = Tally()

    async def worker(index: int) -> None:
        while tally.started < count and loop.time() < deadline:
            tally.started += 1
            try:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    await one(index)
            except SESSION_ERRORS as exc:
                tally.failed(exc)
            else:
                tally.done += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


# --- workloads ---------------------------------------------------------------


@dataclass
class Measurement:
    """One workload on one system in one round."""

    system: str
    workload: str
    round: int
    value: float  # ms/session, s/GB or KiB/session
    units: int  # sessions, GB-worth RETRs or idle sessions that succeeded
    errors: int
    seconds: float
    cpu_seconds: float
    system_share: float = 0.0  # the part of cpu_seconds spent in the kernel (stime)
    others: float = 0.0  # CPU 1 seconds used by other processes during the window
    resumed: float = 0.0  # fraction of sessions that resumed a TLS session
    first_error: str | None = None
    protocol: str = ""

    @property
    def utilisation(self) -> float:
        """The system's CPU use during the window, in % of one core."""
        return 100 * self.cpu_seconds / self.seconds if self.seconds else 0.0

    @property
    def interference(self) -> float:
        """Other processes' use of CPU 1 during the window, in % of one core."""
        return 100 * self.others / (self.seconds + SETTLE)  # `others` covers the settle too


class WindowFields(TypedDict):
    seconds: float
    cpu_seconds: float
    system_share: float
    others: float


def window_fields(window: Window) -> WindowFields:
    """The Measurement fields a measured window fills in."""
    cpu = window.cpu
    return {
        "seconds": window.seconds - SETTLE,  # the settle after the load, not the load
        "cpu_seconds": cpu.total,
        "system_share": cpu.system / cpu.total if cpu.total else 0.0,
        "others": window.others,
    }


@dataclass
class Bench:
    plan: Plan
    expected: Expected
    certificates: Certificates
    contexts: list[ClientContext] = field(default_factory=list)

    def __post_init__(self) -> None:
        workers = max(self.plan.concurrency, self.plan.relay_concurrency, IDLE_OPEN_CONCURRENCY)
        self.contexts = [client_context(self.certificates.ca) for _ in range(workers)]

    def user(self, index: int) -> str:
        return f"{USER_PREFIX}{index % self.plan.concurrency}"

    async def sessions(
        self, target: Running, workload: str, round_: int, count: int, seconds: float
    ) -> Measurement:
        """`full`, `resumed`, `stls`, `hello` or `hello-resumed` sessions at fixed
        concurrency; proxy CPU ms per session."""
        stls = workload == "stls"
        resume = workload in RESUMING
        hello = workload.startswith("hello")
        for context in self.contexts:
            context.offer = None
        if resume:  # a ticket for each worker, from a session outside the window
            await run_bounded(
                self.plan.concurrency,
                SESSION_TIMEOUT,
                self.plan.concurrency,
                lambda i: self._one(
                    target, i, stls=False, hello=hello, keep_ticket=True, tally=None
                ),
            )
        await asyncio.sleep(SETTLE)
        tally = Tally()
        before = target.counters()
        result = await run_bounded(
            count,
            seconds,
            self.plan.concurrency,
            lambda i: self._one(target, i, stls=stls, hello=hello, keep_ticket=resume, tally=tally),
        )
        await asyncio.sleep(SETTLE)
        window = Window.between(before, target.counters())
        done = result.done
        return Measurement(
            system=target.name,
            workload=workload,
            round=round_,
            value=1000 * window.cpu.total / done if done else float("nan"),
            units=done,
            errors=result.errors,
            **window_fields(window),
            resumed=tally.resumed / done if done else 0.0,
            first_error=result.first_error,
            protocol=", ".join(sorted(tally.protocols)),
        )

    async def _one(
        self,
        target: Running,
        index: int,
        *,
        stls: bool,
        hello: bool,
        keep_ticket: bool,
        tally: Tally | None,
    ) -> None:
        context = self.contexts[index]
        if hello:
            ssl_object = await hello_session(target, context)
        else:
            ssl_object = await pop3_session(
                target, context, self.expected, stls=stls, user=self.user(index)
            )
        if keep_ticket:
            context.offer = ssl_object.session
        if tally is not None:
            tally.resumed += ssl_object.session_reused
            cipher = ssl_object.cipher()
            tally.protocols[f"{ssl_object.version()} {cipher[0] if cipher else '?'}"] += 1

    async def relay(self, target: Running, round_: int) -> Measurement:
        """Logged-in sessions RETR the 10 MiB message; proxy CPU s per GB relayed."""
        plan = self.plan
        streams = [
            await connect(target, self.contexts[i], stls=False, user=self.user(i))
            for i in range(plan.relay_concurrency)
        ]
        try:
            await asyncio.sleep(SETTLE)
            before = target.counters()
            result = await run_bounded(
                plan.retrs,
                plan.relay_window,
                plan.relay_concurrency,
                lambda i: retrieve(streams[i], 2, self.expected.big),
            )
            await asyncio.sleep(SETTLE)
            window = Window.between(before, target.counters())
            for pair in streams:
                with contextlib.suppress(*SESSION_ERRORS):
                    async with asyncio.timeout(SESSION_TIMEOUT):
                        await quit_session(pair)
        finally:
            for _reader, writer in streams:
                writer.transport.abort()
        gigabytes = result.done * len(self.expected.big) / 1e9
        return Measurement(
            system=target.name,
            workload="relay",
            round=round_,
            value=window.cpu.total / gigabytes if gigabytes else float("nan"),
            units=result.done,
            errors=result.errors,
            **window_fields(window),
            first_error=result.first_error,
        )

    async def idle(self, target: Running, round_: int, count: int) -> Measurement:
        """`count` sessions logged in and held; RSS growth per session."""
        await asyncio.sleep(SETTLE)
        before = target.rss_kib()
        held: list[Streams] = []
        started = time.monotonic()
        # A user of its own per session, after the client workers' (`user`).
        users = itertools.count(self.plan.concurrency)

        async def open_one(index: int) -> None:
            user = f"{USER_PREFIX}{next(users)}"
            held.append(await connect(target, self.contexts[index], stls=False, user=user))

        try:
            result = await run_bounded(
                count, self.plan.idle_window, IDLE_OPEN_CONCURRENCY, open_one
            )
            await asyncio.sleep(IDLE_SETTLE)
            after = target.rss_kib()
            # Every held session must still be there: one NOOP each, outside the measure.
            alive = 0
            for pair in held:
                with contextlib.suppress(*SESSION_ERRORS):
                    async with asyncio.timeout(SESSION_TIMEOUT):
                        await command(pair, "NOOP", "NOOP")
                        alive += 1
        finally:
            for _reader, writer in held:
                writer.transport.abort()
        await asyncio.sleep(IDLE_SETTLE)  # let the system close them before the next workload
        return Measurement(
            system=target.name,
            workload="idle",
            round=round_,
            value=(after - before) / alive if alive else float("nan"),
            units=alive,
            errors=result.errors + (result.done - alive),
            seconds=time.monotonic() - started,
            cpu_seconds=0.0,
            first_error=result.first_error,
        )


# --- rounds and the report ---------------------------------------------------------


@dataclass
class Options:
    plan: Plan
    systems: tuple[str, ...]
    workloads: tuple[str, ...]
    backend: str
    poproxy_log_level: str
    nginx_proxy_buffer: str | None
    poproxy_workers: int
    command: str


async def run_rounds(options: Options, workdir: Path) -> tuple[list[Measurement], dict[str, str]]:
    plan = options.plan
    certificates = make_certificates(workdir)
    expected = Expected(make_message(SMALL_SIZE, "small"), make_message(BIG_SIZE, "big"))
    idle = plan.idle
    if options.backend == "dovecot":
        idle = min(idle, DOVECOT_IDLE_MAX)
        backend = await asyncio.to_thread(start_dovecot_backend, workdir, plan.concurrency, idle)
    else:
        backend = await asyncio.to_thread(start_mailbox_backend, workdir)
    auth_http = await start_auth_http(backend.port)
    setup = Setup(
        workdir=workdir,
        certificates=certificates,
        backend_port=backend.port,
        auth_http_port=auth_http.sockets[0].getsockname()[1],
        max_connections=idle + 2 * plan.concurrency + 256,
    )
    starters: dict[str, Callable[[], Running]] = {
        "poproxy": lambda: start_poproxy(setup, options.poproxy_log_level, options.poproxy_workers),
        "nginx": lambda: start_nginx(setup, options.nginx_proxy_buffer),
        "haproxy": lambda: start_haproxy(setup),
        "stunnel": lambda: start_stunnel(setup),
    }
    bench = Bench(plan, expected, certificates)
    results: list[Measurement] = []
    unavailable: dict[str, str] = {}
    notes = {"backend": backend.description, "idle": str(idle)}
    if options.poproxy_workers > 1:
        notes["poproxy workers"] = f"{options.poproxy_workers}, all on CPU {PROXY_CPU}"
    try:
        for round_ in range(plan.rounds):
            order = list(options.systems[round_:] + options.systems[:round_])
            for name in order:
                if name in unavailable:
                    continue
                try:
                    target = await asyncio.to_thread(starters[name])
                except Unavailable as exc:
                    unavailable[name] = str(exc)
                    print(f"{name}: unavailable: {exc}", file=sys.stderr)
                    continue
                try:
                    results.extend(await run_system(bench, target, options, round_, idle))
                finally:
                    await asyncio.to_thread(target.stop)
    finally:
        auth_http.close()
        await asyncio.to_thread(backend.stop)
    notes.update({f"unavailable {name}": why for name, why in unavailable.items()})
    return results, notes


async def run_system(
    bench: Bench, target: Running, options: Options, round_: int, idle: int
) -> list[Measurement]:
    plan = options.plan
    results: list[Measurement] = []
    warm = await bench.sessions(target, "full", round_, plan.warmup, SESSION_TIMEOUT)
    if warm.errors or not warm.units:
        raise RuntimeError(f"{target.name}: warm-up failed: {warm.first_error}; {tail(target.log)}")
    for workload in options.workloads:
        if workload == "stls" and target.starttls_port is None:
            continue
        if workload == "idle":
            measurement = await bench.idle(target, round_, idle)
        elif workload == "relay":
            measurement = await bench.relay(target, round_)
        else:
            measurement = await bench.sessions(target, workload, round_, plan.sessions, plan.window)
        results.append(measurement)
        print(describe(measurement), file=sys.stderr, flush=True)
    return results


def describe(m: Measurement) -> str:
    unit = {"idle": "KiB/session", "relay": "s/GB"}.get(m.workload, "ms/session")
    text = (
        f"round {m.round + 1} {m.system:8} {m.workload:8} {m.value:9.3f} {unit:12}"
        f" n={m.units} errors={m.errors} {m.seconds:.1f}s"
    )
    if m.workload != "idle":
        text += f" cpu={m.utilisation:.0f}% (kernel {100 * m.system_share:.0f}%)"
        text += f" others-on-cpu{PROXY_CPU}={m.interference:.0f}%"
    if m.workload in RESUMING:
        text += f" resumed={100 * m.resumed:.0f}%"
    if m.first_error:
        text += f" first error: {m.first_error}"
    return text


ROWS = (
    ("full", "CPU ms per POP3S session, full TLS 1.3 handshake"),
    ("resumed", "CPU ms per POP3S session, resumed (TLS 1.3 ticket)"),
    ("resumed/full", "resumed ÷ full, same system"),
    ("stls", "CPU ms per STLS session (full handshake)"),
    ("relay", "CPU s per GB relayed (RETR of 10 MiB)"),
    ("idle", "KiB RSS per idle logged-in session"),
    ("hello", "CPU ms per TLS connection: handshake, greeting, QUIT (no login)"),
    ("hello-resumed", "the same, resumed (TLS 1.3 ticket)"),
    ("hello-resumed/hello", "resumed ÷ full TLS connection, same system"),
)


def medians(results: list[Measurement]) -> dict[tuple[str, str], float]:
    grouped: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for m in results:
        grouped[m.system, m.workload].append(m.value)
    table = {key: statistics.median(values) for key, values in grouped.items()}
    for system in {m.system for m in results}:
        for full, resumed in (("full", "resumed"), ("hello", "hello-resumed")):
            if (system, full) in table and (system, resumed) in table:
                table[system, f"{resumed}/{full}"] = table[system, resumed] / table[system, full]
    return table


def report(results: list[Measurement], notes: dict[str, str], options: Options) -> str:
    systems = [s for s in SYSTEMS if any(m.system == s for m in results)]
    baseline = BASELINE if BASELINE in systems else (systems[0] if systems else BASELINE)
    table = medians(results)
    lines = [
        f"Medians of {options.plan.rounds} rounds; in brackets the ratio to {baseline}"
        " (lower is better everywhere).",
        "",
        "| metric | " + " | ".join(systems) + " |",
        "| --- |" + " ---: |" * len(systems),
    ]
    for key, label in ROWS:
        if not any((s, key) in table for s in systems):
            continue
        cells = []
        base = table.get((baseline, key))
        for system in systems:
            value = table.get((system, key))
            if value is None:
                cells.append("n/a")
            elif "/" in key:
                cells.append(f"{value:.2f}")
            else:
                ratio = f" ({value / base:.2f}x)" if base else ""
                cells.append(f"{value:.3g}{ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every round's value; the load reached (median); the system's CPU use in % of one"
        " core and the kernel's part of it (stime); CPU 1 time other processes took during"
        " each round's window (steal included), in % of the window; failed sessions:",
        "",
    ]
    lines += ["| system | workload | rounds | load | CPU use | kernel | others | errors | notes |"]
    lines += ["| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for system in systems:
        for workload in WORKLOADS:
            runs = [m for m in results if m.system == system and m.workload == workload]
            if not runs:
                continue
            values = ", ".join(f"{m.value:.3g}" for m in runs)
            kernel = f"{100 * statistics.median(m.system_share for m in runs):.0f}%"
            others = "/".join(f"{m.interference:.0f}" for m in runs) + "%"
            if workload == "idle":
                load = f"{min(m.units for m in runs)} sessions held"
                cpu = kernel = others = "-"
            elif workload == "relay":
                rate = statistics.median(m.units * BIG_SIZE / 1e6 / m.seconds for m in runs)
                load = f"{rate:.0f} MB/s"
                cpu = f"{statistics.median(m.utilisation for m in runs):.0f}%"
            else:
                rate = statistics.median(m.units / m.seconds for m in runs)
                load = f"{rate:.0f} sessions/s"
                cpu = f"{statistics.median(m.utilisation for m in runs):.0f}%"
            extra = []
            if workload in RESUMING:
                extra.append(f"resumed {100 * min(m.resumed for m in runs):.0f}% or more")
            protocols = {m.protocol for m in runs if m.protocol}
            extra.extend(sorted(protocols))
            errors = [m.first_error for m in runs if m.first_error]
            if errors:
                extra.append(f"first error: {errors[0]}")
            lines.append(
                f"| {system} | {workload} | {values} | {load} | {cpu} | {kernel} | {others} |"
                f" {sum(m.errors for m in runs)} | {'; '.join(extra)} |"
            )
    lines.append("")
    lines.extend(f"- {key}: {value}" for key, value in notes.items())
    return "\n".join(lines) + "\n"


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "openssl (python)": ssl.OPENSSL_VERSION,
    }
    for name, command in (
        ("nginx", [NGINX, "-v"]),
        ("haproxy", [HAPROXY, "-v"]),
        ("stunnel", [STUNNEL, "-version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(command, capture_output=True, timeout=10, check=False)
            output = (done.stdout + done.stderr).decode(errors="replace").splitlines()
            # The first line that names the program ("stunnel 5.68 on x86_64-pc-linux-gnu ...").
            info[name] = next((line.strip() for line in output if name in line.lower()), "?")
    return info


# --- profile -------------------------------------------------------------------


async def profile(options: Options, workdir: Path, seconds: float, output: Path) -> str:
    """py-spy on poproxy (with native frames) while it serves `full` sessions."""
    if not PY_SPY.exists():
        raise SystemExit(f"{PY_SPY} missing: .venv/bin/pip install py-spy")
    plan = options.plan
    certificates = make_certificates(workdir)
    expected = Expected(make_message(SMALL_SIZE, "small"), make_message(BIG_SIZE, "big"))
    backend = await asyncio.to_thread(start_mailbox_backend, workdir)
    setup = Setup(workdir, certificates, backend.port, 0, plan.concurrency + 256)
    bench = Bench(plan, expected, certificates)
    target = await asyncio.to_thread(
        start_poproxy, setup, options.poproxy_log_level, options.poproxy_workers
    )
    try:
        await bench.sessions(target, "full", 0, plan.warmup, SESSION_TIMEOUT)
        raw = output.with_suffix(".txt")
        spy = start_py_spy(target.process.pid, raw, seconds)
        await asyncio.sleep(1.0)  # py-spy attaches
        # Bounded by time (py-spy's duration, less its start) and by a generous count.
        load = await bench.sessions(target, "full", 0, 2000 * int(seconds), seconds - 1.0)
        await asyncio.to_thread(spy.wait, seconds + 30)
        return summarise_profile(raw.read_text()) + f"\n{describe(load)}\n"
    finally:
        await asyncio.to_thread(target.stop)
        await asyncio.to_thread(backend.stop)


def start_py_spy(pid: int, output: Path, seconds: float) -> subprocess.Popen[bytes]:
    command = [str(PY_SPY), "record", "--pid", str(pid), "--native", "--rate", "250"]
    command += ["--format", "raw", "--output", str(output), "--duration", str(int(seconds))]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


_FRAME = re.compile(r"^(?P<function>.*?) \((?P<where>[^()]*)\)$")


def summarise_profile(raw: str) -> str:
    """Top functions from py-spy's collapsed stacks: self time and inclusive time."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    component: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        count = int(samples)
        total += count
        frames = [name_frame(frame) for frame in stack.split(";")[1:]]  # [0]: the thread
        if not frames:
            continue
        own[frames[-1]] += count
        component[component_of(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count

    def top(counter: collections.Counter[str], n: int) -> list[str]:
        return [f"| {100 * c / total:5.1f}% | `{name}` |" for name, c in counter.most_common(n)]

    return "\n".join(
        [
            f"{total} samples.",
            "",
            "Where the CPU goes (by the innermost frame):",
            "",
            "| share | component |",
            "| ---: | --- |",
            *top(component, 20),
            "",
            "Inclusive (the function or anything it called):",
            "",
            "| share | function |",
            "| ---: | --- |",
            *top(inclusive, 40),
            "",
            "Self (innermost frame):",
            "",
            "| share | function |",
            "| ---: | --- |",
            *top(own, 25),
        ]
    )


def name_frame(frame: str) -> str:
    """'function (file.py:12)' -> 'function (file.py)'; paths shortened."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    where = match["where"].rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{match['function']} ({where})"


def component_of(frames: list[str]) -> str:
    """A coarse owner for a sample: the innermost frame's library or Python package."""
    leaf = frames[-1]
    for marker, name in (
        ("libcrypto", "OpenSSL libcrypto"),
        ("libssl", "OpenSSL libssl"),
        ("libc.so", "libc (syscalls, memcpy, malloc)"),
        ("loop.cpython", "uvloop (Cython)"),
        ("_ssl.cpython", "CPython _ssl module"),
        ("poproxy/", "poproxy Python code"),
        ("logging/", "logging"),
        ("prometheus_client", "prometheus_client"),
        ("asyncio/", "asyncio (Python)"),
        ("ssl.py", "ssl.py"),
    ):
        if marker in leaf:
            return name
    if any(tag in leaf for tag in ("python3", "libpython", "(python")):
        return "CPython interpreter"
    return "other: " + leaf


# --- command line ------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small windows: a few minutes")
    parser.add_argument("--rounds", type=int, help="rounds (quick 3, full 5)")
    parser.add_argument("--concurrency", type=int, help="client sessions at once (default 32)")
    parser.add_argument("--sessions", type=int, help="sessions per window, at most")
    parser.add_argument("--window", type=float, help="seconds per session window, at most")
    parser.add_argument("--idle", type=int, help="idle sessions held (quick 2000, full 3000)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--backend", choices=("mailbox", "dovecot"), default="mailbox")
    parser.add_argument("--poproxy-log-level", default="info", help="poproxy's log.level")
    parser.add_argument(
        "--poproxy-workers", type=int, default=1, help="poproxy's workers (default 1)"
    )
    parser.add_argument(
        "--nginx-proxy-buffer", help="nginx mail proxy_buffer (default: nginx's, one page)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here")
    parser.add_argument(
        "--profile", type=Path, help="instead: py-spy poproxy under `full` sessions, to PATH"
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--serve-backend", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        key: value
        for key, value in {
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "sessions": args.sessions,
            "window": args.window,
            "idle": args.idle,
        }.items()
        if value is not None
    }
    plan = dataclasses.replace(plan, **overrides)
    systems = tuple(s for s in args.systems.split(",") if s)
    workloads = tuple(w for w in args.workloads.split(",") if w)
    for name, allowed in ((systems, SYSTEMS), (workloads, WORKLOADS)):
        unknown = set(name) - set(allowed)
        if unknown:
            parser.error(f"unknown: {', '.join(sorted(unknown))} (choose from {allowed})")
    if plan.rounds < 1 or plan.concurrency < 1 or plan.sessions < 1 or plan.idle < 1:
        parser.error("rounds, concurrency, sessions and idle must be at least 1")
    if args.poproxy_workers < 1:
        parser.error("--poproxy-workers must be at least 1")
    command = " ".join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    return args, Options(
        plan=plan,
        systems=systems,
        workloads=workloads,
        backend=args.backend,
        poproxy_log_level=args.poproxy_log_level,
        poproxy_workers=args.poproxy_workers,
        nginx_proxy_buffer=args.nginx_proxy_buffer,
        command=command,
    )


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    if min(needed, hard) < needed:
        raise SystemExit(f"need {needed} file descriptors, the hard limit is {hard}: lower --idle")


@contextlib.contextmanager
def working_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    directory = Path(tempfile.mkdtemp(prefix="poproxy-bench-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args, options = parse(argv)
    if args.serve_backend is not None:
        serve_backend(args.serve_backend)
        return 0
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        raise SystemExit("needs 2 CPUs: the load on CPU 0, the system under test on CPU 1")
    os.sched_setaffinity(0, {LOAD_CPU})  # children started from here inherit it
    # The proxy holds two descriptors per idle session (client and backend)
    # and inherits this process's limit; a few hundred more for the rest.
    raise_file_limit(2 * options.plan.idle + 384)
    with working_directory(args.workdir) as workdir:
        if args.profile is not None:
            text = uvloop.run(profile(options, workdir, args.profile_seconds, args.profile))
            args.profile.with_suffix(".md").write_text(text)
            print(text)
            return 0
        info = machine()
        started = time.monotonic()
        results, notes = uvloop.run(run_rounds(options, workdir))
        notes["wall time"] = f"{time.monotonic() - started:.0f} s"
    header = [
        f"Command: `{options.command}`",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
    ]
    text = "\n".join(header) + "\n" + report(results, notes, options)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        payload: dict[str, Any] = {
            "machine": info,
            "notes": notes,
            "plan": dataclasses.asdict(options.plan),
            "results": [dataclasses.asdict(m) for m in results],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
