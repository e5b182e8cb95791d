"""The node's chain client: the write queue, stake watching, and cached reads.

Three parts, one per module: ``ChainLink`` (vcoind.chain.link) is the connection, made on
first use, with every web3 call on one worker thread; ``WriteQueue`` (vcoind.chain.queue)
turns every chain write into a SQLite row first and drains them, so an outage delays a
write but loses none; ``ChainService`` here runs the writer, keeps the stakes of the
peers it saw fresh, and answers the RPC's reads. Amounts and views are in
vcoind.chain.views.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from web3 import Web3

from vcoind.chain.contracts import E18, ChainError, KeyHolder
from vcoind.chain.link import ChainLink
from vcoind.chain.queue import AnchorRequest, WriteQueue
from vcoind.chain.views import GOV_STATES, VOTE_SUPPORT, StakeInfo, anchor_view, vcoin, wei
from vcoind.config import ChainConfig
from vcoind.metrics import NodeMetrics
from vcoind.store import ChainOp, ChainStore, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

# Imported from here by the node and the RPC; they live in the modules named above.
__all__ = [
    "VOTE_SUPPORT",
    "AnchorRequest",
    "ChainService",
    "StakeInfo",
    "anchor_view",
    "vcoin",
    "wei",
]

T = TypeVar("T")


class ChainService:
    def __init__(
        self,
        cfg: ChainConfig,
        store: Store,
        *,
        network: str,
        key: bytes | KeyHolder,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.network = network
        self.metrics = metrics or NodeMetrics()
        self.link = ChainLink(cfg, network=network, key=key, metrics=self.metrics)
        self.ops = ChainStore(store)
        self.queue = WriteQueue(self.link, self.ops, self._own_stake_changed)
        self.embedded = self.link.embedded
        self.require_stake = cfg.require_stake == "on" or (
            cfg.require_stake == "auto" and not self.embedded
        )
        self.address = self.link.address
        self._watch_wake = trio.Event()
        self._watch: set[str] = {self.address}
        self.stakes: dict[str, StakeInfo] = {}

    @property
    def reachable(self) -> bool | None:
        return self.link.reachable

    @property
    def last_error(self) -> str | None:
        return self.link.last_error

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the write queue and keep stakes fresh. An external chain's deployment file
        is read before ``started`` (a bad one stops the node); the embedded chain is made
        on first use."""
        if self.embedded:
            await self.queue.forget_sent()
        else:
            await self.link.ensure_connected()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.queue.run)
            nursery.start_soon(self._refresher)
            task_status.started()

    # --- the write queue ----------------------------------------------------

    async def enqueue(self, kind: str, payload: dict[str, Any], key: str | None = None) -> int:
        return await self.queue.enqueue(kind, payload, key)

    async def wait(self, op_id: int, timeout: float) -> ChainOp | None:
        """The op once done or failed, or as it stands after ``timeout`` seconds."""
        return await self.queue.wait(op_id, timeout)

    def _own_stake_changed(self) -> None:
        self._watch_wake.set()

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
        await self.link.connected.wait()  # stakes matter once something uses the chain
        while True:
            addrs = sorted(self._watch)
            try:
                fresh = await self.link.call(self._read_stakes, addrs)
                self.stakes.update(fresh)
                self.link.mark(True)
            except Exception as exc:  # down: keep the last known stakes
                self.link.mark(False, f"{type(exc).__name__}: {exc}")
            with trio.move_on_after(self.cfg.stake_refresh_s):
                await self._watch_wake.wait()
            self._watch_wake = trio.Event()

    def _read_stakes(self, addrs: list[str]) -> dict[str, StakeInfo]:
        assert self.link.contracts is not None
        self.link.check_chain()
        s = self.link.contracts.staking.functions
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
            result: T = await self.link.call(self._checked, fn, *args)
        except ChainError:  # RevertError included
            raise
        except Exception as exc:
            self.link.mark(False, f"{type(exc).__name__}: {exc}")
            raise ChainError(f"chain unreachable: {type(exc).__name__}: {exc}") from None
        self.link.mark(True)
        return result

    def _checked(self, fn: Callable[..., T], *args: Any) -> T:
        self.link.check_chain()
        result: T = fn(*args)
        return result

    def info_sync(self) -> dict[str, Any]:
        c, w3 = self.link.contracts, self.link.w3
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
        d = self.link.deployment
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
        c, w3 = self.link.contracts, self.link.w3
        assert c is not None and w3 is not None
        a = Web3.to_checksum_address(address)
        return {"address": a, "balance": vcoin(c.token.functions.balanceOf(a).call()),
                "stake": vcoin(c.staking.functions.stakeOf(a).call()),
                "eth_balance": w3.eth.get_balance(a) / E18}  # fmt: skip

    def rewards_sync(self, address: str, limit: int) -> list[dict[str, Any]]:
        c = self.link.contracts
        assert c is not None
        a = Web3.to_checksum_address(address)
        logs = c.anchor.events.Rewarded().get_logs(
            from_block=self.link.deployment.block if self.link.deployment else 0,
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
        c = self.link.contracts
        assert c is not None
        start = self.link.deployment.block if self.link.deployment else 0

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
        c = self.link.contracts
        assert c is not None
        g = c.governor.functions
        snapshot = g.proposalSnapshot(proposal_id).call()
        if snapshot == 0:
            raise ChainError(f"no proposal {proposal_id}")
        against, for_, abstain = g.proposalVotes(proposal_id).call()
        logs = c.governor.events.ProposalCreated().get_logs(
            from_block=self.link.deployment.block if self.link.deployment else 0
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
