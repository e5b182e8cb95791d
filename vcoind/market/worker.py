"""Worker side of the market: bid for tasks we can run, run assigned ones, report back.

Accepted assignments wait in a priority queue (higher ``priority`` first, then
arrival order) and run on the executor, as many at once as it batches (its engine's
slots: they decode together, token by token). Each accepted
(task, attempt) is recorded in SQLite before it is acknowledged, so a worker
restarted mid-task never runs the same attempt twice. Progress goes to the
origin at most every ``PROGRESS_EVERY_S``; the result is retried a few times.

Sign only our own work: an assignment is accepted only for a task whose announce we bid
on, from the peer that announced it (a pipeline route's driver, chosen from the spans it
advertises, bids on nothing: it runs the route but signs no Result, the slashing
evidence). Anything else is refused, logged and counted
(``vcoin_sign_refused_total{kind="assignment"}``), so no peer can make this node sign a
result or an outcome for a task it did not bid on. Queued work per requester is capped
(``market.max_queued_per_origin``, ``vcoin_budget_refused_total{resource="queued_per_origin"}``).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vcoind.chain.views import wei
from vcoind.compute.models import ModelError
from vcoind.compute.params import GenerationError, GenerationParams, model_defaults, with_defaults
from vcoind.consensus.outcome import result_hash
from vcoind.market.chat import ChatError, parse_messages
from vcoind.market.deltas import TextDeltas
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
    Offer,
    Progress,
    Send,
    TaskAnnounce,
    TaskResult,
)
from vcoind.market.offered import Offered
from vcoind.market.payments import Payments, outcome_of
from vcoind.market.ports import Hold, Pipelines, Trainer, WorkError, no_hold
from vcoind.p2p.streams import StreamProtocolError
from vcoind.store import TaskStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.compute.executor import Executor
    from vcoind.compute.generate import Prompt
    from vcoind.compute.service import ComputeService

log = logging.getLogger("vcoind.worker")

PROGRESS_EVERY_S = 0.25
RESULT_TRIES = 8  # ~1 min with backoff: long enough for an origin to restart
DEFAULT_TOKENS_PER_S = 50.0  # until this node has measured itself
OUTCOMES_KEPT = 100  # the error rate is over this many of our latest attempts
RESPONSE_EWMA = 0.3


@dataclass(order=True)
class _Job:
    sort_key: tuple[int, int]
    origin: str = field(compare=False)
    assign: Assign = field(compare=False)
    scope: trio.CancelScope | None = field(default=None, compare=False)
    cancelled: bool = field(default=False, compare=False)
    accepted: float = field(default=0.0, compare=False)  # trio clock


class TaskWorker:
    def __init__(
        self,
        compute: ComputeService,
        tasks: TaskStore,
        *,
        peer_id: str,
        network: str,
        send: Send,
        health: Callable[[], float],
        send_bid: Callable[[str, Bid], Awaitable[None]] | None = None,
        payments: Payments | None = None,
        on_change: Callable[[], None] = lambda: None,
        commit_result: Callable[[str, TaskResult, Assign], Awaitable[None]] | None = None,
        pipelines: Pipelines | None = None,
        trainer: Trainer | None = None,
        refused: Callable[[str, str], None] = lambda kind, reason: None,
        over_budget: Callable[[str], None] = lambda resource: None,
        max_queued_per_origin: int = 0,
        hold: Hold = no_hold,
    ) -> None:
        self._compute = compute
        self._models = compute.models
        self._tasks = tasks
        self._peer_id = peer_id
        self._network = network
        self._nursery: trio.Nursery | None = None  # run()'s: our bids go out from it
        self._bids_out: dict[str, list[Bid]] = {}  # origin -> bids waiting to be sent
        # Bids to their origin (``TaskProtocol.send_bid``: a kept stream); by default on
        # the task protocol.
        self._send_bid_to = send_bid or (lambda peer, bid: send(peer, bid, Ack))
        self._send = send
        self._health = health
        # Settlement v2: tickets checked, prices and results signed (None: unpaid work)
        self._payments = payments
        self._price = payments.price if payments is not None else 0
        self._queue: list[_Job] = []
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._arrivals = itertools.count()
        self._wake = trio.Event()
        self.running: dict[tuple[str, int], _Job] = {}  # (task id, attempt) -> job
        self.tokens_per_s: dict[str, float] = {}  # model id -> measured decode speed
        self.on_change = on_change
        # Consensus assignments: the result is committed on the votes topic, not sent.
        self._commit_result = commit_result
        # Pipelined replicas run over their route; LoRA: training, adapters.
        self._pipelines = pipelines
        self._trainer = trainer
        self._bid_on = Offered()  # (task id, origin) pairs we bid on: what we accept
        self._refused = refused  # (kind, reason) -> the refusal metric
        self._over_budget = over_budget  # resource -> the budget metric
        self._max_queued_per_origin = max_queued_per_origin  # 0: no cap
        self._hold = hold  # the origins of our jobs stay connected
        # Our health's measured inputs: time to first token of our jobs (queue wait plus
        # prefill, smoothed) and the share of our recent attempts that failed.
        self.response_s: float | None = None
        self._outcomes: deque[bool] = deque(maxlen=OUTCOMES_KEPT)
        self._model_defaults: dict[str, dict[str, float]] = {}  # model id -> its settings

    @property
    def error_rate(self) -> float:
        """The share of our latest attempts that failed (0 before any)."""
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    def _measured(self, job: _Job, started: float, result: TaskResult) -> None:
        self._outcomes.append(bool(result.error))
        if not result.error:
            first = started - job.accepted + result.prefill_s
            old = self.response_s
            self.response_s = first if old is None else old + RESPONSE_EWMA * (first - old)

    @property
    def queue_length(self) -> int:
        return len(self._queue) + len(self.running)

    # --- bidding ----------------------------------------------------------

    def make_offer(self, task: AnnouncedTask, queued_tokens: int, origin: str = "") -> Offer | None:
        """Our offer for ``task``, or None if we do not serve its model, it pays too little
        or its ticket does not do (``Payments.ticket_refusal``)."""
        try:
            info = self._models.resolve(task.model)
        except ModelError:
            return None
        if task.task_type == "lora_training":
            if self._trainer is None or not self._trainer.can_train():
                return None
            sps = self._trainer.samples_per_s(info.model_id)
            sps = DEFAULT_TOKENS_PER_S if sps is None else sps
            return Offer(task.task_id, info.model_id, 0.0, 0.0, round(sps, 3))
        if task.adapter and not self._adapter_known(task.adapter):
            return None
        pay = self._payments
        refusal = pay.ticket_refusal(task.ticket, origin) if pay is not None and origin else None
        if refusal is None and task.ticket is not None and task.ticket.model_id != info.model_id:
            refusal = f"the ticket is for model {task.ticket.model_id[:19]}, ours is another"
        if refusal is not None:
            log.info("not bidding on task %s: %s", task.task_id, refusal)
            return None
        tps = self.tokens_per_s.get(info.model_id, DEFAULT_TOKENS_PER_S)
        if task.max_price is not None and self._price > wei(task.max_price):
            return None  # max_price: VCOIN per token
        price = self._price * task.max_new_tokens / 1e18
        eta = round((queued_tokens + task.max_new_tokens) / tps, 4)
        sig = pay.sign_bid(task.task_id) if pay is not None and task.ticket is not None else b""
        return Offer(task.task_id, info.model_id, price, eta, round(tps, 3), self._price, sig)

    def make_bid(self, origin: str, tasks: Sequence[AnnouncedTask]) -> Bid | None:
        """One bid with our offers for those of ``tasks`` we can run (None: no offer)."""
        queued_tokens = sum(
            j.assign.params.max_new_tokens for j in (*self._queue, *self.running.values())
        )
        offers = tuple(o for t in tasks
                       if (o := self.make_offer(t, queued_tokens, origin)) is not None)  # fmt: skip
        if not offers:
            return None
        training = {t.task_id for t in tasks if t.task_type == "lora_training"}
        for o in offers:
            self._bid_on.add(o.task_id, origin)
            if o.task_id in training and self._trainer is not None:
                self._trainer.offered(o.task_id, origin)
        return Bid(
            network=self._network, peer_id=self._peer_id, seq=0, timestamp=time.time(),
            origin=origin, health=self._health(), queue_length=self.queue_length, offers=offers,
        )  # fmt: skip

    async def on_announce(self, ann: TaskAnnounce) -> None:
        if self._payments is not None:  # the requesters' deposits, fresh enough to judge
            await self._payments.prefetch([t.ticket for t in ann.tasks], ann.peer_id)
        bid = self.make_bid(ann.peer_id, ann.tasks)
        if bid is None:
            return
        if self._nursery is None:
            await self._send_bid(bid)
            return
        # Not from the gossip handler (the next announcement must not wait for it), and
        # bids made while an earlier one to the same origin is in flight go together in the
        # next (a burst's announcements would otherwise queue a round trip each).
        queue = self._bids_out.get(bid.origin)
        if queue is None:
            self._bids_out[bid.origin] = [bid]
            self._nursery.start_soon(self._bid_sender, bid.origin)
        else:
            queue.append(bid)

    async def _bid_sender(self, origin: str) -> None:
        queue = self._bids_out[origin]
        try:
            while queue:
                batch = [queue.pop(0)]
                n = len(batch[0].offers)
                while queue and n + len(queue[0].offers) <= MAX_BATCH:
                    n += len(queue[0].offers)
                    batch.append(queue.pop(0))
                offers = tuple(o for b in batch for o in b.offers)
                await self._send_bid(dataclasses.replace(batch[-1], offers=offers))
        finally:
            del self._bids_out[origin]

    async def _send_bid(self, bid: Bid) -> None:
        """Our bid, to the origin alone (a direct stream, not gossip)."""
        try:
            await self._send_bid_to(bid.origin, bid)
        except StreamProtocolError as exc:  # it announces again while nobody bid
            log.info("bid for %d task(s) of %s not delivered: %s", len(bid.offers),
                     bid.origin, exc)  # fmt: skip

    # --- assignments ------------------------------------------------------

    async def on_assignments(self, origin: str, batch: Assignments) -> Accepted:
        """Accept or refuse each; claimed together (one store transaction for the lot)."""
        errors = [""] * len(batch.items)
        queued = sum(j.origin == origin for j in self._jobs.values())
        passed: list[int] = []

        async def check(i: int, a: Assign) -> None:
            try:
                await self._check_assign(origin, a)
            except StreamProtocolError as exc:
                errors[i] = str(exc)[:1024]
            else:
                passed.append(i)

        async with trio.open_nursery() as nursery:
            for i, a in enumerate(batch.items):
                try:  # the per-requester cap counts this batch's earlier ones too
                    self._check_queued(origin, a, queued)
                except StreamProtocolError as exc:
                    errors[i] = str(exc)[:1024]
                    continue
                queued += 1
                nursery.start_soon(check, i, a)
        passed.sort()
        claimed = await self._tasks.claim_assignments(
            [(batch.items[i].task_id, batch.items[i].attempt) for i in passed], origin, time.time()
        )
        for i, new in zip(passed, claimed, strict=True):
            a = batch.items[i]
            if new:
                self._enqueue(origin, a)
            else:
                errors[i] = f"attempt {a.attempt} of {a.task_id} {ACCEPTED_BEFORE}"
        return Accepted(tuple(errors))

    def _refuse(self, reason: str, message: str, a: Assign, origin: str) -> StreamProtocolError:
        log.warning("refused task %s attempt %d from %s: %s", a.task_id, a.attempt, origin,
                    message)  # fmt: skip
        self._refused("assignment", reason)
        return StreamProtocolError(f"refused: {message}")

    def _check_queued(self, origin: str, a: Assign, queued: int) -> None:
        """Refuse ``a`` when ``queued`` of its requester's tasks wait here (the cap)."""
        cap = self._max_queued_per_origin
        if cap and queued >= cap:
            why = f"{cap} of this requester's tasks are queued here already"
            log.warning("refused task %s attempt %d from %s: %s", a.task_id, a.attempt,
                        origin, why)  # fmt: skip
            self._over_budget("queued_per_origin")
            raise StreamProtocolError(f"over budget: {why} (market.max_queued_per_origin)")

    async def _check_assign(self, origin: str, a: Assign) -> None:
        """Refuse what we did not bid on, cannot run, or would not be paid for."""
        if not a.route and (a.task_id, origin) not in self._bid_on:
            raise self._refuse("not_bid", "this node did not bid on that task of yours", a,
                               origin)  # fmt: skip
        if self._payments is not None:
            await self._payments.prefetch([a.ticket], origin)
            refusal = self._payments.ticket_refusal(
                a.ticket, origin
            ) or self._payments.award_refusal(a.ticket, a.price_per_token, a.award)
            if refusal is not None:
                raise StreamProtocolError(f"refused: {refusal}")
        if a.route:
            if self._pipelines is None:
                raise StreamProtocolError("this node runs no pipelines")
        else:
            try:
                self._models.resolve(a.model)
            except ModelError as exc:
                raise StreamProtocolError(str(exc)) from None
            if a.adapter and not self._adapter_known(a.adapter):
                raise StreamProtocolError(f"adapter {a.adapter[:12]} is not known to this node")

    def _enqueue(self, origin: str, a: Assign) -> None:
        """An accepted (and claimed) assignment joins the queue."""
        job = _Job((-a.priority, next(self._arrivals)), origin, a,
                   accepted=trio.current_time())  # fmt: skip
        self._jobs[(a.task_id, a.attempt)] = job
        self._hold(origin, f"job:{a.task_id}:{a.attempt}", True)
        heapq.heappush(self._queue, job)
        self._wake.set()
        self.on_change()
        log.info("accepted task %s attempt %d from %s", a.task_id, a.attempt, origin)

    async def on_cancel(self, origin: str, c: Cancel) -> Ack:
        job = self._jobs.get((c.task_id, c.attempt))
        if job is not None and job.origin == origin:
            job.cancelled = True
            if job.scope is not None:
                job.scope.cancel()
            log.info("task %s attempt %d cancelled by its origin", c.task_id, c.attempt)
        return Ack()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._models.all():  # import torch and load models off the trio thread, early
                nursery.start_soon(self._warm_up)
            while True:
                # As many jobs at once as the executor batches (one until it exists).
                while not self._queue or len(self.running) >= self._concurrency():
                    self._wake = trio.Event()
                    await self._wake.wait()
                job = heapq.heappop(self._queue)
                if job.cancelled:
                    await self._finish(job, "cancelled")
                    continue
                key = (job.assign.task_id, job.assign.attempt)
                self.running[key] = job
                self.on_change()
                nursery.start_soon(self._run_job, key, job)

    def _concurrency(self) -> int:
        return self._compute.slots

    def _adapter_known(self, adapter_id: str) -> bool:
        return self._trainer is not None and self._trainer.adapter_known(adapter_id)

    async def _run_job(self, key: tuple[str, int], job: _Job) -> None:
        try:
            await self._execute(job)
        finally:
            del self.running[key]
            self._wake.set()
            self.on_change()

    async def executor(self) -> Executor:
        """The node's executor; created (torch imported) once, in a worker thread."""
        return await self._compute.executor()

    async def _warm_up(self) -> None:
        try:
            executor = await self.executor()
        except Exception:  # e.g. a broken torch install: tasks will report the error
            log.exception("cannot start the inference executor")
            return
        for info in self._models.all():
            try:
                await executor.load(info.name)
            except Exception as exc:  # a broken model dir must not stop the node
                log.warning("not preloading %s: %s", info.name, exc)

    async def _execute(self, job: _Job) -> None:
        a = job.assign
        last_sent = 0.0

        def progress(n: int) -> None:
            nonlocal last_sent
            now = trio.current_time()  # the trio clock (virtual in tests)
            if now - last_sent >= PROGRESS_EVERY_S:
                last_sent = now
                nursery.start_soon(self._report_progress, job, n)

        result: TaskResult
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                job.scope = scope
                try:
                    if a.route:
                        assert self._pipelines is not None  # _check_assign checked
                        r, model_id = await self._pipelines.run_route(a, progress)
                    else:
                        executor = await self.executor()
                        adapter = None
                        if a.adapter:
                            assert self._trainer is not None  # adapter_known said yes
                            adapter = (a.adapter, await self._trainer.adapter_path(a.adapter))
                        on_text = None
                        if a.stream:
                            deltas = self._deltas(job)
                            nursery.start_soon(deltas.run)
                            on_text = deltas.update
                        # prompt starts cached for one origin are not reused for another's
                        r = await executor.generate(
                            a.model, self._prompt(a), self._generation(a),
                            on_progress=progress, on_text=on_text, priority=a.priority,
                            adapter=adapter, scope=job.origin,
                        )  # fmt: skip
                        model_id = self._models.resolve(a.model).model_id
                        self.tokens_per_s[model_id] = executor.tokens_per_s.get(model_id, 0.0)
                    result = TaskResult(
                        task_id=a.task_id, attempt=a.attempt, text=r.text, token_ids=r.token_ids,
                        finish_reason=r.finish_reason, model_id=model_id,
                        prompt_tokens=r.prompt_tokens, prefill_s=round(r.prefill_s, 6),
                        decode_s=round(r.decode_s, 6),
                    )  # fmt: skip
                except (GenerationError, ModelError, WorkError) as exc:
                    result = TaskResult(task_id=a.task_id, attempt=a.attempt, error=str(exc))
                except Exception as exc:  # a failing model must not take the worker down
                    log.exception("task %s attempt %d crashed", a.task_id, a.attempt)
                    err = f"internal error: {type(exc).__name__}"
                    result = TaskResult(task_id=a.task_id, attempt=a.attempt, error=err)
            if scope.cancelled_caught:
                await self._finish(job, "cancelled")
                return
            nursery.cancel_scope.cancel()  # stop pending progress reports: the result follows
        self._measured(job, started, result)
        await self._finish(job, "failed" if result.error else "completed")
        if a.consensus and not result.error and self._commit_result is not None:
            await self._commit_result(job.origin, result, a)
        else:
            await self._report_result(job, result if result.error else self._signed(a, result))

    def _prompt(self, a: Assign) -> Prompt:
        if not a.chat:
            return a.input
        try:
            return parse_messages(a.input)
        except ChatError as exc:
            raise WorkError(str(exc)) from None

    def _generation(self, a: Assign) -> GenerationParams:
        """The request's sampling, with what it left out from the model's
        generation_config.json."""
        gen = a.params.generation()
        if not a.params.defaults:
            return gen
        info = self._models.resolve(a.model)
        if info.model_id not in self._model_defaults:
            self._model_defaults[info.model_id] = model_defaults(info.path)
        return with_defaults(gen, a.params.defaults, self._model_defaults[info.model_id])

    def _deltas(self, job: _Job) -> TextDeltas:
        a = job.assign

        async def send(p: Progress) -> None:
            await self._send(job.origin, p, Ack)

        return TextDeltas(a.task_id, a.attempt, send, stop=a.params.stop)

    def _signed(self, a: Assign, r: TaskResult) -> TaskResult:
        """A single-mode result with our signatures: the outcome (one replica, "majority")
        under the task's ticket, and our Result (slashing evidence)."""
        pay = self._payments
        if pay is None or not r.model_id:
            return r
        rh = result_hash(r.text)
        # a driver bid on nothing: no Result signature (slashing evidence)
        result_sig, profile = (b"", pay.profile()) if a.route else pay.sign_result(a.task_id, rh)
        outcome = outcome_of(rh, "majority", len(r.token_ids), profile,
                             a.params.greedy)  # fmt: skip
        sig = pay.sign_outcome(a.task_id, a.ticket, outcome)
        return dataclasses.replace(r, eth_address=pay.address, signature=sig,
                                   result_sig=result_sig, profile=profile)  # fmt: skip

    async def _report_progress(self, job: _Job, tokens: int) -> None:
        a = job.assign
        try:
            await self._send(job.origin, Progress(a.task_id, a.attempt, tokens), Ack)
        except StreamProtocolError as exc:
            log.debug("progress for %s not delivered: %s", a.task_id, exc)

    async def _report_result(self, job: _Job, result: TaskResult) -> None:
        delay = 0.5
        for i in range(RESULT_TRIES):
            try:
                await self._send(job.origin, result, Ack)
                return
            except StreamProtocolError as exc:
                log.warning(
                    "result of %s not delivered (try %d/%d): %s", result.task_id, i + 1,
                    RESULT_TRIES, exc,
                )  # fmt: skip
                await trio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _finish(self, job: _Job, status: str) -> None:
        self._hold(job.origin, f"job:{job.assign.task_id}:{job.assign.attempt}", False)
        self._jobs.pop((job.assign.task_id, job.assign.attempt), None)
        await self._tasks.finish_assignment(job.assign.task_id, job.assign.attempt, status)
