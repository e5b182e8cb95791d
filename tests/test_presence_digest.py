"""Presence that scales: small beats with a digest, full heartbeats on change, the full state
fetched by digest, and an interval that grows with the network (issue 25, item 4)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from tests.test_codec import PEER, make
from tests.test_node_rpc import node_in_process
from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import decode, encode
from vcoind.presence.heartbeat import FULL_EVERY, PRESENCE_RATE, BindingCheck, adaptive_interval
from vcoind.presence.messages import (
    Beat,
    Heartbeat,
    ModelServed,
    PresenceReply,
    apply_beat,
    beat_of,
    capability_digest,
)
from vcoind.presence.peers import PeerTable
from vcoind.presence.sync import PresenceSync
from vcoind.store import Store

MODEL = ModelServed("digest-test", "sha256:" + "d1" * 32)


def test_interval_grows_so_presence_per_node_grows_with_log_n() -> None:
    assert adaptive_interval(5.0, 0) == 5.0
    assert adaptive_interval(5.0, 9) == 5.0  # 10 nodes: 10 / log2(10) = 3 s < base
    assert math.isclose(adaptive_interval(5.0, 99), 100 / math.log2(100))  # 15.05 s
    assert math.isclose(adaptive_interval(5.0, 999), 1000 / math.log2(1000))  # 100.3 s
    sizes = [10, 100, 1000, 10_000, 100_000]
    intervals = [adaptive_interval(5.0, n - 1) for n in sizes]
    assert intervals == sorted(intervals)
    # presence messages a node takes per second: (N - 1) / interval <= rate x log2 N,
    # and past the base it is exactly that: logarithmic, not linear, in N
    for n, interval in zip(sizes, intervals, strict=True):
        assert (n - 1) / interval <= PRESENCE_RATE * math.log2(n) + 1e-9
    rates = [(n - 1) / i for n, i in zip(sizes[1:], intervals[1:], strict=True)]
    assert rates[-1] / rates[0] < 3  # 1,000x the nodes, 2.5x the messages (log2 ratio)


def test_beat_is_small_and_digest_covers_capability_only() -> None:
    hb = make()
    digest = capability_digest(hb)
    # load figures, seq, time and interval do not change the digest ...
    same = dataclasses.replace(
        hb, seq=99, timestamp=hb.timestamp + 5, interval=30.0, cpu_percent=77.0,
        queue_length=9, health=0.2,
        device=dataclasses.replace(hb.device, utilization=99.0, temperature_c=80.0),
    )  # fmt: skip
    assert capability_digest(same) == digest
    # ... what the node serves does
    assert capability_digest(dataclasses.replace(hb, models=(MODEL,))) != digest
    assert capability_digest(dataclasses.replace(hb, listen_addrs=())) != digest
    beat = beat_of(same, digest)
    wire = encode(beat)
    assert len(wire) < 400 and len(wire) < len(encode(hb)) / 2
    assert decode(wire) == beat
    # a beat applied to the full heartbeat it names gives the sender's current heartbeat
    assert apply_beat(hb, beat) == same


async def test_unchanged_beats_are_small_and_a_change_goes_out_full_at_once(
    tmp_path: Path,
) -> None:
    """Two real daemons: between full heartbeats (on change, every FULL_EVERY beats) a node
    publishes Beats carrying the digest of its last full heartbeat; the peer applies their
    load figures; a capability change is published full at once and reaches the peer long
    before the next beat is due."""
    sent: list[Any] = []
    async with (
        node_in_process(tmp_path / "a", **{"p2p.heartbeat_interval": 0.2}) as (a, ia),
        node_in_process(tmp_path / "b", **{"p2p.bootstrap": [ia.p2p_addrs[0]]}) as (b, _ib),
    ):
        publish = a.gossip.publish

        async def spy(name: str, record: Any) -> None:
            sent.append(record)
            await publish(name, record)

        a.gossip.publish = spy  # type: ignore[method-assign]
        with trio.fail_after(90):  # a hang guard: the box is shared
            while b.presence.peers.get(ia.peer_id) is None:
                await trio.sleep(0.05)
            while len(sent) < FULL_EVERY + 2:
                await trio.sleep(0.05)
        beats = [r for r in sent if isinstance(r, Beat)]
        fulls = [r for r in sent if isinstance(r, Heartbeat)]
        assert beats and fulls
        assert len(beats) >= len(fulls) * (FULL_EVERY - 2)
        full = a.presence.heartbeat.last_full
        assert full is not None
        for beat in beats:
            assert beat.digest == capability_digest(full)
            assert len(encode(beat)) < 400
        # a load figure (the queue) rides on the next beat and b takes it without a fetch
        a.presence.note_queue(7)
        with trio.fail_after(10):
            while (st := b.presence.peers.get(ia.peer_id)) is None or (
                st.heartbeat.queue_length != 7
            ):
                await trio.sleep(0.05)
        # now a slow interval: a change must not wait for the next beat
        a.presence.heartbeat._base = 600.0
        await trio.sleep(0.5)  # the beat in progress (at the old interval) goes out
        sent.clear()
        a.presence.announce(models=(MODEL,))
        with trio.fail_after(30):  # far below the 600 s interval
            while ia.peer_id not in b.presence.view.serving(MODEL.name):
                await trio.sleep(0.05)
        assert isinstance(sent[0], Heartbeat) and sent[0].models == (MODEL,)
        assert b.presence.sync.fetched == 0  # it came whole by gossip


async def test_receiver_with_a_stale_digest_fetches_the_full_state(tmp_path: Path) -> None:
    """b misses a's full heartbeat (dropped on arrival); a's next Beat names a digest b does
    not hold, so b asks over /vcoin/presence/1.0.0 and takes the full state it gets."""
    async with (
        node_in_process(tmp_path / "a", **{"p2p.heartbeat_interval": 0.3}) as (a, ia),
        node_in_process(tmp_path / "b", **{"p2p.bootstrap": [ia.p2p_addrs[0]]}) as (b, _ib),
    ):
        with trio.fail_after(90):  # a hang guard: the box is shared
            while b.presence.sync.digest_of(ia.peer_id) is None:
                await trio.sleep(0.05)
        route = b.gossip._routes[b.gossip.topic("heartbeat")]["heartbeat"]
        take_full = route.handler
        dropped: list[Heartbeat] = []

        async def drop_fulls(hb: Heartbeat) -> None:
            dropped.append(hb)

        route.handler = drop_fulls
        a.presence.announce(models=(MODEL,))
        with trio.fail_after(90):  # a hang guard: the box is shared
            while ia.peer_id not in b.presence.view.serving(MODEL.name):
                await trio.sleep(0.05)
        route.handler = take_full
        assert any(hb.models == (MODEL,) for hb in dropped)  # gossip's copy never reached it
        assert b.presence.sync.fetched >= 1 and b.presence.sync.requests >= 1
        full = a.presence.heartbeat.last_full
        assert full is not None
        assert b.presence.sync.digest_of(ia.peer_id) == capability_digest(full)
        assert ia.peer_id not in b.presence.sync.pending()


class FakeStreams:
    """Answers every presence request with ``reply`` (a lying relay, here)."""

    def __init__(self, reply: PresenceReply) -> None:
        self.reply = reply
        self.asked: list[str] = []

    def serve(self, proto: Any, handler: Any) -> None:
        pass

    async def request(self, peer: ID, proto: Any, record: Any, reply_type: Any,
                      **kw: Any) -> PresenceReply:  # fmt: skip
        self.asked.append(peer.to_base58())
        return self.reply


async def test_a_fetched_full_state_must_match_the_announced_digest(store: Store) -> None:
    table = PeerTable(store, NodeMetrics(), peer_timeout=30.0, base_interval=5.0,
                      error_rate=lambda _p: 0.0)  # fmt: skip
    relay = "12D3KooW" + "R" * 44
    sync = PresenceSync(table, BindingCheck(), own_full=lambda: None,
                        connected=lambda: {relay})  # fmt: skip
    honest = make(models=(MODEL,))
    beat = beat_of(dataclasses.replace(honest, seq=20), capability_digest(honest))
    lie = dataclasses.replace(honest, models=(ModelServed("other", "sha256:" + "ee" * 32),))
    streams = FakeStreams(PresenceReply((lie,)))
    sync.mount(streams)  # type: ignore[arg-type]
    await sync.on_beat(beat)  # unknown peer: the beat waits for its full state
    assert sync.pending() == {PEER} and table.get(PEER) is None
    await sync.fetch_pending()
    assert streams.asked == [relay]
    assert table.get(PEER) is None and sync.fetched == 0  # the lie is refused
    # asked again only once RETRY_S has passed (a bogus digest costs no request storm)
    await sync.fetch_pending()
    assert streams.asked == [relay]
    streams.reply = PresenceReply((honest,))
    sync._asked.clear()
    await sync.fetch_pending()
    st = table.get(PEER)
    assert st is not None and st.heartbeat.models == (MODEL,) and st.heartbeat.seq == 20
    assert sync.fetched == 1 and not sync.pending()
    # from now on its beats apply directly
    await sync.on_beat(dataclasses.replace(beat, seq=21, queue_length=5))
    st = table.get(PEER)
    assert st is not None and st.heartbeat.queue_length == 5 and not sync.pending()
