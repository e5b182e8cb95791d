"""SQLite store (WAL) under the data dir, with versioned migrations.

One connection, used from worker threads one call at a time (a CapacityLimiter
of 1), so the trio thread never blocks on disk.
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

T = TypeVar("T")


class StoreError(Exception):
    """The database could not be opened or migrated."""


# Each entry migrates from version i to i + 1. Never edit a released entry: append.
MIGRATIONS: tuple[str, ...] = (
    # 1: peers (the seed's `nodes` table, keyed by libp2p peer id)
    """
    CREATE TABLE peers (
        peer_id          TEXT PRIMARY KEY,
        eth_address      TEXT NOT NULL,
        addrs            TEXT NOT NULL DEFAULT '[]',
        gpu_model        TEXT NOT NULL DEFAULT '',
        gpu_memory       INTEGER NOT NULL DEFAULT 0,
        cuda_version     TEXT NOT NULL DEFAULT '',
        reputation_score REAL NOT NULL DEFAULT 100,
        staked_amount    INTEGER NOT NULL DEFAULT 0,
        health_score     REAL NOT NULL DEFAULT 0,
        software         TEXT NOT NULL DEFAULT '',
        status           TEXT NOT NULL CHECK (status IN ('online', 'offline')),
        last_heartbeat   REAL,
        created_at       REAL NOT NULL
    );
    CREATE INDEX peers_status ON peers(status);
    """,
)


@contextlib.contextmanager
def _transaction(c: sqlite3.Connection) -> Iterator[None]:
    c.execute("BEGIN")
    try:
        yield
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")


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


def _migrate(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise StoreError(
            f"database schema version {version} is newer than this vcoind "
            f"({len(MIGRATIONS)}); upgrade vcoind"
        )
    for i in range(version, len(MIGRATIONS)):
        # One transaction per step: a crash leaves the schema at a consistent version.
        try:
            conn.executescript(f"BEGIN; {MIGRATIONS[i]}; PRAGMA user_version = {i + 1}; COMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def open_db(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        _migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    conn.row_factory = sqlite3.Row
    return conn


class Store:
    """Async facade over one SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def open(self) -> None:
        self._conn = await trio.to_thread.run_sync(open_db, self.path)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError("store is closed")
        return await trio.to_thread.run_sync(fn, conn, limiter=self._limiter)

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
