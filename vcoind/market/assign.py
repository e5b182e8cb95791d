"""Assignment: the origin hands a task to a winning bidder and waits for its answer.

``Assign`` records go to a worker over ``/vcoin/task/1.0.0``; those for one peer that
become ready while an earlier request to it is in flight go together in the next one.
An assignment refused, no progress for the task's ``timeout_s`` (before the first
report, for the prefill of a long prompt if that is longer: ``vcoind.market.deadlines``),
or a worker that drops out ends the attempt with the reason; a single-mode task then
goes to the next bidder (fresh bids when the list runs out), at most ``max_retries``
times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from vcoind.config import MarketConfig
from vcoind.market.bidding import Bidding
from vcoind.market.deadlines import DeadlinePolicy, first_progress_s, prompt_tokens, slowest
from vcoind.market.live import LiveTask, Update, params_from_dict, since
from vcoind.market.messages import (
    ACCEPTED_BEFORE,
    MAX_BATCH,
    Accepted,
    Ack,
    Assign,
    Assignments,
    Cancel,
    Send,
    TaskBid,
)
from vcoind.market.ports import Hold, no_hold
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import StreamOpenError, StreamProtocolError
from vcoind.presence.view import NetworkView
from vcoind.store import TaskStore

log = logging.getLogger("vcoind.origin")

ASSIGN_TIMEOUT_S = 5.0
REDIAL_WAIT_S = 0.5
PROGRESS_WRITE_EVERY_S = 0.5


@dataclass
class _Verdict:
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None
    sent: float = 0.0  # wall clock: when the request carrying it went out


class Assignment:
    """Attempts of the origin's tasks on other nodes (and on its own).

    An attempt counts its worker in flight in the ranking's state (``bidding.selection``).
    ``nursery`` gives the origin's nursery, where each peer's batching task runs.
    """

    def __init__(
        self,
        tasks: TaskStore,
        metrics: NodeMetrics,
        config: MarketConfig,
        view: NetworkView,
        bidding: Bidding,
        *,
        send: Send,
        update: Update,
        nursery: Callable[[], trio.Nursery],
        stalled: Callable[[str], Awaitable[None]] | None = None,
        hold: Hold = no_hold,
    ) -> None:
        self._tasks = tasks
        self._stalled = stalled  # a worker accepted and made no progress (reputation)
        self._hold = hold  # a worker with an attempt of ours stays connected
        self._metrics = metrics
        self._config = config
        self._view = view
        self._bidding = bidding
        self._selection = bidding.selection
        self._send = send
        self._update = update
        self._nursery = nursery
        self._to_assign: dict[str, list[tuple[Assign, _Verdict]]] = {}

    async def run_single(self, live: LiveTask, resumed: bool) -> tuple[str, str | None]:
        """A single-mode task: the best bidder, then the next ones (fresh bids when the
        list runs out) until one answers or ``max_retries`` are spent."""
        cfg = self._config
        last_error = "no node bid for the task"
        candidates: list[TaskBid] = []
        if resumed and live.attempt and live.row.phase in ("assigned", "running"):
            # Restarted mid-attempt: give its worker the task timeout to report back.
            peer = live.attempt_peers[live.attempt]
            live.last_progress = trio.current_time()
            error = await self.await_result(live, peer, require_alive=False)
            if error is None:
                return "completed", None
            await self._attempt_failed(live, peer, error)
            last_error = error
        while True:
            if live.result is not None:
                return "completed", None
            if not candidates:
                candidates = await self._bidding.collect(live)
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
            error = await self.attempt(live, bid)
            if error is None:
                return "completed", None
            last_error = error
            await self._attempt_failed(live, bid.peer_id, error)

    async def _attempt_failed(self, live: LiveTask, peer: str, error: str) -> None:
        live.tried.add(peer)
        await self._tasks.finish_attempt(live.row.id, live.attempt, "failed", error, time.time())
        log.info("task %s attempt %d on %s failed: %s", live.row.id, live.attempt, peer, error)
        await self._update(live, retry_count=live.attempt, phase="bidding", status="pending")

    async def attempt(self, live: LiveTask, bid: TaskBid) -> str | None:
        """Assign to ``bid``'s node and wait; None when a result arrived, else the error."""
        row, peer, n = live.row, bid.peer_id, live.attempt
        live.attempt_peers[n] = peer
        live.attempt_error = None
        self._selection.in_flight[peer] = self._selection.in_flight.get(peer, 0) + 1
        self._hold(peer, f"attempt:{row.id}:{n}", True)
        try:
            await self._tasks.add_attempt(row.id, n, peer, time.time())
            await self._update(live, phase="assigned", node_id=peer)
            pay = self._bidding.payments
            terms = pay.terms(live.ticket, peer, bid.price_per_token) if pay is not None else {}
            assign = Assign(
                task_id=row.id, attempt=n, model=row.model, input=row.input,
                params=params_from_dict(row.parameters), priority=row.priority,
                adapter=str(row.parameters.get("adapter", "")), **terms,
                chat=bool(row.parameters.get("chat")), stream=bool(row.parameters.get("stream")),
            )  # fmt: skip
            t0 = time.monotonic()
            verdict = await self._assign(peer, assign)
            refused = verdict.error
            live.dispatch["sent_s"] = round(verdict.sent - row.created_at, 6)
            if refused is not None:
                self._bidding.observed.failed(peer)
                return refused
            self._metrics.dispatch_latency.observe(time.monotonic() - live.submitted_mono)
            log.info("task %s attempt %d assigned to %s (%.1f ms)", row.id, n, peer,
                     (time.monotonic() - t0) * 1000)  # fmt: skip
            live.last_progress = started = trio.current_time()
            policy = DeadlinePolicy.of(self._config, row.timeout_s)
            tps = self._bidding.observed.get(peer).tokens_per_s
            live.first_progress_s = first_progress_s(
                policy, prompt_tokens(row.input), slowest([tps], policy.reference_tokens_per_s)
            )
            await self._update(live, phase="running", status="running",
                               timings={**row.timings, **live.dispatch,
                                        "assigned_s": since(row)})  # fmt: skip
            error = await self.await_result(live, peer)
            await self._observe(live, peer, error, trio.current_time() - started)
            return error
        finally:
            self._selection.in_flight[peer] -= 1
            self._hold(peer, f"attempt:{row.id}:{n}", False)

    async def _observe(self, live: LiveTask, peer: str, error: str | None, took: float) -> None:
        """Selection's record of ``peer`` (``Bidding.observed``); a worker that accepted and
        then stalled also loses reputation, like a replica that never commits."""
        observed = self._bidding.observed
        if error is None and live.result is not None:
            observed.completed(peer, len(live.result.token_ids), took)
        elif error is not None:
            observed.failed(peer)
            if error.startswith("no progress") and self._stalled is not None:
                await self._stalled(peer)

    async def assign(self, peer: str, assign: Assign) -> str | None:
        """Hand ``assign`` to ``peer``; None when accepted, else why not.

        Assignments for one peer that become ready while an earlier request to it is
        in flight go together in the next one.
        """
        return (await self._assign(peer, assign)).error

    async def _assign(self, peer: str, assign: Assign) -> _Verdict:
        verdict = _Verdict()
        queue = self._to_assign.get(peer)
        if queue is None:
            queue = self._to_assign[peer] = []
            self._nursery().start_soon(self._assigner, peer, queue)
        queue.append((assign, verdict))
        await verdict.done.wait()
        return verdict

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
                sent = time.time()
                for _, v in batch:
                    v.sent = sent
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
                    why = str(exc) or f"no verdict within {ASSIGN_TIMEOUT_S:g} s"
                    errors = [f"assignment to {peer} failed: {why}"] * len(batch)
                for (_, verdict), error in zip(batch, errors, strict=True):
                    verdict.error = error
                    verdict.done.set()
        finally:
            del self._to_assign[peer]
            for _, verdict in queue:  # only when cancelled (shutdown)
                verdict.error = "the origin is shutting down"
                verdict.done.set()

    async def await_result(
        self, live: LiveTask, peer: str, require_alive: bool = True
    ) -> str | None:
        last_written = -PROGRESS_WRITE_EVERY_S
        while True:
            if live.result is not None:
                return None
            if live.attempt_error is not None:
                return live.attempt_error
            if require_alive and not self._view.alive(peer):
                return f"worker {peer} left the network"
            # An absolute deadline: a remainder computed by subtraction can round to a
            # wait shorter than the clock resolves, and the loop would spin at the boundary.
            # (before its first report an attempt may take longer: a long prompt's prefill)
            limit = max(live.row.timeout_s, live.first_progress_s)
            deadline = live.last_progress + limit
            now = trio.current_time()
            if now >= deadline:
                return f"no progress from {peer} for {limit:g} s"
            if live.progress and now - last_written >= PROGRESS_WRITE_EVERY_S:
                last_written = now
                await self._update(live, progress=live.progress)
            with trio.move_on_at(min(now + 1.0, deadline)):
                await live.changed.wait()

    async def cancel_worker(self, live: LiveTask) -> None:
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
