"""The oracle's price side: the CoinGecko connector over httpx (responses in the API's
documented format replayed through the client's transport), retries, rate limits,
offline behaviour, the cached analysis, and a daemon serving it over a real loopback
HTTP source."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devnet.__main__ import stake_all
from devnet.chain import fund_nodes
from devnet.replay import RecordedAPI
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


NO_POLLS = "quote_poll_s = 0\nnews_poll_s = 0\nmin_interval_s = 0.1\nretries = 1\n"


@pytest.fixture
def recorded_api() -> Iterator[RecordedAPI]:
    api = RecordedAPI()
    yield api
    api.close()


def test_daemon_serves_price_analysis_over_rpc_get_and_cli(
    cluster: Cluster, recorded_api: RecordedAPI
) -> None:
    n1 = cluster.start(1)
    assert "the oracle is off" in str(_rpc_error(n1, "vcoin_oraclePriceAnalysis"))
    n1.proc.terminate()
    n1.proc.wait()
    (n1.datadir / "config.toml").write_text(recorded_api.oracle_toml(NO_POLLS))
    n1 = cluster.start(1)
    a = n1.rpc.call("vcoin_oraclePriceAnalysis", {"symbol": "QUBIC", "timeframe": "1h"})
    assert a["price"] == pytest.approx(CHART["prices"][-1][1]) and a["source"]["status"] == "ok"
    url = n1.info["rpc_url"] + "/api/oracle/price_analysis?symbol=QUBIC&timeframe=1h"
    with urllib.request.urlopen(urllib.request.Request(url, headers=n1.rpc.auth)) as resp:
        got = json.loads(resp.read())
    assert got["price"] == a["price"] and recorded_api.hits == 1  # the cache answered
    s = n1.rpc.call("vcoin_oracleSentiment", {"range": "24h"})
    assert s["articles"] == 6 and [x["status"] for x in s["sources"]] == ["ok", "ok"], s
    week_url = n1.info["rpc_url"] + "/api/oracle/sentiment?range=7d"
    with urllib.request.urlopen(urllib.request.Request(week_url, headers=n1.rpc.auth)) as resp:
        week = json.loads(resp.read())
    assert week["articles"] == 8 and -1 <= week["sentiment_score"] <= 1
    ov = n1.rpc.call("vcoin_oracleMarketOverview", {"symbol": "QUBIC"})
    assert ov["recommendation"] in ("strong_sell", "sell", "hold", "buy", "strong_buy")
    assert len(ov["news"]) == 5 and ov["sentiment"]["articles"] == 6
    hits = recorded_api.hits
    assert "timeframe" in str(_rpc_error(n1, "vcoin_oraclePriceAnalysis", {"timeframe": "2w"}))
    recorded_api.up = False  # the source goes down: stored data, said so
    d = n1.rpc.call("vcoin_oraclePriceAnalysis", {"symbol": "QUBIC", "timeframe": "1d"})
    assert "upstream error (HTTP 503)" in d["source"]["status"], d["source"]
    assert d["source"]["served_from"] == "stored data"
    st = n1.rpc.call("vcoin_oracleStatus")
    assert st["sources"][0]["failures"] == 1 and recorded_api.hits > hits
    assert st["cache"]["price_analysis"]["hits"] == 1 and st["cache"]["sentiment"]["hits"] == 1
    metrics_url = n1.info["rpc_url"] + "/metrics"
    with urllib.request.urlopen(urllib.request.Request(metrics_url, headers=n1.rpc.auth)) as resp:
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
    cluster: Cluster, chain: Chain, recorded_api: RecordedAPI
) -> None:
    """Three oracle nodes on anvil; node 3 reads a feed with every price 1.5x. The
    weighted median is the honest price, node 3 is flagged and loses reputation, nodes 1
    and 2 sign, and the answer is anchored."""
    bad = RecordedAPI(scale=1.5)
    try:
        for i, api in ((1, recorded_api), (2, recorded_api), (3, bad)):
            (cluster.base / f"node{i}").mkdir(parents=True, exist_ok=True)
            (cluster.base / f"node{i}" / "config.toml").write_text(api.oracle_toml(NO_POLLS))
        n1 = cluster.start(1, extra=chain.flags())
        nodes = [n1, *(cluster.start(i, bootstrap=n1, extra=chain.flags(), wait=False)
                       for i in (2, 3))]  # fmt: skip
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
        bad.close()


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
