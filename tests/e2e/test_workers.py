"""`workers: 2`: `poproxy run` as a supervisor and two worker processes, on real sockets.

Which worker served a session is read from the `worker` field of its `session end` line;
SO_REUSEPORT spreads connections by a hash of their addresses, so a few dozen sessions
reach both workers (all on one: a chance of 2 in 2^N).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from support.clients import TIMEOUT, RawClient
from support.fake_backend import ALICE
from support.notify import NotifySocket
from support.proxy import Certificates

from poproxy.demo import SAMPLE_MESSAGES, MailboxServer

CONFIG = """
user: root
workers: 2
listeners:
  - name: pop3s
    listen: "127.0.0.1:0"
    tls: implicit
tls:
  certificates:
    - cert: {cert}
      key: {key}
  reload_interval: 0s
backends:
  - name: test
    servers: ["{backend}"]
limits:
  auth_failure_delay: 0s
  shutdown_grace: 10s
metrics:
  listen: "127.0.0.1:0"
"""

SESSIONS = 40  # spread over two workers: all on one has a chance of 2 in 2^40
RESUMED = 20

WORKER = re.compile(rb" worker=(\d+)")
STARTED = re.compile(rb"worker (\d+) started \(pid (\d+)\)")


class Poproxy:
    """`python -m poproxy run` with its stderr read line by line as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[bytes] = []
        self._more = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line)
            self._more.set()
        self._more.set()

    async def line(self, pattern: bytes, after: int = 0) -> tuple[int, bytes]:
        """The first line from index `after` on that contains `pattern`, and its index."""
        async with asyncio.timeout(15):
            index = after
            while True:
                while index < len(self.lines):
                    if pattern in self.lines[index]:
                        return index, self.lines[index]
                    index += 1
                if self._reader.done():
                    raise AssertionError(f"poproxy exited before logging {pattern!r}")
                self._more.clear()
                await self._more.wait()

    async def count(self, pattern: bytes, n: int, after: int = 0) -> list[bytes]:
        """Wait for `n` lines containing `pattern` (from index `after` on); return them."""
        found: list[bytes] = []
        index = after
        while len(found) < n:
            index, line = await self.line(pattern, index)
            found.append(line)
            index += 1
        return found

    def matching(self, pattern: bytes) -> list[bytes]:
        return [line for line in self.lines if pattern in line]

    async def port(self, name: str) -> int:
        _, line = await self.line(f"({name}, tls=".encode())
        return int(line.split(b"listening on 127.0.0.1:")[1].split()[0])

    async def metrics_port(self) -> int:
        _, line = await self.line(b"metrics and health on http://127.0.0.1:")
        return int(line.split(b"http://127.0.0.1:")[1].split(b"/")[0])

    async def pids(self) -> dict[int, int]:
        """Each worker's pid, as last started."""
        await self.line(b"workers serving")
        return self.started()

    def started(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for line in self.lines:
            match = STARTED.search(line)
            if match:
                found[int(match.group(1))] = int(match.group(2))
        return found

    async def wait(self) -> int:
        """The supervisor's exit status, once it and every worker it started have exited.

        Not the end of stderr: the test's own event loop may keep a copy of the
        pipe's writing end after starting the supervisor, so EOF can be late.
        """
        async with asyncio.timeout(30):
            status = await self.process.wait()
            await asyncio.gather(*(exited(pid) for pid in self.started().values()))
        return status

    async def stop(self) -> None:
        """Kill the supervisor, if still running: the workers must follow by themselves."""
        if self.process.returncode is None:
            self.process.kill()
        try:
            await self.wait()
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            for pid in self.started().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def exited(pid: int) -> None:
    """Return once process `pid` has ended; a pidfd becomes readable then (a zombie
    waiting for a reaper counts: PID 1 here may not reap orphans)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def workers_of(lines: list[bytes]) -> set[int]:
    found = set()
    for line in lines:
        match = WORKER.search(line)
        assert match, line
        found.add(int(match.group(1)))
    return found


@pytest.fixture
def config_file(tmp_path: Path, backend: MailboxServer, certificates: Certificates) -> Path:
    path = tmp_path / "poproxy.yaml"
    path.write_text(
        CONFIG.format(
            cert=certificates.files.cert,
            key=certificates.files.key,
            backend=f"{backend.address[0]}:{backend.address[1]}",
        )
    )
    return path


@pytest_asyncio.fixture
async def poproxy(config_file: Path, tmp_path: Path) -> AsyncIterator[Poproxy]:
    """A running `poproxy run` with two workers; killed, with its workers, if a test
    leaves it running."""
    # TMPDIR: the supervisor's metric files go under tmp_path, where a test can see them.
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    environment.pop("NOTIFY_SOCKET", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poproxy", "run", "-c", str(tmp_path / "poproxy.yaml"),
        stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    running = Poproxy(process)
    try:
        yield running
    finally:
        await running.stop()


async def session(port: int, context: ssl.SSLContext) -> None:
    """Log in as alice, STAT, QUIT."""
    async with await RawClient.connect(("127.0.0.1", port), context) as client:
        assert (await client.line()).startswith(b"+OK")
        assert (await client.command(b"USER alice\r\n")).startswith(b"+OK")
        assert (await client.command(b"PASS wonderland\r\n")).startswith(b"+OK")
        assert (await client.command(b"STAT\r\n")).startswith(b"+OK")
        assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
        assert await client.at_eof()


async def sessions(port: int, context: ssl.SSLContext, n: int) -> None:
    """`n` sessions, one after the other (the backend lets alice in once at a time)."""
    for _ in range(n):
        await session(port, context)


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def sample(text: str, name: str) -> float:
    """The value of one exact series in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exposed")


@pytest.mark.asyncio
async def test_sessions_are_spread_over_the_workers_and_counted_once(
    poproxy: Poproxy, backend: MailboxServer, client_context: ssl.SSLContext
) -> None:
    port, admin = await poproxy.port("pop3s"), await poproxy.metrics_port()
    await poproxy.line(b"workers serving")
    await sessions(port, client_context, SESSIONS)
    ended = await poproxy.count(b'msg="session end"', SESSIONS)
    assert workers_of(ended) == {0, 1}
    assert all(b"outcome=quit" in line for line in ended)
    status, text = await http_get(admin, "/metrics")
    assert status == 200
    # One series per name and labels, the workers' values added up.
    assert sample(text, 'poproxy_connections_total{listener="pop3s"}') == SESSIONS
    assert sample(text, 'poproxy_logins_total{result="success"}') == SESSIONS
    assert sample(text, 'poproxy_sessions_closed_total{reason="quit"}') == SESSIONS
    assert sample(text, "poproxy_session_duration_seconds_count") == SESSIONS
    assert sample(text, 'poproxy_connections_active{listener="pop3s"}') == 0
    server = f"{backend.address[0]}:{backend.address[1]}"
    assert sample(text, f'poproxy_backend_up{{backend="test",server="{server}"}}') == 1
    assert sample(text, 'poproxy_build_info{version="0.1.0"}') == 1
    assert sample(text, "poproxy_ready") == 1
    assert await http_get(admin, "/readyz") == (200, "ready\n")


def resume(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """A blocking POP3S session offering `session`, greeted (so that the TLS 1.3
    tickets that follow the handshake have been read), then QUIT: whether it
    resumed, and the session to offer next time."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as client,
        client.makefile("rb") as lines,
    ):
        assert lines.readline().startswith(b"+OK")
        client.sendall(b"QUIT\r\n")
        assert lines.readline().startswith(b"+OK")
        return bool(client.session_reused), client.session


@pytest.mark.asyncio
async def test_a_ticket_from_one_worker_resumes_on_every_worker(
    poproxy: Poproxy, client_context: ssl.SSLContext
) -> None:
    port = await poproxy.port("pop3s")
    await poproxy.line(b"workers serving")
    resumed, ticket = await asyncio.to_thread(resume, port, client_context, None)
    assert not resumed
    assert ticket is not None and ticket.has_ticket
    reused = []
    for _ in range(RESUMED):
        resumed, _ = await asyncio.to_thread(resume, port, client_context, ticket)
        reused.append(resumed)
    # Without shared keys only the worker that issued the ticket could read it.
    assert reused == [True] * RESUMED
    ended = await poproxy.count(b'msg="session end"', RESUMED + 1)
    assert workers_of(ended) == {0, 1}


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted_and_its_counts_stay(
    poproxy: Poproxy, client_context: ssl.SSLContext
) -> None:
    port, admin = await poproxy.port("pop3s"), await poproxy.metrics_port()
    pids = await poproxy.pids()
    assert set(pids) == {0, 1} and pids[0] != pids[1]
    await sessions(port, client_context, SESSIONS // 2)
    await poproxy.count(b'msg="session end"', SESSIONS // 2)
    os.kill(pids[1], signal.SIGKILL)
    index, _ = await poproxy.line(b"worker 1 exited with signal SIGKILL; restarting it")
    index, _ = await poproxy.line(b"worker 1 serving", index)
    assert (await poproxy.pids())[1] not in (pids[0], pids[1])
    assert await http_get(admin, "/readyz") == (200, "ready\n")
    await sessions(port, client_context, SESSIONS // 2)
    ended = await poproxy.count(b'msg="session end"', SESSIONS // 2, index)
    assert workers_of(ended) == {0, 1}
    _, text = await http_get(admin, "/metrics")
    # The dead worker's counters are still in the sums; its gauges are not.
    assert sample(text, 'poproxy_connections_total{listener="pop3s"}') == SESSIONS
    assert sample(text, 'poproxy_connections_active{listener="pop3s"}') == 0
    assert sample(text, 'poproxy_build_info{version="0.1.0"}') == 1


def issue(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    certificate = ca.issue_cert("127.0.0.1", "localhost", f"{name}.example")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    return cert, key


def peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as client,
    ):
        certificate = client.getpeercert(binary_form=True)
        assert certificate is not None
        with client.makefile("rb") as lines:
            assert lines.readline().startswith(b"+OK")
            client.sendall(b"QUIT\r\n")
            assert lines.readline().startswith(b"+OK")
        return certificate


@pytest.mark.asyncio
async def test_sighup_is_checked_once_then_reaches_every_worker(
    poproxy: Poproxy,
    config_file: Path,
    certificates: Certificates,
    client_context: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    port = await poproxy.port("pop3s")
    await poproxy.line(b"workers serving")
    original = await asyncio.to_thread(config_file.read_text)
    old = await asyncio.to_thread(peer_certificate, port, client_context)
    # A broken file: the supervisor says so once and tells no worker.
    await asyncio.to_thread(config_file.write_text, "listeners: [")
    poproxy.process.send_signal(signal.SIGHUP)
    index, _ = await poproxy.line(b"reload failed, the running configuration stays")
    # A new certificate: every worker serves it.
    cert, key = issue(certificates.ca, tmp_path, "reloaded")
    edited = original.replace(str(certificates.files.cert), str(cert))
    await asyncio.to_thread(
        config_file.write_text, edited.replace(str(certificates.files.key), str(key))
    )
    poproxy.process.send_signal(signal.SIGHUP)
    reloaded = await poproxy.count(b"configuration reloaded from", 2, index)
    assert workers_of(reloaded) == {0, 1}
    assert len(poproxy.matching(b"reload failed")) == 1
    assert b"worker=" not in poproxy.matching(b"reload failed")[0]
    served = [
        await asyncio.to_thread(peer_certificate, port, client_context) for _ in range(SESSIONS)
    ]
    assert old not in served and len(set(served)) == 1
    ended = await poproxy.count(b'msg="session end"', SESSIONS, index)
    assert workers_of(ended) == {0, 1}


@pytest.mark.asyncio
async def test_sigterm_drains_every_worker_and_exits_0(
    poproxy: Poproxy, backend: MailboxServer, client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    port, admin = await poproxy.port("pop3s"), await poproxy.metrics_port()
    await poproxy.line(b"workers serving")
    (directory,) = await asyncio.to_thread(lambda: list(tmp_path.glob("poproxy-metrics-*")))
    mode = await asyncio.to_thread(lambda: directory.stat().st_mode)
    assert stat.S_IMODE(mode) == 0o700
    client = await RawClient.connect(("127.0.0.1", port), client_context)
    await client.line()
    await client.send(b"USER alice\r\nPASS wonderland\r\n")
    await client.line()
    assert (await client.line()).startswith(b"+OK")
    poproxy.process.send_signal(signal.SIGTERM)
    # The worker with the session waits for it; the supervisor is not ready meanwhile.
    _, waiting = await poproxy.line(b"waiting up to 10s for 1 sessions")
    match = WORKER.search(waiting)
    assert match
    await poproxy.line(f"worker {1 - int(match.group(1))} exited with status 0".encode())
    assert await http_get(admin, "/readyz") == (503, "not ready\n")
    with pytest.raises(OSError):  # no socket of that port is open any more
        await RawClient.connect(("127.0.0.1", port))
    async with client:
        assert (await client.command(b"DELE 1\r\n")).startswith(b"+OK")
        assert (await client.command(b"QUIT\r\n")).startswith(b"+OK")
    assert await poproxy.wait() == 0
    await poproxy.count(b"exited with status 0", 2)
    assert backend.mailboxes[ALICE].messages == list(SAMPLE_MESSAGES[1:])
    assert not await asyncio.to_thread(directory.exists)


@pytest.mark.asyncio
async def test_systemd_hears_the_supervisor_only(
    config_file: Path, tmp_path: Path, certificates: Certificates
) -> None:
    """READY=1 once every worker serves, RELOADING=1 and READY=1 around a SIGHUP that
    every worker has applied, STOPPING=1; nothing from the workers themselves."""
    notify = NotifySocket(tmp_path / "notify", wait=15.0)
    message = notify.message
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "poproxy", "run", "-c", str(config_file),
        stderr=asyncio.subprocess.PIPE, env=notify.environment,
    )  # fmt: skip
    running = Poproxy(process)
    try:
        assert await message() == "READY=1\nSTATUS=serving"
        await running.count(b"listening on", 2)
        process.send_signal(signal.SIGHUP)
        assert (await message()).startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert await message() == "READY=1"
        await running.count(b"configuration reloaded", 2)
        process.send_signal(signal.SIGTERM)
        assert await message() == "STOPPING=1"
        assert await running.wait() == 0
        with pytest.raises(BlockingIOError):
            notify.sock.recv(4096)  # nothing more, from anyone
    finally:
        notify.close()
        await running.stop()


@pytest.mark.asyncio
async def test_workers_do_not_outlive_the_supervisor(poproxy: Poproxy) -> None:
    assert set(await poproxy.pids()) == {0, 1}
    poproxy.process.kill()
    await poproxy.wait()  # the supervisor and both workers have ended (or it times out)
    await poproxy.count(b"the supervisor is gone: shutting down", 2)
