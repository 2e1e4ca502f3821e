"""Routing: which backend serves a user, and which of its servers gets a session.

Owns: the configured routes (user names, domains, a regular expression, a
map file), the rewrite of the user name sent to the backend, the map-file
tables and their reload, and the order in which a backend's servers are tried
(smooth weighted round robin, least connections, rendezvous user hash).
Must never open a socket, await, read a clock or draw random numbers: the
caller says when map files are re-read (`Router.refresh`) and which servers
are up and how busy (`Balancer.order`), so each decision follows from its
arguments and the state kept here, the same on every replica.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, get_args

RouteKind = Literal["users", "domains", "match", "map_file"]
ROUTE_KINDS: tuple[RouteKind, ...] = get_args(RouteKind)

# "none", "strip_domain" (alice@example.org -> alice), or "domain:NEW"
# (alice@example.org -> alice@NEW; a name without a domain gets "@NEW").
RewriteUser = Literal["none", "strip_domain"] | str
DOMAIN_REWRITE_PREFIX = "domain:"

Balance = Literal["round_robin", "least_connections", "user_hash"]
BALANCE_METHODS: tuple[Balance, ...] = get_args(Balance)

# A server of a map file's direct entry: (host, port), IPv6 without brackets.
Server = tuple[str, int]


# --- Routes -----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One entry of `routes:`; the first entry that matches a user picks its backend.

    users:    `values` are full user names, compared ASCII case-insensitively.
    domains:  `values` are domains, compared with the part after the last "@".
    match:    `pattern` is a Python regular expression searched in the user name
              (case-sensitive unless it says `(?i)`).
    map_file: `map_file` lists `user backend` or `user host:port`; a user not
              in the file does not match, and the next route is tried.

    Invalid combinations raise ValueError; config.py checks each key first so
    that its errors can name the key path.
    """

    kind: RouteKind
    values: tuple[str, ...] | None = None
    pattern: str | None = None
    map_file: Path | None = None
    backend: str | None = None  # None only for map_file: the file names one per user
    rewrite_user: RewriteUser = "none"

    def __post_init__(self) -> None:
        problem = _route_problem(self)
        if problem is not None:
            raise ValueError(problem)


@dataclass(frozen=True)
class RouteResult:
    """Where a user's session goes: a backend by name, or a map file's direct server."""

    backend: str | None  # exactly one of backend and server is set
    server: Server | None
    user: bytes  # the name to send to the backend, after rewrite_user


def compile_route_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a `match:` pattern; ValueError carries a one-line reason."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValueError(f"invalid regular expression {pattern!r}: {exc.msg}{where}") from None


def check_rewrite_user(value: str) -> None:
    """Raise ValueError unless `value` is none, strip_domain or domain:NEW."""
    if value in ("none", "strip_domain"):
        return
    if value.startswith(DOMAIN_REWRITE_PREFIX):
        problem = _domain_problem(value.removeprefix(DOMAIN_REWRITE_PREFIX))
        if problem is None:
            return
        raise ValueError(f"rewrite_user {value!r}: {problem}")
    raise ValueError(
        f"rewrite_user must be none, strip_domain or {DOMAIN_REWRITE_PREFIX}NEW (got {value!r})"
    )


def rewrite_user(rule: RewriteUser, user: bytes) -> bytes:
    """Apply a (checked) rewrite_user rule; the local part keeps its case."""
    if rule == "strip_domain":
        local, at, _ = user.rpartition(b"@")
        return local if at else user
    if rule.startswith(DOMAIN_REWRITE_PREFIX):
        local, at, _ = user.rpartition(b"@")
        new = rule.removeprefix(DOMAIN_REWRITE_PREFIX).encode()
        return (local if at else user) + b"@" + new
    return user


def _route_problem(route: Route) -> str | None:
    fields = {
        "values": route.values is not None,
        "pattern": route.pattern is not None,
        "map_file": route.map_file is not None,
        "backend": route.backend is not None,
    }
    needed = {
        "users": {"values", "backend"},
        "domains": {"values", "backend"},
        "match": {"pattern", "backend"},
        "map_file": {"map_file"},
    }.get(route.kind)
    if needed is None:
        return f"unknown route kind {route.kind!r} (expected one of: {', '.join(ROUTE_KINDS)})"
    for name, present in fields.items():
        if present and name not in needed:
            return f"a {route.kind} route takes no {name}"
        if not present and name in needed:
            return f"a {route.kind} route needs {name}"
    if route.values is not None:
        if not route.values:
            return f"a {route.kind} route needs at least one value"
        for value in route.values:
            if not value:
                return f"empty {route.kind} value"
            problem = _domain_problem(value) if route.kind == "domains" else None
            if problem is not None:
                return f"domain {value!r}: {problem}"
    if route.pattern is not None:
        try:
            compile_route_pattern(route.pattern)
        except ValueError as exc:
            return str(exc)
    try:
        check_rewrite_user(route.rewrite_user)
    except ValueError as exc:
        return str(exc)
    return None


def _domain_problem(domain: str) -> str | None:
    if not domain:
        return "empty domain"
    if "@" in domain or any(char.isspace() or not char.isprintable() for char in domain):
        return "a domain has no '@', spaces or control characters"
    return None


def _fold(name: str) -> bytes:
    # User names are compared as bytes with ASCII-only lower-casing: what
    # bytes.lower() does, so a client's bytes need no decoding to be matched.
    return name.encode("utf-8").lower()


# --- Router -----------------------------------------------------------------

_MapTarget = str | Server  # a backend name or a direct server


@dataclass
class _MapFile:
    """A map file's table in service and the content it was built from."""

    path: Path
    table: dict[bytes, _MapTarget] = field(default_factory=dict)
    stamp: tuple[int, int] | None = None  # size and mtime (ns) of the content last read
    digest: bytes | None = None  # sha256 of that content


@dataclass(frozen=True)
class _Rule:
    route: Route
    names: frozenset[bytes]  # users / domains, folded
    regex: re.Pattern[str] | None
    map_file: _MapFile | None


class Router:
    """The routes in order, and the map-file tables they consult.

    Map files are read only by `refresh()`: a new Router's map routes match
    nobody until the caller refreshes it (at startup, then on SIGHUP or a
    timer). A refresh builds each new table aside and swaps it in with one
    assignment, so it may run in a worker thread while `route()` is called
    (one refresh at a time).
    """

    def __init__(self, routes: tuple[Route, ...], backends: tuple[str, ...]) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = frozenset(backends)
        self.default = backends[0]  # no route matched: the first backend
        self._map_files: dict[Path, _MapFile] = {}
        rules = []
        for route in routes:
            if route.backend is not None and route.backend not in self.backends:
                raise ValueError(f"unknown backend {route.backend!r}")
            map_file = None
            if route.map_file is not None:
                map_file = self._map_files.setdefault(route.map_file, _MapFile(route.map_file))
            rules.append(
                _Rule(
                    route=route,
                    names=frozenset(_fold(value) for value in route.values or ()),
                    regex=compile_route_pattern(route.pattern) if route.pattern else None,
                    map_file=map_file,
                )
            )
        self._rules = tuple(rules)

    def route(self, user: bytes) -> RouteResult:
        """The first matching route's target and rewritten user; else the default backend."""
        for rule in self._rules:
            target = _target(rule, user)
            if target is None:
                continue
            rewritten = rewrite_user(rule.route.rewrite_user, user)
            if isinstance(target, str):
                return RouteResult(backend=target, server=None, user=rewritten)
            return RouteResult(backend=None, server=target, user=rewritten)
        return RouteResult(backend=self.default, server=None, user=user)

    def refresh(self) -> list[str]:
        """Re-read map files whose content changed; return one message per problem.

        Never raises. A file that cannot be read, is not UTF-8 or has a bad
        line leaves its previous table in service; a line naming an unknown
        backend is left out of the new table and reported. Content already
        seen (same size, mtime and sha256) is not parsed or reported again;
        an unreadable file is reported at every refresh.
        """
        errors: list[str] = []
        for map_file in self._map_files.values():
            errors.extend(self._reload(map_file))
        return errors

    def _reload(self, map_file: _MapFile) -> list[str]:
        path = map_file.path
        try:
            with path.open("rb") as file:
                info = os.fstat(file.fileno())
                stamp = (info.st_size, info.st_mtime_ns)
                if stamp == map_file.stamp:
                    return []
                data = file.read()
        except OSError as exc:
            return [f"{path}: cannot read: {exc.strerror or exc}; the previous table stays"]
        digest = hashlib.sha256(data).digest()
        unchanged = digest == map_file.digest
        map_file.stamp, map_file.digest = stamp, digest
        if unchanged:  # touched or rewritten with the same content
            return []
        table, errors = _parse_map(path, data, self.backends)
        if table is None:
            return [*errors, f"{path}: not loaded, the previous table stays"]
        map_file.table = table
        return errors


def _target(rule: _Rule, user: bytes) -> _MapTarget | None:
    route = rule.route
    match route.kind:
        case "users":
            return route.backend if user.lower() in rule.names else None
        case "domains":
            _, at, domain = user.rpartition(b"@")
            return route.backend if at and domain.lower() in rule.names else None
        case "match":
            # A name that is not UTF-8 keeps its odd bytes as lone surrogates,
            # which no ordinary pattern character matches.
            text = user.decode("utf-8", "surrogateescape")
            found = rule.regex is not None and rule.regex.search(text) is not None
            return route.backend if found else None
        case "map_file":
            return rule.map_file.table.get(user.lower()) if rule.map_file else None


_COMMENT = re.compile(r"(?:^|\s)#")  # a "#" inside a word is part of it
_BRACKETED = re.compile(r"\[([^\]]+)\]:([0-9]{1,5})")
_HOST_PORT = re.compile(r"([^:\[\]]+):([0-9]{1,5})")
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


def _parse_map(
    path: Path, data: bytes, backends: frozenset[str]
) -> tuple[dict[bytes, _MapTarget] | None, list[str]]:
    """A map file's table, or None when a line is bad; and the problems found.

    Each line is `user backend` or `user host:port` ([v6]:port for IPv6);
    `#` starts a comment at the start of a line or after a space.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"{path}: not UTF-8 text (byte {exc.start})"]
    table: dict[bytes, _MapTarget] = {}
    first_line: dict[bytes, int] = {}
    errors: list[str] = []
    bad = False
    for number, raw in enumerate(text.splitlines(), start=1):
        words = _COMMENT.split(raw, maxsplit=1)[0].split()
        if not words:
            continue
        where = f"{path}: line {number}"
        if len(words) != 2:
            errors.append(f"{where}: expected 'user backend' or 'user host:port'")
            bad = True
            continue
        user, target_text = _fold(words[0]), words[1]
        if user in first_line:
            errors.append(f"{where}: {words[0]!r} is already mapped on line {first_line[user]}")
            bad = True
            continue
        first_line[user] = number
        target: _MapTarget
        if ":" in target_text:
            server = _server(target_text)
            if server is None:
                errors.append(f"{where}: invalid server {target_text!r} (use host:port)")
                bad = True
                continue
            target = server
        elif target_text in backends:
            target = target_text
        else:
            # The rest of the file is fine: only this user falls through to
            # the next route, and the operator is told.
            errors.append(f"{where}: unknown backend {target_text!r}, line left out")
            continue
        table[user] = target
    return (None if bad else table), errors


def _server(text: str) -> Server | None:
    """`host:port` or `[v6]:port` with a port from 1 to 65535, else None."""
    match = _BRACKETED.fullmatch(text) or _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if text.startswith("[") or not _HOST_NAME.fullmatch(host):
            return None
        return host, port
    if text.startswith("[") != (address.version == 6):
        return None  # IPv6 needs brackets, IPv4 takes none
    return host, port


# --- Balancing ----------------------------------------------------------------


class Balancer:
    """The servers of one backend, and the order to try them in for a session.

    `servers` are (key, weight) pairs, key "host:port", weight at least 1.
    `order()` returns every server once: those `usable` says are up first,
    then the ones marked down, so a session never goes to a down server while
    another is up. Callers decide whether to try the down ones at all: trying
    them last turns a stale mark into a slow login instead of a refused one;
    stopping at the first down server keeps a dead backend from costing a
    connect timeout per server.

    round_robin:       smooth weighted round robin (nginx): over a cycle of
                       sum(weights) sessions each server is first exactly
                       `weight` times, interleaved rather than in bursts.
    least_connections: fewest active sessions per unit of weight; ties go by
                       the weighted round robin among the tied servers.
    user_hash:         weighted rendezvous hashing on blake2b(key, user), so
                       a user's sessions land on the same server while it is
                       up, on every replica, and a server going down moves
                       only its own users (they come back when it does).

    Only round_robin and least_connections keep state (the round-robin
    weights), advanced once per `order()` call.
    """

    def __init__(self, balance: Balance, servers: tuple[tuple[str, int], ...]) -> None:
        if balance not in BALANCE_METHODS:
            raise ValueError(
                f"balance must be one of {', '.join(BALANCE_METHODS)} (got {balance!r})"
            )
        if not servers:
            raise ValueError("at least one server is needed")
        keys = [key for key, _ in servers]
        for key, weight in servers:
            if keys.count(key) > 1:
                raise ValueError(f"server {key} is listed twice")
            if weight < 1:
                raise ValueError(f"server {key}: weight must be at least 1 (got {weight})")
        self.balance: Balance = balance
        self.servers = servers
        self._keys = tuple(keys)
        self._weight = dict(servers)
        self._position = {key: index for index, key in enumerate(keys)}
        self._current = dict.fromkeys(keys, 0)  # smooth round robin's running weights

    def order(
        self, user: bytes, usable: Callable[[str], bool], active: Callable[[str], int]
    ) -> list[str]:
        """Every server once, usable ones first, in the order to try them."""
        is_up = {key: usable(key) for key in self._keys}
        up = [key for key in self._keys if is_up[key]]
        match self.balance:
            case "user_hash":
                scores = {key: self._hash_score(user, key) for key in self._keys}
                return sorted(
                    self._keys, key=lambda key: (not is_up[key], -scores[key], self._position[key])
                )
            case "round_robin":
                # The round robin turns over the usable servers only; when
                # every server is down it turns over all of them.
                first = self._smooth_pick(up or list(self._keys))
                rest = [key for key in self._keys if key != first]
                return [first, *sorted(rest, key=lambda key: (not is_up[key], *self._due(key)))]
            case "least_connections":
                load = {key: Fraction(active(key), self._weight[key]) for key in self._keys}
                group = up or list(self._keys)
                least = min(load[key] for key in group)
                first = self._smooth_pick([key for key in group if load[key] == least])
                rest = [key for key in self._keys if key != first]
                return [
                    first,
                    *sorted(rest, key=lambda key: (not is_up[key], load[key], *self._due(key))),
                ]

    def _smooth_pick(self, candidates: list[str]) -> str:
        # nginx's smooth weighted round robin: every candidate gains its
        # weight, the highest (first listed on a tie) is picked and pays the
        # candidates' total weight back.
        total = 0
        for key in candidates:
            self._current[key] += self._weight[key]
            total += self._weight[key]
        picked = max(candidates, key=self._current.__getitem__)
        self._current[picked] -= total
        return picked

    def _due(self, key: str) -> tuple[int, int]:
        """Sort key: the server the round robin would pick soonest comes first."""
        return -self._current[key], self._position[key]

    def _hash_score(self, user: bytes, key: str) -> float:
        # Weighted rendezvous hashing: h uniform in (0, 1) from the hash of
        # (server, user); score = weight / -ln(h). The highest score wins, and
        # each server wins a share of users proportional to its weight. The
        # key has no NUL, so key + NUL + user is unambiguous.
        digest = hashlib.blake2b(key.encode() + b"\0" + user.lower(), digest_size=8).digest()
        bits = int.from_bytes(digest, "big") >> 12  # 52 bits: 2*bits+1 is exact in a float
        unit = (2 * bits + 1) / 2**53
        return self._weight[key] / -math.log(unit)
