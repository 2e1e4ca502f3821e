"""Log output: one line per record, as logfmt (default) or JSON.

Owns: the two line formats, the session-end and failed-login events with
their stable field names (operators' tools such as fail2ban parse them), and
how a user name is shown (plain, hashed or omitted). Must never format a
password or an AUTH payload: events carry only the fields named here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Literal

# Fields of a structured event ride on the record under this attribute.
FIELDS = "poproxy_fields"

Value = str | int | float | None

_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]]+")
_LEVELS = {level: logging.getLevelName(level).lower() for level in (10, 20, 30, 40, 50)}


def event(logger: logging.Logger, level: int, message: str, fields: Mapping[str, Value]) -> None:
    """Log `message` with structured `fields`, kept in the order given."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={FIELDS: dict(fields)})


def show_user(user: bytes | None, mode: Literal["plain", "hash", "omit"]) -> str | None:
    """The user name as the log may show it (privacy rules may forbid plain names)."""
    if user is None or mode == "omit":
        return None
    if mode == "hash":
        # A pseudonym: the same user gives the same value, across restarts too.
        return "sha256:" + hashlib.sha256(user).hexdigest()[:16]
    return user.decode("utf-8", "replace")


class _Clock:
    """UTC timestamps with milliseconds; the date part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"


class _Formatter(logging.Formatter):
    """The fields both formats write, in the order they write them."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def fields(self, record: logging.LogRecord) -> dict[str, Value]:
        fields: dict[str, Value] = {
            "time": self._clock.timestamp(record.created),
            "level": _LEVELS.get(record.levelno) or record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, FIELDS, None)
        if extra:
            fields.update(extra)
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return fields


class LogfmtFormatter(_Formatter):
    """`time=... level=... logger=... msg="..." key=value ...`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(
            [f"{key}={_logfmt_value(value)}" for key, value in self.fields(record).items()]
        )


class JsonFormatter(_Formatter):
    """One JSON object per line, with the same keys as logfmt."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self.fields(record), ensure_ascii=False)


def _logfmt_value(value: Value) -> str:
    if value is None:
        return "-"
    if not isinstance(value, str):
        return str(value)
    if _BARE.fullmatch(value):
        return value
    # Quote, escaping what could end the line or the value: a user name is
    # the client's text and must not forge fields or lines.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def setup(level: str, format: Literal["logfmt", "json"]) -> None:
    """Send every record to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Each record would otherwise look up its caller's source line, thread
    # and process: poproxy's formats show none of them (Logging HOWTO,
    # "Optimization"). A session costs one record at info level.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
