"""SLA math (fixed clock: uptime from heartbeat gaps, p95 latency, throughput), and a
daemon that records a violated SLA's compensation and raises its alert."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished, serving
from vcoind.ops.alerts import RULES, AlertEngine, Snapshot
from vcoind.ops.sla import SLATerms, evaluate, merged, p95, uptime

DAY = 86400.0
NOW = 1_000_000.0


def test_uptime_from_heartbeat_gaps() -> None:
    start = NOW - DAY
    # down 2 h (closed), then from 1 h before now, still down
    down = [(start + 3600, start + 3 * 3600), (NOW - 3600, None)]
    assert uptime(down, start, NOW) == pytest.approx(1 - 3 / 24)
    # overlapping and out-of-window intervals count once, clipped
    down = [(start - 7200, start + 3600), (start + 1800, start + 5400), (NOW + 10, NOW + 20)]
    assert merged(down, start, NOW) == [(start, start + 5400)]
    assert uptime([], start, NOW) == 1.0


def test_p95_is_nearest_rank() -> None:
    assert p95([]) is None
    assert p95([3.0]) == 3.0
    assert p95([float(i) for i in range(1, 101)]) == 95.0
    assert p95([1.0] * 19 + [50.0]) == 1.0  # one slow task in 20 is the 5 % allowed


def test_evaluate_each_term() -> None:
    terms = SLATerms(
        "acme",
        uptime_pct=99.9,
        max_latency_s=5,
        min_throughput_per_day=1000,
        price=100,
        penalty_rate=0.1,
    )
    fine = {"latencies": [1.0] * 1200, "submitted": 1200, "completed": 1200, "downtime": {"n1": []}}
    st, vs = evaluate(terms, now=NOW, window_s=DAY, **fine)
    assert st["compliant"] and vs == [] and st["throughput_per_day"] == 1200
    # node n2 was down 1 h of the day: 95.83 % < 99.9 %
    st, vs = evaluate(
        terms,
        now=NOW,
        window_s=DAY,
        **{**fine, "downtime": {"n1": [], "n2": [(NOW - 7200, NOW - 3600)]}},
    )
    assert [v.kind for v in vs] == ["uptime"] and vs[0].evidence["node"] == "n2"
    assert vs[0].measured == pytest.approx(100 * (1 - 1 / 24), abs=1e-3)
    assert vs[0].penalty == pytest.approx(10.0)
    # p95 at 6 s
    st, vs = evaluate(
        terms, now=NOW, window_s=DAY, **{**fine, "latencies": [1.0] * 90 + [6.0] * 10}
    )
    assert [v.kind for v in vs] == ["latency"] and st["p95_latency_s"] == 6.0
    # 1200 asked, 900 done: a throughput violation; 500 asked, 500 done: low demand, fine
    _, vs = evaluate(terms, now=NOW, window_s=DAY, **{**fine, "completed": 900})
    assert [v.kind for v in vs] == ["throughput"]
    _, vs = evaluate(terms, now=NOW, window_s=DAY, **{**fine, "submitted": 500, "completed": 500})
    assert vs == []
    # 4.7 s p95 against 5 s: imminent
    st, vs = evaluate(terms, now=NOW, window_s=DAY, **{**fine, "latencies": [4.7] * 10})
    assert vs == [] and st["breach_imminent"] == ["latency"]
    with pytest.raises(ValueError, match="penalty"):
        SLATerms("x", penalty_rate=10)


def test_sla_alert_fires_and_resolves() -> None:
    engine = AlertEngine(rules={"sla_breach": RULES["sla_breach"]})
    ev = engine.evaluate(Snapshot(0, sla=[("acme", ["latency"], [])]))
    assert [(e, a.severity, a.subject) for e, a in ev] == [("fired", "critical", "acme")]
    assert engine.evaluate(Snapshot(1, sla=[("acme", [], [])]))[0][0] == "resolved"


def test_violated_sla_owes_compensation_and_alerts(
    cluster: Cluster, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VCOIN_SLA_INTERVAL_S", "0.3")
    n1 = cluster.start(1, extra=serving(models_dir))
    n1.rpc.call(
        "vcoin_slaCreate",
        {"customer": "acme", "max_latency_s": 0.001, "price": 100, "penalty_rate": 0.1},
    )
    n1.rpc.call("vcoin_slaCreate", {"customer": "calm", "max_latency_s": 600})

    def run(customer: str) -> None:
        req = {
            "model": MODEL,
            "input": "Explain proof of stake",
            "customer": customer,
            "parameters": {"max_new_tokens": 8},
        }
        t = finished(n1, str(n1.rpc.call("vcoin_submitTask", req)["task_id"]), timeout=120)
        assert t["status"] == "completed" and t["customer"] == customer, t

    run("acme")
    wait_until(
        lambda: n1.rpc.call("vcoin_slaViolations", {"customer": "acme"})["violations"],
        15,
        "the latency violation",
    )
    v = n1.rpc.call("vcoin_slaViolations", {"customer": "acme"})
    # the seeds' compensation: 10 % of the price per violation, owed to the customer
    assert v["violations"][0]["kind"] == "latency" and v["total_penalty"] == 10.0
    st = n1.rpc.call("vcoin_slaStatus", {"customer": "acme"})
    assert st["violations"] == ["latency"] and st["p95_latency_s"] > 0.001
    run("calm")
    assert n1.rpc.call("vcoin_slaStatus", {"customer": "calm"})["compliant"] is True
    wait_until(
        lambda: any(
            a["rule"] == "sla_breach" and a["subject"] == "acme"
            for a in n1.rpc.call("vcoin_alerts")["alerts"]
        ),
        15,
        "the SLA alert",
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vcoind.cli import client_main; sys.exit(client_main())",
            "--datadir",
            str(n1.datadir),
            "sla",
            "status",
            "acme",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "VIOLATED: latency" in out.stdout, out.stdout + out.stderr
