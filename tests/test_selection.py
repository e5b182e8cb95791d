"""Winner selection: pure, deterministic, re-checkable by any node."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from vcoind.market.selection import SelectionState, rank, resource_score, tie_break


@dataclass(frozen=True)
class B:
    peer_id: str
    health: float = 1.0
    queue_length: int = 0
    eta_s: float = 1.0
    tokens_per_s: float = 100.0


def winners(strategy: str, bids: list[B], n: int, state: SelectionState | None = None) -> Counter:
    state = state or SelectionState()
    return Counter(rank(strategy, f"{i:032x}", bids, state)[0].peer_id for i in range(n))


def test_round_robin_is_even() -> None:
    bids = [B("a"), B("b"), B("c")]
    assert winners("round_robin", bids, 30) == {"a": 10, "b": 10, "c": 10}


def test_round_robin_catches_up_a_bidder_missing_from_some_windows() -> None:
    state = SelectionState()
    # "c" misses two windows in a row (its bid came late): it goes first in the next ones
    # until it has had its share, so 30 tasks still split 10/10/10.
    got = winners("round_robin", [B("a"), B("b"), B("c")], 4, state)
    got += winners("round_robin", [B("a"), B("b")], 2, state)
    got += winners("round_robin", [B("a"), B("b"), B("c")], 24, state)
    assert got == {"a": 10, "b": 10, "c": 10}


def test_round_robin_newcomer_joins_level_and_an_absentee_makes_up_at_most_two() -> None:
    state = SelectionState()
    winners("round_robin", [B("a"), B("b")], 20, state)  # 10 turns each
    # A newcomer is not owed 10 turns: it takes its place in the rotation.
    assert winners("round_robin", [B("a"), B("b"), B("new")], 3, state) == {
        "a": 1, "b": 1, "new": 1}  # fmt: skip
    winners("round_robin", [B("a"), B("new")], 10, state)  # "b" away for 10 tasks
    back = [rank("round_robin", "t", [B("a"), B("b"), B("new")], state)[0].peer_id
            for _ in range(6)]  # fmt: skip
    assert back[:2] == ["b", "b"] and sorted(back[2:5]) == ["a", "b", "new"]


def test_weighted_round_robin_follows_throughput() -> None:
    bids = [B("fast", tokens_per_s=300), B("slow", tokens_per_s=100)]
    assert winners("weighted_round_robin", bids, 40) == {"fast": 30, "slow": 10}


def test_least_connections_prefers_idle_peers() -> None:
    state = SelectionState(in_flight={"busy": 5, "idle": 0, "mid": 2})
    order = rank("least_connections", "t", [B("busy"), B("mid"), B("idle")], state)
    assert [b.peer_id for b in order] == ["idle", "mid", "busy"]


def test_resource_aware_weighs_health_queue_and_eta() -> None:
    healthy = B("healthy", health=0.9, queue_length=0, eta_s=0.5)
    loaded = B("loaded", health=0.9, queue_length=4, eta_s=0.5)
    sick = B("sick", health=0.2, queue_length=0, eta_s=0.5)
    order = rank("resource_aware", "t", [sick, loaded, healthy], SelectionState())
    assert [b.peer_id for b in order] == ["healthy", "loaded", "sick"]
    assert resource_score(healthy) == pytest.approx(0.4 * 0.9 + 0.3 + 0.3 / 1.5)


def test_ties_break_by_hash_so_anyone_can_recheck() -> None:
    bids = [B("p1"), B("p2"), B("p3")]
    for task in ("aa" * 16, "bb" * 16, "cc" * 16):
        first = rank("resource_aware", task, bids, SelectionState())[0].peer_id
        assert first == min(("p1", "p2", "p3"), key=lambda p: tie_break(task, p))
        again = rank("resource_aware", task, list(reversed(bids)), SelectionState())[0]
        assert again.peer_id == first  # order of arrival does not matter
    assert len(winners("resource_aware", bids, 60)) == 3  # ties spread over peers


def test_unknown_strategy_and_no_bids() -> None:
    assert rank("round_robin", "t", [], SelectionState()) == []
    with pytest.raises(ValueError, match="unknown strategy"):
        rank("fastest", "t", [B("a")], SelectionState())
