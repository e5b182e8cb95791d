"""Pipeline vs single node: the test model split in two spans over two daemons on loopback.

    .venv/bin/python bench/pipeline.py [--prompts 10] [--tokens 64] [--concurrent 10]
    .venv/bin/python bench/pipeline.py --hidden 1024 --layers 8   # a bigger random model

Node 1 serves the first half of the layers (and the whole model), node 2 the rest.
Each prompt runs on node 1 once as a single-node task and once as a 2-span pipeline, one
at a time, greedy; then ``--concurrent`` pipelined requests are submitted at once.
Reports decode tokens/s of both (target: pipeline >= 0.7x single), per-token bytes and
transfer time per hop, whether every pipelined answer equals the single-node one, and
p50/p95 completion time of the concurrent burst (seed target: p95 < 10 s). Exit 0 when
every task completed and matched.
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

from devnet.__main__ import (
    TEST_MODEL,
    DevNode,
    ensure_test_model,
    run_task,
    start_node,
    stop_all,
    wait_for_mesh,
)

TOPICS = ["Explain proof of stake", "What is a Merkle tree?", "Define gas", "Why hash?",
          "How does gossip spread?", "What does a validator sign?"]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=10)
    p.add_argument("--hidden", type=int, help="hidden size of a bigger random model "
                   "(default: the test model; per-token compute then dwarfs the hops)")  # fmt: skip
    p.add_argument("--layers", type=int, default=4, help="layers of that model")
    ns = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vcoin-bench-pipeline-"))
    nodes: list[DevNode] = []
    ok = True
    try:
        if ns.hidden:
            from vcoind.compute.testmodel import TinyModelSpec, make_test_model

            spec = TinyModelSpec(hidden_size=ns.hidden, intermediate_size=ns.hidden * 11 // 4,
                                 num_layers=ns.layers, num_heads=max(2, ns.hidden // 64),
                                 num_kv_heads=2, init_std=0.05)  # fmt: skip
            make_test_model(base / "models" / TEST_MODEL, spec)
            models = base / "models"
            print(
                f"random model: hidden {ns.hidden}, {ns.layers} layers, "
                f"{sum(f.stat().st_size for f in models.rglob('*.safetensors')) >> 20} MiB"
            )
        else:
            models = ensure_test_model(base / "models")
        half = (ns.layers if ns.hidden else 4) // 2
        last = (ns.layers if ns.hidden else 4) - 1
        common: dict[str, Any] = {"heartbeat": 1.0, "peer_timeout": 6.0, "network": "bench"}
        flags = ["--models-dir", str(models), "--no-chain"]
        nodes.append(start_node(1, base, bootstrap=None, extra=[
            *flags, "--serve-layers", f"{TEST_MODEL}:0-{half - 1}"], **common))  # fmt: skip
        nodes.append(start_node(2, base, bootstrap=nodes[0].p2p_addr, extra=[
            *flags, "--serve-layers", f"{TEST_MODEL}:{half}-{last}"], **common))  # fmt: skip
        wait_for_mesh(nodes, 60)
        n1 = nodes[0]
        while not any(p["spans"] for p in n1.rpc.call("vcoin_peers")):
            time.sleep(0.2)

        def req(prompt: str, pipeline: bool) -> dict[str, Any]:
            return {"model": TEST_MODEL, "input": prompt, "pipeline": pipeline,
                    "parameters": {"max_new_tokens": ns.tokens}}  # fmt: skip

        for pipeline in (False, True):  # warm-up: loads the model and the spans
            run_task(n1, req("warm up", pipeline), 120)
        tps: dict[bool, list[float]] = {False: [], True: []}
        per_tok_bytes, per_tok_transfer, matched = [], [], 0
        for i in range(ns.prompts):
            prompt = f"{TOPICS[i % len(TOPICS)]} ({i})"
            single = run_task(n1, req(prompt, False), 120)
            piped = run_task(n1, req(prompt, True), 120)
            if single["status"] != "completed" or piped["status"] != "completed":
                ok = False
                print(f"  {prompt}: {single['status']} / {piped['status']} {piped['error']}")
                continue
            matched += piped["result"] == single["result"]
            tps[False].append(single["timings"]["tokens_per_s"])
            tps[True].append(piped["timings"]["tokens_per_s"])
            hops = piped["timings"]["hops"]
            steps = max(1, hops[-1]["steps"])
            per_tok_bytes.append(sum(h["bytes"] for h in hops) / steps)
            per_tok_transfer.append(sum(h["transfer_s"] for h in hops) / steps)
        ok &= matched == ns.prompts
        s, q = statistics.median(tps[False]), statistics.median(tps[True])
        print(f"decode tokens/s (median of {ns.prompts}): single {s:.1f}, pipeline {q:.1f} "
              f"-> {q / s:.2f}x (target >= 0.7x)")  # fmt: skip
        b, tr = statistics.median(per_tok_bytes), 1000 * statistics.median(per_tok_transfer)
        print(f"per token: {b:.0f} bytes over the wire, {tr:.2f} ms transfer (all hops)")
        print(f"pipelined answers equal to single-node: {matched}/{ns.prompts}")

        t0 = time.monotonic()
        ids = [n1.rpc.call("vcoin_submitTask", req(TOPICS[i % len(TOPICS)], True))["task_id"]
               for i in range(ns.concurrent)]  # fmt: skip
        lat = []
        for tid in ids:
            while not (t := n1.rpc.call("vcoin_getTask", {"task_id": tid}))["finished"]:
                time.sleep(0.02)
            ok &= t["status"] == "completed"
            lat.append(t["completed_at"] - t["created_at"])
        lat.sort()
        print(f"{ns.concurrent} concurrent pipelined requests: p50 {statistics.median(lat):.2f} s"
              f"  p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s  (all in "
              f"{time.monotonic() - t0:.2f} s; seed target p95 < 10 s)")  # fmt: skip
    finally:
        stop_all(nodes)
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
