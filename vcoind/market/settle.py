"""Settlement: a settled outcome becomes an anchor request on the chain's write queue.

The one place the market talks to the chain. :class:`Settler` checks each agreeing
signature against the address the signer's heartbeats bind to its peer id, drops
signers without an eligible stake, applies the quorum rule (more than half of the
replicas), computes the reward (base + per token + per sample + the bid price, cut by
an SLA penalty while the customer's SLA is violated) and queues the anchor, or records
why it was not anchored. It also signs single-mode results for their anchor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vcoind.chain.service import AnchorRequest, ChainService, wei
from vcoind.consensus.outcome import DECISION_CODES, outcome_digest, recover_outcome_signer
from vcoind.consensus.outcome import result_hash as text_hash
from vcoind.market.messages import TaskResult
from vcoind.presence.view import NetworkView
from vcoind.signer import Signer
from vcoind.store import SLAStore

if TYPE_CHECKING:
    from vcoind.config import ChainConfig

log = logging.getLogger("vcoind.settle")


@dataclass(frozen=True)
class Settled:
    """A completed task's outcome, for anchoring: who signed it, who was outvoted."""

    task_id: str
    model_id: str
    result_hash: bytes
    decision: str  # "majority" for a single-mode task (one replica, one signature)
    signatures: list[tuple[str, str, bytes]]  # (peer id, eth address, signature) of agreeing
    replicas: int  # assigned in the deciding round
    outvoted: list[str]  # peer ids of replicas outside the agreed answer
    deterministic: bool  # greedy: replicas had to match token for token
    tokens: int
    price: float  # of the accepted bid(s)
    customer: str = ""  # whose SLA the task counts under
    samples: int = 0  # LoRA training: examples trained (the reward counts them)
    # LoRA training: examples each signer trained (peer id -> count); the reward is split
    # by these instead of equally
    shares: dict[str, int] = field(default_factory=dict)


class Settler:
    def __init__(
        self,
        cfg: ChainConfig,
        network: str,
        chain: ChainService,
        view: NetworkView,
        signer: Signer,
        slas: SLAStore,
        *,
        sla_window_s: float,
    ) -> None:
        self._cfg = cfg
        self._network = network
        self._chain = chain
        self._view = view
        self._signer = signer
        self._slas = slas
        self._sla_window_s = sla_window_s

    def sign_result(self, r: TaskResult) -> TaskResult:
        """A single-mode result signed as a one-replica "majority" outcome, for the anchor."""
        try:
            address, sig = self._signer.sign_outcome(r.task_id, text_hash(r.text), r.model_id,
                                                     "majority")  # fmt: skip
        except ValueError:  # no model id (cannot happen for a served model): leave unsigned
            return r
        return dataclasses.replace(r, eth_address=address, signature=sig)

    async def settle(self, s: Settled) -> None:
        """Queue the anchor of a completed task: the agreeing replicas' signatures (each
        checked against the address the signer's heartbeats bind to its peer id), the
        outvoted replicas, and the reward from the task's tokens and price."""
        chain = self._chain
        try:
            digest = outcome_digest(self._network, s.task_id, s.result_hash, s.model_id,
                                    s.decision)  # fmt: skip
        except ValueError as exc:
            log.warning("task %s not anchored: %s", s.task_id, exc)
            return
        voters: list[tuple[str, bytes]] = []
        shares: list[int] = []
        for peer, _address, sig in s.signatures:
            bound = self._view.eth_address_of(peer)
            signer = recover_outcome_signer(digest, sig)
            if signer is None or bound is None or signer.lower() != bound.lower():
                log.info("task %s: signature of %s does not verify; not counted", s.task_id, peer)
                continue
            stake = chain.stake_of(signer)
            if stake is not None and not stake.eligible:  # the contract would refuse it
                log.info("task %s: %s has no eligible stake; not counted", s.task_id, peer)
                continue
            voters.append((signer, sig))
            shares.append(s.shares.get(peer, 0))
        outvoted = [a for a in map(self._view.eth_address_of, s.outvoted) if a]
        me = self._signer.address.lower()
        if outvoted and all(a.lower() != me for a, _ in voters):
            outvoted = []  # only a voter may claim who was outvoted (the contract's rule)
        c = self._cfg
        reward = c.reward_base + c.reward_per_token * s.tokens + c.reward_per_sample * s.samples
        reward += s.price
        if s.customer:  # the SLA's penalty while it is violated
            rate = await self._slas.in_violation(s.customer, time.time() - self._sla_window_s)
            if rate:
                log.info("task %s: reward cut by %.0f %% (SLA of %s violated)", s.task_id,
                         100 * rate, s.customer)  # fmt: skip
                reward *= 1 - rate
        req = AnchorRequest(
            task_id=s.task_id, result_hash=s.result_hash, model_id=s.model_id,
            decision=DECISION_CODES[s.decision], voters=voters, replicas=s.replicas,
            outvoted=outvoted, deterministic=s.deterministic,
            reward=wei(reward), shares=shares if s.shares and sum(shares) else [],
        )  # fmt: skip
        key = f"anchor:{s.task_id}"
        if req.decision not in (2, 3) or len(voters) * 2 <= s.replicas:
            why = (f"no clear decision ({s.decision})" if req.decision not in (2, 3) else
                   f"{len(voters)} of {s.replicas} replicas signed with an eligible stake; a "
                   "quorum needs more than half")  # fmt: skip
            op_id = await chain.ops.enqueue("anchor", req.payload(), key)
            await chain.ops.update(op_id, status="failed", error=f"not anchored: {why}")
            log.info("task %s not anchored: %s", s.task_id, why)
            return
        await chain.enqueue("anchor", req.payload(), key)
