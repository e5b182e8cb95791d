"""SLAs: terms per customer, violations with evidence, peers' downtime, task facts."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from vcoind.store.core import Store


class SLAStore:
    """SLA terms, violations, peer downtime and the task facts compliance needs."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def put_terms(self, t: Any) -> None:
        """Create or replace a customer's terms (``vcoind.ops.sla.SLATerms``)."""
        await self._store._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO slas (customer, uptime_pct, max_latency_s, "
            "min_throughput_day, price, penalty_rate, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (t.customer, t.uptime_pct, t.max_latency_s, t.min_throughput_per_day, t.price,
             t.penalty_rate, time.time()),
        ))  # fmt: skip

    async def terms(self, customer: str | None = None) -> list[tuple[Any, ...]]:
        """(customer, uptime_pct, max_latency_s, min_throughput_day, price, penalty_rate)."""

        def q(c: sqlite3.Connection) -> list[tuple[Any, ...]]:
            sql = ("SELECT customer, uptime_pct, max_latency_s, min_throughput_day, price, "
                   "penalty_rate FROM slas")  # fmt: skip
            if customer is not None:
                return [tuple(r) for r in c.execute(sql + " WHERE customer=?", (customer,))]
            return [tuple(r) for r in c.execute(sql + " ORDER BY customer")]

        return await self._store._run(q)

    async def task_facts(self, customer: str, since: float) -> dict[str, Any]:
        """Latencies of completed tasks, counts, and the nodes that ran them."""

        def q(c: sqlite3.Connection) -> dict[str, Any]:
            rows = c.execute(
                "SELECT status, created_at, completed_at, node_id FROM tasks "
                "WHERE customer=? AND created_at >= ?", (customer, since),
            ).fetchall()  # fmt: skip
            done = [r for r in rows if r[0] == "completed" and r[2] is not None]
            nodes = sorted({n for r in done for n in (r[3] or "").split(",") if n})
            return {"submitted": len(rows), "completed": len(done),
                    "latencies": [r[2] - r[1] for r in done], "nodes": nodes}  # fmt: skip

        return await self._store._run(q)

    async def add_violation(self, key: str, customer: str, v: Any) -> bool:
        """Record a violation once per ``key``; whether it is new."""

        def q(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO sla_violations (key, customer, kind, measured, target, "
                "penalty, evidence, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, customer, v.kind, v.measured, v.target, v.penalty,
                 json.dumps(v.evidence), time.time()),
            )  # fmt: skip
            return cur.rowcount == 1

        return await self._store._run(q)

    async def violations(self, customer: str | None, limit: int) -> list[dict[str, Any]]:
        def q(c: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = ("SELECT customer, kind, measured, target, penalty, evidence, created_at "
                   "FROM sla_violations")  # fmt: skip
            args: tuple[Any, ...] = ()
            if customer is not None:
                sql, args = sql + " WHERE customer=?", (customer,)
            rows = c.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
            return [{"customer": r[0], "kind": r[1], "measured": r[2], "target": r[3],
                     "penalty": r[4], "evidence": json.loads(r[5]), "created_at": r[6]}
                    for r in rows]  # fmt: skip

        return await self._store._run(q)

    async def in_violation(self, customer: str, since: float) -> float:
        """The penalty rate in force for ``customer``: theirs if a violation was recorded
        since ``since``, else 0."""

        def q(c: sqlite3.Connection) -> float:
            hit = c.execute("SELECT 1 FROM sla_violations WHERE customer=? AND created_at >= ?",
                            (customer, since)).fetchone()  # fmt: skip
            if hit is None:
                return 0.0
            row = c.execute("SELECT penalty_rate FROM slas WHERE customer=?", (customer,))
            r = row.fetchone()
            return float(r[0]) if r else 0.0

        return await self._store._run(q)

    async def peer_down(self, peer_id: str, start: float) -> None:
        await self._store._run(lambda c: c.execute(
            "INSERT INTO peer_downtime (peer_id, start, end) VALUES (?, ?, NULL)",
            (peer_id, start)))  # fmt: skip

    async def peer_up(self, peer_id: str, end: float) -> None:
        sql = "UPDATE peer_downtime SET end=? WHERE peer_id=? AND end IS NULL"
        await self._store._run(lambda c: c.execute(sql, (end, peer_id)))

    async def downtime(self, peers: list[str], since: float
                       ) -> dict[str, list[tuple[float, float | None]]]:  # fmt: skip
        def q(c: sqlite3.Connection) -> dict[str, list[tuple[float, float | None]]]:
            out: dict[str, list[tuple[float, float | None]]] = {p: [] for p in peers}
            for p in peers:
                for a, b in c.execute("SELECT start, end FROM peer_downtime WHERE peer_id=? "
                                      "AND (end IS NULL OR end >= ?)", (p, since)):  # fmt: skip
                    out[p].append((a, b))
            return out

        return await self._store._run(q)
