"""A raw libp2p host (not a vcoind) publishes junk on the heartbeat topic of real daemons."""

from __future__ import annotations

import dataclasses
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import multiaddr
import pytest
import trio
from eth_account import Account
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from tests.conftest import Cluster, peers_of, wait_until
from vcoind.p2p.codec import encode
from vcoind.p2p.host import GOSSIP_PROTOCOLS
from vcoind.p2p.keeper import parse_peer_addr
from vcoind.presence.messages import Heartbeat, sign_binding

pytestmark = pytest.mark.slow
TOPIC = "/vcoin/testnet/heartbeat/1"


@asynccontextmanager
async def raw_host(*, strict_signing: bool = True) -> AsyncIterator[Any]:
    kp = create_new_key_pair()
    host = new_host(
        key_pair=kp,
        muxer_preference="YAMUX",
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)},
    )
    router = GossipSub(
        protocols=list(GOSSIP_PROTOCOLS),
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
    )
    pubsub = Pubsub(host, router, strict_signing=strict_signing)

    async with (
        host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        background_trio_service(pubsub),
        background_trio_service(router),
    ):
        await pubsub.wait_until_ready()
        yield host, pubsub


def heartbeat_for(host: Any, **over: Any) -> Heartbeat:
    acct = Account.create()
    pid = host.get_id().to_base58()
    hb = Heartbeat(
        network="testnet",
        peer_id=pid,
        eth_address=acct.address,
        eth_sig=sign_binding(acct.key, "testnet", pid, acct.address),
        seq=int(time.time() * 1000),
        timestamp=time.time(),
        interval=0.3,
    )
    return dataclasses.replace(hb, **over)


def rejected(node: Any) -> dict[str, float]:
    return dict(node.rpc.call("vcoin_gossipStats")["rejected"])


async def call(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


async def test_junk_is_rejected_counted_and_harmless(cluster: Cluster) -> None:
    # A long peer timeout (the maximum message age): on a loaded 2-core CI box an honest
    # heartbeat relayed a few seconds late must not count as stale at node 2, where this
    # test asserts that nothing but replays was rejected. The stale junk is an hour old.
    n1 = await call(lambda: cluster.start(1, peer_timeout=60.0))
    n2 = await call(lambda: cluster.start(2, bootstrap=n1, peer_timeout=60.0))
    await call(wait_until, lambda: n2.info["peer_id"] in peers_of(n1), 15, "mesh")

    async with raw_host() as (host, pubsub):
        await host.connect(parse_peer_addr(n1.p2p_addr))
        await pubsub.subscribe(TOPIC)
        await pubsub.wait_for_subscription(parse_peer_addr(n1.p2p_addr).peer_id, TOPIC)
        other = Account.create()
        pid = host.get_id().to_base58()
        good = heartbeat_for(host)
        junk = {
            "heartbeat/malformed": b"\x00\xffnot msgpack at all",
            "heartbeat/oversized": msgpack.packb({"kind": "heartbeat", "pad": b"x" * 20_000}),
            "heartbeat/sender_mismatch": encode(heartbeat_for(host, peer_id=n2.info["peer_id"])),
            "heartbeat/forged": encode(
                heartbeat_for(host, eth_sig=sign_binding(other.key, "testnet", pid, other.address))
            ),
            "heartbeat/stale": encode(heartbeat_for(host, timestamp=time.time() - 3600)),
            "heartbeat/future": encode(heartbeat_for(host, timestamp=time.time() + 3600)),
            "heartbeat/wrong_network": encode(heartbeat_for(host, network="othernet")),
        }
        for data in junk.values():
            await pubsub.publish(TOPIC, data)
        await pubsub.publish(TOPIC, encode(good))
        # the valid one is accepted: the raw host shows up in node 1's peer table
        await call(wait_until, lambda: pid in peers_of(n1), 10, "valid heartbeat accepted")
        await pubsub.publish(TOPIC, encode(good))  # same record again, new envelope
        expected = {**{k: 1.0 for k in junk}, "heartbeat/replayed": 1.0}
        await call(
            wait_until,
            lambda: all(rejected(n1).get(k, 0) >= v for k, v in expected.items()),
            10,
            "every junk message counted",
        )

    async with raw_host(strict_signing=False) as (host, pubsub):
        await host.connect(parse_peer_addr(n1.p2p_addr))
        await pubsub.subscribe(TOPIC)
        await pubsub.wait_for_subscription(parse_peer_addr(n1.p2p_addr).peer_id, TOPIC)
        await pubsub.publish(TOPIC, encode(heartbeat_for(host)))
        await call(
            wait_until,
            lambda: rejected(n1).get("heartbeat/unsigned", 0) >= 1,
            10,
            "unsigned message counted",
        )

    # junk never reached node 2 (node 1 did not forward it), and both daemons are fine
    assert not any(k != "heartbeat/replayed" for k in rejected(n2)), rejected(n2)
    assert n1.proc.poll() is None and n2.proc.poll() is None
    assert n2.info["peer_id"] in await call(peers_of, n1)
    assert n1.info["peer_id"] in await call(peers_of, n2)
    metrics = await call(n1.rpc.call, "vcoin_gossipStats")
    assert metrics["received"].get("heartbeat", 0) > 0


async def test_persistent_junk_sender_is_blacklisted(cluster: Cluster) -> None:
    n1 = await call(cluster.start, 1)
    (n1.datadir / "config.toml").write_text("[p2p]\nmax_invalid_messages = 3\n")
    n1.proc.terminate()
    await call(n1.proc.wait)
    n1 = await call(cluster.start, 1)

    async with raw_host() as (host, pubsub):
        await host.connect(parse_peer_addr(n1.p2p_addr))
        await pubsub.subscribe(TOPIC)
        await pubsub.wait_for_subscription(parse_peer_addr(n1.p2p_addr).peer_id, TOPIC)
        for i in range(5):
            await pubsub.publish(TOPIC, b"junk %d" % i)
        await call(
            wait_until, lambda: not host.get_connected_peers(), 10, "node 1 dropped the junk sender"
        )
    metrics_url = n1.info["rpc_url"] + "/metrics"
    with urllib.request.urlopen(urllib.request.Request(metrics_url, headers=n1.rpc.auth)) as resp:
        text = resp.read().decode()
    assert "vcoin_peers_blacklisted_total 1.0" in text
    assert n1.rpc.call("vcoin_nodeInfo")["peer_id"] == n1.info["peer_id"]


async def test_junk_on_the_votes_topic_is_rejected_and_harmless(cluster: Cluster) -> None:
    from vcoind.market.votes import ResultCommitment, ResultReveal

    votes = "/vcoin/testnet/votes/1"
    n1 = await call(cluster.start, 1)
    async with raw_host() as (host, pubsub):
        target = parse_peer_addr(n1.p2p_addr)
        await host.connect(target)
        await pubsub.subscribe(votes)
        await pubsub.wait_for_subscription(target.peer_id, votes)
        pid = host.get_id().to_base58()
        now = time.time()
        commit = ResultCommitment("testnet", pid, 1, now, "ab" * 16, n1.info["peer_id"], 1,
                                  b"\x01" * 32)  # fmt: skip
        body = msgpack.unpackb(encode(commit))
        junk = {
            "votes/malformed": msgpack.packb({**body, "commitment": b"\x01" * 31}),
            "votes/oversized": msgpack.packb({"kind": "result_reveal", "pad": b"x" * 700_000}),
            "votes/sender_mismatch": encode(
                dataclasses.replace(commit, peer_id=n1.info["peer_id"])
            ),
        }
        for data in junk.values():
            await pubsub.publish(votes, data)
        # Well-formed but for a task nobody runs: accepted by the validator, then ignored.
        await pubsub.publish(votes, encode(dataclasses.replace(commit, seq=2)))
        reveal = ResultReveal("testnet", pid, 3, now, "ab" * 16, n1.info["peer_id"], 1,
                              "text", (1, 2), "stop", b"\x02" * 32)  # fmt: skip
        await pubsub.publish(votes, encode(reveal))
        await call(
            wait_until,
            lambda: all(rejected(n1).get(k, 0) >= 1 for k in junk),
            10,
            "every junk vote counted",
        )
    assert n1.proc.poll() is None
    assert (await call(n1.rpc.call, "vcoin_consensusStatus"))["available"] is True
