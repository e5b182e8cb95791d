"""Presence and market at scale: real hosts for N = 10..100, a simulated transport to 1,000.

    .venv/bin/python bench/scale.py [--sizes 10,25,50,100] [--sim-sizes 10,...,1000]
        [--interval auto|S] [--window 20] [--per-process 25] [--json OUT]

Real part: N in-process ``vcoind.node.Node`` daemons (no models, no chain, RPC on port
0, loopback TCP, each its own datadir and SQLite) in worker processes of at most
--per-process nodes, one trio loop each. Node 0 is the bootstrap of every other node;
discovery (the daemon's default) dials the rest. Per N it measures:

- convergence: from the last node's start until every node's peer table holds N-1 peers
  ("no" when some never did within the timeout; the rest is measured all the same, and
  the table's "min peers" says how far the views got);
- over a steady window: pubsub traffic per node (RPC frames, published-message copies
  with GossipSub duplicates, IHAVE/IWANT ids, wire bytes), the unique heartbeats taken,
  process CPU per node (process CPU time / nodes in it), publish-to-receive latency of
  heartbeats (p50/p95) and the share arriving "stale" (older than the sender's interval,
  i.e. after its next beat was due), mesh degree and connections;
- announce -> bids: every node advertises a stand-in model (announced, not loaded), one
  node submits tasks and times the remote bids reaching it (first, median, last).

The base heartbeat interval is per N: --interval S, or "auto" (default): max(5 s, (N-1)/2 s)
so that the box (all N nodes on its cores) keeps up; the daemon stretches it further when
its own max(base, N / log2 N) is longer. "loop %" is the share of the window the workers'
trio loops were busy (not waiting for I/O). CPU is also given per received heartbeat.
Simulated part (``bench/scale_sim.py``): the same heartbeat publication over a model of
GossipSub (mesh forwarding with duplicates, IHAVE gossip) at the daemon's adaptive
interval (--sim-fixed: the base at every N), CPU projected from the real run's costs.
Finally each figure's growth exponent: the slope of log(figure) against log(N) (1: linear).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_meter import IdleMeter
from scale_sim import fit_cpu, growth, print_sim, simulate

from vcoind.presence.heartbeat import adaptive_interval

MODEL_NAME = "scale-bench"
MODEL_ID = "sha256:" + "5c" * 32
SETTLE_S = 6.0  # after convergence: past the peer table's 5 s latency warm-up
# --interval auto: the daemon's default 5 s, stretched so a node takes at most this many
# heartbeats a second (above ~2.5 a second, py-libp2p's queues fall behind here)
AUTO_BASE_S = 5.0
AUTO_HB_PER_S = 2.0


@dataclass
class NodeCounters:
    """Pubsub traffic of one node, counted at the wire (every copy, duplicates included)."""

    rpcs_in: int = 0
    rpcs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    msgs_in: int = 0  # published-message copies received
    msgs_out: int = 0  # published-message copies sent
    ihave_in: int = 0  # message ids announced to us in IHAVE
    ihave_out: int = 0
    iwant_in: int = 0
    iwant_out: int = 0
    hb_taken: int = 0  # unique heartbeats the peer table took
    stale: int = 0  # of those, older than the sender's interval on arrival
    latencies: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, int]:
        d = asdict(self)
        d.pop("latencies")
        return d


_READING: contextvars.ContextVar[NodeCounters | None] = contextvars.ContextVar(
    "scale_reading", default=None
)


def _patch_reader() -> None:
    """Count inbound pubsub bytes per node: py-libp2p reads every RPC frame with one module
    function, called from the node's reading task (which carries the node in a context var)."""
    import libp2p.pubsub.pubsub as ps

    mod: Any = ps
    original = mod.read_varint_prefixed_bytes_limited

    async def counted(stream: Any, limit: int) -> bytes:
        data: bytes = await original(stream, limit)
        c = _READING.get()
        if c is not None:
            c.rpcs_in += 1
            c.bytes_in += len(data) + 2
        return data

    mod.read_varint_prefixed_bytes_limited = counted


def instrument(node: Any, c: NodeCounters) -> None:
    """Wrap the node's pubsub and router (instance attributes: nothing in vcoind changes)."""
    pubsub, router = node.p2p.pubsub, node.p2p.router
    write, read, push, handle = (pubsub.write_msg, pubsub.continuously_read_stream,
                                 pubsub.push_msg, router.handle_rpc)  # fmt: skip

    async def write_msg(stream: Any, rpc: Any) -> bool:
        c.rpcs_out += 1
        c.bytes_out += rpc.ByteSize() + 2
        c.msgs_out += len(rpc.publish)
        if rpc.HasField("control"):
            c.ihave_out += sum(len(h.messageIDs) for h in rpc.control.ihave)
            c.iwant_out += sum(len(w.messageIDs) for w in rpc.control.iwant)
        ok: bool = await write(stream, rpc)
        return ok

    async def continuously_read_stream(stream: Any) -> None:
        _READING.set(c)
        await read(stream)

    me = pubsub.my_id

    async def push_msg(forwarder: Any, msg: Any) -> None:
        if forwarder != me:  # our own publications pass here too
            c.msgs_in += 1
        await push(forwarder, msg)

    async def handle_rpc(rpc: Any, sender: Any) -> None:
        c.ihave_in += sum(len(h.messageIDs) for h in rpc.control.ihave)
        c.iwant_in += sum(len(w.messageIDs) for w in rpc.control.iwant)
        await handle(rpc, sender)

    pubsub.write_msg = write_msg
    pubsub.continuously_read_stream = continuously_read_stream
    pubsub.push_msg = push_msg
    router.handle_rpc = handle_rpc

    def seen(hb: Any) -> None:
        age = time.time() - hb.timestamp
        c.hb_taken += 1
        c.stale += age > hb.interval
        c.latencies.append(age)

    node.presence.on_seen(seen)


def serve_stand_in(node: Any) -> None:
    """Advertise a model without loading it: the model store learns a record (bids resolve
    it) and presence announces it. Assignments of it would fail: tasks are cancelled first."""
    from vcoind.compute.models import ModelInfo
    from vcoind.presence.messages import ModelServed

    info = ModelInfo(MODEL_NAME, MODEL_ID, Path("/nonexistent"), "none", 1, 1, 1, 0, False)
    node.compute.models._models[MODEL_NAME] = info  # bench only: no weights behind it
    node.presence.announce(models=(ModelServed(MODEL_NAME, MODEL_ID),))


def make_node(base: Path, name: str, interval: float, seed: str | None) -> Any:
    from vcoind.config import load
    from vcoind.datadir import DataDir
    from vcoind.node import Node

    datadir = base / name
    models = base / "empty-models"
    models.mkdir(exist_ok=True)
    flags: dict[str, Any] = {
        "network": "scale",
        "log_level": "warning",
        "p2p.listen": ["/ip4/127.0.0.1/tcp/0"],
        "rpc.addr": "127.0.0.1:0",
        "p2p.heartbeat_interval": interval,
        # the daemon's ratio (30 s for 5 s beats)
        "p2p.peer_timeout": 6.0 * interval,
        "p2p.bootstrap": [seed] if seed else [],
        "chain.enabled": False,
        "compute.models_dir": str(models),
        "compute.cpu_threads": 1,
        # Bids go to the origin directly and count only while its bid window is open; the
        # bench times every node's bid, so the window stays open until all have bid (it
        # closes early then) or 10 s, not the daemon's 0.25 s.
        "market.bid_window_s": 10.0,
    }
    dd = DataDir(datadir)
    dd.init(exist_ok=True)
    return Node(load(datadir, env={}, flags=flags), dd, dd.load_identity())


# --- worker processes ---------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    count: int
    total: int
    base: str
    interval: float
    seed: str | None
    converge_timeout: float = 120.0


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    _patch_reader()
    try:
        trio.run(_worker, spec, conn)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


async def _recv(conn: Connection) -> Any:
    run_sync: Any = trio.to_thread.run_sync  # trio-typing's stale stub lacks the keyword
    return await run_sync(conn.recv, abandon_on_cancel=True)


async def _worker(spec: WorkerSpec, conn: Connection) -> None:
    nodes: list[Any] = []
    counters: list[NodeCounters] = []
    async with trio.open_nursery() as nursery:
        seed = spec.seed
        for j in range(spec.count):
            node = make_node(Path(spec.base), f"w{spec.index}n{j}", spec.interval, seed)
            c = NodeCounters()
            instrument(node, c)
            info = await nursery.start(node.run)
            serve_stand_in(node)
            if seed is None:
                seed = info.p2p_addrs[0]
            nodes.append(node)
            counters.append(c)
        conn.send(("started", seed, time.time()))
        # not converged in time (a saturated box): measured all the same, and said so
        with trio.move_on_after(spec.converge_timeout):
            while any(len(n.presence.peers) < spec.total - 1 for n in nodes):
                await trio.sleep(0.05)
        conn.send(("converged", time.time(), min(len(n.presence.peers) for n in nodes)))
        while True:
            cmd = await _recv(conn)
            if cmd[0] == "window":
                conn.send(("window", await _window(nodes, counters, cmd[1], cmd[2])))
            elif cmd[0] == "announce":
                conn.send(("announce", await _announce(nodes[0], cmd[1], spec.total)))
            else:
                break
        nursery.cancel_scope.cancel()


async def _window(nodes: list[Any], counters: list[NodeCounters], t0: float,
                  length: float) -> dict[str, Any]:  # fmt: skip
    await trio.sleep(max(0.0, t0 - time.time()))
    before = [c.snapshot() for c in counters]
    for c in counters:
        c.latencies.clear()
    meter = IdleMeter()
    trio.lowlevel.add_instrument(meter)
    cpu0, wall0 = time.process_time(), time.monotonic()
    await trio.sleep(length)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    trio.lowlevel.remove_instrument(meter)
    after = [c.snapshot() for c in counters]
    topic = nodes[0].gossip.topic("heartbeat")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "idle_s": meter.idle,
        "nodes": len(nodes),
        "deltas": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)],
        "latencies": [x for c in counters for x in c.latencies],
        "mesh": [len(n.p2p.router.mesh.get(topic, ())) for n in nodes],
        "conns": [len(n.p2p.connected_peers()) for n in nodes],
        "peers": [len(n.presence.peers) for n in nodes],
        "rejected": _rejections(nodes),
    }


def _rejections(nodes: list[Any]) -> dict[str, float]:
    """Heartbeats refused by validation or over budget, summed over the nodes, by reason."""
    out: dict[str, float] = {}
    for n in nodes:
        for metric in (n.metrics.gossip_rejected, n.metrics.gossip_ignored):
            for fam in metric.collect():
                for s in fam.samples:
                    label = s.labels.get("topic") or s.labels.get("kind")
                    if s.name.endswith("_total") and label == "heartbeat":
                        out[s.labels["reason"]] = out.get(s.labels["reason"], 0.0) + s.value
    return out


async def _announce(origin_node: Any, reps: int, total: int) -> list[dict[str, Any]]:
    """Submit ``reps`` tasks of the stand-in model at the origin; time the remote bids."""
    from vcoind.market.messages import GenParams

    origin = origin_node.market.origin
    me = origin_node.identity.peer_id
    bidding = origin._bidding  # bench only: time each bid where the origin takes it
    arrivals: dict[str, list[float]] = {}
    take: Callable[[Any], None] = bidding.take

    def timed_take(bid: Any) -> None:
        now = time.monotonic()
        for tb in bid.task_bids():
            if tb.peer_id != me:
                arrivals.setdefault(tb.task_id, []).append(now)
        take(bid)

    bidding.take = timed_take
    out = []
    try:
        for _ in range(reps):
            t0 = time.monotonic()
            task_id = await origin.submit(MODEL_NAME, "scale bench", GenParams(max_new_tokens=1))
            with trio.move_on_after(10):
                while len(arrivals.get(task_id, ())) < total - 1:
                    await trio.sleep(0.005)
            got = sorted(1000 * (t - t0) for t in arrivals.get(task_id, ()))
            await origin.cancel(task_id)
            out.append({"bids": len(got), "ms": got})
            await trio.sleep(1.0)
    finally:
        bidding.take = take
    return out


# --- the coordinator ----------------------------------------------------------------


@dataclass
class RealFigures:
    n: int
    interval_s: float
    processes: int
    convergence_s: float | None
    window_s: float = 0.0
    hb_in_per_s: float = 0.0  # unique heartbeats taken per node per second
    msgs_in_per_s: float = 0.0  # published-message copies (duplicates included)
    msgs_out_per_s: float = 0.0
    rpcs_in_per_s: float = 0.0
    rpcs_out_per_s: float = 0.0
    ihave_ids_in_per_s: float = 0.0
    iwant_ids_in_per_s: float = 0.0
    kb_in_per_s: float = 0.0
    kb_out_per_s: float = 0.0
    cpu_pct: float = 0.0  # of one core, per node
    cpu_ms_per_hb: float = 0.0  # CPU per node / unique heartbeats taken (idle included)
    box_load_pct: float = 0.0  # all workers' CPU / (cores x wall)
    loop_busy_pct: float = 0.0  # share of the wall the workers' trio loops were not idle
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    stale_pct: float = 0.0
    rejected: dict[str, float] = field(default_factory=dict)
    mesh_degree: float = 0.0
    connections: float = 0.0
    min_peers: int = 0
    bid_first_ms: float | None = None
    bid_median_ms: float | None = None
    bid_last_ms: float | None = None
    bids_per_task: float = 0.0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


class Workers:
    """Worker processes (forked: the vcoind stack is imported once, here) and their pipes."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []

    def start(self, spec: WorkerSpec) -> Connection:
        ctx = mp.get_context("fork")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(spec, theirs), daemon=True)
        proc.start()
        theirs.close()
        self.procs.append(proc)
        self.pipes.append(mine)
        return mine

    def expect(self, conn: Connection, what: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise TimeoutError(f"no {what!r} from a worker within {timeout:.0f} s")
        msg = conn.recv()
        if msg[0] != what:
            raise RuntimeError(f"expected {what!r} from a worker, got {msg[0]!r}")
        return msg[1:]

    def stop(self) -> None:
        for conn in self.pipes:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(20)
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_real(n: int, interval: float, per_process: int, window: float, announces: int,
             converge_timeout: float) -> RealFigures:  # fmt: skip
    """Start N nodes, wait for convergence, measure a steady window and the bids."""
    counts = [per_process] * (n // per_process) + ([n % per_process] if n % per_process else [])
    import vcoind.node  # noqa: F401  (imported before forking: once for every worker)

    workers = Workers()
    with tempfile.TemporaryDirectory(prefix="vcoin-scale-") as tmp:
        try:
            first = workers.start(
                WorkerSpec(0, counts[0], n, tmp, interval, None, converge_timeout)
            )
            seed, last_start = workers.expect(first, "started", 120)
            for i, k in enumerate(counts[1:], start=1):
                workers.start(WorkerSpec(i, k, n, tmp, interval, seed, converge_timeout))
            for conn in workers.pipes[1:]:
                last_start = max(last_start, workers.expect(conn, "started", 120)[1])
            figs = RealFigures(n, interval, len(counts), None)
            done = [workers.expect(c, "converged", converge_timeout + 60) for c in workers.pipes]
            if min(least for _t, least in done) >= n - 1:
                figs.convergence_s = max(t for t, _least in done) - last_start
            time.sleep(SETTLE_S)
            t0 = time.time() + 0.5
            for conn in workers.pipes:
                conn.send(("window", t0, window))
            parts = [workers.expect(c, "window", window + 60)[0] for c in workers.pipes]
            _fill_window(figs, parts)
            if announces:
                first.send(("announce", announces))
                _fill_bids(figs, workers.expect(first, "announce", 30 * announces)[0])
        finally:
            workers.stop()
    return figs


def _fill_window(f: RealFigures, parts: list[dict[str, Any]]) -> None:
    deltas = [d for p in parts for d in p["deltas"]]
    wall: float = statistics.mean(p["wall_s"] for p in parts)
    f.window_s = wall

    def per_node_s(key: str) -> float:
        total: float = sum(d[key] for d in deltas)
        return total / len(deltas) / wall

    f.hb_in_per_s = per_node_s("hb_taken")
    f.msgs_in_per_s, f.msgs_out_per_s = per_node_s("msgs_in"), per_node_s("msgs_out")
    f.rpcs_in_per_s, f.rpcs_out_per_s = per_node_s("rpcs_in"), per_node_s("rpcs_out")
    f.ihave_ids_in_per_s, f.iwant_ids_in_per_s = per_node_s("ihave_in"), per_node_s("iwant_in")
    f.kb_in_per_s = per_node_s("bytes_in") / 1024
    f.kb_out_per_s = per_node_s("bytes_out") / 1024
    cpu = sum(p["cpu_s"] for p in parts)
    f.cpu_pct = 100 * cpu / len(deltas) / wall
    f.cpu_ms_per_hb = 1000 * cpu / max(1, sum(d["hb_taken"] for d in deltas))
    f.box_load_pct = 100 * cpu / wall / (os.cpu_count() or 1)
    f.loop_busy_pct = 100 * (1 - statistics.mean(p.get("idle_s", 0.0) / p["wall_s"] for p in parts))
    lat = [x for p in parts for x in p["latencies"]]
    f.p50_ms, f.p95_ms = 1000 * pct(lat, 0.5), 1000 * pct(lat, 0.95)
    taken = sum(d["hb_taken"] for d in deltas)
    f.stale_pct = 100 * sum(d["stale"] for d in deltas) / taken if taken else 0.0
    rejected: dict[str, float] = {}
    for p in parts:
        for k, v in p["rejected"].items():
            rejected[k] = rejected.get(k, 0.0) + v
    f.rejected = rejected
    f.mesh_degree = statistics.mean(m for p in parts for m in p["mesh"])
    f.connections = statistics.mean(m for p in parts for m in p["conns"])
    f.min_peers = min(m for p in parts for m in p["peers"])


def _fill_bids(f: RealFigures, reps: list[dict[str, Any]]) -> None:
    ok = [r for r in reps if r["ms"]]
    f.bids_per_task = statistics.mean(r["bids"] for r in reps) if reps else 0.0
    if ok:
        f.bid_first_ms = statistics.median(r["ms"][0] for r in ok)
        f.bid_median_ms = statistics.median(statistics.median(r["ms"]) for r in ok)
        f.bid_last_ms = statistics.median(r["ms"][-1] for r in ok)


# --- output ---------------------------------------------------------------------------


def auto_interval(n: int) -> float:
    return max(AUTO_BASE_S, round((n - 1) / AUTO_HB_PER_S, 1))


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def print_real(rows: list[RealFigures]) -> None:
    print("\nReal hosts (in-process vcoind nodes, loopback TCP); per node, over the window")
    head = ("N", "int s", "conv s", "hb/s", "msg/s in", "msg/s out", "IHAVE id/s", "KB/s in",
            "KB/s out", "CPU %", "ms/hb", "box %", "loop %", "p50 ms", "p95 ms", "stale %",
            "bid1 ms", "bid50 ms", "bidN ms", "bids", "mesh", "conns", "min peers")  # fmt: skip
    print(" ".join(f"{h:>9}" for h in head))
    for f in rows:
        conv = "no" if f.convergence_s is None else f"{f.convergence_s:.1f}"
        vals = (f.n, f.interval_s, conv,
                f"{f.hb_in_per_s:.2f}", f"{f.msgs_in_per_s:.1f}", f"{f.msgs_out_per_s:.1f}",
                f"{f.ihave_ids_in_per_s:.0f}", f"{f.kb_in_per_s:.1f}", f"{f.kb_out_per_s:.1f}",
                f"{f.cpu_pct:.1f}", f"{f.cpu_ms_per_hb:.1f}", f"{f.box_load_pct:.0f}",
                f"{f.loop_busy_pct:.0f}",
                f"{f.p50_ms:.0f}", f"{f.p95_ms:.0f}", f"{f.stale_pct:.1f}", _ms(f.bid_first_ms),
                _ms(f.bid_median_ms), _ms(f.bid_last_ms), f"{f.bids_per_task:.0f}",
                f"{f.mesh_degree:.1f}", f"{f.connections:.0f}", f.min_peers)  # fmt: skip
        print(" ".join(f"{v:>9}" for v in vals))
        if f.rejected:
            print(f"{'':>9} heartbeats refused (all nodes, since start): {f.rejected}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10,25,50,100", help="real network sizes ('' for none)")
    p.add_argument("--sim-sizes", default="10,25,50,100,250,500,1000")
    p.add_argument("--interval", default="auto",
                   help=f"heartbeat interval, s; auto: max({AUTO_BASE_S:g}, (N-1)/"
                        f"{AUTO_HB_PER_S:g})")  # fmt: skip
    p.add_argument("--sim-interval", type=float, default=AUTO_BASE_S,
                   help="the simulated base heartbeat interval (the daemon's default)")  # fmt: skip
    p.add_argument("--sim-fixed", action="store_true",
                   help="simulate the base interval at every size (default: the daemon's "
                        "adaptive interval, max(base, N / log2 N))")  # fmt: skip
    p.add_argument("--window", type=float, default=20.0, help="steady window, s (>= 2 beats)")
    p.add_argument("--per-process", type=int, default=0,
                   help="nodes a worker process (0: N over the cores, at most 25)")  # fmt: skip
    p.add_argument("--announces", type=int, default=5, help="tasks announced per size")
    p.add_argument("--json", type=Path, help="write every figure here")
    ns = p.parse_args(argv)
    sizes = [int(x) for x in ns.sizes.split(",") if x.strip()]
    sim_sizes = [int(x) for x in ns.sim_sizes.split(",") if x.strip()]
    real: list[RealFigures] = []
    for n in sizes:
        interval = auto_interval(n) if ns.interval == "auto" else float(ns.interval)
        window = max(ns.window, 2 * interval)
        k = ns.per_process or min(25, -(-n // (os.cpu_count() or 1)))
        print(f"real N={n}: interval {interval:g} s, window {window:g} s, "
              f"{k} nodes a process", flush=True)  # fmt: skip
        try:
            real.append(run_real(n, interval, k, window, ns.announces,
                                 converge_timeout=3 * interval + 60 + n))  # fmt: skip
        except (TimeoutError, RuntimeError, EOFError) as exc:
            print(f"real N={n}: {exc}", flush=True)
            real.append(RealFigures(n, interval, -(-n // k), None))
    measured = [f for f in real if f.hb_in_per_s > 0]
    cpu = fit_cpu([f.hb_in_per_s for f in measured], [f.cpu_pct for f in measured])
    wire = [f for f in measured if f.rpcs_in_per_s > 0]
    msg_bytes = (statistics.mean(1024 * f.kb_in_per_s / f.rpcs_in_per_s for f in wire)
                 if wire else 1230.0)  # fmt: skip

    def sim_interval(n: int) -> float:
        return ns.sim_interval if ns.sim_fixed else adaptive_interval(ns.sim_interval, n - 1)

    sim = [simulate(n, interval=sim_interval(n), msg_bytes=msg_bytes, cpu=cpu)
           for n in sim_sizes]  # fmt: skip
    if real:
        print_real(real)
    if cpu is not None:
        print(f"\nCPU model (least squares over the real sizes): {cpu.idle_pct:.2f} % of a core "
              f"idle + {cpu.ms_per_hb:.2f} ms per unique heartbeat taken; "
              f"mean RPC {msg_bytes:.0f} bytes")  # fmt: skip
    if sim:
        print_sim(sim)
    exps = growth(measured, sim, ns.sim_interval)
    print("\nGrowth exponent in N (slope of log figure vs log N; 1.0 = linear):")
    for name, e in exps.items():
        print(f"  {name:<46} {'-' if e is None else f'{e:.2f}'}")
    if ns.json:
        doc = {
            "real": [asdict(f) for f in real],
            "sim": [asdict(f) for f in sim],
            "cpu_model": asdict(cpu) if cpu else None,
            "msg_bytes": msg_bytes,
            "growth": exps,
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }
        ns.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
