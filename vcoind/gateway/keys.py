"""API keys at the gateway: who is asking, and whether their minute's budget has room.

Each key has a limit on requests per minute (``rpm``) and on generated tokens per minute
(``tpm``), over a sliding 60 s window; a request over either is answered 429 with
``Retry-After`` (the seconds until the window has room again). Tokens count when a
request ends (what the model generated). Usage goes to SQLite (``api_keys``), to
``vcoin_gateway_requests_total`` / ``vcoin_gateway_tokens_total`` and to
``vcoin_apiKeys``.
"""

from __future__ import annotations

import math
import time
from collections import deque

from vcoind.metrics import NodeMetrics
from vcoind.store.apikeys import ApiKey, ApiKeyStore

WINDOW_S = 60.0
COOKIE = "cookie"  # the metrics' key label for requests made with the RPC cookie


class KeyLimits:
    def __init__(self, keys: ApiKeyStore, metrics: NodeMetrics) -> None:
        self._keys = keys
        self._metrics = metrics
        self._live: dict[str, ApiKey] = {}  # id -> the key as last looked up
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}

    async def check(self, key: str) -> str | None:
        """The guard's question: the id of the live key ``key`` is, or None. Looked up
        every time, so a revoked key stops working at once."""
        found = await self._keys.lookup(key)
        if found is None:
            return None
        self._live[found.id] = found
        return found.id

    def admit(self, key_id: str, now: float | None = None) -> float | None:
        """Count a request of ``key_id``; None if it may go, else the seconds to wait."""
        key = self._live.get(key_id)
        if key is None:
            return None
        now = time.monotonic() if now is None else now
        reqs = self._requests.setdefault(key_id, deque())
        toks = self._tokens.setdefault(key_id, deque())
        while reqs and reqs[0] <= now - WINDOW_S:
            reqs.popleft()
        while toks and toks[0][0] <= now - WINDOW_S:
            toks.popleft()
        wait = 0.0
        if key.rpm and len(reqs) >= key.rpm:
            wait = reqs[len(reqs) - key.rpm] + WINDOW_S - now
        used = sum(n for _, n in toks)
        if key.tpm and used >= key.tpm:
            over, acc = used - key.tpm, 0
            for t, n in toks:  # the oldest entries whose going makes room
                acc += n
                if acc > over:
                    wait = max(wait, t + WINDOW_S - now)
                    break
        if wait > 0:
            self._metrics.gateway_requests.labels(key_id, "limited").inc()
            return wait
        reqs.append(now)
        return None

    async def done(self, key_id: str | None, ok: bool, tokens: int) -> None:
        """A request ended: its outcome and the tokens it generated."""
        label = key_id or COOKIE
        self._metrics.gateway_requests.labels(label, "ok" if ok else "error").inc()
        self._metrics.gateway_tokens.labels(label).inc(tokens)
        if key_id is None:
            return
        if tokens:
            self._tokens.setdefault(key_id, deque()).append((time.monotonic(), tokens))
        await self._keys.add_usage(key_id, 1, tokens)


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
