"""Settlement: a settled outcome becomes an anchor (and slash) request on the chain's queue.

The one place the market talks to the chain (settlement v2, ``docs/settlement-v2.md``).
:class:`Settler` takes a finished task's outcome and the agreeing workers' signatures of
it, checks each against the address the signer's heartbeats bind to its peer id and the
chain's domain, drops signers without an eligible stake, applies the quorum rule (more
than half of the replicas in the requester's ticket), adds the requester's award of each
worker at its price, and queues the anchor: the contract pays each agreeing worker its
price × the agreed answer's tokens from the requester's deposit, burns and mints by its
own parameters. For a deterministic task decided by a supermajority it also queues a
slash of each outvoted worker whose own signed Result names another result under the
same numeric profile (the only evidence the contract accepts). A task without a ticket
(unpaid: the embedded chain is private to its node) is anchored on this node's own chain
under an unpaid ticket (price 0) that this node signs as its requester: every signature
is checked as for a paid task, so on an embedded chain only this node's own counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vcoind.chain.contracts import ChainError
from vcoind.chain.queue import AnchorCall, SlashCall
from vcoind.chain.queue import Vote as ChainVote
from vcoind.chain.service import ChainService
from vcoind.chain.typed import ZERO32, Domain, Outcome, recover, result_struct_hash
from vcoind.market.payments import Payments, SignedTicket
from vcoind.presence.view import NetworkView

if TYPE_CHECKING:
    from vcoind.config import ChainConfig

log = logging.getLogger("vcoind.settle")


@dataclass(frozen=True)
class Vote:
    """An agreeing worker: its peer id, address, outcome signature and awarded price."""

    peer: str
    address: str
    signature: bytes
    price: int = 0  # wei per token


@dataclass(frozen=True)
class Evidence:
    """An outvoted worker's own signed Result (what a slash needs)."""

    peer: str
    result_hash: bytes
    profile: bytes
    signature: bytes


@dataclass(frozen=True)
class Settled:
    """A completed task's outcome, for anchoring."""

    task_id: str
    model_id: str
    mode: str  # single, consensus, lora_training, oracle
    outcome: Outcome
    votes: list[Vote]
    replicas: int  # assigned (the quorum counts the ticket's, when there is one)
    deterministic: bool
    ticket: SignedTicket | None = None  # None: unpaid
    evidence: list[Evidence] = field(default_factory=list)
    customer: str = ""


class Settler:
    def __init__(
        self,
        cfg: ChainConfig,
        chain: ChainService,
        view: NetworkView,
        payments: Payments,
    ) -> None:
        self._cfg = cfg
        self._chain = chain
        self._view = view
        self._payments = payments

    async def settle(self, s: Settled) -> None:
        """Queue the anchor of a completed task (and the slashes its evidence supports),
        or record why it is not anchored."""
        me = self._payments.address.lower()
        if (
            s.ticket is None
            and not self._chain.shared
            and not any(v.address.lower() == me for v in s.votes)
        ):  # an embedded chain counts our signature only, and we have none: no chain work
            await self._not_anchored(s.task_id, f"0 of {s.replicas} replicas signed on this "
                                     "node's embedded chain (it is its own: only this node's "
                                     "signature counts there)")  # fmt: skip
            return
        try:
            domain = await self._chain.ensure_domain()
        except ChainError as exc:
            log.warning("task %s not anchored: %s", s.task_id, exc)
            return
        try:
            st, votes = self._votes(domain, s)
        except ValueError as exc:  # a malformed id: cannot be encoded for the chain
            log.warning("task %s not anchored: %s", s.task_id, exc)
            return
        t = st.ticket()
        if s.outcome.decision not in (2, 3) or len(votes) * 2 <= t.replicas:
            why = ("no clear decision" if s.outcome.decision not in (2, 3) else
                   f"{len(votes)} of {t.replicas} replicas signed with an eligible stake; a "
                   "quorum needs more than half")  # fmt: skip
            if s.ticket is None and not self._chain.shared and s.outcome.decision in (2, 3):
                why += " (this node's embedded chain is its own: only its signature counts)"
            await self._not_anchored(s.task_id, why)
            return
        call = AnchorCall(t, st.signature, s.outcome, votes)
        await self._chain.enqueue("anchor", call.payload(), call.key())
        for slash in self._slashable(domain, s):  # after the anchor: the queue keeps order
            await self._chain.enqueue("slash", slash.payload(), slash.key())

    async def _not_anchored(self, task_id: str, why: str) -> None:
        """The task's anchor op, failed with ``why`` (``vcoin task`` shows it)."""
        op_id = await self._chain.ops.enqueue("anchor", {"task_id": task_id}, f"anchor:{task_id}")
        await self._chain.ops.update(op_id, status="failed", error=f"not anchored: {why}")
        log.info("task %s not anchored: %s", task_id, why)

    def _votes(self, domain: Domain, s: Settled) -> tuple[SignedTicket, list[ChainVote]]:
        """The ticket to anchor under and the votes that count: each recovering to its
        signer's bound address on this chain, eligible, once per address."""
        pay, me = self._payments, self._payments.address.lower()
        st = s.ticket or pay.self_ticket(domain, s.task_id, s.model_id, s.mode, s.replicas,
                                         s.deterministic, s.outcome.units)  # fmt: skip
        out: list[ChainVote] = []
        seen: set[str] = set()
        digest = domain.digest(s.outcome.hash(st.ticket()))
        for v in s.votes:
            if v.address.lower() == me:  # ours: signed again under this chain's domain
                signer, sig = pay.address, pay.sign_on(domain, s.outcome.hash(st.ticket()))
            else:
                bound = self._view.eth_address_of(v.peer)
                got = recover(digest, v.signature)
                if got is None or bound is None or got.lower() != bound.lower():
                    log.info("task %s: signature of %s does not verify on this chain; not "
                             "counted", s.task_id, v.peer)  # fmt: skip
                    continue
                signer, sig = got, v.signature
            if signer.lower() in seen:
                log.info("task %s: %s signed already (an address counts once)", s.task_id,
                         signer)  # fmt: skip
                continue
            stake = self._chain.stake_of(signer)
            if stake is not None and not stake.eligible:  # the contract would refuse it
                log.info("task %s: %s has no eligible stake; not counted", s.task_id, v.peer)
                continue
            seen.add(signer.lower())
            out.append(self._vote(domain, st, signer, v.price if s.ticket else 0, sig))
        return st, out

    def _vote(
        self, domain: Domain, st: SignedTicket, worker: str, price: int, sig: bytes
    ) -> ChainVote:
        return ChainVote(worker, price, self._payments.award(st, worker, price, domain), sig)

    def _slashable(self, domain: Domain, s: Settled) -> list[SlashCall]:
        """Slash requests for outvoted workers whose own Result signature contradicts a
        deterministic supermajority under the same numeric profile."""
        o = s.outcome
        if not s.deterministic or o.decision != 3 or o.profile == ZERO32 or s.ticket is None:
            return []
        out = []
        for ev in s.evidence:
            bound = self._view.eth_address_of(ev.peer)
            if bound is None or ev.result_hash == o.result_hash or ev.profile != o.profile:
                continue
            digest = domain.digest(result_struct_hash(s.task_id, ev.result_hash, ev.profile))
            signer = recover(digest, ev.signature)
            if signer is None or signer.lower() != bound.lower():
                continue
            log.info("task %s: %s signed a different result; slash queued", s.task_id, ev.peer)
            out.append(SlashCall(s.task_id, signer, ev.result_hash, ev.signature))
        return out
