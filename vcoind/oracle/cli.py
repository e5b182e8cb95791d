"""``vcoin oracle ...``: the client side of the oracle's RPC methods."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from vcoind.oracle import TIMEFRAMES


class _Client(Protocol):
    def call(self, method: str, params: dict[str, Any] | None = None) -> Any: ...


def add_oracle_commands(sub: Any) -> None:
    o = sub.add_parser("oracle", help="AI oracle: price, sentiment, overview, sources")
    os_ = o.add_subparsers(dest="oracle_action", metavar="ACTION", required=True)
    p = os_.add_parser("price", help="trend, indicators, levels, patterns, forecast, risk")
    p.add_argument("--symbol", default="QUBIC", help="a symbol of oracle.coins (default QUBIC)")
    p.add_argument("--timeframe", choices=tuple(TIMEFRAMES), default="4h",
                   help="candle size (default 4h)")  # fmt: skip
    for q in (p,):
        q.add_argument("--replicas", type=int, help="ask this many oracle nodes (2-5): "
                       "weighted median, outliers flagged, anchored")  # fmt: skip
        q.add_argument("--anchor", action="store_true",
                       help="(with --replicas) wait for the anchor and print it")  # fmt: skip
    s = os_.add_parser("sentiment", help="news sentiment index, confidence, factors")
    s.add_argument("--range", choices=("1h", "24h", "7d"), default="24h")
    s.add_argument("--replicas", type=int, help="ask this many oracle nodes (2-5)")
    s.add_argument("--anchor", action="store_true", help="(with --replicas) wait for it")
    v = os_.add_parser("overview", help="sentiment + price + headlines, recommendation")
    v.add_argument("--symbol", default="QUBIC")
    os_.add_parser("status", help="sources (status, age of the last good data), caches")


def fmt_price(r: dict[str, Any]) -> str:
    ind, risk, pred = r["indicators"], r["risk"], r["predictions"]
    src, lv = r["source"], r["levels"]
    lines = [
        f"{r['symbol']} {r['timeframe']}  price {r['price']:.6g}  trend {r['trend']}  "
        f"risk {risk['level']} (volatility {risk['volatility']:.4f})",
        f"source {src['status']}" + (f" — {src['served_from']}" if "served_from" in src else "")
        + f"  (data {r['quality']['age_s'] / 3600:.1f} h old, {r['quality']['points']} points)",
    ]  # fmt: skip
    for k in ("sma_20", "ema_12", "ema_26", "rsi_14"):
        lines.append(f"  {k:<10} {ind[k]:.6g}" if ind[k] is not None else f"  {k:<10} -")
    m = ind["macd"]
    lines.append(f"  macd       {m['line']:.3g} / signal {m['signal']:.3g}")
    lines.append(f"  support {lv['nearest_support']}  resistance {lv['nearest_resistance']}")
    lines.append("  forecast   " + ", ".join(f"{x:.6g}" for x in pred["next"])
                 + f"  (r² {pred['r2']:.2f})")  # fmt: skip
    for p in r["patterns"]:
        lines.append(f"  pattern    {p['pattern']} at {p['level']:.6g}")
    for w in risk["warnings"]:
        lines.append(f"  warning    {w}")
    return "\n".join(lines)


def run_oracle_command(ns: argparse.Namespace, client: _Client) -> tuple[Any, Callable[[Any], str]]:
    if ns.oracle_action in ("price", "sentiment") and ns.replicas:
        kind = ns.oracle_action
        window = ns.timeframe if kind == "price" else ns.range
        r = client.call("vcoin_oracleQuery", {"kind": kind, "symbol": getattr(ns, "symbol",
                        "QUBIC"), "window": window, "replicas": ns.replicas})  # fmt: skip
        if ns.anchor and r.get("anchor"):
            r["anchor"] = _wait_anchor(client, r["task_id"])
        return r, lambda r: json.dumps(r, indent=2)
    if ns.oracle_action == "price":
        params = {"symbol": ns.symbol, "timeframe": ns.timeframe}
        return client.call("vcoin_oraclePriceAnalysis", params), fmt_price
    if ns.oracle_action == "sentiment":
        return client.call("vcoin_oracleSentiment", {"range": ns.range}), fmt_sentiment
    if ns.oracle_action == "overview":
        return client.call("vcoin_oracleMarketOverview", {"symbol": ns.symbol}), fmt_overview
    return client.call("vcoin_oracleStatus"), lambda r: json.dumps(r, indent=2)


def _wait_anchor(client: _Client, task_id: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        a = client.call("vcoin_getAnchor", {"task_id": task_id})
        if a.get("status") in ("anchored", "failed") or time.monotonic() > deadline:
            return a
        time.sleep(0.5)


def fmt_overview(r: dict[str, Any]) -> str:
    p, s = r["price"], r["sentiment"]
    lines = [
        f"{r['symbol']}: {r['recommendation']} (signal {r['signal']:+.3f})",
        f"  price      {p['price']:.6g}  trend {p['trend']}  risk {p['risk']['level']}",
        f"  sentiment  {s['sentiment_score']:+.3f} ({s['label']})  confidence "
        f"{s['confidence']:.2f}  articles {s['articles']}",
    ]
    lines += [f"  news       {n['source']}: {n['title']}" for n in r["news"]]
    lines.append(f"  ({r['note']})")
    return "\n".join(lines)


def fmt_sentiment(r: dict[str, Any]) -> str:
    f = r["factors"]
    lines = [f"sentiment {r['sentiment_score']:+.3f} ({r.get('label', '-')})  confidence "
             f"{r['confidence']:.2f}  volatility {r['volatility']:.3f}  articles {r['articles']}"
             f"  range {r['range']}"]  # fmt: skip
    for s in r["sources"]:
        lines.append(f"  {s['source']:<10} {s['status']}")
    if "keywords" in f:
        lines.append("  keywords   " + ", ".join(f"{k} ×{n}" for k, n in f["keywords"].items()))
    for k in ("most_positive", "most_negative"):
        if k in f:
            lines.append(f"  {k:<14} {f[k]['score']:+.2f}  {f[k]['title']}")
    return "\n".join(lines)
