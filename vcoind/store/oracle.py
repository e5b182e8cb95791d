"""The AI oracle's market data, price analyses, news and sentiment."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from vcoind.store.core import Store


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
