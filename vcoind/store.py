"""SQLite store (WAL) under the data dir, with versioned migrations.

One connection, used from a worker thread one call at a time (a CapacityLimiter
of 1), so the trio thread never blocks on disk. Each call is one transaction: a
failing call rolls back only its own changes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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
    # 2: tasks at their origin (the seed's `tasks` columns), their bids and attempts;
    #    assignments a worker accepted (so it never runs one attempt twice).
    """
    CREATE TABLE tasks (
        id            TEXT PRIMARY KEY,
        type          TEXT NOT NULL DEFAULT 'inference',
        model         TEXT NOT NULL,
        model_id      TEXT NOT NULL DEFAULT '',
        input         TEXT NOT NULL,
        parameters    TEXT NOT NULL DEFAULT '{}',
        priority      INTEGER NOT NULL DEFAULT 0,
        timeout_s     REAL NOT NULL,
        max_price     REAL,
        status        TEXT NOT NULL,
        phase         TEXT NOT NULL,
        progress      INTEGER NOT NULL DEFAULT 0,
        result        TEXT,
        node_id       TEXT,
        retry_count   INTEGER NOT NULL DEFAULT 0,
        error         TEXT,
        timings       TEXT NOT NULL DEFAULT '{}',
        created_at    REAL NOT NULL,
        completed_at  REAL
    );
    CREATE INDEX tasks_status ON tasks(status, created_at);
    CREATE TABLE bids (
        task_id       TEXT NOT NULL REFERENCES tasks(id),
        peer_id       TEXT NOT NULL,
        price         REAL NOT NULL,
        eta_s         REAL NOT NULL,
        health        REAL NOT NULL,
        queue_length  INTEGER NOT NULL,
        tokens_per_s  REAL NOT NULL,
        received_at   REAL NOT NULL,
        PRIMARY KEY (task_id, peer_id)
    );
    CREATE TABLE attempts (
        task_id       TEXT NOT NULL REFERENCES tasks(id),
        attempt       INTEGER NOT NULL,
        peer_id       TEXT NOT NULL,
        status        TEXT NOT NULL,
        error         TEXT,
        assigned_at   REAL NOT NULL,
        finished_at   REAL,
        PRIMARY KEY (task_id, attempt)
    );
    CREATE TABLE assignments (
        task_id       TEXT NOT NULL,
        attempt       INTEGER NOT NULL,
        origin        TEXT NOT NULL,
        status        TEXT NOT NULL,
        created_at    REAL NOT NULL,
        PRIMARY KEY (task_id, attempt)
    );
    """,
    # 3: consensus — replicated tasks, per-replica validations (the seed's table), the
    # signatures collected on each outcome.
    """
    ALTER TABLE tasks ADD COLUMN mode TEXT NOT NULL DEFAULT 'single';
    ALTER TABLE tasks ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN consensus TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE validations (
        task_id           TEXT NOT NULL,
        round             INTEGER NOT NULL,
        validator         TEXT NOT NULL,
        node_id           TEXT NOT NULL,
        original_result   TEXT NOT NULL,
        validation_result TEXT NOT NULL,
        similarity_score  REAL NOT NULL,
        passed            INTEGER NOT NULL,
        created_at        REAL NOT NULL,
        PRIMARY KEY (task_id, round, validator, node_id)
    );
    CREATE INDEX validations_node ON validations(node_id);
    CREATE TABLE outcome_signatures (
        task_id      TEXT NOT NULL,
        signer       TEXT NOT NULL,
        eth_address  TEXT NOT NULL,
        result_hash  TEXT NOT NULL,
        decision     TEXT NOT NULL,
        signature    TEXT NOT NULL,
        created_at   REAL NOT NULL,
        PRIMARY KEY (task_id, signer)
    );
    """,
    # 4: chain writes waiting or done (a queue that survives restarts and outages), and the
    # rewards minted by this node's anchors (the seed's reward log).
    """
    CREATE TABLE chain_ops (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        TEXT NOT NULL,
        key         TEXT UNIQUE,
        payload     TEXT NOT NULL DEFAULT '{}',
        status      TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
        attempts    INTEGER NOT NULL DEFAULT 0,
        failures    INTEGER NOT NULL DEFAULT 0,
        next_at     REAL NOT NULL,
        raw_tx      TEXT,
        tx_hash     TEXT,
        block       INTEGER,
        result      TEXT NOT NULL DEFAULT '{}',
        error       TEXT,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX chain_ops_pending ON chain_ops(status, id);
    CREATE TABLE rewards (
        task_id     TEXT NOT NULL,
        node        TEXT NOT NULL,
        amount      TEXT NOT NULL,
        tx_hash     TEXT NOT NULL,
        block       INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (task_id, node)
    );
    """,
    # 5: a consensus task whose replicas are pipelines (each over its own route).
    """
    ALTER TABLE tasks ADD COLUMN pipeline INTEGER NOT NULL DEFAULT 0;
    """,
    # 6: the AI oracle's market data and price analyses (the seed's tables).
    """
    CREATE TABLE market_data (
        symbol      TEXT NOT NULL,
        ts          REAL NOT NULL,
        price       REAL NOT NULL,
        volume      REAL,
        market_cap  REAL,
        source      TEXT NOT NULL,
        fetched_at  REAL NOT NULL,
        PRIMARY KEY (symbol, source, ts)
    );
    CREATE TABLE price_analysis (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        symbol      TEXT NOT NULL,
        timeframe   TEXT NOT NULL,
        created_at  REAL NOT NULL,
        result      TEXT NOT NULL
    );
    CREATE INDEX price_analysis_symbol ON price_analysis(symbol, timeframe, created_at);
    """,
    # 7: the oracle's news and sentiment (the seed's tables).
    """
    CREATE TABLE news_data (
        key          TEXT PRIMARY KEY,
        source       TEXT NOT NULL,
        title        TEXT NOT NULL,
        body         TEXT NOT NULL,
        url          TEXT NOT NULL,
        published_at REAL NOT NULL,
        fetched_at   REAL NOT NULL
    );
    CREATE INDEX news_data_published ON news_data(published_at);
    CREATE TABLE sentiment_scores (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        range       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        score       REAL NOT NULL,
        confidence  REAL NOT NULL,
        volatility  REAL NOT NULL,
        articles    INTEGER NOT NULL,
        result      TEXT NOT NULL
    );
    """,
    # 8: alerts (fired, escalated, resolved).
    """
    CREATE TABLE alerts (
        id           TEXT PRIMARY KEY,
        rule         TEXT NOT NULL,
        subject      TEXT NOT NULL,
        severity     TEXT NOT NULL,
        message      TEXT NOT NULL,
        started_at   REAL NOT NULL,
        resolved_at  REAL
    );
    CREATE INDEX alerts_started ON alerts(started_at);
    """,
    # 9: SLAs (the seed's SLA manager): terms per customer, violations with evidence,
    # peers' downtime intervals (from heartbeat gaps), and each task's customer.
    """
    ALTER TABLE tasks ADD COLUMN customer TEXT NOT NULL DEFAULT '';
    CREATE INDEX tasks_customer ON tasks(customer, created_at);
    CREATE TABLE slas (
        customer            TEXT PRIMARY KEY,
        uptime_pct          REAL NOT NULL,
        max_latency_s       REAL NOT NULL,
        min_throughput_day  REAL NOT NULL,
        price               REAL NOT NULL,
        penalty_rate        REAL NOT NULL,
        created_at          REAL NOT NULL
    );
    CREATE TABLE sla_violations (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        key         TEXT UNIQUE NOT NULL,
        customer    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        measured    REAL NOT NULL,
        target      REAL NOT NULL,
        penalty     REAL NOT NULL,
        evidence    TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    CREATE TABLE peer_downtime (
        peer_id  TEXT NOT NULL,
        start    REAL NOT NULL,
        end      REAL
    );
    CREATE INDEX peer_downtime_peer ON peer_downtime(peer_id, start);
    """,
    # 10: LoRA training tasks (type 'lora_training'): shards, nodes, rounds, the adapter.
    """
    ALTER TABLE tasks ADD COLUMN training TEXT NOT NULL DEFAULT '{}';
    """,
)


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


# --- tasks (origin side) and assignments (worker side) -------------------------

TASK_COLUMNS = (
    "id", "type", "model", "model_id", "input", "parameters", "priority", "timeout_s",
    "max_price", "status", "phase", "progress", "result", "node_id", "retry_count", "error",
    "timings", "created_at", "completed_at", "mode", "replicas", "consensus", "pipeline",
    "customer", "training",
)  # fmt: skip
_JSON_COLUMNS = ("parameters", "timings", "consensus", "training")
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

        def q(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, 'running', ?)",
                (task_id, attempt, origin, at),
            )
            return cur.rowcount == 1

        return await self._store._run(q)

    async def finish_assignment(self, task_id: str, attempt: int, status: str) -> None:
        await self._store._run(lambda c: c.execute(
            "UPDATE assignments SET status=? WHERE task_id=? AND attempt=?",
            (status, task_id, attempt)))  # fmt: skip


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


class OracleStore:
    """The oracle's market data (the last good data, served when a source is down) and
    its price analyses."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def add_points(
        self, symbol: str, source: str, points: list[tuple[float, float, float | None]],
        market_cap: float | None = None,
    ) -> None:  # fmt: skip
        """(ts, price, volume) rows; a point already stored is replaced."""
        now = time.time()

        def q(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT OR REPLACE INTO market_data (symbol, ts, price, volume, market_cap, "
                "source, fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(symbol, ts, p, v, market_cap, source, now) for ts, p, v in points],
            )

        await self._store._run(q)

    async def points(
        self, symbol: str, source: str, span_s: float
    ) -> list[tuple[float, float, float | None, float]]:
        """(ts, price, volume, fetched_at) of the last ``span_s`` seconds of stored data
        (however old that is), oldest first."""

        def q(c: sqlite3.Connection) -> list[tuple[float, float, float | None, float]]:
            rows = c.execute(
                "SELECT ts, price, volume, fetched_at FROM market_data WHERE symbol=? AND "
                "source=? AND ts >= (SELECT MAX(ts) FROM market_data WHERE symbol=? AND "
                "source=?) - ? ORDER BY ts", (symbol, source, symbol, source, span_s),
            ).fetchall()  # fmt: skip
            return [(r[0], r[1], r[2], r[3]) for r in rows]

        return await self._store._run(q)

    async def add_analysis(self, symbol: str, timeframe: str, result: dict[str, Any]) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO price_analysis (symbol, timeframe, created_at, result) "
                "VALUES (?, ?, ?, ?)", (symbol, timeframe, time.time(), json.dumps(result)),
            )  # fmt: skip

        await self._store._run(q)

    async def analyses(self, symbol: str) -> int:
        def q(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT COUNT(*) FROM price_analysis WHERE symbol=?", (symbol,))
            return int(row.fetchone()[0])

        return await self._store._run(q)

    async def add_articles(self, articles: list[Any]) -> int:
        """Store news (``vcoind.oracle.news.Article``); duplicates are ignored. Returns
        how many were new."""
        now = time.time()

        def q(c: sqlite3.Connection) -> int:
            before = c.total_changes
            c.executemany(
                "INSERT OR IGNORE INTO news_data (key, source, title, body, url, published_at, "
                "fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(a.key, a.source, a.title, a.body, a.url, a.published_at, now)
                 for a in articles],
            )  # fmt: skip
            return c.total_changes - before

        return await self._store._run(q)

    async def articles(self, since: float) -> list[tuple[str, str, str, str, float]]:
        """(source, title, body, url, published_at) published since ``since``."""

        def q(c: sqlite3.Connection) -> list[tuple[str, str, str, str, float]]:
            rows = c.execute(
                "SELECT source, title, body, url, published_at FROM news_data "
                "WHERE published_at >= ? ORDER BY published_at", (since,),
            ).fetchall()  # fmt: skip
            return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

        return await self._store._run(q)

    async def add_sentiment(self, range_: str, result: dict[str, Any]) -> None:
        def q(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO sentiment_scores (range, created_at, score, confidence, "
                "volatility, articles, result) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (range_, time.time(), result["sentiment_score"], result["confidence"],
                 result["volatility"], result["articles"], json.dumps(result)),
            )  # fmt: skip

        await self._store._run(q)


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
