"""The presence service: our heartbeat out, others' heartbeats into the peer table.

It mounts the heartbeat gossip routes (full heartbeats with the binding check, and the
small beats between them, resolved by :class:`PresenceSync`), teaches the peer keeper
the addresses heartbeats carry, and offers the :class:`NetworkView` the other services
ask about the network. Capability changes (a model loaded, a span served, an adapter
trained) go through :meth:`PresenceService.announce` and are gossiped at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from vcoind.compute.telemetry import HostSample, Telemetry
from vcoind.consensus.health import health_score
from vcoind.consensus.reputation import DEFAULT_REPUTATION, reputation_factor
from vcoind.metrics import NodeMetrics
from vcoind.p2p.gossip import Gossip
from vcoind.presence.heartbeat import BindingCheck, HeartbeatService
from vcoind.presence.messages import Beat, Heartbeat
from vcoind.presence.peers import PeerTable
from vcoind.presence.sync import PresenceSync
from vcoind.presence.view import NetworkView
from vcoind.signer import Signer
from vcoind.store import Store
from vcoind.store.consensus import ConsensusStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.config import P2PConfig
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.presence")
# Reputation -> gossip application score: 0 for a new peer (reputation 100), -10 at
# reputation 0, +8.2 at the cap; re-read from the store this often.
REPUTATION_SCORE_WEIGHT = 20.0
REPUTATION_REFRESH_S = 5.0


class PresenceService:
    def __init__(
        self,
        cfg: P2PConfig,
        network: str,
        peer_id: str,
        signer: Signer,
        store: Store,
        gossip: Gossip,
        metrics: NodeMetrics,
        *,
        addrs: Callable[[], list[str]],
        connected: Callable[[], set[str]],
        error_rate: Callable[[], float],
        response_s: Callable[[], float | None] = lambda: None,
        eligible: Callable[[str | None], bool] = lambda address: True,
    ) -> None:
        self._gossip = gossip
        self._error_rate = error_rate  # our failed attempts' share (not clients' RPC errors)
        self._response_s = response_s  # our measured time to first token
        self._reputations = ConsensusStore(store)
        self._app_scores: dict[str, float] = {}
        self.telemetry = Telemetry()
        self.peers = PeerTable(
            store, metrics, peer_timeout=cfg.peer_timeout, base_interval=cfg.heartbeat_interval,
            error_rate=gossip.error_rate, max_peers=cfg.max_peers, staked=eligible,
        )  # fmt: skip
        self.heartbeat = HeartbeatService(
            gossip, signer, peer_id, network, base_interval=cfg.heartbeat_interval,
            telemetry=self.telemetry, peer_count=lambda: len(self.peers), addrs=addrs,
            health=self._self_health,
        )  # fmt: skip
        self._binding = BindingCheck()
        self.sync = PresenceSync(
            self.peers, self._binding, own_full=lambda: self.heartbeat.last_full,
            connected=connected,
        )  # fmt: skip
        self.view = NetworkView(
            peer_id, signer.address, self.peers, self.heartbeat, connected=connected,
            eligible=eligible,
        )  # fmt: skip

    def mount(self, m: Mounts) -> None:
        m.gossip.on("heartbeat", Heartbeat, self.sync.on_full, check=self._binding,
                    known=self.peers.known)  # fmt: skip
        m.gossip.on("heartbeat", Beat, self.sync.on_beat, known=self.peers.known)
        self.sync.mount(m.streams)
        m.gossip.use_app_score(self.app_score)

    def app_score(self, peer_id: str) -> float:
        """The gossip application score of a peer: our reputation of it, 0 when new."""
        return self._app_scores.get(peer_id, 0.0)

    async def _refresh_app_scores(self) -> None:
        while True:
            peers = [st.peer_id for st in self.peers.peers()]
            try:
                reps = await self._reputations.reputations(peers, DEFAULT_REPUTATION)
            except Exception:  # the store closing at shutdown; retried next round
                log.debug("reading reputations failed", exc_info=True)
            else:
                self._app_scores = {p: REPUTATION_SCORE_WEIGHT * (reputation_factor(r) - 0.5)
                                    for p, r in reps.items()}  # fmt: skip
            await trio.sleep(REPUTATION_REFRESH_S)

    def on_seen(self, fn: Callable[[Heartbeat], None]) -> None:
        """Call ``fn`` with every heartbeat the peer table takes (addresses to learn)."""
        self.peers.on_seen.append(fn)

    def announce(self, **changes: Any) -> None:
        """Change what we announce (models, spans, services, adapters); gossiped at once."""
        caps = dataclasses.replace(self.heartbeat.capabilities, **changes)
        if caps != self.heartbeat.capabilities:
            self.heartbeat.set_capabilities(caps)

    def note_queue(self, queue_length: int) -> None:
        """Our queue length: it rides on the next heartbeat (bids carry it at once)."""
        self.heartbeat.capabilities = dataclasses.replace(
            self.heartbeat.capabilities, queue_length=queue_length
        )

    def _self_health(self, sample: HostSample) -> float:
        return health_score(sample.cpu_percent, sample.memory_percent, self._response_s(),
                            self._error_rate())  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.peers.run)
            await nursery.start(self.sync.run)
            await nursery.start(self.heartbeat.run)
            nursery.start_soon(self._refresh_app_scores)
            task_status.started()
