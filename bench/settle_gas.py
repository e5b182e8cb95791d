"""Gas of settling one 3-replica task: TaskAnchor v2 against v1, on py-evm.

    .venv/bin/python bench/settle_gas.py [--tasks 3] [--v1-commit COMMIT]

v2: the artifacts in ``contracts/artifacts``; the requester has a deposit, the ticket says
3 replicas, each of the 3 workers is awarded at the same price and signs the outcome; one
``anchor`` with 3 votes pays each worker price x units from the deposit (burn, fee to the
reserve, capped mint). Also measured: a ``claim`` (the third vote left out of a 2-vote
anchor), a ``slash`` with a node's Result signature, and a ``deposit``.

v1: nothing is compiled: VCoin, Staking and TaskAnchor are the committed v1 artifacts in
``tests/vectors/contracts_v1`` (commit 939beb7's ``contracts/artifacts``; ``--v1-commit``
reads another commit's instead, with ``git show``), deployed on a separate chain; one
``anchor`` with 3 voters' EIP-191 signatures mints the reward to them (no escrow).

Each chain settles ``--tasks`` tasks one after another (one transaction a block, workers
already holding VCOIN, no vote delegations); the first settlement also pays for storage
slots set for the first time (the epoch's mint counter), so both the first and the median
of the later ones are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3

from vcoind.chain.typed import (
    Domain,
    Outcome,
    Ticket,
    award_hash,
    profile_hash,
    result_struct_hash,
    sign,
)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "contracts" / "artifacts"
V1_ARTIFACTS = ROOT / "tests" / "vectors" / "contracts_v1"  # commit 939beb7's
V1_COMMIT = "939beb7"
NETWORK = "devnet"
E18 = 10**18
STAKE = 1000 * E18
PRICE = 10**15  # wei per token
UNITS = 600
MODEL = "sha256:" + hashlib.sha256(b"bench model").hexdigest()
PROFILE = profile_hash({"device": "cuda", "dtype": "float16"})
# slash, fee, burn, mint (bps), epoch, epoch mint cap, withdraw delay: production defaults
PARAMS = (50 * E18, 200, 1000, 500, 86400, 10_000 * E18, 86400)
GAS = 3_000_000  # a fixed limit: eth-tester's estimate would run each transaction again


class Net:
    """One in-process chain: its accounts, their keys and a deployer."""

    def __init__(self) -> None:
        self.w3 = Web3(EthereumTesterProvider())
        tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        self.keys = {
            k.public_key.to_checksum_address(): k.to_bytes() for k in tester.backend.account_keys
        }
        accounts: list[str] = [str(a) for a in self.w3.eth.accounts]
        self.admin, self.reserve, self.requester = accounts[:3]
        self.workers = accounts[3:7]

    def deploy(self, artifact: dict[str, Any], *args: Any) -> Any:
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx = factory.constructor(*args).transact({"from": self.admin})
        address = self.w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
        return self.w3.eth.contract(address=address, abi=artifact["abi"])

    def send(self, fn: Any, sender: str) -> Any:
        tx = fn.transact({"from": sender, "gas": GAS})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction failed: {receipt}")
        return receipt

    def setup(self, arts: dict[str, dict[str, Any]], *anchor_args: Any) -> tuple[Any, Any, Any]:
        """VCoin, Staking and TaskAnchor with the roles, 4 staked workers and a funded
        requester."""
        token = self.deploy(arts["VCoin"], self.admin)
        staking = self.deploy(arts["Staking"], token.address, self.admin, self.reserve, 0, 0)
        anchor = self.deploy(
            arts["TaskAnchor"], token.address, staking.address, self.admin, NETWORK, *anchor_args
        )
        t, s = token.functions, staking.functions
        self.send(t.grantRole(t.MINTER_ROLE().call(), anchor.address), self.admin)
        self.send(t.grantRole(t.BURNER_ROLE().call(), anchor.address), self.admin)
        self.send(t.grantRole(t.MINTER_ROLE().call(), self.admin), self.admin)
        self.send(t.grantRole(t.BURNER_ROLE().call(), staking.address), self.admin)
        self.send(s.grantRole(s.SLASHER_ROLE().call(), anchor.address), self.admin)
        for who in [*self.workers, self.requester, self.reserve]:
            self.send(t.mint(who, 10 * STAKE), self.admin)
        for w in self.workers:
            self.send(t.approve(staking.address, STAKE), w)
            self.send(s.stake(STAKE), w)
        return token, staking, anchor


def task_id(n: int) -> str:
    return f"{n + 1:032x}"


def result(n: int) -> bytes:
    return hashlib.sha256(f"answer {n}".encode()).digest()


def measure_v2(tasks: int) -> dict[str, list[int]]:
    net = Net()
    arts = {n: json.loads((ARTIFACTS / f"{n}.json").read_text()) for n in ARTIFACT_NAMES}
    token, _, anchor = net.setup(arts, PARAMS)
    a = anchor.functions
    domain = Domain(NETWORK, net.w3.eth.chain_id, anchor.address)
    req_key = net.keys[net.requester]
    out: dict[str, list[int]] = {"anchor": [], "claim": [], "slash": [], "deposit": []}
    net.send(token.functions.approve(anchor.address, 100 * STAKE), net.requester)
    for _ in range(2):
        out["deposit"].append(net.send(a.deposit(10 * E18), net.requester)["gasUsed"])

    def signed(n: int, workers: list[str], **kw: Any) -> tuple[Ticket, Outcome, list[Any]]:
        t = Ticket(task_id(n), net.requester, MODEL, 1, 3, kw.get("det", False), 2 * PRICE,
                   1000, 2**40, n + 1, PROFILE if kw.get("det") else bytes(32))  # fmt: skip
        o = Outcome(result(n), 3 if kw.get("det") else 2, UNITS,
                    PROFILE if kw.get("det") else bytes(32))  # fmt: skip
        votes = [(w, PRICE, sign(req_key, domain.digest(award_hash(t.hash(), w, PRICE))),
                  sign(net.keys[w], domain.digest(o.hash(t)))) for w in workers]  # fmt: skip
        return t, o, votes

    def anchor_fn(t: Ticket, o: Outcome, votes: list[Any]) -> Any:
        tsig = sign(req_key, domain.digest(t.hash()))
        return a.anchor(t.values(), tsig, (o.result_hash, o.decision, o.units, o.profile), votes)

    three = net.workers[:3]
    for n in range(tasks):
        t, o, votes = signed(n, three)
        out["anchor"].append(net.send(anchor_fn(t, o, votes), three[0])["gasUsed"])
    for n in range(tasks, 2 * tasks):
        t, o, votes = signed(n, three)
        net.send(anchor_fn(t, o, votes[:2]), three[0])
        out["claim"].append(net.send(a.claim(t.values(), votes[2]), three[2])["gasUsed"])
    cheat = net.workers[3]
    for n in range(2 * tasks, 3 * tasks):
        t, o, votes = signed(n, three, det=True)
        net.send(anchor_fn(t, o, votes), three[0])
        wrong = result(-n)
        evidence = sign(net.keys[cheat], domain.digest(result_struct_hash(t.task_id, wrong,
                                                                          PROFILE)))  # fmt: skip
        tid = bytes(16) + bytes.fromhex(t.task_id)
        out["slash"].append(net.send(a.slash(tid, cheat, wrong, evidence), three[0])["gasUsed"])
    return out


def v1_digest(n: int, decision: int) -> bytes:
    """v1's outcome digest: keccak256(abi.encode(domain, taskId, resultHash, modelId,
    uint8(decision))), domain = keccak256("vcoin-outcome:v1:" + network)."""
    domain = keccak(text="vcoin-outcome:v1:" + NETWORK)
    model = bytes.fromhex(MODEL.removeprefix("sha256:"))
    values = [domain, bytes(16) + bytes.fromhex(task_id(n)), result(n), model, decision]
    return keccak(abi_encode(["bytes32", "bytes32", "bytes32", "bytes32", "uint8"], values))


def v1_artifacts(commit: str | None) -> dict[str, dict[str, Any]]:
    """v1's VCoin, Staking and TaskAnchor: the committed vectors, or ``commit``'s
    ``contracts/artifacts`` (needs the git history)."""
    arts: dict[str, dict[str, Any]] = {}
    for name in ARTIFACT_NAMES:
        if commit is None:
            arts[name] = json.loads((V1_ARTIFACTS / f"{name}.json").read_text())
            continue
        path = f"{commit}:contracts/artifacts/{name}.json"
        shown = subprocess.run(["git", "show", path], cwd=ROOT, check=True,
                               capture_output=True, text=True)  # fmt: skip
        arts[name] = json.loads(shown.stdout)
    return arts


def measure_v1(tasks: int, commit: str | None = None) -> dict[str, list[int]]:
    net = Net()
    arts = v1_artifacts(commit)
    reward = 3 * PRICE * UNITS  # what the three v2 workers are paid
    _, _, anchor = net.setup(arts, 10 * reward, 50 * E18)
    three = net.workers[:3]
    out: dict[str, list[int]] = {"anchor": []}
    for n in range(tasks):
        message = encode_defunct(primitive=v1_digest(n, 2))
        sigs = [bytes(Account.sign_message(message, net.keys[w]).signature) for w in three]
        claim: tuple[Any, ...] = (3, False, reward, [], [])
        fn = anchor.functions.anchor(bytes(16) + bytes.fromhex(task_id(n)), result(n),
                                     bytes.fromhex(MODEL.removeprefix("sha256:")), 2, three,
                                     sigs, claim)  # fmt: skip
        out["anchor"].append(net.send(fn, three[0])["gasUsed"])
    return out


ARTIFACT_NAMES = ("VCoin", "Staking", "TaskAnchor")


def show(label: str, gas: list[int]) -> str:
    later = f"{statistics.median(gas[1:]):,.0f}" if len(gas) > 1 else "-"
    return f"{label:<52} first {gas[0]:>9,}   later (median) {later:>9}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--v1-commit",
        default=None,
        help=f"read v1's artifacts from this commit's contracts/artifacts (default: "
        f"tests/vectors/contracts_v1, commit {V1_COMMIT}'s)",
    )
    ap.add_argument("--tasks", type=int, default=3, help="settlements per kind (at least 2)")
    args = ap.parse_args()
    v1 = measure_v1(args.tasks, args.v1_commit)
    v2 = measure_v2(args.tasks)
    print("gas used, py-evm (eth-tester), EVM cancun, one transaction a block")
    v1_label = args.v1_commit or V1_COMMIT
    print(show(f"v1 anchor, 3 voters ({v1_label}: mint the reward)", v1["anchor"]))
    print(show("v2 anchor, 3 votes (escrow: pay, burn, fee, mint)", v2["anchor"]))
    print(show("v2 claim, 1 vote left out of a 2-vote anchor", v2["claim"]))
    print(show("v2 slash (a Result signature)", v2["slash"]))
    print(show("v2 deposit", v2["deposit"]))
    ratio = statistics.median(v2["anchor"][1:]) / statistics.median(v1["anchor"][1:])
    print(f"v2 / v1 anchor (later): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
