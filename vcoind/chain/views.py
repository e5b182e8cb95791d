"""Chain values as the RPC shows them: VCOIN amounts, governance names, anchor and stake
views. Pure: no web3 calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vcoind.chain.contracts import E18
from vcoind.store import ChainOp

GOV_STATES = ("pending", "active", "canceled", "defeated", "succeeded", "queued", "expired",
              "executed")  # fmt: skip
VOTE_SUPPORT = {"against": 0, "for": 1, "abstain": 2}


def wei(vcoin: float) -> int:
    return round(vcoin * 1e6) * (E18 // 10**6)


def vcoin(wei_amount: int) -> float:
    return wei_amount / E18


@dataclass(frozen=True)
class StakeInfo:
    stake: int
    pending: int
    eligible: bool
    fetched_at: float

    def view(self) -> dict[str, Any]:
        return {"stake": vcoin(self.stake), "pending_unstake": vcoin(self.pending),
                "eligible": self.eligible, "checked_at": self.fetched_at}  # fmt: skip


@dataclass(frozen=True)
class DepositInfo:
    """A requester's escrow in TaskAnchor (wei): ``available`` pays tickets; ``pending``
    waits for its withdrawal until ``release_time`` (unix seconds; 0: nothing requested) and
    still pays work accepted before it is withdrawn."""

    available: int
    pending: int
    release_time: int
    fetched_at: float

    def covers(self, amount: int) -> bool:
        """Whether the deposit can pay ``amount`` wei (a ticket's ``max_cost()``)."""
        return self.available + self.pending >= amount

    def view(self) -> dict[str, Any]:
        return {"available": vcoin(self.available), "pending": vcoin(self.pending),
                "release_time": self.release_time, "checked_at": self.fetched_at}  # fmt: skip


@dataclass(frozen=True)
class PaymentParams:
    """TaskAnchor's parameters (amounts in wei, times in seconds, shares in basis points)."""

    slash_amount: int
    fee_bps: int
    burn_bps: int
    mint_bps: int
    epoch_length: int
    epoch_mint_cap: int
    withdraw_delay: int
    fetched_at: float

    def view(self) -> dict[str, Any]:
        return {"fee_bps": self.fee_bps, "burn_bps": self.burn_bps, "mint_bps": self.mint_bps,
                "slash_amount": vcoin(self.slash_amount),
                "epoch_mint_cap": vcoin(self.epoch_mint_cap), "epoch_length": self.epoch_length,
                "withdraw_delay": self.withdraw_delay}  # fmt: skip


def tx_ref(receipt: Any) -> dict[str, Any]:
    return {"tx_hash": receipt["transactionHash"].to_0x_hex(),
            "block": int(receipt["blockNumber"])}  # fmt: skip


def paid_view(p: dict[str, Any]) -> dict[str, Any]:
    """One ``Paid`` of an op's result (amounts as strings of wei) in VCOIN; ``amount`` is what
    the worker got: its share plus what was minted to it."""
    return {
        "node": p["worker"],
        "amount": vcoin(int(p["to_worker"]) + int(p["minted"])),
        **{k: vcoin(int(p[k])) for k in ("gross", "to_worker", "burned", "fee", "minted")},
    }


def anchor_view(op: ChainOp | None) -> dict[str, Any] | None:
    """``vcoin_getTask``'s ``anchor``: queued / anchored / failed, tx hash and block, and
    what each worker was paid (``rewards``: node, amount, and the payment's parts)."""
    if op is None:
        return None
    status = {"pending": "queued", "done": "anchored", "failed": "failed"}[op.status]
    if op.status == "pending" and op.raw_tx:
        status = "sent"
    out: dict[str, Any] = {
        "status": status, "tx_hash": op.tx_hash, "block": op.block, "attempts": op.attempts,
        "error": op.error, "rewards": [paid_view(p) for p in op.result.get("paid", [])],
    }  # fmt: skip
    if int(op.result.get("underfunded") or 0):
        out["underfunded"] = vcoin(int(op.result["underfunded"]))
    return out


def slash_view(op: ChainOp) -> dict[str, Any]:
    """A queued slash of a task's outvoted worker (``slash:<task>:<node>``): its status and,
    once done, the amount taken from the node's stake."""
    status = {"pending": "queued", "done": "slashed", "failed": "failed"}[op.status]
    amount = op.result.get("amount")
    return {"node": op.payload.get("node"), "status": status, "tx_hash": op.tx_hash,
            "block": op.block, "error": op.error,
            "amount": vcoin(int(amount)) if amount is not None else None}  # fmt: skip
