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
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from vcoind.compute.shard_host import PipelineError
from vcoind.config import MarketConfig
from vcoind.consensus.outcome import result_hash
from vcoind.consensus.reputation import DEFAULT_REPUTATION
from vcoind.market.consensus import Coordinator, RoundResult, RoundState, choose_replicas
from vcoind.market.messages import (
    ACCEPTED_BEFORE,
    MAX_BATCH,
    Accepted,
    Ack,
    AnnouncedTask,
    Assign,
    Assignments,
    Bid,
    Cancel,
    GenParams,
    Progress,
    RouteHop,
    Send,
    TaskAnnounce,
    TaskBid,
    TaskResult,
)
from vcoind.market.ports import Pipelines, Trainer, WorkError
from vcoind.market.selection import SelectionState, rank
from vcoind.market.settle import Settled
from vcoind.market.votes import MAX_REPLICAS
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import StreamOpenError, StreamProtocolError
from vcoind.presence.view import NetworkView
from vcoind.store import FINISHED, BidRow, SignatureRow, TaskRow, TaskStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.origin")

ASSIGN_TIMEOUT_S = 5.0
REDIAL_WAIT_S = 0.5
REANNOUNCE_S = 1.0
PROGRESS_WRITE_EVERY_S = 0.5


class TaskError(Exception):
    """A task request that cannot be accepted (names the field)."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass
class _Live:
    row: TaskRow
    attempt: int = 0
    bids: list[TaskBid] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    attempt_peers: dict[int, str] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    last_progress: float = 0.0
    progress: int = 0
    result: TaskResult | None = None
    attempt_error: str | None = None
    cancelled: bool = False
    scope: trio.CancelScope | None = None
    submitted_mono: float = field(default_factory=time.monotonic)
    final: dict[str, Any] | None = None  # a consensus task's concluding row changes

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass
class _Verdict:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


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
        publish_bid: Callable[[Bid], Awaitable[None]],
        send: Send,
        notify: Callable[[dict[str, Any]], Awaitable[None]],
        view: NetworkView,
        reputations: Callable[[list[str]], Awaitable[dict[str, float]]],
        coordinator: Coordinator | None = None,
        settle: Callable[[Settled], Awaitable[None]] | None = None,
        pipelines: Pipelines | None = None,
        trainer: Trainer | None = None,
    ) -> None:
        self._tasks = tasks
        self._metrics = metrics
        self.config = config
        self._peer_id = peer_id
        self._network = network
        self._publish_announce = publish_announce
        self._local_bid = local_bid
        self._publish_bid = publish_bid
        self._send = send
        self._notify = notify
        self._view = view
        # Consensus tasks (commit-reveal rounds), anchoring, pipelined and training tasks:
        # each unavailable without its port.
        self._coordinator = coordinator
        self._reputations = reputations
        self._settle = settle
        self._pipelines = pipelines
        self._trainer = trainer
        self._live: dict[str, _Live] = {}
        self._resumed = False  # run() has picked up the unfinished tasks of an earlier run
        self._selection = SelectionState()
        self._nursery: trio.Nursery | None = None
        self._to_announce: list[AnnouncedTask] = []
        self._announce_wake = trio.Event()
        self._to_assign: dict[str, list[tuple[Assign, _Verdict]]] = {}

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
    ) -> str:
        if self._nursery is None:
            raise TaskError("node", "the task market is not running")
        if mode not in ("single", "consensus", "auto", "pipeline"):
            raise TaskError("mode", "must be single, consensus, auto or pipeline")
        if mode == "pipeline" and self._pipelines is None:
            raise TaskError("pipeline", "pipelines are not available on this node")
        if replicas is not None and not 2 <= replicas <= 5:
            raise TaskError("replicas", "must be 2 to 5")
        if mode == "auto":  # consensus when enough nodes serve the model to replicate it
            mode = "consensus" if len(self._view.serving(model)) >= (replicas or 3) else "single"
        if mode == "consensus" and self._coordinator is None:
            raise TaskError("mode", "consensus is not available on this node")
        if pipeline and mode != "consensus":
            raise TaskError("pipeline", "a pipelined task is mode pipeline, or consensus")
        if pipeline and self._pipelines is None:
            raise TaskError("pipeline", "pipelines are not available on this node")
        if adapter and (pipeline or mode == "pipeline"):
            raise TaskError("adapter", "an adapter runs on whole-model tasks, not pipelines")
        now = time.time()
        parameters = _params_dict(params) | ({"adapter": adapter} if adapter else {})
        row = TaskRow(
            id=secrets.token_hex(16), model=model, input=input_text,
            parameters=parameters, timeout_s=timeout_s or self.config.task_timeout_s,
            status="pending", phase="bidding", created_at=now, priority=priority,
            max_price=max_price, mode=mode,
            replicas=(replicas or 3) if mode == "consensus" else 1, pipeline=pipeline,
            customer=customer,
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

    # --- gossip and stream handlers ---------------------------------------

    async def on_bid(self, bid: Bid) -> None:
        if bid.origin == self._peer_id:
            self._take_bid(bid)

    def _take_bid(self, bid: Bid) -> None:
        for tb in bid.task_bids():
            live = self._live.get(tb.task_id)
            if live is None:
                continue  # not ours, or already decided
            if not self._view.eligible(tb.peer_id):
                log.debug("bid of %s for %s ignored: not staked", tb.peer_id, tb.task_id)
                continue
            if all(b.peer_id != tb.peer_id for b in live.bids):
                live.bids.append(tb)
                live.wake()

    def _check_running(self) -> None:
        """Until the tasks of an earlier run are resumed, a result for one of them would be
        taken for a late duplicate: ask the worker to retry instead."""
        if not self._resumed:
            raise StreamProtocolError("the origin is starting; try again")

    async def on_progress(self, peer: str, p: Progress) -> Ack:
        self._check_running()
        live = self._live.get(p.task_id)
        if live is not None and live.attempt_peers.get(p.attempt) == peer:
            if p.attempt == live.attempt:
                live.last_progress = trio.current_time()
            live.progress = max(live.progress, p.tokens)
            live.wake()
        return Ack()

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
            nursery.start_soon(self._announcer)
            for row in await self._tasks.unfinished():
                log.info("resuming task %s (%s)", row.id, row.phase)
                self._start(row, resumed=True)
            self._resumed = True
            task_status.started()
            await trio.sleep_forever()

    def _start(self, row: TaskRow, resumed: bool = False) -> None:
        assert self._nursery is not None  # checked by submit(); run() sets it first
        live = _Live(row=row)
        self._live[row.id] = live
        self._nursery.start_soon(self._drive, live, resumed)

    async def _drive(self, live: _Live, resumed: bool) -> None:
        task_id = live.row.id
        try:
            with trio.CancelScope() as scope:
                live.scope = scope
                if resumed:  # a late result of an earlier attempt still counts
                    for a in await self._tasks.attempts(task_id):
                        live.attempt_peers[a.attempt] = a.peer_id
                        live.attempt = max(live.attempt, a.attempt)
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

    async def _run_attempts(self, live: _Live, resumed: bool) -> tuple[str, str | None]:
        if live.row.type == "lora_training":
            return await self._run_training(live, resumed)
        if live.row.mode == "consensus":
            return await self._run_consensus(live)
        if live.row.mode == "pipeline":
            return await self._run_pipeline(live)
        cfg = self.config
        last_error = "no node bid for the task"
        candidates: list[TaskBid] = []
        if resumed and live.attempt and live.row.phase in ("assigned", "running"):
            # Restarted mid-attempt: give its worker the task timeout to report back.
            peer = live.attempt_peers[live.attempt]
            live.last_progress = trio.current_time()
            error = await self._await_result(live, peer, require_alive=False)
            if error is None:
                return "completed", None
            await self._attempt_failed(live, peer, error)
            last_error = error
        while True:
            if live.result is not None:
                return "completed", None
            if not candidates:
                candidates = await self._collect_bids(live)
                if not candidates:
                    return "failed", (
                        f"{last_error}: no bid for model {live.row.model!r} within "
                        f"{cfg.no_bid_timeout_s:g} s"
                        if live.attempt == 0
                        else f"gave up after {live.attempt} attempts: {last_error}"
                    )
            if live.attempt >= 1 + cfg.max_retries:
                return "failed", f"gave up after {live.attempt} attempts: {last_error}"
            bid = candidates.pop(0)
            live.attempt += 1
            error = await self._attempt(live, bid)
            if error is None:
                return "completed", None
            last_error = error
            await self._attempt_failed(live, bid.peer_id, error)

    async def _attempt_failed(self, live: _Live, peer: str, error: str) -> None:
        live.tried.add(peer)
        await self._tasks.finish_attempt(live.row.id, live.attempt, "failed", error, time.time())
        log.info("task %s attempt %d on %s failed: %s", live.row.id, live.attempt, peer, error)
        await self._update(live, retry_count=live.attempt, phase="bidding", status="pending")

    async def _run_consensus(self, live: _Live) -> tuple[str, str | None]:
        """Replicas, commit-reveal, vote; when confidence is below 75 % one more round with
        two more replicas (at most 5); if that is still below 60 %, the answer is marked as a
        conservative fallback. A restarted origin starts the rounds afresh."""
        co = self._coordinator
        assert co is not None  # submit() refuses consensus tasks without one
        row = live.row
        k = row.replicas
        rounds: list[dict[str, Any]] = []
        last = None
        route_model = ""
        handed_off = False
        try:
            for round_ in (1, 2):
                routes: dict[int, list[tuple[str, int, int]]] = {}
                if row.pipeline:  # each replica a pipeline, driven by its route's first node
                    assert self._pipelines is not None  # submit() checked
                    try:
                        route_model, found = await self._pipelines.disjoint(row.model, k)
                    except PipelineError as exc:
                        return "failed", str(exc)
                    if len(found) < 2:
                        if last is not None:
                            break
                        return "failed", (f"{len(found)} disjoint route(s) cover every layer "
                                          f"of {row.model!r}; consensus needs 2")  # fmt: skip
                    drivers = [r[0][0] for r in found]
                else:
                    bids = await self._collect_bids(live, want=k)
                    chosen = choose_replicas(bids, k, self._view.profile_of)
                    if not chosen:
                        if last is not None:
                            break
                        return "failed", f"no bid for model {row.model!r}"
                    drivers, found = [b.peer_id for b in chosen], []
                attempts: dict[int, str] = {}
                for i, peer in enumerate(drivers):
                    live.attempt += 1
                    attempts[live.attempt] = live.attempt_peers[live.attempt] = peer
                    if found:
                        routes[live.attempt] = found[i]
                    await self._tasks.add_attempt(row.id, live.attempt, peer, time.time())
                st = co.open_round(row.id, round_, attempts)
                await self._update(live, phase="assigned", status="running",
                                   node_id=",".join(attempts.values()))  # fmt: skip
                params = params_from_dict(row.parameters)

                async def assign(
                    n: int, peer: str, params: GenParams = params,
                    routes: dict[int, list[tuple[str, int, int]]] = routes,
                ) -> None:  # fmt: skip
                    if params.temperature > 0:  # sampled: each replica draws its own sample
                        params = dataclasses.replace(params, seed=replica_seed(params.seed, n))
                    route = tuple(RouteHop(*h) for h in routes.get(n, ()))
                    others = tuple(sorted({h[0] for m, r in routes.items() if m != n for h in r}))
                    a = Assign(row.id, n, row.model, row.input, params, row.priority, True,
                               route, others, str(row.parameters.get("adapter", "")))  # fmt: skip
                    error = await self._assign(peer, a)
                    if error is not None:
                        co.on_attempt_failed(row.id, n, error)

                async with trio.open_nursery() as nursery:
                    for n, peer in attempts.items():
                        nursery.start_soon(assign, n, peer)
                await self._update(live, phase="committing", timings={
                    **live.row.timings, "assigned_s": _since(row)})  # fmt: skip
                rr = await co.run_round(st, row.input, row.timeout_s)
                for n in attempts:
                    ok = rr.outcome is not None and any(r.attempt == n for r in rr.results)
                    await self._tasks.finish_attempt(
                        row.id, n, "completed" if ok else "failed",
                        None if ok else st.failed.get(n, "no valid commitment or reveal"),
                        time.time(),
                    )  # fmt: skip
                if rr.outcome is None:
                    rounds.append({"round": round_, "error": rr.error})
                    if last is None and round_ == 1:
                        live.tried = set()
                        continue
                    break
                await co.record(st, rr)
                rounds.append({"round": round_, **rr.outcome.view(rr.results),
                               "phases_s": st.phases})  # fmt: skip
                last = (st, rr)
                # The seeds' "recompute below 75 %", and, since high disagreement is what a
                # recompute is for, one more round below 60 % too before falling back.
                if rr.outcome.action in ("recompute", "fallback") and round_ == 1:
                    log.info("task %s: confidence %.2f, recomputing with %d replicas",
                             row.id, rr.outcome.confidence, min(MAX_REPLICAS, k + 2))  # fmt: skip
                    k = min(MAX_REPLICAS, k + 2)
                    live.tried = set()
                    co.end(row.id)
                    continue
                break
            if last is None:
                return "failed", str(rounds[-1].get("error") or "consensus failed")
            st, rr = last
            assert rr.outcome is not None
            bid_model = (b.model_id for b in live.bids if b.peer_id in st.attempts.values())
            model_id = route_model if row.pipeline else next(bid_model, "")
            own = await co.sign(st, rr, model_id)
            o = rr.outcome
            answer = rr.results[o.answer]
            view = {
                **o.view(rr.results), "rounds": len(rounds), "history": rounds,
                "conflict": int(not all(o.agreed) or len(rounds) > 1 or o.decision
                                in ("none", "tie")),
                "fallback": o.action == "fallback",
                "note": _NOTES.get(o.action, ""),
                "signatures": [_sig_view(own)],
            }  # fmt: skip
            live.final = {
                "result": answer.text, "node_id": answer.peer_id, "model_id": model_id,
                "consensus": view, "progress": len(answer.token_ids),
            }  # fmt: skip
            assert self._nursery is not None
            self._nursery.start_soon(self._collect_signatures, live, st, rr, model_id)
            handed_off = True  # the collector ends the round
            return "completed", None
        finally:
            if not handed_off:
                co.end(row.id)

    async def _run_pipeline(self, live: _Live) -> tuple[str, str | None]:
        """Layer spans on several nodes; the route and per-hop times go into the task."""
        assert self._pipelines is not None  # submit() refuses pipelines without it
        row = live.row

        def on_token(n: int) -> None:
            live.progress = n
            live.wake()

        await self._update(live, phase="running", status="running")
        try:
            out = await self._pipelines.run(row, on_token)
        except PipelineError as exc:
            return "failed", str(exc)
        now = time.time()
        for n, hop in enumerate(out["hops"], 1):
            await self._tasks.add_attempt(row.id, n, hop["node_id"], now)
            ok = hop["status"] == "completed"
            why = None if ok else f"layers {hop['layers']}: {hop['status']}"
            await self._tasks.finish_attempt(row.id, n, hop["status"], why, now)
        live.attempt = len(out["hops"])
        await self._update(live, timings={**row.timings, **out["timings"]})
        live.final = {
            "result": out["text"], "model_id": out["model_id"], "progress": out["tokens"],
            "node_id": ",".join(h["node_id"] for h in out["hops"] if h["status"] == "completed"),
        }  # fmt: skip
        return "completed", None

    async def _run_training(self, live: _Live, resumed: bool) -> tuple[str, str | None]:
        """Bids from nodes that can train the model, then the rounds (``vcoind.train``)."""
        assert self._trainer is not None  # submit_training() checked
        row = live.row  # resumed: the node goes on from the last round it saved
        bids = await self._collect_bids(live, want=int(row.parameters.get("nodes", 1)))
        if not bids:
            return "failed", f"no node bid to train {row.model!r}"
        await self._update(live, phase="running", status="running")

        async def on_view(view: dict[str, Any]) -> None:
            live.progress = sum(n["samples"] for n in view["nodes"])
            await self._update(live, training=view,
                               node_id=",".join(n["node_id"] for n in view["nodes"]))  # fmt: skip

        try:
            out = await self._trainer.run_training(row, bids, on_view)
        except WorkError as exc:
            return "failed", str(exc)
        await self._update(live, timings={**live.row.timings,
                                          "train_s": out["summary"]["train_s"]})  # fmt: skip
        live.final = {"result": out["adapter_id"], "model_id": out["model_id"],
                      "progress": out["summary"]["samples"], "training": out["view"]}  # fmt: skip
        return "completed", None

    async def _collect_signatures(
        self, live: _Live, st: RoundState, rr: RoundResult, model_id: str
    ) -> None:
        """The replicas' signatures, added to the finished task's consensus record."""
        co = self._coordinator
        assert co is not None
        try:
            rows = await co.collect(st, rr, model_id)
            while live.row.id in self._live:  # the task's own final write goes first
                await live.changed.wait()
            stored = await self._tasks.get(live.row.id)
            if stored is None:
                return
            c = dict(stored.consensus)
            if rows:
                c["signatures"] = [*c.get("signatures", []), *(_sig_view(r) for r in rows)]
                await self._tasks.update(live.row.id, consensus=c)
                log.info("task %s: outcome signed by %d node(s)", live.row.id,
                         len(c["signatures"]))  # fmt: skip
        finally:
            co.end(live.row.id)
        await self._settle_consensus(live, st, rr, model_id, c.get("signatures", []))

    async def _settle_consensus(
        self, live: _Live, st: RoundState, rr: RoundResult, model_id: str,
        signatures: list[dict[str, str]],
    ) -> None:  # fmt: skip
        o = rr.outcome
        if self._settle is None or o is None:
            return
        agreed = {r.peer_id for r, ok in zip(rr.results, o.agreed, strict=True) if ok}
        chosen = [b.price for b in live.bids if b.peer_id in st.attempts.values()]
        params = params_from_dict(live.row.parameters)
        await self._settle(Settled(
            task_id=live.row.id, model_id=model_id, result_hash=o.result_hash,
            decision=o.decision,
            signatures=[(s["node_id"], s["eth_address"], bytes.fromhex(s["signature"]))
                        for s in signatures if s["node_id"] in agreed],
            replicas=len(st.attempts),
            outvoted=sorted(set(st.attempts.values()) - agreed), customer=live.row.customer,
            deterministic=params.temperature == 0,
            tokens=len(rr.results[o.answer].token_ids),
            price=sum(chosen) / len(chosen) if chosen else 0.0,
        ))  # fmt: skip

    def _announce(self, task: AnnouncedTask) -> None:
        self._to_announce.append(task)
        self._announce_wake.set()

    async def _announcer(self) -> None:
        """Send queued tasks in as few announcements as possible; bid on them ourselves."""
        while True:
            await self._announce_wake.wait()
            self._announce_wake = trio.Event()
            while self._to_announce:
                batch = self._to_announce[:MAX_BATCH]
                del self._to_announce[:MAX_BATCH]
                # drop finished tasks and repeats (re-announced while still queued)
                batch = list({t.task_id: t for t in batch if t.task_id in self._live}.values())
                if not batch:
                    continue
                own = self._local_bid(self._peer_id, batch)
                if own is not None:
                    self._take_bid(own)
                ann = TaskAnnounce(self._network, self._peer_id, 0, 0.0, tuple(batch))
                try:  # seq and timestamp are stamped by gossip
                    await self._publish_announce(ann)
                    if own is not None:  # public like every bid: anyone can re-check the choice
                        await self._publish_bid(own)
                except Exception as exc:  # the tasks' drivers announce again within 1 s
                    log.warning("announcing %d task(s) failed: %s", len(batch), exc)

    async def _collect_bids(self, live: _Live, want: int = 1) -> list[TaskBid]:
        """Announce and gather bids; ranked, minus peers that already failed this task.

        The window closes early once every node known to serve the model has bid and
        there are ``want`` bids (replicas of a consensus task), else after ``bid_window_s``.
        """
        cfg = self.config
        live.bids = []
        row = live.row
        task = AnnouncedTask(
            task_id=row.id, model=row.model,
            max_new_tokens=int(row.parameters.get("max_new_tokens", 64)),
            input_chars=len(row.input), priority=row.priority, max_price=row.max_price,
            task_type=row.type, adapter=str(row.parameters.get("adapter", "")),
        )  # fmt: skip
        self._announce(task)
        # Announce again while nobody has bid: a node that just (re)started may not be
        # connected yet when the first announcement goes out.
        with trio.move_on_after(cfg.no_bid_timeout_s):
            while not live.bids and not live.cancelled:
                with trio.move_on_after(REANNOUNCE_S) as wait:
                    await live.changed.wait()
                if wait.cancelled_caught:
                    self._announce(task)
        # The window closes early once every node known to serve the model has bid.
        expected = self._view.serving(row.model)

        def enough() -> bool:
            bidders = {b.peer_id for b in live.bids}
            return expected <= bidders and len(bidders) >= want

        with trio.move_on_after(cfg.bid_window_s):
            while not live.cancelled and not enough():
                await live.changed.wait()
        await self._tasks.add_bids(row.id, [_bid_row(b) for b in live.bids])
        bids = [b for b in live.bids if b.peer_id not in live.tried]
        reps = await self._reputations([b.peer_id for b in bids])
        # No checkpoint from here to the caller's _attempt, which counts the winner in
        # flight: tasks whose windows close together must see each other's choices
        # (least_connections would otherwise send a whole burst to one peer).
        ranked = [b for b in rank(cfg.strategy, row.id, bids, self._selection)
                  if isinstance(b, TaskBid)]  # fmt: skip
        # Reputation (earned in consensus rounds) decides who goes first: peers that fell
        # under LOW_REPUTATION are only used when nobody else bid.
        return sorted(
            ranked, key=lambda b: reps.get(b.peer_id, DEFAULT_REPUTATION) < LOW_REPUTATION
        )

    async def _attempt(self, live: _Live, bid: TaskBid) -> str | None:
        """Assign to ``bid``'s node and wait; None when a result arrived, else the error."""
        row, peer, n = live.row, bid.peer_id, live.attempt
        live.attempt_peers[n] = peer
        live.attempt_error = None
        self._selection.in_flight[peer] = self._selection.in_flight.get(peer, 0) + 1
        try:
            await self._tasks.add_attempt(row.id, n, peer, time.time())
            await self._update(live, phase="assigned", node_id=peer)
            assign = Assign(
                task_id=row.id, attempt=n, model=row.model, input=row.input,
                params=params_from_dict(row.parameters), priority=row.priority,
                adapter=str(row.parameters.get("adapter", "")),
            )  # fmt: skip
            t0 = time.monotonic()
            refused = await self._assign(peer, assign)
            if refused is not None:
                return refused
            self._metrics.dispatch_latency.observe(time.monotonic() - live.submitted_mono)
            log.info("task %s attempt %d assigned to %s (%.1f ms)", row.id, n, peer,
                     (time.monotonic() - t0) * 1000)  # fmt: skip
            live.last_progress = trio.current_time()
            await self._update(live, phase="running", status="running",
                               timings={**row.timings, "assigned_s": _since(row)})  # fmt: skip
            return await self._await_result(live, peer)
        finally:
            self._selection.in_flight[peer] -= 1

    async def _assign(self, peer: str, assign: Assign) -> str | None:
        """Hand ``assign`` to ``peer``; None when accepted, else why not.

        Assignments for one peer that become ready while an earlier request to it is
        in flight go together in the next one.
        """
        verdict = _Verdict()
        queue = self._to_assign.get(peer)
        if queue is None:
            queue = self._to_assign[peer] = []
            assert self._nursery is not None
            self._nursery.start_soon(self._assigner, peer, queue)
        queue.append((assign, verdict))
        await verdict.done.wait()
        return verdict.error

    async def _assigner(self, peer: str, queue: list[tuple[Assign, _Verdict]]) -> None:
        try:
            while queue:
                batch: list[tuple[Assign, _Verdict]] = []
                size = 0
                while queue and len(batch) < MAX_BATCH:
                    size += len(queue[0][0].input.encode()) + 1024
                    if batch and size > Assignments.BUDGET:
                        break
                    batch.append(queue.pop(0))
                request = Assignments(tuple(a for a, _ in batch))
                resent = False
                try:
                    with trio.fail_after(ASSIGN_TIMEOUT_S):
                        try:
                            reply = await self._send(peer, request, Accepted)
                        except StreamOpenError:  # nothing sent: one more try on a new dial
                            await trio.sleep(REDIAL_WAIT_S)
                            reply = await self._send(peer, request, Accepted)
                        except StreamProtocolError as exc:
                            # Sent, but the verdict was lost (a connection reset under
                            # simultaneous dials): ask once more. What the worker took the
                            # first time comes back as accepted before: it is accepted.
                            log.info("assignments to %s: %s; sending them again", peer, exc)
                            await trio.sleep(REDIAL_WAIT_S)
                            resent = True
                            reply = await self._send(peer, request, Accepted)
                    if len(reply.errors) != len(batch):
                        raise StreamProtocolError(f"{len(reply.errors)} verdicts for {len(batch)}")
                    errors = [
                        None if not e or (resent and e.endswith(ACCEPTED_BEFORE))
                        else f"{peer} refused: {e}" for e in reply.errors
                    ]  # fmt: skip
                except (StreamProtocolError, trio.TooSlowError) as exc:
                    errors = [f"assignment to {peer} failed: {exc or 'timeout'}"] * len(batch)
                for (_, verdict), error in zip(batch, errors, strict=True):
                    verdict.error = error
                    verdict.done.set()
        finally:
            del self._to_assign[peer]
            for _, verdict in queue:  # only when cancelled (shutdown)
                verdict.error = "the origin is shutting down"
                verdict.done.set()

    async def _await_result(self, live: _Live, peer: str, require_alive: bool = True) -> str | None:
        last_written = 0.0
        while True:
            if live.result is not None:
                return None
            if live.attempt_error is not None:
                return live.attempt_error
            if require_alive and not self._view.alive(peer):
                return f"worker {peer} left the network"
            silent = trio.current_time() - live.last_progress
            if silent >= live.row.timeout_s:
                return f"no progress from {peer} for {live.row.timeout_s:g} s"
            if live.progress and time.monotonic() - last_written >= PROGRESS_WRITE_EVERY_S:
                last_written = time.monotonic()
                await self._update(live, progress=live.progress)
            with trio.move_on_after(min(1.0, live.row.timeout_s - silent)):
                await live.changed.wait()

    async def _conclude(self, live: _Live, status: str, error: str | None) -> None:
        row = live.row
        r = live.result
        if live.final is not None and status == "completed":
            timings = {**row.timings, "total_s": _since(row)}
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
                await self._cancel_worker(live)
            tokens = len(r.token_ids)
            timings = {**row.timings, "total_s": _since(row), **generation_timings(r),
                       "model_id": r.model_id}  # fmt: skip
            self._metrics.exec_time.observe(r.prefill_s + r.decode_s)
            await self._update(
                live, status="completed", phase="completed", result=r.text, node_id=peer,
                retry_count=live.attempt - 1,
                progress=tokens, completed_at=time.time(), timings=timings, error=None,
                model_id=r.model_id,
            )  # fmt: skip
            if self._settle is not None and r.signature and peer is not None:
                price = next((b.price for b in live.bids if b.peer_id == peer), 0.0)
                settled = Settled(
                    task_id=row.id, model_id=r.model_id, result_hash=result_hash(r.text),
                    decision="majority", signatures=[(peer, r.eth_address, r.signature)],
                    replicas=1, outvoted=[],
                    deterministic=params_from_dict(row.parameters).temperature == 0,
                    tokens=tokens, price=price, customer=row.customer,
                )  # fmt: skip
                assert self._nursery is not None
                self._nursery.start_soon(self._settle, settled)
        else:
            if live.attempt and status == "cancelled":
                await self._cancel_worker(live)
            await self._update(live, status=status, phase=status, error=error,
                               completed_at=time.time(), timings={**row.timings,
                               "total_s": _since(row)})  # fmt: skip
        self._metrics.tasks.labels(status=status).inc()
        log.info("task %s %s%s", row.id, status, f": {error}" if error else "")

    async def _cancel_worker(self, live: _Live) -> None:
        """Stop the current attempt (every replica of a consensus task: stopping a finished
        one is a no-op)."""
        attempts = sorted(live.attempt_peers) if live.row.mode == "consensus" else [live.attempt]
        for n in attempts:
            peer = live.attempt_peers.get(n)
            if peer is None:
                continue
            try:
                with trio.move_on_after(3):
                    await self._send(peer, Cancel(live.row.id, n), Ack)
            except StreamProtocolError as exc:
                log.info("could not tell %s to cancel %s: %s", peer, live.row.id, exc)

    async def _update(self, live: _Live, **changes: Any) -> None:
        with trio.CancelScope(shield=True):  # a cancel must not leave the row half-updated
            await self._tasks.update(live.row.id, **changes)
        live.row = TaskRow(**{**live.row.__dict__, **changes})
        await self._notify(task_view(live.row, live.attempt, live.progress))


LOW_REPUTATION = DEFAULT_REPUTATION / 2


def _sig_view(s: SignatureRow) -> dict[str, str]:
    return {"node_id": s.signer, "eth_address": s.eth_address, "signature": s.signature}


_NOTES = {
    "accept_with_note": "accepted with moderate confidence",
    "recompute": "low confidence after the extra replicas",
    "fallback": "replicas disagreed: the answer is unverified (conservative fallback)",
}


def replica_seed(seed: int, attempt: int) -> int:
    """A sampled consensus task's seed for one replica: independent samples, reproducible."""
    digest = hashlib.sha256(f"{seed}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generation_timings(r: Any) -> dict[str, Any]:
    """Timings of one generation: a worker's ``TaskResult`` or a pipeline's
    ``GenerationResult``."""
    tokens = len(r.token_ids)
    return {
        "prefill_s": round(r.prefill_s, 6), "decode_s": round(r.decode_s, 6), "tokens": tokens,
        "prompt_tokens": r.prompt_tokens, "finish_reason": r.finish_reason,
        "tokens_per_s": round(tokens / r.decode_s, 3) if r.decode_s else 0.0,
    }  # fmt: skip


def _since(row: TaskRow) -> float:
    return round(time.time() - row.created_at, 6)


def _params_dict(p: GenParams) -> dict[str, Any]:
    return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "top_k": p.top_k, "seed": p.seed, "stop": list(p.stop)}  # fmt: skip


def params_from_dict(d: dict[str, Any]) -> GenParams:
    """The sampling parameters of a task's stored parameters (which may hold more)."""
    names = {f.name for f in dataclasses.fields(GenParams)}
    return GenParams(**{**{k: v for k, v in d.items() if k in names},
                        "stop": tuple(d.get("stop", ()))})  # fmt: skip


def _bid_row(b: TaskBid) -> BidRow:
    return BidRow(b.peer_id, b.price, b.eta_s, b.health, b.queue_length, b.tokens_per_s,
                  b.timestamp)  # fmt: skip


def task_view(row: TaskRow, attempts: int, live_progress: int | None = None) -> dict[str, Any]:
    """The public shape of a task (vcoin_getTask, notifications)."""
    return {
        "task_id": row.id,
        "status": row.status,
        "phase": row.phase,
        "model": row.model,
        "model_id": row.model_id or None,
        "input": row.input,
        "parameters": row.parameters,
        "priority": row.priority,
        "progress": max(row.progress, live_progress or 0),
        "result": row.result,
        "node_id": row.node_id,
        "attempts": attempts,
        "error": row.error,
        "timings": row.timings,
        "mode": row.mode,
        "replicas": row.replicas,
        "pipeline": row.pipeline or row.mode == "pipeline",
        "customer": row.customer or None,
        "consensus": row.consensus or None,
        "type": row.type,
        "training": row.training or None,
        "created_at": row.created_at,
        "completed_at": row.completed_at,
        "finished": row.status in FINISHED,
    }
