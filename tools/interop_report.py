#!/usr/bin/env python3
"""Write docs/interop.md from the results file of the interop matrix.

The matrix (tests/interop/matrix) writes build/interop/matrix-results.json at the end of a
pytest run (POPROXY_INTEROP_RESULTS moves it): every check of every cell with its outcome,
the versions of the servers and clients, and the storage and serving rules. This script
turns it into the Markdown page; ``make interop`` runs both.

Usage: tools/interop_report.py [RESULTS.json [OUTPUT.md]]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "build" / "interop" / "matrix-results.json"
DEFAULT_OUTPUT = REPO / "docs" / "interop.md"
CHECK_ORDER = ("keep", "delete", "killed", "no_tls")

HOW_IT_RUNS = """\
Each backend is started by the tests on a free port of 127.0.0.1 (never through systemd) and
runs for the whole module; poproxy (the suite's test configuration: a POP3S listener and an
STLS listener on 127.0.0.1, with `plaintext_hint_after` cut from 2 s to 0.25 s) is started
for each test in front of it. Between poproxy and the backend sits a small relay, the
*tap*: it counts the connections the backend gets, records what poproxy sends it, and can
hold the backend's bytes at 1,000,000 bytes into a session, which is how a client is killed
in the middle of the 5 MB message; when poproxy then drops the backend connection, the tap
resets it, as poproxy's own socket would. For the clients that send DELE right after each
RETR (poplib, fetchmail, getmail, s_client), the `killed` check also finds `DELE 1` in what
poproxy sent: the DELEs were sent, and not committed.

The certificate comes from a test CA that every client is given (curl `--cacert`, fetchmail
`sslcertck sslcertfile`, getmail `ca_certs`, s_client `-CAfile -verify_return_error`, mutt
`certificate_file`, poplib an `SSLContext`); none of them is told to skip verification. With
TLS turned off (`no_tls`), a client set up for POP3S speaks plaintext to the POP3S port and
gets poproxy's hint to use TLS; one set up for STLS speaks plaintext POP3 to the STLS port
and is refused at USER (or AUTH).

Dovecot is the installed dovecot-pop3d, run by tests/support/dovecot.py. The others come
from Debian packages that `make interop-deps` unpacks (tools/interop_debs.py) instead of
installing: popa3d, courier-pop and cyrus-pop3d conflict with dovecot-pop3d and with each
other (`Conflicts: pop3-server`), and unpacking also means no package script ever starts a
daemon on port 110. tests/support/pop3_servers.py runs each in a private mount namespace in
which the unpacked package is laid over `/usr` and `/etc` (read-only overlayfs) and
`/etc/passwd`, `/etc/group` and `/etc/shadow` hold the host's users plus the test's: the
user `alice` (password `wonderland`) that popa3d, Courier (authpam) and Mailutils check with
PAM or shadow exists only inside that namespace, so no system user is created, and nothing
outside the test's temporary directories is written. Cyrus checks the password against its
own sasldb (auxprop), written by the test with db_load; popa3d and Cyrus get their own
service users (`popa3d`, `cyrus`) the same way.

`make interop-deps` installs from Debian 12: dovecot-pop3d, curl, openssl, fetchmail,
getmail6 and mutt; it unpacks popa3d, courier-pop, cyrus-common, cyrus-pop3d and
mailutils-pop3d into build/interop/debs and installs what they depend on (courier-base with
courier-authdaemon, db-util, libical3, libxapian30, the Mailutils libraries, and so on).
"""

NOTES = """\
- **getmail6** has no STLS for POP3: `SimplePOP3Retriever` is plaintext and
  `SimplePOP3SSLRetriever` is POP3S. It has only the POP3S column.
- **openssl s_client** cannot turn TLS off, so its `no_tls` check does not exist (n/a). It is
  driven one command at a time, as a person would type: with every command pipelined at
  once, the QUIT would already be in the server's buffer when the client is killed, and any
  server would then commit the DELEs. That holds for every client that pipelines QUIT
  behind its RETRs, with or without poproxy; none of the other clients here does.
- **mutt** has no batch mode for reading mail. It runs on a pseudo-terminal with
  `-e 'push <fetch-mail><quit>'` and `sleep_time=0`: no one types anything, and a
  certificate it could not verify would stop it at a prompt (the run would time out and
  fail). Its exit status says nothing about a failed login, so its `no_tls` check looks only
  at the mail delivered (none) and at the backend (no connection).
- **fetchmail** 6.4 with `sslcertck` refuses a server certificate without a subject CN
  ("Server name not specified in certificate!"): it reads subjectAltName only when there is
  a CN. The matrix certificate has CN=localhost besides its SANs. A poproxy certificate with
  SANs only works with every other client here, but not with fetchmail's checking on.
- **popa3d, Courier and Mailutils** want Unix line ends in their store: popa3d and Courier
  serve a stored CR LF as CR CR LF, and Mailutils 3.15 finds no end of header in a message
  stored with CR LF and rewrites the file with nothing but its own X-UIDL line (the message
  is lost). So the CRLF sources are stored in those three with LF, as their own delivery
  would store them; Dovecot stores them as given, Cyrus gets them over LMTP.
- **popa3d** derives its UIDL from header lines: before the fixed messages carried Date and
  Message-ID, as real mail does, all six had the same UIDL and getmail refused the mailbox.
  It also takes a second longer to log in when the mbox was modified in the current second;
  the test dates the mbox a minute back.
- **Cyrus** suppresses a second delivery of a Message-ID (turned off: the tests deliver the
  same messages again and again), adds header lines on delivery, and unlinks the files of
  expunged messages lazily; the test reads the files of the messages POP3 lists.
"""


def cell_text(checks: dict[str, dict[str, Any]], client: dict[str, Any]) -> str:
    outcomes = {check: entry["outcome"] for check, entry in checks.items()}
    failed = [check for check in CHECK_ORDER if outcomes.get(check) == "failed"]
    skipped = [check for check in CHECK_ORDER if outcomes.get(check) == "skipped"]
    missing = [
        check
        for check in CHECK_ORDER
        if check not in outcomes and not (check == "no_tls" and client["no_tls_unsupported"])
    ]
    if failed:
        return "**FAIL** (" + ", ".join(failed) + ")"
    if skipped and len(skipped) + len(missing) == len(CHECK_ORDER):
        return "skipped"
    if skipped or missing:
        return "incomplete (" + ", ".join(skipped + missing) + " not run)"
    text = "pass"
    if client["no_tls_unsupported"]:
        text += " (no_tls n/a)"
    return text


def render(results: dict[str, Any]) -> str:
    backends: dict[str, dict[str, Any]] = results["backends"]
    clients: dict[str, dict[str, Any]] = results["clients"]
    grid: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for cell in results["cells"]:
        grid.setdefault((cell["backend"], cell["client"]), {})[cell["check"]] = cell
    outcomes = Counter(cell["outcome"] for cell in results["cells"])
    seconds = sum(cell["seconds"] for cell in results["cells"])

    lines = [
        "# Interoperability matrix",
        "",
        "<!-- Generated by `make interop` (tests/interop/matrix, then tools/interop_report.py)."
        " Do not edit: run it again. -->",
        "",
        "Real mail clients, through poproxy, to real legacy POP3 servers, all from Debian 12",
        f"packages. Run of {results['generated']}: "
        + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
        + f" checks, {seconds:.0f} s of tests.",
        "",
        "## Result",
        "",
        "A cell passes when all four checks pass:",
        "",
    ]
    lines += [f"- `{check}`: {text}." for check, text in results["checks"].items()]
    lines += [
        "",
        "| client \\ backend | " + " | ".join(b["title"] for b in backends.values()) + " |",
    ]
    lines.append("| --- " * (len(backends) + 1) + "|")
    for client_key, client in clients.items():
        row = [f"{client['title']} ({client['version']})"]
        for backend_key in backends:
            checks = grid.get((backend_key, client_key), {})
            row.append(cell_text(checks, client) if checks else "not run")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Backend versions: "
        + ", ".join(f"{b['title']} {b['version']} ({b['package']})" for b in backends.values())
        + ".",
    ]

    failures = [cell for cell in results["cells"] if cell["outcome"] != "passed"]
    if failures:
        lines += ["", "### Failed or skipped checks", ""]
        for cell in sorted(failures, key=lambda c: (c["backend"], c["client"], c["check"])):
            detail = cell["detail"].replace("|", "\\|") or "(no detail)"
            lines.append(
                f"- {cell['backend']} x {cell['client']}, `{cell['check']}`: "
                f"{cell['outcome']}: {detail}"
            )

    lines += [
        "",
        "## Versions",
        "",
        "| backend | Debian package | version |",
        "| --- | --- | --- |",
    ]
    for backend in backends.values():
        lines.append(f"| {backend['title']} | {backend['package']} | {backend['version']} |")
    lines += ["", "| client | program | TLS | version |", "| --- | --- | --- | --- |"]
    for client in clients.values():
        tls = "POP3S (implicit)" if client["tls"] == "implicit" else "STLS"
        lines.append(f"| {client['title']} | {client['program']} | {tls} | {client['version']} |")

    lines += ["", "## The messages", "", "Every mailbox gets the same six, in this order:", ""]
    lines += [f"{n}. {text}" for n, text in enumerate(results["messages"], start=1)]
    lines += [
        "",
        "## Byte for byte: the rules",
        "",
        "What a client must deliver is computed from what the backend stores, read back from "
        "its store after filling it: the backend's serving rule gives what RETR carries, "
        "un-dot-stuffed; the client's rule gives what it writes down. Nothing else may "
        "differ.",
        "",
        "| backend | how the messages are stored | how they are served |",
        "| --- | --- | --- |",
    ]
    for backend in backends.values():
        lines.append(f"| {backend['title']} | {backend['storage']} | {backend['serving']} |")
    lines += ["", "| client | what it writes down |", "| --- | --- |"]
    for client in clients.values():
        lines.append(f"| {client['title']} | {client['rule']} |")
    lines += ["", "## How it runs", "", HOW_IT_RUNS.rstrip(), "", "## Notes", "", NOTES.rstrip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    results_path = Path(argv[1]) if len(argv) > 1 else DEFAULT_RESULTS
    output = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUTPUT
    if not results_path.is_file():
        print(f"{results_path}: no results (run the interop matrix first)", file=sys.stderr)
        return 1
    results = json.loads(results_path.read_text())
    output.write_text(render(results))
    print(f"wrote {output}")
    failed = any(cell["outcome"] == "failed" for cell in results["cells"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
