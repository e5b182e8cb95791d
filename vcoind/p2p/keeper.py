"""Peer keeping: stay connected to bootstrap peers and to peers learned through gossip.

py-libp2p neither redials lost peers nor forgets a failed dial for 60 s (its
negative cache), so we keep our own list and redial with exponential backoff,
lifting the negative cache before each attempt. Bootstrap peers are kept
forever; learned peers are forgotten after ``LEARNED_TTL_S`` without news.

Learned addresses pass the dial policy first (``policy.dial_verdict``): TCP over an IP
only, and private addresses only when we are not a public node (or the operator allows
them); refusals are counted, never dialled. The connection manager keeps the count
between watermarks: learned peers are dialled only below ``conn_low``; above
``conn_high`` (or above ``max_conns_per_ip`` from one IP, or ``max_relayed_per_relay``
through one relay) the lowest-scored unprotected peers are dropped, relayed ones first.
Bootstrap peers, the relays this node holds a slot at, and peers a service protects
(``protect``: work in progress) are never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from vcoind.config import P2PConfig
from vcoind.metrics import NodeMetrics
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import DIAL_OK, backoff_after, dial_verdict, is_public_node, to_trim

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.keeper")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 10.0
LEARNED_BACKOFF_MAX_S = 120.0
DIAL_TIMEOUT_S = 5.0
LEARNED_TTL_S = 600.0
TICK_S = 0.25
TRIM_EVERY_S = 2.0
# A peer we dropped is not redialled for this long.
TRIMMED_BACKOFF_S = 300.0
# Learned peers remembered at most (the oldest news is forgotten first).
MAX_LEARNED = 4096
BOOTSTRAP_TAG = "bootstrap"


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
        self,
        p2p: P2PHost,
        metrics: NodeMetrics,
        *,
        bootstrap: tuple[str, ...],
        discover: bool,
        cfg: P2PConfig | None = None,
        connect: Callable[[PeerInfo, float], Awaitable[None]] | None = None,
    ) -> None:
        cfg = cfg or P2PConfig()
        # How a peer is dialled: its direct addresses, else its relayed ones (``Relays``).
        self._connect = connect
        self._p2p = p2p
        self._metrics = metrics
        self._discover = discover
        self._cfg = cfg
        self._known: dict[ID, KnownPeer] = {}
        self._protected: dict[ID, set[str]] = {}
        own = cfg.announce or cfg.listen
        self.public = is_public_node(own)
        self.allow_private = cfg.allow_private_dials == "on" or (
            cfg.allow_private_dials == "auto" and not self.public
        )
        self._refused: dict[tuple[str, str], None] = {}  # (peer, addr) counted once
        for addr in bootstrap:
            info = parse_peer_addr(addr)
            if info.peer_id != p2p.peer_id:
                self._known[info.peer_id] = KnownPeer(info=info, bootstrap=True, addrs=[addr])
                self.protect(info.peer_id, BOOTSTRAP_TAG)

    # --- protected peers -------------------------------------------------------------

    def protect(self, peer: ID | str, tag: str) -> None:
        """Never drop ``peer`` while any tag protects it (e.g. a task in progress)."""
        pid = ID.from_base58(peer) if isinstance(peer, str) else peer
        self._protected.setdefault(pid, set()).add(tag)

    def unprotect(self, peer: ID | str, tag: str) -> None:
        pid = ID.from_base58(peer) if isinstance(peer, str) else peer
        tags = self._protected.get(pid)
        if tags is not None:
            tags.discard(tag)
            if not tags:
                del self._protected[pid]

    def is_protected(self, peer: ID) -> bool:
        return peer in self._protected

    # --- learning addresses ------------------------------------------------------------

    def dialable(self, addr: str) -> str:
        """``policy.DIAL_OK`` or the reason a learned address is refused."""
        return dial_verdict(
            addr, allow_private=self.allow_private, allow_dns=self._cfg.allow_dns_dials
        )

    def learn(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        """Remember addresses a peer announced about itself (only when discovery is on)."""
        if not self._discover:
            return
        infos, kept = [], []
        for a in addrs:
            try:
                info = parse_peer_addr(a)
            except ValueError:
                continue
            if info.peer_id.to_base58() != peer_id:  # a peer may only speak for itself
                continue
            verdict = self.dialable(a)
            if verdict != DIAL_OK:
                if (peer_id, a) not in self._refused:
                    self._refused[(peer_id, a)] = None
                    while len(self._refused) > MAX_LEARNED:
                        del self._refused[next(iter(self._refused))]
                    self._metrics.dials_refused.labels(reason=verdict).inc()
                    log.info("not dialling %s at %s: %s address", peer_id, a, verdict)
                continue
            infos.append(info)
            kept.append(a)
        if not infos or infos[0].peer_id == self._p2p.peer_id:
            return
        pid = infos[0].peer_id
        merged = PeerInfo(pid, [a for i in infos for a in i.addrs])
        known = self._known.get(pid)
        deadline = trio.current_time() + LEARNED_TTL_S
        if known is None:
            self._known[pid] = KnownPeer(
                info=merged, bootstrap=False, forget_at=deadline, addrs=kept
            )
            self._forget_oldest()
        elif not known.bootstrap:
            known.info, known.forget_at, known.addrs = merged, deadline, kept

    def addresses(self, peer: ID) -> list[Any]:
        """The addresses ``peer`` announced (dial policy applied), for a stream to it before
        the keeper has dialled it."""
        kp = self._known.get(peer)
        return list(kp.info.addrs) if kp is not None else []

    def _forget_oldest(self) -> None:
        learned = [(kp.forget_at, pid) for pid, kp in self._known.items() if not kp.bootstrap]
        if len(learned) > MAX_LEARNED:
            for _at, pid in sorted(learned)[: len(learned) - MAX_LEARNED]:
                del self._known[pid]

    def known(self) -> list[KnownPeer]:
        return list(self._known.values())

    # --- connection manager --------------------------------------------------------------

    def trim(self) -> list[ID]:
        """Drop connections over the per-IP cap and the high watermark (see ``to_trim``);
        returns the peers hung up on."""
        connected = list(self._p2p.connected_peers())
        by_b58 = {p.to_base58(): p for p in connected}
        drop = to_trim(
            [(b58, *self._p2p.remote(p)) for b58, p in by_b58.items()],
            low=self._cfg.conn_low, high=self._cfg.conn_high,
            per_ip=self._cfg.max_conns_per_ip, per_relay=self._cfg.max_relayed_per_relay,
            protected=lambda b58: self.is_protected(by_b58[b58]),
            score=lambda b58: self._p2p.score(by_b58[b58]),
        )  # fmt: skip
        out = []
        for b58, why in drop:
            pid = by_b58[b58]
            self._metrics.connections_trimmed.labels(reason=why).inc()
            kp = self._known.get(pid)
            if kp is not None:
                kp.next_attempt = trio.current_time() + TRIMMED_BACKOFF_S
            out.append(pid)
        if out:
            log.info("connection manager dropping %d of %d connections", len(out), len(connected))
        return out

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            next_trim = trio.current_time() + TRIM_EVERY_S
            while True:
                now = trio.current_time()
                connected = self._p2p.connected_peers()
                room = len(connected) < self._cfg.conn_low
                for pid, kp in list(self._known.items()):
                    if pid in connected:
                        if kp.next_attempt <= now:
                            kp.backoff, kp.failures, kp.next_attempt = BACKOFF_MIN_S, 0, 0.0
                        continue
                    if kp.forget_at <= now:
                        del self._known[pid]
                        continue
                    if (kp.bootstrap or room) and not kp.dialing and kp.next_attempt <= now:
                        kp.dialing = True
                        nursery.start_soon(self._dial, kp)
                if now >= next_trim:
                    next_trim = now + TRIM_EVERY_S
                    for pid in self.trim():
                        nursery.start_soon(self._hang_up, pid)
                await trio.sleep(TICK_S)

    async def _hang_up(self, peer: ID) -> None:
        try:
            await self._p2p.host.disconnect(peer)
        except Exception as exc:  # a peer already gone is not our error
            log.debug("disconnecting %s: %s", peer.to_base58(), exc)

    async def _dial(self, kp: KnownPeer) -> None:
        host = self._p2p.host
        pid = kp.info.peer_id
        try:
            cast(Any, host.get_network()).unblock_peer(pid)  # Swarm, not in the interface
            if self._connect is not None:
                await self._connect(kp.info, DIAL_TIMEOUT_S)
            else:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await host.connect(kp.info)
        except Exception as exc:  # py-libp2p raises many unrelated types on dial failure
            kp.failures += 1
            # Bootstrap peers are retried within BACKOFF_MAX_S; a learned peer that keeps
            # failing backs off further, up to its TTL.
            cap = BACKOFF_MAX_S if kp.bootstrap else LEARNED_BACKOFF_MAX_S
            kp.backoff = backoff_after(kp.failures, BACKOFF_MIN_S, cap)
            kp.next_attempt = trio.current_time() + kp.backoff
            log.log(
                logging.INFO if kp.failures == 1 else logging.DEBUG,
                "dial %s failed (%s); retry in %.1f s",
                pid,
                exc or type(exc).__name__,
                kp.backoff,
            )
            self._metrics.dials.labels(outcome="error").inc()
        else:
            log.info("connected to %s", pid)
            kp.backoff, kp.failures = BACKOFF_MIN_S, 0
            self._metrics.dials.labels(outcome="ok").inc()
        finally:
            kp.dialing = False
