"""Gossip topics, validation and dispatch.

Every gossip record carries ``network``, ``peer_id``, ``seq`` and ``timestamp``.
A topic validator decodes the message (size limit first), checks that the
record's ``peer_id`` is the envelope's signer, that it belongs to our network,
is neither stale nor from the future, and that its ``seq`` is newer than the
last one accepted from that sender (replays and late duplicates are dropped).
Each rejection is counted by reason; forwarders of malformed, oversized,
unsigned or forged messages are penalised and, past a threshold, blacklisted.

Valid messages have budgets too (token buckets per sender and kind, bytes per sender,
identities new to us per forwarder): over budget a message is ignored (not forwarded)
and counted, and its forwarder's GossipSub score drops (a behaviour penalty that decays;
our reputation of the peer is the application-specific score). A peer whose score falls
below ``p2p.graylist_threshold`` is graylisted: everything it sends is ignored for
``p2p.graylist_s``; graylisted three times within ``STRIKE_WINDOW_S`` it is disconnected
and blacklisted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from vcoind.config import P2PConfig
from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import decode, encode
from vcoind.p2p.errors import CodecError
from vcoind.p2p.host import P2PHost
from vcoind.p2p.policy import Budgets, Limit

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale stubs shadow trio's own types for mypy.
    from trio_typing import TaskStatus

log = logging.getLogger("vcoind.gossip")

TOPIC_NAMES = ("heartbeat", "tasks", "votes")
MAX_CLOCK_SKEW_S = 30.0
BLACKLIST_S = 600.0
REPLAY_WINDOW = 1024
# Rejections that prove the forwarder misbehaves (stale/replayed ones can be honest relays).
PENALISED = frozenset(
    {"malformed", "oversized", "unsigned", "sender_mismatch", "forged", "wrong_network"}
)

# Graylisted this many times within the window: disconnected and blacklisted.
STRIKES = 3
STRIKE_WINDOW_S = 600.0
# Score lost per message over budget: its sender forwarding it, or a relay (an honest
# relay only forwards what it accepted, so it overruns our budget only by timing jitter).
PENALTY_SENDER = 1.0
PENALTY_RELAY = 0.1
PENALTY_INVALID = 5.0
# Which budget a record kind spends; kinds not listed spend the "votes" budget.
KIND_BUDGETS = {
    "heartbeat": "heartbeats",
    "beat": "heartbeats",
    "task_announce": "announces",
    "bid": "bids",
}

Handler = Callable[[Any], Awaitable[None]]
# Extra per-kind check: returns a rejection reason or None.
Check = Callable[[Any], str | None]


class ReplayWindow:
    """Sequence numbers seen from one sender (IPsec-style sliding window).

    Gossip can deliver a sender's messages out of order (they race along different
    mesh paths), so "newer than the last" would drop honest messages. A message is
    fresh if its seq was not seen and is within ``size`` of the highest seen.
    """

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.highest = -1
        self.updated = 0.0  # unix time of the last accepted message
        self._seen: set[int] = set()

    def fresh(self, seq: int) -> bool:
        return seq > self.highest - self.size and seq not in self._seen

    def add(self, seq: int) -> None:
        self.updated = time.time()
        self._seen.add(seq)
        if seq > self.highest:
            self.highest = seq
            floor = seq - self.size
            if len(self._seen) > 2 * self.size:
                self._seen = {s for s in self._seen if s > floor}


def topic_name(network: str, name: str) -> str:
    return f"/vcoin/{network}/{name}/1"


@dataclass
class _Route:
    cls: type[Any]
    handler: Handler
    check: Check | None
    known: Callable[[str], bool] | None


def budget_limits(cfg: P2PConfig) -> dict[str, Limit]:
    return {
        name: Limit(*getattr(cfg, f"budget_{name}"))
        for name in ("heartbeats", "announces", "bids", "votes", "bytes", "new_identities")
    }


class Gossip:
    def __init__(
        self,
        p2p: P2PHost,
        network: str,
        metrics: NodeMetrics,
        *,
        max_age_s: float,
        max_invalid: int,
        cfg: P2PConfig | None = None,
    ) -> None:
        cfg = cfg or P2PConfig()
        self._p2p = p2p
        self._network = network
        self._metrics = metrics
        self._max_age_s = max_age_s
        self._max_invalid = max_invalid
        self._routes: dict[str, dict[str, _Route]] = {}  # topic -> kind -> route
        self._replay: dict[tuple[str, str], ReplayWindow] = {}
        self._decoded: OrderedDict[bytes, Any] = OrderedDict()
        self._invalid_from: dict[str, int] = {}
        self._valid_from: dict[str, int] = {}
        self._blacklisted: dict[ID, float] = {}
        self._self_b58 = p2p.peer_id.to_base58()
        self._nursery: trio.Nursery | None = None
        self._publish_lock = trio.Lock()
        # Strictly increasing across restarts, so peers never take a new message for a replay.
        self._seq = time.time_ns() // 1000
        self._short_names = {self.topic(n): n for n in TOPIC_NAMES}
        self.budgets = Budgets(budget_limits(cfg))
        self._graylist_at = cfg.graylist_threshold
        self._graylist_s = cfg.graylist_s
        self._graylisted: dict[ID, float] = {}  # peer -> until (trio clock)
        self._strikes: dict[ID, list[float]] = {}
        self._app_score: Callable[[str], float] = lambda peer: 0.0
        p2p.configure_scoring(cfg.graylist_threshold, self._app_score_of)
        p2p.pubsub.set_gate(self._admit)

    def topic(self, name: str) -> str:
        return topic_name(self._network, name)

    def on(
        self,
        name: str,
        cls: type[Any],
        handler: Handler,
        check: Check | None = None,
        *,
        known: Callable[[str], bool] | None = None,
    ) -> None:
        """Route valid ``cls`` records on topic ``name`` to ``handler`` (before run()).

        A topic may carry several kinds; each record must carry ``network``,
        ``peer_id``, ``seq`` and ``timestamp``. With ``known``, records from senders it
        does not know spend the forwarder's budget of new identities.
        """
        route = _Route(cls, handler, check, known)
        self._routes.setdefault(self.topic(name), {})[cls.KIND] = route

    def use_app_score(self, fn: Callable[[str], float]) -> None:
        """The application-specific part of a peer's gossip score (our reputation of it)."""
        self._app_score = fn

    def _app_score_of(self, peer: ID) -> float:
        return self._app_score(peer.to_base58())

    def score(self, peer: ID) -> float:
        return self._p2p.score(peer)

    def graylisted(self) -> set[str]:
        now = trio.current_time()
        return {p.to_base58() for p, until in self._graylisted.items() if until > now}

    async def publish(self, name: str, record: Any) -> None:
        """Stamp ``seq`` and ``timestamp`` and publish.

        Stamping and publishing happen under one lock, so our messages leave in ``seq``
        order: receivers (and our own validator) drop anything older than the last
        ``seq`` they saw from us, and concurrent publishers would otherwise race.
        """
        topic = self.topic(name)
        async with self._publish_lock:
            self._seq += 1
            record = dataclasses.replace(record, seq=self._seq, timestamp=time.time())
            await self._p2p.pubsub.publish(topic, encode(record))
        self._metrics.gossip_out.labels(topic=name).inc()

    def error_rate(self, peer_id: str) -> float:
        """Share of a peer's forwarded messages we rejected as invalid."""
        bad = self._invalid_from.get(peer_id, 0)
        total = bad + self._valid_from.get(peer_id, 0)
        return bad / total if total else 0.0

    # --- validation -------------------------------------------------------

    def _reject(self, topic: str, reason: str, forwarder: ID) -> bool:
        # Label only our own topics: a metric label per attacker-chosen topic would grow
        # without bound.
        short = self._short_names.get(topic, "other")
        self._metrics.gossip_rejected.labels(topic=short, reason=reason).inc()
        fwd = forwarder.to_base58()
        log.debug("rejected %s message from %s: %s", short, fwd, reason)
        if reason in PENALISED and fwd != self._self_b58:
            n = self._invalid_from[fwd] = self._invalid_from.get(fwd, 0) + 1
            self._penalise(forwarder, PENALTY_INVALID)
            if n >= self._max_invalid:
                self._blacklist(forwarder, f"{n} invalid gossip messages")
        return False

    def _blacklist(self, peer: ID, why: str) -> None:
        if peer in self._blacklisted:
            return
        log.warning("blacklisting %s for %d s: %s", peer.to_base58(), int(BLACKLIST_S), why)
        self._blacklisted[peer] = trio.current_time() + BLACKLIST_S
        self._metrics.peers_blacklisted.inc()
        # Not pubsub.add_to_blacklist: its stream teardown task races the dead-peer
        # handler (both `del peers[id]`; the loser's KeyError stops pubsub and with
        # it the daemon). Mark the peer and hang up; the dead-peer handler cleans up.
        self._p2p.pubsub.blacklisted_peers.add(peer)
        if self._nursery is not None:
            self._nursery.start_soon(self._hang_up, peer)

    # --- budgets, score and graylist -----------------------------------------------

    def _ignore(self, kind: str, reason: str, forwarder: ID, penalty: float) -> bool:
        """A valid message over budget: not forwarded, counted, its forwarder penalised."""
        self._metrics.gossip_ignored.labels(kind=kind, reason=reason).inc()
        if forwarder.to_base58() != self._self_b58:
            self._penalise(forwarder, penalty)
        return False

    def penalise(self, peer: ID, amount: float) -> None:
        """Lower a peer's score for misbehaviour seen outside gossip (bad model bytes, ...);
        past the threshold it is graylisted like a gossip offender."""
        self._penalise(peer, amount)

    def _penalise(self, peer: ID, amount: float) -> None:
        self._p2p.penalise(peer, amount)
        if peer not in self._graylisted and self.score(peer) < self._graylist_at:
            self._graylist(peer)

    def _graylist(self, peer: ID) -> None:
        now = trio.current_time()
        self._graylisted[peer] = now + self._graylist_s
        self._metrics.peers_graylisted.inc()
        strikes = [t for t in self._strikes.get(peer, []) if t > now - STRIKE_WINDOW_S]
        strikes.append(now)
        self._strikes[peer] = strikes
        log.warning("graylisting %s for %.0f s: gossip score %.1f (strike %d)",
                    peer.to_base58(), self._graylist_s, self.score(peer), len(strikes))  # fmt: skip
        if len(strikes) >= STRIKES:
            self._blacklist(peer, f"graylisted {len(strikes)} times")

    def _admit(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """Pubsub's gate, before signatures and validators: drop a graylisted peer's
        messages (cheap: nothing is decoded or verified)."""
        until = self._graylisted.get(forwarder)
        if until is not None:
            if until > trio.current_time():
                topic = msg.topicIDs[0] if msg.topicIDs else ""
                short = self._short_names.get(topic, "other")
                self._metrics.gossip_ignored.labels(kind=short, reason="graylisted").inc()
                return False
            del self._graylisted[forwarder]
        return True

    def _spend(self, route: _Route, rec: Any, forwarder: ID, size: int) -> str | None:
        """Charge a valid record to its budgets; the reason it is over budget, or None."""
        now = time.monotonic()
        fwd = forwarder.to_base58()
        if (
            route.known is not None
            and not route.known(rec.peer_id)
            and not self.budgets.take("new_identities", fwd, now)
        ):
            return "new_identities"
        kind_budget = KIND_BUDGETS.get(route.cls.KIND, "votes")
        if not self.budgets.take(kind_budget, rec.peer_id, now):
            return "budget"
        if not self.budgets.take("bytes", rec.peer_id, now, float(size)):
            return "bytes"
        return None

    async def _hang_up(self, peer: ID) -> None:
        try:
            await self._p2p.host.disconnect(peer)
        except Exception as exc:  # a peer already gone is not our error
            log.debug("disconnecting %s: %s", peer.to_base58(), exc)

    def on_bad_signature(self, forwarder: ID, msg: rpc_pb2.Message) -> None:
        for topic in msg.topicIDs or ["other"]:
            self._reject(topic, "unsigned", forwarder)

    def _validator(
        self, topic: str, routes: dict[str, _Route]
    ) -> Callable[[ID, rpc_pb2.Message], bool]:
        limit = max(r.cls.MAX_BYTES for r in routes.values())

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            if len(msg.data) > limit:
                return self._reject(topic, "oversized", forwarder)
            try:
                rec: Any = decode(msg.data)
                route = routes.get(rec.KIND)
                if route is None:
                    raise CodecError(f"{rec.KIND} does not belong on this topic")
            except CodecError as exc:
                log.debug("malformed gossip from %s: %s", forwarder, exc)
                return self._reject(topic, "malformed", forwarder)
            try:
                signer = ID(msg.from_id).to_base58()
            except Exception:  # a garbage from-id: base58 of arbitrary bytes can fail
                return self._reject(topic, "sender_mismatch", forwarder)
            if rec.peer_id != signer:
                return self._reject(topic, "sender_mismatch", forwarder)
            if rec.network != self._network:
                return self._reject(topic, "wrong_network", forwarder)
            now = time.time()
            if rec.timestamp > now + MAX_CLOCK_SKEW_S:
                return self._reject(topic, "future", forwarder)
            if rec.timestamp < now - self._max_age_s:
                return self._reject(topic, "stale", forwarder)
            window = self._replay.get((route.cls.KIND, rec.peer_id))
            if window is not None and not window.fresh(rec.seq):
                return self._reject(topic, "replayed", forwarder)
            if route.check is not None and (reason := route.check(rec)) is not None:
                return self._reject(topic, reason, forwarder)
            if signer != self._self_b58 and (
                over := self._spend(route, rec, forwarder, len(msg.data))
            ):
                sent_it = forwarder.to_base58() == signer
                penalty = PENALTY_SENDER if sent_it or over == "new_identities" else PENALTY_RELAY
                return self._ignore(route.cls.KIND, over, forwarder, penalty)
            if window is None:
                window = self._replay[(route.cls.KIND, rec.peer_id)] = ReplayWindow()
            window.add(rec.seq)
            fwd = forwarder.to_base58()
            self._valid_from[fwd] = self._valid_from.get(fwd, 0) + 1
            self._decoded[msg.from_id + msg.seqno] = rec
            while len(self._decoded) > 4096:
                self._decoded.popitem(last=False)
            return True

        return validate

    # --- service ----------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pubsub = self._p2p.pubsub
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name in TOPIC_NAMES:
                topic = self.topic(name)
                routes = self._routes.get(topic)
                if routes is None:
                    continue  # reserved: not subscribed until a service handles it
                pubsub.set_topic_validator(topic, self._validator(topic, routes), False)
                sub = await pubsub.subscribe(topic)
                nursery.start_soon(self._receive, name, routes, sub)
            nursery.start_soon(self._housekeeping)
            task_status.started()

    async def _receive(self, name: str, routes: dict[str, _Route], sub: Any) -> None:
        async for msg in sub:
            rec = self._decoded.pop(msg.from_id + msg.seqno, None)
            if rec is None or rec.peer_id == self._self_b58:
                continue  # our own publication, or evicted (cannot happen below 4096 in flight)
            self._metrics.gossip_in.labels(topic=name).inc()
            try:
                await routes[rec.KIND].handler(rec)
            except Exception:  # a bug in one handler must not take the node down
                log.exception("handler for %s gossip failed", name)

    def prune(self, now: float) -> None:
        """Forget replay windows idle longer than the maximum message age.

        Safe: any message they could still reject is now rejected as stale.
        """
        for key, window in list(self._replay.items()):
            if window.updated < now - self._max_age_s:
                del self._replay[key]

    async def _housekeeping(self) -> None:
        while True:
            await trio.sleep(10)
            self.prune(time.time())
            self.budgets.prune(time.monotonic())
            now = trio.current_time()
            for peer, until in list(self._graylisted.items()):
                if until <= now:
                    del self._graylisted[peer]
            for peer, strikes in list(self._strikes.items()):
                if strikes[-1] <= now - STRIKE_WINDOW_S:
                    del self._strikes[peer]
            for peer, until in list(self._blacklisted.items()):
                if until <= now:
                    del self._blacklisted[peer]
                    self._invalid_from.pop(peer.to_base58(), None)
                    self._p2p.pubsub.remove_from_blacklist(peer)
