"""Connection caps and the brute-force penalty, without I/O.

Owns: counting open connections in total and per client address (IPv6
grouped per /64, since one host gets a whole /64), and the failed-login
delay that doubles per address on repeated failures and decays with time.
Must never sleep, read a clock of its own or touch a socket: the caller
passes `now` and performs the delay, so tests drive time by hand.

Backends behind a proxy see one address, the proxy's: only here can guessing
be slowed down per client (features.md section 6.5; Dovecot's auth penalty
is the model: 2 s doubling to 15 s, trusted networks exempt, and a retried
identical password not counted again).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

IPV6_PREFIX = 64  # one customer, one /64 (RFC 6177)
REMEMBERED_ATTEMPTS = 10  # identical retries recognised per address
MAX_TRACKED_ADDRESSES = 100_000  # bounded memory under a spread-out attack


@functools.lru_cache(maxsize=4096)
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: every connection asks twice (its key, whether it is trusted),
    # and the same clients come back again and again.
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    """The key connections and failures are counted under: the IPv4 address, or the /64."""
    ip = _parse(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class Networks:
    """A set of networks, e.g. `limits.trusted_networks`."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(network, strict=False) for network in networks]

    def __contains__(self, address: str) -> bool:
        if not self.networks:
            return False
        ip = _parse(address)
        return ip is not None and any(ip in network for network in self.networks)


@dataclass
class ConnectionCounter:
    """Open connections, in total and per address key, against their caps."""

    max_total: int
    max_per_address: int
    total: int = 0
    per_address: dict[str, int] = field(default_factory=dict)

    def admit(self, key: str, *, exempt: bool = False) -> str | None:
        """Count a new connection if the caps allow it; else return the cap it hit.

        `exempt` addresses (trusted networks) are held to the total cap only.
        """
        if self.total >= self.max_total:
            return "max_connections"
        if not exempt and self.per_address.get(key, 0) >= self.max_per_address:
            return "max_connections_per_ip"
        self.total += 1
        self.per_address[key] = self.per_address.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        left = self.per_address[key] - 1  # KeyError before any change on misuse
        self.total -= 1
        if left:
            self.per_address[key] = left
        else:
            del self.per_address[key]


@dataclass
class _Record:
    penalty: float  # the delay the next failure gets, before decay
    last: float  # when the last counted failure happened
    attempts: list[bytes] = field(default_factory=list)  # recent credential digests


class AuthPenalty:
    """How long to wait before answering a failed login from an address.

    The first failure waits `base`; each further one from the same address
    doubles it up to `ceiling`. The penalty halves for every `base * 30`
    seconds without a failure (so an hour's quiet forgets a burst). A
    failure that repeats one of the address's recent attempts exactly (a
    client retrying stored credentials) waits but does not add. Trusted
    networks always wait only `base`.
    """

    def __init__(self, base: float, ceiling: float, trusted: Networks) -> None:
        self.base = base
        self.ceiling = max(base, ceiling)
        self.trusted = trusted
        self.half_life = max(base, 1.0) * 30
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def reconfigure(self, base: float, ceiling: float, trusted: Networks) -> None:
        """New settings; what was learnt about addresses is kept."""
        self.base = base
        self.ceiling = max(base, ceiling)
        self.trusted = trusted
        self.half_life = max(base, 1.0) * 30

    def failed(self, address: str, user: bytes, password: bytes, now: float) -> float:
        """Record a failed login; return the delay before answering it, in seconds."""
        if self.base <= 0:
            return 0.0
        if address in self.trusted:
            return self.base
        key = address_key(address)
        record = self._records.pop(key, None)
        # A digest, never the password itself: the table lives in memory only,
        # and still should not hold secrets.
        attempt = hashlib.sha256(user + b"\0" + password).digest()
        if record is None:
            record = _Record(penalty=self.base, last=now)
        else:
            decayed = self._decayed(record, now)
            if attempt in record.attempts:
                record.penalty = max(self.base, decayed)  # a retry waits, adds nothing
            else:
                # Doubling what is left after decay: a burst long ago is forgotten.
                record.penalty = min(self.ceiling, max(self.base, decayed * 2))
            record.last = now
        delay = record.penalty
        if attempt not in record.attempts:
            record.attempts = [*record.attempts[-(REMEMBERED_ATTEMPTS - 1) :], attempt]
        self._records[key] = record  # most recent last
        while len(self._records) > MAX_TRACKED_ADDRESSES:
            self._records.popitem(last=False)
        return delay

    def current(self, address: str, now: float) -> float:
        """The delay a retried (identical) failure from `address` would get now."""
        record = self._records.get(address_key(address))
        return self.base if record is None else max(self.base, self._decayed(record, now))

    def _decayed(self, record: _Record, now: float) -> float:
        halvings = max(0.0, now - record.last) / self.half_life
        return float(record.penalty * 0.5**halvings)
