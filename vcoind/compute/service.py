"""The compute service: the model store, the inference executor, the pipeline server.

It scans the models directory (announcing what it serves), creates the executor on
first use (importing torch costs seconds a node without work need not pay), resolves
``--serve-layers`` into shard directories and serves them on ``/vcoin/shard/1.0.0``,
moves weights between nodes on ``/vcoin/model/1.0.0`` (``supply``: fetch what it lacks,
serve what it holds, ``--serve-layers auto``), and answers ``vcoin_models`` and
``vcoin_fetchModel``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from vcoind.compute.autospan import AutoSpec, parse_auto
from vcoind.compute.fetchwire import WHOLE
from vcoind.compute.models import ModelError, ModelInfo, ModelStore
from vcoind.compute.shard_host import (
    SESSION_IDLE_S,
    LocalChannel,
    ServedSpan,
    ShardHost,
    parse_serve_spec,
)
from vcoind.compute.shardwire import SHARD_PROTOCOL, ShardClose, ShardOpen, ShardStep
from vcoind.compute.supply import ModelSupply, prune_splits
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import StreamProtocol, StreamService
from vcoind.presence.messages import ModelServed
from vcoind.rpc import INVALID_PARAMS, MethodRegistry, Param, RPCError, RPCMethod

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.compute.executor import Executor
    from vcoind.compute.shards import ShardManifest
    from vcoind.config import ComputeConfig
    from vcoind.presence.view import NetworkView
    from vcoind.service import Mounts

log = logging.getLogger("vcoind.compute")

SHARD_STREAM = StreamProtocol(
    SHARD_PROTOCOL,
    (ShardOpen, ShardStep, ShardClose),
    max_request_bytes=ShardStep.MAX_BYTES,
    keep_open_s=SESSION_IDLE_S,
)


class ComputeError(Exception):
    """The compute service cannot start as configured (a span it cannot serve, ...)."""


class ComputeService:
    def __init__(
        self,
        cfg: ComputeConfig,
        models_dir: Path,
        shards_dir: Path,
        peer_id: str,
        streams: StreamService,
        *,
        announce: Callable[..., None],
        metrics: NodeMetrics | None = None,
        view: NetworkView | None = None,
        penalise: Callable[[str, float], None] = lambda peer, amount: None,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.cfg = cfg
        budget_refused = (metrics or NodeMetrics()).budget_refused
        self.models = ModelStore(models_dir)
        self.shards_dir = shards_dir
        self._peer_id = peer_id
        self._streams = streams
        self._announce = announce
        self.shard_host = ShardHost(cfg.device, budget_bytes=cfg.memory_budget_mb << 20,
                                    slots=cfg.batch_slots, max_context=cfg.max_context,
                                    kernels=None if cfg.triton_kernels else False,
                                    sessions_per_peer=cfg.pipeline_sessions_per_peer,
                                    me=peer_id,
                                    on_refused=lambda resource: budget_refused.labels(
                                        resource=resource).inc())  # fmt: skip
        self._executor: Executor | None = None
        self._executor_lock = trio.Lock()
        self._executor_thread_lock = threading.Lock()
        self._served: tuple[ModelServed, ...] = ()
        self.supply = ModelSupply(
            self,
            streams,
            view,
            penalise,
            lambda resource: budget_refused.labels(resource=resource).inc(),
            heartbeat_s,
        )

    # --- the executor -------------------------------------------------------

    @property
    def has_executor(self) -> bool:
        return self._executor is not None

    def executor_now(self) -> Executor:
        """The executor, created here on first use (blocking: imports torch)."""
        with self._executor_thread_lock:  # an abandoned creator thread may still be in here
            if self._executor is None:
                self.torch_threads()
                from vcoind.compute.executor import Executor, ExecutorConfig

                cc = self.cfg
                self._executor = Executor(
                    self.models,
                    ExecutorConfig(device=cc.device, memory_budget_mb=cc.memory_budget_mb,
                                   batch_slots=cc.batch_slots, max_context=cc.max_context,
                                   compile_decode=cc.compile_decode,
                                   triton_kernels=cc.triton_kernels,
                                   prefill_chunk=cc.prefill_chunk,
                                   reuse_prefix=cc.reuse_prefix),
                )  # fmt: skip
            return self._executor

    async def executor(self) -> Executor:
        """The executor, created on a worker thread on first use."""
        if self._executor is None:  # after the first call, no thread hop per task
            async with self._executor_lock:  # two threads importing transformers break it
                if self._executor is None:
                    # Abandoned on cancel: shutting down never waits for torch's import.
                    await trio.to_thread.run_sync(self.executor_now, abandon_on_cancel=True)  # type: ignore[call-arg]
        return self.executor_now()

    @property
    def slots(self) -> int:
        """Requests the executor decodes together (1 until it exists)."""
        return self._executor.slots if self._executor is not None else 1

    def torch_threads(self) -> None:
        n = self.cfg.cpu_threads
        if n > 0:
            import torch

            torch.set_num_threads(n)

    # --- models and spans ---------------------------------------------------

    async def rescan_models(self) -> None:
        """Re-read the model store (hashing new weights off the trio thread) and announce it."""
        infos = await trio.to_thread.run_sync(self.models.scan)
        served = tuple(ModelServed(m.name, m.model_id, m.reasoning) for m in infos)
        if served != self._served:
            log.info("serving models: %s", ", ".join(m.name for m in infos) or "none")
            self._served = served
            self._announce(models=served)

    def _resolve_spans(self) -> tuple[list[ServedSpan], list[tuple[str, int, int]]]:
        """``--serve-layers``: a matching shard dir in the models dir or DATADIR/shards, else
        split from the whole model once; the spans of a model this node holds no part of
        are left to fetch from peers. File work: runs on a worker thread."""
        from vcoind.compute.shards import ShardManifest

        root = Path(self.models.root or ".")
        manifests = []
        for d in [*sorted(root.glob("*")), *sorted(self.shards_dir.glob("*"))]:
            if (d / "shard.json").is_file() and not d.name.startswith("."):
                manifests.append((d, ShardManifest.read(d)))
        served, fetch = [], []
        for spec in self.cfg.serve_layers:
            if parse_auto(spec) is not None:
                continue
            name, a, b = parse_serve_spec(spec)
            found = next((d for d, m in manifests if name in (m.model, m.model_id)
                          and (m.start, m.end) == (a, b)), None)  # fmt: skip
            if found is None:
                try:
                    info = self.models.resolve(name)
                except ModelError:
                    log.info("--serve-layers %s: no part of %s here; fetching the span from "
                             "peers", spec, name)  # fmt: skip
                    fetch.append((name, a, b))
                    continue
                found = self.split_span(info, a, b)
            m = ShardManifest.read(found)
            served.append(ServedSpan(m.model, m.model_id, m.start, m.end, found))
        return served, fetch

    def split_span(self, info: ModelInfo, start: int, end: int, for_peer: bool = False) -> Path:
        """Layers ``start``-``end`` of a local model as a shard directory under
        DATADIR/shards (split once, then reused). Blocking: call it on a worker thread."""
        from vcoind.compute.shards import ShardError, split_model

        done = self.split_before(info, start, end)
        if done is not None:
            return done
        if for_peer:  # spans split for peers: a bounded number, the oldest go first
            prune_splits(self.shards_dir, {sp.path for sp in self.shard_host.spans})
        log.info("splitting layers %d-%d out of %s", start, end, info.name)
        try:
            return split_model(info.path, self.shards_dir, [(start, end)], name=info.name,
                               model_id=info.model_id, partial=True)[0]  # fmt: skip
        except ShardError as exc:
            raise ComputeError(f"layers {start}-{end} of {info.name}: {exc}") from None

    def split_before(self, info: ModelInfo, start: int, end: int) -> Path | None:
        """The shard directory of that span split earlier, if it is there and whole."""
        from vcoind.compute.shards import ShardError, ShardManifest

        d = self.shards_dir / f"{info.name}.{start}-{end}"
        try:
            return d if ShardManifest.read(d).model_id == info.model_id else None
        except ShardError:
            return None

    @staticmethod
    def read_shard(path: Path) -> ShardManifest:
        from vcoind.compute.shards import ShardManifest

        return ShardManifest.read(path)

    def serve_span(self, *spans: ServedSpan, replace: tuple[str, int, int] | None = None
                   ) -> None:  # fmt: skip
        """Serve ``spans`` to pipelines (instead of ``replace``: model id, start, end), and
        announce what this node now serves."""
        if replace is not None:
            self.shard_host.remove(*replace)
        for span in spans:
            if self.shard_host.find(span.model_id, span.start, span.end) is None:
                self.shard_host.add(span)
        self._announce(spans=tuple(sp.span() for sp in self.shard_host.spans))
        log.info("serving layer spans: %s", ", ".join(
            f"{sp.model}:{sp.start}-{sp.end}" for sp in self.shard_host.spans))  # fmt: skip

    def free_memory(self) -> int:
        """Bytes this node can give to weights: the memory budget, else what the device
        has free (CUDA's free memory, or available RAM). Blocking (may import torch)."""
        if self.cfg.memory_budget_mb > 0:
            return self.cfg.memory_budget_mb << 20
        if self.cfg.device in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info()[0])
        import psutil

        return int(psutil.virtual_memory().available)

    async def _serve_spans(self) -> tuple[list[AutoSpec], list[tuple[str, int, int]]]:
        """Resolve ``--serve-layers`` and announce the spans; what is left for the supply
        (auto specs, spans to fetch)."""
        served, fetch = await trio.to_thread.run_sync(self._resolve_spans)
        if served:
            self.serve_span(*served)
        autos = [a for a in map(parse_auto, self.cfg.serve_layers) if a is not None]
        return autos, fetch

    def shard_channel(self, peer: str) -> Any:
        """Requests of one pipeline hop: over one /vcoin/shard/1.0.0 stream kept open for
        the session; to ourselves plain calls."""
        if peer == self._peer_id:
            return LocalChannel(self.shard_host, peer)
        return self._streams.session(ID.from_base58(peer), SHARD_STREAM)

    # --- the service --------------------------------------------------------

    def mount(self, m: Mounts) -> None:
        m.streams.serve(SHARD_STREAM, lambda peer, r: self.shard_host.handle(
            peer.to_base58(), r))  # fmt: skip
        self.supply.mount(m.streams)
        self._register_rpc(m.rpc)

    def _register_rpc(self, reg: MethodRegistry) -> None:
        async def models(params: dict[str, Any]) -> dict[str, Any]:
            if params["rescan"]:
                await self.rescan_models()
            ex = self._executor
            loaded = {m.model_id for m in ex.loaded()} if ex is not None else set()
            return {
                "models_dir": str(self.models.root),
                "models": [{**m.as_dict(), "loaded": m.model_id in loaded}
                           for m in self.models.all()],
                "fetches": self.supply.status(),
            }  # fmt: skip

        async def fetch_model(params: dict[str, Any]) -> dict[str, Any]:
            model, layers = params["model"], params["layers"]
            start = end = WHOLE
            if layers is not None:
                try:
                    _, start, end = parse_serve_spec(f"{model}:{layers}")
                except ValueError as exc:
                    raise RPCError(INVALID_PARAMS, str(exc)) from None
            elif any(model in (m.name, m.model_id) for m in self.models.all()):
                raise RPCError(INVALID_PARAMS, f"{model} is in the model store already")
            if not self.supply.providers(model, start, end):
                raise RPCError(INVALID_PARAMS, f"no peer advertises {model}"
                               + (f" or its layers {layers}" if layers else ""))  # fmt: skip
            job = self.supply.fetch(model, start, end)
            if params["wait"]:
                await job.done.wait()
            return job.as_dict()

        reg.add(RPCMethod(
            "vcoin_models",
            "Models in this node's store (name, weight-hash id, size) and which are loaded.",
            (Param("rescan", {"type": "boolean"}, default=False,
                   description="re-read the models directory first (new models are announced)"),),
            {"type": "object"}, models,
        ))  # fmt: skip
        reg.add(RPCMethod(
            "vcoin_fetchModel",
            "Fetch a model (or one layer span of it) from the peers that advertise it, "
            "checked against its model id; it is served once it is here. Progress is in "
            "vcoin_nodeInfo.progress, the outcome in vcoin_models.fetches.",
            (Param("model", {"type": "string", "minLength": 1, "maxLength": 128},
                   description="short name or model id"),
             Param("layers", {"type": ["string", "null"], "pattern": "^[0-9]+-[0-9]+$"},
                   default=None, description="START-END (inclusive): only that span"),
             Param("wait", {"type": "boolean"}, default=False,
                   description="answer when the fetch has ended, not when it starts")),
            {"type": "object"}, fetch_model,
        ))  # fmt: skip

    def status(self) -> dict[str, Any]:
        """Pipeline sessions and warm engines, for ``vcoin_nodeInfo``."""
        h = self.shard_host
        return {
            "pipeline_sessions": h.open_sessions,
            "pipeline_sessions_served": h.sessions_served,
            "pipeline_peak_batch": h.peak_batch,
            "engines": self.executor_now().engines() if self.has_executor else [],
            "fetches": self.supply.status(),
        }

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.rescan_models()
        if self.models.all():
            # torch in place before the node says it is up: imported later, in the middle
            # of the first burst of tasks, it cost dispatch ~2 s (bench/dispatch.py). A node
            # serving no model never needs it (and starts in half the time).
            await trio.to_thread.run_sync(_import_torch)
        autos, fetch = await self._serve_spans()
        await self.supply.run(autos, fetch, task_status=task_status)


def _import_torch() -> None:
    import torch  # noqa: F401
