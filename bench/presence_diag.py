"""Where does a heartbeat's time go? Stage ages of heartbeats between real in-process nodes.

    .venv/bin/python bench/presence_diag.py --nodes 25 --interval 5 --seconds 60

N ``vcoind.node.Node`` daemons in one trio loop (as ``bench/scale.py`` runs them), node 0
the bootstrap of all. Every heartbeat copy is timed (age = now - the record's timestamp)
at each stage of its path, per hop:

- ``publish``: our own heartbeat queued for a peer (first hop);
- ``enqueue``: GossipSub queues a copy for a peer (``send_rpc``);
- ``write``: the peer's send loop hands it to the stream, and ``written`` when that returns;
- ``read``: the receiver's pubsub reader took the frame (push_msg entry);
- ``handler``: the peer table takes it (unique heartbeats only).

The trio loop's own lag (a 10 ms sleep's overshoot) and the send queues' depth are
sampled beside. Ages grow from hop to hop, so compare a stage with the one before it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from loop_meter import IdleMeter
from scale import make_node, serve_stand_in

from vcoind.p2p.codec import decode

STAGES = ("publish", "enqueue", "write", "written", "read", "handler")


_TS: dict[bytes, float | None] = {}


def _ts(msg: Any) -> float | None:
    """The heartbeat's timestamp, decoded once per message (not per copy)."""
    key = msg.from_id + msg.seqno
    if key not in _TS:
        try:
            rec: Any = decode(msg.data)
            _TS[key] = float(rec.timestamp) if rec.KIND == "heartbeat" else None
        except Exception:  # not ours: no timestamp
            _TS[key] = None
    return _TS[key]


def instrument(node: Any, ages: dict[str, list[float]]) -> None:
    pubsub, router = node.p2p.pubsub, node.p2p.router
    send_rpc, write, push = router.send_rpc, pubsub.write_msg, pubsub.push_msg
    me = pubsub.my_id
    me_bytes = me.to_bytes()

    def note(stage: str, rpc_msgs: Any) -> None:
        now = time.time()
        for m in rpc_msgs:
            ts = _ts(m)
            if ts is not None:
                own = stage == "enqueue" and m.from_id == me_bytes
                ages["publish" if own else stage].append(now - ts)

    def timed_send_rpc(peer_id: Any, rpc: Any, priority: bool = False) -> None:
        note("enqueue", rpc.publish)
        send_rpc(peer_id, rpc, priority)

    async def timed_write(stream: Any, rpc: Any) -> bool:
        note("write", rpc.publish)
        ok: bool = await write(stream, rpc)
        note("written", rpc.publish)
        return ok

    async def timed_push(forwarder: Any, msg: Any) -> None:
        if forwarder != me:
            note("read", [msg])
        await push(forwarder, msg)

    router.send_rpc = timed_send_rpc
    pubsub.write_msg = timed_write
    pubsub.push_msg = timed_push
    node.presence.on_seen(lambda hb: ages["handler"].append(time.time() - hb.timestamp))


async def loop_lag(out: list[float]) -> None:
    while True:
        t = trio.current_time()
        await trio.sleep(0.01)
        out.append(trio.current_time() - t - 0.01)


async def queue_depth(nodes: list[Any], out: list[int]) -> None:
    while True:
        await trio.sleep(0.5)
        for n in nodes:
            out.extend(len(q) for q in n.p2p.pubsub.peer_queues.values())


def q(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


async def main_async(ns: argparse.Namespace) -> None:
    ages: dict[str, list[float]] = {s: [] for s in STAGES}
    lag: list[float] = []
    depth: list[int] = []
    nodes: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="vcoin-diag-") as tmp:
        async with trio.open_nursery() as nursery:
            seed = None
            t_start = time.time()
            for j in range(ns.nodes):
                node = make_node(Path(tmp), f"n{j}", ns.interval, seed)
                instrument(node, ages)
                info = await nursery.start(node.run)
                serve_stand_in(node)
                seed = seed or info.p2p_addrs[0]
                nodes.append(node)
            print(f"{ns.nodes} nodes started in {time.time() - t_start:.1f} s", flush=True)
            nursery.start_soon(loop_lag, lag)
            nursery.start_soon(queue_depth, nodes, depth)
            meter = IdleMeter()
            trio.lowlevel.add_instrument(meter)
            cpu0, wall0 = time.process_time(), time.monotonic()
            t_end = trio.current_time() + ns.seconds
            while trio.current_time() < t_end:
                await trio.sleep(5)
                peers = [len(n.presence.peers) for n in nodes]
                print(f"t={time.monotonic() - wall0:5.0f}s peers min/mean {min(peers)}/"
                      f"{statistics.mean(peers):.1f}  handler p50 "
                      f"{q(ages['handler'][-500:], 0.5):.2f}s", flush=True)  # fmt: skip
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            idle = meter.idle
            conns = [len(n.p2p.connected_peers()) for n in nodes]
            topic = nodes[0].gossip.topic("heartbeat")
            mesh = [len(n.p2p.router.mesh.get(topic, ())) for n in nodes]
            nursery.cancel_scope.cancel()
    print(
        f"\nloop idle (in epoll) {100 * idle / wall:.0f} % of the wall; conns {conns}; mesh {mesh}"
    )
    print(f"process CPU {100 * cpu / wall:.0f} % of a core over {wall:.0f} s; "
          f"loop lag p50/p95/max {1000 * q(lag, 0.5):.1f}/{1000 * q(lag, 0.95):.1f}/"
          f"{1000 * max(lag or [0]):.0f} ms; send queue depth p95/max "
          f"{q([float(d) for d in depth], 0.95):.0f}/{max(depth or [0])}")  # fmt: skip
    print(f"{'stage':>8} {'count':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for s in STAGES:
        xs = ages[s]
        print(f"{s:>8} {len(xs):>7} {q(xs, 0.5):>7.3f} {q(xs, 0.95):>7.3f} "
              f"{max(xs or [float('nan')]):>7.3f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=25)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=60.0)
    ns = p.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    trio.run(main_async, ns)


if __name__ == "__main__":
    main()
