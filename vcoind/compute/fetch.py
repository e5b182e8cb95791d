"""Weights between nodes over ``/vcoin/model/1.0.0`` (records in ``fetchwire``).

``ModelServer`` answers for the models and spans this node holds: a manifest (built once
per model on a worker thread, hashes cached on disk) and chunks, read on a worker thread.
Uploads obey the node's budgets: a peer may have ``uploads_per_peer`` chunk requests in
flight (more are refused, not queued), and all uploads together share a token bucket of
``upload_bytes_per_s``.

``ModelFetcher`` gets a model (or one span) from the peers that advertise it: it asks each
for its manifest and keeps the peers whose manifest describes the model id asked for (the
weight hashes must make it up) and that agree with the most others; then its workers,
``workers_per_peer`` a peer, each on its own stream, take the next missing chunk from one
shared queue, so a faster peer serves more. Every chunk is checked against its hash as
it arrives: a peer that sends bad bytes is dropped at once and penalised, its chunk goes
back to the queue for the others. Chunks land in ``.part`` files in a staging directory;
after a restart the bytes already there are checked against the manifest and only the
rest is fetched. Each finished file is checked against its sha256, a span against its
``shard.json`` tensor by tensor, and only then does the directory take its real name.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from vcoind.compute.fetchwire import (
    CHUNK_BYTES,
    MODEL_PROTOCOL,
    WHOLE,
    ChunkData,
    ChunkWant,
    ModelManifest,
    ModelWant,
)
from vcoind.compute.manifest import (
    ManifestError,
    check_manifest,
    missing_chunks,
    preallocate,
    verify_file,
    verify_shard,
)
from vcoind.compute.models import SOURCE_FILE
from vcoind.p2p.streams import StreamProtocol, StreamProtocolError, StreamService
from vcoind.progress import BOARD

log = logging.getLogger("vcoind.fetch")

MODEL_STREAM = StreamProtocol(
    MODEL_PROTOCOL, (ModelWant, ChunkWant), max_request_bytes=ModelWant.MAX_BYTES,
    timeout_s=600.0, keep_open_s=30.0,
)  # fmt: skip
MANIFEST_TIMEOUT_S = 600.0  # the first manifest of a big model hashes (or splits) it first
CHUNK_TIMEOUT_S = 30.0
MAX_FAILURES = 5  # failed chunk requests in a row before a peer is left out of a fetch


class FetchError(Exception):
    """No peer could provide the model, or what they sent did not check out."""


# --- serving ---------------------------------------------------------------------


class TokenBucket:
    """Bytes per second shared by every upload (``rate`` <= 0: no limit)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self._level = self.burst
        self._at = trio.current_time() if rate > 0 else 0.0
        self._lock = trio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # first come, first served
            now = trio.current_time()
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
            self._at = now
            self._level -= n
            if self._level < 0:
                await trio.sleep(-self._level / self.rate)


# Where a served model or span lives: (asking peer, model or model id, start, end) -> its
# directory, name, model id and layer count, or None when this node holds neither.
Locate = Callable[[str, str, int, int], Awaitable["Located | None"]]


@dataclass(frozen=True)
class Located:
    directory: Path
    name: str
    model_id: str
    num_layers: int


class ModelServer:
    def __init__(self, locate: Locate, *, uploads_per_peer: int = 4,
                 upload_bytes_per_s: float = 0.0,
                 on_refused: Callable[[str], None] = lambda resource: None) -> None:  # fmt: skip
        self._locate = locate
        self._per_peer = uploads_per_peer
        self.bucket = TokenBucket(upload_bytes_per_s, upload_bytes_per_s)
        self._on_refused = on_refused
        self._manifests: dict[tuple[str, int, int], tuple[Path, ModelManifest]] = {}
        self._building: dict[tuple[str, int, int], trio.Lock] = {}
        self._busy: collections.Counter[str] = collections.Counter()
        self.bytes_sent: collections.Counter[str] = collections.Counter()

    async def handle(self, peer: str, request: Any) -> ModelManifest | ChunkData:
        if isinstance(request, ModelWant):
            return (await self._manifest(peer, request.model, request.start, request.end))[1]
        return await self._chunk(peer, request)

    async def _manifest(self, peer: str, model: str, start: int, end: int
                        ) -> tuple[Path, ModelManifest]:  # fmt: skip
        if (start == WHOLE) != (end == WHOLE) or (start != WHOLE and start > end):
            raise StreamProtocolError(f"bad layer range {start}-{end}")
        found = await self._locate(peer, model, start, end)
        if found is None:
            what = model if start == WHOLE else f"{model} layers {start}-{end}"
            raise StreamProtocolError(f"this node does not hold {what}")
        key = (found.model_id, start, end)
        lock = self._building.setdefault(key, trio.Lock())
        async with lock:  # hash a model once, however many peers ask at the same time
            cached = self._manifests.get(key)
            if cached is None or cached[0] != found.directory:
                cached = (found.directory, await trio.to_thread.run_sync(
                    _build, found, start, end))  # fmt: skip
                self._manifests[key] = cached
        return cached

    async def _chunk(self, peer: str, want: ChunkWant) -> ChunkData:
        key = (want.model_id, want.start, want.end)
        if key not in self._manifests:
            await self._manifest(peer, want.model_id, want.start, want.end)
        directory, m = self._manifests[key]
        entry = m.file(want.file)
        if entry is None or want.index >= entry.count:
            raise StreamProtocolError(f"no chunk {want.index} of {want.file}")
        if self._busy[peer] >= self._per_peer:
            self._on_refused("model_uploads")
            raise StreamProtocolError(f"busy: {self._per_peer} chunk requests of yours "
                                      "in flight already")  # fmt: skip
        self._busy[peer] += 1
        try:
            n = entry.chunk_len(want.index)
            await self.bucket.take(n)
            data = await trio.to_thread.run_sync(
                _read, directory / entry.name, want.index * CHUNK_BYTES, n
            )
            self.bytes_sent[peer] += len(data)
            return ChunkData(data)
        finally:
            self._busy[peer] -= 1
            if not self._busy[peer]:
                del self._busy[peer]


def _read(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(n)


def _build(found: Located, start: int, end: int) -> ModelManifest:
    from vcoind.compute.manifest import build_manifest, travelling_bytes

    with BOARD.step("hash", found.directory.name, total=travelling_bytes(found.directory),
                    unit="B") as step:  # fmt: skip
        return build_manifest(found.directory, name=found.name, model_id=found.model_id,
                              num_layers=found.num_layers, start=start, end=end,
                              on_bytes=step.advance)  # fmt: skip


# --- fetching --------------------------------------------------------------------


@dataclass
class _Peer:
    peer: str
    bytes: int = 0
    failures: int = 0
    dropped: str = ""  # why it was left out


@dataclass
class FetchResult:
    path: Path
    manifest: ModelManifest
    fetched_bytes: int  # over the wire (what was on disk already is not counted)
    seconds: float
    by_peer: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


class ModelFetcher:
    def __init__(self, streams: StreamService, *, workers_per_peer: int = 4,
                 penalise: Callable[[str, str], None] = lambda peer, why: None,
                 chunk_timeout_s: float = CHUNK_TIMEOUT_S) -> None:  # fmt: skip
        self._streams = streams
        self._workers = max(1, workers_per_peer)
        self._penalise = penalise
        self._chunk_timeout = chunk_timeout_s

    async def manifests(
        self, want: str, peers: list[str], start: int, end: int, model_id: str | None
    ) -> tuple[ModelManifest, list[str], dict[str, str]]:
        """The manifest most peers agree on (checked against ``model_id``), the peers that
        sent it, and why the others were left out."""
        got: dict[str, ModelManifest] = {}
        dropped: dict[str, str] = {}

        async def ask(peer: str) -> None:
            try:
                m = await self._streams.request(ID.from_base58(peer), MODEL_STREAM,
                                                ModelWant(want, start, end), ModelManifest,
                                                timeout_s=MANIFEST_TIMEOUT_S)  # fmt: skip
                check_manifest(m, model_id, start, end)
            except StreamProtocolError as exc:
                dropped[peer] = f"no manifest: {exc}"
            except ManifestError as exc:
                dropped[peer] = f"bad manifest: {exc}"
                self._penalise(peer, f"bad manifest: {exc}")
            else:
                got[peer] = m

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(ask, p)
        if not got:
            raise FetchError(f"no peer could provide {want}: " + "; ".join(
                f"{p[:16]}…: {why}" for p, why in sorted(dropped.items())) if dropped else
                f"no peer advertises {want}")  # fmt: skip
        votes = collections.Counter(got.values())
        best = max(votes, key=lambda m: (votes[m], -peers.index(next(
            p for p in peers if got.get(p) == m))))  # fmt: skip
        for p, m in got.items():
            if m != best:
                dropped[p] = "its files differ from the other peers'"
        return best, [p for p in peers if got.get(p) == best], dropped

    async def fetch(
        self, want: str, peers: list[str], dest_root: Path, *, start: int = WHOLE,
        end: int = WHOLE, model_id: str | None = None,
    ) -> FetchResult:  # fmt: skip
        """Fetch a model (or layers ``start``-``end``) into ``dest_root/<name>`` (a span:
        ``dest_root/<name>.<start>-<end>``)."""
        t0 = time.monotonic()
        m, good, dropped = await self.manifests(want, peers, start, end, model_id)
        name = m.name if m.whole else f"{m.name}.{m.start}-{m.end}"
        dest = dest_root / name
        if dest.exists():
            raise FetchError(f"{dest} exists already (with other files)")
        staging = dest_root / f".fetch-{m.model_id[7:23]}-{name}"
        staging.mkdir(parents=True, exist_ok=True)
        todo = await trio.to_thread.run_sync(_resume, staging, m)
        left = {f: set(ix) for f, ix in todo.items() if ix}  # (None: finished before)
        sizes = {f.name: f for f in m.files}
        have = m.total_bytes - sum(sizes[f].chunk_len(i) for f, ix in left.items() for i in ix)
        what = name if m.whole else f"{m.name} layers {m.start}-{m.end}"
        label = f"{what} from {len(good)} peer{'s' * (len(good) != 1)}"
        state = _Fetch(m, staging, [_Peer(p) for p in good], left, dropped)
        with BOARD.step("fetch", label, total=m.total_bytes, unit="B") as step:
            step.set(have)
            state.step = step
            if have:
                log.info("fetch %s: resuming, %d of %d bytes already here", what, have,
                         m.total_bytes)  # fmt: skip
            async with trio.open_nursery() as nursery:
                state.nursery = nursery
                for f in [f for f, ix in todo.items() if ix == []]:  # all there, unchecked
                    nursery.start_soon(state.finish_file, f)
                for p in state.peers:
                    for _ in range(self._workers):
                        nursery.start_soon(self._worker, state, p)
            if state.failed:
                raise FetchError(state.failed)
        await trio.to_thread.run_sync(_install, staging, dest, m, state, start, end)
        took = time.monotonic() - t0
        got = sum(p.bytes for p in state.peers)
        log.info("fetched %s: %d bytes in %.1f s (%.1f MB/s) from %s", what, got, took,
                 got / took / 1e6 if took else 0.0,
                 ", ".join(f"{p.peer[:12]}… {p.bytes}" for p in state.peers))  # fmt: skip
        return FetchResult(dest, m, got, took, {p.peer: p.bytes for p in state.peers},
                           state.dropped)  # fmt: skip

    async def _worker(self, st: _Fetch, p: _Peer) -> None:
        session = self._streams.session(ID.from_base58(p.peer), MODEL_STREAM)
        m = st.manifest
        try:
            while not p.dropped and not st.failed:
                job = st.take()
                if job is None:
                    if not st.pending:
                        return
                    await st.changed()
                    continue
                fname, index = job
                entry = m.file(fname)
                assert entry is not None
                try:
                    reply = await session.request(
                        ChunkWant(m.model_id, m.start, m.end, fname, index), ChunkData,
                        timeout_s=self._chunk_timeout,
                    )  # fmt: skip
                except StreamProtocolError as exc:
                    st.put_back(job)
                    p.failures += 1
                    if p.failures >= MAX_FAILURES:
                        st.drop(p, f"{p.failures} failed requests, the last: {exc}")
                        return
                    await trio.sleep(min(5.0, 0.2 * 2**p.failures))
                    continue
                data = reply.data
                if len(data) != entry.chunk_len(index) or (
                    hashlib.sha256(data).digest() != entry.chunk_hash(index)
                ):
                    st.put_back(job)
                    st.drop(p, f"sent bad bytes for chunk {index} of {fname}")
                    self._penalise(p.peer, f"bad chunk {index} of {fname} ({m.model_id})")
                    return
                p.failures = 0
                p.bytes += len(data)
                await st.write(fname, index, data)
        finally:
            await session.aclose()


class _Fetch:
    """One fetch's shared state: the chunks left, who serves them, what is being checked."""

    def __init__(self, m: ModelManifest, staging: Path, peers: list[_Peer],
                 left: dict[str, set[int]], dropped: dict[str, str]) -> None:  # fmt: skip
        self.manifest = m
        self.staging = staging
        self.peers = peers
        self.left = left  # file -> chunk indexes not on disk yet
        self.queue = collections.deque((f, i) for f, ix in sorted(left.items())
                                       for i in sorted(ix))  # fmt: skip
        self.in_flight = 0
        self.dropped = dropped
        self.failed = ""
        self.step: Any = None
        self.nursery: trio.Nursery | None = None
        self._event = trio.Event()

    @property
    def pending(self) -> bool:
        return bool(self.queue) or self.in_flight > 0

    def take(self) -> tuple[str, int] | None:
        if not self.queue:
            return None
        self.in_flight += 1
        return self.queue.popleft()

    def put_back(self, job: tuple[str, int]) -> None:
        self.in_flight -= 1
        self.queue.appendleft(job)
        self._wake()

    async def changed(self) -> None:
        await self._event.wait()

    def _wake(self) -> None:
        self._event.set()
        self._event = trio.Event()

    def drop(self, p: _Peer, why: str) -> None:
        p.dropped = self.dropped[p.peer] = why
        log.warning("fetch %s: leaving out %s: %s", self.manifest.name, p.peer, why)
        if all(q.dropped for q in self.peers) and self.pending:
            self.failed = ("every peer was left out before the fetch was done: " + "; ".join(
                f"{q.peer[:16]}…: {q.dropped}" for q in self.peers))  # fmt: skip
        self._wake()

    async def write(self, fname: str, index: int, data: bytes) -> None:
        await trio.to_thread.run_sync(_pwrite, self.staging / f"{fname}.part",
                                      index * CHUNK_BYTES, data)  # fmt: skip
        self.in_flight -= 1
        self.left[fname].discard(index)
        self.step.advance(len(data))
        if not self.left[fname]:
            assert self.nursery is not None
            self.nursery.start_soon(self.finish_file, fname)
        self._wake()

    async def finish_file(self, fname: str) -> None:
        entry = self.manifest.file(fname)
        assert entry is not None
        part = self.staging / f"{fname}.part"
        try:
            await trio.to_thread.run_sync(verify_file, part, entry)
        except ManifestError as exc:  # every chunk matched, the whole did not: a bad manifest
            self.failed = f"{fname} does not match its hash after all its chunks did: {exc}"
            part.unlink(missing_ok=True)
            self._wake()
            return
        part.replace(self.staging / fname)


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _resume(staging: Path, m: ModelManifest) -> dict[str, list[int] | None]:
    """Per file, the chunks still to fetch (None: finished and checked before)."""
    out: dict[str, list[int] | None] = {}
    for f in m.files:
        done = staging / f.name
        if done.exists():
            try:
                verify_file(done, f)
                out[f.name] = None
                continue
            except ManifestError:
                done.unlink()
        part = staging / f"{f.name}.part"
        out[f.name] = missing_chunks(part, f)
        preallocate(part, f.size)
    for stale in staging.iterdir():  # files of another manifest: not ours to keep
        base = stale.name.removesuffix(".part")
        if m.file(base) is None:
            stale.unlink()
    return out


def _install(staging: Path, dest: Path, m: ModelManifest, state: _Fetch, start: int,
             end: int) -> None:  # fmt: skip
    if not m.whole:
        try:
            verify_shard(staging, m.model_id, start, end)
        except ManifestError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise FetchError(f"the span's tensors do not match its shard.json: {exc}") from None
    source = {
        "source": "peer",
        "model_id": m.model_id,
        "layers": None if m.whole else [start, end],
        "peers": [p.peer for p in state.peers if p.bytes] or [p.peer for p in state.peers],
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {f.name: {"size": f.size, "sha256": f.sha256} for f in m.files},
    }
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    staging.replace(dest)
