"""Attacks on the market and consensus by a hostile peer, against real daemons.

- A peer pushes an unsolicited assignment to get a staked node's signature on a task id
  of its choosing: refused (the node bid on no such task), counted, nothing signed.
- A lazy replica copies an honest replica's commitment from gossip and later reveals
  that replica's text and salt as its own: the copied commitment is refused
  (``duplicate_commit``), costs reputation, and the lazy replica is not counted.
- Consensus is not public: watching the votes topic of a consensus task shows hashes
  only, never the prompt or an answer.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from devnet.__main__ import DevNode
from tests.adversary.hostile import Hostile, hostile, in_thread, metric
from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, finished, knows_model, loaded, serving
from vcoind.compute.models import ModelStore
from vcoind.market.messages import (
    Accepted,
    Ack,
    Assign,
    Assignments,
    Bid,
    GenParams,
    Offer,
    TaskAnnounce,
    TaskResult,
)
from vcoind.market.protocol import TASK_STREAM, task_stream
from vcoind.market.votes import CommitsClosed, ResultCommitment, ResultReveal
from vcoind.p2p.streams import StreamProtocolError
from vcoind.presence.messages import ModelServed

pytestmark = pytest.mark.slow


class Worker:
    """The hostile node's task-protocol side: it accepts every assignment and keeps the
    records it is sent (results, reveals)."""

    def __init__(self, h: Hostile) -> None:
        self.assigned: list[Assign] = []
        self.received: list[Any] = []
        self.changed = trio.Event()
        proto = task_stream((Assignments, TaskResult, ResultReveal))
        h.streams.serve(proto, self._handle)

    async def _handle(self, peer: Any, record: Any) -> Any:
        if isinstance(record, Assignments):
            self.assigned.extend(record.items)
            self.wake()
            return Accepted(("",) * len(record.items))
        self.received.append(record)
        self.wake()
        return Ack()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self) -> None:
        await self.changed.wait()


async def _watch(h: Hostile, seen: list[Any], worker: Worker) -> None:
    while True:
        seen.append(await h.next_record("votes"))
        worker.wake()


async def test_an_unsolicited_assignment_is_refused_and_nothing_is_signed(
    cluster: Cluster, models_dir: Path
) -> None:
    n1 = await in_thread(lambda: cluster.start(1, extra=serving(models_dir)))
    async with hostile() as h:
        worker = Worker(h)  # a signed TaskResult would come back to us here
        await h.join(n1.p2p_addr)
        task_id = secrets.token_hex(16)
        assign = Assign(task_id, 1, MODEL, "Sign this for me", GenParams(max_new_tokens=4))
        reply = await h.request(n1.info["peer_id"], TASK_STREAM, Assignments((assign,)),
                                Accepted)  # fmt: skip
        assert "did not bid on that task" in reply.errors[0], reply
        await in_thread(
            wait_until,
            lambda: metric(n1, "vcoin_sign_refused_total", kind="assignment", reason="not_bid"),
            10, "the refusal counted",
        )  # fmt: skip
        with trio.move_on_after(3):  # the node runs nothing and signs nothing for us
            await worker.wait()
        assert worker.received == []
    assert n1.proc.poll() is None


async def _heartbeats(h: Hostile, model_id: str) -> None:
    """Stay in the peers' views, serving the model (so it may bid)."""
    while True:
        await h.publish("heartbeat", h.heartbeat(models=(ModelServed(MODEL, model_id),)))
        await trio.sleep(0.3)


async def _bid_on_announces(h: Hostile, origin: str, model_id: str, tasks: list[str]) -> None:
    """Bid perfect figures on every task the origin announces."""
    while True:
        rec = await h.next_record("tasks")
        if not isinstance(rec, TaskAnnounce) or rec.peer_id != origin:
            continue
        offers = tuple(Offer(t.task_id, model_id, 0.0, 0.001, 1e6) for t in rec.tasks)
        tasks.extend(t.task_id for t in rec.tasks)
        await h.publish("tasks", Bid(h.network, h.peer_id, h.seq(), time.time(), origin, 1.0, 0,
                                     offers))  # fmt: skip


async def test_a_copied_commitment_is_refused_and_the_copier_is_not_counted(
    cluster: Cluster, models_dir: Path
) -> None:
    def start() -> list[DevNode]:
        n1 = cluster.start(1, extra=[*serving(models_dir), "--bid-window", "3",
                                     "--task-timeout", "8"])  # fmt: skip
        n2 = cluster.start(2, bootstrap=n1, extra=serving(models_dir))
        wait_until(lambda: knows_model(n1, 1), 20, "node 1 sees node 2's model")
        wait_until(lambda: loaded(n1) and loaded(n2), 60, "both models warm")
        return [n1, n2]

    n1, n2 = await in_thread(start)
    origin = n1.info["peer_id"]
    store = ModelStore(models_dir)
    store.scan()
    model_id = store.resolve(MODEL).model_id
    async with hostile() as h, trio.open_nursery() as nursery:
        worker = Worker(h)
        await h.join(n1.p2p_addr, "tasks", "votes")
        nursery.start_soon(_heartbeats, h, model_id)
        await in_thread(wait_until, lambda: knows_model(n1, 2), 20, "node 1 sees our model")
        announced: list[str] = []
        nursery.start_soon(_bid_on_announces, h, origin, model_id, announced)
        req = {"model": MODEL, "input": "Why is the sky blue?", "mode": "consensus",
               "replicas": 3, "parameters": {"max_new_tokens": 8}}  # fmt: skip
        task_id = (await in_thread(n1.rpc.call, "vcoin_submitTask", req))["task_id"]

        # Assigned a replica slot, we run nothing: we copy the first honest commitment.
        with trio.fail_after(60):
            while not any(a.task_id == task_id for a in worker.assigned):
                await worker.wait()
        mine = next(a for a in worker.assigned if a.task_id == task_id)
        seen: list[Any] = []  # everything gossiped on the votes topic
        nursery.start_soon(_watch, h, seen, worker)

        def first(kind: type[Any], **match: Any) -> Any:
            # gossiped, or (a reveal) sent to us point to point
            pool = [*seen, *worker.received]
            return next((r for r in pool if isinstance(r, kind) and r.task_id == task_id
                         and all(getattr(r, k) == v for k, v in match.items())), None)  # fmt: skip

        with trio.fail_after(60):
            while (copied := first(ResultCommitment)) is None:
                await worker.wait()
        await h.publish("votes", ResultCommitment(
            h.network, h.peer_id, h.seq(), time.time(), task_id, origin, mine.attempt,
            copied.commitment,
        ))  # fmt: skip
        # If the origin lists us, reveal the copied replica's text and salt as our own.
        with trio.move_on_after(30):
            while (closed := first(CommitsClosed)) is None:
                await worker.wait()
            if any(c.peer_id == h.peer_id for c in closed.committers):
                while (other := first(ResultReveal, peer_id=copied.peer_id)) is None:
                    await worker.wait()
                fake = ResultReveal(h.network, h.peer_id, h.seq(), time.time(), task_id, origin,
                                    mine.attempt, other.text, other.token_ids,
                                    other.finish_reason, other.salt)  # fmt: skip
                await h.publish("votes", fake)  # how the code before this defence took it
                with contextlib.suppress(StreamProtocolError):
                    await h.request(origin, TASK_STREAM, fake, Ack)
        t = await in_thread(lambda: finished(n1, task_id, timeout=90))
        nursery.cancel_scope.cancel()

    assert t["status"] == "completed", (t["error"], t["consensus"])
    replicas = {r["node_id"]: r for r in t["consensus"]["replicas"]}
    assert h.peer_id not in replicas, "the copier was counted as an independent replica"
    assert set(replicas) == {origin, n2.info["peer_id"]}, t
    assert metric(n1, "vcoin_consensus_rejected_total", reason="duplicate_commit") >= 1
    reps = {r["peer_id"]: r for r in await in_thread(n1.rpc.call, "vcoin_peers")}
    assert reps[h.peer_id]["reputation_score"] < reps[n2.info["peer_id"]]["reputation_score"]
    # Gossip carried hashes only: no prompt, no answer (the reveals came point to point).
    assert not any(isinstance(r, ResultReveal) for r in seen)
    assert all("sky" not in repr(r) for r in seen)
