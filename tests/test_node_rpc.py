"""In-process daemons (real libp2p hosts on loopback, real HTTP): the node's RPC surface."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from vcoind.config import load
from vcoind.datadir import DataDir
from vcoind.node import Node, RunInfo
from vcoind.presence.heartbeat import Capabilities
from vcoind.presence.messages import ModelServed


@asynccontextmanager
async def node_in_process(datadir: Path, **flags: Any) -> AsyncIterator[tuple[Node, RunInfo]]:
    base = {
        "network": "unit",
        "p2p.listen": ["/ip4/127.0.0.1/tcp/0"],
        "rpc.addr": "127.0.0.1:0",
        "p2p.heartbeat_interval": 0.2,
        "p2p.peer_timeout": 2.0,
    }
    cfg = load(datadir, env={}, flags={**base, **flags})
    dd = DataDir(datadir)
    dd.init(exist_ok=True)
    node = Node(cfg, dd, dd.load_identity())
    async with trio.open_nursery() as nursery:
        info = await nursery.start(node.run)
        yield node, info
        nursery.cancel_scope.cancel()


def auth(datadir: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {DataDir(datadir).read_cookie()}"}


def ws_auth(datadir: Path) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {DataDir(datadir).read_cookie()}".encode())]


async def rpc(
    client: httpx.AsyncClient, url: str, method: str, params: Any = None, **headers: str
) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    reply = (await client.post(url + "/rpc", json=body, headers=headers)).json()
    return reply


async def test_node_rpc_methods_and_endpoints(tmp_path: Path) -> None:
    async with (
        node_in_process(tmp_path / "a") as (a, ia),
        node_in_process(tmp_path / "b", **{"p2p.bootstrap": [ia.p2p_addrs[0]]}) as (b, ib),
        httpx.AsyncClient(timeout=10, headers=auth(tmp_path / "a")) as client,
    ):
        assert (tmp_path / "a" / "run.json").exists()
        with trio.fail_after(15):
            for n in (a, b):
                while len(n.presence.peers) < 1:
                    await n.presence.peers.wait_changed()

        info = (await rpc(client, ia.rpc_url, "vcoin_nodeInfo"))["result"]
        assert info["peer_id"] == ia.peer_id and info["network"] == "unit"
        assert info["p2p_addrs"][0].endswith("/p2p/" + ia.peer_id)
        assert info["device"]["kind"] in ("cpu", "cuda")

        peers = (await rpc(client, ia.rpc_url, "vcoin_peers"))["result"]
        assert [p["peer_id"] for p in peers] == [ib.peer_id]
        assert peers[0]["eth_address"] == ib.eth_address
        assert 0.0 <= peers[0]["health"] <= 1.0

        status = (await rpc(client, ia.rpc_url, "vcoin_clusterStatus"))["result"]
        assert status["active_nodes"] == 2
        assert {n["peer_id"] for n in status["load_distribution"]} == {ia.peer_id, ib.peer_id}
        assert status["gossip"]["received"]["heartbeat"] >= 1

        bad = await rpc(client, ia.rpc_url, "vcoin_peers", {"include_offline": "yes"})
        assert bad["error"]["code"] == -32602 and "include_offline" in bad["error"]["message"]

        doc = (await rpc(client, ia.rpc_url, "rpc.discover"))["result"]
        methods = {m["name"]: m for m in doc["methods"]}
        assert {
            "vcoin_nodeInfo",
            "vcoin_peers",
            "vcoin_clusterStatus",
            "vcoin_gossipStats",
            "rpc.discover",
        } <= set(methods)
        assert methods["vcoin_peers"]["params"][0]["name"] == "include_offline"

        rest = (await client.get(ia.rpc_url + "/api/cluster/status")).json()
        assert rest["active_nodes"] == 2 and rest["network"] == "unit"
        nodes = (await client.get(ia.rpc_url + "/api/cluster/nodes")).json()
        assert [n["peer_id"] for n in nodes] == [ib.peer_id]
        assert "latency" in (await client.get(ia.rpc_url + "/api/cluster/metrics")).json()

        assert (await client.get(ia.rpc_url + "/health")).status_code == 200
        assert (await client.get(ia.rpc_url + "/ready")).status_code == 200
        metrics = (await client.get(ia.rpc_url + "/metrics")).text
        assert "vcoin_peers 1.0" in metrics
        assert 'vcoin_rpc_calls_total{method="vcoin_nodeInfo",outcome="ok"} 1.0' in metrics
        assert 'vcoin_rpc_calls_total{method="vcoin_peers",outcome="error"} 1.0' in metrics
        assert "vcoin_gossip_received_total" in metrics
    assert not (tmp_path / "a" / "run.json").exists()


async def test_non_loopback_rpc_requires_cookie(tmp_path: Path) -> None:
    async with (
        node_in_process(tmp_path, **{"rpc.addr": "0.0.0.0:0"}) as (_node, info),
        httpx.AsyncClient(timeout=10) as client,
    ):
        port = info.rpc_url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"  # only ever talk to loopback
        body = {"jsonrpc": "2.0", "id": 1, "method": "vcoin_nodeInfo"}
        assert (await client.post(url + "/rpc", json=body)).status_code == 401
        assert (await client.get(url + "/metrics")).status_code == 401
        assert (await client.get(url + "/health")).status_code == 200
        cookie = DataDir(tmp_path).read_cookie()
        ok = await client.post(
            url + "/rpc", json=body, headers={"Authorization": f"Bearer {cookie}"}
        )
        assert ok.status_code == 200 and ok.json()["result"]["peer_id"] == info.peer_id
        wrong = await client.post(url + "/rpc", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401


async def test_models_are_served_and_advertised(tmp_path: Path, models_dir: Path) -> None:
    flags = {"compute.models_dir": str(models_dir)}
    async with (
        node_in_process(tmp_path / "a", **flags) as (_a, ia),
        node_in_process(tmp_path / "b", **{"p2p.bootstrap": [ia.p2p_addrs[0]]}) as (b, ib),
        httpx.AsyncClient(timeout=10, headers=auth(tmp_path / "a")) as client,
    ):
        reply = (await rpc(client, ia.rpc_url, "vcoin_models"))["result"]
        assert reply["models_dir"] == str(models_dir)
        (model,) = reply["models"]
        assert model["name"] == "tiny-qwen2"
        with trio.fail_after(60):  # the worker preloads served models in the background
            while not model["loaded"]:
                await trio.sleep(0.1)
                (model,) = (await rpc(client, ia.rpc_url, "vcoin_models"))["result"]["models"]
        assert model["model_id"].startswith("sha256:")
        with trio.fail_after(15):  # b hears a's heartbeat, which lists the model
            while (st := b.presence.peers.get(ia.peer_id)) is None:
                await b.presence.peers.wait_changed()
        served = ModelServed("tiny-qwen2", model["model_id"], reasoning=True)
        assert st.heartbeat.models == (served,)
        peers = (await rpc(client, ib.rpc_url, "vcoin_peers", **auth(tmp_path / "b")))["result"]
        assert peers[0]["models"] == [
            {"name": "tiny-qwen2", "model_id": model["model_id"], "reasoning": True}
        ]


async def test_capability_change_is_announced_at_once(tmp_path: Path) -> None:
    slow = {"p2p.heartbeat_interval": 30.0, "p2p.peer_timeout": 120.0}
    async with (
        node_in_process(tmp_path / "a", **slow) as (a, ia),
        node_in_process(tmp_path / "b", **{"p2p.bootstrap": [ia.p2p_addrs[0]]}) as (b, _ib),
    ):
        with trio.fail_after(15):
            while len(a.presence.peers) < 1:
                await a.presence.peers.wait_changed()
        started = trio.current_time()
        served = (ModelServed("tiny-qwen2", "sha256:" + "12" * 32),)
        a.presence.heartbeat.set_capabilities(Capabilities(models=served, queue_length=3))
        with trio.fail_after(10):  # far less than the 30 s interval
            while True:
                st = b.presence.peers.get(ia.peer_id)
                if st is not None and st.heartbeat.models == served:
                    break
                await trio.sleep(0.02)
        assert st.heartbeat.queue_length == 3
        assert trio.current_time() - started < 10


async def test_task_notifications_over_websocket(tmp_path: Path, models_dir: Path) -> None:
    from trio_websocket import open_websocket_url

    async with (
        node_in_process(tmp_path / "a", **{"compute.models_dir": str(models_dir)}) as (a, ia),
        httpx.AsyncClient(timeout=10, headers=auth(tmp_path / "a")) as client,
    ):
        ws_url = ia.rpc_url.replace("http://", "ws://") + "/ws"
        async with open_websocket_url(ws_url, extra_headers=ws_auth(tmp_path / "a")) as ws:
            await ws.send_message(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "vcoin_subscribe",
                        "params": {"channel": "tasks"},
                    }
                )
            )
            assert "result" in json.loads(await ws.get_message())
            req = {"model": "tiny-qwen2", "input": "hello", "parameters": {"max_new_tokens": 8}}
            task_id = (await rpc(client, ia.rpc_url, "vcoin_submitTask", req))["result"]["task_id"]
            phases = []
            with trio.fail_after(60):
                while not phases or phases[-1] != "completed":
                    note = json.loads(await ws.get_message())
                    assert note["method"] == "vcoin_subscription"
                    view = note["params"]["result"]
                    assert view["task_id"] == task_id
                    phases.append(view["phase"])
            assert phases[0] in ("bidding", "assigned") and "running" in phases
            assert view["result"] and view["node_id"] == ia.peer_id  # alone: it ran it itself
        status = (await rpc(client, ia.rpc_url, "vcoin_clusterStatus"))["result"]
        assert status["tasks"]["by_status"] == {"completed": 1}
        metrics = (await client.get(ia.rpc_url + "/metrics")).text
        assert 'vcoin_tasks_total{status="completed"} 1.0' in metrics
        assert "vcoin_task_dispatch_seconds_count 1.0" in metrics
        assert a.market.worker.queue_length == 0
