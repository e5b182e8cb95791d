"""Task dispatch latency: N concurrent submissions to one of 3 daemons on loopback.

    .venv/bin/python bench/dispatch.py [--tasks 50] [--rate 0] [--strategy resource_aware]

Starts three real vcoind processes serving the random test model, submits --tasks
prompts to node 1 (all at once, or --rate per second) and reports submit -> assigned
latency (p50/p95/max; the seeds ask < 100 ms), end-to-end completion time, the
spread over nodes, bids per task and the workers' decode speed.
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
    bids = [len(t["bids"]) for t in ok]
    print(f"bids per task: min {min(bids)}, median {statistics.median(bids)}; "
          f"gossip rejected at node 1: {rejected or 'none'}")  # fmt: skip
    if tps:
        print(f"worker decode speed median {statistics.median(tps):.0f} tokens/s")
    for pr in problems:
        print(f"bench: {pr}", file=sys.stderr)
    return 0 if len(ok) == len(tasks) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
