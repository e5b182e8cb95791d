"""Discovery through the Kademlia DHT (``vcoind.p2p.dht``, ``vcoind.discovery``).

In-process real hosts on loopback: provider records for models and spans, what a flood
of records leaves stored, value records refused. Real daemons: a node that never heard
a worker's heartbeat finds it through the DHT alone, verifies it, and has it serve a
task; a peer whose record names a model it does not serve is not counted."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_uvarint

from tests.adversary.hostile import hostile, in_thread
from tests.conftest import Cluster, peers_of, wait_until
from tests.test_tasks import MODEL, finished
from vcoind.cli.model import model_main
from vcoind.config import P2PConfig
from vcoind.discovery import CAPABILITY_STREAM, CapabilityRequest
from vcoind.p2p.dht import MAX_PROVIDERS, Dht, model_key, span_key
from vcoind.p2p.host import P2PHost, build_host, running
from vcoind.p2p.policy import DIAL_OK
from vcoind.presence.messages import Heartbeat

NET = "testnet"
M = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _verdict(addr: str) -> str:
    return "private" if "/ip4/10." in addr else DIAL_OK


@asynccontextmanager
async def dht_node(
    cfg: P2PConfig, reach: list[str] | None = None
) -> AsyncIterator[tuple[P2PHost, Dht]]:
    p2p = build_host(create_new_key_pair(), lambda fwd, msg: None)
    seen = reach or ["unknown"]
    async with running(p2p, ["/ip4/127.0.0.1/tcp/0"]), trio.open_nursery() as nursery:
        dht = Dht(p2p, cfg, verdict=_verdict, own_addrs=p2p.addrs, reachability=lambda: seen[0])
        await nursery.start(dht.run)
        yield p2p, dht
        nursery.cancel_scope.cancel()


async def connect(a: P2PHost, b: P2PHost) -> None:
    await a.host.connect(PeerInfo(b.peer_id, [multiaddr.Multiaddr(x) for x in b.addrs()]))


async def until(pred: object, what: str, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_model_and_span_records_are_found_by_their_keys() -> None:
    cfg = P2PConfig(dht="server", dht_reprovide_s=60)
    async with dht_node(cfg) as (a, da), dht_node(cfg) as (b, db), dht_node(cfg) as (c, dc):
        await connect(b, a)
        await connect(c, a)
        await until(lambda: da.kad.get_routing_table_size() == 2, "a knows b and c")
        await until(lambda: db.kad.get_routing_table_size() >= 1, "b knows a")
        # b serves layers 0-1 of M; c serves the whole of OTHER
        db.provide_keys({span_key(NET, M, 0, 1)})
        dc.provide_keys({model_key(NET, OTHER)})
        await until(lambda: da.store._count() >= 2, "a stores both records")
        found = await dc.find(span_key(NET, M, 0, 1))
        assert [p.peer_id for p in found] == [b.peer_id]
        assert {str(x) for x in found[0].addrs} <= set(b.addrs()) | {
            x.rsplit("/p2p/", 1)[0] for x in b.addrs()
        }
        assert await dc.find(span_key(NET, M, 2, 3)) == []
        assert await dc.find(model_key(NET, M)) == []
        assert [p.peer_id for p in await db.find(model_key(NET, OTHER))] == [c.peer_id]
        # unloading withdraws ours at once; the copies at others lapse after the TTL
        db.provide_keys(set())
        assert db.store.get_providers(span_key(NET, M, 0, 1)) == []


async def test_auto_mode_serves_once_reachable_and_its_peers_then_use_it() -> None:
    reach = ["unknown"]
    async with (
        dht_node(P2PConfig(), reach) as (a, da),
        dht_node(P2PConfig(dht="client")) as (
            b,
            db,
        ),
    ):
        await connect(b, a)
        await trio.sleep(0.5)
        assert (da.mode, db.kad.get_routing_table_size()) == ("client", 0)
        reach[0] = "public"  # the dial-back found us reachable
        await until(lambda: da.mode == "server", "a serves")
        # a told b (identify push): b puts a in its table and stores its records there
        await until(lambda: db.kad.get_routing_table_size() == 1, "b adds a")
        db.provide_keys({model_key(NET, M)})
        await until(lambda: da.store._count() == 1, "a stores b's record")
        reach[0] = "private"
        await until(lambda: da.mode == "client", "a stops serving")


async def _add_provider(src: P2PHost, dst: ID, key: bytes, addrs: list[str]) -> None:
    stream = await src.host.new_stream(dst, [PROTOCOL_ID])
    msg = KadMessage()
    msg.type = KadMessage.MessageType.ADD_PROVIDER
    msg.key = key
    prov = msg.providerPeers.add()
    prov.id = src.peer_id.to_bytes()
    prov.addrs.extend(multiaddr.Multiaddr(a).to_bytes() for a in addrs)
    data = msg.SerializeToString()
    await stream.write(encode_uvarint(len(data)) + data)
    await stream.close()


async def _put_value(src: P2PHost, dst: ID, key: bytes, value: bytes) -> bytes:
    """PUT_VALUE; the answer's bytes (b"": the stream was reset, nothing stored)."""
    stream = await src.host.new_stream(dst, [PROTOCOL_ID])
    msg = KadMessage()
    msg.type = KadMessage.MessageType.PUT_VALUE
    msg.key = key
    msg.record.key = key
    msg.record.value = value
    data = msg.SerializeToString()
    await stream.write(encode_uvarint(len(data)) + data)
    try:
        with trio.fail_after(5):
            return bytes(await stream.read(1024))
    except Exception:  # reset by the server
        return b""


async def test_a_flood_of_provider_records_stays_bounded_and_values_are_refused() -> None:
    cfg = P2PConfig(dht="server", dht_max_records=12, dht_max_keys_per_peer=4)
    async with dht_node(cfg) as (a, da), dht_node(P2PConfig(dht="client")) as (h, _dh):
        await connect(h, a)
        mine = h.addrs()[0].rsplit("/p2p/", 1)[0]
        # one hostile peer, 10 records: py-libp2p's own rate limit (10 per 10 s) lets them
        # all through; ours keeps 4 keys per peer
        for i in range(10):
            await _add_provider(h, a.peer_id, model_key(NET, f"sha256:{i:064x}"), [mine])
        # keys not ours (not 32 bytes), and addresses the dial policy refuses
        await until(lambda: da.store.refused >= 6, "records refused")
        assert len(da.store.get_provided_keys(h.peer_id)) == 4
        # many identities: the store holds dht_max_records, the oldest go first
        for key_no in range(5):
            async with dht_node(P2PConfig(dht="client")) as (s, _ds):
                await connect(s, a)
                own = s.addrs()[0].rsplit("/p2p/", 1)[0]
                for j in range(4):
                    await _add_provider(s, a.peer_id, model_key(NET, f"{key_no}-{j}"), [own])
                await until(lambda: len(da.store.get_provided_keys(s.peer_id)) == 4, "stored")
        assert da.store._count() == 12
        assert da.store.get_provided_keys(h.peer_id) == []  # the oldest were dropped
        # nor is a record stored with an address the dial policy refuses, or a foreign key
        # (from a fresh identity: py-libp2p's rate limit holds h back for 10 s now)
        before = da.store.refused
        async with dht_node(P2PConfig(dht="client")) as (z, _dz):
            await connect(z, a)
            own = z.addrs()[0].rsplit("/p2p/", 1)[0]
            await _add_provider(z, a.peer_id, model_key(NET, "x"), ["/ip4/10.0.0.1/tcp/1"])
            await _add_provider(z, a.peer_id, b"\x12\x20" + bytes(32), [own])
            await until(lambda: da.store.refused >= before + 2, "both refused")
            assert da.store.get_provided_keys(z.peer_id) == []
        # at most MAX_PROVIDERS come back for any key
        assert all(len(v) <= MAX_PROVIDERS for v in da.store.providers.values())
        # value records (py-libp2p stores 50,000 of up to 1 MiB): none, whatever the key
        for key in (b"plain-key", b"/pk/not-a-key", b"/ipns/x"):
            assert await _put_value(h, a.peer_id, key, b"x" * 100_000) == b""
        assert len(da.kad.value_store.store) == 0


async def test_records_expire_after_the_ttl() -> None:
    cfg = P2PConfig(dht="server", dht_record_ttl=30, dht_reprovide_s=10)
    async with dht_node(cfg) as (a, da), dht_node(P2PConfig(dht="client")) as (h, _dh):
        await connect(h, a)
        await _add_provider(h, a.peer_id, model_key(NET, M), [h.addrs()[0].rsplit("/p2p/")[0]])
        await until(lambda: da.store._count() == 1, "stored")
        for rec in da.store.providers[model_key(NET, M)].values():
            rec.timestamp -= 31  # as if stored 31 s ago
        assert da.store.get_providers(model_key(NET, M)) == []
        assert da.store._count() == 0


def test_a_heartbeat_backs_a_record_only_for_what_it_lists() -> None:
    from vcoind.discovery import serves
    from vcoind.presence.messages import LayerSpan, ModelServed

    hb = Heartbeat(network=NET, peer_id="p", eth_address="0x" + "00" * 20, eth_sig=b"",
                   seq=1, timestamp=0.0, interval=5.0, models=(ModelServed("m", M),),
                   spans=(LayerSpan(OTHER, 2, 5), LayerSpan("m", 0, 1)))  # fmt: skip
    assert serves(hb, M, None) and serves(hb, M, (7, 9))  # whole: any span
    assert not serves(hb, OTHER, None)  # only a span of OTHER
    assert serves(hb, OTHER, (2, 5)) and serves(hb, OTHER, (3, 4))
    assert not serves(hb, OTHER, (1, 3)) and not serves(hb, OTHER, (5, 6))
    assert not serves(hb, "sha256:" + "ef" * 32, (0, 1))


# --- real daemons --------------------------------------------------------------------


def _model_id(node: object) -> str:
    models = node.rpc.call("vcoin_models")["models"]  # type: ignore[attr-defined]
    return str(next(m["model_id"] for m in models if m["name"] == MODEL))


@pytest.mark.slow
async def test_a_node_finds_a_worker_through_the_dht_alone(
    cluster: Cluster, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot = await in_thread(lambda: cluster.start(1, extra=["--no-chain", "--dht", "server"]))
    # The worker's heartbeats: one at start and one when its model is loaded, then none
    # for ten minutes: a node joining later never hears one by gossip.
    worker = await in_thread(lambda: cluster.start(
        2, bootstrap=boot, heartbeat=600.0, peer_timeout=1200.0,
        extra=["--no-chain", "--models-dir", str(models_dir)]))  # fmt: skip
    wid = worker.info["peer_id"]
    model_id = await in_thread(_model_id, worker)

    def boot_heard() -> bool:
        return any(p["peer_id"] == wid and p["models"] for p in boot.rpc.call("vcoin_peers"))

    def boot_records() -> int:
        return int(boot.rpc.call("vcoin_nodeInfo")["reachability"]["dht"]["records"])

    await in_thread(wait_until, boot_heard, 30, "the bootstrap node hears the worker's model")
    heard_at = time.monotonic()
    async with hostile() as liar, trio.open_nursery() as nursery:
        # A liar: a DHT record for the model, and a valid heartbeat that does not list it.
        ldht = Dht(liar.p2p, P2PConfig(dht="client"), verdict=lambda a: DIAL_OK,
                   own_addrs=liar.p2p.addrs)  # fmt: skip
        await nursery.start(ldht.run)

        async def answer(peer: ID, req: CapabilityRequest) -> Heartbeat:
            return liar.heartbeat()

        liar.streams.serve(CAPABILITY_STREAM, answer)
        await liar.connect(boot.p2p_addr)
        ldht.provide_keys({model_key(NET, model_id)})
        await in_thread(wait_until, lambda: boot_records() >= 2, 30,
                        "the worker's and the liar's records at the bootstrap node")  # fmt: skip
        # gossip replays a few seconds of history to a joining peer: join after it
        await trio.sleep(max(0.0, 6.0 - (time.monotonic() - heard_at)))
        # a node that wants the model: its fetch finds the worker through the DHT by itself
        fetcher = await in_thread(lambda: cluster.start(
            4, bootstrap=boot, peer_timeout=1200.0, wait=False, extra=[
                "--no-chain", "--fetch-model", model_id,
                "--models-dir", str(cluster.base / "models4")]))  # fmt: skip
        origin = await in_thread(lambda: cluster.start(
            3, bootstrap=boot, peer_timeout=1200.0, extra=["--no-chain"]))  # fmt: skip
        await in_thread(wait_until, lambda: boot.info["peer_id"] in peers_of(origin), 30,
                        "the origin meets the bootstrap node")  # fmt: skip
        assert wid not in await in_thread(peers_of, origin)
        found = await in_thread(origin.rpc.call, "vcoin_findProviders", {"model": model_id})
        nursery.cancel_scope.cancel()
    assert [w["peer_id"] for w in found["workers"]] == [wid], found
    assert found["workers"][0]["addrs"], found
    assert [(w["peer_id"], w["reason"]) for w in found["unverified"]] == [
        (liar.peer_id, "its heartbeat does not list the model")], found  # fmt: skip
    known = await in_thread(peers_of, origin)
    assert wid in known and liar.peer_id not in known
    # the same from the command line
    argv = ["find", model_id, "--datadir", str(origin.datadir)]
    assert await in_thread(model_main, argv) == 0
    assert f"{model_id}: 1 verified\n  {wid}  " in capsys.readouterr().out
    tid = (await in_thread(origin.rpc.call, "vcoin_submitTask", {
        "model": MODEL, "input": "What is a DHT?",
        "parameters": {"max_new_tokens": 4, "temperature": 0}}))["task_id"]  # fmt: skip
    t = await in_thread(lambda: finished(origin, tid, timeout=60))
    assert t["status"] == "completed" and t["node_id"] == wid, t

    def fetched() -> list[dict[str, object]]:
        return [j for j in fetcher.rpc.call("vcoin_models")["fetches"] if j["status"] == "done"]

    jobs = await in_thread(wait_until, fetched, 60, "the fetcher gets the model from the worker")
    assert list(jobs[0]["peers"]) == [wid], jobs  # type: ignore[call-overload]


async def test_mdns_finds_a_peer_on_the_local_network_and_the_keeper_dials_it() -> None:
    from vcoind.metrics import NodeMetrics
    from vcoind.p2p.keeper import PeerKeeper
    from vcoind.p2p.mdns import LanDiscovery

    cfg = P2PConfig(listen=("/ip4/127.0.0.1/tcp/0",))
    a = build_host(create_new_key_pair(), lambda fwd, msg: None)
    b = build_host(create_new_key_pair(), lambda fwd, msg: None)
    async with (
        running(a, ["/ip4/127.0.0.1/tcp/0"]),
        running(b, ["/ip4/127.0.0.1/tcp/0"]),
        trio.open_nursery() as nursery,
    ):
        keeper = PeerKeeper(a, NodeMetrics(), bootstrap=(), discover=True, cfg=cfg)
        await nursery.start(keeper.run)
        lan_a = LanDiscovery(a, keeper.learn, a.addrs)
        lan_b = LanDiscovery(b, lambda peer, addrs: None, b.addrs)
        await nursery.start(lan_a.run)
        await nursery.start(lan_b.run)
        if lan_a.error or lan_b.error:
            pytest.skip(f"no multicast here: {lan_a.error or lan_b.error}")
        await until(lambda: b.peer_id in a.connected_peers(), "a dials b", timeout=20)
        nursery.cancel_scope.cancel()
