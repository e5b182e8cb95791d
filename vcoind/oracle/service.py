"""The node's AI oracle, price side: market data from CoinGecko kept in SQLite, price
analyses with indicators, patterns, a short-term forecast, anomalies and a risk level,
behind a TTL cache.

When the source is unreachable, an analysis is computed from the last good data in
SQLite and says so (``source.status``, ``source.age_s``); with no data at all the call
fails with the source's error. Nothing here blocks the trio thread on I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from vcoind.oracle import TIMEFRAMES, OracleError
from vcoind.oracle import indicators as ind
from vcoind.oracle.news import NEWSAPI_URL, REDDIT_URL, Article, NewsAPI, Reddit
from vcoind.oracle.sentiment import RANGES, Classifier, SentimentModel, aggregate
from vcoind.oracle.sources import CoinGecko, HttpSource, Series, SourceError
from vcoind.store import OracleStore

log = logging.getLogger("vcoind.oracle")

PRICE_TTL_S = 300.0
SENTIMENT_TTL_S = 600.0
NEWS_TTL_S = 1800.0  # news is fetched again after this long
STALE_S = 3 * 3600.0  # data older than this is flagged stale


@dataclass
class _Entry:
    value: dict[str, Any]
    expires: float


class TTLCache:
    """Values for ``ttl_s`` seconds of ``clock``; counts hits and misses."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._items: dict[Any, _Entry] = {}
        self.hits = self.misses = 0

    def get(self, key: Any) -> dict[str, Any] | None:
        value = self.peek(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def peek(self, key: Any) -> dict[str, Any] | None:
        """The live value, if any, without counting a lookup."""
        e = self._items.get(key)
        if e is None or e.expires <= self.clock():
            self._items.pop(key, None)
            return None
        return e.value

    def put(self, key: Any, value: dict[str, Any]) -> None:
        self._items[key] = _Entry(value, self.clock() + self.ttl_s)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass(frozen=True)
class OracleSettings:
    coingecko_url: str
    api_key: str = ""
    coins: tuple[tuple[str, str], ...] = (("QUBIC", "qubic-network"), ("BTC", "bitcoin"),
                                          ("ETH", "ethereum"))  # fmt: skip
    timeout_s: float = 10.0
    retries: int = 3
    newsapi_url: str = NEWSAPI_URL
    newsapi_key: str = ""
    news_query: str = "Qubic"
    reddit_url: str = REDDIT_URL
    subreddit: str = "CryptoCurrency"
    classifier_dir: str = ""  # a FinBERT-style model directory; "" = VADER + keywords
    min_interval_s: float = 2.0  # per source (CoinGecko's free tier: 30 calls a minute)
    quote_poll_s: float = 300.0  # quotes of every coin stored this often (0 = off)
    news_poll_s: float = 3600.0  # news fetched this often (0 = off; also on demand)


class OracleService:
    def __init__(
        self,
        settings: OracleSettings,
        store: OracleStore,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_cache: Callable[[str, bool], None] = lambda cache, hit: None,
    ) -> None:
        self.settings = settings
        self.coins = dict(settings.coins)
        self._store = store
        self._client = httpx.AsyncClient(transport=transport)
        self.clock = clock
        self.coingecko = CoinGecko(
            "coingecko", self._client, settings.coingecko_url, api_key=settings.api_key,
            key_header="x-cg-pro-api-key" if settings.api_key else "",
            retries=settings.retries, timeout_s=settings.timeout_s, clock=clock,
            min_interval_s=settings.min_interval_s,
        )  # fmt: skip
        common: dict[str, Any] = {
            "retries": settings.retries, "timeout_s": settings.timeout_s, "clock": clock,
            "min_interval_s": settings.min_interval_s,
        }  # fmt: skip
        self.newsapi = NewsAPI(
            "newsapi",
            self._client,
            settings.newsapi_url,
            api_key=settings.newsapi_key,
            key_header="x-api-key",
            **common,
        )
        self.reddit = Reddit("reddit", self._client, settings.reddit_url, **common)
        self.price_cache = TTLCache(PRICE_TTL_S, monotonic)
        self.sentiment_cache = TTLCache(SENTIMENT_TTL_S, monotonic)
        self.news_cache = TTLCache(NEWS_TTL_S, monotonic)
        self._model: SentimentModel | None = None
        self.last_analysis: dict[str, dict[str, Any]] = {}  # symbol -> latest price analysis
        self.sentiment_24h: list[float] = []  # the last two 24 h indices
        self._on_cache = on_cache
        self._locks: dict[Any, trio.Lock] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Poll: every coin's quote each ``quote_poll_s`` (stored in ``market_data``), news
        each ``news_poll_s``. Failures are logged and shown in the sources' status."""
        task_status.started()
        s = self.settings
        next_quote = next_news = trio.current_time()
        while True:
            now = trio.current_time()
            if s.quote_poll_s and now >= next_quote:
                next_quote = now + s.quote_poll_s
                await self.poll_quotes()
            if s.news_poll_s and now >= next_news:
                next_news = now + s.news_poll_s
                await self._refresh_news()
            waits = [t for t, on in ((next_quote, s.quote_poll_s), (next_news, s.news_poll_s))
                     if on]  # fmt: skip
            if not waits:
                return
            await trio.sleep_until(min(waits))

    async def poll_quotes(self) -> int:
        """Store the current quote of every coin; how many were stored."""
        stored = 0
        for symbol, coin in self.coins.items():
            try:
                q = await self.coingecko.quote(coin)
            except SourceError as exc:
                log.info("quote %s: %s", symbol, exc)
                continue
            point = (q.updated_at, q.price, q.volume_24h)
            await self._store.add_points(symbol, "coingecko/quote", [point], q.market_cap)
            stored += 1
        return stored

    def status(self) -> dict[str, Any]:
        now = self.clock()
        caches = {"price_analysis": self.price_cache, "sentiment": self.sentiment_cache,
                  "news": self.news_cache}  # fmt: skip
        return {
            "sources": [s.status.view(now) for s in self._sources()],
            "symbols": sorted(self.coins),
            "cache": {k: {"hits": c.hits, "misses": c.misses, "hit_rate": round(c.hit_rate, 3)}
                      for k, c in caches.items()},
        }  # fmt: skip

    def alert_view(self) -> tuple[list[tuple[str, str, str]], tuple[float, float] | None]:
        """For the alert rules: price anomalies in each symbol's last 3 points
        (jumps, manipulation), and the previous and latest 24 h sentiment."""
        anomalies = []
        for symbol, r in self.last_analysis.items():
            last = r["quality"]["points"] - 1
            for a in r["anomalies"]:
                if a["kind"] in ("price_jump", "manipulation") and a["index"] >= last - 2:
                    anomalies.append((symbol, a["kind"], a["detail"]))
        s = self.sentiment_24h
        return anomalies, (s[0], s[1]) if len(s) == 2 else None

    def _sources(self) -> list[HttpSource]:
        return [self.coingecko, self.newsapi, self.reddit]

    def coin(self, symbol: str) -> str:
        coin = self.coins.get(symbol.upper())
        if coin is None:
            raise OracleError(f"unknown symbol {symbol!r} (known: {', '.join(sorted(self.coins))})")
        return coin

    async def price_analysis(self, symbol: str, timeframe: str = "4h") -> dict[str, Any]:
        if timeframe not in TIMEFRAMES:
            raise OracleError(f"timeframe must be one of {', '.join(TIMEFRAMES)}")
        symbol = symbol.upper()
        coin = self.coin(symbol)

        async def compute() -> dict[str, Any]:
            result = await self._analyse(symbol, coin, timeframe)
            self.last_analysis[symbol] = result
            await self._store.add_analysis(symbol, timeframe, result)
            return result

        return await self._cached("price_analysis", self.price_cache, (symbol, timeframe),
                                  compute)  # fmt: skip

    async def _cached(
        self, name: str, cache: TTLCache, key: Any,
        compute: Callable[[], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:  # fmt: skip
        """The cached value, or one computation per key at a time (callers that waited
        for it take its result)."""
        hit = cache.get(key)
        self._on_cache(name, hit is not None)
        if hit is not None:
            return hit
        async with self._locks.setdefault((name, key), trio.Lock()):
            value = cache.peek(key)
            if value is None:
                value = await compute()
                cache.put(key, value)
            return value

    async def sentiment(self, range_: str = "24h") -> dict[str, Any]:
        """The news sentiment index over ``range_`` (1h, 24h, 7d); cached 10 minutes."""
        if range_ not in RANGES:
            raise OracleError(f"range must be one of {', '.join(RANGES)}")
        return await self._cached("sentiment", self.sentiment_cache, range_,
                                  lambda: self._sentiment(range_))  # fmt: skip

    async def _sentiment(self, range_: str) -> dict[str, Any]:
        errors = await self._refresh_news()
        now = self.clock()
        rows = await self._store.articles(now - RANGES[range_])
        articles = [Article(*r) for r in rows]
        model = await self._sentiment_model()
        scored = await trio.to_thread.run_sync(model.score, articles)
        result = aggregate(scored, now, RANGES[range_])
        keys = sorted(f"{a.key}:{a.published_at}" for a in articles)
        result["input_hash"] = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        method = "VADER" + (" + classifier" if model.classifier else "")
        sources = [s.status.view(now) for s in (self.newsapi, self.reddit)]
        result.update(range=range_, computed_at=now, query=self.settings.news_query,
                      method=method + " + keywords; title 40 %, body 60 %",
                      sources=sources)  # fmt: skip
        if errors and not articles:
            result["note"] = "; ".join(errors)
        if range_ == "24h":
            self.sentiment_24h = [*self.sentiment_24h, result["sentiment_score"]][-2:]
        await self._store.add_sentiment(range_, result)
        return result

    async def market_overview(self, symbol: str = "QUBIC") -> dict[str, Any]:
        """Sentiment over 24 h, the 4 h price analysis, the latest headlines, and a
        recommendation level from trend, sentiment and risk together."""
        price = await self.price_analysis(symbol, "4h")
        senti = await self.sentiment("24h")
        rows = await self._store.articles(self.clock() - RANGES["24h"])
        latest = [{"source": r[0], "title": r[1], "url": r[3], "published_at": r[4]}
                  for r in sorted(rows, key=lambda r: -r[4])[:5]]  # fmt: skip
        trend = {"up": 1.0, "sideways": 0.0, "down": -1.0}[price["trend"]]
        signal = 0.5 * trend + 0.5 * senti["sentiment_score"] * max(0.3, senti["confidence"])
        if price["risk"]["level"] == "high":
            signal -= 0.25
        level = ("strong_sell", "sell", "hold", "buy", "strong_buy")[
            int(np.digitize(signal, [-0.5, -0.15, 0.15, 0.5]))]  # fmt: skip
        return {
            "symbol": symbol.upper(), "recommendation": level, "signal": round(signal, 4),
            "price": {k: price[k] for k in ("price", "trend", "risk", "predictions", "source")},
            "sentiment": {k: senti[k] for k in ("sentiment_score", "label", "confidence",
                                                 "articles")},
            "news": latest,
            "note": "signal = half price trend, half confidence-weighted sentiment, "
                    "less 0.25 at high risk; not financial advice",
        }  # fmt: skip

    async def _refresh_news(self) -> list[str]:
        """Fetch news and posts unless done within NEWS_TTL_S; store the new ones."""
        hit = self.news_cache.get("news")
        self._on_cache("news", hit is not None)
        if hit is not None:
            return []
        errors, fetched = [], 0
        q = self.settings.news_query
        fetches: list[Callable[[], Awaitable[list[Article]]]] = [
            lambda: self.newsapi.articles(q),
            lambda: self.reddit.posts(q, self.settings.subreddit),
        ]
        for fetch in fetches:
            try:
                got = await fetch()
            except SourceError as exc:
                errors.append(str(exc))
                continue
            fetched += await self._store.add_articles(got)
        log.info("news: %d new articles%s", fetched, f" ({'; '.join(errors)})" if errors else "")
        self.news_cache.put("news", {"new": fetched})
        return errors

    async def _sentiment_model(self) -> SentimentModel:
        if self._model is None:
            path = self.settings.classifier_dir

            def load() -> SentimentModel:
                return SentimentModel(Classifier(Path(path)) if path else None)

            self._model = await trio.to_thread.run_sync(load)
        return self._model

    async def _series(self, symbol: str, coin: str, days: int) -> tuple[Series, str | None]:
        """Fresh data when the source answers (and stored), else the stored data."""
        try:
            s = await self.coingecko.chart(coin, days)
            await self._store.add_points(symbol, "coingecko", list(zip(
                s.ts, s.prices, [None if math.isnan(v) else v for v in s.volumes],
                strict=True)))  # fmt: skip
            return s, None
        except SourceError as exc:
            rows = await self._store.points(symbol, "coingecko", days * 86400)
            if not rows:
                raise OracleError(f"{exc}; no stored data for {symbol} either") from None
            log.warning("%s; analysing %d stored points", exc, len(rows))
            series = Series(coin, tuple(r[0] for r in rows), tuple(r[1] for r in rows),
                            tuple(math.nan if r[2] is None else r[2] for r in rows))  # fmt: skip
            return series, str(exc)

    async def _analyse(self, symbol: str, coin: str, timeframe: str) -> dict[str, Any]:
        days, step = TIMEFRAMES[timeframe]
        series, error = await self._series(symbol, coin, days)
        now = self.clock()
        result = await trio.to_thread.run_sync(analyse, series, step, now)
        inputs = json.dumps([series.ts, series.prices], separators=(",", ":"))
        result["input_hash"] = hashlib.sha256(inputs.encode()).hexdigest()
        src = self.coingecko.status.view(now)
        if error is not None:
            src["status"] = error
            src["served_from"] = "stored data"
        result.update(symbol=symbol, timeframe=timeframe, source=src, computed_at=now)
        return result


def _f(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 10)


def quality(ts: np.ndarray, prices: np.ndarray, now: float) -> dict[str, Any]:
    """Completeness (missing steps), duplicates, outliers and staleness of a series."""
    dts = np.diff(ts)
    step = float(np.median(dts)) if len(dts) else 0.0
    expected = round(float(ts[-1] - ts[0]) / step) + 1 if step > 0 else len(ts)
    outliers = [a for a in ind.anomalies(prices) if a.kind == "outlier"]
    age = now - float(ts[-1])
    return {
        "points": len(ts),
        "completeness": round(len(ts) / expected, 4) if expected else 1.0,
        "duplicates": int((dts == 0).sum()),
        "outliers": len(outliers),
        "age_s": round(age, 1),
        "stale": age > STALE_S,
    }


def analyse(series: Series, step: int, now: float) -> dict[str, Any]:
    """Indicators, levels, patterns, forecast, anomalies and risk of a price series."""
    ts = np.asarray(series.ts, dtype=np.float64)
    p = np.asarray(series.prices, dtype=np.float64)
    v = np.asarray(series.volumes, dtype=np.float64)
    if step > 1:  # candles of ``step`` points: the close of each
        keep = np.arange(len(p) - 1, -1, -step)[::-1]
        ts, p, v = ts[keep], p[keep], v[keep]
    if len(p) < 30:
        raise OracleError(f"{len(p)} price points: at least 30 are needed for an analysis")
    q = quality(ts, p, now)
    sma20, ema12, ema26 = ind.sma(p, 20), ind.ema(p, 12), ind.ema(p, 26)
    rsi = ind.rsi(p, 14)
    line, sig, hist = ind.macd(p)
    lo, mid, hi = ind.bollinger(p, 20)
    future, slope, r2 = ind.linear_forecast(p, steps=3, window=24)
    last = float(p[-1])
    rel_slope = slope / last if last else 0.0
    trend = "up" if rel_slope > 0.002 else "down" if rel_slope < -0.002 else "sideways"
    returns = np.diff(p) / p[:-1]
    vol = float(np.std(returns[-48:]))
    anomalies = ind.anomalies(p, v if not np.isnan(v).any() else None)
    recent = [a for a in anomalies if a.index >= len(p) - 24]
    warnings = [f"{a.kind} at point {a.index}: {a.detail}" for a in recent
                if a.kind in ("manipulation", "price_jump")]  # fmt: skip
    if q["stale"]:
        warnings.append(f"data is {q['age_s'] / 3600:.1f} h old")
    r = rsi[-1]
    score = (vol > 0.02) + (vol > 0.05) + bool(warnings) + (r > 75 or r < 25)
    level = ("low", "medium", "high", "high", "high")[int(score)]
    return {
        "price": last,
        "trend": trend,
        "indicators": {
            "sma_20": _f(sma20[-1]), "ema_12": _f(ema12[-1]), "ema_26": _f(ema26[-1]),
            "rsi_14": _f(r),
            "macd": {"line": _f(line[-1]), "signal": _f(sig[-1]), "histogram": _f(hist[-1])},
            "bollinger": {"lower": _f(lo[-1]), "middle": _f(mid[-1]), "upper": _f(hi[-1])},
        },
        "levels": ind.support_resistance(p),
        "patterns": ind.patterns(p),
        "predictions": {"next": [_f(x) for x in future], "slope_per_step": _f(slope),
                        "r2": _f(r2), "method": "least squares over the last 24 points"},
        "anomalies": [{"index": a.index, "kind": a.kind, "value": _f(a.value),
                       "detail": a.detail} for a in anomalies],
        "risk": {"level": level, "volatility": _f(vol), "warnings": warnings},
        "quality": q,
        "series": [_f(x) for x in p[-72:]],  # the last closes, for charts
    }  # fmt: skip
