"""Consensus-mode latency vs single mode: the same prompts on 3 daemons on loopback.

    .venv/bin/python bench/consensus.py [--prompts 20] [--tokens 16] [--replicas 3] [--keep]

Starts three real vcoind processes serving the random test model and submits each
prompt to node 1 twice, once in single mode and once in consensus mode (--replicas
nodes run it, commit-reveal, weighted vote, signatures), one task at a time and
alternating the modes, after one warm-up task of each mode (the first consensus task
loads the sentence-embedding model on every node). Reports total_s p50/p95/mean per
mode and the consensus/single ratio (target <= 1.3x), the decisions, mean confidence,
whether each consensus answer equals the single-mode one (greedy: all should) and the
signatures per task. Exit 0 when every task completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wire import per_task, snapshot

from devnet.__main__ import (
    TEST_MODEL,
    DevNode,
    ensure_test_model,
    run_task,
    start_node,
    stop_all,
    wait_for_mesh,
)

TARGET = 1.3
TOPICS = [
    "Explain proof of stake",
    "What is a Merkle tree?",
    "Why must a hash function be collision resistant?",
    "Describe how a transformer splits across hosts",
    "How does a gossip protocol spread a message?",
    "What does a validator sign?",
    "Compare commit-reveal with a plain vote",
    "Why does greedy decoding give the same answer twice?",
]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def log_problems(nodes: list[DevNode]) -> list[str]:
    """Per node: how many ERROR / WARNING / Traceback lines its log has."""
    out = []
    for n in nodes:
        text = n.log_path.read_text(errors="replace") if n.log_path.exists() else ""
        lines = text.splitlines()
        c = {k: sum(k in ln for ln in lines) for k in ("ERROR", "WARNING", "Traceback")}
        if any(c.values()):
            out.append(f"node {n.index}: " + ", ".join(f"{v} {k}" for k, v in c.items() if v))
    return out


def summary(name: str, xs: list[float]) -> str:
    if not xs:
        return f"{name:<9} no completed tasks"
    return (f"{name:<9} p50 {statistics.median(xs):6.3f} s  p95 {pct(xs, 0.95):6.3f} s  "
            f"mean {statistics.fmean(xs):6.3f} s  (n={len(xs)})")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=20, help="prompts (each run in both modes)")
    p.add_argument("--tokens", type=int, default=16, help="max_new_tokens per task")
    p.add_argument("--replicas", type=int, default=3, choices=range(2, 6), metavar="2..5")
    p.add_argument("--bid-window", type=float, default=0.25)
    p.add_argument("--timeout", type=float, default=120.0, help="per task, seconds")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (always kept when a run fails)")  # fmt: skip
    ns = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vcoin-bench-consensus-"))
    nodes: list[DevNode] = []
    single: list[dict[str, Any]] = []
    cons: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    problems: list[str] = []
    before: list[Counter[str]] = []
    after: list[Counter[str]] = []
    wall = warm_s = 0.0
    try:
        models = ensure_test_model(base / "models")
        extra = ["--models-dir", str(models), "--bid-window", str(ns.bid_window)]
        opts: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench"}
        n1 = start_node(1, base, bootstrap=None, extra=extra, **opts)
        nodes.append(n1)
        for i in (2, 3):
            nodes.append(start_node(i, base, bootstrap=n1.p2p_addr, extra=extra, **opts))
        wait_for_mesh(nodes, 30)
        while sum(bool(x["models"]) for x in n1.rpc.call("vcoin_peers")) < 2:
            time.sleep(0.2)
        params = {"max_new_tokens": ns.tokens}
        cons_req = {"mode": "consensus", "replicas": ns.replicas}
        t0 = time.monotonic()
        for wm in ({"mode": "single"}, cons_req):
            warm_req = {"model": TEST_MODEL, "input": "warm up", "parameters": params, **wm}
            warm.append(run_task(n1, warm_req, ns.timeout))
        warm_s = time.monotonic() - t0
        before = [snapshot(n) for n in nodes]
        for i in range(ns.prompts):
            req = {"model": TEST_MODEL, "input": f"{TOPICS[i % len(TOPICS)]} (prompt {i})",
                   "parameters": params}  # fmt: skip
            # alternate which mode goes first, so neither always follows the other
            order = [("single", {"mode": "single"}), ("consensus", cons_req)]
            for mode, how in order if i % 2 == 0 else order[::-1]:
                t = run_task(n1, {**req, **how}, ns.timeout)
                (single if mode == "single" else cons).append(t)
        wall = time.monotonic() - t0
        time.sleep(1.0)  # replicas' signatures are collected after completion: re-read
        after = [snapshot(n) for n in nodes]
        cons = [n1.rpc.call("vcoin_getTask", {"task_id": t["task_id"]}) for t in cons]
    except Exception as exc:  # report, keep the logs
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        problems += stop_all(nodes)
    logs = log_problems(nodes)

    tasks = warm + single + cons
    ok = [t for t in tasks if t["status"] == "completed"]
    s_ok = [t for t in single if t["status"] == "completed"]
    c_ok = [t for t in cons if t["status"] == "completed"]
    s_tot = [t["timings"]["total_s"] for t in s_ok]
    c_tot = [t["timings"]["total_s"] for t in c_ok]
    print(f"{ns.prompts} prompts x 2 modes, one at a time -> node 1 of 3 daemons, "
          f"{ns.tokens} new tokens, consensus on {ns.replicas} replicas, "
          "test model on CPU")  # fmt: skip
    if warm:
        wt = ", ".join(f"{t['mode']} {t['timings']['total_s']:.2f} s" if t["timings"]
                       else f"{t['mode']} {t['status']}" for t in warm)  # fmt: skip
        print(f"warm-up: {wt}; whole run {wall:.1f} s ({warm_s:.1f} s warm-up)")
    print(f"completed {len(ok)}/{len(tasks)} (incl. {len(warm)} warm-up)")
    print(summary("single", s_tot))
    print(summary("consensus", c_tot))
    if s_tot and c_tot:
        r50 = statistics.median(c_tot) / statistics.median(s_tot)
        rmean = statistics.fmean(c_tot) / statistics.fmean(s_tot)
        verdict = "met" if max(r50, rmean) <= TARGET else "NOT met"
        print(f"consensus / single: {r50:.2f}x by median, {rmean:.2f}x by mean "
              f"(target <= {TARGET}x: {verdict})")  # fmt: skip
    if c_ok:
        cs = [t["consensus"] for t in c_ok]
        decisions = Counter(c["decision"] for c in cs)
        actions = Counter(c["action"] for c in cs)
        rounds = Counter(c.get("rounds", 1) for c in cs)
        conf = statistics.fmean(c["confidence"] for c in cs)
        print(f"decisions {dict(decisions)}; actions {dict(actions)}; rounds {dict(rounds)}; "
              f"mean confidence {conf:.3f}")  # fmt: skip
        outvoted = sum(not r["agreed"] for c in cs for r in c["replicas"])
        reps = Counter(len(c["replicas"]) for c in cs)
        sigs = Counter(len(c["signatures"]) for c in cs)
        print(f"replicas per task {dict(reps)}, outvoted replicas {outvoted}; "
              f"signatures per task {dict(sigs)}")  # fmt: skip
        phases = [c["history"][-1].get("phases_s", {}) for c in cs]
        names = [
            k
            for k in ("committed", "commits_closed", "revealed", "tallied")
            if all(k in p for p in phases)
        ]
        if names:
            med = ", ".join(f"{k} {statistics.median(p[k] for p in phases):.3f} s" for k in names)
            print(f"median phase ends after assignment: {med}")
        if all("committed" in p for p in phases):
            # Protocol time beyond the slowest replica's compute: from its commitment's
            # arrival (compute done, one gossip hop) to the task's completion.
            over = [1000 * (t["timings"]["total_s"] - t["timings"]["assigned_s"]
                            - c["history"][-1]["phases_s"]["committed"])
                    for t, c in zip(c_ok, cs, strict=True)]  # fmt: skip
            disp = [1000 * t["timings"]["assigned_s"] for t in c_ok]
            print(f"overhead after the slowest replica's commitment: p50 "
                  f"{statistics.median(over):.1f} ms, p95 {pct(over, 0.95):.1f} ms; "
                  f"submit -> assigned p50 {statistics.median(disp):.1f} ms")  # fmt: skip
    if before and after:
        print("wire messages per task, both modes (gossip: valid receipts after de-duplication;")
        print("streams: requests, replies not counted apart; heartbeats left out):")
        for line in per_task(before, after, 2 * ns.prompts):
            print(f"  {line}")
    by_input = {t["input"]: t["result"] for t in s_ok}
    pairs = [(t["result"], by_input[t["input"]]) for t in c_ok if t["input"] in by_input]
    same = sum(a == b for a, b in pairs)
    print(f"consensus answer == single answer for the same prompt: {same}/{len(pairs)}")
    for t in tasks:
        if t["status"] != "completed":
            print(f"bench: task {t['task_id']} ({t['mode']}) {t['status']}: {t['error']}",
                  file=sys.stderr)  # fmt: skip
    for pr in problems:
        print(f"bench: {pr}", file=sys.stderr)
    for lp in logs:
        print(f"bench: log {lp}", file=sys.stderr)
    failed = bool(problems) or not tasks or len(ok) != len(tasks)
    if failed or ns.keep:
        print(f"bench: logs kept in {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
