"""Heartbeat propagation latency (publish -> received) across 3 daemons on loopback.

    .venv/bin/python bench/gossip.py [--messages 200] [--interval 0.1] [--relay]

Starts three real vcoind processes (node 2 and 3 bootstrap to node 1), lets them
gossip heartbeats at --interval, and collects every receiver's latency samples
(receive time minus the sender's timestamp; all on one clock) until each node
has at least --messages. --relay forbids direct 2<->3 connections so half the
traffic is relayed through node 1. Prints p50/p95/max per node and overall.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devnet.__main__ import DevNode, start_node, stop_all, wait_for_mesh


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def new_samples(node: DevNode, skip_total: int) -> list[float]:
    """Latency samples (ms) taken after the node had taken ``skip_total`` of them."""
    stats = node.rpc.call("vcoin_gossipStats", {"include_samples": True})
    new = stats["latency"]["total"] - skip_total
    samples: list[float] = stats["samples_ms"]
    return samples[-new:] if new > 0 else []


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=200, help="samples per node (200-1000)")
    p.add_argument("--interval", type=float, default=0.1, help="heartbeat interval, s")
    p.add_argument("--relay", action="store_true", help="nodes 2 and 3 only reach node 1")
    ns = p.parse_args()
    if not 1 <= ns.messages <= 1000:
        p.error("--messages must be 1..1000 (the daemon keeps its last 1000 samples)")
    extra = ["--no-discover"] if ns.relay else []
    with tempfile.TemporaryDirectory(prefix="vcoin-bench-") as tmp:
        base = Path(tmp)
        opts = {
            "heartbeat": ns.interval,
            "peer_timeout": max(3.0, 10 * ns.interval),
            "network": "bench",
        }
        nodes = [start_node(1, base, bootstrap=None, **opts)]
        for i in (2, 3):
            nodes.append(start_node(i, base, bootstrap=nodes[0].p2p_addr, extra=extra, **opts))
        try:
            wait_for_mesh(nodes, 30)
            # discard the start-up phase (connects, mesh building, replays to joiners)
            skip = {n.index: n.rpc.call("vcoin_gossipStats")["latency"]["total"] for n in nodes}
            t0 = time.monotonic()
            while True:
                per = {n.index: new_samples(n, skip[n.index]) for n in nodes}
                if all(len(v) >= ns.messages for v in per.values()):
                    break
                if time.monotonic() - t0 > 600:
                    print("bench: timed out collecting samples", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        finally:
            problems = stop_all(nodes)
    mode = "relayed (2<->3 via node 1)" if ns.relay else "direct mesh"
    print(f"heartbeat gossip latency, 3 daemons on loopback, {mode}, interval {ns.interval} s")
    print(f"{'node':<8}{'samples':>8}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    everything: list[float] = []
    for idx, samples in per.items():
        everything += samples
        print(
            f"{idx:<8}{len(samples):>8}{statistics.median(samples):>10.2f}"
            f"{pct(samples, 0.95):>10.2f}{max(samples):>10.2f}"
        )
    print(
        f"{'all':<8}{len(everything):>8}{statistics.median(everything):>10.2f}"
        f"{pct(everything, 0.95):>10.2f}{max(everything):>10.2f}"
    )
    for pr in problems:
        print(f"bench: {pr}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
