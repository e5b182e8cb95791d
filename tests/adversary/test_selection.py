"""Attacks on worker selection, in virtual time (tests/market_harness.py: the daemon's
real market service on scripted compute, one trio loop).

- A sybil bidding perfect figures (health 1.0, a million tokens/s, an empty queue) does
  not beat a worker whose record the origin measured: bids are ranked on what the origin
  observed, not on what they claim.
- One stake behind several peer ids gets one replica slot of a consensus round.
- A worker that accepts a task and stalls loses reputation, like a silent replica.
- A replica that commits and never reveals cannot stall the round: it is dropped at the
  reveal deadline, and the others vote and sign without it.
"""

from __future__ import annotations

import secrets

import pytest
import trio
import trio.testing

from tests.market_harness import MarketNode, market_net, scripted_answer, virtual_time_guards
from vcoind.config import MarketConfig
from vcoind.consensus.reputation import DEFAULT_REPUTATION
from vcoind.market.consensus import REVEAL_TIMEOUT_S, VOTE_WAIT_S
from vcoind.market.messages import GenParams
from vcoind.market.votes import ResultReveal

LATENCY = 0.125
PROMPT = "who wins the slot?"
PARAMS = GenParams(max_new_tokens=8)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    virtual_time_guards(monkeypatch)
    return trio.testing.MockClock(autojump_threshold=0)


def cfg() -> MarketConfig:
    return MarketConfig(strategy="resource_aware", bid_window_s=2.0, no_bid_timeout_s=30.0,
                        task_timeout_s=20.0)  # fmt: skip


def boast(node: MarketNode) -> None:
    """Make ``node``'s bids claim perfect figures (what a sybil would say)."""
    worker = node.service.worker
    worker._health = lambda: 1.0  # type: ignore[method-assign]
    worker.tokens_per_s = {node.compute.models.resolve("m").model_id: 1e6}


async def test_a_boasting_stranger_does_not_beat_a_measured_worker(
    clock: trio.testing.MockClock,
) -> None:
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg())
        honest = await net.add_node("H", ["m"])
        for i in range(3):  # the origin measures H on a few tasks
            task_id = await origin.origin.submit("m", f"{PROMPT} {i}", PARAMS)
            row, _ = await origin.wait_finished(task_id)
            assert row.node_id == honest.peer_id
        await trio.sleep(1)  # H's worker has sent its last result: its queue is empty
        sybil = await net.add_node("S", ["m"])
        boast(sybil)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)
        assert row.status == "completed" and row.result == scripted_answer(PROMPT, 8)
        bids = {net.name_of(b.peer_id): b for b in await origin.tasks.bids(task_id)}
        assert set(bids) == {"H", "S"}  # the sybil did bid
        assert row.node_id == honest.peer_id, "the boasting stranger won the task"


async def test_one_stake_gets_one_replica_slot(clock: trio.testing.MockClock) -> None:
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg())
        key = secrets.token_bytes(32)  # one staked address behind two peer ids
        s1 = await net.add_node("S1", ["m"], key=key)
        s2 = await net.add_node("S2", ["m"], key=key)
        honest = await net.add_node("H", ["m"])
        boast(s1)
        boast(s2)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS, mode="consensus", replicas=2)
        row, _ = await origin.wait_finished(task_id)
        assert row.status == "completed", row.error
        chosen = {a.peer_id for a in await origin.tasks.attempts(task_id)}
        assert {s1.peer_id, s2.peer_id} - chosen, "both sybils of one stake took a slot"
        assert honest.peer_id in chosen


async def test_a_worker_that_accepts_and_stalls_loses_reputation(
    clock: trio.testing.MockClock,
) -> None:
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg())
        staller = await net.add_node("A", ["m"], health=0.9, behaviour="stall")
        other = await net.add_node("B", ["m"], health=0.8)
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        row, _ = await origin.wait_finished(task_id)
        assert row.status == "completed" and row.node_id == other.peer_id
        reps = await origin.reputations([staller.peer_id, other.peer_id])
        assert reps[staller.peer_id] < DEFAULT_REPUTATION, reps


async def test_peers_with_work_in_progress_are_held_then_released(
    clock: trio.testing.MockClock,
) -> None:
    """The connection manager never trims a peer we have work with (``Hold``)."""
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg())
        worker = await net.add_node("W", ["m"])
        task_id = await origin.origin.submit("m", PROMPT, PARAMS)
        await net.wait_for(lambda: (worker.peer_id, f"attempt:{task_id}:1") in origin.held)
        await net.wait_for(lambda: (origin.peer_id, f"job:{task_id}:1") in worker.held)
        await origin.wait_finished(task_id)
        await trio.sleep(1)
        assert origin.held == set() and worker.held == set()
        task_id = await origin.origin.submit("m", PROMPT, PARAMS, mode="consensus", replicas=1)
        await net.wait_for(lambda: (worker.peer_id, f"round:{task_id}:1") in origin.held)
        await origin.wait_finished(task_id)
        await trio.sleep(10)  # the signatures are collected, the round ends
        assert origin.held == set() and worker.held == set()


async def test_a_replica_that_never_reveals_cannot_stall_the_vote(
    clock: trio.testing.MockClock,
) -> None:
    async with market_net(latency_s=LATENCY) as net:
        origin = await net.add_node("O", cfg=cfg())
        r1 = await net.add_node("R1", ["m"], health=0.9)
        await net.add_node("R2", ["m"], health=0.8)
        r3 = await net.add_node("R3", ["m"], health=0.7)
        net.mute(r3, ResultReveal)  # it commits, then withholds its answer
        task_id = await origin.origin.submit("m", PROMPT, PARAMS, mode="consensus", replicas=3)
        row, _ = await origin.wait_finished(task_id)
        assert row.status == "completed" and row.result == scripted_answer(PROMPT, 8)
        await trio.sleep(REVEAL_TIMEOUT_S + VOTE_WAIT_S)
        signed = await origin.consensus_store.signatures(task_id)
        # the honest two voted on what the origin tallied; the withholder signed nothing
        assert {net.name_of(s.signer) for s in signed} == {"O", "R1", "R2"}
        reps = await origin.reputations([r1.peer_id, r3.peer_id])
        assert reps[r3.peer_id] < DEFAULT_REPUTATION < reps[r1.peer_id]
