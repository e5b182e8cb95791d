"""Risk alerts: rules over what the node knows, evaluated every few seconds.

A rule looks at a ``Snapshot`` and returns the conditions that hold now, each with a
subject (a peer, the GPU, a symbol...), a severity and a message. The ``AlertEngine``
de-duplicates by (rule, subject): a condition that starts holding *fires*, one that keeps
holding is the same alert (a higher severity *escalates* it), one that stops holding is
*resolved*. Events go to the listeners the node attaches (the ``alerts`` WebSocket
channel, the log, the metrics, an optional webhook) and to SQLite.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Thresholds:
    gpu_temp_warning_c: float = 85.0
    gpu_temp_critical_c: float = 92.0
    memory_warning_pct: float = 90.0
    memory_critical_pct: float = 97.0
    error_rate_warning: float = 0.2
    error_rate_critical: float = 0.5
    min_tasks: int = 5  # fewer recent tasks than this: no error-rate verdict
    disagreement_warning: float = 0.3
    sentiment_swing: float = 0.3
    peer_offline_after_s: float = 0.0  # extra grace beyond the peer timeout


@dataclass(frozen=True)
class Snapshot:
    """What the rules see. Every field is optional knowledge: absent means "not known"."""

    now: float
    peers_offline: Sequence[tuple[str, float]] = ()  # (peer id, last heartbeat)
    gpu: dict[str, Any] | None = None  # name, temperature_c, memory_used_mb, memory_total_mb
    host_memory_pct: float | None = None
    tasks_recent: tuple[int, int] = (0, 0)  # (failed, finished) in the window
    consensus_recent: tuple[int, int] = (0, 0)  # (with a conflict, finished)
    stake: dict[str, Any] | None = None  # stake (VCOIN), eligible (the chain's verdict)
    price_anomalies: Sequence[tuple[str, str, str]] = ()  # (symbol, kind, detail), recent
    sentiment: tuple[float, float] | None = None  # (previous, latest) 24 h index
    sla: Sequence[tuple[str, Sequence[str], Sequence[str]]] = ()  # (customer, broken, near)


@dataclass(frozen=True)
class Condition:
    subject: str
    severity: str
    message: str
    value: float | None = None


Rule = Callable[[Snapshot, Thresholds], list[Condition]]


def peer_offline(s: Snapshot, t: Thresholds) -> list[Condition]:
    out = []
    for peer, last in s.peers_offline:
        gone = s.now - last
        if gone >= t.peer_offline_after_s:
            msg = f"peer {peer[-8:]} offline: last heartbeat {gone:.0f} s ago"
            out.append(Condition(peer, "warning", msg, gone))
    return out


def gpu_temperature(s: Snapshot, t: Thresholds) -> list[Condition]:
    temp = (s.gpu or {}).get("temperature_c")
    if temp is None or temp < t.gpu_temp_warning_c:
        return []
    sev = "critical" if temp >= t.gpu_temp_critical_c else "warning"
    return [Condition("gpu", sev, f"GPU at {temp:.0f} °C", float(temp))]


def memory_pressure(s: Snapshot, t: Thresholds) -> list[Condition]:
    out = []
    g = s.gpu or {}
    if g.get("memory_total_mb"):
        pct = 100.0 * g.get("memory_used_mb", 0) / g["memory_total_mb"]
        if pct >= t.memory_warning_pct:
            sev = "critical" if pct >= t.memory_critical_pct else "warning"
            out.append(Condition("gpu", sev, f"GPU memory {pct:.0f} % used", pct))
    if s.host_memory_pct is not None and s.host_memory_pct >= t.memory_warning_pct:
        sev = "critical" if s.host_memory_pct >= t.memory_critical_pct else "warning"
        out.append(Condition("host", sev, f"host memory {s.host_memory_pct:.0f} % used",
                             s.host_memory_pct))  # fmt: skip
    return out


def error_rate(s: Snapshot, t: Thresholds) -> list[Condition]:
    failed, total = s.tasks_recent
    if total < t.min_tasks or failed / total < t.error_rate_warning:
        return []
    rate = failed / total
    sev = "critical" if rate >= t.error_rate_critical else "warning"
    return [Condition("tasks", sev, f"{failed} of the last {total} tasks failed", rate)]


def consensus_disagreement(s: Snapshot, t: Thresholds) -> list[Condition]:
    conflicts, total = s.consensus_recent
    if total < t.min_tasks or conflicts / total < t.disagreement_warning:
        return []
    return [Condition("consensus", "warning", f"replicas disagreed on {conflicts} of the "
                      f"last {total} consensus tasks", conflicts / total)]  # fmt: skip


def stake_low(s: Snapshot, t: Thresholds) -> list[Condition]:
    st = s.stake
    if not st or st.get("eligible", True):
        return []
    return [Condition("stake", "critical", f"stake {st.get('stake', 0):g} VCOIN is under the "
                      "minimum: other nodes ignore this node's bids",
                      float(st.get("stake", 0)))]  # fmt: skip


def oracle_price_anomaly(s: Snapshot, t: Thresholds) -> list[Condition]:
    seen: dict[str, Condition] = {}
    for symbol, kind, detail in s.price_anomalies:
        sev = "critical" if kind == "manipulation" else "warning"
        if symbol not in seen or sev == "critical":
            seen[symbol] = Condition(symbol, sev, f"{symbol}: {kind} ({detail})")
    return list(seen.values())


def oracle_sentiment_swing(s: Snapshot, t: Thresholds) -> list[Condition]:
    if s.sentiment is None:
        return []
    before, now = s.sentiment
    if abs(now - before) < t.sentiment_swing:
        return []
    return [Condition("sentiment", "warning", f"news sentiment moved {before:+.2f} -> "
                      f"{now:+.2f}", now - before)]  # fmt: skip


def sla_breach(s: Snapshot, t: Thresholds) -> list[Condition]:
    out = []
    for customer, broken, near in s.sla:
        if broken:
            msg = f"SLA of {customer} violated: {', '.join(broken)}"
            out.append(Condition(customer, "critical", msg))
        elif near:
            msg = f"SLA of {customer} close to a breach: {', '.join(near)}"
            out.append(Condition(customer, "warning", msg))
    return out


RULES: dict[str, Rule] = {
    "sla_breach": sla_breach,
    "peer_offline": peer_offline,
    "gpu_temperature": gpu_temperature,
    "memory_pressure": memory_pressure,
    "error_rate": error_rate,
    "consensus_disagreement": consensus_disagreement,
    "stake_low": stake_low,
    "oracle_price_anomaly": oracle_price_anomaly,
    "oracle_sentiment_swing": oracle_sentiment_swing,
}


@dataclass
class Alert:
    rule: str
    subject: str
    severity: str
    message: str
    value: float | None
    started_at: float
    last_seen: float
    resolved_at: float | None = None
    id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{self.rule}:{self.subject}:{int(self.started_at * 1000)}"

    def view(self) -> dict[str, Any]:
        return {**asdict(self), "active": self.resolved_at is None}


Listener = Callable[[str, Alert], None]  # (event: fired | escalated | resolved, alert)


class AlertEngine:
    def __init__(
        self,
        thresholds: Thresholds | None = None,
        rules: dict[str, Rule] | None = None,
        *,
        history: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.thresholds = thresholds or Thresholds()
        self.rules = dict(RULES if rules is None else rules)
        self.active: dict[tuple[str, str], Alert] = {}
        self.recent: list[Alert] = []  # resolved ones, newest last
        self._history = history
        self.listeners: list[Listener] = []
        self.clock = clock

    def evaluate(self, snap: Snapshot) -> list[tuple[str, Alert]]:
        """Apply every rule; returns (and tells the listeners) what changed."""
        events: list[tuple[str, Alert]] = []
        holding: set[tuple[str, str]] = set()
        for name, rule in self.rules.items():
            for c in rule(snap, self.thresholds):
                key = (name, c.subject)
                holding.add(key)
                a = self.active.get(key)
                if a is None:
                    a = self.active[key] = Alert(name, c.subject, c.severity, c.message,
                                                 c.value, snap.now, snap.now)  # fmt: skip
                    events.append(("fired", a))
                    continue
                a.last_seen, a.message, a.value = snap.now, c.message, c.value
                if SEVERITIES.index(c.severity) > SEVERITIES.index(a.severity):
                    a.severity = c.severity
                    events.append(("escalated", a))
        for key in [k for k in self.active if k not in holding]:
            a = self.active.pop(key)
            a.resolved_at = snap.now
            self.recent.append(a)
            events.append(("resolved", a))
        del self.recent[: -self._history]
        for event, a in events:
            for listen in self.listeners:
                listen(event, a)
        return events

    def list(self, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        act = sorted(self.active.values(), key=lambda a: -a.started_at)
        rows = act if active_only else act + self.recent[::-1]
        return [a.view() for a in rows[:limit]]
