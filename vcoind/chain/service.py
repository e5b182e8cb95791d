"""The node's chain client: the write queue, stake watching, and cached reads.

Three parts, one per module: ``ChainLink`` (vcoind.chain.link) is the connection, made on
first use, with every web3 call on one worker thread; ``WriteQueue`` (vcoind.chain.queue)
turns every chain write into a SQLite row first and drains them, so an outage delays a
write but loses none; ``ChainService`` here runs the writer, keeps the stakes of the
peers it saw and TaskAnchor's payment parameters fresh, reads requesters' deposits
through a cache, and answers the RPC's reads. Amounts and views are in
vcoind.chain.views, governance actions in vcoind.chain.gov.

What settlement uses: :meth:`ChainService.domain` / :meth:`ChainService.ensure_domain` (the
EIP-712 domain to sign tickets and outcomes under), :meth:`ChainService.deposit_of` (whether
a ticket is covered), and ``enqueue`` with an :class:`AnchorCall` / :class:`ClaimCall` /
:class:`SlashCall` payload.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from web3 import Web3

from vcoind.chain import gov
from vcoind.chain.contracts import E18, ChainError, KeyHolder
from vcoind.chain.link import ChainLink
from vcoind.chain.queue import AnchorCall, ClaimCall, SlashCall, Vote, WriteQueue
from vcoind.chain.typed import Domain
from vcoind.chain.views import (
    GOV_STATES,
    VOTE_SUPPORT,
    DepositInfo,
    PaymentParams,
    StakeInfo,
    anchor_view,
    vcoin,
    wei,
)
from vcoind.config import ChainConfig
from vcoind.metrics import NodeMetrics
from vcoind.store import ChainOp, ChainStore, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

# Imported from here by the node and the RPC; they live in the modules named above.
__all__ = [
    "VOTE_SUPPORT",
    "AnchorCall",
    "ChainService",
    "ClaimCall",
    "DepositInfo",
    "PaymentParams",
    "SlashCall",
    "StakeInfo",
    "Vote",
    "anchor_view",
    "vcoin",
    "wei",
]

T = TypeVar("T")
DEPOSIT_MAX_AGE_S = 10.0
# Addresses whose stake is kept fresh (peers seen; the least recently seen forgotten).
MAX_WATCHED = 4096
PAYMENTS_SHARED = "paid"
PAYMENTS_EMBEDDED = "unpaid (embedded chain: private to this node)"


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
        self.queue = WriteQueue(self.link, self.ops, self._own_op_done)
        self.embedded = self.link.embedded
        self.require_stake = cfg.require_stake == "on" or (
            cfg.require_stake == "auto" and not self.embedded
        )
        self.address = self.link.address
        self._watch_wake = trio.Event()
        self._watch: dict[str, None] = {self.address: None}  # least recently seen first
        self.stakes: dict[str, StakeInfo] = {}
        self.deposits: dict[str, DepositInfo] = {}
        self._deposit_reads: dict[str, trio.Event] = {}
        self.params: PaymentParams | None = None  # TaskAnchor's, refreshed with the stakes

    @property
    def shared(self) -> bool:
        """Whether the chain is shared with other nodes (payments are real), not this node's
        private embedded EVM."""
        return not self.embedded

    def domain(self) -> Domain | None:
        """The EIP-712 domain tickets, awards and outcomes are signed under (network, chain
        id, TaskAnchor); None until the deployment is known (the embedded chain is made on
        first use: :meth:`ensure_domain`)."""
        return self.link.domain()

    async def ensure_domain(self) -> Domain:
        """The domain, connecting first (and making the embedded chain) if need be; raises
        ChainError when the chain cannot be set up."""
        await self.link.ensure_connected()
        d = self.link.domain()
        if d is None:  # ensure_connected sets the deployment
            raise ChainError("chain connected without a deployment")
        return d

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

    def _own_op_done(self, kind: str) -> None:
        if kind in ("deposit", "withdraw_request", "withdraw_deposit"):
            self.deposits.pop(self.address.lower(), None)
        else:
            self._watch_wake.set()

    # --- deposits ------------------------------------------------------------

    async def deposit_of(
        self, address: str, max_age_s: float = DEPOSIT_MAX_AGE_S
    ) -> DepositInfo | None:
        """``address``'s deposit in TaskAnchor: from the cache when read less than
        ``max_age_s`` ago, else read from the chain (concurrent reads of one address share
        one). When the chain cannot be reached: the last value read (None if none was),
        not asked for again for ``max_age_s``. ValueError for a malformed address."""
        a = Web3.to_checksum_address(address)
        k = a.lower()
        while True:
            got = self.deposits.get(k)
            if got is not None and time.time() - got.fetched_at <= max_age_s:
                return got
            reading = self._deposit_reads.get(k)
            if reading is None:
                break
            await reading.wait()
            if k not in self.deposits:  # that read failed
                return None
            max_age_s = float("inf")  # what it read is as fresh as it gets
        self._deposit_reads[k] = done = trio.Event()
        try:
            info = await self.link.call(self._read_deposit, a)
        except Exception as exc:  # down, or the embedded chain could not be made
            self.link.mark(False, f"{type(exc).__name__}: {exc}")
            old = self.deposits.get(k)
            if old is None:
                return None
            # An outage: the last value read stands (tickets are judged on it until the
            # chain is back), and is not asked for again before max_age_s.
            self.deposits[k] = dataclasses.replace(old, fetched_at=time.time())
            return old
        finally:
            del self._deposit_reads[k]
            done.set()
        self.link.mark(True)
        self.deposits[k] = info
        return info

    def _read_deposit(self, address: str) -> DepositInfo:
        assert self.link.contracts is not None
        self.link.check_chain()
        available, pending, release = self.link.contracts.anchor.functions.depositOf(address).call()
        return DepositInfo(int(available), int(pending), int(release), time.time())

    def payment_params(self) -> PaymentParams | None:
        """TaskAnchor's fees, mint share, epoch cap, slash amount and withdrawal delay as
        last read (refreshed every ``chain.stake_refresh_s``); None before the first read."""
        return self.params

    # --- stake ---------------------------------------------------------------

    def watch(self, address: str) -> None:
        """Keep ``address``'s stake fresh (a peer we saw)."""
        if not address:
            return
        fresh = address not in self._watch
        self._watch.pop(address, None)
        self._watch[address] = None
        if fresh:
            self._watch_wake.set()
            while len(self._watch) > MAX_WATCHED:  # fresh identities: forget the stalest
                old = next(a for a in self._watch if a != self.address)
                del self._watch[old]
                self.stakes.pop(old.lower(), None)

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
                self.params = await self.link.call(self._read_params)
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

    def _read_params(self) -> PaymentParams:
        assert self.link.contracts is not None
        self.link.check_chain()
        return read_payment_params(self.link.contracts.anchor)

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
        s, t = c.staking.functions, c.token.functions
        me = self.address
        pending, release = s.pendingOf(me).call()
        mine = self.balance_sync(me)
        self.params = read_payment_params(c.anchor)
        return {
            "block": w3.eth.block_number,
            "balance": mine["balance"],
            "eth_balance": mine["eth_balance"],
            "stake": mine["stake"],
            "pending_unstake": vcoin(pending),
            "unstake_release_time": release,
            "eligible": bool(s.isEligible(me).call()),
            "min_stake": vcoin(s.minStake().call()),
            "deposit": mine["deposit"],
            **self.params.view(),
            "reserve": s.reserve().call(),
            "total_supply": vcoin(t.totalSupply().call()),
            "votes": vcoin(t.getVotes(me).call()),
        }

    def static_info(self) -> dict[str, Any]:
        d = self.link.deployment
        out = {
            "mode": "embedded" if self.embedded else "rpc",
            "rpc": self.cfg.rpc or None,
            "chain_id": d.chain_id if d else None,
            "network": self.network,
            "contracts": dict(d.addresses) if d else {},
            "node_address": self.address,
            "payments": PAYMENTS_SHARED if self.shared else PAYMENTS_EMBEDDED,
            "require_stake": self.require_stake,
            "reachable": self.reachable,
            "last_error": self.last_error,
        }
        if d is not None and d.faucet:
            out["faucet"] = (f"{d.faucet} (the deployer) keeps the admin roles and "
                             "MINTER_ROLE: a devnet, not governed by the Timelock")  # fmt: skip
        return out

    def balance_sync(self, address: str) -> dict[str, Any]:
        c, w3 = self.link.contracts, self.link.w3
        assert c is not None and w3 is not None
        a = Web3.to_checksum_address(address)
        deposit = self._read_deposit(a)
        self.deposits[a.lower()] = deposit
        return {"address": a, "balance": vcoin(c.token.functions.balanceOf(a).call()),
                "stake": vcoin(c.staking.functions.stakeOf(a).call()),
                "deposit": deposit.view(),
                "eth_balance": w3.eth.get_balance(a) / E18}  # fmt: skip

    def current_fees_sync(self) -> dict[str, int]:
        """fee_bps, burn_bps, mint_bps as the chain has them now (for a setFees proposal)."""
        c = self.link.contracts
        assert c is not None
        p = read_payment_params(c.anchor)
        return {"fee_bps": p.fee_bps, "burn_bps": p.burn_bps, "mint_bps": p.mint_bps}

    def rewards_sync(self, address: str, limit: int) -> list[dict[str, Any]]:
        """What TaskAnchor paid ``address`` (its share of each payment plus what was minted
        to it), newest first."""
        c = self.link.contracts
        assert c is not None
        a = Web3.to_checksum_address(address)
        logs = c.anchor.events.Paid().get_logs(
            from_block=self.link.deployment.block if self.link.deployment else 0,
            argument_filters={"worker": a},
        )
        out = [{"task_id": bytes(lg["args"]["taskId"])[16:].hex(),
                "amount": vcoin(lg["args"]["toWorker"] + lg["args"]["minted"]),
                "minted": vcoin(lg["args"]["minted"]),
                "tx_hash": lg["transactionHash"].to_0x_hex(),
                "block": lg["blockNumber"]} for lg in logs]  # fmt: skip
        return sorted(out, key=lambda r: -int(r["block"]))[:limit]

    def events_sync(self, limit: int) -> dict[str, list[dict[str, Any]]]:
        """The chain's recent anchors, payments, slashes and proposals, newest first (from
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
            "rewards": [{"task_id": task(lg), "node": lg["args"]["worker"],
                         "amount": vcoin(lg["args"]["toWorker"] + lg["args"]["minted"]),
                         "gross": vcoin(lg["args"]["gross"]),
                         "burned": vcoin(lg["args"]["burned"]), "fee": vcoin(lg["args"]["fee"]),
                         "minted": vcoin(lg["args"]["minted"]), "block": lg["blockNumber"]}
                        for lg in logs(ev.Paid)],
            "slashes": [{"task_id": task(lg), "node": lg["args"]["node"],
                         "amount": vcoin(lg["args"]["amount"]), "block": lg["blockNumber"]}
                        for lg in logs(ev.Slashed)],
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
        found = gov.find_proposal(
            c, self.link.deployment.block if self.link.deployment else 0, proposal_id
        )
        state = g.state(proposal_id).call()
        actions = ([gov.decode(c, t, d) for t, d in zip(found.targets, found.calldatas,
                                                         strict=True)]
                   if found else [])  # fmt: skip
        return {
            "proposal_id": str(proposal_id),
            "description": found.description if found else None,
            "proposer": found.proposer if found else None,
            "actions": [a for a in actions if a["call"] != "(none)"],  # [] = a text proposal
            "state": GOV_STATES[state],
            "snapshot": snapshot, "deadline": g.proposalDeadline(proposal_id).call(),
            "eta": g.proposalEta(proposal_id).call() or None,  # executable from (queued)
            "votes": {"for": vcoin(for_), "against": vcoin(against), "abstain": vcoin(abstain)},
            "quorum": vcoin(g.quorum(snapshot).call()) if state != 0 else None,
            "has_voted": bool(g.hasVoted(proposal_id, self.address).call()),
        }  # fmt: skip


_PARAM_NAMES = {"slash_amount": "slashAmount", "fee_bps": "feeBps", "burn_bps": "burnBps",
                "mint_bps": "mintBps", "epoch_length": "epochLength",
                "epoch_mint_cap": "epochMintCap", "withdraw_delay": "withdrawDelay"}  # fmt: skip


def read_payment_params(anchor: Any) -> PaymentParams:
    """TaskAnchor's Params: from its ``params()`` view when it has one, else one getter each."""
    fns = {i["name"]: i for i in anchor.abi if i.get("type") == "function"}
    if "params" in fns and not fns["params"]["inputs"]:
        raw = anchor.functions.params().call()
        outputs = fns["params"]["outputs"]
        if len(outputs) == 1 and outputs[0].get("components"):  # one struct
            outputs, raw = outputs[0]["components"], raw
        named = dict(zip([o["name"] for o in outputs], raw, strict=True))
        values = {k: int(named[v]) for k, v in _PARAM_NAMES.items()}
    else:
        values = {k: int(getattr(anchor.functions, v)().call()) for k, v in _PARAM_NAMES.items()}
    return PaymentParams(**values, fetched_at=time.time())
