"""The compute service: the model store, the inference executor, the pipeline server.

It scans the models directory (announcing what it serves), creates the executor on
first use (importing torch costs seconds a node without work need not pay), resolves
``--serve-layers`` into shard directories and serves them on ``/vcoin/shard/1.0.0``,
and answers ``vcoin_models``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from vcoind.compute.models import ModelStore
from vcoind.compute.shard_host import (
    SESSION_IDLE_S,
    LocalChannel,
    ServedSpan,
    ShardHost,
    parse_serve_spec,
)
from vcoind.compute.shardwire import SHARD_PROTOCOL, ShardClose, ShardOpen, ShardStep
from vcoind.metrics import NodeMetrics
from vcoind.p2p.streams import StreamProtocol, StreamService
from vcoind.presence.messages import ModelServed
from vcoind.rpc import MethodRegistry, Param, RPCMethod

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from vcoind.compute.executor import Executor
    from vcoind.config import ComputeConfig
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
    ) -> None:
        self.cfg = cfg
        budget_refused = (metrics or NodeMetrics()).budget_refused
        self.models = ModelStore(models_dir)
        self._shards_dir = shards_dir
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

    def _resolve_spans(self) -> list[ServedSpan]:
        """``--serve-layers``: a matching shard dir in the models dir, else split the whole
        model into DATADIR/shards once. File work: runs on a worker thread."""
        if not self.cfg.serve_layers:
            return []
        from vcoind.compute.shards import ShardManifest, split_model

        root = Path(self.models.root or ".")
        manifests = []
        for d in [*sorted(root.glob("*")), *sorted(self._shards_dir.glob("*"))]:
            if (d / "shard.json").is_file():
                manifests.append((d, ShardManifest.read(d)))
        served = []
        for spec in self.cfg.serve_layers:
            name, a, b = parse_serve_spec(spec)
            found = next((d for d, m in manifests if name in (m.model, m.model_id)
                          and (m.start, m.end) == (a, b)), None)  # fmt: skip
            if found is None:
                try:
                    info = self.models.resolve(name)
                except Exception as exc:
                    raise ComputeError(f"--serve-layers {spec}: no shard directory for it in "
                                       f"{root} and {exc}") from None  # fmt: skip
                log.info("splitting layers %d-%d out of %s", a, b, info.name)
                found = split_model(info.path, self._shards_dir, [(a, b)], name=info.name,
                                    model_id=info.model_id, partial=True)[0]  # fmt: skip
            m = ShardManifest.read(found)
            served.append(ServedSpan(m.model, m.model_id, m.start, m.end, found))
        return served

    async def _serve_spans(self) -> None:
        """Resolve ``--serve-layers`` and announce the spans."""
        served = await trio.to_thread.run_sync(self._resolve_spans)
        if not served:
            return
        for sp in served:
            self.shard_host.add(sp)
        self._announce(spans=tuple(sp.span() for sp in served))
        log.info("serving layer spans: %s", ", ".join(self.cfg.serve_layers))

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
            }  # fmt: skip

        reg.add(RPCMethod(
            "vcoin_models",
            "Models in this node's store (name, weight-hash id, size) and which are loaded.",
            (Param("rescan", {"type": "boolean"}, default=False,
                   description="re-read the models directory first (new models are announced)"),),
            {"type": "object"}, models,
        ))  # fmt: skip

    def status(self) -> dict[str, Any]:
        """Pipeline sessions and warm engines, for ``vcoin_nodeInfo``."""
        h = self.shard_host
        return {
            "pipeline_sessions": h.open_sessions,
            "pipeline_sessions_served": h.sessions_served,
            "pipeline_peak_batch": h.peak_batch,
            "engines": self.executor_now().engines() if self.has_executor else [],
        }

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.rescan_models()
        if self.models.all():
            # torch in place before the node says it is up: imported later, in the middle
            # of the first burst of tasks, it cost dispatch ~2 s (bench/dispatch.py). A node
            # serving no model never needs it (and starts in half the time).
            await trio.to_thread.run_sync(_import_torch)
        await self._serve_spans()
        task_status.started()


def _import_torch() -> None:
    import torch  # noqa: F401
