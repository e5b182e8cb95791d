"""The chain write queue: SQLite rows in ``chain_ops``, one writer that drains them.

Every chain write (an anchor, a stake, a governance vote) is first a row. The writer takes
the oldest pending row, signs its transaction with the node's Ethereum key (nonces counted
locally), stores the signed bytes, then broadcasts them and waits for the receipt, and for
``chain.confirmations`` blocks on top of it: a chain reorganisation that drops it before
then is met by sending the same bytes again (only then is the op done, its rewards
recorded). A
failure to reach the chain leaves the row pending with a growing delay (at most
``chain.retry_max_s``); a restart resends the same signed bytes. A transaction can
therefore be delayed by an outage but never lost and never executed twice; the contract
also refuses a second anchor of a task. A revert is final: the op fails with the custom
error decoded to its name (``NotStaked(0x...)``), as does a payload that cannot be sent
(:class:`BadOp`).

Op kinds and their payloads (docs/settlement-v2.md; amounts are strings of wei):

- ``anchor`` :class:`AnchorCall`, ``claim`` :class:`ClaimCall`, ``slash`` :class:`SlashCall`
  (key them with their ``key()``: one op per task, or per task and worker);
- ``approve`` ``{amount, spender: "Staking" | "TaskAnchor"}``, then ``stake`` ``{amount}``
  or ``deposit`` ``{amount}``; ``unstake`` ``{amount}``, ``withdraw`` ``{}``;
  ``withdraw_request`` ``{amount}``, ``withdraw_deposit`` ``{}``;
- ``delegate`` ``{}``, ``propose`` ``{description, actions}`` (vcoind.chain.gov; no actions:
  a text proposal), ``vote`` ``{proposal_id, support}``, ``queue`` and ``execute``
  ``{proposal_id}`` (the calls are read back from the proposal's ProposalCreated log).

Work the chain already holds (the task anchored by someone else, votes already delegated, a
proposal already queued or executed, a worker already paid or slashed) is reported as done,
with a ``note``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from web3 import Web3

from vcoind.chain import gov
from vcoind.chain.contracts import ChainError, Contracts, RevertError, events, revert_from
from vcoind.chain.link import ChainLink
from vcoind.chain.typed import Outcome, Ticket
from vcoind.chain.views import tx_ref
from vcoind.consensus.outcome import task_id_bytes32
from vcoind.store import ChainOp, ChainStore, RewardRow

log = logging.getLogger("vcoind.chain")

RECEIPT_TIMEOUT_S = 30.0
CONFIRM_POLL_S = 0.5  # how often the chain's head is read while a write waits for depth
MAX_FAILED_ATTEMPTS = 8  # errors that are not an outage (nor a revert) give up after this
GOV_STATE_QUEUED, GOV_STATE_EXECUTED = 5, 7
OWN_CHANGES = ("stake", "unstake", "withdraw", "deposit", "withdraw_request", "withdraw_deposit")


class _NonceGap(Exception):
    """The stored transaction can no longer be mined (its nonce was used or skipped)."""


class BadOp(ChainError):
    """An op that can never be sent (a malformed or outdated payload): it fails at once."""


def _hex(b: bytes) -> str:
    return bytes(b).hex()


def _unhex(s: Any) -> bytes:
    return bytes.fromhex(str(s).removeprefix("0x"))


@dataclass(frozen=True)
class Vote:
    """An agreeing worker's claim to be paid: its awarded price (wei per token), the
    requester's Award signature and the worker's own Outcome signature (TaskAnchor's
    ``Vote`` struct)."""

    worker: str
    price: int
    award_sig: bytes
    outcome_sig: bytes

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "price": str(self.price), "award_sig": _hex(self.award_sig),
                "outcome_sig": _hex(self.outcome_sig)}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vote:
        return cls(Web3.to_checksum_address(d["worker"]), int(d["price"]),
                   _unhex(d["award_sig"]), _unhex(d["outcome_sig"]))  # fmt: skip

    def values(self) -> tuple[Any, ...]:
        return (Web3.to_checksum_address(self.worker), self.price, bytes(self.award_sig),
                bytes(self.outcome_sig))  # fmt: skip


def _outcome_values(o: Outcome) -> tuple[Any, ...]:
    """TaskAnchor's ``Outcome`` struct (taskId and ticketHash come from the ticket)."""
    return (bytes(o.result_hash), o.decision, o.units, bytes(o.profile))


@dataclass(frozen=True)
class AnchorCall:
    """The ``anchor`` op: a signed ticket, the agreed outcome, and the agreeing workers'
    votes (docs/settlement-v2.md). Queue it with ``enqueue("anchor", a.payload(),
    a.key())``."""

    ticket: Ticket
    ticket_sig: bytes
    outcome: Outcome
    votes: Sequence[Vote] = field(default_factory=tuple)

    def key(self) -> str:
        return f"anchor:{self.ticket.task_id}"

    def payload(self) -> dict[str, Any]:
        return {"task_id": self.ticket.task_id, "ticket": self.ticket.to_json(),
                "ticket_sig": _hex(self.ticket_sig), "outcome": self.outcome.to_json(),
                "votes": [v.to_json() for v in self.votes]}  # fmt: skip

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> AnchorCall:
        if "ticket" not in p:
            raise BadOp("a settlement v1 anchor payload (voters and a reward, no ticket): v2 "
                        "pays from the requester's deposit against a signed ticket")  # fmt: skip
        return cls(Ticket.from_json(p["ticket"]), _unhex(p["ticket_sig"]),
                   Outcome.from_json(p["outcome"]),
                   tuple(Vote.from_json(v) for v in p["votes"]))  # fmt: skip

    def args(self) -> tuple[Any, ...]:
        return (self.ticket.values(), bytes(self.ticket_sig), _outcome_values(self.outcome),
                [v.values() for v in self.votes])  # fmt: skip


@dataclass(frozen=True)
class ClaimCall:
    """The ``claim`` op: an agreeing, awarded worker left out of the anchor is paid the same
    way after it (the ticket as anchored, and its vote)."""

    ticket: Ticket
    vote: Vote

    def key(self) -> str:
        return f"claim:{self.ticket.task_id}:{self.vote.worker.lower()}"

    def payload(self) -> dict[str, Any]:
        return {"task_id": self.ticket.task_id, "ticket": self.ticket.to_json(),
                "vote": self.vote.to_json()}  # fmt: skip

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> ClaimCall:
        return cls(Ticket.from_json(p["ticket"]), Vote.from_json(p["vote"]))


@dataclass(frozen=True)
class SlashCall:
    """The ``slash`` op: ``node``'s own Result signature over a result other than the
    anchored one, for a deterministic task anchored by a supermajority."""

    task_id: str
    node: str
    result_hash: bytes
    sig: bytes

    def key(self) -> str:
        return f"slash:{self.task_id}:{self.node.lower()}"

    def payload(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "node": self.node,
                "result_hash": _hex(self.result_hash), "sig": _hex(self.sig)}  # fmt: skip

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> SlashCall:
        return cls(str(p["task_id"]), Web3.to_checksum_address(p["node"]),
                   _unhex(p["result_hash"]), _unhex(p["sig"]))  # fmt: skip


class WriteQueue:
    """``enqueue`` a write, ``wait`` for it; ``run`` is the writer. ``on_own_change`` is
    called with the op's kind when a stake or deposit op of this node's (OWN_CHANGES) is
    done."""

    def __init__(
        self, link: ChainLink, ops: ChainStore, on_own_change: Callable[[str], None]
    ) -> None:
        self.link = link
        self.ops = ops
        self._on_own_change = on_own_change
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
            receipt = await self._confirmed(op, raw, tx_hash, receipt)
            if receipt["status"] != 1:
                # Reverted on chain although the estimate passed (a race): build it again,
                # which reports the revert by name or finds the work already done.
                await self.ops.update(op.id, raw_tx=None, tx_hash=None)
                raise ChainError(f"transaction {tx_hash} reverted on chain (gas used "
                                 f"{receipt['gasUsed']})")  # fmt: skip
            result = await link.call(self._interpret, op, receipt)
            await self._finish(op, result)
        except (RevertError, BadOp) as exc:
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

    async def _confirmed(self, op: ChainOp, raw: bytes, tx_hash: str, receipt: Any) -> Any:
        """The receipt once it is ``chain.confirmations`` blocks deep (1: as mined). A
        reorganisation that drops the transaction meanwhile is met by sending the same
        signed bytes again: its nonce lets it run once at most, wherever it lands."""
        need = self.link.cfg.confirmations
        while need > 1:
            head, now = await self.link.call(self._head_and_receipt, tx_hash)
            if now is None:
                log.warning("chain %s #%d: transaction %s was dropped by a chain reorganisation;"
                            " sending it again", op.kind, op.id, tx_hash)  # fmt: skip
                self.link.metrics.chain_writes.labels(kind=op.kind, outcome="reorged").inc()
                now = await self.link.call(self._broadcast, raw, tx_hash)
            elif now["blockHash"] != receipt["blockHash"]:
                log.info("chain %s #%d: transaction %s moved to block %d by a chain "
                         "reorganisation", op.kind, op.id, tx_hash, now["blockNumber"])  # fmt: skip
            receipt = now
            if head - int(receipt["blockNumber"]) + 1 >= need:
                break
            await trio.sleep(CONFIRM_POLL_S)
        return receipt

    def _head_and_receipt(self, tx_hash: str) -> tuple[int, Any]:
        signer, w3 = self.link.signer, self.link.w3
        assert signer is not None and w3 is not None
        return int(w3.eth.block_number), signer.receipt(tx_hash)

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
        if op.kind in ("anchor", "claim"):
            if op.kind == "anchor":
                metrics.anchor_latency.observe(max(0.0, time.time() - op.created_at))
            task_id = str(op.payload["task_id"])
            rows = [RewardRow(task_id, p["worker"], int(p["to_worker"]) + int(p["minted"]),
                              result["tx_hash"], result["block"], time.time())
                    for p in result.get("paid", []) if result.get("tx_hash")]  # fmt: skip
            await self.ops.add_rewards(rows)
            short = int(result.get("underfunded") or 0)
            log.info("task %s %s in block %s (tx %s), %d worker(s) paid%s%s", task_id,
                     "anchored" if op.kind == "anchor" else "claimed", result.get("block"),
                     result.get("tx_hash"), len(rows),
                     f", requester short by {short} wei" if short else "",
                     f" ({result['note']})" if result.get("note") else "")  # fmt: skip
        else:
            if op.kind in OWN_CHANGES:
                self._on_own_change(op.kind)
            log.info("chain %s #%d done (tx %s)%s", op.kind, op.id, result.get("tx_hash"),
                     f" ({result['note']})" if result.get("note") else "")  # fmt: skip

    # --- building and reading transactions (chain thread) --------------------

    def _fn(self, op: ChainOp) -> Any:
        try:
            return self._call(op)
        except (KeyError, ValueError, TypeError) as exc:
            raise BadOp(f"malformed {op.kind} payload: {type(exc).__name__}: {exc}") from None

    def _call(self, op: ChainOp) -> Any:
        c, p = self.link.contracts, op.payload
        assert c is not None
        a, g = c.anchor.functions, c.governor.functions
        if op.kind == "anchor":
            return a.anchor(*AnchorCall.from_payload(p).args())
        if op.kind == "claim":
            claim = ClaimCall.from_payload(p)
            return a.claim(claim.ticket.values(), claim.vote.values())
        if op.kind == "slash":
            sl = SlashCall.from_payload(p)
            return a.slash(task_id_bytes32(sl.task_id), sl.node, sl.result_hash, sl.sig)
        amount = int(p.get("amount", 0))
        if op.kind == "approve":  # for "stake" (old rows name no spender) or "deposit"
            spender = c.by_name(p.get("spender", "Staking"))
            return c.token.functions.approve(spender.address, amount)
        if op.kind == "stake":
            return c.staking.functions.stake(amount)
        if op.kind == "unstake":
            return c.staking.functions.requestUnstake(amount)
        if op.kind == "withdraw":
            return c.staking.functions.withdraw()
        if op.kind == "deposit":
            return a.deposit(amount)
        if op.kind == "withdraw_request":
            return a.requestWithdrawal(amount)
        if op.kind == "withdraw_deposit":
            return a.withdrawDeposit()
        if op.kind == "delegate":
            return c.token.functions.delegate(self.link.address)
        if op.kind == "propose":
            calls = [gov.encode(c, action) for action in p.get("actions", [])]
            if not calls:  # a text proposal: one no-op call (0 wei to the timelock)
                calls = [(c.timelock.address, b"")]
            return g.propose([t for t, _ in calls], [0] * len(calls), [d for _, d in calls],
                             p["description"])  # fmt: skip
        if op.kind == "vote":
            return g.castVote(int(p["proposal_id"]), p["support"])
        if op.kind in ("queue", "execute"):
            found = self._proposal(int(p["proposal_id"]))
            fn = g.queue if op.kind == "queue" else g.execute
            return fn(*found.call_args())
        raise BadOp(f"unknown chain op kind {op.kind!r}")

    def _proposal(self, proposal_id: int) -> gov.Proposal:
        c, d = self.link.contracts, self.link.deployment
        assert c is not None and d is not None
        found = gov.find_proposal(c, d.block, proposal_id)
        if found is None:
            raise BadOp(f"no proposal {proposal_id} on this chain")
        return found

    def _build(self, op: ChainOp) -> tuple[bytes, str] | dict[str, Any]:
        link = self.link
        assert link.signer is not None and link.contracts is not None
        link.check_chain()
        done = self._already_done(op)
        if done is not None:
            return done
        try:
            raw, tx_hash, _ = link.signer.build(self._fn(op))
        except RevertError as exc:
            # Someone else did it first (a claim or a slash): done, not failed.
            if (op.kind, exc.name) == ("claim", "AlreadyPaid"):
                return {"tx_hash": None, "block": None, "note": str(exc), "paid": [],
                        "underfunded": "0"}  # fmt: skip
            if (op.kind, exc.name) == ("slash", "AlreadySlashed"):
                return {"tx_hash": None, "block": None, "note": str(exc), "amount": "0"}
            raise
        return raw, tx_hash

    def _already_done(self, op: ChainOp) -> dict[str, Any] | None:
        """The result of an op whose work the chain already holds (an anchor someone made,
        our own votes delegated, a proposal queued or executed), else None."""
        c = self.link.contracts
        assert c is not None
        if op.kind == "anchor":
            return self._existing_anchor(str(op.payload["task_id"]))
        if op.kind == "delegate":
            current = c.token.functions.delegates(self.link.address).call()
            if current.lower() == self.link.address.lower():
                return {"tx_hash": None, "block": None, "note": "already delegated"}
        if op.kind in ("queue", "execute"):
            pid = int(op.payload["proposal_id"])
            try:
                state = c.governor.functions.state(pid).call()
            except Exception as exc:  # GovernorNonexistentProposal, by name
                revert = revert_from(exc)
                if revert is None:
                    raise
                raise revert from None
            if state == GOV_STATE_EXECUTED or (op.kind == "queue" and state == GOV_STATE_QUEUED):
                what = "executed" if state == GOV_STATE_EXECUTED else "queued"
                return {"tx_hash": None, "block": None, "proposal_id": str(pid),
                        "note": f"already {what}"}  # fmt: skip
        return None

    def _existing_anchor(self, task_id: str) -> dict[str, Any] | None:
        """The anchor of ``task_id`` if the chain has one (ours, sent before a crash, or
        someone else's), with its transaction's payments."""
        c = self.link.contracts
        assert c is not None
        tid = task_id_bytes32(task_id)
        rec = anchor_record(c, tid)
        block = int(rec.get("blockNumber", 0))
        if not block:
            return None
        logs = c.anchor.events.Anchored().get_logs(
            from_block=block, to_block=block, argument_filters={"taskId": tid}
        )
        receipt = c.w3.eth.get_transaction_receipt(logs[0]["transactionHash"]) if logs else None
        if receipt is None:
            return {"tx_hash": None, "block": block, "gas_used": None,
                    "result_hash": bytes(rec["resultHash"]).hex(), "paid": [],
                    "underfunded": "0"}  # fmt: skip
        return {**self._paid_result(receipt), "note": "anchored already"}

    def _paid_result(self, receipt: Any) -> dict[str, Any]:
        """An anchor's or a claim's receipt: what each worker was paid, what the requester
        could not pay."""
        c = self.link.contracts
        assert c is not None
        anchored = events(c.anchor, "Anchored", receipt)
        short = sum(int(e["short"]) for e in events(c.anchor, "Underfunded", receipt))
        return {
            **tx_ref(receipt), "gas_used": int(receipt["gasUsed"]),
            "result_hash": bytes(anchored[0]["resultHash"]).hex() if anchored else None,
            "paid": [{"worker": e["worker"], "gross": str(e["gross"]),
                      "to_worker": str(e["toWorker"]), "burned": str(e["burned"]),
                      "fee": str(e["fee"]), "minted": str(e["minted"])}
                     for e in events(c.anchor, "Paid", receipt)],
            "underfunded": str(short),
        }  # fmt: skip

    def _interpret(self, op: ChainOp, receipt: Any) -> dict[str, Any]:
        c = self.link.contracts
        assert c is not None
        if op.kind in ("anchor", "claim"):
            return self._paid_result(receipt)
        out = {**tx_ref(receipt), "gas_used": int(receipt["gasUsed"])}
        if op.kind == "slash":
            out["amount"] = str(sum(int(e["amount"]) for e in events(c.anchor, "Slashed",
                                                                      receipt)))  # fmt: skip
        if op.kind == "propose":
            created = events(c.governor, "ProposalCreated", receipt)
            out["proposal_id"] = str(created[0]["proposalId"]) if created else None
        if op.kind in ("queue", "execute"):
            out["proposal_id"] = str(op.payload["proposal_id"])
        return out


def anchor_record(c: Contracts, task_id: bytes) -> dict[str, Any]:
    """TaskAnchor's ``anchors(taskId)`` by field name (``blockNumber`` 0: none)."""
    fn = c.anchor.functions.anchors(task_id)
    names = [o["name"] for o in fn.abi["outputs"]]
    return dict(zip(names, fn.call(), strict=True))
