"""A real HTTP server on loopback that answers like CoinGecko, NewsAPI and Reddit from
the recorded responses in ``tests/vectors`` (the oracle's tests, benchmark and any
offline devnet use it; no traffic leaves the machine).

News is moved in time so that its newest item is an hour old whenever it is served;
``scale`` multiplies every price (a manipulated feed); ``up = False`` answers 503.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


def _load(*parts: str) -> Any:
    return json.loads(VECTORS.joinpath(*parts).read_text())


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def recorded(path: str, scale: float = 1.0) -> Any:
    """The recorded answer for a request path ({} for paths with none)."""
    if "/market_chart" in path:
        doc = _load("coingecko", "market_chart_qubic_30d.json")
        if scale != 1.0:
            doc["prices"] = [[t, p * scale] for t, p in doc["prices"]]
        return doc
    if "/everything" in path:
        doc = _load("news", "newsapi_everything_qubic.json")
        newest = max(_ts(a["publishedAt"]) for a in doc["articles"] if a["title"])
        for a in doc["articles"]:
            moved = _ts(a["publishedAt"]) + time.time() - 3600 - newest
            a["publishedAt"] = datetime.fromtimestamp(moved, UTC).isoformat()
        return doc
    if "/search.json" in path:
        doc = _load("news", "reddit_search_qubic.json")
        newest = max(c["data"]["created_utc"] for c in doc["data"]["children"])
        for c in doc["data"]["children"]:
            c["data"]["created_utc"] += time.time() - 3600 - newest
        return doc
    return {}


class RecordedAPI:
    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.up = True
        self.hits = 0
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.hits += 1
                if not api.up:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = json.dumps(recorded(self.path, api.scale)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.root = f"http://127.0.0.1:{self._server.server_address[1]}"

    def oracle_toml(self, extra: str = "") -> str:
        """A node's ``[oracle]`` section reading from this server."""
        return (f'[oracle]\nenabled = true\ncoingecko_url = "{self.root}/api/v3"\n'
                f'newsapi_url = "{self.root}/v2"\nnewsapi_key = "recorded"\n'
                f'reddit_url = "{self.root}"\n{extra}')  # fmt: skip

    def close(self) -> None:
        self._server.shutdown()
