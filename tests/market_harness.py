"""A virtual-time harness for the task market: several market nodes in one trio loop.

Each node runs the daemon's own ``vcoind.market.service.MarketService``: its
``TaskOrigin``, ``TaskWorker``, consensus roles (``Replica``, ``Coordinator``, with a
real ``Signer``), ``TaskProtocol``, vote bus and RPC methods, constructed, mounted and
run as ``vcoind.node`` does, on real ``TaskStore``/``ConsensusStore`` over an in-memory
SQLite ``Store``. One method is overridden (``HarnessMarket.embed``: consensus
embeddings without a model or a thread); only the ports are stand-ins:

- gossip (``MemoryGossip``): a published record reaches the route for its type on every
  OTHER live node, each delivery in its own task after the link's latency (the service
  hands its own votes back to itself, as on a node);
- streams (``MemoryStreams``): a request runs the target's ``TaskProtocol`` handler in
  the target's nursery after the link's latency (to itself ``TaskProtocol.send`` makes
  a plain call); a dead node raises ``StreamOpenError`` (nothing sent), and one that
  dies while answering never answers;
- presence (``HarnessPresence``, ``HarnessView``): the ``NetworkView`` methods the
  market calls, answered from which nodes serve which model and are alive (a dead node
  stays in the others' views for ``peer_timeout_s``, as a peer does until its heartbeat
  expires);
- compute (``ScriptedCompute``): a scripted stand-in for the GPU;
- notifications (``MarketNode._publish``): from the task views the service publishes,
  the node records when each task finished, and each wakes ``MarketNet.wait_for``;
- RPC: the service's methods go on a ``MethodRegistry``, its GET aliases on a recorder
  (``HttpAliases``).

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` with
``virtual_time_guards``: timeouts of minutes then cost milliseconds. Records cross the
network encoded and decoded by the wire codec, so every record sent is wire-valid.
Nothing runs in a thread: the stores run inline and the guards make any
``trio.to_thread.run_sync`` fail. Pipelines, training and settlement are out of scope
(no pipelined tasks; no settler, trainer or chain, as on a node without them).

A handler that raises, or anything the daemon logs at ERROR (a local vote handler, a
task that failed unexpectedly), fails the test: the real node would only log it.

Latencies and durations are given as binary fractions (1/64, 0.125, 1.0, ...) so that
virtual times add up exactly and the tests can assert them with tight tolerances. (The
origin once spun at a no-progress boundary when they did not: it waited ``timeout -
silent`` seconds, less than the clock resolves; it now waits for an absolute deadline.
The watchdog of ``market_net`` turns any such spin into a failure.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from vcoind.compute.models import ModelError, ModelInfo
from vcoind.compute.params import GenerationError, GenerationParams
from vcoind.compute.sampling import GenerationResult
from vcoind.config import MarketConfig, P2PConfig
from vcoind.market.payments import Payments
from vcoind.market.service import MarketService
from vcoind.metrics import NodeMetrics
from vcoind.p2p.codec import decode, encode
from vcoind.p2p.gossip import budget_limits
from vcoind.p2p.policy import Budgets
from vcoind.p2p.streams import ErrorReply, StreamOpenError, StreamProtocol, StreamProtocolError
from vcoind.rpc import MethodRegistry
from vcoind.service import Mounts
from vcoind.signer import Signer
from vcoind.store import PeerUpdate, Store, TaskRow

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger("tests.market_harness")

T = TypeVar("T")
NETWORK = "testnet"
Behaviour = Literal["normal", "stall", "fail", "differ"]
Handler = Callable[[Any], Awaitable[None]]


# --- virtual time ---------------------------------------------------------------------


def _no_threads(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(
        "trio.to_thread.run_sync under the market harness: a thread breaks virtual time "
        "(the MockClock jumps while it runs)"
    )


def virtual_time_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Call from the test's clock fixture: any thread hop is an error."""
    monkeypatch.setattr(trio.to_thread, "run_sync", _no_threads)


# --- compute ----------------------------------------------------------------------------


def scripted_tokens(prompt: str, n: int, salt: int = 0) -> tuple[int, ...]:
    """``n`` token ids cycled from the prompt's bytes (+ ``salt``): deterministic, so equal
    replicas answer alike token for token."""
    data = prompt.encode() or b"\0"
    return tuple((data[i % len(data)] + salt) % 256 for i in range(n))


def scripted_text(tokens: Sequence[int]) -> str:
    return " ".join(f"t{t}" for t in tokens)


def scripted_answer(prompt: str, n: int) -> str:
    """What a ``normal`` scripted worker answers to ``prompt`` with ``max_new_tokens=n``."""
    return scripted_text(scripted_tokens(prompt, n))


class ScriptedModels:
    """The model store's lookups (``resolve``, ``all``) over names only."""

    def __init__(self, names: Sequence[str]) -> None:
        self._models = {
            n: ModelInfo(n, "sha256:" + hashlib.sha256(n.encode()).hexdigest(),
                         Path("/nonexistent") / n, "scripted", 2, 8, 256, 0, False)
            for n in names
        }  # fmt: skip

    def all(self) -> list[ModelInfo]:
        return list(self._models.values())

    def resolve(self, ref: str) -> ModelInfo:
        for m in self._models.values():
            if ref in (m.name, m.model_id):
                return m
        known = ", ".join(sorted(self._models)) or "none"
        raise ModelError(f"unknown model {ref!r} (this node serves: {known})")


class ScriptedExecutor:
    """The executor's interface as the worker uses it (``generate``, ``load``,
    ``tokens_per_s``, ``slots``), run by the script of its ``ScriptedCompute``."""

    def __init__(self, compute: ScriptedCompute) -> None:
        self._compute = compute
        self.tokens_per_s: dict[str, float] = {}

    @property
    def slots(self) -> int:
        return self._compute.slots

    async def load(self, ref: str) -> ModelInfo:
        await trio.lowlevel.checkpoint()
        return self._compute.models.resolve(ref)

    async def generate(
        self, ref: str, prompt: str, params: GenerationParams, *,
        on_progress: Callable[[int], None] | None = None,
        on_text: Callable[[str], None] | None = None, priority: int = 0,
        adapter: tuple[str, Path] | None = None, scope: str = "",
    ) -> GenerationResult:  # fmt: skip
        c = self._compute
        info = c.models.resolve(ref)
        if c.behaviour == "stall":  # accepted, then never a token
            await trio.sleep_forever()
        await trio.sleep(c.prefill_s)
        tokens = scripted_tokens(prompt, params.max_new_tokens, 1 if c.behaviour == "differ" else 0)
        t0 = trio.current_time()
        for i in range(len(tokens)):
            if c.behaviour == "fail" and i == c.fail_at:
                raise GenerationError(f"scripted failure after {i} tokens")
            await trio.sleep(c.per_token_s)
            if on_progress is not None:
                on_progress(i + 1)
            if on_text is not None:
                on_text(scripted_text(tokens[: i + 1]))
        decode_s = trio.current_time() - t0
        if decode_s > 0:
            self.tokens_per_s[info.model_id] = len(tokens) / decode_s
        return GenerationResult(scripted_text(tokens), tokens, len(prompt.encode()), "length",
                                c.prefill_s, decode_s)  # fmt: skip


class ScriptedCompute:
    """A stand-in for the GPU, in timing tests only: the ``ComputeService`` parts
    ``TaskWorker`` uses (``models``, ``await executor()``, ``slots``). Generation takes
    ``prefill_s`` then ``per_token_s`` of virtual time per token, reporting progress each
    token; the text comes from the prompt's bytes (``scripted_answer``). Behaviours:
    ``normal``; ``stall`` (accepts, never progresses); ``fail`` (GenerationError after
    ``fail_at`` tokens); ``differ`` (a different answer). The real engine is tested
    elsewhere (tests/test_engine.py, tests/test_compute.py)."""

    def __init__(
        self, models: Sequence[str], *, behaviour: Behaviour = "normal",
        per_token_s: float = 0.0625, prefill_s: float = 0.0, fail_at: int = 0, slots: int = 1,
    ) -> None:  # fmt: skip
        self.models = ScriptedModels(models)
        self.behaviour = behaviour
        self.per_token_s, self.prefill_s = per_token_s, prefill_s
        self.fail_at = fail_at
        self.slots = slots
        self._executor = ScriptedExecutor(self)

    async def executor(self) -> ScriptedExecutor:
        await trio.lowlevel.checkpoint()
        return self._executor


async def deterministic_embed(texts: Sequence[str]) -> list[tuple[float, ...]]:
    """The sentence embedder's stand-in: a 64-bin byte histogram per text (no model, no
    thread). Equal texts embed equally; consensus tests use equal answers."""
    await trio.lowlevel.checkpoint()
    out = []
    for text in texts:
        v = [0.0] * 64
        for b in text.encode():
            v[b % 64] += 1.0
        out.append(tuple(v))
    return out


# --- the network ports ----------------------------------------------------------------------


class MemoryGossip:
    """The ``Gossip`` port of one node: ``on`` routes, ``publish`` to the other nodes."""

    def __init__(self, net: MarketNet, me: str) -> None:
        self._net = net
        self._me = me
        self._routes: dict[tuple[str, type[Any]], Handler] = {}
        self.budgets = Budgets(budget_limits(P2PConfig()))  # the real per-sender budgets

    def on(self, name: str, cls: type[Any], handler: Handler) -> None:
        self._routes[(name, cls)] = handler

    def route(self, name: str, cls: type[Any]) -> Handler | None:
        return self._routes.get((name, cls))

    async def publish(self, name: str, record: Any) -> None:
        await self._net.publish(self._me, name, record)


class MemoryStreams:
    """The ``StreamService`` port of one node, as ``TaskProtocol`` uses it."""

    def __init__(self, net: MarketNet, me: str) -> None:
        self._net = net
        self._me = me
        self.proto: StreamProtocol | None = None
        self.handler: Callable[[ID, Any], Awaitable[Any]] | None = None

    def serve(self, proto: StreamProtocol, handler: Callable[[ID, Any], Awaitable[Any]]) -> None:
        # The market serves the task and the bid protocols with one handler (its dispatch).
        self.proto = self.proto or proto
        self.handler = handler

    async def request(self, peer: ID, proto: StreamProtocol, record: Any, reply_type: type[T]) -> T:
        return await self._net.request(self._me, peer.to_base58(), proto, record, reply_type)

    def session(self, peer: ID, proto: StreamProtocol) -> MemorySession:
        return MemorySession(self, peer, proto)


class MemorySession:
    """``StreamSession``: requests to one peer (each delivered like a stream's)."""

    def __init__(self, streams: MemoryStreams, peer: ID, proto: StreamProtocol) -> None:
        self._streams, self._peer, self._proto = streams, peer, proto
        self.is_open = True

    async def request(self, record: Any, reply_type: type[T]) -> T:
        return await self._streams.request(self._peer, self._proto, record, reply_type)

    async def aclose(self) -> None:
        self.is_open = False


class HarnessView:
    """The ``NetworkView`` methods the market calls (origin, worker, coordinator). No
    chain: every peer is eligible."""

    def __init__(self, net: MarketNet, me: str, eth_address: str) -> None:
        self._net = net
        self.peer_id = me
        self.eth_address = eth_address

    def _known(self, peer: str) -> MarketNode | None:
        visible = peer == self.peer_id or self._net.visible(peer)
        return self._net.nodes[peer] if visible else None

    def alive(self, peer: str) -> bool:
        return self._known(peer) is not None

    def eligible(self, peer: str) -> bool:
        return True

    def serving(self, model: str) -> set[str]:
        return {p for p in self._net.nodes if (n := self._known(p)) is not None and n.serves(model)}

    def profile_of(self, peer: str) -> Any:
        return n.profile if (n := self._known(peer)) else None

    def eth_address_of(self, peer: str) -> str | None:
        return n.signer.address if (n := self._known(peer)) else None

    def health_of(self, peer: str) -> float:
        return n.health if (n := self._known(peer)) else 0.5


# --- a node -----------------------------------------------------------------------------------


class HarnessPresence:
    """The ``PresenceService`` parts the market uses: its ``view`` and ``note_queue``."""

    def __init__(self, view: HarnessView) -> None:
        self.view = view
        self.queue_length = 0

    def note_queue(self, queue_length: int) -> None:
        self.queue_length = queue_length


class HttpAliases:
    """The ``RPCServer`` part ``mount`` uses: the GET aliases, recorded."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}

    def add_get_alias(self, path: str, method: str, *, query: bool = False) -> None:
        self.aliases[path] = method


class HarnessMarket(MarketService):
    """The daemon's ``MarketService`` with one override: consensus embeddings come from
    ``deterministic_embed``. The real ``embed`` loads a sentence-transformers model and
    runs it on a worker thread, which breaks virtual time (``virtual_time_guards`` makes
    any thread hop fail)."""

    async def embed(self, texts: Sequence[str]) -> list[tuple[float, ...]]:
        return await deterministic_embed(texts)


class MarketNode:
    """One node: the daemon's ``MarketService`` (as ``HarnessMarket``) on the harness's
    ports, mounted and run as ``vcoind.node`` does. Its parts (``origin``, ``worker``,
    ``tasks``, ...) are the service's."""

    def __init__(
        self, net: MarketNet, name: str, cfg: MarketConfig, compute: ScriptedCompute, *,
        health: float, profile: str, key: bytes | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.cfg = cfg
        self.compute = compute
        self.health = health
        self.profile = profile
        me = self.peer_id = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
        self.signer = Signer(key or secrets.token_bytes(32), NETWORK)  # shared: one stake
        self.store = Store(Path(":memory:"), inline=True)
        self.metrics = NodeMetrics()
        self.gossip = MemoryGossip(net, me)
        self.streams = MemoryStreams(net, me)
        self.presence = HarnessPresence(HarnessView(net, me, self.signer.address))
        self.view = self.presence.view
        self.rpc = MethodRegistry()
        self.http = HttpAliases()
        self.nursery: trio.Nursery | None = None
        self.finished_at: dict[str, float] = {}  # task id -> virtual time it finished
        self.held: set[tuple[str, str]] = set()  # (peer, tag): kept connected for work
        self._net = net
        payments = Payments(cfg, self.signer, None, self.view)  # type: ignore[arg-type]
        service = self.service = HarnessMarket(
            cfg, NETWORK, payments, self.store, self.gossip, self.streams,  # type: ignore[arg-type]
            self.metrics, self.presence, compute, publish=self._publish,  # type: ignore[arg-type]
            hold=self._hold,
        )  # fmt: skip
        mounts = Mounts(rpc=self.rpc, http=self.http, gossip=self.gossip, streams=self.streams)  # type: ignore[arg-type]
        service.mount(mounts)
        self.tasks, self.consensus_store = service.tasks, service.consensus_store
        self.origin, self.worker = service.origin, service.worker
        self.replica, self.coordinator = service.replica, service.coordinator
        self.protocol = service.protocol
        self.reputations = service.reputations

    def serves(self, model: str) -> bool:
        return any(model in (m.name, m.model_id) for m in self.compute.models.all())

    def peer_update(self) -> PeerUpdate:
        """What this node's heartbeat would put in the others' peer tables."""
        return PeerUpdate(self.peer_id, self.signer.address, (), "scripted", 0, "",
                          self.health, "vcoind/harness", time.time())  # fmt: skip

    def _hold(self, peer: str, tag: str, held: bool) -> None:
        if held:
            self.held.add((peer, tag))
        else:
            self.held.discard((peer, tag))

    async def _publish(self, channel: str, payload: Any) -> None:
        """The node's notification port (``RPCServer.publish``): the service publishes a
        task's view on ``task:<id>`` and on ``tasks`` at every change. Serialised as the
        real port does for a subscriber; a change wakes ``net.wait_for``."""
        json.dumps(payload, allow_nan=False)
        if channel == "tasks":
            if payload["finished"]:
                self.finished_at.setdefault(payload["task_id"], trio.current_time())
            self._net.changed()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service under a nursery of the node's own, which the harness's deliveries to
        this node also run in: ``net.kill`` cancels them all, as the process ending would."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.service.run)
            task_status.started()

    # --- for tests ---

    async def wait_finished(self, task_id: str, timeout: float = 3600.0) -> tuple[TaskRow, float]:
        """The task's final row and the virtual time it finished (this node its origin)."""
        at = await self._net.wait_for(lambda: self.finished_at.get(task_id), timeout)
        row = await self.tasks.get(task_id)
        assert row is not None
        return row, at


# --- the network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """A record handed to a node: ``sent`` when its sender let it go, ``at`` when the
    receiver's handler got it; ``refused``: a request to a dead node (never sent)."""

    sent: float
    at: float
    src: str
    dst: str
    record: Any
    refused: bool = False


@dataclass
class MarketNet:
    nursery: trio.Nursery
    latency_s: float = 1 / 64  # one way, unless a link says otherwise
    peer_timeout_s: float = 30.0  # a dead node stays in the others' views this long
    nodes: dict[str, MarketNode] = field(default_factory=dict)
    links: dict[tuple[str, str], float] = field(default_factory=dict)
    dead: dict[str, float] = field(default_factory=dict)  # peer -> virtual time it died
    muted: set[tuple[str, type[Any]]] = field(default_factory=set)
    log: list[Delivery] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _seq: Any = field(default_factory=lambda: itertools.count(1))
    _changed: trio.Event = field(default_factory=trio.Event)

    async def add_node(
        self, name: str, models: Sequence[str] = (), *, cfg: MarketConfig | None = None,
        behaviour: Behaviour = "normal", per_token_s: float = 0.0625, prefill_s: float = 0.0,
        fail_at: int = 0, slots: int = 1, health: float = 0.8, profile: str = "cpu/float32",
        key: bytes | None = None,
    ) -> MarketNode:  # fmt: skip
        """A running node; every node has the others in its peer table (as heartbeats do)."""
        compute = ScriptedCompute(models, behaviour=behaviour, per_token_s=per_token_s,
                                  prefill_s=prefill_s, fail_at=fail_at, slots=slots)  # fmt: skip
        node = MarketNode(self, name, cfg or MarketConfig(), compute, health=health,
                          profile=profile, key=key)  # fmt: skip
        await node.store.open()
        for other in self.nodes.values():
            await other.store.upsert_peers([node.peer_update()])
            await node.store.upsert_peers([other.peer_update()])
        self.nodes[node.peer_id] = node
        await self.nursery.start(node.run)
        return node

    def set_latency(self, a: MarketNode, b: MarketNode, seconds: float) -> None:
        """One-way latency of the link between ``a`` and ``b``, both ways."""
        self.links[(a.peer_id, b.peer_id)] = self.links[(b.peer_id, a.peer_id)] = seconds

    def latency(self, src: str, dst: str) -> float:
        return self.links.get((src, dst), self.latency_s)

    def mute(self, node: MarketNode, record: type[Any]) -> None:
        """``record``s that ``node`` gossips or sends are lost on the way (its own copy of a
        gossiped one still comes back to it)."""
        self.muted.add((node.peer_id, record))

    def kill(self, node: MarketNode) -> None:
        """The node's process ends: its tasks are cancelled, requests to it fail to open,
        and it leaves the others' views ``peer_timeout_s`` later."""
        self.dead[node.peer_id] = trio.current_time()
        assert node.nursery is not None
        node.nursery.cancel_scope.cancel()
        self.changed()

    def visible(self, peer: str) -> bool:
        """In the peer tables: alive, or dead for less than ``peer_timeout_s``."""
        died = self.dead.get(peer)
        return peer in self.nodes and (
            died is None or trio.current_time() - died < self.peer_timeout_s
        )

    def name_of(self, peer: str) -> str:
        return self.nodes[peer].name

    # --- observing ---

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def error(self, where: str, exc: BaseException) -> None:
        log.error("%s failed", where, exc_info=exc)
        self.errors.append(f"{where}: {type(exc).__name__}: {exc}")

    def _record(self, d: Delivery) -> None:
        self.log.append(d)
        self.changed()

    def deliveries(
        self, record: type[Any], *, src: MarketNode | None = None, dst: MarketNode | None = None
    ) -> list[Delivery]:
        return [
            d for d in self.log
            if isinstance(d.record, record)
            and (src is None or d.src == src.peer_id) and (dst is None or d.dst == dst.peer_id)
        ]  # fmt: skip

    async def wait_for(self, what: Callable[[], T | None], timeout: float = 3600.0) -> T:
        """``what()`` once it is truthy (re-checked after every delivery and notification);
        ``timeout`` in virtual seconds."""
        with trio.fail_after(timeout):
            while not (value := what()):
                await self._changed.wait()
        return value

    # --- gossip ---

    async def publish(self, src: str, topic: str, record: Any) -> None:
        await trio.lowlevel.checkpoint()
        if src in self.dead:
            return
        if (src, type(record)) in self.muted:
            return
        record = dataclasses.replace(record, seq=next(self._seq), timestamp=time.time())
        data = encode(record)
        sent = trio.current_time()
        for dst, node in self.nodes.items():
            if dst != src and dst not in self.dead:
                assert node.nursery is not None
                node.nursery.start_soon(self._deliver, sent, src, node, topic, data)

    async def _deliver(
        self, sent: float, src: str, node: MarketNode, topic: str, data: bytes
    ) -> None:
        await trio.sleep(self.latency(src, node.peer_id))
        record = decode(data)
        handler = node.gossip.route(topic, type(record))
        if handler is None:
            return
        self._record(Delivery(sent, trio.current_time(), src, node.peer_id, record))
        try:
            await handler(record)
        except Exception as exc:  # the real gossip logs it; here a test should see it
            self.error(f"{node.name}: {type(record).__name__} gossip handler", exc)

    # --- direct requests ---

    async def request(
        self, src: str, dst: str, proto: StreamProtocol, record: Any, reply_type: type[T]
    ) -> T:
        sent = trio.current_time()
        node = self.nodes.get(dst)
        if (src, type(record)) in self.muted:  # lost on the way: the sender hears nothing
            await trio.sleep(proto.timeout_s)
            raise StreamProtocolError(f"{proto.protocol_id} to {dst}: no reply in time")
        if node is None or dst in self.dead or src in self.dead:
            self._record(Delivery(sent, sent, src, dst, record, refused=True))
            raise StreamOpenError(f"cannot open {proto.protocol_id} to {dst}: the node is down")
        data = encode(record)
        with trio.move_on_after(proto.timeout_s) as waited:
            await trio.sleep(self.latency(src, dst))
            if dst in self.dead:  # died on the way: the stream never answers
                await trio.sleep_forever()
            reply_data = await self._answer(sent, src, node, data)
            await trio.sleep(self.latency(dst, src))
        if waited.cancelled_caught:
            raise StreamProtocolError(f"{proto.protocol_id} to {dst}: no reply in time")
        reply = decode(reply_data)
        if isinstance(reply, ErrorReply):
            raise StreamProtocolError(f"{dst} answered {reply.code}: {reply.message}")
        if not isinstance(reply, reply_type):
            raise StreamProtocolError(f"{dst} answered a {type(reply).__name__}")
        return reply

    async def _answer(self, sent: float, src: str, node: MarketNode, data: bytes) -> bytes:
        """Run ``node``'s stream handler in its own nursery (it dies with the node)."""
        done = trio.Event()
        reply: list[bytes] = []

        async def serve() -> None:
            request = decode(data)
            self._record(Delivery(sent, trio.current_time(), src, node.peer_id, request))
            assert node.streams.handler is not None
            try:
                answer = await node.streams.handler(ID.from_base58(src), request)
            except StreamProtocolError as exc:
                answer = ErrorReply("refused", str(exc)[:1024])
            except Exception as exc:  # the real stream answers "internal"
                self.error(f"{node.name}: {type(request).__name__} handler", exc)
                answer = ErrorReply("internal", "internal error")
            reply.append(encode(answer))
            done.set()

        assert node.nursery is not None
        node.nursery.start_soon(serve)
        await done.wait()
        return reply[0]


class _ErrorRecords(logging.Handler):
    """The daemon's ERROR records (logger ``vcoind`` and below) as ``MarketNet.errors``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self._errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info and (exc := record.exc_info[1]) is not None:
            text += f": {type(exc).__name__}: {exc}"
        self._errors.append(text)


@contextmanager
def daemon_errors(errors: list[str]) -> Iterator[None]:
    """While it lasts, what the daemon logs at ERROR is appended to ``errors``."""
    logger = logging.getLogger("vcoind")
    handler = _ErrorRecords(errors)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@asynccontextmanager
async def market_net(
    latency_s: float = 1 / 64, peer_timeout_s: float = 30.0, real_timeout_s: float = 30.0
) -> AsyncIterator[MarketNet]:
    """A network of market nodes for one test; on exit every node stops, and a handler
    that raised or an ERROR the daemon logged (a bug the real node would only log) fails
    the test.

    A loop that never sleeps stops virtual time without advancing it, and the test would
    hang: after ``real_timeout_s`` of wall-clock time a watchdog cancels the test.
    """
    net: MarketNet | None = None
    errors: list[str] = []
    token = trio.lowlevel.current_trio_token()
    timed_out = False
    with trio.CancelScope() as everything:

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            everything.cancel()

        watchdog = threading.Timer(real_timeout_s, token.run_sync_soon, (expire,))
        watchdog.start()
        try:
            with daemon_errors(errors):
                async with trio.open_nursery() as nursery:
                    net = MarketNet(nursery, latency_s=latency_s, peer_timeout_s=peer_timeout_s,
                                    errors=errors)  # fmt: skip
                    yield net
                    nursery.cancel_scope.cancel()
        finally:
            watchdog.cancel()
            if net is not None:
                with trio.CancelScope(shield=True):
                    for node in net.nodes.values():
                        await node.store.close()
    if timed_out:
        raise AssertionError(f"{real_timeout_s:g} s of real time: a loop that never sleeps?")
    if errors:
        raise AssertionError("handlers failed or the daemon logged errors:\n" + "\n".join(errors))
