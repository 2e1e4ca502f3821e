"""The fixed set of messages every backend's mailbox is filled with, in POP3 order.

The 5 MB message is fourth: a client killed during its download has retrieved (and, in
delete mode, often sent DELE for) the three before it.
"""

from __future__ import annotations

BIG_LINES = 70_000  # 74 bytes each: 5.18 MB


def _big() -> bytes:
    lines = []
    for number in range(BIG_LINES):
        # Every 1000th line starts with a dot: dot-stuffing all the way through.
        lead = b"." if number % 1000 == 999 else b"l"
        lines.append(lead + b"ine %06d " % number + b"x" * 61 + b"\r\n")
    header = _headers(4) + b"From: Frank <frank@example.org>\r\nSubject: big\r\n\r\n"
    return header + b"".join(lines)


def _headers(number: int, newline: bytes = b"\r\n") -> bytes:
    """Date and Message-ID, as every real message has (popa3d's UIDL is made of them)."""
    return (
        b"Date: Thu, 01 Jan 2026 00:00:%02d +0000" % number
        + newline
        + b"Message-ID: <%d.matrix@example.org>" % number
        + newline
    )


MESSAGES: list[tuple[str, bytes]] = [
    (
        "dot-leading lines (`.leading dot`, `.`, `..two`), CRLF",
        _headers(1) + b"From: Carol <carol@example.org>\r\nSubject: dots\r\n\r\n"
        b".leading dot\r\n.\r\n..two\r\nend\r\n",
    ),
    (
        "8-bit UTF-8 body (Content-Transfer-Encoding: 8bit), CRLF",
        _headers(2)
        + "From: Dana <dana@example.org>\r\nSubject: utf-8\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße aus Köln — naïve café ✓\r\n".encode(),
    ),
    (
        "CRLF source",
        _headers(3)
        + b"From: Erin <erin@example.org>\r\nSubject: crlf\r\n\r\nline one\r\nline two\r\n",
    ),
    ("5 MB (70,000 lines, some dot-leading), CRLF", _big()),
    (
        "bare-LF source (with a dot-leading line)",
        _headers(5, b"\n")
        + b"From: Gina <gina@example.org>\nSubject: bare lf\n\nline one\n.dot line\nline three\n",
    ),
    (
        "no final newline, CRLF",
        _headers(6) + b"From: Hank <hank@example.org>\r\nSubject: no final newline\r\n\r\n"
        b"last line without newline",
    ),
]
