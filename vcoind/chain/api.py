"""JSON-RPC methods of the chain: info, balances, anchors, rewards, stake, deposits,
governance."""

from __future__ import annotations

import re
from typing import Any

import trio
from web3 import Web3

from vcoind.chain import gov
from vcoind.chain.contracts import ChainError
from vcoind.chain.service import VOTE_SUPPORT, ChainService, anchor_view, vcoin, wei
from vcoind.consensus.outcome import TASK_ID_RE
from vcoind.rpc import CHAIN_ERROR, INVALID_PARAMS, NOT_FOUND, MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M
from vcoind.store import ChainOp

OBJ: dict[str, Any] = {"type": "object"}
ADDRESS = {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}
AMOUNT = {"type": "number", "minimum": 0.000001, "maximum": 1e9}
WAIT = Param("wait_s", {"type": "number", "minimum": 0, "maximum": 120}, default=30,
             description="wait this long for the transaction; 0 = return once queued")  # fmt: skip
_PROPOSAL_ID = re.compile(r"[0-9]{1,78}")


def op_view(op: ChainOp | None) -> dict[str, Any]:
    assert op is not None
    return {
        "op_id": op.id, "kind": op.kind, "status": op.status, "tx_hash": op.tx_hash,
        "block": op.block, "attempts": op.attempts, "error": op.error, "result": op.result,
    }  # fmt: skip


def register_chain_api(reg: MethodRegistry, service: ChainService | None) -> None:
    def chain() -> ChainService:
        if service is None:
            raise RPCError(CHAIN_ERROR, "this node runs without a chain (--no-chain)")
        return service

    async def read(fn: Any, *args: Any) -> Any:
        try:
            return await chain().read(fn, *args)
        except ChainError as exc:
            raise RPCError(CHAIN_ERROR, str(exc)) from None

    async def write(kinds: list[tuple[str, dict[str, Any]]], wait_s: float) -> dict[str, Any]:
        """Queue the ops (in order); wait for the last. Queued ops survive outages."""
        c = chain()
        ids = [await c.enqueue(kind, payload) for kind, payload in kinds]
        deadline = trio.current_time() + wait_s  # one wait for all of them, not one each
        ops = [await c.wait(i, max(0.0, deadline - trio.current_time())) for i in ids]
        last = ops[-1]
        assert last is not None
        failed = next((o for o in ops if o is not None and o.status == "failed"), None)
        if failed is not None:
            raise RPCError(CHAIN_ERROR, f"{failed.kind} failed: {failed.error}",
                           op_view(failed))  # fmt: skip
        view = op_view(last)
        if last.status == "pending":
            view["note"] = ("queued: the chain has not confirmed it yet"
                            + (f" ({last.error})" if last.error else ""))  # fmt: skip
        return view

    async def info(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        out = c.static_info()
        out["queue"] = await c.ops.counts()
        try:
            out.update(await c.read(c.info_sync))
        except ChainError as exc:
            out["error"] = str(exc)
        out["reachable"] = c.reachable
        return out

    async def balance(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        out: dict[str, Any] = await read(c.balance_sync, params["address"] or c.address)
        info = c.stake_of(out["address"])
        out["eligible"] = info.eligible if info else None
        return out

    async def get_anchor(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        op = await c.ops.by_key(f"anchor:{params['task_id']}")
        if op is None:
            raise RPCError(NOT_FOUND, f"task_id: no anchor for {params['task_id']!r} on this node")
        out = anchor_view(op)
        assert out is not None
        out["task_id"] = params["task_id"]
        out["payload"] = op.payload
        return out

    async def chain_events(params: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = await read(chain().events_sync, params["limit"])
        return r

    async def rewards(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        address = params["address"] or c.address
        try:
            rows = await c.read(c.rewards_sync, address, params["limit"])
            source = "chain"
        except ChainError as exc:  # down: what this node's own anchors minted
            rows = [
                {
                    "task_id": r.task_id,
                    "amount": vcoin(r.amount),
                    "tx_hash": r.tx_hash,
                    "block": r.block,
                }
                for r in await c.ops.rewards(address, params["limit"])
            ]
            source = f"local (chain unreachable: {exc})"  # fmt: skip
        return {"address": Web3.to_checksum_address(address), "source": source,
                "total": sum(r["amount"] for r in rows), "rewards": rows}  # fmt: skip

    async def stake(params: dict[str, Any]) -> dict[str, Any]:
        amount = str(wei(params["amount"]))
        return await write([("approve", {"amount": amount}), ("stake", {"amount": amount}),
                            ("delegate", {})], params["wait_s"])  # fmt: skip

    async def unstake(params: dict[str, Any]) -> dict[str, Any]:
        return await write([("unstake", {"amount": str(wei(params["amount"]))})],
                           params["wait_s"])  # fmt: skip

    async def withdraw(params: dict[str, Any]) -> dict[str, Any]:
        return await write([("withdraw", {})], params["wait_s"])

    async def deposit(params: dict[str, Any]) -> dict[str, Any]:
        amount = str(wei(params["amount"]))
        return await write([("approve", {"amount": amount, "spender": "TaskAnchor"}),
                            ("deposit", {"amount": amount})], params["wait_s"])  # fmt: skip

    async def withdraw_deposit(params: dict[str, Any]) -> dict[str, Any]:
        if params["amount"] is None:
            return await write([("withdraw_deposit", {})], params["wait_s"])
        return await write([("withdraw_request", {"amount": str(wei(params["amount"]))})],
                           params["wait_s"])  # fmt: skip

    async def propose(params: dict[str, Any]) -> dict[str, Any]:
        settings: dict[str, Any] = params["set"] or {}
        description = params["description"]
        if not settings and not description:
            raise RPCError(INVALID_PARAMS, "give a description (a text proposal) or settings "
                           "to change (set)")  # fmt: skip
        actions: list[dict[str, Any]] = []
        if settings:
            fees: dict[str, int] = {}
            if any(k in gov.FEES for k in settings):
                fees = await read(chain().current_fees_sync)
            try:
                actions = gov.actions_for(settings, fees)
            except ValueError as exc:
                raise RPCError(INVALID_PARAMS, f"set: {exc}") from None
        payload = {"description": description or gov.describe(settings), "actions": actions}
        return await write([("delegate", {}), ("propose", payload)], params["wait_s"])

    def proposal_id(params: dict[str, Any]) -> int:
        if not _PROPOSAL_ID.fullmatch(params["proposal_id"]):
            raise RPCError(INVALID_PARAMS, "proposal_id: must be a decimal number")
        return int(params["proposal_id"])

    async def vote(params: dict[str, Any]) -> dict[str, Any]:
        pid = proposal_id(params)
        return await write([("vote", {"proposal_id": str(pid),
                                      "support": VOTE_SUPPORT[params["support"]]})],
                           params["wait_s"])  # fmt: skip

    async def gov_queue(params: dict[str, Any]) -> dict[str, Any]:
        return await write([("queue", {"proposal_id": str(proposal_id(params))})],
                           params["wait_s"])  # fmt: skip

    async def gov_execute(params: dict[str, Any]) -> dict[str, Any]:
        return await write([("execute", {"proposal_id": str(proposal_id(params))})],
                           params["wait_s"])  # fmt: skip

    async def gov_status(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        out: dict[str, Any] = await read(c.proposal_sync, proposal_id(params))
        return out

    async def ops(params: dict[str, Any]) -> dict[str, Any]:
        c = chain()
        return {"counts": await c.ops.counts(),
                "ops": [op_view(o) for o in await c.ops.recent(params["limit"])]}  # fmt: skip

    address = Param("address", ADDRESS, default=None, description="default: this node's")
    limit = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, default=50)
    pid = Param("proposal_id", {"type": "string", "maxLength": 78}, required=True)
    task_id = Param("task_id", {"type": "string", "pattern": TASK_ID_RE}, required=True)
    amount = Param("amount", AMOUNT, required=True, description="VCOIN")
    settings = ", ".join(f"{k} ({s.contract}, {s.unit})" for k, s in gov.SETTINGS.items())
    for m in (
        M("vcoin_chainInfo", "Chain id, contract addresses, this node's address, stake, "
          "balance, deposit (available, pending, release_time), TaskAnchor's parameters "
          "(fee/burn/mint bps, epoch mint cap and length, slash amount, withdrawal delay), "
          "payments (paid on a shared chain; unpaid on the embedded one, private to this "
          "node), the faucet on a devnet deployment, and the chain write queue.", (), OBJ,
          info),
        M("vcoin_balance", "VCOIN balance, stake, deposit and ether of an address.", (address,),
          OBJ, balance),
        M("vcoin_getAnchor", "The anchor of a task this node was origin of: status (queued, "
          "sent, anchored, failed), tx hash, block, what each worker was paid.", (task_id,),
          OBJ, get_anchor),
        M("vcoin_rewards", "What task settlements paid an address (its share plus what was "
          "minted to it), newest first.", (address, limit), OBJ, rewards),
        M("vcoin_chainEvents", "The chain's recent anchors, payments, slashes and governance "
          "proposals (every node's), newest first.", (limit,), OBJ, chain_events),
        M("vcoin_stake", "Stake VCOIN (approve + stake; also delegates votes to this node).",
          (amount, WAIT), OBJ, stake),
        M("vcoin_unstake", "Request to unstake VCOIN; withdraw after the unstake delay.",
          (amount, WAIT), OBJ, unstake),
        M("vcoin_withdraw", "Withdraw unstaked VCOIN once the unstake delay has passed.",
          (WAIT,), OBJ, withdraw),
        M("vcoin_deposit", "Deposit VCOIN in TaskAnchor (approve + deposit): what this node's "
          "task tickets are paid from.", (amount, WAIT), OBJ, deposit),
        M("vcoin_withdrawDeposit", "Take a deposit back, in two steps: with an amount, "
          "request its withdrawal (it moves to pending; the withdrawal delay starts again for "
          "everything pending, which still pays work accepted before it leaves); without, "
          "withdraw everything pending once the delay has passed.",
          (Param("amount", AMOUNT, default=None,
                 description="VCOIN to request; omit to withdraw what is released"), WAIT),
          OBJ, withdraw_deposit),
        M("vcoin_govPropose", "Create a governance proposal (needs 1000 VCOIN of votes): a "
          "text proposal (description), or parameter changes (set) the Timelock makes once "
          "it passes and is executed. Settings: " + settings + "; fee/burn/mint are set by "
          "one call, the ones not given keep their current value.",
          (Param("description", {"type": "string", "minLength": 1, "maxLength": 4000},
                 default=None, description="default with set: 'set KEY=VALUE, ...'"),
           Param("set", {"type": "object"}, default=None,
                 description="KEY -> value (VCOIN, seconds or basis points)"), WAIT), OBJ,
          propose),
        M("vcoin_govVote", "Vote on a proposal with this node's voting power at its snapshot.",
          (pid, Param("support", {"enum": list(VOTE_SUPPORT)}, required=True), WAIT), OBJ,
          vote),
        M("vcoin_govQueue", "Queue a succeeded proposal in the Timelock (anyone may).",
          (pid, WAIT), OBJ, gov_queue),
        M("vcoin_govExecute", "Execute a queued proposal once the Timelock delay has passed "
          "(anyone may).", (pid, WAIT), OBJ, gov_execute),
        M("vcoin_govStatus", "A proposal's state, actions (decoded), votes, quorum, deadline "
          "and eta.", (pid,), OBJ, gov_status),
        M("vcoin_chainOps", "The chain write queue, newest first.", (limit,), OBJ, ops),
    ):  # fmt: skip
        reg.add(m)
