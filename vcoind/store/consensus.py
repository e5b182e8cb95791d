"""Consensus: per-replica validations, reputation, and the signatures on each outcome."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vcoind.store.core import Store
from vcoind.store.tasks import TaskRow, _task_row


@dataclass(frozen=True)
class ValidationRow:
    """One replica's result checked against the agreed answer (the seed's table)."""

    task_id: str
    round: int
    validator: str  # the node that judged (the origin)
    node_id: str  # the replica
    original_result: str  # the replica's result hash (hex)
    validation_result: str  # the agreed answer's hash (hex)
    similarity_score: float
    passed: bool
    created_at: float


@dataclass(frozen=True)
class SignatureRow:
    signer: str
    eth_address: str
    result_hash: str
    decision: str
    signature: str
    created_at: float


class ConsensusStore:
    """Validations, reputation and outcome signatures."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def add_validations(self, rows: Sequence[ValidationRow]) -> None:
        values = [
            (v.task_id, v.round, v.validator, v.node_id, v.original_result,
             v.validation_result, v.similarity_score, int(v.passed), v.created_at)
            for v in rows
        ]  # fmt: skip
        if values:
            sql = "INSERT OR REPLACE INTO validations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            await self._store._run(lambda c: c.executemany(sql, values))

    async def validations(self, task_id: str) -> list[ValidationRow]:
        def q(c: sqlite3.Connection) -> list[ValidationRow]:
            rows = c.execute(
                "SELECT * FROM validations WHERE task_id=? ORDER BY round, node_id", (task_id,)
            ).fetchall()
            return [ValidationRow(**{**dict(r), "passed": bool(r["passed"])}) for r in rows]

        return await self._store._run(q)

    async def _per_peer(self, sql: str, peer_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (its ``{peers}`` an IN list of ``peer_ids``; none: no query)."""
        if not peer_ids:
            return []
        query = sql.format(peers=", ".join("?" * len(peer_ids)))
        return await self._store._run(
            lambda c: [tuple(r) for r in c.execute(query, list(peer_ids)).fetchall()]
        )

    async def track_record(self, peer_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(agreed, validations) per peer, from every validation this node recorded."""
        rows = await self._per_peer(
            "SELECT node_id, SUM(passed), COUNT(*) FROM validations "
            "WHERE node_id IN ({peers}) GROUP BY node_id",
            peer_ids,
        )
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def max_tokens_handled(self, peer_ids: Sequence[str]) -> dict[str, int]:
        """The longest task (max_new_tokens) each peer completed for this origin."""
        rows = await self._per_peer(
            "SELECT a.peer_id, MAX(json_extract(t.parameters, '$.max_new_tokens')) "
            "FROM attempts a JOIN tasks t ON t.id = a.task_id "
            "WHERE a.status = 'completed' AND a.peer_id IN ({peers}) GROUP BY a.peer_id",
            peer_ids,
        )
        return {r[0]: int(r[1] or 0) for r in rows}

    async def reputations(self, peer_ids: Sequence[str], default: float) -> dict[str, float]:
        rows = await self._per_peer(
            "SELECT peer_id, reputation_score FROM peers WHERE peer_id IN ({peers})", peer_ids
        )
        found = {r[0]: float(r[1]) for r in rows}
        return {p: found.get(p, default) for p in peer_ids}

    async def adjust_reputation(
        self, peer_id: str, update: Callable[[float], float]
    ) -> float | None:
        """Apply ``update`` to a known peer's reputation; its new value (None: unknown peer)."""

        def q(c: sqlite3.Connection) -> float | None:
            r = c.execute("SELECT reputation_score FROM peers WHERE peer_id=?", (peer_id,))
            row = r.fetchone()
            if row is None:
                return None
            new = update(float(row[0]))
            c.execute("UPDATE peers SET reputation_score=? WHERE peer_id=?", (new, peer_id))
            return new

        return await self._store._run(q)

    async def add_signature(self, task_id: str, s: SignatureRow) -> None:
        await self._store._run(lambda c: c.execute(
            "INSERT OR REPLACE INTO outcome_signatures VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task_id, s.signer, s.eth_address, s.result_hash, s.decision, s.signature,
             s.created_at)))  # fmt: skip

    async def signatures(self, task_id: str) -> list[SignatureRow]:
        return await self._store._run(lambda c: [SignatureRow(*tuple(r)[1:]) for r in c.execute(
            "SELECT * FROM outcome_signatures WHERE task_id=? ORDER BY created_at, signer",
            (task_id,)).fetchall()])  # fmt: skip

    async def consensus_tasks(
        self, limit: int, offset: int, conflicts_only: bool = False
    ) -> tuple[list[TaskRow], int]:
        """Finished consensus tasks, newest first; with ``conflicts_only`` those where the
        replicas disagreed (an outvoted replica, a recompute, or no clear decision)."""
        where = "mode='consensus' AND status IN ('completed', 'failed')"
        if conflicts_only:
            where += " AND json_extract(consensus, '$.conflict') = 1"

        def q(c: sqlite3.Connection) -> tuple[list[TaskRow], int]:
            total = c.execute(f"SELECT COUNT(*) FROM tasks WHERE {where}").fetchone()[0]
            rows = c.execute(
                f"SELECT * FROM tasks WHERE {where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            return [_task_row(r) for r in rows], int(total)

        return await self._store._run(q)
