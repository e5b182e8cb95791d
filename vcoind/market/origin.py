"""Origin side of the market: the daemon a client submits to drives the task to the end.

    pending (bidding -> assigned) -> running -> completed | failed | cancelled

The task is on disk before ``submit`` returns. The origin gossips a
``TaskAnnounce``, collects ``Bid``s for a short window (its own node may bid too),
closed early once every node known to serve the model has bid,
ranks them with the configured strategy and assigns over ``/vcoin/task/1.0.0``.
No progress for ``timeout_s``, an assignment refused, or a worker that drops
out -> the next bidder (fresh bids when the list runs out), at most
``max_retries`` times; then ``failed`` with the reason. Tasks waiting to be
announced leave together (one announcement per burst, so one bid per bidder per
burst as well). A restarted origin
resumes every unfinished task from SQLite; a late result from an earlier
attempt's worker still completes the task (first result wins).

``TaskOrigin`` (here) owns the API, the stream handlers and each task's lifecycle
(start, drive, conclude, every write of its row). Its parts, built here and sharing the
live tasks (``vcoind.market.live``), are in ``vcoind.market``: ``bidding``
(announcements, bids, ranking), ``assign`` (assignments, batched per peer; a single-mode
task's attempts and retries), ``rounds`` (a consensus task's rounds, signatures and
settlement) and ``delegated`` (pipelined and training tasks, run through their ports);
``views`` has a task's public shape.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from vcoind.config import MarketConfig
from vcoind.consensus.outcome import result_hash
from vcoind.market.assign import Assignment
from vcoind.market.bidding import Bidding
from vcoind.market.consensus import Coordinator
from vcoind.market.delegated import run_pipeline, run_training
from vcoind.market.live import LiveTask, params_dict, params_from_dict, since
from vcoind.market.messages import (
    Ack,
    AnnouncedTask,
    Bid,
    GenParams,
    Progress,
    Send,
    TaskAnnounce,
    TaskResult,
)
from vcoind.market.payments import Payments, outcome_of
from vcoind.market.ports import Hold, Pipelines, Trainer, no_hold
from vcoind.market.rounds import ConsensusRounds
from vcoind.market.settle import Settled, Vote
from vcoind.market.views import generation_timings, task_view
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import StreamProtocolError
from vcoind.presence.view import NetworkView
from vcoind.store import TaskRow, TaskStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

__all__ = ["TaskError", "TaskOrigin", "generation_timings", "params_from_dict", "task_view"]

log = logging.getLogger("vcoind.origin")


class TaskError(Exception):
    """A task request that cannot be accepted (names the field)."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


class TaskOrigin:
    def __init__(
        self,
        tasks: TaskStore,
        metrics: NodeMetrics,
        config: MarketConfig,
        *,
        peer_id: str,
        network: str,
        publish_announce: Callable[[TaskAnnounce], Awaitable[None]],
        local_bid: Callable[[str, list[AnnouncedTask]], Bid | None],
        send: Send,
        notify: Callable[[dict[str, Any]], Awaitable[None]],
        view: NetworkView,
        reputations: Callable[[list[str]], Awaitable[dict[str, float]]],
        coordinator: Coordinator | None = None,
        settle: Callable[[Settled], Awaitable[None]] | None = None,
        pipelines: Pipelines | None = None,
        trainer: Trainer | None = None,
        payments: Payments | None = None,
        stalled: Callable[[str], Awaitable[None]] | None = None,
        hold: Hold = no_hold,
        spend_bid: Callable[[str], bool] = lambda peer: True,
    ) -> None:
        self._tasks = tasks
        self._network = network
        self._spend_bid = spend_bid  # the sender's bid budget (shared with gossiped bids)
        self._payments = payments
        self._metrics = metrics
        self.config = config
        self._peer_id = peer_id
        self._notify = notify
        self._view = view
        # Consensus tasks (commit-reveal rounds), anchoring, pipelined and training tasks:
        # each unavailable without its port.
        self._coordinator = coordinator
        self._settle = settle
        self._pipelines = pipelines
        self._trainer = trainer
        self._live: dict[str, LiveTask] = {}
        self._resumed = False  # run() has picked up the unfinished tasks of an earlier run
        self._nursery: trio.Nursery | None = None
        self._bidding = Bidding(
            tasks, config, self._live, peer_id=peer_id, network=network,
            publish_announce=publish_announce, local_bid=local_bid,
            view=view, reputations=reputations, payments=payments,
        )  # fmt: skip
        self._assignment = Assignment(
            tasks, metrics, config, view, self._bidding, send=send, update=self._update,
            nursery=self._running_nursery, stalled=stalled, hold=hold,
        )  # fmt: skip
        self._rounds: ConsensusRounds | None = None
        if coordinator is not None:
            self._rounds = ConsensusRounds(
                coordinator, tasks, view, self._live, self._bidding, self._assignment,
                config=config, update=self._update, nursery=self._running_nursery,
                settle=settle, pipelines=pipelines, stalled=stalled,
            )  # fmt: skip

    # --- API --------------------------------------------------------------

    async def submit(
        self,
        model: str,
        input_text: str,
        params: GenParams,
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        max_price: float | None = None,
        mode: str = "single",
        replicas: int | None = None,
        pipeline: bool = False,
        customer: str = "",
        adapter: str = "",
        chat: bool = False,
        stream: bool = False,
        strategy: str | None = None,
    ) -> str:
        """A task as ``vcoind.market.api`` checked it (mode, replicas, parameters, model,
        adapter); refused here only for what the origin knows: whether it runs and has the
        ports (consensus, pipelines) the task needs."""
        if self._nursery is None:
            raise TaskError("node", "the task market is not running")
        if mode == "pipeline" and self._pipelines is None:
            raise TaskError("pipeline", "pipelines are not available on this node")
        if mode == "auto":  # consensus when enough nodes serve the model to replicate it
            mode = "consensus" if len(self._view.serving(model)) >= (replicas or 3) else "single"
        if mode == "consensus" and self._coordinator is None:
            raise TaskError("mode", "consensus is not available on this node")
        if pipeline and self._pipelines is None:
            raise TaskError("pipeline", "pipelines are not available on this node")
        now = time.time()
        parameters = params_dict(params) | ({"adapter": adapter} if adapter else {})
        parameters |= ({"chat": True} if chat else {}) | ({"stream": True} if stream else {})
        parameters |= {"strategy": strategy} if strategy else {}
        task_id = secrets.token_hex(16)
        n = (replicas or 3) if mode == "consensus" else 1
        payment = (self._payments.payment_record(
            task_id, model, mode, n, params.greedy,
            max_price, params.max_new_tokens) if self._payments is not None else
            {"paid": False, "reason": "unpaid: no settlement on this node"})  # fmt: skip
        row = TaskRow(
            id=task_id, model=model, input=input_text,
            parameters=parameters, timeout_s=timeout_s or self.config.task_timeout_s,
            status="pending", phase="bidding", created_at=now, priority=priority,
            max_price=max_price, mode=mode,
            replicas=n, pipeline=pipeline, customer=customer, payment=payment,
        )  # fmt: skip
        return await self._launch(row)

    async def submit_training(
        self, model: str, description: str, parameters: dict[str, Any], *,
        timeout_s: float | None = None, priority: int = 0, customer: str = "",
    ) -> str:  # fmt: skip
        """A ``lora_training`` task; ``parameters`` holds the settings, the node count and
        where the dataset was saved (see ``vcoind.train``)."""
        if self._nursery is None:
            raise TaskError("node", "the task market is not running")
        if self._trainer is None:
            raise TaskError("type", "training is not available on this node")
        row = TaskRow(
            id=parameters["task_id"], type="lora_training", model=model, input=description,
            parameters={k: v for k, v in parameters.items() if k != "task_id"},
            timeout_s=timeout_s or self.config.task_timeout_s, status="pending",
            phase="bidding", created_at=time.time(), priority=priority, customer=customer,
        )  # fmt: skip
        return await self._launch(row)

    async def _launch(self, row: TaskRow) -> str:
        await self._tasks.insert(row)  # on disk before the id is returned
        self._metrics.tasks.labels(status="submitted").inc()
        self._start(row)
        return row.id

    async def cancel(self, task_id: str) -> TaskRow | None:
        live = self._live.get(task_id)
        if live is None:
            return await self._tasks.get(task_id)  # finished (or unknown): nothing to do
        live.cancelled = True
        if live.scope is not None:
            live.scope.cancel()
        live.wake()
        with trio.move_on_after(10):  # normally milliseconds: the driver is cancelled
            while task_id in self._live:
                await live.changed.wait()
        return await self._tasks.get(task_id)

    def in_flight(self) -> int:
        return len(self._live)

    def live_progress(self, task_id: str) -> int | None:
        live = self._live.get(task_id)
        return live.progress if live else None

    def live(self, task_id: str) -> LiveTask | None:
        """The task while it runs (its streamed text, its changes); None once it ended."""
        return self._live.get(task_id)

    # --- gossip and stream handlers ---------------------------------------

    async def on_bid(self, bid: Bid) -> None:
        """A gossiped bid (a node of an earlier version; gossip checked sender and budget)."""
        if bid.origin == self._peer_id:
            self._bidding.take(bid)

    async def on_direct_bid(self, peer: str, bid: Bid) -> Ack:
        """A bid on the task protocol: from its author, on our network, for tasks of ours
        still taking bids, within the sender's bid budget; else refused and counted."""
        if not self._spend_bid(peer):  # every request spends it, a refused one too
            self._metrics.budget_refused.labels(resource="bids").inc()
            raise StreamProtocolError("over budget: bids")
        if bid.peer_id != peer or bid.network != self._network:
            self._metrics.bids_refused.labels(reason="not_author").inc()
            raise StreamProtocolError("refused: a bid must come from its bidder, on this network")
        if bid.origin != self._peer_id or not any(
            self._bidding.taking_bids(o.task_id) for o in bid.offers
        ):
            self._metrics.bids_refused.labels(reason="not_announced").inc()
            raise StreamProtocolError("refused: no task of this origin takes bids")
        self._bidding.take(bid)
        return Ack()

    def _check_running(self) -> None:
        """Until the tasks of an earlier run are resumed, a result for one of them would be
        taken for a late duplicate: ask the worker to retry instead."""
        if not self._resumed:
            raise StreamProtocolError("the origin is starting; try again")

    async def on_progress(self, peer: str, p: Progress) -> Ack:
        self._check_running()
        live = self._live.get(p.task_id)
        if live is not None and live.attempt_peers.get(p.attempt) == peer:
            live.attempt_progress[p.attempt] = trio.current_time()
            if p.attempt == live.attempt:
                live.last_progress = trio.current_time()
                live.first_progress_s = 0.0
                if p.text:
                    await self._stream(live, p)
            live.progress = max(live.progress, p.tokens)
            live.wake()
        return Ack()

    async def _stream(self, live: LiveTask, p: Progress) -> None:
        """A text delta of a streamed task: what clients see grows; the task's channel
        gets what is new (``offset``, ``text``; ``restarts`` counts the times a retry
        started the answer over: a client that missed a notification asks vcoin_getTask
        for ``partial``)."""
        st = live.streamed
        before, restarts = st.shown, st.restarts
        if st.add(p.attempt, p.offset, p.text):
            offset = len(before) if st.restarts == restarts else 0
            await self._notify({"task_id": live.row.id, "offset": offset,
                                "text": st.shown[offset:], "restarts": st.restarts})  # fmt: skip

    async def on_result(self, peer: str, r: TaskResult) -> Ack:
        self._check_running()
        live = self._live.get(r.task_id)
        if live is None:
            return Ack()  # already finished: the first result won
        if live.attempt_peers.get(r.attempt) != peer:
            raise StreamProtocolError(f"attempt {r.attempt} of {r.task_id} is not yours")
        if live.row.mode == "consensus":
            if r.error and self._coordinator is not None:
                self._coordinator.on_attempt_failed(r.task_id, r.attempt, r.error)
            return Ack()  # a replica's answer comes by commit and reveal
        if r.error:
            if r.attempt == live.attempt:
                live.attempt_error = f"worker {peer} failed: {r.error}"
                live.wake()
        elif live.result is None:
            live.result = r
            live.wake()
        return Ack()

    # --- lifecycle --------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._bidding.announcer)
            for row in await self._tasks.unfinished():
                log.info("resuming task %s (%s)", row.id, row.phase)
                self._start(row, resumed=True)
            self._resumed = True
            task_status.started()
            await trio.sleep_forever()

    def _running_nursery(self) -> trio.Nursery:
        assert self._nursery is not None  # checked by submit(); run() sets it first
        return self._nursery

    def _start(self, row: TaskRow, resumed: bool = False) -> None:
        assert self._nursery is not None  # checked by submit(); run() sets it first
        live = LiveTask(row=row)
        self._live[row.id] = live
        self._nursery.start_soon(self._drive, live, resumed)

    async def _drive(self, live: LiveTask, resumed: bool) -> None:
        task_id = live.row.id
        try:
            with trio.CancelScope() as scope:
                live.scope = scope
                if resumed:  # a late result of an earlier attempt still counts
                    for a in await self._tasks.attempts(task_id):
                        live.attempt_peers[a.attempt] = a.peer_id
                        live.attempt = max(live.attempt, a.attempt)
                    await self._bidding.rejoined(live.row.model)
                outcome = await self._run_attempts(live, resumed)
            if live.cancelled:
                outcome = ("cancelled", "cancelled by the client")
            await self._conclude(live, *outcome)
        except Exception:  # never lose a task silently: record why and move on
            log.exception("task %s failed unexpectedly", task_id)
            await self._conclude(live, "failed", "internal error at the origin")
        finally:
            self._live.pop(task_id, None)
            live.wake()

    async def _run_attempts(self, live: LiveTask, resumed: bool) -> tuple[str, str | None]:
        if live.row.type == "lora_training":
            assert self._trainer is not None  # submit_training() checked
            return await run_training(live, self._trainer, self._bidding, self._update)
        if live.row.mode == "consensus":
            assert self._rounds is not None  # submit() refuses consensus tasks without one
            return await self._rounds.run(live)
        if live.row.mode == "pipeline":
            assert self._pipelines is not None  # submit() refuses pipelines without it
            return await run_pipeline(live, self._pipelines, self._tasks, self._update)
        return await self._assignment.run_single(live, resumed)

    async def _conclude(self, live: LiveTask, status: str, error: str | None) -> None:
        row = live.row
        r = live.result
        if live.final is not None and status == "completed":
            timings = {**row.timings, "total_s": since(row)}
            await self._update(live, status="completed", phase="completed", error=None,
                               completed_at=time.time(), timings=timings, **live.final)  # fmt: skip
        elif r is not None and status == "completed":
            peer = next((p for a, p in live.attempt_peers.items() if a == r.attempt), row.node_id)
            await self._tasks.finish_attempt(row.id, r.attempt, "completed", None, time.time())
            if r.attempt != live.attempt:  # an earlier attempt won: stop the later one
                await self._tasks.finish_attempt(
                    row.id, live.attempt, "superseded", f"attempt {r.attempt} finished first",
                    time.time(),
                )  # fmt: skip
                await self._assignment.cancel_worker(live)
            tokens = len(r.token_ids)
            timings = {**row.timings, "total_s": since(row), **generation_timings(r),
                       "model_id": r.model_id}  # fmt: skip
            self._metrics.exec_time.observe(r.prefill_s + r.decode_s)
            await self._update(
                live, status="completed", phase="completed", result=r.text, node_id=peer,
                retry_count=live.attempt - 1,
                progress=tokens, completed_at=time.time(), timings=timings, error=None,
                model_id=r.model_id,
            )  # fmt: skip
            if self._settle is not None and r.signature and peer is not None:
                price = next((b.price_per_token for b in live.bids if b.peer_id == peer), 0)
                deterministic = params_from_dict(row.parameters).greedy
                settled = Settled(
                    task_id=row.id, model_id=r.model_id, mode="single",
                    outcome=outcome_of(result_hash(r.text), "majority", tokens, r.profile,
                                       deterministic),
                    votes=[Vote(peer, r.eth_address, r.signature, price)], replicas=1,
                    deterministic=deterministic, ticket=live.ticket, customer=row.customer,
                )  # fmt: skip
                assert self._nursery is not None
                self._nursery.start_soon(self._settle, settled)
        else:
            if live.attempt and status == "cancelled":
                await self._assignment.cancel_worker(live)
            await self._update(live, status=status, phase=status, error=error,
                               completed_at=time.time(), timings={**row.timings,
                               "total_s": since(row)})  # fmt: skip
        self._metrics.tasks.labels(status=status).inc()
        log.info("task %s %s%s", row.id, status, f": {error}" if error else "")

    async def _update(self, live: LiveTask, **changes: Any) -> None:
        with trio.CancelScope(shield=True):  # a cancel must not leave the row half-updated
            await self._tasks.update(live.row.id, **changes)
        live.row = TaskRow(**{**live.row.__dict__, **changes})
        await self._notify(task_view(live.row, live.attempt, live.progress))
