"""The namespace testbed (``devnet.netns``): a public node and two nodes behind nftables
NATs, each a real daemon in its own network namespace.

Skipped, with the reason, where the machine cannot host it (not root, no ``ip netns``,
no nftables NAT in the kernel): ``devnet.netns.unavailable`` probes once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devnet.__main__ import TEST_MODEL, run_task, stop_all, wait_for_mesh
from devnet.netns import (
    P2P_PORT,
    NsNode,
    Testbed,
    connect_in,
    established_peers,
    list_namespaces,
    listen_in,
    start_network,
    unavailable,
)
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Net:
    bed: Testbed
    public: NsNode
    worker: NsNode  # behind nat1, serves the test model
    requester: NsNode  # behind nat2, no model


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Net]:
    reason = unavailable()
    if reason:
        pytest.skip(f"no namespace testbed here: {reason}")
    base = tmp_path_factory.mktemp("netns")
    with Testbed() as bed:
        nodes = start_network(bed, base, models_dir, heartbeat=0.3, peer_timeout=4.0,
                              network="testnet")  # fmt: skip
        try:
            for n in nodes:
                n.info  # noqa: B018 (up, or a clear error with the log's tail)
            yield Net(bed, *nodes)
        finally:
            problems = stop_all(list(nodes))
    assert not problems, problems
    left = [ns for ns in list_namespaces() if ns.startswith(bed.id)]
    assert not left, f"the testbed left namespaces behind: {left}"


def test_the_nat_hides_the_nated_nodes(net: Net) -> None:
    """A NATed node's connection reaches the public LAN from its router's public IP and
    its own source port (port-preserving masquerade, what hole punching relies on); the
    public node's daemon sees its peers as the two routers, never as 192.168.x."""
    pub, nated = net.bed.public, net.bed.nated[0]
    with listen_in(pub.ns, pub.ip) as srv:
        port = srv.getsockname()[1]
        with connect_in(nated.ns, pub.ip, port) as client:
            conn, (seen_ip, seen_port) = srv.accept()
            conn.close()
            assert client.getsockname()[0] == nated.ip
            assert (seen_ip, seen_port) == (nated.nat_ip, client.getsockname()[1])
    routers = {h.nat_ip for h in net.bed.nated}
    wait_until(lambda: established_peers(pub.ns) == routers, 10,
               f"the public daemon's connections to come from {routers} only")  # fmt: skip


def test_nated_nodes_cannot_be_dialled(net: Net) -> None:
    """From the public LAN neither a NATed node nor its router's public IP (no port
    forward) accepts the p2p port; nor can one NATed node reach the other. The way out
    works (the control)."""
    pub, (n1, n2) = net.bed.public, net.bed.nated
    connect_in(n1.ns, pub.ip, P2P_PORT).close()
    for ns, ip in [(pub.ns, n1.ip), (pub.ns, n1.nat_ip), (n2.ns, n1.ip), (n2.ns, n1.nat_ip)]:
        with pytest.raises(OSError):
            connect_in(ns, ip, P2P_PORT, 2.0).close()


def test_the_three_daemons_form_a_network(net: Net) -> None:
    """Each lists the other two, and the NATed nodes know they cannot be dialled (the
    dial-back), hold a slot at the public node (their relay) and advertise only... their
    own address and the relayed one; they connect to each other through the relay."""
    nodes = [net.public, net.worker, net.requester]
    wait_for_mesh(list(nodes), 30)
    relay = f"{net.bed.public.p2p_listen()}/p2p/{net.public.info['peer_id']}"
    for n in (net.worker, net.requester):
        wait_until(lambda n=n: n.rpc.call("vcoin_nodeInfo")["reachability"]["observed"] ==
                   "private", 30, f"node {n.index} finds it cannot be dialled")  # fmt: skip
        wait_until(lambda n=n: n.rpc.call("vcoin_nodeInfo")["reachability"]["reservations"]
                   == [relay], 30, f"node {n.index} holds a slot at the relay")  # fmt: skip
    assert net.public.rpc.call("vcoin_nodeInfo")["reachability"]["relay_service"] is True
    wait_until(lambda: net.public.rpc.call("vcoin_nodeInfo")["reachability"]["observed"] ==
               "public", 30, "the public node finds it can be dialled")  # fmt: skip
    pid = {n.index: n.info["peer_id"] for n in nodes}

    def connected(n: NsNode, other: int) -> bool:
        return any(p["peer_id"] == pid[other] and p["connected"]
                   for p in n.rpc.call("vcoin_peers"))  # fmt: skip

    wait_until(lambda: connected(net.worker, 3) and connected(net.requester, 2), 30,
               "the NATed nodes connect to each other (through the relay)")  # fmt: skip


def serves_a_model(node: NsNode, peer: str) -> bool:
    """``node`` has heard from ``peer`` that it serves a model."""
    return any(p["peer_id"] == peer and p["models"] for p in node.rpc.call("vcoin_peers"))


def served_by_the_worker(net: Net, origin: NsNode) -> dict[str, Any]:
    """A task submitted at ``origin``, once it has heard that the NATed worker serves the
    model, completed by the worker."""
    worker = net.worker.info["peer_id"]
    wait_until(lambda: serves_a_model(origin, worker), 20,
               "the origin to hear that the worker serves the model")  # fmt: skip
    req = {"model": TEST_MODEL, "input": "hello", "parameters": {"max_new_tokens": 8}}
    t = run_task(origin, req, 60)
    assert t["status"] == "completed", t.get("error")
    assert t["node_id"] == worker
    return t


def test_a_task_on_the_public_node_is_served_behind_the_nat(net: Net) -> None:
    """The public node serves no model: its task reaches the NATed worker over the
    connection the worker dialled out."""
    t = served_by_the_worker(net, net.public)
    assert t["result"]


def test_a_task_between_nated_nodes_goes_through_the_relay_then_direct(net: Net) -> None:
    """The requester (behind NAT 2, no model) submits; the worker (behind NAT 1) serves it
    over their connection through the public node's relay; DCUtR then punches a direct
    connection through both NATs (each dials the other's NAT from its listen port), which
    the kernel in the worker's namespace shows as a connection from NAT 2's public IP, and
    the next task goes over it."""
    served_by_the_worker(net, net.requester)
    logs = [(n.datadir / "vcoind.log").read_text() for n in (net.worker, net.requester)]
    assert any("through a relay" in text for text in logs)

    def punched() -> bool:
        return any(n.rpc.call("vcoin_nodeInfo")["reachability"]["hole_punched"]
                   for n in (net.worker, net.requester))  # fmt: skip

    wait_until(punched, 60, "a hole punched between the NATed nodes")
    nat2 = net.bed.nated[1].nat_ip
    wait_until(lambda: nat2 in established_peers(net.bed.nated[0].ns), 10,
               f"a direct connection from {nat2} in the worker's namespace")  # fmt: skip
    served_by_the_worker(net, net.requester)


def test_skip_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe says why it refuses (here: not root), and what to do about nft."""
    import devnet.netns as netns

    netns.unavailable.cache_clear()
    try:
        monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
        assert "root" in str(netns.unavailable())
        monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
        netns.unavailable.cache_clear()
        monkeypatch.setattr(netns.shutil, "which", lambda name: None if name == "nft" else "/x")
        assert "apt-get install nftables" in str(netns.unavailable())
    finally:
        netns.unavailable.cache_clear()
