"""Hostile-input rules of the market that are pure: selection on measured figures
(vcoind.market.observed), one slot per address, the early-reveal buffer."""

from __future__ import annotations

import pytest

from vcoind.market.messages import TaskBid
from vcoind.market.observed import UNMEASURED_TOKENS_PER_S, Observations
from vcoind.market.selection import choose_replicas


def bid(peer: str, *, health: float = 1.0, queue: int = 0, tps: float = 1e6) -> TaskBid:
    return TaskBid(peer, "ab" * 16, "sha256:" + "0" * 64, 0.0, 0.0, health, queue, tps, 0.0)


def test_a_stranger_is_ranked_on_capped_claims_and_a_neutral_record() -> None:
    obs = Observations()
    b = obs.adjust(bid("p", health=1.0, tps=1e6), in_flight=0, max_new_tokens=20,
                   view_health=0.8)  # fmt: skip
    assert b.tokens_per_s == UNMEASURED_TOKENS_PER_S
    assert b.health == pytest.approx(0.5 * 0.8)  # its claim of 1.0 is not used
    assert b.eta_s == pytest.approx(20 / UNMEASURED_TOKENS_PER_S)
    slow = obs.adjust(bid("q", tps=5.0), in_flight=0, max_new_tokens=20, view_health=1.0)
    assert slow.tokens_per_s == 5.0  # a modest claim below the cap stands


def test_measured_speed_and_record_replace_the_claims() -> None:
    obs = Observations()
    obs.completed("p", tokens=100, seconds=2.0)  # 50 tokens/s as we clocked it
    obs.completed("p", tokens=100, seconds=4.0)  # 25: smoothed
    b = obs.adjust(bid("p", tps=1e6, queue=0), in_flight=2, max_new_tokens=10, view_health=1.0)
    assert b.tokens_per_s == pytest.approx(50 + 0.3 * (25 - 50))
    assert b.queue_length == 2  # what we have in flight there, above its claim of 0
    assert b.health == pytest.approx(3 / 4)
    obs.failed("p")
    obs.failed("p")
    obs.failed("p")
    assert obs.get("p").reliability == pytest.approx(3 / 7)


def test_forgetting_is_bounded() -> None:
    obs = Observations(peers_kept=3)
    for i in range(10):
        obs.failed(f"p{i}")
    assert obs.get("p0").failed == 0 and obs.get("p9").failed == 1


def test_one_replica_slot_per_address() -> None:
    ranked = [bid("s1"), bid("s2"), bid("h"), bid("s3")]
    addr = {"s1": "0xAA", "s2": "0xaa", "s3": "0xAa", "h": "0xBB"}
    chosen = choose_replicas(ranked, 3, lambda p: "cpu", addr.get)
    assert [b.peer_id for b in chosen] == ["s1", "h"]  # s2, s3: the same stake again


def test_early_reveals_from_strangers_cannot_crowd_out_the_replicas() -> None:
    from vcoind.market.consensus import MAX_REPLICAS, _keep_early, _Pending
    from vcoind.market.messages import TaskResult
    from vcoind.market.votes import ResultReveal

    def reveal(peer: str) -> ResultReveal:
        return ResultReveal("testnet", peer, 1, 0.0, "ab" * 16, "origin", 1, "t", (), "stop",
                            b"\x00" * 32)  # fmt: skip

    p = _Pending("origin", TaskResult("ab" * 16, 1), b"\x00" * 32, None, True, 0.0)
    for i in range(MAX_REPLICAS + 3):
        _keep_early(p, reveal(f"sybil{i}"))
    assert len(p.reveals) == MAX_REPLICAS
    p.committed.add("replica")
    _keep_early(p, reveal("replica"))
    assert "replica" in p.reveals and len(p.reveals) == MAX_REPLICAS


async def test_offers_are_kept_per_origin_and_expire(autojump_clock: object) -> None:
    import trio

    from vcoind.market.offered import Offered

    o = Offered(kept=3, max_age_s=60)
    o.add("task", "honest")
    o.add("task", "hostile")  # the same public task id re-announced: blocks nothing
    assert ("task", "honest") in o and ("task", "hostile") in o and ("task", "x") not in o
    for i in range(3):
        o.add(f"t{i}", "honest")
    assert ("task", "honest") not in o  # bounded in number
    await trio.sleep(61)
    assert ("t2", "honest") not in o  # and in age
