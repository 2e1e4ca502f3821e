"""The operators' files in deploy/: Prometheus alerts, the Grafana dashboard, fail2ban.

Owns: running the operators' own tools (promtool, fail2ban-regex) on these files as shipped,
and checking that every metric and label the alerts and the dashboard query is one that
`poproxy.metrics.Metrics` defines. Must never install anything, start a service, or write
outside pytest's tmp_path.
"""

from __future__ import annotations

import configparser
import datetime
import json
import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from support.interop import require_program

from poproxy import logs
from poproxy.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "poproxy.json"
FILTER = DEPLOY / "fail2ban" / "filter.d" / "poproxy.conf"
JAIL = DEPLOY / "fail2ban" / "jail.d" / "poproxy.conf"
SAMPLE_LOG = DEPLOY / "fail2ban" / "sample.log"

# Series the rules may query that poproxy/metrics.py does not define.
EXTERNAL_METRICS: dict[str, frozenset[str]] = {
    # Prometheus writes `up` itself for every scrape target.
    "up": frozenset(),
    # The readiness gauge that PoproxyNotReady and the dashboard's Ready panel read. metrics.py
    # defines it now; listed so that these files never depend on which of the two lands first.
    "poproxy_ready": frozenset(),
}
# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

# --- fail2ban: what the filter must find in sample.log --------------------------------------

# Line number in sample.log -> the client address fail2ban must take from it. Every other line
# must not match: other results (in_use, temp_fail, ...), other messages, and the lines whose
# user name tries to put 198.51.100.99 or result=auth_failed where the filter would read it.
SAMPLE_MATCHES: dict[int, str] = {
    **dict.fromkeys([1, 2, 3, 5, 6], "203.0.113.7"),  # logfmt, IPv4
    **dict.fromkeys([7, 8, 9, 10, 11], "2001:db8::7"),  # logfmt then JSON, IPv6
    **dict.fromkeys([12, 13, 16, 19, 20], "192.0.2.66"),  # the spoofer, framing only itself
    **dict.fromkeys([32, 33, 34, 35], "198.51.100.23"),  # quoted, hashed, omitted, null user
    **dict.fromkeys([36, 37, 38, 39, 40], "2001:db8:1::23"),  # hourly: under findtime never 5
    **dict.fromkeys([41, 42, 43, 44, 45], "203.0.113.99"),  # through rsyslog, with a prefix
    **dict.fromkeys([46, 47], "192.0.2.67"),  # a fake `time=` in the user name
    **dict.fromkeys([48, 49], "2001:db8::68"),  # no client port
}
SAMPLE_BANS = frozenset({"203.0.113.7", "2001:db8::7", "192.0.2.66", "203.0.113.99"})
SPOOFED_VICTIM = "198.51.100.99"

_LINE_TIME = re.compile(r'^(?:[^={"]*\s)?(?:time=|\{"time": ")(\S+?Z)')


# --- Metrics that poproxy defines -----------------------------------------------------------


def _exposed_metrics() -> dict[str, frozenset[str]]:
    """Every series name a fresh `Metrics` exposes, with the label names it carries."""
    metrics = Metrics()
    families = {family.name: family.type for family in metrics.registry.collect()}
    # A labelled metric with no child yet has no samples, so take label names from the
    # metric objects themselves.
    labels: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            labels[family.name] = frozenset(value._labelnames)
    assert set(labels) == set(families), "every family in the registry is a Metrics attribute"
    exposed: dict[str, frozenset[str]] = {}
    for name, kind in families.items():
        match kind:
            case "counter":
                # prometheus-client drops `_total` from a counter's family name.
                exposed[name + "_total"] = labels[name]
                exposed[name + "_created"] = labels[name]
            case "histogram":
                exposed[name + "_bucket"] = labels[name] | {"le"}
                exposed[name + "_sum"] = labels[name]
                exposed[name + "_count"] = labels[name]
            case "gauge":
                exposed[name] = labels[name]
            case _:
                pytest.fail(f"{name}: metric type {kind} is not handled here")
    return exposed


def test_exposed_metrics_know_counters_and_histograms() -> None:
    exposed = _exposed_metrics()
    assert exposed["poproxy_connections_total"] == {"listener"}
    assert exposed["poproxy_tls_versions_total"] == {"listener", "version"}
    assert exposed["poproxy_tls_handshake_duration_seconds_bucket"] == {"listener", "le"}
    assert exposed["poproxy_backend_up"] == {"backend", "server"}
    assert "poproxy_connections" not in exposed


# --- PromQL: the names an expression uses ---------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_SELECTOR = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def _promql_names(expr: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """Metric names, label names used in each selector's matchers, and grouping labels."""
    text = _STRING.sub('""', expr)
    text = _RANGE.sub("", text)
    grouping = {
        label.strip() for labels in _GROUPING.findall(text) for label in labels.split(",")
    } - {""}
    text = _GROUPING.sub(" ", text)
    matchers: dict[str, set[str]] = {}
    for name, inside in _SELECTOR.findall(text):
        matchers.setdefault(name, set()).update(_MATCHER_LABEL.findall(inside))
    text = re.sub(r"\{[^}]*\}", " ", text)
    names = {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}
    return names | set(matchers), matchers, grouping


def test_promql_names_are_extracted() -> None:
    names, matchers, grouping = _promql_names(
        'histogram_quantile(0.99, sum by (listener, le) (rate(x_bucket{instance=~"$i",'
        ' listener=~"a{b}"}[$__rate_interval]))) > 1e3 and on(job) up == 0'
    )
    assert names == {"x_bucket", "up"}
    assert matchers == {"x_bucket": {"instance", "listener"}}
    assert grouping == {"listener", "le", "job"}


def _check_expr(where: str, expr: str, exposed: dict[str, frozenset[str]]) -> set[str]:
    """Fail unless every metric and label in `expr` exists; return the metric names."""
    known = {**exposed, **EXTERNAL_METRICS}
    names, matchers, grouping = _promql_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - set(known)
    assert not unknown, f"{where}: not defined by poproxy/metrics.py: {sorted(unknown)}"
    for name, labels in matchers.items():
        extra = labels - known[name] - TARGET_LABELS
        assert not extra, f"{where}: {name} has no label {sorted(extra)}"
    available = set(TARGET_LABELS).union(*(known[name] for name in names))
    assert grouping <= available, f"{where}: no metric has label {sorted(grouping - available)}"
    return names


# --- Prometheus alerting rules --------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    (group,) = document["groups"]
    assert group["name"] == "poproxy"
    rules: list[dict[str, Any]] = group["rules"]
    return rules


def test_alerts_query_only_metrics_that_poproxy_defines() -> None:
    exposed = _exposed_metrics()
    for rule in _alert_rules():
        _check_expr(f"alerts.yaml {rule['alert']}", rule["expr"], exposed)


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {rule["alert"] for rule in _alert_rules()}
    assert alerts == {
        "PoproxyCertificateExpiringSoon",
        "PoproxyCertificateExpired",
        "PoproxyBackendServerDown",
        "PoproxyTlsHandshakeFailuresHigh",
        "PoproxyPlaintextLoginAttemptsRising",
        "PoproxyNotReady",
        "PoproxyBackendLoginsUnavailable",
    }
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]
        for case in test["alert_rule_test"]
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert firing == alerts
    assert quiet == alerts


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = require_program("promtool")
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.interop
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


@pytest.mark.interop
def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- Grafana dashboard ----------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    dashboard = _dashboard()
    queries = [
        (f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert found, f"variable {variable['name']}: expected label_values(series, label)"
            queries.append((f"variable {variable['name']}", f"sum by ({found[2]}) ({found[1]})"))
    return queries


def test_dashboard_is_grafana_json_with_variables() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"listener", "backend"} <= set(variables)
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"]


def test_dashboard_queries_only_metrics_that_poproxy_defines() -> None:
    exposed = _exposed_metrics()
    used: set[str] = set()
    for where, expr in _dashboard_queries():
        used |= _check_expr(where, expr, exposed)
    # The panels the operators asked for, at least.
    assert {
        "poproxy_connections_total",
        "poproxy_connections_active",
        "poproxy_tls_handshakes_total",
        "poproxy_tls_versions_total",
        "poproxy_tls_handshake_duration_seconds_bucket",
        "poproxy_starttls_total",
        "poproxy_starttls_injection_total",
        "poproxy_plaintext_auth_refused_total",
        "poproxy_logins_total",
        "poproxy_sessions_closed_total",
        "poproxy_session_duration_seconds_bucket",
        "poproxy_relayed_bytes_total",
        "poproxy_backend_up",
        "poproxy_backend_connect_duration_seconds_bucket",
        "poproxy_certificate_expiry_timestamp_seconds",
        "poproxy_build_info",
    } <= used


@pytest.mark.interop
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule with Grafana's variables filled in."""
    rules = []
    for number, (_, expr) in enumerate(_dashboard_queries()):
        expr = expr.replace("$__rate_interval", "5m")
        rules.append({"record": f"dashboard:query_{number}", "expr": re.sub(r"\$\w+", ".*", expr)})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = _promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- fail2ban -------------------------------------------------------------------------------


def _fail2ban_regex(log: Path, *options: str) -> list[tuple[str, float, str]]:
    """(address, time, line) for each line the filter matches, as fail2ban-regex reports."""
    program = require_program("fail2ban-regex")
    result = subprocess.run(
        [program, "-e", "utf-8", "-o", "<ip>\t<time>\t<msg>", *options, str(log), str(FILTER)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = []
    for row in result.stdout.splitlines():
        address, when, line = row.split("\t", 2)
        found.append((address, float(when), line))
    return found


def _duration(text: str) -> float:
    """A fail2ban time value: seconds, or a number with s, m, h or d."""
    found = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    assert found, f"cannot read duration {text!r}"
    return int(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found[2]]


def _jail() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(JAIL.read_text(encoding="utf-8"))
    return parser["poproxy"]


def _banned(failures: list[tuple[str, float]], maxretry: int, findtime: float) -> set[str]:
    """Addresses with maxretry failures within findtime: what fail2ban would ban."""
    times: dict[str, list[float]] = {}
    for address, when in failures:
        times.setdefault(address, []).append(when)
    return {
        address
        for address, moments in times.items()
        for first, last in zip(sorted(moments), sorted(moments)[maxretry - 1 :], strict=False)
        if last - first <= findtime
    }


def test_jail_uses_the_filter_and_pop3_ports() -> None:
    jail = _jail()
    assert jail["enabled"] == "true"
    assert jail["filter"] == "poproxy"
    assert jail["port"] == "110,995"
    assert int(jail["maxretry"]) == 5
    assert _duration(jail["findtime"]) == 600
    assert _duration(jail["bantime"]) == 3600


@pytest.mark.interop
def test_fail2ban_matches_exactly_the_failed_logins_in_sample_log() -> None:
    lines = SAMPLE_LOG.read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == len(lines), "each sample line is unique"
    number_of = {line: number for number, line in enumerate(lines, start=1)}
    found = _fail2ban_regex(SAMPLE_LOG)
    matched = {number_of[line]: address for address, _, line in found}
    assert len(matched) == len(found), "each line is reported once"
    assert matched == SAMPLE_MATCHES
    assert SPOOFED_VICTIM not in {address for address, _, _ in found}
    for address, when, line in found:
        # The date is poproxy's own field, in UTC, even where a user name carries another.
        written = _LINE_TIME.match(line)
        assert written, line
        moment = datetime.datetime.fromisoformat(written[1].replace("Z", "+00:00"))
        assert abs(when - moment.timestamp()) < 1, f"{address}: wrong time for {line}"


@pytest.mark.interop
def test_fail2ban_bans_exactly_the_guessers_in_sample_log() -> None:
    """fail2ban-regex only matches: the jail's maxretry and findtime decide the bans here."""
    jail = _jail()
    found = _fail2ban_regex(SAMPLE_LOG)
    failures = [(address, when) for address, when, _ in found]
    banned = _banned(failures, int(jail["maxretry"]), _duration(jail["findtime"]))
    assert banned == SAMPLE_BANS


def _failed_login_line(
    log_format: str, client: str, user: str | None, result: str, port: int | None = 51234
) -> str:
    """The line poproxy's own formatter writes for a failed login."""
    fields: dict[str, logs.Value] = {
        "client": client,
        "client_port": port,
        "listener": "pop3s",
        "user": user,
        "result": result,
        "session": "1a",
    }
    record = logging.makeLogRecord(
        {
            "name": "poproxy.auth",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "login failed",
            logs.FIELDS: fields,
        }
    )
    formatter = logs.JsonFormatter() if log_format == "json" else logs.LogfmtFormatter()
    return formatter.format(record)


# (client, user, result, port) -> whether the filter must count it against the client.
FORMATTED_CASES: list[tuple[str, str | None, str, int | None, bool]] = [
    ("203.0.113.7", "alice", "auth_failed", 51234, True),
    ("2001:db8::7", "x client=198.51.100.99 y", "auth_failed", 51234, True),
    ("192.0.2.66", '" client=198.51.100.99 result=auth_failed', "in_use", 51234, False),
    ("192.0.2.67", 'a\n" result=auth_failed client=198.51.100.99', "temp_fail", 51234, False),
    ("192.0.2.68", '", "client": "198.51.100.99", "result": "auth_failed', "perm_fail", 1, False),
    ("192.0.2.69", "x\\", "backend_unavailable", 51234, False),
    ("192.0.2.70", "time=2001-01-01T00:00:00Z", "login_delay", 51234, False),
    ("198.51.100.23", None, "auth_failed", 51234, True),
    ("198.51.100.24", "jürgen", "auth_failed", 51234, True),
    ("198.51.100.25", "sha256:2bd806c97f0e00af", "auth_failed", 51234, True),
    ("2001:db8::26", "bob", "auth_failed", None, True),
]


@pytest.mark.interop
@pytest.mark.parametrize("log_format", ["logfmt", "json"])
@pytest.mark.parametrize("journal", [False, True], ids=["file", "journal"])
def test_fail2ban_reads_the_lines_poproxy_writes(
    tmp_path: Path, log_format: str, journal: bool
) -> None:
    """The filter against poproxy.logs' own output, as a file or as the journal shows it."""
    lines = [
        _failed_login_line(log_format, client, user, result, port)
        for client, user, result, port, _ in FORMATTED_CASES
    ]
    assert all("\n" not in line for line in lines)
    options: list[str] = []
    if journal:
        # The journal backend hands fail2ban "host ident[pid]: message" and its own time.
        lines = [f"mail poproxy[812]: {line}" for line in lines]
        options = ["-d", "{NONE}"]
    log = tmp_path / "poproxy.log"
    log.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    found = _fail2ban_regex(log, *options)
    expected = [
        (client, line)
        for (client, *_, counts), line in zip(FORMATTED_CASES, lines, strict=True)
        if counts
    ]
    assert [(address, line) for address, _, line in found] == expected
