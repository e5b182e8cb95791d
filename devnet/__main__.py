"""Local devnet: N vcoind processes on loopback that find each other.

    python -m devnet                 # 3 nodes, live status line, Ctrl-C stops all
    python -m devnet --nodes 5
    python -m devnet --check         # bring up, verify full mesh, stop cleanly; exit 0/1
    python -m devnet --chain embedded  # no anvil: each daemon has its own in-process EVM
    python -m devnet --netns         # as root: a public node and two behind NATs, each in
                                     # its own network namespace (devnet/netns.py)

Node 1 starts first; the others bootstrap to it and learn each other through
gossip. Each node has its own datadir (keys, config, SQLite, log) under --dir.
With --chain anvil (the default) an anvil chain is started first, the contracts are
deployed on it, and every node is funded and stakes 1000 VCOIN before the demo tasks,
whose outcomes are anchored on that chain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devnet.chain import (
    Anvil,
    ChainSetupError,
    deploy_devnet,
    fund_nodes,
    has_anvil,
    start_anvil,
)
from devnet.chat import ChatDemoError, demo_chat
from devnet.zygote import ForkedProc, Zygote
from vcoind.cli import ClientError, RPCClient
from vcoind.datadir import DataDir

# When set (the test suite does), daemons are forked from it instead of started with
# ``python -m vcoind``: the same entry point, without re-importing its stack each time.
ZYGOTE: Zygote | None = None


class DevnetError(Exception):
    pass


@dataclass
class DevNode:
    index: int
    datadir: Path
    proc: subprocess.Popen[bytes] | ForkedProc
    log_path: Path
    _info: dict[str, Any] | None = None
    timeout: float = 60.0
    started: float = 0.0  # time.monotonic() at launch

    @property
    def info(self) -> dict[str, Any]:
        """The daemon's run file once it is up (waits for it: ``start_node(wait=False)``
        launches several daemons at once and each is waited for when first used)."""
        if self._info is None:
            self._info = _wait_up(self)
        return self._info

    @property
    def rpc(self) -> RPCClient:
        return self.client(5)

    def client(self, timeout: float) -> RPCClient:
        """An RPC client for calls that may take longer (chain writes wait for receipts)."""
        return RPCClient(self.info["rpc_url"], DataDir(self.datadir).read_cookie(), timeout)

    @property
    def p2p_addr(self) -> str:
        return str(self.info["p2p_addrs"][0])


def start_node(
    index: int,
    base: Path,
    *,
    bootstrap: str | None,
    heartbeat: float,
    peer_timeout: float,
    network: str,
    extra: list[str] | None = None,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    timeout: float = 60.0,
    cpu_threads: int | None = None,
    wait: bool = True,
) -> DevNode:
    datadir = base / f"node{index}"
    datadir.mkdir(parents=True, exist_ok=True)
    log_path = datadir / "vcoind.log"
    cmd = [
        sys.executable,
        "-m",
        "vcoind",
        "--datadir",
        str(datadir),
        "--network",
        network,
        "--listen",
        listen,
        "--rpc-addr",
        "127.0.0.1:0",
        "--heartbeat-interval",
        str(heartbeat),
        "--peer-timeout",
        str(peer_timeout),
        *(["--bootstrap", bootstrap] if bootstrap else []),
        # Several daemons share this box: torch's default (all cores each) oversubscribes it.
        "--cpu-threads",
        str(cpu_threads or max(1, (os.cpu_count() or 1) // 3)),
        *(extra or []),
    ]
    dd = DataDir(datadir)
    dd.remove_run_file()  # a stale file from a killed run must not be mistaken for ours
    proc: subprocess.Popen[bytes] | ForkedProc
    if ZYGOTE is not None:
        proc = ZYGOTE.spawn(cmd[3:], dict(os.environ), log_path)
    else:
        log = log_path.open("ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        log.close()
    node = DevNode(index, datadir, proc, log_path, timeout=timeout, started=time.monotonic())
    if wait:
        node.info  # noqa: B018 (waits until it is up)
    return node


def _wait_up(node: DevNode) -> dict[str, Any]:
    dd = DataDir(node.datadir)
    deadline = node.started + node.timeout
    while time.monotonic() < deadline:
        info = dd.read_run_file()
        if info and info.get("pid") == node.proc.pid:
            return info
        if node.proc.poll() is not None:
            raise DevnetError(
                f"node {node.index} exited with code {node.proc.returncode}:\n"
                + tail(node.log_path)
            )
        time.sleep(0.1)
    node.proc.kill()
    raise DevnetError(
        f"node {node.index} did not start within {node.timeout:.0f} s:\n" + tail(node.log_path)
    )


def free_port(preferred: int = 0) -> int:
    """``preferred`` if nothing listens there, else any free loopback port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DevnetError("no free port")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def peer_ids(node: DevNode) -> set[str]:
    return {p["peer_id"] for p in node.rpc.call("vcoin_peers")}


def wait_for_mesh(nodes: list[DevNode], timeout: float) -> float:
    """Wait until every node lists every other node; returns seconds taken."""
    t0 = time.monotonic()
    ids = {n.info["peer_id"] for n in nodes}
    while True:
        missing = {}
        for n in nodes:
            try:
                seen = peer_ids(n)
            except ClientError as exc:
                seen, missing[n.index] = set(), {str(exc)}
            want = ids - {n.info["peer_id"]}
            if not want <= seen:
                missing[n.index] = want - seen
        if not missing:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            detail = "; ".join(f"node {i} misses {len(m)}" for i, m in missing.items())
            raise DevnetError(f"no full mesh after {timeout:.0f} s: {detail}")
        time.sleep(0.2)


def stop_all(nodes: list[DevNode], timeout: float = 20.0) -> list[str]:
    """SIGTERM every node; returns problems (non-zero exit, leftover run.json)."""
    problems = []
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    for n in nodes:
        try:
            code = n.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            code = n.proc.wait()
            problems.append(f"node {n.index} did not stop within {timeout:.0f} s (killed)")
        if code != 0:
            problems.append(f"node {n.index} exited with code {code}:\n" + tail(n.log_path))
        if (n.datadir / "run.json").exists():
            problems.append(f"node {n.index} left run.json behind")
    return problems


def print_table(nodes: list[DevNode]) -> None:
    rows = [("NODE", "PEER ID", "P2P ADDRESS", "RPC URL")]
    for n in nodes:
        rows.append(
            (str(n.index), n.info["peer_id"], n.p2p_addr.split("/p2p/")[0], n.info["rpc_url"])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def status_line(nodes: list[DevNode], started: float) -> str:
    parts = []
    for n in nodes:
        try:
            st = n.rpc.call("vcoin_clusterStatus")
            lat = st["gossip"]["latency"]
            parts.append(f"n{n.index}:{st['active_nodes'] - 1}p/{lat.get('p95_ms', '-')}ms")
        except ClientError:
            parts.append(f"n{n.index}:down")
    return f"[{time.monotonic() - started:6.0f}s] peers/gossip-p95  " + "  ".join(parts)


TEST_MODEL = "tiny-qwen2"


def ensure_test_model(models: Path) -> Path:
    """The random Qwen2 test model every devnet node serves (made once per devnet dir)."""
    if not (models / TEST_MODEL / "config.json").exists():
        from vcoind.compute.testmodel import make_test_model

        print(f"making the test model {TEST_MODEL} in {models}", flush=True)
        make_test_model(models / TEST_MODEL)
    return models


def run_task(node: DevNode, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Submit ``req`` to ``node`` and wait for it (``wait_task``)."""
    return wait_task(node, node.rpc.call("vcoin_submitTask", req)["task_id"], timeout)


def wait_task(node: DevNode, task_id: str, timeout: float) -> dict[str, Any]:
    """Poll the task until it finishes (status "timeout" if it does not within
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        t: dict[str, Any] = node.rpc.call("vcoin_getTask", {"task_id": task_id})
        if t["finished"]:
            return t
        if time.monotonic() > deadline:
            return {**t, "status": "timeout", "error": f"not finished after {timeout:g} s"}
        time.sleep(0.02)


def _run_completed(origin: DevNode, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    t = run_task(origin, req, timeout)
    if t["status"] != "completed":
        raise DevnetError(f"demo task {t['task_id']} {t['status']}: {t['error']}")
    return t


def wait_anchor(origin: DevNode, task_id: str, timeout: float = 30.0) -> dict[str, Any] | None:
    """The task's anchor once it is on chain (or failed), else as it stands at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        a: dict[str, Any] | None = origin.rpc.call("vcoin_getTask", {"task_id": task_id}).get(
            "anchor"
        )
        if (a and a["status"] in ("anchored", "failed")) or time.monotonic() > deadline:
            return a
        time.sleep(0.1)


def amount(vcoin: float) -> str:
    """VCOIN without exponent notation: 0.000096 VCOIN, not 9.6e-05."""
    return f"{vcoin:.8f}".rstrip("0").rstrip(".") + " VCOIN"


def print_anchor(origin: DevNode, task_id: str) -> None:
    a = wait_anchor(origin, task_id)
    if a is None:
        print("  anchor: none (no chain)", flush=True)
        return
    if a["status"] != "anchored":
        print(f"  anchor: {a['status']} {a.get('error') or ''}", flush=True)
        return
    print(f"  anchored: tx {a['tx_hash']} in block {a['block']}", flush=True)
    rewards = a.get("rewards") or []
    if not any(r["gross"] for r in rewards):
        print(f"    unpaid (price 0): signed by {len(rewards)} node(s); nothing paid, burned or "
              "minted", flush=True)  # fmt: skip
        rewards = []
    for r in rewards:
        print(f"    {r['node']}: requester paid {amount(r['gross'])}, worker got "
              f"{amount(r['to_worker'])} + minted {amount(r['minted'])}; burned "
              f"{amount(r['burned'])}, fee {amount(r['fee'])}", flush=True)  # fmt: skip
    if rewards:
        total = {k: sum(r[k] for r in rewards) for k in ("gross", "burned", "minted")}
        print(f"    total: requester paid {amount(total['gross'])}, burned "
              f"{amount(total['burned'])}, minted {amount(total['minted'])}",
              flush=True)  # fmt: skip
    for r in a.get("slashed") or []:
        print(f"    slash of {r['node']}: {r['status']}", flush=True)


def stake_all(nodes: list[DevNode], amount: float, timeout: float = 60.0) -> None:
    """Each node stakes through its own RPC; then wait until every node sees every node
    (itself included) eligible, since bids from unstaked nodes are ignored."""
    for n in nodes:
        r = n.client(40).call("vcoin_stake", {"amount": amount, "wait_s": 30})
        if r["status"] != "done":
            raise DevnetError(f"node {n.index} could not stake: {r}")
    deadline = time.monotonic() + timeout
    while True:
        missing = [
            (n.index, p["peer_id"][-6:]) for n in nodes for p in n.rpc.call("vcoin_peers")
            if not (p.get("stake") or {}).get("eligible")
        ]  # fmt: skip
        if not missing:
            break
        if time.monotonic() > deadline:
            raise DevnetError(f"stake not visible after {timeout:g} s: {missing}")
        time.sleep(0.2)
    print(f"staked {amount:g} VCOIN on each of {len(nodes)} nodes", flush=True)


def print_terms(t: dict[str, Any]) -> None:
    """The requester's ticket (or why the task is unpaid) and each bid's price."""
    pay = t.get("payment") or {}
    if pay.get("paid"):
        print(f"  ticket: up to {pay['max_price_per_token']:g} VCOIN/token for "
              f"{pay['max_tokens']} tokens x {pay['replicas']} replica(s), signed by the "
              f"requester {pay['requester']}", flush=True)  # fmt: skip
    else:
        print(f"  {pay.get('reason', 'unpaid')}", flush=True)
    for b in t["bids"]:
        print(f"  bid  {b['peer_id']}  {b['price']:g} VCOIN/token  eta {b['eta_s']:.3f} s  "
              f"queue {b['queue_length']}  health {b['health']:.2f}", flush=True)  # fmt: skip


def deposit_all(nodes: list[DevNode], amount: float) -> None:
    """Each node deposits VCOIN as a requester: what its tasks' workers are paid from."""
    for n in nodes:
        r = n.client(40).call("vcoin_deposit", {"amount": amount, "wait_s": 30})
        if r["status"] != "done":
            raise DevnetError(f"node {n.index} could not deposit: {r}")
    print(f"deposited {amount:g} VCOIN for tasks on each of {len(nodes)} nodes", flush=True)


def demo_task(origin: DevNode, prompt: str, timeout: float = 120.0) -> dict[str, Any]:
    """Submit a prompt to ``origin``; show the bids, the chosen node and the answer."""
    print(f'\ndemo task: "{prompt}" -> node {origin.index}', flush=True)
    req = {"model": TEST_MODEL, "input": prompt, "parameters": {"max_new_tokens": 48}}
    t = _run_completed(origin, req, timeout)
    print_terms(t)
    tm = t["timings"]
    print(f"  chosen {t['node_id']} (attempts {t['attempts']}); assigned after "
          f"{1000 * tm['assigned_s']:.0f} ms, done after {tm['total_s']:.2f} s, "
          f"{tm['tokens']} tokens at {tm['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
    print(f"  answer: {t['result']!r}", flush=True)
    print_anchor(origin, t["task_id"])
    return t


def demo_consensus(origin: DevNode, prompt: str, replicas: int, timeout: float = 120.0) -> None:
    """The same prompt on ``replicas`` nodes: commit-reveal, weighted vote, signatures."""
    print(f'\nconsensus task: "{prompt}" on {replicas} replicas -> node {origin.index}',
          flush=True)  # fmt: skip
    req = {"model": TEST_MODEL, "input": prompt, "mode": "consensus", "replicas": replicas,
           "parameters": {"max_new_tokens": 48}}  # fmt: skip
    t = _run_completed(origin, req, timeout)
    deadline = time.monotonic() + 5  # the replicas' signatures are collected just after
    while len(t["consensus"]["signatures"]) < replicas and time.monotonic() < deadline:
        time.sleep(0.1)
        t = origin.rpc.call("vcoin_getTask", {"task_id": t["task_id"]})
    c = t["consensus"]
    print_terms(t)
    for r in c["replicas"]:
        print(f"  replica {r['node_id']}  similarity {r['similarity']:.3f}  "
              f"weight {r['weight']:.3f}  {'agreed' if r['agreed'] else 'OUTVOTED'}",
              flush=True)  # fmt: skip
    print(f"  decision {c['decision']}, confidence {c['confidence']:.3f} ({c['action']}); "
          f"outcome {c['result_hash'][:16]}… signed by {len(c['signatures'])} nodes; "
          f"done after {t['timings']['total_s']:.2f} s", flush=True)  # fmt: skip
    print(f"  answer: {t['result']!r}", flush=True)
    print_anchor(origin, t["task_id"])


def demo_pipeline(origin: DevNode, prompt: str, timeout: float = 120.0) -> None:
    """The same prompt through layer spans on two nodes: the route and per-hop times."""
    print(f'\npipeline task: "{prompt}" across layer spans -> node {origin.index}', flush=True)
    req = {"model": TEST_MODEL, "input": prompt, "pipeline": True,
           "parameters": {"max_new_tokens": 48}}  # fmt: skip
    deadline = time.monotonic() + 60  # the nodes pick their spans a few heartbeats in
    while not _spans_cover(origin, 4):
        if time.monotonic() > deadline:
            raise DevnetError("the layer spans the nodes serve do not cover the model")
        time.sleep(0.2)
    spans = {p["peer_id"][-6:]: [f"{s['start']}-{s['end']}" for s in p["spans"]]
             for p in origin.rpc.call("vcoin_peers") if p["spans"]}  # fmt: skip
    mine = origin.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"]
    spans[f"{origin.info['peer_id'][-6:]} (this node)"] = [f"{s['start']}-{s['end']}"
                                                          for s in mine]  # fmt: skip
    print("  spans picked by --serve-layers auto:2: " + ", ".join(
        f"{p} {'/'.join(v)}" for p, v in sorted(spans.items())), flush=True)  # fmt: skip
    t = _run_completed(origin, req, timeout)
    for h in t["timings"]["hops"]:
        print(f"  hop {h['node_id']}  layers {h['layers']}  {h['status']}  compute "
              f"{h['compute_s']:.3f} s  transfer {h['transfer_s']:.3f} s  {h['bytes']} bytes",
              flush=True)  # fmt: skip
    tm = t["timings"]
    print(f"  {tm['tokens']} tokens at {tm['tokens_per_s']:.0f} tokens/s; done after "
          f"{tm['total_s']:.2f} s", flush=True)  # fmt: skip
    print(f"  answer: {t['result']!r}", flush=True)


def _spans_cover(origin: DevNode, num_layers: int) -> bool:
    """Some chain of the spans the origin knows of (its own too) covers every layer."""
    spans = [(s["start"], s["end"]) for p in origin.rpc.call("vcoin_peers") for s in p["spans"]]
    spans += [(s["start"], s["end"])
              for s in origin.rpc.call("vcoin_nodeInfo")["capabilities"]["spans"]]  # fmt: skip
    reach = {0}
    for _ in spans:
        reach |= {b + 1 for a, b in spans if a in reach}
    return num_layers in reach


def demo_training(origin: DevNode, nodes: int, base: Path, timeout: float = 300.0) -> None:
    """LoRA on ``nodes`` nodes: shards, FedAvg rounds, the adapter, its anchor, then the
    same prompt with and without the adapter."""
    from vcoind.compute.testmodel import CORPUS

    data = origin.datadir / "train.jsonl"  # vcoin_train reads only under the datadir
    lines = [ln for ln in CORPUS.splitlines() if ln.strip()]
    data.write_text("".join(json.dumps({"text": ln}) + "\n" for ln in lines * 2))
    print(f"\nLoRA training: {2 * len(lines)} examples on {nodes} nodes -> node {origin.index}",
          flush=True)  # fmt: skip
    settings = {"epochs": 3, "batch_size": 2, "learning_rate": 0.03, "sync_every": 2,
                "max_length": 32, "dropout": 0.0}  # fmt: skip
    r = origin.rpc.call("vcoin_train", {"model": TEST_MODEL, "dataset": str(data),
                                        "nodes": nodes, "settings": settings})  # fmt: skip
    t = wait_task(origin, r["task_id"], timeout)
    if t["status"] != "completed":
        raise DevnetError(f"training task {t['task_id']} {t['status']}: {t['error']}")
    tr = t["training"]
    for n in tr["nodes"]:
        print(f"  node {n['node_id']}  shards {n['shards']}  {n['samples']} samples  "
              f"{n['status']}", flush=True)  # fmt: skip
    for h in tr["history"]:
        print(f"  round {h['round'] + 1}: {h['samples']} samples, mean loss {h['loss']:.3f}",
              flush=True)  # fmt: skip
    sm = tr["summary"]
    print(f"  adapter {tr['adapter_id']} (loss {sm['first_loss']:.3f} -> "
          f"{sm['final_loss']:.3f}, {sm['train_s']:.1f} s), signed by "
          f"{len(tr['signatures'])} nodes", flush=True)  # fmt: skip
    print_anchor(origin, t["task_id"])
    prompt = lines[3][:30]
    for adapter in (None, tr["adapter_id"]):
        req: dict[str, Any] = {"model": TEST_MODEL, "input": prompt,
                               "parameters": {"max_new_tokens": 16}}  # fmt: skip
        if adapter:
            req["adapter"] = adapter
        out = _run_completed(origin, req, 120.0)
        print(f"  {'with the adapter' if adapter else 'base model      '}: {prompt!r} -> "
              f"{out['result']!r}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="devnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=3, help="number of daemons (default 3)")
    p.add_argument(
        "--dir",
        type=Path,
        help="where the datadirs go (default: a new temp dir, removed on exit unless --keep)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir on exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="non-interactive: bring up, verify the mesh, stop; exit 0 or 1",
    )
    p.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S")
    p.add_argument("--peer-timeout", type=float, default=6.0, metavar="S")
    p.add_argument("--network", default="devnet")
    p.add_argument("--timeout", type=float, default=60.0, help="mesh deadline in seconds")
    p.add_argument("--prompt", default="Explain proof of stake", help="the demo task's prompt")
    p.add_argument("--no-demo", action="store_true", help="skip the demo task")
    p.add_argument("--chain", choices=("anvil", "embedded", "none"), default="anvil",
                   help="anvil: one shared chain (default); embedded: an in-process EVM per "
                   "daemon; none: no chain")  # fmt: skip
    p.add_argument("--chain-port", type=int, default=0, help="anvil's port (default: free)")
    p.add_argument("--netns", action="store_true",
                   help="as root: a public node and two NATed nodes in network namespaces "
                   "(nftables NAT), no chain; --nodes and --chain do not apply")  # fmt: skip
    ns = p.parse_args(argv)
    if ns.netns:
        from devnet import netns_demo

        return netns_demo.run(ns)
    if ns.nodes < 1:
        p.error("--nodes must be at least 1")
    base = ns.dir or Path(tempfile.mkdtemp(prefix="vcoin-devnet-"))
    temp = ns.dir is None and not ns.keep
    nodes: list[DevNode] = []
    anvil: Anvil | None = None
    started = time.monotonic()
    code = 0
    try:
        print(f"devnet: {ns.nodes} nodes, datadirs under {base}", flush=True)
        models = ensure_test_model(base / "models")
        chain_flags = {"none": ["--no-chain"], "embedded": []}.get(ns.chain, [])
        if ns.chain == "anvil" and not has_anvil():
            print("note: anvil is not installed (npm ci --prefix contracts): each node uses "
                  "its own embedded chain instead", flush=True)  # fmt: skip
            ns.chain = "embedded"
        if ns.chain == "anvil":
            anvil = start_anvil(ns.chain_port or free_port(8546), base / "anvil.log")
            deployment = base / "deployment.json"
            d = deploy_devnet(anvil.url, deployment, ns.network)
            print(f"chain: anvil at {anvil.url} (chain id {d.chain_id}); contracts deployed, "
                  f"TaskAnchor {d.addresses['TaskAnchor']}; deployment file {deployment}",
                  flush=True)  # fmt: skip
            chain_flags = ["--chain-rpc", anvil.url, "--contracts", str(deployment)]
        base_extra = ["--models-dir", str(models), *chain_flags]

        def start(i: int, bootstrap: str | None) -> DevNode:
            """Each node serves a 2-layer span of the test model that it picks itself
            (``--serve-layers auto:2``: the span the fewest nodes serve), so the spans
            form a pipeline route. Launched without waiting: the others start together
            once node 1 is up."""
            spans = ["--serve-layers", f"{TEST_MODEL}:auto:2"]
            return start_node(
                i, base, bootstrap=bootstrap, heartbeat=ns.heartbeat_interval,
                peer_timeout=ns.peer_timeout, network=ns.network,
                extra=[*base_extra, *(spans if ns.nodes >= 2 else [])], wait=False,
            )  # fmt: skip

        nodes.append(start(1, None))
        for i in range(2, ns.nodes + 1):
            nodes.append(start(i, nodes[0].p2p_addr))
        for n in nodes:
            n.info  # noqa: B018 (each is up, or a clear error)
        took = wait_for_mesh(nodes, ns.timeout)
        print(
            f"full mesh: every node lists the other {ns.nodes - 1} "
            f"({took:.1f} s after the last start)\n",
            flush=True,
        )
        print_table(nodes)
        if anvil is not None:
            fund_nodes(anvil.url, d, [n.info["eth_address"] for n in nodes])
            stake_all(nodes, 1000)
            deposit_all(nodes, 100)
        if not ns.no_demo:
            demo_task(nodes[0], ns.prompt)
            demo_chat(nodes[0], "What is a GPU?")
            if ns.nodes >= 2:
                demo_consensus(nodes[0], ns.prompt, min(3, ns.nodes))
                demo_pipeline(nodes[0], ns.prompt)
                demo_training(nodes[0], min(3, ns.nodes), base)
        print(f"\ntry: vcoin --datadir {nodes[0].datadir} peers", flush=True)
        print(
            f'     vcoin --datadir {nodes[0].datadir} submit "What is a Merkle tree?" '
            f"--model {TEST_MODEL} --wait",
            flush=True,
        )
        print(
            f'     vcoin --datadir {nodes[0].datadir} submit "What is a Merkle tree?" '
            f"--model {TEST_MODEL} --mode consensus --replicas {min(3, ns.nodes)} --wait",
            flush=True,
        )
        print(f'     vcoin --datadir {nodes[0].datadir} submit "What is a Merkle tree?" '
              f"--model {TEST_MODEL} --pipeline --wait", flush=True)  # fmt: skip
        print(f"     vcoin --datadir {nodes[0].datadir} train --model {TEST_MODEL} "
              f"--dataset {nodes[0].datadir / 'train.jsonl'} --nodes {min(3, ns.nodes)} --wait",
              flush=True)  # fmt: skip
        print(f"     vcoin --datadir {nodes[0].datadir} chain info", flush=True)
        print(f"     vcoin --datadir {nodes[0].datadir} alerts --follow", flush=True)
        print(f"dashboard (a one-time link; `vcoin --datadir {nodes[0].datadir} dashboard` "
              f"prints a new one): {nodes[0].rpc.call('vcoin_dashboardUrl')['url']}",
              flush=True)  # fmt: skip
        if not ns.check:
            print("running; Ctrl-C stops all nodes", flush=True)
            while True:
                line = status_line(nodes, started)
                if sys.stdout.isatty():
                    print("\r" + line, end="", flush=True)
                else:
                    print(line, flush=True)
                time.sleep(2 if sys.stdout.isatty() else 10)
    except (DevnetError, ChainSetupError, ChatDemoError) as exc:
        print(f"devnet: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        problems = stop_all(nodes)
        if anvil is not None:
            anvil.stop()
        code = report_stop("devnet", problems, len(nodes), code, base, temp and code == 0)
    return code


def report_stop(who: str, problems: list[str], started: int, code: int, base: Path,
                remove: bool, done: str = "") -> int:  # fmt: skip
    """Say how the nodes stopped; remove ``base`` when asked (and all went well), else say
    where the logs are. Returns the exit code (1 if any node stopped badly)."""
    for pr in problems:
        print(f"{who}: {pr}", file=sys.stderr)
    if problems:
        code = 1
    elif started:
        print(f"stopped {started} nodes cleanly{done}", flush=True)
    if remove and (code == 0 or not started):
        shutil.rmtree(base, ignore_errors=True)
    elif code != 0:
        print(f"{who}: logs kept in {base}", file=sys.stderr)
    return code


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # stop the nodes the same way as Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C even when started from a script that ignores SIGINT for background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
