"""The store's schema: versioned migrations, and opening (and migrating) the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path


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
    # 11: settlement v2: the task's payment (the requester's signed ticket, the awards, and
    # whether it is paid at all: tasks between embedded chains run unpaid).
    """
    ALTER TABLE tasks ADD COLUMN payment TEXT NOT NULL DEFAULT '{}';
    """,
    # 12: API keys of the OpenAI gateway (only their sha256 is kept), limits and usage.
    """
    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        hash        TEXT UNIQUE NOT NULL,
        rpm         INTEGER NOT NULL,
        tpm         INTEGER NOT NULL,
        created_at  REAL NOT NULL,
        revoked_at  REAL,
        requests    INTEGER NOT NULL DEFAULT 0,
        tokens      INTEGER NOT NULL DEFAULT 0,
        last_used   REAL
    );
    """,
)


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
