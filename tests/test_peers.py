"""Peer table expiry and the adaptive heartbeat interval, on trio's MockClock (no real waiting)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.test_codec import make
from vcoind.metrics import NodeMetrics
from vcoind.p2p.heartbeat import adaptive_interval
from vcoind.p2p.peers import PeerTable
from vcoind.store import Store


def test_adaptive_interval_bounds_presence_traffic() -> None:
    assert adaptive_interval(5.0, 0) == 5.0
    assert adaptive_interval(5.0, 200) == 5.0
    assert adaptive_interval(5.0, 1000) == 20.0  # 1000 peers / 50 per second
    assert adaptive_interval(5.0, 5000) == 100.0


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    # Jump only after 20 ms of real idleness: the store runs in worker threads, and a
    # zero threshold would jump the clock while SQLite is still writing.
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_peer_expires_after_timeout_and_rejoins(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    store = Store(tmp_path / "db")
    await store.open()
    table = PeerTable(
        store, NodeMetrics(), peer_timeout=30.0, base_interval=5.0, error_rate=lambda _peer: 0.0
    )
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
    await store.close()


async def test_stretched_interval_stretches_expiry(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    store = Store(tmp_path / "db")
    await store.open()
    table = PeerTable(
        store, NodeMetrics(), peer_timeout=30.0, base_interval=5.0, error_rate=lambda _peer: 0.0
    )
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
    await store.close()


async def test_health_uses_error_rate_and_latency(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    await store.open()
    rates = {"good": 0.0}
    table = PeerTable(
        store,
        NodeMetrics(),
        peer_timeout=30.0,
        base_interval=5.0,
        error_rate=lambda peer: rates.get(peer, 0.5),
    )
    hb = make(cpu_percent=0.0, memory_percent=0.0)
    await table.on_heartbeat(hb)
    st = table.get(hb.peer_id)
    assert st is not None
    assert st.health == pytest.approx(0.85 + 0.15 * 0.5, abs=1e-3)  # half its messages invalid
    assert table.latency_stats()["count"] == 1
    await store.close()
