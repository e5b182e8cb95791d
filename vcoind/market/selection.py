"""Choosing the winning bid: pure, deterministic functions.

Every strategy returns the bids in preference order (the first wins, the next
ones are the fallbacks for retries). Ties break by ``sha256(task_id + peer_id)``,
so any node holding the same bids and state can re-check the origin's choice.

- ``round_robin``: each bidder in turn: the one that has had the fewest turns goes first,
  so a bidder missing from some windows (slow to bid, briefly away) is caught up with
  (by at most ``CATCH_UP`` turns) instead of skewing the rotation.
- ``weighted_round_robin``: smooth weighted round robin by measured tokens/s.
- ``least_connections``: fewest tasks this origin has in flight on the peer,
  then the shorter advertised queue.
- ``resource_aware`` (default): highest score
  ``0.4 health + 0.3 / (1 + queue) + 0.3 / (1 + eta_s)``.

``choose_replicas`` picks a consensus round's replicas from the ranked bids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# The names live in the config (it validates market.strategy); the table below must match.
from vcoind.config import STRATEGIES as STRATEGIES
from vcoind.market.votes import MAX_REPLICAS

# round_robin: how many turns a bidder absent from some windows may make up, and how many
# peers the rotation remembers (the oldest entries go first).
CATCH_UP = 2
ROTATION_KEPT = 4096


class BidLike(Protocol):
    @property
    def peer_id(self) -> str: ...
    @property
    def health(self) -> float: ...
    @property
    def queue_length(self) -> int: ...
    @property
    def eta_s(self) -> float: ...
    @property
    def tokens_per_s(self) -> float: ...


def tie_break(task_id: str, peer_id: str) -> str:
    return hashlib.sha256((task_id + peer_id).encode()).hexdigest()


def resource_score(b: BidLike) -> float:
    return 0.4 * b.health + 0.3 / (1 + b.queue_length) + 0.3 / (1 + b.eta_s)


@dataclass
class SelectionState:
    """What an origin remembers between choices."""

    rr_turns: dict[str, int] = field(default_factory=dict)  # peer -> times it went first
    wrr_current: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)


def rank(
    strategy: str, task_id: str, bids: Sequence[BidLike], state: SelectionState
) -> list[BidLike]:
    """Bids in preference order by ``strategy``; updates the rotation state."""
    if not bids:
        return []
    tb: Callable[[BidLike], str] = lambda b: tie_break(task_id, b.peer_id)  # noqa: E731
    ranker = _RANKERS.get(strategy)
    if ranker is None:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    return ranker(task_id, bids, state, tb)


Ranker = Callable[[str, Sequence[BidLike], SelectionState, Callable[[BidLike], str]], list[BidLike]]


def _round_robin(
    task_id: str, bids: Sequence[BidLike], state: SelectionState, tb: Callable[[BidLike], str]
) -> list[BidLike]:
    turns = state.rr_turns
    # A bidder new to the rotation (or back after a long absence) joins it level with the
    # others, not owed every turn it was not there for.
    top = max((turns.get(b.peer_id, 0) for b in bids), default=0)
    for b in bids:
        turns[b.peer_id] = max(turns.get(b.peer_id, top), top - CATCH_UP)
    ordered = sorted(bids, key=lambda b: (turns[b.peer_id], b.peer_id))
    turns[ordered[0].peer_id] += 1
    while len(turns) > ROTATION_KEPT:
        del turns[next(iter(turns))]
    return ordered


def _weighted_round_robin(
    task_id: str, bids: Sequence[BidLike], state: SelectionState, tb: Callable[[BidLike], str]
) -> list[BidLike]:
    return _smooth_weighted(task_id, bids, state.wrr_current, tb)


def _least_connections(
    task_id: str, bids: Sequence[BidLike], state: SelectionState, tb: Callable[[BidLike], str]
) -> list[BidLike]:
    flight: Mapping[str, int] = state.in_flight
    return sorted(bids, key=lambda b: (flight.get(b.peer_id, 0), b.queue_length, tb(b)))


def _resource_aware(
    task_id: str, bids: Sequence[BidLike], state: SelectionState, tb: Callable[[BidLike], str]
) -> list[BidLike]:
    return sorted(bids, key=lambda b: (-round(resource_score(b), 9), tb(b)))


def _smooth_weighted(
    task_id: str,
    bids: Sequence[BidLike],
    current: dict[str, float],
    tb: Callable[[BidLike], str],
) -> list[BidLike]:
    # nginx's smooth weighted round robin: add each weight, pick the max, subtract the total.
    weights = {b.peer_id: max(b.tokens_per_s, 1e-3) for b in bids}
    total = sum(weights.values())
    for pid, w in weights.items():
        current[pid] = current.get(pid, 0.0) + w
    order = sorted(bids, key=lambda b: (-current[b.peer_id], tb(b)))
    current[order[0].peer_id] -= total
    return order


def choose_replicas(
    ranked: Sequence[Any], k: int, profile_of: Callable[[str], Any],
    address_of: Callable[[str], str | None] = lambda peer: None,
) -> list[Any]:  # fmt: skip
    """``k`` distinct bidders, best first, preferring the numeric profile most of the
    best-ranked bidders share (so deterministic answers can match token for token). One
    slot per staked address: peer ids bound to an address already chosen are skipped (one
    stake cannot fill a round with its sybils, nor make an honest anchor revert)."""
    distinct: list[Any] = []
    taken: set[str] = set()
    for b in ranked:
        addr = (address_of(b.peer_id) or "").lower()
        if addr and addr in taken:
            continue
        if all(b.peer_id != d.peer_id for d in distinct):
            distinct.append(b)
            if addr:
                taken.add(addr)
    groups: dict[Any, list[Any]] = {}
    for b in distinct:
        groups.setdefault(profile_of(b.peer_id), []).append(b)
    best = max(groups.values(), key=len, default=[])
    if len(best) >= k:
        return best[:k]
    return (best + [b for b in distinct if b not in best])[: min(k, MAX_REPLICAS)]


_RANKERS: dict[str, Ranker] = {
    "round_robin": _round_robin,
    "weighted_round_robin": _weighted_round_robin,
    "least_connections": _least_connections,
    "resource_aware": _resource_aware,
}
if tuple(_RANKERS) != STRATEGIES:  # a name added on one side only
    raise RuntimeError(f"selection strategies {tuple(_RANKERS)} != config's {STRATEGIES}")
