"""JSON-RPC methods of the AI oracle (and the seed's GET path)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vcoind.oracle import TIMEFRAMES, OracleError
from vcoind.rpc import INVALID_PARAMS, ORACLE_ERROR, MethodRegistry, Param, RPCError
from vcoind.rpc import RPCMethod as M

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from vcoind.oracle.service import OracleService

OBJ: dict[str, Any] = {"type": "object"}
# The planning documents' REST paths; query parameters become the method's parameters.
ORACLE_GET_PATHS = {
    "/api/oracle/price_analysis": "vcoin_oraclePriceAnalysis",
    "/api/oracle/sentiment": "vcoin_oracleSentiment",
    "/api/oracle/market_overview": "vcoin_oracleMarketOverview",
}


def register_oracle_api(
    reg: MethodRegistry,
    local: OracleService | None,
    replicated: Callable[[str, str, str, int], Awaitable[dict[str, Any]]],
) -> None:
    def oracle() -> OracleService:
        if local is None:
            raise RPCError(ORACLE_ERROR, "the oracle is off on this node (oracle.enabled)")
        return local

    async def price_analysis(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await oracle().price_analysis(params["symbol"], params["timeframe"])
        except OracleError as exc:
            raise RPCError(ORACLE_ERROR, str(exc)) from None

    async def status(params: dict[str, Any]) -> dict[str, Any]:
        return oracle().status()

    async def sentiment(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await oracle().sentiment(params["range"])
        except OracleError as exc:
            raise RPCError(ORACLE_ERROR, str(exc)) from None

    async def overview(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return await oracle().market_overview(params["symbol"])
        except OracleError as exc:
            raise RPCError(ORACLE_ERROR, str(exc)) from None

    reg.add(M(
        "vcoin_oraclePriceAnalysis",
        "Trend, indicators (SMA, EMA, RSI, MACD, Bollinger), support/resistance, patterns, "
        "a short-term forecast, anomalies and risk for a symbol; cached 5 minutes.",
        (
            Param("symbol", {"type": "string", "minLength": 1, "maxLength": 16},
                  default="QUBIC", description="a symbol of oracle.coins"),
            Param("timeframe", {"enum": list(TIMEFRAMES)}, default="4h",
                  description="candle size of the series analysed"),
        ),
        OBJ, price_analysis,
    ))  # fmt: skip
    reg.add(M(
        "vcoin_oracleSentiment",
        "News and social sentiment index in [-1, 1] with confidence, volatility and the "
        "factors behind it; cached 10 minutes.",
        (Param("range", {"enum": ["1h", "24h", "7d"]}, default="24h"),),
        OBJ, sentiment,
    ))  # fmt: skip
    reg.add(M(
        "vcoin_oracleMarketOverview",
        "Sentiment (24h) + price analysis (4h) + latest headlines, and a recommendation "
        "level.",
        (Param("symbol", {"type": "string", "minLength": 1, "maxLength": 16},
               default="QUBIC"),),
        OBJ, overview,
    ))  # fmt: skip

    async def query(params: dict[str, Any]) -> dict[str, Any]:
        kind = params["kind"]
        window = params["window"] or ("4h" if kind == "price" else "24h")
        valid = TIMEFRAMES if kind == "price" else ("1h", "24h", "7d")
        if window not in valid:
            raise RPCError(INVALID_PARAMS, f"window: one of {', '.join(valid)} for {kind}")
        try:
            return await replicated(kind, params["symbol"], window, params["replicas"])
        except OracleError as exc:
            raise RPCError(ORACLE_ERROR, str(exc)) from None

    reg.add(M(
        "vcoin_oracleQuery",
        "An oracle answer computed by several nodes (each fetches on its own), combined by "
        "a reputation-weighted median with outlier rejection, signed by the agreeing nodes "
        "and anchored on the chain; outliers lose reputation.",
        (
            Param("kind", {"enum": ["price", "sentiment"]}, default="price"),
            Param("symbol", {"type": "string", "minLength": 1, "maxLength": 16},
                  default="QUBIC"),
            Param("window", {"type": "string", "maxLength": 8}, default="",
                  description="timeframe (price: 1h, 4h, 1d) or range (sentiment: 1h, 24h, "
                  "7d)"),
            Param("replicas", {"type": "integer", "minimum": 2, "maximum": 5}, default=3),
        ),
        OBJ, query,
    ))  # fmt: skip
    reg.add(M("vcoin_oracleStatus", "The oracle's sources (status, age of their last good "
              "data), symbols and cache hit rates.", (), OBJ, status))  # fmt: skip
