"""Market data connectors over HTTP (httpx): retries with backoff, rate limits, timeouts,
API keys, and a status that says when a source is unreachable and how old its last good
data is. Responses are validated before anything is used: a malformed upstream answer
is an error, never a wrong number.

``CoinGecko`` speaks the public API v3 (``/simple/price``, ``/coins/{id}/market_chart``);
``base_url`` points it elsewhere (a paid plan's host, or a recorded-response server).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx
import trio

log = logging.getLogger("vcoind.oracle")

COINGECKO_URL = "https://api.coingecko.com/api/v3"
MAX_RETRY_AFTER_S = 60.0


class SourceError(Exception):
    """A source that did not give usable data (unreachable, refused, malformed)."""


@dataclass
class SourceStatus:
    name: str
    ok: bool = False
    error: str | None = None
    last_ok_at: float | None = None
    last_try_at: float | None = None
    requests: int = 0
    failures: int = 0

    def view(self, now: float) -> dict[str, Any]:
        return {
            "source": self.name,
            "status": "ok" if self.ok else (self.error or "not fetched yet"),
            "last_ok_at": self.last_ok_at,
            "age_s": None if self.last_ok_at is None else round(now - self.last_ok_at, 1),
            "requests": self.requests,
            "failures": self.failures,
        }


@dataclass
class HttpSource:
    """GET JSON with retries: connection errors, timeouts and 5xx back off exponentially;
    429 waits for ``Retry-After`` (capped); other 4xx fail at once (a bad key or query)."""

    name: str
    client: httpx.AsyncClient
    base_url: str
    api_key: str = ""
    key_header: str = ""
    retries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 10.0
    min_interval_s: float = 0.0  # client-side rate limit: at most one request this often
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = trio.sleep
    status: SourceStatus = field(init=False)

    def __post_init__(self) -> None:
        self.status = SourceStatus(self.name)
        self._next_at = 0.0  # (trio clock) the earliest the next request may go out
        self._gate = trio.Lock()

    async def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        headers = {"accept": "application/json"}
        if self.api_key and self.key_header:
            headers[self.key_header] = self.api_key
        url = self.base_url.rstrip("/") + path
        self.status.last_try_at = self.clock()
        error = "no attempt"
        for attempt in range(self.retries + 1):
            await self._pace()
            self.status.requests += 1
            delay = self.backoff_s * 2**attempt
            try:
                resp = await self.client.get(url, params=params, headers=headers,
                                             timeout=self.timeout_s)  # fmt: skip
            except httpx.TimeoutException:
                error = f"source unreachable: no answer within {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                error = f"source unreachable: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 429:
                    error = "rate limited (HTTP 429)"
                    delay = _retry_after(resp, delay)
                elif resp.status_code >= 500:
                    error = f"upstream error (HTTP {resp.status_code})"
                elif resp.status_code >= 400:
                    self._fail(f"refused (HTTP {resp.status_code}): {_snippet(resp)}")
                else:
                    try:
                        data = resp.json()
                    except ValueError:
                        self._fail("malformed response: not JSON")
                    self.status.ok, self.status.error = True, None
                    self.status.last_ok_at = self.clock()
                    return data
            log.info("%s %s: %s (try %d/%d)", self.name, path, error, attempt + 1,
                     self.retries + 1)  # fmt: skip
            if attempt < self.retries:
                await self.sleep(delay)
        self._fail(error)

    async def _pace(self) -> None:
        if self.min_interval_s <= 0:
            return
        async with self._gate:
            wait = self._next_at - trio.current_time()
            if wait > 0:
                await self.sleep(wait)
            self._next_at = trio.current_time() + self.min_interval_s

    def _fail(self, error: str) -> NoReturn:
        self.status.ok, self.status.error = False, error
        self.status.failures += 1
        raise SourceError(f"{self.name}: {error}")


def _retry_after(resp: httpx.Response, default: float) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(resp.headers.get("retry-after", ""))))
    except ValueError:
        return default


def _snippet(resp: httpx.Response) -> str:
    return resp.text[:200].replace("\n", " ")


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise SourceError(f"malformed response: {what} is not a finite number ({v!r})")
    return float(v)


@dataclass(frozen=True)
class Quote:
    coin: str
    price: float
    market_cap: float | None
    volume_24h: float | None
    updated_at: float


@dataclass(frozen=True)
class Series:
    """Oldest first: timestamps (s), prices, and volumes (NaN where the source had none)."""

    coin: str
    ts: tuple[float, ...]
    prices: tuple[float, ...]
    volumes: tuple[float, ...]


class CoinGecko(HttpSource):
    async def quote(self, coin: str, vs: str = "usd") -> Quote:
        data = await self.get_json("/simple/price", {
            "ids": coin, "vs_currencies": vs, "include_market_cap": "true",
            "include_24hr_vol": "true", "include_last_updated_at": "true",
        })  # fmt: skip
        row = data.get(coin) if isinstance(data, dict) else None
        if not isinstance(row, dict) or vs not in row:
            self._fail(f"malformed response: no {vs} price for {coin!r}")
        price = _number(row[vs], "price")
        cap = row.get(f"{vs}_market_cap")
        vol = row.get(f"{vs}_24h_vol")
        updated = _number(row.get("last_updated_at", self.clock()), "last_updated_at")
        return Quote(coin, price, None if cap is None else _number(cap, "market cap"),
                     None if vol is None else _number(vol, "volume"), updated)  # fmt: skip

    async def chart(self, coin: str, days: int, vs: str = "usd") -> Series:
        data = await self.get_json(f"/coins/{coin}/market_chart",
                                   {"vs_currency": vs, "days": str(days)})  # fmt: skip
        if not isinstance(data, dict) or not isinstance(data.get("prices"), list):
            self._fail("malformed response: no prices list")

        def pairs(key: str) -> dict[float, float]:
            out: dict[float, float] = {}
            for p in data.get(key) or []:
                if not isinstance(p, list) or len(p) != 2:
                    raise SourceError(f"malformed response: {key} entry {p!r}")
                out[_number(p[0], f"{key} time") / 1000] = _number(p[1], key)
            return out

        try:
            prices, vols = pairs("prices"), pairs("total_volumes")
        except SourceError as exc:
            self._fail(str(exc))
        ts = sorted(prices)  # duplicates collapse: one point per timestamp
        return Series(coin, tuple(ts), tuple(prices[t] for t in ts),
                      tuple(vols.get(t, math.nan) for t in ts))  # fmt: skip
