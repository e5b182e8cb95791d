"""The oracle's price side: the CoinGecko connector over httpx (responses in the API's
documented format replayed through the client's transport), retries, rate limits,
offline behaviour, the cached analysis, and a daemon serving it over a real loopback
HTTP source."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devnet.__main__ import stake_all
from devnet.chain import fund_nodes
from tests.conftest import Chain, Cluster, wait_until
from vcoind.oracle import OracleError
from vcoind.oracle.service import OracleService, OracleSettings, analyse
from vcoind.oracle.sources import CoinGecko, SourceError
from vcoind.store import OracleStore, Store

VECTORS = Path(__file__).parent / "vectors" / "coingecko"
CHART = json.loads((VECTORS / "market_chart_qubic_30d.json").read_text())
END = CHART["prices"][-1][0] / 1000  # the series' last hour


def replay(routes: dict[str, Any], log: list[str] | None = None) -> httpx.MockTransport:
    """Answers by path: a JSON-able body, an httpx.Response, or an exception to raise."""

    def handler(request: httpx.Request) -> httpx.Response:
        if log is not None:
            log.append(request.url.path)
        for path, answer in routes.items():
            if request.url.path.endswith(path):
                got = answer() if callable(answer) else answer
                if isinstance(got, Exception):
                    raise got
                if isinstance(got, httpx.Response):
                    return got
                return httpx.Response(200, json=got)
        return httpx.Response(404, text="not found")

    return httpx.MockTransport(handler)


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, s: float) -> None:
        self.calls.append(s)


def source(transport: httpx.MockTransport, sleeps: Sleeps, **kw: Any) -> CoinGecko:
    client = httpx.AsyncClient(transport=transport)
    return CoinGecko("coingecko", client, "https://api.example/api/v3", sleep=sleeps,
                     clock=lambda: END, **kw)  # fmt: skip


async def test_documented_responses_parse() -> None:
    doc_price = json.loads((VECTORS / "simple_price_bitcoin.json").read_text())
    doc_chart = json.loads((VECTORS / "market_chart_bitcoin_docs.json").read_text())
    cg = source(replay({"/simple/price": doc_price, "/market_chart": doc_chart}), Sleeps())
    q = await cg.quote("bitcoin")
    assert (q.price, q.market_cap, q.volume_24h, q.updated_at) == (
        67187.3358936566, 1317802988326.25, 31260929299.5248, 1711356300)  # fmt: skip
    s = await cg.chart("bitcoin", 2)
    assert s.ts == (1711843200.0, 1711929600.0, 1711983682.0)
    assert s.prices[1] == 71246.9514406015 and s.volumes[2] == 30137418199.6431
    assert cg.status.ok and cg.status.requests == 2


async def test_retries_backoff_and_rate_limits() -> None:
    answers = [httpx.Response(503), httpx.Response(429, headers={"retry-after": "7"}),
               CHART]  # fmt: skip
    sleeps = Sleeps()
    cg = source(replay({"/market_chart": lambda: answers.pop(0)}), sleeps, backoff_s=1.0)
    s = await cg.chart("qubic-network", 30)
    assert len(s.prices) == 720
    assert sleeps.calls == [1.0, 7.0]  # backoff, then the server's Retry-After
    assert cg.status.requests == 3 and cg.status.ok


@pytest.mark.parametrize(
    ("answer", "error", "tries"),
    [
        (httpx.ConnectError("refused"), "source unreachable: ConnectError", 4),
        (httpx.ReadTimeout("slow"), "source unreachable: no answer within", 4),
        (httpx.Response(401, text='{"error": "invalid api key"}'), "refused (HTTP 401)", 1),
        (httpx.Response(200, text="<html>maintenance</html>"), "malformed response: not JSON", 1),
        ({"prices": [[1, "x"]]}, "malformed response: prices is not a finite number", 1),
        (httpx.Response(200, text='{"prices": [[1, NaN]]}'), "not a finite number", 1),
        ({"total_volumes": []}, "malformed response: no prices list", 1),
    ],
)
async def test_failures_are_clear(answer: Any, error: str, tries: int) -> None:
    calls: list[str] = []
    cg = source(replay({"/market_chart": answer}, calls), Sleeps())
    with pytest.raises(SourceError, match=error.replace("(", r"\(").replace(")", r"\)")):
        await cg.chart("qubic-network", 30)
    assert len(calls) == tries and not cg.status.ok and cg.status.failures == 1


async def service(tmp_path: Path, transport: httpx.MockTransport) -> tuple[OracleService, Any]:
    store = Store(tmp_path / "vcoin.db")
    await store.open()
    clock = {"t": 1000.0}
    svc = OracleService(
        OracleSettings("https://api.example/api/v3", retries=0, min_interval_s=0),
        OracleStore(store),
        transport=transport, clock=lambda: END + clock["t"] - 400, monotonic=lambda: clock["t"],
    )  # fmt: skip
    return svc, clock


async def test_analysis_is_cached_and_falls_back_to_stored_data(tmp_path: Path) -> None:
    calls: list[str] = []
    state = {"up": True}

    def chart() -> Any:
        return CHART if state["up"] else httpx.ConnectError("no route to host")

    svc, clock = await service(tmp_path, replay({"/market_chart": chart}, calls))
    a = await svc.price_analysis("qubic", "1h")
    assert a["symbol"] == "QUBIC" and a["source"]["status"] == "ok"
    assert a["price"] == pytest.approx(CHART["prices"][-1][1])
    assert a["quality"]["points"] == 720 and a["quality"]["completeness"] == 1.0
    assert not a["quality"]["stale"]
    assert {"sma_20", "ema_12", "rsi_14", "macd", "bollinger"} <= set(a["indicators"])
    assert any(x["kind"] == "manipulation" and x["index"] == 700 for x in a["anomalies"])
    assert len(a["predictions"]["next"]) == 3 and a["risk"]["level"] in ("low", "medium", "high")
    # cached for 5 minutes of the clock, then fetched again
    assert await svc.price_analysis("QUBIC", "1h") == a and len(calls) == 1
    clock["t"] += 299
    await svc.price_analysis("QUBIC", "1h")
    assert len(calls) == 1 and svc.price_cache.hits == 2
    clock["t"] += 2
    state["up"] = False
    b = await svc.price_analysis("QUBIC", "1h")  # expired; the source is down
    assert len(calls) == 2
    assert b["source"]["status"].startswith("coingecko: source unreachable")
    assert b["source"]["served_from"] == "stored data" and b["source"]["age_s"] > 0
    assert b["price"] == a["price"]
    # 4h candles from the same stored hours: every 4th close
    c = await svc.price_analysis("QUBIC", "4h")
    assert c["quality"]["points"] == 180 and c["price"] == a["price"]
    with pytest.raises(OracleError, match="unknown symbol 'DOGE'"):
        await svc.price_analysis("DOGE", "1h")
    with pytest.raises(OracleError, match="timeframe must be one of"):
        await svc.price_analysis("QUBIC", "5m")
    await svc.aclose()


async def test_nothing_stored_when_the_upstream_is_malformed(tmp_path: Path) -> None:
    svc, _ = await service(tmp_path, replay({"/market_chart": {"prices": [[1, "junk"]]}}))
    with pytest.raises(OracleError, match=r"malformed response.*no stored data for BTC"):
        await svc.price_analysis("BTC", "1h")
    store = OracleStore(svc._store._store)
    assert await store.points("BTC", "coingecko", 1e12) == []
    await svc.aclose()


def test_analysis_needs_enough_points() -> None:
    from vcoind.oracle.sources import Series

    s = Series("x", tuple(range(10)), tuple(float(i) for i in range(10)), (1.0,) * 10)
    with pytest.raises(OracleError, match="10 price points"):
        analyse(s, 1, 10.0)


NEWS = Path(__file__).parent / "vectors" / "news"


def _today(path: str) -> Any:
    """The recorded answer for ``path``, news moved so that its newest item is an hour old
    (the stories are about "now" whenever the test runs)."""
    if "/market_chart" in path:
        return CHART
    if "/everything" in path:
        doc = json.loads((NEWS / "newsapi_everything_qubic.json").read_text())
        stamps = [datetime.fromisoformat(a["publishedAt"].replace("Z", "+00:00")).timestamp()
                  for a in doc["articles"] if a["title"]]  # fmt: skip
        shift = time.time() - 3600 - max(stamps)
        for a in doc["articles"]:
            t = datetime.fromisoformat(a["publishedAt"].replace("Z", "+00:00")).timestamp()
            a["publishedAt"] = datetime.fromtimestamp(t + shift, UTC).isoformat()
        return doc
    if "/search.json" in path:
        doc = json.loads((NEWS / "reddit_search_qubic.json").read_text())
        newest = max(c["data"]["created_utc"] for c in doc["data"]["children"])
        for c in doc["data"]["children"]:
            c["data"]["created_utc"] += time.time() - 3600 - newest
        return doc
    return {}


def start_recorded(scale: float = 1.0) -> tuple[dict[str, Any], http.server.HTTPServer]:
    """A real HTTP server on loopback answering CoinGecko, NewsAPI and Reddit paths from
    the vectors; ``scale`` multiplies every price (a manipulated feed)."""
    state: dict[str, Any] = {"up": True, "hits": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["hits"] += 1
            if not state["up"]:
                self.send_response(503)
                self.end_headers()
                return
            doc = _today(self.path)
            if scale != 1.0 and "prices" in doc:
                doc = {**doc, "prices": [[t, p * scale] for t, p in doc["prices"]]}
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["root"] = f"http://127.0.0.1:{server.server_address[1]}"
    state["url"] = state["root"] + "/api/v3"
    return state, server


def oracle_toml(api: dict[str, Any]) -> str:
    return (f'[oracle]\nenabled = true\ncoingecko_url = "{api["url"]}"\nretries = 1\n'
            "quote_poll_s = 0\nnews_poll_s = 0\nmin_interval_s = 0.1\n"
            f'newsapi_url = "{api["root"]}/v2"\nnewsapi_key = "test-key"\n'
            f'reddit_url = "{api["root"]}"\n')  # fmt: skip


@pytest.fixture
def recorded_api() -> Iterator[dict[str, Any]]:
    state, server = start_recorded()
    yield state
    server.shutdown()


def test_daemon_serves_price_analysis_over_rpc_get_and_cli(
    cluster: Cluster, recorded_api: dict[str, Any]
) -> None:
    n1 = cluster.start(1)
    assert "the oracle is off" in str(_rpc_error(n1, "vcoin_oraclePriceAnalysis"))
    n1.proc.terminate()
    n1.proc.wait()
    (n1.datadir / "config.toml").write_text(oracle_toml(recorded_api))
    n1 = cluster.start(1)
    a = n1.rpc.call("vcoin_oraclePriceAnalysis", {"symbol": "QUBIC", "timeframe": "1h"})
    assert a["price"] == pytest.approx(CHART["prices"][-1][1]) and a["source"]["status"] == "ok"
    url = n1.info["rpc_url"] + "/api/oracle/price_analysis?symbol=QUBIC&timeframe=1h"
    with urllib.request.urlopen(url) as resp:
        got = json.loads(resp.read())
    assert got["price"] == a["price"] and recorded_api["hits"] == 1  # the cache answered
    s = n1.rpc.call("vcoin_oracleSentiment", {"range": "24h"})
    assert s["articles"] == 6 and [x["status"] for x in s["sources"]] == ["ok", "ok"], s
    with urllib.request.urlopen(n1.info["rpc_url"] + "/api/oracle/sentiment?range=7d") as resp:
        week = json.loads(resp.read())
    assert week["articles"] == 8 and -1 <= week["sentiment_score"] <= 1
    ov = n1.rpc.call("vcoin_oracleMarketOverview", {"symbol": "QUBIC"})
    assert ov["recommendation"] in ("strong_sell", "sell", "hold", "buy", "strong_buy")
    assert len(ov["news"]) == 5 and ov["sentiment"]["articles"] == 6
    hits = recorded_api["hits"]
    assert "timeframe" in str(_rpc_error(n1, "vcoin_oraclePriceAnalysis", {"timeframe": "2w"}))
    recorded_api["up"] = False  # the source goes down: stored data, said so
    d = n1.rpc.call("vcoin_oraclePriceAnalysis", {"symbol": "QUBIC", "timeframe": "1d"})
    assert "upstream error (HTTP 503)" in d["source"]["status"], d["source"]
    assert d["source"]["served_from"] == "stored data"
    st = n1.rpc.call("vcoin_oracleStatus")
    assert st["sources"][0]["failures"] == 1 and recorded_api["hits"] > hits
    assert st["cache"]["price_analysis"]["hits"] == 1 and st["cache"]["sentiment"]["hits"] == 1
    with urllib.request.urlopen(n1.info["rpc_url"] + "/metrics") as resp:
        metrics = resp.read()
    assert b'vcoin_oracle_cache_total{cache="price_analysis",result="hit"} 1.0' in metrics
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from vcoind.cli import client_main; "
         "sys.exit(client_main())", "--datadir", str(n1.datadir), "oracle", "price",
         "--symbol", "QUBIC", "--timeframe", "1h"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "QUBIC" in out.stdout and "trend" in out.stdout and "rsi_14" in out.stdout
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from vcoind.cli import client_main; "
         "sys.exit(client_main())", "--datadir", str(n1.datadir), "oracle", "sentiment"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "sentiment" in out.stdout and "newsapi" in out.stdout
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from vcoind.cli import client_main; "
         "sys.exit(client_main())", "--datadir", str(n1.datadir), "oracle", "overview"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("QUBIC: ") and "signal" in out.stdout and "news " in out.stdout
    assert n1.proc.poll() is None


def _rpc_error(node: Any, method: str, params: dict[str, Any] | None = None) -> Exception:
    try:
        node.rpc.call(method, params or {})
    except Exception as exc:  # the client raises the server's JSON-RPC error
        return exc
    raise AssertionError(f"{method} did not fail")


def test_replicated_answer_ignores_a_manipulated_feed_and_is_anchored(
    cluster: Cluster, chain: Chain, recorded_api: dict[str, Any]
) -> None:
    """Three oracle nodes on anvil; node 3 reads a feed with every price 1.5x. The
    weighted median is the honest price, node 3 is flagged and loses reputation, nodes 1
    and 2 sign, and the answer is anchored."""
    bad, bad_server = start_recorded(scale=1.5)
    try:
        for i, api in ((1, recorded_api), (2, recorded_api), (3, bad)):
            (cluster.base / f"node{i}").mkdir(parents=True, exist_ok=True)
            (cluster.base / f"node{i}" / "config.toml").write_text(oracle_toml(api))
        n1 = cluster.start(1, extra=chain.flags())
        nodes = [n1, *(cluster.start(i, bootstrap=n1, extra=chain.flags()) for i in (2, 3))]
        fund_nodes(chain.anvil.url, chain.deployment, [n.info["eth_address"] for n in nodes])
        stake_all(nodes, 1000)
        wait_until(lambda: sum("oracle" in p["services"] for p in n1.rpc.call("vcoin_peers"))
                   == 2, 20, "node 1 sees two oracle peers")  # fmt: skip
        r = n1.client(90).call("vcoin_oracleQuery", {"kind": "price", "symbol": "QUBIC",
                                                     "window": "1h", "replicas": 3})  # fmt: skip
        honest = CHART["prices"][-1][1]
        assert r["values"]["price"] == pytest.approx(honest), r
        n3 = nodes[2].info["peer_id"]
        assert r["outliers"] == [n3] and r["decision"] == "supermajority", r
        by = {x["node_id"]: x for x in r["replicas"]}
        assert by[n3]["values"]["price"] == pytest.approx(1.5 * honest)
        assert by[n3]["outlier"] and not by[n3]["signed"]
        assert all(x["signed"] for p, x in by.items() if p != n3)
        assert len({x["input_hash"] for x in r["replicas"]}) == 2  # node 3 saw other data
        a = wait_until(
            lambda: (x := n1.rpc.call("vcoin_getAnchor", {"task_id": r["task_id"]}))
            and x["status"] in ("anchored", "failed") and x, 60, "the oracle anchor",
        )  # fmt: skip
        assert a["status"] == "anchored", a
        ev = chain.anchored_events(r["task_id"])
        assert len(ev) == 1 and bytes(ev[0]["args"]["resultHash"]).hex() == r["result_hash"]
        reps = {p["peer_id"]: p["reputation_score"] for p in n1.rpc.call("vcoin_peers")}
        assert reps[n3] < 100 <= reps[nodes[1].info["peer_id"]], reps
    finally:
        bad_server.shutdown()


async def test_client_side_rate_limit_and_quote_polling(tmp_path: Path) -> None:
    doc_price = json.loads((VECTORS / "simple_price_bitcoin.json").read_text())
    sleeps = Sleeps()
    cg = source(replay({"/simple/price": doc_price}), sleeps, min_interval_s=5.0)
    await cg.quote("bitcoin")
    await cg.quote("bitcoin")  # at once: waits out the rest of the 5 s
    assert len(sleeps.calls) == 1 and 4.9 < sleeps.calls[0] <= 5.0
    store = Store(tmp_path / "vcoin.db")
    await store.open()
    svc = OracleService(
        OracleSettings("https://api.example/api/v3", coins=(("BTC", "bitcoin"),),
                       min_interval_s=0),
        OracleStore(store), transport=replay({"/simple/price": doc_price}),
    )  # fmt: skip
    assert await svc.poll_quotes() == 1
    rows = await OracleStore(store).points("BTC", "coingecko/quote", 1e9)
    assert rows[0][:3] == (1711356300.0, 67187.3358936566, 31260929299.5248)
    await svc.aclose()
