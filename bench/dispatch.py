"""Task dispatch latency: N concurrent submissions to one of 3 daemons on loopback.

    .venv/bin/python bench/dispatch.py [--tasks 50] [--rate 0] [--strategy resource_aware]

Starts three real vcoind processes serving the random test model, submits --tasks
prompts to node 1 (all at once, or --rate per second) and reports submit -> assigned
latency (p50/p95/max) split into protocol time and queueing, end-to-end completion time,
the spread over nodes, bids per task, the workers' decode speed and the wire messages each
node spent per task (``bench/wire.py``).

Protocol time (issue 25's target: p95 < 20 ms for a burst of 50) is announce -> bids
closed (the bid window) plus the assignment's round trip (request sent -> accepted).
Queueing is the rest of submit -> assigned: submit -> announce (waiting for the
announcer, which sends a burst in one message) and bids closed -> request sent (waiting
behind an earlier request to the same worker, with which it is batched).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wire import per_task, snapshot

from devnet.__main__ import (
    TEST_MODEL,
    ensure_test_model,
    start_node,
    stop_all,
    wait_for_mesh,
)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--tokens", type=int, default=8, help="max_new_tokens per task")
    p.add_argument("--strategy", default="resource_aware")
    p.add_argument("--bid-window", type=float, default=0.25)
    p.add_argument("--rate", type=float, default=0.0,
                   help="submissions per second (0: all at once)")  # fmt: skip
    ns = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="vcoin-bench-") as tmp:
        base = Path(tmp)
        models = ensure_test_model(base / "models")
        extra = ["--models-dir", str(models)]
        opts: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench"}
        n1 = start_node(1, base, bootstrap=None, **opts,
                        extra=[*extra, "--strategy", ns.strategy, "--bid-window",
                               str(ns.bid_window)])  # fmt: skip
        nodes = [n1] + [start_node(i, base, bootstrap=n1.p2p_addr, extra=extra, **opts)
                        for i in (2, 3)]  # fmt: skip
        try:
            wait_for_mesh(nodes, 30)
            while sum(bool(x["models"]) for x in n1.rpc.call("vcoin_peers")) < 2:
                time.sleep(0.2)
            # every node warm (its model loaded): the burst measures dispatch, not start-up
            while not all(any(m["loaded"] for m in n.rpc.call("vcoin_models")["models"])
                          for n in nodes):  # fmt: skip
                time.sleep(0.2)
            warm = n1.rpc.call("vcoin_submitTask", {"model": TEST_MODEL, "input": "warm up"})
            while not n1.rpc.call("vcoin_getTask", warm)["finished"]:
                time.sleep(0.1)

            def one(i: int) -> str:
                if ns.rate > 0:
                    time.sleep(max(0.0, t0 + i / ns.rate - time.monotonic()))
                req = {"model": TEST_MODEL, "input": f"prompt number {i}",
                       "parameters": {"max_new_tokens": ns.tokens}}  # fmt: skip
                return str(n1.rpc.call("vcoin_submitTask", req)["task_id"])

            before = [snapshot(n) for n in nodes]
            t0 = time.monotonic()
            with ThreadPoolExecutor(max_workers=16) as pool:
                ids = list(pool.map(one, range(ns.tasks)))
            done: dict[str, dict[str, Any]] = {}
            while len(done) < len(ids):
                for tid in ids:
                    if tid not in done:
                        t = n1.rpc.call("vcoin_getTask", {"task_id": tid})
                        if t["finished"]:
                            done[tid] = t
                time.sleep(0.05)
            wall = time.monotonic() - t0
            time.sleep(0.5)  # the last results' acknowledgements
            after = [snapshot(n) for n in nodes]
            rejected = n1.rpc.call("vcoin_gossipStats")["rejected"]
        finally:
            problems = stop_all(nodes)
    tasks = list(done.values())
    ok = [t for t in tasks if t["status"] == "completed"]
    assigned = [1000 * t["timings"]["assigned_s"] for t in ok]
    total = [t["timings"]["total_s"] for t in ok]
    tps = [t["timings"]["tokens_per_s"] for t in ok if t["timings"].get("tokens_per_s")]
    spread = Counter(t["node_id"][-6:] for t in ok)
    how = f"at {ns.rate:g}/s" if ns.rate > 0 else "at once"
    print(f"{ns.tasks} tasks {how} -> node 1 of 3 daemons, strategy {ns.strategy}, "
          f"{ns.tokens} new tokens each, test model on CPU")  # fmt: skip
    print(f"completed {len(ok)}/{len(tasks)} in {wall:.2f} s; per node {dict(spread)}")
    print(f"submit -> assigned  p50 {statistics.median(assigned):7.1f} ms  "
          f"p95 {pct(assigned, 0.95):7.1f} ms  max {max(assigned):7.1f} ms")  # fmt: skip
    print(f"submit -> completed p50 {statistics.median(total):7.3f} s   "
          f"p95 {pct(total, 0.95):7.3f} s   max {max(total):7.3f} s")  # fmt: skip
    tm = [t["timings"] for t in ok if "sent_s" in t["timings"]]
    if tm:
        proto = [1000 * (x["bids_s"] - x["announced_s"] + x["assigned_s"] - x["sent_s"])
                 for x in tm]  # fmt: skip
        queue = [1000 * (x["announced_s"] + x["sent_s"] - x["bids_s"]) for x in tm]
        window = [1000 * (x["bids_s"] - x["announced_s"]) for x in tm]
        rtt = [1000 * (x["assigned_s"] - x["sent_s"]) for x in tm]
        for name, xs in (("protocol", proto), ("  bid window", window),
                         ("  assign rtt", rtt), ("queueing", queue)):  # fmt: skip
            print(f"{name:<18}  p50 {statistics.median(xs):7.1f} ms  "
                  f"p95 {pct(xs, 0.95):7.1f} ms  max {max(xs):7.1f} ms")  # fmt: skip
    bids = [len(t["bids"]) for t in ok]
    print(f"bids per task: min {min(bids)}, median {statistics.median(bids)}; "
          f"gossip rejected at node 1: {rejected or 'none'}")  # fmt: skip
    if tps:
        print(f"worker decode speed median {statistics.median(tps):.0f} tokens/s")
    print("wire messages per task (gossip: valid receipts after de-duplication; streams:")
    print("requests, replies not counted apart; heartbeats left out):")
    for line in per_task(before, after, ns.tasks):
        print(f"  {line}")
    for pr in problems:
        print(f"bench: {pr}", file=sys.stderr)
    return 0 if len(ok) == len(tasks) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
