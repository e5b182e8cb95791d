"""Pipelined generation across real daemons serving layer spans of the test model."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from devnet.__main__ import DevNode
from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished, task
from vcoind.compute.frames import TensorFrame
from vcoind.compute.generate import load_model
from vcoind.compute.shard_host import LocalChannel, PipelineError, ServedSpan, ShardHost
from vcoind.compute.shards import even_ranges, split_model
from vcoind.compute.shardwire import ShardClose, ShardOpen, ShardOutput, ShardStep
from vcoind.compute.testmodel import CORPUS
from vcoind.market.routes import PipelineRun
from vcoind.p2p.streams import StreamOpenError, StreamProtocolError

pytestmark = pytest.mark.slow
PROMPTS = ["Explain proof of stake", "What is a Merkle tree?", "Define gas", "Why hash?"]
# 50 prompts for the parity checks: lines of the test model's corpus, cut at varied lengths.
PARITY = [line[: 12 + (i * 7) % 50] for i, line in enumerate(CORPUS.splitlines() * 4)][:50]


def parity(origin: DevNode, prompts: list[str]) -> int:
    """How many pipelined answers equal the single-node answer (greedy, 12 tokens)."""
    same = 0
    for prompt in prompts:
        single = finished(origin, submit(origin, prompt, False, n=12))
        piped = finished(origin, submit(origin, prompt, True, n=12))
        assert piped["status"] == "completed", piped
        same += piped["result"] == single["result"]
    return same


def spans(models_dir: Path, *layers: str) -> list[str]:
    out = ["--models-dir", str(models_dir), "--no-chain"]
    for s in layers:
        out += ["--serve-layers", f"{MODEL}:{s}"]
    return out


def submit(node: DevNode, prompt: str, pipeline: bool, n: int = 16) -> str:
    req: dict[str, Any] = {"model": MODEL, "input": prompt, "pipeline": pipeline,
                           "parameters": {"max_new_tokens": n}}  # fmt: skip
    return str(node.rpc.call("vcoin_submitTask", req)["task_id"])


def sees_spans(node: DevNode, peers: int) -> bool:
    return sum(1 for p in node.rpc.call("vcoin_peers") if p["spans"]) >= peers


def test_two_span_pipeline_matches_single_node_and_reports_hops(
    cluster: Cluster, models_dir: Path
) -> None:
    n1 = cluster.start(1, extra=spans(models_dir, "0-1"))
    n2 = cluster.start(2, bootstrap=n1, extra=spans(models_dir, "2-3"))
    wait_until(lambda: sees_spans(n1, 1), 20, "node 1 sees node 2's span")
    assert parity(n1, PARITY) == len(PARITY)
    piped = finished(n1, submit(n1, PROMPTS[0], True))
    assert piped["mode"] == "pipeline"
    tm = piped["timings"]
    hops = tm["hops"]
    assert [(h["node_id"], h["layers"]) for h in hops] == [
        (n1.info["peer_id"], "0-1"), (n2.info["peer_id"], "2-3")]  # fmt: skip
    assert all(h["status"] == "completed" and h["bytes"] > 0 and h["steps"] >= 1 for h in hops)
    assert hops[1]["transfer_s"] > 0 and tm["tokens"] == piped["progress"]
    assert [r["node_id"] for r in piped["route"]] == [n1.info["peer_id"], n2.info["peer_id"]]

    # 10 concurrent pipelined requests, all correct.
    ids = [submit(n1, PROMPTS[i % 4], True) for i in range(10)]
    done = [finished(n1, i, timeout=120) for i in ids]
    ref = {p: finished(n1, submit(n1, p, False))["result"] for p in PROMPTS}
    assert all(t["status"] == "completed" for t in done), [t["error"] for t in done]
    assert [t["result"] for t in done] == [ref[PROMPTS[i % 4]] for i in range(10)]
    # their decode steps met at node 2's span and ran there as one engine batch
    assert n2.rpc.call("vcoin_nodeInfo")["pipeline_peak_batch"] >= 2

    # Through the OpenAI gateway: a chat streamed over the pipeline (the origin's own loop
    # decodes it) says what the whole model says.
    from tests.test_gateway import ASK, client, said

    kw: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 12, "temperature": 0}
    whole = client(n1).chat.completions.create(**kw).choices[0].message
    chunks = list(client(n1).chat.completions.create(
        **kw, stream=True, extra_body={"vcoin": {"pipeline": True}}))  # fmt: skip
    assert said(chunks) == (whole.model_extra.get("reasoning_content") or "") + whole.content
    assert chunks[-1].model_extra["vcoin"]["mode"] == "pipeline"

    # No route: nobody serves layers 2-3 any more.
    n2.proc.send_signal(signal.SIGKILL)
    n2.proc.wait()
    wait_until(lambda: not sees_spans(n1, 1), 20, "node 2 to drop out")
    t = finished(n1, submit(n1, "no route", True))
    assert t["status"] == "failed" and "no route covers layers 0-3" in t["error"], t


def test_pipelined_consensus_replicas_run_on_disjoint_routes(
    cluster: Cluster, models_dir: Path
) -> None:
    """Two routes over four span nodes; each replica is a pipeline driven by its route's
    first node, and no node serves both."""
    n1 = cluster.start(1, extra=spans(models_dir, "0-1"))
    others = [cluster.start(i, bootstrap=n1, extra=spans(models_dir, s))
              for i, s in ((2, "2-3"), (3, "0-1"), (4, "2-3"))]  # fmt: skip
    nodes = [n1, *others]
    # The origin knows every span; the drivers may not have met their route's other node
    # yet (they wait for it: test_a_driver_waits_to_meet_the_nodes_on_its_route).
    wait_until(lambda: sees_spans(n1, 3), 30, "the origin sees every span")
    req = {"model": MODEL, "input": PROMPTS[1], "mode": "consensus", "replicas": 2,
           "pipeline": True, "parameters": {"max_new_tokens": 12}}  # fmt: skip
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", req)["task_id"]), timeout=120)
    assert t["status"] == "completed", t
    assert t["mode"] == "consensus" and t["pipeline"] is True
    c = t["consensus"]
    assert c["decision"] == "supermajority" and not c["conflict"], c
    drivers = {r["node_id"] for r in c["replicas"]}
    assert drivers == {n1.info["peer_id"], nodes[2].info["peer_id"]}  # the 0-1 span nodes
    assert len({r["result_hash"] for r in c["replicas"]}) == 1
    single = finished(n1, submit(n1, PROMPTS[1], False, n=12))
    assert t["result"] == single["result"]
    # every span node served exactly one session: the two routes shared no node
    served = [n.rpc.call("vcoin_nodeInfo")["pipeline_sessions_served"] for n in nodes]
    assert served == [1, 1, 1, 1], served
    # with only two disjoint routes, asking for three replicas runs the two there are
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", {**req, "replicas": 3})["task_id"]))
    assert t["status"] == "completed" and len(t["consensus"]["replicas"]) == 2, t
    assert t["result"] == single["result"]
    # a model this node holds no part of fails with the reason
    bad = {**req, "model": "nope"}
    t = finished(n1, str(n1.rpc.call("vcoin_submitTask", bad)["task_id"]))
    assert t["status"] == "failed" and "holds no part of 'nope'" in t["error"], t


def test_three_span_pipeline_matches_single_node(cluster: Cluster, models_dir: Path) -> None:
    n1 = cluster.start(1, extra=spans(models_dir, "0-0"))
    cluster.start(2, bootstrap=n1, extra=spans(models_dir, "1-2"), wait=False)
    cluster.start(3, bootstrap=n1, extra=spans(models_dir, "3-3"))
    wait_until(lambda: sees_spans(n1, 2), 20, "node 1 sees both span servers")
    assert parity(n1, PARITY) == len(PARITY)


def test_killed_span_node_is_replaced_and_the_text_is_unchanged(
    cluster: Cluster, models_dir: Path
) -> None:
    n1 = cluster.start(1, extra=spans(models_dir, "0-1"))
    n2 = cluster.start(2, bootstrap=n1, extra=spans(models_dir, "2-3"), wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=spans(models_dir, "2-3"))
    wait_until(lambda: sees_spans(n1, 2), 20, "node 1 sees both span servers")
    ref = finished(n1, submit(n1, PROMPTS[0], False, n=400))
    assert ref["status"] == "completed"
    tid = submit(n1, PROMPTS[0], True, n=400)
    wait_until(lambda: task(n1, tid)["progress"] > 20, 60, "progress")
    victim = n2 if n2.rpc.call("vcoin_nodeInfo")["pipeline_sessions"] else n3
    assert victim.rpc.call("vcoin_nodeInfo")["pipeline_sessions"] == 1
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    t = finished(n1, tid, timeout=120)
    assert t["status"] == "completed", t
    assert t["result"] == ref["result"]  # replayed prefix: the same text
    hops = t["timings"]["hops"]
    assert t["timings"]["reroutes"] >= 1
    assert any(h["node_id"] == victim.info["peer_id"] and h["status"] == "failed" for h in hops)
    assert hops[-1]["status"] == "completed" and hops[-1]["node_id"] != victim.info["peer_id"]


async def test_shard_host_refuses_bad_frames_and_keeps_serving(
    models_dir: Path, tmp_path: Path
) -> None:
    d = split_model(models_dir / MODEL, tmp_path, even_ranges(4, 2), name=MODEL,
                    model_id="sha256:" + "2" * 64)  # fmt: skip
    host = ShardHost()
    host.add(ServedSpan(MODEL, "sha256:" + "2" * 64, 2, 3, d[1]))
    sid = "ab" * 16
    with pytest.raises(StreamProtocolError, match="not served"):
        await host.handle("p", ShardOpen(sid, "sha256:" + "2" * 64, 0, 1))
    await host.handle("p", ShardOpen(sid, "sha256:" + "2" * 64, 2, 3))
    ids = TensorFrame.from_tensor(torch.tensor([[1, 2, 3]]))
    with pytest.raises(StreamProtocolError, match="bad frame"):  # token ids to a middle span
        await host.handle("p", ShardStep(sid, 0, ids.dtype, ids.shape, ids.data))
    assert host.open_sessions == 0  # the broken session is closed
    await host.handle("p", ShardOpen(sid, "sha256:" + "2" * 64, 2, 3))
    with pytest.raises(StreamProtocolError, match="bad frame"):
        await host.handle("p", ShardStep(sid, 0, "float32", (1, 2, 64), b"\0" * 12))
    await host.handle("p", ShardOpen(sid, "sha256:" + "2" * 64, 2, 3))
    h = TensorFrame.from_tensor(torch.zeros(1, 3, 64))
    with pytest.raises(StreamProtocolError, match="out of order"):
        await host.handle("p", ShardStep(sid, 5, h.dtype, h.shape, h.data))
    out = await host.handle("p", ShardStep(sid, 0, h.dtype, h.shape, h.data))
    assert isinstance(out, ShardOutput) and tuple(out.shape) == (1, 1, 1024)  # last logits
    assert out.dtype == "float32"
    await host.handle("p", ShardClose(sid))
    with pytest.raises(StreamProtocolError, match="no session"):
        await host.handle("p", ShardStep(sid, 1, h.dtype, h.shape, h.data))
    # A previous hop on a GPU sends fp16 hidden states: cast to this span's dtype.
    await host.handle("p", ShardOpen(sid, "sha256:" + "2" * 64, 2, 3))
    h16 = TensorFrame.from_tensor(torch.zeros(1, 3, 64, dtype=torch.float16))
    out16 = await host.handle("p", ShardStep(sid, 0, h16.dtype, h16.shape, h16.data))
    assert out16.data == out.data  # zeros in fp16 and fp32 are the same input
    await trio.sleep(0)


async def test_span_memory_budget_unloads_idle_spans_first(
    models_dir: Path, tmp_path: Path
) -> None:
    mid = "sha256:" + "3" * 64
    d = split_model(models_dir / MODEL, tmp_path, even_ranges(4, 2), name=MODEL, model_id=mid)
    a, b = ServedSpan(MODEL, mid, 0, 1, d[0]), ServedSpan(MODEL, mid, 2, 3, d[1])
    host = ShardHost("cpu", budget_bytes=max(a.size, b.size) + 1)  # room for one span
    host.add(a)
    host.add(b)
    await host.handle("p", ShardOpen("a" * 32, mid, 0, 1))
    assert a.shard is not None
    with pytest.raises(StreamProtocolError, match="memory budget"):  # a is in use
        await host.handle("p", ShardOpen("b" * 32, mid, 2, 3))
    await host.handle("p", ShardClose("a" * 32))
    await host.handle("p", ShardOpen("b" * 32, mid, 2, 3))  # a is idle now: unloaded
    assert a.shard is None and b.shard is not None


class _Unreachable:
    """What a stream to a node without a known address gives: no stream."""

    async def request(self, record: Any, reply_type: type[Any]) -> Any:
        raise StreamOpenError("cannot open /vcoin/shard/1.0.0: no addresses for the peer")

    async def aclose(self) -> None:
        return None


async def test_a_driver_waits_to_meet_the_nodes_on_its_route(
    models_dir: Path, tmp_path: Path
) -> None:
    """An origin hands a replica's driver a route through a node the driver has not heard
    from yet (right after start-up). The driver waits for it instead of failing the
    route; a node it never meets fails the run after the wait, with the reason."""
    mid = "sha256:" + "4" * 64
    d = split_model(models_dir / MODEL, tmp_path, even_ranges(4, 2), name=MODEL, model_id=mid)
    hosts = {"a": ShardHost(), "b": ShardHost()}
    hosts["a"].add(ServedSpan(MODEL, mid, 0, 1, d[0]))
    hosts["b"].add(ServedSpan(MODEL, mid, 2, 3, d[1]))
    met = {"a"}
    route = [("a", 0, 1), ("b", 2, 3)]
    ids = [5, 17, 33, 2, 9]
    lm = load_model(models_dir / MODEL, torch.device("cpu"), torch.float32, engine=False)
    want = lm.model(torch.tensor([ids])).logits[0, -1]

    def run(**kw: Any) -> PipelineRun:
        return PipelineRun(
            lambda p: LocalChannel(hosts[p], "driver") if p in met else _Unreachable(),
            mid, 4, lambda: {p: [s.span() for s in hosts[p].spans] for p in met},
            lambda p: (0.0, 0.0), route=route, **kw,
        )  # fmt: skip

    # without waiting: b fails, and no other node serves layers 2-3
    with pytest.raises(PipelineError, match="no route covers"):
        await run().forward(ids)

    async def meet_b() -> None:
        await trio.sleep(0.3)
        met.add("b")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(meet_b)
        waiting = run(ready=met.__contains__, learn_timeout_s=10)
        got = await waiting.forward(ids)
    assert waiting.reroutes == 0 and [h.peer for h in waiting.hops] == ["a", "b"]
    assert torch.allclose(got, want, atol=1e-4)
    await waiting.close()

    met.discard("b")  # never met: the wait ends, and the run fails as before
    t0 = trio.current_time()
    with pytest.raises(PipelineError, match="no route covers"):
        await run(ready=met.__contains__, learn_timeout_s=0.5).forward(ids)
    assert trio.current_time() - t0 >= 0.5
