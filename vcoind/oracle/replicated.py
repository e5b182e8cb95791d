"""Oracle answers agreed by several nodes.

The node asked (the origin) sends an ``OracleQuery`` to ``k`` nodes that run the oracle
(itself included): each fetches and computes on its own and reports its numbers and the
hash of its inputs. The origin combines each number by a reputation-weighted median;
a replica whose key number (the price, or the sentiment score) is further from the
median than the tolerance (the larger of 2 % — 0.05 for a sentiment score — and three
scaled median absolute deviations) is an outlier. The others receive the combined
answer (``OracleConfirm``), check it against their own, and sign the outcome digest of
the consensus issue; outliers lose reputation. A replica signs only the answer to a
query it was asked by that query's origin and computed itself, once, under the unpaid
ticket of that origin's query as the replica computes it; anything else is refused.
With a chain, the answer's hash and the signatures are anchored through ``TaskAnchor``
like any task (model id: the hash of the query, e.g. ``oracle:price:QUBIC:4h``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import trio

from vcoind.chain.typed import DECISIONS, Outcome
from vcoind.consensus.reputation import updated_reputation
from vcoind.market.messages import TASK_ID_RE
from vcoind.market.payments import Payments, unpaid_ticket_of
from vcoind.oracle import OracleError
from vcoind.p2p.codec import Message, lim, message
from vcoind.p2p.streams import StreamProtocolError

log = logging.getLogger("vcoind.oracle")

FIELDS = {
    "price": ("price", "rsi_14", "sma_20"),
    "sentiment": ("sentiment_score", "confidence"),
}
TOLERANCE = {"price": 0.02, "sentiment": 0.05}  # relative for price, absolute for scores
QUERY_TIMEOUT_S = 30.0
MAX_ASKED = 1000  # answers kept for confirmation, in all ...
MAX_ASKED_PER_PEER = 32  # ... and per origin: a flood of queries evicts only its own


@message
@dataclass(frozen=True)
class OracleQuery(Message):
    KIND: ClassVar[str] = "oracle_query"
    MAX_BYTES: ClassVar[int] = 1024

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    # ("kind" is the envelope's own key)
    subject: str = field(metadata=lim(pattern=r"price|sentiment", max_len=16))
    symbol: str = field(default="", metadata=lim(max_len=16))
    window: str = field(default="", metadata=lim(max_len=8))  # timeframe or range


@message
@dataclass(frozen=True)
class OracleReport(Message):
    KIND: ClassVar[str] = "oracle_report"
    MAX_BYTES: ClassVar[int] = 2048

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    values: tuple[float, ...] = field(default=(), metadata=lim(max_len=8))
    input_hash: bytes = field(default=b"", metadata=lim(max_len=32))
    error: str = field(default="", metadata=lim(max_len=512))


@message
@dataclass(frozen=True)
class OracleConfirm(Message):
    KIND: ClassVar[str] = "oracle_confirm"
    MAX_BYTES: ClassVar[int] = 2048

    query: OracleQuery
    values: tuple[float, ...] = field(metadata=lim(max_len=8))
    result_hash: bytes = field(metadata=lim(exact_len=32, max_len=32))
    model_id: str = field(metadata=lim(max_len=80))
    decision: str = field(metadata=lim(max_len=16))
    # the struct hash of the origin's (unpaid) ticket the outcome is signed under; the
    # replica computes it too (it names the origin and ``replicas``, the nodes asked)
    ticket_hash: bytes = field(default=bytes(32), metadata=lim(exact_len=32, max_len=32))
    replicas: int = field(default=1, metadata=lim(min=1, max=1024))


@message
@dataclass(frozen=True)
class OracleSignature(Message):
    KIND: ClassVar[str] = "oracle_signature"
    MAX_BYTES: ClassVar[int] = 1024

    task_id: str = field(metadata=lim(pattern=TASK_ID_RE, max_len=32))
    signature: bytes = field(default=b"", metadata=lim(max_len=65))  # empty: declined
    reason: str = field(default="", metadata=lim(max_len=512))


def query_model_id(q: OracleQuery) -> str:
    """What the anchor's model id names for an oracle answer: the query itself."""
    name = f"oracle:{q.subject}:{q.symbol}:{q.window}"
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def result_hash(q: OracleQuery, values: Sequence[float]) -> bytes:
    canon = json.dumps({"kind": q.subject, "symbol": q.symbol, "window": q.window,
                        "values": [round(v, 12) for v in values]}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(canon.encode()).digest()


def weighted_median(xs: Sequence[float], ws: Sequence[float]) -> float:
    pairs = sorted(zip(xs, ws, strict=True))
    total = sum(w for _, w in pairs)
    acc = 0.0
    for x, w in pairs:
        acc += w
        if acc >= total / 2:
            return x
    return pairs[-1][0]


def outliers(kind: str, xs: Sequence[float], ws: Sequence[float]) -> list[bool]:
    """Which of ``xs`` are further from their weighted median than the tolerance."""
    m = weighted_median(xs, ws)
    mad = sorted(abs(x - m) for x in xs)[len(xs) // 2]
    if kind == "price":
        tol = max(TOLERANCE["price"] * abs(m), 3 * 1.4826 * mad)
    else:
        tol = max(TOLERANCE["sentiment"], 3 * 1.4826 * mad)
    return [abs(x - m) > tol for x in xs]


def within(kind: str, mine: float, combined: float) -> bool:
    tol = TOLERANCE[kind] * (abs(combined) if kind == "price" else 1.0)
    return abs(mine - combined) <= 2 * tol


def _decision(agreeing: int, k: int) -> str:
    if agreeing * 3 >= k * 2:
        return "supermajority"
    return "majority" if agreeing * 2 > k else "none"


class SignRefused(StreamProtocolError):
    """A confirmation this replica will not sign (the peer gets the message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"not signed: {message}")
        self.reason = reason  # the metric's label


@dataclass(frozen=True)
class _Asked:
    origin: str  # the peer that asked
    query: OracleQuery
    values: tuple[float, ...]  # what this node computed


def unpaid_ticket_hash(q: OracleQuery, requester: str, replicas: int) -> bytes:
    """The struct hash of the unpaid ticket an origin signs its oracle answer under
    (``Payments.unpaid_ticket`` of the origin, as any replica can compute it)."""
    return unpaid_ticket_of(requester, q.task_id, query_model_id(q), "oracle", replicas).hash()


@dataclass
class OracleReplica:
    """The replica side: answers queries from the node's own oracle service."""

    service: Any  # vcoind.oracle.service.OracleService
    payments: Payments  # signs the answer as a settlement-v2 outcome
    eth_address_of: Callable[[str], str | None] = lambda peer: None  # the origin's, known
    on_refused: Callable[[str], None] = lambda reason: None
    # task -> who asked, what, and what we computed; dropped once signed
    mine: dict[str, _Asked] = field(default_factory=dict)

    async def compute(self, q: OracleQuery) -> tuple[tuple[float, ...], bytes]:
        if q.subject == "price":
            r = await self.service.price_analysis(q.symbol, q.window or "4h")
            raw = {"price": r["price"], **r["indicators"]}
        else:
            r = await self.service.sentiment(q.window or "24h")
            raw = r
        values = tuple(raw[f] for f in FIELDS[q.subject])
        if any(v is None or not math.isfinite(v) for v in values):
            raise OracleError(f"not enough data for {', '.join(FIELDS[q.subject])}")
        return tuple(float(v) for v in values), bytes.fromhex(r["input_hash"])

    async def on_query(self, peer: str, q: OracleQuery) -> OracleReport:
        asked = self.mine.get(q.task_id)
        if asked is not None and (asked.origin, asked.query) != (peer, q):
            self._refuse("task_taken", f"oracle task {q.task_id} was asked already, "
                         "by another node or with other terms")  # fmt: skip
        try:
            values, inputs = await self.compute(q)
        except OracleError as exc:
            return OracleReport(q.task_id, error=str(exc)[:500])
        self.mine[q.task_id] = _Asked(peer, q, values)
        theirs = [t for t, a in self.mine.items() if a.origin == peer]
        for t in theirs[: max(0, len(theirs) - MAX_ASKED_PER_PEER)]:
            del self.mine[t]
        if len(self.mine) > MAX_ASKED:
            self.mine.pop(next(iter(self.mine)))
        return OracleReport(q.task_id, values, inputs)

    async def on_confirm(self, peer: str, c: OracleConfirm) -> OracleSignature:
        q = c.query
        asked = self.mine.get(q.task_id)
        if asked is None:
            self._refuse("not_asked", f"this node computed no answer to oracle task "
                         f"{q.task_id} (not asked, or signed already)")  # fmt: skip
        if asked.origin != peer:
            self._refuse("other_origin", f"oracle task {q.task_id} was asked by another node")
        if asked.query != q:
            self._refuse("other_query", f"oracle task {q.task_id} was asked with other terms")
        own = asked.values
        if len(c.values) != len(own) or not within(q.subject, own[0], c.values[0]):
            self._refuse("values", f"the answer {c.values[:1]} is far from ours, {own[0]:.6g}")
        if c.result_hash != result_hash(q, c.values) or c.model_id != query_model_id(q):
            self._refuse("result_hash", "the result hash does not match the values")
        if c.decision not in DECISIONS:
            self._refuse("decision", f"no agreement to sign ({c.decision[:16]!r})")
        requester = self.eth_address_of(peer)
        if not requester:
            self._refuse("unknown_origin", "no Ethereum address of yours is known here "
                         "(no heartbeat): no ticket to sign under")  # fmt: skip
        if c.ticket_hash != unpaid_ticket_hash(q, requester, c.replicas):
            self._refuse("ticket", f"the ticket hash is not that of your unpaid oracle task "
                         f"{q.task_id} for {c.replicas} node(s)")  # fmt: skip
        del self.mine[q.task_id]  # one signature per query
        outcome = Outcome(c.result_hash, DECISIONS[c.decision], 0)
        sig = self.payments.sign_outcome_for(q.task_id, c.ticket_hash, outcome)
        return OracleSignature(q.task_id, sig)

    def _refuse(self, reason: str, message: str) -> NoReturn:
        exc = SignRefused(reason, message)
        log.warning("oracle: refused to sign: %s", exc)
        self.on_refused(reason)
        raise exc


@dataclass(frozen=True)
class Reply:
    peer: str
    values: tuple[float, ...]
    input_hash: str
    weight: float
    outlier: bool


async def replicated_query(
    q: OracleQuery,
    peers: Sequence[str],
    send: Callable[[str, Any, type[Any]], Awaitable[Any]],
    reputations: Callable[[list[str]], Awaitable[dict[str, float]]],
    adjust: Callable[[str, Callable[[float], float]], Awaitable[Any]],
    ticket_hash: Callable[[str], bytes] = lambda model_id: bytes(32),
) -> tuple[dict[str, Any], list[tuple[str, bytes]], list[str], str]:
    """Ask ``peers``, combine, confirm. Returns (the answer, [(peer, signature)] of the
    agreeing replicas, outlier peers, decision). ``ticket_hash(model_id)``: the struct
    hash of the origin's unpaid ticket the replicas sign the answer under."""
    reports: dict[str, OracleReport] = {}
    errors: dict[str, str] = {}

    async def ask(peer: str) -> None:
        try:
            with trio.fail_after(QUERY_TIMEOUT_S):
                r = await send(peer, q, OracleReport)
        except Exception as exc:  # a peer that fails or vanishes is left out
            errors[peer] = f"{type(exc).__name__}: {exc}"[:200]
            return
        if r.error or len(r.values) != len(FIELDS[q.subject]) or len(r.input_hash) != 32:
            errors[peer] = r.error or "malformed report"
        elif not all(math.isfinite(v) for v in r.values):
            errors[peer] = "non-finite values"
        else:
            reports[peer] = r

    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(ask, p)
    if len(reports) < 2:
        raise OracleError(f"{len(reports)} of {len(peers)} oracle nodes answered: "
                          f"{'; '.join(f'{p[-6:]}: {e}' for p, e in errors.items())}")  # fmt: skip
    ids = sorted(reports)
    reps = await reputations(ids)
    ws = [max(reps.get(p, 100.0), 1e-6) for p in ids]
    flags = outliers(q.subject, [reports[p].values[0] for p in ids], ws)
    keep = [i for i, f in enumerate(flags) if not f]
    combined = tuple(
        weighted_median([reports[ids[i]].values[j] for i in keep], [ws[i] for i in keep])
        for j in range(len(FIELDS[q.subject]))
    )
    decision = _decision(len(keep), len(peers))
    rhash = result_hash(q, combined)
    model_id = query_model_id(q)
    signatures: list[tuple[str, bytes]] = []
    if decision != "none":
        confirm = OracleConfirm(q, combined, rhash, model_id, decision, ticket_hash(model_id),
                                len(peers))  # fmt: skip

        async def sign(peer: str) -> None:
            try:
                with trio.fail_after(QUERY_TIMEOUT_S):
                    s = await send(peer, confirm, OracleSignature)
            except Exception as exc:
                log.info("oracle %s: no signature from %s: %s", q.task_id, peer, exc)
                return
            if s.signature:
                signatures.append((peer, s.signature))
            else:
                log.info("oracle %s: %s declined: %s", q.task_id, peer, s.reason)

        async with trio.open_nursery() as nursery:
            for i in keep:
                nursery.start_soon(sign, ids[i])
    out = [ids[i] for i, f in enumerate(flags) if f]
    for i, p in enumerate(ids):
        await adjust(p, functools.partial(_moved, "outvoted" if flags[i] else "agreed"))
    answer = {
        "task_id": q.task_id, "kind": q.subject, "symbol": q.symbol, "window": q.window,
        "values": dict(zip(FIELDS[q.subject], combined, strict=True)),
        "decision": decision, "result_hash": rhash.hex(), "model_id": model_id,
        "agreeing_weight": round(sum(ws[i] for i in keep) / sum(ws), 4),
        "replicas": [{"node_id": p, "values": dict(zip(FIELDS[q.subject], reports[p].values,
                                                       strict=True)),
                      "input_hash": reports[p].input_hash.hex(), "weight": ws[i],
                      "outlier": flags[i], "signed": any(s[0] == p for s in signatures)}
                     for i, p in enumerate(ids)],
        "failed": errors, "outliers": out,
    }  # fmt: skip
    return answer, signatures, out, decision


def _moved(event: str, reputation: float) -> float:
    return updated_reputation(reputation, event)


def new_task_id() -> str:
    return secrets.token_hex(16)
