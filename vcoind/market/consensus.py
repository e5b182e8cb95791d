"""Consensus tasks: several replicas, commit-reveal, a weighted vote, signed outcomes.

``Replica`` is a worker's part (commit its result, reveal it once the commit phase
is closed, tally and sign); ``Coordinator`` is the origin's part (choose replicas,
close the commit phase, check reveals, tally, recompute when confidence is low,
collect signatures, move reputations). Both tally with ``vcoind.consensus.tally``
over the same inputs, so their outcome digests match.

Rules enforced (each breach is logged, counted in
``vcoin_consensus_rejected_total{reason}`` and, at the origin, costs the sender
reputation): a commitment after the phase closed (``late_commit``), a commitment equal
to another replica's (``duplicate_commit``: copied from gossip), a reveal
before it closed (``early_reveal``), a reveal that does not hash to its
commitment (``bad_reveal``: commitments are bound to their committer and attempt), a
reveal or vote from a peer not listed (``not_listed``), a reveal sent by a peer other
than its author (``not_author``), a signature that does not recover to the signer
(``bad_signature``). Reveals travel point to point (``VoteContext.send_reveal``); a
replica that commits and never reveals is dropped at the reveal deadline and the others
vote without it (``RevealsClosed``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from vcoind.chain.typed import Outcome as TypedOutcome
from vcoind.consensus.outcome import commitment, result_hash
from vcoind.consensus.reputation import DEFAULT_REPUTATION, updated_reputation
from vcoind.consensus.tally import Outcome, Revealed
from vcoind.consensus.weights import NodeRecord, node_weight
from vcoind.market.messages import Assign, TaskResult
from vcoind.market.payments import Payments, SignedTicket
from vcoind.market.ports import Hold, no_hold
from vcoind.market.tallying import ordered_results, settled_outcome, tally_async
from vcoind.market.votes import (
    MAX_REPLICAS,
    CommitsClosed,
    Committer,
    OutcomeVote,
    ResultCommitment,
    ResultReveal,
    RevealsClosed,
)
from vcoind.p2p.streams import StreamProtocolError
from vcoind.store import ConsensusStore, SignatureRow, ValidationRow

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger("vcoind.consensus")

REVEAL_TIMEOUT_S = 10.0
VOTE_WAIT_S = 5.0
PENDING_S = 300.0
SLOW_FAULT_S = 5.0
ENDED_ROUNDS_KEPT = 4096  # a replica keeps an unrevealed result this long
PROMPT_HEAD = 2048
_COSTS_LIKE_BAD_REVEAL = ("bad_reveal", "not_listed", "early_reveal", "duplicate_commit",
                          "not_author")  # fmt: skip
Publish = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class VoteContext:
    """Who we are on the votes topic, and the means both roles share."""

    peer_id: str
    network: str
    payments: Payments  # results and outcomes signed as settlement v2 typed data
    publish: Publish
    embed: Callable[[Sequence[str]], Awaitable[list[tuple[float, ...]]]]
    rejected: Counter  # vcoin_consensus_rejected_total{reason}
    # a reveal to one peer on the task protocol (StreamProtocolError if undelivered)
    send_reveal: Callable[[str, ResultReveal], Awaitable[None]]


def prompt_hash(prompt: str) -> bytes:
    """What ``CommitsClosed`` carries instead of the prompt: sha256 of its head."""
    return hashlib.sha256(prompt[:PROMPT_HEAD].encode("utf-8")).digest()


@dataclass
class _Pending:
    """A replica's result between commitment and reveal."""

    origin: str
    result: TaskResult
    salt: bytes
    ticket: SignedTicket | None
    deterministic: bool
    expires: float  # trio clock: forgotten then if the origin never closed the round
    prompt: str = ""  # the head of our assignment's input (relevance is judged on it)
    evidence: bool = True  # sign our Result (slashing evidence); not as a pipeline driver
    closed: CommitsClosed | None = None
    reveals: dict[str, ResultReveal] = field(default_factory=dict)
    reveals_closed: RevealsClosed | None = None
    committed: set[str] = field(default_factory=set)  # peers seen committing to the task
    voted: bool = False


class Replica:
    """The worker side of consensus."""

    def __init__(self, ctx: VoteContext, fault: str = "") -> None:
        self._ctx = ctx
        self.fault = fault
        self._pending: dict[str, _Pending] = {}  # task id -> our result awaiting reveal

    async def commit(self, origin: str, result: TaskResult, assign: Assign) -> None:
        """Called by the worker with a finished consensus attempt; returns once published."""
        now = trio.current_time()
        for task_id in [k for k, p in self._pending.items() if p.expires < now]:
            del self._pending[task_id]
        if self.fault == "silent":
            log.warning("fault injection: staying silent on %s", result.task_id)
            return
        if self.fault == "slow":  # late: after a short commit deadline, within the default
            await trio.sleep(SLOW_FAULT_S)
        if self.fault == "junk":
            words = [secrets.token_hex(3) for _ in range(max(4, len(result.token_ids) // 2))]
            result = TaskResult(**{**result.__dict__, "text": " ".join(words),
                                   "token_ids": tuple(range(len(words)))})  # fmt: skip
        salt = secrets.token_bytes(32)
        c = commitment(result.task_id, self._ctx.peer_id, result.attempt,
                       result_hash(result.text), salt)  # fmt: skip
        if self.fault == "copy":  # has nothing to copy yet: commits to a guess
            c = secrets.token_bytes(32)
        self._pending[result.task_id] = _Pending(origin, result, salt, assign.ticket,
                                                 assign.params.greedy,
                                                 now + PENDING_S,
                                                 assign.input[:PROMPT_HEAD],
                                                 not assign.route)  # fmt: skip
        await self._ctx.publish(ResultCommitment(
            self._ctx.network, self._ctx.peer_id, 0, 0.0, result.task_id, origin, result.attempt, c,
        ))  # fmt: skip

    async def on_closed(self, msg: CommitsClosed) -> None:
        p = self._pending.get(msg.task_id)
        if p is None or msg.peer_id != p.origin:
            return
        me = next((c for c in msg.committers if c.peer_id == self._ctx.peer_id), None)
        if me is None or me.attempt != p.result.attempt:
            log.info("task %s: our commitment was not accepted", msg.task_id)
            return
        if msg.prompt_hash != prompt_hash(p.prompt):
            log.warning("task %s: the origin's close names another prompt than our "
                        "assignment's; not revealing", msg.task_id)  # fmt: skip
            self._pending.pop(msg.task_id, None)
            return
        p.closed = msg
        r = p.result
        text, salt = r.text, p.salt
        if self.fault == "copy":  # copy the first answer revealed by someone else
            with trio.move_on_after(REVEAL_TIMEOUT_S / 2):
                while not any(k != self._ctx.peer_id for k in p.reveals):
                    await trio.sleep(0.05)
            other = next((v for k, v in p.reveals.items() if k != self._ctx.peer_id), None)
            if other is not None:
                text = other.text
        pay = self._ctx.payments  # a pipeline driver bid on nothing: it signs no Result
        result_sig, profile = (pay.sign_result(r.task_id, result_hash(text)) if p.evidence
                               else (b"", pay.profile()))  # fmt: skip
        reveal = ResultReveal(self._ctx.network, self._ctx.peer_id, 0, 0.0, r.task_id, p.origin,
                              r.attempt, text, r.token_ids, r.finish_reason, salt, profile,
                              result_sig)  # fmt: skip
        p.reveals[self._ctx.peer_id] = reveal
        # Point to point: to the origin and the other listed replicas, never gossiped.
        targets = ({c.peer_id for c in msg.committers} - {self._ctx.peer_id}) | {p.origin}
        async with trio.open_nursery() as nursery:
            for peer in sorted(targets):
                nursery.start_soon(self._send_reveal, peer, reveal)
        await self._maybe_vote(msg.task_id)

    async def _send_reveal(self, peer: str, reveal: ResultReveal) -> None:
        try:
            await self._ctx.send_reveal(peer, reveal)
        except StreamProtocolError as exc:
            log.info("task %s: reveal not delivered to %s: %s", reveal.task_id, peer, exc)

    def on_commitment(self, c: ResultCommitment) -> None:
        """Who committed to a task we hold a result of: only they may reveal early."""
        p = self._pending.get(c.task_id)
        if p is not None and c.origin == p.origin and len(p.committed) < 4 * MAX_REPLICAS:
            p.committed.add(c.peer_id)

    async def on_reveal(self, r: ResultReveal) -> None:
        p = self._pending.get(r.task_id)
        if p is None:
            return
        if p.closed is None:  # we have not seen the close yet: keep it, judge it then
            _keep_early(p, r)
            return
        if _check_reveal(p.closed, r) is None:
            p.reveals.setdefault(r.peer_id, r)
            await self._maybe_vote(r.task_id)

    async def on_reveals_closed(self, msg: RevealsClosed) -> None:
        p = self._pending.get(msg.task_id)
        if p is None or msg.peer_id != p.origin or p.closed is None:
            return
        if msg.round == p.closed.round:
            p.reveals_closed = msg
            await self._maybe_vote(msg.task_id)

    async def _maybe_vote(self, task_id: str) -> None:
        """Vote once we hold a valid reveal from every listed replica, or from every one
        the origin tallied after the reveal deadline (``RevealsClosed``)."""
        p = self._pending.get(task_id)
        if p is None or p.closed is None or p.voted:
            return
        if p.origin == self._ctx.peer_id:  # the origin signs its own outcome
            del self._pending[task_id]
            return
        listed = {c.peer_id for c in p.closed.committers}
        want = listed if p.reveals_closed is None else set(p.reveals_closed.revealed) & listed
        if self._ctx.peer_id not in want:  # dropped from the round: nothing of ours to sign
            return
        valid = {k: v for k, v in p.reveals.items()
                 if k in want and _check_reveal(p.closed, v) is None}  # fmt: skip
        if not want or set(valid) != want:
            return
        p.voted = True
        results, weights = ordered_results(p.closed, valid)
        outcome = await tally_async(p.prompt, results, weights, self._ctx.embed)
        signed = settled_outcome(outcome, results, valid, p.deterministic)
        sig = self._ctx.payments.sign_outcome(task_id, p.ticket, signed)
        self._pending.pop(task_id, None)
        await self._ctx.publish(OutcomeVote(
            self._ctx.network, self._ctx.peer_id, 0, 0.0, task_id, p.origin, p.closed.round,
            outcome.result_hash, outcome.decision, self._ctx.payments.address, sig,
            signed.units, signed.profile,
        ))  # fmt: skip


def _keep_early(p: _Pending, r: ResultReveal) -> None:
    """Keep a reveal that came before the close, at most ``MAX_REPLICAS`` of them; one
    from a peer seen committing displaces one from a peer that was not (strangers cannot
    crowd the real replicas out, and a reveal that outran its commitment is still kept
    while there is room)."""
    if r.peer_id in p.reveals:
        return
    if len(p.reveals) >= MAX_REPLICAS:
        stranger = next((k for k in p.reveals if k not in p.committed), None)
        if r.peer_id not in p.committed or stranger is None:
            return
        del p.reveals[stranger]
    p.reveals[r.peer_id] = r


def _check_reveal(closed: CommitsClosed, r: ResultReveal) -> str | None:
    """Why ``r`` is not a valid reveal for ``closed`` (None: it is)."""
    c = next((c for c in closed.committers if c.peer_id == r.peer_id), None)
    if c is None or c.attempt != r.attempt:
        return "not_listed"
    if commitment(r.task_id, r.peer_id, r.attempt, result_hash(r.text), r.salt) != c.commitment:
        return "bad_reveal"
    return None


# --- origin side ------------------------------------------------------------


@dataclass
class RoundState:
    task_id: str
    round: int
    attempts: dict[int, str]  # attempt -> replica peer
    assigned_at: float
    commits: dict[int, tuple[bytes, float]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    closed: CommitsClosed | None = None
    reveals: dict[str, ResultReveal] = field(default_factory=dict)
    votes: dict[str, OutcomeVote] = field(default_factory=dict)
    ticket: SignedTicket | None = None  # the requester's (settlement v2); None: unpaid
    deterministic: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    phases: dict[str, float] = field(default_factory=dict)  # seconds since assignment

    def mark(self, phase: str) -> None:
        self.phases[phase] = round(time.time() - self.assigned_at, 6)

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, done: Callable[[], bool], timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not done():
                await self.changed.wait()


@dataclass(frozen=True)
class RoundResult:
    outcome: Outcome | None
    results: list[Revealed]
    closed: CommitsClosed | None
    error: str | None = None


class Coordinator:
    """The origin's side: one ``RoundState`` per consensus round in flight."""

    def __init__(
        self,
        ctx: VoteContext,
        store: ConsensusStore,
        *,
        eth_address_of: Callable[[str], str | None],
        health_of: Callable[[str], float],
        hold: Hold = no_hold,
    ) -> None:
        self._ctx = ctx
        self._store = store
        self._eth_address_of = eth_address_of
        self._health_of = health_of
        self._hold = hold  # a round's replicas stay connected until it ends
        self._rounds: dict[str, RoundState] = {}
        # Rounds that ended, so a commitment that comes after them is still recognised.
        self._ended: OrderedDict[str, dict[int, str]] = OrderedDict()

    # --- votes topic handlers ---------------------------------------------

    async def on_commitment(self, c: ResultCommitment) -> None:
        if c.origin != self._ctx.peer_id:
            return
        st = self._rounds.get(c.task_id)
        if st is None or st.attempts.get(c.attempt) != c.peer_id:
            if self._ended.get(c.task_id, {}).get(c.attempt) == c.peer_id:
                await self._penalise(c.peer_id, "late_commit", c.task_id)
            return
        if st.closed is not None:
            await self._penalise(c.peer_id, "late_commit", c.task_id)
            return
        if any(cm == c.commitment for a, (cm, _) in st.commits.items() if a != c.attempt):
            await self._penalise(c.peer_id, "duplicate_commit", c.task_id)  # copied
            return
        st.commits.setdefault(c.attempt, (c.commitment, time.time()))
        st.wake()

    async def on_reveal(self, r: ResultReveal) -> None:
        st = self._rounds.get(r.task_id)
        if st is None or r.origin != self._ctx.peer_id:
            return
        if st.closed is None:
            await self._penalise(r.peer_id, "early_reveal", r.task_id)
            return
        reason = _check_reveal(st.closed, r)
        if reason is not None:
            await self._penalise(r.peer_id, reason, r.task_id)
            return
        st.reveals.setdefault(r.peer_id, r)
        st.wake()

    async def on_vote(self, v: OutcomeVote) -> None:
        st = self._rounds.get(v.task_id)
        if st is None or v.origin != self._ctx.peer_id or st.closed is None:
            return
        if v.peer_id not in {c.peer_id for c in st.closed.committers}:
            await self._penalise(v.peer_id, "not_listed", v.task_id)
            return
        st.votes.setdefault(v.peer_id, v)
        st.wake()

    def on_attempt_failed(self, task_id: str, attempt: int, error: str) -> None:
        st = self._rounds.get(task_id)
        if st is not None and attempt in st.attempts:
            st.failed[attempt] = error
            st.wake()

    async def _penalise(self, peer: str, reason: str, task_id: str) -> None:
        log.info("task %s: %s from %s rejected", task_id, reason, peer)
        self._ctx.rejected.labels(reason=reason).inc()
        event = "bad_reveal" if reason in _COSTS_LIKE_BAD_REVEAL else reason
        if event in ("bad_reveal", "late_commit"):
            await self._store.adjust_reputation(peer, _moved(event))

    # --- one round --------------------------------------------------------

    def in_flight(self) -> int:
        return len(self._rounds)

    def open_round(
        self, task_id: str, round_: int, attempts: dict[int, str],
        ticket: SignedTicket | None = None, deterministic: bool = False,
    ) -> RoundState:  # fmt: skip
        st = RoundState(task_id, round_, attempts, time.time(), ticket=ticket,
                        deterministic=deterministic)  # fmt: skip
        self._rounds[task_id] = st
        for n, peer in attempts.items():
            self._hold(peer, f"round:{task_id}:{n}", True)
        return st

    def end(self, task_id: str) -> None:
        st = self._rounds.pop(task_id, None)
        if st is not None:
            for n, peer in st.attempts.items():
                self._hold(peer, f"round:{task_id}:{n}", False)
            self._ended[task_id] = {**self._ended.get(task_id, {}), **st.attempts}
            while len(self._ended) > ENDED_ROUNDS_KEPT:
                self._ended.popitem(last=False)

    async def run_round(self, st: RoundState, prompt: str, commit_timeout_s: float) -> RoundResult:
        """Commit phase, close, reveals, tally. The replicas were assigned already; the
        prompt's embedding (for the tally) is computed meanwhile."""
        prompt_vec: list[tuple[float, ...]] = []
        embedded = trio.Event()

        async def embed_prompt() -> None:
            prompt_vec.extend(await self._ctx.embed([prompt[:PROMPT_HEAD]]))
            embedded.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(embed_prompt)
            rr = await self._run_round(st, prompt, commit_timeout_s, embedded, prompt_vec)
            nursery.cancel_scope.cancel()  # a round that ended before its tally
        return rr

    async def _run_round(
        self, st: RoundState, prompt: str, commit_timeout_s: float, embedded: trio.Event,
        prompt_vec: list[tuple[float, ...]],
    ) -> RoundResult:  # fmt: skip
        want = set(st.attempts)
        await st.wait(lambda: set(st.commits) | set(st.failed) >= want, commit_timeout_s)
        st.mark("committed")  # the slowest replica's commitment is in (or the deadline)
        silent = [a for a in want if a not in st.commits and a not in st.failed]
        for a in silent:
            await self._store.adjust_reputation(st.attempts[a], _moved("timeout"))
        if not st.commits:
            return RoundResult(None, [], None, "no replica committed a result in time")
        weights = await self._weights(st)
        committers = tuple(
            Committer(st.attempts[a], a, st.commits[a][0], weights[st.attempts[a]])
            for a in sorted(st.commits)
        )
        closed = CommitsClosed(self._ctx.network, self._ctx.peer_id, 0, 0.0, st.task_id, st.round,
                               prompt_hash(prompt), committers)  # fmt: skip
        st.closed = closed
        st.mark("commits_closed")
        await self._ctx.publish(closed)
        listed = {c.peer_id for c in committers}
        await st.wait(lambda: set(st.reveals) >= listed, REVEAL_TIMEOUT_S)
        results, ws = ordered_results(closed, st.reveals)
        st.mark("revealed")
        if not results:
            return RoundResult(None, [], closed, "no replica revealed a valid result")
        missing = listed - set(st.reveals)
        for peer in missing:
            await self._store.adjust_reputation(peer, _moved("timeout"))
        if missing:  # dropped from the round: the others vote on what we tally
            log.info("task %s: %d replica(s) did not reveal in time; tallying %d",
                     st.task_id, len(missing), len(results))  # fmt: skip
            await self._ctx.publish(RevealsClosed(
                self._ctx.network, self._ctx.peer_id, 0, 0.0, st.task_id, st.round,
                tuple(r.peer_id for r in results),
            ))  # fmt: skip
        await embedded.wait()
        outcome = await tally_async(prompt[:PROMPT_HEAD], results, ws, self._ctx.embed,
                                    prompt_vec[0])  # fmt: skip
        st.mark("tallied")
        return RoundResult(outcome, results, closed)

    async def _weights(self, st: RoundState) -> dict[str, float]:
        peers = [st.attempts[a] for a in sorted(st.commits)]
        record = await self._store.track_record(peers)
        reps = await self._store.reputations(peers, DEFAULT_REPUTATION)
        handled = await self._store.max_tokens_handled(peers)
        out = {}
        for a in sorted(st.commits):
            peer = st.attempts[a]
            agreed, total = record.get(peer, (0, 0))
            w = node_weight(NodeRecord(
                agreed=agreed, validations=total,
                mean_response_s=st.commits[a][1] - st.assigned_at,
                health=self._health_of(peer),
                max_tokens_handled=handled.get(peer, 0),  # its longest completed task
            ))  # fmt: skip
            # A peer whose reputation fell votes with less weight (never more than 1).
            out[peer] = round(w * min(1.0, reps[peer] / DEFAULT_REPUTATION), 6)
        return out

    async def record(self, st: RoundState, rr: RoundResult) -> None:
        """Validations and reputation after a tallied round."""
        assert rr.outcome is not None
        o = rr.outcome
        answer = o.result_hash.hex()
        now = time.time()
        rows = [
            ValidationRow(
                st.task_id,
                st.round,
                self._ctx.peer_id,
                r.peer_id,
                result_hash(r.text).hex(),
                answer,
                o.similarity[i][o.answer],
                o.agreed[i],
                now,
            )
            for i, r in enumerate(rr.results)
        ]
        await self._store.add_validations(rows)
        for i, r in enumerate(rr.results):
            await self._store.adjust_reputation(
                r.peer_id, _moved("agreed" if o.agreed[i] else "outvoted")
            )

    def outcome(self, st: RoundState, rr: RoundResult) -> TypedOutcome:
        """The round's outcome as the agreeing replicas sign it (``settled_outcome``)."""
        assert rr.outcome is not None
        return settled_outcome(rr.outcome, rr.results, st.reveals, st.deterministic)

    async def sign(self, st: RoundState, rr: RoundResult) -> SignatureRow:
        """Sign the outcome and publish our vote; the replicas' votes follow."""
        assert rr.outcome is not None
        o, ctx = rr.outcome, self._ctx
        signed = self.outcome(st, rr)
        sig = ctx.payments.sign_outcome(st.task_id, st.ticket, signed)
        vote = OutcomeVote(ctx.network, ctx.peer_id, 0, 0.0, st.task_id, ctx.peer_id, st.round,
                           o.result_hash, o.decision, ctx.payments.address, sig, signed.units,
                           signed.profile)  # fmt: skip
        await ctx.publish(vote)
        row = SignatureRow(ctx.peer_id, ctx.payments.address, o.result_hash.hex(), o.decision,
                           sig.hex(), time.time())  # fmt: skip
        await self._store.add_signature(st.task_id, row)
        return row

    async def collect(self, st: RoundState, rr: RoundResult) -> list[SignatureRow]:
        """Wait (at most ``VOTE_WAIT_S``) for the replicas' votes; store the valid ones.

        Runs after the task is complete: signatures matter for anchoring, not for the
        answer, so the client does not wait for them.
        """
        assert rr.outcome is not None and rr.closed is not None
        o = rr.outcome
        signed = self.outcome(st, rr)
        # the replicas whose reveals were tallied (one dropped at the deadline signs nothing)
        signers = {r.peer_id for r in rr.results} - {self._ctx.peer_id}
        await st.wait(lambda: set(st.votes) >= signers, VOTE_WAIT_S)
        rows = []
        for peer, v in sorted(st.votes.items()):
            if peer not in signers:
                continue  # our own (stored by sign()), or a replica dropped from the round
            if (v.round != st.round or v.result_hash != o.result_hash
                    or v.decision != o.decision or v.units != signed.units
                    or v.profile != signed.profile):  # fmt: skip
                log.info("task %s: %s signed a different outcome", st.task_id, peer)
                continue
            signer = self._ctx.payments.outcome_signer(st.task_id, st.ticket, signed, v.signature)
            bound = self._eth_address_of(peer)
            if (
                signer is None
                or signer.lower() != v.eth_address.lower()
                or (bound is not None and bound.lower() != signer.lower())
            ):
                await self._penalise(peer, "bad_signature", st.task_id)
                continue
            rows.append(SignatureRow(peer, signer, o.result_hash.hex(), o.decision,
                                     v.signature.hex(), time.time()))  # fmt: skip
        for row in rows:
            await self._store.add_signature(st.task_id, row)
        return rows


def _moved(event: str) -> Callable[[float], float]:
    return lambda rep: updated_reputation(rep, event)
