"""Unit tests for poproxy.config: schema, defaults, and every error message.

Each error names the file and the key path (STYLE rule 9). Most documents are
built as Python data from one valid base and dumped to YAML, so every case
shows only what it changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from poproxy import config
from poproxy.config import (
    Address,
    Backend,
    CertificateFiles,
    Config,
    ConfigError,
    Limits,
    Listener,
    LogSettings,
    TlsSettings,
)

SOURCE = "test.yaml"
ANY_IPV4 = "0.0.0.0"  # noqa: S104 - only parsed here, never bound

MINIMAL = """\
listeners:
  - name: pop3s
    listen: "127.0.0.1:995"
    tls: implicit
tls:
  certificates:
    - cert: tls.crt
      key: tls.key
backends:
  - name: legacy
    servers: ["10.0.0.5:110"]
"""

# Two of each list, so that errors can point at index 1.
BASE: dict[str, Any] = {
    "listeners": [
        {"name": "pop3s", "listen": "0.0.0.0:995", "tls": "implicit"},
        {"name": "pop3", "listen": "0.0.0.0:110", "tls": "starttls"},
    ],
    "tls": {
        "certificates": [{"cert": "/etc/poproxy/tls.crt", "key": "/etc/poproxy/tls.key"}],
        "min_version": "1.2",
    },
    "backends": [
        {"name": "legacy", "servers": ["10.0.0.5:110", "10.0.0.6"]},
        {"name": "modern", "servers": ["[2001:db8::7]:1110"]},
    ],
    "limits": {"max_line": 8192},
    "log": {"level": "info"},
}

Key = str | int
Path_ = tuple[Key, ...]


# --- helpers ----------------------------------------------------------------


def parse(text: str) -> Config:
    return config.parse(text, source=SOURCE, base=Path("/base"))


def dump(document: object) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def _parent(document: dict[str, Any], path: Path_) -> Any:
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    return node


def setting(path: Path_, value: object) -> Callable[[], dict[str, Any]]:
    """The base document with the value at `path` replaced (or added)."""

    def build() -> dict[str, Any]:
        document = copy.deepcopy(BASE)
        _parent(document, path)[path[-1]] = value
        return document

    return build


def removing(path: Path_) -> Callable[[], dict[str, Any]]:
    """The base document without the key at `path`."""

    def build() -> dict[str, Any]:
        document = copy.deepcopy(BASE)
        del _parent(document, path)[path[-1]]
        return document

    return build


# --- valid documents ---------------------------------------------------------


class TestValid:
    def test_minimal_config_with_defaults(self) -> None:
        parsed = parse(MINIMAL)
        assert parsed == Config(
            listeners=(Listener("pop3s", Address("127.0.0.1", 995), "implicit"),),
            tls=TlsSettings(
                certificates=(
                    CertificateFiles(
                        cert=Path("/base/tls.crt"),
                        key=Path("/base/tls.key"),
                        key_path="tls.certificates[0]",
                    ),
                ),
                min_version="1.2",
            ),
            backends=(Backend("legacy", (Address("10.0.0.5", 110),)),),
            limits=Limits(),
            log=LogSettings(level="info"),
            source=SOURCE,
        )

    def test_default_values(self) -> None:
        parsed = parse(MINIMAL)
        assert parsed.limits.handshake_timeout == 10.0
        assert parsed.limits.login_timeout == 60.0
        assert parsed.limits.idle_timeout == 600.0  # RFC 1939 section 3: at least 10 minutes
        assert parsed.limits.max_line == 8192
        assert parsed.limits.max_errors == 5
        assert parsed.limits.max_auth_failures == 3
        assert parsed.limits.auth_failure_delay == 2.0
        assert parsed.limits.shutdown_grace == 30.0
        assert parsed.backends[0].connect_timeout == 5.0
        assert parsed.backends[0].reply_timeout == 30.0
        assert parsed.tls.min_version == "1.2"
        assert parsed.log.level == "info"

    def test_base_document(self) -> None:
        parsed = parse(dump(BASE))
        assert [listener.name for listener in parsed.listeners] == ["pop3s", "pop3"]
        assert parsed.listeners[1] == Listener("pop3", Address(ANY_IPV4, 110), "starttls")
        assert parsed.backends[0].servers == (Address("10.0.0.5", 110), Address("10.0.0.6", 110))
        assert parsed.backends[1].servers == (Address("2001:db8::7", 1110),)

    def test_config_is_frozen(self) -> None:
        parsed = parse(MINIMAL)
        with pytest.raises(AttributeError):
            parsed.source = "other"  # type: ignore[misc]

    def test_every_setting(self) -> None:
        document = copy.deepcopy(BASE)
        document["tls"]["min_version"] = "1.3"
        document["backends"][0]["connect_timeout"] = "2s"
        document["backends"][0]["reply_timeout"] = "1m"
        document["limits"] = {
            "handshake_timeout": "5s",
            "login_timeout": "30s",
            "idle_timeout": "15m",
            "max_line": 255,
            "max_errors": 1,
            "max_auth_failures": 10,
            "auth_failure_delay": 0,
            "shutdown_grace": "0s",
        }
        document["log"] = {"level": "debug"}
        parsed = parse(dump(document))
        assert parsed.tls.min_version == "1.3"
        assert parsed.backends[0].connect_timeout == 2.0
        assert parsed.backends[0].reply_timeout == 60.0
        assert parsed.limits == Limits(
            handshake_timeout=5.0,
            login_timeout=30.0,
            idle_timeout=900.0,
            max_line=255,
            max_errors=1,
            max_auth_failures=10,
            auth_failure_delay=0.0,
            shutdown_grace=0.0,
        )
        assert parsed.log.level == "debug"

    @pytest.mark.parametrize(
        ("value", "expected"), [(1, 1), (2, 2), (1024, 1024), ("auto", "auto")]
    )
    def test_workers(self, value: object, expected: object) -> None:
        assert parse(dump(setting(("workers",), value)())).workers == expected

    def test_one_worker_by_default(self) -> None:
        assert parse(MINIMAL).workers == 1

    def test_empty_limits_and_log_mappings(self) -> None:
        document = copy.deepcopy(BASE)
        document["limits"] = {}
        document["log"] = {}
        parsed = parse(dump(document))
        assert parsed.limits == Limits()
        assert parsed.log == LogSettings()

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:995", Address("127.0.0.1", 995)),
            ("0.0.0.0:0", Address(ANY_IPV4, 0)),  # port 0: any free port (tests)
            ("localhost:110", Address("localhost", 110)),
            ("mail.example.com:65535", Address("mail.example.com", 65535)),
            ("[::]:995", Address("::", 995)),
            ("[::1]:110", Address("::1", 110)),
            ("[2001:db8::1]:995", Address("2001:db8::1", 995)),
        ],
    )
    def test_listen_address(self, text: str, expected: Address) -> None:
        parsed = parse(dump(setting(("listeners", 0, "listen"), text)()))
        assert parsed.listeners[0].listen == expected

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("10.0.0.5", Address("10.0.0.5", 110)),
            ("pop.internal", Address("pop.internal", 110)),
            ("[2001:db8::5]", Address("2001:db8::5", 110)),
            ("10.0.0.5:1110", Address("10.0.0.5", 1110)),
        ],
    )
    def test_backend_server_default_port_is_110(self, text: str, expected: Address) -> None:
        parsed = parse(dump(setting(("backends", 0, "servers"), [text])()))
        assert parsed.backends[0].servers == (expected,)

    def test_address_str(self) -> None:
        assert str(Address("::1", 995)) == "[::1]:995"
        assert str(Address("127.0.0.1", 110)) == "127.0.0.1:110"

    def test_default_source_name(self) -> None:
        with pytest.raises(ConfigError, match=r"^<config>: listeners: required key is missing$"):
            config.parse("")


# --- durations ------------------------------------------------------------------


class TestDurations:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("30s", 30.0),
            ("10m", 600.0),
            ("500ms", 0.5),
            ("1h", 3600.0),
            ("2.5s", 2.5),
            ("1.5m", 90.0),
            ("45", 45.0),
            (45, 45.0),
            (1.5, 1.5),
            (" 30s ", 30.0),
        ],
    )
    def test_duration(self, value: object, seconds: float) -> None:
        parsed = parse(dump(setting(("limits", "login_timeout"), value)()))
        assert parsed.limits.login_timeout == seconds

    @pytest.mark.parametrize(
        "key",
        [
            "handshake_timeout",
            "login_timeout",
            "idle_timeout",
            "auth_failure_delay",
            "shutdown_grace",
        ],
    )
    def test_every_limits_duration(self, key: str) -> None:
        parsed = parse(dump(setting(("limits", key), "500ms")()))
        assert getattr(parsed.limits, key) == 0.5

    @pytest.mark.parametrize("key", ["connect_timeout", "reply_timeout"])
    def test_every_backend_duration(self, key: str) -> None:
        parsed = parse(dump(setting(("backends", 1, key), "10m")()))
        assert getattr(parsed.backends[1], key) == 600.0

    @pytest.mark.parametrize("key", ["auth_failure_delay", "shutdown_grace"])
    def test_zero_allowed_where_it_means_none(self, key: str) -> None:
        parsed = parse(dump(setting(("limits", key), "0s")()))
        assert getattr(parsed.limits, key) == 0.0


# --- errors -------------------------------------------------------------------

LISTENER_KEYS = (
    "(expected one of: implicit_tls_window, listen, name, plaintext_hint_after, proxy_protocol,"
    " tls)"
)
LIMITS_KEYS = (
    "(expected one of: auth_failure_delay, auth_penalty_max, handshake_timeout, idle_timeout, "
    "login_timeout, max_auth_failures, max_connections, max_connections_per_ip, max_errors, "
    "max_line, shutdown_grace, trusted_networks)"
)
DURATION_HINT = "(use e.g. 30s, 10m, 500ms)"
NAME_HINT = "(letters, digits, '_', '.', '-')"

ERRORS: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    # Unknown keys, at every level.
    (
        "unknown top-level key",
        setting(("listener",), []),
        "test.yaml: listener: unknown key"
        " (expected one of: auth_http, backends, group, limits, listeners, log, metrics, routes,"
        " tls, user, workers)",
    ),
    (
        "unknown listener key",
        setting(("listeners", 0, "tlss"), "implicit"),
        f"test.yaml: listeners[0].tlss: unknown key {LISTENER_KEYS}",
    ),
    (
        "unknown key in the second listener",
        setting(("listeners", 1, "port"), 110),
        f"test.yaml: listeners[1].port: unknown key {LISTENER_KEYS}",
    ),
    (
        "unknown tls key",
        setting(("tls", "ciphers"), "HIGH"),
        "test.yaml: tls.ciphers: unknown key"
        " (expected one of: alpn, certificates, min_version, reload_interval, sni)",
    ),
    (
        "unknown certificate key",
        setting(("tls", "certificates", 0, "chain"), "x.pem"),
        "test.yaml: tls.certificates[0].chain: unknown key (expected one of: cert, key)",
    ),
    (
        "unknown backend key",
        setting(("backends", 1, "server"), "10.0.0.1"),
        "test.yaml: backends[1].server: unknown key "
        "(expected one of: balance, ca, connect_timeout, health_check, name, proxy_protocol,"
        " reply_timeout, server_name, servers, tls, xclient)",
    ),
    (
        "unknown limits key",
        setting(("limits", "max_lines"), 1000),
        f"test.yaml: limits.max_lines: unknown key {LIMITS_KEYS}",
    ),
    (
        "unknown log key",
        setting(("log", "levle"), "debug"),
        "test.yaml: log.levle: unknown key (expected one of: format, level, user)",
    ),
    # Missing required keys.
    (
        "missing listeners",
        removing(("listeners",)),
        "test.yaml: listeners: required key is missing",
    ),
    ("missing tls", removing(("tls",)), "test.yaml: tls: required key is missing"),
    ("missing backends", removing(("backends",)), "test.yaml: backends: required key is missing"),
    (
        "missing listener name",
        removing(("listeners", 0, "name")),
        "test.yaml: listeners[0].name: required key is missing",
    ),
    (
        "missing listen",
        removing(("listeners", 1, "listen")),
        "test.yaml: listeners[1].listen: required key is missing",
    ),
    (
        "missing listener tls",
        removing(("listeners", 1, "tls")),
        "test.yaml: listeners[1].tls: required key is missing",
    ),
    (
        "missing certificates",
        removing(("tls", "certificates")),
        "test.yaml: tls.certificates: required key is missing",
    ),
    (
        "missing certificate key",
        removing(("tls", "certificates", 0, "key")),
        "test.yaml: tls.certificates[0].key: required key is missing",
    ),
    (
        "missing backend servers",
        removing(("backends", 1, "servers")),
        "test.yaml: backends[1].servers: required key is missing",
    ),
    # Addresses.
    (
        "listen port out of range",
        setting(("listeners", 1, "listen"), "0.0.0.0:99999"),
        "test.yaml: listeners[1].listen: port 99999 out of range",
    ),
    (
        "listen port one past the end",
        setting(("listeners", 0, "listen"), "0.0.0.0:65536"),
        "test.yaml: listeners[0].listen: port 65536 out of range",
    ),
    (
        "backend port out of range",
        setting(("backends", 1, "servers"), ["10.0.0.1:110", "10.0.0.2:70000"]),
        "test.yaml: backends[1].servers[1]: port 70000 out of range",
    ),
    (
        "negative port",
        setting(("listeners", 0, "listen"), "0.0.0.0:-1"),
        "test.yaml: listeners[0].listen: invalid port '-1'",
    ),
    (
        "bracketed IPv6 port out of range",
        setting(("listeners", 0, "listen"), "[::1]:99999"),
        "test.yaml: listeners[0].listen: port 99999 out of range",
    ),
    (
        "IPv6 without brackets",
        setting(("listeners", 0, "listen"), "::1:995"),
        "test.yaml: listeners[0].listen: IPv6 address '::1:995' needs brackets: [::1:995]:port",
    ),
    (
        "IPv6 backend without brackets",
        setting(("backends", 1, "servers"), ["2001:db8::7"]),
        "test.yaml: backends[1].servers[0]: IPv6 address '2001:db8::7' needs brackets: "
        "[2001:db8::7]:port",
    ),
    (
        "listener without a port",
        setting(("listeners", 0, "listen"), "127.0.0.1"),
        "test.yaml: listeners[0].listen: '127.0.0.1' has no port (use host:port)",
    ),
    (
        "bracketed listener without a port",
        setting(("listeners", 0, "listen"), "[::1]"),
        "test.yaml: listeners[0].listen: '[::1]' has no port (use host:port)",
    ),
    (
        "invalid host",
        setting(("listeners", 0, "listen"), "bad_host!:995"),
        "test.yaml: listeners[0].listen: invalid host 'bad_host!'",
    ),
    (
        "empty host",
        setting(("listeners", 0, "listen"), ":995"),
        "test.yaml: listeners[0].listen: invalid host ''",
    ),
    (
        "listen not a string",
        setting(("listeners", 0, "listen"), 995),
        "test.yaml: listeners[0].listen: expected a non-empty string",
    ),
    # Durations.
    (
        "duration with a word unit",
        setting(("limits", "login_timeout"), "30 seconds"),
        f"test.yaml: limits.login_timeout: invalid duration '30 seconds' {DURATION_HINT}",
    ),
    (
        "duration with an unknown unit",
        setting(("limits", "idle_timeout"), "10d"),
        f"test.yaml: limits.idle_timeout: invalid duration '10d' {DURATION_HINT}",
    ),
    (
        "negative duration",
        setting(("limits", "handshake_timeout"), "-5s"),
        f"test.yaml: limits.handshake_timeout: invalid duration '-5s' {DURATION_HINT}",
    ),
    (
        "boolean duration",
        setting(("limits", "login_timeout"), True),
        f"test.yaml: limits.login_timeout: invalid duration True {DURATION_HINT}",
    ),
    (
        "list as a duration",
        setting(("limits", "login_timeout"), [30]),
        f"test.yaml: limits.login_timeout: invalid duration [30] {DURATION_HINT}",
    ),
    (
        "upper-case unit",
        setting(("limits", "login_timeout"), "30S"),
        f"test.yaml: limits.login_timeout: invalid duration '30S' {DURATION_HINT}",
    ),
    (
        "zero timeout",
        setting(("limits", "login_timeout"), "0s"),
        "test.yaml: limits.login_timeout: must be more than zero",
    ),
    (
        "bad backend duration",
        setting(("backends", 1, "connect_timeout"), "soon"),
        f"test.yaml: backends[1].connect_timeout: invalid duration 'soon' {DURATION_HINT}",
    ),
    # Choices.
    (
        "bad listener tls",
        setting(("listeners", 1, "tls"), "yes"),
        "test.yaml: listeners[1].tls: must be one of implicit, starttls (got 'yes')",
    ),
    (
        "listener tls is case-sensitive",
        setting(("listeners", 0, "tls"), "STARTTLS"),
        "test.yaml: listeners[0].tls: must be one of implicit, starttls (got 'STARTTLS')",
    ),
    (
        "YAML boolean as listener tls",
        setting(("listeners", 0, "tls"), True),
        "test.yaml: listeners[0].tls: must be one of implicit, starttls (got True)",
    ),
    (
        "bad min_version",
        setting(("tls", "min_version"), "1.1"),
        "test.yaml: tls.min_version: must be one of 1.2, 1.3 (got '1.1')",
    ),
    (
        "bad log level",
        setting(("log", "level"), "verbose"),
        "test.yaml: log.level: must be one of debug, info, warning, error (got 'verbose')",
    ),
    # Names.
    (
        "duplicate listener names",
        setting(("listeners", 1, "name"), "pop3s"),
        "test.yaml: listeners[1]: duplicate name 'pop3s'",
    ),
    (
        "duplicate backend names",
        setting(("backends", 1, "name"), "legacy"),
        "test.yaml: backends[1]: duplicate name 'legacy'",
    ),
    (
        "name with a space",
        setting(("listeners", 0, "name"), "pop 3"),
        f"test.yaml: listeners[0].name: invalid name 'pop 3' {NAME_HINT}",
    ),
    (
        "empty name",
        setting(("backends", 0, "name"), ""),
        "test.yaml: backends[0].name: expected a non-empty string",
    ),
    (
        "number as a name",
        setting(("listeners", 0, "name"), 110),
        "test.yaml: listeners[0].name: expected a non-empty string",
    ),
    # Empty lists.
    (
        "no listeners",
        setting(("listeners",), []),
        "test.yaml: listeners: at least one listener is needed",
    ),
    (
        "no backends",
        setting(("backends",), []),
        "test.yaml: backends: at least one backend is needed",
    ),
    (
        "no certificates",
        setting(("tls", "certificates"), []),
        "test.yaml: tls.certificates: at least one certificate is needed",
    ),
    (
        "no backend servers",
        setting(("backends", 1, "servers"), []),
        "test.yaml: backends[1].servers: at least one server is needed",
    ),
    # Integers.
    (
        "max_line below 255",
        setting(("limits", "max_line"), 254),
        "test.yaml: limits.max_line: 254 out of range (255-1048576)",
    ),
    (
        "max_line above 1 MiB",
        setting(("limits", "max_line"), (1 << 20) + 1),
        "test.yaml: limits.max_line: 1048577 out of range (255-1048576)",
    ),
    (
        "max_line as a string",
        setting(("limits", "max_line"), "8192"),
        "test.yaml: limits.max_line: expected an integer",
    ),
    (
        "max_line as a boolean",
        setting(("limits", "max_line"), True),
        "test.yaml: limits.max_line: expected an integer",
    ),
    (
        "zero max_errors",
        setting(("limits", "max_errors"), 0),
        "test.yaml: limits.max_errors: 0 out of range (1-2147483648)",
    ),
    (
        "zero max_auth_failures",
        setting(("limits", "max_auth_failures"), 0),
        "test.yaml: limits.max_auth_failures: 0 out of range (1-2147483648)",
    ),
    # Wrong shapes.
    (
        "listeners not a list",
        setting(("listeners",), {"name": "pop3"}),
        "test.yaml: listeners: expected a list",
    ),
    (
        "listener not a mapping",
        setting(("listeners", 1), "0.0.0.0:110"),
        "test.yaml: listeners[1]: expected a mapping of keys",
    ),
    ("tls not a mapping", setting(("tls",), ["x"]), "test.yaml: tls: expected a mapping of keys"),
    (
        "servers not a list",
        setting(("backends", 0, "servers"), "10.0.0.5:110"),
        "test.yaml: backends[0].servers: expected a list",
    ),
    ("empty limits", setting(("limits",), None), "test.yaml: limits: expected a mapping of keys"),
    # Workers: a positive integer or auto.
    ("zero workers", setting(("workers",), 0), "test.yaml: workers: 0 out of range (1-1024)"),
    ("negative workers", setting(("workers",), -1), "test.yaml: workers: -1 out of range (1-1024)"),
    (
        "too many workers",
        setting(("workers",), 1025),
        "test.yaml: workers: 1025 out of range (1-1024)",
    ),
    (
        "workers as a word",
        setting(("workers",), "x"),
        "test.yaml: workers: expected an integer or auto (got 'x')",
    ),
    (
        "workers as a quoted number",
        setting(("workers",), "2"),
        "test.yaml: workers: expected an integer or auto (got '2')",
    ),
    (
        "workers as a boolean",
        setting(("workers",), True),
        "test.yaml: workers: expected an integer or auto (got True)",
    ),
    (
        "workers as a fraction",
        setting(("workers",), 1.5),
        "test.yaml: workers: expected an integer or auto (got 1.5)",
    ),
    (
        "workers: Auto",
        setting(("workers",), "Auto"),
        "test.yaml: workers: expected an integer or auto (got 'Auto')",
    ),
    (
        "workers left empty",
        setting(("workers",), None),
        "test.yaml: workers: expected an integer or auto (got None)",
    ),
]


class TestErrors:
    @pytest.mark.parametrize(
        ("build", "message"),
        [pytest.param(build, message, id=name) for name, build, message in ERRORS],
    )
    def test_error_names_file_and_key_path(
        self, build: Callable[[], dict[str, Any]], message: str
    ) -> None:
        assert error_of(dump(build())) == message

    def test_error_is_one_line(self) -> None:
        for _, build, _message in ERRORS:
            assert "\n" not in error_of(dump(build()))

    def test_bad_yaml_names_the_line(self) -> None:
        text = "listeners:\n  - name: pop3\n    tls: implicit x: y\n"
        assert error_of(text) == "test.yaml: mapping values are not allowed here (line 3)"

    @pytest.mark.parametrize(
        "text",
        ["listeners: [\n", 'listeners:\n  - name: "pop3\n', "a: b\n\tc: d\n", "{a: 1\n"],
    )
    def test_bad_yaml_syntax(self, text: str) -> None:
        message = error_of(text)
        assert message.startswith("test.yaml: ")
        assert "(line " in message
        assert "\n" not in message

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n", "[]\n"])
    def test_document_not_a_mapping(self, text: str) -> None:
        assert error_of(text) == "test.yaml: expected a mapping of keys"

    @pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
    def test_empty_document(self, text: str) -> None:
        assert error_of(text) == "test.yaml: listeners: required key is missing"

    def test_unquoted_min_version_is_read_as_the_version(self) -> None:
        # YAML reads an unquoted 1.3 as a number; it means the version all the same.
        parsed = parse(dump(BASE).replace("min_version: '1.2'", "min_version: 1.3"))
        assert parsed.tls.min_version == "1.3"


# --- files --------------------------------------------------------------------


class TestLoad:
    def test_relative_certificate_paths_resolve_against_the_config_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        directory = tmp_path / "etc" / "poproxy"
        directory.mkdir(parents=True)
        path = directory / "poproxy.yaml"
        path.write_text(MINIMAL.replace("cert: tls.crt", "cert: tls/tls.crt"), encoding="utf-8")
        # The working directory must not matter.
        monkeypatch.chdir(tmp_path)
        parsed = config.load(path)
        assert parsed.tls.certificates[0].cert == directory / "tls" / "tls.crt"
        assert parsed.tls.certificates[0].key == directory / "tls.key"
        assert parsed.source == str(path)

    def test_absolute_certificate_paths_are_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "poproxy.yaml"
        path.write_text(dump(BASE), encoding="utf-8")
        parsed = config.load(path)
        assert parsed.tls.certificates[0].cert == Path("/etc/poproxy/tls.crt")
        assert parsed.tls.certificates[0].key == Path("/etc/poproxy/tls.key")

    def test_parse_without_base_uses_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        parsed = config.parse(MINIMAL, source=SOURCE)
        assert parsed.tls.certificates[0].cert == tmp_path / "tls.crt"

    def test_error_names_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "poproxy.yaml"
        path.write_text(dump(setting(("listeners", 1, "listen"), "0.0.0.0:99999")()))
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert str(info.value) == f"{path}: listeners[1].listen: port 99999 out of range"

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert str(info.value) == f"{path}: cannot read: No such file or directory"

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.yaml"
        path.write_bytes(MINIMAL.replace("legacy", "l\xe9gacy").encode("latin-1"))
        with pytest.raises(ConfigError) as info:
            config.load(path)
        assert str(info.value) == f"{path}: not UTF-8 text"


# --- bugs -----------------------------------------------------------------------


class TestHardening:
    """Inputs that once slipped through validation."""

    def test_non_ascii_digit_port_is_a_config_error(self) -> None:
        text = dump(setting(("listeners", 0, "listen"), "127.0.0.1:\u00b2")())
        assert error_of(text) == "test.yaml: listeners[0].listen: invalid port '\u00b2'"

    def test_name_with_trailing_newline_is_refused(self) -> None:
        text = dump(setting(("listeners", 0, "name"), "pop3s\n")())
        assert error_of(text) == (
            f"test.yaml: listeners[0].name: invalid name 'pop3s\\n' {NAME_HINT}"
        )

    def test_host_with_trailing_newline_is_refused(self) -> None:
        text = dump(setting(("backends", 0, "servers", 0), "mail\n:110")())
        assert error_of(text) == "test.yaml: backends[0].servers[0]: invalid host 'mail\\n'"
