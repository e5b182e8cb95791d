"""Settlement v1's exploits, reproduced: each one succeeds on the v1 contracts.

Issue 21 replaced TaskAnchor v1 because of these attacks; ``tests/test_contracts.py`` has a
``test_exploit_*`` test showing v2 refuses each. This module deploys the v1 VCoin, Staking
and TaskAnchor (``tests/vectors/contracts_v1``: commit 939beb7's artifacts, nothing
compiled) on the in-process EVM and runs the same attacks against them, asserting the
damage, so the v2 tests are known to test something that was broken. Each v1 test here,
then the v2 test it answers:

- ``test_v1_exploit_self_anchor``: ``test_exploit_self_anchor``
- ``test_v1_exploit_mass_slash_of_non_voters``: ``test_exploit_mass_slash_of_non_voters``
- ``test_v1_exploit_front_run_with_reward_zero``:
  ``test_exploit_front_run_cannot_change_payouts``
- ``test_v1_exploit_replay_on_another_deployment_and_chain``:
  ``test_exploit_replay_on_another_chain_deployment_or_network``
- ``test_v1_exploit_two_peer_ids_behind_one_address``:
  ``test_exploit_two_peer_ids_behind_one_address``
- ``test_v1_exploit_quorum_from_the_caller``: ``test_exploit_quorum_from_the_ticket``
- ``test_v1_exploit_self_dealing_loop``: ``test_exploit_self_dealing_loop`` (v1: the
  attacker ends with more VCOIN; v2: with less)

v1 in short: each voter signed (EIP-191) only
``keccak256(abi.encode(keccak256("vcoin-outcome:v1:" + network), taskId, resultHash,
modelId, uint8 decision))``: no chain id, no contract address, no requester. The caller's
``Claim`` (replicas, deterministic, reward, outvoted, shares) was signed by nobody; the
reward (capped at ``maxReward``) was minted to the voters, and on a deterministic
supermajority every staked address in ``outvoted`` lost ``slashAmount`` if the caller was
one of the voters.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.logs import DISCARD

from vcoind.chain.contracts import error_table, revert_from
from vcoind.consensus.outcome import model_id_bytes32, task_id_bytes32

V1 = Path(__file__).resolve().parent / "vectors" / "contracts_v1"
V1_COMMIT = "939beb7"  # the last commit with the v1 contracts
NETWORK = "devnet"
E18 = 10**18
UNSTAKE_DELAY = 3600
MIN_STAKE = 100 * E18  # the attacker stakes just this
STAKE = 1000 * E18  # each honest node
FUNDS = 10_000 * E18
MAX_REWARD = 100 * E18  # v1's cap on the caller's reward figure, per anchor
REWARD = 30 * E18  # an honest task's reward
SLASH = 50 * E18
MAJORITY, SUPERMAJORITY = 2, 3
GAS = 2_000_000  # a fixed limit: eth-tester's estimate runs each transaction many times
MODEL = "sha256:" + hashlib.sha256(b"test model weights").hexdigest()
MODEL_ID = model_id_bytes32(MODEL)
HUGE = 10**9 * E18  # a reward figure of a billion VCOIN (v1 caps it at MAX_REWARD)


def artifact(name: str) -> dict[str, Any]:
    return json.loads((V1 / f"{name}.json").read_text())


V1_ERRORS = error_table(artifact(n)["abi"] for n in ("VCoin", "Staking", "TaskAnchor"))


@dataclass
class Chain:
    w3: Web3
    tester: Any
    keys: dict[str, bytes]  # address -> private key
    admin: str
    reserve: str
    attacker: str  # MIN_STAKE, all it has, staked
    sybils: list[str]  # two more addresses of the attacker's, MIN_STAKE each, staked
    nodes: list[str]  # honest, STAKE each staked, FUNDS - STAKE in hand
    unstaked: str  # funded, not staked
    outsider: str  # no tokens, no stake
    token: Contract
    staking: Contract
    anchor: Contract

    def send(self, fn: Any, sender: str) -> Any:
        receipt = self.w3.eth.wait_for_transaction_receipt(
            fn.transact({"from": sender, "gas": GAS})
        )
        assert receipt["status"] == 1
        return receipt

    def events(self, name: str, receipt: Any, contract: Contract | None = None) -> list[Any]:
        """The arguments of each ``name`` event of TaskAnchor (or ``contract``) in ``receipt``,
        as tuples."""
        logs = (contract or self.anchor).events[name]().process_receipt(receipt, errors=DISCARD)
        return [tuple(log["args"].values()) for log in logs]

    def deploy_anchor(self, network: str = NETWORK) -> Contract:
        """Another v1 TaskAnchor on this chain's token and staking, with its roles."""
        anchor = deploy(self.w3, self.admin, "TaskAnchor", self.token, self.staking, self.admin,
                        network, MAX_REWARD, SLASH)  # fmt: skip
        self.grant_roles(anchor)
        return anchor

    def grant_roles(self, anchor: Contract) -> None:
        """What v1's TaskAnchor needed: VCoin's MINTER_ROLE, Staking's SLASHER_ROLE."""
        t, s = self.token.functions, self.staking.functions
        self.send(t.grantRole(t.MINTER_ROLE().call(), anchor.address), self.admin)
        self.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address), self.admin)


def deploy(w3: Web3, admin: str, name: str, *args: Any) -> Contract:
    a = artifact(name)
    args = tuple(x.address if isinstance(x, Contract) else x for x in args)
    tx = w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"]).constructor(*args)
    receipt = w3.eth.wait_for_transaction_receipt(tx.transact({"from": admin}))
    return w3.eth.contract(address=receipt["contractAddress"], abi=a["abi"])


def v1_chain(chain_id: int | None = None) -> Chain:
    """A fresh in-process chain with v1's VCoin, Staking and TaskAnchor deployed as
    ``939beb7:tests/test_contracts.py`` did (without governance), the roles v1's README
    listed, the honest nodes and the attacker's addresses staked. ``chain_id``: what the
    EVM's CHAINID returns (eth-tester's ``eth_chainId`` answer stays its default)."""
    backend = PyEVMBackend(genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=11))
    if chain_id is not None:
        backend.chain.chain_id = chain_id
    tester = EthereumTester(backend)
    w3 = Web3(EthereumTesterProvider(tester))
    keys = {k.public_key.to_checksum_address(): k.to_bytes() for k in backend.account_keys}
    admin, reserve, attacker, s1, s2, *rest = w3.eth.accounts
    nodes, unstaked, outsider = list(rest[:4]), rest[4], rest[5]
    token = deploy(w3, admin, "VCoin", admin)
    staking = deploy(w3, admin, "Staking", token, admin, reserve, UNSTAKE_DELAY, MIN_STAKE)
    anchor = deploy(w3, admin, "TaskAnchor", token, staking, admin, NETWORK, MAX_REWARD, SLASH)
    c = Chain(w3, tester, keys, admin, reserve, attacker, [s1, s2], nodes, unstaked, outsider,
              token, staking, anchor)  # fmt: skip
    c.grant_roles(anchor)
    t, s = token.functions, staking.functions
    c.send(t.grantRole(t.MINTER_ROLE().call(), admin), admin)
    c.send(t.grantRole(t.BURNER_ROLE().call(), staking.address), admin)
    mine = [attacker, s1, s2]
    for who in [*nodes, unstaked, *mine]:
        c.send(t.mint(who, MIN_STAKE if who in mine else FUNDS), admin)
    for who in [*nodes, *mine]:
        amount = MIN_STAKE if who in mine else STAKE
        c.send(t.approve(staking.address, amount), who)
        c.send(s.stake(amount), who)
    return c


@pytest.fixture(scope="module")
def deployed() -> Chain:
    return v1_chain()


@pytest.fixture
def c(deployed: Chain) -> Iterator[Chain]:
    snapshot = deployed.tester.take_snapshot()
    yield deployed
    deployed.tester.revert_to_snapshot(snapshot)


# ---- v1's anchor, as a node (or an attacker) called it ----


def task(n: int) -> bytes:
    return task_id_bytes32(f"{n:032x}")


def result(n: int) -> bytes:
    return hashlib.sha256(f"answer {n}".encode()).digest()


def v1_digest(task_id: bytes, result_hash: bytes, decision: int, network: str = NETWORK) -> bytes:
    """What a v1 voter signed (before the EIP-191 prefix): no chain id, no contract."""
    domain = keccak(text="vcoin-outcome:v1:" + network)
    values = [domain, task_id, result_hash, MODEL_ID, decision]
    return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "bytes32", "uint8"], values))


def v1_sigs(
    c: Chain, signers: list[str], task_id: bytes, result_hash: bytes, decision: int
) -> list[bytes]:
    message = encode_defunct(primitive=v1_digest(task_id, result_hash, decision))
    return [bytes(Account.sign_message(message, c.keys[s]).signature) for s in signers]


def anchor_v1(
    c: Chain,
    task_id: bytes,
    result_hash: bytes,
    decision: int,
    voters: list[str],
    *,
    sigs: list[bytes] | None = None,
    replicas: int | None = None,
    deterministic: bool = False,
    reward: int = 0,
    outvoted: tuple[str, ...] = (),
    shares: tuple[int, ...] = (),
    anchor: Contract | None = None,
) -> Any:
    """v1 ``anchor(taskId, resultHash, modelId, decision, voters, signatures, claim)``; the
    claim ``(replicas, deterministic, reward, outvoted, shares)`` is the caller's word."""
    if sigs is None:
        sigs = v1_sigs(c, voters, task_id, result_hash, decision)
    claim = (len(voters) if replicas is None else replicas, deterministic, reward,
             list(outvoted), list(shares))  # fmt: skip
    return (anchor or c.anchor).functions.anchor(
        task_id, result_hash, MODEL_ID, decision, voters, sigs, claim
    )


def expect_revert(fn: Any, sender: str, error: str, *args: Any) -> None:
    """``fn`` sent by ``sender`` reverts with v1's custom error ``error(args...)``."""
    with pytest.raises(TransactionFailed) as info:
        fn.transact({"from": sender})
    revert = revert_from(info.value)
    assert revert is not None, f"not a revert: {info.value!r}"
    name, got = revert.name, revert.args_
    if name == "UnknownError":  # not one of v2's errors: decode against v1's
        data = bytes(got[0])
        name, types = V1_ERRORS[data[:4]]
        got = tuple(Web3.to_checksum_address(v) if t == "address" else v
                    for t, v in zip(types, abi_decode(types, data[4:]), strict=True))  # fmt: skip
    assert name == error, f"reverted with {name}{got}, expected {error}"
    if args:
        assert got == args


def balance(c: Chain, who: str) -> int:
    return int(c.token.functions.balanceOf(who).call())


def stake(c: Chain, who: str) -> int:
    return int(c.staking.functions.stakeOf(who).call())


def holdings(c: Chain, addresses: list[str]) -> int:
    """Every VCOIN the addresses hold: balances and stakes (active and pending)."""
    s = c.staking.functions
    return sum(balance(c, x) + s.slashableOf(x).call() for x in addresses)


def supply(c: Chain) -> int:
    return int(c.token.functions.totalSupply().call())


def test_v1_vectors_are_commit_939beb7s() -> None:
    """The vectors are that commit's artifacts, trimmed (skipped without the history: a
    shallow clone)."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    root = V1.parent.parent.parent
    for name in ("VCoin", "Staking", "TaskAnchor"):
        shown = subprocess.run(["git", "show", f"{V1_COMMIT}:contracts/artifacts/{name}.json"],
                               cwd=root, capture_output=True, text=True)  # fmt: skip
        if shown.returncode != 0:
            pytest.skip(f"no commit {V1_COMMIT} here: {shown.stderr.strip()}")
        full = json.loads(shown.stdout)
        assert artifact(name) == {k: full[k] for k in ("contractName", "abi", "bytecode")}


def test_v1_vectors_deploy_and_sign_as_v1_did(c: Chain) -> None:
    """The setup the exploits rely on: v1's own digest view equals the one signed here,
    and an honest 3-voter anchor mints the reward to its voters."""
    a = c.anchor.functions
    assert a.network().call() == NETWORK
    assert (a.maxReward().call(), a.slashAmount().call()) == (MAX_REWARD, SLASH)
    assert bytes(a.outcomeDigest(task(1), result(1), MODEL_ID, 3).call()) == v1_digest(
        task(1), result(1), 3
    )
    voters = c.nodes[:3]
    receipt = c.send(anchor_v1(c, task(1), result(1), MAJORITY, voters, reward=REWARD), voters[0])
    assert c.events("Rewarded", receipt) == [(task(1), v, REWARD // 3) for v in voters]
    assert stake(c, c.attacker) == MIN_STAKE and balance(c, c.attacker) == 0


# ---- the exploits, succeeding ----


def test_v1_exploit_self_anchor(c: Chain) -> None:
    """One node with the minimum stake invents task ids, signs each outcome alone, claims
    one replica, a huge reward and a deterministic supermajority, and lists three honest
    stakers as outvoted: it mints itself maxReward per task and each of them is slashed.
    v2: ``test_exploit_self_anchor``."""
    attacker, victims = c.attacker, c.nodes[:3]
    start, reserve, total = holdings(c, [attacker]), balance(c, c.reserve), supply(c)
    for n in (101, 102, 103):  # no such tasks: nobody asked for them
        fn = anchor_v1(c, task(n), result(666), SUPERMAJORITY, [attacker], replicas=1,
                       deterministic=True, reward=HUGE, outvoted=tuple(victims))  # fmt: skip
        receipt = c.send(fn, attacker)
        assert c.events("Rewarded", receipt) == [(task(n), attacker, MAX_REWARD)]
        assert c.events("OutvotedSlashed", receipt) == [(task(n), v, SLASH) for v in victims]
        assert c.anchor.functions.anchors(task(n)).call()[4] == 1  # one voter
    gain = holdings(c, [attacker]) - start
    assert gain == 3 * MAX_REWARD >= 300 * E18  # from 100 VCOIN (its stake) to 400
    assert stake(c, attacker) == MIN_STAKE and balance(c, attacker) == 3 * MAX_REWARD
    assert [stake(c, v) for v in victims] == [STAKE - 3 * SLASH] * 3 == [850 * E18] * 3
    assert balance(c, c.reserve) - reserve == 9 * SLASH // 2
    assert supply(c) - total == 3 * MAX_REWARD - 9 * SLASH // 2


def test_v1_exploit_mass_slash_of_non_voters(c: Chain) -> None:
    """Whoever anchored a deterministic supermajority as one of its voters could list any
    address as outvoted: every staked one lost slashAmount, task after task, though none of
    them had signed anything. It cost the attacker nothing (reward 0).
    v2: ``test_exploit_mass_slash_of_non_voters``."""
    attacker = c.attacker
    everyone = (*c.nodes, c.unstaked, c.outsider)  # the unstaked and the outsider: skipped
    start, total = holdings(c, [attacker]), supply(c)
    for n, r in ((201, 1), (202, 2)):
        fn = anchor_v1(c, task(n), result(r), SUPERMAJORITY, [attacker], replicas=1,
                       deterministic=True, outvoted=everyone)  # fmt: skip
        receipt = c.send(fn, attacker)
        assert c.events("OutvotedSlashed", receipt) == [(task(n), x, SLASH) for x in c.nodes]
        assert c.events("Rewarded", receipt) == []
    assert [stake(c, x) for x in c.nodes] == [STAKE - 2 * SLASH] * 4
    assert holdings(c, [attacker]) == start
    assert total - supply(c) == 4 * SLASH  # half of each slash burned (8 slashes)


def test_v1_exploit_front_run_with_reward_zero(c: Chain) -> None:
    """The voters' signatures were gossiped before the anchor; the reward and the split
    were not signed. An outsider (no tokens, no stake) anchors the same signatures first
    with reward = 0: the task is settled, the voters get nothing, and their own anchor
    reverts AlreadyAnchored. Or it anchors first with its own split.
    v2: ``test_exploit_front_run_cannot_change_payouts``."""
    voters = c.nodes[:3]
    tid, r = task(301), result(301)
    sigs = v1_sigs(c, voters, tid, r, MAJORITY)  # gossiped

    def honest() -> Any:
        return anchor_v1(c, tid, r, MAJORITY, voters, sigs=sigs, reward=REWARD)

    before, total = [balance(c, v) for v in voters], supply(c)
    fork = c.tester.take_snapshot()
    c.send(honest(), voters[0])  # the voters' own anchor
    assert [balance(c, v) - b for v, b in zip(voters, before, strict=True)] == [REWARD // 3] * 3
    c.tester.revert_to_snapshot(fork)

    receipt = c.send(anchor_v1(c, tid, r, MAJORITY, voters, sigs=sigs, reward=0), c.outsider)
    assert c.events("Anchored", receipt) == [(tid, r, MODEL_ID, MAJORITY, 3)]
    assert c.events("Rewarded", receipt) == []
    expect_revert(honest(), voters[0], "AlreadyAnchored", tid)
    assert [balance(c, v) for v in voters] == before and supply(c) == total
    c.tester.revert_to_snapshot(fork)

    # Its own split: the whole reward to one voter.
    fn = anchor_v1(c, tid, r, MAJORITY, voters, sigs=sigs, reward=REWARD, shares=(1, 0, 0))
    receipt = c.send(fn, c.outsider)
    assert c.events("Rewarded", receipt) == [(tid, voters[0], REWARD)]
    expect_revert(honest(), voters[1], "AlreadyAnchored", tid)


def test_v1_exploit_replay_on_another_deployment_and_chain(c: Chain) -> None:
    """v1's domain was keccak256("vcoin-outcome:v1:" + network): no chain id, no contract
    address. Signatures made once are taken by a second deployment with the same network
    name (the reward minted again) and by a deployment on a chain with another chain id.
    (The network name was in the digest: a "testnet" deployment refused them.)
    v2: ``test_exploit_replay_on_another_chain_deployment_or_network``."""
    voters = c.nodes[:3]
    tid, r = task(401), result(401)
    sigs = v1_sigs(c, voters, tid, r, MAJORITY)  # signed once, for the first deployment
    second = c.deploy_anchor()
    digest = v1_digest(tid, r, MAJORITY)
    for anchor in (c.anchor, second):
        assert bytes(anchor.functions.outcomeDigest(tid, r, MODEL_ID, MAJORITY).call()) == digest

    before = [balance(c, v) for v in voters]
    for anchor in (c.anchor, second):
        fn = anchor_v1(c, tid, r, MAJORITY, voters, sigs=sigs, reward=REWARD, anchor=anchor)
        assert c.events("Rewarded", c.send(fn, voters[0]), anchor) == [
            (tid, v, REWARD // 3) for v in voters
        ]
    assert [balance(c, v) - b for v, b in zip(voters, before, strict=True)] == [
        2 * (REWARD // 3)
    ] * 3  # paid twice for one task

    # Another chain (its CHAINID differs: VCoin's EIP-712 domain says so), the same node
    # keys staked there: the same signatures anchor there too.
    other = v1_chain(chain_id=int(c.token.functions.eip712Domain().call()[3]) + 1)
    ids = [int(x.token.functions.eip712Domain().call()[3]) for x in (c, other)]
    assert ids[0] != ids[1]
    assert bytes(other.anchor.functions.outcomeDigest(tid, r, MODEL_ID, MAJORITY).call()) == digest
    fn = anchor_v1(other, tid, r, MAJORITY, voters, sigs=sigs, reward=REWARD)
    assert other.events("Rewarded", other.send(fn, voters[0])) == [
        (tid, v, REWARD // 3) for v in voters
    ]

    # What v1 did bind: the network name.
    testnet = c.deploy_anchor("testnet")
    fn = anchor_v1(c, task(402), r, MAJORITY, voters,
                   sigs=v1_sigs(c, voters, task(402), r, MAJORITY), anchor=testnet)  # fmt: skip
    expect_revert(fn, voters[0], "BadSignature", voters[0])


def test_v1_exploit_two_peer_ids_behind_one_address(c: Chain) -> None:
    """A deterministic task with 3 replicas: two of them peer ids of one node (one
    address), the third an honest node with another answer. The one address signs once;
    honestly counted that is 1 of 3 (BelowQuorum) and it may not vote twice
    (DuplicateVoter), but the caller claims replicas = 1: it anchors alone, takes the
    reward and has the honest replica slashed. v2: ``test_exploit_two_peer_ids_behind_one_
    address``."""
    node, honest = c.nodes[0], c.nodes[1]
    tid, r = task(501), result(501)
    sig = v1_sigs(c, [node], tid, r, SUPERMAJORITY)[0]
    kw: dict[str, Any] = {"deterministic": True, "reward": REWARD, "outvoted": (honest,)}
    fn = anchor_v1(c, tid, r, SUPERMAJORITY, [node], sigs=[sig], replicas=3, **kw)
    expect_revert(fn, node, "BelowQuorum", 1, 3)
    fn = anchor_v1(c, tid, r, SUPERMAJORITY, [node, node], sigs=[sig, sig], replicas=3, **kw)
    expect_revert(fn, node, "DuplicateVoter", node)

    before = balance(c, node)
    fn = anchor_v1(c, tid, r, SUPERMAJORITY, [node], sigs=[sig], replicas=1, **kw)
    receipt = c.send(fn, node)
    assert c.events("Rewarded", receipt) == [(tid, node, REWARD)]
    assert c.events("OutvotedSlashed", receipt) == [(tid, honest, SLASH)]
    assert balance(c, node) - before == REWARD and stake(c, honest) == STAKE - SLASH


def test_v1_exploit_quorum_from_the_caller(c: Chain) -> None:
    """A 3-replica task where two honest replicas agree on one result; the third signs
    another alone, claims replicas = 1 and anchors first: its result is the task's, and
    the honest 2-of-3 anchor reverts AlreadyAnchored. v2: ``test_exploit_quorum_from_the_
    ticket``."""
    cheat, honest = c.nodes[0], c.nodes[1:3]
    tid, right, wrong = task(601), result(601), result(666)
    honest_fn = anchor_v1(c, tid, right, MAJORITY, honest, replicas=3, reward=REWARD)
    receipt = c.send(anchor_v1(c, tid, wrong, MAJORITY, [cheat], replicas=1, reward=REWARD), cheat)
    assert c.events("Rewarded", receipt) == [(tid, cheat, REWARD)]
    expect_revert(honest_fn, honest[0], "AlreadyAnchored", tid)
    stored = c.anchor.functions.anchors(tid).call()
    assert (bytes(stored[0]), stored[4]) == (wrong, 1)


def test_v1_exploit_self_dealing_loop(c: Chain) -> None:
    """The attacker's three staked addresses anchor tasks of their own invention, each
    signed by all three, reward maxReward: each anchor mints it, so every task adds about
    maxReward to what the attacker holds (20 tasks here: from 300 VCOIN, three minimum
    stakes, to over 2,000; the 100 of the v2 test would add 10,000). v2:
    ``test_exploit_self_dealing_loop`` (there, 100 tasks later, it must hold less)."""
    mine = [c.attacker, *c.sybils]
    start, total = holdings(c, mine), supply(c)
    for n in range(20):
        tid, r = task(1000 + n), result(1000 + n)
        c.send(anchor_v1(c, tid, r, MAJORITY, mine, reward=MAX_REWARD), mine[n % 3])
    end = holdings(c, mine)
    assert end > start
    assert end - start == 20 * 3 * (MAX_REWARD // 3) == supply(c) - total
    assert (start, end // E18) == (3 * MIN_STAKE, 2_299)
