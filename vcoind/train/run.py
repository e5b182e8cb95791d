"""The origin's side of a ``lora_training`` task: shards out, synchronous FedAvg rounds,
failover, the final adapter and the participants' signatures.

Round ``k`` asks every shard that has steps left for steps ``k*S .. (k+1)*S - 1``
(``S`` = ``sync_every``), all starting from the same global adapter; the answers are
averaged weighted by the samples each processed. A node that fails a round (timeout,
disconnect, refusal, an adapter that does not hash to what it claimed) is dropped: its
shard goes to a spare bidder (else to a surviving participant), which pulls the shard
and runs the same round from the same global adapter, so the run goes on exactly as
if nothing had happened, at most ``max_retries`` times per shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from vcoind.market.messages import Ack
from vcoind.p2p.streams import StreamProtocolError
from vcoind.progress import BOARD
from vcoind.train.adapters import BlobCache, pull_blob
from vcoind.train.spec import (
    LoraSettings,
    TrainError,
    rounds,
    sha256_hex,
    shard_bytes,
    split_contiguous,
    step_batches,
    total_steps,
)
from vcoind.train.wire import (
    RoundDone,
    TrainAbort,
    TrainFinish,
    TrainJoin,
    TrainProgress,
    TrainRound,
    TrainSigned,
)

log = logging.getLogger("vcoind.train")

# (peer, record, reply type[, timeout s | None]) -> reply; to ourselves a plain call
TrainRequest = Callable[..., Awaitable[Any]]


@dataclass
class _Node:
    peer: str
    shards: list[int] = field(default_factory=list)
    samples: int = 0
    step: int = 0
    loss: float | None = None
    status: str = "joining"  # joining | training | done | failed
    error: str = ""

    def view(self) -> dict[str, Any]:
        return {"node_id": self.peer, "shards": self.shards, "samples": self.samples,
                "step": self.step, "loss": self.loss, "status": self.status,
                "error": self.error}  # fmt: skip


@dataclass
class _Shard:
    index: int
    examples: int
    data: bytes
    hash: str
    steps: int
    owner: str = ""
    retries: int = 0

    def samples_in(self, start: int, steps: int, settings: LoraSettings) -> int:
        """Examples in steps ``start..start+steps-1`` of this shard: what the FedAvg weight
        and the reward count, so a node cannot claim more than it trained."""
        return sum(len(b) for k in range(start, start + steps)
                   for b in step_batches(self.examples, settings, k))  # fmt: skip


def _owners(n: int, peers: Sequence[str], earlier: Sequence[str] = ()) -> list[str]:
    """A node for each of ``n`` shards: the shard's earlier owner when it is among
    ``peers`` (a resumed run), else the least loaded of ``peers`` in their order."""
    out = [p if p in peers else "" for p in earlier] or [""] * n
    load = {p: out.count(p) for p in peers}
    for i, p in enumerate(out):
        if not p:
            out[i] = min(peers, key=lambda q: (load[q], peers.index(q)))
            load[out[i]] += 1
    return out


class TrainingRun:
    def __init__(
        self,
        task_id: str,
        model: str,
        model_id: str,
        settings: LoraSettings,
        examples: Sequence[dict[str, str]],
        peers: Sequence[str],
        spares: Sequence[str],
        request: TrainRequest,
        blobs: BlobCache,
        lora: Callable[[], Awaitable[Any]],
        *,
        round_timeout_s: float = 900.0,
        max_retries: int = 3,
        on_change: Callable[[], None] = lambda: None,
        alive: Callable[[str], bool] = lambda peer: True,
        on_round: Callable[[bytes], Awaitable[None]] | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.task_id = task_id
        self.model = model
        self.model_id = model_id
        self.settings = settings
        self._request = request
        self._blobs = blobs
        self._lora = lora  # -> the vcoind.train.lora module, imported safely
        self.round_timeout_s = round_timeout_s
        self.max_retries = max_retries
        self.on_change = on_change
        self.alive = alive  # whether a peer still shows in the peer table
        if not peers:
            raise TrainError("no node to train on")
        # A resumed run keeps the earlier run's split (its rounds and history depend on
        # it) even when fewer nodes bid this time: then a node trains several shards.
        earlier = [str(s.get("node_id", "")) for s in resume["view"]["shards"]] if resume else []
        n = len(earlier) or min(len(peers), len(examples))
        self.shards: list[_Shard] = []
        for i, part in enumerate(split_contiguous(examples, n)):
            data = shard_bytes(part)
            self.shards.append(_Shard(i, len(part), data, blobs.put(data),
                                      total_steps(len(part), settings)))  # fmt: skip
        self.nodes: dict[str, _Node] = {}
        owners = _owners(n, peers, earlier)
        self._spares = [p for p in dict.fromkeys((*peers, *spares)) if p not in owners]
        for sh, peer in zip(self.shards, owners, strict=True):
            sh.owner = peer
            self.nodes.setdefault(peer, _Node(peer)).shards.append(sh.index)
        self.round = 0
        self.rounds = rounds([s.steps for s in self.shards], settings.sync_every)
        self.history: list[dict[str, Any]] = []
        self.global_hash = ""
        self._global: bytes = b""
        self.reassigned = 0
        self.started = time.time()
        # After each round, with the new global adapter (the node keeps it on disk)
        self.on_round = on_round
        if resume is not None:
            self._resume(resume)

    def _resume(self, r: dict[str, Any]) -> None:
        """Go on from the last round an earlier run of this task (an origin that was
        restarted) completed: its history, the samples each node trained, its global
        adapter (``r["adapter"]``, checked against the history's hash)."""
        view, data = r["view"], r["adapter"]
        if (
            not view.get("history")
            or sha256_hex(data) != view["global_adapter"]
            or [s.get("hash") for s in view["shards"]] != [s.hash for s in self.shards]
        ):
            raise TrainError("the saved state of the earlier run does not check out")
        self.history = list(view["history"])
        self.round = len(self.history)
        self._global, self.global_hash = data, self._blobs.put(data)
        self.reassigned = int(view.get("reassigned", 0))
        self.started = time.time() - float(view.get("train_s", 0.0))
        for n in view["nodes"]:
            node = self.nodes.setdefault(n["node_id"], _Node(n["node_id"]))
            node.samples = int(n["samples"])
            if not node.shards:
                node.status = "done"  # trained earlier; not placed this time
        log.info("task %s: resuming after round %d of %d (adapter %s)", self.task_id,
                 self.round, self.rounds, self.global_hash[:12])  # fmt: skip

    # --- views --------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {
            "settings": self.settings.as_dict(), "round": self.round, "rounds": self.rounds,
            "train_s": round(time.time() - self.started, 3),
            "shards": [{"shard": s.index, "examples": s.examples, "steps": s.steps,
                        "hash": s.hash, "node_id": s.owner} for s in self.shards],
            "nodes": [n.view() for n in self.nodes.values()],
            "history": self.history, "reassigned": self.reassigned,
            "global_adapter": self.global_hash,
        }  # fmt: skip

    def on_progress(self, peer: str, p: TrainProgress) -> Ack:
        if not 0 <= p.shard < len(self.shards) or self.shards[p.shard].owner != peer:
            raise StreamProtocolError(f"shard {p.shard} of {self.task_id} is not yours")
        node = self.nodes[peer]
        node.step, node.loss, node.status = p.step, p.loss, "training"
        self.on_change()
        return Ack()

    # --- the run --------------------------------------------------------------

    async def run(self) -> tuple[bytes, dict[str, Any]]:
        """Train to the end; the final adapter's bytes and the summary. TrainError when a
        shard cannot be placed or a round cannot be completed."""
        async with trio.open_nursery() as nursery:
            for sh in self.shards:
                nursery.start_soon(self._place, sh, sh.owner)
        what = f"{self.task_id[:12]} on {len(self.nodes)} node(s)"
        with BOARD.step("train", what, total=self.rounds, unit="rounds") as step:
            step.set(len(self.history))  # a resumed run: the rounds done before
            for k in range(len(self.history), self.rounds):
                self.round = k
                await self._round(k)
                step.advance()
        if not self._global:
            raise TrainError("no round was trained")
        for n in self.nodes.values():
            if n.status != "failed":
                n.status = "done"
        self.on_change()
        losses = [h["loss"] for h in self.history]
        summary = {
            # from the completed rounds: a restart mid-round counts that round once
            "rounds": len(self.history), "samples": sum(h["samples"] for h in self.history),
            "steps": sum(s.steps for s in self.shards), "first_loss": losses[0],
            "final_loss": losses[-1], "reassigned": self.reassigned,
            "train_s": round(time.time() - self.started, 3),
        }  # fmt: skip
        return self._global, summary

    async def _place(self, sh: _Shard, peer: str) -> None:
        """Give ``sh`` to ``peer`` (or, when it refuses or is gone, the next candidate)."""
        while True:
            join = TrainJoin(self.task_id, sh.index, self.model,
                             json.dumps(self.settings.as_dict()), sh.hash, len(sh.data),
                             sh.examples)  # fmt: skip
            try:
                await self._request(peer, join, Ack, None)
            except StreamProtocolError as exc:
                self._drop(peer, f"join of shard {sh.index} failed: {exc}")
                peer = self._candidate(sh)
                continue
            if sh.owner != peer:
                self.nodes[sh.owner].shards.remove(sh.index)
                sh.owner = peer
                self.nodes.setdefault(peer, _Node(peer)).shards.append(sh.index)
            self.nodes[peer].status = "training"
            self.on_change()
            return

    def _drop(self, peer: str, why: str) -> None:
        node = self.nodes.setdefault(peer, _Node(peer))
        if node.status != "failed":
            log.warning("task %s: dropping %s: %s", self.task_id, peer, why)
        node.status, node.error = "failed", why[:300]
        self.on_change()

    def _candidate(self, sh: _Shard) -> str:
        """A node for ``sh`` whose owner failed: a spare, else the least loaded survivor."""
        sh.retries += 1
        if sh.retries > self.max_retries:
            raise TrainError(f"shard {sh.index}: no node could train it "
                             f"({self.max_retries} reassignments)")  # fmt: skip
        self.reassigned += 1
        while self._spares:
            peer = self._spares.pop(0)
            if self.nodes.get(peer, _Node(peer)).status != "failed":
                return peer
        alive = [n for n in self.nodes.values() if n.status != "failed"]
        if not alive:
            raise TrainError("every training node failed")
        return min(alive, key=lambda n: (len(n.shards), n.peer)).peer

    async def _round(self, k: int) -> None:
        S = self.settings.sync_every
        t0 = time.monotonic()
        results: dict[int, tuple[Any, dict[str, str], RoundDone]] = {}
        async with trio.open_nursery() as nursery:
            for sh in self.shards:
                if sh.steps > k * S:
                    nursery.start_soon(self._shard_round, sh, k, results)
        lora = await self._lora()
        done = [results[i] for i in sorted(results)]
        meta = {**done[0][1], "base_model_id": self.model_id}
        weighted = [(st, float(d.samples)) for st, _, d in done]
        avg = await trio.to_thread.run_sync(lora.fedavg, weighted)
        self._global = await trio.to_thread.run_sync(lora.adapter_to_bytes, avg, meta)
        old, self.global_hash = self.global_hash, self._blobs.put(self._global)
        if old:
            self._blobs.drop(old)
        samples = sum(d.samples for *_, d in done)
        losses = [x for *_, d in done for x in d.losses]
        self.history.append({
            "round": k, "samples": samples, "loss": sum(losses) / len(losses) if losses else 0.0,
            "shards": {d.shard: {"samples": d.samples, "loss": d.losses[-1] if d.losses else None,
                                 "train_s": d.train_s} for *_, d in done},
            "adapter": self.global_hash, "round_s": round(time.monotonic() - t0, 3),
        })  # fmt: skip
        log.info("task %s round %d/%d: %d samples, mean loss %.4f", self.task_id, k + 1,
                 self.rounds, samples, self.history[-1]["loss"])  # fmt: skip
        if self.on_round is not None:
            await self.on_round(self._global)
        self.on_change()

    async def _shard_round(
        self, sh: _Shard, k: int, results: dict[int, tuple[Any, dict[str, str], RoundDone]]
    ) -> None:
        S = self.settings.sync_every
        start = k * S
        req = TrainRound(self.task_id, sh.index, k, start, min(S, sh.steps - start),
                         self.global_hash, len(self._global))  # fmt: skip
        lora = await self._lora()
        tries = 0
        while True:
            peer = sh.owner
            try:
                d: RoundDone = await self._request(peer, req, RoundDone, self.round_timeout_s)
                if (d.task_id, d.shard, d.round) != (self.task_id, sh.index, k):
                    raise TrainError("answered for another round")
                if len(d.losses) != req.steps or not all(math.isfinite(x) for x in d.losses):
                    raise TrainError(f"reported {len(d.losses)} losses for {req.steps} steps")
                if d.samples != sh.samples_in(start, req.steps, self.settings):
                    raise TrainError(f"claimed {d.samples} samples for steps the schedule "
                                     "gives another count")  # fmt: skip
                data = await pull_blob(self._request, peer, d.adapter, d.adapter_bytes)
                state, meta = await trio.to_thread.run_sync(lora.adapter_from_bytes, data)
            except (StreamProtocolError, TrainError) as exc:
                tries += 1
                # A stream that broke to a node still in the peer table: ask again (the
                # node answers a repeated round from what it kept). Anything else, or
                # again and again: the node is dropped and its shard placed elsewhere.
                if isinstance(exc, StreamProtocolError) and tries < 3 and self.alive(peer):
                    log.info("task %s round %d of shard %d on %s: %s; asking again",
                             self.task_id, k, sh.index, peer, exc)  # fmt: skip
                    await trio.sleep(0.25 * tries)
                    continue
                tries = 0
                self._drop(peer, f"round {k} of shard {sh.index}: {exc}")
                await self._place(sh, self._candidate(sh))
                continue
            node = self.nodes[peer]
            node.samples += d.samples
            node.step = start + len(d.losses) - 1
            node.loss = d.losses[-1] if d.losses else node.loss
            results[sh.index] = (state, meta, d)
            return

    async def finish(
        self, adapter_id: str, ticket_hash: bytes = bytes(32), replicas: int = 1
    ) -> list[tuple[str, TrainSigned]]:
        """Hand the final adapter to every surviving participant: each pulls it, checks
        it, keeps it and signs it. The (peer, signed) answers that came back."""
        out: list[tuple[str, TrainSigned]] = []

        async def one(peer: str) -> None:
            try:
                rec = TrainFinish(self.task_id, adapter_id, len(self._global), self.model_id,
                                  ticket_hash, replicas)  # fmt: skip
                out.append((peer, await self._request(peer, rec, TrainSigned, None)))
            except StreamProtocolError as exc:
                log.info("task %s: %s did not take the final adapter: %s", self.task_id,
                         peer, exc)  # fmt: skip

        async with trio.open_nursery() as nursery:
            for n in self.nodes.values():
                if n.status != "failed":
                    nursery.start_soon(one, n.peer)
        return out

    async def abort(self) -> None:
        """Tell every participant to drop the task (best effort)."""
        with trio.move_on_after(10):
            async with trio.open_nursery() as nursery:
                for peer in self.nodes:
                    nursery.start_soon(self._abort_one, peer)

    async def _abort_one(self, peer: str) -> None:
        with contextlib.suppress(StreamProtocolError):
            await self._request(peer, TrainAbort(self.task_id), Ack, 5.0)

    def drop_blobs(self) -> None:
        for sh in self.shards:
            self._blobs.drop(sh.hash)
        if self.global_hash:
            self._blobs.drop(self.global_hash)
