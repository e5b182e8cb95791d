"""Consensus rounds, the origin's side of a consensus task.

Replicas are chosen from the bids (or, for a pipelined task, disjoint routes), assigned
together, and the ``Coordinator`` runs commit, reveal and the vote. When confidence is
low one more round runs with more replicas. The outcome is signed here, the other
replicas' signatures are added to the finished task's record, and the signed outcome
goes to settlement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from vcoind.compute.shard_host import PipelineError
from vcoind.config import MarketConfig
from vcoind.consensus.outcome import result_hash
from vcoind.market.assign import Assignment
from vcoind.market.bidding import Bidding
from vcoind.market.consensus import Coordinator, RoundResult, RoundState
from vcoind.market.deadlines import (
    DeadlinePolicy,
    commit_deadline_s,
    first_progress_s,
    prompt_tokens,
    slowest,
)
from vcoind.market.live import LiveTask, Update, params_from_dict, since
from vcoind.market.messages import Assign, GenParams, RouteHop
from vcoind.market.payments import ticket_hash
from vcoind.market.ports import Pipelines
from vcoind.market.selection import choose_replicas
from vcoind.market.settle import Evidence, Settled, Vote
from vcoind.market.votes import MAX_REPLICAS
from vcoind.presence.view import NetworkView
from vcoind.store import SignatureRow, TaskStore

log = logging.getLogger("vcoind.origin")


class ConsensusRounds:
    """The rounds of the origin's consensus tasks (``live``: its live tasks, by id).

    ``nursery`` gives the origin's nursery, where the signatures are collected after the
    task has concluded.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        tasks: TaskStore,
        view: NetworkView,
        live: Mapping[str, LiveTask],
        bidding: Bidding,
        assignment: Assignment,
        *,
        config: MarketConfig,
        update: Update,
        nursery: Callable[[], trio.Nursery],
        settle: Callable[[Settled], Awaitable[None]] | None = None,
        pipelines: Pipelines | None = None,
        stalled: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._stalled = stalled  # a replica that stopped reporting progress (reputation)
        self._coordinator = coordinator
        self._tasks = tasks
        self._view = view
        self._live = live
        self._bidding = bidding
        self._assignment = assignment
        self._update = update
        self._nursery = nursery
        self._settle = settle
        self._pipelines = pipelines

    def _terms(self, live: LiveTask, peer: str) -> dict[str, Any]:
        """The ticket and award of ``peer``'s assignment: at its bid's price (a pipelined
        replica did not bid: at the ticket's maximum)."""
        pay, st = self._bidding.payments, live.ticket
        if pay is None or st is None:
            return {}
        price = _price_of(live, peer)
        return pay.terms(st, peer, st.max_price if price is None else price)

    async def run(self, live: LiveTask) -> tuple[str, str | None]:
        """Replicas, commit-reveal, vote; when confidence is below 75 % one more round with
        two more replicas (at most 5); if that is still below 60 %, the answer is marked as a
        conservative fallback. A restarted origin starts the rounds afresh."""
        co = self._coordinator
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
                    bids = await self._bidding.collect(live, want=k)
                    chosen = choose_replicas(bids, k, self._view.profile_of,
                                             self._view.eth_address_of)  # fmt: skip
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
                st = co.open_round(row.id, round_, attempts, live.ticket,
                                   params_from_dict(row.parameters).greedy)  # fmt: skip
                await self._update(live, phase="assigned", status="running",
                                   node_id=",".join(attempts.values()))  # fmt: skip
                params = params_from_dict(row.parameters)

                async def assign(
                    n: int, peer: str, params: GenParams = params,
                    routes: dict[int, list[tuple[str, int, int]]] = routes,
                ) -> None:  # fmt: skip
                    if not params.greedy:
                        # sampled (or maybe, by the model's defaults): each its own draw
                        params = dataclasses.replace(params, seed=replica_seed(params.seed, n))
                    route = tuple(RouteHop(*h) for h in routes.get(n, ()))
                    others = tuple(sorted({h[0] for m, r in routes.items() if m != n for h in r}))
                    a = Assign(row.id, n, row.model, row.input, params, row.priority, True,
                               route, others, str(row.parameters.get("adapter", "")),
                               **self._terms(live, peer),
                               chat=bool(row.parameters.get("chat")))  # fmt: skip
                    error = await self._assignment.assign(peer, a)
                    if error is not None:
                        co.on_attempt_failed(row.id, n, error)

                async with trio.open_nursery() as nursery:
                    for n, peer in attempts.items():
                        nursery.start_soon(assign, n, peer)
                await self._update(live, phase="committing", timings={
                    **live.row.timings, "assigned_s": since(row)})  # fmt: skip
                policy = DeadlinePolicy.of(self._config, row.timeout_s)
                tps = slowest((self._bidding.observed.get(p).tokens_per_s for p in drivers),
                              policy.reference_tokens_per_s)  # fmt: skip
                n_prompt = prompt_tokens(row.input)
                deadline = commit_deadline_s(policy, params.max_new_tokens, n_prompt, tps)
                log.info("task %s round %d: commit deadline %.0f s (%d new tokens, slowest "
                         "replica %.1f tokens/s)", row.id, round_, deadline,
                         params.max_new_tokens, tps)  # fmt: skip
                async with trio.open_nursery() as watching:
                    watching.start_soon(self._watch, live, st,
                                        first_progress_s(policy, n_prompt, tps))  # fmt: skip
                    rr = await co.run_round(st, row.input, deadline)
                    watching.cancel_scope.cancel()
                for n in attempts:
                    ok = rr.outcome is not None and any(r.attempt == n for r in rr.results)
                    await self._tasks.finish_attempt(
                        row.id, n, "completed" if ok else "failed",
                        None if ok else st.failed.get(n, "no valid commitment or reveal"),
                        time.time(),
                    )  # fmt: skip
                if rr.outcome is None:
                    rounds.append({"round": round_, "error": rr.error,
                                   "commit_deadline_s": round(deadline, 3)})  # fmt: skip
                    if last is None and round_ == 1:
                        live.tried = set()
                        continue
                    break
                await co.record(st, rr)
                rounds.append({"round": round_, **rr.outcome.view(rr.results),
                               "phases_s": st.phases,
                               "commit_deadline_s": round(deadline, 3)})  # fmt: skip
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
            own = await co.sign(st, rr)
            o = rr.outcome
            answer = rr.results[o.answer]
            view = {
                **o.view(rr.results), "rounds": len(rounds), "history": rounds,
                "conflict": int(not all(o.agreed) or len(rounds) > 1 or o.decision
                                in ("none", "tie")),
                "fallback": o.action == "fallback",
                "note": _NOTES.get(o.action, ""),
                "signatures": [_sig_view(own)],
                # what the signatures sign (settlement v2, under the ticket's hash)
                "signed": {**co.outcome(st, rr).to_json(),
                           "ticket_hash": ticket_hash(live.ticket).hex()},
            }  # fmt: skip
            live.final = {
                "result": answer.text, "node_id": answer.peer_id, "model_id": model_id,
                "consensus": view, "progress": len(answer.token_ids),
            }  # fmt: skip
            self._nursery().start_soon(self._collect_signatures, live, st, rr, model_id)
            handed_off = True  # the collector ends the round
            return "completed", None
        finally:
            if not handed_off:
                co.end(row.id)

    async def _watch(self, live: LiveTask, st: RoundState, first_s: float) -> None:
        """Replicas that stop reporting progress leave the round at once (none within
        ``first_s`` of the assignment, then none for the task timeout before they commit)
        and lose reputation as a silent one does: the commit deadline covers a whole
        answer, and a replica that died must not hold the round that long."""
        start, gap = trio.current_time(), live.row.timeout_s
        while True:
            now, next_due = trio.current_time(), math.inf
            for n, peer in st.attempts.items():
                if n in st.commits or n in st.failed:
                    continue
                seen = live.attempt_progress.get(n)
                due = start + first_s if seen is None else seen + gap
                if now < due:
                    next_due = min(next_due, due)
                    continue
                waited = first_s if seen is None else gap
                log.info("task %s attempt %d: no progress from %s for %g s", st.task_id, n,
                         peer, waited)  # fmt: skip
                self._coordinator.on_attempt_failed(
                    st.task_id, n, f"no progress from {peer} for {waited:g} s")  # fmt: skip
                if self._stalled is not None:
                    await self._stalled(peer)
            if next_due == math.inf:
                return
            with trio.move_on_at(next_due):
                await live.changed.wait()

    async def _collect_signatures(
        self, live: LiveTask, st: RoundState, rr: RoundResult, model_id: str
    ) -> None:
        """The replicas' signatures, added to the finished task's consensus record."""
        co = self._coordinator
        try:
            rows = await co.collect(st, rr)
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
        self, live: LiveTask, st: RoundState, rr: RoundResult, model_id: str,
        signatures: list[dict[str, str]],
    ) -> None:  # fmt: skip
        o = rr.outcome
        if self._settle is None or o is None:
            return
        agreed = {r.peer_id for r, ok in zip(rr.results, o.agreed, strict=True) if ok}
        ticket = live.ticket
        cap = ticket.max_price if ticket is not None else 0

        def price(peer: str) -> int:
            p = _price_of(live, peer)
            return cap if p is None else p

        evidence = [
            Evidence(r.peer_id, result_hash(r.text), r.profile, r.result_sig)
            for peer, r in st.reveals.items()
            if peer not in agreed and r.result_sig
        ]
        await self._settle(Settled(
            task_id=live.row.id, model_id=model_id, mode="consensus",
            outcome=self._coordinator.outcome(st, rr),
            votes=[Vote(s["node_id"], s["eth_address"], bytes.fromhex(s["signature"]),
                        price(s["node_id"]))
                   for s in signatures if s["node_id"] in agreed],
            replicas=len(st.attempts), deterministic=st.deterministic, ticket=ticket,
            evidence=evidence, customer=live.row.customer,
        ))  # fmt: skip


def _price_of(live: LiveTask, peer: str) -> int | None:
    return next((b.price_per_token for b in live.bids if b.peer_id == peer), None)


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
