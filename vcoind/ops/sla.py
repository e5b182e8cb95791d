"""SLA compliance (the seed's SLAManager), as pure functions of a customer's terms and
facts over a window (default the last 24 hours):

* **uptime**: of every node that ran the customer's tasks in the window, the share of the
  window it was up; a node is down from its last heartbeat until its next when it was
  silent longer than the peer timeout (the peer table's expiry). The SLA's figure is the
  worst node's.
* **latency**: p95 (nearest rank) of submit-to-completion times of the customer's
  completed tasks.
* **throughput**: completed tasks per day. Missing the minimum is a violation only when
  the customer asked for at least that many (low demand is not the provider's fault).

Each unmet term is a violation; its penalty is ``price * penalty_rate``. A term within 10 %
of its limit is "breach imminent".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

IMMINENT = 0.1  # within 10 % of a limit


@dataclass(frozen=True)
class SLATerms:
    customer: str
    uptime_pct: float = 99.9
    max_latency_s: float = 5.0
    min_throughput_per_day: float = 0.0
    price: float = 0.0
    penalty_rate: float = 0.10

    def __post_init__(self) -> None:
        if not self.customer or len(self.customer) > 64:
            raise ValueError("customer: 1 to 64 characters")
        if not 0 < self.uptime_pct <= 100:
            raise ValueError("uptime: a percentage in (0, 100]")
        if self.max_latency_s <= 0 or self.min_throughput_per_day < 0 or self.price < 0:
            raise ValueError("max latency must be > 0; throughput and price >= 0")
        if not 0 <= self.penalty_rate <= 1:
            raise ValueError("penalty: a rate in [0, 1] (10 % = 0.1)")


def merged(intervals: Sequence[tuple[float, float | None]], start: float, end: float
           ) -> list[tuple[float, float]]:  # fmt: skip
    """Intervals clipped to [start, end] and merged; an open interval runs to ``end``."""
    clipped = sorted((max(a, start), min(b if b is not None else end, end))
                     for a, b in intervals)  # fmt: skip
    out: list[tuple[float, float]] = []
    for a, b in clipped:
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def uptime(down: Sequence[tuple[float, float | None]], start: float, end: float) -> float:
    """Share of [start, end] not covered by the down intervals."""
    span = end - start
    if span <= 0:
        return 1.0
    return 1.0 - sum(b - a for a, b in merged(down, start, end)) / span


def p95(xs: Sequence[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


@dataclass(frozen=True)
class Violation:
    kind: str  # uptime | latency | throughput
    measured: float
    target: float
    penalty: float
    evidence: dict[str, Any]


def evaluate(
    terms: SLATerms,
    *,
    now: float,
    window_s: float,
    latencies: Sequence[float],
    submitted: int,
    completed: int,
    downtime: Mapping[str, Sequence[tuple[float, float | None]]],
) -> tuple[dict[str, Any], list[Violation]]:
    """The customer's status over ``[now - window_s, now]`` and the terms it breaks."""
    start = now - window_s
    days = window_s / 86400
    per_node = {n: uptime(d, start, now) for n, d in downtime.items()}
    worst = min(per_node.items(), key=lambda kv: kv[1]) if per_node else None
    up_pct = 100.0 * (worst[1] if worst else 1.0)
    lat = p95(latencies)
    tput = completed / days if days > 0 else 0.0
    penalty = round(terms.price * terms.penalty_rate, 9)
    violations: list[Violation] = []
    imminent: list[str] = []
    if worst and up_pct < terms.uptime_pct:
        down = merged(downtime[worst[0]], start, now)
        violations.append(Violation("uptime", round(up_pct, 4), terms.uptime_pct, penalty,
                                    {"node": worst[0], "down": down}))  # fmt: skip
    elif worst and up_pct - terms.uptime_pct < IMMINENT * (100 - terms.uptime_pct):
        imminent.append("uptime")
    if lat is not None and lat > terms.max_latency_s:
        slow = sorted(latencies)[-5:]
        violations.append(Violation("latency", round(lat, 4), terms.max_latency_s, penalty,
                                    {"p95_s": lat, "slowest_s": slow,
                                     "tasks": len(latencies)}))  # fmt: skip
    elif lat is not None and lat > (1 - IMMINENT) * terms.max_latency_s:
        imminent.append("latency")
    need = terms.min_throughput_per_day
    if need and tput < need and submitted / days >= need:
        violations.append(Violation("throughput", round(tput, 3), need, penalty,
                                    {"submitted": submitted, "completed": completed,
                                     "window_days": days}))  # fmt: skip
    elif need and submitted / days >= need and tput < (1 + IMMINENT) * need:
        imminent.append("throughput")
    status = {
        "customer": terms.customer,
        "window_s": window_s,
        "uptime_pct": round(up_pct, 4),
        "uptime_by_node": {n: round(100 * u, 4) for n, u in per_node.items()},
        "p95_latency_s": None if lat is None else round(lat, 4),
        "throughput_per_day": round(tput, 3),
        "submitted": submitted,
        "completed": completed,
        "compliant": not violations,
        "violations": [v.kind for v in violations],
        "breach_imminent": imminent,
        "terms": {"uptime_pct": terms.uptime_pct, "max_latency_s": terms.max_latency_s,
                  "min_throughput_per_day": need, "price": terms.price,
                  "penalty_rate": terms.penalty_rate},
    }  # fmt: skip
    return status, violations
