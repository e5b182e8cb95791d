"""The Solidity contracts on the in-process EVM (web3 + eth-tester + py-evm).

Deploys the committed artifacts in ``contracts/artifacts`` once per module; every test runs
on a chain snapshot that is reverted afterwards. Tickets, awards, outcomes and results are
signed with ``vcoind.chain.typed``, the node's own EIP-712 code, so the Python and Solidity
hashes must agree.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_tester.exceptions import TransactionFailed
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.logs import DISCARD

from vcoind.chain.contracts import revert_from
from vcoind.chain.typed import (
    ZERO32,
    Domain,
    Outcome,
    Ticket,
    award_hash,
    profile_hash,
    result_struct_hash,
    sign,
)
from vcoind.consensus.outcome import task_id_bytes32

CONTRACTS = Path(__file__).resolve().parent.parent / "contracts"
ARTIFACTS = CONTRACTS / "artifacts"
NETWORK = "devnet"
E18 = 10**18
MAX_SUPPLY = 1_000_000_000 * E18
UNSTAKE_DELAY = 3600
MIN_STAKE = 100 * E18
STAKE = 1000 * E18
FUNDS = 10_000 * E18
DEPOSIT = 1000 * E18  # the requester's escrow
SLASH = 50 * E18
FEE_BPS, BURN_BPS, MINT_BPS = 200, 1000, 500
EPOCH = 3600
EPOCH_CAP = 10_000 * E18
WITHDRAW_DELAY = 60
PARAMS = (SLASH, FEE_BPS, BURN_BPS, MINT_BPS, EPOCH, EPOCH_CAP, WITHDRAW_DELAY)
PRICE = 10**15  # wei per token
MAX_PRICE = 2 * PRICE
MAX_TOKENS = 1000
UNITS = 600
VOTING_DELAY = 10
VOTING_PERIOD = 300
TIMELOCK_DELAY = 60
MODEL = "sha256:" + hashlib.sha256(b"test model weights").hexdigest()
ZERO = "0x0000000000000000000000000000000000000000"
PROFILE = profile_hash({"device": "cuda", "dtype": "float16", "torch": "2.11", "tf": "5.17"})
OTHER_PROFILE = profile_hash({"device": "cpu", "dtype": "float32", "torch": "2.13", "tf": "5.17"})


def artifact(name: str) -> dict[str, Any]:
    return json.loads((ARTIFACTS / f"{name}.json").read_text())


@dataclass
class Chain:
    w3: Web3
    tester: Any
    keys: dict[str, bytes]  # address -> private key
    admin: str
    reserve: str
    requester: str  # funded, DEPOSIT in TaskAnchor's escrow
    nodes: list[str]  # staked with STAKE
    unstaked: str  # funded, not staked
    outsider: str  # no tokens
    token: Contract
    staking: Contract
    anchor: Contract
    timelock: Contract
    governor: Contract

    def send(self, fn: Any, sender: str, gas: int | None = None) -> Any:
        """``fn`` sent by ``sender``; ``gas``: this limit instead of eth-tester's estimate
        (which runs the transaction a dozen times)."""
        tx = {"from": sender} if gas is None else {"from": sender, "gas": gas}
        receipt = self.w3.eth.wait_for_transaction_receipt(fn.transact(tx))
        assert receipt["status"] == 1
        return receipt

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel_to(self, timestamp: int) -> None:
        """Mine an empty block at ``timestamp``: calls read the chain at that time, the next
        transaction runs one second later. (eth-tester's ``time_travel(t)`` mines at t - 1.)"""
        self.tester.time_travel(timestamp + 1)

    def events(self, contract: Contract, name: str, receipt: Any) -> list[dict[str, Any]]:
        """The ``name`` events of ``contract`` in ``receipt`` (others are skipped)."""
        logs = contract.events[name]().process_receipt(receipt, errors=DISCARD)
        return [dict(log["args"]) for log in logs]

    def travel(self, seconds: int) -> None:
        self.travel_to(self.now() + seconds)

    def domain(self, anchor: Contract | None = None, **change: Any) -> Domain:
        """Where this deployment's signatures count (``change``: another network, chain id
        or contract)."""
        d = Domain(NETWORK, self.w3.eth.chain_id, (anchor or self.anchor).address)
        return replace(d, **change)


def expect_revert(
    c: Chain, contract: Contract, fn: Any, sender: str, error: str, *args: Any
) -> None:
    """``fn`` sent by ``sender`` reverts with the custom error ``error(args...)``."""
    with pytest.raises(TransactionFailed) as info:
        fn.transact({"from": sender})
    revert = revert_from(info.value)  # the daemon's decoder, over every contract's errors
    assert revert is not None, f"not a revert: {info.value!r}"
    assert revert.name == error, f"reverted with {revert}, expected {error}"
    if args:
        assert revert.args_ == args


def deploy(w3: Web3, name: str, sender: str, *args: Any) -> Contract:
    a = artifact(name)
    args = tuple(x.address if isinstance(x, Contract) else x for x in args)
    tx = w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"]).constructor(*args)
    receipt = w3.eth.wait_for_transaction_receipt(tx.transact({"from": sender}))
    return w3.eth.contract(address=receipt["contractAddress"], abi=a["abi"])


def deploy_anchor(c: Chain, network: str = NETWORK) -> Contract:
    """A TaskAnchor on ``c``'s token and staking, with the roles it needs."""
    anchor = deploy(c.w3, "TaskAnchor", c.admin, c.token, c.staking, c.admin, network, PARAMS)
    t, s = c.token.functions, c.staking.functions
    c.send(t.grantRole(t.MINTER_ROLE().call(), anchor.address), c.admin)
    c.send(t.grantRole(t.BURNER_ROLE().call(), anchor.address), c.admin)
    c.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address), c.admin)
    return anchor


@pytest.fixture(scope="module")
def deployed() -> Chain:
    w3 = Web3(EthereumTesterProvider())
    tester = w3.provider.ethereum_tester
    keys = {k.public_key.to_checksum_address(): k.to_bytes() for k in tester.backend.account_keys}
    admin, reserve, requester, *rest = w3.eth.accounts
    nodes, unstaked, outsider = list(rest[:5]), rest[5], rest[6]

    token = deploy(w3, "VCoin", admin, admin)
    staking = deploy(w3, "Staking", admin, token.address, admin, reserve, UNSTAKE_DELAY, MIN_STAKE)
    anchor = deploy(w3, "TaskAnchor", admin, token, staking, admin, NETWORK, PARAMS)
    timelock = deploy(w3, "VCoinTimelock", admin, TIMELOCK_DELAY, [], [ZERO], admin)
    governor = deploy(w3, "VCoinGovernor", admin, token, timelock, VOTING_DELAY, VOTING_PERIOD)
    contracts = (token, staking, anchor, timelock, governor)
    c = Chain(w3, tester, keys, admin, reserve, requester, nodes, unstaked, outsider, *contracts)

    # The roles README.md lists, plus MINTER_ROLE for the admin to fund the nodes.
    t, s, tl = token.functions, staking.functions, timelock.functions
    c.send(t.grantRole(t.MINTER_ROLE().call(), anchor.address), admin)
    c.send(t.grantRole(t.BURNER_ROLE().call(), anchor.address), admin)
    c.send(t.grantRole(t.MINTER_ROLE().call(), admin), admin)
    c.send(t.grantRole(t.BURNER_ROLE().call(), staking.address), admin)
    c.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address), admin)
    c.send(tl.grantRole(tl.PROPOSER_ROLE().call(), governor.address), admin)
    c.send(tl.grantRole(tl.CANCELLER_ROLE().call(), governor.address), admin)
    c.send(anchor.functions.grantRole(bytes(32), timelock.address), admin)
    for node in [*nodes, unstaked, requester]:
        c.send(t.mint(node, FUNDS), admin)
    for node in nodes:
        c.send(t.approve(staking.address, STAKE), node)
        c.send(s.stake(STAKE), node)
    c.send(t.approve(anchor.address, DEPOSIT), requester)
    c.send(anchor.functions.deposit(DEPOSIT), requester)
    return c


@pytest.fixture
def c(deployed: Chain) -> Iterator[Chain]:
    snapshot = deployed.tester.take_snapshot()
    yield deployed
    deployed.tester.revert_to_snapshot(snapshot)


def balance(c: Chain, who: str) -> int:
    return int(c.token.functions.balanceOf(who).call())


# ---- VCoin ----


def test_token_roles_and_cap(c: Chain) -> None:
    t = c.token.functions
    assert (t.name().call(), t.symbol().call(), t.decimals().call()) == ("VCoin", "VCOIN", 18)
    assert t.MAX_SUPPLY().call() == MAX_SUPPLY
    assert t.CLOCK_MODE().call() == "mode=timestamp"
    minter = t.MINTER_ROLE().call()
    expect_revert(
        c,
        c.token,
        t.mint(c.outsider, 1),
        c.outsider,
        "AccessControlUnauthorizedAccount",
        c.outsider,
        minter,
    )
    expect_revert(c, c.token, t.burn(1), c.nodes[0], "AccessControlUnauthorizedAccount")

    room = MAX_SUPPLY - t.totalSupply().call()
    expect_revert(
        c, c.token, t.mint(c.outsider, room + 1), c.admin, "MaxSupplyExceeded", room + 1, room
    )
    c.send(t.mint(c.outsider, room), c.admin)
    assert t.totalSupply().call() == MAX_SUPPLY
    expect_revert(c, c.token, t.mint(c.outsider, 1), c.admin, "MaxSupplyExceeded", 1, 0)


def test_permit(c: Chain) -> None:
    owner, spender = c.unstaked, c.outsider
    t = c.token.functions
    value, deadline, nonce = 7 * E18, c.now() + 3600, t.nonces(owner).call()
    signed = Account.sign_typed_data(
        c.keys[owner],
        domain_data={
            "name": "VCoin",
            "version": "1",
            "chainId": c.w3.eth.chain_id,
            "verifyingContract": c.token.address,
        },
        message_types={
            "Permit": [
                {"name": "owner", "type": "address"},
                {"name": "spender", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "nonce", "type": "uint256"},
                {"name": "deadline", "type": "uint256"},
            ]
        },
        message_data={
            "owner": owner,
            "spender": spender,
            "value": value,
            "nonce": nonce,
            "deadline": deadline,
        },
    )
    r, s = signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")
    permit = t.permit(owner, spender, value, deadline, signed.v, r, s)
    c.send(permit, spender)  # the spender pays the gas; the owner only signed
    assert t.allowance(owner, spender).call() == value
    assert t.nonces(owner).call() == nonce + 1
    c.send(t.transferFrom(owner, spender, value), spender)
    assert balance(c, spender) == value
    expect_revert(c, c.token, permit, spender, "ERC2612InvalidSigner")  # nonce used


# ---- Staking ----


def test_stake_unstake_withdraw_delay(c: Chain) -> None:
    s = c.staking.functions
    node = c.nodes[0]
    assert s.stakeOf(node).call() == STAKE and s.isEligible(node).call()
    expect_revert(
        c, c.staking, s.requestUnstake(STAKE + 1), node, "InsufficientStake", STAKE + 1, STAKE
    )
    expect_revert(c, c.staking, s.withdraw(), node, "NothingToWithdraw")

    receipt = c.send(s.requestUnstake(STAKE - 50 * E18), node)
    event = c.events(c.staking, "UnstakeRequested", receipt)[0]
    release = event["releaseTime"]
    assert release == c.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + UNSTAKE_DELAY
    assert s.stakeOf(node).call() == 50 * E18
    assert not s.isEligible(node).call()  # below MIN_STAKE
    assert s.pendingOf(node).call() == [STAKE - 50 * E18, release]

    expect_revert(c, c.staking, s.withdraw(), node, "UnstakeLocked", release)
    c.travel_to(release - 2)
    expect_revert(c, c.staking, s.withdraw(), node, "UnstakeLocked", release)
    c.travel_to(release)
    before = balance(c, node)
    c.send(s.withdraw(), node)
    assert balance(c, node) == before + STAKE - 50 * E18
    assert s.pendingOf(node).call() == [0, 0]

    # With no delay the stake comes back in the next transaction.
    expect_revert(c, c.staking, s.setUnstakeDelay(0), node, "AccessControlUnauthorizedAccount")
    c.send(s.setUnstakeDelay(0), c.admin)
    c.send(s.requestUnstake(50 * E18), node)
    c.send(s.withdraw(), node)
    assert s.stakeOf(node).call() == 0 and balance(c, node) == FUNDS


def test_min_stake_eligibility(c: Chain) -> None:
    s = c.staking.functions
    node = c.nodes[0]
    expect_revert(c, c.staking, s.setMinStake(0), node, "AccessControlUnauthorizedAccount")
    c.send(s.setMinStake(STAKE + 1), c.admin)
    assert not s.isEligible(node).call()
    c.send(s.setMinStake(0), c.admin)
    assert s.isEligible(node).call()
    assert not s.isEligible(c.unstaked).call()  # no stake is never eligible


def test_slash_math_half_burned_half_to_reserve(c: Chain) -> None:
    s, t = c.staking.functions, c.token.functions
    node = c.nodes[0]
    expect_revert(c, c.staking, s.slash(node, 1), c.admin, "AccessControlUnauthorizedAccount")
    c.send(s.grantRole(s.SLASHER_ROLE().call(), c.admin), c.admin)

    supply, reserve = t.totalSupply().call(), balance(c, c.reserve)
    receipt = c.send(s.slash(node, 101), c.admin)  # odd: 50 burned, 51 to the reserve
    args = c.events(c.staking, "Slashed", receipt)[0]
    assert (args["amount"], args["burned"], args["toReserve"]) == (101, 50, 51)
    assert t.totalSupply().call() == supply - 50
    assert balance(c, c.reserve) == reserve + 51
    assert s.stakeOf(node).call() == STAKE - 101

    # Pending stake is still slashable, and a slash takes at most what there is.
    c.send(s.requestUnstake(STAKE - 101), node)
    assert s.slashableOf(node).call() == STAKE - 101
    receipt = c.send(s.slash(node, 10 * STAKE), c.admin)
    args = c.events(c.staking, "Slashed", receipt)[0]
    assert args["amount"] == STAKE - 101
    assert args["burned"] + args["toReserve"] == STAKE - 101
    assert s.pendingOf(node).call()[0] == 0
    assert t.balanceOf(c.staking.address).call() == s.totalStaked().call() == 4 * STAKE
    expect_revert(c, c.staking, s.slash(node, 1), c.admin, "NothingToSlash", node)


# ---- TaskAnchor: tickets, awards, outcomes ----

_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # secp256k1 order
PAID_FIELDS = ("gross", "toWorker", "burned", "fee", "minted")


def ticket(c: Chain, n: int = 1, **change: Any) -> Ticket:
    """The requester's ticket for task ``n``: 3 consensus replicas, not deterministic."""
    t = Ticket(f"{n:032x}", c.requester, MODEL, 1, 3, False, MAX_PRICE, MAX_TOKENS,
               c.now() + 3600, 1000 + n)  # fmt: skip
    return replace(t, **change)


def result(n: int = 1) -> bytes:
    return hashlib.sha256(f"answer {n}".encode()).digest()


def outcome(n: int = 1, **change: Any) -> Outcome:
    """A majority outcome of UNITS tokens (``change``: decision, units, profile)."""
    return replace(Outcome(result(n), 2, UNITS), **change)


def outcome_args(o: Outcome) -> tuple[Any, ...]:
    return (o.result_hash, o.decision, o.units, o.profile)


def ticket_sig(c: Chain, t: Ticket, *, signer: str | None = None, d: Domain | None = None) -> bytes:
    return sign(c.keys[signer or t.requester], (d or c.domain()).digest(t.hash()))


def vote(
    c: Chain,
    t: Ticket,
    o: Outcome,
    worker: str,
    price: int = PRICE,
    *,
    awarder: str | None = None,
    signer: str | None = None,
    award_price: int | None = None,
    d: Domain | None = None,
) -> tuple[str, int, bytes, bytes]:
    """A Vote: ``worker`` at ``price``, its Award signed by ``awarder`` (the requester) for
    ``award_price`` (``price``) and the Outcome signed by ``signer`` (the worker)."""
    d = d or c.domain()
    award = award_hash(t.hash(), worker, price if award_price is None else award_price)
    award_sig = sign(c.keys[awarder or t.requester], d.digest(award))
    return (worker, price, award_sig, sign(c.keys[signer or worker], d.digest(o.hash(t))))


def votes(
    c: Chain, t: Ticket, o: Outcome, workers: list[str], d: Domain | None = None
) -> list[tuple[str, int, bytes, bytes]]:
    return [vote(c, t, o, w, d=d) for w in workers]


def anchor_fn(
    c: Chain,
    t: Ticket,
    o: Outcome,
    vs: list[Any],
    *,
    tsig: bytes | None = None,
    anchor: Contract | None = None,
) -> Any:
    """``TaskAnchor.anchor`` (on ``anchor``, default the fixture's), the ticket signed by its
    requester for that deployment unless ``tsig`` is given."""
    anchor = anchor or c.anchor
    if tsig is None:
        tsig = ticket_sig(c, t, d=c.domain(anchor))
    return anchor.functions.anchor(t.values(), tsig, outcome_args(o), vs)


def result_sig(
    c: Chain, signer: str, t: Ticket, result_hash: bytes, profile: bytes = PROFILE
) -> bytes:
    """``signer``'s Result over ``result_hash`` for ``t``'s task: the evidence a slash takes."""
    return sign(c.keys[signer], c.domain().digest(result_struct_hash(t.task_id, result_hash,
                                                                     profile)))  # fmt: skip


def malleable(sig: bytes) -> bytes:
    """The high-s twin of a signature: recovers to the same key, refused by the contract."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


def split(gross: int) -> dict[str, int]:
    """What a payment of ``gross`` becomes (the mint before any cap)."""
    burned, fee = gross * BURN_BPS // 10_000, gross * FEE_BPS // 10_000
    return {"gross": gross, "toWorker": gross - burned - fee, "burned": burned, "fee": fee,
            "minted": gross * MINT_BPS // 10_000}  # fmt: skip


def paid(
    c: Chain, receipt: Any, anchor: Contract | None = None
) -> list[tuple[str, dict[str, int]]]:
    return [(e["worker"], {k: e[k] for k in PAID_FIELDS})
            for e in c.events(anchor or c.anchor, "Paid", receipt)]  # fmt: skip


def escrow(c: Chain, who: str) -> int:
    available, pending, _ = c.anchor.functions.depositOf(who).call()
    return int(available + pending)


def supply(c: Chain) -> int:
    return int(c.token.functions.totalSupply().call())


def test_hash_views_match_typed_py(c: Chain) -> None:
    a = c.anchor.functions
    d = c.domain()
    assert bytes(a.domainSeparator().call()) == d.separator()
    fields = a.eip712Domain().call()
    assert fields[1:5] == ["VCoin:" + NETWORK, "2", c.w3.eth.chain_id, c.anchor.address]
    assert a.network().call() == NETWORK
    extreme = ticket(c, 2, mode=4, replicas=2**16 - 1, deterministic=True, profile=PROFILE,
                     max_price=2**256 - 1, max_tokens=2**32 - 1, deadline=2**64 - 1,
                     nonce=2**64 - 1)  # fmt: skip
    for t in (ticket(c), extreme):
        assert bytes(a.ticketHash(t.values()).call()) == t.hash()
        for o in (outcome(), outcome(3, decision=3, units=0, profile=PROFILE)):
            assert bytes(a.outcomeDigest(t.values(), outcome_args(o)).call()) == d.digest(o.hash(t))


# ---- TaskAnchor: escrow ----


def test_deposit_and_withdrawal_delay(c: Chain) -> None:
    a, t = c.anchor.functions, c.token.functions
    who = c.unstaked
    expect_revert(c, c.anchor, a.deposit(0), who, "ZeroAmount")
    expect_revert(c, c.anchor, a.deposit(5 * E18), who, "ERC20InsufficientAllowance")
    c.send(t.approve(c.anchor.address, 5 * E18), who)
    receipt = c.send(a.deposit(5 * E18), who)
    assert c.events(c.anchor, "Deposited", receipt) == [
        {"requester": who, "amount": 5 * E18, "balance": 5 * E18}
    ]
    assert a.depositOf(who).call() == [5 * E18, 0, 0]
    assert balance(c, who) == FUNDS - 5 * E18
    expect_revert(
        c, c.anchor, a.requestWithdrawal(6 * E18), who, "InsufficientDeposit", 6 * E18, 5 * E18
    )
    expect_revert(c, c.anchor, a.requestWithdrawal(0), who, "ZeroAmount")
    expect_revert(c, c.anchor, a.withdrawDeposit(), who, "NothingToWithdraw")

    receipt = c.send(a.requestWithdrawal(2 * E18), who)
    event = c.events(c.anchor, "WithdrawalRequested", receipt)[0]
    release = event["releaseTime"]
    assert release == c.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + WITHDRAW_DELAY
    assert (event["requester"], event["amount"], event["pending"]) == (who, 2 * E18, 2 * E18)
    assert a.depositOf(who).call() == [3 * E18, 2 * E18, release]
    expect_revert(c, c.anchor, a.withdrawDeposit(), who, "WithdrawalLocked", release)

    # A second request restarts the delay for the whole pending amount.
    c.travel_to(release - 30)
    receipt = c.send(a.requestWithdrawal(E18), who)
    later = c.events(c.anchor, "WithdrawalRequested", receipt)[0]["releaseTime"]
    assert later > release
    c.travel_to(release)
    expect_revert(c, c.anchor, a.withdrawDeposit(), who, "WithdrawalLocked", later)
    c.travel_to(later)
    receipt = c.send(a.withdrawDeposit(), who)
    assert c.events(c.anchor, "DepositWithdrawn", receipt) == [
        {"requester": who, "amount": 3 * E18}
    ]
    assert balance(c, who) == FUNDS - 2 * E18
    assert a.depositOf(who).call() == [2 * E18, 0, 0]
    expect_revert(c, c.anchor, a.withdrawDeposit(), who, "NothingToWithdraw")


def test_settlement_draws_available_then_pending_and_pays_what_is_there(c: Chain) -> None:
    """A pending withdrawal still pays the work accepted before it; a deposit too small for
    every vote pays what it holds (Underfunded, no revert)."""
    a, tok = c.anchor.functions, c.token.functions
    requester, gross = c.unstaked, PRICE * UNITS
    c.send(tok.approve(c.anchor.address, 3 * gross // 2), requester)
    c.send(a.deposit(3 * gross // 2), requester)
    c.send(a.requestWithdrawal(gross), requester)  # available gross / 2, pending gross
    t, o = ticket(c, requester=requester), outcome()
    workers = c.nodes[:3]
    receipt = c.send(anchor_fn(c, t, o, votes(c, t, o, workers)), c.nodes[0])

    assert paid(c, receipt) == list(zip(workers, [split(gross), split(gross // 2), split(0)],
                                        strict=True))  # fmt: skip
    task = task_id_bytes32(t.task_id)
    assert c.events(c.anchor, "Underfunded", receipt) == [
        {"taskId": task, "requester": requester, "short": gross // 2},
        {"taskId": task, "requester": requester, "short": gross},
    ]
    assert a.depositOf(requester).call()[:2] == [0, 0]
    assert balance(c, c.anchor.address) == DEPOSIT  # the other requester's deposit only
    assert all(a.paid(task, w).call() for w in workers)  # an unfunded vote is settled too


def test_a_price_too_large_to_multiply_pays_the_whole_deposit(c: Chain) -> None:
    """price x units saturates instead of overflowing: the anchor still stands."""
    top = 2**256 - 1
    t, o = ticket(c, replicas=1, max_price=top), outcome(units=2)
    receipt = c.send(anchor_fn(c, t, o, [vote(c, t, o, c.nodes[0], top)]), c.nodes[0])
    assert paid(c, receipt) == [(c.nodes[0], split(DEPOSIT))]
    assert c.events(c.anchor, "Underfunded", receipt)[0]["short"] == top - DEPOSIT
    assert escrow(c, c.requester) == 0


# ---- TaskAnchor: settlement ----


def test_anchor_settles_a_consensus_task(c: Chain) -> None:
    a = c.anchor.functions
    workers = c.nodes[:3]
    prices = [PRICE, PRICE + 7, MAX_PRICE]
    t, o = ticket(c), outcome()
    vs = [vote(c, t, o, w, p) for w, p in zip(workers, prices, strict=True)]
    watch = [*workers, c.reserve, c.requester, c.outsider]
    before, total = {w: balance(c, w) for w in watch}, supply(c)
    receipt = c.send(anchor_fn(c, t, o, vs), c.outsider)  # anyone may send it

    task = task_id_bytes32(t.task_id)
    model = bytes.fromhex(MODEL.removeprefix("sha256:"))
    assert c.events(c.anchor, "Anchored", receipt) == [
        {
            "taskId": task,
            "resultHash": o.result_hash,
            "modelId": model,
            "decision": 2,
            "voterCount": 3,
        }
    ]
    assert a.anchors(task).call() == [o.result_hash, model, t.hash(), c.requester, 2, False,
                                      UNITS, ZERO32, receipt["blockNumber"], 3]  # fmt: skip
    want = [split(p * UNITS) for p in prices]
    assert paid(c, receipt) == list(zip(workers, want, strict=True))
    assert c.events(c.anchor, "Underfunded", receipt) == []
    for w, s in zip(workers, want, strict=True):
        assert balance(c, w) - before[w] == s["toWorker"] + s["minted"]
        assert a.paid(task, w).call()
    gross = sum(s["gross"] for s in want)
    assert balance(c, c.reserve) - before[c.reserve] == sum(s["fee"] for s in want)
    assert supply(c) - total == sum(s["minted"] - s["burned"] for s in want)
    assert balance(c, c.requester) == before[c.requester]  # paid from the deposit
    assert balance(c, c.outsider) == before[c.outsider]  # the sender earns nothing
    assert a.depositOf(c.requester).call() == [DEPOSIT - gross, 0, 0]  # the rest stays
    assert balance(c, c.anchor.address) == DEPOSIT - gross
    assert a.mintRoom().call() == EPOCH_CAP - sum(s["minted"] for s in want)
    assert not a.paid(task, c.nodes[3]).call()


def test_claim_pays_a_worker_left_out_the_same(c: Chain) -> None:
    a = c.anchor.functions
    t, o = ticket(c), outcome()
    task = task_id_bytes32(t.task_id)
    w0, w1, late, n3 = c.nodes[:4]
    vs = votes(c, t, o, [w0, w1, late])
    expect_revert(c, c.anchor, a.claim(t.values(), vs[2]), late, "NotAnchored", task)
    receipt = c.send(anchor_fn(c, t, o, vs[:2]), w0)  # 2 of 3: a quorum
    assert c.events(c.anchor, "Anchored", receipt)[0]["voterCount"] == 2

    before = balance(c, late)
    receipt = c.send(a.claim(t.values(), vs[2]), c.outsider)  # anyone may send it
    assert paid(c, receipt) == [(late, split(PRICE * UNITS))]
    assert (
        balance(c, late) - before
        == split(PRICE * UNITS)["toWorker"] + split(PRICE * UNITS)["minted"]
    )
    assert escrow(c, c.requester) == DEPOSIT - 3 * PRICE * UNITS
    expect_revert(c, c.anchor, a.claim(t.values(), vs[2]), late, "AlreadyPaid", task, late)
    expect_revert(c, c.anchor, a.claim(t.values(), vs[0]), w0, "AlreadyPaid", task, w0)

    # The same checks as an anchor's votes, against the stored outcome.
    other = replace(t, nonce=t.nonce + 1)
    cases: list[tuple[Any, str, tuple[Any, ...]]] = [
        (vote(c, other, o, n3), "TicketMismatch", ()),
        (vote(c, t, o, n3, MAX_PRICE + 1), "PriceAboveMax", (n3, MAX_PRICE + 1, MAX_PRICE)),
        (vote(c, t, o, n3, awarder=n3), "BadAward", (n3,)),
        (vote(c, t, o, n3, PRICE, award_price=PRICE - 1), "BadAward", (n3,)),
        (vote(c, t, outcome(2), n3), "BadSignature", (n3,)),
        (vote(c, t, replace(o, units=UNITS + 1), n3), "BadSignature", (n3,)),
        (vote(c, t, o, c.unstaked), "NotStaked", (c.unstaked,)),
    ]
    for v, error, args in cases:
        t_used = other if error == "TicketMismatch" else t
        expect_revert(c, c.anchor, a.claim(t_used.values(), v), n3, error, *args)


Case = tuple[Any, str, tuple[Any, ...]]


def _decision(d: int) -> Callable[[Chain], Case]:
    def case(c: Chain) -> Case:
        t, o = ticket(c), outcome(decision=d)
        return anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), "BadDecision", (d,)

    case.__name__ = f"_decision_{d}"
    return case


def _ticket_signed_by_other(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    vs = votes(c, t, o, c.nodes[:3])
    return anchor_fn(c, t, o, vs, tsig=ticket_sig(c, t, signer=c.nodes[0])), "BadTicket", ()


def _ticket_high_s(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    vs = votes(c, t, o, c.nodes[:3])
    return anchor_fn(c, t, o, vs, tsig=malleable(ticket_sig(c, t))), "BadTicket", ()


def _ticket_altered(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    more = replace(t, max_price=10 * MAX_PRICE)
    vs = votes(c, more, o, c.nodes[:3])
    return anchor_fn(c, more, o, vs, tsig=ticket_sig(c, t)), "BadTicket", ()


def _requester_zero(c: Chain) -> Case:
    t, o = ticket(c, requester=ZERO), outcome()
    vs = [vote(c, t, o, w, awarder=c.requester) for w in c.nodes[:3]]
    return anchor_fn(c, t, o, vs, tsig=bytes(65)), "BadTicket", ()


def _no_replicas(c: Chain) -> Case:
    t, o = ticket(c, replicas=0), outcome()
    return anchor_fn(c, t, o, votes(c, t, o, c.nodes[:1])), "BadReplicas", (0,)


def _too_many_voters(c: Chain) -> Case:
    t, o = ticket(c, replicas=100), outcome()
    return anchor_fn(c, t, o, [vote(c, t, o, c.nodes[0])] * 65), "TooManyVoters", (65, 64)


def _units_above_max(c: Chain) -> Case:
    t, o = ticket(c), outcome(units=MAX_TOKENS + 1)
    vs = votes(c, t, o, c.nodes[:3])
    return anchor_fn(c, t, o, vs), "UnitsAboveMax", (MAX_TOKENS + 1, MAX_TOKENS)


def _duplicate_voter(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    v = votes(c, t, o, c.nodes[:2])
    return anchor_fn(c, t, o, [*v, v[0]]), "DuplicateVoter", (c.nodes[0],)


def _price_above_max(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w = c.nodes[1]
    vs = [vote(c, t, o, c.nodes[0]), vote(c, t, o, w, MAX_PRICE + 1), vote(c, t, o, c.nodes[2])]
    return anchor_fn(c, t, o, vs), "PriceAboveMax", (w, MAX_PRICE + 1, MAX_PRICE)


def _award_by_the_worker(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w = c.nodes[0]
    vs = [vote(c, t, o, w, awarder=w), *votes(c, t, o, c.nodes[1:3])]
    return anchor_fn(c, t, o, vs), "BadAward", (w,)


def _award_at_another_price(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w = c.nodes[2]
    vs = [*votes(c, t, o, c.nodes[:2]), vote(c, t, o, w, MAX_PRICE, award_price=PRICE)]
    return anchor_fn(c, t, o, vs), "BadAward", (w,)


def _award_for_another_ticket(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w = c.nodes[0]
    elsewhere = vote(c, ticket(c, 2), o, w)
    vs = [(w, PRICE, elsewhere[2], vote(c, t, o, w)[3]), *votes(c, t, o, c.nodes[1:3])]
    return anchor_fn(c, t, o, vs), "BadAward", (w,)


def _outcome_signed_by_other(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w = c.nodes[1]
    vs = [vote(c, t, o, c.nodes[0]), vote(c, t, o, w, signer=c.nodes[3]), vote(c, t, o, c.nodes[2])]
    return anchor_fn(c, t, o, vs), "BadSignature", (w,)


def _outcome_of_another_result(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    vs = votes(c, t, outcome(2), c.nodes[:3])
    return anchor_fn(c, t, o, vs), "BadSignature", (c.nodes[0],)


def _outcome_with_more_units(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    vs = votes(c, t, o, c.nodes[:3])
    return anchor_fn(c, t, replace(o, units=UNITS + 1), vs), "BadSignature", (c.nodes[0],)


def _outcome_with_another_profile(c: Chain) -> Case:
    t, o = ticket(c, deterministic=True), outcome(decision=3, profile=PROFILE)
    vs = votes(c, t, o, c.nodes[:3])
    return anchor_fn(c, t, replace(o, profile=OTHER_PROFILE), vs), "BadSignature", (c.nodes[0],)


def _outcome_high_s(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w, p, award, sig = vote(c, t, o, c.nodes[0])
    vs = [(w, p, award, malleable(sig)), *votes(c, t, o, c.nodes[1:3])]
    return anchor_fn(c, t, o, vs), "BadSignature", (w,)


def _outcome_garbage(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    w, p, award, _ = vote(c, t, o, c.nodes[0])
    vs = [(w, p, award, b"\x01" * 64), *votes(c, t, o, c.nodes[1:3])]
    return anchor_fn(c, t, o, vs), "BadSignature", (w,)


def _not_staked(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    vs = votes(c, t, o, [c.nodes[0], c.unstaked, c.nodes[1]])
    return anchor_fn(c, t, o, vs), "NotStaked", (c.unstaked,)


def _below_quorum(c: Chain) -> Case:
    t, o = ticket(c, replicas=4), outcome()
    return anchor_fn(c, t, o, votes(c, t, o, c.nodes[:2])), "BelowQuorum", (2, 4)


def _no_votes(c: Chain) -> Case:
    t, o = ticket(c), outcome()
    return anchor_fn(c, t, o, []), "BelowQuorum", (0, 3)


@pytest.mark.parametrize(
    "case",
    [
        _decision(0),
        _decision(1),
        _decision(4),
        _ticket_signed_by_other,
        _ticket_high_s,
        _ticket_altered,
        _requester_zero,
        _no_replicas,
        _too_many_voters,
        _units_above_max,
        _duplicate_voter,
        _price_above_max,
        _award_by_the_worker,
        _award_at_another_price,
        _award_for_another_ticket,
        _outcome_signed_by_other,
        _outcome_of_another_result,
        _outcome_with_more_units,
        _outcome_with_another_profile,
        _outcome_high_s,
        _outcome_garbage,
        _not_staked,
        _below_quorum,
        _no_votes,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_anchor_rejects(c: Chain, case: Callable[[Chain], Case]) -> None:
    fn, error, args = case(c)
    total, deposit = supply(c), escrow(c, c.requester)
    expect_revert(c, c.anchor, fn, c.nodes[0], error, *args)
    assert (supply(c), escrow(c, c.requester)) == (total, deposit)
    assert c.anchor.functions.anchors(task_id_bytes32(f"{1:032x}")).call()[8] == 0


def test_anchor_once_per_task(c: Chain) -> None:
    t, o = ticket(c), outcome()
    task = task_id_bytes32(t.task_id)
    c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), c.nodes[0])
    again = anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3]))
    expect_revert(c, c.anchor, again, c.nodes[1], "AlreadyAnchored", task)
    # Not with another ticket for the same task id either, nor another result.
    t2, o2 = replace(t, nonce=t.nonce + 1), outcome(2, decision=3)
    other = anchor_fn(c, t2, o2, votes(c, t2, o2, c.nodes[2:5]))
    expect_revert(c, c.anchor, other, c.nodes[2], "AlreadyAnchored", task)


def test_unpaid_kinds_settle_with_zero_units(c: Chain) -> None:
    t, o = ticket(c), outcome(units=0)
    total = supply(c)
    receipt = c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:2])), c.nodes[0])
    assert paid(c, receipt) == [(w, split(0)) for w in c.nodes[:2]]
    assert (supply(c), escrow(c, c.requester)) == (total, DEPOSIT)


def test_epoch_mint_cap_across_epochs(c: Chain) -> None:
    a = c.anchor.functions
    mint = split(PRICE * UNITS)["minted"]
    cap = 2 * mint + mint // 2
    receipt = c.send(a.setEpochMintCap(cap), c.admin)
    assert c.events(c.anchor, "EpochMintCapSet", receipt) == [{"epochMintCap": cap}]
    c.travel_to((c.now() // EPOCH + 1) * EPOCH)  # the start of an epoch
    assert a.mintRoom().call() == cap

    def settle(n: int) -> list[int]:
        t, o = ticket(c, n), outcome(n)
        receipt = c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), c.nodes[0])
        got = paid(c, receipt)
        for _, p in got:  # only the mint is capped
            assert {k: v for k, v in p.items() if k != "minted"} == {
                k: v for k, v in split(PRICE * UNITS).items() if k != "minted"
            }
        return [p["minted"] for _, p in got]

    assert settle(1) == [mint, mint, mint // 2]
    assert a.mintRoom().call() == 0
    assert settle(2) == [0, 0, 0]
    epoch = c.now() // EPOCH
    assert a.mintEpoch().call() == epoch and a.mintedInEpoch().call() == cap
    c.travel_to((epoch + 1) * EPOCH)  # the next epoch: a full cap again
    assert a.mintRoom().call() == cap
    assert settle(3) == [mint, mint, mint // 2]
    assert a.mintEpoch().call() == epoch + 1


def test_mint_stops_at_max_supply(c: Chain) -> None:
    c.send(c.token.functions.mint(c.outsider, MAX_SUPPLY - supply(c) - 100), c.admin)
    t, o = ticket(c), outcome()
    receipt = c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), c.nodes[0])
    assert [p["minted"] for _, p in paid(c, receipt)] == [100, 0, 0]
    assert supply(c) == MAX_SUPPLY - 3 * split(PRICE * UNITS)["burned"]


# ---- TaskAnchor: slashing ----


def _deterministic_anchor(c: Chain, n: int = 1, **change: Any) -> tuple[Ticket, Outcome]:
    """Anchors a deterministic supermajority of PROFILE by nodes 0-2 for task ``n``."""
    t = ticket(c, n, deterministic=True, replicas=4)
    o = outcome(n, decision=3, profile=PROFILE, **change)
    c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), c.nodes[0])
    return t, o


def test_slash_needs_the_nodes_own_result_signature(c: Chain) -> None:
    a, s = c.anchor.functions, c.staking.functions
    cheat, other = c.nodes[3], c.nodes[4]
    t = ticket(c, deterministic=True, replicas=4)
    task, wrong = task_id_bytes32(t.task_id), result(99)
    early = a.slash(task, cheat, wrong, result_sig(c, cheat, t, wrong))
    expect_revert(c, c.anchor, early, c.outsider, "NotAnchored", task)
    t, o = _deterministic_anchor(c)

    def refused(node: str, result_hash: bytes, sig: bytes, error: str, *args: Any) -> None:
        expect_revert(c, c.anchor, a.slash(task, node, result_hash, sig), c.outsider, error, *args)

    refused(cheat, o.result_hash, result_sig(c, cheat, t, o.result_hash), "SameResult")
    refused(cheat, wrong, result_sig(c, other, t, wrong), "BadSignature", cheat)
    refused(cheat, wrong, result_sig(c, cheat, t, result(98)), "BadSignature", cheat)
    # An honest node of another numeric profile signed its own profile: never slashable.
    refused(cheat, wrong, result_sig(c, cheat, t, wrong, OTHER_PROFILE), "BadSignature", cheat)
    refused(cheat, wrong, result_sig(c, cheat, ticket(c, 2), wrong), "BadSignature", cheat)
    refused(cheat, wrong, malleable(result_sig(c, cheat, t, wrong)), "BadSignature", cheat)
    refused(c.unstaked, wrong, result_sig(c, c.unstaked, t, wrong), "NothingToSlash", c.unstaked)

    reserve, total = balance(c, c.reserve), supply(c)
    receipt = c.send(a.slash(task, cheat, wrong, result_sig(c, cheat, t, wrong)), c.outsider)
    assert c.events(c.anchor, "Slashed", receipt) == [
        {"taskId": task, "node": cheat, "amount": SLASH}
    ]
    assert s.stakeOf(cheat).call() == STAKE - SLASH and a.slashed(task, cheat).call()
    assert balance(c, c.reserve) == reserve + SLASH // 2
    assert supply(c) == total - SLASH // 2
    # Once per node and task, whatever other wrong result it signed.
    refused(cheat, wrong, result_sig(c, cheat, t, wrong), "AlreadySlashed", task, cheat)
    refused(cheat, result(97), result_sig(c, cheat, t, result(97)), "AlreadySlashed", task, cheat)

    # Pending stake is still slashable; the slash takes at most what there is.
    c.send(s.requestUnstake(STAKE - SLASH), cheat)
    c.send(a.setSlashAmount(10 * STAKE), c.admin)
    t2, _ = _deterministic_anchor(c, 2)
    task2 = task_id_bytes32(t2.task_id)
    receipt = c.send(a.slash(task2, cheat, wrong, result_sig(c, cheat, t2, wrong)), c.outsider)
    assert c.events(c.anchor, "Slashed", receipt)[0]["amount"] == STAKE - SLASH
    assert s.slashableOf(cheat).call() == 0


def test_slash_only_for_a_deterministic_supermajority_with_a_profile(c: Chain) -> None:
    a = c.anchor.functions
    wrong, cheat = result(99), c.nodes[3]
    cases = [
        (ticket(c, 1), outcome(1, decision=3, profile=PROFILE)),  # not deterministic
        (ticket(c, 2, deterministic=True), outcome(2, decision=2, profile=PROFILE)),  # majority
        (ticket(c, 3, deterministic=True), outcome(3, decision=3)),  # no profile
    ]
    for t, o in cases:
        c.send(anchor_fn(c, t, o, votes(c, t, o, c.nodes[:3])), c.nodes[0])
        task = task_id_bytes32(t.task_id)
        sig = result_sig(c, cheat, t, wrong, o.profile)
        expect_revert(c, c.anchor, a.slash(task, cheat, wrong, sig), cheat, "NotSlashable", task)
    # A slash amount of 0 switches slashing off.
    t, _ = _deterministic_anchor(c, 4)
    task = task_id_bytes32(t.task_id)
    c.send(a.setSlashAmount(0), c.admin)
    sig = result_sig(c, cheat, t, wrong)
    expect_revert(c, c.anchor, a.slash(task, cheat, wrong, sig), cheat, "NotSlashable", task)
    assert c.staking.functions.stakeOf(cheat).call() == STAKE


# ---- TaskAnchor: parameters ----


def test_parameter_setters_are_admin_only_with_events(c: Chain) -> None:
    a = c.anchor.functions
    assert (a.slashAmount().call(), a.feeBps().call(), a.burnBps().call(), a.mintBps().call(),
            a.epochLength().call(), a.epochMintCap().call(),
            a.withdrawDelay().call()) == PARAMS  # fmt: skip
    changes = [
        (a.setSlashAmount(7), "SlashAmountSet", {"slashAmount": 7}),
        (a.setFees(100, 2000, 1999), "FeesSet", {"feeBps": 100, "burnBps": 2000, "mintBps": 1999}),
        (a.setEpochMintCap(5), "EpochMintCapSet", {"epochMintCap": 5}),
        (a.setEpochLength(60), "EpochLengthSet", {"epochLength": 60}),
        (a.setWithdrawDelay(0), "WithdrawDelaySet", {"withdrawDelay": 0}),
    ]
    for fn, event, args in changes:
        who = c.nodes[0]
        expect_revert(c, c.anchor, fn, who, "AccessControlUnauthorizedAccount", who, bytes(32))
        assert c.events(c.anchor, event, c.send(fn, c.admin)) == [args]
    assert (a.slashAmount().call(), a.feeBps().call(), a.burnBps().call(), a.mintBps().call(),
            a.epochLength().call(), a.epochMintCap().call(),
            a.withdrawDelay().call()) == (7, 100, 2000, 1999, 60, 5, 0)  # fmt: skip

    # mintBps < burnBps (settling with oneself always loses), feeBps + burnBps <= 10000.
    for fees in [(0, 1000, 1000), (0, 1000, 1001), (0, 0, 0), (9001, 1000, 0), (0, 10001, 0)]:
        expect_revert(c, c.anchor, a.setFees(*fees), c.admin, "BadFees", *fees)
    c.send(a.setFees(0, 10_000, 9_999), c.admin)
    c.send(a.setFees(9_999, 1, 0), c.admin)
    expect_revert(c, c.anchor, a.setEpochLength(0), c.admin, "BadEpochLength")

    # The constructor checks the same.
    ta = artifact("TaskAnchor")
    factory = c.w3.eth.contract(abi=ta["abi"], bytecode=ta["bytecode"])
    for params, error in [((SLASH, 0, 500, 500, EPOCH, 0, 0), "BadFees"),
                          ((SLASH, 0, 500, 0, 0, 0, 0), "BadEpochLength")]:  # fmt: skip
        ctor = factory.constructor(c.token.address, c.staking.address, c.admin, NETWORK, params)
        with pytest.raises(TransactionFailed) as info:
            ctor.transact({"from": c.admin})
        revert = revert_from(info.value)
        assert revert is not None and revert.name == error


# ---- TaskAnchor: the v1 exploits, refused ----
#
# Each test below is an attack that succeeded on TaskAnchor v1 (commit 939beb7), whose
# voters signed only (task, result, model, decision) and whose caller supplied the replica
# count, the reward, the outvoted list and the split. tests/test_contracts_v1.py runs each
# attack against the v1 artifacts and asserts that it succeeds there.


def holdings(c: Chain, addresses: list[str]) -> int:
    """Every VCOIN the addresses hold: balances, deposits (available and pending) and stakes
    (active and pending)."""
    s = c.staking.functions
    return sum(balance(c, x) + escrow(c, x) + s.slashableOf(x).call() for x in addresses)


def test_exploit_self_anchor(c: Chain) -> None:
    """v1: one staked node invented a task id, signed the outcome alone, claimed one replica
    and a reward up to maxReward, and listed three honest stakers as outvoted: it minted
    itself the reward and had them slashed. v2: without a requester's ticket nothing
    settles; with a ticket of its own and no deposit nothing is paid and nobody is slashed;
    with its own deposit it pays itself and loses VCOIN."""
    a, s = c.anchor.functions, c.staking.functions
    attacker, victims = c.nodes[0], c.nodes[1:4]
    huge = 10**24  # a million VCOIN per token

    # A real requester's deposit is out of reach: the ticket needs its signature.
    t, o = ticket(c, 1, replicas=1, max_price=huge), outcome(1, units=MAX_TOKENS)
    forged = [vote(c, t, o, attacker, huge, awarder=attacker)]
    fn = anchor_fn(c, t, o, forged, tsig=ticket_sig(c, t, signer=attacker))
    expect_revert(c, c.anchor, fn, attacker, "BadTicket")

    # Its own ticket, no deposit: the anchor stands, but pays and mints nothing.
    t = ticket(c, 2, requester=attacker, replicas=1, deterministic=True, max_price=huge)
    o = outcome(2, decision=3, units=MAX_TOKENS, profile=PROFILE)
    task = task_id_bytes32(t.task_id)
    everyone = [attacker, *victims, c.reserve, c.requester]
    before, total = [balance(c, x) for x in everyone], supply(c)
    receipt = c.send(anchor_fn(c, t, o, [vote(c, t, o, attacker, huge)]), attacker)
    assert paid(c, receipt) == [(attacker, split(0))]
    assert c.events(c.anchor, "Underfunded", receipt) == [
        {"taskId": task, "requester": attacker, "short": huge * MAX_TOKENS}
    ]
    assert [balance(c, x) for x in everyone] == before and supply(c) == total
    # The honest stakers never signed a Result for this task: none can be slashed.
    for victim in victims:
        sig = result_sig(c, attacker, t, result(666))
        fn = a.slash(task, victim, result(666), sig)
        expect_revert(c, c.anchor, fn, attacker, "BadSignature", victim)
        assert s.stakeOf(victim).call() == STAKE

    # Its own deposit: it pays itself price x units and loses burn + fee - mint of it.
    c.send(c.token.functions.approve(c.anchor.address, 100 * E18), attacker)
    c.send(a.deposit(100 * E18), attacker)
    start = holdings(c, [attacker])
    t = ticket(c, 3, requester=attacker, replicas=1, max_price=10**17)
    o = outcome(3, units=MAX_TOKENS)
    c.send(anchor_fn(c, t, o, [vote(c, t, o, attacker, 10**17)]), attacker)
    gross = 10**17 * MAX_TOKENS  # the whole deposit
    assert start - holdings(c, [attacker]) == gross * (BURN_BPS + FEE_BPS - MINT_BPS) // 10_000


def test_exploit_mass_slash_of_non_voters(c: Chain) -> None:
    """v1: whoever anchored a deterministic supermajority (as one of its voters) could list
    any staked address as outvoted, and each lost slashAmount. v2: a slash needs the
    victim's own Result signature over another result with the anchored profile."""
    a, s = c.anchor.functions, c.staking.functions
    attacker = c.nodes[0]
    t = ticket(c, requester=attacker, replicas=1, deterministic=True)
    o = outcome(decision=3, units=0, profile=PROFILE)
    c.send(anchor_fn(c, t, o, [vote(c, t, o, attacker)]), attacker)
    task, wrong = task_id_bytes32(t.task_id), result(13)
    reserve, total = balance(c, c.reserve), supply(c)
    for victim in [*c.nodes[1:], c.unstaked]:
        attempts = [
            b"",
            bytes(65),
            result_sig(c, attacker, t, wrong),  # the attacker's word
            result_sig(c, victim, ticket(c, 2), wrong),  # the victim's Result for another task
            result_sig(c, victim, t, wrong, OTHER_PROFILE),  # ... of its own profile
        ]
        for sig in attempts:
            fn = a.slash(task, victim, wrong, sig)
            expect_revert(c, c.anchor, fn, attacker, "BadSignature", victim)
        # Its Result agreeing with the anchor is no evidence either.
        fn = a.slash(task, victim, o.result_hash, result_sig(c, victim, t, o.result_hash))
        expect_revert(c, c.anchor, fn, attacker, "SameResult")
    assert [s.stakeOf(n).call() for n in c.nodes] == [STAKE] * 5
    assert (balance(c, c.reserve), supply(c)) == (reserve, total)


def test_exploit_front_run_cannot_change_payouts(c: Chain) -> None:
    """v1: anyone holding the gossiped signatures could anchor first with reward = 0 (or its
    own split), and the voters got nothing. v2: every payout is fixed by the signed ticket,
    awards and outcome: the same data anchored from another sender pays the same, and a
    vote left out is only delayed (claim)."""
    t, o = ticket(c), outcome()
    workers = c.nodes[:3]
    vs = [vote(c, t, o, w, p) for w, p in zip(workers, [PRICE, PRICE + 1, MAX_PRICE],
                                               strict=True)]  # fmt: skip
    watch = [*workers, c.reserve, c.requester, c.outsider, c.anchor.address]

    def state() -> tuple[Any, ...]:
        return ([balance(c, x) for x in watch], supply(c),
                c.anchor.functions.depositOf(c.requester).call())  # fmt: skip

    fork = c.tester.take_snapshot()
    c.send(anchor_fn(c, t, o, vs), workers[0])  # the voters' own anchor
    honest = state()
    c.tester.revert_to_snapshot(fork)

    c.send(anchor_fn(c, t, o, vs), c.outsider)  # the same data, front-run
    assert state() == honest
    c.tester.revert_to_snapshot(fork)

    c.send(anchor_fn(c, t, o, vs[:2]), c.outsider)  # front-run, leaving a vote out
    task = task_id_bytes32(t.task_id)
    expect_revert(c, c.anchor, anchor_fn(c, t, o, vs), workers[0], "AlreadyAnchored", task)
    c.send(c.anchor.functions.claim(t.values(), vs[2]), workers[2])
    assert state() == honest

    # And nobody is paid twice.
    expect_revert(c, c.anchor, c.anchor.functions.claim(t.values(), vs[2]), c.outsider,
                  "AlreadyPaid", task, workers[2])  # fmt: skip


def test_exploit_replay_on_another_chain_deployment_or_network(c: Chain) -> None:
    """v1's domain was keccak256("vcoin-outcome:v1:" + network): two deployments with the
    same network name, on one chain or two, accepted each other's signatures. v2 signs under
    the EIP-712 domain (name "VCoin:" + network, version, chain id, TaskAnchor address)."""
    second = deploy_anchor(c)
    first = c.domain()
    here = c.domain(second)
    assert bytes(second.functions.domainSeparator().call()) == here.separator()
    t, o = ticket(c), outcome()
    workers = c.nodes[:3]
    vs, tsig = votes(c, t, o, workers, d=first), ticket_sig(c, t, d=first)

    # The first deployment's signatures on the second: the ticket, then each award, then
    # each outcome fails to recover.
    def refused(fn: Any, error: str, *args: Any) -> None:
        expect_revert(c, second, fn, workers[0], error, *args)

    refused(anchor_fn(c, t, o, vs, tsig=tsig, anchor=second), "BadTicket")
    refused(anchor_fn(c, t, o, vs, anchor=second), "BadAward", workers[0])
    mixed = [(w, p, vote(c, t, o, w, d=here)[2], sig) for w, p, _, sig in vs]
    refused(anchor_fn(c, t, o, mixed, anchor=second), "BadSignature", workers[0])

    # Signed for another chain id or another network name: refused here.
    for other in (c.domain(chain_id=c.w3.eth.chain_id + 1), c.domain(network="testnet")):
        vs_other, tsig_other = votes(c, t, o, workers, d=other), ticket_sig(c, t, d=other)
        fn = anchor_fn(c, t, o, vs_other, tsig=tsig_other)
        expect_revert(c, c.anchor, fn, workers[0], "BadTicket")
        fn = anchor_fn(c, t, o, vs_other)
        expect_revert(c, c.anchor, fn, workers[0], "BadAward", workers[0])
    # A deployment for another network on this chain refuses devnet's signatures.
    testnet = deploy_anchor(c, "testnet")
    assert (
        bytes(testnet.functions.domainSeparator().call())
        == Domain("testnet", c.w3.eth.chain_id, testnet.address).separator()
    )
    fn = anchor_fn(c, t, o, vs, tsig=tsig, anchor=testnet)
    expect_revert(c, testnet, fn, workers[0], "BadTicket")

    # Each deployment takes its own signatures (and pays from its own escrow only).
    c.send(anchor_fn(c, t, o, vs, tsig=tsig), workers[0])
    receipt = c.send(anchor_fn(c, t, o, votes(c, t, o, workers, d=here), anchor=second),
                     workers[0])  # fmt: skip
    assert paid(c, receipt, second) == [(w, split(0)) for w in workers]


def test_exploit_two_peer_ids_behind_one_address(c: Chain) -> None:
    """v1 took the replica count from the caller, so a node running two peer ids behind one
    key (2 of 3 replicas) could anchor alone by claiming fewer replicas. v2: one address
    votes once (DuplicateVoter) and counts once against the ticket's replicas."""
    t, o = ticket(c, replicas=3), outcome()
    node = c.nodes[0]
    v = vote(c, t, o, node)
    expect_revert(c, c.anchor, anchor_fn(c, t, o, [v, v]), node, "DuplicateVoter", node)
    expect_revert(c, c.anchor, anchor_fn(c, t, o, [v]), node, "BelowQuorum", 1, 3)


def test_exploit_quorum_from_the_ticket(c: Chain) -> None:
    """v1: the caller passed `replicas`, so one voter anchored a 3-replica task by claiming
    replicas = 1. v2: the quorum comes from the requester's signed ticket."""
    t, o = ticket(c, replicas=3), outcome()
    node = c.nodes[0]
    expect_revert(c, c.anchor, anchor_fn(c, t, o, [vote(c, t, o, node)]), node, "BelowQuorum", 1, 3)
    fewer = replace(t, replicas=1)  # not what the requester signed
    fn = anchor_fn(c, fewer, o, [vote(c, fewer, o, node)], tsig=ticket_sig(c, t))
    expect_revert(c, c.anchor, fn, node, "BadTicket")
    assert c.anchor.functions.anchors(task_id_bytes32(t.task_id)).call()[8] == 0


def test_exploit_self_dealing_loop(c: Chain) -> None:
    """v1: a node could anchor its own invented tasks again and again, minting up to
    maxReward each time. v2: an attacker with a requester deposit and its own staked workers
    pays itself from its own deposit; every task burns burnBps and pays feeBps of the price
    and mints back only mintBps < burnBps: 100 tasks later it holds less."""
    tok, a = c.token.functions, c.anchor.functions
    requester, workers = c.unstaked, c.nodes[2:5]
    mine = [requester, *workers]
    gross = MAX_PRICE * MAX_TOKENS  # per worker per task
    c.send(tok.approve(c.anchor.address, 300 * gross), requester)
    c.send(a.deposit(300 * gross), requester)
    start, total = holdings(c, mine), supply(c)
    for n in range(100):
        t = ticket(c, 100 + n, requester=requester)
        o = outcome(100 + n, units=MAX_TOKENS)
        vs = [vote(c, t, o, w, MAX_PRICE) for w in workers]
        c.send(anchor_fn(c, t, o, vs), workers[n % 3], gas=1_000_000)
    end = holdings(c, mine)
    assert end < start
    assert start - end == 300 * gross * (BURN_BPS + FEE_BPS - MINT_BPS) // 10_000
    assert supply(c) - total == 300 * gross * (MINT_BPS - BURN_BPS) // 10_000  # deflation
    assert escrow(c, requester) == 0


# ---- Governance ----


def _propose_slash_change(c: Chain, proposer: str, amount: int) -> tuple[int, list[Any]]:
    call = c.anchor.encode_abi("setSlashAmount", [amount])
    description = f"set slashAmount to {amount}"
    args = [[c.anchor.address], [0], [call], description]
    receipt = c.send(c.governor.functions.propose(*args), proposer)
    event = c.events(c.governor, "ProposalCreated", receipt)[0]
    return int(event["proposalId"]), [*args[:3], keccak(text=description)]


def test_governance_propose_vote_queue_execute(c: Chain) -> None:
    g, t = c.governor.functions, c.token.functions
    voter, small = c.nodes[0], c.nodes[1]
    assert g.proposalThreshold().call() == 1000 * E18
    c.send(t.delegate(voter), voter)  # FUNDS - STAKE = 9000 VCOIN of votes
    c.send(t.transfer(c.outsider, 999 * E18), small)
    c.send(t.delegate(c.outsider), c.outsider)
    c.travel(1)  # votes count from the next timepoint

    expect_revert(
        c,
        c.governor,
        g.propose([c.anchor.address], [0], [b""], "too small"),
        c.outsider,
        "GovernorInsufficientProposerVotes",
    )
    pid, qargs = _propose_slash_change(c, voter, 99 * E18)
    assert g.state(pid).call() == 0  # Pending
    expect_revert(c, c.governor, g.castVote(pid, 1), voter, "GovernorUnexpectedProposalState")

    c.travel_to(g.proposalSnapshot(pid).call() + 1)
    assert g.state(pid).call() == 1  # Active
    c.send(g.castVote(pid, 1), voter)
    c.send(g.castVote(pid, 0), c.outsider)
    snapshot = g.proposalSnapshot(pid).call()
    assert g.quorum(snapshot).call() == t.getPastTotalSupply(snapshot).call() * 4 // 100
    assert g.proposalVotes(pid).call() == [999 * E18, (FUNDS - STAKE), 0]  # against, for, abstain

    c.travel_to(g.proposalDeadline(pid).call() + 1)
    assert g.state(pid).call() == 4  # Succeeded
    c.send(g.queue(*qargs), c.outsider)
    assert g.state(pid).call() == 5  # Queued
    expect_revert(c, c.timelock, g.execute(*qargs), c.outsider, "TimelockUnexpectedOperationState")
    c.travel(TIMELOCK_DELAY)
    c.send(g.execute(*qargs), c.outsider)
    assert g.state(pid).call() == 7  # Executed
    assert c.anchor.functions.slashAmount().call() == 99 * E18


def test_governance_tokens_moved_after_snapshot_do_not_vote_twice(c: Chain) -> None:
    g, t = c.governor.functions, c.token.functions
    voter = c.nodes[0]
    c.send(t.delegate(voter), voter)
    c.send(t.delegate(c.outsider), c.outsider)  # holds nothing at the snapshot
    c.travel(1)
    pid, _ = _propose_slash_change(c, voter, 1)
    c.travel_to(g.proposalSnapshot(pid).call() + 1)

    c.send(g.castVote(pid, 1), voter)
    votes = g.proposalVotes(pid).call()
    c.send(t.transfer(c.outsider, FUNDS - STAKE), voter)
    assert t.getVotes(c.outsider).call() == FUNDS - STAKE
    c.send(g.castVote(pid, 1), c.outsider)  # counted with its weight at the snapshot: 0
    assert g.proposalVotes(pid).call() == votes
    expect_revert(c, c.governor, g.castVote(pid, 1), voter, "GovernorAlreadyCastVote", voter)


# ---- Artifacts ----


def test_artifacts_match_a_fresh_compile(tmp_path: Path) -> None:
    package = json.loads((CONTRACTS / "package.json").read_text())
    pins = package["dependencies"]
    assert all(v[0].isdigit() for v in pins.values()), f"pin exact versions: {pins}"
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: cannot recompile the contracts (CI has them)")
    installed = CONTRACTS / "node_modules" / "solc" / "package.json"
    if not installed.exists():
        pytest.fail(
            "contracts/node_modules is missing: run `make install` (npm ci --prefix contracts)"
        )
    assert json.loads(installed.read_text())["version"] == pins["solc"], "run npm ci in contracts/"

    subprocess.run(
        [node, str(CONTRACTS / "build.js"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    fresh = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    committed = {p.name: json.loads(p.read_text()) for p in ARTIFACTS.glob("*.json")}
    assert sorted(fresh) == sorted(committed)
    for name, want in fresh.items():
        have = committed[name]
        assert have["abi"] == want["abi"], f"{name}: ABI differs, run `make contracts`"
        assert have["bytecode"] == want["bytecode"], (
            f"{name}: bytecode differs, run `make contracts`"
        )
        assert have["deployedBytecode"] == want["deployedBytecode"], name
        assert have["compiler"] == want["compiler"] and have["settings"] == want["settings"], name
