"""The Solidity contracts on the in-process EVM (web3 + eth-tester + py-evm).

Deploys the committed artifacts in ``contracts/artifacts`` once per module; every test runs
on a chain snapshot that is reverted afterwards. Anchor signatures are made by
``vcoind.consensus.outcome``, so the Python and Solidity encodings of an outcome must agree.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from vcoind.consensus.outcome import (
    DECISION_CODES,
    model_id_bytes32,
    outcome_digest,
    sign_outcome,
    task_id_bytes32,
)

CONTRACTS = Path(__file__).resolve().parent.parent / "contracts"
ARTIFACTS = CONTRACTS / "artifacts"
NETWORK = "devnet"
E18 = 10**18
MAX_SUPPLY = 1_000_000_000 * E18
UNSTAKE_DELAY = 3600
MIN_STAKE = 100 * E18
STAKE = 1000 * E18
FUNDS = 10_000 * E18
REWARD = 30 * E18
SLASH = 50 * E18
VOTING_DELAY = 10
VOTING_PERIOD = 300
TIMELOCK_DELAY = 60
MODEL = "sha256:" + hashlib.sha256(b"test model weights").hexdigest()
ZERO = "0x0000000000000000000000000000000000000000"


def artifact(name: str) -> dict[str, Any]:
    return json.loads((ARTIFACTS / f"{name}.json").read_text())


@dataclass
class Chain:
    w3: Web3
    tester: Any
    keys: dict[str, bytes]  # address -> private key
    admin: str
    reserve: str
    nodes: list[str]  # staked with STAKE
    unstaked: str  # funded, not staked
    outsider: str  # no tokens
    token: Contract
    staking: Contract
    anchor: Contract
    timelock: Contract
    governor: Contract

    def send(self, fn: Any, sender: str) -> Any:
        receipt = self.w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender}))
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


@pytest.fixture(scope="module")
def deployed() -> Chain:
    w3 = Web3(EthereumTesterProvider())
    tester = w3.provider.ethereum_tester
    keys = {k.public_key.to_checksum_address(): k.to_bytes() for k in tester.backend.account_keys}
    admin, reserve, *rest = w3.eth.accounts
    nodes, unstaked, outsider = list(rest[:5]), rest[5], rest[6]

    token = deploy(w3, "VCoin", admin, admin)
    staking = deploy(w3, "Staking", admin, token.address, admin, reserve, UNSTAKE_DELAY, MIN_STAKE)
    anchor = deploy(w3, "TaskAnchor", admin, token, staking, admin, NETWORK, REWARD, SLASH)
    timelock = deploy(w3, "VCoinTimelock", admin, TIMELOCK_DELAY, [], [ZERO], admin)
    governor = deploy(w3, "VCoinGovernor", admin, token, timelock, VOTING_DELAY, VOTING_PERIOD)
    contracts = (token, staking, anchor, timelock, governor)
    c = Chain(w3, tester, keys, admin, reserve, nodes, unstaked, outsider, *contracts)

    # The roles README.md lists, plus MINTER_ROLE for the admin to fund the nodes.
    t, s, tl = token.functions, staking.functions, timelock.functions
    c.send(t.grantRole(t.MINTER_ROLE().call(), anchor.address), admin)
    c.send(t.grantRole(t.MINTER_ROLE().call(), admin), admin)
    c.send(t.grantRole(t.BURNER_ROLE().call(), staking.address), admin)
    c.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address), admin)
    c.send(tl.grantRole(tl.PROPOSER_ROLE().call(), governor.address), admin)
    c.send(tl.grantRole(tl.CANCELLER_ROLE().call(), governor.address), admin)
    c.send(anchor.functions.grantRole(bytes(32), timelock.address), admin)
    for node in [*nodes, unstaked]:
        c.send(t.mint(node, FUNDS), admin)
    for node in nodes:
        c.send(t.approve(staking.address, STAKE), node)
        c.send(s.stake(STAKE), node)
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


# ---- TaskAnchor ----


@dataclass
class Outcome:
    task_id: str
    result_hash: bytes
    decision: str

    def digest(self) -> bytes:
        return outcome_digest(NETWORK, self.task_id, self.result_hash, MODEL, self.decision)


def outcome(n: int = 1, decision: str = "majority") -> Outcome:
    return Outcome(f"{n:032x}", hashlib.sha256(f"answer {n}".encode()).digest(), decision)


def anchor_call(
    c: Chain,
    o: Outcome,
    voters: list[str],
    *,
    signers: list[str] | None = None,
    sigs: list[bytes] | None = None,
    replicas: int | None = None,
    outvoted: tuple[str, ...] = (),
    deterministic: bool = False,
    reward: int = REWARD,
    shares: tuple[int, ...] = (),
) -> Any:
    """``TaskAnchor.anchor`` for ``o``, signed by ``signers`` (default: the voters)."""
    if sigs is None:
        sigs = [sign_outcome(c.keys[s], o.digest()) for s in (signers or voters)]
    return c.anchor.functions.anchor(
        task_id_bytes32(o.task_id),
        o.result_hash,
        model_id_bytes32(MODEL),
        DECISION_CODES[o.decision],
        voters,
        sigs,
        (len(voters) if replicas is None else replicas, deterministic, reward, list(outvoted),
         list(shares)),
    )  # fmt: skip


def test_outcome_digest_matches_python(c: Chain) -> None:
    o = outcome(7, "supermajority")
    onchain = c.anchor.functions.outcomeDigest(
        task_id_bytes32(o.task_id), o.result_hash, model_id_bytes32(MODEL), 3
    ).call()
    assert bytes(onchain) == o.digest()
    assert c.anchor.functions.network().call() == NETWORK


def test_anchor_happy_path_mints_rewards(c: Chain) -> None:
    voters = c.nodes[:3]
    before = [balance(c, v) for v in voters]
    o = outcome(1, "majority")
    receipt = c.send(anchor_call(c, o, voters, replicas=5), c.nodes[0])

    ev = c.events(c.anchor, "Anchored", receipt)[0]
    task = task_id_bytes32(o.task_id)
    assert (ev["taskId"], ev["resultHash"], ev["decision"], ev["voterCount"]) == (
        task,
        o.result_hash,
        2,
        3,
    )
    assert ev["modelId"] == model_id_bytes32(MODEL)
    stored = c.anchor.functions.anchors(task).call()
    assert stored == [o.result_hash, model_id_bytes32(MODEL), 2, receipt["blockNumber"], 3]

    rewarded = c.events(c.anchor, "Rewarded", receipt)
    assert [(r["voter"], r["amount"]) for r in rewarded] == [(v, REWARD // 3) for v in voters]
    assert [balance(c, v) - b for v, b in zip(voters, before, strict=True)] == [REWARD // 3] * 3
    assert c.anchor.functions.anchors(task_id_bytes32(outcome(2).task_id)).call()[3] == 0


def test_anchor_splits_the_reward_by_shares(c: Chain) -> None:
    """LoRA training: each voter's part of the reward in proportion to its samples."""
    voters = c.nodes[:3]
    before = [balance(c, v) for v in voters]
    receipt = c.send(anchor_call(c, outcome(7), voters, shares=(27, 24, 9)), c.nodes[0])
    got = [(r["voter"], r["amount"]) for r in c.events(c.anchor, "Rewarded", receipt)]
    want = [REWARD * 27 // 60, REWARD * 24 // 60, REWARD * 9 // 60]
    assert got == list(zip(voters, want, strict=True))
    assert [balance(c, v) - b for v, b in zip(voters, before, strict=True)] == want


def _shares_mismatch(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(), c.nodes[:3], shares=(1, 2)), "BadShares", (2, 3)


def _zero_shares(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(), c.nodes[:2], shares=(0, 0)), "BadShares", (0, 2)


def _wrong_signer(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = c.nodes[:3]
    return anchor_call(c, outcome(), v, signers=[v[0], v[2], v[2]]), "BadSignature", (v[1],)


def _other_outcome_signed(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = c.nodes[:3]
    sigs = [sign_outcome(c.keys[s], outcome(2).digest()) for s in v]
    return anchor_call(c, outcome(1), v, sigs=sigs), "BadSignature", (v[0],)


def _garbage_signature(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = c.nodes[:1]
    return anchor_call(c, outcome(), v, sigs=[b"\x01" * 64]), "BadSignature", (v[0],)


def _not_staked(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = [c.nodes[0], c.unstaked, c.nodes[1]]
    return anchor_call(c, outcome(), v), "NotStaked", (c.unstaked,)


def _duplicate(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = [c.nodes[0], c.nodes[1], c.nodes[0]]
    return anchor_call(c, outcome(), v, replicas=3), "DuplicateVoter", (c.nodes[0],)


def _below_quorum(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(), c.nodes[:2], replicas=4), "BelowQuorum", (2, 4)


def _bad_decision(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(1, "tie"), c.nodes[:3]), "BadDecision", (1,)


def _no_decision(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(1, "none"), c.nodes[:3]), "BadDecision", (0,)


def _no_replicas(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    return anchor_call(c, outcome(), c.nodes[:1], replicas=0), "BadReplicas", (0,)


def _length_mismatch(c: Chain) -> tuple[Any, str, tuple[Any, ...]]:
    v = c.nodes[:2]
    sigs = [sign_outcome(c.keys[v[0]], outcome().digest())]
    return anchor_call(c, outcome(), v, sigs=sigs), "LengthMismatch", (2, 1)


@pytest.mark.parametrize(
    "case",
    [
        _wrong_signer,
        _other_outcome_signed,
        _garbage_signature,
        _not_staked,
        _duplicate,
        _below_quorum,
        _bad_decision,
        _no_decision,
        _no_replicas,
        _length_mismatch,
        _shares_mismatch,
        _zero_shares,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_anchor_rejects(
    c: Chain, case: Callable[[Chain], tuple[Any, str, tuple[Any, ...]]]
) -> None:
    fn, error, args = case(c)
    supply = c.token.functions.totalSupply().call()
    expect_revert(c, c.anchor, fn, c.nodes[0], error, *args)
    assert c.token.functions.totalSupply().call() == supply


def test_anchor_replay_reverts(c: Chain) -> None:
    o = outcome(3)
    c.send(anchor_call(c, o, c.nodes[:3]), c.nodes[0])
    task = task_id_bytes32(o.task_id)
    expect_revert(c, c.anchor, anchor_call(c, o, c.nodes[:3]), c.nodes[1], "AlreadyAnchored", task)
    # Not even with a different result or other signers.
    other = Outcome(o.task_id, hashlib.sha256(b"other").digest(), "supermajority")
    expect_revert(
        c, c.anchor, anchor_call(c, other, c.nodes[2:5]), c.nodes[2], "AlreadyAnchored", task
    )


def test_anchor_slashes_outvoted_on_deterministic_supermajority(c: Chain) -> None:
    s, t = c.staking.functions, c.token.functions
    voters, cheat = c.nodes[:3], c.nodes[3]
    outvoted = (cheat, c.unstaked, voters[1])  # unstaked: skipped; a voter: never slashed
    reserve, supply = balance(c, c.reserve), t.totalSupply().call()

    # Not deterministic, or only a majority: the outvoted keep their stake.
    c.send(
        anchor_call(c, outcome(1, "supermajority"), voters, replicas=4, outvoted=outvoted),
        voters[0],
    )
    c.send(
        anchor_call(
            c, outcome(2, "majority"), voters, replicas=4, outvoted=outvoted, deterministic=True
        ),
        voters[0],
    )
    assert s.stakeOf(cheat).call() == STAKE

    # The caller must be one of the signers to slash (the outvoted list is not signed).
    late = anchor_call(
        c, outcome(3, "supermajority"), voters, replicas=4, outvoted=outvoted, deterministic=True
    )
    expect_revert(c, c.anchor, late, c.outsider, "CallerNotVoter", c.outsider)
    dup = anchor_call(
        c,
        outcome(3, "supermajority"),
        voters,
        replicas=4,
        outvoted=(cheat, cheat),
        deterministic=True,
    )
    expect_revert(c, c.anchor, dup, voters[0], "DuplicateOutvoted", cheat)

    receipt = c.send(late, voters[2])
    slashed = c.events(c.anchor, "OutvotedSlashed", receipt)
    assert [(e["node"], e["amount"]) for e in slashed] == [(cheat, SLASH)]
    assert s.stakeOf(cheat).call() == STAKE - SLASH
    assert s.stakeOf(voters[1]).call() == STAKE
    assert balance(c, c.reserve) == reserve + SLASH // 2
    assert t.totalSupply().call() == supply + 3 * (REWARD // 3) * 3 - SLASH // 2


def test_anchor_reward_is_the_callers_figure_capped_at_max_reward(c: Chain) -> None:
    voters = c.nodes[:2]
    small = c.send(anchor_call(c, outcome(1), voters, reward=7 * E18 + 1), voters[0])
    assert [r["amount"] for r in c.events(c.anchor, "Rewarded", small)] == [7 * E18 // 2] * 2
    big = c.send(anchor_call(c, outcome(2), voters, reward=10 * REWARD), voters[0])
    assert [r["amount"] for r in c.events(c.anchor, "Rewarded", big)] == [REWARD // 2] * 2
    none = c.send(anchor_call(c, outcome(3), voters, reward=0), voters[0])
    assert c.events(c.anchor, "Rewarded", none) == []


def test_anchor_admin_settings(c: Chain) -> None:
    a = c.anchor.functions
    expect_revert(c, c.anchor, a.setMaxReward(1), c.nodes[0], "AccessControlUnauthorizedAccount")
    c.send(a.setMaxReward(0), c.admin)
    c.send(a.setSlashAmount(7), c.admin)
    assert (a.maxReward().call(), a.slashAmount().call()) == (0, 7)
    receipt = c.send(anchor_call(c, outcome(), c.nodes[:2]), c.nodes[0])
    assert c.events(c.anchor, "Rewarded", receipt) == []


# ---- Governance ----


def _propose_reward_change(c: Chain, proposer: str, reward: int) -> tuple[int, list[Any]]:
    call = c.anchor.encode_abi("setMaxReward", [reward])
    description = f"set maxReward to {reward}"
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
    pid, qargs = _propose_reward_change(c, voter, 99 * E18)
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
    assert c.anchor.functions.maxReward().call() == 99 * E18


def test_governance_tokens_moved_after_snapshot_do_not_vote_twice(c: Chain) -> None:
    g, t = c.governor.functions, c.token.functions
    voter = c.nodes[0]
    c.send(t.delegate(voter), voter)
    c.send(t.delegate(c.outsider), c.outsider)  # holds nothing at the snapshot
    c.travel(1)
    pid, _ = _propose_reward_change(c, voter, 1)
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
