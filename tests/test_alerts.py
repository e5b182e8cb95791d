"""Alert rules fire and resolve; the engine de-duplicates and escalates; a daemon raises
a peer-offline alert over RPC, the WebSocket channel, /metrics and a webhook, and
resolves it when the peer returns."""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Cluster, peers_of, wait_until
from tests.test_node_rpc import rpc
from vcoind.ops.alerts import RULES, AlertEngine, Snapshot, Thresholds

T = Thresholds()
# rule -> (a snapshot where it holds, its severity there, one where it does not)
CASES: dict[str, tuple[Snapshot, str, Snapshot]] = {
    "peer_offline": (Snapshot(100.0, peers_offline=[("12D3KooWpeer", 40.0)]), "warning",
                     Snapshot(100.0)),
    "gpu_temperature": (Snapshot(0, gpu={"temperature_c": 93.0}), "critical",
                        Snapshot(0, gpu={"temperature_c": 60.0})),
    "memory_pressure": (Snapshot(0, gpu={"memory_used_mb": 75_000, "memory_total_mb": 80_000}),
                        "warning",
                        Snapshot(0, gpu={"memory_used_mb": 10_000, "memory_total_mb": 80_000})),
    "error_rate": (Snapshot(0, tasks_recent=(6, 10)), "critical",
                   Snapshot(0, tasks_recent=(1, 10))),
    "consensus_disagreement": (Snapshot(0, consensus_recent=(4, 10)), "warning",
                               Snapshot(0, consensus_recent=(1, 10))),
    "stake_low": (Snapshot(0, stake={"stake": 10.0, "eligible": False}), "critical",
                  Snapshot(0, stake={"stake": 1000.0, "eligible": True})),
    "oracle_price_anomaly": (Snapshot(0, price_anomalies=[
        ("QUBIC", "price_jump", "+30%"), ("QUBIC", "manipulation", "pump")]), "critical",
        Snapshot(0)),
    "sla_breach": (Snapshot(0, sla=[("acme", [], ["latency"])]), "warning",
                   Snapshot(0, sla=[("acme", [], [])])),
    "oracle_sentiment_swing": (Snapshot(0, sentiment=(0.4, -0.1)), "warning",
                               Snapshot(0, sentiment=(0.4, 0.3))),
}  # fmt: skip


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule", sorted(CASES))
def test_rule_fires_and_resolves(rule: str) -> None:
    firing, severity, calm = CASES[rule]
    engine = AlertEngine(T, {rule: RULES[rule]})
    heard: list[tuple[str, str]] = []
    engine.listeners.append(lambda ev, a: heard.append((ev, a.rule)))
    assert engine.evaluate(calm) == []
    events = engine.evaluate(firing)
    assert [(e, a.rule, a.severity) for e, a in events] == [("fired", rule, severity)]
    assert engine.evaluate(firing) == []  # still holding: the same alert, no new event
    assert len(engine.active) == 1
    ((event, a),) = engine.evaluate(calm)
    assert event == "resolved" and a.resolved_at is not None and not engine.active
    assert heard == [("fired", rule), ("resolved", rule)]
    assert engine.list()[0]["active"] is False


def test_escalation_and_thresholds() -> None:
    engine = AlertEngine(T, {"gpu_temperature": RULES["gpu_temperature"]})
    assert engine.evaluate(Snapshot(1, gpu={"temperature_c": 86.0}))[0][0] == "fired"
    ev = engine.evaluate(Snapshot(2, gpu={"temperature_c": 95.0}))
    assert [(e, a.severity) for e, a in ev] == [("escalated", "critical")]
    assert engine.evaluate(Snapshot(3, gpu={"temperature_c": 88.0})) == []  # no de-escalation
    few = AlertEngine(T, {"error_rate": RULES["error_rate"]})
    assert few.evaluate(Snapshot(0, tasks_recent=(4, 4))) == []  # under min_tasks: no verdict
    rule = {"gpu_temperature": RULES["gpu_temperature"]}
    cooler = AlertEngine(Thresholds(gpu_temp_warning_c=95.0), rule)
    assert cooler.evaluate(Snapshot(0, gpu={"temperature_c": 93.0})) == []


@contextlib.contextmanager
def webhook() -> Any:
    got: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers["content-length"])
            got.append(json.loads(self.rfile.read(n)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()


@contextlib.asynccontextmanager
async def subscribed(url: str, auth: dict[str, str]) -> AsyncIterator[Any]:
    from trio_websocket import open_websocket_url

    headers = [(k.encode(), v.encode()) for k, v in auth.items()]
    async with open_websocket_url(
        url.replace("http://", "ws://") + "/ws", extra_headers=headers
    ) as ws:
        await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "vcoin_subscribe",
                                          "params": {"channel": "alerts"}}))  # fmt: skip
        assert "result" in json.loads(await ws.get_message())
        yield ws


async def test_daemon_peer_offline_alert_fires_and_resolves(cluster: Cluster) -> None:
    """Real daemons: node 2 stops, node 1 alerts (WebSocket channel, RPC, /metrics,
    webhook); node 2 returns, the alert resolves."""

    async def call(fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args))

    with webhook() as (hook, posted):
        n1 = await call(cluster.start, 1)
        n1.proc.terminate()
        await call(n1.proc.wait)
        (n1.datadir / "config.toml").write_text(
            f'[alerts]\ninterval_s = 0.2\nwebhook_url = "{hook}"\n'
        )
        n1 = await call(cluster.start, 1)
        n2 = await call(lambda: cluster.start(2, bootstrap=n1))
        await call(wait_until, lambda: n2.info["peer_id"] in peers_of(n1), 15, "node 2 joined")
        url = n1.info["rpc_url"]
        async with (
            subscribed(url, n1.rpc.auth) as ws,
            httpx.AsyncClient(timeout=10, headers=n1.rpc.auth) as client,
        ):
            n2.proc.terminate()
            await call(n2.proc.wait)
            with trio.fail_after(20):
                note = json.loads(await ws.get_message())
            ev = note["params"]["result"]
            assert note["params"]["channel"] == "alerts"
            assert (ev["event"], ev["rule"], ev["subject"]) == (
                "fired", "peer_offline", n2.info["peer_id"])  # fmt: skip
            r = (await rpc(client, url, "vcoin_alerts", {"active_only": True}))["result"]
            assert r["active"] == 1 and r["alerts"][0]["severity"] == "warning"
            metrics = (await client.get(url + "/metrics")).text
            assert 'vcoin_alerts_fired_total{rule="peer_offline",severity="warning"} 1.0' in metrics
            assert 'vcoin_alerts_active{severity="warning"} 1.0' in metrics
            with trio.fail_after(10):
                while not posted:
                    await trio.sleep(0.1)
            assert posted[0]["rule"] == "peer_offline" and posted[0]["event"] == "fired"
            await call(lambda: cluster.start(2, bootstrap=n1))  # same datadir, same peer id
            with trio.fail_after(20):
                ev = json.loads(await ws.get_message())["params"]["result"]
            assert (ev["event"], ev["subject"]) == ("resolved", n2.info["peer_id"])
            r = (await rpc(client, url, "vcoin_alerts"))["result"]
            assert r["active"] == 0 and r["alerts"][0]["resolved_at"] is not None
        out = await call(lambda: subprocess.run(
            [sys.executable, "-c", "import sys; from vcoind.cli import client_main; "
             "sys.exit(client_main())", "--datadir", str(n1.datadir), "alerts"],
            capture_output=True, text=True, timeout=30))  # fmt: skip
        assert out.returncode == 0 and "resolved" in out.stdout and "peer_offline" in out.stdout
