"""Settlement v2 from the node's side, on the in-process EVM (py-evm through eth-tester).

Deployment (production hands every role to governance, a devnet keeps a faucet), the write
queue's v2 ops (anchor paid from the requester's deposit, claim, slash, deposits and their
withdrawal delay), governance parameter changes end to end, and the chain RPC methods,
called through their registry as the node's RPC server would.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from vcoind.chain import gov
from vcoind.chain.api import register_chain_api
from vcoind.chain.cli import run_client_command
from vcoind.chain.contracts import (
    DEVNET_PARAMS,
    E18,
    ChainError,
    Contracts,
    Deployer,
    Deployment,
    DeployParams,
    RevertError,
    Signer,
    check_handover,
    deploy,
)
from vcoind.chain.service import AnchorCall, ChainService, ClaimCall, SlashCall, Vote
from vcoind.chain.typed import Domain, Outcome, Ticket, award_hash, result_struct_hash, sign
from vcoind.cli.client import client_parser
from vcoind.config import ChainConfig
from vcoind.rpc import MethodRegistry, RPCError
from vcoind.rpc.methods import bind_params
from vcoind.store import Store

T = TypeVar("T")
MODEL = "sha256:" + hashlib.sha256(b"test model weights").hexdigest()
PROFILE = hashlib.sha256(b"cuda fp16 torch 2.5").digest()


# --- deployment on eth-tester directly -------------------------------------------------


def new_chain() -> tuple[Web3, Any, list[bytes]]:
    w3 = Web3(EthereumTesterProvider())
    tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
    return w3, tester, [k.to_bytes() for k in tester.backend.account_keys]


def travel(tester: Any, w3: Web3, seconds: int) -> None:
    tester.time_travel(int(w3.eth.get_block("latest")["timestamp"]) + seconds + 1)


def test_production_deploy_leaves_the_deployer_no_role_and_governance_sets_fees() -> None:
    w3, tester, keys = new_chain()
    deployer, voter = Signer(w3, keys[0]), Signer(w3, keys[1])
    d = deploy(w3, deployer, "testnet", DeployParams(), {voter.address: 5000 * E18})
    c = Contracts.at(w3, d.addresses)
    admin = bytes(32)
    assert d.faucet is None and d.params["genesis"] == {voter.address: str(5000 * E18)}
    assert c.staking.functions.reserve().call() == c.timelock.address  # fees: the treasury
    for contract in (c.token, c.staking, c.anchor, c.timelock):
        assert not contract.functions.hasRole(admin, deployer.address).call()
        assert contract.functions.hasRole(admin, c.timelock.address).call()
    t = c.token.functions
    assert not t.hasRole(t.MINTER_ROLE().call(), deployer.address).call()
    assert t.hasRole(t.MINTER_ROLE().call(), c.anchor.address).call()
    assert t.hasRole(t.BURNER_ROLE().call(), c.anchor.address).call()
    check_handover(c, deployer.address)  # what deploy() verified
    with pytest.raises(ChainError, match="deployer still holds DEFAULT_ADMIN_ROLE on VCoin"):
        check_handover(c, c.timelock.address)  # the check names what it finds
    # Nobody but the Timelock changes a parameter or mints.
    for fn in (c.anchor.functions.setFees(300, 1000, 500), c.staking.functions.setMinStake(1),
               t.mint(deployer.address, 1), c.anchor.functions.setWithdrawDelay(1)):  # fmt: skip
        for who in (deployer, voter):
            with pytest.raises(RevertError, match="AccessControlUnauthorizedAccount"):
                who.build(fn)

    # The governance path: propose (--set), vote, queue, execute; the parameters change.
    voter.send(t.delegate(voter.address))
    travel(tester, w3, 1)
    actions = gov.actions_for({"fee_bps": 300, "withdraw_delay": 3600, "min_stake": 50},
                              {"fee_bps": 200, "burn_bps": 1000, "mint_bps": 500})  # fmt: skip
    calls = [gov.encode(c, a) for a in actions]
    g = c.governor.functions
    voter.send(g.propose([x for x, _ in calls], [0] * len(calls), [y for _, y in calls], "fees"))
    (p,) = gov.proposals(c, d.block)
    assert p.proposer == voter.address and p.description == "fees"
    decoded = [gov.decode(c, target, data) for target, data in zip(p.targets, p.calldatas,
                                                                    strict=True)]  # fmt: skip
    wd, ms = {"withdraw_delay": "3600 s"}, {"min_stake": "50 VCOIN"}
    fees = {"fee_bps": "300 bps", "burn_bps": "1000 bps", "mint_bps": "500 bps"}
    assert decoded == [
        {"target": "TaskAnchor", "call": "setWithdrawDelay(3600)", "sets": wd},
        {"target": "Staking", "call": f"setMinStake({50 * E18})", "sets": ms},
        {"target": "TaskAnchor", "call": "setFees(300, 1000, 500)", "sets": fees},
    ]
    travel(tester, w3, 86400)  # the production voting delay
    voter.send(g.castVote(p.proposal_id, 1))
    travel(tester, w3, 7 * 86400)
    voter.send(g.queue(*p.call_args()))
    with pytest.raises(RevertError, match="TimelockUnexpectedOperationState"):
        voter.build(g.execute(*p.call_args()))
    travel(tester, w3, 2 * 86400)
    voter.send(g.execute(*p.call_args()))
    a = c.anchor.functions
    assert (a.feeBps().call(), a.burnBps().call(), a.mintBps().call()) == (300, 1000, 500)
    assert a.withdrawDelay().call() == 3600
    assert c.staking.functions.minStake().call() == 50 * E18


def test_devnet_deploy_keeps_a_faucet_and_old_files_are_refused(tmp_path: Path) -> None:
    w3, _, keys = new_chain()
    signer = Signer(w3, keys[0])
    d = deploy(w3, signer, "devnet", DEVNET_PARAMS)
    c = Contracts.at(w3, d.addresses)
    t = c.token.functions
    assert d.faucet == signer.address and d.version == 2
    assert t.hasRole(t.MINTER_ROLE().call(), signer.address).call()
    assert c.anchor.functions.hasRole(bytes(32), signer.address).call()
    assert c.anchor.functions.withdrawDelay().call() == 60
    assert c.anchor.functions.epochLength().call() == 3600
    path = tmp_path / "d.json"
    d.write(path)
    assert Deployment.read(path) == d
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 1}))
    with pytest.raises(ChainError, match=r"version 1 .*redeploy with `vcoind chain deploy`"):
        Deployment.read(path)
    with pytest.raises(ChainError, match="bad fees"):
        deploy(w3, signer, "devnet", DeployParams(mint_bps=1000))

    prod = Deployment(**{**d.__dict__, "params": {**d.params, "faucet": None}})
    deployer = Deployer("http://127.0.0.1:1", keys[0])
    with pytest.raises(ChainError, match="no faucet"):
        deployer.fund(prod, [signer.address], vcoin=1, eth=0)


def test_gov_settings_are_checked_before_anything_is_proposed() -> None:
    fees = {"fee_bps": 200, "burn_bps": 1000, "mint_bps": 500}
    assert gov.actions_for({"burn_bps": 2000}, fees) == [
        {"target": "TaskAnchor", "signature": "setFees(uint16,uint16,uint16)",
         "args": ["200", "2000", "500"]}]  # fmt: skip
    assert gov.actions_for({"epoch_mint_cap": "2.5"}, fees)[0]["args"] == [str(25 * E18 // 10)]
    for bad, message in (
        ({"mint_bps": 1000}, "mint_bps 1000 below burn_bps"),
        ({"fee_bps": 9500}, "at most 10000"),
        ({"max_reward": 1}, "unknown setting max_reward"),
        ({"epoch_length": 1.5}, "whole number"),
        ({"min_stake": -1}, "out of range"),
        ({"unstake_delay": "soon"}, "expected a number"),
    ):
        with pytest.raises(ValueError, match=message):
            gov.actions_for(bad, fees)


def test_cli_gov_and_deposit_commands_call_the_rpc() -> None:
    calls: list[tuple[str, dict[str, Any] | None]] = []

    class Client:
        timeout = 10.0

        def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
            calls.append((method, params))
            return {}

    def run(*argv: str) -> None:
        run_client_command(client_parser().parse_args(list(argv)), Client())

    run("gov", "propose", "--set", "fee_bps=300", "--set", "withdraw_delay=120")
    run("gov", "propose", "a text proposal")
    run("gov", "queue", "42")
    run("gov", "execute", "42", "--wait", "5")
    run("deposit", "12.5")
    run("withdraw-deposit", "2")
    run("withdraw-deposit")
    assert calls == [
        ("vcoin_govPropose", {"description": None, "set": {"fee_bps": "300",
                                                           "withdraw_delay": "120"},
                              "wait_s": 30.0}),
        ("vcoin_govPropose", {"description": "a text proposal", "set": None, "wait_s": 30.0}),
        ("vcoin_govQueue", {"proposal_id": "42", "wait_s": 30.0}),
        ("vcoin_govExecute", {"proposal_id": "42", "wait_s": 5.0}),
        ("vcoin_deposit", {"amount": 12.5, "wait_s": 30.0}),
        ("vcoin_withdrawDeposit", {"amount": 2.0, "wait_s": 30.0}),
        ("vcoin_withdrawDeposit", {"amount": None, "wait_s": 30.0}),
    ]  # fmt: skip
    for argv in (["--set", "fee_bps=1", "--set", "fee_bps=2"], ["--set", "max_reward=1"],
                 ["--set", "fee_bps"]):  # fmt: skip
        with pytest.raises(SystemExit):
            client_parser().parse_args(["gov", "propose", *argv])


# --- the node's ChainService on the embedded chain ----------------------------------------


class Node:
    """A ChainService on its embedded chain, with its RPC methods and the chain's tester."""

    def __init__(self, svc: ChainService, key: bytes) -> None:
        self.svc = svc
        self.key = key
        self.reg = MethodRegistry()
        register_chain_api(self.reg, svc)

    async def rpc(self, method: str, **params: Any) -> Any:
        m = self.reg.get(method)
        assert m is not None
        return await m.handler(bind_params(m, params))

    async def chain(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the chain thread (eth-tester is not thread-safe)."""
        return await self.svc.link.call(fn, *args)

    @property
    def c(self) -> Contracts:
        assert self.svc.link.contracts is not None
        return self.svc.link.contracts

    @property
    def w3(self) -> Web3:
        assert self.svc.link.w3 is not None
        return self.svc.link.w3

    async def travel(self, seconds: int) -> None:
        tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        await self.chain(travel, tester, self.w3, seconds)

    async def now(self) -> int:
        return int((await self.chain(self.w3.eth.get_block, "latest"))["timestamp"])


@asynccontextmanager
async def embedded_node(tmp_path: Path) -> AsyncIterator[Node]:
    store = Store(tmp_path / "node.db")
    await store.open()
    key = bytes(Account.create().key)
    svc = ChainService(ChainConfig(retry_max_s=0.5), store, network="devnet", key=key)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            await svc.ensure_domain()
            yield Node(svc, key)
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


async def test_domain_deposits_and_the_withdrawal_delay(tmp_path: Path) -> None:
    async with embedded_node(tmp_path) as n:
        svc, me = n.svc, n.svc.address
        d = svc.domain()
        assert d == Domain("devnet", n.w3.eth.chain_id, n.c.anchor.address)
        assert d.separator() == await n.chain(n.c.anchor.functions.domainSeparator().call)
        assert not svc.shared
        # The embedded node deposits as much as it stakes: its own tickets are covered.
        first = await svc.deposit_of(me)
        assert first is not None and first.available == 1000 * E18 and first.pending == 0
        assert first.covers(1000 * E18) and not first.covers(1000 * E18 + 1)
        assert await svc.deposit_of(me.lower()) is first  # cached

        done = await n.rpc("vcoin_deposit", amount=250)
        assert done["status"] == "done" and done["kind"] == "deposit"
        got = await svc.deposit_of(me)
        assert got is not None and got.available == 1250 * E18  # our deposit: read again

        done = await n.rpc("vcoin_withdrawDeposit", amount=100)
        assert done["kind"] == "withdraw_request" and done["status"] == "done"
        info = await n.rpc("vcoin_chainInfo")
        assert info["deposit"]["available"] == 1150 and info["deposit"]["pending"] == 100
        release = info["deposit"]["release_time"]
        assert 60 <= release - await n.now() <= 61  # devnet: 60 s
        assert info["fee_bps"] == 200 and info["burn_bps"] == 1000 and info["mint_bps"] == 500
        assert info["epoch_mint_cap"] == 10_000 and info["slash_amount"] == 50
        assert info["withdraw_delay"] == 60 and info["epoch_length"] == 3600
        assert info["payments"] == "unpaid (embedded chain: private to this node)"
        assert info["faucet"].startswith(me) and "MINTER_ROLE" in info["faucet"]
        assert "max_reward" not in info
        assert svc.payment_params() is not None and svc.payment_params().fee_bps == 200  # type: ignore[union-attr]

        with pytest.raises(RPCError, match=r"WithdrawalLocked\("):
            await n.rpc("vcoin_withdrawDeposit")
        balance = (await n.rpc("vcoin_balance"))["balance"]
        await n.travel(61)
        done = await n.rpc("vcoin_withdrawDeposit")
        assert done["kind"] == "withdraw_deposit" and done["status"] == "done"
        after = await n.rpc("vcoin_balance")
        assert after["balance"] == pytest.approx(balance + 100)
        assert after["deposit"] == {**after["deposit"], "available": 1150, "pending": 0}
        with pytest.raises(RPCError, match=r"NothingToWithdraw"):
            await n.rpc("vcoin_withdrawDeposit")
        with pytest.raises(RPCError, match=r"InsufficientDeposit"):
            await n.rpc("vcoin_withdrawDeposit", amount=5000)
        stranger = Account.create().address
        empty = await svc.deposit_of(stranger)
        assert empty is not None and (empty.available, empty.pending) == (0, 0)
        with pytest.raises(ValueError):
            await svc.deposit_of("not an address")


async def test_governance_set_goes_propose_vote_queue_execute(tmp_path: Path) -> None:
    async with embedded_node(tmp_path) as n:
        with pytest.raises(RPCError, match="mint_bps 1000 below burn_bps"):
            await n.rpc("vcoin_govPropose", set={"mint_bps": 1000})
        with pytest.raises(RPCError, match="unknown setting max_reward"):
            await n.rpc("vcoin_govPropose", set={"max_reward": 200})
        with pytest.raises(RPCError, match="description"):
            await n.rpc("vcoin_govPropose")

        p = await n.rpc("vcoin_govPropose", set={"fee_bps": 300, "withdraw_delay": 120,
                                                 "min_stake": 50.5})  # fmt: skip
        assert p["status"] == "done", p
        pid = p["result"]["proposal_id"]
        text = await n.rpc("vcoin_govPropose", description="a text proposal")
        tid = text["result"]["proposal_id"]
        await n.travel(2)  # the devnet's voting delay: 1 s
        for proposal in (pid, tid):
            assert (await n.rpc("vcoin_govVote", proposal_id=proposal, support="for"))[
                "status"] == "done"  # fmt: skip
        with pytest.raises(RPCError, match="GovernorUnexpectedProposalState"):
            await n.rpc("vcoin_govQueue", proposal_id=pid)  # still active
        await n.travel(121)  # the voting period
        st = await n.rpc("vcoin_govStatus", proposal_id=pid)
        assert st["state"] == "succeeded" and st["description"] == (
            "set fee_bps=300, withdraw_delay=120, min_stake=50.5"
        )
        assert [a["sets"] for a in st["actions"]] == [
            {"withdraw_delay": "120 s"}, {"min_stake": "50.5 VCOIN"},
            {"fee_bps": "300 bps", "burn_bps": "1000 bps", "mint_bps": "500 bps"}]  # fmt: skip
        assert (await n.rpc("vcoin_govStatus", proposal_id=tid))["actions"] == []

        q = await n.rpc("vcoin_govQueue", proposal_id=pid)
        assert q["status"] == "done" and q["result"]["proposal_id"] == pid
        assert (await n.rpc("vcoin_govStatus", proposal_id=pid))["state"] == "queued"
        with pytest.raises(RPCError, match="TimelockUnexpectedOperationState"):
            await n.rpc("vcoin_govExecute", proposal_id=pid)  # the timelock delay: 10 s
        await n.travel(11)
        e = await n.rpc("vcoin_govExecute", proposal_id=pid)
        assert e["status"] == "done", e
        st = await n.rpc("vcoin_govStatus", proposal_id=pid)
        assert st["state"] == "executed"
        info = await n.rpc("vcoin_chainInfo")
        assert (info["fee_bps"], info["burn_bps"], info["mint_bps"]) == (300, 1000, 500)
        assert info["withdraw_delay"] == 120 and info["min_stake"] == 50.5
        again = await n.rpc("vcoin_govExecute", proposal_id=pid)
        assert again["status"] == "done" and again["result"]["note"] == "already executed"
        # The text proposal passes and executes its no-op too.
        await n.rpc("vcoin_govQueue", proposal_id=tid)
        await n.travel(11)
        assert (await n.rpc("vcoin_govExecute", proposal_id=tid))["status"] == "done"
        with pytest.raises(RPCError, match="GovernorNonexistentProposal"):
            await n.rpc("vcoin_govQueue", proposal_id="12345")


class Requester:
    """Signs tickets and awards under the node's domain with the node's key."""

    def __init__(self, domain: Domain, key: bytes, address: str) -> None:
        self.domain, self.key, self.address = domain, key, address

    def ticket(self, replicas: int, **kw: Any) -> tuple[Ticket, bytes]:
        fields: dict[str, Any] = {"task_id": secrets.token_hex(16), "requester": self.address,
                                  "model_id": MODEL, "mode": 1, "replicas": replicas,
                                  "deterministic": True, "max_price": 2 * 10**15,
                                  "max_tokens": 200, "deadline": 2**40,
                                  "nonce": secrets.randbits(63)}  # fmt: skip
        t = Ticket(**{**fields, **kw})
        return t, sign(self.key, self.domain.digest(t.hash()))

    def vote(self, t: Ticket, o: Outcome, worker_key: bytes, price: int) -> Vote:
        worker = Account.from_key(worker_key).address
        award = sign(self.key, self.domain.digest(award_hash(t.hash(), worker, price)))
        return Vote(worker, price, award, sign(worker_key, self.domain.digest(o.hash(t))))


async def test_anchor_pays_workers_from_the_deposit_claim_slash_and_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with embedded_node(tmp_path) as n:
        svc = n.svc
        domain = await svc.ensure_domain()
        tester = n.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        keys = [k.to_bytes() for k in tester.backend.account_keys[1:5]]
        workers = [Account.from_key(k).address for k in keys]
        c = n.c

        def stake_workers() -> None:  # the node is the devnet's faucet
            assert svc.link.signer is not None
            for k, w in zip(keys, workers, strict=True):
                svc.link.signer.send(c.token.functions.mint(w, 200 * E18))
                s = Signer(n.w3, k)
                s.send(c.token.functions.approve(c.staking.address, 100 * E18))
                s.send(c.staking.functions.stake(100 * E18))

        await n.chain(stake_workers)
        req = Requester(domain, n.key, svc.address)
        price, units = 10**15, 100  # gross 0.1 VCOIN per vote
        gross = price * units
        t, tsig = req.ticket(replicas=3, profile=PROFILE)
        o = Outcome(hashlib.sha256(b"the answer").digest(), 3, units, PROFILE)
        votes = [req.vote(t, o, k, price) for k in keys[:3]]

        def balance(a: str) -> int:
            return int(c.token.functions.balanceOf(a).call())

        before = [await n.chain(balance, w) for w in workers]
        deposit = await svc.deposit_of(svc.address)
        assert deposit is not None
        call = AnchorCall(t, tsig, o, votes[:2])  # the third is left out: it claims later
        op_id = await svc.enqueue("anchor", call.payload(), call.key())
        op = await svc.wait(op_id, 30)
        assert op is not None and op.status == "done", op
        r = op.result
        assert r["gas_used"] > 0 and r["result_hash"] == o.result_hash.hex()
        assert r["underfunded"] == "0"
        paid = {"gross": str(gross), "to_worker": str(gross * 88 // 100),
                "burned": str(gross // 10), "fee": str(gross * 2 // 100),
                "minted": str(gross * 5 // 100)}  # fmt: skip
        assert r["paid"] == [{"worker": w, **paid} for w in workers[:2]]
        for i in (0, 1):
            assert await n.chain(balance, workers[i]) - before[i] == gross * 93 // 100
        after = await svc.deposit_of(svc.address, max_age_s=0)
        assert after is not None and deposit.available - after.available == 2 * gross
        rewards = await svc.ops.rewards(workers[0])
        assert [(x.task_id, x.amount) for x in rewards] == [(t.task_id, gross * 93 // 100)]
        view = await n.rpc("vcoin_getAnchor", task_id=t.task_id)
        assert view["status"] == "anchored" and view["rewards"][0]["node"] == workers[0]
        assert view["rewards"][0]["amount"] == pytest.approx(gross * 93 / 100 / E18)
        assert view["payload"]["ticket"] == t.to_json()

        # Someone anchored first (here: ourselves, under another key): done, the chain's record.
        again = await svc.enqueue("anchor", call.payload(), "anchor:again")
        op = await svc.wait(again, 30)
        assert op is not None and op.status == "done" and op.result["note"] == "anchored already"
        assert op.result["paid"] == r["paid"] and op.tx_hash == r["tx_hash"]
        assert len(await svc.ops.rewards(workers[0])) == 1

        # The worker left out claims; a second claim is done with nothing paid.
        claim = ClaimCall(t, votes[2])
        op = await svc.wait(await svc.enqueue("claim", claim.payload(), claim.key()), 30)
        assert op is not None and op.status == "done", op
        assert [p["worker"] for p in op.result["paid"]] == [workers[2]]
        assert await n.chain(balance, workers[2]) - before[2] == gross * 93 // 100
        op = await svc.wait(await svc.enqueue("claim", claim.payload()), 30)
        assert op is not None and op.status == "done" and "AlreadyPaid" in op.result["note"]

        # A fourth node signed another result for this deterministic supermajority: slashed.
        other = hashlib.sha256(b"another answer").digest()
        evidence = sign(keys[3], domain.digest(result_struct_hash(t.task_id, other, PROFILE)))
        slash = SlashCall(t.task_id, workers[3], other, evidence)
        op = await svc.wait(await svc.enqueue("slash", slash.payload(), slash.key()), 30)
        assert op is not None and op.status == "done" and op.result["amount"] == str(50 * E18)
        stake = svc.link.contracts.staking.functions.stakeOf  # type: ignore[union-attr]
        assert await n.chain(lambda: stake(workers[3]).call()) == 50 * E18

        # A refused anchor fails by name; a v1 payload fails at once.
        t2, tsig2 = req.ticket(replicas=3)
        o2 = Outcome(o.result_hash, 2, units)
        bad = AnchorCall(t2, tsig2, o2, [req.vote(t2, o2, keys[0], price)])
        op = await svc.wait(await svc.enqueue("anchor", bad.payload()), 30)
        assert op is not None and op.status == "failed" and op.error == "BelowQuorum(1, 3)"
        op = await svc.wait(await svc.enqueue("anchor", {"task_id": t2.task_id, "voters": []}), 30)
        assert op is not None and op.status == "failed" and "settlement v1" in (op.error or "")

        # The chain unreachable for a while: the anchor waits as a row, then lands once.
        signer = svc.link.signer
        assert signer is not None
        real, failures = signer.broadcast, []

        def flaky(raw: bytes, tx_hash: str, timeout: float = 30.0) -> Any:
            if len(failures) < 3:
                failures.append(tx_hash)
                raise ConnectionError("chain down")
            return real(raw, tx_hash, timeout)

        monkeypatch.setattr(signer, "broadcast", flaky)
        t3, tsig3 = req.ticket(replicas=1)
        o3 = Outcome(o.result_hash, 2, 10)
        late = AnchorCall(t3, tsig3, o3, [req.vote(t3, o3, keys[1], price)])
        op_id = await svc.enqueue("anchor", late.payload(), late.key())
        op = await svc.wait(op_id, 30)
        assert op is not None and op.status == "done", op
        assert op.attempts == 4 and set(failures) == {op.tx_hash}  # the same signed bytes
        tid3 = bytes(16) + bytes.fromhex(t3.task_id)
        logs = c.anchor.events.Anchored().get_logs
        anchored = await n.chain(lambda: logs(from_block=0, argument_filters={"taskId": tid3}))
        assert len(anchored) == 1
        assert svc.reachable
