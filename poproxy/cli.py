"""The `poproxy` command: `run`, `check-config`, `demo`, `probe`.

Owns: argument parsing, logging set-up, exit codes, and running the server
on uvloop. A configuration, certificate or listen problem is one line on
stderr naming the file and key, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import uvloop

from poproxy import __version__, config, logs, probe, tls, workers
from poproxy.backends import BackendError, Backends
from poproxy.metrics import Metrics
from poproxy.server import ListenError, PrivilegeError, Proxy, check_privileges, serve

EXIT_USAGE = 2  # bad configuration, certificate or listen address

log = logging.getLogger("poproxy")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [workers.WORKER_COMMAND]:
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(prog="poproxy", description="TLS-terminating POP3 proxy")
    parser.add_argument("--version", action="version", version=f"poproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("-c", "--config", type=Path, required=True, help="YAML configuration file")
    check = commands.add_parser("check-config", help="validate a configuration, bind nothing")
    check.add_argument("-c", "--config", type=Path, required=True, help="YAML configuration file")
    demo_command = commands.add_parser("demo", help="run the proxy before an in-memory POP3 server")
    demo_command.add_argument("-c", "--config", type=Path, help="demo configuration file")
    probe_command = commands.add_parser("probe", help="check a POP3 server's TLS from outside")
    probe.add_arguments(probe_command)
    arguments = parser.parse_args(argv)

    try:
        match arguments.command:
            case "check-config":
                return check_config(arguments.config)
            case "run":
                path: Path = arguments.config
                text = config.read(path)
                settings = config.parse(text, source=str(path), base=path.parent)
                check_privileges(settings)
                logs.setup(settings.log.level, settings.log.format)
                count = workers.count(settings.workers)
                if count > 1:
                    supervisor = workers.Supervisor(settings, path, text, count)
                    return _run_until_signal(supervisor.run)
                metrics = Metrics()
                # Keys for the process's lifetime: tickets survive reloads.
                certificates = tls.CertificateStore(
                    settings.tls, settings.source, metrics, tls.new_ticket_keys()
                )
                proxy = Proxy(settings, certificates, metrics)
                return _run_until_signal(lambda stop: serve(proxy, stop, path))
            case "demo":
                from poproxy import demo  # only the demo needs its sample data

                logs.setup("info", "logfmt")
                return _run_until_signal(lambda stop: demo.run_demo(arguments.config, stop))
            case "probe":
                return probe.run_command(arguments)
    except (
        config.ConfigError,
        tls.CertificateError,
        BackendError,
        ListenError,
        PrivilegeError,
    ) as exc:
        print(f"poproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    raise AssertionError(arguments.command)


def check_config(path: Path) -> int:
    """Validate the file and the certificates it names; print what an operator checks."""
    settings = config.load(path)
    tls.server_context(settings.tls, settings.source)
    Backends(settings.backends, Metrics(), settings.routes, settings.source)  # CA files load
    check_privileges(settings)
    now = datetime.datetime.now(datetime.UTC)
    for files in settings.tls.certificates:
        info = tls.inspect_certificate(files, settings.source)
        days = (info.not_after - now).days
        print(
            f"certificate {files.cert}: names {', '.join(info.names) or '-'};"
            f" expires {info.not_after:%Y-%m-%d} ({days} days)"
        )
    for listener in settings.listeners:
        print(f"listener {listener.name}: {listener.listen} tls={listener.tls}")
    if settings.workers != 1:
        print(f"workers: {settings.workers} ({workers.count(settings.workers)} here)")
    for backend in settings.backends:
        servers = ", ".join(str(server) for server in backend.servers)
        print(f"backend {backend.name}: {servers}")
    print(f"{path}: OK")
    return 0


def _worker(argv: Sequence[str]) -> int:
    """`_worker INDEX FD`: one worker of a supervisor (workers.py), not for operators."""
    index, control = int(argv[0]), int(argv[1])
    try:
        return _run_until_signal(lambda stop: workers.worker(index, control, stop))
    except (
        config.ConfigError,
        tls.CertificateError,
        BackendError,
        ListenError,
        PrivilegeError,
    ) as exc:
        print(f"poproxy: worker {index}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main` on uvloop; SIGTERM and SIGINT set its stop event; its status or 0."""

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM (orchestrators) and SIGINT (Ctrl-C) both start the ordered
        # shutdown; a second one is ignored while the grace period runs.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return await main(stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner_:
        return runner_.run(runner()) or 0
