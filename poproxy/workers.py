"""`workers` > 1: a supervisor and one worker process per core.

Owns: the supervisor, which binds every listener once per worker with
SO_REUSEPORT (the kernel spreads new connections over the workers' sockets),
keeps its copies of those sockets so that a restarted worker takes over the
same one with the clients queued on it, leaves root, starts the workers as
fresh processes, restarts one that dies, forwards SIGHUP (once it found the
file valid) and SIGTERM/SIGINT, serves the admin endpoint with every worker's
metrics added up, and alone speaks to systemd; and the worker's side: the
start message, the `worker` log field, reporting its state and readiness.
Must never give a worker another worker's sockets, let a worker speak to
systemd, or let one outlive the supervisor.

The control channel is a socket pair per worker, one JSON object per line.
Supervisor to worker, once: the configuration text, its path, the ticket
keys, and which inherited descriptor is which listener. Worker to supervisor:
`{"state": ...}` with the sd_notify(3) states `serve` reports, and
`{"ready": ...}` whenever `Proxy.ready()` changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from poproxy import config, logs, tls
from poproxy.admin import AdminServer
from poproxy.backends import BackendError, Backends
from poproxy.config import Address, Config, ConfigError
from poproxy.metrics import READY_HELP, Metrics
from poproxy.server import (
    ABORT_TIMEOUT,
    ListenError,
    Proxy,
    bind_workers,
    drop_privileges,
    listener_identity,
    notify,
    serve,
)

log = logging.getLogger("poproxy.workers")

# `python -m poproxy _worker INDEX FD` starts worker INDEX with its control
# channel on FD. Internal: the supervisor's command line, not an operator's.
WORKER_COMMAND = "_worker"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client at import
MAX_MESSAGE = 4 << 20  # bytes in one control line; the start message holds the file
READY_INTERVAL = 1.0  # seconds between a worker's looks at its own readiness
RESTART_DELAY = 0.1  # seconds before restarting a worker that died; doubles each time
RESTART_DELAY_MAX = 30.0  # ... up to this,
RESTART_STABLE = 60.0  # and starts over for a worker that ran this long
RELOAD_TIMEOUT = 30.0  # seconds for the workers to reload before systemd hears READY=1
STOP_MARGIN = 5.0  # seconds beyond shutdown_grace + ABORT_TIMEOUT before SIGKILL

Identity = tuple[str, Address, str]


def count(setting: int | Literal["auto"]) -> int:
    """How many workers `workers: setting` means on this machine."""
    if setting != "auto":
        return setting
    try:
        # The CPUs this process may run on (taskset, cpusets), not all there are.
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux, or a seccomp filter refuses it
        return os.cpu_count() or 1


def validate(settings: Config) -> None:
    """Load what every worker will load, once, so that a bad file is reported once."""
    tls.Certificates(settings.tls, settings.source)
    Backends(settings.backends, Metrics(), settings.routes, settings.source)  # CA files


# --- The supervisor ------------------------------------------------------------


@dataclass
class _Worker:
    """One worker's place: a worker restarted there gets the same sockets."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: bool = False  # said READY=1 since it was (re)started
    ready: bool = False  # its last word on Proxy.ready()
    generation: int = 0  # the configuration it was last told about
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # READY=1 after SIGHUP

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Binds, starts and keeps `count` workers; see the module's docstring."""

    def __init__(self, settings: Config, path: Path, text: str, workers: int) -> None:
        self.settings = settings  # the configuration last found valid, and its text
        self.text = text
        self.path = path
        self.workers = [_Worker(index) for index in range(workers)]
        self.sockets: dict[Identity, list[socket.socket]] = {}  # one per worker
        self.directory: Path | None = None  # the workers' metric files
        self.ticket_keys = tls.new_ticket_keys()  # one set for this supervisor's lifetime
        self.generation = 0  # counts reloads, so a worker started during one gets it too
        self.serving = asyncio.Event()  # every worker has started once
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()  # a worker's state changed
        self.failed: int | None = None  # the status of a worker that could not start
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_AllWorkers(self))
        self.admin = AdminServer(registry, self.ready)

    def ready(self) -> bool:
        """Not stopping, and every worker alive, started and ready."""
        return not self.stopping.is_set() and all(
            worker.alive and worker.started and worker.ready for worker in self.workers
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set, then drain every worker; the exit status."""
        loop = asyncio.get_running_loop()
        reloading: set[asyncio.Task[None]] = set()

        def on_sighup() -> None:
            task = loop.create_task(self._reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        # Before anything is bound: SIGHUP's default action would end the process.
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        validate(self.settings)
        await self._bind()
        drop_privileges(self.settings)
        # Made after leaving root, so that it belongs to the user the workers run as.
        try:
            self.directory = Path(tempfile.mkdtemp(prefix="poproxy-metrics-"))
        except OSError as exc:
            raise ConfigError(
                f"{self.settings.source}: workers: cannot make a directory for the workers'"
                f" metrics in $TMPDIR or /tmp: {exc.strerror or exc}"
            ) from None
        try:
            return await self._serve(stop)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _bind(self) -> None:
        """Every listener once per worker, and the admin endpoint; all or nothing."""
        try:
            for listener in self.settings.listeners:
                sockets = await bind_workers(self.settings, listener, len(self.workers))
                self.sockets[listener_identity(listener)] = sockets
            if self.settings.metrics is not None:
                listen = self.settings.metrics.listen
                try:
                    await self.admin.start(listen)
                except OSError as exc:
                    raise ListenError(
                        f"{self.settings.source}: metrics.listen: cannot listen on {listen}:"
                        f" {exc.strerror or exc}"
                    ) from None
        except ListenError:
            self._close_sockets()
            raise

    async def _serve(self, stop: asyncio.Event) -> int:
        loop = asyncio.get_running_loop()
        keepers = [loop.create_task(self._keep(worker)) for worker in self.workers]
        stopped = loop.create_task(stop.wait())
        stopped.add_done_callback(lambda _: self.changed.set())
        await self._until(
            lambda: (
                stop.is_set()
                or self.failed is not None
                or all(worker.started for worker in self.workers)
            )
        )
        status = 0
        if self.failed is not None:
            log.error("a worker could not start: stopping")
            status = self.failed
        elif not stop.is_set():
            self.serving.set()
            log.info("%d workers serving", len(self.workers))
            notify("READY=1\nSTATUS=serving")
            await stop.wait()
        log.info("shutting down")
        notify("STOPPING=1")
        await self._shutdown(keepers)
        stopped.cancel()
        return status

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self.changed.clear()
            await self.changed.wait()

    async def _shutdown(self, keepers: list[asyncio.Task[None]]) -> None:
        """Each worker runs the ordered shutdown of server.py; this waits for them."""
        # 1. Not ready, no restarts, and our copies of the listening sockets
        #    closed: once each worker has closed its own, new clients are
        #    refused by the kernel, not queued where nobody accepts.
        self.stopping.set()
        self._close_sockets()
        # 2. Every worker drains: AUTHORIZATION sessions told and closed,
        #    TRANSACTION ones given limits.shutdown_grace, then cut.
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        bound = self.settings.limits.shutdown_grace + ABORT_TIMEOUT + STOP_MARGIN
        _, pending = await asyncio.wait(keepers, timeout=bound)
        # 3. A worker still there long after its grace period is killed.
        if pending:
            for worker in self.workers:
                if worker.alive:
                    log.error("worker %d did not stop in %.0fs: killing it", worker.index, bound)
                self._signal(worker, signal.SIGKILL)
            await asyncio.wait(pending)
        # 4. Last, the operators' endpoint: it answered "not ready" until now.
        self.admin.close()

    def _close_sockets(self) -> None:
        for sockets in self.sockets.values():
            for sock in sockets:
                sock.close()
        self.sockets.clear()

    async def _keep(self, worker: _Worker) -> None:
        """Run a worker, and another in its place whenever it dies, until shutdown."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY
        while True:
            began = loop.time()
            status = await self._run(worker)
            if self.stopping.is_set():
                log.info("worker %d exited with %s", worker.index, _status(status))
                return
            if not self.serving.is_set():
                log.error("worker %d exited with %s while starting", worker.index, _status(status))
                self.failed = status if status > 0 else 1
                self.changed.set()
                return
            if loop.time() - began >= RESTART_STABLE:
                delay = RESTART_DELAY
            log.error(
                "worker %d exited with %s; restarting it in %.1fs",
                worker.index,
                _status(status),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return
            delay = min(2 * delay, RESTART_DELAY_MAX)

    async def _run(self, worker: _Worker) -> int:
        """Start one worker and follow what it says until it exits; its exit status."""
        ours, theirs = socket.socketpair()
        listeners: list[dict[str, Any]] = []
        descriptors = [theirs.fileno()]
        for (name, address, mode), sockets in self.sockets.items():
            descriptor = sockets[worker.index].fileno()
            listeners.append(
                {"name": name, "host": address.host, "port": address.port, "tls": mode,
                 "fd": descriptor}
            )  # fmt: skip
            descriptors.append(descriptor)
        environment = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        environment[MULTIPROC_DIR] = str(self.directory)
        try:
            # subprocess, not the event loop's subprocess_exec: uvloop's does not
            # close the descriptors it was not given, and a worker holding a copy
            # of another worker's control channel (or of a scrape's connection)
            # would keep it open after the supervisor closed it.
            # Popen returns once the child has exec'd: no wait worth a thread.
            process = subprocess.Popen(  # noqa: S603, ASYNC220 - our interpreter, fixed arguments
                [sys.executable, "-m", "poproxy", WORKER_COMMAND, str(worker.index),
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL, pass_fds=descriptors, env=environment,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            log.error("cannot start worker %d: %s", worker.index, exc.strerror or exc)
            return 1
        finally:
            theirs.close()
        exited = _exit_of(process)
        worker.process, worker.started, worker.ready = process, False, False
        worker.generation = self.generation
        log.info("worker %d started (pid %d)", worker.index, process.pid)
        reader, writer = await asyncio.open_connection(sock=ours, limit=MAX_MESSAGE)
        start = {
            "path": str(self.path),
            "config": self.text,
            "ticket_keys": self.ticket_keys.hex(),
            "listeners": listeners,
        }
        writer.write(json.dumps(start).encode() + b"\n")
        try:
            async for line in reader:  # until the worker's end closes, when it exits
                self._hear(worker, line)
        except (OSError, ValueError) as exc:
            log.warning("worker %d: control channel broken: %s", worker.index, exc)
        status = await exited
        writer.close()
        # Its "live" gauges leave the sums; its counters stay in them.
        multiprocess.mark_process_dead(process.pid, str(self.directory))  # type: ignore[no-untyped-call]
        worker.started = worker.ready = False
        worker.settled.set()
        self.changed.set()
        return status

    def _hear(self, worker: _Worker, line: bytes) -> None:
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
        if "ready" in message:
            worker.ready = message["ready"] is True
        state = message.get("state")
        if isinstance(state, str) and state.startswith("READY=1"):
            if not worker.started and self.serving.is_set() and worker.process is not None:
                log.info("worker %d serving (pid %d)", worker.index, worker.process.pid)
            worker.started = True
            worker.settled.set()
            if worker.generation < self.generation:
                # Started with an older file while a reload went by: reload it too.
                worker.generation = self.generation
                worker.settled.clear()
                self._signal(worker, signal.SIGHUP)
        self.changed.set()

    def _signal(self, worker: _Worker, signum: signal.Signals) -> None:
        if worker.process is not None and worker.alive:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    async def _reload(self) -> None:
        """SIGHUP: check the file here, then have every worker reload it."""
        await self.serving.wait()  # a SIGHUP during start-up applies once it is done
        if self.stopping.is_set():
            return
        try:
            text = config.read(self.path)
            settings = config.parse(text, source=str(self.path), base=self.path.parent)
            validate(settings)
        except (ConfigError, tls.CertificateError, BackendError) as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
            return
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        if count(settings.workers) != len(self.workers):
            log.warning(
                "workers: %s asks for %d workers, %d run; a restart applies it",
                self.path,
                count(settings.workers),
                len(self.workers),
            )
        self.settings, self.text = settings, text
        self.generation += 1
        # A listener gone from the file: our copies must not keep its port open.
        wanted = {listener_identity(listener) for listener in settings.listeners}
        for identity in [identity for identity in self.sockets if identity not in wanted]:
            for sock in self.sockets.pop(identity):
                sock.close()
        told = [worker for worker in self.workers if worker.started]
        for worker in told:
            worker.generation = self.generation
            worker.settled.clear()
            self._signal(worker, signal.SIGHUP)
        log.info("reloading %s in %d workers", self.path, len(told))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELOAD_TIMEOUT):
                for worker in told:
                    await worker.settled.wait()
        notify("READY=1")


def _exit_of(process: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """The process's exit status, once it has exited, without blocking the loop."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(process.pid)  # Linux 5.3+: readable once it has exited
    except (AttributeError, OSError):
        # An older kernel: a thread waits instead.
        def wait() -> None:
            status = process.wait()
            loop.call_soon_threadsafe(exited.set_result, status)

        threading.Thread(target=wait, name=f"wait-{process.pid}", daemon=True).start()
        return exited

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        exited.set_result(process.wait())  # it has exited: this does not block

    loop.add_reader(pidfd, reap)
    return exited


def _status(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-status).name}"
    return f"status {status}"


class _AllWorkers(Collector):
    """/metrics of the supervisor: every worker's metric files, added up
    (metrics.py says how), and `poproxy_ready` as /readyz answers."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterable[Metric]:
        directory = self.supervisor.directory
        if directory is not None:
            collector = multiprocess.MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]
            for family in collector.collect():  # type: ignore[no-untyped-call]
                if family.name != "poproxy_ready":
                    yield family
        yield GaugeMetricFamily("poproxy_ready", READY_HELP, 1 if self.supervisor.ready() else 0)


# --- The worker ----------------------------------------------------------------


async def worker(index: int, control: int, stop: asyncio.Event) -> None:
    """Worker `index`: read the start message on `control`, then serve until `stop`
    is set or the supervisor is gone."""
    reader, writer = await asyncio.open_connection(
        sock=socket.socket(fileno=control), limit=MAX_MESSAGE
    )
    start = json.loads(await reader.readline())
    path = Path(start["path"])
    settings = config.parse(start["config"], source=str(path), base=path.parent)
    logs.setup(settings.log.level, settings.log.format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerField(index))
    metrics = Metrics()
    certificates = tls.CertificateStore(
        settings.tls, settings.source, metrics, bytes.fromhex(start["ticket_keys"])
    )
    inherited = {
        (item["name"], Address(item["host"], item["port"]), item["tls"]): socket.socket(
            fileno=item["fd"]
        )
        for item in start["listeners"]
    }
    proxy = Proxy(settings, certificates, metrics, worker=index, inherited=inherited)
    channel = _Channel(proxy, metrics, writer)
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(_supervisor_gone(reader, stop)),
        loop.create_task(channel.watch_ready()),
    ]
    try:
        await serve(proxy, stop, path, channel.report)
    finally:
        for task in tasks:
            task.cancel()
        writer.close()


async def _supervisor_gone(reader: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """The supervisor sends nothing after the start message: the end of the
    channel means it is gone, and a worker must not serve on without it. A reset
    or a broken pipe (a report written after the supervisor died) means the same."""
    with contextlib.suppress(OSError):
        while await reader.read(4096):
            pass
    if not stop.is_set():
        log.error("the supervisor is gone: shutting down")
        stop.set()


class _Channel:
    """What a worker tells its supervisor."""

    def __init__(self, proxy: Proxy, metrics: Metrics, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.writer = writer
        self._ready: bool | None = None

    def report(self, state: str) -> None:
        """`serve`'s sd_notify states, which the supervisor sums up for systemd.

        Readiness rides in the same message: the supervisor reports a worker
        serving and answers /readyz from what one message said.
        """
        ready = self.proxy.ready()
        self.metrics.ready.set(1 if ready else 0)
        self._ready = ready
        self._send({"state": state, "ready": ready})

    def check_ready(self) -> None:
        ready = self.proxy.ready()
        self.metrics.ready.set(1 if ready else 0)
        if ready != self._ready:
            self._ready = ready
            self._send({"ready": ready})

    async def watch_ready(self) -> None:
        # Readiness follows backend health, which changes on its own.
        while True:
            self.check_ready()
            await asyncio.sleep(READY_INTERVAL)

    def _send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


class WorkerField(logging.Filter):
    """Adds `worker=INDEX` to every log line of a worker, after its other fields."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(getattr(record, logs.FIELDS, {}))
        fields["worker"] = self.index
        setattr(record, logs.FIELDS, fields)
        return True
