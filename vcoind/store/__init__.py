"""SQLite store (WAL) under the data dir, with versioned migrations.

One connection, used from a worker thread one call at a time (a CapacityLimiter
of 1), so the trio thread never blocks on disk. Each call is one transaction: a
failing call rolls back only its own changes.

The schema and migrations are in ``schema``, the Store (the connection, and the peers
table) in ``core``, then one module per domain, each sharing the Store's connection.
"""

from vcoind.store.alerts import AlertStore
from vcoind.store.chain import ChainOp, ChainStore, RewardRow
from vcoind.store.consensus import ConsensusStore, SignatureRow, ValidationRow
from vcoind.store.core import PeerRow, PeerUpdate, Store
from vcoind.store.oracle import OracleStore
from vcoind.store.schema import MIGRATIONS, StoreError, open_db
from vcoind.store.sla import SLAStore
from vcoind.store.tasks import FINISHED, TASK_COLUMNS, AttemptRow, BidRow, TaskRow, TaskStore

__all__ = [
    "FINISHED",
    "MIGRATIONS",
    "TASK_COLUMNS",
    "AlertStore",
    "AttemptRow",
    "BidRow",
    "ChainOp",
    "ChainStore",
    "ConsensusStore",
    "OracleStore",
    "PeerRow",
    "PeerUpdate",
    "RewardRow",
    "SLAStore",
    "SignatureRow",
    "Store",
    "StoreError",
    "TaskRow",
    "TaskStore",
    "ValidationRow",
    "open_db",
]
