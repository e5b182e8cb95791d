"""The operations service: SLAs, alerts, the dashboard and the node's status methods.

It sits on top of every other service (it only reads them): SLA evaluation on a timer
(peer uptime from presence, task facts from the store), alert rules over a snapshot of
the node (peers gone, GPU, memory, failures, conflicts, stake, oracle, SLAs) with events
on the ``alerts`` WebSocket channel and an optional webhook, and ``vcoin_nodeInfo``,
``vcoin_peers``, ``vcoin_clusterStatus``, ``vcoin_gossipStats``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from vcoind.chain.service import vcoin
from vcoind.config import subset
from vcoind.metrics import NodeMetrics
from vcoind.ops.alerts import AlertEngine, Snapshot, Thresholds
from vcoind.ops.api import add_dashboard_routes, register_ops_api
from vcoind.ops.sla import SLATerms
from vcoind.ops.sla import evaluate as sla_evaluate
from vcoind.ops.status import REST_ALIASES, NodeFacts, register_status_api
from vcoind.p2p.gossip import Gossip
from vcoind.store import AlertStore, SLAStore, Store

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.chain.service import ChainService
    from vcoind.compute.service import ComputeService
    from vcoind.config import AlertsConfig, SLAConfig
    from vcoind.market.service import MarketService
    from vcoind.oracle.service import OracleService
    from vcoind.presence.service import PresenceService
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.ops")


class OpsService:
    def __init__(
        self,
        alerts_cfg: AlertsConfig,
        sla_cfg: SLAConfig,
        facts: NodeFacts,
        store: Store,
        gossip: Gossip,
        metrics: NodeMetrics,
        presence: PresenceService,
        compute: ComputeService,
        market: MarketService,
        *,
        publish: Callable[[str, Any], Awaitable[None]],
        chain: ChainService | None = None,
        oracle: OracleService | None = None,
    ) -> None:
        self._alerts_cfg = alerts_cfg
        self._sla_cfg = sla_cfg
        self._facts = facts
        self._store = store
        self._gossip = gossip
        self._metrics = metrics
        self._presence = presence
        self._compute = compute
        self._market = market
        self._publish = publish
        self._chain = chain
        self._oracle = oracle
        self._nursery: trio.Nursery | None = None
        self.alerts: AlertEngine | None = None
        if alerts_cfg.enabled:
            self.alerts = AlertEngine(subset(Thresholds, alerts_cfg))
        self.alert_store = AlertStore(store)
        self.slas = SLAStore(store)
        self.sla_status: dict[str, dict[str, Any]] = {}  # customer -> latest evaluation
        presence.peers.on_presence.append(self._on_presence)

    def mount(self, m: Mounts) -> None:
        register_status_api(m.rpc, self._facts, self._presence, self._compute, self._market,
                            self._store, self._gossip, self._metrics, self._chain)  # fmt: skip
        register_ops_api(m.rpc, self.alerts, self.slas, self.sla_evaluate)
        for path, method in REST_ALIASES.items():
            m.http.add_get_alias(path, method)
        add_dashboard_routes(m.http)

    # --- SLAs -------------------------------------------------------------

    async def _on_presence(self, peer: str, online: bool, when: float) -> None:
        if online:
            await self.slas.peer_up(peer, when)
        else:
            await self.slas.peer_down(peer, when)

    async def sla_evaluate(self, customer: str | None = None) -> list[dict[str, Any]]:
        """Evaluate SLAs now (all, or one customer's); record new violations (once per
        term and window)."""
        window = self._sla_cfg.window_s
        now = time.time()
        out = []
        for row in await self.slas.terms(customer):
            terms = SLATerms(*row)
            facts = await self.slas.task_facts(terms.customer, now - window)
            down = await self.slas.downtime(facts["nodes"], now - window)
            status, violations = sla_evaluate(
                terms, now=now, window_s=window, latencies=facts["latencies"],
                submitted=facts["submitted"], completed=facts["completed"], downtime=down,
            )  # fmt: skip
            for v in violations:
                key = f"{terms.customer}:{v.kind}:{int(now // window)}"
                if await self.slas.add_violation(key, terms.customer, v):
                    log.warning("SLA %s: %s violated (%s vs %s); penalty %g", terms.customer,
                                v.kind, v.measured, v.target, v.penalty)  # fmt: skip
            status["evaluated_at"] = now
            self.sla_status[terms.customer] = status
            out.append(status)
        return out

    async def _sla_loop(self) -> None:
        while True:
            await trio.sleep(self._sla_cfg.interval_s)
            try:
                await self.sla_evaluate()
            except Exception:
                log.exception("SLA evaluation failed")

    # --- alerts -----------------------------------------------------------

    async def _alerts_loop(self, alerts: AlertEngine) -> None:
        while True:
            await trio.sleep(self._alerts_cfg.interval_s)
            try:
                snap = await self._alert_snapshot()
            except Exception:  # a broken source of facts must not stop the alerts
                log.exception("alert snapshot failed")
                continue
            for event, a in alerts.evaluate(snap):
                await self._alert_event(event, a)
            for sev in ("info", "warning", "critical"):
                n = sum(1 for x in alerts.active.values() if x.severity == sev)
                self._metrics.alerts_active.labels(severity=sev).set(n)

    async def _alert_event(self, event: str, a: Any) -> None:
        level = logging.INFO if event == "resolved" or a.severity == "info" else logging.WARNING
        log.log(level, "alert %s: [%s] %s: %s", event, a.severity, a.rule, a.message)
        if event == "fired":
            self._metrics.alerts_fired.labels(rule=a.rule, severity=a.severity).inc()
        view = {"event": event, **a.view()}
        await self.alert_store.record(a)
        await self._publish("alerts", view)
        url = self._alerts_cfg.webhook_url
        if url and self._nursery is not None:
            self._nursery.start_soon(_post_webhook, url, view)

    async def _alert_snapshot(self) -> Snapshot:
        now = time.time()
        # Peers that went silent while we ran (at start every known peer is offline until
        # its first heartbeat: that is not news), within the last hour.
        offline = [(r.peer_id, r.last_heartbeat) for r in await self._store.list_peers("offline")
                   if r.last_heartbeat and r.last_heartbeat >= self._facts.started_at
                   and now - r.last_heartbeat < 3600]  # fmt: skip
        hb = self._presence.heartbeat.last  # the telemetry sampled for our latest heartbeat
        gpu = None
        if hb is not None and hb.device.kind == "cuda":
            d = hb.device
            gpu = {"name": d.name, "temperature_c": d.temperature_c,
                   "memory_used_mb": d.memory_used_mb,
                   "memory_total_mb": d.memory_total_mb}  # fmt: skip
        recent = await self._market.tasks.recent_outcomes(now - 600)
        stake = None
        if self._chain is not None and self._chain.require_stake:
            info = self._chain.stake_of(self._facts.eth_address)
            if info is not None:
                stake = {"stake": vcoin(info.stake), "eligible": info.eligible}
        anomalies, sentiment = self._oracle.alert_view() if self._oracle else ([], None)
        return Snapshot(
            now=now, peers_offline=offline, gpu=gpu,
            host_memory_pct=hb.memory_percent if hb is not None else None,
            tasks_recent=(recent["failed"], recent["finished"]),
            consensus_recent=(recent["conflicts"], recent["consensus"]), stake=stake,
            price_anomalies=anomalies, sentiment=sentiment,
            sla=[(c, s["violations"], s["breach_imminent"]) for c, s in self.sla_status.items()],
        )  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.alerts is not None:
                nursery.start_soon(self._alerts_loop, self.alerts)
            nursery.start_soon(self._sla_loop)
            task_status.started()


async def _post_webhook(url: str, payload: dict[str, Any]) -> None:
    """Best effort: three tries, then the event is only in the log and the store."""
    import httpx

    async with httpx.AsyncClient(timeout=5.0) as client:
        for attempt in range(3):
            try:
                r = await client.post(url, json=payload)
                if r.status_code < 500:
                    return
            except httpx.HTTPError as exc:
                log.info("alert webhook %s: %s", url, exc)
            await trio.sleep(2**attempt)
