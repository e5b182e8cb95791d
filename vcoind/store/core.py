"""The Store: the async facade over the one SQLite connection, and the peers table.

One connection, used from a worker thread one call at a time (a CapacityLimiter
of 1), so the trio thread never blocks on disk (a test store may run inline: see
``Store``). Each call is one transaction: a failing call rolls back only its own
changes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from vcoind.store.schema import StoreError, open_db

T = TypeVar("T")


@contextlib.contextmanager
def _transaction(c: sqlite3.Connection) -> Iterator[None]:
    """All-or-nothing; nests (a savepoint)."""
    c.execute("SAVEPOINT tx")
    try:
        yield
    except BaseException:
        c.execute("ROLLBACK TO tx")
        c.execute("RELEASE tx")
        raise
    c.execute("RELEASE tx")


def _atomic(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    with _transaction(conn):
        return fn(conn)


@dataclass(frozen=True)
class PeerUpdate:
    """What a heartbeat tells the store about a peer."""

    peer_id: str
    eth_address: str
    addrs: tuple[str, ...]
    gpu_model: str
    gpu_memory: int
    cuda_version: str
    health_score: float
    software: str
    seen_at: float


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    eth_address: str
    addrs: tuple[str, ...]
    gpu_model: str
    gpu_memory: int
    cuda_version: str
    reputation_score: float
    staked_amount: int
    health_score: float
    software: str
    status: str
    last_heartbeat: float | None
    created_at: float


class Store:
    """Async facade over one SQLite connection.

    ``inline=True`` runs every query on the calling trio thread (after a checkpoint)
    instead of a worker thread. It is for in-memory or test stores under trio's
    ``MockClock``: with ``autojump_threshold=0`` the clock jumps whenever the trio loop
    is idle, a query in a worker thread included, so timeouts would fire in the middle
    of a write. It blocks the loop for the length of each query: never for a node's store.
    """

    def __init__(self, path: Path, *, inline: bool = False) -> None:
        self.path = path
        self.inline = inline
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        if self.inline:
            await trio.lowlevel.checkpoint()
            self._conn = open_db(self.path)
        else:
            self._conn = await trio.to_thread.run_sync(open_db, self.path)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self.inline:
                conn.close()
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(conn.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self.inline:
            await trio.lowlevel.checkpoint()  # a query is a checkpoint, as off-thread
        conn = self._conn
        if conn is None:
            raise StoreError("store is closed")
        if self.inline:
            return _atomic(conn, fn)
        return await trio.to_thread.run_sync(_atomic, conn, fn, limiter=self._limiter)

    async def schema_version(self) -> int:
        def q(c: sqlite3.Connection) -> int:
            return int(c.execute("PRAGMA user_version").fetchone()[0])

        return await self._run(q)

    async def upsert_peers(self, updates: Sequence[PeerUpdate]) -> None:
        """Record heartbeats (one transaction for the batch); the peers become online."""
        now = time.time()
        rows = [
            (
                u.peer_id,
                u.eth_address,
                json.dumps(list(u.addrs)),
                u.gpu_model,
                u.gpu_memory,
                u.cuda_version,
                u.health_score,
                u.software,
                u.seen_at,
                now,
            )
            for u in updates
        ]

        def q(c: sqlite3.Connection) -> None:
            with _transaction(c):
                c.executemany(
                    """INSERT INTO peers (peer_id, eth_address, addrs, gpu_model, gpu_memory,
                           cuda_version, health_score, software, status, last_heartbeat,
                           created_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'online', ?, ?)
                       ON CONFLICT(peer_id) DO UPDATE SET
                           eth_address=excluded.eth_address, addrs=excluded.addrs,
                           gpu_model=excluded.gpu_model, gpu_memory=excluded.gpu_memory,
                           cuda_version=excluded.cuda_version,
                           health_score=excluded.health_score, software=excluded.software,
                           status='online', last_heartbeat=excluded.last_heartbeat""",
                    rows,
                )

        if rows:
            await self._run(q)

    async def mark_offline(self, peer_id: str) -> None:
        await self._run(
            lambda c: c.execute("UPDATE peers SET status='offline' WHERE peer_id=?", (peer_id,))
        )

    async def mark_all_offline(self) -> None:
        await self._run(lambda c: c.execute("UPDATE peers SET status='offline'"))

    async def list_peers(self, status: str | None = None) -> list[PeerRow]:
        def q(c: sqlite3.Connection) -> list[PeerRow]:
            sql = "SELECT * FROM peers"
            args: tuple[Any, ...] = ()
            if status is not None:
                sql += " WHERE status=?"
                args = (status,)
            rows = c.execute(sql + " ORDER BY peer_id", args).fetchall()
            return [_peer_row(r) for r in rows]

        return await self._run(q)


def _peer_row(r: sqlite3.Row) -> PeerRow:
    try:
        addrs = tuple(str(a) for a in json.loads(r["addrs"]))
    except (ValueError, TypeError):
        addrs = ()
    return PeerRow(
        peer_id=r["peer_id"],
        eth_address=r["eth_address"],
        addrs=addrs,
        gpu_model=r["gpu_model"],
        gpu_memory=r["gpu_memory"],
        cuda_version=r["cuda_version"],
        reputation_score=r["reputation_score"],
        staked_amount=r["staked_amount"],
        health_score=r["health_score"],
        software=r["software"],
        status=r["status"],
        last_heartbeat=r["last_heartbeat"],
        created_at=r["created_at"],
    )
