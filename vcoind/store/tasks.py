"""Tasks (origin side), their bids and attempts, and assignments (worker side)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vcoind.store.core import Store, _transaction
from vcoind.store.schema import StoreError

T = TypeVar("T")

TASK_COLUMNS = (
    "id", "type", "model", "model_id", "input", "parameters", "priority", "timeout_s",
    "max_price", "status", "phase", "progress", "result", "node_id", "retry_count", "error",
    "timings", "created_at", "completed_at", "mode", "replicas", "consensus", "pipeline",
    "customer", "training", "payment",
)  # fmt: skip
_JSON_COLUMNS = ("parameters", "timings", "consensus", "training", "payment")
FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class TaskRow:
    id: str
    model: str
    input: str
    parameters: dict[str, Any]
    timeout_s: float
    status: str
    phase: str
    created_at: float
    type: str = "inference"
    model_id: str = ""
    priority: int = 0
    max_price: float | None = None
    progress: int = 0
    result: str | None = None
    node_id: str | None = None
    retry_count: int = 0
    error: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    completed_at: float | None = None
    mode: str = "single"  # or "consensus"
    replicas: int = 1
    consensus: dict[str, Any] = field(default_factory=dict)
    pipeline: bool = False  # consensus replicas are pipelines on disjoint routes
    customer: str = ""  # whose SLA the task counts under ("" = none)
    training: dict[str, Any] = field(default_factory=dict)  # type lora_training
    # settlement v2 (vcoind.market.payments): {"paid": bool, "reason", "ticket", "awards"}
    payment: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BidRow:
    peer_id: str
    price: float
    eta_s: float
    health: float
    queue_length: int
    tokens_per_s: float
    received_at: float


@dataclass(frozen=True)
class AttemptRow:
    attempt: int
    peer_id: str
    status: str
    error: str | None
    assigned_at: float
    finished_at: float | None


def _task_row(r: sqlite3.Row) -> TaskRow:
    d = {k: r[k] for k in TASK_COLUMNS}
    for k in _JSON_COLUMNS:
        try:
            d[k] = json.loads(d[k] or "{}")
        except ValueError:
            d[k] = {}
    d["pipeline"] = bool(d["pipeline"])
    return TaskRow(**d)


class TaskStore:
    """Task tables; shares the node's Store connection and worker thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def insert(self, t: TaskRow) -> None:
        values = [
            json.dumps(getattr(t, c)) if c in _JSON_COLUMNS else getattr(t, c) for c in TASK_COLUMNS
        ]
        sql = (
            f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(TASK_COLUMNS))})"
        )
        await self._store._run(lambda c: c.execute(sql, values))

    async def recent_outcomes(self, since: float, consensus_last: int = 20) -> dict[str, int]:
        """For the alert rules: tasks finished since ``since`` (failed of all), and
        conflicts among the last ``consensus_last`` finished consensus tasks."""

        def q(c: sqlite3.Connection) -> dict[str, int]:
            failed, done = c.execute(
                "SELECT COALESCE(SUM(status='failed'), 0), COUNT(*) FROM tasks WHERE "
                "status IN ('completed', 'failed') AND completed_at >= ?", (since,),
            ).fetchone()  # fmt: skip
            rows = c.execute(
                "SELECT consensus FROM tasks WHERE mode='consensus' AND status='completed' "
                "ORDER BY completed_at DESC LIMIT ?", (consensus_last,),
            ).fetchall()  # fmt: skip
            conflicts = sum(1 for (js,) in rows if json.loads(js or "{}").get("conflict"))
            return {"failed": int(failed), "finished": int(done), "conflicts": conflicts,
                    "consensus": len(rows)}  # fmt: skip

        return await self._store._run(q)

    async def update(self, task_id: str, **changes: Any) -> None:
        unknown = set(changes) - set(TASK_COLUMNS)
        if unknown:
            raise StoreError(f"unknown task columns {sorted(unknown)}")
        cols = list(changes)
        values = [json.dumps(changes[c]) if c in _JSON_COLUMNS else changes[c] for c in cols]
        sql = f"UPDATE tasks SET {', '.join(f'{c}=?' for c in cols)} WHERE id=?"
        await self._store._run(lambda c: c.execute(sql, [*values, task_id]))

    async def get(self, task_id: str) -> TaskRow | None:
        def q(c: sqlite3.Connection) -> TaskRow | None:
            r = c.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
            return _task_row(r) if r else None

        return await self._store._run(q)

    async def page(
        self, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[TaskRow], int]:
        """A page of tasks, newest first, and the total matching count."""

        def q(c: sqlite3.Connection) -> tuple[list[TaskRow], int]:
            where, args = ("WHERE status=?", [status]) if status else ("", [])
            total = c.execute(f"SELECT COUNT(*) FROM tasks {where}", args).fetchone()[0]
            rows = c.execute(
                f"SELECT * FROM tasks {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [_task_row(r) for r in rows], int(total)

        return await self._store._run(q)

    async def unfinished(self) -> list[TaskRow]:
        def q(c: sqlite3.Connection) -> list[TaskRow]:
            rows = c.execute(
                "SELECT * FROM tasks WHERE status NOT IN (?, ?, ?) ORDER BY created_at", FINISHED
            ).fetchall()
            return [_task_row(r) for r in rows]

        return await self._store._run(q)

    async def count_by_status(self) -> dict[str, int]:
        def q(c: sqlite3.Connection) -> dict[str, int]:
            rows = c.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
            return {r[0]: int(r[1]) for r in rows}

        return await self._store._run(q)

    async def add_bids(self, task_id: str, bids: Sequence[BidRow]) -> None:
        rows = [
            (task_id, b.peer_id, b.price, b.eta_s, b.health, b.queue_length, b.tokens_per_s,
             b.received_at)
            for b in bids
        ]  # fmt: skip

        def q(c: sqlite3.Connection) -> None:
            with _transaction(c):
                c.executemany("INSERT OR REPLACE INTO bids VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

        if rows:
            await self._store._run(q)

    async def _select(self, cls: Callable[..., T], sql: str, *args: Any) -> list[T]:
        """Rows of ``sql`` as ``cls`` records (columns in field order)."""
        return await self._store._run(
            lambda c: [cls(*tuple(r)) for r in c.execute(sql, args).fetchall()]
        )

    async def bids(self, task_id: str) -> list[BidRow]:
        return await self._select(
            BidRow,
            "SELECT peer_id, price, eta_s, health, queue_length, tokens_per_s, received_at "
            "FROM bids WHERE task_id=? ORDER BY received_at",
            task_id,
        )

    async def add_attempt(self, task_id: str, attempt: int, peer_id: str, at: float) -> None:
        await self._store._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, 'assigned', NULL, ?, NULL)",
            (task_id, attempt, peer_id, at)))  # fmt: skip

    async def finish_attempt(
        self, task_id: str, attempt: int, status: str, error: str | None, at: float
    ) -> None:
        await self._store._run(lambda c: c.execute(
            "UPDATE attempts SET status=?, error=?, finished_at=? WHERE task_id=? AND attempt=?",
            (status, error, at, task_id, attempt)))  # fmt: skip

    async def attempts(self, task_id: str) -> list[AttemptRow]:
        return await self._select(
            AttemptRow,
            "SELECT attempt, peer_id, status, error, assigned_at, finished_at FROM attempts "
            "WHERE task_id=? ORDER BY attempt",
            task_id,
        )

    async def claim_assignment(self, task_id: str, attempt: int, origin: str, at: float) -> bool:
        """Worker side: record an accepted attempt; False if it was accepted before."""
        return (await self.claim_assignments([(task_id, attempt)], origin, at))[0]

    async def claim_assignments(
        self, attempts: list[tuple[str, int]], origin: str, at: float
    ) -> list[bool]:
        """``claim_assignment`` for several (task id, attempt) in one transaction."""

        def q(c: sqlite3.Connection) -> list[bool]:
            return [
                c.execute("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, 'running', ?)",
                          (task_id, attempt, origin, at)).rowcount == 1
                for task_id, attempt in attempts
            ]  # fmt: skip

        return await self._store._run(q)

    async def finish_assignment(self, task_id: str, attempt: int, status: str) -> None:
        await self._store._run(lambda c: c.execute(
            "UPDATE assignments SET status=? WHERE task_id=? AND attempt=?",
            (status, task_id, attempt)))  # fmt: skip
