"""Anchoring latency and throughput: 3 daemons on an anvil chain, tasks anchored as they end.

    .venv/bin/python bench/chain.py [--tasks 30] [--consensus 5] [--keep]

Starts anvil, deploys the contracts, starts three vcoind processes on it serving the test
model, funds them, has each stake 1000 VCOIN and node 1 deposit 100 VCOIN to pay its
tasks' workers (settlement v2). Then submits ``--tasks`` single-mode
tasks (4 tokens) at once and ``--consensus`` consensus tasks one by one to node 1, and for
each measures task completed -> anchored (seen by polling vcoin_getTask every 20 ms), the
anchor's block, and what the workers were paid. Reports p50/p95 and the anchors per second the
origin's write queue sustained. Exit 0 when every task completed and was anchored once.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from web3 import Web3

from devnet.__main__ import (
    TEST_MODEL,
    DevNode,
    deposit_all,
    ensure_test_model,
    free_port,
    stake_all,
    start_node,
    stop_all,
    wait_for_mesh,
)
from devnet.chain import deploy_devnet, fund_nodes, start_anvil
from vcoind.chain.contracts import Contracts
from vcoind.consensus.outcome import task_id_bytes32


def watch(origin: DevNode, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll until every task is finished and anchored (or failed): per task, completed_at,
    the time its anchor was first seen, and the task view."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(ids) and time.monotonic() < deadline:
        for i in ids:
            if i in seen:
                continue
            t = origin.rpc.call("vcoin_getTask", {"task_id": i})
            a = t.get("anchor") or {}
            if t["finished"] and (t["status"] != "completed" or a.get("status") in
                                  ("anchored", "failed")):  # fmt: skip
                seen[i] = {"task": t, "anchored_at": time.time()}
        time.sleep(0.02)
    return seen


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=int, default=30, help="single-mode tasks, submitted at once")
    p.add_argument("--consensus", type=int, default=5, help="consensus tasks, one at a time")
    p.add_argument("--keep", action="store_true", help="keep the datadirs")
    ns = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vcoin-bench-chain-"))
    anvil = start_anvil(free_port(), base / "anvil.log")
    nodes: list[DevNode] = []
    ok = True
    try:
        d = deploy_devnet(anvil.url, base / "deployment.json", "bench")
        models = ensure_test_model(base / "models")
        extra = ["--models-dir", str(models), "--chain-rpc", anvil.url,
                 "--contracts", str(base / "deployment.json")]  # fmt: skip
        common: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench",
                                  "extra": extra}  # fmt: skip
        nodes.append(start_node(1, base, bootstrap=None, **common))
        for i in (2, 3):
            nodes.append(start_node(i, base, bootstrap=nodes[0].p2p_addr, **common))
        wait_for_mesh(nodes, 60)
        fund_nodes(anvil.url, d, [n.info["eth_address"] for n in nodes])
        stake_all(nodes, 1000)
        deposit_all(nodes[:1], 100)
        n1 = nodes[0]
        req = {"model": TEST_MODEL, "input": "warm up", "parameters": {"max_new_tokens": 4}}
        watch(n1, [n1.rpc.call("vcoin_submitTask", req)["task_id"]], 120)

        t0 = time.monotonic()
        ids = [n1.rpc.call("vcoin_submitTask", {**req, "input": f"task {k}"})["task_id"]
               for k in range(ns.tasks)]  # fmt: skip
        single = watch(n1, ids, 300)
        burst_s = time.monotonic() - t0
        cons: dict[str, dict[str, Any]] = {}
        for k in range(ns.consensus):
            creq = {**req, "input": f"consensus {k}", "mode": "consensus", "replicas": 3}
            cid = n1.rpc.call("vcoin_submitTask", creq)["task_id"]
            cons.update(watch(n1, [cid], 120))

        w3 = Web3(Web3.HTTPProvider(anvil.url))
        anchor = Contracts.at(w3, d.addresses).anchor
        for name, got, want in (("single", single, ns.tasks), ("consensus", cons, ns.consensus)):
            lat = []
            for tid, r in got.items():
                t, a = r["task"], r["task"].get("anchor") or {}
                if t["status"] != "completed" or a.get("status") != "anchored":
                    ok = False
                    print(f"  {tid}: {t['status']} / anchor {a.get('status')} {a.get('error')}")
                    continue
                events = anchor.events.Anchored().get_logs(
                    from_block=0, argument_filters={"taskId": task_id_bytes32(tid)})  # fmt: skip
                ok &= len(events) == 1
                lat.append(r["anchored_at"] - t["completed_at"])
            ok &= len(got) == want
            if lat:
                p50, p95 = statistics.median(lat), sorted(lat)[int(0.95 * (len(lat) - 1))]
                print(f"{name:<9} completed -> anchored  p50 {p50:.3f} s  p95 {p95:.3f} s  "
                      f"max {max(lat):.3f} s  (n={len(lat)})")  # fmt: skip
        print(f"burst: {ns.tasks} tasks submitted at once, all anchored after {burst_s:.2f} s "
              f"({ns.tasks / burst_s:.1f} anchors/s including inference)")  # fmt: skip
        print(f"chain: {w3.eth.block_number} blocks on anvil")
    finally:
        stop_all(nodes)
        anvil.stop()
        if ns.keep:
            print(f"datadirs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
