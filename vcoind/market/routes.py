"""The driving side of pipelines: one task's forward passes over layer spans of several nodes.

``PipelineRun`` picks a route, a chain of nodes whose spans cover every layer in order
(best health, then lowest latency, ties by peer id), and ``generate_pipelined`` runs the
node's own token loop (``TokenStream``: sampling, EOS, stop strings) with each forward
pass going hop by hop, only the new positions' hidden states on the wire. A hop that
fails or stays silent for ``hop_timeout_s`` is replaced by another node serving that
span; the new route's caches are rebuilt by replaying the prefix, so the text is the one
an uninterrupted run gives. At most ``MAX_REROUTES`` times. Per hop it records compute
time (reported by the hop), transfer time (the rest of the round trip) and bytes.
The serving side is ``vcoind.compute.shard_host``; ``Routes`` (below) is this node's
pipeline client: tokenizers, the view of who serves which span, metrics.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vcoind.compute.frames import FrameError, TensorFrame
from vcoind.compute.params import GenerationError
from vcoind.compute.shard_host import Channel, PipelineError
from vcoind.compute.shardwire import CHUNK_TOKENS, ShardClose, ShardOpen, ShardOutput, ShardStep
from vcoind.market.chat import ChatError, parse_messages
from vcoind.market.messages import Assign, GenParams
from vcoind.market.origin import generation_timings, params_from_dict
from vcoind.p2p.streams import Ack, StreamProtocolError
from vcoind.presence.messages import LayerSpan

if TYPE_CHECKING:
    from vcoind.compute.generate import Prompt
    from vcoind.compute.service import ComputeService
    from vcoind.metrics import NodeMetrics
    from vcoind.presence.view import NetworkView
    from vcoind.store import TaskRow

log = logging.getLogger("vcoind.pipeline")

MAX_REROUTES = 3
LEARN_TIMEOUT_S = 10.0  # two heartbeats: how long a driver waits to meet its route's nodes
TEXT_EVERY_S = 0.05  # a streamed pipeline's text is decoded at most this often


@dataclass
class Hop:
    peer: str
    start: int
    end: int
    session: str = field(default_factory=lambda: secrets.token_hex(16))
    channel: Any = None
    steps: int = 0
    compute_s: float = 0.0
    transfer_s: float = 0.0
    bytes: int = 0
    status: str = "running"

    def view(self) -> dict[str, Any]:
        return {"node_id": self.peer, "layers": f"{self.start}-{self.end}",
                "status": self.status, "steps": self.steps,
                "compute_s": round(self.compute_s, 6), "transfer_s": round(self.transfer_s, 6),
                "bytes": self.bytes}  # fmt: skip


def choose_route(
    spans: dict[str, list[LayerSpan]],
    model_id: str,
    num_layers: int,
    rank: Callable[[str], tuple[float, float]],
    exclude: AbstractSet[str] = frozenset(),
) -> list[tuple[str, int, int]]:
    """A chain of (peer, start, end) covering layers 0..num_layers-1 in order. At each
    point the candidates are spans starting there; the best by ``rank(peer)`` (lower is
    better: e.g. (-health, latency)), ties by peer id; longer spans first among equals
    of the same node. Dead ends backtrack (depth-first)."""
    by_start: dict[int, list[tuple[tuple[float, float], str, int]]] = {}
    for peer, ss in spans.items():
        if peer in exclude:
            continue
        for s in ss:
            if s.model == model_id and 0 <= s.start <= s.end < num_layers:
                by_start.setdefault(s.start, []).append((rank(peer), peer, s.end))
    for cands in by_start.values():
        cands.sort(key=lambda c: (c[0], c[1], -c[2]))

    def walk(at: int) -> list[tuple[str, int, int]] | None:
        if at == num_layers:
            return []
        for _, peer, end in by_start.get(at, []):
            rest = walk(end + 1)
            if rest is not None:
                return [(peer, at, end), *rest]
        return None

    route = walk(0)
    if route is None:
        raise PipelineError(f"no route covers layers 0-{num_layers - 1} of {model_id}")
    return route


def disjoint_routes(
    spans: dict[str, list[LayerSpan]],
    model_id: str,
    num_layers: int,
    rank: Callable[[str], tuple[float, float]],
    k: int,
) -> list[list[tuple[str, int, int]]]:
    """Up to ``k`` routes with no node in two of them, greedily, best first."""
    routes: list[list[tuple[str, int, int]]] = []
    used: set[str] = set()
    while len(routes) < k:
        try:
            route = choose_route(spans, model_id, num_layers, rank, used)
        except PipelineError:
            break
        routes.append(route)
        used |= {p for p, _, _ in route}
    return routes


class PipelineRun:
    """One task's pipeline: the route, sessions, forward passes, rerouting, the tracker."""

    def __init__(
        self,
        connect: Callable[[str], Channel],
        model_id: str,
        num_layers: int,
        spans: Callable[[], dict[str, list[LayerSpan]]],
        rank: Callable[[str], tuple[float, float]],
        hop_timeout_s: float = 30.0,
        *,
        route: list[tuple[str, int, int]] | None = None,
        exclude: AbstractSet[str] = frozenset(),
        ready: Callable[[str], bool] | None = None,
        learn_timeout_s: float = LEARN_TIMEOUT_S,
    ) -> None:
        """``route``: the first route to try (else the best one); ``exclude``: nodes never
        used, first route and reroutes alike (another replica's); ``ready(peer)``: whether
        this node has heard from and connected to ``peer``. A route handed over by an
        origin was chosen from the origin's peer table: right after start-up this node
        may not have met every node on it yet, so it waits up to ``learn_timeout_s`` for
        them before dialling (a hop that fails is never tried again in this run)."""
        self._connect = connect
        self._first_route = route
        self._ready = ready
        self.learn_timeout_s = learn_timeout_s
        self.exclude = frozenset(exclude)
        self.model_id = model_id
        self.num_layers = num_layers
        self._spans = spans
        self._rank = rank
        self.hop_timeout_s = hop_timeout_s
        self.hops: list[Hop] = []
        self.history: list[Hop] = []  # every hop ever used, failed ones included
        self.fed: list[int] = []  # token ids the current route's caches hold
        self.failed_peers: set[str] = set()
        self.reroutes = 0

    async def open(self) -> None:
        route = self._first_route
        self._first_route = None
        if route is None or any(p in self.exclude for p, _, _ in route):
            route = choose_route(self._spans(), self.model_id, self.num_layers, self._rank,
                                 self.failed_peers | self.exclude)  # fmt: skip
        else:
            await self._meet(route)
        self.hops = [Hop(p, a, b) for p, a, b in route]
        self.history += self.hops
        for h in self.hops:
            h.status = "failing"  # until it answers
            h.channel = self._connect(h.peer)
            with trio.fail_after(self.hop_timeout_s):
                await h.channel.request(ShardOpen(h.session, self.model_id, h.start, h.end),
                                        Ack)  # fmt: skip
            h.status = "running"
        log.info("pipeline route: %s", " -> ".join(f"{h.peer[-6:]}[{h.start}-{h.end}]"
                                                    for h in self.hops))  # fmt: skip

    async def _meet(self, route: list[tuple[str, int, int]]) -> None:
        ready = self._ready
        if ready is None or all(ready(p) for p, _, _ in route):
            return
        t0 = trio.current_time()
        with trio.move_on_after(self.learn_timeout_s):
            while not all(ready(p) for p, _, _ in route):
                await trio.sleep(0.1)
        missing = [p[-6:] for p, _, _ in route if not ready(p)]
        log.info("pipeline route: waited %.1f s for its nodes%s", trio.current_time() - t0,
                 f"; still unmet: {', '.join(missing)}" if missing else "")  # fmt: skip

    async def close(self) -> None:
        for h in self.hops:
            if h.channel is None:
                continue
            with trio.move_on_after(3), contextlib.suppress(StreamProtocolError, OSError):
                await h.channel.request(ShardClose(h.session), Ack)
            with trio.move_on_after(1):
                await h.channel.aclose()

    async def forward(self, new_ids: list[int]) -> Any:
        """Logits of the last position after feeding ``new_ids``; reroutes on failure."""
        import torch

        base = list(self.fed)  # what the route's caches held before this call
        pending = list(new_ids)
        while True:
            try:
                if not self.hops:
                    await self.open()
                    pending = [*base, *new_ids]  # replay the prefix into fresh caches
                    self.fed = []
                for i in range(0, len(pending), CHUNK_TOKENS):  # a long prompt in chunks
                    chunk = pending[i : i + CHUNK_TOKENS]
                    x = TensorFrame.from_tensor(torch.tensor([chunk], dtype=torch.int64))
                    for h in self.hops:
                        x = await self._step(h, x)
                    self.fed += chunk
                return x.to_tensor()[0, -1]
            except (StreamProtocolError, trio.TooSlowError, FrameError, OSError) as exc:
                bad = next((h for h in self.hops if h.status == "failing"), None)
                culprit = bad.peer if bad else (self.hops[0].peer if self.hops else "?")
                log.warning("pipeline hop %s failed: %s", culprit, exc)
                if bad is not None:
                    bad.status = "failed"
                    self.failed_peers.add(bad.peer)
                for h in self.hops:
                    if h.status == "running":
                        h.status = "abandoned"
                await self.close()
                self.hops = []
                self.reroutes += 1
                if self.reroutes > MAX_REROUTES:
                    raise PipelineError(f"pipeline failed after {MAX_REROUTES} reroutes: "
                                        f"{exc}") from None  # fmt: skip

    async def _step(self, h: Hop, x: TensorFrame) -> TensorFrame:
        h.status = "failing"  # until the reply is in
        t0 = time.perf_counter()
        with trio.fail_after(self.hop_timeout_s):
            out: ShardOutput = await h.channel.request(
                ShardStep(h.session, h.steps, x.dtype, x.shape, x.data), ShardOutput
            )
        rtt = time.perf_counter() - t0
        h.status = "running"
        h.steps += 1
        h.compute_s += out.compute_s
        h.transfer_s += max(0.0, rtt - out.compute_s)
        h.bytes += len(x.data) + len(out.data)
        return TensorFrame(out.dtype, tuple(out.shape), out.data)

    def finish(self) -> None:
        for h in self.hops:
            if h.status == "running":
                h.status = "completed"


async def generate_pipelined(
    run: PipelineRun,
    tokenizer: Any,
    prompt: Prompt,
    params: Any,
    max_positions: int,
    on_token: Callable[[int], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Any:
    """The decode loop (sampling, EOS, stop strings: ``TokenStream``) on the trio thread,
    each forward pass through ``run``: per token, sampling is all the origin computes, so
    no worker-thread round trip is worth its cost."""
    from vcoind.compute.generate import encode_text
    from vcoind.compute.params import GenerationError
    from vcoind.compute.sampling import TokenStream

    ids = encode_text(tokenizer, prompt)
    stream = TokenStream(ids, params, tokenizer)
    if len(ids) + params.max_new_tokens > max_positions:
        raise GenerationError(f"prompt ({len(ids)} tokens) + max_new_tokens exceeds the "
                              f"model's context of {max_positions}")  # fmt: skip
    try:
        t0 = time.perf_counter()
        nxt = stream.push(await run.forward(ids))
        t1 = time.perf_counter()
        shown = 0.0
        while nxt is not None:
            if on_token is not None:
                on_token(len(stream.out))
            if on_text is not None and time.monotonic() - shown >= TEXT_EVERY_S:
                shown = time.monotonic()
                on_text(tokenizer.decode(stream.out, skip_special_tokens=True))
            nxt = stream.push(await run.forward([nxt]))
        if on_token is not None and stream.out:
            on_token(len(stream.out))
        run.finish()
        return stream.result(t1 - t0, time.perf_counter() - t1)
    finally:
        with trio.CancelScope(shield=True):
            await run.close()


def _prompt(text: str, chat: bool) -> Prompt:
    """A task's input as the tokenizer takes it: its messages, for a chat task."""
    return parse_messages(text) if chat else text


class Routes:
    """This node's pipeline client (the market's ``Pipelines`` port): pipelined tasks it
    is origin of, pipelined consensus replicas it drives, disjoint routes for them."""

    def __init__(self, compute: ComputeService, view: NetworkView, metrics: NodeMetrics) -> None:
        self._compute = compute
        self._view = view
        self._metrics = metrics
        self._tokenizers: dict[str, Any] = {}

    def _rank(self, peer: str) -> tuple[float, float]:
        """Lower is better: health (rounded, so near-equal nodes tie), then load (queue
        and pipeline sessions), then latency."""
        view = self._view
        if peer == view.peer_id:
            load = view.capabilities.queue_length + self._compute.shard_host.open_sessions
            return (-round(view.health_of(peer), 1), load)
        st = view.peers.get(peer)
        if st is None:
            return (0.0, 1e9)
        return (-round(st.health, 1), st.heartbeat.queue_length + st.latency_s)

    def _source(self, model: str) -> Path:
        """A local directory with the model's tokenizer and config (a span or the model)."""
        for sp in self._compute.shard_host.spans:
            if model in (sp.model, sp.model_id):
                return sp.path
        for info in self._compute.models.all():
            if model in (info.name, info.model_id):
                return info.path
        raise PipelineError(
            f"this node holds no part of {model!r}: a pipeline's origin needs its "
            "tokenizer (serve one of its spans, or the model)"
        )

    async def _model(self, model: str) -> tuple[Any, Any, str]:
        """Tokenizer, config and model id of a model this node holds a part of."""
        src = self._source(model)
        if str(src) not in self._tokenizers:

            def load() -> tuple[Any, Any]:
                from transformers import AutoConfig, AutoTokenizer

                from vcoind.compute.params import eos_ids

                tok = AutoTokenizer.from_pretrained(str(src))
                tok.vcoin_eos_ids = eos_ids(src, tok.eos_token_id)
                return tok, AutoConfig.from_pretrained(str(src))

            self._tokenizers[str(src)] = await trio.to_thread.run_sync(load)
        tokenizer, config = self._tokenizers[str(src)]
        spans = self._compute.shard_host.spans
        manifest_id = next((sp.model_id for sp in spans if sp.path == src), None)
        return tokenizer, config, manifest_id or self._compute.models.resolve(model).model_id

    async def _generate(
        self, model: str, prompt: Prompt, params: GenParams, timeout_s: float, on_token: Any,
        route: list[tuple[str, int, int]] | None = None, exclude: frozenset[str] = frozenset(),
        on_text: Callable[[str], None] | None = None,
    ) -> tuple[Any, str, PipelineRun, float]:  # fmt: skip
        tokenizer, config, model_id = await self._model(model)
        run = PipelineRun(self._compute.shard_channel, model_id, int(config.num_hidden_layers),
                          self._view.spans_by_peer, self._rank,
                          hop_timeout_s=min(30.0, timeout_s), route=route,
                          exclude=exclude, ready=self._view.met)  # fmt: skip
        max_pos = int(getattr(config, "max_position_embeddings", 1 << 30))
        t0 = time.monotonic()
        try:
            r = await generate_pipelined(run, tokenizer, prompt, params.generation(), max_pos,
                                         on_token, on_text)  # fmt: skip
        except (GenerationError, ChatError) as exc:
            raise PipelineError(str(exc)) from None
        for h in run.history:
            self._metrics.pipeline_hop.labels(kind="compute").observe(h.compute_s)
            self._metrics.pipeline_hop.labels(kind="transfer").observe(h.transfer_s)
            self._metrics.pipeline_bytes.inc(h.bytes)
        return r, model_id, run, time.monotonic() - t0

    async def run(
        self, row: TaskRow, on_token: Callable[[int], None],
        on_text: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        params = params_from_dict(row.parameters)
        prompt = _prompt(row.input, bool(row.parameters.get("chat")))
        r, model_id, run, total = await self._generate(row.model, prompt, params,
                                                       row.timeout_s, on_token,
                                                       on_text=on_text)  # fmt: skip
        hops = [h.view() for h in run.history]
        return {
            "text": r.text, "model_id": model_id, "tokens": len(r.token_ids), "hops": hops,
            "timings": {"pipeline_s": round(total, 6), **generation_timings(r),
                        "reroutes": run.reroutes, "hops": hops},
        }  # fmt: skip

    async def run_route(self, a: Assign, on_token: Callable[[int], None]) -> tuple[Any, str]:
        """A pipelined consensus replica: this node drives ``a.route``, never touching the
        other replicas' nodes."""
        route = [(h.peer, h.start, h.end) for h in a.route]
        try:
            r, model_id, run, _ = await self._generate(
                a.model, _prompt(a.input, a.chat), a.params, 30.0, on_token, route,
                frozenset(a.exclude),
            )  # fmt: skip
        except PipelineError as exc:
            raise GenerationError(str(exc)) from None
        log.info("task %s attempt %d: pipelined over %s", a.task_id, a.attempt,
                 " -> ".join(f"{h.peer[-6:]}[{h.start}-{h.end}]" for h in run.hops))  # fmt: skip
        return r, model_id

    async def disjoint(self, model: str, k: int) -> tuple[str, list[list[tuple[str, int, int]]]]:
        _, config, model_id = await self._model(model)
        return model_id, disjoint_routes(
            self._view.spans_by_peer(), model_id, int(config.num_hidden_layers), self._rank, k
        )
