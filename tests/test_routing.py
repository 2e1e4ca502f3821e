"""Unit tests for poproxy.routing: routes, map files and server order.

Sans-IO: no sockets, no event loop, no sleeps. Map files are written with
tmp_path and read only when the test calls `refresh()`; their mtime is set
by hand where two versions must differ in it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from poproxy.routing import (
    BALANCE_METHODS,
    Balance,
    Balancer,
    Route,
    Router,
    RouteResult,
    check_rewrite_user,
    compile_route_pattern,
    rewrite_user,
)

BACKENDS = ("mail-default", "mail-a", "mail-b", "mail-c")

ROUTES = (
    Route("users", values=("alice@example.org", "Root"), backend="mail-a"),
    Route("domains", values=("example.org",), backend="mail-b", rewrite_user="strip_domain"),
    Route("match", pattern="^legacy-", backend="mail-c"),
    Route("domains", values=("Example.NET",), backend="mail-c", rewrite_user="domain:example.com"),
)


def to(backend: str, user: bytes) -> RouteResult:
    return RouteResult(backend=backend, server=None, user=user)


def direct(host: str, port: int, user: bytes) -> RouteResult:
    return RouteResult(backend=None, server=(host, port), user=user)


def all_up(key: str) -> bool:
    return True


def idle(key: str) -> int:
    return 0


def down(*keys: str) -> Callable[[str], bool]:
    return lambda key: key not in keys


def write(path: Path, text: str, mtime_ns: int) -> None:
    # Each version gets its own mtime: two writes within one clock tick of
    # a coarse file system must still count as a change.
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))


# --- Routes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        # users: the whole name, ASCII case-insensitive, before the domain route
        (b"alice@example.org", to("mail-a", b"alice@example.org")),
        (b"ALICE@Example.ORG", to("mail-a", b"ALICE@Example.ORG")),
        (b"root", to("mail-a", b"root")),
        # domains: after the last "@", case-insensitive; strip_domain keeps the case
        (b"bob@example.org", to("mail-b", b"bob")),
        (b"Bob@EXAMPLE.org", to("mail-b", b"Bob")),
        (b"bob@evil@example.org", to("mail-b", b"bob@evil")),
        (b"bob@sub.example.org", to("mail-default", b"bob@sub.example.org")),
        (b"example.org", to("mail-default", b"example.org")),
        # match: searched, case-sensitive as written
        (b"legacy-carol", to("mail-c", b"legacy-carol")),
        (b"LEGACY-carol", to("mail-default", b"LEGACY-carol")),
        (b"old-legacy-carol", to("mail-default", b"old-legacy-carol")),
        # domain:NEW replaces the domain
        (b"dave@example.net", to("mail-c", b"dave@example.com")),
        # no match: the first backend, the name untouched
        (b"nobody", to("mail-default", b"nobody")),
        (b"\xff\xfe@nowhere", to("mail-default", b"\xff\xfe@nowhere")),
    ],
)
def test_route(user: bytes, expected: RouteResult) -> None:
    assert Router(ROUTES, BACKENDS).route(user) == expected


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        (
            (
                Route("users", values=("alice@example.org",), backend="mail-a"),
                Route("domains", values=("example.org",), backend="mail-b"),
            ),
            "mail-a",
        ),
        (
            (
                Route("domains", values=("example.org",), backend="mail-b"),
                Route("users", values=("alice@example.org",), backend="mail-a"),
            ),
            "mail-b",
        ),
        (
            (
                Route("match", pattern="example", backend="mail-c"),
                Route("users", values=("alice@example.org",), backend="mail-a"),
            ),
            "mail-c",
        ),
    ],
)
def test_first_match_wins(routes: tuple[Route, ...], expected: str) -> None:
    assert Router(routes, BACKENDS).route(b"alice@example.org").backend == expected


def test_no_routes_send_everyone_to_the_first_backend() -> None:
    assert Router((), BACKENDS).route(b"alice") == to("mail-default", b"alice")


@pytest.mark.parametrize(
    ("rule", "user", "expected"),
    [
        ("none", b"Alice@Example.org", b"Alice@Example.org"),
        ("strip_domain", b"Alice@Example.org", b"Alice"),
        ("strip_domain", b"alice", b"alice"),
        ("strip_domain", b"a@b@example.org", b"a@b"),
        ("domain:example.com", b"Alice@Example.org", b"Alice@example.com"),
        ("domain:example.com", b"alice", b"alice@example.com"),
        ("domain:example.com", b"a@b@example.org", b"a@b@example.com"),
    ],
)
def test_rewrite_user(rule: str, user: bytes, expected: bytes) -> None:
    check_rewrite_user(rule)
    assert rewrite_user(rule, user) == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Route("users", backend="mail-a"), "users route needs values"),
        (lambda: Route("users", values=(), backend="mail-a"), "at least one value"),
        (lambda: Route("users", values=("",), backend="mail-a"), "empty users value"),
        (lambda: Route("users", values=("alice",)), "needs backend"),
        (lambda: Route("domains", values=("@example.org",), backend="mail-a"), "no '@'"),
        (lambda: Route("domains", values=("example org",), backend="mail-a"), "no '@', spaces"),
        (lambda: Route("match", pattern="(", backend="mail-a"), "at position 0"),
        (lambda: Route("match", pattern="x", values=("a",), backend="mail-a"), "takes no values"),
        (lambda: Route("map_file", map_file=Path("m"), backend="mail-a"), "takes no backend"),
        (lambda: Route("map_file"), "needs map_file"),
        (lambda: Route("everyone", backend="mail-a"), "unknown route kind"),  # type: ignore[arg-type]
        (
            lambda: Route("users", values=("a",), backend="mail-a", rewrite_user="upper"),
            "rewrite_user must be none, strip_domain or domain:NEW",
        ),
        (
            lambda: Route("users", values=("a",), backend="mail-a", rewrite_user="domain:"),
            "empty domain",
        ),
        (
            lambda: Route("users", values=("a",), backend="mail-a", rewrite_user="domain:a@b"),
            "no '@'",
        ),
    ],
)
def test_invalid_route(make: Callable[[], Route], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_compile_route_pattern() -> None:
    assert compile_route_pattern("^legacy-").search("legacy-x")
    with pytest.raises(ValueError, match=r"invalid regular expression '\[a': .* at position 0"):
        compile_route_pattern("[a")


@pytest.mark.parametrize(
    ("routes", "backends", "message"),
    [
        ((), (), "at least one backend"),
        ((Route("users", values=("a",), backend="mail-z"),), BACKENDS, "unknown backend 'mail-z'"),
    ],
)
def test_invalid_router(routes: tuple[Route, ...], backends: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Router(routes, backends)


# --- Map files ------------------------------------------------------------------

MAP = """\
# user            target
alice             mail-a
Bob@Example.org   mail-b      # inline comment
carol             192.0.2.7:1110

dave              [2001:db8::1]:110
erin              pop.example.net:995
"""


def map_router(path: Path, *, rewrite: str = "none") -> Router:
    routes = (
        Route("map_file", map_file=path, rewrite_user=rewrite),
        Route("match", pattern="^legacy-", backend="mail-c"),
    )
    return Router(routes, BACKENDS)


def test_map_file_is_read_only_at_refresh(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, MAP, 1_000_000_000)
    router = map_router(path)
    assert router.route(b"alice") == to("mail-default", b"alice")
    assert router.refresh() == []
    assert router.route(b"alice") == to("mail-a", b"alice")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (b"alice", to("mail-a", b"alice")),
        (b"ALICE", to("mail-a", b"ALICE")),
        (b"bob@example.ORG", to("mail-b", b"bob@example.ORG")),
        (b"carol", direct("192.0.2.7", 1110, b"carol")),
        (b"dave", direct("2001:db8::1", 110, b"dave")),
        (b"erin", direct("pop.example.net", 995, b"erin")),
        # not in the map: the next route, then the default
        (b"legacy-frank", to("mail-c", b"legacy-frank")),
        (b"frank", to("mail-default", b"frank")),
    ],
)
def test_map_file_entries(tmp_path: Path, user: bytes, expected: RouteResult) -> None:
    path = tmp_path / "users.map"
    write(path, MAP, 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []
    assert router.route(user) == expected


def test_map_file_hits_are_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "bob@example.org mail-b\n", 1_000_000_000)
    router = map_router(path, rewrite="strip_domain")
    assert router.refresh() == []
    assert router.route(b"bob@example.org") == to("mail-b", b"bob")


def test_map_file_reloads_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []
    assert router.route(b"alice").backend == "mail-a"

    write(path, "alice mail-b\n", 2_000_000_000)  # same size, new content and mtime
    assert router.refresh() == []
    assert router.route(b"alice").backend == "mail-b"

    write(path, "alice mail-c\nbob mail-a\n", 2_000_000_000)  # new size, same mtime
    assert router.refresh() == []
    assert router.route(b"alice").backend == "mail-c"
    assert router.route(b"bob").backend == "mail-a"


def test_map_file_unchanged_content_is_not_parsed_again(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\nbob mail-z\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == [f"{path}: line 2: unknown backend 'mail-z', line left out"]
    assert router.refresh() == []  # same size and mtime: not even read
    write(path, "alice mail-a\nbob mail-z\n", 2_000_000_000)  # touched: same sha256
    assert router.refresh() == []
    assert router.route(b"alice").backend == "mail-a"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("frank", "expected 'user backend' or 'user host:port'"),
        ("frank mail-a extra", "expected 'user backend' or 'user host:port'"),
        ("frank host:99999", "invalid server 'host:99999'"),
        ("frank host:0", "invalid server 'host:0'"),
        ("frank host:", "invalid server 'host:'"),
        ("frank 2001:db8::1:110", "invalid server '2001:db8::1:110'"),
        ("frank [192.0.2.1]:110", r"invalid server '\[192.0.2.1\]:110'"),
        ("frank -bad-:110", "invalid server '-bad-:110'"),
        ("ALICE mail-b", "'ALICE' is already mapped on line 1"),
    ],
)
def test_map_file_bad_line_keeps_the_old_table(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []

    write(path, f"alice mail-a\n# new users\n{line}\nbob mail-b\n", 2_000_000_000)
    errors = router.refresh()
    assert len(errors) == 2
    assert errors[0].startswith(f"{path}: line 3: ")
    assert re.search(reason, errors[0])
    assert errors[1] == f"{path}: not loaded, the previous table stays"
    assert router.route(b"alice").backend == "mail-a"
    assert router.route(b"bob").backend == "mail-default"  # the new line is not in service


def test_map_file_unknown_backend_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\nbob mail-z\ncarol mail-c\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == [f"{path}: line 2: unknown backend 'mail-z', line left out"]
    assert router.route(b"alice").backend == "mail-a"
    assert router.route(b"bob").backend == "mail-default"
    assert router.route(b"carol").backend == "mail-c"


def test_map_file_unreadable_keeps_the_old_table(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []
    path.unlink()
    for _ in range(2):  # the problem persists, so it is reported at every refresh
        assert router.refresh() == [
            f"{path}: cannot read: No such file or directory; the previous table stays"
        ]
    assert router.route(b"alice").backend == "mail-a"


def test_map_file_not_utf8_keeps_the_old_table(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-a\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []
    path.write_bytes(b"alice mail-b\n\xff mail-a\n")
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert router.refresh() == [
        f"{path}: not UTF-8 text (byte 13)",
        f"{path}: not loaded, the previous table stays",
    ]
    assert router.route(b"alice").backend == "mail-a"


def test_map_file_shared_by_two_routes_is_read_once(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "alice mail-z\n", 1_000_000_000)
    routes = (Route("map_file", map_file=path), Route("map_file", map_file=path))
    router = Router(routes, BACKENDS)
    assert router.refresh() == [f"{path}: line 1: unknown backend 'mail-z', line left out"]


def test_map_file_hash_inside_a_word_is_not_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "users.map"
    write(path, "ali#ce mail-a #  a comment\n  # indented comment\n", 1_000_000_000)
    router = map_router(path)
    assert router.refresh() == []
    assert router.route(b"ali#ce").backend == "mail-a"


# --- Balancing ------------------------------------------------------------------


def picks(balancer: Balancer, count: int, usable: Callable[[str], bool] = all_up) -> Counter[str]:
    return Counter(balancer.order(b"", usable, idle)[0] for _ in range(count))


@pytest.mark.parametrize(
    "weights",
    [
        {"a:110": 5, "b:110": 3, "c:110": 2},
        {"a:110": 1, "b:110": 1, "c:110": 1, "d:110": 1},
        {"a:110": 7, "b:110": 2, "c:110": 1},
        {"a:110": 1},
    ],
)
def test_round_robin_is_exact_over_whole_cycles(weights: dict[str, int]) -> None:
    balancer = Balancer("round_robin", tuple(weights.items()))
    total = sum(weights.values())
    count = 1000 - 1000 % total
    assert picks(balancer, count) == {
        key: weight * count // total for key, weight in weights.items()
    }


def test_round_robin_is_smooth() -> None:
    # nginx's example: weights 5, 1, 1 interleave rather than come in a burst.
    balancer = Balancer("round_robin", (("a", 5), ("b", 1), ("c", 1)))
    assert [balancer.order(b"", all_up, idle)[0] for _ in range(7)] == list("aabacaa")


def test_round_robin_spreads_over_the_usable_servers_by_weight() -> None:
    balancer = Balancer("round_robin", (("a:110", 5), ("b:110", 3), ("c:110", 2)))
    assert picks(balancer, 1000, down("a:110")) == {"b:110": 600, "c:110": 400}


@pytest.mark.parametrize(
    ("weights", "active", "first"),
    [
        ((1, 1, 1), (3, 1, 2), "b"),
        ((3, 1, 1), (3, 2, 2), "a"),  # 3/3 = 1 beats 2/1
        ((1, 4, 1), (1, 3, 2), "b"),  # 3/4 beats 1/1
        ((2, 1, 1), (2, 1, 5), "a"),  # a tie of 1 and 1: the round robin favours weight 2
        ((1, 1, 1), (0, 0, 0), "a"),
    ],
)
def test_least_connections_picks_the_least_loaded_by_weight(
    weights: tuple[int, int, int], active: tuple[int, int, int], first: str
) -> None:
    balancer = Balancer("least_connections", tuple(zip("abc", weights, strict=True)))
    sessions = dict(zip("abc", active, strict=True))
    order = balancer.order(b"", all_up, sessions.__getitem__)
    assert order[0] == first
    assert sorted(order) == ["a", "b", "c"]


def test_least_connections_ties_go_round_robin() -> None:
    balancer = Balancer("least_connections", (("a", 2), ("b", 1), ("c", 5)))
    sessions = {"a": 0, "b": 0, "c": 9}
    firsts = Counter(balancer.order(b"", all_up, sessions.__getitem__)[0] for _ in range(300))
    assert firsts == {"a": 200, "b": 100}


def test_least_connections_orders_the_rest_by_load() -> None:
    balancer = Balancer("least_connections", (("a", 1), ("b", 1), ("c", 2), ("d", 1)))
    sessions = {"a": 3, "b": 1, "c": 4, "d": 0}
    assert balancer.order(b"", all_up, sessions.__getitem__) == ["d", "b", "c", "a"]
    assert balancer.order(b"", down("d"), sessions.__getitem__) == ["b", "c", "a", "d"]


HASHED = (("a:110", 1), ("b:110", 2), ("c:110", 3), ("d:110", 4))
USERS = [f"user{number}@example.org".encode() for number in range(10_000)]


def first_servers(balancer: Balancer, usable: Callable[[str], bool] = all_up) -> list[str]:
    return [balancer.order(user, usable, idle)[0] for user in USERS]


def test_user_hash_is_stable() -> None:
    balancer = Balancer("user_hash", HASHED)
    again = Balancer("user_hash", HASHED)  # another replica, or after a restart
    busy = {"a:110": 50, "b:110": 0, "c:110": 7, "d:110": 1}
    for user in USERS[:200]:
        order = balancer.order(user, all_up, idle)
        assert balancer.order(user, all_up, busy.__getitem__) == order
        assert again.order(user, all_up, idle) == order
        assert balancer.order(user.upper(), all_up, idle) == order
        assert sorted(order) == sorted(key for key, _ in HASHED)


def test_user_hash_spreads_users_by_weight() -> None:
    shares = Counter(first_servers(Balancer("user_hash", HASHED)))
    total = sum(weight for _, weight in HASHED)
    for key, weight in HASHED:
        expected = len(USERS) * weight / total
        assert abs(shares[key] - expected) <= 0.05 * expected, (key, shares[key], expected)


def test_user_hash_moves_only_the_users_of_a_down_server() -> None:
    balancer = Balancer("user_hash", HASHED)
    before = first_servers(balancer)
    during = first_servers(balancer, down("c:110"))
    moved = 0
    for old, new in zip(before, during, strict=True):
        if old == "c:110":
            assert new != "c:110"
            moved += 1
        else:
            assert new == old
    assert moved > 0
    assert first_servers(balancer) == before  # they come back when it is up again


def test_user_hash_moves_only_the_users_of_a_removed_server() -> None:
    before = first_servers(Balancer("user_hash", HASHED))
    after = first_servers(Balancer("user_hash", HASHED[:2] + HASHED[3:]))
    for old, new in zip(before, after, strict=True):
        assert new == old or old == "c:110"
    # A down server's users go where they would go were it removed.
    assert first_servers(Balancer("user_hash", HASHED), down("c:110")) == after


@pytest.mark.parametrize("balance", BALANCE_METHODS)
def test_down_servers_come_last(balance: Balance) -> None:
    balancer = Balancer(balance, (("a", 1), ("b", 5), ("c", 1), ("d", 2)))
    usable = down("b", "d")
    for user in USERS[:100]:
        order = balancer.order(user, usable, idle)
        assert sorted(order[:2]) == ["a", "c"]
        assert sorted(order[2:]) == ["b", "d"]


@pytest.mark.parametrize("balance", BALANCE_METHODS)
def test_all_servers_down_still_lists_every_server(balance: Balance) -> None:
    balancer = Balancer(balance, (("a", 1), ("b", 1)))
    nothing_up = down("a", "b")
    orders = [balancer.order(user, nothing_up, idle) for user in USERS[:100]]
    assert all(sorted(order) == ["a", "b"] for order in orders)
    assert {order[0] for order in orders} == {"a", "b"}  # still spread


@pytest.mark.parametrize(
    ("balance", "servers", "message"),
    [
        ("round_robin", (), "at least one server"),
        ("round_robin", (("a", 0),), "weight must be at least 1"),
        ("user_hash", (("a", 1), ("a", 2)), "listed twice"),
        ("random", (("a", 1),), "balance must be one of"),
    ],
)
def test_invalid_balancer(
    balance: Balance, servers: tuple[tuple[str, int], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Balancer(balance, servers)
