"""What an origin measured of each worker, so that selection does not run on claims.

A bid's health, queue and ETA are the bidder's own words: a sybil bidding perfect
figures would win every slot. The origin ranks on what it saw instead:

- ``tokens_per_s``: tokens of our completed attempts over the time from assignment to
  result, as we clocked it (queueing included), smoothed (EWMA). A peer we never
  measured is ranked at ``UNMEASURED_TOKENS_PER_S`` at most, whatever it claims.
- ``health``: its completion record with us, ``(completed + 1) / (attempts + 2)`` (0.5
  for a stranger; a bidder that accepts and stalls falls below it), times the health
  this node computes for it from its heartbeats (``NetworkView.health_of``: their
  timeliness and its invalid gossip, not a figure the bid names).
- ``queue``: the larger of its claim and the tasks we have in flight on it.

``adjust`` rewrites a bid with these figures before the strategy ranks it.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from vcoind.market.messages import TaskBid

UNMEASURED_TOKENS_PER_S = 20.0  # what a stranger's claim is capped at
EWMA_ALPHA = 0.3
PEERS_KEPT = 4096  # least recently seen peers are forgotten beyond this


@dataclass
class PeerRecord:
    completed: int = 0
    failed: int = 0
    tokens_per_s: float | None = None

    @property
    def reliability(self) -> float:
        return (self.completed + 1) / (self.completed + self.failed + 2)


class Observations:
    def __init__(self, peers_kept: int = PEERS_KEPT) -> None:
        self._peers: OrderedDict[str, PeerRecord] = OrderedDict()
        self._kept = peers_kept

    def get(self, peer: str) -> PeerRecord:
        return self._peers.get(peer) or PeerRecord()

    def _record(self, peer: str) -> PeerRecord:
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = PeerRecord()
            while len(self._peers) > self._kept:
                self._peers.popitem(last=False)
        self._peers.move_to_end(peer)
        return rec

    def completed(self, peer: str, tokens: int, seconds: float) -> None:
        """An attempt of ours on ``peer`` returned ``tokens`` after ``seconds``."""
        rec = self._record(peer)
        rec.completed += 1
        if tokens > 0 and seconds > 0:
            tps = tokens / seconds
            old = rec.tokens_per_s
            rec.tokens_per_s = tps if old is None else old + EWMA_ALPHA * (tps - old)

    def failed(self, peer: str) -> None:
        """An attempt of ours on ``peer`` failed, was refused or stalled."""
        self._record(peer).failed += 1

    def adjust(
        self, bid: TaskBid, in_flight: int, max_new_tokens: int, view_health: float
    ) -> TaskBid:
        """``bid`` with what we measured in place of what it claims."""
        rec = self.get(bid.peer_id)
        tps = rec.tokens_per_s
        if tps is None:
            tps = min(bid.tokens_per_s, UNMEASURED_TOKENS_PER_S)
        tps = max(tps, 1e-3)
        queue = max(bid.queue_length, in_flight)
        eta = (queue + 1) * max_new_tokens / tps
        health = rec.reliability * min(max(view_health, 0.0), 1.0)
        return dataclasses.replace(bid, health=round(health, 6), queue_length=queue,
                                   tokens_per_s=round(tps, 3), eta_s=round(eta, 4))  # fmt: skip
