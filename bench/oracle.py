"""Oracle response times: price analysis, sentiment, market overview, cold and cached, and
a replicated answer from 3 daemons.

    .venv/bin/python bench/oracle.py [--rounds 5]

The daemons read CoinGecko, NewsAPI and Reddit answers replayed by a real HTTP server on
loopback (the recorded responses in tests/vectors; no traffic leaves the machine).
Cold: the first call after a cache expiry (fetch + analysis); cached: the calls after.
Seed targets: sentiment < 2 s, price < 1 s, overview < 3 s.
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

from devnet.__main__ import DevNode, start_node, stop_all, wait_for_mesh
from devnet.replay import RecordedAPI


def timed(node: DevNode, method: str, params: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    node.client(60).call(method, params)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="cold calls per method")
    ns = p.parse_args()
    api = RecordedAPI()
    base = Path(tempfile.mkdtemp(prefix="vcoin-bench-oracle-"))
    nodes: list[DevNode] = []
    try:
        for i in (1, 2, 3):
            d = base / f"node{i}"
            d.mkdir(parents=True)
            (d / "config.toml").write_text(
                api.oracle_toml("quote_poll_s = 0\nnews_poll_s = 0\nmin_interval_s = 0\n")
            )
        common: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench"}
        nodes.append(start_node(1, base, bootstrap=None, extra=["--no-chain"], **common))
        for i in (2, 3):
            nodes.append(start_node(i, base, bootstrap=nodes[0].p2p_addr,
                                    extra=["--no-chain"], **common))  # fmt: skip
        wait_for_mesh(nodes, 60)
        n1 = nodes[0]
        cases = [
            ("price analysis", "vcoin_oraclePriceAnalysis", [{"symbol": "QUBIC",
                                                               "timeframe": tf}
                                                              for tf in ("1h", "4h", "1d")], 1.0),
            ("sentiment", "vcoin_oracleSentiment", [{"range": r} for r in ("1h", "24h", "7d")],
             2.0),
            ("market overview", "vcoin_oracleMarketOverview", [{"symbol": "QUBIC"}], 3.0),
        ]  # fmt: skip
        for name, method, variants, target in cases:
            cold, warm = [], []
            for r in range(ns.rounds):
                # a fresh daemon cache each round: restart node 1 (its stored data stays)
                if r:
                    stop_all([n1])
                    n1 = nodes[0] = start_node(1, base, bootstrap=None, extra=["--no-chain"],
                                               **common)  # fmt: skip
                cold.append(timed(n1, method, variants[r % len(variants)]))
                warm += [timed(n1, method, variants[r % len(variants)]) for _ in range(5)]
            print(f"{name:<16} cold p50 {1000 * statistics.median(cold):7.1f} ms  max "
                  f"{1000 * max(cold):7.1f} ms   cached p50 {1000 * statistics.median(warm):6.1f}"
                  f" ms   (seed target < {target:g} s)", flush=True)  # fmt: skip
        wait_for_mesh(nodes, 60)
        for n in nodes:
            while sum("oracle" in x["services"] for x in n.rpc.call("vcoin_peers")) < 2:
                time.sleep(0.2)
        rep = [timed(n1, "vcoin_oracleQuery", {"kind": "price", "symbol": "QUBIC",
                                               "window": w, "replicas": 3})
               for w in ("1h", "4h", "1d")]  # fmt: skip
        print(f"replicated price (3 nodes, no chain): p50 {1000 * statistics.median(rep):.0f} ms,"
              f" max {1000 * max(rep):.0f} ms")  # fmt: skip
    finally:
        stop_all(nodes)
        api.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
