"""The market's side of settlement v2: tickets, signed bids, awards, results and outcomes.

A task is *paid* when its origin is on a shared chain (``chain.rpc``): the origin, as the
requester, signs a ``Ticket`` (``vcoind.chain.typed``) when the task is submitted and
announces it with the task; a worker on the same chain bids only on a ticket that is
signed by the origin's bound address, not expired, priced at or above its own price and
covered by the requester's deposit on chain, and signs its price (``Bid``). The origin
drops bids above the ticket's maximum or not signed by the bidder, and hands each
chosen worker an ``Award`` (its price, signed by the requester) with the assignment; the
worker refuses an assignment without a matching award. Each worker signs its own
``Result`` (the only evidence a slash accepts) and, when it agrees, the ``Outcome``.

A task is *unpaid* when the origin has no shared chain: the embedded chain is private to
its node, so nobody else can be paid on it. Such tasks carry no ticket; workers without a
shared chain run them, workers on a shared chain refuse them (they work for pay). The
task record says which (``payment.paid`` and ``payment.reason``).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vcoind.chain.typed import (
    DECISIONS,
    MODES,
    ZERO32,
    Domain,
    Outcome,
    Ticket,
    award_hash,
    bid_hash,
    profile_hash,
    recover,
    result_struct_hash,
    signed_by,
)
from vcoind.chain.views import wei
from vcoind.p2p.codec import lim

if TYPE_CHECKING:
    from vcoind.chain.service import ChainService
    from vcoind.config import MarketConfig
    from vcoind.presence.view import NetworkView
    from vcoind.signer import Signer

log = logging.getLogger("vcoind.payments")

ADDRESS_RE = r"0x[0-9a-fA-F]{40}"
SIG = {"max_len": 65}
UNPAID_EMBEDDED = "unpaid: the embedded chain is private to this node"
UNPAID_NO_CHAIN = "unpaid: this node runs without a chain"
DEPOSIT_MAX_AGE_S = 10.0  # a deposit that covers the ticket is re-read this often
SHORT_DEPOSIT_MAX_AGE_S = 1.0  # one that does not, this often


@dataclass(frozen=True)
class SignedTicket:
    """A ``Ticket`` on the wire, with the requester's signature."""

    task_id: str = field(metadata=lim(pattern=r"[0-9a-f]{32}", max_len=32))
    requester: str = field(metadata=lim(pattern=ADDRESS_RE, max_len=42))
    model_id: str = field(metadata=lim(pattern=r"sha256:[0-9a-f]{64}", max_len=71))
    mode: int = field(metadata=lim(min=0, max=255))
    replicas: int = field(metadata=lim(min=1, max=65535))
    deterministic: bool
    max_price: int = field(metadata=lim(min=0, max=(1 << 63) - 1))  # wei per token
    max_tokens: int = field(metadata=lim(min=0, max=(1 << 32) - 1))
    deadline: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    nonce: int = field(metadata=lim(min=0, max=(1 << 63) - 1))
    signature: bytes = field(metadata=lim(**SIG))
    profile: bytes = field(default=ZERO32, metadata=lim(exact_len=32, max_len=32))

    def ticket(self) -> Ticket:
        return Ticket(self.task_id, self.requester, self.model_id, self.mode, self.replicas,
                      self.deterministic, self.max_price, self.max_tokens, self.deadline,
                      self.nonce, self.profile)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {**self.ticket().to_json(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SignedTicket:
        t = Ticket.from_json(d)
        return cls(t.task_id, t.requester, t.model_id, t.mode, t.replicas, t.deterministic,
                   t.max_price, t.max_tokens, t.deadline, t.nonce,
                   bytes.fromhex(d["signature"]), t.profile)  # fmt: skip


def unpaid_ticket_of(
    requester: str, task_id: str, model_id: str, mode: str, replicas: int,
    deterministic: bool = False, units: int = 0,
) -> Ticket:  # fmt: skip
    """``requester``'s unpaid ticket of a task (``Payments.unpaid_ticket``): what a worker
    recomputes to check the ticket an origin names (training, oracle answers)."""
    return Ticket(task_id, requester, model_id, MODES.get(mode, 0), max(1, replicas),
                  deterministic, 0, units, 0, 0)  # fmt: skip


class Payments:
    """Signs and checks the typed data of settlement v2 for this node, as requester and
    as worker. ``chain`` None: no chain (everything unpaid)."""

    def __init__(
        self, cfg: MarketConfig, signer: Signer, chain: ChainService | None, view: NetworkView
    ) -> None:
        self._cfg = cfg
        self._signer = signer
        self._chain = chain
        self._view = view
        self.address = signer.address
        self.price = wei(cfg.price_per_token)  # our price per token, wei
        self.default_max_price = wei(cfg.max_price_per_token)

    # --- where we stand ------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether this node is on a shared chain (its tasks and its work are paid)."""
        return self._chain is not None and self._chain.shared

    def unpaid_reason(self) -> str:
        return UNPAID_NO_CHAIN if self._chain is None else UNPAID_EMBEDDED

    def domain(self) -> Domain | None:
        """The shared chain's signing domain (None off a shared chain, or before the
        deployment is read)."""
        return self._chain.domain() if self.shared and self._chain is not None else None

    def profile(self) -> bytes:
        """This node's numeric profile hash (what its results are signed with)."""
        return profile_hash(self._view.profile_of(self._view.peer_id))

    # --- the requester ------------------------------------------------------------

    def ticket(
        self, task_id: str, model_id: str, mode: str, replicas: int, deterministic: bool,
        max_price: int | None, max_tokens: int,
    ) -> SignedTicket | None:  # fmt: skip
        """A signed ticket for a task this node submits, or None when it is unpaid."""
        domain = self.domain()
        if domain is None or not model_id.startswith("sha256:"):
            return None
        t = Ticket(task_id, self.address, model_id, MODES[mode], replicas, deterministic,
                   self.default_max_price if max_price is None else max_price, max_tokens,
                   int(time.time() + self._cfg.ticket_ttl_s), secrets.randbits(63))  # fmt: skip
        return self._signed(domain, t)

    def _signed(self, domain: Domain, t: Ticket) -> SignedTicket:
        sig = self._signer.sign_typed(domain, t.hash())
        return SignedTicket(t.task_id, t.requester, t.model_id, t.mode, t.replicas,
                            t.deterministic, t.max_price, t.max_tokens, t.deadline, t.nonce,
                            sig, t.profile)  # fmt: skip

    def unpaid_ticket(
        self, task_id: str, model_id: str, mode: str, replicas: int, deterministic: bool,
        units: int = 0,
    ) -> Ticket:  # fmt: skip
        """The ticket of an unpaid task of ours (price 0, no deadline, nonce 0, up to
        ``units`` tokens): the same for the same task, so workers can sign an outcome under
        it before it is anchored (training, oracle answers; tasks between embedded chains)."""
        return unpaid_ticket_of(self.address, task_id, model_id, mode, replicas,
                                deterministic, units)  # fmt: skip

    def self_ticket(
        self, domain: Domain, task_id: str, model_id: str, mode: str, replicas: int,
        deterministic: bool, units: int = 0,
    ) -> SignedTicket:  # fmt: skip
        """``unpaid_ticket``, signed under ``domain`` (the settler's chain)."""
        t = self.unpaid_ticket(task_id, model_id, mode, replicas, deterministic, units)
        return self._signed(domain, t)

    def sign_on(self, domain: Domain, struct_hash: bytes) -> bytes:
        """Our signature of a struct under ``domain`` (the settler's, on our own chain)."""
        return self._signer.sign_typed(domain, struct_hash)

    def award(
        self, st: SignedTicket, worker: str, price: int, domain: Domain | None = None
    ) -> bytes:
        """The requester's signature that ``worker`` was assigned ``st`` at ``price``."""
        d = domain or self.domain()
        assert d is not None
        return self._signer.sign_typed(d, award_hash(st.ticket().hash(), worker, price))

    def terms(self, st: SignedTicket | None, peer: str, price: int) -> dict[str, Any]:
        """The settlement fields of an assignment of ``st``'s task to ``peer`` at ``price``
        (its signed bid's): the ticket and the award ({} for an unpaid task)."""
        worker = self._view.eth_address_of(peer)
        if st is None or worker is None or self.domain() is None:
            return {}
        return {"ticket": st, "price_per_token": price, "award": self.award(st, worker, price)}

    def payment_record(self, task_id: str, model: str, mode: str, replicas: int,
                       deterministic: bool, max_price: float | None,
                       max_tokens: int) -> dict[str, Any]:  # fmt: skip
        """A new task's ``payment`` record: its signed ticket, or why it is unpaid."""
        if not self.shared:
            return {"paid": False, "reason": self.unpaid_reason()}
        model_id = self._view.model_id_of(model)
        if model_id is None or mode not in ("single", "consensus"):
            return {"paid": False, "reason": "unpaid: only inference tasks of a known model "
                    "are paid"}  # fmt: skip
        st = self.ticket(task_id, model_id, mode, replicas, deterministic,
                         None if max_price is None else wei(max_price), max_tokens)  # fmt: skip
        if st is None:
            return {"paid": False, "reason": "unpaid: the chain's deployment is not read yet"}
        return {"paid": True, "ticket": st.to_json()}

    def bid_refusal(self, st: SignedTicket, peer: str, price: int, sig: bytes) -> str | None:
        """Why a bid on our ticket does not count (None: it does): above the ticket's
        maximum, or not signed by the address the bidder's heartbeats bind."""
        if price > st.max_price:
            return f"price {price} wei/token above the ticket's {st.max_price}"
        domain, bound = self.domain(), self._view.eth_address_of(peer)
        if domain is None or bound is None:
            return "no bound address for the bidder"
        if not signed_by(domain.digest(bid_hash(st.task_id, bound, price)), sig, bound):
            return "bid not signed by the bidder's address"
        return None

    # --- the worker ---------------------------------------------------------------

    def sign_bid(self, task_id: str) -> bytes:
        domain = self.domain()
        if domain is None:
            return b""
        return self._signer.sign_typed(domain, bid_hash(task_id, self.address, self.price))

    def ticket_refusal(self, st: SignedTicket | None, origin: str) -> str | None:
        """Why this node will not work on a task with ticket ``st`` from ``origin`` (None:
        it will). Off a shared chain we work unpaid for anyone; on one we need a ticket
        signed by the origin's bound address, not expired, paying our price, and covered
        by the requester's deposit (as last read from the chain: ``prefetch``)."""
        if not self.shared:
            return None
        why = self._signed_refusal(st, origin)
        if why is not None or st is None:
            return why or "no ticket"
        t = st.ticket()
        if t.requester.lower() == self.address.lower():
            return None  # our own task: we would only pay ourselves
        assert self._chain is not None
        dep = self._chain.deposits.get(t.requester.lower())
        if dep is None:
            return "the requester's deposit is not known yet"
        if dep.available < t.max_cost():
            return (f"the requester's deposit ({dep.available / 1e18:g} VCOIN) does not cover the "
                    f"ticket ({t.max_cost() / 1e18:g} VCOIN)")  # fmt: skip
        return None

    def _signed_refusal(self, st: SignedTicket | None, origin: str) -> str | None:
        """The checks that need no chain read: a well-formed, unexpired ticket signed by
        the origin's bound address on our chain, paying our price."""
        if st is None:
            return "no ticket: this node works for pay on a shared chain (the origin has none)"
        domain = self.domain()
        bound = self._view.eth_address_of(origin)
        if domain is None:
            return "the chain's deployment is not read yet"
        try:
            t = st.ticket()
            t.check()
        except ValueError as exc:
            return f"malformed ticket: {exc}"
        if bound is None or bound.lower() != t.requester.lower():
            return "the ticket's requester is not the origin's address"
        if not signed_by(domain.digest(t.hash()), st.signature, t.requester):
            return "the ticket is not signed by its requester on this chain"
        if t.deadline < time.time():
            return "the ticket has expired"
        if t.max_price < self.price:
            return f"the ticket pays at most {t.max_price} wei/token, this node asks {self.price}"
        return None

    async def prefetch(self, tickets: list[SignedTicket | None], origin: str) -> None:
        """Read (or refresh) the deposit of ``origin``'s requester address for those of
        ``tickets`` that pass every other check (a peer can only make us read the address
        its own heartbeats bind)."""
        if not self.shared or self._chain is None:
            return
        need: dict[str, int] = {}
        for st in tickets:
            if st is not None and self._signed_refusal(st, origin) is None:
                cost = st.ticket().max_cost()
                need[st.requester] = max(need.get(st.requester, 0), cost)
        for a, cost in need.items():
            dep = await self._chain.deposit_of(a, max_age_s=DEPOSIT_MAX_AGE_S)
            if dep is not None and dep.available < cost:  # short: it may have deposited since
                await self._chain.deposit_of(a, max_age_s=SHORT_DEPOSIT_MAX_AGE_S)

    def award_refusal(self, st: SignedTicket | None, price: int, sig: bytes) -> str | None:
        """Why an assignment's award does not do (None: it does, or we work unpaid)."""
        if not self.shared or st is None:
            return None
        domain = self.domain()
        if domain is None:
            return "the chain's deployment is not read yet"
        if price < self.price:
            return f"awarded {price} wei/token, this node asks {self.price}"
        if not signed_by(domain.digest(award_hash(st.ticket().hash(), self.address, price)), sig,
                         st.requester):  # fmt: skip
            return "the award is not signed by the ticket's requester"
        return None

    def signing_domain(self) -> Domain:
        """The shared chain's domain, or the offline one (``Domain.offline``): results and
        outcomes are signed either way, so replicas attest to each other off chain too."""
        return self.domain() or Domain.offline(self._signer.network)

    def sign_result(self, task_id: str, result_hash: bytes) -> tuple[bytes, bytes]:
        """(Result signature, profile) over our own answer."""
        profile = self.profile()
        domain = self.signing_domain()
        sig = self._signer.sign_typed(domain, result_struct_hash(task_id, result_hash, profile))
        return sig, profile

    def sign_outcome(self, task_id: str, st: SignedTicket | None, outcome: Outcome) -> bytes:
        """Our signature of ``outcome`` under ticket ``st`` (None: an unpaid task, signed
        under the offline domain with no ticket)."""
        return self.sign_outcome_for(task_id, ticket_hash(st), outcome)

    def sign_outcome_for(self, task_id: str, ticket_hash: bytes, outcome: Outcome) -> bytes:
        """Our signature of ``outcome`` under the ticket with struct hash ``ticket_hash``
        (an unpaid ticket the requester told us: training and oracle answers)."""
        return self._signer.sign_typed(self.signing_domain(),
                                       outcome.hash_for(task_id, ticket_hash))  # fmt: skip

    def outcome_signer(
        self, task_id: str, st: SignedTicket | None, outcome: Outcome, sig: bytes
    ) -> str | None:
        digest = self.signing_domain().digest(outcome.hash_for(task_id, ticket_hash(st)))
        return recover(digest, sig)


def ticket_hash(st: SignedTicket | None) -> bytes:
    return ZERO32 if st is None else st.ticket().hash()


def outcome_of(result_hash: bytes, decision: str, units: int, profile: bytes,
               deterministic: bool) -> Outcome:  # fmt: skip
    """The outcome every agreeing worker signs: the profile only matters (and only counts
    for slashing) when the task is deterministic."""
    keep = deterministic and len(profile) == 32
    return Outcome(result_hash, DECISIONS.get(decision, 0), units,
                   bytes(profile) if keep else ZERO32)  # fmt: skip


__all__ = ["Payments", "SignedTicket", "outcome_of"]
