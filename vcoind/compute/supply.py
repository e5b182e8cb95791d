"""Where this node's models and spans come from, and where they go: ``ModelSupply``.

- Serves ``/vcoin/model/1.0.0`` (``fetch.ModelServer``) for the models in its store and
  the spans it serves; a span another node asks for is split out of the whole model
  once (at most ``REMOTE_SPLITS`` such directories are kept, least recently made go).
- Fetches what it lacks from the peers that advertise it (``fetch.ModelFetcher``): on
  ``vcoin_fetchModel`` (``vcoind model fetch``), for every ``compute.fetch_models`` entry
  it does not hold, and for a ``--serve-layers`` span it holds no part of. A peer that
  sent bad bytes is penalised and left out of this node's fetches for ``BAD_PEER_S``.
- ``--serve-layers auto[:N]`` / ``MODEL:auto[:N]``: picks the span the fewest nodes serve
  (``autospan``), gets it (split from a local model, or fetched), serves it, and
  re-balances (every few heartbeats) when a span host has left a gap.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from vcoind.compute.autospan import AutoSpec, choose_span, layers_that_fit, rebalanced
from vcoind.compute.fetch import (
    MODEL_STREAM,
    FetchError,
    Located,
    ModelFetcher,
    ModelServer,
)
from vcoind.compute.fetchwire import WHOLE
from vcoind.compute.models import SHARD_MANIFEST, ModelError
from vcoind.compute.shard_host import ServedSpan
from vcoind.p2p.streams import StreamProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

    from vcoind.compute.service import ComputeService
    from vcoind.p2p.streams import StreamService
    from vcoind.presence.view import NetworkView

log = logging.getLogger("vcoind.fetch")

BAD_PEER_S = 3600.0
REMOTE_SPLITS = 8
RETRY_S = 5.0  # a wanted model nobody offers yet: look again this often
# In heartbeat intervals: once a first peer is heard of, hear this long from the network
# before picking a span; then look at the spans again this often (both with +-25 % jitter).
SETTLE_BEATS = 2.5
FIRST_PEER_BEATS = 20  # ... and first wait this long at most to hear of any peer
REBALANCE_BEATS = 4.0
PENALTY = 20.0  # gossip score taken from a peer that sent bad bytes (4 invalid messages)
# Spans split out of a whole model at one peer's request, at most this many an hour: a
# split reads the model, so a peer cannot keep the node splitting.
SPLITS_PER_PEER_HOUR = 4


@dataclass
class FetchJob:
    model: str
    start: int = WHOLE
    end: int = WHOLE
    status: str = "running"  # running | done | failed
    error: str = ""
    path: str = ""
    bytes: int = 0
    seconds: float = 0.0
    peers: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def key(self) -> str:
        return self.model if self.start == WHOLE else f"{self.model}:{self.start}-{self.end}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layers": None if self.start == WHOLE else f"{self.start}-{self.end}",
            "status": self.status, "error": self.error, "path": self.path,
            "bytes": self.bytes, "seconds": round(self.seconds, 3), "peers": self.peers,
            "dropped": self.dropped, "started_at": self.started_at,
        }  # fmt: skip


class ModelSupply:
    def __init__(self, compute: ComputeService, streams: StreamService,
                 view: NetworkView | None, penalise: Callable[[str, float], None],
                 on_refused: Callable[[str], None], heartbeat_s: float = 5.0) -> None:  # fmt: skip
        self._compute_refused = on_refused
        cfg = compute.cfg
        self._compute = compute
        self._view = view
        self._penalise_peer = penalise
        self.server = ModelServer(self._locate_for, uploads_per_peer=cfg.uploads_per_peer,
                                  upload_bytes_per_s=cfg.upload_mb_s * 1e6,
                                  on_refused=on_refused)  # fmt: skip
        self.fetcher = ModelFetcher(streams, workers_per_peer=cfg.fetch_streams_per_peer,
                                    penalise=self._bad_peer)  # fmt: skip
        self.jobs: dict[str, FetchJob] = {}
        self._bad: dict[str, float] = {}  # peer -> until (monotonic)
        self._split_lock = trio.Lock()
        self._splits: dict[str, list[float]] = {}  # peer -> when we split a span for it
        self._nursery: trio.Nursery | None = None
        self.auto_span: tuple[str, int, int] | None = None  # (model id, start, end)
        self._beat = max(heartbeat_s, 0.25)
        self._discover: Callable[[str, int, int], None] = lambda model, start, end: None

    def use_discovery(self, look_up: Callable[[str, int, int], None]) -> None:
        """DHT fallback (``vcoind.discovery``): when no heartbeat names a provider,
        ``look_up(model, start, end)`` searches the DHT in the background; verified
        providers join the peer table, so the next ``providers`` call finds them."""
        self._discover = look_up

    # --- serving ----------------------------------------------------------------

    def mount(self, streams: StreamService) -> None:
        streams.serve(MODEL_STREAM, lambda peer, r: self.server.handle(peer.to_base58(), r))

    async def _locate_for(self, peer: str, model: str, start: int, end: int) -> Located | None:
        return await self.locate(model, start, end, peer=peer)

    async def locate(self, model: str, start: int, end: int, *, peer: str = "") -> Located | None:
        """Where a model (or span) this node can serve lives; a span it does not hold is
        split out of its whole model (for a ``peer``: within its split budget)."""
        c = self._compute
        if start == WHOLE:
            try:
                info = c.models.resolve(model)
            except ModelError:
                return None
            return Located(info.path, info.name, info.model_id, info.num_layers)
        for sp in c.shard_host.spans:
            if model in (sp.model, sp.model_id) and (sp.start, sp.end) == (start, end):
                return Located(sp.path, sp.model, sp.model_id, _layers(sp.path))
        try:
            info = c.models.resolve(model)
        except ModelError:
            return None
        if not 0 <= start <= end < info.num_layers:
            return None
        done = c.split_before(info, start, end)
        if done is not None:
            return Located(done, info.name, info.model_id, info.num_layers)
        if peer:
            now = time.monotonic()
            recent = [t for t in self._splits.get(peer, []) if t > now - 3600.0]
            if len(recent) >= SPLITS_PER_PEER_HOUR:
                self._compute_refused("model_splits")
                raise StreamProtocolError(f"{SPLITS_PER_PEER_HOUR} spans split for you in the "
                                          "last hour already")  # fmt: skip
            self._splits[peer] = [*recent, now]
        async with self._split_lock:  # one split at a time, whoever asks
            path = await trio.to_thread.run_sync(c.split_span, info, start, end, True)
        return Located(path, info.name, info.model_id, info.num_layers)

    # --- fetching ---------------------------------------------------------------

    def _bad_peer(self, peer: str, why: str) -> None:
        log.warning("peer %s sent a bad model file (%s): penalised, left out of fetches "
                    "for %.0f s", peer, why, BAD_PEER_S)  # fmt: skip
        self._bad[peer] = time.monotonic() + BAD_PEER_S
        self._penalise_peer(peer, PENALTY)

    def providers(self, model: str, start: int = WHOLE, end: int = WHOLE) -> list[str]:
        """Peers that advertise the whole model (or, for a span, exactly that span),
        healthiest first, without those that sent bad bytes lately."""
        view = self._view
        if view is None:
            return []
        now = time.monotonic()
        model_id = view.model_id_of(model) or model
        out = []
        for st in view.peers.peers():
            if self._bad.get(st.peer_id, 0.0) > now:
                continue
            hb = st.heartbeat
            whole = any(model in (m.name, m.model_id) for m in hb.models)
            span = start != WHOLE and any(s.model in (model, model_id) and (s.start, s.end) ==
                                          (start, end) for s in hb.spans)  # fmt: skip
            if whole or span:
                out.append(st)
        if not out:  # DHT fallback: nobody we heard of serves it (see use_discovery)
            self._discover(model_id, start, end)
        return [st.peer_id for st in sorted(out, key=lambda st: (-round(st.health, 1),
                                                                 st.peer_id))]  # fmt: skip

    def fetch(self, model: str, start: int = WHOLE, end: int = WHOLE) -> FetchJob:
        """Start fetching (or join the fetch of) a model or span; the job says how it went."""
        job = FetchJob(model, start, end)
        running = self.jobs.get(job.key)
        if running is not None and running.status == "running":
            return running
        self.jobs[job.key] = job
        assert self._nursery is not None, "the compute service is not running"
        self._nursery.start_soon(self._run_job, job)
        return job

    async def _run_job(self, job: FetchJob) -> None:
        c = self._compute
        view = self._view
        try:
            peers = self.providers(job.model, job.start, job.end)
            model_id = (view.model_id_of(job.model) if view is not None else None) or (
                job.model if job.model.startswith("sha256:") else None
            )
            whole = job.start == WHOLE
            root = Path(c.models.root or ".") if whole else c.shards_dir
            if whole and any(job.model in (m.name, m.model_id) for m in c.models.all()):
                raise FetchError(f"{job.model} is in the model store already")
            r = await self.fetcher.fetch(job.model, peers, root, start=job.start, end=job.end,
                                         model_id=model_id)  # fmt: skip
            job.path, job.bytes, job.seconds = str(r.path), r.fetched_bytes, r.seconds
            job.peers, job.dropped = r.by_peer, r.dropped
            if whole:
                await c.rescan_models()
            job.status = "done"
        except Exception as exc:  # whatever happens to a fetch, the node goes on
            job.status, job.error = "failed", _reason(exc)
            log.warning("fetch %s failed: %s", job.key, job.error,
                        exc_info=not isinstance(exc, FetchError | OSError))  # fmt: skip
        finally:
            job.done.set()

    async def keep_fetching(self, models: tuple[str, ...]) -> None:
        """``compute.fetch_models``: fetch each one this node lacks, until it has them."""
        want = list(models)
        while want:
            for m in list(want):
                if any(m in (i.name, i.model_id) for i in self._compute.models.all()):
                    want.remove(m)
                elif self.providers(m) and self.jobs.get(m, FetchJob(m, status="x")).status != (
                    "running"
                ):
                    self.fetch(m)
            await trio.sleep(RETRY_S)

    async def get_span(self, model: str, start: int, end: int) -> ServedSpan:
        """A span to serve: split from the local model, else fetched (waits for peers)."""
        c = self._compute
        found = await self.locate(model, start, end)
        if found is not None:
            return ServedSpan(found.name, found.model_id, start, end, found.directory)
        while True:
            job = self.fetch(model, start, end)
            await job.done.wait()
            if job.status == "done":
                m = c.read_shard(Path(job.path))
                return ServedSpan(m.model, m.model_id, m.start, m.end, Path(job.path))
            log.info("layers %d-%d of %s: %s; trying again in %.0f s", start, end, model,
                     job.error, RETRY_S)  # fmt: skip
            await trio.sleep(RETRY_S)

    # --- auto spans -------------------------------------------------------------

    async def auto(self, spec: AutoSpec) -> None:
        """Serve the span the network needs most, and move when it needs another."""
        view = self._view
        if view is None:
            return
        with trio.move_on_after(FIRST_PEER_BEATS * self._beat):  # joined the network yet?
            while not view.peers.peers():
                await trio.sleep(min(0.1, self._beat / 4))
        await trio.sleep(SETTLE_BEATS * self._beat * (0.75 + 0.5 * random.random()))
        while True:
            try:
                await self._auto_once(spec, view)
            except FetchError as exc:
                log.warning("--serve-layers auto: %s", exc)
            await trio.sleep(REBALANCE_BEATS * self._beat * (0.75 + 0.5 * random.random()))

    async def _auto_once(self, spec: AutoSpec, view: NetworkView) -> None:
        model = spec.model or _busiest_model(view)
        if model is None:
            log.info("--serve-layers auto: no model is served in the network yet")
            return
        model_id = view.model_id_of(model) or model
        num_layers, weight_bytes = await self._shape(model, model_id)
        others = {p: [(s.start, s.end) for s in ss if s.model == model_id]
                  for p, ss in view.spans_by_peer().items() if p != view.peer_id}  # fmt: skip
        mine = self.auto_span
        size = spec.size or layers_that_fit(await trio.to_thread.run_sync(
            self._compute.free_memory), weight_bytes, num_layers)  # fmt: skip
        if mine is not None and mine[0] == model_id:
            moved = rebalanced((mine[1], mine[2]), view.peer_id, others, num_layers, size)
            if moved is None:
                return
            a, b = moved
            log.info("--serve-layers auto: moving from layers %d-%d to %d-%d (a span host "
                     "left a gap)", *mine[1:], a, b)  # fmt: skip
        else:
            a, b = choose_span([s for ss in others.values() for s in ss], num_layers, size)
            log.info("--serve-layers auto: serving layers %d-%d of %s (%d layers fit)", a, b,
                     model, size)  # fmt: skip
        span = await self.get_span(model, a, b)
        self._compute.serve_span(span, replace=mine)
        self.auto_span = (span.model_id, a, b)

    async def _shape(self, model: str, model_id: str) -> tuple[int, int]:
        """Layers and weight bytes of a model: from the store, else a peer's manifest."""
        try:
            info = self._compute.models.resolve(model)
            return info.num_layers, info.weight_bytes
        except ModelError:
            pass
        m, _, _ = await self.fetcher.manifests(model, self.providers(model), WHOLE, WHOLE,
                                               model_id if model_id.startswith("sha256:")
                                               else None)  # fmt: skip
        return m.num_layers, sum(f.size for f in m.files if f.name.endswith(".safetensors"))

    # --- lifecycle --------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        return [j.as_dict() for j in self.jobs.values()]

    async def run(self, specs: list[AutoSpec], wanted: list[tuple[str, int, int]],
                  *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            models = self._compute.cfg.fetch_models
            if models:
                nursery.start_soon(self.keep_fetching, models)
            for model, a, b in wanted:
                nursery.start_soon(self._serve_fetched, model, a, b)
            for spec in specs:
                nursery.start_soon(self.auto, spec)
            await trio.sleep_forever()  # fetches asked for later start in this nursery

    async def _serve_fetched(self, model: str, start: int, end: int) -> None:
        self._compute.serve_span(await self.get_span(model, start, end))


def _reason(exc: BaseException) -> str:
    """One line for an error, the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _busiest_model(view: NetworkView) -> str | None:
    """With no model named: the model most nodes serve whole (the one in demand)."""
    counts: dict[str, int] = {}
    for m in view.served():
        counts[m.model_id] = counts.get(m.model_id, 0) + 1
    return max(sorted(counts), key=lambda k: counts[k]) if counts else None


def _layers(path: Path) -> int:
    try:
        return int(json.loads((path / SHARD_MANIFEST).read_text())["num_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def prune_splits(shards_dir: Path, keep: set[Path], limit: int = REMOTE_SPLITS) -> None:
    """Remove the oldest span directories made for peers beyond ``limit``."""
    made = sorted((d for d in shards_dir.glob("*") if d.is_dir() and d not in keep
                   and not d.name.startswith(".")), key=lambda d: d.stat().st_mtime)  # fmt: skip
    for d in made[: max(0, len(made) - limit)]:
        shutil.rmtree(d, ignore_errors=True)
