"""The namespace testbed (``devnet.netns``): a public node and two nodes behind nftables
NATs, each a real daemon in its own network namespace.

Skipped, with the reason, where the machine cannot host it (not root, no ``ip netns``,
no nftables NAT in the kernel): ``devnet.netns.unavailable`` probes once per session.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    """Each lists the other two: the NATed nodes know each other only through the public
    node's gossip, since neither can open a connection to the other (until a relay and hole
    punching land, when this becomes a direct connection)."""
    nodes = [net.public, net.worker, net.requester]
    wait_for_mesh(list(nodes), 30)
    conn = {n.index: {p["peer_id"]: p["connected"] for p in n.rpc.call("vcoin_peers")}
            for n in nodes}  # fmt: skip
    pid = {n.index: n.info["peer_id"] for n in nodes}
    assert conn[1] == {pid[2]: True, pid[3]: True}
    assert conn[2] == {pid[1]: True, pid[3]: False}
    assert conn[3] == {pid[1]: True, pid[2]: False}


def test_a_task_on_the_public_node_is_served_behind_the_nat(net: Net) -> None:
    """The public node serves no model: its task reaches the NATed worker over the
    connection the worker dialled out."""
    worker = net.worker.info["peer_id"]

    def worker_serves() -> bool:
        peers = net.public.rpc.call("vcoin_peers")
        return any(p["peer_id"] == worker and p["models"] for p in peers)

    wait_until(worker_serves, 20, "the public node to hear that the worker serves the model")
    req = {"model": TEST_MODEL, "input": "hello", "parameters": {"max_new_tokens": 8}}
    t = run_task(net.public, req, 60)
    assert t["status"] == "completed", t.get("error")
    assert t["node_id"] == worker
    assert t["result"]


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
