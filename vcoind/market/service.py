"""The market service: this node as a task's origin, as a worker, and as a replica.

It builds the worker, the origin, the consensus roles (replica and coordinator) and the
pipeline client from the market config and its ports, and mounts their gossip routes
(tasks: announcements; votes: commitments, closes, reveals, outcome votes),
their handlers on ``/vcoin/task/1.0.0`` and the task and consensus RPC methods. The
path of one task: ``market.api`` -> ``TaskOrigin`` -> ``TaskProtocol`` -> ``TaskWorker``
-> ``compute.executor`` -> back to the origin -> ``settle`` -> the chain's queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from vcoind.consensus.reputation import DEFAULT_REPUTATION, updated_reputation
from vcoind.market.api import REST_ALIASES, register_consensus_api, register_task_api
from vcoind.market.consensus import Coordinator, Replica, VoteContext
from vcoind.market.messages import Assignments, Bid, Cancel, Progress, TaskAnnounce, TaskResult
from vcoind.market.origin import TaskOrigin
from vcoind.market.payments import Payments
from vcoind.market.ports import Hold, no_hold
from vcoind.market.protocol import TaskProtocol
from vcoind.market.routes import Routes
from vcoind.market.votes import (
    CommitsClosed,
    OutcomeVote,
    ResultCommitment,
    ResultReveal,
    RevealsClosed,
)
from vcoind.market.worker import TaskWorker
from vcoind.metrics import NodeMetrics
from vcoind.p2p.gossip import Gossip
from vcoind.p2p.streams import Ack, StreamProtocolError, StreamService
from vcoind.store import ConsensusStore, Store, TaskStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.chain.service import ChainService
    from vcoind.compute.service import ComputeService
    from vcoind.config import MarketConfig
    from vcoind.market.ports import Trainer
    from vcoind.market.settle import Settler
    from vcoind.presence.service import PresenceService
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.market")


class MarketService:
    def __init__(
        self,
        cfg: MarketConfig,
        network: str,
        payments: Payments,
        store: Store,
        gossip: Gossip,
        streams: StreamService,
        metrics: NodeMetrics,
        presence: PresenceService,
        compute: ComputeService,
        *,
        publish: Callable[[str, Any], Awaitable[None]],
        settler: Settler | None = None,
        trainer: Trainer | None = None,
        chain: ChainService | None = None,
        hold: Hold = no_hold,
    ) -> None:
        self.cfg = cfg
        view = self.view = presence.view
        me = view.peer_id
        self._gossip = gossip
        self._network = network
        self._metrics = metrics
        self._presence = presence
        self._compute = compute
        self._publish = publish
        self._trainer = trainer
        self._chain = chain
        self._nursery: trio.Nursery | None = None
        self.tasks = TaskStore(store)
        self.consensus_store = ConsensusStore(store)
        self.protocol = TaskProtocol(streams, me)
        self._embedder: Any = None
        self._embed_limiter = trio.CapacityLimiter(1)
        self._local_votes, self._local_votes_rx = trio.open_memory_channel[Any](256)
        self.payments = payments
        ctx = VoteContext(me, network, payments, self._publish_vote, self.embed,
                          metrics.consensus_rejected, self._send_reveal)  # fmt: skip
        self.replica = Replica(ctx, fault=cfg.fault)
        self.coordinator = Coordinator(ctx, self.consensus_store,
                                       eth_address_of=view.eth_address_of,
                                       health_of=view.health_of, hold=hold)  # fmt: skip
        self.routes = Routes(compute, view, metrics)
        self.worker = TaskWorker(
            compute, self.tasks, peer_id=me, network=network,
            send=self.protocol.send, send_bid=self.protocol.send_bid,
            health=lambda: view.health_of(me),
            on_change=self._worker_changed,
            commit_result=self.replica.commit, payments=payments, pipelines=self.routes,
            trainer=trainer, max_queued_per_origin=cfg.max_queued_per_origin,
            refused=lambda kind, reason: metrics.sign_refused.labels(kind, reason).inc(),
            over_budget=lambda resource: metrics.budget_refused.labels(resource).inc(),
            hold=hold,
        )  # fmt: skip
        self.origin = TaskOrigin(
            self.tasks, metrics, cfg, peer_id=me, network=network,
            publish_announce=lambda ann: gossip.publish("tasks", ann),
            local_bid=self.worker.make_bid, send=self.protocol.send, notify=self._notify_task,
            view=view,
            reputations=self.reputations, coordinator=self.coordinator,
            settle=settler.settle if settler is not None else None,
            pipelines=self.routes, trainer=trainer, payments=payments,
            stalled=self._stalled, hold=hold,
            spend_bid=lambda peer: gossip.budgets.take("bids", peer, time.monotonic()),
        )  # fmt: skip

    async def _stalled(self, peer: str) -> None:
        """A worker accepted a task and made no progress: it loses reputation as a replica
        that never commits does."""
        await self.consensus_store.adjust_reputation(
            peer, lambda rep: updated_reputation(rep, "timeout")
        )

    async def reputations(self, peers: list[str]) -> dict[str, float]:
        return await self.consensus_store.reputations(peers, DEFAULT_REPUTATION)

    # --- mounting ------------------------------------------------------------

    def mount(self, m: Mounts) -> None:
        m.gossip.on("tasks", TaskAnnounce, self.worker.on_announce)
        m.gossip.on("tasks", Bid, self.origin.on_bid)  # from nodes of an earlier version
        # Hashes only on gossip; reveals (answers) come on the task protocol.
        for record in (ResultCommitment, CommitsClosed, RevealsClosed, OutcomeVote):
            m.gossip.on("votes", record, self._on_vote_record)
        p = self.protocol
        p.handle(ResultReveal, self._on_direct_reveal)
        p.handle(Bid, self.origin.on_direct_bid)
        p.handle(Assignments, self.worker.on_assignments)
        p.handle(Cancel, self.worker.on_cancel)
        p.handle(Progress, self.origin.on_progress)
        p.handle(TaskResult, self.origin.on_result)
        register_task_api(m.rpc, self.origin, self.tasks, self.consensus_store, self.view,
                          trainer=self._trainer, chain=self._chain)  # fmt: skip
        register_consensus_api(m.rpc, self.consensus_store, self.tasks, self.coordinator,
                               self.view, fault=self.cfg.fault)  # fmt: skip
        for path, method in REST_ALIASES.items():
            m.http.add_get_alias(path, method)

    # --- consensus: embeddings and the vote bus ------------------------------

    async def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]:
        """Sentence embeddings (all-MiniLM-L6-v2), computed off the trio thread."""
        if self._embedder is None:
            self._compute.torch_threads()
            from vcoind.consensus.embedding import Embedder

            self._embedder = Embedder()
        result: list[tuple[float, ...]] = await trio.to_thread.run_sync(
            self._embedder.embed, list(texts), limiter=self._embed_limiter
        )
        return result

    async def _publish_vote(self, record: Any) -> None:
        await self._gossip.publish("votes", record)
        # Gossip does not hand our own messages back; our own roles still need them
        # (the origin may be one of the replicas). Delivered from a queue, not inline:
        # a handler that publishes must not re-enter the caller.
        await self._local_votes.send(record)

    async def _send_reveal(self, peer: str, reveal: ResultReveal) -> None:
        await self.protocol.send(peer, reveal, Ack)

    async def _on_direct_reveal(self, peer: str, r: ResultReveal) -> Ack:
        """A reveal on the task protocol: only its author may send it."""
        if peer != r.peer_id or r.network != self._network:
            self._metrics.consensus_rejected.labels(reason="not_author").inc()
            raise StreamProtocolError("refused: a reveal must come from its author, "
                                      "on this network")  # fmt: skip
        await self._on_vote_record(r)
        return Ack()

    async def _deliver_local_votes(self) -> None:
        async for record in self._local_votes_rx:
            try:
                await self._on_vote_record(record)
            except Exception:  # like gossip handlers: a bug must not take the node down
                log.exception("local %s handler failed", type(record).__name__)

    async def _on_vote_record(self, record: Any) -> None:
        if isinstance(record, ResultCommitment):
            self.replica.on_commitment(record)
            await self.coordinator.on_commitment(record)
        elif isinstance(record, CommitsClosed):
            self._spawn(self.replica.on_closed, record)  # may wait for others' reveals
        elif isinstance(record, ResultReveal):
            await self.coordinator.on_reveal(record)
            self._spawn(self.replica.on_reveal, record)  # may tally (embedding) and sign
        elif isinstance(record, RevealsClosed):
            self._spawn(self.replica.on_reveals_closed, record)
        elif isinstance(record, OutcomeVote):
            await self.coordinator.on_vote(record)

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:  # not running yet (or stopped): nothing to answer
            log.debug("%s dropped: the market is not running", type(args[0]).__name__)
            return
        self._nursery.start_soon(fn, *args)

    # --- notifications ---------------------------------------------------------

    async def _notify_task(self, view: dict[str, Any]) -> None:
        if "status" not in view:  # a streamed task's text delta: on its own channel only
            await self._publish(f"task:{view['task_id']}", view)
            return
        self._metrics.tasks_in_flight.set(self.origin.in_flight())
        await self._publish(f"task:{view['task_id']}", view)
        await self._publish("tasks", view)

    def _worker_changed(self) -> None:
        q = self.worker.queue_length
        self._metrics.queue_length.set(q)
        for model_id, tps in self.worker.tokens_per_s.items():
            self._metrics.tokens_per_s.labels(model=model_id).set(tps)
        self._presence.note_queue(q)

    # --- running ----------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.protocol.serve()  # every service has registered its handlers by now
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._deliver_local_votes)
            await nursery.start(self.worker.run)
            await nursery.start(self.origin.run)
            task_status.started()
