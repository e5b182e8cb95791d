"""Chaos run (issue 26): real daemons on anvil, a seeded mix of tasks, a seeded schedule of
faults, then invariants over every node's SQLite and the chain.

    python bench/chaos.py                          # 5 nodes, 200 tasks, at most 10 minutes
    python bench/chaos.py --tasks 30 --minutes 2 --seed 7 --json out.json
    python bench/chaos.py --keep                   # keep the datadirs and logs

Exit code 0 only when every invariant passes. Chain writes count as done 3 blocks deep
(``chain.confirmations = 3``); the harness mines a block a second so they get there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_check as check
import openai
from chaos_faults import Injected, chain_call, inject, schedule
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
from devnet.chain import Anvil, deploy_devnet, fund_nodes, start_anvil
from vcoind.chain.contracts import Contracts
from vcoind.consensus.outcome import task_id_bytes32
from vcoind.datadir import DataDir

PROMPTS = ["Explain proof of stake", "What is a GPU?", "Describe a Merkle tree",
           "Why do blocks have headers?", "Name a prime number"]  # fmt: skip
KIND_WEIGHTS = {"single": 4, "consensus": 2, "pipeline": 2, "gateway": 2}
ENV = {  # read by the daemons (children): settle 3 blocks deep, retry and reassign quickly
    "VCOIN_CHAIN_CONFIRMATIONS": "3",
    "VCOIN_CHAIN_RETRY_MAX_S": "3",
    "VCOIN_CHAIN_TIMEOUT_S": "5",
    "VCOIN_CHAIN_STAKE_REFRESH_S": "1",
    "VCOIN_MARKET_TASK_TIMEOUT_S": "15",
}


@dataclass(frozen=True)
class Spec:
    n: int
    kind: str
    origin: int
    prompt: str


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Run:
    def __init__(self, ns: argparse.Namespace, base: Path) -> None:
        self.ns, self.base = ns, base
        self.rng = random.Random(ns.seed)
        self.nodes: dict[int, DevNode] = {}
        self.ports = {i: (free_port(), free_port()) for i in range(1, ns.nodes + 1)}
        self.addr: dict[int, str] = {}
        self.restarted: set[int] = set()
        self.lock = threading.Lock()  # node replacement
        self.chain_lock = threading.Lock()  # the miner, a frozen anvil, a reorg
        self.done = threading.Event()
        self.submitted: list[check.Submitted] = []
        self.client_errors: Counter[str] = Counter()
        self.faults: list[Injected] = []
        self.anvil: Anvil | None = None

    # --- the nodes ---------------------------------------------------------------------

    def node(self, index: int) -> DevNode:
        with self.lock:
            return self.nodes[index]

    def _start(self, i: int, bootstrap: str | None, wait: bool) -> DevNode:
        assert self.anvil is not None
        p2p, rpc = self.ports[i]
        extra = ["--models-dir", str(self.base / "models"), "--chain-rpc", self.anvil.url,
                 "--contracts", str(self.base / "deployment.json"), "--rpc-addr",
                 f"127.0.0.1:{rpc}", "--serve-layers", f"{TEST_MODEL}:auto:2"]  # fmt: skip
        return start_node(i, self.base, bootstrap=bootstrap, heartbeat=0.5, peer_timeout=5.0,
                          network="devnet", extra=extra, listen=f"/ip4/127.0.0.1/tcp/{p2p}",
                          cpu_threads=1, wait=wait, timeout=120)  # fmt: skip

    def restart(self, index: int) -> DevNode:
        """Same datadir, same ports; bootstraps to another node (any one that is up)."""
        other = next(a for i, a in sorted(self.addr.items()) if i != index)
        n = self._start(index, other, wait=True)
        with self.lock:
            self.nodes[index] = n
            self.restarted.add(index)
        return n

    def bring_up(self) -> None:
        self.anvil = start_anvil(free_port(8546), self.base / "anvil.log")
        threading.Thread(target=self._miner, daemon=True).start()
        d = deploy_devnet(self.anvil.url, self.base / "deployment.json", "devnet")
        self.deployment = d
        ensure_test_model(self.base / "models")
        first = self._start(1, None, wait=True)
        self.nodes[1] = first
        for i in range(2, self.ns.nodes + 1):
            self.nodes[i] = self._start(i, first.p2p_addr, wait=False)
        self.addr = {i: n.p2p_addr for i, n in self.nodes.items()}
        wait_for_mesh(list(self.nodes.values()), 120)
        nodes = list(self.nodes.values())
        fund_nodes(self.anvil.url, d, [n.info["eth_address"] for n in nodes])
        stake_all(nodes, 1000, timeout=120)
        deposit_all(nodes, 100)
        self.peer_of = {i: str(n.info["peer_id"]) for i, n in self.nodes.items()}
        # Workers refuse a requester whose deposit they do not see yet: 3 blocks deep at a
        # block a second, then their next stake refresh (1 s).
        time.sleep(6)
        warm = {"model": TEST_MODEL, "input": "warm up", "mode": "consensus", "replicas": 3,
                "parameters": {"max_new_tokens": 4}}  # fmt: skip
        for n in nodes:  # every node loads the model before the RSS baseline
            self._wait(n.index, str(n.rpc.call("vcoin_submitTask", warm)["task_id"]), 120)

    def _miner(self) -> None:
        """A block a second (anvil mines one per transaction, then waits for more): chain
        writes reach their 3 confirmations; frozen while anvil is."""
        while not self.done.is_set():
            time.sleep(1)
            with self.chain_lock:
                try:
                    assert self.anvil is not None
                    chain_call(self.anvil.url, "anvil_mine", [1], timeout=2)
                except (OSError, RuntimeError, ValueError):
                    pass

    # --- the client --------------------------------------------------------------------

    def plan(self) -> list[Spec]:
        kinds = list(KIND_WEIGHTS)
        weights = list(KIND_WEIGHTS.values())
        return [Spec(n, self.rng.choices(kinds, weights)[0], n % self.ns.nodes + 1,
                     self.rng.choice(PROMPTS)) for n in range(self.ns.tasks)]  # fmt: skip

    def _submit(self, s: Spec) -> str | None:
        n = self.node(s.origin)
        params = {"max_new_tokens": 8, "temperature": 0}
        if s.kind == "gateway":
            base = n.info["rpc_url"].rstrip("/") + "/v1"
            c = openai.OpenAI(base_url=base, api_key=DataDir(n.datadir).read_cookie(),
                              max_retries=0, timeout=120)  # fmt: skip
            task_id = None
            stream = c.chat.completions.create(
                model=TEST_MODEL, messages=[{"role": "user", "content": s.prompt}],
                max_tokens=8, temperature=0, stream=True)  # fmt: skip
            try:
                for ch in stream:
                    if task_id is None:
                        task_id = ch.id.removeprefix("chatcmpl-")
                        self._record(s, task_id)
            except Exception as exc:
                self.client_errors[f"gateway stream: {type(exc).__name__}"] += 1
            return None  # already recorded, and the stream has ended
        req: dict[str, Any] = {"model": TEST_MODEL, "input": s.prompt, "parameters": params}
        if s.kind == "consensus":
            req |= {"mode": "consensus", "replicas": 3}
        elif s.kind == "pipeline":
            req["pipeline"] = True
        task_id = str(n.client(15).call("vcoin_submitTask", req)["task_id"])
        self._record(s, task_id)
        return task_id

    def _record(self, s: Spec, task_id: str) -> None:
        with self.lock:
            self.submitted.append(check.Submitted(task_id, s.origin, s.kind, True))

    def _wait(self, origin: int, task_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                t = self.node(origin).rpc.call("vcoin_getTask", {"task_id": task_id})
                if t["finished"]:
                    return
            except Exception:
                pass
            time.sleep(0.2)

    def client(self, queue: list[Spec], t0: float, window: float) -> None:
        """Submits in turn, each task not before its share of the window (so the faults meet
        tasks throughout), and waits for it."""
        while time.monotonic() < t0 + window:
            with self.lock:
                if not queue:
                    return
                s = queue.pop(0)
            time.sleep(max(0.0, t0 + 0.9 * window * s.n / self.ns.tasks - time.monotonic()))
            try:
                task_id = self._submit(s)
            except Exception as exc:
                self.client_errors[f"{s.kind} submit: {type(exc).__name__}"] += 1
                time.sleep(0.5)
                continue
            if task_id:
                self._wait(s.origin, task_id, 120)

    # --- the run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.bring_up()
        window = self.ns.minutes * 60
        short = window <= 180
        faults = schedule(self.rng, self.ns.nodes, window, short)
        queue = self.plan()
        rss_warm = {i: rss_kib(n.proc.pid) for i, n in self.nodes.items()}
        t0 = time.monotonic()
        self.started = time.time()
        clients = [threading.Thread(target=self.client, args=(queue, t0, window)) for _ in range(2)]
        for c in clients:
            c.start()
        log(f"client started: {self.ns.tasks} tasks, {len(faults)} faults in {window:g} s")
        for f in faults:
            while time.monotonic() < t0 + f.at_s and any(c.is_alive() for c in clients):
                time.sleep(0.2)
            if not any(c.is_alive() for c in clients):
                break
            self.faults.append(inject(f, self, self.anvil, self.chain_lock, log))  # type: ignore[arg-type]
        for c in clients:
            c.join()
        log(f"client done: {len(self.submitted)} submitted; settling")
        self._settle(180)
        rss_end = {i: rss_kib(n.proc.pid) for i, n in self.nodes.items()}
        problems = stop_all(list(self.nodes.values()), timeout=30)
        self.done.set()
        return self.verdicts(rss_warm, rss_end, problems)

    def _settle(self, timeout: float) -> None:
        """Until no node has a chain write pending (they keep landing as blocks come)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = 0
            for i in self.nodes:
                try:
                    ops = self.node(i).rpc.call("vcoin_chainOps", {"limit": 1})
                    pending += int(ops["counts"].get("pending", 0))
                except Exception:
                    pending += 1
            if not pending:
                return
            time.sleep(1)
        log("chain writes still pending at the settle deadline")

    def verdicts(self, rss_warm: dict[int, int], rss_end: dict[int, int],
                 stop_problems: list[str]) -> dict[str, Any]:  # fmt: skip
        dbs = {i: n.datadir / "vcoin.db" for i, n in self.nodes.items()}
        dbs = {i: p for i, p in dbs.items() if p.exists()} or {
            i: next(n.datadir.glob("*.db")) for i, n in self.nodes.items()}  # fmt: skip
        anchored, paid = self._chain_events(dbs)
        assert self.anvil is not None
        self.anvil.stop()
        vs = [
            check.task_outcomes(dbs, self.submitted),
            check.single_execution(dbs, self.peer_of),
            check.deterministic_answers(dbs, self.submitted),
            check.settlements(dbs, anchored, paid),
            check.integrity(dbs),
            check.unhandled_tracebacks({i: n.log_path for i, n in self.nodes.items()}),
        ]
        junk = check.Verdict("faults taken as they should (junk RPC answered, restarts)")
        for r in self.faults:
            if r.error:
                junk.fail(f"{r.fault.kind} node {r.fault.target}: {r.error}")
        clean = check.Verdict("every daemon stopped cleanly")
        for p in stop_problems:
            clean.fail(p.splitlines()[0])
        vs += [junk, clean]
        return self.report(dbs, vs, rss_warm, rss_end)

    def _chain_events(self, dbs: dict[int, Path]) -> tuple[dict[str, int], list[check.Paid]]:
        assert self.anvil is not None
        c = Contracts.at(Web3(Web3.HTTPProvider(self.anvil.url)), self.deployment.addresses)
        ids: dict[bytes, str] = {}
        for p in dbs.values():
            with check.connect(p) as db:
                ids |= {task_id_bytes32(r[0]): r[0] for r in db.execute("SELECT id FROM tasks")}
        anchored: Counter[str] = Counter()
        for e in c.anchor.events.Anchored().get_logs(from_block=0):
            anchored[ids.get(bytes(e["args"]["taskId"]), bytes(e["args"]["taskId"]).hex())] += 1
        events = c.anchor.events.Paid().get_logs(from_block=0)
        paid = [check.Paid(ids.get(bytes(a["taskId"]), bytes(a["taskId"]).hex()), a["worker"],
                           int(a["toWorker"]) + int(a["minted"]))
                for a in (e["args"] for e in events)]  # fmt: skip
        return dict(anchored), paid

    def report(self, dbs: dict[int, Path], vs: list[check.Verdict], rss_warm: dict[int, int],
               rss_end: dict[int, int]) -> dict[str, Any]:  # fmt: skip
        outcomes: Counter[str] = Counter()
        done_at: list[tuple[float, int, str]] = []  # (completed_at, origin, worker peer)
        origin_of = {s.task_id: s for s in self.submitted}
        for i, p in dbs.items():
            with check.connect(p) as db:
                for r in db.execute("SELECT id, status, node_id, completed_at FROM tasks"):
                    s = origin_of.get(r["id"])
                    if s is not None and s.origin == i:
                        outcomes[f"{s.kind} {r['status']}"] += 1
                        if r["status"] == "completed" and r["completed_at"]:
                            done_at.append((r["completed_at"], i, r["node_id"] or ""))
        done_at.sort()
        recovery: dict[str, list[float]] = {}
        for f in self.faults:
            peer = self.peer_of.get(f.fault.target, "")
            nxt = next((t for t, o, w in done_at if t > f.end and (
                f.fault.target in (0, o) or (peer and peer == w))), None)  # fmt: skip
            if nxt is not None:
                recovery.setdefault(f.fault.kind, []).append(nxt - f.start)
        rec = {k: {"n": len(v), "p50_s": round(statistics.median(v), 1),
                   "p95_s": round(sorted(v)[math.ceil(0.95 * len(v)) - 1], 1)}
               for k, v in recovery.items()}  # fmt: skip
        rss = {i: {"warm_mib": rss_warm[i] // 1024, "end_mib": rss_end.get(i, 0) // 1024,
                   "restarted": i in self.restarted} for i in rss_warm}  # fmt: skip
        out = {
            "seed": self.ns.seed,
            "nodes": self.ns.nodes,
            "tasks_planned": self.ns.tasks,
            "submitted": len(self.submitted),
            "outcomes": dict(sorted(outcomes.items())),
            "client_errors": dict(self.client_errors),
            "faults": dict(Counter(f.fault.kind for f in self.faults)),
            "fault_log": [
                {
                    **asdict(f.fault),
                    "t_s": round(f.start - self.started, 1),
                    "detail": f.detail,
                    "error": f.error,
                }
                for f in self.faults
            ],
            "invariants": [
                {
                    "name": v.name,
                    "ok": v.ok,
                    "count": v.count,
                    "note": v.note,
                    "problems": v.problems,
                }
                for v in vs
            ],
            "recovery": rec,
            "rss": rss,
        }
        print_report(out)
        return out


def print_report(r: dict[str, Any]) -> None:
    print(f"\nchaos: seed {r['seed']}, {r['nodes']} nodes, {r['submitted']} of "
          f"{r['tasks_planned']} tasks submitted", flush=True)  # fmt: skip
    print("tasks by outcome: " + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()))
    if r["client_errors"]:
        print("client errors (not submitted or stream cut): "
              + ", ".join(f"{k} {v}" for k, v in r["client_errors"].items()))  # fmt: skip
    print("faults by kind: " + ", ".join(f"{k} {v}" for k, v in r["faults"].items()))
    for f in r["fault_log"]:
        print(f"  t+{f['t_s']:6.1f}s {f['kind']:8} node {f['target']}  {f['detail']}"
              f"{'  ERROR ' + f['error'] if f['error'] else ''}")  # fmt: skip
    print("recovery (fault to the next task completed through the node): " + ", ".join(
        f"{k} p50 {v['p50_s']} s p95 {v['p95_s']} s (n={v['n']})"
        for k, v in r["recovery"].items()))  # fmt: skip
    print("RSS MiB warm -> end: " + ", ".join(
        f"n{i} {v['warm_mib']}->{v['end_mib']}{' (restarted)' if v['restarted'] else ''}"
        for i, v in r["rss"].items()))  # fmt: skip
    for v in r["invariants"]:
        note = f" ({v['note']})" if v["note"] else ""
        print(f"{'PASS' if v['ok'] else 'FAIL'}  {v['name']}{note}"
              + ("" if v["ok"] else f": {v['count']} problem(s)"))  # fmt: skip
        for p in v["problems"]:
            print(f"      {p}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--minutes", type=float, default=10.0, help="stop submitting after this")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nodes", type=int, default=5)
    p.add_argument("--dir", type=Path, help="where the datadirs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the datadirs and logs")
    p.add_argument("--json", type=Path, help="write the report here")
    ns = p.parse_args(argv)
    if ns.nodes < 3:
        p.error("--nodes must be at least 3 (consensus tasks take 3 replicas)")
    base = ns.dir or Path(tempfile.mkdtemp(prefix="vcoin-chaos-"))
    os.environ.update(ENV)
    run = Run(ns, base)
    ok = False
    try:
        out = run.run()
        ok = all(v["ok"] for v in out["invariants"])
        if ns.json:
            ns.json.write_text(json.dumps(out, indent=1))
    finally:
        run.done.set()
        for n in run.nodes.values():
            if n.proc.poll() is None:
                n.proc.kill()
                n.proc.wait()
        if run.anvil is not None:
            run.anvil.stop()
        if ns.keep or not ok:
            print(f"chaos: datadirs and logs in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
