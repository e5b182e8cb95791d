"""Consensus mode on real daemons: replicas, commit-reveal, weighted vote, signatures."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import DevNode
from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished, knows_model, serving
from vcoind.consensus.outcome import outcome_digest, recover_outcome_signer

pytestmark = pytest.mark.slow


def submit_consensus(node: DevNode, prompt: str, replicas: int = 3, **params: Any) -> str:
    req = {"model": MODEL, "input": prompt, "mode": "consensus", "replicas": replicas,
           "parameters": {"max_new_tokens": 12, **params}}  # fmt: skip
    return str(node.rpc.call("vcoin_submitTask", req)["task_id"])


def three(cluster: Cluster, models_dir: Path, faulty: str | None = None) -> list[DevNode]:
    bid = ["--bid-window", "5"]  # closes once all three have bid
    n1 = cluster.start(1, extra=[*serving(models_dir), *bid])
    n2 = cluster.start(2, bootstrap=n1, extra=serving(models_dir))
    extra = ["--fault", faulty] if faulty else []
    n3 = cluster.start(3, bootstrap=n1, extra=[*serving(models_dir), *extra])
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees the model on both peers")
    return [n1, n2, n3]


def rejected(node: DevNode, reason: str) -> float:
    with urllib.request.urlopen(node.info["rpc_url"] + "/metrics") as resp:
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
    digest = outcome_digest("testnet", t["task_id"], bytes.fromhex(c["result_hash"]),
                            t["model_id"], c["decision"])  # fmt: skip
    sigs = {s["node_id"]: s for s in c["signatures"]}
    assert set(sigs) == ids
    for s in sigs.values():
        assert recover_outcome_signer(digest, bytes.fromhex(s["signature"])) == s["eth_address"]
    assert len(t["validations"]) == 3 and all(v["passed"] for v in t["validations"])
    single = finished(n1, str(n1.rpc.call("vcoin_submitTask", {
        "model": MODEL, "input": "What is a Merkle tree?",
        "parameters": {"max_new_tokens": 12}})["task_id"]))  # fmt: skip
    assert single["result"] == t["result"]  # consensus returns the same greedy answer
    hist = n1.rpc.call("vcoin_consensusHistory")
    assert hist["total"] == 1 and hist["tasks"][0]["decision"] == "supermajority"


def test_junk_replica_is_outvoted_and_loses_reputation(cluster: Cluster, models_dir: Path) -> None:
    n1, n2, n3 = three(cluster, models_dir, faulty="junk")
    junk = n3.info["peer_id"]
    honest = finished(n1, str(n1.rpc.call("vcoin_submitTask", {
        "model": MODEL, "input": "Explain proof of stake",
        "parameters": {"max_new_tokens": 12}, "replicas": None})["task_id"]))  # fmt: skip
    for seed in range(3):
        t = finished(n1, submit_consensus(n1, "Explain proof of stake", seed=seed), timeout=120)
        assert t["status"] == "completed", t
        c = t["consensus"]
        assert c["decision"] in ("majority", "supermajority"), c
        by_node = {r["node_id"]: r for r in c["replicas"]}
        assert by_node[junk]["agreed"] is False, c
        assert c["answer_replica"] != junk and t["result"] == honest["result"], (c, t["result"])
        assert c["conflict"], c
    peers = {p["peer_id"]: p for p in n1.rpc.call("vcoin_peers")}
    assert peers[junk]["reputation_score"] < 100 <= peers[n2.info["peer_id"]]["reputation_score"]
    conflicts = n1.rpc.call("vcoin_consensusConflicts")
    assert conflicts["total"] == 3 and "outvoted" in conflicts["conflicts"][0]["why"]
