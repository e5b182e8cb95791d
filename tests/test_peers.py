"""Peer table expiry and the adaptive heartbeat interval, on trio's MockClock (no real waiting)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from tests.test_codec import make
from vcoind.metrics import NodeMetrics
from vcoind.p2p.gossip import Gossip, ReplayWindow
from vcoind.presence import peers as peers_module
from vcoind.presence.heartbeat import adaptive_interval
from vcoind.presence.peers import PeerTable
from vcoind.store import Store


class FakePubsub:
    def set_gate(self, gate: object) -> None:
        pass


class FakeP2P:  # Gossip only needs our peer id and the scoring hooks until it runs
    peer_id = ID(b"\x00\x01")
    pubsub = FakePubsub()

    def configure_scoring(self, threshold: float, app_score: object) -> None:
        pass


def test_adaptive_interval_bounds_presence_traffic() -> None:
    assert adaptive_interval(5.0, 0) == 5.0
    assert adaptive_interval(5.0, 20) == 5.0  # 21 nodes: 21 / log2(21) = 4.8 s
    assert adaptive_interval(5.0, 1023) == 102.4  # 1024 nodes / (1 x log2 1024) per second
    assert adaptive_interval(200.0, 1023) == 200.0
    # a faster configured pace (devnet 1 s, tests 0.3 s) scales the budget up in proportion
    assert adaptive_interval(0.3, 2) == 0.3
    assert adaptive_interval(1.0, 2) == 1.0
    assert math.isclose(adaptive_interval(1.0, 99), 0.2 * 100 / math.log2(100))  # 3 s


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    # Jump only after 20 ms of real idleness: the store runs in worker threads, and a
    # zero threshold would jump the clock while SQLite is still writing.
    return trio.testing.MockClock(autojump_threshold=0.02)


def table_for(store: Store, error_rate: Callable[[str], float] = lambda _peer: 0.0) -> PeerTable:
    return PeerTable(
        store, NodeMetrics(), peer_timeout=30.0, base_interval=5.0, error_rate=error_rate
    )


async def test_peer_expires_after_timeout_and_rejoins(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    table = table_for(store)
    hb = make(interval=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run)
        await table.on_heartbeat(hb)
        seen_at = trio.current_time()
        assert [p.peer_id for p in table.peers()] == [hb.peer_id]
        await trio.sleep(29.0)
        assert len(table) == 1  # still inside the timeout
        with trio.fail_after(10):
            await table.wait_changed()
        assert len(table) == 0
        assert 30.0 <= trio.current_time() - seen_at <= 35.0
        rows = await store.list_peers()
        assert [(r.peer_id, r.status) for r in rows] == [(hb.peer_id, "offline")]
        await table.on_heartbeat(dataclasses.replace(hb, seq=hb.seq + 1))
        assert len(table) == 1
        await table.flush()
        assert (await store.list_peers())[0].status == "online"
        nursery.cancel_scope.cancel()


async def test_stretched_interval_stretches_expiry(
    store: Store, mock_clock: trio.testing.MockClock
) -> None:
    table = table_for(store)
    hb = make(interval=20.0)  # a peer in a 1000-node network beats every 20 s
    assert table.expiry_for(hb) == 120.0
    async with trio.open_nursery() as nursery:
        await nursery.start(table.run)
        await table.on_heartbeat(hb)
        seen_at = trio.current_time()
        await trio.sleep(100.0)
        assert len(table) == 1
        with trio.fail_after(30):
            await table.wait_changed()
        assert len(table) == 0
        assert 120.0 <= trio.current_time() - seen_at <= 125.0
        nursery.cancel_scope.cancel()


async def test_health_uses_error_rate(store: Store) -> None:
    table = table_for(store, error_rate=lambda _peer: 0.5)  # half its messages were invalid
    hb = make(cpu_percent=0.0, memory_percent=0.0)
    await table.on_heartbeat(hb)
    st = table.get(hb.peer_id)
    assert st is not None
    # CPU and memory idle; no latency measured yet scores 1; errors cost half of their 15 %
    assert st.health == pytest.approx(0.30 + 0.30 + 0.25 + 0.15 * 0.5, abs=1e-6)


async def test_latency_sampled_only_after_warmup(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = table_for(store)
    hb = make(timestamp=time.time() - 3.0)  # a replayed beat, 3 s old, at join time
    await table.on_heartbeat(hb)
    assert table.latency_stats() == {"count": 0, "total": 0}
    monkeypatch.setattr(peers_module, "LATENCY_WARMUP_S", 0.0)
    await table.on_heartbeat(make(seq=hb.seq + 1, timestamp=time.time() - 2.0))
    stats = table.latency_stats()
    assert stats["count"] == 1 and 1900 < stats["p50_ms"] < 2500
    st = table.get(hb.peer_id)
    assert st is not None and st.latency_s == pytest.approx(2.0, abs=0.5)
    assert st.health < 0.30 + 0.30 + 0.25 + 0.15  # 2 s response costs health


def test_replay_window_accepts_reordering_but_not_repeats() -> None:
    w = ReplayWindow(size=8)
    for seq in (100, 102, 101):  # 101 overtaken by 102 on another mesh path: still fresh
        assert w.fresh(seq)
        w.add(seq)
    assert not w.fresh(101) and not w.fresh(102)  # exact repeats
    assert not w.fresh(92)  # too far behind the highest seen
    assert w.fresh(95)  # inside the window, never seen
    for seq in range(103, 200):
        w.add(seq)
    assert len(w._seen) <= 2 * w.size + 1  # memory stays bounded


async def test_late_older_heartbeat_does_not_roll_back(store: Store) -> None:
    table = table_for(store)
    new = make(seq=10, queue_length=5)
    await table.on_heartbeat(new)
    await table.on_heartbeat(make(seq=9, queue_length=0))
    st = table.get(new.peer_id)
    assert st is not None and st.heartbeat.seq == 10 and st.heartbeat.queue_length == 5


def test_idle_replay_windows_are_pruned_only_once_stale() -> None:
    g = Gossip(FakeP2P(), "devnet", NodeMetrics(), max_age_s=30.0, max_invalid=5)  # type: ignore[arg-type]
    for sender, updated in (("a", 1000.0), ("b", 1025.0)):
        window = g._replay[("heartbeat", sender)] = ReplayWindow()
        window.add(1)
        window.updated = updated
    g.prune(now=1040.0)  # a idle 40 s > 30 s max age: its messages are stale anyway
    assert set(g._replay) == {("heartbeat", "b")}
