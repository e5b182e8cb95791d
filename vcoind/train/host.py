"""A node's side of LoRA training: shards it accepted, rounds it trains, adapters it keeps.

Per (task, shard) the host holds the verified examples and, once the first round
comes, a ``LoraTrainer`` (the base model with LoRA on it). A round loads the global
adapter the origin names (pulled and checked by hash), trains its steps in a worker
thread under the device limiter, reports (step, loss) as it goes, and answers with the
hash of its own adapter, which it keeps for the origin to pull.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from vcoind.compute.models import ModelError, ModelStore
from vcoind.market.messages import Ack
from vcoind.market.offered import Offered
from vcoind.p2p.streams import ErrorReply, StreamProtocolError
from vcoind.train.adapters import (
    AdapterStore,
    BlobCache,
    Refusal,
    Request,
    blob_part,
    over_budget,
    pull_blob,
)
from vcoind.train.spec import (
    MAX_SHARD_BYTES,
    LoraSettings,
    TrainError,
    parse_jsonl,
    total_steps,
)
from vcoind.train.wire import (
    BlobGet,
    BlobPart,
    RoundDone,
    TrainAbort,
    TrainFinish,
    TrainJoin,
    TrainProgress,
    TrainRound,
    TrainSigned,
)

if TYPE_CHECKING:
    from vcoind.train.lora import LoraTrainer

log = logging.getLogger("vcoind.train")
PROGRESS_EVERY_S = 0.25
MAX_SHARDS = 4  # shards one node trains at once (each holds a copy of its base model)
MAX_SHARDS_PER_PEER = 2  # ... for one origin (compute.train_slots, train_slots_per_peer)
SHARD_IDLE_S = 3600.0  # a shard whose origin went silent this long is dropped (its model too)


@dataclass
class _Shard:
    origin: str
    join: TrainJoin
    settings: LoraSettings
    examples: list[dict[str, str]]
    model_path: Any
    model_id: str
    trainer: LoraTrainer | None = None
    last: tuple[TrainRound, RoundDone] | None = None  # answered again if asked again
    steps: int = 0  # of its schedule, all of which this node trains before it signs
    touched: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: trio.Lock = field(default_factory=trio.Lock)


class TrainHost:
    def __init__(
        self,
        models: ModelStore,
        adapters: AdapterStore,
        blobs: BlobCache,
        request: Request,
        *,
        device: Callable[[], str],
        limiter: Callable[[], Awaitable[trio.CapacityLimiter]],
        lora: Callable[[], Awaitable[Any]],
        sign: Callable[[str, str, bytes], tuple[str, bytes]] | None = None,
        ticket: Callable[[str, str, str, int], bytes | None] | None = None,
        on_adapters: Callable[[], None] = lambda: None,
        on_rate: Callable[[str, float], None] = lambda model_id, samples_per_s: None,
        on_refused: Callable[[Refusal], None] = lambda refusal: None,
        slots: int = MAX_SHARDS,
        slots_per_peer: int = MAX_SHARDS_PER_PEER,
    ) -> None:
        self._models = models
        self.adapters = adapters
        self.blobs = blobs
        self._request = request
        self._device = device
        self._limiter = limiter
        self._lora = lora  # -> the vcoind.train.lora module, imported safely
        self.sign = sign  # (task id, adapter id, ticket hash) -> (eth address, signature)
        # (origin, task id, model id, replicas) -> the struct hash of the origin's unpaid
        # ticket, as this node computes it (None: the origin's address is not known)
        self.ticket = ticket
        self.on_refused = on_refused  # counted by the service
        self.slots = slots
        self.slots_per_peer = slots_per_peer
        # (origin, task id, shard): one origin's task ids never collide with another's
        self._shards: dict[tuple[str, str, int], _Shard] = {}
        self._joining: dict[str, int] = {}  # origin -> joins pulling their shard now
        self.on_adapters = on_adapters  # the set of adapters changed
        self.on_rate = on_rate  # (model id, samples per second) measured
        self.rounds_trained = 0
        # (task id, origin) pairs we offered to train: a join for anything else is
        # refused (sign only our own work)
        self._offered = Offered()

    def offered(self, task_id: str, origin: str) -> None:
        """We bid to train ``task_id`` of ``origin``: its joins are welcome."""
        self._offered.add(task_id, origin)

    @property
    def active(self) -> int:
        return len(self._shards)

    async def handle(self, peer: str, r: Any) -> Any:
        """A /vcoin/train/1.0.0 request from ``peer`` (origin-side records go elsewhere)."""
        try:
            return await self._handle(peer, r)
        except Refusal as exc:
            log.warning("refused %s from %s: %s", type(r).__name__, peer, exc)
            self.on_refused(exc)
            return ErrorReply(exc.code, str(exc)[:1024])

    async def _handle(self, peer: str, r: Any) -> Any:
        try:
            if isinstance(r, BlobGet):
                return self.blob(r)
            if isinstance(r, TrainJoin):
                return await self._join(peer, r)
            if isinstance(r, TrainRound):
                return await self._round(peer, r)
            if isinstance(r, TrainFinish):
                return await self._finish(peer, r)
            if isinstance(r, TrainAbort):
                self._abort(peer, r.task_id)
                return Ack()
        except Refusal:
            raise
        except TrainError as exc:
            raise StreamProtocolError(str(exc)) from None
        raise StreamProtocolError(f"unexpected {type(r).__name__}")

    def blob(self, r: BlobGet) -> BlobPart:
        return blob_part(self.blobs.get(r.hash) or self.adapters.get(r.hash), r)

    async def _join(self, origin: str, j: TrainJoin) -> Ack:
        key = (origin, j.task_id, j.shard)
        old = self._shards.get(key)
        if old is not None:
            if old.join != j:
                raise TrainError(f"shard {j.shard} of {j.task_id} was joined with other terms")
            return Ack()
        if (j.task_id, origin) not in self._offered:
            raise _refuse("not_bid", f"this node did not offer to train task {j.task_id} "
                          "for that origin")  # fmt: skip
        if j.shard_bytes > MAX_SHARD_BYTES:
            raise TrainError(f"a shard of {j.shard_bytes} bytes exceeds the limit of "
                             f"{MAX_SHARD_BYTES}")  # fmt: skip
        self._check_slots(origin)
        try:
            info = self._models.resolve(j.model)
        except ModelError as exc:
            raise TrainError(str(exc)) from None
        try:
            settings = LoraSettings.from_dict(json.loads(j.settings))
        except (ValueError, TypeError, TrainError) as exc:
            raise TrainError(f"settings: {exc}") from None
        self._joining[origin] = self._joining.get(origin, 0) + 1  # its slot, held meanwhile
        try:
            data = await pull_blob(self._request, origin, j.shard_hash, j.shard_bytes)
        finally:
            self._joining[origin] -= 1
            if not self._joining[origin]:
                del self._joining[origin]
        examples = parse_jsonl(data, f"shard {j.shard}")
        if len(examples) != j.examples:
            raise TrainError(f"shard {j.shard} holds {len(examples)} examples, not {j.examples}")
        self._check_slots(origin)  # (others may have joined while we pulled)
        self._shards[key] = _Shard(origin, j, settings, examples, info.path, info.model_id,
                                   steps=total_steps(len(examples), settings))  # fmt: skip
        log.info("task %s: shard %d joined (%d examples, %d steps, checked %s)", j.task_id,
                 j.shard, len(examples), total_steps(len(examples), settings),
                 j.shard_hash[:12])  # fmt: skip
        return Ack()

    def _check_slots(self, origin: str) -> None:
        """Over budget: every training slot of this node taken, or the origin's share."""
        held = sum(1 for s in self._shards.values() if s.origin == origin)
        held += self._joining.get(origin, 0)
        if held >= self.slots_per_peer:
            n = self.slots_per_peer
            raise over_budget("train_slots_per_peer", f"training slots per peer: you hold "
                              f"{held} of this node's shards, the most one origin may "
                              f"(compute.train_slots_per_peer = {n})")  # fmt: skip
        busy = len(self._shards) + sum(self._joining.values())
        if busy >= self.slots:
            raise over_budget("train_slots", f"training slots: this node trains {busy} "
                              f"shards already, the most (compute.train_slots = "
                              f"{self.slots})")  # fmt: skip

    def _shard(self, origin: str, task_id: str, shard: int) -> _Shard:
        sh = self._shards.get((origin, task_id, shard))
        if sh is None:
            raise TrainError(f"shard {shard} of {task_id} was not joined by this origin")
        sh.touched = time.monotonic()
        return sh

    def sweep(self, max_idle_s: float = SHARD_IDLE_S) -> int:
        """Drop shards nobody asked about for ``max_idle_s`` (their origin is gone)."""
        now = time.monotonic()
        stale = [k for k, s in self._shards.items()
                 if now - s.touched > max_idle_s and not s.lock.locked()]  # fmt: skip
        for key in stale:
            _, task_id, shard = key
            log.info("task %s: dropping shard %d, idle for %.0f s", task_id, shard, max_idle_s)
            sh = self._shards.pop(key)
            sh.cancel.set()
            sh.trainer = None
        return len(stale)

    async def _round(self, origin: str, r: TrainRound) -> RoundDone:
        sh = self._shard(origin, r.task_id, r.shard)
        async with sh.lock:  # a retried round waits for the one still running
            if sh.last is not None and sh.last[0] == r and self.blobs.get(sh.last[1].adapter):
                return sh.last[1]  # the origin did not get our answer: the same again
            state = None
            if r.adapter:
                data = self.blobs.get(r.adapter)
                if data is None:
                    data = await pull_blob(self._request, origin, r.adapter, r.adapter_bytes)
                    self.blobs.put(data)
                state, _ = await trio.to_thread.run_sync((await self._lora()).adapter_from_bytes,
                                                         data)  # fmt: skip
            token = trio.lowlevel.current_trio_token()
            last = 0.0

            def on_step(step: int, loss: float) -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY_S:
                    last = now
                    token.run_sync_soon(nursery.start_soon, self._progress, sh, step, loss)

            lora = await self._lora()

            def work() -> tuple[int, list[float], bytes]:
                if sh.trainer is None:
                    sh.trainer = lora.LoraTrainer(sh.model_path, sh.settings, self._device())
                if state is not None:
                    sh.trainer.set_adapter_state(state)
                samples, losses = sh.trainer.train(
                    sh.examples, r.start_step, r.steps, on_step, sh.cancel,
                    label=f"{r.task_id[:12]} shard {r.shard} round {r.round}",
                )  # fmt: skip
                return samples, losses, lora.adapter_to_bytes(sh.trainer.adapter_state(),
                                                              sh.trainer.meta)  # fmt: skip

            t0 = time.monotonic()
            limiter = await self._limiter()
            async with trio.open_nursery() as nursery:
                samples, losses, out = await trio.to_thread.run_sync(work, limiter=limiter)
                nursery.cancel_scope.cancel()
            h = self.blobs.put(out)
            self.rounds_trained += 1
            elapsed = time.monotonic() - t0
            if samples and elapsed > 0:
                self.on_rate(sh.model_id, samples / elapsed)
            log.info("task %s shard %d round %d: steps %d-%d, loss %.4f -> %.4f", r.task_id,
                     r.shard, r.round, r.start_step, r.start_step + len(losses) - 1,
                     losses[0] if losses else 0, losses[-1] if losses else 0)  # fmt: skip
            done = RoundDone(r.task_id, r.shard, r.round, samples, tuple(losses), h, len(out),
                             round(time.monotonic() - t0, 6))  # fmt: skip
            sh.last = (r, done)
            return done

    async def _progress(self, sh: _Shard, step: int, loss: float) -> None:
        j = sh.join
        try:
            await self._request(sh.origin, TrainProgress(j.task_id, j.shard, step, loss), Ack)
        except StreamProtocolError as exc:
            log.debug("training progress not delivered: %s", exc)

    async def _finish(self, origin: str, f: TrainFinish) -> TrainSigned:
        """Keep the final adapter and sign it: only for a task whose shards this node
        accepted from ``origin`` and trained to their end, under the unpaid ticket of that
        origin's task as this node computes it (anything else: ``sign_refused``)."""
        mine = [s for k, s in self._shards.items() if k[:2] == (origin, f.task_id)]
        if not mine:
            raise _refuse("not_joined", f"this node trains no shard of {f.task_id} for you")
        undone = [s.join.shard for s in mine if not _trained(s)]
        if undone:
            raise _refuse("not_trained", f"shard(s) {undone} of {f.task_id} are not trained "
                          "to their end here")  # fmt: skip
        if f.model_id != mine[0].model_id:
            raise _refuse("model", f"this node trained {f.task_id} on model "
                          f"{mine[0].model_id[:19]}, not {f.model_id[:19]}")  # fmt: skip
        if self.sign is not None:
            want = None if self.ticket is None else self.ticket(origin, f.task_id, f.model_id,
                                                                f.replicas)  # fmt: skip
            if want is None:
                raise _refuse("unknown_origin", "no Ethereum address of yours is known here "
                              "(no heartbeat): no ticket to sign under")  # fmt: skip
            if f.ticket_hash != want:
                raise _refuse("ticket", f"the ticket hash is not that of your unpaid "
                              f"lora_training task {f.task_id} for {f.replicas} "
                              "node(s)")  # fmt: skip
        data = self.adapters.get(f.adapter) or self.blobs.get(f.adapter)
        if data is None:
            data = await pull_blob(self._request, origin, f.adapter, f.adapter_bytes)
        lora = await self._lora()
        _, meta = await trio.to_thread.run_sync(lora.adapter_from_bytes, data)  # usable
        if meta.get("base_model_id") != mine[0].model_id:
            raise _refuse("adapter", f"adapter {f.adapter[:12]} is not for the model trained")
        await trio.to_thread.run_sync(self.adapters.put, f.adapter, data, origin)
        self.on_adapters()
        self._abort(origin, f.task_id)
        if self.sign is None:
            return TrainSigned()
        address, sig = self.sign(f.task_id, f.adapter, f.ticket_hash)
        return TrainSigned(address, sig)

    def _abort(self, origin: str, task_id: str) -> None:
        for key in [k for k in self._shards if k[:2] == (origin, task_id)]:
            sh = self._shards.pop(key)
            sh.cancel.set()
            sh.trainer = None


def _trained(sh: _Shard) -> bool:
    """This node trained the shard's whole schedule (its last round ends the schedule)."""
    if sh.last is None:
        return False
    r, done = sh.last
    return r.start_step + len(done.losses) >= sh.steps


def _refuse(reason: str, message: str) -> Refusal:
    return Refusal("sign_refused", reason, f"not signed: {message}")
