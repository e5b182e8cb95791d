"""The chain client on real daemons: the embedded EVM, and anvil shared by three nodes.

Anchors, rewards and slashes are checked on the chain itself (web3 against anvil), not only
through the daemons' own reports.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode, deposit_all, stake_all
from devnet.chain import fund_nodes
from tests.conftest import Chain, Cluster, wait_until
from tests.test_consensus_nodes import submit_consensus
from tests.test_tasks import MODEL, finished, knows_model, serving, submit, task
from vcoind.chain.contracts import E18
from vcoind.cli import ClientError

pytestmark = pytest.mark.slow


def anchor_of(node: DevNode, task_id: str, timeout: float = 60) -> dict[str, Any]:
    """The task's anchor once on chain (fails the test if it failed or never landed)."""
    a = wait_until(
        lambda: (x := task(node, task_id).get("anchor")) and x["status"] in ("anchored", "failed")
        and x,
        timeout,
        f"the anchor of {task_id}",
    )  # fmt: skip
    assert a["status"] == "anchored", a
    return dict(a)


# --- embedded ------------------------------------------------------------------


def test_embedded_chain_single_node_anchors_with_no_setup(
    cluster: Cluster, models_dir: Path
) -> None:
    n = cluster.start(1, extra=serving(models_dir))
    # The first use of the chain is the anchor (the embedded chain is made then).
    t = finished(n, submit(n, "anchor me", max_new_tokens=6))
    assert t["status"] == "completed", t
    a = anchor_of(n, t["task_id"])
    info = n.rpc.call("vcoin_chainInfo")
    assert info["mode"] == "embedded" and info["node_address"] == n.info["eth_address"]
    assert info["stake"] == 1000.0 and info["eligible"]
    assert info["payments"].startswith("unpaid")  # the embedded chain is private
    assert t["payment"] == {
        "paid": False,
        "reason": "unpaid: the embedded chain is private to this node",
    }
    got = n.rpc.call("vcoin_getAnchor", {"task_id": t["task_id"]})
    p = got["payload"]
    # Anchored under a price-0 ticket the node signs as requester, with its own vote.
    assert [v["worker"] for v in p["votes"]] == [n.info["eth_address"]]
    assert p["ticket"]["requester"] == n.info["eth_address"] and p["ticket"]["max_price"] == "0"
    assert p["ticket"]["replicas"] == 1 and p["outcome"]["decision"] == 2
    assert p["outcome"]["result_hash"] == hashlib.sha256(t["result"].encode()).hexdigest()
    assert p["outcome"]["units"] == t["timings"]["tokens"]
    assert all(r["gross"] == 0 and r["minted"] == 0 for r in a["rewards"]), a  # nothing paid
    balance = n.rpc.call("vcoin_balance")["balance"]

    # Stake: a write that works, one the contract refuses (decoded by name), bad params.
    rpc = n.client(40)
    done = rpc.call("vcoin_unstake", {"amount": 10})
    assert done["status"] == "done" and done["tx_hash"].startswith("0x")
    assert rpc.call("vcoin_chainInfo")["pending_unstake"] == 10.0
    with pytest.raises(ClientError, match=r"InsufficientStake\(.*code -32010"):
        rpc.call("vcoin_unstake", {"amount": 5000})
    with pytest.raises(ClientError, match="-32602"):
        rpc.call("vcoin_stake", {"amount": -1})
    with pytest.raises(ClientError, match="UnstakeLocked"):
        rpc.call("vcoin_withdraw")

    # Governance: propose, vote once the voting delay (1 s) has passed, read the tally.
    p = rpc.call("vcoin_govPropose", {"description": "raise maxReward to 200 VCOIN"})
    pid = p["result"]["proposal_id"]
    assert p["status"] == "done" and pid
    time.sleep(2)
    v = rpc.call("vcoin_govVote", {"proposal_id": pid, "support": "for"})
    assert v["status"] == "done", v
    st = rpc.call("vcoin_govStatus", {"proposal_id": pid})
    assert st["state"] == "active" and st["has_voted"]
    assert st["votes"]["for"] == pytest.approx(balance)  # the unstaked balance
    assert st["description"] == "raise maxReward to 200 VCOIN"
    with pytest.raises(ClientError, match="GovernorAlreadyCastVote"):
        rpc.call("vcoin_govVote", {"proposal_id": pid, "support": "against"})
    with pytest.raises(ClientError, match="no proposal"):
        rpc.call("vcoin_govStatus", {"proposal_id": "12345"})
    with pytest.raises(ClientError, match="decimal"):
        rpc.call("vcoin_govStatus", {"proposal_id": "0xabc"})

    # The same through the command line.
    def vcoin(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(Path(sys.executable).parent / "vcoin"), "--datadir", str(n.datadir), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = vcoin("chain", "info")
    assert out.returncode == 0 and "embedded" in out.stdout and n.info["eth_address"] in out.stdout
    out = vcoin("task", t["task_id"])
    assert f"anchor    anchored  tx {a['tx_hash']}" in out.stdout, out.stdout
    out = vcoin("gov", "status", pid)
    assert out.returncode == 0 and "active" in out.stdout
    out = vcoin("unstake", "1000000")
    assert out.returncode == 1 and "InsufficientStake" in out.stderr
    ops = rpc.call("vcoin_chainOps")
    assert ops["counts"] == {"done": 5, "failed": 4}, ops  # anchor, unstake, delegate, ...


def test_no_chain_and_bad_chain_config_are_clear(cluster: Cluster, tmp_path: Path) -> None:
    n = cluster.start(1, extra=["--no-chain"])
    with pytest.raises(ClientError, match="without a chain"):
        n.rpc.call("vcoin_chainInfo")
    n.proc.terminate()
    n.proc.wait()
    with pytest.raises(Exception, match="needs its deployment file"):
        cluster.start(2, extra=["--chain-rpc", "http://127.0.0.1:1"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        cluster.start(3, extra=["--chain-rpc", "http://127.0.0.1:1", "--contracts", str(bad)])


# --- anvil ---------------------------------------------------------------------


def three_on_chain(
    cluster: Cluster, models_dir: Path, chain: Chain, faulty: str | None = None
) -> list[DevNode]:
    extra = [*serving(models_dir), *chain.flags()]
    n1 = cluster.start(1, extra=[*extra, "--bid-window", "5"])
    n2 = cluster.start(2, bootstrap=n1, extra=extra, wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=[*extra, *(["--fault", faulty] if faulty else [])])
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees the model on both peers")
    return [n1, n2, n3]


def test_three_daemons_on_anvil_pay_from_the_deposit_gate_stake_and_slash(
    cluster: Cluster, models_dir: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VCOIN_MARKET_NO_BID_TIMEOUT_S", "2")
    nodes = three_on_chain(cluster, models_dir, chain, faulty="junk")
    n1, n2, n3 = nodes
    addr = {n.index: n.info["eth_address"] for n in nodes}
    # Nobody is staked yet: no node counts as a bidder, a task finds no bid.
    assert n1.rpc.call("vcoin_consensusStatus")["replicas_possible"][MODEL] == 0
    t = finished(n1, submit(n1, "before staking", max_new_tokens=4))
    assert t["status"] == "failed" and "no bid" in t["error"], t
    fund_nodes(chain.anvil.url, chain.deployment, list(addr.values()))
    stake_all(nodes, 1000)
    assert chain.stake(addr[3]) == 1000 * E18
    peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
    assert peers[n3.info["peer_id"]]["stake"]["stake"] == 1000.0

    # A paid task whose requester has no deposit: the others refuse to work for it (its own
    # node may: it would only pay itself).
    t = finished(n1, submit(n1, "before the deposit", max_new_tokens=4))
    assert t["status"] == "completed" and t["payment"]["paid"], t
    assert {b["peer_id"] for b in t["bids"]} == {n1.info["peer_id"]}, t["bids"]
    wait_until(lambda: "does not cover the ticket" in (n2.datadir / "vcoind.log").read_text(),
               10, "node 2's refusal in its log")  # fmt: skip
    deposit_all([n1], 100)
    anchor = chain.c.anchor.functions
    deposit = int(anchor.depositOf(addr[1]).call()[0])
    assert deposit >= 100 * E18

    # Greedy consensus tasks until the junk replica is outvoted by a supermajority (its
    # reputation, hence weight, drops each time it loses): then its own signed Result is
    # the evidence that slashes it.
    reserve = chain.balance(chain.deployment.deployer)
    fees = spent = 0.0
    slashed_task = None
    for trial in range(10):
        before = {i: chain.balance(a) for i, a in addr.items()}
        t = finished(n1, submit_consensus(n1, "Explain proof of stake", seed=trial,
                                          max_new_tokens=8), timeout=120)  # fmt: skip
        assert t["status"] == "completed", t
        assert {b["peer_id"] for b in t["bids"]} == {n.info["peer_id"] for n in nodes}
        assert all(b["price"] == pytest.approx(0.0001) for b in t["bids"])  # signed prices
        a = anchor_of(n1, t["task_id"])
        ev = chain.anchored_events(t["task_id"])
        assert len(ev) == 1
        assert bytes(ev[0]["args"]["resultHash"]).hex() == t["consensus"]["result_hash"]
        assert bytes(ev[0]["args"]["resultHash"]) == hashlib.sha256(t["result"].encode()).digest()
        agreed = {r["node_id"] for r in t["consensus"]["replicas"] if r["agreed"]}
        paid = {r["node"]: r for r in a["rewards"]}
        assert set(paid) == {n.info["eth_address"] for n in nodes if n.info["peer_id"] in agreed}
        assert addr[3] not in paid  # the junk answer earns nothing
        units = t["consensus"]["signed"]["units"]
        for r in paid.values():  # price x tokens from the deposit; 10 % burned, 2 % fee, 5 % minted
            assert r["gross"] == pytest.approx(0.0001 * units)
            assert (r["burned"], r["fee"], r["minted"]) == pytest.approx(
                (0.1 * r["gross"], 0.02 * r["gross"], 0.05 * r["gross"]))  # fmt: skip
            assert r["to_worker"] == pytest.approx(r["gross"] - r["burned"] - r["fee"])
            i = next(i for i, x in addr.items() if x == r["node"])
            got = chain.balance(r["node"]) - before[i]
            assert got == pytest.approx((r["to_worker"] + r["minted"]) * E18)
            fees += r["fee"]
            spent += r["gross"]
        if a["slashed"]:
            slashed_task = t
            assert [s["node"] for s in a["slashed"]] == [addr[3]], a
            assert t["consensus"]["decision"] == "supermajority"
            tid = t["task_id"]

            def slashes(tid: str = tid) -> list[dict[str, Any]] | None:
                got: list[dict[str, Any]] = task(n1, tid)["anchor"]["slashed"]
                return got if all(x["status"] == "slashed" for x in got) else None

            done = wait_until(slashes, 30, "the slash")
            assert done[0]["amount"] == 50.0
            break
    assert slashed_task is not None, "the junk node was never outvoted by a supermajority"
    assert chain.stake(addr[3]) == 950 * E18  # slashAmount 50 VCOIN
    # half the slash and every fee to the reserve (the deployer on a devnet)
    got = chain.balance(chain.deployment.deployer) - reserve
    assert got == pytest.approx(25 * E18 + fees * E18)
    assert chain.stake(addr[1]) == chain.stake(addr[2]) == 1000 * E18
    assert int(anchor.depositOf(addr[1]).call()[0]) == pytest.approx(deposit - spent * E18)
    r = n2.rpc.call("vcoin_rewards")  # read from the chain's logs, not n2's own anchors
    assert r["source"] == "chain" and r["total"] > 0


def test_anvil_down_60s_delays_anchors_but_loses_none(
    cluster: Cluster, models_dir: Path, chain: Chain
) -> None:
    nodes = three_on_chain(cluster, models_dir, chain)
    n1 = nodes[0]
    fund_nodes(chain.anvil.url, chain.deployment, [n.info["eth_address"] for n in nodes])
    stake_all(nodes, 1000)
    deposit_all([n1], 100)
    first = finished(n1, submit(n1, "before the outage", max_new_tokens=4))
    anchor_of(n1, first["task_id"])

    chain.anvil.pause()
    t0 = time.monotonic()
    try:
        ids = [submit(n1, f"during the outage {i}", max_new_tokens=4) for i in range(4)]
        ids.append(submit_consensus(n1, "during the outage, replicated", max_new_tokens=4))
        for i in ids:
            assert finished(n1, i, timeout=60)["status"] == "completed"

        def anchors() -> list[dict[str, Any]]:
            return [task(n1, i).get("anchor") or {} for i in ids]

        # All queued; the oldest already tried (and failed) to reach the chain.
        wait_until(lambda: all(a.get("status") in ("queued", "sent") for a in anchors())
                   and any(a["attempts"] >= 1 and a["error"] for a in anchors()), 30,
                   "anchors queued and retried")  # fmt: skip
        before = anchors()
        # The origin restarts while the chain is down: the queue is on disk.
        n1.proc.terminate()
        assert n1.proc.wait(30) == 0
        n1 = cluster.start(1, extra=[*serving(models_dir), *chain.flags()])
        after = anchors()
        assert all(a["status"] in ("queued", "sent") for a in after), after
        assert [a["attempts"] for a in after] >= [a["attempts"] for a in before]
        time.sleep(max(0.0, 60 - (time.monotonic() - t0)))
    finally:
        chain.anvil.resume()
    for i in ids:
        anchor_of(n1, i, timeout=90)
        assert len(chain.anchored_events(i)) == 1  # landed, and only once
    ops = n1.rpc.call("vcoin_chainOps", {"limit": 100})
    assert "failed" not in ops["counts"], ops
