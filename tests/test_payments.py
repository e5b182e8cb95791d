"""The node's settlement-v2 checks (``vcoind.market.payments``): what a worker refuses
to bid on or to accept, and which bids an origin drops. The chain is a stand-in holding
the deployment's domain and the deposits the real ``ChainService`` caches; signatures,
hashes and recoveries are real (the contract's side is tests/test_contracts.py, the
whole path on anvil tests/test_chain.py)."""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from vcoind.chain.typed import Domain
from vcoind.config import MarketConfig
from vcoind.market.payments import Payments, SignedTicket
from vcoind.signer import Signer

DOMAIN = Domain("testnet", 31337, "0x" + "5f" * 20)
MODEL = "sha256:" + "ab" * 32
PRICE = 10**14  # MarketConfig's default price per token, in wei


@dataclass
class Deposit:
    available: int
    pending: int = 0


@dataclass
class SharedChain:
    deposits: dict[str, Deposit] = field(default_factory=dict)
    shared: bool = True
    reads: list[tuple[str, float]] = field(default_factory=list)
    on_chain: dict[str, Deposit] = field(default_factory=dict)

    def domain(self) -> Domain:
        return DOMAIN

    async def deposit_of(self, address: str, max_age_s: float = 10.0) -> Deposit | None:
        self.reads.append((address.lower(), max_age_s))
        got = self.on_chain.get(address.lower())
        if got is not None:
            self.deposits[address.lower()] = got
        return got


class View:
    def __init__(self, peers: dict[str, str]) -> None:
        self.peer_id = "me"
        self._peers = peers

    def eth_address_of(self, peer: str) -> str | None:
        return self._peers.get(peer)

    def profile_of(self, peer: str) -> Any:
        return None

    def model_id_of(self, model: str) -> str | None:
        return MODEL


def node(chain: SharedChain, peers: dict[str, str]) -> tuple[Payments, Signer]:
    signer = Signer(secrets.token_bytes(32), "testnet")
    return Payments(MarketConfig(), signer, chain, View(peers)), signer  # type: ignore[arg-type]


def test_a_worker_bids_only_on_a_signed_covered_ticket() -> None:
    chain = SharedChain()
    origin, o_signer = node(chain, {})
    worker, _ = node(chain, {"origin": o_signer.address})
    task = secrets.token_hex(16)
    record = origin.payment_record(task, "m", "consensus", 3, True, None, 64)
    assert record["paid"] is True
    st = SignedTicket.from_json(record["ticket"])
    assert st.replicas == 3 and st.max_price == 10 * PRICE and st.max_tokens == 64
    assert "deposit" in (worker.ticket_refusal(st, "origin") or "")  # not read yet
    chain.deposits[o_signer.address.lower()] = Deposit(st.ticket().max_cost() - 1)
    assert "does not cover" in (worker.ticket_refusal(st, "origin") or "")
    chain.deposits[o_signer.address.lower()] = Deposit(st.ticket().max_cost())
    assert worker.ticket_refusal(st, "origin") is None
    # Another origin cannot spend this requester's deposit with a copy of its ticket.
    assert "not the origin" in (worker.ticket_refusal(st, "someone else") or "")
    forged = SignedTicket(**{**st.__dict__, "max_tokens": 4096})
    assert "not signed" in (worker.ticket_refusal(forged, "origin") or "")
    late = origin._signed(DOMAIN, dataclasses.replace(st.ticket(), deadline=int(time.time()) - 1))
    assert "expired" in (worker.ticket_refusal(late, "origin") or "")
    cheap = origin.ticket(task, MODEL, "single", 1, True, PRICE - 1, 64)
    assert "at most" in (worker.ticket_refusal(cheap, "origin") or "")
    assert "no ticket" in (worker.ticket_refusal(None, "origin") or "")


def test_the_origin_drops_unsigned_or_overpriced_bids_and_awards_the_rest() -> None:
    chain = SharedChain()
    worker, w_signer = node(chain, {})
    origin, _ = node(chain, {"w": w_signer.address})
    task = secrets.token_hex(16)
    st = origin.ticket(task, MODEL, "single", 1, True, None, 64)
    assert st is not None
    sig = worker.sign_bid(task)
    assert origin.bid_refusal(st, "w", PRICE, sig) is None
    assert "not signed" in (origin.bid_refusal(st, "w", PRICE + 1, sig) or "")
    assert "above" in (origin.bid_refusal(st, "w", st.max_price + 1, sig) or "")
    assert "no bound address" in (origin.bid_refusal(st, "stranger", PRICE, sig) or "")
    terms = origin.terms(st, "w", PRICE)
    assert terms["ticket"] == st and terms["price_per_token"] == PRICE
    assert worker.award_refusal(st, PRICE, terms["award"]) is None
    assert "asks" in (worker.award_refusal(st, PRICE - 1, terms["award"]) or "")
    assert "not signed" in (worker.award_refusal(st, PRICE + 5, terms["award"]) or "")
    other = origin.terms(st, "w", PRICE)["award"]
    assert other == terms["award"]  # deterministic: the settler signs the same award again


def test_off_a_shared_chain_work_is_unpaid() -> None:
    chain = SharedChain(shared=False)
    pay, _ = node(chain, {})
    record = pay.payment_record(secrets.token_hex(16), "m", "single", 1, True, None, 64)
    assert record == {"paid": False, "reason": "unpaid: the embedded chain is private to this "
                      "node"}  # fmt: skip
    assert pay.ticket_refusal(None, "anyone") is None
    sig, profile = pay.sign_result(secrets.token_hex(16), bytes(32))
    assert len(sig) == 65 and len(profile) == 32  # signed off chain all the same


async def test_prefetch_reads_only_the_origins_own_address() -> None:
    chain = SharedChain()
    origin, o_signer = node(chain, {})
    stranger, _ = node(chain, {})
    worker, _ = node(chain, {"origin": o_signer.address})
    task = secrets.token_hex(16)
    st = origin.ticket(task, MODEL, "single", 1, True, None, 64)
    alien = stranger.ticket(task, MODEL, "single", 1, True, None, 64)
    assert st is not None and alien is not None
    # A ticket that fails the cheap checks costs no chain read.
    await worker.prefetch([alien, None], "origin")
    assert chain.reads == []
    chain.on_chain[o_signer.address.lower()] = Deposit(0)
    await worker.prefetch([st, alien], "origin")
    # Short of the ticket: read once more at once, it may have deposited since.
    assert chain.reads == [(o_signer.address.lower(), 10.0), (o_signer.address.lower(), 1.0)]
    assert "does not cover" in (worker.ticket_refusal(st, "origin") or "")
    chain.on_chain[o_signer.address.lower()] = Deposit(st.ticket().max_cost())
    await worker.prefetch([st], "origin")
    assert worker.ticket_refusal(st, "origin") is None
