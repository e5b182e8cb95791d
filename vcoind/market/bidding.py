"""Bidding, the origin's first step: announce a task, gather its bids, rank them.

Tasks waiting to be announced leave together (one ``TaskAnnounce`` per burst, so one
``Bid`` per bidder per burst as well); this node bids on them too. Bids come to the
origin alone, on ``/vcoin/bid/1.0.0`` (``Origin.on_direct_bid``). The bid window closes
early once every node known to serve the model has bid (a consensus task short of replicas
waits a few windows more for known servers), and the bids are ranked
with the configured strategy, then by reputation, on what this origin measured of each
bidder rather than what the bid claims (``vcoind.market.observed``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

import trio

from vcoind.config import MarketConfig
from vcoind.consensus.reputation import DEFAULT_REPUTATION
from vcoind.market.live import LiveTask, since
from vcoind.market.messages import MAX_BATCH, AnnouncedTask, Bid, TaskAnnounce, TaskBid
from vcoind.market.observed import Observations
from vcoind.market.payments import Payments
from vcoind.market.selection import SelectionState, rank
from vcoind.presence.view import NetworkView
from vcoind.store import BidRow, TaskStore

log = logging.getLogger("vcoind.origin")

REANNOUNCE_S = 1.0
# A restarted origin waits at most this long to hear again from a node serving a resumed
# task's model before it announces it: its no-bid timeout is for the network's answer, not
# for reconnecting to it.
REJOIN_S = 60.0
# A consensus task with fewer bids than replicas when its window closes, while nodes known
# to serve the model have not bid, waits up to this many more windows for them.
SHORT_OF_REPLICAS_WINDOWS = 4
LOW_REPUTATION = DEFAULT_REPUTATION / 2


class Bidding:
    """The origin's announcements and the bids for its live tasks (``live``, by id)."""

    def __init__(
        self,
        tasks: TaskStore,
        config: MarketConfig,
        live: Mapping[str, LiveTask],
        *,
        peer_id: str,
        network: str,
        publish_announce: Callable[[TaskAnnounce], Awaitable[None]],
        local_bid: Callable[[str, list[AnnouncedTask]], Bid | None],
        view: NetworkView,
        reputations: Callable[[list[str]], Awaitable[dict[str, float]]],
        payments: Payments | None = None,
    ) -> None:
        self._tasks = tasks
        self.payments = payments  # settlement v2: bids checked against the ticket
        self._config = config
        self._live = live
        self._peer_id = peer_id
        self._network = network
        self._publish_announce = publish_announce
        self._local_bid = local_bid
        self._view = view
        self._reputations = reputations
        self._to_announce: list[AnnouncedTask] = []
        self._announce_wake = trio.Event()
        # What the ranking remembers between choices (assignment counts the tasks each
        # peer has in flight in it).
        self.selection = SelectionState()
        # What we measured of each worker: bids are ranked on it, not on their claims.
        self.observed = Observations()

    def take(self, bid: Bid) -> None:
        """A bid addressed to this origin: its task bids join their live tasks."""
        for tb in bid.task_bids():
            live = self._live.get(tb.task_id)
            if live is None:
                continue  # not ours, or already decided
            if not self._view.eligible(tb.peer_id):
                log.debug("bid of %s for %s ignored: not staked", tb.peer_id, tb.task_id)
                continue
            st = live.ticket
            if st is not None and self.payments is not None:
                why = self.payments.bid_refusal(st, tb.peer_id, tb.price_per_token, tb.signature)
                if why is not None:
                    log.info("bid of %s for %s ignored: %s", tb.peer_id, tb.task_id, why)
                    continue
            if all(b.peer_id != tb.peer_id for b in live.bids):
                live.bids.append(tb)
                live.wake()

    def taking_bids(self, task_id: str) -> bool:
        """Whether ``task_id`` is ours, announced and not yet decided."""
        live = self._live.get(task_id)
        return live is not None and "announced_s" in live.dispatch and "bids_s" not in live.dispatch

    def _announce(self, task: AnnouncedTask) -> None:
        self._to_announce.append(task)
        self._announce_wake.set()

    async def announcer(self) -> None:
        """Send queued tasks in as few announcements as possible; bid on them ourselves."""
        while True:
            await self._announce_wake.wait()
            self._announce_wake = trio.Event()
            while self._to_announce:
                batch = self._to_announce[:MAX_BATCH]
                del self._to_announce[:MAX_BATCH]
                # drop finished tasks and repeats (re-announced while still queued)
                batch = list({t.task_id: t for t in batch if t.task_id in self._live}.values())
                if not batch:
                    continue
                own = self._local_bid(self._peer_id, batch)
                if own is not None:
                    self.take(own)
                for t in batch:
                    self._live[t.task_id].dispatch.setdefault("announced_s", since(
                        self._live[t.task_id].row))  # fmt: skip
                ann = TaskAnnounce(self._network, self._peer_id, 0, 0.0, tuple(batch))
                try:  # seq and timestamp are stamped by gossip
                    await self._publish_announce(ann)
                except Exception as exc:  # the tasks' drivers announce again within 1 s
                    log.warning("announcing %d task(s) failed: %s", len(batch), exc)

    async def rejoined(self, model: str) -> bool:
        """Wait (up to ``REJOIN_S``) until a node serving ``model`` is in the peer view:
        after a restart the network comes back a heartbeat at a time."""
        with trio.move_on_after(REJOIN_S):
            while not self._view.serving(model):
                await trio.sleep(0.2)
            return True
        log.info("no node serving %s heard from %g s after the restart", model, REJOIN_S)
        return False

    async def collect(self, live: LiveTask, want: int = 1) -> list[TaskBid]:
        """Announce and gather bids; ranked, minus peers that already failed this task.

        The window closes early once every node known to serve the model has bid and
        there are ``want`` bids (replicas of a consensus task), else after ``bid_window_s``.
        """
        cfg = self._config
        live.bids = []
        live.dispatch.clear()
        row = live.row
        task = AnnouncedTask(
            task_id=row.id, model=row.model,
            max_new_tokens=int(row.parameters.get("max_new_tokens", 64)),
            input_chars=len(row.input), priority=row.priority, max_price=row.max_price,
            task_type=row.type, adapter=str(row.parameters.get("adapter", "")),
            ticket=live.ticket,
        )  # fmt: skip
        self._announce(task)
        # Announce again while nobody has bid: a node that just (re)started may not be
        # connected yet when the first announcement goes out.
        with trio.move_on_after(cfg.no_bid_timeout_s):
            while not live.bids and not live.cancelled:
                with trio.move_on_after(REANNOUNCE_S) as wait:
                    await live.changed.wait()
                if wait.cancelled_caught:
                    self._announce(task)
        # The window closes early once every node known to serve the model has bid.
        expected = self._view.serving(row.model)

        def enough() -> bool:
            bidders = {b.peer_id for b in live.bids}
            return expected <= bidders and len(bidders) >= want

        with trio.move_on_after(cfg.bid_window_s):
            while not live.cancelled and not enough():
                await live.changed.wait()

        def short() -> bool:  # a consensus task without its replicas, known servers silent
            bidders = {b.peer_id for b in live.bids}
            return len(bidders) < want and bool(expected - bidders)

        # A consensus task short of replicas while known servers have not bid yet (a busy
        # node's bid is late) waits a little longer for them rather than run with fewer.
        with trio.move_on_after(SHORT_OF_REPLICAS_WINDOWS * cfg.bid_window_s):
            while not live.cancelled and short():
                await live.changed.wait()
        live.dispatch["bids_s"] = since(row)
        await self._tasks.add_bids(row.id, [_bid_row(b) for b in live.bids])
        flight = self.selection.in_flight
        bids = [self.observed.adjust(b, flight.get(b.peer_id, 0), task.max_new_tokens,
                                     self._view.health_of(b.peer_id))
                for b in live.bids if b.peer_id not in live.tried]  # fmt: skip
        reps = await self._reputations([b.peer_id for b in bids])
        # No checkpoint from here to the caller's Assignment.attempt, which counts the
        # winner in flight: tasks whose windows close together must see each other's
        # choices (least_connections would otherwise send a whole burst to one peer).
        strategy = str(row.parameters.get("strategy") or cfg.strategy)  # the task's, or ours
        ranked = [b for b in rank(strategy, row.id, bids, self.selection)
                  if isinstance(b, TaskBid)]  # fmt: skip
        # Reputation (earned in consensus rounds) decides who goes first: peers that fell
        # under LOW_REPUTATION are only used when nobody else bid.
        return sorted(
            ranked, key=lambda b: reps.get(b.peer_id, DEFAULT_REPUTATION) < LOW_REPUTATION
        )


def _bid_row(b: TaskBid) -> BidRow:
    """The stored bid: its price is the bidder's price per token, in VCOIN."""
    return BidRow(b.peer_id, b.price_per_token / 1e18, b.eta_s, b.health, b.queue_length,
                  b.tokens_per_s, b.timestamp)  # fmt: skip
