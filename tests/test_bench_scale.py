"""bench/scale.py: the real part at N=4 (in-process daemons in two worker processes) and the
simulated transport at small sizes, with invariants that can fail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from scale import RealFigures, run_real
from scale_sim import fit_cpu, fit_exponent, simulate

from vcoind.presence.heartbeat import adaptive_interval


@pytest.mark.slow
def test_real_hosts_converge_and_count() -> None:
    n, interval = 4, 1.0
    f: RealFigures = run_real(n, interval, per_process=2, window=6.0, announces=2,
                              converge_timeout=60)  # fmt: skip
    assert f.convergence_s is not None and f.convergence_s < 30
    assert f.min_peers == n - 1
    # every node takes each other's heartbeat once an interval (a beat may straddle the
    # edge): the daemon's interval, which stretches the configured one with N
    expected = (n - 1) / adaptive_interval(interval, n - 1)
    assert expected * 0.7 <= f.hb_in_per_s <= expected * 1.3
    # with 3 peers the mesh is complete: each heartbeat reaches a node once from its origin
    # and at most once more from each other peer
    assert f.hb_in_per_s <= f.msgs_in_per_s <= (n - 1) * f.hb_in_per_s * 1.3
    assert f.rpcs_in_per_s > 0 and f.kb_in_per_s > 0 and f.kb_out_per_s > 0
    # every copy sent is received by a node of the bench
    assert f.msgs_in_per_s == pytest.approx(f.msgs_out_per_s, rel=0.3)
    assert 0 < f.cpu_pct < 100 and f.p50_ms > 0 and f.p95_ms >= f.p50_ms
    assert f.stale_pct < 50
    # every other node serves the stand-in model and bids
    assert f.bids_per_task == n - 1
    assert f.bid_first_ms is not None and f.bid_last_ms is not None
    assert 0 < f.bid_first_ms <= f.bid_last_ms < 10_000


def test_simulation_grows_with_n() -> None:
    sizes = [10, 25, 50, 100]
    figs = [simulate(n, interval=5.0, msg_bytes=1200.0, origins=40) for n in sizes]
    for f in figs:
        assert f.hb_in_per_s == pytest.approx((f.n - 1) / 5.0)
        assert f.msgs_in_per_s >= f.hb_in_per_s  # duplicates on top of each unique beat
        assert f.hops_max >= f.hops_p50 >= 1
    # past the full mesh (D_high + 1 nodes) a heartbeat arrives about D - 1 times
    assert all(3.5 <= f.dup_per_hb <= 6.0 for f in figs[1:])
    msgs = [f.msgs_in_per_s for f in figs]
    assert msgs == sorted(msgs)
    e = fit_exponent(sizes[1:], msgs[1:])
    assert e is not None and 0.9 <= e <= 1.1  # every heartbeat to every node: linear
    assert figs[-1].ihave_ids_in_per_s > figs[1].ihave_ids_in_per_s > 0
    assert figs[-1].hops_max > figs[0].hops_max  # deeper trees in larger networks


def test_fits() -> None:
    assert fit_exponent([10, 100], [2.0, 20.0]) == pytest.approx(1.0)
    assert fit_exponent([10, 100], [5.0, 5.0]) == pytest.approx(0.0)
    cpu = fit_cpu([1.0, 3.0], [3.0, 5.0])
    assert cpu is not None
    assert cpu.idle_pct == pytest.approx(2.0) and cpu.ms_per_hb == pytest.approx(10.0)
    assert cpu.project(10.0) == pytest.approx(12.0)
    # the same rate at every size: everything charged to the heartbeats
    flat = fit_cpu([2.0, 2.1], [5.0, 6.3])
    assert flat is not None and flat.idle_pct == 0.0
    assert flat.ms_per_hb == pytest.approx((25.0 + 30.0) / 2)
