"""Consensus mode on real daemons: replicas, commit-reveal, weighted vote, signatures."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode
from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished, knows_model, loaded, serving, task
from vcoind.chain.typed import Domain, Outcome, recover

pytestmark = pytest.mark.slow


def submit_consensus(node: DevNode, prompt: str, replicas: int = 3, **params: Any) -> str:
    req = {"model": MODEL, "input": prompt, "mode": "consensus", "replicas": replicas,
           "parameters": {"max_new_tokens": 12, **params}}  # fmt: skip
    return str(node.rpc.call("vcoin_submitTask", req)["task_id"])


def three(cluster: Cluster, models_dir: Path, faulty: str | None = None) -> list[DevNode]:
    bid = ["--bid-window", "5"]  # closes once all three have bid
    n1 = cluster.start(1, extra=[*serving(models_dir), *bid])
    n2 = cluster.start(2, bootstrap=n1, extra=serving(models_dir), wait=False)
    extra = ["--fault", faulty] if faulty else []
    n3 = cluster.start(3, bootstrap=n1, extra=[*serving(models_dir), *extra])
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees the model on both peers")
    # warm (models loaded): the tests' 3 s commit deadlines are about replicas, not start-up
    wait_until(lambda: all(loaded(n) for n in (n1, n2, n3)), 90, "every model loaded")
    return [n1, n2, n3]


def rejected(node: DevNode, reason: str) -> float:
    metrics_url = node.info["rpc_url"] + "/metrics"
    with urllib.request.urlopen(urllib.request.Request(metrics_url, headers=node.rpc.auth)) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(f'vcoin_consensus_rejected_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_honest_replicas_agree_and_sign(cluster: Cluster, models_dir: Path) -> None:
    n1, n2, n3 = three(cluster, models_dir)
    t = finished(n1, submit_consensus(n1, "What is a Merkle tree?"), timeout=120)
    assert t["status"] == "completed", t
    c = t["consensus"]
    assert c["decision"] == "supermajority" and c["confidence"] >= 0.85, c
    assert c["action"] == "accept" and not c["conflict"]
    ids = {n.info["peer_id"] for n in (n1, n2, n3)}
    assert {r["node_id"] for r in c["replicas"]} == ids  # three distinct nodes
    assert len({r["result_hash"] for r in c["replicas"]}) == 1  # greedy: identical
    assert all(r["agreed"] and r["similarity"] == 1.0 for r in c["replicas"])
    # Every replica signed the same outcome; the signatures recover to their addresses.
    signed_outcome = Outcome.from_json(c["signed"])
    assert signed_outcome.result_hash.hex() == c["result_hash"] and signed_outcome.decision == 3
    assert signed_outcome.units == t["progress"] > 0  # the agreed answer's tokens
    digest = Domain.offline("testnet").digest(  # no shared chain: signed off chain
        signed_outcome.hash_for(t["task_id"], bytes.fromhex(c["signed"]["ticket_hash"]))
    )
    signed = wait_until(
        lambda: len((x := task(n1, t["task_id"]))["consensus"]["signatures"]) == 3 and x,
        15,
        "every replica's signature",
    )  # collected after completion
    assert signed["consensus"]["history"][0]["phases_s"]["tallied"] > 0
    sigs = {s["node_id"]: s for s in signed["consensus"]["signatures"]}
    assert set(sigs) == ids and len(signed["consensus"]["signatures"]) == 3
    for s in sigs.values():
        assert recover(digest, bytes.fromhex(s["signature"])) == s["eth_address"]
    assert len(t["validations"]) == 3 and all(v["passed"] for v in t["validations"])
    single = finished(n1, str(n1.rpc.call("vcoin_submitTask", {
        "model": MODEL, "input": "What is a Merkle tree?",
        "parameters": {"max_new_tokens": 12}})["task_id"]))  # fmt: skip
    assert single["result"] == t["result"]  # consensus returns the same greedy answer
    hist = n1.rpc.call("vcoin_consensusHistory")
    assert hist["total"] == 1 and hist["tasks"][0]["decision"] == "supermajority"
    # auto: three idle nodes serve the model -> consensus
    auto = {"model": MODEL, "input": "hi", "mode": "auto", "parameters": {"max_new_tokens": 4}}
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", auto)["task_id"]))
    assert t["mode"] == "consensus" and t["consensus"]["decision"] == "supermajority", t
    assert n1.rpc.call("vcoin_consensusMetrics")["agreement_rate"] == 1.0


def test_junk_replica_is_outvoted_and_loses_reputation(cluster: Cluster, models_dir: Path) -> None:
    """100 trials with a fresh seed each (the junk differs every time): the junk answer is
    never accepted, the honest greedy answer always wins."""
    n1, n2, n3 = three(cluster, models_dir, faulty="junk")
    junk = n3.info["peer_id"]
    prompts = ["Explain proof of stake", "What is a Merkle tree?", "Define gas"]
    honest = {
        p: finished(n1, str(n1.rpc.call("vcoin_submitTask", {
            "model": MODEL, "input": p, "parameters": {"max_new_tokens": 8}})["task_id"]))
        for p in prompts
    }  # fmt: skip
    assert all(t["status"] == "completed" for t in honest.values())
    wrong_accepted, with_junk, actions = 0, 0, Counter[str]()
    # 100 trials, a few in flight at once (the box has two cores to keep busy)
    batches = [range(b, b + 4) for b in range(0, 100, 4)]
    trials = []
    for batch in batches:
        ids = [(trial, submit_consensus(n1, prompts[trial % len(prompts)], seed=trial,
                                        max_new_tokens=8)) for trial in batch]  # fmt: skip
        trials += [(trial, finished(n1, task_id, timeout=120)) for trial, task_id in ids]
    assert len(trials) == 100
    for trial, t in trials:
        prompt = prompts[trial % len(prompts)]
        assert t["status"] == "completed", t
        c = t["consensus"]
        actions[c["action"]] += 1
        if t["result"] != honest[prompt]["result"] and c["action"].startswith("accept"):
            wrong_accepted += 1
        assert c["answer_replica"] != junk and t["result"] == honest[prompt]["result"], c
        junk_vote = {r["node_id"]: r for r in c["replicas"]}.get(junk)
        if junk_vote is None:  # its assignment failed (a dropped connection on a loaded box)
            continue
        with_junk += 1
        assert c["decision"] in ("majority", "supermajority"), c
        assert junk_vote["agreed"] is False and c["conflict"], (trial, c)
    assert with_junk >= 90, with_junk
    assert wrong_accepted == 0
    assert actions["accept"] > 50, actions  # the junk node's weight falls as it keeps losing
    peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
    assert peers[junk]["reputation_score"] < 100 <= peers[n2.info["peer_id"]]["reputation_score"]
    conflicts = n1.rpc.call("vcoin_consensusConflicts")
    assert conflicts["total"] == with_junk and "outvoted" in conflicts["conflicts"][0]["why"]
    # Reputation feeds bid selection: the junk node is now last in line.
    for i in range(4):
        req = {"model": MODEL, "input": f"after {i}", "parameters": {"max_new_tokens": 2}}
        t = finished(n1, str(n1.rpc.call("vcoin_submitTask", req)["task_id"]))
        assert t["status"] == "completed" and t["node_id"] != junk, t
        assert junk in {b["peer_id"] for b in t["bids"]}  # it bid, and lost


def test_silent_replica_is_left_out(
    cluster: Cluster, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the request's 3 s is the whole commit deadline: no allowance for long answers
    monkeypatch.setenv("VCOIN_MARKET_DEADLINE_ALLOWANCE_S", "0")
    n1, n2, n3 = three(cluster, models_dir, faulty="silent")
    silent = n3.info["peer_id"]
    req = {"model": MODEL, "input": "What is a hash?", "mode": "consensus", "timeout_s": 3,
           "parameters": {"max_new_tokens": 8}}  # commit deadline 3 s  # fmt: skip
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", req)["task_id"]), timeout=120)
    assert t["status"] == "completed", t
    c = t["consensus"]
    assert {r["node_id"] for r in c["replicas"]} == {n1.info["peer_id"], n2.info["peer_id"]}
    assert c["decision"] == "supermajority" and c["action"] == "accept", c
    route = {hop["node_id"]: hop for hop in t["route"]}
    assert route[silent]["status"] == "failed"
    peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
    assert peers[silent]["reputation_score"] < 100


def test_copying_replica_cannot_copy(cluster: Cluster, models_dir: Path) -> None:
    """Commitments come first: a copier commits to a guess, then its copied reveal does not
    match it and is rejected; the vote goes on with the honest two."""
    n1, _n2, n3 = three(cluster, models_dir, faulty="copy")
    copier = n3.info["peer_id"]
    t = finished(n1, submit_consensus(n1, "What is a blockchain?"), timeout=120)
    assert t["status"] == "completed", t
    c = t["consensus"]
    assert copier not in {r["node_id"] for r in c["replicas"]}, c
    assert len(c["replicas"]) == 2 and c["decision"] == "supermajority"
    assert {hop["node_id"]: hop["status"] for hop in t["route"]}[copier] == "failed"
    assert rejected(n1, "bad_reveal") >= 1
    peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
    assert peers[copier]["reputation_score"] < 100


def test_disagreement_recomputes_and_is_recorded(cluster: Cluster, models_dir: Path) -> None:
    """Sampling at a high temperature: each replica draws its own sample, the answers
    disagree, confidence is low -> a second round with more replicas, then the answer is
    marked as a conservative fallback, and the conflict is listed."""
    n1, _, _ = three(cluster, models_dir)
    t = finished(n1, submit_consensus(n1, "Tell a story", temperature=5.0, max_new_tokens=24),
                 timeout=180)  # fmt: skip
    assert t["status"] == "completed", t
    c = t["consensus"]
    assert c["rounds"] == 2 and c["history"][0]["action"] in ("recompute", "fallback"), c
    assert c["conflict"] and c["action"] in ("recompute", "fallback"), c
    assert c["fallback"] == (c["action"] == "fallback") and (c["note"] or not c["fallback"])
    assert len(c["history"][1]["replicas"]) == 3  # all three nodes; 5 asked, 3 exist
    conflicts = n1.rpc.call("vcoin_consensusConflicts")
    assert conflicts["total"] == 1 and "recomputed" in conflicts["conflicts"][0]["why"]
    metrics = n1.rpc.call("vcoin_consensusMetrics")
    assert metrics["recompute_rate"] == 1.0 and metrics["agreement_rate"] == 0.0


def test_slow_replica_commits_too_late(
    cluster: Cluster, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commitment after the origin closed the commit phase is rejected and costs reputation."""
    monkeypatch.setenv("VCOIN_MARKET_DEADLINE_ALLOWANCE_S", "0")  # 3 s, as the request says
    n1, _n2, n3 = three(cluster, models_dir, faulty="slow")
    slow = n3.info["peer_id"]
    # commit deadline 3 s; the slow node takes 5
    req = {"model": MODEL, "input": "What is a hash?", "mode": "consensus", "timeout_s": 3,
           "parameters": {"max_new_tokens": 8}}  # fmt: skip
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", req)["task_id"]), timeout=120)
    assert t["status"] == "completed", t
    assert slow not in {r["node_id"] for r in t["consensus"]["replicas"]}

    def reputation() -> float:
        peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
        return float(peers[slow]["reputation_score"])

    # silent until the deadline (-2), then its late commitment is rejected (-3)
    wait_until(lambda: reputation() <= 95, 20, "the late commitment to cost reputation")
    assert rejected(n1, "late_commit") >= 1
