"""Every Prometheus metric poproxy exposes, in one registry that is passed in.

Owns: metric names, help texts, label sets and their bounded values, and
starting every series that can be known up front at 0 (a series that only
appears after its first event hides the events before a scrape). Must never
use a user name, a client address or a session id as a label value: labels
come from config names and the fixed enums below. Never a module global:
tests build a fresh `Metrics` each.

With `workers` > 1 each worker process writes its values to files of
prometheus-client's multiprocess mode, and the supervisor adds them up:
counters and histograms are summed; each gauge says below how its workers'
values combine (`multiprocess_mode`; "live" leaves out workers that died).
In one process the modes change nothing.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from poproxy import __version__, config

# Seconds; sessions range from a refused scanner (ms) to a long download (minutes).
SESSION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class HandshakeResult(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # a TLS alert, garbage, or a client that went away
    TIMEOUT = "timeout"
    ALPN_REFUSED = "alpn_refused"  # ALPN offered without "pop3" (tls.alpn: strict)
    SNI_REFUSED = "sni_refused"  # a name no certificate carries (tls.sni: strict)


class LoginResult(enum.Enum):
    SUCCESS = "success"
    AUTH_FAILED = "auth_failed"  # wrong credentials ([AUTH] or no code)
    IN_USE = "in_use"  # RFC 2449 [IN-USE]
    LOGIN_DELAY = "login_delay"  # RFC 2449 [LOGIN-DELAY]
    TEMP_FAIL = "temp_fail"  # the backend said [SYS/TEMP]
    PERM_FAIL = "perm_fail"  # the backend said [SYS/PERM]
    BACKEND_UNAVAILABLE = "backend_unavailable"  # no server could be reached


class CloseReason(enum.Enum):
    """Why a session ended, one value per session."""

    QUIT = "quit"  # the client said QUIT (before login, or relayed after it)
    CLIENT_CLOSED = "client_closed"  # the client closed without QUIT
    CLIENT_RESET = "client_reset"  # the client's connection broke
    TIMEOUT = "timeout"  # login or idle timeout
    TLS_ERROR = "tls_error"  # the TLS handshake failed
    PROTOCOL_ERROR = "protocol_error"  # too many errors, or a line too long
    AUTH_FAILURES = "auth_failures"  # too many failed logins
    BACKEND_CLOSED = "backend_closed"  # the backend ended the session
    SHUTDOWN = "shutdown"  # the proxy was stopping


class Direction(enum.Enum):
    CLIENT_TO_BACKEND = "client_to_backend"
    BACKEND_TO_CLIENT = "backend_to_client"


REFUSED_COMMANDS = ("USER", "PASS", "APOP", "AUTH")
CONNECTION_CAPS = ("max_connections", "max_connections_per_ip")
PLAINTEXT_ON_TLS_PORT = "plaintext_on_tls_port"  # kinds of port mix-up
TLS_ON_STARTTLS_PORT = "tls_on_starttls_port"
CERTIFICATE_RELOAD_RESULTS = ("success", "failure")
READY_HELP = (
    "1 when every listener is bound and every backend has a usable server;"
    " 0 while starting or shutting down."
)


class Metrics:
    """The registry and every metric in it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "poproxy_connections", "Client connections accepted.", ["listener"], registry=r
        )
        self.connections_refused = Counter(
            "poproxy_connections_refused",
            "Client connections refused at accept, by the cap they hit.",
            ["listener", "reason"],
            registry=r,
        )
        self.connections_active = Gauge(
            "poproxy_connections_active",
            "Client connections open now.",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",  # every worker's connections
        )
        self.tls_handshakes = Counter(
            "poproxy_tls_handshakes",
            "TLS handshakes with clients, by outcome.",
            ["listener", "result"],
            registry=r,
        )
        self.tls_versions = Counter(
            "poproxy_tls_versions",
            "Successful TLS handshakes by negotiated protocol version.",
            ["listener", "version"],
            registry=r,
        )
        self.tls_handshake_duration = Histogram(
            "poproxy_tls_handshake_duration_seconds",
            "Time from the start of a TLS handshake to its end, successful or not.",
            ["listener"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.starttls = Counter(
            "poproxy_starttls", "STLS commands accepted (RFC 2595).", ["listener"], registry=r
        )
        self.starttls_injection = Counter(
            "poproxy_starttls_injection",
            "STLS commands with plaintext pipelined behind them, which was dropped.",
            ["listener"],
            registry=r,
        )
        self.starttls_injection_bytes = Counter(
            "poproxy_starttls_injection_bytes",
            "Bytes pipelined behind STLS and dropped.",
            ["listener"],
            registry=r,
        )
        self.port_mixups = Counter(
            "poproxy_port_mixups",
            "Clients set up for the wrong port: plaintext on a TLS port (told to turn TLS on),"
            " TLS on a STARTTLS port (served as implicit TLS).",
            ["listener", "kind"],
            registry=r,
        )
        self.plaintext_auth_refused = Counter(
            "poproxy_plaintext_auth_refused",
            "Login commands refused because TLS was not active yet.",
            ["listener", "command"],
            registry=r,
        )
        self.logins = Counter(
            "poproxy_logins",
            "Logins with complete credentials, by outcome (a backend's or auth_http's answer,"
            " or no backend reachable).",
            ["result"],
            registry=r,
        )  # fmt: skip
        self.sessions_closed = Counter(
            "poproxy_sessions_closed", "Sessions ended, by reason.", ["reason"], registry=r
        )
        self.session_duration = Histogram(
            "poproxy_session_duration_seconds",
            "Time from accepting a client connection to closing it.",
            buckets=SESSION_BUCKETS,
            registry=r,
        )
        self.relayed_bytes = Counter(
            "poproxy_relayed_bytes",
            "Bytes relayed after login, by direction.",
            ["direction"],
            registry=r,
        )
        self.backend_connect_duration = Histogram(
            "poproxy_backend_connect_duration_seconds",
            "Time to open a TCP connection to a backend server.",
            ["backend"],
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.backend_connect_failures = Counter(
            "poproxy_backend_connect_failures",
            "Backend servers that failed before answering the credentials: no connection,"
            " no +OK greeting, a timeout or a broken reply.",
            ["backend", "server"],
            registry=r,
        )
        self.backend_up = Gauge(
            "poproxy_backend_up",
            "1 if the backend server is in use: health checks (rise/fall) or, without them,"
            " the last attempt to use it decide; 0 if it is marked down.",
            ["backend", "server"],
            registry=r,
            # Each worker has its own marks: down for any worker means some
            # logins fail over or are refused, which is what the alert is for.
            multiprocess_mode="livemin",
        )
        self.certificate_expiry = Gauge(
            "poproxy_certificate_expiry_timestamp_seconds",
            "When each configured certificate expires, as a Unix time.",
            ["certificate"],
            registry=r,
            multiprocess_mode="livemin",  # a worker still on an older certificate shows
        )
        self.certificate_reloads = Counter(
            "poproxy_certificate_reloads", "Certificate reloads, by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "poproxy_ready",
            READY_HELP,
            registry=r,
            multiprocess_mode="livemin",  # ready only when every worker is
        )
        self.build_info = Gauge(
            "poproxy_build_info", "Always 1; the labels say which poproxy runs.", ["version"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.build_info.labels(__version__).set(1)
        for result in LoginResult:
            self.logins.labels(result.value)
        for reason in CloseReason:
            self.sessions_closed.labels(reason.value)
        for direction in Direction:
            self.relayed_bytes.labels(direction.value)
        for outcome in CERTIFICATE_RELOAD_RESULTS:
            self.certificate_reloads.labels(outcome)

    def configure(self, settings: config.Config) -> None:
        """Start every series whose labels the configuration names at 0."""
        for listener in settings.listeners:
            name = listener.name
            self.connections.labels(name)
            self.connections_active.labels(name)
            for cap in CONNECTION_CAPS:
                self.connections_refused.labels(name, cap)
            for handshake in HandshakeResult:
                self.tls_handshakes.labels(name, handshake.value)
            self.tls_handshake_duration.labels(name)
            self.port_mixups.labels(
                name, PLAINTEXT_ON_TLS_PORT if listener.tls == "implicit" else TLS_ON_STARTTLS_PORT
            )
            if listener.tls == "starttls":
                self.starttls.labels(name)
                self.starttls_injection.labels(name)
                self.starttls_injection_bytes.labels(name)
                for command in REFUSED_COMMANDS:
                    self.plaintext_auth_refused.labels(name, command)
        for backend in settings.backends:
            self.backend_connect_duration.labels(backend.name)
            for server in backend.servers:
                self.backend_connect_failures.labels(backend.name, str(server))
                # Until a first attempt says otherwise, a configured server counts as up.
                self.backend_up.labels(backend.name, str(server)).set(1)
