"""The serving side of pipelines: layer spans of a model, run for other nodes' pipelines.

``ShardHost``: the spans this node serves (``--serve-layers MODEL:A-B``, from a shard
directory, or split from the whole model on first start), loaded on first use and run
by the inference engine (``vcoind.compute.engine``): one static KV cache slot per
session, at most ``MAX_SESSIONS`` (or ``compute.batch_slots``), and of those at most
``compute.pipeline_sessions_per_peer`` (never more than half) for one other peer, dropped
after ``SESSION_IDLE_S`` without a step; a session answers only the peer that opened
it. Compute runs on a worker thread; one-token steps of different sessions that arrive
together run as one engine batch. The driving side is ``vcoind.market.routes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from vcoind.compute.frames import FrameError, TensorFrame
from vcoind.compute.params import GenerationError
from vcoind.compute.shardwire import (
    MAX_FRAME_BYTES,
    ShardClose,
    ShardOpen,
    ShardOutput,
    ShardStep,
)
from vcoind.p2p.streams import Ack, ErrorReply, StreamProtocolError
from vcoind.presence.messages import LayerSpan

log = logging.getLogger("vcoind.pipeline")

MAX_SESSIONS = 32
SESSIONS_PER_PEER = 16
SESSION_IDLE_S = 120.0


class Channel(Protocol):
    """Requests to one hop, in order (a stream kept open for the session, or a plain
    call when the hop is this node)."""

    async def request(self, record: Any, reply_type: type[Any]) -> Any: ...

    async def aclose(self) -> None: ...


class LocalChannel:
    """Hops on this node: plain calls, as ``peer`` (this node: no per-peer budget)."""

    def __init__(self, host: ShardHost, peer: str) -> None:
        self._host = host
        self._peer = peer

    async def request(self, record: Any, reply_type: type[Any]) -> Any:
        reply = await self._host.handle(self._peer, record)
        if isinstance(reply, ErrorReply):
            raise StreamProtocolError(f"{self._peer} answered {reply.code}: {reply.message}")
        return reply

    async def aclose(self) -> None:
        return None


class PipelineError(Exception):
    """No route covers the model, or the pipeline failed after every reroute."""


# --- serving ------------------------------------------------------------------


@dataclass
class _Session:
    engine: Any  # vcoind.compute.engine.Engine of the span
    slot: int
    last_used: float
    peer: str = ""  # who opened it: the only one it answers
    steps: int = 0

    def close(self) -> None:
        self.engine.release(self.slot)


@dataclass
class _Pending:
    """A decode step waiting for its span's next batch."""

    sess: _Session
    x: Any
    done: trio.Event = field(default_factory=trio.Event)
    out: TensorFrame | None = None
    compute_s: float = 0.0
    error: Exception | None = None


@dataclass
class ServedSpan:
    model: str  # name
    model_id: str
    start: int
    end: int
    path: Path
    shard: Any = None  # loaded on first use
    engine: Any = None  # ... with its engine
    last_used: float = 0.0

    @property
    def size(self) -> int:
        """Bytes of weights (what loading it costs, near enough, in fp32)."""
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))

    def span(self) -> LayerSpan:
        return LayerSpan(self.model_id, self.start, self.end)


def parse_serve_spec(spec: str) -> tuple[str, int, int]:
    """``"tiny-qwen2:0-1"`` -> ("tiny-qwen2", 0, 1)."""
    name, sep, rng = spec.rpartition(":")
    a, dash, b = rng.partition("-")
    if not sep or not name or not dash or not a.isdigit() or not b.isdigit() or int(a) > int(b):
        raise ValueError(f"expected MODEL:START-END (inclusive layers), got {spec!r}")
    return name, int(a), int(b)


class ShardHost:
    """Spans run on ``device`` ("auto": CUDA in fp16 where there is a GPU, else CPU in
    fp32). Hidden states arrive in the sender's dtype and are cast to the span's; logits
    leave in fp32, so mixed CPU/GPU routes work (the answer then follows the fp16 hops'
    numerics, like a single fp16 node)."""

    def __init__(
        self, device: str = "auto", budget_bytes: int = 0, *, slots: int = 0,
        max_context: int = 4096, kernels: bool | None = None,
        sessions_per_peer: int = SESSIONS_PER_PEER,
        on_refused: Callable[[str], None] = lambda resource: None, me: str = "",
    ) -> None:  # fmt: skip
        self.budget_bytes = budget_bytes  # 0: no limit
        self.max_sessions = slots or MAX_SESSIONS
        # one peer cannot hold every session: at most half of them
        self.sessions_per_peer = max(1, min(sessions_per_peer, self.max_sessions // 2))
        self.on_refused = on_refused  # (resource) a budget refused a request
        self.me = me  # our own peer id: our own pipelines have no per-peer budget
        self.max_context = max_context
        self.kernels = kernels  # the engines' triton kernels: None = where they work
        self.sessions_served = 0  # sessions opened since start
        self.peak_batch = 0  # most decode steps run together
        self._waiting: dict[int, list[_Pending]] = {}  # engine -> steps waiting for a batch
        self._leading: set[int] = set()  # engines whose batch loop is running
        self.spans: list[ServedSpan] = []
        self._sessions: dict[str, _Session] = {}
        self._limiter = trio.CapacityLimiter(1)
        self._prefer = device
        self._device: Any = None
        self._dtype: Any = None
        self._load_lock = trio.Lock()

    def add(self, served: ServedSpan) -> None:
        self.spans.append(served)

    def find(self, model_id: str, start: int, end: int) -> ServedSpan | None:
        return next((s for s in self.spans if (s.model_id, s.start, s.end) ==
                     (model_id, start, end)), None)  # fmt: skip

    def remove(self, model_id: str, start: int, end: int) -> None:
        """Stop serving a span: new sessions are refused; open ones finish on it."""
        self.spans = [s for s in self.spans if (s.model_id, s.start, s.end) !=
                      (model_id, start, end)]  # fmt: skip

    async def handle(self, peer: str, record: Any) -> Any:
        self._expire()
        if isinstance(record, ShardOpen):
            served = self.find(record.model_id, record.start, record.end)
            if served is None:
                raise StreamProtocolError(f"span {record.start}-{record.end} of "
                                          f"{record.model_id} is not served here")  # fmt: skip
            old = self._sessions.get(record.session)
            if old is not None and old.peer != peer:
                raise StreamProtocolError(f"session {record.session} is another peer's")
            if old is None:
                held = sum(1 for s in self._sessions.values() if s.peer == peer)
                if held >= self.sessions_per_peer and peer != self.me:
                    return self._over_budget(peer, "pipeline_sessions_per_peer",
                                             f"pipeline sessions per peer: you hold {held}, "
                                             "the most one peer may (compute."
                                             f"pipeline_sessions_per_peer = "
                                             f"{self.sessions_per_peer})")  # fmt: skip
                if len(self._sessions) >= self.max_sessions:
                    return self._over_budget(peer, "pipeline_sessions",
                                             f"pipeline sessions: {self.max_sessions} open, "
                                             "the most")  # fmt: skip
            engine = await self._load(served)
            served.last_used = time.monotonic()
            self._drop(record.session)  # re-opened: start over
            try:
                slot = engine.alloc()
            except Exception as exc:  # EngineError: every slot of this span is taken
                raise StreamProtocolError(f"busy: {exc}") from None
            self._sessions[record.session] = _Session(engine, slot, time.monotonic(), peer)
            self.sessions_served += 1
            return Ack()
        if isinstance(record, ShardClose):
            sess = self._sessions.get(record.session)
            if sess is not None and sess.peer == peer:
                self._drop(record.session)
            return Ack()
        if isinstance(record, ShardStep):
            sess = self._sessions.get(record.session)
            if sess is None or sess.peer != peer:
                raise StreamProtocolError(f"no session {record.session} (closed or expired)")
            if record.step != sess.steps:
                raise StreamProtocolError(f"step {record.step} out of order "
                                          f"(expected {sess.steps})")  # fmt: skip
            frame = TensorFrame(record.dtype, tuple(record.shape), record.data)
            try:
                x = self._tensor(sess, frame)
                if x.shape[1] == 1 and sess.steps > 0:  # a decode step: batched with others
                    out, compute_s = await self._decode_batched(sess, x)
                else:
                    out, compute_s = await trio.to_thread.run_sync(
                        self._compute, sess, x, limiter=self._limiter
                    )
            except (FrameError, GenerationError) as exc:
                self._drop(record.session)  # a broken session is not resumed
                raise StreamProtocolError(f"bad frame: {exc}") from None
            sess.steps += 1
            sess.last_used = time.monotonic()
            return ShardOutput(out.dtype, out.shape, out.data, round(compute_s, 6))
        raise StreamProtocolError(f"unexpected {type(record).__name__}")

    def _over_budget(self, peer: str, resource: str, message: str) -> ErrorReply:
        log.warning("refused a pipeline session to %s: %s", peer, message)
        self.on_refused(resource)
        return ErrorReply("over_budget", message)

    def _drop(self, session: str) -> None:
        sess = self._sessions.pop(session, None)
        if sess is not None:
            sess.close()

    def _tensor(self, sess: _Session, frame: TensorFrame) -> Any:
        """The step's input, checked against the span: token ids [1, T] or hidden [1, T, H]."""
        import torch

        x = frame.to_tensor(self._device, MAX_FRAME_BYTES)
        engine = sess.engine
        first = engine.first
        if first != (x.dtype == torch.int64) or x.dim() != (2 if first else 3) or x.shape[0] != 1:
            raise FrameError("the first span takes int64 token ids [1, T], the others "
                             "hidden states [1, T, H]")  # fmt: skip
        if not first and x.shape[-1] != engine.hidden:
            raise FrameError(f"hidden size {x.shape[-1]} != {engine.hidden}")
        if x.shape[1] == 0:
            raise FrameError("an empty step")
        if not first:
            x = x.to(engine.dtype)  # the previous hop may run another dtype
        return x

    def _compute(self, sess: _Session, x: Any) -> tuple[TensorFrame, float]:
        """One session's step on its own (a prompt chunk)."""
        t0 = time.perf_counter()
        engine = sess.engine
        if x.shape[1] == 1:
            y = engine.decode([sess.slot], x[0]).unsqueeze(1)  # [1, 1, V] or [1, 1, H]
        else:
            y = engine.prefill(sess.slot, x[0])  # [V] (last position) or [T, H]
            y = y.view(1, 1, -1) if engine.last else y.unsqueeze(0)
        # (logits leave in fp32: only the next token's travel back)
        return TensorFrame.from_tensor(y.contiguous()), time.perf_counter() - t0

    async def _decode_batched(self, sess: _Session, x: Any) -> tuple[TensorFrame, float]:
        """Continuous batching for spans: one-token steps of different sessions that meet
        at a span run as one engine batch. The first to arrive leads: it runs batches until
        none is waiting; the others wait for their row."""
        key = id(sess.engine)
        queue = self._waiting.setdefault(key, [])
        item = _Pending(sess, x)
        queue.append(item)
        if key not in self._leading:
            self._leading.add(key)
            try:
                with trio.CancelScope(shield=True):  # others' rows ride on this batch
                    while queue:
                        batch = queue[:]
                        queue.clear()
                        self.peak_batch = max(self.peak_batch, len(batch))
                        try:
                            await trio.to_thread.run_sync(self._run_batch, batch,
                                                          limiter=self._limiter)  # fmt: skip
                        finally:
                            for it in batch:
                                it.done.set()
            finally:
                self._leading.discard(key)
        await item.done.wait()
        if item.error is not None:
            raise item.error
        if item.out is None:
            raise StreamProtocolError("the batch this step was in failed")
        return item.out, item.compute_s

    def _run_batch(self, batch: list[_Pending]) -> None:
        import torch

        t0 = time.perf_counter()
        engine = batch[0].sess.engine
        try:
            y = engine.decode([it.sess.slot for it in batch], torch.cat([it.x[0] for it in batch]))
        except Exception:  # one bad row (a full context): run them one by one
            for it in batch:
                try:
                    it.out, it.compute_s = self._compute(it.sess, it.x)
                except Exception as exc:  # reported to that row's sender alone
                    it.error = exc
            return
        dt = time.perf_counter() - t0
        for i, it in enumerate(batch):
            it.out = TensorFrame.from_tensor(y[i : i + 1].unsqueeze(1).contiguous())
            it.compute_s = dt

    def _make_room(self, served: ServedSpan) -> None:
        """Within the memory budget: unload idle spans, least recently used first."""
        if not self.budget_bytes:
            return
        busy = {id(sess.engine) for sess in self._sessions.values()}
        loaded = sorted((s for s in self.spans if s.shard is not None and s is not served),
                        key=lambda s: s.last_used)  # fmt: skip
        used = sum(s.size for s in loaded)
        for s in loaded:
            if used + served.size <= self.budget_bytes:
                break
            if id(s.engine) not in busy:
                log.info("unloading layers %d-%d of %s (memory budget)", s.start, s.end, s.model)
                s.shard = s.engine = None
                used -= s.size
        if used + served.size > self.budget_bytes:
            raise StreamProtocolError(
                f"busy: layers {served.start}-{served.end} do not fit the memory budget "
                f"next to the spans in use")  # fmt: skip

    async def _load(self, served: ServedSpan) -> Any:
        """The span's engine, loading the shard first if it is not in memory."""
        async with self._load_lock:
            if served.engine is None:
                self._make_room(served)
                from vcoind.compute.generate import pick_device

                if self._device is None:
                    self._device, self._dtype = pick_device(self._prefer)
                log.info("loading layers %d-%d of %s on %s (%s)", served.start, served.end,
                         served.model, self._device, self._dtype)  # fmt: skip
                served.shard, served.engine = await trio.to_thread.run_sync(
                    self._load_engine, served.path, limiter=self._limiter
                )
        return served.engine

    def _load_engine(self, path: Path) -> tuple[Any, Any]:
        from vcoind.compute.engine import Engine, Stack
        from vcoind.compute.generate import warm_up
        from vcoind.compute.shards import load_shard

        shard = load_shard(path, self._device, self._dtype)
        engine = Engine(Stack.of_shard(shard), slots=self.max_sessions,
                        max_context=self.max_context, device=self._device,
                        dtype=self._dtype, kernels=self.kernels)  # fmt: skip
        warm_up(engine, path.name)
        return shard, engine

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._sessions.items() if now - s.last_used > SESSION_IDLE_S]:
            self._drop(sid)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)
