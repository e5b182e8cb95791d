"""API keys of the OpenAI gateway: only a key's sha256 is stored; limits and usage.

A key reads ``vk-<id>-<secret>``: the id names it in lists and metrics, the secret (32
random bytes) is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

from vcoind.store.core import Store

PREFIX = "vk-"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    rpm: int  # requests per minute (0: no limit)
    tpm: int  # generated tokens per minute (0: no limit)
    created_at: float
    revoked_at: float | None
    requests: int
    tokens: int
    last_used: float | None

    def view(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "rpm": self.rpm, "tpm": self.tpm,
                "created_at": self.created_at, "revoked": self.revoked_at is not None,
                "revoked_at": self.revoked_at, "requests": self.requests,
                "tokens": self.tokens, "last_used": self.last_used}  # fmt: skip


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_COLUMNS = "id, name, rpm, tpm, created_at, revoked_at, requests, tokens, last_used"


class ApiKeyStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(self, name: str, rpm: int, tpm: int) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself (never stored, shown once)."""
        key_id = secrets.token_hex(4)
        key = f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        now = time.time()
        await self._store._run(lambda c: c.execute(
            "INSERT INTO api_keys (id, name, hash, rpm, tpm, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key_id, name, key_hash(key), rpm, tpm, now),
        ))  # fmt: skip
        return ApiKey(key_id, name, rpm, tpm, now, None, 0, 0, None), key

    async def list(self) -> list[ApiKey]:
        def q(c: sqlite3.Connection) -> list[ApiKey]:
            rows = c.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")
            return [ApiKey(*r) for r in rows]

        return await self._store._run(q)

    async def revoke(self, key_id: str) -> bool:
        """Revoke the key with this id (or name); whether one was live."""

        def q(c: sqlite3.Connection) -> bool:
            cur = c.execute("UPDATE api_keys SET revoked_at=? WHERE (id=? OR name=?) AND "
                            "revoked_at IS NULL", (time.time(), key_id, key_id))  # fmt: skip
            return cur.rowcount > 0

        return await self._store._run(q)

    async def lookup(self, key: str) -> ApiKey | None:
        """The live key ``key`` is, or None (unknown or revoked)."""
        if not key.startswith(PREFIX):
            return None

        def q(c: sqlite3.Connection) -> ApiKey | None:
            row = c.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE hash=? AND revoked_at IS "
                            "NULL", (key_hash(key),)).fetchone()  # fmt: skip
            return ApiKey(*row) if row else None

        return await self._store._run(q)

    async def add_usage(self, key_id: str, requests: int, tokens: int) -> None:
        await self._store._run(lambda c: c.execute(
            "UPDATE api_keys SET requests=requests+?, tokens=tokens+?, last_used=? WHERE id=?",
            (requests, tokens, time.time(), key_id),
        ))  # fmt: skip
