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


def tx_ref(receipt: Any) -> dict[str, Any]:
    return {"tx_hash": receipt["transactionHash"].to_0x_hex(),
            "block": int(receipt["blockNumber"])}  # fmt: skip


def anchor_view(op: ChainOp | None) -> dict[str, Any] | None:
    """``vcoin_getTask``'s ``anchor``: queued / anchored / failed, tx hash and block."""
    if op is None:
        return None
    status = {"pending": "queued", "done": "anchored", "failed": "failed"}[op.status]
    if op.status == "pending" and op.raw_tx:
        status = "sent"
    return {
        "status": status, "tx_hash": op.tx_hash, "block": op.block, "attempts": op.attempts,
        "error": op.error, "rewards": [
            {"node": r["node"], "amount": vcoin(int(r["amount"]))}
            for r in op.result.get("rewards", [])],
        "slashed": [{"node": r["node"], "amount": vcoin(int(r["amount"]))}
                    for r in op.result.get("slashed", [])],
    }  # fmt: skip
