"""Log output: one line per record, as logfmt (default) or JSON.

Owns: the two line formats, the session-end and failed-login events with
their stable field names (operators' tools such as fail2ban parse them), and
how a user name is shown (plain, hashed or omitted). Must never format a
password or an AUTH payload: events carry only the fields named here.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Literal

# Fields of a structured event ride on the record under this attribute.
FIELDS = "poproxy_fields"

Value = str | int | float | None

_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]]+")


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


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, Value]:
    """The record's fields, in the order both formats write them."""
    fields: dict[str, Value] = {
        "time": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update(getattr(record, FIELDS, {}))
    if record.exc_info:
        fields["error"] = formatter.formatException(record.exc_info)
    return fields


class LogfmtFormatter(logging.Formatter):
    """`time=... level=... logger=... msg="..." key=value ...`, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(self, record)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the same keys as logfmt."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(self, record), ensure_ascii=False)


def _logfmt_value(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return str(value)
    if value and _BARE.fullmatch(value):
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
