"""Log line formats: timestamps, field order and quoting."""

from __future__ import annotations

import calendar
import json
import logging

from poproxy.logs import FIELDS, JsonFormatter, LogfmtFormatter


def record(created: float, fields: dict[str, object] | None = None) -> logging.LogRecord:
    item = logging.LogRecord("poproxy.session", logging.INFO, "", 0, "session end", (), None)
    item.created = created
    if fields is not None:
        setattr(item, FIELDS, fields)
    return item


MOMENT = calendar.timegm((2026, 11, 27, 7, 18, 57)) + 0.1234


def test_timestamps_are_utc_with_milliseconds_and_follow_the_clock() -> None:
    formatter = LogfmtFormatter()
    first = formatter.format(record(MOMENT))
    assert first.startswith("time=2026-11-27T07:18:57.123Z level=info logger=poproxy.session")
    # The same second again, then the next one: the cached date part must follow.
    assert formatter.format(record(MOMENT + 0.5)).startswith("time=2026-11-27T07:18:57.623Z ")
    assert formatter.format(record(MOMENT + 1)).startswith("time=2026-11-27T07:18:58.123Z ")
    assert formatter.format(record(MOMENT - 86400)).startswith("time=2026-11-26T07:18:57.123Z ")


def test_logfmt_fields_in_order_with_quoting() -> None:
    fields = {"user": 'a "b"\nc', "bytes": 12, "sni": None, "empty": "", "ok": "pop3s"}
    line = LogfmtFormatter().format(record(MOMENT, fields))
    assert line.endswith(' msg="session end" user="a \\"b\\"\\nc" bytes=12 sni=- empty="" ok=pop3s')
    assert "\n" not in line


def test_json_has_the_same_keys() -> None:
    fields = {"user": "alice", "bytes": 12, "sni": None}
    parsed = json.loads(JsonFormatter().format(record(MOMENT, fields)))
    assert list(parsed) == ["time", "level", "logger", "msg", "user", "bytes", "sni"]
    assert parsed["time"] == "2026-11-27T07:18:57.123Z"
    assert parsed["level"] == "info"
    assert parsed["sni"] is None
