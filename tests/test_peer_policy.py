"""Peer policy rules on their own: token buckets, the gossip score and graylist, which
addresses may be dialled, which connections are dropped, and the bounded peer table."""

from __future__ import annotations

import time

import multiaddr
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from tests.test_codec import make
from vcoind.config import ConfigError, P2PConfig
from vcoind.metrics import NodeMetrics
from vcoind.p2p import keeper as keeper_module
from vcoind.p2p.gossip import Gossip
from vcoind.p2p.host import build_host
from vcoind.p2p.keeper import PeerKeeper
from vcoind.p2p.policy import (
    DIAL_OK,
    Budgets,
    Limit,
    TokenBucket,
    backoff_after,
    dial_verdict,
    ip_class,
    is_public_node,
    to_trim,
)
from vcoind.presence.peers import PeerTable
from vcoind.store import Store

PID = "12D3KooWJtLUPKb6Griz8u1pr7FYd3EbRCB9SqrjzjugHSXwQJLb"


# --- token buckets ------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    b = TokenBucket(rate=2.0, burst=5.0, now=100.0)
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(100.4)  # 0.8 token refilled
    assert b.take(100.5)  # 1 token after half a second at 2/s
    assert not b.take(100.5)
    assert b.take(200.0, 5.0) and not b.take(200.0)  # refills only up to the burst
    assert not b.take(300.0, 6.0)  # more than the burst never fits


def test_budgets_are_per_key_and_forget_refilled_buckets() -> None:
    budgets = Budgets({"announces": Limit(1.0, 2.0)})
    assert budgets.take("announces", "a", 0.0) and budgets.take("announces", "a", 0.0)
    assert not budgets.take("announces", "a", 0.0)
    assert budgets.take("announces", "b", 0.0)  # another sender has its own
    budgets.prune(0.5)
    assert len(budgets) == 2  # neither refilled yet
    budgets.prune(10.0)
    assert len(budgets) == 0  # a full bucket is the same as none: memory follows activity


def test_budget_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="budget_bids"):
        P2PConfig(budget_bids=(1.0,))
    with pytest.raises(ConfigError, match="allow_private_dials"):
        P2PConfig(allow_private_dials="maybe")
    with pytest.raises(ConfigError, match="conn_low"):
        P2PConfig(conn_low=10, conn_high=5)


# --- dial policy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "cls"),
    [
        ("8.8.8.8", "public"),
        ("2606:4700::1111", "public"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("127.0.0.1", "private"),
        ("169.254.1.1", "private"),
        ("100.64.0.1", "private"),  # CGNAT
        ("::1", "private"),
        ("fd00::1", "private"),
        ("fe80::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("0.0.0.0", "bogus"),
        ("224.0.0.1", "bogus"),
        ("255.255.255.255", "bogus"),
        ("240.0.0.1", "bogus"),
        ("ff02::1", "bogus"),
    ],
)
def test_ip_class(ip: str, cls: str) -> None:
    assert ip_class(ip) == cls


def test_dial_verdicts() -> None:
    def v(addr: str, private: bool = False, dns: bool = False) -> str:
        return dial_verdict(f"{addr}/p2p/{PID}", allow_private=private, allow_dns=dns)

    assert v("/ip4/8.8.8.8/tcp/4001") == DIAL_OK
    assert v("/ip6/2606:4700::1111/tcp/4001") == DIAL_OK
    assert v("/ip4/10.1.2.3/tcp/4001") == "private"
    assert v("/ip4/10.1.2.3/tcp/4001", private=True) == DIAL_OK
    assert v("/ip4/127.0.0.1/tcp/4001") == "private"
    assert v("/ip4/224.0.0.1/tcp/4001", private=True) == "bogus"
    assert v("/ip4/8.8.8.8/tcp/0") == "bogus"
    assert v("/dns4/example.com/tcp/4001") == "dns"
    assert v("/dns4/example.com/tcp/4001", dns=True) == DIAL_OK
    assert v("/ip4/8.8.8.8/udp/4001/quic-v1") == "transport"
    # through a relay (circuit relay v2): the relay's address decides
    assert v("/ip4/8.8.8.8/tcp/4001/p2p/" + PID + "/p2p-circuit") == DIAL_OK
    assert v("/ip4/10.1.2.3/tcp/4001/p2p/" + PID + "/p2p-circuit") == "private"
    assert v("/ip4/8.8.8.8/udp/4001/quic-v1/p2p/" + PID + "/p2p-circuit") == "transport"
    assert dial_verdict("/ip4/8.8.8.8/tcp/4001", allow_private=True, allow_dns=True) == (
        "transport"  # no peer id
    )
    assert dial_verdict("not a multiaddr", allow_private=True, allow_dns=True) == "malformed"


def test_public_mode_follows_our_own_addresses() -> None:
    assert not is_public_node(["/ip4/127.0.0.1/tcp/4001"])
    assert not is_public_node(["/ip4/0.0.0.0/tcp/4001", "/ip4/192.168.1.5/tcp/4001"])
    assert is_public_node(["/ip4/10.0.0.2/tcp/4001", "/ip4/1.2.3.4/tcp/4001"])


async def test_keeper_refuses_private_addresses_only_in_public_mode() -> None:
    pid = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    addrs = (f"/ip4/10.1.2.3/tcp/4001/p2p/{pid}", f"/ip4/8.8.8.8/tcp/4001/p2p/{pid}")
    for announce, private_ok in (((), True), (("/ip4/1.2.3.4/tcp/4001",), False)):
        metrics = NodeMetrics()
        keeper = PeerKeeper(build_host(create_new_key_pair(), lambda f, m: None), metrics,
                            bootstrap=(), discover=True,
                            cfg=P2PConfig(announce=announce))  # fmt: skip
        assert keeper.public is (not private_ok)
        keeper.learn(pid, addrs)
        kept = [kp.addrs for kp in keeper.known()]
        assert kept == [list(addrs) if private_ok else [addrs[1]]]
        refused = metrics.dials_refused.labels(reason="private")._value.get()
        assert refused == (0 if private_ok else 1)
        keeper.learn(pid, addrs)  # a refusal is counted once per address, not per beat
        assert metrics.dials_refused.labels(reason="private")._value.get() == refused


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_after(n, 0.5, 10.0) for n in (1, 2, 3, 4, 5, 6, 10)] == [
        0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0,
    ]  # fmt: skip


# --- connection manager ----------------------------------------------------------------


def test_trim_drops_lowest_scored_unprotected_down_to_low_watermark() -> None:
    peers = [(f"p{i}", f"8.8.8.{i}", None) for i in range(10)]
    scores = {f"p{i}": float(i) for i in range(10)}
    drop = to_trim(peers, low=6, high=8, per_ip=4, protected=lambda p: p in ("p0", "p1"),
                   score=scores.__getitem__)  # fmt: skip
    # p0 and p1 are protected (bootstrap, work)
    assert drop == [(p, "watermark") for p in ("p2", "p3", "p4", "p5")]
    assert to_trim(peers, low=6, high=10, per_ip=4, protected=lambda p: False,
                   score=scores.__getitem__) == []  # fmt: skip


def test_trim_caps_connections_per_ip_but_not_loopback() -> None:
    peers = [(f"a{i}", "1.2.3.4", None) for i in range(5)] + [
        (f"l{i}", "127.0.0.1", None) for i in range(9)
    ]
    drop = to_trim(peers, low=50, high=100, per_ip=2, protected=lambda p: p == "a0",
                   score=lambda p: 0.0)  # fmt: skip
    assert sorted(drop) == [("a1", "per_ip"), ("a2", "per_ip"), ("a3", "per_ip")]


def test_trim_counts_relayed_peers_per_relay_not_under_the_relays_ip() -> None:
    """Ten NATed peers reached through one public relay are ten peers, not ten connections
    from the relay's IP; but one relay may bring at most ``per_relay``."""
    behind = [(f"n{i}", None, "RELAY1") for i in range(10)]
    direct = [("relay1", "5.6.7.8", None), ("d0", "5.6.7.8", None)]
    keep_all = to_trim(behind + direct, low=50, high=100, per_ip=2, per_relay=10,
                       protected=lambda p: False, score=lambda p: 0.0)  # fmt: skip
    assert keep_all == []
    capped = to_trim(behind + direct, low=50, high=100, per_ip=2, per_relay=6,
                     protected=lambda p: p == "n0", score=lambda p: 0.0)  # fmt: skip
    assert sorted(capped) == [(f"n{i}", "per_relay") for i in range(1, 5)]  # n0 is protected


def test_trim_over_the_watermark_drops_relayed_before_direct_at_the_same_score() -> None:
    peers = [("d1", "8.8.8.1", None), ("r1", None, "R"), ("d2", "8.8.8.2", None),
             ("r2", None, "R"), ("low", "8.8.8.3", None)]  # fmt: skip
    score = {"low": -5.0}.get
    drop = to_trim(peers, low=2, high=4, per_ip=4, protected=lambda p: False,
                   score=lambda p: score(p, 0.0))  # fmt: skip
    assert drop == [("low", "watermark"), ("r1", "watermark"), ("r2", "watermark")]


def test_keeper_protect_is_tagged() -> None:
    keeper = PeerKeeper(build_host(create_new_key_pair(), lambda f, m: None), NodeMetrics(),
                        bootstrap=(), discover=True)  # fmt: skip
    pid = ID.from_pubkey(create_new_key_pair().public_key)
    keeper.protect(pid.to_base58(), "task:1")
    keeper.protect(pid, "task:2")
    keeper.unprotect(pid, "task:1")
    assert keeper.is_protected(pid)
    keeper.unprotect(pid.to_base58(), "task:2")
    assert not keeper.is_protected(pid)
    assert keeper_module.BOOTSTRAP_TAG == "bootstrap"


async def test_a_stream_can_dial_a_peer_the_keeper_learned_before_it_connects() -> None:
    """A peer known from a heartbeat only (not dialled yet): its announced addresses are
    handed to the stream, so a request does not fail with "no known addresses"."""
    from vcoind.p2p.host import running
    from vcoind.p2p.streams import Ack, StreamProtocol, StreamService

    a = build_host(create_new_key_pair(), lambda f, m: None)
    b = build_host(create_new_key_pair(), lambda f, m: None)
    keeper = PeerKeeper(a, NodeMetrics(), bootstrap=(), discover=True)
    proto = StreamProtocol("/vcoin/test-resolve/1.0.0", (Ack,), 256)
    async with running(a, ["/ip4/127.0.0.1/tcp/0"]), running(b, ["/ip4/127.0.0.1/tcp/0"]):
        served = StreamService(b, NodeMetrics())

        async def ok(peer: object, req: object) -> Ack:
            return Ack()

        served.serve(proto, ok)
        keeper.learn(b.peer_id.to_base58(), tuple(b.addrs()))  # as its heartbeat says
        assert keeper.addresses(b.peer_id)
        streams = StreamService(a, NodeMetrics(), resolve=keeper.addresses)
        assert await streams.request(b.peer_id, proto, Ack(), Ack) == Ack()


# --- score and graylist ------------------------------------------------------------------


async def test_penalties_graylist_a_peer_and_strikes_blacklist_it() -> None:
    p2p = build_host(create_new_key_pair(), lambda f, m: None)
    metrics = NodeMetrics()
    cfg = P2PConfig(graylist_threshold=-5.0, graylist_s=10.0)
    g = Gossip(p2p, "testnet", metrics, max_age_s=30.0, max_invalid=50, cfg=cfg)
    peer = ID.from_pubkey(create_new_key_pair().public_key)
    reputations = {peer.to_base58(): 3.0}
    g.use_app_score(lambda pid: reputations.get(pid, 0.0))
    assert g.score(peer) == 3.0  # reputation is the application-specific score
    for _ in range(8):
        g._ignore("bid", "budget", peer, 1.0)
    assert g.score(peer) == pytest.approx(-5.0)
    assert not g.graylisted()  # not below the threshold yet
    g._ignore("bid", "budget", peer, 1.0)
    assert g.graylisted() == {peer.to_base58()}
    assert metrics.peers_graylisted._value.get() == 1
    assert metrics.gossip_ignored.labels(kind="bid", reason="budget")._value.get() == 9
    # a graylisted peer's messages are dropped at pubsub's gate, counted, not decoded
    from libp2p.pubsub.pb import rpc_pb2

    msg = rpc_pb2.Message(data=b"x", topicIDs=[g.topic("tasks")])
    assert not g._admit(peer, msg)
    assert metrics.gossip_ignored.labels(kind="tasks", reason="graylisted")._value.get() == 1
    # two more graylistings within the strike window: blacklisted
    for _ in range(2):
        g._graylisted.clear()
        g._ignore("bid", "budget", peer, 1.0)
    assert peer in p2p.pubsub.blacklisted_peers
    assert metrics.peers_blacklisted._value.get() == 1


# --- peer table cap ----------------------------------------------------------------------


async def test_full_peer_table_evicts_unstaked_newest_first(store: Store) -> None:
    staked_addrs: set[str] = set()
    metrics = NodeMetrics()
    table = PeerTable(store, metrics, peer_timeout=30.0, base_interval=5.0,
                      error_rate=lambda p: 0.0, max_peers=3,
                      staked=lambda a: a in staked_addrs)  # fmt: skip
    beats = [
        make(peer_id=f"12D3KooW{'A' * 30}{'BCDEFGH'[i]}", eth_address=f"0x{i:040x}")
        for i in range(7)
    ]
    staked_addrs |= {beats[0].eth_address, beats[1].eth_address}
    for hb in beats[:3]:
        await table.on_heartbeat(hb)
        time.sleep(0.001)  # distinct first_seen
    await table.on_heartbeat(beats[3])  # unstaked newcomer replaces the unstaked peer 2
    assert {st.peer_id for st in table.peers()} == {b.peer_id for b in (beats[0], beats[1],
                                                                      beats[3])}  # fmt: skip
    staked_addrs.add(beats[3].eth_address)
    await table.on_heartbeat(beats[4])  # all staked: an unstaked newcomer is refused
    assert len(table) == 3 and not table.known(beats[4].peer_id)
    assert metrics.gossip_ignored.labels(kind="heartbeat", reason="peer_table_full")._value.get()
    staked_addrs |= {beats[5].eth_address, beats[6].eth_address}
    time.sleep(0.001)
    await table.on_heartbeat(beats[5])  # a staked newcomer replaces the one that came last
    assert table.known(beats[0].peer_id) and not table.known(beats[3].peer_id)
    # A peer that missed two of its beats goes before any established one.
    st = table.get(beats[0].peer_id)
    assert st is not None
    st.last_seen -= 3 * beats[0].interval
    await table.on_heartbeat(beats[6])
    assert not table.known(beats[0].peer_id) and table.known(beats[5].peer_id)
    assert metrics.peers_evicted._value.get() == 3


async def test_a_flood_of_fresh_identities_does_not_push_out_an_established_peer(
    store: Store,
) -> None:
    table = PeerTable(store, NodeMetrics(), peer_timeout=30.0, base_interval=5.0,
                      error_rate=lambda p: 0.0, max_peers=4, staked=lambda a: False)  # fmt: skip
    honest = make(peer_id=f"12D3KooW{'H' * 31}", eth_address="0x" + "1" * 40)
    await table.on_heartbeat(honest)
    for i in range(40):  # each sybil beats once, after the honest peer's last beat
        time.sleep(0.0005)
        await table.on_heartbeat(make(peer_id=f"12D3KooW{i:031d}", eth_address=f"0x{i:040x}"))
    assert table.known(honest.peer_id) and len(table) == 4


async def test_a_dead_pubsub_stream_of_a_connected_peer_keeps_its_subscriptions() -> None:
    """One of B's pubsub streams dies while B stays connected (a restart before the old
    connection's end was read, a relayed connection closed after DCUtR): A still sends
    B what it publishes on the topic B subscribed to (py-libp2p alone forgot B's
    subscriptions, and B never sent them again)."""
    import trio

    from vcoind.p2p.host import running

    a = build_host(create_new_key_pair(), lambda f, m: None)
    b = build_host(create_new_key_pair(), lambda f, m: None)
    async with running(a, ["/ip4/127.0.0.1/tcp/0"]), running(b, ["/ip4/127.0.0.1/tcp/0"]):
        await a.pubsub.subscribe("t")
        sub = await b.pubsub.subscribe("t")
        await b.host.connect(PeerInfo(a.peer_id, [multiaddr.Multiaddr(a.addrs()[0])]))
        with trio.fail_after(10):
            while b.peer_id not in a.pubsub.peer_topics.get("t", set()):
                await trio.sleep(0.02)
            await a.pubsub.peers[b.peer_id].reset()  # A's stream to B dies; B stays
            got: list[bytes] = []
            while not got or got[-1] != b"after":
                await a.pubsub.publish("t", b"after")
                with trio.move_on_after(0.2):
                    got.append((await sub.get()).data)
        assert b.peer_id in a.pubsub.peer_topics["t"]
