"""Direct bids, from the attacker's side: a bid must come from its bidder, on this network,
for a task of the origin that takes bids, within a bid's size; anything else is refused
and counted (on the bid protocol, and on the task protocol where a bid is taken too), and
an honest direct bid wins the assignment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from tests.adversary.hostile import Hostile, hostile, in_thread, metric
from tests.conftest import Cluster, wait_until
from vcoind.market.messages import (
    TASK_PROTOCOL,
    Accepted,
    Ack,
    Assignments,
    Bid,
    Offer,
    TaskAnnounce,
)
from vcoind.market.protocol import BID_PROTOCOL, BID_STREAM, TASK_STREAM, task_stream
from vcoind.p2p.codec import decode
from vcoind.p2p.keeper import parse_peer_addr
from vcoind.p2p.streams import ErrorReply, StreamProtocolError, read_frame, write_frame
from vcoind.presence.messages import ModelServed

pytestmark = pytest.mark.slow
MODEL = "tiny-qwen2"
MODEL_ID = "sha256:" + "1" * 64


def knows_model(node: Any) -> bool:
    return any(p["models"] for p in node.rpc.call("vcoin_peers"))


async def _serve_model(h: Hostile) -> None:
    while True:
        await h.publish("heartbeat", h.heartbeat(models=(ModelServed(MODEL, MODEL_ID),)))
        await trio.sleep(0.3)


def bid(h: Hostile, origin: str, task_id: str, **over: Any) -> Bid:
    fields: dict[str, Any] = {
        "network": h.network, "peer_id": h.peer_id, "seq": h.seq(), "timestamp": time.time(),
        "origin": origin, "health": 1.0, "queue_length": 0,
        "offers": (Offer(task_id, MODEL_ID, 0.0, 0.01, 100.0),),
    }  # fmt: skip
    return Bid(**{**fields, **over})


async def test_direct_bids_are_refused_unless_from_the_bidder_for_an_announced_task(
    cluster: Cluster,
) -> None:
    n1 = await in_thread(lambda: cluster.start(1, extra=["--bid-window", "5"]))
    origin = n1.info["peer_id"]
    assigned: list[Assignments] = []
    async with hostile() as h, trio.open_nursery() as nursery:

        async def take(peer: Any, batch: Assignments) -> Accepted:
            assigned.append(batch)
            return Accepted(("",) * len(batch.items))

        h.streams.serve(task_stream((Assignments,)), take)
        await h.join(n1.p2p_addr, "heartbeat", "tasks")
        nursery.start_soon(_serve_model, h)
        await in_thread(wait_until, lambda: knows_model(n1), 20, "node 1 sees our model")
        req = {"model": MODEL, "input": "hi", "parameters": {"max_new_tokens": 2}}
        task_id = (await in_thread(n1.rpc.call, "vcoin_submitTask", req))["task_id"]
        with trio.fail_after(20):
            while True:
                ann = await h.next_record("tasks")
                if isinstance(ann, TaskAnnounce) and ann.tasks[0].task_id == task_id:
                    break

        # Someone else's bid, sent by us: refused (a bid speaks for its bidder only).
        async with hostile() as other:
            forged = bid(h, origin, task_id, peer_id=other.peer_id)
        with pytest.raises(StreamProtocolError, match="from its bidder"):
            await h.request(origin, BID_STREAM, forged, Ack)
        with pytest.raises(StreamProtocolError, match="from its bidder"):
            await h.request(origin, TASK_STREAM, bid(h, origin, task_id, network="other"), Ack)
        # A task that was never announced, or another origin's: refused.
        with pytest.raises(StreamProtocolError, match="takes bids"):
            await h.request(origin, BID_STREAM, bid(h, origin, "cd" * 16), Ack)
        with pytest.raises(StreamProtocolError, match="takes bids"):
            await h.request(origin, TASK_STREAM, bid(h, h.peer_id, task_id), Ack)
        # Over the bid kind's size limit (the task protocol's frames may be larger).
        stream = await h.p2p.host.new_stream(parse_peer_addr(n1.p2p_addr).peer_id,
                                             [TASK_PROTOCOL])  # fmt: skip
        await write_frame(stream, msgpack.packb({"kind": "bid", "version": Bid.VERSION,
                                                 "pad": "x" * (Bid.MAX_BYTES + 1)}))  # fmt: skip
        reply = decode(await read_frame(stream, 4096))
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request", reply
        # On the bid protocol a frame over a bid's size is not even read: the stream is reset.
        stream = await h.p2p.host.new_stream(parse_peer_addr(n1.p2p_addr).peer_id,
                                             [BID_PROTOCOL])  # fmt: skip
        await write_frame(stream, b"\x00" * (Bid.MAX_BYTES + 1))
        with pytest.raises(StreamProtocolError):
            await read_frame(stream, 4096)
        assert assigned == []  # nothing of that won the task

        # Our own bid for the announced task: taken, and the task is ours.
        assert await h.request(origin, BID_STREAM, bid(h, origin, task_id), Ack) == Ack()
        with trio.fail_after(20):
            while not assigned:
                await trio.sleep(0.05)
        assert assigned[0].items[0].task_id == task_id
        nursery.cancel_scope.cancel()
    refused = {r: await in_thread(lambda r=r: metric(n1, "vcoin_bids_refused_total", reason=r))
               for r in ("not_author", "not_announced")}  # fmt: skip
    assert refused == {"not_author": 2.0, "not_announced": 2.0}
    assert n1.proc.poll() is None


def wire(node: Any) -> dict[str, float]:
    """Task- and bid-protocol requests and tasks/votes gossip of a node (its /metrics)."""
    out = {}
    for topic in ("tasks", "votes"):
        out[f"gossip out {topic}"] = metric(node, "vcoin_gossip_published_total", topic=topic)
        out[f"gossip in {topic}"] = metric(node, "vcoin_gossip_received_total", topic=topic)
    for kind in ("bid", "task_assignments", "task_progress", "task_result"):
        proto = BID_PROTOCOL if kind == "bid" else TASK_PROTOCOL
        for way in ("in", "out"):
            out[f"{way} {kind}"] = metric(
                node, "vcoin_stream_requests_total", protocol=proto, kind=kind, direction=way
            )
    return out


def test_a_task_costs_each_node_a_bounded_number_of_messages(
    cluster: Cluster, models_dir: Path
) -> None:
    """Three daemons, a burst of tasks to node 1: bids go to node 1 alone, nobody gossips
    one, and every node's messages per task stay under a small bound."""
    extra = ["--models-dir", str(models_dir)]
    n1 = cluster.start(1, extra=[*extra, "--strategy", "round_robin", "--bid-window", "5"])
    n2 = cluster.start(2, bootstrap=n1, extra=extra, wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=extra)
    nodes = [n1, n2, n3]
    wait_until(lambda: sum(bool(p["models"]) for p in n1.rpc.call("vcoin_peers")) >= 2, 30,
               "node 1 sees both peers' models")  # fmt: skip
    before = [wire(n) for n in nodes]
    tasks = 6
    ids = [n1.rpc.call("vcoin_submitTask", {"model": MODEL, "input": f"prompt {i}",
                                            "parameters": {"max_new_tokens": 4}})["task_id"]
           for i in range(tasks)]  # fmt: skip
    for tid in ids:
        wait_until(lambda tid=tid: n1.rpc.call("vcoin_getTask", {"task_id": tid})["finished"],
                   60, f"task {tid}")  # fmt: skip
    time.sleep(0.5)  # the last results' acknowledgements
    after = [wire(n) for n in nodes]
    d = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    assert all(x["gossip out tasks"] == 0 for x in d[1:]), d  # bids are not gossiped
    assert d[0]["in bid"] >= 1 and d[0]["in bid"] == d[1]["out bid"] + d[2]["out bid"], d
    # announces only (a node may miss one sent before its mesh formed)
    assert d[1]["gossip in tasks"] <= d[0]["gossip out tasks"] <= tasks, d
    # An announce and a bid each, an assignment, some progress and a result: far under 10
    # a task for any node (gossiped bids cost every node every bid).
    for i, x in enumerate(d, 1):
        assert sum(x.values()) / tasks < 10, (i, x)
