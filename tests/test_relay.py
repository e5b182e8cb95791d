"""Circuit relay v2 between real daemons on loopback: two nodes that advertise only relayed
addresses (as nodes behind NATs would) meet through the relay, one serves the other's
task, and DCUtR upgrades their connection to a direct one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import multiaddr
import pytest

from devnet.__main__ import DevNode
from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished
from vcoind.p2p.policy import DIAL_OK, dial_verdict

pytestmark = pytest.mark.slow


def test_circuit_addresses_pass_the_dial_policy_on_their_relay() -> None:
    relay = "/ip4/8.8.8.8/tcp/4001/p2p/12D3KooWPessSF7sRVXrgnYe6hrdDy5X3mup64jGv9u8TrHAQySy"
    target = "/p2p/12D3KooWJBiP2a2PjHqHFr6sRuDMtdSjowSTCjbSjoPWDPNB3raw"
    assert dial_verdict(f"{relay}/p2p-circuit{target}", allow_private=False,
                        allow_dns=False) == DIAL_OK  # fmt: skip
    private = relay.replace("8.8.8.8", "10.0.0.1")
    assert dial_verdict(f"{private}/p2p-circuit{target}", allow_private=False,
                        allow_dns=False) == "private"  # fmt: skip
    assert dial_verdict(f"{relay}/p2p-circuit{target}/p2p-circuit{target}",
                        allow_private=False, allow_dns=False) == "transport"  # fmt: skip
    assert dial_verdict(f"{relay}/p2p-circuit", allow_private=False,
                        allow_dns=False) == "transport"  # fmt: skip


def test_a_node_reachable_only_through_a_relay_serves_a_task(
    cluster: Cluster, models_dir: Path
) -> None:
    relay = cluster.start(1, extra=["--no-chain", "--relay-service", "on"])
    info = relay.rpc.call("vcoin_nodeInfo")
    assert info["reachability"]["relay_service"] is True
    hidden = cluster.start(2, bootstrap=relay, extra=[
        "--no-chain", "--models-dir", str(models_dir), "--relay", relay.p2p_addr,
        "--reachability", "private"])  # fmt: skip
    # the origin too (two nodes behind NATs): they can only meet through the relay
    origin = cluster.start(3, bootstrap=relay, extra=[
        "--no-chain", "--relay", relay.p2p_addr, "--reachability", "private"])  # fmt: skip

    def advertised() -> list[str]:
        return list(hidden.rpc.call("vcoin_nodeInfo")["p2p_addrs"])

    addrs = wait_until(advertised, 20, "the hidden node's reservation")
    # only its address through the relay: nobody dials it directly
    assert addrs == [f"{relay.p2p_addr}/p2p-circuit/p2p/{hidden.info['peer_id']}"]
    assert hidden.rpc.call("vcoin_nodeInfo")["reachability"]["reservations"] == [relay.p2p_addr]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vcoind.cli.client import client_main; raise SystemExit(client_main())",
            "--datadir",
            str(hidden.datadir),
            "node-info",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "reach        private (dial-back: " in out.stdout
    assert "relaying for others no   relay slots 1 of 1" in out.stdout

    def sees_model() -> bool:
        return any(any(m["name"] == MODEL for m in p["models"])
                   for p in origin.rpc.call("vcoin_peers"))  # fmt: skip

    wait_until(sees_model, 20, "the origin hears of the hidden node's model")
    tid = origin.rpc.call("vcoin_submitTask", {
        "model": MODEL, "input": "What is a Merkle tree?",
        "parameters": {"max_new_tokens": 8, "temperature": 0}})["task_id"]  # fmt: skip
    t = finished(origin, tid, timeout=90)
    assert t["status"] == "completed", t
    assert t["node_id"] == hidden.info["peer_id"]
    logs = [(n.datadir / "vcoind.log").read_text() for n in (origin, hidden)]
    assert (f"connected to {hidden.info['peer_id']} through a relay" in logs[0]
            or f"connected to {origin.info['peer_id']} through a relay" in logs[1])  # fmt: skip

    # DCUtR then upgrades the relayed connection to a direct one (on loopback the
    # addresses each was seen at are dialable; the namespaced testbed punches a NAT)
    def punched() -> bool:
        return any(n.rpc.call("vcoin_nodeInfo")["reachability"]["hole_punched"]
                   for n in (origin, hidden))  # fmt: skip

    wait_until(punched, 30, "a direct connection after the relayed one")
    t = finished(origin, origin.rpc.call("vcoin_submitTask", {
        "model": MODEL, "input": "What is a GPU?",
        "parameters": {"max_new_tokens": 8, "temperature": 0}})["task_id"])  # fmt: skip
    assert t["status"] == "completed" and t["node_id"] == hidden.info["peer_id"], t

    # the hidden node (a DHT client) provides its model with its relayed address: the
    # relay (a DHT server) holds the record, and the origin's DHT lookup finds it there
    model_id = next(m["model_id"] for m in hidden.rpc.call("vcoin_models")["models"])

    def found() -> list[dict[str, object]]:
        return list(origin.rpc.call("vcoin_findProviders", {"model": model_id})["workers"])

    workers = wait_until(found, 20, "the hidden node's provider record")
    assert [(w["peer_id"], w["addrs"]) for w in workers] == [(hidden.info["peer_id"], addrs)]
    assert hidden.rpc.call("vcoin_nodeInfo")["reachability"]["dht"]["mode"] == "client"


def test_a_dial_back_tells_a_reachable_node_from_an_unreachable_one(cluster: Cluster) -> None:
    """A peer dials our advertised address over a fresh connection: a node whose announced
    address leads nowhere (as behind a NAT) learns that it is private, and then holds a
    slot at its bootstrap peer (a relay) and advertises its address through it."""
    import socket

    a = cluster.start(1, extra=["--no-chain", "--relay-service", "on"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    b = cluster.start(2, bootstrap=a, extra=[
        "--no-chain", "--announce", f"/ip4/127.0.0.1/tcp/{dead}"])  # fmt: skip
    c = cluster.start(3, bootstrap=a, extra=["--no-chain"])

    def observed(n: DevNode) -> str:
        return str(n.rpc.call("vcoin_nodeInfo")["reachability"]["observed"])

    wait_until(lambda: observed(b) == "private", 40, "B learns it cannot be dialled")
    wait_until(lambda: observed(c) == "public", 40, "C learns it can be dialled")
    assert c.rpc.call("vcoin_nodeInfo")["reachability"]["confirmed"] == [c.p2p_addr]
    wait_until(lambda: b.rpc.call("vcoin_nodeInfo")["reachability"]["reservations"] ==
               [a.p2p_addr], 20, "B holds a slot at its bootstrap relay")  # fmt: skip
    assert (
        f"{a.p2p_addr}/p2p-circuit/p2p/{b.info['peer_id']}"
        in (b.rpc.call("vcoin_nodeInfo")["p2p_addrs"])
    )
    assert c.rpc.call("vcoin_nodeInfo")["reachability"]["reservations"] == []


async def test_the_connection_manager_sees_a_relayed_peer_as_relayed_and_keeps_its_relay() -> None:
    """Real hosts on loopback: C reaches H only through relay R. C's connection manager
    counts H under R (not under R's IP) and H keeps R, where it holds its slot."""
    import trio
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.peerinfo import PeerInfo

    from vcoind.config import P2PConfig
    from vcoind.metrics import NodeMetrics
    from vcoind.p2p.host import build_host, running
    from vcoind.p2p.keeper import PeerKeeper
    from vcoind.p2p.relay import Relays

    r, h, c = (build_host(create_new_key_pair(), lambda f, m: None) for _ in range(3))
    async with (
        running(r, ["/ip4/127.0.0.1/tcp/0"]),
        running(h, ["/ip4/127.0.0.1/tcp/0"]),
        running(c, ["/ip4/127.0.0.1/tcp/0"]),
        trio.open_nursery() as nursery,
    ):
        relay_addr = f"{r.addrs()[0]}/p2p/{r.peer_id}"
        r_relays = Relays(r, P2PConfig(relay_service="on"))
        h_cfg = P2PConfig(relays=(relay_addr,), reachability="private")
        h_keeper = PeerKeeper(h, NodeMetrics(), bootstrap=(), discover=True, cfg=h_cfg)
        h_relays = Relays(h, h_cfg, protect=lambda p, on: (
            h_keeper.protect if on else h_keeper.unprotect)(p, "relay"))  # fmt: skip
        c_relays = Relays(c, P2PConfig(relay_service="off"))
        for relays in (r_relays, h_relays, c_relays):
            await nursery.start(relays.run)
        with trio.fail_after(20):
            while not h_relays.reserved:
                await trio.sleep(0.05)
        assert h_keeper.is_protected(r.peer_id)
        circuit = h_relays.circuit_addrs()[0]
        await c_relays.connect(PeerInfo(h.peer_id, [multiaddr.Multiaddr(
            circuit.rsplit("/p2p/", 1)[0])]), 10.0)  # fmt: skip
        assert c.remote(h.peer_id) == (None, r.peer_id.to_base58())
        assert c.relayed(h.peer_id.to_base58()) == r.peer_id.to_base58()
        assert c.remote(r.peer_id) == ("127.0.0.1", None)
        nursery.cancel_scope.cancel()
