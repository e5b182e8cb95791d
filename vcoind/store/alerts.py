"""Alerts: fired, escalated, resolved."""

from __future__ import annotations

import sqlite3
from typing import Any

from vcoind.store.core import Store


class AlertStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(self, a: Any) -> None:
        """Insert or update an alert (``vcoind.ops.alerts.Alert``)."""

        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO alerts (id, rule, subject, severity, message, started_at, "
                "resolved_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "severity=excluded.severity, message=excluded.message, "
                "resolved_at=excluded.resolved_at",
                (a.id, a.rule, a.subject, a.severity, a.message, a.started_at, a.resolved_at),
            )

        await self._store._run(q)

    async def count(self) -> int:
        def q(c: sqlite3.Connection) -> int:
            return int(c.execute("SELECT COUNT(*) FROM alerts").fetchone()[0])

        return await self._store._run(q)
