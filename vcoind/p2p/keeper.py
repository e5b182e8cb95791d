"""Peer keeping: stay connected to bootstrap peers and to peers learned through gossip.

py-libp2p neither redials lost peers nor forgets a failed dial for 60 s (its
negative cache), so we keep our own list and redial with exponential backoff,
lifting the negative cache before each attempt. Bootstrap peers are kept
forever; learned peers are forgotten after ``LEARNED_TTL_S`` without news.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from vcoind.metrics import NodeMetrics
from vcoind.p2p.host import P2PHost

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.keeper")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
DIAL_TIMEOUT_S = 5.0
LEARNED_TTL_S = 600.0
TICK_S = 0.25


@dataclass
class KnownPeer:
    info: PeerInfo
    bootstrap: bool
    next_attempt: float = 0.0
    backoff: float = BACKOFF_MIN_S
    forget_at: float = float("inf")
    failures: int = 0
    dialing: bool = False
    addrs: list[str] = field(default_factory=list)


def parse_peer_addr(addr: str) -> PeerInfo:
    """``/ip4/.../tcp/N/p2p/<id>`` -> PeerInfo; ValueError if malformed."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # multiaddr/libp2p raise assorted types for bad input
        raise ValueError(f"bad peer address {addr!r}: {exc}") from None


class PeerKeeper:
    def __init__(
        self, p2p: P2PHost, metrics: NodeMetrics, *, bootstrap: tuple[str, ...], discover: bool
    ) -> None:
        self._p2p = p2p
        self._metrics = metrics
        self._discover = discover
        self._known: dict[ID, KnownPeer] = {}
        for addr in bootstrap:
            info = parse_peer_addr(addr)
            if info.peer_id != p2p.peer_id:
                self._known[info.peer_id] = KnownPeer(info=info, bootstrap=True, addrs=[addr])

    def learn(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """Remember addresses a peer announced about itself (only when discovery is on)."""
        if not self._discover:
            return
        infos = []
        for a in addrs:
            try:
                info = parse_peer_addr(a)
            except ValueError:
                continue
            if info.peer_id.to_base58() == peer_id:  # a peer may only speak for itself
                infos.append(info)
        if not infos or infos[0].peer_id == self._p2p.peer_id:
            return
        pid = infos[0].peer_id
        merged = PeerInfo(pid, [a for i in infos for a in i.addrs])
        known = self._known.get(pid)
        deadline = trio.current_time() + LEARNED_TTL_S
        if known is None:
            self._known[pid] = KnownPeer(
                info=merged, bootstrap=False, forget_at=deadline, addrs=list(addrs)
            )
        elif not known.bootstrap:
            known.info, known.forget_at, known.addrs = merged, deadline, list(addrs)

    def known(self) -> list[KnownPeer]:
        return list(self._known.values())

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = trio.current_time()
                connected = self._p2p.connected_peers()
                for pid, kp in list(self._known.items()):
                    if pid in connected:
                        kp.backoff, kp.failures, kp.next_attempt = BACKOFF_MIN_S, 0, 0.0
                        continue
                    if kp.forget_at <= now:
                        del self._known[pid]
                        continue
                    if not kp.dialing and kp.next_attempt <= now:
                        kp.dialing = True
                        nursery.start_soon(self._dial, kp)
                await trio.sleep(TICK_S)

    async def _dial(self, kp: KnownPeer) -> None:
        host = self._p2p.host
        pid = kp.info.peer_id
        try:
            cast(Any, host.get_network()).unblock_peer(pid)  # Swarm, not in the interface
            with trio.fail_after(DIAL_TIMEOUT_S):
                await host.connect(kp.info)
        except Exception as exc:  # py-libp2p raises many unrelated types on dial failure
            kp.failures += 1
            kp.next_attempt = trio.current_time() + kp.backoff
            log.log(
                logging.INFO if kp.failures == 1 else logging.DEBUG,
                "dial %s failed (%s); retry in %.1f s",
                pid,
                exc or type(exc).__name__,
                kp.backoff,
            )
            kp.backoff = min(BACKOFF_MAX_S, kp.backoff * 2)
            self._metrics.dials.labels(outcome="error").inc()
        else:
            log.info("connected to %s", pid)
            kp.backoff, kp.failures = BACKOFF_MIN_S, 0
            self._metrics.dials.labels(outcome="ok").inc()
        finally:
            kp.dialing = False
