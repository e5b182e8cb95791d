"""Discovery: finding a model's workers through the DHT, and proving what we serve.

The node provides DHT records (``vcoind.p2p.dht``) for the models and spans it serves, as
they come and go. ``find_workers(model, span)`` asks the DHT who provides them; every
answer is a hint. A provider counts as a worker only once it proved it: we connect to it
(its addresses pass the dial policy) and ask it over ``/vcoin/capability/1.0.0`` for its
current heartbeat, which must be its own (the Noise-authenticated peer of the stream),
of our network, fresh, carry a valid peer-id/eth-address binding, and list the model (or
a span covering the one asked for). Then it enters the peer table like a gossiped
heartbeat, so the market, pipelines and model fetches see it; a record for a model its
heartbeat does not list is counted (``refuted``) and dropped.

Answering: one capability request per peer every ``ASK_EVERY_S``; the heartbeat we send
is built at most once a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from vcoind.p2p.codec import Message, lim, message
from vcoind.p2p.dht import Dht, model_key, span_key
from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService
from vcoind.presence.heartbeat import BindingCheck
from vcoind.presence.messages import Heartbeat
from vcoind.rpc import INVALID_PARAMS, Param, RPCError
from vcoind.rpc import RPCMethod as M

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.config import P2PConfig
    from vcoind.presence.view import NetworkView
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.discovery")

CAPABILITY_PROTOCOL = "/vcoin/capability/1.0.0"
ASK_EVERY_S = 1.0
BUILD_EVERY_S = 1.0
CONNECT_S = 5.0
VERIFY_AT_ONCE = 8
LOOK_UP_EVERY_S = 30.0  # a background lookup of one model (or span), at most this often
PROOF_REUSE_S = 10.0  # a peer's heartbeat, once fetched, answers lookups this long
WATCH_S = 1.0
MODEL_ID = r"sha256:[0-9a-f]{64}"


@message
@dataclass(frozen=True)
class CapabilityRequest(Message):
    """Asks a peer for its current heartbeat (which says what it serves)."""

    KIND: ClassVar[str] = "capability_request"
    MAX_BYTES: ClassVar[int] = 256

    model: str = field(default="", metadata=lim(max_len=71))


CAPABILITY_STREAM = StreamProtocol(CAPABILITY_PROTOCOL, (CapabilityRequest,),
                                   max_request_bytes=CapabilityRequest.MAX_BYTES,
                                   timeout_s=10.0)  # fmt: skip


@dataclass(frozen=True)
class Worker:
    peer_id: str
    addrs: tuple[str, ...]
    verified: bool
    reason: str = ""  # why it was not counted

    def as_dict(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "addrs": list(self.addrs), "verified": self.verified,
                **({"reason": self.reason} if self.reason else {})}  # fmt: skip


def serves(hb: Heartbeat, model_id: str, span: tuple[int, int] | None) -> bool:
    """The heartbeat lists the whole model, or (for a span) a span of it covering ``span``."""
    if any(m.model_id == model_id for m in hb.models):
        return True
    if span is None:
        return False
    names = {m.name for m in hb.models if m.model_id == model_id}
    return any((s.model == model_id or s.model in names) and s.start <= span[0] and
               span[1] <= s.end for s in hb.spans)  # fmt: skip


class DiscoveryService:
    def __init__(
        self,
        cfg: P2PConfig,
        network: str,
        dht: Dht | None,
        streams: StreamService,
        view: NetworkView,
        *,
        proof: Callable[[], Awaitable[Heartbeat]],
        admit: Callable[[Heartbeat], Awaitable[None]],
        connect: Callable[[PeerInfo, float], Awaitable[None]],
    ) -> None:
        self._cfg = cfg
        self._network = network
        self.dht = dht
        self._streams = streams
        self._view = view
        self._proof = proof
        self._admit = admit
        self._connect = connect
        self._check = BindingCheck(max_entries=4096)
        self._asked: dict[str, float] = {}
        self._built: tuple[float, Heartbeat] | None = None
        self._nursery: trio.Nursery | None = None
        self._looking: dict[str, float] = {}  # background lookups: tag -> when started
        self._proofs: dict[ID, tuple[float, Heartbeat]] = {}
        self.refuted = 0  # providers whose heartbeat did not back their record

    # --- serving our proof ----------------------------------------------------------

    def mount(self, m: Mounts) -> None:
        m.streams.serve(CAPABILITY_STREAM, self._answer)
        m.rpc.add(M(
            "vcoin_findProviders",
            "Nodes serving a model (or a span of its layers) found through the DHT alone, "
            "each verified over a direct stream (its own heartbeat lists the model) before it "
            "counts as a worker; verified ones join the peer table. Unverified DHT answers "
            "are listed with the reason.",
            (Param("model", {"type": "string", "maxLength": 128}, required=True,
                   description="a model id (sha256:...) or a name the node knows the id of"),
             Param("layers", {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                         "maximum": 10_000}, "maxItems": 2},
                   default=None, description="[start, end]: providers of that span")),
            {"type": "object"}, self._rpc_find,
        ))  # fmt: skip

    async def _answer(self, peer: ID, req: CapabilityRequest) -> Heartbeat:
        who = peer.to_base58()
        now = time.monotonic()
        if now - self._asked.get(who, -ASK_EVERY_S) < ASK_EVERY_S:
            raise StreamProtocolError(f"one capability request a peer every {ASK_EVERY_S} s")
        self._asked[who] = now
        if len(self._asked) > 4096:
            self._asked = {p: t for p, t in self._asked.items() if now - t < ASK_EVERY_S}
        if self._built is None or now - self._built[0] >= BUILD_EVERY_S:
            self._built = (now, await self._proof())
        return self._built[1]

    # --- providing what we serve ------------------------------------------------------

    def _keys(self) -> set[bytes]:
        caps = self._view.capabilities
        keys = {model_key(self._network, m.model_id) for m in caps.models}
        for s in caps.spans:
            model_id = self._view.model_id_of(s.model)
            if model_id is not None:
                keys.add(span_key(self._network, model_id, s.start, s.end))
        return keys

    async def _watch(self) -> None:
        assert self.dht is not None
        while True:
            self.dht.provide_keys(self._keys())
            await trio.sleep(WATCH_S)

    # --- finding workers ------------------------------------------------------------

    def model_id(self, model: str) -> str | None:
        return model if model.startswith("sha256:") else self._view.model_id_of(model)

    async def find_workers(self, model: str, span: tuple[int, int] | None = None
                           ) -> list[Worker]:  # fmt: skip
        """Providers of ``model`` (or of ``span`` of it) from the DHT, each verified."""
        model_id = self.model_id(model)
        if self.dht is None or model_id is None:
            return []
        key = (model_key(self._network, model_id) if span is None else
               span_key(self._network, model_id, *span))  # fmt: skip
        hints = await self.dht.find(key)
        out: list[Worker] = []
        limiter = trio.CapacityLimiter(VERIFY_AT_ONCE)

        async def check(info: PeerInfo) -> None:
            async with limiter:
                reason = await self._verify(info, model_id, span)
            if reason:
                self.refuted += 1
                log.info("DHT provider %s of %s not counted: %s", info.peer_id, model_id,
                         reason)  # fmt: skip
            out.append(Worker(info.peer_id.to_base58(), tuple(str(a) for a in info.addrs),
                              not reason, reason))  # fmt: skip

        async with trio.open_nursery() as nursery:
            for info in hints:
                nursery.start_soon(check, info)
        return sorted(out, key=lambda w: (not w.verified, w.peer_id))

    async def _verify(self, info: PeerInfo, model_id: str, span: tuple[int, int] | None
                      ) -> str:  # fmt: skip
        """ "" when ``info`` proved it serves the model (and is admitted), else why not."""
        peer = info.peer_id
        now = time.monotonic()
        kept = self._proofs.get(peer)
        if kept is not None and now - kept[0] < PROOF_REUSE_S:
            hb = kept[1]
        else:
            try:
                if peer not in self._view_connected():
                    await self._connect(info, CONNECT_S)
                ask = CapabilityRequest(model_id)
                hb = await self._streams.request(peer, CAPABILITY_STREAM, ask, Heartbeat)
            except (StreamProtocolError, OSError, trio.TooSlowError) as exc:
                return f"unreachable: {exc}"
            except Exception as exc:  # py-libp2p raises many unrelated types on dial failure
                return f"unreachable: {exc or type(exc).__name__}"
            self._proofs = {p: v for p, v in self._proofs.items() if now - v[0] < PROOF_REUSE_S}
            self._proofs[peer] = (now, hb)
        if hb.peer_id != peer.to_base58():
            return "its heartbeat names another peer"
        if hb.network != self._network:
            return f"network {hb.network}"
        if abs(time.time() - hb.timestamp) > self._cfg.peer_timeout + PROOF_REUSE_S:
            return "a stale heartbeat"
        if self._check(hb) is not None:
            return "a forged eth binding"
        if not serves(hb, model_id, span):
            return "its heartbeat does not list the model"
        await self._admit(hb)
        return ""

    def _view_connected(self) -> set[ID]:
        return {ID.from_base58(p) for p in self._view.connected()}

    def look_up(self, model: str, start: int = -1, end: int = -1) -> None:
        """Find ``model``'s (or a span's) workers in the background: what the model supply
        asks when no heartbeat names a provider (found ones join the peer table)."""
        span = None if start < 0 else (start, end)
        tag = f"{model}:{span}"
        now = time.monotonic()
        if self._nursery is None or self.dht is None:
            return
        if now - self._looking.get(tag, -LOOK_UP_EVERY_S) < LOOK_UP_EVERY_S:
            return
        self._looking = {t: at for t, at in self._looking.items()
                         if now - at < LOOK_UP_EVERY_S}  # fmt: skip
        self._looking[tag] = now
        self._nursery.start_soon(self._look_up, model, span)

    async def _look_up(self, model: str, span: tuple[int, int] | None) -> None:
        try:
            await self.find_workers(model, span)
        except Exception:  # a failed background lookup is retried at the next ask
            log.warning("DHT lookup of %s failed", model, exc_info=True)

    async def _rpc_find(self, params: dict[str, Any]) -> dict[str, Any]:
        model, layers = params["model"], params["layers"]
        if layers is not None and (len(layers) != 2 or layers[0] > layers[1]):
            raise RPCError(INVALID_PARAMS, "layers must be [start, end] with start <= end")
        model_id = self.model_id(model)
        if model_id is None:
            raise RPCError(INVALID_PARAMS, f"no model id known for {model!r}: give the id "
                           "(sha256:...); the DHT is keyed by model id")  # fmt: skip
        if self.dht is None:
            raise RPCError(INVALID_PARAMS, "the DHT is off (p2p.dht = off)")
        span = None if layers is None else (int(layers[0]), int(layers[1]))
        workers = await self.find_workers(model_id, span)
        return {"model_id": model_id, "layers": layers, "dht": self.dht.status(),
                "workers": [w.as_dict() for w in workers if w.verified],
                "unverified": [w.as_dict() for w in workers if not w.verified]}  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {"dht": self.dht.status() if self.dht else None, "refuted": self.refuted}

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.dht is not None:
                await nursery.start(self.dht.run)
                nursery.start_soon(self._watch)
            task_status.started()
