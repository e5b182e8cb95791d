"""The node's chain client: one writer that drains a SQLite queue, plus cached reads.

Every chain write (an anchor, a stake, a governance vote) is first a row in ``chain_ops``.
The writer takes the oldest pending row, signs its transaction with the node's Ethereum
key (nonces counted locally), stores the signed bytes, then broadcasts them and waits for
the receipt. A failure to reach the chain leaves the row pending with a growing delay
(at most ``chain.retry_max_s``); a restart resends the same signed bytes. A transaction
can therefore be delayed by an outage but never lost and never executed twice; the
contract also refuses a second anchor of a task. A revert is final: the op fails with the
custom error decoded to its name (``NotStaked(0x...)``).

web3.py is synchronous: its calls run on a worker thread, one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import trio
from eth_account import Account
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import Wei

from vcoind.chain.contracts import (
    DEVNET_PARAMS,
    E18,
    ChainError,
    Contracts,
    Deployment,
    RevertError,
    Signer,
    deploy,
    events,
)
from vcoind.config import ChainConfig
from vcoind.consensus.outcome import model_id_bytes32, task_id_bytes32
from vcoind.metrics import NodeMetrics
from vcoind.store import ChainOp, ChainStore, RewardRow, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.chain")
T = TypeVar("T")

RECEIPT_TIMEOUT_S = 30.0
MAX_FAILED_ATTEMPTS = 8  # errors that are not an outage (nor a revert) give up after this
GOV_STATES = ("pending", "active", "canceled", "defeated", "succeeded", "queued", "expired",
              "executed")  # fmt: skip
VOTE_SUPPORT = {"against": 0, "for": 1, "abstain": 2}


class _NonceGap(Exception):
    """The stored transaction can no longer be mined (its nonce was used or skipped)."""


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


class ChainService:
    def __init__(
        self,
        cfg: ChainConfig,
        store: Store,
        *,
        network: str,
        eth_key: bytes,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.network = network
        self.metrics = metrics or NodeMetrics()
        self.ops = ChainStore(store)
        self.embedded = not cfg.rpc
        self.require_stake = cfg.require_stake == "on" or (
            cfg.require_stake == "auto" and not self.embedded
        )
        self.address: ChecksumAddress = Account.from_key(eth_key).address
        self._key = eth_key
        self._limiter = trio.CapacityLimiter(1)
        self.connected = trio.Event()
        self._connecting = False
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._watch_wake = trio.Event()
        self._watch: set[str] = {self.address}
        self.stakes: dict[str, StakeInfo] = {}
        self.deployment: Deployment | None = None
        self.contracts: Contracts | None = None
        self.signer: Signer | None = None
        self.w3: Web3 | None = None
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self._chain_checked = False
        self._last_tick = time.monotonic()

    # --- lifecycle ----------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        await self._ensure_connected()
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _ensure_connected(self) -> None:
        """Connect on first use. The embedded chain deploys then (about a second of pure
        Python that would otherwise compete with a starting node's first tasks)."""
        if self.connected.is_set():
            return
        if self._connecting:
            await self.connected.wait()
            return
        self._connecting = True
        t0 = time.monotonic()
        try:
            await trio.to_thread.run_sync(self._connect, limiter=self._limiter)
        finally:
            self._connecting = False
        d = self.deployment
        assert d is not None
        if self.embedded:
            log.info("embedded chain (py-evm, state lives with this process): contracts "
                     "deployed in %.1f s, TaskAnchor %s", time.monotonic() - t0,
                     d.addresses["TaskAnchor"])  # fmt: skip
        else:
            log.info("chain %s (chain id %d), TaskAnchor %s", self.cfg.rpc, d.chain_id,
                     d.addresses["TaskAnchor"])  # fmt: skip
        self.connected.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the write queue and keep stakes fresh. An external chain's deployment file
        is read before ``started`` (a bad one stops the node); the embedded chain is made
        on first use."""
        if self.embedded:
            await self._forget_sent()
        else:
            await self._ensure_connected()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            nursery.start_soon(self._refresher)
            task_status.started()

    def _connect(self) -> None:
        if self.embedded:
            from web3 import EthereumTesterProvider

            w3 = Web3(EthereumTesterProvider())
            faucet = w3.eth.accounts[0]
            w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction(
                {"from": faucet, "to": self.address, "value": Wei(1000 * E18)}))  # fmt: skip
            signer = Signer(w3, self._key)
            d = deploy(w3, signer, self.network, DEVNET_PARAMS)
            c = Contracts.at(w3, d.addresses)
            stake = wei(self.cfg.embedded_stake)
            if stake:  # as much again unstaked: voting power for governance
                signer.send(c.token.functions.mint(self.address, 2 * stake))
                signer.send(c.token.functions.approve(c.staking.address, stake))
                signer.send(c.staking.functions.stake(stake))
                signer.send(c.token.functions.delegate(self.address))
            self._chain_checked = True
        else:
            path = Path(self.cfg.contracts).expanduser()
            d = Deployment.read(path)
            if d.network != self.network:
                raise ChainError(
                    f"{path} was deployed for network {d.network!r}, this node is on "
                    f"{self.network!r}: their signatures would not verify"
                )
            provider = Web3.HTTPProvider(
                self.cfg.rpc, request_kwargs={"timeout": self.cfg.timeout_s},
                exception_retry_configuration=None,
            )  # fmt: skip
            w3 = Web3(provider)
            c = Contracts.at(w3, d.addresses)
            signer = Signer(w3, self._key)
        self.w3, self.signer, self.contracts, self.deployment = w3, signer, c, d

    def _check_chain(self) -> None:
        """On first contact: the RPC serves the chain the deployment file names. The
        embedded chain's clock only moves when it mines (one second or more per block): mine
        an empty block each second, so timed rules (the governor's voting delay and period,
        the unstake delay) pass at least as fast as on a real chain."""
        if self.embedded:
            assert self.w3 is not None
            if time.monotonic() - self._last_tick >= 1:
                cast(Any, self.w3.provider).ethereum_tester.mine_blocks(1)
                self._last_tick = time.monotonic()
        if self._chain_checked:
            return
        assert self.w3 is not None and self.deployment is not None
        got = self.w3.eth.chain_id
        if got != self.deployment.chain_id:
            raise ChainError(f"{self.cfg.rpc} serves chain id {got}, the deployment file says "
                             f"{self.deployment.chain_id}")  # fmt: skip
        anchor = Web3.to_checksum_address(self.deployment.addresses["TaskAnchor"])
        if not self.w3.eth.get_code(anchor):
            raise ChainError(f"no TaskAnchor contract at {self.deployment.addresses['TaskAnchor']}"
                             f" on {self.cfg.rpc} (a fresh chain? deploy again)")  # fmt: skip
        self._chain_checked = True

    async def _forget_sent(self) -> None:
        """A new embedded chain never saw what an earlier run signed: sign it afresh."""
        while True:
            op = await self.ops.next_pending()
            if op is None or op.raw_tx is None:
                return
            await self.ops.update(op.id, raw_tx=None, tx_hash=None)

    def _mark(self, ok: bool, error: str | None = None) -> None:
        self.metrics.chain_reachable.set(int(ok))
        was = self.reachable
        self.reachable = ok
        if not ok:
            self.last_error = error
        if was is not None and was != ok:
            log.warning("chain %s", "reachable again" if ok else f"unreachable: {error}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- the write queue ----------------------------------------------------

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

    async def _writer(self) -> None:
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
                self.metrics.chain_pending.set(counts.get("pending", 0))
                self._notify()

    async def _process(self, op: ChainOp) -> None:
        try:
            raw, tx_hash = (bytes.fromhex(op.raw_tx), op.tx_hash) if op.raw_tx else (None, None)
            if raw is None:
                built = await self._call(self._build, op)
                if isinstance(built, dict):  # nothing to send (e.g. already anchored)
                    await self._finish(op, built)
                    return
                raw, tx_hash = built
                # On disk before it leaves: a retry or a restart resends these same bytes.
                await self.ops.update(op.id, raw_tx=raw.hex(), tx_hash=tx_hash)
            assert tx_hash is not None
            receipt = await self._call(self._broadcast, raw, tx_hash)
            self._mark(True)
            if receipt["status"] != 1:
                # Reverted on chain although the estimate passed (a race): build it again,
                # which reports the revert by name or finds the work already done.
                await self.ops.update(op.id, raw_tx=None, tx_hash=None)
                raise ChainError(f"transaction {tx_hash} reverted on chain (gas used "
                                 f"{receipt['gasUsed']})")  # fmt: skip
            result = await self._call(self._interpret, op, receipt)
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
            self._mark(False, f"{type(exc).__name__}: {exc}")
            await self._retry(op, f"chain unreachable: {type(exc).__name__}: {exc}",
                              outage=True)  # fmt: skip

    def _broadcast(self, raw: bytes, tx_hash: str) -> Any:
        assert self.signer is not None
        self._check_chain()
        try:
            return self.signer.broadcast(raw, tx_hash, RECEIPT_TIMEOUT_S)
        except Exception as exc:
            if "nonce" in str(exc).lower() and self.signer.receipt(tx_hash) is None:
                raise _NonceGap(f"transaction {tx_hash} dropped: {exc}") from None
            raise

    async def _retry(
        self, op: ChainOp, error: str, outage: bool = False, failed: bool = False
    ) -> None:
        delay = min(self.cfg.retry_max_s, 0.5 * 2 ** min(op.attempts, 16))
        level = logging.INFO if outage and op.attempts else logging.WARNING
        log.log(level, "chain %s #%d: %s; retrying in %.1f s", op.kind, op.id, error, delay)
        self.metrics.chain_writes.labels(kind=op.kind, outcome="retry").inc()
        await self.ops.update(op.id, attempts=op.attempts + 1, next_at=time.time() + delay,
                              error=error, failures=op.failures + failed)  # fmt: skip

    async def _fail(self, op: ChainOp, error: str) -> None:
        log.warning("chain %s #%d failed: %s", op.kind, op.id, error)
        self.metrics.chain_writes.labels(kind=op.kind, outcome="failed").inc()
        await self.ops.update(op.id, status="failed", attempts=op.attempts + 1, error=error)

    async def _finish(self, op: ChainOp, result: dict[str, Any]) -> None:
        await self.ops.update(op.id, status="done", attempts=op.attempts + 1, error=None,
                              result=result, tx_hash=result.get("tx_hash", op.tx_hash),
                              block=result.get("block"))  # fmt: skip
        self.metrics.chain_writes.labels(kind=op.kind, outcome="done").inc()
        if op.kind == "anchor":
            self.metrics.anchor_latency.observe(max(0.0, time.time() - op.created_at))
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
            self._watch_wake.set()  # our own stake changed
        else:
            log.info("chain %s #%d done (tx %s)", op.kind, op.id, result.get("tx_hash"))

    # --- building and reading transactions (worker thread) -------------------

    def _fn(self, op: ChainOp) -> Any:
        c, p = self.contracts, op.payload
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
            return c.token.functions.delegate(self.address)
        if op.kind == "propose":
            # A text proposal: one no-op call (0 wei to the timelock), as Governor needs one.
            return c.governor.functions.propose([c.timelock.address], [0], [b""],
                                                p["description"])  # fmt: skip
        if op.kind == "vote":
            return c.governor.functions.castVote(int(p["proposal_id"]), p["support"])
        raise ChainError(f"unknown chain op kind {op.kind!r}")

    def _build(self, op: ChainOp) -> tuple[bytes, str] | dict[str, Any]:
        assert self.signer is not None and self.contracts is not None
        self._check_chain()
        if op.kind == "anchor":
            done = self._existing_anchor(op.payload["task_id"])
            if done is not None:
                return done
        if op.kind == "delegate":
            current = self.contracts.token.functions.delegates(self.address).call()
            if current.lower() == self.address.lower():
                return {"tx_hash": None, "block": None, "note": "already delegated"}
        raw, tx_hash, _ = self.signer.build(self._fn(op))
        return raw, tx_hash

    def _existing_anchor(self, task_id: str) -> dict[str, Any] | None:
        """The anchor of ``task_id`` if the chain has one (ours, sent before a crash, or
        someone else's), with its transaction."""
        c = self.contracts
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
        c = self.contracts
        assert c is not None
        anchored = events(c.anchor, "Anchored", receipt)
        return {
            **_tx_ref(receipt),
            "result_hash": bytes(anchored[0]["resultHash"]).hex() if anchored else None,
            "rewards": [{"node": e["voter"], "amount": str(e["amount"])}
                        for e in events(c.anchor, "Rewarded", receipt)],
            "slashed": [{"node": e["node"], "amount": str(e["amount"])}
                        for e in events(c.anchor, "OutvotedSlashed", receipt)],
        }  # fmt: skip

    def _interpret(self, op: ChainOp, receipt: Any) -> dict[str, Any]:
        if op.kind == "anchor":
            return self._anchor_result(receipt)
        out = _tx_ref(receipt)
        if op.kind == "propose":
            assert self.contracts is not None
            created = events(self.contracts.governor, "ProposalCreated", receipt)
            out["proposal_id"] = str(created[0]["proposalId"]) if created else None
        return out

    # --- stake ---------------------------------------------------------------

    def watch(self, address: str) -> None:
        """Keep ``address``'s stake fresh (a peer we saw)."""
        if address and address not in self._watch:
            self._watch.add(address)
            self._watch_wake.set()

    def stake_of(self, address: str) -> StakeInfo | None:
        return self.stakes.get(address.lower())

    def bid_allowed(self, address: str | None) -> bool:
        """Whether a bid from ``address`` counts: always, unless stake is required; then
        only with a known, eligible stake (unknown = not yet read = not eligible)."""
        if not self.require_stake:
            return True
        info = self.stake_of(address) if address else None
        return info is not None and info.eligible

    async def _refresher(self) -> None:
        await self.connected.wait()  # stakes matter once something uses the chain
        while True:
            addrs = sorted(self._watch)
            try:
                fresh = await self._call(self._read_stakes, addrs)
                self.stakes.update(fresh)
                self._mark(True)
            except Exception as exc:  # down: keep the last known stakes
                self._mark(False, f"{type(exc).__name__}: {exc}")
            with trio.move_on_after(self.cfg.stake_refresh_s):
                await self._watch_wake.wait()
            self._watch_wake = trio.Event()

    def _read_stakes(self, addrs: list[str]) -> dict[str, StakeInfo]:
        assert self.contracts is not None
        self._check_chain()
        s = self.contracts.staking.functions
        out = {}
        for a in addrs:
            a = Web3.to_checksum_address(a)
            out[a.lower()] = StakeInfo(int(s.stakeOf(a).call()), int(s.pendingOf(a).call()[0]),
                                       bool(s.isEligible(a).call()), time.time())  # fmt: skip
        return out

    # --- reads for the RPC ----------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a read on the chain thread; an outage raises ChainError with the reason."""
        try:
            result: T = await self._call(self._checked, fn, *args)
        except ChainError:  # RevertError included
            raise
        except Exception as exc:
            self._mark(False, f"{type(exc).__name__}: {exc}")
            raise ChainError(f"chain unreachable: {type(exc).__name__}: {exc}") from None
        self._mark(True)
        return result

    def _checked(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_chain()
        result: T = fn(*args)
        return result

    def info_sync(self) -> dict[str, Any]:
        c, w3 = self.contracts, self.w3
        assert c is not None and w3 is not None
        s, t, a = c.staking.functions, c.token.functions, c.anchor.functions
        me = self.address
        pending, release = s.pendingOf(me).call()
        mine = self.balance_sync(me)
        return {
            "block": w3.eth.block_number,
            "balance": mine["balance"],
            "eth_balance": mine["eth_balance"],
            "stake": mine["stake"],
            "pending_unstake": vcoin(pending),
            "unstake_release_time": release,
            "eligible": bool(s.isEligible(me).call()),
            "min_stake": vcoin(s.minStake().call()),
            "max_reward": vcoin(a.maxReward().call()),
            "slash_amount": vcoin(a.slashAmount().call()),
            "total_supply": vcoin(t.totalSupply().call()),
            "votes": vcoin(t.getVotes(me).call()),
        }

    def static_info(self) -> dict[str, Any]:
        d = self.deployment
        return {
            "mode": "embedded" if self.embedded else "rpc",
            "rpc": self.cfg.rpc or None,
            "chain_id": d.chain_id if d else None,
            "network": self.network,
            "contracts": dict(d.addresses) if d else {},
            "node_address": self.address,
            "require_stake": self.require_stake,
            "reachable": self.reachable,
            "last_error": self.last_error,
        }

    def balance_sync(self, address: str) -> dict[str, Any]:
        c, w3 = self.contracts, self.w3
        assert c is not None and w3 is not None
        a = Web3.to_checksum_address(address)
        return {"address": a, "balance": vcoin(c.token.functions.balanceOf(a).call()),
                "stake": vcoin(c.staking.functions.stakeOf(a).call()),
                "eth_balance": w3.eth.get_balance(a) / E18}  # fmt: skip

    def rewards_sync(self, address: str, limit: int) -> list[dict[str, Any]]:
        c = self.contracts
        assert c is not None
        a = Web3.to_checksum_address(address)
        logs = c.anchor.events.Rewarded().get_logs(
            from_block=self.deployment.block if self.deployment else 0,
            argument_filters={"voter": a},
        )
        out = [{"task_id": bytes(lg["args"]["taskId"])[16:].hex(),
                "amount": vcoin(lg["args"]["amount"]),
                "tx_hash": lg["transactionHash"].to_0x_hex(),
                "block": lg["blockNumber"]} for lg in logs]  # fmt: skip
        return sorted(out, key=lambda r: -int(r["block"]))[:limit]

    def events_sync(self, limit: int) -> dict[str, list[dict[str, Any]]]:
        """The chain's recent anchors, rewards, slashes and proposals, newest first (from
        the contracts' logs: every node's, not only this one's)."""
        c = self.contracts
        assert c is not None
        start = self.deployment.block if self.deployment else 0

        def logs(event: Any) -> list[Any]:
            got = event().get_logs(from_block=start)
            return sorted(got, key=lambda lg: -int(lg["blockNumber"]))[:limit]

        def task(lg: Any) -> str:
            return bytes(lg["args"]["taskId"])[16:].hex()

        ev = c.anchor.events
        return {
            "anchors": [{"task_id": task(lg), "decision": int(lg["args"]["decision"]),
                         "voters": int(lg["args"]["voterCount"]), "block": lg["blockNumber"],
                         "tx_hash": lg["transactionHash"].to_0x_hex()}
                        for lg in logs(ev.Anchored)],
            "rewards": [{"task_id": task(lg), "node": lg["args"]["voter"],
                         "amount": vcoin(lg["args"]["amount"]), "block": lg["blockNumber"]}
                        for lg in logs(ev.Rewarded)],
            "slashes": [{"task_id": task(lg), "node": lg["args"]["node"],
                         "amount": vcoin(lg["args"]["amount"]), "block": lg["blockNumber"]}
                        for lg in logs(ev.OutvotedSlashed)],
            "proposals": [{"proposal_id": str(lg["args"]["proposalId"]),
                           "description": lg["args"]["description"],
                           "state": GOV_STATES[c.governor.functions.state(
                               lg["args"]["proposalId"]).call()],
                           "block": lg["blockNumber"]}
                          for lg in logs(c.governor.events.ProposalCreated)],
        }  # fmt: skip

    def proposal_sync(self, proposal_id: int) -> dict[str, Any]:
        c = self.contracts
        assert c is not None
        g = c.governor.functions
        snapshot = g.proposalSnapshot(proposal_id).call()
        if snapshot == 0:
            raise ChainError(f"no proposal {proposal_id}")
        against, for_, abstain = g.proposalVotes(proposal_id).call()
        logs = c.governor.events.ProposalCreated().get_logs(
            from_block=self.deployment.block if self.deployment else 0
        )
        desc = next((lg["args"]["description"] for lg in logs
                     if lg["args"]["proposalId"] == proposal_id), None)  # fmt: skip
        state = g.state(proposal_id).call()
        return {
            "proposal_id": str(proposal_id), "description": desc, "state": GOV_STATES[state],
            "snapshot": snapshot, "deadline": g.proposalDeadline(proposal_id).call(),
            "votes": {"for": vcoin(for_), "against": vcoin(against), "abstain": vcoin(abstain)},
            "quorum": vcoin(g.quorum(snapshot).call()) if state != 0 else None,
            "has_voted": bool(g.hasVoted(proposal_id, self.address).call()),
        }  # fmt: skip


def _tx_ref(receipt: Any) -> dict[str, Any]:
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
