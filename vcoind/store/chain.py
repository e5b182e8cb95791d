"""The chain write queue (survives restarts and outages) and the rewards log."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vcoind.store.core import Store


@dataclass(frozen=True)
class ChainOp:
    """One queued chain write. ``raw_tx`` is stored before it is broadcast, so a retry (or
    a restart) sends the very same transaction again and it can never execute twice."""

    id: int
    kind: str
    key: str | None
    payload: dict[str, Any]
    status: str  # pending | done | failed
    attempts: int  # tries so far
    failures: int  # tries that failed for another reason than the chain being unreachable
    next_at: float
    raw_tx: str | None
    tx_hash: str | None
    block: int | None
    result: dict[str, Any]
    error: str | None
    created_at: float
    updated_at: float


def _chain_op(r: sqlite3.Row) -> ChainOp:
    d = dict(r)
    d["payload"] = json.loads(d["payload"])
    d["result"] = json.loads(d["result"])
    return ChainOp(**d)


@dataclass(frozen=True)
class RewardRow:
    task_id: str
    node: str  # eth address
    amount: int  # wei
    tx_hash: str
    block: int
    created_at: float


class ChainStore:
    """The chain write queue and the rewards log."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def enqueue(self, kind: str, payload: dict[str, Any], key: str | None = None) -> int:
        """Queue a write; with ``key``, at most one op per key (the existing one's id)."""

        def q(c: sqlite3.Connection) -> int:
            if key is not None:
                row = c.execute("SELECT id FROM chain_ops WHERE key=?", (key,)).fetchone()
                if row is not None:
                    return int(row[0])
            now = time.time()
            cur = c.execute(
                "INSERT INTO chain_ops (kind, key, payload, status, next_at, created_at, "
                "updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                (kind, key, json.dumps(payload), now, now, now),
            )
            return int(cur.lastrowid or 0)

        return await self._store._run(q)

    async def get(self, op_id: int) -> ChainOp | None:
        def q(c: sqlite3.Connection) -> ChainOp | None:
            r = c.execute("SELECT * FROM chain_ops WHERE id=?", (op_id,)).fetchone()
            return _chain_op(r) if r else None

        return await self._store._run(q)

    async def by_key(self, key: str) -> ChainOp | None:
        def q(c: sqlite3.Connection) -> ChainOp | None:
            r = c.execute("SELECT * FROM chain_ops WHERE key=?", (key,)).fetchone()
            return _chain_op(r) if r else None

        return await self._store._run(q)

    async def with_key_prefix(self, prefix: str) -> list[ChainOp]:
        """Ops whose key starts with ``prefix`` (e.g. a task's slashes), oldest first."""

        def q(c: sqlite3.Connection) -> list[ChainOp]:
            like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = c.execute("SELECT * FROM chain_ops WHERE key LIKE ? ESCAPE '\\' ORDER BY id",
                             (like + "%",)).fetchall()  # fmt: skip
            return [_chain_op(r) for r in rows]

        return await self._store._run(q)

    async def next_pending(self) -> ChainOp | None:
        """The oldest pending op (writes go out in order: nonces are sequential)."""

        def q(c: sqlite3.Connection) -> ChainOp | None:
            r = c.execute(
                "SELECT * FROM chain_ops WHERE status='pending' ORDER BY id LIMIT 1"
            ).fetchone()
            return _chain_op(r) if r else None

        return await self._store._run(q)

    async def update(self, op_id: int, **changes: Any) -> None:
        for k in ("payload", "result"):
            if k in changes:
                changes[k] = json.dumps(changes[k])
        changes["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in changes)
        await self._store._run(lambda c: c.execute(
            f"UPDATE chain_ops SET {cols} WHERE id=?", (*changes.values(), op_id)))  # fmt: skip

    async def counts(self) -> dict[str, int]:
        return await self._store._run(lambda c: {r[0]: int(r[1]) for r in c.execute(
            "SELECT status, COUNT(*) FROM chain_ops GROUP BY status").fetchall()})  # fmt: skip

    async def recent(self, limit: int) -> list[ChainOp]:
        return await self._store._run(lambda c: [_chain_op(r) for r in c.execute(
            "SELECT * FROM chain_ops ORDER BY id DESC LIMIT ?", (limit,)).fetchall()])  # fmt: skip

    async def add_rewards(self, rows: Sequence[RewardRow]) -> None:
        values = [(r.task_id, r.node, str(r.amount), r.tx_hash, r.block, r.created_at)
                  for r in rows]  # fmt: skip
        if values:
            sql = "INSERT OR REPLACE INTO rewards VALUES (?, ?, ?, ?, ?, ?)"
            await self._store._run(lambda c: c.executemany(sql, values))

    async def rewards(self, node: str | None = None, limit: int = 100) -> list[RewardRow]:
        def q(c: sqlite3.Connection) -> list[RewardRow]:
            where, args = ("WHERE lower(node)=lower(?)", [node]) if node else ("", [])
            rows = c.execute(
                f"SELECT * FROM rewards {where} ORDER BY block DESC, task_id LIMIT ?",
                (*args, limit),
            ).fetchall()
            return [RewardRow(**{**dict(r), "amount": int(r["amount"])}) for r in rows]

        return await self._store._run(q)
