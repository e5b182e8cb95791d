"""Gossip topics, validation and dispatch.

Every gossip record carries ``network``, ``peer_id``, ``seq`` and ``timestamp``.
A topic validator decodes the message (size limit first), checks that the
record's ``peer_id`` is the envelope's signer, that it belongs to our network,
is neither stale nor from the future, and that its ``seq`` is newer than the
last one accepted from that sender (replays and late duplicates are dropped).
Each rejection is counted by reason; forwarders of malformed, oversized,
unsigned or forged messages are penalised and, past a threshold, blacklisted.
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

from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import decode, encode
from vcoind.p2p.errors import CodecError
from vcoind.p2p.host import P2PHost

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


class Gossip:
    def __init__(
        self,
        p2p: P2PHost,
        network: str,
        metrics: NodeMetrics,
        *,
        max_age_s: float,
        max_invalid: int,
    ) -> None:
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

    def topic(self, name: str) -> str:
        return topic_name(self._network, name)

    def on(self, name: str, cls: type[Any], handler: Handler, check: Check | None = None) -> None:
        """Route valid ``cls`` records on topic ``name`` to ``handler`` (before run()).

        A topic may carry several kinds; each record must carry ``network``,
        ``peer_id``, ``seq`` and ``timestamp``.
        """
        self._routes.setdefault(self.topic(name), {})[cls.KIND] = _Route(cls, handler, check)

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
            if n >= self._max_invalid and forwarder not in self._blacklisted:
                log.warning(
                    "blacklisting %s for %d s: %d invalid gossip messages", fwd, int(BLACKLIST_S), n
                )
                self._blacklisted[forwarder] = trio.current_time() + BLACKLIST_S
                self._metrics.peers_blacklisted.inc()
                # Not pubsub.add_to_blacklist: its stream teardown task races the dead-peer
                # handler (both `del peers[id]`; the loser's KeyError stops pubsub and with
                # it the daemon). Mark the peer and hang up; the dead-peer handler cleans up.
                self._p2p.pubsub.blacklisted_peers.add(forwarder)
                if self._nursery is not None:
                    self._nursery.start_soon(self._hang_up, forwarder)
        return False

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
            now = trio.current_time()
            for peer, until in list(self._blacklisted.items()):
                if until <= now:
                    del self._blacklisted[peer]
                    self._invalid_from.pop(peer.to_base58(), None)
                    self._p2p.pubsub.remove_from_blacklist(peer)
