"""poproxy's configuration: YAML in, frozen dataclasses out, validated once.

Owns: the schema, defaults, and every validation message; each error names
the file and the key path (`poproxy.yaml: listeners[1].listen: port 99999 out
of range`). Must never open sockets, build SSLContexts or read certificates:
that is `tls.py`'s and `server.py`'s work, done after the config is valid.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

import yaml

from poproxy.auth_http import AuthHttpSettings
from poproxy.routing import Route, RouteKind, check_rewrite_user, compile_route_pattern

SECONDS = 1.0
MINUTES = 60 * SECONDS


class ConfigError(Exception):
    """The configuration is invalid; the message is one line fit for the operator."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class InboundProxyProtocol:
    """A PROXY protocol header is required first, from these networks only."""

    trusted: tuple[str, ...]
    timeout: float = 3 * SECONDS  # the spec asks for at least 3 s (a TCP retransmit)


@dataclass(frozen=True)
class Listener:
    name: str
    listen: Address
    tls: Literal["implicit", "starttls"]
    proxy_protocol: InboundProxyProtocol | None = None
    # implicit: no ClientHello this long after connect means a plaintext
    # client waiting for a greeting; it is told to turn TLS on. 0 turns it off.
    plaintext_hint_after: float = 2 * SECONDS
    # starttls: a ClientHello this soon after connect, before the greeting,
    # means a client set to TLS on this port; it is served as implicit TLS.
    # Plaintext clients get their greeting this much later. 0 turns it off.
    implicit_tls_window: float = 0.2 * SECONDS


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path
    key_path: str  # where in the config it was given, for error messages


@dataclass(frozen=True)
class TlsSettings:
    certificates: tuple[CertificateFiles, ...]
    min_version: Literal["1.2", "1.3"] = "1.2"
    reload_interval: float = 30 * SECONDS  # 0: only on SIGHUP
    alpn: Literal["strict", "lenient"] = "strict"
    sni: Literal["strict", "lenient"] = "lenient"


@dataclass(frozen=True)
class HealthCheck:
    """Active checks: connect, +OK greeting, CAPA, QUIT (nothing is opened)."""

    interval: float = 5 * SECONDS
    timeout: float = 2 * SECONDS
    rise: int = 2  # consecutive good checks before a down server is up again
    fall: int = 2  # consecutive bad checks before an up server is down


@dataclass(frozen=True)
class Backend:
    name: str
    servers: tuple[Address, ...]
    connect_timeout: float = 5 * SECONDS
    reply_timeout: float = 30 * SECONDS
    weights: tuple[int, ...] = ()  # one per server; empty means all 1
    balance: Literal["round_robin", "least_connections", "user_hash"] = "round_robin"
    health_check: HealthCheck | None = None  # None: passive health only
    proxy_protocol: Literal["off", "v1", "v2"] = "off"
    xclient: Literal["auto", "off"] = "auto"
    tls: Literal["off", "implicit", "starttls"] = "off"
    ca: Path | None = None  # verify the backend's certificate with this CA file
    server_name: str | None = None  # the name to verify; default: the server's host

    def weight(self, index: int) -> int:
        return self.weights[index] if self.weights else 1


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = 10 * SECONDS
    login_timeout: float = 60 * SECONDS  # from connect until the backend accepts the login
    idle_timeout: float = 10 * MINUTES  # RFC 1939 section 3: at least 10 minutes
    max_line: int = 8192
    max_errors: int = 5
    max_auth_failures: int = 3
    auth_failure_delay: float = 2 * SECONDS  # the first failure from an address
    auth_penalty_max: float = 15 * SECONDS  # repeated failures double the delay up to this
    shutdown_grace: float = 30 * SECONDS
    max_connections: int = 10_000
    max_connections_per_ip: int = 100  # an IPv6 /64 counts as one address
    trusted_networks: tuple[str, ...] = ()  # no per-address cap or penalty growth


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"
    user: Literal["plain", "hash", "omit"] = "plain"  # how session lines show user names


@dataclass(frozen=True)
class MetricsSettings:
    listen: Address  # /metrics, /healthz, /readyz


@dataclass(frozen=True)
class Config:
    listeners: tuple[Listener, ...]
    tls: TlsSettings
    backends: tuple[Backend, ...]
    limits: Limits = field(default_factory=Limits)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings | None = None
    routes: tuple[Route, ...] = ()  # first match wins; no match: the first backend
    auth_http: AuthHttpSettings | None = None  # replaces routes when set
    user: str | None = None  # started as root: drop to this user after binding
    group: str | None = None
    # Processes that serve clients; "auto": one per CPU this process may run
    # on. With more than one, a supervisor binds and restarts them (workers.py).
    workers: int | Literal["auto"] = 1
    source: str = "<config>"


def load(path: Path) -> Config:
    """Read and validate a YAML file; raise ConfigError with a one-line reason."""
    return parse(read(path), source=str(path), base=path.parent)


def read(path: Path) -> str:
    """The text of a configuration file (`load` without the validation)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def parse(text: str, *, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate YAML text; relative certificate paths are taken from `base`."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: {problem}{where}") from None
    root = _Node(source, "", document if document is not None else {})
    return _config(root, base or Path.cwd())


# --- Schema -----------------------------------------------------------------


def _config(root: _Node, base: Path) -> Config:
    mapping = root.mapping(
        {
            "listeners",
            "tls",
            "backends",
            "limits",
            "log",
            "metrics",
            "routes",
            "auth_http",
            "user",
            "group",
            "workers",
        }
    )
    listeners = tuple(_listener(item) for item in mapping.required("listeners").sequence())
    if not listeners:
        mapping.required("listeners").fail("at least one listener is needed")
    _unique(mapping.required("listeners"), [listener.name for listener in listeners])
    backends = tuple(_backend(item, base) for item in mapping.required("backends").sequence())
    if not backends:
        mapping.required("backends").fail("at least one backend is needed")
    _unique(mapping.required("backends"), [backend.name for backend in backends])
    if mapping.optional("routes").present and mapping.optional("auth_http").present:
        mapping.optional("auth_http").fail("routes and auth_http exclude each other: keep one")
    return Config(
        listeners=listeners,
        tls=_tls(mapping.required("tls"), base),
        backends=backends,
        limits=_limits(mapping.optional("limits")),
        log=_log(mapping.optional("log")),
        metrics=_metrics(mapping.optional("metrics")),
        routes=_routes(mapping.optional("routes"), base, [backend.name for backend in backends]),
        auth_http=_auth_http(mapping.optional("auth_http")),
        user=_account(mapping.optional("user")),
        group=_account(mapping.optional("group")),
        workers=_workers(mapping.optional("workers")),
        source=root.source,
    )


def _listener(node: _Node) -> Listener:
    mapping = node.mapping(
        {"name", "listen", "tls", "plaintext_hint_after", "implicit_tls_window", "proxy_protocol"}
    )
    defaults = Listener("", Address("", 0), "implicit")
    return Listener(
        name=mapping.required("name").name(),
        listen=mapping.required("listen").address(default_port=None),
        tls=cast(
            Literal["implicit", "starttls"],
            mapping.required("tls").choice(("implicit", "starttls")),
        ),
        plaintext_hint_after=mapping.optional("plaintext_hint_after").duration(
            defaults.plaintext_hint_after, allow_zero=True
        ),
        implicit_tls_window=mapping.optional("implicit_tls_window").duration(
            defaults.implicit_tls_window, allow_zero=True
        ),
        proxy_protocol=_inbound_proxy_protocol(mapping.optional("proxy_protocol")),
    )


def _inbound_proxy_protocol(node: _Node) -> InboundProxyProtocol | None:
    if not node.present:
        return None
    mapping = node.mapping({"trusted", "timeout"})
    trusted = _networks(mapping.required("trusted"))
    if not trusted:
        mapping.required("trusted").fail("at least one network is needed")
    defaults = InboundProxyProtocol(trusted=())
    return InboundProxyProtocol(
        trusted=trusted,
        timeout=mapping.optional("timeout").duration(defaults.timeout),
    )


def _tls(node: _Node, base: Path) -> TlsSettings:
    mapping = node.mapping({"certificates", "min_version", "reload_interval", "alpn", "sni"})
    certificates = tuple(
        _certificate(item, base) for item in mapping.required("certificates").sequence()
    )
    if not certificates:
        mapping.required("certificates").fail("at least one certificate is needed")
    defaults = TlsSettings(certificates=())

    return TlsSettings(
        certificates=certificates,
        min_version=mapping.choice("min_version", ("1.2", "1.3"), defaults.min_version),
        reload_interval=mapping.optional("reload_interval").duration(
            defaults.reload_interval, allow_zero=True
        ),
        alpn=mapping.choice("alpn", ("strict", "lenient"), defaults.alpn),
        sni=mapping.choice("sni", ("strict", "lenient"), defaults.sni),
    )


def _certificate(node: _Node, base: Path) -> CertificateFiles:
    mapping = node.mapping({"cert", "key"})
    return CertificateFiles(
        cert=base / mapping.required("cert").string(),
        key=base / mapping.required("key").string(),
        key_path=node.path,
    )


def _backend(node: _Node, base: Path) -> Backend:
    mapping = node.mapping(
        {
            "name",
            "servers",
            "connect_timeout",
            "reply_timeout",
            "balance",
            "health_check",
            "proxy_protocol",
            "xclient",
            "tls",
            "ca",
            "server_name",
        }
    )
    servers: list[Address] = []
    weights: list[int] = []
    for item in mapping.required("servers").sequence():
        if isinstance(item.value, dict):
            server = item.mapping({"address", "weight"})
            servers.append(server.required("address").address(default_port=110))
            weights.append(server.optional("weight").integer(1, low=1, high=1000))
        else:
            servers.append(item.address(default_port=110))
            weights.append(1)
    if not servers:
        mapping.required("servers").fail("at least one server is needed")
    defaults = Backend(name="", servers=())

    tls = mapping.choice("tls", ("off", "implicit", "starttls"), defaults.tls)
    ca = mapping.optional("ca")
    server_name = mapping.optional("server_name")
    if tls == "off" and (ca.present or server_name.present):
        (ca if ca.present else server_name).fail("only meaningful with tls: implicit or starttls")
    return Backend(
        name=mapping.required("name").name(),
        servers=tuple(servers),
        connect_timeout=mapping.optional("connect_timeout").duration(defaults.connect_timeout),
        reply_timeout=mapping.optional("reply_timeout").duration(defaults.reply_timeout),
        weights=tuple(weights) if any(weight != 1 for weight in weights) else (),
        balance=mapping.choice(
            "balance", ("round_robin", "least_connections", "user_hash"), defaults.balance
        ),
        health_check=_health_check(mapping.optional("health_check")),
        proxy_protocol=mapping.choice(
            "proxy_protocol", ("off", "v1", "v2"), defaults.proxy_protocol
        ),
        xclient=mapping.choice("xclient", ("auto", "off"), defaults.xclient),
        tls=tls,
        ca=base / ca.string() if ca.present else None,
        server_name=server_name.string() if server_name.present else None,
    )


def _health_check(node: _Node) -> HealthCheck | None:
    if not node.present:
        return None
    defaults = HealthCheck()
    if node.value is None:
        return defaults  # `health_check:` alone turns the defaults on
    mapping = node.mapping({"interval", "timeout", "rise", "fall"})
    return HealthCheck(
        interval=mapping.optional("interval").duration(defaults.interval),
        timeout=mapping.optional("timeout").duration(defaults.timeout),
        rise=mapping.optional("rise").integer(defaults.rise, low=1, high=100),
        fall=mapping.optional("fall").integer(defaults.fall, low=1, high=100),
    )


def _limits(node: _Node) -> Limits:
    defaults = Limits()
    if not node.present:
        return defaults
    mapping = node.mapping(
        {
            "handshake_timeout",
            "login_timeout",
            "idle_timeout",
            "max_line",
            "max_errors",
            "max_auth_failures",
            "auth_failure_delay",
            "auth_penalty_max",
            "shutdown_grace",
            "max_connections",
            "max_connections_per_ip",
            "trusted_networks",
        }
    )
    return Limits(
        handshake_timeout=mapping.optional("handshake_timeout").duration(
            defaults.handshake_timeout
        ),
        login_timeout=mapping.optional("login_timeout").duration(defaults.login_timeout),
        idle_timeout=mapping.optional("idle_timeout").duration(defaults.idle_timeout),
        # RFC 2449 section 4: 255 octets is the least a CAPA server must take.
        max_line=mapping.optional("max_line").integer(defaults.max_line, low=255, high=1 << 20),
        max_errors=mapping.optional("max_errors").integer(defaults.max_errors, low=1),
        max_auth_failures=mapping.optional("max_auth_failures").integer(
            defaults.max_auth_failures, low=1
        ),
        auth_failure_delay=mapping.optional("auth_failure_delay").duration(
            defaults.auth_failure_delay, allow_zero=True
        ),
        auth_penalty_max=mapping.optional("auth_penalty_max").duration(
            defaults.auth_penalty_max, allow_zero=True
        ),
        shutdown_grace=mapping.optional("shutdown_grace").duration(
            defaults.shutdown_grace, allow_zero=True
        ),
        max_connections=mapping.optional("max_connections").integer(
            defaults.max_connections, low=1
        ),
        max_connections_per_ip=mapping.optional("max_connections_per_ip").integer(
            defaults.max_connections_per_ip, low=1
        ),
        trusted_networks=_networks(mapping.optional("trusted_networks")),
    )


def _networks(node: _Node) -> tuple[str, ...]:
    if not node.present:
        return ()
    networks = []
    for item in node.sequence():
        text = item.string()
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            item.fail(f"invalid network {text!r} (use e.g. 10.0.0.0/8 or 2001:db8::/32)")
    return tuple(networks)


_ROUTE_KINDS = ("users", "domains", "match", "map_file")


def _routes(node: _Node, base: Path, backends: list[str]) -> tuple[Route, ...]:
    if not node.present:
        return ()
    routes = []
    for item in node.sequence():
        mapping = item.mapping({*_ROUTE_KINDS, "backend", "rewrite_user"})
        kinds = [kind for kind in _ROUTE_KINDS if mapping.optional(kind).present]
        if len(kinds) != 1:
            item.fail(f"give exactly one of: {', '.join(_ROUTE_KINDS)}")
        kind = kinds[0]
        given = mapping.optional(kind)
        values = pattern = map_file = None
        if kind in ("users", "domains"):
            values = tuple(entry.string() for entry in given.sequence())
            if not values:
                given.fail("at least one entry is needed")
        elif kind == "match":
            pattern = given.string()
            try:
                compile_route_pattern(pattern)
            except ValueError as exc:
                given.fail(str(exc))
        else:
            map_file = base / given.string()
        backend_node = mapping.optional("backend")
        backend = backend_node.string() if backend_node.present else None
        if backend is None and kind != "map_file":
            mapping.required("backend")
        if backend is not None and backend not in backends:
            backend_node.fail(f"unknown backend {backend!r} (backends: {', '.join(backends)})")
        rewrite_node = mapping.optional("rewrite_user")
        rewrite = rewrite_node.string() if rewrite_node.present else "none"
        try:
            check_rewrite_user(rewrite)
            routes.append(
                Route(
                    kind=cast(RouteKind, kind),
                    values=values,
                    pattern=pattern,
                    map_file=map_file,
                    backend=backend,
                    rewrite_user=rewrite,
                )
            )
        except ValueError as exc:
            (rewrite_node if rewrite_node.present else item).fail(str(exc))
    return tuple(routes)


def _auth_http(node: _Node) -> AuthHttpSettings | None:
    if not node.present:
        return None
    mapping = node.mapping({"url", "timeout"})
    url = mapping.required("url")
    try:
        return AuthHttpSettings(
            url=url.string(), timeout=mapping.optional("timeout").duration(5 * SECONDS)
        )
    except ValueError as exc:
        url.fail(str(exc).removeprefix("auth_http: "))


def _account(node: _Node) -> str | None:
    if not node.present:
        return None
    value = node.string()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", value):
        node.fail(f"invalid user or group name {value!r}")
    return value


MAX_WORKERS = 1024  # more is a typo, not a machine


def _workers(node: _Node) -> int | Literal["auto"]:
    if node.value == "auto":
        return "auto"
    if node.present and (not isinstance(node.value, int) or isinstance(node.value, bool)):
        node.fail(f"expected an integer or auto (got {node.value!r})")
    return node.integer(1, low=1, high=MAX_WORKERS)


def _log(node: _Node) -> LogSettings:
    defaults = LogSettings()
    if not node.present:
        return defaults
    mapping = node.mapping({"level", "format", "user"})
    return LogSettings(
        level=mapping.choice("level", ("debug", "info", "warning", "error"), defaults.level),
        format=mapping.choice("format", ("logfmt", "json"), defaults.format),
        user=mapping.choice("user", ("plain", "hash", "omit"), defaults.user),
    )


def _metrics(node: _Node) -> MetricsSettings | None:
    if not node.present:
        return None
    mapping = node.mapping({"listen"})
    return MetricsSettings(listen=mapping.required("listen").address(default_port=None))


def _unique(node: _Node, names: list[str]) -> None:
    for index, name in enumerate(names):
        if name in names[:index]:
            node.at(index).fail(f"duplicate name {name!r}")


# --- Validation helpers ----------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": SECONDS, "m": MINUTES, "h": 60 * MINUTES, None: SECONDS}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MISSING = object()


class _Node:
    """A value at a key path inside the document, with typed accessors."""

    def __init__(self, source: str, path: str, value: Any) -> None:
        self.source = source
        self.path = path
        self.value = value

    @property
    def present(self) -> bool:
        return self.value is not _MISSING

    def fail(self, reason: str) -> NoReturn:
        where = f"{self.source}: {self.path}: " if self.path else f"{self.source}: "
        raise ConfigError(where + reason)

    def _child(self, key: str | int, value: Any) -> _Node:
        path = f"{self.path}[{key}]" if isinstance(key, int) else f"{self.path}.{key}"
        return _Node(self.source, path.lstrip("."), value)

    def mapping(self, allowed: set[str]) -> _Mapping:
        if not isinstance(self.value, dict):
            self.fail("expected a mapping of keys")
        value: dict[Any, Any] = self.value
        for key in value:
            if key not in allowed:
                self._child(str(key), None).fail(
                    f"unknown key (expected one of: {', '.join(sorted(allowed))})"
                )
        return _Mapping(self, value)

    def sequence(self) -> list[_Node]:
        if not isinstance(self.value, list):
            self.fail("expected a list")
        return [self._child(index, item) for index, item in enumerate(self.value)]

    def at(self, index: int) -> _Node:
        return self._child(index, None)

    def string(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            self.fail("expected a non-empty string")
        return self.value

    def name(self) -> str:
        value = self.string()
        if not _NAME.fullmatch(value):
            self.fail(f"invalid name {value!r} (letters, digits, '_', '.', '-')")
        return value

    def choice(self, choices: tuple[str, ...]) -> str:
        value = self.value
        if value is False and "off" in choices:
            value = "off"  # YAML 1.1 reads an unquoted `off` as false
        if isinstance(value, float | int) and not isinstance(value, bool):
            value = str(value)  # `min_version: 1.3` unquoted is a YAML number
        if value not in choices:
            self.fail(f"must be one of {', '.join(choices)} (got {value!r})")
        return cast(str, value)

    def integer(self, default: int, *, low: int = 0, high: int = 1 << 31) -> int:
        if not self.present:
            return default
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            self.fail("expected an integer")
        if not low <= self.value <= high:
            self.fail(f"{self.value} out of range ({low}-{high})")
        return self.value

    def duration(self, default: float, *, allow_zero: bool = False) -> float:
        """A duration such as `30s`, `10m`, `500ms`, `1h`, or a number of seconds."""
        if not self.present:
            return default
        text = str(self.value) if isinstance(self.value, int | float | str) else ""
        match = _DURATION.match(text.strip())
        if isinstance(self.value, bool) or not match:
            self.fail(f"invalid duration {self.value!r} (use e.g. 30s, 10m, 500ms)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds <= 0 and not allow_zero:
            self.fail("must be more than zero")
        return seconds

    def address(self, default_port: int | None) -> Address:
        """`host:port`, `[v6]:port`, or a bare host when a default port exists."""
        text = self.string().strip()
        bracketed = re.fullmatch(r"\[([^\]]+)\](?::([^:]*))?", text)
        if bracketed:
            host, port_text = bracketed.group(1), bracketed.group(2)
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif ":" in text:
            self.fail(f"IPv6 address {text!r} needs brackets: [{text}]:port")
        else:
            host, port_text = text, None
        if port_text is None:
            if default_port is None:
                self.fail(f"{text!r} has no port (use host:port)")
            port_text = str(default_port)
        if not re.fullmatch(r"[0-9]{1,5}", port_text):
            self.fail(f"invalid port {port_text!r}")
        if not 0 <= int(port_text) <= 65535:
            self.fail(f"port {port_text} out of range")
        if not host or not _valid_host(host):
            self.fail(f"invalid host {host!r}")
        return Address(host, int(port_text))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", host) is not None
    return True


class _Mapping:
    def __init__(self, node: _Node, value: Mapping[Any, Any]) -> None:
        self.node = node
        self.value = value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> Any:
        """An optional key with a fixed set of values."""
        node = self.optional(key)
        return node.choice(choices) if node.present else default

    def required(self, key: str) -> _Node:
        if key not in self.value:
            self.node._child(key, None).fail("required key is missing")
        return self.node._child(key, self.value[key])

    def optional(self, key: str) -> _Node:
        return self.node._child(key, self.value.get(key, _MISSING))
