"""The AI oracle: market data, price analysis (and, next, news sentiment), answered by
the node and, replicated, by the network. This module stays light (no httpx, numpy):
the daemon imports the rest only when the oracle is on."""

from __future__ import annotations

# timeframe -> (days of history to fetch, points per candle from CoinGecko's hourly data)
TIMEFRAMES = {"1h": (7, 1), "4h": (30, 4), "1d": (180, 1)}


class OracleError(Exception):
    """A query the oracle cannot answer (unknown symbol, no data)."""
