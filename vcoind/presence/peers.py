"""The peer table: who is alive, what they can do, how healthy they look from here.

A peer enters on its first valid heartbeat and leaves when it has been silent
for its expiry: max(peer_timeout, peer_timeout / base_interval x the interval the
peer announces), so a peer that stretched its interval in a big network is
not dropped early. It rejoins on its next heartbeat. The observer-side health
score uses the peer's own CPU/memory figures, the publish-to-receive latency we
measure, and the share of its messages we rejected.

The table holds at most ``max_peers``: a newcomer evicts a peer whose address has no
stake: one that missed two of its beats if any, else the one that joined last (established
peers stay through a flood of fresh identities); when every peer is staked, an unstaked
newcomer is refused (without a stake rule every peer counts as staked).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vcoind.consensus.health import health_score
from vcoind.metrics import NodeMetrics
from vcoind.presence.messages import Heartbeat
from vcoind.store import PeerUpdate, Store

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.peers")
# Latency statistics cover the most recent samples.
LATENCY_SAMPLES = 1000
# GossipSub replays its recent messages (a few seconds old) to a peer that joins, so
# the first seconds of a peer's heartbeats measure their age, not the network: latency
# is sampled once a peer has been in the table this long.
LATENCY_WARMUP_S = 5.0
EWMA_ALPHA = 0.2


@dataclass
class PeerState:
    heartbeat: Heartbeat
    first_seen: float  # unix time
    last_seen: float  # unix time
    expires_at: float  # trio clock
    latency_s: float  # EWMA of publish-to-receive latency
    health: float  # observer-side health score

    @property
    def peer_id(self) -> str:
        return self.heartbeat.peer_id


class PeerTable:
    def __init__(
        self,
        store: Store,
        metrics: NodeMetrics,
        *,
        peer_timeout: float,
        base_interval: float,
        error_rate: Callable[[str], float],
        max_peers: int = 2000,
        staked: Callable[[str], bool] = lambda address: True,
    ) -> None:
        self._max_peers = max_peers
        self._staked = staked
        self._store = store
        self._metrics = metrics
        self._timeout = peer_timeout
        self._ratio = peer_timeout / base_interval
        self._error_rate = error_rate
        self._peers: dict[str, PeerState] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.latency_total = 0  # samples ever taken (the deque keeps the recent ones)
        self.on_seen: list[Callable[[Heartbeat], None]] = []
        # (peer id, online, when): a peer joined (at its heartbeat) or left (at its last).
        self.on_presence: list[Callable[[str, bool, float], Awaitable[None]]] = []
        self._changed = trio.Event()
        self._dirty: dict[str, PeerUpdate] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: str) -> PeerState | None:
        return self._peers.get(peer_id)

    def known(self, peer_id: str) -> bool:
        return peer_id in self._peers

    def _victim(self, newcomer: Heartbeat) -> str | None:
        """Whom a newcomer replaces in a full table (None: the newcomer is refused)."""
        unstaked = [st for st in self._peers.values()
                    if not self._staked(st.heartbeat.eth_address)]  # fmt: skip
        if unstaked:
            return self._least_established(unstaked).peer_id
        if not self._staked(newcomer.eth_address):
            return None
        return self._least_established(list(self._peers.values())).peer_id

    @staticmethod
    def _least_established(peers: list[PeerState]) -> PeerState:
        """A peer that missed two of its beats (likely gone) goes first, the longest silent;
        otherwise the one that joined last. Established peers stay: a flood of fresh
        identities only churns the places it took itself."""
        now = time.time()
        silent = [st for st in peers if now - st.last_seen > 2 * st.heartbeat.interval]
        if silent:
            return min(silent, key=lambda st: st.last_seen)
        return max(peers, key=lambda st: st.first_seen)

    async def _remove(self, peer_id: str, why: str) -> None:
        st = self._peers.pop(peer_id)
        log.info("peer left %s (%s)", peer_id, why)
        self._notify()
        await self._store.mark_offline(peer_id)
        for presence in self.on_presence:
            await presence(peer_id, False, st.last_seen)

    def peers(self) -> list[PeerState]:
        return sorted(self._peers.values(), key=lambda p: p.peer_id)

    def expiry_for(self, hb: Heartbeat) -> float:
        return max(self._timeout, self._ratio * hb.interval)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._metrics.peers.set(len(self._peers))

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        now = time.time()
        prev = self._peers.get(hb.peer_id)
        if prev is not None and hb.seq <= prev.heartbeat.seq:
            return  # an older beat that arrived late (gossip reorders): keep the newer state
        if prev is None and len(self._peers) >= self._max_peers:
            victim = self._victim(hb)
            if victim is None:
                self._metrics.gossip_ignored.labels(kind="heartbeat",
                                                    reason="peer_table_full").inc()  # fmt: skip
                return
            self._metrics.peers_evicted.inc()
            await self._remove(victim, f"evicted for {hb.peer_id}: table full")
        ewma = prev.latency_s if prev is not None else 0.0
        if prev is not None and now - prev.first_seen >= LATENCY_WARMUP_S:
            latency = max(0.0, now - hb.timestamp)
            self.latencies.append(latency)
            self.latency_total += 1
            self._metrics.gossip_latency.observe(latency)
            ewma = (1 - EWMA_ALPHA) * ewma + EWMA_ALPHA * latency if ewma else latency
        health = health_score(hb.cpu_percent, hb.memory_percent, ewma, self._error_rate(hb.peer_id))
        self._peers[hb.peer_id] = PeerState(
            heartbeat=hb,
            first_seen=prev.first_seen if prev else now,
            last_seen=now,
            expires_at=trio.current_time() + self.expiry_for(hb),
            latency_s=ewma,
            health=health,
        )
        if prev is None:
            log.info("peer joined %s (%s)", hb.peer_id, hb.eth_address)
            self._notify()
            for presence in self.on_presence:
                await presence(hb.peer_id, True, now)
        for cb in self.on_seen:
            cb(hb)
        # Written in batches by run(): a busy network must not cost one transaction per beat.
        self._dirty[hb.peer_id] = PeerUpdate(
            hb.peer_id,
            hb.eth_address,
            hb.listen_addrs,
            hb.device.name,
            hb.device.memory_total_mb,
            hb.device.cuda_version,
            health,
            hb.software,
            now,
        )

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        tick = min(1.0, self._timeout / 4)
        try:
            while True:
                await trio.sleep(tick)
                await self.flush()
                now = trio.current_time()
                for peer_id, st in list(self._peers.items()):
                    if st.expires_at <= now and peer_id in self._peers:
                        silent = time.time() - st.last_seen
                        await self._remove(peer_id, f"silent for {silent:.1f} s")
        finally:
            with trio.CancelScope(shield=True):  # keep what we heard before shutdown
                await self.flush()

    async def flush(self) -> None:
        """Write the heartbeats received since the last flush to the store."""
        if self._dirty:
            batch, self._dirty = list(self._dirty.values()), {}
            await self._store.upsert_peers(batch)

    def latency_stats(self) -> dict[str, float | int]:
        samples = sorted(self.latencies)
        if not samples:
            return {"count": 0, "total": self.latency_total}
        return {
            "count": len(samples),
            "total": self.latency_total,
            "p50_ms": round(1000 * statistics.median(samples), 3),
            "p95_ms": round(1000 * samples[min(len(samples) - 1, int(0.95 * len(samples)))], 3),
            "max_ms": round(1000 * samples[-1], 3),
        }
