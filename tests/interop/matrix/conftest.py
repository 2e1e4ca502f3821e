"""Fixtures of the interop matrix, and the plugin that writes its results file.

Every matrix test is one check of one cell (backend x client): ``keep``, ``delete``,
``killed`` or ``no_tls``. The plugin keeps each one's outcome and, at the end of the run,
writes them with the versions of everything involved to a JSON file (POPROXY_INTEROP_RESULTS,
default build/interop/matrix-results.json), from which tools/interop_report.py writes
docs/interop.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from support.pop3_servers import (
    BACKENDS,
    REPO,
    Pop3Backend,
    Tap,
    running_backend,
)
from support.proxy import Certificates

from poproxy import config

from .clients import CLIENTS, SERVER_NAME
from .messages import MESSAGES

RESULTS_ENV = "POPROXY_INTEROP_RESULTS"
DEFAULT_RESULTS = REPO / "build" / "interop" / "matrix-results.json"
CHECKS = {
    "keep": "keep mode: every message arrives as stored, and stays on the backend",
    "delete": "delete mode: every message arrives as stored, and is gone after QUIT",
    "killed": "killed mid-download (delete mode, SIGKILL in the 5 MB message): all stay",
    "no_tls": "TLS turned off: the login fails, and the backend sees no connection",
}

_results_key = pytest.StashKey[dict[str, dict[str, Any]]]()
F = TypeVar("F", bound=Callable[..., Any])


def matrix_check(check: str) -> Callable[[F], F]:
    """Mark a test function as the check ``check`` of the cell its parameters name."""
    if check not in CHECKS:
        raise ValueError(check)

    def mark(function: F) -> F:
        function.matrix_check = check  # type: ignore[attr-defined]
        return function

    return mark


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """The matrix's CA and server certificate, for every test of the run.

    Unlike the suite's, the certificate has a subject CN (localhost) as well as the SANs:
    fetchmail 6.4 with ``sslcertck`` refuses a certificate without one ("Server name not
    specified in certificate!"), reading the subjectAltName only when a CN is there.
    """
    directory = tmp_path_factory.mktemp("matrix-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", SERVER_NAME, common_name=SERVER_NAME)
    cert, key, ca_file = directory / "server.crt", directory / "server.key", directory / "ca.crt"
    server.cert_chain_pems[0].write_to_path(str(cert))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(cert), append=True)
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    files = config.CertificateFiles(cert=cert, key=key, key_path="tls.certificates[0]")
    return Certificates(ca=ca, files=files, ca_file=ca_file)


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pop3Backend]:
    key: str = request.param
    with running_backend(key, tmp_path_factory.mktemp(key)) as server:
        yield server


@pytest.fixture(scope="module")
def tap(backend: Pop3Backend) -> Iterator[Tap]:
    relay = Tap((backend.host, backend.port))
    try:
        yield relay
    finally:
        relay.stop()


# --- the results plugin --------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_results_key] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    check = getattr(getattr(item, "function", None), "matrix_check", None)
    callspec = getattr(item, "callspec", None)
    if check is None or callspec is None:
        return report
    cell = item.config.stash[_results_key].setdefault(
        item.nodeid,
        {
            "backend": callspec.params.get("backend"),
            "client": callspec.params.get("client"),
            "check": check,
            "outcome": "passed",
            "detail": "",
            "seconds": 0.0,
        },
    )
    cell["seconds"] = round(cell["seconds"] + report.duration, 2)
    if report.failed and cell["outcome"] != "failed":
        cell["outcome"] = "failed"
        cell["detail"] = _first_line(report)
    elif report.skipped and cell["outcome"] == "passed":
        cell["outcome"] = "skipped"
        cell["detail"] = _first_line(report)
    return report


def _first_line(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or ""
    for line in text.splitlines():
        if line.startswith("E "):
            return line[1:].strip()[:300]
    return text.strip().splitlines()[-1][:300] if text.strip() else ""


def pytest_sessionfinish(session: pytest.Session) -> None:
    cells = session.config.stash.get(_results_key, {})
    if not cells:
        return
    path = Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "checks": CHECKS,
        "messages": [description for description, _ in MESSAGES],
        "backends": {
            key: {
                "title": backend.title,
                "package": backend.package,
                "version": backend.version(),
                "storage": backend.rules.storage,
                "serving": backend.rules.serving,
            }
            for key, backend in BACKENDS.items()
        },
        "clients": {
            key: {
                "title": client.title,
                "program": client.program,
                "version": _client_version(client.program),
                "tls": client.tls,
                "rule": client.rule,
                "no_tls_unsupported": client.no_tls_unsupported,
            }
            for key, client in CLIENTS.items()
        },
        "cells": sorted(cells.values(), key=lambda cell: json.dumps(cell, sort_keys=True)),
    }
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def _client_version(program: str) -> str:
    client = next(client for client in CLIENTS.values() if client.program == program)
    try:
        return client.version()
    except (pytest.skip.Exception, pytest.fail.Exception):  # not installed
        return "not installed"
