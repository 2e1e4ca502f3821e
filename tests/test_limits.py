"""Unit tests for poproxy.limits: connection caps and the failed-login penalty.

Sans-IO: no sockets, no event loop, no sleeps. Time is the `now` argument,
so decay is tested by passing a later `now`, never by waiting.
"""

from __future__ import annotations

import ipaddress

import pytest

from poproxy.limits import (
    MAX_TRACKED_ADDRESSES,
    REMEMBERED_ATTEMPTS,
    AuthPenalty,
    ConnectionCounter,
    Networks,
    address_key,
)

BASE = 2.0
CEILING = 15.0
T0 = 1_000.0  # an arbitrary monotonic clock reading
CLIENT = "198.51.100.7"
OTHER_CLIENT = "203.0.113.9"
USER = b"alice"


def penalty(
    base: float = BASE, ceiling: float = CEILING, trusted: tuple[str, ...] = ()
) -> AuthPenalty:
    return AuthPenalty(base, ceiling, Networks(trusted))


def guess(number: int) -> bytes:
    """A distinct wrong password per number, as a guessing client sends."""
    return b"guess-%d" % number


def fail_with_new_passwords(
    auth: AuthPenalty, address: str, count: int, now: float = T0, first: int = 0
) -> list[float]:
    return [auth.failed(address, USER, guess(first + i), now) for i in range(count)]


class TestAddressKey:
    def test_ipv4_is_its_own_key(self) -> None:
        assert address_key("192.0.2.1") == "192.0.2.1"

    def test_ipv6_addresses_in_one_64_share_a_key(self) -> None:
        assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"

    def test_another_ipv6_64_has_another_key(self) -> None:
        assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")

    def test_ipv4_mapped_ipv6_counts_as_the_ipv4_address(self) -> None:
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d (RFC 4291 2.5.5.2).
        assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
        assert address_key("::ffff:192.0.2.1") != address_key("::ffff:192.0.2.2")

    @pytest.mark.parametrize("garbage", ["", "not-an-address", "192.0.2.300", "unix:/run/sock"])
    def test_garbage_passes_through(self, garbage: str) -> None:
        assert address_key(garbage) == garbage


class TestNetworks:
    networks = Networks(("10.0.0.0/8", "2001:db8::/32", "192.0.2.1"))

    @pytest.mark.parametrize("address", ["10.1.2.3", "2001:db8:ffff::1", "192.0.2.1"])
    def test_members(self, address: str) -> None:
        assert address in self.networks

    @pytest.mark.parametrize("address", ["11.0.0.1", "2001:db9::1", "192.0.2.2", "::1"])
    def test_non_members(self, address: str) -> None:
        assert address not in self.networks

    def test_ipv4_mapped_address_is_matched_as_ipv4(self) -> None:
        assert "::ffff:10.1.2.3" in self.networks
        assert "::ffff:11.0.0.1" not in self.networks

    @pytest.mark.parametrize("garbage", ["", "not-an-address", "10.0.0.256"])
    def test_garbage_is_not_a_member(self, garbage: str) -> None:
        assert garbage not in self.networks

    def test_no_networks_has_no_members(self) -> None:
        assert "10.1.2.3" not in Networks(())


class TestConnectionCounter:
    def test_admits_up_to_the_per_address_cap(self) -> None:
        counter = ConnectionCounter(max_total=100, max_per_address=3)
        assert [counter.admit("a") for _ in range(3)] == [None, None, None]
        assert counter.admit("a") == "max_connections_per_ip"
        assert counter.admit("b") is None
        assert counter.total == 4

    def test_refused_connection_is_not_counted(self) -> None:
        counter = ConnectionCounter(max_total=100, max_per_address=1)
        counter.admit("a")
        counter.admit("a")
        assert counter.per_address == {"a": 1}
        assert counter.total == 1

    def test_total_cap(self) -> None:
        counter = ConnectionCounter(max_total=2, max_per_address=10)
        assert counter.admit("a") is None
        assert counter.admit("b") is None
        assert counter.admit("c") == "max_connections"
        assert counter.total == 2

    def test_exempt_skips_the_per_address_cap(self) -> None:
        counter = ConnectionCounter(max_total=100, max_per_address=1)
        assert [counter.admit("trusted", exempt=True) for _ in range(5)] == [None] * 5
        assert counter.per_address["trusted"] == 5

    def test_exempt_is_still_held_to_the_total_cap(self) -> None:
        counter = ConnectionCounter(max_total=2, max_per_address=1)
        assert counter.admit("trusted", exempt=True) is None
        assert counter.admit("trusted", exempt=True) is None
        assert counter.admit("trusted", exempt=True) == "max_connections"

    def test_release_frees_a_slot(self) -> None:
        counter = ConnectionCounter(max_total=100, max_per_address=1)
        counter.admit("a")
        assert counter.admit("a") == "max_connections_per_ip"
        counter.release("a")
        assert counter.admit("a") is None

    def test_release_frees_a_total_slot(self) -> None:
        counter = ConnectionCounter(max_total=1, max_per_address=1)
        counter.admit("a")
        assert counter.admit("b") == "max_connections"
        counter.release("a")
        assert counter.admit("b") is None

    def test_release_removes_empty_keys(self) -> None:
        counter = ConnectionCounter(max_total=100, max_per_address=5)
        counter.admit("a")
        counter.admit("a")
        counter.release("a")
        assert counter.per_address == {"a": 1}
        counter.release("a")
        assert counter.per_address == {}
        assert counter.total == 0

    def test_no_unbounded_growth_over_many_addresses(self) -> None:
        counter = ConnectionCounter(max_total=10, max_per_address=1)
        for i in range(10_000):
            key = address_key(str(ipaddress.IPv4Address(0x0A000000 + i)))
            assert counter.admit(key) is None
            counter.release(key)
        assert counter.per_address == {}
        assert counter.total == 0


class TestAuthPenaltyEscalation:
    def test_first_failure_waits_base(self) -> None:
        assert penalty().failed(CLIENT, USER, b"wrong", T0) == BASE

    def test_new_passwords_double_up_to_the_ceiling(self) -> None:
        assert fail_with_new_passwords(penalty(), CLIENT, 5) == [2.0, 4.0, 8.0, 15.0, 15.0]

    def test_retried_stored_password_does_not_escalate(self) -> None:
        # A mail client polling with a stale stored password repeats one
        # attempt: it waits, but it is not guessing, so it does not add.
        auth = penalty()
        assert [auth.failed(CLIENT, USER, b"stale", T0) for _ in range(5)] == [BASE] * 5
        assert auth.failed(CLIENT, USER, b"other", T0) == 4.0
        assert auth.failed(CLIENT, USER, b"stale", T0) == 4.0  # the current penalty
        assert auth.current(CLIENT, T0) == 4.0

    def test_same_password_for_another_user_is_a_new_attempt(self) -> None:
        auth = penalty()
        assert auth.failed(CLIENT, b"alice", b"123456", T0) == BASE
        assert auth.failed(CLIENT, b"bob", b"123456", T0) == 2 * BASE

    def test_only_recent_attempts_are_recognised(self) -> None:
        ceiling = BASE * 2 ** (REMEMBERED_ATTEMPTS + 2)  # out of the way
        auth = penalty(ceiling=ceiling)
        fail_with_new_passwords(auth, CLIENT, REMEMBERED_ATTEMPTS)
        before = auth.current(CLIENT, T0)
        assert auth.failed(CLIENT, USER, guess(0), T0) == before  # still remembered
        auth.failed(CLIENT, USER, guess(REMEMBERED_ATTEMPTS), T0)  # pushes guess(0) out
        before = auth.current(CLIENT, T0)
        assert auth.failed(CLIENT, USER, guess(0), T0) == 2 * before

    def test_another_address_is_unaffected(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 4)
        assert auth.current(CLIENT, T0) == CEILING
        assert auth.current(OTHER_CLIENT, T0) == BASE
        assert auth.failed(OTHER_CLIENT, USER, b"wrong", T0) == BASE

    def test_brute_force_from_one_ipv6_64_shares_a_penalty(self) -> None:
        # One host gets a whole /64 (RFC 6177): rotating through it must not
        # reset the penalty.
        auth = penalty()
        delays = [auth.failed(f"2001:db8:1:2::{i:x}", USER, guess(i), T0) for i in range(1, 5)]
        assert delays == [2.0, 4.0, 8.0, 15.0]
        assert auth.current("2001:db8:1:2:abcd::1", T0) == CEILING
        assert auth.current("2001:db8:1:3::1", T0) == BASE

    def test_ipv4_mapped_address_shares_the_ipv4_penalty(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, "192.0.2.1", 2)
        assert auth.current("::ffff:192.0.2.1", T0) == 4.0

    def test_trusted_networks_wait_base_and_never_escalate(self) -> None:
        auth = penalty(trusted=("10.0.0.0/8", "2001:db8::/32"))
        for address in ("10.0.0.5", "::ffff:10.0.0.5", "2001:db8::5"):
            assert fail_with_new_passwords(auth, address, 6) == [BASE] * 6
            assert auth.current(address, T0) == BASE

    def test_base_zero_means_no_delay(self) -> None:
        auth = penalty(base=0.0)
        assert fail_with_new_passwords(auth, CLIENT, 6) == [0.0] * 6
        assert auth.current(CLIENT, T0) == 0.0

    def test_ceiling_below_base_is_raised_to_base(self) -> None:
        auth = penalty(base=5.0, ceiling=1.0)
        assert fail_with_new_passwords(auth, CLIENT, 3) == [5.0, 5.0, 5.0]


class TestAuthPenaltyDecay:
    def test_half_life(self) -> None:
        # The formula in limits.py: halves every max(base, 1 s) * 30 seconds.
        assert penalty(base=2.0).half_life == 60.0
        assert penalty(base=0.5).half_life == 30.0

    def test_partial_decay_halves_per_half_life(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 4)  # at the ceiling, 15 s
        half_life = auth.half_life
        assert auth.current(CLIENT, T0 + half_life) == pytest.approx(CEILING / 2)
        assert auth.current(CLIENT, T0 + 2 * half_life) == pytest.approx(CEILING / 4)
        assert auth.current(CLIENT, T0 + half_life / 2) == pytest.approx(CEILING * 0.5**0.5)

    def test_partial_decay_never_goes_below_base(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 2)  # 4 s
        assert auth.current(CLIENT, T0 + auth.half_life) == pytest.approx(BASE)
        assert auth.current(CLIENT, T0 + 3 * auth.half_life) == BASE

    def test_failure_after_partial_decay_doubles_the_decayed_penalty(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 3)  # 8 s
        later = T0 + auth.half_life
        assert auth.failed(CLIENT, USER, b"new", later) == pytest.approx(8.0)  # 8 / 2 * 2

    def test_retry_after_partial_decay_waits_the_decayed_penalty(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 3)  # 8 s
        later = T0 + auth.half_life
        assert auth.failed(CLIENT, USER, guess(2), later) == pytest.approx(4.0)

    def test_clock_going_backwards_does_not_grow_the_penalty(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 2)
        assert auth.current(CLIENT, T0 - 1_000) == 4.0

    def test_long_quiet_forgets_a_burst(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 5)
        assert auth.current(CLIENT, T0 + 10 * auth.half_life) == BASE
        assert auth.current(CLIENT, T0 + 3_600) == BASE

    def test_failure_after_long_quiet_waits_base(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 5)
        later = T0 + 3_600
        assert auth.failed(CLIENT, USER, b"a new guess", later) == BASE

    def test_single_old_failure_is_forgotten(self) -> None:
        auth = penalty()
        auth.failed(CLIENT, USER, b"typo", T0)
        later = T0 + 24 * 3_600
        assert auth.failed(CLIENT, USER, b"another typo", later) == auth.current(
            OTHER_CLIENT, later
        )


class TestAuthPenaltyState:
    def test_reconfigure_keeps_records_and_applies_new_settings(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 3)  # 8 s
        auth.reconfigure(1.0, 10.0, Networks(()))
        assert auth.half_life == 30.0
        assert auth.current(CLIENT, T0) == 8.0  # kept
        assert auth.failed(CLIENT, USER, b"new", T0) == 10.0  # 16, new ceiling
        assert auth.current(OTHER_CLIENT, T0) == 1.0  # new base
        assert auth.failed(OTHER_CLIENT, USER, b"new", T0) == 1.0

    def test_reconfigure_raised_base_applies_to_known_addresses(self) -> None:
        auth = penalty()
        auth.failed(CLIENT, USER, b"wrong", T0)  # 2 s
        auth.reconfigure(3.0, 20.0, Networks(()))
        assert auth.current(CLIENT, T0) == 3.0
        # What is left of the old penalty (2 s) doubles: 4 s, above the new base.
        assert auth.failed(CLIENT, USER, b"other", T0) == 4.0

    def test_reconfigure_can_trust_a_known_address(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 4)
        auth.reconfigure(BASE, CEILING, Networks((f"{CLIENT}/32",)))
        assert auth.failed(CLIENT, USER, b"new", T0) == BASE

    def test_reconfigure_to_base_zero_disables_the_delay(self) -> None:
        auth = penalty()
        fail_with_new_passwords(auth, CLIENT, 4)
        auth.reconfigure(0.0, CEILING, Networks(()))
        assert auth.failed(CLIENT, USER, b"new", T0) == 0.0

    def test_table_is_bounded_under_a_spread_out_attack(self) -> None:
        auth = penalty()
        addresses = [
            str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(MAX_TRACKED_ADDRESSES + 100)
        ]
        for address in addresses:
            auth.failed(address, USER, b"wrong", T0)
        auth.failed(addresses[-1], USER, b"wrong again", T0)
        # The private table, read in this one test only: its size is the
        # memory bound, which no public method shows.
        assert len(auth._records) <= MAX_TRACKED_ADDRESSES
        assert auth.current(addresses[0], T0) == BASE  # the oldest was dropped
        assert auth.current(addresses[-1], T0) == 2 * BASE  # the newest is kept

    @pytest.mark.parametrize("earlier_failures", [0, 1, 3, 6])
    def test_unknown_user_and_wrong_password_wait_alike(self, earlier_failures: int) -> None:
        # Whether a user exists must not show in the timing: the penalty takes
        # only the address and an attempt digest, never the backend's verdict.
        unknown, known = penalty(), penalty()
        for auth in (unknown, known):
            fail_with_new_passwords(auth, CLIENT, earlier_failures)
        assert unknown.failed(CLIENT, b"no-such-user", b"secret", T0) == known.failed(
            CLIENT, b"alice", b"wrong-password", T0
        )
