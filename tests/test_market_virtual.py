"""The task market's timing logic in virtual time (tests/market_harness.py).

Real origins, workers and consensus roles in one trio loop on trio's MockClock: bid
windows, no-bid timeouts, reassignment, retries, dead workers and commit deadlines of
tens of seconds cost milliseconds of real time. Times asserted are virtual
(``trio.current_time()``, and when the harness handed each record over).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.market_harness import (
    MarketNet,
    MarketNode,
    market_net,
    scripted_answer,
    virtual_time_guards,
)
from vcoind.config import MarketConfig
from vcoind.consensus.reputation import DEFAULT_REPUTATION
from vcoind.market.assign import REDIAL_WAIT_S
from vcoind.market.bidding import REANNOUNCE_S
from vcoind.market.consensus import REVEAL_TIMEOUT_S, VOTE_WAIT_S
from vcoind.market.deadlines import PREFILL_SPEEDUP, prompt_tokens
from vcoind.market.messages import Assignments, Bid, GenParams, Progress, TaskAnnounce
from vcoind.market.votes import ResultCommitment, ResultReveal
from vcoind.store import AttemptRow, PeerUpdate, Store

# Latencies and durations are binary fractions, so virtual times add up exactly (see
# the market harness on rounding).
LATENCY = 0.125
PROMPT = "hello, market"
TOKENS = 8
PARAMS = GenParams(max_new_tokens=TOKENS)
ANSWER = scripted_answer(PROMPT, TOKENS)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time: pytest-trio runs a test that takes this fixture under it."""
    virtual_time_guards(monkeypatch)
    return trio.testing.MockClock(autojump_threshold=0)


def config(
    *, bid_window_s: float = 2.0, no_bid_timeout_s: float = 30.0, task_timeout_s: float = 20.0,
    max_retries: int = 3,
) -> MarketConfig:  # fmt: skip
    """Explicit, deliberately long timeouts: virtual time makes them free."""
    return MarketConfig(strategy="resource_aware", bid_window_s=bid_window_s,
                        no_bid_timeout_s=no_bid_timeout_s, task_timeout_s=task_timeout_s,
                        max_retries=max_retries)  # fmt: skip


def attempts_by(net: MarketNet, rows: list[AttemptRow]) -> list[tuple[str, str]]:
    return [(net.name_of(a.peer_id), a.status) for a in rows]


def assigned(net: MarketNet, task_id: str, dst: MarketNode) -> list[float]:
    """When the origin sent ``dst`` an assignment of the task (refused ones included)."""
    return [
        d.sent
        for d in net.deliveries(Assignments, dst=dst)
        if any(a.task_id == task_id for a in d.record.items)
    ]


# --- 1. the bid window ----------------------------------------------------------------


async def test_bid_window_closes_once_every_server_has_bid(clock: trio.testing.MockClock) -> None:
    cfg = config(bid_window_s=5.0)
    async with market_net() as net:
        origin = await net.add_node("O", cfg=cfg)  # serves nothing: never bids itself
        a = await net.add_node("A", ["m"], health=0.5)
        b = await net.add_node("B", ["m"], health=0.6)
        c = await net.add_node("C", ["m"], health=0.9)
        for node, latency in ((a, 0.125), (b, 0.25), (c, 0.375)):
            net.set_latency(origin, node, latency)
        t0 = trio.current_time()
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)

        assert row.status == "completed" and row.result == ANSWER
        # The slowest bidder's round trip (announce out, bid back) closes the window.
        (sent,) = assigned(net, task_id, c)
        assert sent - t0 == pytest.approx(2 * 0.375)
        assert sent - t0 < cfg.bid_window_s / 2
        assert {net.name_of(x.peer_id) for x in await origin.tasks.bids(task_id)} == {"A", "B", "C"}
        assert attempts_by(net, await origin.tasks.attempts(task_id)) == [("C", "completed")]


async def test_bid_window_runs_its_length_and_a_late_bid_is_not_used(
    clock: trio.testing.MockClock,
) -> None:
    cfg = config(bid_window_s=2.0)
    async with market_net() as net:
        origin = await net.add_node("O", cfg=cfg)
        await net.add_node("A", ["m"], health=0.5)
        b = await net.add_node("B", ["m"], health=0.6, per_token_s=1.0)  # busy until ~10 s
        c = await net.add_node("C", ["m"], health=0.9)  # the best bidder, but far away
        net.set_latency(origin, c, 3.0)
        t0 = trio.current_time()
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)

        first_bid = min(d.at for d in net.deliveries(Bid, dst=origin))
        (sent,) = assigned(net, task_id, b)
        # C serves the model and has not bid: the window runs its whole length from the
        # first bid, then the best bid in hand wins.
        assert first_bid - t0 == pytest.approx(2 * net.latency_s)
        assert sent - first_bid == pytest.approx(cfg.bid_window_s)
        # C's bid came while the task still ran, and was not used.
        (late,) = net.deliveries(Bid, src=c, dst=origin)
        assert sent < late.at < origin.finished_at[task_id]
        assert row.status == "completed" and row.node_id == b.peer_id
        assert {net.name_of(x.peer_id) for x in await origin.tasks.bids(task_id)} == {"A", "B"}
        assert attempts_by(net, await origin.tasks.attempts(task_id)) == [("B", "completed")]
        assert assigned(net, task_id, c) == []


# --- 2. nobody bids -------------------------------------------------------------------


async def test_nobody_bids_fails_after_the_no_bid_timeout(clock: trio.testing.MockClock) -> None:
    cfg = config(no_bid_timeout_s=30.0, bid_window_s=0.5)
    async with market_net() as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"])
        t0 = trio.current_time()
        task_id = await origin.origin.submit("ghost", PROMPT, PARAMS)
        row, at = await origin.wait_finished(task_id)

        assert row.status == "failed"
        assert row.error == "no node bid for the task: no bid for model 'ghost' within 30 s"
        # (then the bid window runs once more before the origin gives up)
        assert cfg.no_bid_timeout_s <= at - t0 <= cfg.no_bid_timeout_s + cfg.bid_window_s
        # announced again every REANNOUNCE_S meanwhile, for a node that just joined
        announces = net.deliveries(TaskAnnounce, dst=a)
        assert len(announces) == pytest.approx(cfg.no_bid_timeout_s / REANNOUNCE_S, abs=1)
        assert await origin.tasks.attempts(task_id) == []


# --- 3. reassignment after no progress ------------------------------------------------


async def test_stalled_worker_is_replaced_after_the_task_timeout(
    clock: trio.testing.MockClock,
) -> None:
    cfg = config(task_timeout_s=20.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9, behaviour="stall")  # accepts, then nothing
        b = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)

        (to_a,) = assigned(net, task_id, a)
        (to_b,) = assigned(net, task_id, b)
        # A's acceptance (a round trip) starts the clock; 20 s without progress -> B
        assert to_b - to_a == pytest.approx(2 * LATENCY + cfg.task_timeout_s)
        assert row.status == "completed" and row.result == ANSWER and row.node_id == b.peer_id
        assert row.retry_count == 1
        first, second = await origin.tasks.attempts(task_id)
        assert (first.peer_id, first.status) == (a.peer_id, "failed")
        assert first.error == f"no progress from {a.peer_id} for 20 s"
        assert (second.peer_id, second.status, second.error) == (b.peer_id, "completed", None)


async def test_failing_worker_is_replaced_at_once(clock: trio.testing.MockClock) -> None:
    cfg = config(task_timeout_s=20.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9, behaviour="fail", fail_at=3)
        b = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)

        (to_a,) = assigned(net, task_id, a)
        (to_b,) = assigned(net, task_id, b)
        # assigned, 3 tokens, the error back: no waiting for the task timeout
        assert to_b - to_a == pytest.approx(LATENCY + 3 * 0.0625 + LATENCY)
        assert row.status == "completed" and row.node_id == b.peer_id
        first, _ = await origin.tasks.attempts(task_id)
        assert first.error == f"worker {a.peer_id} failed: scripted failure after 3 tokens"


async def test_a_task_may_choose_its_own_strategy(clock: trio.testing.MockClock) -> None:
    async with market_net() as net:
        origin = await net.add_node("O", cfg=config())  # resource_aware: the healthiest
        await net.add_node("A", ["m"], health=0.5)
        await net.add_node("C", ["m"], health=0.9)
        chosen = []
        for strategy in (None, "round_robin", "round_robin", "round_robin", "round_robin"):
            task_id = await origin.origin.submit("m", PROMPT, PARAMS, strategy=strategy)
            row, _ = await origin.wait_finished(task_id)
            chosen.append(net.name_of(row.node_id))
    # the node's resource_aware takes the healthier; the task's round_robin takes turns
    assert chosen[0] == "C" and sorted(chosen[1:]) == ["A", "A", "C", "C"], chosen


async def test_a_streamed_task_whose_worker_fails_goes_on_without_repeating(
    clock: trio.testing.MockClock,
) -> None:
    """The replacement replays the same tokens (greedy): clients see the text grow from
    where it was, never start over and never see a character twice."""
    cfg = config(task_timeout_s=20.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        await net.add_node("A", ["m"], health=0.9, behaviour="fail", fail_at=5)
        await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS, stream=True)
        seen: list[str] = []
        while (live := origin.origin.live(task_id)) is not None:
            if not seen or live.streamed.shown != seen[-1]:
                seen.append(live.streamed.shown)
            restarts = live.streamed.restarts
            await live.changed.wait()
        row, _ = await origin.wait_finished(task_id)
        first, _ = await origin.tasks.attempts(task_id)
    assert row.status == "completed" and restarts == 0
    assert "scripted failure after 5 tokens" in (first.error or "")
    assert all(row.result.startswith(s) for s in seen)  # every view a prefix of the answer
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))  # it only ever grew
    assert any(0 < len(s) < len(row.result) for s in seen)  # some came before the end


# --- 4. retries run out ---------------------------------------------------------------


async def test_every_worker_stalls_fails_after_one_plus_max_retries_attempts(
    clock: trio.testing.MockClock,
) -> None:
    cfg = config(task_timeout_s=20.0, max_retries=2)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        workers = [await net.add_node(name, ["m"], health=h, behaviour="stall")
                   for name, h in (("A", 0.9), ("B", 0.8), ("C", 0.7), ("D", 0.6))]  # fmt: skip
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, at = await origin.wait_finished(task_id)

        (first,) = assigned(net, task_id, workers[0])
        assert at - first == pytest.approx(3 * (2 * LATENCY + cfg.task_timeout_s))
        assert row.status == "failed"
        third = workers[2].peer_id
        assert row.error == f"gave up after 3 attempts: no progress from {third} for 20 s"
        assert attempts_by(net, await origin.tasks.attempts(task_id)) == [
            ("A", "failed"), ("B", "failed"), ("C", "failed")]  # fmt: skip
        assert assigned(net, task_id, workers[3]) == []  # a fourth bidder, never used


# --- 5. dead workers ------------------------------------------------------------------


async def test_dead_worker_is_skipped_at_once(clock: trio.testing.MockClock) -> None:
    cfg = config(task_timeout_s=20.0, bid_window_s=5.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9)
        b = await net.add_node("B", ["m"], health=0.8)
        c = await net.add_node("C", ["m"], health=0.7)
        net.set_latency(origin, c, 0.5)  # its bid closes the window, at 1.0 s
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        await net.wait_for(lambda: net.deliveries(Bid, src=a, dst=origin))
        net.kill(a)  # its bid is in, and it still looks alive (no heartbeat missed yet)
        row, _ = await origin.wait_finished(task_id)

        tries = [d for d in net.deliveries(Assignments, dst=a) if d.refused]
        assert [d.sent for d in tries] == pytest.approx([1.0, 1.0 + REDIAL_WAIT_S])  # one redial
        (to_b,) = assigned(net, task_id, b)
        assert to_b == pytest.approx(1.0 + REDIAL_WAIT_S)
        assert to_b - 1.0 <= 1.0  # at once: no waiting for a task timeout
        assert row.status == "completed" and row.node_id == b.peer_id
        first, second = await origin.tasks.attempts(task_id)
        assert first.peer_id == a.peer_id and first.status == "failed"
        assert first.error is not None and first.error.startswith(f"assignment to {a.peer_id}")
        assert "cannot open" in first.error
        assert (second.peer_id, second.status) == (b.peer_id, "completed")


async def test_worker_that_vanishes_is_replaced_when_it_leaves_the_view(
    clock: trio.testing.MockClock,
) -> None:
    cfg = config(task_timeout_s=60.0)
    async with market_net(latency_s=LATENCY, peer_timeout_s=10.0) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9, per_token_s=1.0)
        b = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, GenParams(max_new_tokens=30))
        await net.wait_for(lambda: len(net.deliveries(Progress, src=a)) >= 3)
        net.kill(a)
        died = trio.current_time()
        row, _ = await origin.wait_finished(task_id)

        (to_b,) = assigned(net, task_id, b)
        # gone from the peer table after peer_timeout_s: long before the task timeout
        assert died + net.peer_timeout_s <= to_b <= died + net.peer_timeout_s + 1.0
        assert row.status == "completed" and row.node_id == b.peer_id
        first, _ = await origin.tasks.attempts(task_id)
        assert first.error == f"worker {a.peer_id} left the network"


# --- 6. consensus with a silent replica -----------------------------------------------


@pytest.mark.parametrize("silence", ["never_commits", "never_reveals"])
async def test_consensus_decides_without_a_silent_replica(
    clock: trio.testing.MockClock, silence: str
) -> None:
    cfg = config(task_timeout_s=20.0)  # the commit deadline of a consensus round
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        r1 = await net.add_node("R1", ["m"], health=0.9)
        r2 = await net.add_node("R2", ["m"], health=0.8)
        silent_cfg = MarketConfig(fault="silent") if silence == "never_commits" else None
        r3 = await net.add_node("R3", ["m"], health=0.7, cfg=silent_cfg)
        if silence == "never_reveals":
            net.mute(r3, ResultReveal)  # it commits; its reveal is lost
        task_id = await origin.origin.submit("m", PROMPT, PARAMS, mode="consensus", replicas=3)
        row, at = await origin.wait_finished(task_id)

        accepted = max(assigned(net, task_id, r)[0] for r in (r1, r2, r3)) + 2 * LATENCY
        commits = net.deliveries(ResultCommitment, dst=origin)
        if silence == "never_commits":
            assert {net.name_of(d.src) for d in commits} == {"R1", "R2"}
            # the round waits out the commit deadline for R3, closes, and the two reveal
            assert at - accepted == pytest.approx(cfg.task_timeout_s + 2 * LATENCY)
        else:
            assert {net.name_of(d.src) for d in commits} == {"R1", "R2", "R3"}
            # closed once all three committed; R3's reveal is awaited until the deadline
            closed = max(d.at for d in commits)
            assert at - closed == pytest.approx(REVEAL_TIMEOUT_S)
            assert at - accepted < cfg.task_timeout_s

        assert row.status == "completed" and row.result == ANSWER
        replicas = row.consensus["replicas"]
        assert {net.name_of(r["node_id"]) for r in replicas} == {"R1", "R2"}
        assert all(r["agreed"] for r in replicas)
        validations = await origin.consensus_store.validations(task_id)
        assert {(net.name_of(v.node_id), v.passed) for v in validations} == {
            ("R1", True), ("R2", True)}  # fmt: skip
        attempts = {net.name_of(x.peer_id): x for x in await origin.tasks.attempts(task_id)}
        assert attempts["R3"].status == "failed"
        assert attempts["R3"].error == "no valid commitment or reveal"
        assert attempts["R1"].status == attempts["R2"].status == "completed"
        reps = await origin.reputations([r1.peer_id, r2.peer_id, r3.peer_id])
        assert reps[r3.peer_id] < DEFAULT_REPUTATION < reps[r1.peer_id] == reps[r2.peer_id]
        if silence == "never_commits":  # the two sign the outcome; R3 was never listed
            await trio.sleep(VOTE_WAIT_S)
            signed = await origin.consensus_store.signatures(task_id)
            assert {net.name_of(s.signer) for s in signed} == {"O", "R1", "R2"}


# --- 7. progress keeps a slow worker --------------------------------------------------


async def test_progress_keeps_a_slow_worker(clock: trio.testing.MockClock) -> None:
    cfg = config(task_timeout_s=10.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9, per_token_s=1.0)  # 30 tokens: 30 s
        b = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, GenParams(max_new_tokens=30))
        row, at = await origin.wait_finished(task_id)

        (to_a,) = assigned(net, task_id, a)
        assert at - to_a >= 3 * cfg.task_timeout_s
        assert len(net.deliveries(Progress, src=a, dst=origin)) >= 25
        assert row.status == "completed" and row.node_id == a.peer_id
        assert row.result == scripted_answer(PROMPT, 30) and row.retry_count == 0
        assert attempts_by(net, await origin.tasks.attempts(task_id)) == [("A", "completed")]
        assert assigned(net, task_id, b) == []


# --- 8. long answers: deadlines scale with the work ---------------------------------

LONG = GenParams(max_new_tokens=2000)


def reference_deadline(cfg: MarketConfig, tokens: int, tokens_per_s: float) -> float:
    """The commit deadline ``vcoind.market.deadlines`` gives a round over ``PROMPT``."""
    work = (tokens + prompt_tokens(PROMPT) / PREFILL_SPEEDUP) / tokens_per_s
    return max(cfg.task_timeout_s, cfg.deadline_allowance_s + cfg.deadline_safety * work)


async def test_a_long_consensus_answer_outlasts_the_task_timeout(
    clock: trio.testing.MockClock,
) -> None:
    """2,000 tokens at 32 tokens/s take 62.5 s: the flat 30 s commit deadline failed the
    round; the scaled one (replicas never measured: 20 tokens/s) waits for them."""
    cfg = config(task_timeout_s=30.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        replicas = [await net.add_node(f"R{i}", ["m"], per_token_s=1 / 32, health=h)
                    for i, h in ((1, 0.9), (2, 0.8), (3, 0.7))]  # fmt: skip
        task_id = await origin.origin.submit("m", PROMPT, LONG, mode="consensus", replicas=3)
        row, at = await origin.wait_finished(task_id)

        accepted = max(assigned(net, task_id, r)[0] for r in replicas) + 2 * LATENCY
        assert row.status == "completed", row.error
        assert row.result == scripted_answer(PROMPT, 2000)
        assert at - accepted > 2 * cfg.task_timeout_s  # 62.5 s of decoding, then the vote
        (first,) = row.consensus["history"]
        deadline = reference_deadline(cfg, 2000, cfg.reference_tokens_per_s)
        assert first["commit_deadline_s"] == pytest.approx(deadline, abs=1e-3)
        assert deadline == pytest.approx(210.05)
        assert {net.name_of(r["node_id"]) for r in row.consensus["replicas"]} == {
            "R1", "R2", "R3"}  # fmt: skip
        assert attempts_by(net, await origin.tasks.attempts(task_id)) == [
            ("R1", "completed"), ("R2", "completed"), ("R3", "completed")]  # fmt: skip


async def test_the_commit_deadline_follows_the_measured_speed(
    clock: trio.testing.MockClock,
) -> None:
    """Replicas measured at ~8 tokens/s need 250 s for 2,000 tokens, past the deadline of
    unmeasured ones (210 s): the origin waits for what it measured."""
    cfg = config(task_timeout_s=30.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        replicas = [await net.add_node(f"R{i}", ["m"], per_token_s=1 / 8) for i in (1, 2, 3)]
        measured = []
        for _ in replicas:  # one single task each: the origin clocks them
            tid = await origin.origin.submit("m", PROMPT, GenParams(max_new_tokens=64),
                                             strategy="round_robin")  # fmt: skip
            single, _ = await origin.wait_finished(tid)
            measured.append(net.name_of(single.node_id))
        assert sorted(measured) == ["R1", "R2", "R3"]
        task_id = await origin.origin.submit("m", PROMPT, LONG, mode="consensus", replicas=3)
        row, at = await origin.wait_finished(task_id)

        accepted = max(assigned(net, task_id, r)[0] for r in replicas) + 2 * LATENCY
        assert row.status == "completed", row.error
        assert at - accepted > 250.0 > reference_deadline(cfg, 2000, cfg.reference_tokens_per_s)
        (first,) = row.consensus["history"]
        # 64 tokens in 8 s as the origin clocked them (its acceptance to its result)
        assert first["commit_deadline_s"] == pytest.approx(reference_deadline(cfg, 2000, 8.0))


async def test_the_commit_deadline_still_drops_a_replica_too_slow_for_it(
    clock: trio.testing.MockClock,
) -> None:
    """A replica that keeps reporting progress but would need 1,000 s: the round closes at
    the commit deadline and the other two decide."""
    cfg = config(task_timeout_s=30.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        r1 = await net.add_node("R1", ["m"], per_token_s=1 / 32, health=0.9)
        r2 = await net.add_node("R2", ["m"], per_token_s=1 / 32, health=0.8)
        r3 = await net.add_node("R3", ["m"], per_token_s=1 / 2, health=0.7)
        task_id = await origin.origin.submit("m", PROMPT, LONG, mode="consensus", replicas=3)
        row, at = await origin.wait_finished(task_id)

        accepted = max(assigned(net, task_id, r)[0] for r in (r1, r2, r3)) + 2 * LATENCY
        deadline = reference_deadline(cfg, 2000, cfg.reference_tokens_per_s)
        assert at - accepted == pytest.approx(deadline + 2 * LATENCY)
        assert len(net.deliveries(Progress, src=r3, dst=origin)) > 400  # never stalled
        assert row.status == "completed" and row.result == scripted_answer(PROMPT, 2000)
        assert {net.name_of(r["node_id"]) for r in row.consensus["replicas"]} == {"R1", "R2"}
        attempts = {net.name_of(x.peer_id): x for x in await origin.tasks.attempts(task_id)}
        assert (attempts["R3"].status, attempts["R3"].error) == (
            "failed", "no valid commitment or reveal")  # fmt: skip
        reps = await origin.reputations([r1.peer_id, r3.peer_id])
        assert reps[r3.peer_id] < DEFAULT_REPUTATION < reps[r1.peer_id]


@pytest.mark.parametrize("silence", ["stalls", "never_commits"])
async def test_a_silent_replica_does_not_hold_a_long_round_to_its_deadline(
    clock: trio.testing.MockClock, silence: str
) -> None:
    """A replica that stops reporting progress (never started, or finished and never
    committed) leaves the round after the task timeout, not the 210 s commit deadline."""
    cfg = config(task_timeout_s=30.0)
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        r1 = await net.add_node("R1", ["m"], per_token_s=1 / 32, health=0.9)
        r2 = await net.add_node("R2", ["m"], per_token_s=1 / 32, health=0.8)
        if silence == "stalls":
            r3 = await net.add_node("R3", ["m"], behaviour="stall", health=0.7)
        else:  # decodes (faster than the others), then stays silent
            r3 = await net.add_node("R3", ["m"], per_token_s=1 / 64, health=0.7,
                                    cfg=MarketConfig(fault="silent"))  # fmt: skip
        task_id = await origin.origin.submit("m", PROMPT, LONG, mode="consensus", replicas=3)
        row, at = await origin.wait_finished(task_id)

        accepted = max(assigned(net, task_id, r)[0] for r in (r1, r2, r3)) + 2 * LATENCY
        attempts = {net.name_of(x.peer_id): x for x in await origin.tasks.attempts(task_id)}
        assert attempts["R3"].status == "failed"
        assert attempts["R3"].error == f"no progress from {r3.peer_id} for 30 s"
        last = max(d.at for d in net.deliveries(Progress, src=r3, dst=origin)) if (
            silence == "never_commits") else accepted  # fmt: skip
        assert last < 35.0 + accepted
        # R1 and R2 commit at ~62.5 s: the round closes then (R3 was dropped at last + 30 s)
        assert at - accepted < 70.0 < cfg.deadline_allowance_s + 200
        assert row.status == "completed" and row.result == scripted_answer(PROMPT, 2000)
        assert {net.name_of(r["node_id"]) for r in row.consensus["replicas"]} == {"R1", "R2"}
        reps = await origin.reputations([r1.peer_id, r3.peer_id])
        assert reps[r3.peer_id] < DEFAULT_REPUTATION < reps[r1.peer_id]


async def test_a_long_prompt_gets_its_prefill_before_the_first_progress(
    clock: trio.testing.MockClock,
) -> None:
    """30,000 characters (~10,000 tokens) with a 60 s prefill: no progress for 60 s is not
    a stall (the limit before the first report is 110 s here); the task stays put."""
    cfg = config(task_timeout_s=30.0)
    prompt = "a long document. " * 1765
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg)
        a = await net.add_node("A", ["m"], health=0.9, prefill_s=60.0)
        b = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", prompt, PARAMS)
        row, at = await origin.wait_finished(task_id)

        assert row.status == "completed" and row.node_id == a.peer_id, row.error
        assert row.retry_count == 0 and assigned(net, task_id, b) == []
        (to_a,) = assigned(net, task_id, a)
        assert at - to_a > 60.0


# --- the harness's store --------------------------------------------------------------


async def test_inline_store_stays_on_the_trio_thread(
    clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = Store(tmp_path / "inline.db", inline=True)  # the guards refuse any thread
    t0 = trio.current_time()
    await store.open()
    await store.upsert_peers([PeerUpdate("p1", "0xabc", (), "cpu", 0, "", 0.9, "v", 1.0)])
    assert [p.peer_id for p in await store.list_peers()] == ["p1"]
    await store.close()
    assert trio.current_time() == t0  # no virtual time passed inside a query
    with pytest.raises(AssertionError, match="thread"):  # the default still hops threads
        await Store(tmp_path / "threaded.db").open()
