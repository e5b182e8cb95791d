"""Peer policy, pure parts: token buckets for per-peer budgets, which addresses may be
dialled, and which connections to drop when there are too many.

Kept free of I/O so each rule is unit-tested on its own; gossip.py and keeper.py apply them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr

# --- budgets ------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if there are that many; False (nothing spent) otherwise."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class Limit:
    rate: float  # per second
    burst: float


class Budgets:
    """One token bucket per (budget, key); buckets that refilled are forgotten (``prune``),
    so memory follows the peers active within a burst's refill time."""

    def __init__(self, limits: dict[str, Limit]) -> None:
        self.limits = limits
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def take(self, budget: str, key: str, now: float, n: float = 1.0) -> bool:
        limit = self.limits[budget]
        bucket = self._buckets.get((budget, key))
        if bucket is None:
            bucket = self._buckets[(budget, key)] = TokenBucket(limit.rate, limit.burst, now)
        return bucket.take(now, n)

    def prune(self, now: float) -> None:
        for k, bucket in list(self._buckets.items()):
            if bucket.full(now):
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


# --- dialling -----------------------------------------------------------------------

DIAL_OK = "ok"


def ip_class(ip: str) -> str:
    """``public``, ``private`` (loopback, RFC 1918, link-local, CGNAT, ULA, documentation
    ...: reachable only on some networks) or ``bogus`` (unspecified, multicast, reserved:
    never a peer)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return "private"  # ::1 sits in a reserved IPv6 block
    if addr.is_unspecified or addr.is_multicast or addr.is_reserved:
        return "bogus"
    if isinstance(addr, ipaddress.IPv4Address) and addr == ipaddress.IPv4Address("255.255.255.255"):
        return "bogus"
    return "public" if addr.is_global else "private"


def _ip_of(ma: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(ma.value_for_protocol(proto))
        except Exception:  # multiaddr raises its own types for an absent protocol
            continue
    return None


def is_public_node(own_addrs: Iterable[str]) -> bool:
    """A node is in public mode when one of its announced (else listen) addresses is a
    public IP: then peers' private addresses are someone else's network."""
    for a in own_addrs:
        try:
            ip = _ip_of(multiaddr.Multiaddr(a))
            if ip is not None and ip_class(ip) == "public":
                return True
        except Exception:  # a malformed address of our own config was refused at load
            continue
    return False


CIRCUIT = "/p2p-circuit"


def is_circuit(addr: Any) -> bool:
    """A circuit relay address (``RELAY/p2p-circuit/p2p/ID``), as text or a multiaddr."""
    return CIRCUIT in str(addr)


def dial_verdict(addr: str, *, allow_private: bool, allow_dns: bool) -> str:
    """``DIAL_OK`` or why a learned peer address must not be dialled.

    Only ``/ip4|ip6/HOST/tcp/PORT/p2p/ID`` (or ``/dns*/...`` when ``allow_dns``), with a
    non-zero port, an IP that can be a peer, and a private IP only when ``allow_private``;
    or such a relay's address followed by ``/p2p-circuit/p2p/ID`` (circuit relay v2).
    """
    try:
        ma = multiaddr.Multiaddr(addr)
        protos = [p.name for p in ma.protocols()]
    except Exception:  # multiaddr raises assorted types for bad input
        return "malformed"
    if "p2p-circuit" in protos:  # RELAY/p2p-circuit/p2p/ID: the relay's address decides
        relay = addr.partition("/p2p-circuit")[0]
        if protos.count("p2p-circuit") != 1 or protos[-2:] != ["p2p-circuit", "p2p"]:
            return "transport"
        return dial_verdict(relay, allow_private=allow_private, allow_dns=allow_dns)
    dns = protos[0] in ("dns", "dns4", "dns6")
    if len(protos) != 3 or protos[1:] != ["tcp", "p2p"] or not (protos[0] in ("ip4", "ip6") or dns):
        return "transport"
    if dns and not allow_dns:
        return "dns"
    try:
        port = int(ma.value_for_protocol("tcp"))
    except Exception:  # an unparsable port
        return "malformed"
    if not 0 < port < 65536:
        return "bogus"
    if dns:
        return DIAL_OK
    ip = _ip_of(ma)
    if ip is None:
        return "malformed"
    cls = ip_class(ip)
    if cls == "bogus":
        return "bogus"
    if cls == "private" and not allow_private:
        return "private"
    return DIAL_OK


def backoff_after(failures: int, base: float, cap: float) -> float:
    """Wait before the next dial after ``failures`` consecutive failures (exponential)."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


# --- connection trimming --------------------------------------------------------------


def to_trim(
    peers: Sequence[tuple[str, str | None, str | None]],
    *,
    low: int,
    high: int,
    per_ip: int,
    protected: Callable[[str], bool],
    score: Callable[[str], float],
    per_relay: int = 32,
) -> list[tuple[str, str]]:
    """Which connected peers to drop, and why (``per_ip``, ``per_relay``, ``watermark``):
    ``peers`` are (peer id, remote IP or None, relay peer id when reached only through a
    relay, else None).

    Above ``per_ip`` direct connections from one IP (loopback exempt: a local attacker
    owns the box anyway) the lowest-scored extra ones go. A relayed peer is not counted
    under its relay's IP (every peer behind one public relay would look like a single
    host), but at most ``per_relay`` come through one relay: a hostile relay could mint
    peers as cheaply as one IP can. Above ``high`` in all, the lowest-scored unprotected
    peers go until ``low`` remain, relayed ones before direct ones of the same score (a
    circuit also costs its relay). Protected peers are never dropped.
    """
    drop: list[tuple[str, str]] = []
    groups: dict[tuple[str, str], list[str]] = {}
    for pid, ip, relay in peers:
        if relay is not None:
            groups.setdefault(("per_relay", relay), []).append(pid)
        elif ip is not None and not ipaddress.ip_address(ip).is_loopback:
            groups.setdefault(("per_ip", ip), []).append(pid)
    for (why, _source), pids in groups.items():
        cap = per_relay if why == "per_relay" else per_ip
        if len(pids) > cap:
            victims = sorted((p for p in pids if not protected(p)), key=lambda p: (score(p), p))
            drop += [(p, why) for p in victims[: len(pids) - cap]]
    dropped = {p for p, _why in drop}
    relayed = {pid: relay is not None for pid, _ip, relay in peers if pid not in dropped}
    if len(relayed) > high:
        last = sorted((p for p in relayed if not protected(p)),
                      key=lambda p: (score(p), not relayed[p], p))  # fmt: skip
        drop += [(p, "watermark") for p in last[: len(relayed) - low]]
    return drop
