"""The chain write queue: SQLite rows in ``chain_ops``, one writer that drains them.

Every chain write (an anchor, a stake, a governance vote) is first a row. The writer takes
the oldest pending row, signs its transaction with the node's Ethereum key (nonces counted
locally), stores the signed bytes, then broadcasts them and waits for the receipt. A
failure to reach the chain leaves the row pending with a growing delay (at most
``chain.retry_max_s``); a restart resends the same signed bytes. A transaction can
therefore be delayed by an outage but never lost and never executed twice; the contract
also refuses a second anchor of a task. A revert is final: the op fails with the custom
error decoded to its name (``NotStaked(0x...)``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from web3 import Web3

from vcoind.chain.contracts import ChainError, RevertError, events
from vcoind.chain.link import ChainLink
from vcoind.chain.views import tx_ref
from vcoind.consensus.outcome import model_id_bytes32, task_id_bytes32
from vcoind.store import ChainOp, ChainStore, RewardRow

log = logging.getLogger("vcoind.chain")

RECEIPT_TIMEOUT_S = 30.0
MAX_FAILED_ATTEMPTS = 8  # errors that are not an outage (nor a revert) give up after this


class _NonceGap(Exception):
    """The stored transaction can no longer be mined (its nonce was used or skipped)."""


@dataclass(frozen=True)
class AnchorRequest:
    """What the origin knows when a task's outcome is settled; see contracts/README.md."""

    task_id: str
    result_hash: bytes
    model_id: str
    decision: int  # 2 majority, 3 supermajority
    voters: list[tuple[str, bytes]]  # (eth address, signature)
    replicas: int
    outvoted: list[str]
    deterministic: bool
    reward: int  # wei
    shares: list[int] = field(default_factory=list)  # per voter (same order); [] = equal split

    def payload(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "result_hash": self.result_hash.hex(),
            "model_id": self.model_id, "decision": self.decision,
            "voters": [a for a, _ in self.voters],
            "signatures": [s.hex() for _, s in self.voters], "replicas": self.replicas,
            "outvoted": self.outvoted, "deterministic": self.deterministic,
            "reward": str(self.reward), "shares": [str(x) for x in self.shares],
        }  # fmt: skip


class WriteQueue:
    """``enqueue`` a write, ``wait`` for it; ``run`` is the writer. ``on_own_stake_change``
    is called when a stake, unstake or withdraw of this node's is done."""

    def __init__(
        self, link: ChainLink, ops: ChainStore, on_own_stake_change: Callable[[], None]
    ) -> None:
        self.link = link
        self.ops = ops
        self._on_own_stake_change = on_own_stake_change
        self._wake = trio.Event()
        self._changed = trio.Event()

    async def enqueue(self, kind: str, payload: dict[str, Any], key: str | None = None) -> int:
        op_id = await self.ops.enqueue(kind, payload, key)
        self._wake.set()
        return op_id

    async def wait(self, op_id: int, timeout: float) -> ChainOp | None:
        """The op once done or failed, or as it stands after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while True:
                changed = self._changed
                op = await self.ops.get(op_id)
                if op is None or op.status != "pending":
                    return op
                await changed.wait()
        return await self.ops.get(op_id)

    async def forget_sent(self) -> None:
        """A new embedded chain never saw what an earlier run signed: sign it afresh."""
        while True:
            op = await self.ops.next_pending()
            if op is None or op.raw_tx is None:
                return
            await self.ops.update(op.id, raw_tx=None, tx_hash=None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self) -> None:
        """The writer: the oldest due op, one at a time, forever."""
        while True:
            op = await self.ops.next_pending()
            if op is None:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            delay = op.next_at - time.time()
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
                    self._wake = trio.Event()
                continue
            try:
                await self._process(op)
            except Exception:  # a bug here must not take the node down: park the op
                log.exception("chain %s #%d: unexpected error", op.kind, op.id)
                await self._retry(op, "internal error (see the log)", failed=True)
            finally:
                counts = await self.ops.counts()
                self.link.metrics.chain_pending.set(counts.get("pending", 0))
                self._notify()

    async def _process(self, op: ChainOp) -> None:
        link = self.link
        try:
            raw, tx_hash = (bytes.fromhex(op.raw_tx), op.tx_hash) if op.raw_tx else (None, None)
            if raw is None:
                built = await link.call(self._build, op)
                if isinstance(built, dict):  # nothing to send (e.g. already anchored)
                    await self._finish(op, built)
                    return
                raw, tx_hash = built
                # On disk before it leaves: a retry or a restart resends these same bytes.
                await self.ops.update(op.id, raw_tx=raw.hex(), tx_hash=tx_hash)
            assert tx_hash is not None
            receipt = await link.call(self._broadcast, raw, tx_hash)
            link.mark(True)
            if receipt["status"] != 1:
                # Reverted on chain although the estimate passed (a race): build it again,
                # which reports the revert by name or finds the work already done.
                await self.ops.update(op.id, raw_tx=None, tx_hash=None)
                raise ChainError(f"transaction {tx_hash} reverted on chain (gas used "
                                 f"{receipt['gasUsed']})")  # fmt: skip
            result = await link.call(self._interpret, op, receipt)
            await self._finish(op, result)
        except RevertError as exc:
            await self._fail(op, str(exc))
        except ChainError as exc:
            if op.failures + 1 >= MAX_FAILED_ATTEMPTS:
                await self._fail(op, str(exc))
            else:
                await self._retry(op, str(exc), failed=True)
        except _NonceGap as exc:
            await self.ops.update(op.id, raw_tx=None, tx_hash=None)
            await self._retry(op, str(exc), failed=True)
        except Exception as exc:  # an outage (connection refused, timeout): keep it, retry
            link.mark(False, f"{type(exc).__name__}: {exc}")
            await self._retry(op, f"chain unreachable: {type(exc).__name__}: {exc}",
                              outage=True)  # fmt: skip

    def _broadcast(self, raw: bytes, tx_hash: str) -> Any:
        signer = self.link.signer
        assert signer is not None
        self.link.check_chain()
        try:
            return signer.broadcast(raw, tx_hash, RECEIPT_TIMEOUT_S)
        except Exception as exc:
            if "nonce" in str(exc).lower() and signer.receipt(tx_hash) is None:
                raise _NonceGap(f"transaction {tx_hash} dropped: {exc}") from None
            raise

    async def _retry(
        self, op: ChainOp, error: str, outage: bool = False, failed: bool = False
    ) -> None:
        delay = min(self.link.cfg.retry_max_s, 0.5 * 2 ** min(op.attempts, 16))
        level = logging.INFO if outage and op.attempts else logging.WARNING
        log.log(level, "chain %s #%d: %s; retrying in %.1f s", op.kind, op.id, error, delay)
        self.link.metrics.chain_writes.labels(kind=op.kind, outcome="retry").inc()
        await self.ops.update(op.id, attempts=op.attempts + 1, next_at=time.time() + delay,
                              error=error, failures=op.failures + failed)  # fmt: skip

    async def _fail(self, op: ChainOp, error: str) -> None:
        log.warning("chain %s #%d failed: %s", op.kind, op.id, error)
        self.link.metrics.chain_writes.labels(kind=op.kind, outcome="failed").inc()
        await self.ops.update(op.id, status="failed", attempts=op.attempts + 1, error=error)

    async def _finish(self, op: ChainOp, result: dict[str, Any]) -> None:
        metrics = self.link.metrics
        await self.ops.update(op.id, status="done", attempts=op.attempts + 1, error=None,
                              result=result, tx_hash=result.get("tx_hash", op.tx_hash),
                              block=result.get("block"))  # fmt: skip
        metrics.chain_writes.labels(kind=op.kind, outcome="done").inc()
        if op.kind == "anchor":
            metrics.anchor_latency.observe(max(0.0, time.time() - op.created_at))
            task_id = op.payload["task_id"]
            rows = [RewardRow(task_id, r["node"], int(r["amount"]), result["tx_hash"],
                              result["block"], time.time())
                    for r in result.get("rewards", [])]  # fmt: skip
            await self.ops.add_rewards(rows)
            slashed = result.get("slashed") or []
            log.info("task %s anchored in block %s (tx %s), %d reward(s)%s", task_id,
                     result.get("block"), result.get("tx_hash"), len(rows),
                     f", {len(slashed)} slashed" if slashed else "")  # fmt: skip
        elif op.kind in ("stake", "unstake", "withdraw"):
            self._on_own_stake_change()
        else:
            log.info("chain %s #%d done (tx %s)", op.kind, op.id, result.get("tx_hash"))

    # --- building and reading transactions (chain thread) --------------------

    def _fn(self, op: ChainOp) -> Any:
        c, p = self.link.contracts, op.payload
        assert c is not None
        if op.kind == "anchor":
            return c.anchor.functions.anchor(
                task_id_bytes32(p["task_id"]), bytes.fromhex(p["result_hash"]),
                model_id_bytes32(p["model_id"]), p["decision"],
                [Web3.to_checksum_address(v) for v in p["voters"]],
                [bytes.fromhex(s) for s in p["signatures"]],
                (p["replicas"], p["deterministic"], int(p["reward"]),
                 [Web3.to_checksum_address(v) for v in p["outvoted"]],
                 [int(x) for x in p.get("shares", [])]),
            )  # fmt: skip
        amount = int(p.get("amount", 0))
        if op.kind == "approve":
            return c.token.functions.approve(c.staking.address, amount)
        if op.kind == "stake":
            return c.staking.functions.stake(amount)
        if op.kind == "unstake":
            return c.staking.functions.requestUnstake(amount)
        if op.kind == "withdraw":
            return c.staking.functions.withdraw()
        if op.kind == "delegate":
            return c.token.functions.delegate(self.link.address)
        if op.kind == "propose":
            # A text proposal: one no-op call (0 wei to the timelock), as Governor needs one.
            return c.governor.functions.propose([c.timelock.address], [0], [b""],
                                                p["description"])  # fmt: skip
        if op.kind == "vote":
            return c.governor.functions.castVote(int(p["proposal_id"]), p["support"])
        raise ChainError(f"unknown chain op kind {op.kind!r}")

    def _build(self, op: ChainOp) -> tuple[bytes, str] | dict[str, Any]:
        link = self.link
        assert link.signer is not None and link.contracts is not None
        link.check_chain()
        if op.kind == "anchor":
            done = self._existing_anchor(op.payload["task_id"])
            if done is not None:
                return done
        if op.kind == "delegate":
            current = link.contracts.token.functions.delegates(link.address).call()
            if current.lower() == link.address.lower():
                return {"tx_hash": None, "block": None, "note": "already delegated"}
        raw, tx_hash, _ = link.signer.build(self._fn(op))
        return raw, tx_hash

    def _existing_anchor(self, task_id: str) -> dict[str, Any] | None:
        """The anchor of ``task_id`` if the chain has one (ours, sent before a crash, or
        someone else's), with its transaction."""
        c = self.link.contracts
        assert c is not None
        tid = task_id_bytes32(task_id)
        rec = c.anchor.functions.anchors(tid).call()
        if rec[3] == 0:
            return None
        logs = c.anchor.events.Anchored().get_logs(
            from_block=rec[3], to_block=rec[3], argument_filters={"taskId": tid}
        )
        receipt = c.w3.eth.get_transaction_receipt(logs[0]["transactionHash"]) if logs else None
        if receipt is None:
            return {"tx_hash": None, "block": rec[3], "result_hash": bytes(rec[0]).hex(),
                    "rewards": [], "slashed": []}  # fmt: skip
        return self._anchor_result(receipt)

    def _anchor_result(self, receipt: Any) -> dict[str, Any]:
        c = self.link.contracts
        assert c is not None
        anchored = events(c.anchor, "Anchored", receipt)
        return {
            **tx_ref(receipt),
            "result_hash": bytes(anchored[0]["resultHash"]).hex() if anchored else None,
            "rewards": [{"node": e["voter"], "amount": str(e["amount"])}
                        for e in events(c.anchor, "Rewarded", receipt)],
            "slashed": [{"node": e["node"], "amount": str(e["amount"])}
                        for e in events(c.anchor, "OutvotedSlashed", receipt)],
        }  # fmt: skip

    def _interpret(self, op: ChainOp, receipt: Any) -> dict[str, Any]:
        if op.kind == "anchor":
            return self._anchor_result(receipt)
        out = tx_ref(receipt)
        if op.kind == "propose":
            assert self.link.contracts is not None
            created = events(self.link.contracts.governor, "ProposalCreated", receipt)
            out["proposal_id"] = str(created[0]["proposalId"]) if created else None
        return out
