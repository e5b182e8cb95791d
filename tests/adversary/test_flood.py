"""Valid floods and address tricks against real daemons (issue 22, item 6).

The hostile node speaks only valid gossip: heartbeats from fresh identities (each a new
libp2p key and a new Ethereum key, so every one binds correctly), announces of real-looking
tasks, its own heartbeats far faster than its interval, and addresses for the node to dial.
Every attack must cost the node a bounded amount and leave honest peers working.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from eth_account import Account
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from devnet.__main__ import DevNode
from tests.adversary.hostile import Hostile, hostile, in_thread, metric
from tests.conftest import Cluster, peers_of, wait_until
from vcoind.market.messages import AnnouncedTask, TaskAnnounce
from vcoind.p2p.codec import encode
from vcoind.presence.messages import Heartbeat, sign_binding

pytestmark = pytest.mark.slow
MODEL = "tiny-qwen2"


def ignored(node: DevNode, kind: str, reason: str) -> float:
    return metric(node, "vcoin_gossip_ignored_total", kind=kind, reason=reason)


@dataclasses.dataclass
class Identity:
    """A fresh peer: its own libp2p key and a bound Ethereum key."""

    key: KeyPair
    account: Any
    binding: bytes  # its Ethereum key's signature binding it to its peer id

    @property
    def peer_id(self) -> str:
        return ID.from_pubkey(self.key.public_key).to_base58()

    @classmethod
    def fresh(cls, network: str = "testnet") -> Identity:
        key, account = create_new_key_pair(), Account.create()
        pid = ID.from_pubkey(key.public_key).to_base58()
        return cls(key, account, sign_binding(account.key, network, pid, account.address))

    def heartbeat(self, network: str, **over: Any) -> Heartbeat:
        """Stamped now: a heartbeat older than the node's peer timeout (3 s) is stale."""
        hb = Heartbeat(network=network, peer_id=self.peer_id, eth_address=self.account.address,
                       eth_sig=self.binding, seq=time.time_ns() // 1000, timestamp=time.time(),
                       interval=0.3)  # fmt: skip
        return dataclasses.replace(hb, **over)


async def publish_as(h: Hostile, ident: Identity, name: str, data: bytes) -> None:
    """Publish a message signed by ``ident`` (not the hostile's own key) through the
    hostile's pubsub: the node sees the hostile forward another peer's message."""
    msg = rpc_pb2.Message(
        data=data,
        topicIDs=[h.topic(name)],
        from_id=ID.from_pubkey(ident.key.public_key).to_bytes(),
        seqno=secrets.token_bytes(8),
    )
    msg.signature = ident.key.private_key.sign(
        PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
    )
    msg.key = ident.key.public_key.serialize()
    await h.p2p.pubsub.push_msg(h.p2p.peer_id, msg)


async def room(h: Hostile, node: DevNode) -> None:
    """Wait until the hostile's outbound queue to ``node`` has room: py-libp2p drops what
    does not fit (32 RPCs), and a flood must reach the node to test the node."""
    pid = ID.from_base58(node.info["peer_id"])
    while (q := h.p2p.pubsub.peer_queues.get(pid)) is not None and len(q) >= 16:
        await trio.sleep(0.001)


def announce(h: Hostile, i: int) -> TaskAnnounce:
    task = AnnouncedTask(task_id=secrets.token_hex(16), model=MODEL, max_new_tokens=16,
                         input_chars=10 + i % 7)  # fmt: skip
    return TaskAnnounce(network=h.network, peer_id=h.peer_id, seq=h.seq(),
                        timestamp=time.time(), tasks=(task,))  # fmt: skip


async def test_fresh_identity_heartbeat_flood_is_capped(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VCOIN_P2P_MAX_PEERS", "20")
    n1 = await in_thread(cluster.start, 1)
    n2 = await in_thread(lambda: cluster.start(2, bootstrap=n1))
    await in_thread(wait_until, lambda: n2.info["peer_id"] in peers_of(n1), 20, "mesh")
    sybils = [Identity.fresh() for _ in range(200)]
    largest = 0
    async with hostile() as h:
        await h.join(n1.p2p_addr, "heartbeat")
        for i, sybil in enumerate(sybils):
            await room(h, n1)
            await publish_as(h, sybil, "heartbeat", encode(sybil.heartbeat("testnet")))
            if i % 50 == 49:
                largest = max(largest, len(await in_thread(peers_of, n1)))

        def refused() -> float:
            return ignored(n1, "heartbeat", "new_identities") + ignored(
                n1, "heartbeat", "graylisted"
            )

        await in_thread(wait_until, lambda: refused() >= 120, 30, "most sybils ignored")
        largest = max(largest, len(await in_thread(peers_of, n1)))
    assert largest <= 20, f"peer table grew to {largest} past its cap of 20"
    assert ignored(n1, "heartbeat", "new_identities") >= 1
    # The honest peer is in the table (or back at its next beat) and sees node 1.
    await in_thread(wait_until, lambda: n2.info["peer_id"] in peers_of(n1), 10, "honest peer")
    await in_thread(wait_until, lambda: n1.info["peer_id"] in peers_of(n2), 10, "node 1 seen")
    # Sybils never reached node 2 beyond what node 1 admitted.
    assert len(await in_thread(peers_of, n2)) <= 20


async def test_task_announce_flood_is_throttled_and_honest_task_completes(
    cluster: Cluster, models_dir: Path
) -> None:
    # A long maximum message age: on a loaded box the flood must be judged by its budget,
    # not dropped as stale while the node works through what it admitted.
    serving = ["--models-dir", str(models_dir)]
    n1 = await in_thread(lambda: cluster.start(1, extra=serving, peer_timeout=60.0))
    n2 = await in_thread(lambda: cluster.start(2, bootstrap=n1, peer_timeout=60.0))
    await in_thread(
        wait_until,
        lambda: (
            any(p["models"] for p in n2.rpc.call("vcoin_peers"))
            and any(m["loaded"] for m in n1.rpc.call("vcoin_models")["models"])
        ),
        60,
        "node 1 has loaded its model and node 2 sees it",
    )
    sent = 400  # the budget admits a burst of 100 announces, then 5 per second
    async with hostile() as h:
        await h.join(n1.p2p_addr, "tasks")
        for i in range(sent):
            await room(h, n1)
            await h.publish("tasks", announce(h, i))
        # The honest origin's task runs on node 1 while node 1 still digests the flood.
        req = {"model": MODEL, "input": "hello", "parameters": {"max_new_tokens": 8}}
        task_id = (await in_thread(n2.rpc.call, "vcoin_submitTask", req))["task_id"]

        def throttled() -> float:
            return ignored(n1, "task_announce", "budget") + ignored(n1, "tasks", "graylisted")

        await in_thread(wait_until, lambda: throttled() >= sent // 2, 120, "the flood ignored")
        done = await in_thread(
            wait_until,
            lambda: (t := n2.rpc.call("vcoin_getTask", {"task_id": task_id}))["finished"] and t,
            120,
            "the honest task to finish",
        )
    assert done["status"] == "completed", done
    assert await in_thread(metric, n1, "vcoin_peers_graylisted_total") >= 1


async def test_public_node_does_not_dial_private_or_dns_addresses(cluster: Cluster) -> None:
    # Public mode: the node announces a public address (nobody needs to reach it here).
    n1 = await in_thread(lambda: cluster.start(1, extra=["--announce", "/ip4/1.2.3.4/tcp/4001"]))
    liar = Identity.fresh()
    pid = liar.peer_id
    addrs = (
        f"/ip4/10.1.2.3/tcp/4001/p2p/{pid}",
        f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}",
        f"/ip4/169.254.0.9/tcp/4001/p2p/{pid}",
        f"/dns4/scan.example/tcp/4001/p2p/{pid}",
        f"/ip4/224.0.0.1/tcp/4001/p2p/{pid}",
    )
    async with hostile() as h:
        await h.join(n1.p2p_addr, "heartbeat")
        hb = liar.heartbeat("testnet", listen_addrs=addrs)
        await publish_as(h, liar, "heartbeat", encode(hb))
        await in_thread(wait_until, lambda: pid in peers_of(n1), 10, "the heartbeat accepted")
        await in_thread(
            wait_until,
            lambda: (
                metric(n1, "vcoin_dials_refused_total", reason="private") >= 3
                and metric(n1, "vcoin_dials_refused_total", reason="dns") >= 1
                and metric(n1, "vcoin_dials_refused_total", reason="bogus") >= 1
            ),
            10,
            "every address refused",
        )
        # A refused address is never dialled: the keeper (0.25 s tick) would have tried by
        # now; nothing else here is dialled (no bootstrap peer).
        await trio.sleep(1.5)
    assert metric(n1, "vcoin_dials_total", outcome="error") == 0
    assert metric(n1, "vcoin_dials_total", outcome="ok") == 0


async def test_flooding_peer_is_graylisted(cluster: Cluster) -> None:
    n1 = await in_thread(cluster.start, 1)
    n2 = await in_thread(lambda: cluster.start(2, bootstrap=n1))
    await in_thread(wait_until, lambda: n2.info["peer_id"] in peers_of(n1), 20, "mesh")
    async with hostile() as h:
        await h.join(n1.p2p_addr, "heartbeat", "tasks")
        await h.publish("heartbeat", h.heartbeat())
        await in_thread(wait_until, lambda: h.peer_id in peers_of(n1), 10, "hostile admitted")
        for _ in range(200):  # far past its heartbeat budget (a burst of 50, then 10/s)
            await room(h, n1)
            await h.publish("heartbeat", h.heartbeat())
        await in_thread(
            wait_until,
            lambda: metric(n1, "vcoin_peers_graylisted_total") >= 1,
            20,
            "the flooder graylisted",
        )
        # Graylisted: even its valid messages of another kind are ignored unread.
        before = await in_thread(ignored, n1, "tasks", "graylisted")
        await h.publish("tasks", announce(h, 0))
        await in_thread(
            wait_until,
            lambda: ignored(n1, "tasks", "graylisted") > before,
            10,
            "a graylisted peer's announce ignored",
        )
    assert ignored(n1, "heartbeat", "budget") >= 1
    assert n2.info["peer_id"] in await in_thread(peers_of, n1)
    assert n1.proc.poll() is None
